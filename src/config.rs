//! Configuration: one struct, read from a TOML file, then overridden by
//! `WALVAULT_<SECTION>_<KEY>` environment variables, then by `--set
//! section.key=value` flags. Unknown keys are refused by name. Secrets are never
//! taken from flags, and a file that holds one must not be readable by others.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::storage::s3::ChecksumMode;

/// The value kinds a key can hold; used to parse environment variables and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Str,
    Int,
    Bool,
    List,
    Duration,
    Size,
}

/// One configuration key: where it lives, its kind, its default (as shown in the
/// reference) and what it does. This table is the reference: the README's
/// configuration section and the env/flag parser both follow it.
#[derive(Debug, Clone, Copy)]
pub struct KeySpec {
    pub section: &'static str,
    pub key: &'static str,
    pub kind: Kind,
    pub default: &'static str,
    pub secret: bool,
    pub doc: &'static str,
}

macro_rules! key {
    ($s:literal, $k:literal, $kind:ident, $def:literal, $doc:literal) => {
        KeySpec { section: $s, key: $k, kind: Kind::$kind, default: $def, secret: false, doc: $doc }
    };
    (secret $s:literal, $k:literal, $kind:ident, $def:literal, $doc:literal) => {
        KeySpec { section: $s, key: $k, kind: Kind::$kind, default: $def, secret: true, doc: $doc }
    };
}

