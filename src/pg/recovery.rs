//! Recovery targets and configuration: parsing what users type (timestamps in
//! the forms PostgreSQL accepts, LSNs, xids), and writing `recovery.signal` and
//! the recovery settings into `postgresql.auto.conf`.

use std::fmt;
use std::path::Path;

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};

use super::Lsn;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryTarget {
    /// Replay all the WAL there is.
    Latest,
    /// Stop as soon as the backup is consistent.
    Immediate,
    Time(DateTime<Utc>),
    Lsn(Lsn),
    Xid(u64),
    Name(String),
}

impl fmt::Display for RecoveryTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecoveryTarget::Latest => write!(f, "the end of the archived WAL (latest)"),
            RecoveryTarget::Immediate => write!(f, "the end of the backup (immediate)"),
            RecoveryTarget::Time(t) => write!(f, "time {}", format_pg_time(t)),
            RecoveryTarget::Lsn(l) => write!(f, "LSN {l}"),
            RecoveryTarget::Xid(x) => write!(f, "transaction {x}"),
            RecoveryTarget::Name(n) => write!(f, "restore point '{n}'"),
        }
    }
}

/// `2026-11-22 10:15:00.123456+00`: what PostgreSQL prints and reads back.
pub fn format_pg_time(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetTimeline {
    Latest,
    Current,
    Id(u32),
}

impl TargetTimeline {
    pub fn parse(s: &str) -> Result<TargetTimeline, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "latest" => Ok(TargetTimeline::Latest),
            "current" => Ok(TargetTimeline::Current),
            n => n
                .parse::<u32>()
                .ok()
                .filter(|&n| n > 0)
                .map(TargetTimeline::Id)
                .ok_or_else(|| format!("'{s}' is not a timeline (a positive number, `latest` or `current`)")),
        }
    }

    fn setting(&self) -> String {
        match self {
            TargetTimeline::Latest => "latest".into(),
            TargetTimeline::Current => "current".into(),
            TargetTimeline::Id(n) => n.to_string(),
        }
    }
}

/// How a target time was read, to show users before anything happens.
#[derive(Debug, Clone)]
pub struct ParsedTime {
    pub instant: DateTime<Utc>,
    /// The zone the input was read in when it had none.
    pub assumed_zone: Option<String>,
}

/// Parses a timestamp with time zone as PostgreSQL accepts them: ISO dates with
/// `T` or a space, optional seconds and fractions, and a zone as `Z`, `UTC`,
/// `GMT`, `+HH`, `+HHMM`, `+HH:MM` or an IANA name (`Europe/Paris`). Without a
/// zone, the local time zone (TZ, else /etc/localtime) applies.
pub fn parse_time(input: &str) -> Result<ParsedTime, String> {
    let s = input.trim();
    let bad = || {
        format!(
            "'{input}' is not a timestamp; use a form such as '2026-11-22 10:15:00+00', '2026-11-22T10:15:00Z', '2026-11-22 10:15:00 Europe/Paris' or '2026-11-22 10:15' (local time)"
        )
    };
    if s.is_empty() {
        return Err(bad());
    }
    // Split off a zone: a trailing word (letters, '/', '_'), or a signed offset, or Z.
    let (body, zone) = split_zone(s);
    let naive = parse_naive(body.trim()).ok_or_else(bad)?;
    let (instant, assumed) = match zone {
        Some(z) => (apply_zone(naive, z).ok_or_else(|| format!("'{input}': unknown time zone '{z}'"))?, None),
        None => {
            let (t, name) =
                local(naive).ok_or_else(|| format!("'{input}' does not exist in the local time zone (a daylight-saving gap)"))?;
            (t, Some(name))
        }
    };
    Ok(ParsedTime { instant, assumed_zone: assumed })
}

fn split_zone(s: &str) -> (&str, Option<&str>) {
    if let Some(b) = s.strip_suffix('Z').or_else(|| s.strip_suffix('z'))
        && b.ends_with(|c: char| c.is_ascii_digit())
    {
        return (b, Some("UTC"));
    }
    if let Some(idx) = s.rfind(' ') {
        let word = &s[idx + 1..];
        if word.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) {
            return (&s[..idx], Some(word));
        }
    }
    // A signed offset after the time part: find the last '+' or '-' after a ':' or 'T'.
    let time_start = s.find(['T', ' ']).map(|i| i + 1).unwrap_or(s.len());
    if let Some(pos) = s[time_start..].rfind(['+', '-']) {
        let pos = time_start + pos;
        return (s[..pos].trim_end(), Some(&s[pos..]));
    }
    (s, None)
}

fn parse_naive(s: &str) -> Option<NaiveDateTime> {
    let s = s.replacen('T', " ", 1);
    for fmt in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(&s, fmt) {
            return Some(t);
        }
    }
    NaiveDate::parse_from_str(&s, "%Y-%m-%d").ok().map(|d| d.and_time(NaiveTime::MIN))
}

