//! libpq connection strings (`key=value` and `postgresql://` URIs) resolved
//! against the PG* environment variables and libpq's defaults, the way psql
//! and pg_basebackup would read the same string.

mod pgpass;
mod syntax;

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::PgError;

/// Where Debian's (and Ubuntu's) PostgreSQL puts its socket: libpq's default
/// host there.
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";
pub const DEFAULT_PORT: u16 = 5432;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// libpq's `channel_binding`: whether SCRAM must, may or must not bind the
/// authentication to the TLS channel (SCRAM-SHA-256-PLUS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelBindingMode {
    Disable,
    Prefer,
    Require,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A host name or IP address.
    Tcp(String),
    /// The directory holding the socket `.s.PGSQL.<port>`.
    Unix(PathBuf),
}

/// One server to try: hosts are tried in order until one accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: Host,
    /// `hostaddr`: connect here instead of resolving the host name, which is
    /// still used for certificate checks and the password file.
    pub hostaddr: Option<IpAddr>,
    pub port: u16,
}

impl Endpoint {
    /// Where this endpoint is, for messages: `/run/pg/.s.PGSQL.5432`,
    /// `db1:5432` or `db1 (10.0.0.5):5432`.
    pub fn describe(&self) -> String {
        match (&self.host, self.hostaddr) {
            (Host::Unix(dir), _) => self.socket_path(dir).display().to_string(),
            (Host::Tcp(name), Some(addr)) if *name != addr.to_string() => format!("{name} ({addr}):{}", self.port),
            (Host::Tcp(name), _) if name.contains(':') => format!("[{name}]:{}", self.port),
            (Host::Tcp(name), _) => format!("{name}:{}", self.port),
        }
    }

    pub fn socket_path(&self, dir: &Path) -> PathBuf {
        dir.join(format!(".s.PGSQL.{}", self.port))
    }