pub const KEYS: &[KeySpec] = &[
    key!(
        "postgres",
        "conninfo",
        Str,
        "",
        "libpq-style connection string for the replication connection (PG* environment variables and ~/.pgpass apply)"
    ),
    key!("postgres", "bin_dir", Str, "", "directory of the PostgreSQL server binaries used by `restore --replay` (default: PATH)"),
    key!("postgres", "slot", Str, "walvault", "physical replication slot used by the WAL streamer"),
    key!(
        "postgres",
        "application_name",
        Str,
        "walvault",
        "application_name reported to PostgreSQL (match it in synchronous_standby_names)"
    ),
    key!("repository", "url", Str, "file:///var/lib/walvault/repo", "where backups go: file:///path or s3://bucket/prefix"),
    key!("repository", "endpoint", Str, "", "S3 endpoint URL for S3-compatible stores (https:// unless stated)"),
    key!("repository", "region", Str, "us-east-1", "S3 region"),
    key!(
        "repository",
        "path_style",
        Bool,
        "false",
        "address buckets as endpoint/bucket instead of bucket.endpoint (MinIO, Ceph, SeaweedFS)"
    ),
    key!(
        "repository",
        "checksums",
        Str,
        "when_supported",
        "S3 request checksums: when_supported, or when_required for stores that reject trailing checksums"
    ),
    key!("repository", "access_key_id", Str, "", "S3 access key id (default: the AWS credential chain)"),
    key!(secret "repository", "secret_access_key", Str, "", "S3 secret key (default: the AWS credential chain); never accepted as a flag"),
    key!("repository", "retries", Int, "8", "attempts per store operation before giving up (jittered backoff between them)"),
    key!("repository", "timeout", Duration, "120s", "time limit for one store request"),
    key!("repository", "parallel", Int, "4", "uploads and downloads in flight at once"),
    key!("encryption", "recipients", List, "", "age X25519 public keys (age1...) every object is encrypted to"),
    key!(
        "encryption",
        "identity_file",
        Str,
        "",
        "age identity file (restore.key) for restore and verify --deep; keep it off the agent host"
    ),
    key!("signing", "key_file", Str, "/etc/walvault/agent.key", "the agent's ed25519 signing key (agent.key)"),
    key!("signing", "public_key", Str, "", "pinned signing public key (ed25519:...) that verify and restore must trust"),
    key!("compression", "level", Int, "3", "zstd level for base backups, 1 to 19"),
    key!("compression", "wal_level", Int, "1", "zstd level for WAL (archive-push and the streamer), 1 to 19"),
    key!("wal", "partial_interval", Duration, "5s", "how often the streamer uploads the segment in progress (bounds data loss)"),
    key!("wal", "synchronous", Bool, "false", "report WAL flushed only once it is in the repository (for synchronous_standby_names)"),
    key!("wal", "status_interval", Duration, "10s", "standby status update interval"),
    key!(
        "wal",
        "push_parallel",
        Int,
        "4",
        "segments archive-push ships at once when PostgreSQL has a backlog (its background pusher; 1: one segment per call, no pusher)"
    ),
    key!("wal", "prefetch", Int, "8", "segments archive-get fetches ahead into the spool during recovery"),
    key!(
        "wal",
        "spool_dir",
        Str,
        "",
        "local spool for archive-push markers and archive-get prefetch (default: a private directory under the system temp dir)"
    ),
    key!("backup", "checkpoint", Str, "fast", "checkpoint at backup start: fast or spread"),
    key!("backup", "wal_timeout", Duration, "300s", "how long a backup waits for its WAL to reach the repository"),
    key!("backup", "pack_size", Size, "32MiB", "target size of pack objects"),
    key!(
        "backup",
        "max_rate",
        Size,
        "0",
        "most the server sends of a base backup per second, to spare a busy primary's disks (0: no limit; else 32KiB to 1GiB)"
    ),
    key!("schedule", "base_backup", Str, "0 0 2 * * *", "cron expression (seconds field first) for base backups in the daemon"),
    key!("schedule", "time_zone", Str, "UTC", "time zone of the schedule (IANA name)"),
    key!("retention", "full_backups", Int, "", "keep this many newest backups"),
    key!("retention", "window_days", Int, "", "keep what is needed to restore to any point in the last N days"),
    key!("retention", "min_backups", Int, "1", "never keep fewer backups than this"),
    key!("daemon", "metrics_listen", Str, "127.0.0.1:9187", "address of the /metrics and /healthz HTTP listener (empty: off)"),
    key!("daemon", "slot_warn_bytes", Size, "1GiB", "warn when the replication slot retains more WAL than this"),
    key!("alerts", "command", Str, "", "command run with a JSON event on stdin when something fails"),
    key!("alerts", "wal_lag", Duration, "300s", "alert when streamed WAL lags PostgreSQL by more than this"),
    key!("restore", "target_action", Str, "promote", "recovery_target_action written by restore: promote, pause or shutdown"),
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("configuration file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("unknown configuration key '{key}' ({origin})")]
    UnknownKey { key: String, origin: String },
    #[error("configuration key '{key}' ({origin}): {message}")]
    BadValue { key: String, origin: String, message: String },
    #[error("{path} holds secrets and is readable by group or others (mode {mode:04o})")]
    LoosePermissions { path: PathBuf, mode: u32 },
    #[error("'{key}' is a secret and cannot be given on the command line")]
    SecretOnCommandLine { key: String },
    #[error("{0}")]
    Invalid(String),
}

impl ConfigError {
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            ConfigError::UnknownKey { .. } => "see the configuration reference in README.md for the accepted keys".into(),
            ConfigError::LoosePermissions { path, .. } => format!("run: chmod 600 {}", path.display()),
            ConfigError::SecretOnCommandLine { key } => {
                let env = format!("WALVAULT_{}", key.replace('.', "_").to_uppercase());
                format!("put it in the configuration file (mode 0600) or the environment variable {env}")
            }
            ConfigError::Read { .. } => "pass --config FILE, set WALVAULT_CONFIG, or create ./walvault.toml".into(),
            ConfigError::BadValue { .. } | ConfigError::Parse { .. } => {
                "see the configuration reference in README.md for each key's accepted values".into()
            }
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub postgres: PostgresConfig,
    pub repository: RepositoryConfig,
    pub encryption: EncryptionConfig,
    pub signing: SigningConfig,
    pub compression: CompressionConfig,
    pub wal: WalConfig,
    pub backup: BackupConfig,
    pub schedule: ScheduleConfig,
    pub retention: RetentionConfig,
    pub daemon: DaemonConfig,
    pub alerts: AlertsConfig,
    pub restore: RestoreConfig,
    /// Where the configuration was read from (not a key).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    pub conninfo: String,
    pub bin_dir: String,
    pub slot: String,
    pub application_name: String,
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RepositoryConfig {
    pub url: String,
    pub endpoint: String,
    pub region: String,
    pub path_style: bool,
    pub checksums: ChecksumMode,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub retries: u32,
    #[serde(with = "duration_str")]
    pub timeout: Duration,
    pub parallel: usize,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncryptionConfig {
    pub recipients: Vec<String>,
    pub identity_file: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SigningConfig {
    pub key_file: String,
    pub public_key: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionConfig {
    pub level: i32,
    /// WAL is compressed on the archiver's critical path, and level 1 packs
    /// WAL about as tightly as 3 at half the CPU (docs/WAL.md).
    pub wal_level: i32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalConfig {
    #[serde(with = "duration_str")]
    pub partial_interval: Duration,
    pub synchronous: bool,
    #[serde(with = "duration_str")]
    pub status_interval: Duration,
    pub push_parallel: usize,
    pub prefetch: usize,
    pub spool_dir: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
#[derive(Default)]
pub enum Checkpoint {
    #[default]
    Fast,
    Spread,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupConfig {
    pub checkpoint: Checkpoint,
    #[serde(with = "duration_str")]
    pub wal_timeout: Duration,
    #[serde(deserialize_with = "size_de")]
    pub pack_size: u64,
    /// Bytes per second; 0 is no limit (BASE_BACKUP's MAX_RATE, in kB).
    #[serde(deserialize_with = "size_de")]
    pub max_rate: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    pub base_backup: String,
    pub time_zone: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    pub full_backups: Option<u32>,
    pub window_days: Option<u32>,
    pub min_backups: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    pub metrics_listen: String,
    #[serde(deserialize_with = "size_de")]
    pub slot_warn_bytes: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    pub command: String,
    #[serde(with = "duration_str")]
    pub wal_lag: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
#[derive(Default)]
pub enum TargetAction {
    #[default]
    Promote,
    Pause,
    Shutdown,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestoreConfig {
    pub target_action: TargetAction,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            postgres: PostgresConfig::default(),
            repository: RepositoryConfig::default(),
            encryption: EncryptionConfig::default(),
            signing: SigningConfig::default(),
            compression: CompressionConfig::default(),
            wal: WalConfig::default(),
            backup: BackupConfig::default(),
            schedule: ScheduleConfig::default(),
            retention: RetentionConfig::default(),
            daemon: DaemonConfig::default(),
            alerts: AlertsConfig::default(),
            restore: RestoreConfig { target_action: TargetAction::Promote },
            source: None,
        }
    }
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig { conninfo: String::new(), bin_dir: String::new(), slot: "walvault".into(), application_name: "walvault".into() }
    }
}

impl Default for RepositoryConfig {
    fn default() -> Self {
        RepositoryConfig {
            url: "file:///var/lib/walvault/repo".into(),
            endpoint: String::new(),
            region: "us-east-1".into(),
            path_style: false,
            checksums: ChecksumMode::WhenSupported,
            access_key_id: String::new(),
            secret_access_key: String::new(),
            retries: 8,
            timeout: Duration::from_secs(120),
            parallel: 4,
        }
    }
}

impl Default for SigningConfig {
    fn default() -> Self {
        SigningConfig { key_file: "/etc/walvault/agent.key".into(), public_key: String::new() }
    }
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig { level: 3, wal_level: 1 }
    }
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            partial_interval: Duration::from_secs(5),
            synchronous: false,
            status_interval: Duration::from_secs(10),
            push_parallel: 4,
            prefetch: 8,
            spool_dir: String::new(),
        }
    }
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig { checkpoint: Checkpoint::Fast, wal_timeout: Duration::from_secs(300), pack_size: 32 << 20, max_rate: 0 }
    }
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig { base_backup: "0 0 2 * * *".into(), time_zone: "UTC".into() }
    }
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig { full_backups: None, window_days: None, min_backups: 1 }
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig { metrics_listen: "127.0.0.1:9187".into(), slot_warn_bytes: 1 << 30 }
    }
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig { command: String::new(), wal_lag: Duration::from_secs(300) }
    }
}

