//! The two spellings of a libpq connection string, reduced to `(key, value)`
//! pairs in order: `key=value ...` (with libpq's quoting) and
//! `postgresql://user:pass@host:port,host2/db?key=value` (percent-encoded).
//! Which keys are allowed and what they mean is decided by the caller.

/// Splits a connection string into `(key, value)` pairs, later pairs winning.
pub fn split(conninfo: &str) -> Result<Vec<(String, String)>, String> {
    let trimmed = conninfo.trim_start();
    for prefix in ["postgresql://", "postgres://"] {
        if let Some(rest) = trimmed.strip_prefix(prefix) {
            return split_uri(rest.trim_end());
        }
    }
    split_key_values(conninfo)
}

/// `key = value` pairs separated by whitespace. A value is either single-quoted
/// (`\'` and `\\` escape) or runs to the next whitespace (a backslash escapes
/// the next character). As in libpq, whitespace after `=` is skipped, so
/// `host= port=1` gives host the value `port=1`.
fn split_key_values(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(format!("missing \"=\" after \"{key}\""));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => return Err(format!("unterminated quoted value for \"{key}\"")),
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

/// The part of a URI after `postgresql://`.
fn split_uri(rest: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let (main, query) = match rest.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match main.find('/') {
        Some(i) => (&main[..i], Some(&main[i + 1..])),
        None => (main, None),
    };

    // user[:password]@ : the last '@' ends the userinfo, so an unencoded '@' in
    // a password still works (libpq takes the first and would misread it).
    let hostspec = match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                out.push(("user".to_string(), percent_decode(user)?));
            }
            if let Some(p) = password {
                out.push(("password".to_string(), percent_decode(p)?));
            }
            &authority[at + 1..]
        }
        None => authority,
    };

    if !hostspec.is_empty() {
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for entry in hostspec.split(',') {
            let (host, port) = split_host_port(entry)?;
            hosts.push(percent_decode(host)?);
            ports.push(percent_decode(port.unwrap_or(""))?);
        }
        out.push(("host".to_string(), hosts.join(",")));
        if ports.iter().any(|p| !p.is_empty()) {
            out.push(("port".to_string(), ports.join(",")));
        }
    }

    if let Some(db) = path.filter(|p| !p.is_empty()) {
        out.push(("dbname".to_string(), percent_decode(db)?));
    }

    for param in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = param.split_once('=').ok_or_else(|| format!("missing \"=\" in URI query parameter \"{param}\""))?;
        let (k, v) = (percent_decode(k)?, percent_decode(v)?);
        // JDBC spelling, which libpq also accepts.
        if k == "ssl" {
            if v != "true" {
                return Err(format!("invalid value for URI query parameter \"ssl\": \"{v}\" (only \"true\" is accepted)"));
            }
            out.push(("sslmode".to_string(), "require".to_string()));
        } else {
            out.push((k, v));
        }
    }
    Ok(out)
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(entry: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(v6) = entry.strip_prefix('[') {
        let end = v6.find(']').ok_or_else(|| format!("missing \"]\" in IPv6 host address \"{entry}\""))?;
        let host = &v6[..end];
        if host.is_empty() {
            return Err("empty IPv6 host address in URI".to_string());
        }
        return match &v6[end + 1..] {
            "" => Ok((host, None)),
            rest => match rest.strip_prefix(':') {
                Some(port) => Ok((host, Some(port))),
                None => Err(format!("unexpected \"{rest}\" after IPv6 host address \"{entry}\"")),
            },
        };
    }
    Ok(match entry.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (entry, None),
    })
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let byte = hex
                .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("invalid percent-encoded token in \"{s}\""))?;
            if byte == 0 {
                return Err(format!("forbidden %00 in \"{s}\""));
            }
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("percent-encoded value in \"{s}\" is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn key_values_with_quotes_and_escapes() {
        let got = split(r"host=/tmp  port = 5433 password='it\'s a \\ secret' user=a\ b dbname=''").unwrap();
        assert_eq!(got, pairs(&[("host", "/tmp"), ("port", "5433"), ("password", r"it's a \ secret"), ("user", "a b"), ("dbname", "")]));
    }

    #[test]
    fn key_value_errors() {
        assert!(split("host").unwrap_err().contains("missing \"=\" after \"host\""));
        assert!(split("password='abc").unwrap_err().contains("unterminated"));
    }

    #[test]
    fn whitespace_after_equals_is_skipped_like_libpq() {
        assert_eq!(split("host= port=1").unwrap(), pairs(&[("host", "port=1")]));
    }

    #[test]
    fn uri_full() {
        let got = split("postgresql://rep%40l:p%3Ass@db1:5433,db2,[::1]:6000/my%20db?sslmode=verify-full&application_name=x").unwrap();
        assert_eq!(
            got,
            pairs(&[
                ("user", "rep@l"),
                ("password", "p:ss"),
                ("host", "db1,db2,::1"),
                ("port", "5433,,6000"),
                ("dbname", "my db"),
                ("sslmode", "verify-full"),
                ("application_name", "x"),
            ])
        );
    }

    #[test]
    fn uri_unix_socket_and_defaults() {
        assert_eq!(split("postgres://%2Fvar%2Frun%2Fpostgresql/db").unwrap(), pairs(&[("host", "/var/run/postgresql"), ("dbname", "db")]));
        assert_eq!(split("postgresql://").unwrap(), pairs(&[]));
        assert_eq!(split("postgresql:///?host=/tmp&port=5").unwrap(), pairs(&[("host", "/tmp"), ("port", "5")]));
        assert_eq!(split("postgresql://h?ssl=true").unwrap(), pairs(&[("host", "h"), ("sslmode", "require")]));
    }

    #[test]
    fn uri_errors() {
        assert!(split("postgresql://h/%zz").unwrap_err().contains("percent-encoded"));
        assert!(split("postgresql://h/db?sslmode").unwrap_err().contains("missing \"=\""));
        assert!(split("postgresql://[::1/db").unwrap_err().contains("]"));
        assert!(split("postgresql://h/%00").unwrap_err().contains("%00"));
    }
}
