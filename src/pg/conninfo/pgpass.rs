//! The password file (`~/.pgpass`, `PGPASSFILE`, `passfile=`): lines of
//! `host:port:database:user:password`, `*` matching anything, `\` escaping
//! `:` and `\`. Like libpq, a file readable by group or others is ignored
//! with a warning, so a leaked password file is never used silently.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The password for the first matching line, or None (no file, no match,
/// unsafe permissions).
pub fn lookup(passfile: &Path, host: &str, port: u16, dbname: &str, user: &str) -> Option<String> {
    let meta = std::fs::metadata(passfile).ok()?;
    if !meta.is_file() {
        tracing::warn!(passfile = %passfile.display(), "password file is not a plain file; ignoring it");
        return None;
    }
    if meta.mode() & 0o077 != 0 {
        tracing::warn!(
            passfile = %passfile.display(),
            "password file has group or world access; permissions should be u=rw (0600) or less; ignoring it"
        );
        return None;
    }
    let text = match std::fs::read_to_string(passfile) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(passfile = %passfile.display(), error = %e, "cannot read password file");
            return None;
        }
    };
    find(&text, host, &port.to_string(), dbname, user)
}

fn find(text: &str, host: &str, port: &str, dbname: &str, user: &str) -> Option<String> {
    let wanted = [host, port, dbname, user];
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_fields(line);
        if fields.len() < 5 {
            continue;
        }
        let matches = fields[..4].iter().zip(wanted).all(|(pattern, value)| pattern == "*" || pattern == value);
        if matches {
            // libpq keeps any further unescaped ':' as part of the password.
            return Some(fields[4..].join(":"));
        }
    }
    None
}

fn split_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => fields.last_mut().unwrap().extend(chars.next()),
            ':' => fields.push(String::new()),
            c => fields.last_mut().unwrap().push(c),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const FILE: &str = "# comment\n\
        db1:5432:replication:walvault:first\n\
        *:*:*:walvault:wild\\:card\n\
        localhost:5433:*:other:sock\\\\pw\n";

    #[test]
    fn matching_rules() {
        assert_eq!(find(FILE, "db1", "5432", "replication", "walvault").as_deref(), Some("first"));
        assert_eq!(find(FILE, "db2", "5432", "replication", "walvault").as_deref(), Some("wild:card"));
        assert_eq!(find(FILE, "localhost", "5433", "x", "other").as_deref(), Some("sock\\pw"));
        assert_eq!(find(FILE, "localhost", "5432", "x", "other"), None);
    }

    #[test]
    fn group_readable_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpass");
        std::fs::write(&path, "*:*:*:*:secret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(lookup(&path, "h", 5432, "d", "u").as_deref(), Some("secret"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(lookup(&path, "h", 5432, "d", "u"), None);
        assert_eq!(lookup(&dir.path().join("missing"), "h", 5432, "d", "u"), None);
    }
}