impl Default for RestoreConfig {
    fn default() -> Self {
        RestoreConfig { target_action: TargetAction::Promote }
    }
}

// Debug output never shows secrets (logs, panics, error reports).
impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let conninfo = if conninfo_has_password(&self.conninfo) { "<redacted: holds a password>" } else { self.conninfo.as_str() };
        f.debug_struct("PostgresConfig")
            .field("conninfo", &conninfo)
            .field("bin_dir", &self.bin_dir)
            .field("slot", &self.slot)
            .field("application_name", &self.application_name)
            .finish()
    }
}

impl std::fmt::Debug for RepositoryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepositoryConfig")
            .field("url", &self.url)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("checksums", &self.checksums)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &if self.secret_access_key.is_empty() { "" } else { "<redacted>" })
            .field("retries", &self.retries)
            .field("timeout", &self.timeout)
            .field("parallel", &self.parallel)
            .finish()
    }
}

/// Where to look for the configuration file when `--config` is not given.
pub fn default_config_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("WALVAULT_CONFIG")
        && !p.is_empty()
    {
        return Some(PathBuf::from(p));
    }
    ["./walvault.toml", "/etc/walvault/walvault.toml"].iter().map(PathBuf::from).find(|p| p.exists())
}

/// Loads the configuration: the file (if any), the environment, then `overrides`
/// (`section.key=value` from `--set`).
pub fn load(path: Option<&Path>, env: &BTreeMap<String, String>, overrides: &[String]) -> Result<Config, ConfigError> {
    let explicit = path.is_some();
    let path = path.map(Path::to_path_buf).or_else(default_config_path);
    let mut table = toml::Table::new();
    // Where each key's value came from, for errors found after merging.
    let mut origins: BTreeMap<String, String> = BTreeMap::new();
    if let Some(p) = &path {
        match std::fs::read_to_string(p) {
            Ok(text) => {
                table = text.parse::<toml::Table>().map_err(|e| ConfigError::Parse { path: p.clone(), message: e.to_string() })?;
                check_file_keys(&table, p)?;
                for (section, keys) in &table {
                    for key in keys.as_table().into_iter().flat_map(|t| t.keys()) {
                        origins.insert(format!("{section}.{key}"), p.display().to_string());
                    }
                }
                if holds_secret(&table) {
                    check_private(p)?;
                }
            }
            Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ConfigError::Read { path: p.clone(), source: e }),
        }
    }
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("WALVAULT_") else { continue };
        if rest == "CONFIG" || rest.starts_with("TEST_") || rest == "LOG" || rest == "LOG_FORMAT" {
            continue;
        }
        let lower = rest.to_lowercase();
        let Some(spec) = KEYS.iter().find(|k| lower == format!("{}_{}", k.section, k.key)) else {
            // Only names that look like one of our sections are ours to refuse.
            if KEYS.iter().any(|k| lower.starts_with(&format!("{}_", k.section))) {
                return Err(ConfigError::UnknownKey { key: lower.replacen('_', ".", 1), origin: format!("environment variable {name}") });
            }
            continue;
        };
        let origin = format!("environment variable {name}");
        set_value(&mut table, spec, value, &origin)?;
        origins.insert(format!("{}.{}", spec.section, spec.key), origin);
    }
    for item in overrides {
        let (key, value) =
            item.split_once('=').ok_or_else(|| ConfigError::Invalid(format!("--set '{item}': expected section.key=value")))?;
        let spec = find_key(key.trim()).ok_or_else(|| ConfigError::UnknownKey { key: key.trim().into(), origin: "--set".into() })?;
        if spec.secret || (spec.key == "conninfo" && conninfo_has_password(value)) {
            return Err(ConfigError::SecretOnCommandLine { key: key.trim().into() });
        }
        set_value(&mut table, spec, value, "--set")?;
        origins.insert(format!("{}.{}", spec.section, spec.key), "--set".into());
    }
    let origin = path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "defaults".into());
    let mut config: Config = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Parse { path: PathBuf::from(&origin), message: e.message().to_string() })?;
    config.source = path.filter(|p| p.exists());
    config.validate(&|key| origins.get(key).cloned().unwrap_or_else(|| "default".into()))?;
    Ok(config)
}