fn apply_zone(naive: NaiveDateTime, zone: &str) -> Option<DateTime<Utc>> {
    let z = zone.trim();
    if matches!(z.to_ascii_uppercase().as_str(), "UTC" | "GMT" | "Z" | "UT") {
        return Some(Utc.from_utc_datetime(&naive));
    }
    if z.starts_with(['+', '-']) {
        let sign = if z.starts_with('-') { -1 } else { 1 };
        let digits: String = z[1..].chars().filter(|c| c.is_ascii_digit()).collect();
        let (h, m) = match digits.len() {
            1 | 2 => (digits.parse::<i32>().ok()?, 0),
            4 => (digits[..2].parse::<i32>().ok()?, digits[2..].parse::<i32>().ok()?),
            _ => return None,
        };
        if z[1..].contains(':') && digits.len() != 4 {
            return None;
        }
        let offset = FixedOffset::east_opt(sign * (h * 3600 + m * 60))?;
        return offset.from_local_datetime(&naive).single().map(|t| t.with_timezone(&Utc));
    }
    let tz: chrono_tz::Tz = z.parse().ok()?;
    tz.from_local_datetime(&naive).earliest().map(|t| t.with_timezone(&Utc))
}

/// Reads a naive time in the local zone: TZ if set, else /etc/localtime.
fn local(naive: NaiveDateTime) -> Option<(DateTime<Utc>, String)> {
    if let Ok(tz) = std::env::var("TZ") {
        let name = tz.trim_start_matches(':').to_string();
        if let Ok(z) = name.parse::<chrono_tz::Tz>() {
            return z.from_local_datetime(&naive).earliest().map(|t| (t.with_timezone(&Utc), name));
        }
    }
    let t = chrono::Local.from_local_datetime(&naive).earliest()?;
    let name = std::fs::read_link("/etc/localtime")
        .ok()
        .and_then(|p| p.to_str().and_then(|s| s.split("zoneinfo/").nth(1)).map(str::to_string))
        .unwrap_or_else(|| format!("local time (UTC{})", t.format("%:z")));
    Some((t.with_timezone(&Utc), name))
}

/// Everything restore writes for recovery.
#[derive(Debug, Clone)]
pub struct RecoveryConfig {
    pub restore_command: String,
    pub target: RecoveryTarget,
    pub inclusive: bool,
    pub timeline: TargetTimeline,
    pub action: String,
    pub archive_off: bool,
}

/// Quotes a value for postgresql.conf.
pub fn quote_guc(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
}

/// Quotes a word for the shell that runs restore_command.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-=:,".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

impl RecoveryConfig {
    /// The lines appended to postgresql.auto.conf.
    pub fn settings(&self) -> Vec<(String, String)> {
        let mut out = vec![("restore_command".to_string(), quote_guc(&self.restore_command))];
        match &self.target {
            RecoveryTarget::Latest => {}
            RecoveryTarget::Immediate => out.push(("recovery_target".into(), quote_guc("immediate"))),
            RecoveryTarget::Time(t) => out.push(("recovery_target_time".into(), quote_guc(&format_pg_time(t)))),
            RecoveryTarget::Lsn(l) => out.push(("recovery_target_lsn".into(), quote_guc(&l.to_string()))),
            RecoveryTarget::Xid(x) => out.push(("recovery_target_xid".into(), quote_guc(&x.to_string()))),
            RecoveryTarget::Name(n) => out.push(("recovery_target_name".into(), quote_guc(n))),
        }
        if !matches!(self.target, RecoveryTarget::Latest | RecoveryTarget::Immediate) {
            out.push(("recovery_target_inclusive".into(), if self.inclusive { "on".into() } else { "off".into() }));
        }
        out.push(("recovery_target_timeline".into(), quote_guc(&self.timeline.setting())));
        if !matches!(self.target, RecoveryTarget::Latest) {
            out.push(("recovery_target_action".into(), quote_guc(&self.action)));
        }
        if self.archive_off {
            out.push(("archive_mode".into(), "off".into()));
        }
        out
    }

