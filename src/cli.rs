//! The command line (clap). Completions and the man page are generated from it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "walvault",
    version,
    about = "Backup and point-in-time recovery for PostgreSQL: streamed WAL, deduplicated base backups, age encryption, signed repositories",
    long_about = None,
    after_help = "Configuration is read from --config, else $WALVAULT_CONFIG, else ./walvault.toml, else /etc/walvault/walvault.toml;\n\
                  every key can also be set as WALVAULT_<SECTION>_<KEY>. See README.md for the reference and exit codes."
)]
pub struct Cli {
    /// Configuration file (TOML).
    #[arg(long, global = true, value_name = "FILE", display_order = 900)]
    pub config: Option<PathBuf>,

    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "WALVAULT_LOG_FORMAT", display_order = 900)]
    pub log_format: LogFormat,

    /// More detail in logs (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, display_order = 900)]
    pub verbose: u8,

    /// Only warnings and errors.
    #[arg(short, long, global = true, conflicts_with = "verbose", display_order = 900)]
    pub quiet: bool,

    /// Override a configuration key (repeatable), e.g. --set compression.level=5. Secrets are refused.
    #[arg(long = "set", global = true, value_name = "SECTION.KEY=VALUE", display_order = 900)]
    pub set: Vec<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a restore identity (restore.key) and the agent's signing key (agent.key).
    Keygen(KeygenArgs),
    /// Create the repository for this cluster (idempotent).
    Init,
    /// Check PostgreSQL settings and permissions, the repository, the keys, and that WAL arrives.
    Check(CheckArgs),
    /// Run until stopped: WAL streaming, scheduled base backups, retention, metrics.
    Daemon,
    /// Stream WAL into the repository in the foreground (no schedule, no metrics).
    Stream(StreamArgs),
    /// Take one base backup now and print its id.
    Backup(BackupArgs),
    /// Store one WAL file; for archive_command = 'walvault archive-push %p'.
    #[command(name = "archive-push")]
    ArchivePush(ArchivePushArgs),
    /// Serve archive-push to the walvault archive module (archive_library = 'walvault', PostgreSQL 15+); started by the module.
    #[command(name = "archive-server")]
    ArchiveServer,
    /// Fetch one WAL file; for restore_command = 'walvault archive-get %f %p' (exit 1: not in the repository).
    #[command(name = "archive-get")]
    ArchiveGet(ArchiveGetArgs),
    /// Rebuild a data directory from the repository and configure recovery to a target.
    Restore(Box<RestoreArgs>),
    /// Show backups, WAL ranges per timeline, the recoverable window and sizes.
    Info(InfoArgs),
    /// Audit the repository: signatures, checksums of every object, WAL continuity.
    Verify(VerifyArgs),
    /// Apply retention: delete backups, WAL and packs that are no longer needed.
    Expire(ExpireArgs),
    /// Print shell completions.
    Completions(CompletionsArgs),
    /// Print the man page (roff).
    Man,
    /// Test helper: write a backup's files into a directory, without recovery settings.
    #[command(hide = true)]
    Materialize(MaterializeArgs),
    /// Background worker of archive-get: prefetches WAL into the spool.
    #[command(name = "archive-get-prefetch", hide = true)]
    ArchiveGetPrefetch(PrefetchArgs),
    /// Background worker of archive-push: stores a backlog of ready segments.
    #[command(name = "archive-push-pusher", hide = true)]
    ArchivePushPusher(PusherArgs),
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Directory to write restore.key and agent.key into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Overwrite existing key files.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Do not force a WAL switch to check that archiving delivers.
    #[arg(long)]
    pub no_switch: bool,
    /// How long to wait for the switched segment to reach the repository.
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    pub wait: String,
}