/// Finds a key by its `section.key` name.
pub fn find_key(name: &str) -> Option<&'static KeySpec> {
    let (section, key) = name.split_once('.')?;
    KEYS.iter().find(|k| k.section == section && k.key == key)
}

fn check_file_keys(table: &toml::Table, path: &Path) -> Result<(), ConfigError> {
    for (section, value) in table {
        let Some(inner) = value.as_table() else {
            return Err(ConfigError::UnknownKey { key: section.clone(), origin: path.display().to_string() });
        };
        for key in inner.keys() {
            let Some(spec) = KEYS.iter().find(|k| k.section == section && k.key == key) else {
                return Err(ConfigError::UnknownKey { key: format!("{section}.{key}"), origin: path.display().to_string() });
            };
            check_value(spec, &inner[key]).map_err(|message| ConfigError::BadValue {
                key: format!("{section}.{key}"),
                origin: path.display().to_string(),
                message,
            })?;
        }
    }
    Ok(())
}

fn holds_secret(table: &toml::Table) -> bool {
    KEYS.iter().any(|k| {
        let v = table.get(k.section).and_then(|s| s.get(k.key)).and_then(|v| v.as_str()).unwrap_or("");
        (k.secret && !v.is_empty()) || (k.key == "conninfo" && conninfo_has_password(v))
    })
}