    /// The host as the password file names it: socket connections to the
    /// default directory match `localhost`, as in libpq.
    fn pgpass_host(&self) -> String {
        match &self.host {
            Host::Unix(dir) if dir == Path::new(DEFAULT_SOCKET_DIR) => "localhost".to_string(),
            Host::Unix(dir) => dir.display().to_string(),
            Host::Tcp(name) => name.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ConnParams {
    pub hosts: Vec<Endpoint>,
    pub user: String,
    pub password: Option<String>,
    /// The password file consulted when no password is given.
    pub passfile: Option<PathBuf>,
    pub dbname: Option<String>,
    pub sslmode: SslMode,
    /// Root certificates for verify-ca/verify-full; `system` means the
    /// bundled Mozilla roots. Defaults to `~/.postgresql/root.crt`, which is
    /// also checked under require/prefer/allow when it exists (libpq does so).
    pub sslrootcert: Option<PathBuf>,
    /// A client certificate and key (default `~/.postgresql/postgresql.crt`
    /// and `.key`, used when present).
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    /// `sslsni=0` turns off sending the host name in the TLS handshake.
    pub sslsni: bool,
    pub channel_binding: ChannelBindingMode,
    pub application_name: Option<String>,
    pub connect_timeout: Option<Duration>,
    /// Command-line options for the server (`-c name=value ...`).
    pub options: Option<String>,
}

/// The keys we accept, and the environment variable supplying each default.
const KEYS: &[(&str, Option<&str>)] = &[
    ("host", Some("PGHOST")),
    ("hostaddr", Some("PGHOSTADDR")),
    ("port", Some("PGPORT")),
    ("user", Some("PGUSER")),
    ("password", Some("PGPASSWORD")),
    ("passfile", Some("PGPASSFILE")),
    ("dbname", Some("PGDATABASE")),
    ("sslmode", Some("PGSSLMODE")),
    ("sslrootcert", Some("PGSSLROOTCERT")),
    ("sslcert", Some("PGSSLCERT")),
    ("sslkey", Some("PGSSLKEY")),
    ("sslsni", Some("PGSSLSNI")),
    ("channel_binding", Some("PGCHANNELBINDING")),
    ("application_name", Some("PGAPPNAME")),
    ("fallback_application_name", None),
    ("connect_timeout", Some("PGCONNECT_TIMEOUT")),
    ("options", Some("PGOPTIONS")),
];

/// libpq keys that are real but mean nothing to walvault; named in the error
/// so a user does not hunt for a typo.
const LIBPQ_UNSUPPORTED: &[&str] = &[
    "service",
    "gssencmode",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "sslpassword",
    "sslcrl",
    "sslcrldir",
    "sslcompression",
    "sslnegotiation",
    "sslcertmode",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "requiressl",
    "requirepeer",
    "require_auth",
    "target_session_attrs",
    "load_balance_hosts",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "replication",
    "client_encoding",
    "max_protocol_version",
    "min_protocol_version",
];

impl ConnParams {
    /// Parses a connection string with defaults from this process's
    /// environment.
    pub fn parse(conninfo: &str) -> Result<ConnParams, PgError> {
        Self::parse_with_env(conninfo, &|name| std::env::var(name).ok())
    }

    /// As [`ConnParams::parse`], reading environment variables through `env`.
    pub fn parse_with_env(conninfo: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<ConnParams, PgError> {
        let pairs = syntax::split(conninfo).map_err(PgError::Conninfo)?;
        let mut given: Vec<(&'static str, String)> = Vec::new();
        for (key, value) in pairs {
            let Some(&(known, _)) = KEYS.iter().find(|(k, _)| *k == key) else {
                return Err(PgError::Conninfo(if LIBPQ_UNSUPPORTED.contains(&key.as_str()) {
                    format!("connection option \"{key}\" is not supported by walvault")
                } else {
                    format!("unknown connection option \"{key}\"")
                }));
            };
            given.retain(|(k, _)| *k != known);
            given.push((known, value));
        }
        // A value given empty means the built-in default, as in libpq.
        let get = |key: &str| -> Option<String> {
            let env_name = KEYS.iter().find(|(k, _)| *k == key).and_then(|(_, e)| *e);
            given.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone()).or_else(|| env_name.and_then(env)).filter(|v| !v.is_empty())
        };
        let home = env("HOME").filter(|h| !h.is_empty()).map(PathBuf::from).or_else(|| os_account().map(|a| a.1));

        let user = match get("user").or_else(|| os_account().map(|a| a.0)) {
            Some(u) => u,
            None => return Err(PgError::Conninfo("no user given and the operating system user is unknown; set user=".into())),
        };

        let sslrootcert = get("sslrootcert").map(PathBuf::from);
        let system_roots = sslrootcert.as_deref() == Some(Path::new("system"));
        let sslmode = match get("sslmode") {
            Some(s) => SslMode::parse(&s).ok_or_else(|| {
                PgError::Conninfo(format!("invalid sslmode \"{s}\" (disable, allow, prefer, require, verify-ca or verify-full)"))
            })?,
            // libpq: trusting the system's roots only means something with
            // the host name checked.
            None if system_roots => SslMode::VerifyFull,
            None => SslMode::Prefer,
        };
        if system_roots && sslmode != SslMode::VerifyFull {
            return Err(PgError::Conninfo(format!(
                "sslmode \"{}\" is too weak for sslrootcert=system; use sslmode=verify-full",
                sslmode.as_str()
            )));
        }
        let postgresql_dir = home.as_ref().map(|h| h.join(".postgresql"));

        let channel_binding = match get("channel_binding").as_deref() {
            None | Some("prefer") => ChannelBindingMode::Prefer,
            Some("disable") => ChannelBindingMode::Disable,
            Some("require") => ChannelBindingMode::Require,
            Some(other) => {
                return Err(PgError::Conninfo(format!("invalid channel_binding \"{other}\" (disable, prefer or require)")));
            }
        };
        let sslsni = match get("sslsni").as_deref() {
            None | Some("1") => true,
            Some("0") => false,
            Some(other) => return Err(PgError::Conninfo(format!("invalid sslsni \"{other}\" (0 or 1)"))),
        };

        // libpq: non-positive means wait forever, and less than 2 s is
        // raised to 2 s because the clock's granularity would make 1 s flaky.
        let connect_timeout = match get("connect_timeout") {
            None => None,
            Some(s) => match s.trim().parse::<i64>() {
                Ok(n) if n <= 0 => None,
                Ok(n) => Some(Duration::from_secs(n.max(2) as u64)),
                Err(_) => return Err(PgError::Conninfo(format!("invalid connect_timeout \"{s}\" (whole seconds)"))),
            },
        };

        Ok(ConnParams {
            hosts: resolve_hosts(get("host"), get("hostaddr"), get("port"))?,
            user,
            password: get("password"),
            passfile: get("passfile").map(PathBuf::from).or_else(|| home.as_ref().map(|h| h.join(".pgpass"))),
            dbname: get("dbname"),
            sslmode,
            sslrootcert: sslrootcert.or_else(|| postgresql_dir.as_ref().map(|d| d.join("root.crt"))),
            sslcert: get("sslcert").map(PathBuf::from).or_else(|| postgresql_dir.as_ref().map(|d| d.join("postgresql.crt"))),
            sslkey: get("sslkey").map(PathBuf::from).or_else(|| postgresql_dir.as_ref().map(|d| d.join("postgresql.key"))),
            sslsni,
            channel_binding,
            application_name: get("application_name").or_else(|| get("fallback_application_name")),
            connect_timeout,
            options: get("options"),
        })
    }

    /// The target for messages: like a connection string, never with the
    /// password.
    pub fn describe(&self) -> String {
        let hosts: Vec<String> = self
            .hosts
            .iter()
            .map(|e| match &e.host {
                Host::Unix(dir) => dir.display().to_string(),
                Host::Tcp(name) => name.clone(),
            })
            .collect();
        let mut ports: Vec<String> = self.hosts.iter().map(|e| e.port.to_string()).collect();
        ports.dedup();
        let mut out = format!("host={} port={} user={}", hosts.join(","), ports.join(","), self.user);
        let addrs: Vec<String> = self.hosts.iter().map(|e| e.hostaddr.map(|a| a.to_string()).unwrap_or_default()).collect();
        if addrs.iter().any(|a| !a.is_empty()) {
            out.push_str(&format!(" hostaddr={}", addrs.join(",")));
        }
        if let Some(db) = &self.dbname {
            out.push_str(&format!(" dbname={db}"));
        }
        out.push_str(&format!(" sslmode={}", self.sslmode.as_str()));
        out
    }

    /// The password for `endpoint`: the one given, else the password file's.
    pub fn password_for(&self, endpoint: &Endpoint, dbname: &str) -> Option<String> {
        if self.password.is_some() {
            return self.password.clone();
        }
        let passfile = self.passfile.as_ref()?;
        pgpass::lookup(passfile, &endpoint.pgpass_host(), endpoint.port, dbname, &self.user)
    }
}

impl fmt::Debug for ConnParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the password, even in debug logs.
        f.debug_struct("ConnParams")
            .field("target", &self.describe())
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("channel_binding", &self.channel_binding)
            .field("application_name", &self.application_name)
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

/// Pairs up the comma-separated `host`, `hostaddr` and `port` lists as libpq
/// does: one port for all hosts, or one per host.
fn resolve_hosts(host: Option<String>, hostaddr: Option<String>, port: Option<String>) -> Result<Vec<Endpoint>, PgError> {
    let hosts: Vec<&str> = host.as_deref().map(|h| h.split(',').collect()).unwrap_or_default();
    let addrs: Vec<&str> = hostaddr.as_deref().map(|h| h.split(',').collect()).unwrap_or_default();
    if !hosts.is_empty() && !addrs.is_empty() && hosts.len() != addrs.len() {
        return Err(PgError::Conninfo(format!("could not match {} host names to {} hostaddr values", hosts.len(), addrs.len())));
    }
    let n = hosts.len().max(addrs.len()).max(1);
    let ports: Vec<&str> = port.as_deref().map(|p| p.split(',').collect()).unwrap_or_default();
    if ports.len() > 1 && ports.len() != n {
        return Err(PgError::Conninfo(format!("could not match {} port numbers to {n} hosts", ports.len())));
    }

    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let name = hosts.get(i).map(|h| h.trim()).unwrap_or("");
        let addr = addrs.get(i).map(|h| h.trim()).unwrap_or("");
        let port_text = match ports.len() {
            0 => "",
            1 => ports[0],
            _ => ports[i],
        }
        .trim();
        let port = if port_text.is_empty() {
            DEFAULT_PORT
        } else {
            match port_text.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return Err(PgError::Conninfo(format!("invalid port number \"{port_text}\""))),
            }
        };
        let hostaddr = if addr.is_empty() {
            None
        } else {
            Some(addr.parse::<IpAddr>().map_err(|_| PgError::Conninfo(format!("invalid hostaddr \"{addr}\" (an IP address)")))?)
        };
        let host = match (name, hostaddr) {
            ("", Some(a)) => Host::Tcp(a.to_string()),
            ("", None) => default_host(),
            (n, _) if n.starts_with('/') => Host::Unix(PathBuf::from(n)),
            (n, _) => Host::Tcp(n.to_string()),
        };
        if matches!(host, Host::Unix(_)) && hostaddr.is_some() {
            return Err(PgError::Conninfo(format!("hostaddr \"{addr}\" given for the socket directory \"{name}\"")));
        }
        out.push(Endpoint { host, hostaddr, port });
    }
    Ok(out)
}

/// libpq's default on Debian is the socket directory; where it does not
/// exist (another distribution, a container), localhost is the useful guess.
fn default_host() -> Host {
    if Path::new(DEFAULT_SOCKET_DIR).is_dir() { Host::Unix(PathBuf::from(DEFAULT_SOCKET_DIR)) } else { Host::Tcp("localhost".into()) }
}

/// The effective user's name and home directory, from the password database.
fn os_account() -> Option<(String, PathBuf)> {
    // SAFETY: getpwuid_r writes into our buffers only; the result pointer is
    // checked before use and the strings are copied out before returning.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 4096];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(libc::geteuid(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        let name = std::ffi::CStr::from_ptr(pwd.pw_name).to_string_lossy().into_owned();
        let home = if pwd.pw_dir.is_null() {
            PathBuf::new()
        } else {
            PathBuf::from(std::ffi::CStr::from_ptr(pwd.pw_dir).to_string_lossy().into_owned())
        };
        Some((name, home))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(conninfo: &str, env: &[(&str, &str)]) -> Result<ConnParams, PgError> {
        let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        ConnParams::parse_with_env(conninfo, &move |k| env.get(k).cloned())
    }

    fn tcp(name: &str, port: u16) -> Endpoint {
        Endpoint { host: Host::Tcp(name.into()), hostaddr: None, port }
    }

    #[test]
    fn key_value_form() {
        let p = parse(
            "host=db1 port=5433 user=walvault password='s3 cret' dbname=app sslmode=verify-full sslrootcert=/etc/ca.pem \
             application_name=walvault connect_timeout=10 channel_binding=require options='-c work_mem=4MB'",
            &[("HOME", "/home/w")],
        )
        .unwrap();
        assert_eq!(p.hosts, vec![tcp("db1", 5433)]);
        assert_eq!(p.user, "walvault");
        assert_eq!(p.password.as_deref(), Some("s3 cret"));
        assert_eq!(p.dbname.as_deref(), Some("app"));
        assert_eq!(p.sslmode, SslMode::VerifyFull);
        assert_eq!(p.sslrootcert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(p.sslcert, Some(PathBuf::from("/home/w/.postgresql/postgresql.crt")));
        assert_eq!(p.channel_binding, ChannelBindingMode::Require);
        assert_eq!(p.application_name.as_deref(), Some("walvault"));
        assert_eq!(p.connect_timeout, Some(Duration::from_secs(10)));
        assert_eq!(p.options.as_deref(), Some("-c work_mem=4MB"));
        assert_eq!(p.passfile, Some(PathBuf::from("/home/w/.pgpass")));
    }

    #[test]
    fn uri_form_with_several_hosts() {
        let p = parse("postgresql://rep:pw@db1:5433,db2,%2Ftmp%2Fsock/replication?sslmode=require", &[]).unwrap();
        assert_eq!(
            p.hosts,
            vec![tcp("db1", 5433), tcp("db2", 5432), Endpoint { host: Host::Unix("/tmp/sock".into()), hostaddr: None, port: 5432 }]
        );
        assert_eq!(p.user, "rep");
        assert_eq!(p.password.as_deref(), Some("pw"));
        assert_eq!(p.sslmode, SslMode::Require);
    }

    #[test]
    fn environment_defaults_and_precedence() {
        let env = [
            ("PGHOST", "/run/pg"),
            ("PGPORT", "6543"),
            ("PGUSER", "envuser"),
            ("PGPASSWORD", "envpw"),
            ("PGSSLMODE", "disable"),
            ("PGAPPNAME", "envapp"),
            ("PGCONNECT_TIMEOUT", "1"),
            ("PGDATABASE", "envdb"),
            ("PGPASSFILE", "/x/pgpass"),
            ("PGSSLROOTCERT", "/x/root.pem"),
        ];
        let p = parse("", &env).unwrap();
        assert_eq!(p.hosts, vec![Endpoint { host: Host::Unix("/run/pg".into()), hostaddr: None, port: 6543 }]);
        assert_eq!(p.user, "envuser");
        assert_eq!(p.password.as_deref(), Some("envpw"));
        assert_eq!(p.sslmode, SslMode::Disable);
        assert_eq!(p.application_name.as_deref(), Some("envapp"));
        assert_eq!(p.connect_timeout, Some(Duration::from_secs(2)), "libpq raises 1 s to 2 s");
        assert_eq!(p.dbname.as_deref(), Some("envdb"));
        assert_eq!(p.passfile, Some(PathBuf::from("/x/pgpass")));
        assert_eq!(p.sslrootcert, Some(PathBuf::from("/x/root.pem")));

        // The string wins over the environment; an empty value means the
        // built-in default, without consulting the environment (libpq).
        let p = parse("host=h port=1 user=u sslmode='' application_name=''", &env).unwrap();
        assert_eq!(p.hosts, vec![tcp("h", 1)]);
        assert_eq!(p.user, "u");
        assert_eq!(p.sslmode, SslMode::Prefer);
        assert_eq!(p.application_name, None);
    }

    #[test]
    fn built_in_defaults() {
        let p = parse("user=u", &[]).unwrap();
        assert_eq!(p.sslmode, SslMode::Prefer);
        assert_eq!(p.channel_binding, ChannelBindingMode::Prefer);
        assert_eq!(p.hosts.len(), 1);
        assert_eq!(p.hosts[0].port, 5432);
        assert_eq!(p.hosts[0].host, default_host());
        assert_eq!(p.connect_timeout, None);
        // Without PGUSER the operating system user is used.
        assert!(!parse("", &[]).unwrap().user.is_empty());
    }

    #[test]
    fn hostaddr_pairs_with_host() {
        let p = parse("host=db.example,other hostaddr=10.0.0.5, port=5433", &[]).unwrap();
        assert_eq!(p.hosts[0], Endpoint { host: Host::Tcp("db.example".into()), hostaddr: Some("10.0.0.5".parse().unwrap()), port: 5433 });
        assert_eq!(p.hosts[1], tcp("other", 5433));
        assert_eq!(p.hosts[0].describe(), "db.example (10.0.0.5):5433");
        let p = parse("hostaddr=::1", &[]).unwrap();
        assert_eq!(p.hosts[0].describe(), "[::1]:5432");
        assert!(parse("host=a,b,c hostaddr=1.2.3.4,5.6.7.8", &[]).is_err());
        assert!(parse("host=a,b,c port=1,2", &[]).unwrap_err().to_string().contains("3 hosts"));
    }

    #[test]
    fn errors_name_the_problem() {
        let err = |s: &str| parse(s, &[]).unwrap_err().to_string();
        assert!(err("hots=x").contains("unknown connection option \"hots\""));
        assert!(err("service=x").contains("\"service\" is not supported"));
        assert!(err("sslmode=maybe").contains("invalid sslmode \"maybe\""));
        assert!(err("port=99999").contains("invalid port number \"99999\""));
        assert!(err("hostaddr=db1").contains("invalid hostaddr"));
        assert!(err("channel_binding=yes").contains("channel_binding"));
        assert!(err("connect_timeout=soon").contains("connect_timeout"));
        assert!(err("sslrootcert=system sslmode=require").contains("verify-full"));
        assert_eq!(parse("sslrootcert=system", &[]).unwrap().sslmode, SslMode::VerifyFull);
    }

    #[test]
    fn describe_and_debug_hide_the_password() {
        let p = parse("postgresql://u:hunter2@db1:5433,db2:5433/app", &[]).unwrap();
        assert_eq!(p.describe(), "host=db1,db2 port=5433 user=u dbname=app sslmode=prefer");
        assert!(!format!("{p:?}").contains("hunter2"));
        let p = parse("host=/run/pg port=5 user=u", &[]).unwrap();
        assert_eq!(p.hosts[0].describe(), "/run/pg/.s.PGSQL.5");
    }

    #[test]
    fn password_file_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let passfile = dir.path().join("pgpass");
        std::fs::write(&passfile, "localhost:5432:replication:rep:sockpw\ndb1:5432:*:rep:tcppw\n").unwrap();
        std::fs::set_permissions(&passfile, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let pf = passfile.display().to_string();
        let p = parse(&format!("host=db1,{DEFAULT_SOCKET_DIR},/elsewhere user=rep passfile={pf}"), &[]).unwrap();
        assert_eq!(p.password_for(&p.hosts[0], "replication").as_deref(), Some("tcppw"));
        assert_eq!(p.password_for(&p.hosts[1], "replication").as_deref(), Some("sockpw"));
        assert_eq!(p.password_for(&p.hosts[2], "replication"), None);
        let p = parse(&format!("host=db1 user=rep password=given passfile={pf}"), &[]).unwrap();
        assert_eq!(p.password_for(&p.hosts[0], "x").as_deref(), Some("given"));
    }
}