#[derive(Debug, Args)]
pub struct StreamArgs {
    /// Stop after this LSN has been stored (for tests and one-off catch-ups).
    #[arg(long, value_name = "LSN")]
    pub until: Option<String>,
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// A label for the backup (shown by info).
    #[arg(long)]
    pub label: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ArchivePushArgs {
    /// The WAL file (%p), relative to the data directory or absolute.
    pub path: PathBuf,
}

#[derive(Debug, Args)]
pub struct ArchiveGetArgs {
    /// The file name PostgreSQL asks for (%f).
    pub name: String,
    /// Where to write it (%p).
    pub dest: PathBuf,
}

#[derive(Debug, Args)]
pub struct PusherArgs {
    /// The pg_wal directory whose ready segments to store.
    #[arg(long)]
    pub wal_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct PrefetchArgs {
    /// The spool directory to fill.
    #[arg(long)]
    pub spool: PathBuf,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("target").multiple(false))]
pub struct RestoreArgs {
    /// The data directory to create (must be empty unless --force).
    #[arg(long, value_name = "DIR")]
    pub pgdata: PathBuf,
    /// Recover to this time (PostgreSQL timestamp formats; no offset = local time).
    #[arg(long, group = "target", value_name = "TIME")]
    pub target_time: Option<String>,
    /// Recover to this WAL position (X/X).
    #[arg(long, group = "target", value_name = "LSN")]
    pub target_lsn: Option<String>,
    /// Recover to this transaction id.
    #[arg(long, group = "target", value_name = "XID")]
    pub target_xid: Option<String>,
    /// Recover to this restore point (pg_create_restore_point).
    #[arg(long, group = "target", value_name = "NAME")]
    pub target_name: Option<String>,
    /// Stop as soon as the backup is consistent.
    #[arg(long, group = "target")]
    pub target_immediate: bool,
    /// Timeline to recover along: a number, `current` (the backup's), or `latest`
    /// (default: the timeline whose WAL reached the repository last).
    #[arg(long, value_name = "TLI")]
    pub target_timeline: Option<String>,
    /// Stop just before the target instead of just after it.
    #[arg(long)]
    pub exclusive: bool,
    /// Use this backup instead of choosing one.
    #[arg(long, value_name = "ID")]
    pub backup: Option<String>,
    /// Replace the contents of a non-empty DIR.
    #[arg(long)]
    pub force: bool,
    /// Put tablespace OID at DIR instead of its original location (repeatable).
    #[arg(long = "tablespace-map", value_name = "OID=DIR")]
    pub tablespace_map: Vec<String>,
    /// Archiving of the restored cluster: `preserve` (as in the backup) or `off`
    /// (a side copy that must not archive into the repository). `--replay` without
    /// `--keep-running` always runs the server with archiving off.
    #[arg(long, value_name = "MODE", default_value = "preserve", value_parser = ["preserve", "off"])]
    pub archive_mode: String,
    /// Start PostgreSQL on the restored directory, replay to the target, report what was reached, and stop it.
    #[arg(long)]
    pub replay: bool,
    /// With --replay: leave the server running.
    #[arg(long, requires = "replay")]
    pub keep_running: bool,
    /// With --replay: port for the temporary server (default: a free port).
    #[arg(long, requires = "replay")]
    pub port: Option<u16>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Print JSON (stable schema, see docs/JSON.md).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Print the report as JSON (stable schema, see docs/JSON.md).
    #[arg(long)]
    pub json: bool,
    /// Also decrypt every object (needs encryption.identity_file) and check plaintext and WAL headers.
    #[arg(long)]
    pub deep: bool,
    /// Check only this backup (and the WAL it needs).
    #[arg(long, value_name = "ID")]
    pub backup: Option<String>,
    /// Check only backups and WAL from this time on.
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// An earlier `verify --json` report: fail when something it listed is gone
    /// (WAL cut short, a backup removed out of order, an older descriptor, another key).
    #[arg(long, value_name = "FILE")]
    pub previous_report: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ExpireArgs {
    /// Show what would be deleted, delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct MaterializeArgs {
    #[arg(long)]
    pub backup: String,
    #[arg(long, value_name = "DIR")]
    pub dest: PathBuf,
}

impl Command {
    /// Whether the command reads the configuration.
    pub fn needs_config(&self) -> bool {
        !matches!(self, Command::Keygen(_) | Command::Completions(_) | Command::Man)
    }

    /// Whether the command runs on a single-threaded runtime: archive-push is
    /// started once per WAL segment and mostly waits (for the background
    /// pusher, or for its CPU-pool work), so worker threads it would start and
    /// stop every time cost more than they give. The archive server runs
    /// archive-push's code, tuned for that runtime.
    pub fn single_threaded(&self) -> bool {
        matches!(self, Command::ArchivePush(_) | Command::ArchiveServer)
    }
}