/// True if a conninfo string carries a password.
pub fn conninfo_has_password(conninfo: &str) -> bool {
    let lower = conninfo.to_ascii_lowercase();
    lower.contains("password") || (lower.starts_with("postgres") && lower.split('@').next().is_some_and(|a| a.matches(':').count() >= 2))
}

/// Refuses a file that group or others can read (secrets, keys).
pub fn check_private(path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let md = std::fs::metadata(path).map_err(|e| ConfigError::Read { path: path.to_path_buf(), source: e })?;
    let mode = md.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(ConfigError::LoosePermissions { path: path.to_path_buf(), mode });
    }
    Ok(())
}

fn set_value(table: &mut toml::Table, spec: &KeySpec, raw: &str, origin: &str) -> Result<(), ConfigError> {
    let name = format!("{}.{}", spec.section, spec.key);
    let bad = |message: String| ConfigError::BadValue { key: name.clone(), origin: origin.into(), message };
    let value = match spec.kind {
        Kind::Str | Kind::Duration | Kind::Size => toml::Value::String(raw.to_string()),
        Kind::Int => toml::Value::Integer(raw.trim().parse::<i64>().map_err(|_| bad(format!("'{raw}' is not a whole number")))?),
        Kind::Bool => toml::Value::Boolean(parse_bool(raw).ok_or_else(|| bad(format!("'{raw}' is not true or false")))?),
        Kind::List => toml::Value::Array(
            raw.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| toml::Value::String(s.to_string())).collect(),
        ),
    };
    check_value(spec, &value).map_err(bad)?;
    let section = table.entry(spec.section.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
    section.as_table_mut().expect("sections are tables").insert(spec.key.to_string(), value);
    Ok(())
}

/// The values some string keys accept.
fn choices(spec: &KeySpec) -> Option<&'static [&'static str]> {
    Some(match (spec.section, spec.key) {
        ("backup", "checkpoint") => &["fast", "spread"],
        ("restore", "target_action") => &["promote", "pause", "shutdown"],
        ("repository", "checksums") => &["when_supported", "when_required"],
        _ => return None,
    })
}