    /// Writes recovery.signal and the settings. Earlier recovery settings in
    /// postgresql.auto.conf are commented out so that only ours apply, and a
    /// leftover recovery.conf (which stops PostgreSQL 12+ from starting) is renamed.
    pub fn write(&self, pgdata: &Path) -> std::io::Result<()> {
        let auto = pgdata.join("postgresql.auto.conf");
        let existing = std::fs::read_to_string(&auto).unwrap_or_default();
        let ours: Vec<(String, String)> = self.settings();
        let managed = [
            "restore_command",
            "recovery_target",
            "recovery_target_time",
            "recovery_target_lsn",
            "recovery_target_xid",
            "recovery_target_name",
            "recovery_target_inclusive",
            "recovery_target_timeline",
            "recovery_target_action",
            "archive_mode",
        ];
        let mut text = String::new();
        for line in existing.lines() {
            let key = line.split('=').next().unwrap_or("").trim();
            if managed.contains(&key) && !line.trim_start().starts_with('#') {
                text.push_str(&format!("# {line}    # replaced by walvault restore\n"));
            } else {
                text.push_str(line);
                text.push('\n');
            }
        }
        text.push_str(&format!("# Recovery settings written by walvault restore on {}\n", format_pg_time(&Utc::now())));
        for (k, v) in ours {
            text.push_str(&format!("{k} = {v}\n"));
        }
        crate::util::write_file_atomic(&auto, text.as_bytes(), 0o600)?;
        crate::util::write_file_atomic(&pgdata.join("recovery.signal"), b"", 0o600)?;
        let old = pgdata.join("recovery.conf");
        if old.exists() {
            std::fs::rename(&old, pgdata.join("recovery.conf.walvault-disabled"))?;
        }
        // A backup taken from a standby may carry standby.signal: it would win
        // over recovery.signal and the server would wait for more WAL forever
        // instead of stopping at the target and promoting.
        match std::fs::remove_file(pgdata.join("standby.signal")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn parses_postgres_timestamps() {
        let cases = [
            ("2026-11-22 10:15:00+00", "2026-11-22T10:15:00Z"),
            ("2026-11-22 10:15:00.25+00", "2026-11-22T10:15:00.25Z"),
            ("2026-11-22T10:15:00Z", "2026-11-22T10:15:00Z"),
            ("2026-11-22 10:15:00 UTC", "2026-11-22T10:15:00Z"),
            ("2026-11-22 10:15:00+05:30", "2026-11-22T04:45:00Z"),
            ("2026-11-22 10:15:00-0800", "2026-11-22T18:15:00Z"),
            ("2026-11-22 10:15:00-08", "2026-11-22T18:15:00Z"),
            ("2026-11-22 10:15+01", "2026-11-22T09:15:00Z"),
            ("2026-11-22 10:15:00 Europe/Paris", "2026-11-22T09:15:00Z"),
            ("2026-07-01 10:15:00 America/New_York", "2026-07-01T14:15:00Z"),
        ];
        for (input, want) in cases {
            let p = parse_time(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(p.instant, utc(want), "{input}");
            assert!(p.assumed_zone.is_none());
        }
        for bad in ["", "yesterday", "2026-13-01 00:00", "2026-11-22 10:15:00 Mars/Olympus", "10:15"] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn local_time_is_assumed_and_named() {
        // SAFETY: tests in this module do not read TZ concurrently.
        unsafe { std::env::set_var("TZ", "Asia/Tokyo") };
        let p = parse_time("2026-11-22 09:00").unwrap();
        unsafe { std::env::remove_var("TZ") };
        assert_eq!(p.instant, utc("2026-11-22T00:00:00Z"));
        assert_eq!(p.assumed_zone.as_deref(), Some("Asia/Tokyo"));
    }

    #[test]
    fn settings_and_quoting() {
        let c = RecoveryConfig {
            restore_command: "/usr/bin/walvault --config '/etc/wal vault.toml' archive-get %f %p".into(),
            target: RecoveryTarget::Time(utc("2026-11-22T10:15:00Z")),
            inclusive: false,
            timeline: TargetTimeline::Latest,
            action: "promote".into(),
            archive_off: false,
        };
        let s = c.settings();
        assert_eq!(s[0].1, "'/usr/bin/walvault --config ''/etc/wal vault.toml'' archive-get %f %p'");
        assert!(s.contains(&("recovery_target_time".into(), "'2026-11-22 10:15:00.000000+00'".into())));
        assert!(s.contains(&("recovery_target_inclusive".into(), "off".into())));
        assert_eq!(shell_quote("/a b/c"), "'/a b/c'");
        assert_eq!(shell_quote("/usr/bin/walvault"), "/usr/bin/walvault");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("postgresql.auto.conf"), "archive_mode = 'on'\nwork_mem = '4MB'\nrestore_command = 'cp x'\n")
            .unwrap();
        c.write(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join("postgresql.auto.conf")).unwrap();
        assert!(text.contains("# restore_command = 'cp x'"));
        assert!(text.contains("work_mem = '4MB'"));
        assert!(text.contains("archive_mode = 'on'"), "archive mode is kept unless asked");
        assert!(dir.path().join("recovery.signal").exists());
        std::fs::write(dir.path().join("standby.signal"), "").unwrap();
        c.write(dir.path()).unwrap();
        assert!(!dir.path().join("standby.signal").exists(), "a standby's signal file would keep recovery from ending");
    }
}