/// Checks a value against its key's kind, so that a wrong type or unit is
/// reported with the key's name and where it came from.
fn check_value(spec: &KeySpec, value: &toml::Value) -> Result<(), String> {
    use toml::Value as V;
    let shown = value.to_string();
    match (spec.kind, value) {
        (Kind::Str, V::String(s)) => match choices(spec) {
            Some(ok) if !ok.contains(&s.as_str()) => Err(format!("{shown} is not one of {}", ok.join(", "))),
            _ => Ok(()),
        },
        (Kind::Int, V::Integer(n)) if *n < 0 => Err(format!("{n} is negative")),
        (Kind::Int, V::Integer(n)) if *n > u32::MAX as i64 => Err(format!("{n} is too large")),
        (Kind::Int, V::Integer(_)) | (Kind::Bool, V::Boolean(_)) => Ok(()),
        (Kind::Duration, V::Integer(n)) if *n >= 0 => Ok(()),
        (Kind::Duration, V::String(s)) => parse_duration(s).map(drop),
        (Kind::Size, V::Integer(n)) if *n >= 0 => Ok(()),
        (Kind::Size, V::String(s)) => parse_size(s).map(drop),
        (Kind::List, V::Array(items)) if items.iter().all(|v| v.is_str()) => Ok(()),
        (kind, _) => Err(format!(
            "{shown} is not {}",
            match kind {
                Kind::Str => "a string (put it in double quotes)",
                Kind::Int => "a whole number",
                Kind::Bool => "true or false",
                Kind::List => "a list of strings, e.g. [\"a\", \"b\"]",
                Kind::Duration => "a duration (examples: 500ms, 5s, 10m, 2h, 1d)",
                Kind::Size => "a size (examples: 512KiB, 32MiB, 1GiB)",
            }
        )),
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

impl Config {
    /// Checks values against each other and their ranges; `origin` names
    /// where a key's value came from (file, environment variable, --set).
    fn validate(&self, origin: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::BadValue { key: key.into(), origin: origin(key), message };
        if !(1..=19).contains(&self.compression.level) {
            return Err(bad("compression.level", format!("{} is outside 1..=19", self.compression.level)));
        }
        if !(1..=19).contains(&self.compression.wal_level) {
            return Err(bad("compression.wal_level", format!("{} is outside 1..=19", self.compression.wal_level)));
        }
        crate::storage::StoreUrl::parse(&self.repository.url).map_err(|m| bad("repository.url", m))?;
        if self.repository.retries == 0 {
            return Err(bad("repository.retries", "must be at least 1".into()));
        }
        if self.repository.parallel == 0 {
            return Err(bad("repository.parallel", "must be at least 1".into()));
        }
        if self.wal.push_parallel == 0 {
            return Err(bad("wal.push_parallel", "must be at least 1".into()));
        }
        let endpoint = self.repository.endpoint.trim();
        if !(endpoint.is_empty() || endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(bad(
                "repository.endpoint",
                format!("'{endpoint}' is not a URL (expected https://host[:port] or http://host[:port])"),
            ));
        }
        {
            use std::str::FromStr;
            if let Err(e) = cron::Schedule::from_str(&self.schedule.base_backup) {
                return Err(bad("schedule.base_backup", {
                    // The parser's text repeats the expression and points at it; keep its words.
                    let why: Vec<String> = e
                        .to_string()
                        .lines()
                        .skip(1)
                        .filter(|l| l.chars().any(char::is_alphabetic))
                        .map(|l| l.trim().to_string())
                        .collect();
                    let why = if why.is_empty() { String::new() } else { format!(" ({})", why.join(" ")) };
                    format!(
                        "'{}' is not a cron expression with a seconds field first, e.g. \"0 0 2 * * *\"{why}",
                        self.schedule.base_backup
                    )
                }));
            }
        }
        for r in &self.encryption.recipients {
            crate::pipeline::seal::parse_recipient(r).map_err(|e| bad("encryption.recipients", e.to_string()))?;
        }
        let pinned = self.signing.public_key.trim();
        if !pinned.is_empty() {
            crate::repo::PublicKey::parse(pinned).map_err(|e| bad("signing.public_key", e.to_string()))?;
        }
        if self.backup.pack_size < (1 << 20) || self.backup.pack_size > (1 << 30) {
            return Err(bad("backup.pack_size", "must be between 1MiB and 1GiB".into()));
        }
        if self.backup.max_rate != 0 && !((32 << 10)..=(1 << 30)).contains(&self.backup.max_rate) {
            // PostgreSQL's own bounds for MAX_RATE (32 kB/s to 1 GB/s).
            return Err(bad("backup.max_rate", "must be 0 (no limit) or between 32KiB and 1GiB (per second)".into()));
        }
        if self.wal.partial_interval.is_zero() {
            return Err(bad("wal.partial_interval", "must be more than zero".into()));
        }
        if self.retention.min_backups == 0 {
            return Err(bad("retention.min_backups", "must be at least 1".into()));
        }
        if self.retention.full_backups == Some(0) {
            return Err(bad("retention.full_backups", "must be at least 1".into()));
        }
        if !self.schedule.time_zone.is_empty() && self.schedule.time_zone.parse::<chrono_tz::Tz>().is_err() {
            return Err(bad("schedule.time_zone", format!("'{}' is not an IANA time zone name", self.schedule.time_zone)));
        }
        Ok(())
    }

    /// The spool directory: configured, or private to this user under the temp dir.
    pub fn spool_dir(&self) -> PathBuf {
        if !self.wal.spool_dir.is_empty() {
            return PathBuf::from(&self.wal.spool_dir);
        }
        std::env::temp_dir().join(format!("walvault-{}", unsafe { libc::geteuid() }))
    }
}

/// Parses `500ms`, `5s`, `10m`, `2h`, `1d`, or a number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("'{s}' is not a duration (examples: 500ms, 5s, 10m, 2h, 1d)"))?;
    let secs = match unit.trim() {
        "" | "s" | "sec" | "secs" => n,
        "ms" => n / 1000.0,
        "m" | "min" | "mins" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        u => return Err(format!("'{s}': unknown duration unit '{u}' (use ms, s, m, h or d)")),
    };
    if !(0.0..1e10).contains(&secs) {
        return Err(format!("'{s}' is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `32MiB`, `1GiB`, `512KiB`, `16MB`, or a number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size (examples: 512KiB, 32MiB, 1GiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => return Err(format!("'{s}': unknown size unit '{u}'")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("'{s}' is out of range"))
}

mod duration_str {
    use super::*;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Duration::from_secs(n)),
            Raw::Str(s) => parse_duration(&s).map_err(serde::de::Error::custom),
        }
    }
}

fn size_de<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Str(String),
    }
    match Raw::deserialize(d)? {
        Raw::Int(n) => Ok(n),
        Raw::Str(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn age_recipient() -> String {
        age::x25519::Identity::generate().to_public().to_string()
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    fn write(dir: &Path, text: &str, mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("walvault.toml");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn layering_file_env_flags() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "[compression]\nlevel = 5\n[wal]\npartial_interval = \"2s\"\n", 0o644);
        let c = load(Some(&p), &env(&[]), &[]).unwrap();
        assert_eq!(c.compression.level, 5);
        assert_eq!(c.wal.partial_interval, Duration::from_secs(2));
        let c = load(Some(&p), &env(&[("WALVAULT_COMPRESSION_LEVEL", "7")]), &[]).unwrap();
        assert_eq!(c.compression.level, 7);
        let c = load(Some(&p), &env(&[("WALVAULT_COMPRESSION_LEVEL", "7")]), &["compression.level=9".into()]).unwrap();
        assert_eq!(c.compression.level, 9);
        let (a, b) = (age_recipient(), age_recipient());
        let c = load(Some(&p), &env(&[("WALVAULT_ENCRYPTION_RECIPIENTS", &format!("{a}, {b}"))]), &[]).unwrap();
        assert_eq!(c.encryption.recipients, vec![a, b]);
    }

    #[test]
    fn unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "[wal]\npartial_intervall = \"2s\"\n", 0o644);
        let e = load(Some(&p), &env(&[]), &[]).unwrap_err();
        assert!(e.to_string().contains("unknown configuration key 'wal.partial_intervall'"), "{e}");
        let e = load(None, &env(&[("WALVAULT_REPOSITORY_URLL", "x")]), &[]).unwrap_err();
        assert!(e.to_string().contains("'repository.urll' (environment variable WALVAULT_REPOSITORY_URLL)"), "{e}");
        let e = load(None, &env(&[]), &["nope.key=1".into()]).unwrap_err();
        assert!(e.to_string().contains("'nope.key'"), "{e}");
    }

    #[test]
    fn secrets_need_private_files_and_no_flags() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "[repository]\nsecret_access_key = \"s3cr3t\"\n", 0o644);
        let e = load(Some(&p), &env(&[]), &[]).unwrap_err();
        assert!(matches!(e, ConfigError::LoosePermissions { mode: 0o644, .. }), "{e}");
        let p = write(dir.path(), "[repository]\nsecret_access_key = \"s3cr3t\"\n", 0o600);
        load(Some(&p), &env(&[]), &[]).unwrap();
        let e = load(None, &env(&[]), &["repository.secret_access_key=x".into()]).unwrap_err();
        assert!(matches!(e, ConfigError::SecretOnCommandLine { .. }));
        let e = load(None, &env(&[]), &["postgres.conninfo=host=x password=y".into()]).unwrap_err();
        assert!(matches!(e, ConfigError::SecretOnCommandLine { .. }));
    }

    #[test]
    fn bad_values() {
        let e = load(None, &env(&[("WALVAULT_COMPRESSION_LEVEL", "fast")]), &[]).unwrap_err();
        assert!(e.to_string().contains("'fast' is not a whole number"), "{e}");
        let e = load(None, &env(&[("WALVAULT_COMPRESSION_LEVEL", "40")]), &[]).unwrap_err();
        assert!(e.to_string().contains("outside 1..=19"), "{e}");
        let e = load(None, &env(&[("WALVAULT_COMPRESSION_WAL_LEVEL", "0")]), &[]).unwrap_err();
        assert!(e.to_string().contains("'compression.wal_level'") && e.to_string().contains("0 is outside 1..=19"), "{e}");
        assert_eq!(load(None, &env(&[]), &[]).unwrap().compression.wal_level, 1, "WAL defaults to level 1");
        let e = load(None, &env(&[("WALVAULT_WAL_PARTIAL_INTERVAL", "5 parsecs")]), &[]).unwrap_err();
        assert!(e.to_string().contains("unknown duration unit"), "{e}");
        let e = load(None, &env(&[("WALVAULT_REPOSITORY_URL", "ftp://x")]), &[]).unwrap_err();
        assert!(e.to_string().contains("neither file:///path nor s3://"), "{e}");
    }

    #[test]
    fn debug_output_hides_secrets() {
        let mut c = Config::default();
        c.repository.secret_access_key = "s3cr3t-key".into();
        c.postgres.conninfo = "host=db user=x password=hunter2".into();
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cr3t-key") && !shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert_eq!(parse_size("32MiB").unwrap(), 32 << 20);
        assert!(parse_size("12 furlongs").is_err());
    }

    #[test]
    fn every_key_round_trips_through_env() {
        for k in KEYS {
            let name = format!("WALVAULT_{}_{}", k.section.to_uppercase(), k.key.to_uppercase());
            let (recipient, public_key) = (age_recipient(), crate::repo::SigningKey::generate().public().to_string());
            let value = match (k.kind, k.key) {
                (_, "url") => "file:///tmp/x",
                (_, "endpoint") => "http://127.0.0.1:9000",
                (_, "base_backup") => "0 30 3 * * *",
                (_, "recipients") => recipient.as_str(),
                (_, "public_key") => public_key.as_str(),
                (_, "checksums") => "when_required",
                (_, "checkpoint") => "spread",
                (_, "target_action") => "pause",
                (_, "time_zone") => "Europe/Paris",
                (Kind::Int, _) => "3",
                (Kind::Bool, _) => "true",
                (Kind::Duration, _) => "3s",
                (Kind::Size, _) => "3MiB",
                _ => "x",
            };
            load(None, &env(&[(&name, value)]), &[]).unwrap_or_else(|e| panic!("{name}={value}: {e}"));
        }
    }
}
