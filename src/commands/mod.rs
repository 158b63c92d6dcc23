//! One file per command. Commands wire the layers together; they never build
//! S3 requests or parse protocol messages themselves.

pub mod archive_get;
pub mod archive_push;
pub mod archive_server;
pub mod backup;
pub mod check;
pub mod daemon;
pub mod expire;
pub mod info;
pub mod init;
pub mod keygen;
pub mod materialize;
pub mod restore;
pub mod stream;
pub mod verify;

use std::sync::Arc;

use crate::cli::{Cli, Command};
use crate::config::{self, Config};
use crate::error::{Error, Result, ResultExt};
use crate::pipeline::{Opener, seal};
use crate::repo::descriptor::LoadedDescriptor;
use crate::repo::wal::{WalArchive, WalWriter};
use crate::repo::{Descriptor, PublicKey, SigningKey};
use crate::storage::{self, Store, StoreUrl};

/// What every command gets: the configuration and ways to open what it needs.
#[derive(Clone)]
pub struct Ctx {
    pub config: Config,
    /// The `--set` flags, passed on to helper processes.
    pub overrides: Vec<String>,
}

impl Ctx {
    /// Starts `walvault ARGS` with this configuration (its file and the
    /// `--set` flags), detached from the caller's session so that it outlives
    /// the command that started it: the background workers of archive-push
    /// and archive-get. Standard input and output are closed.
    pub fn spawn_worker(&self, args: &[&std::ffi::OsStr], stderr: std::process::Stdio) -> std::io::Result<()> {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        if let Some(cfg) = &self.config.source {
            cmd.arg("--config").arg(std::fs::canonicalize(cfg).unwrap_or_else(|_| cfg.clone()));
        }
        for s in &self.overrides {
            cmd.arg("--set").arg(s);
        }
        cmd.args(args).stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(stderr);
        // A session of its own: out of PostgreSQL's process group.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        cmd.spawn()?;
        Ok(())
    }

    /// Opens the repository's store: the backend, fault injection when
    /// WALVAULT_TEST_FAULTS is set (tests only), and the retry wrapper.
    pub async fn store(&self) -> Result<Store> {
        open_store(&self.config).await
    }

    pub fn signing_key(&self) -> Result<SigningKey> {
        let path = &self.config.signing.key_file;
        Ok(SigningKey::load(std::path::Path::new(path))?)
    }

    /// The pinned signing key, if configured.
    pub fn pinned_key(&self) -> Result<Option<PublicKey>> {
        let k = self.config.signing.public_key.trim();
        if k.is_empty() {
            return Ok(None);
        }
        Ok(Some(PublicKey::parse(k).context("signing.public_key")?))
    }

    pub fn recipients(&self) -> Result<Vec<age::x25519::Recipient>> {
        if self.config.encryption.recipients.is_empty() {
            return Err(Error::with_hint(
                "no encryption recipient configured (encryption.recipients)",
                "set encryption.recipients to the age public key printed by `walvault keygen`",
            ));
        }
        self.config.encryption.recipients.iter().map(|r| seal::parse_recipient(r).context("encryption.recipients")).collect()
    }

    /// The descriptor, verified with the agent's own key (for commands that write).
    pub async fn agent_descriptor(&self, store: &Store, key: &SigningKey) -> Result<Arc<LoadedDescriptor>> {
        if let Some(pinned) = self.pinned_key()?
            && pinned != key.public()
        {
            return Err(Error::with_hint(
                format!("signing.key_file holds {}, but signing.public_key pins {pinned}", key.public()),
                "use the agent key that matches the pinned public key, or update the pin",
            ));
        }
        let desc = Descriptor::load(store.as_ref(), Some(key.public())).await?;
        let configured: Vec<String> = self.config.encryption.recipients.iter().map(|r| r.trim().to_string()).collect();
        if !configured.is_empty() && configured != desc.descriptor.recipients {
            tracing::warn!(
                "encryption.recipients differ from the repository's; objects are sealed to the repository's recipients until `walvault init` updates them"
            );
        }
        Ok(Arc::new(desc))
    }

    /// The descriptor for readers (restore, archive-get, verify, info): verified
    /// with the pinned key when there is one, else with the key it names itself.
    pub async fn reader_descriptor(&self, store: &Store) -> Result<Arc<LoadedDescriptor>> {
        Ok(Arc::new(Descriptor::load(store.as_ref(), self.pinned_key()?).await?))
    }

    /// The WAL archive, for writing.
    pub async fn wal_writer(&self, store: Store) -> Result<WalArchive> {
        let key = Arc::new(self.signing_key()?);
        let desc = self.agent_descriptor(&store, &key).await?;
        let sealer = desc.descriptor.sealer(self.config.compression.wal_level)?;
        Ok(WalArchive::new(store, desc, Some(WalWriter { key, sealer })))
    }

    /// The restore identity, for restore and verify --deep.
    pub fn opener(&self) -> Result<Opener> {
        let path = self.config.encryption.identity_file.trim();
        if path.is_empty() {
            return Err(Error::with_hint(
                "this needs the restore identity, and encryption.identity_file is not set",
                "set encryption.identity_file to the restore.key written by `walvault keygen`",
            ));
        }
        let path = std::path::Path::new(path);
        config::check_private(path).map_err(Error::from).context("encryption.identity_file")?;
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read identity file {}", path.display()))?;
        let ids = seal::parse_identities(&text, &path.display().to_string())?;
        Ok(Opener::new(ids)?)
    }
}

pub async fn open_store(config: &Config) -> Result<Store> {
    let repo = &config.repository;
    let url = StoreUrl::parse(&repo.url).map_err(|m| Error::Config(config::ConfigError::Invalid(m)))?;
    let backend: Store = match url {
        StoreUrl::File(path) => Arc::new(storage::fs::FileStore::new(path).context("cannot open the repository directory")?),
        StoreUrl::S3 { bucket, prefix } => {
            let opts = storage::s3::S3Options {
                bucket,
                prefix,
                endpoint: Some(repo.endpoint.clone()).filter(|s| !s.is_empty()),
                region: Some(repo.region.clone()).filter(|s| !s.is_empty()),
                path_style: repo.path_style,
                access_key_id: Some(repo.access_key_id.clone()).filter(|s| !s.is_empty()),
                secret_access_key: Some(repo.secret_access_key.clone()).filter(|s| !s.is_empty()),
                session_token: None,
                checksums: repo.checksums,
            };
            Arc::new(storage::s3::S3Store::connect(opts).await?)
        }
    };
    let backend: Store = match std::env::var("WALVAULT_TEST_FAULTS") {
        Ok(spec) if !spec.is_empty() => {
            let rules = storage::faults::parse_spec(&spec).map_err(Error::failed)?;
            let seed = std::env::var("WALVAULT_TEST_FAULTS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
            tracing::warn!(spec, "fault injection is active (WALVAULT_TEST_FAULTS)");
            Arc::new(storage::faults::FaultStore::new(backend, rules, seed))
        }
        _ => backend,
    };
    let policy = storage::retry::RetryPolicy { attempts: repo.retries, attempt_timeout: repo.timeout, ..Default::default() };
    Ok(Arc::new(storage::retry::RetryStore::new(backend, policy)))
}

/// Runs a command as a task on the runtime's worker threads rather than on
/// the thread that waits for it. A task woken by a socket then runs on the
/// worker that saw the event, at once; a future run by `block_on` needs that
/// worker to wake the main thread first, a hand-off per read. For backup that
/// hand-off kept PostgreSQL's sender and the receiver waiting on each other:
/// 15% of the wall time and a third of the system time.
async fn on_workers<F, Fut>(ctx: Ctx, command: F) -> Result<i32>
where
    F: FnOnce(Ctx) -> Fut,
    Fut: std::future::Future<Output = Result<i32>> + Send + 'static,
{
    match tokio::spawn(command(ctx)).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(Error::failed(format!("the command's task was cancelled: {e}"))),
    }
}

/// Runs the parsed command line; returns the exit code.
pub async fn run(cli: Cli) -> Result<i32> {
    let ctx = if cli.command.needs_config() {
        let env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
        Some(Ctx { config: config::load(cli.config.as_deref(), &env, &cli.set)?, overrides: cli.set.clone() })
    } else {
        None
    };
    if let Command::Daemon = cli.command {
        return on_workers(ctx.expect("config loaded for the daemon"), daemon::run).await;
    }
    let ctx = || ctx.as_ref().expect("config loaded for this command");
    match cli.command {
        Command::Keygen(args) => keygen::run(&args),
        Command::Completions(args) => {
            use clap::CommandFactory;
            clap_complete::generate(args.shell, &mut Cli::command(), "walvault", &mut std::io::stdout());
            Ok(0)
        }
        Command::Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(0)
        }
        Command::Init => init::run(ctx()).await,
        Command::Backup(args) => on_workers(ctx().clone(), move |ctx| async move { backup::run(&ctx, &args).await }).await,
        Command::Restore(args) => restore::run(ctx(), &args).await,
        Command::Materialize(args) => materialize::run(ctx(), &args).await,
        Command::Expire(args) => expire::run(ctx(), &args).await,
        Command::Verify(args) => verify::run(ctx(), &args).await,
        Command::Check(args) => check::run(ctx(), &args).await,
        Command::Info(args) => info::run(ctx(), &args).await,
        Command::Stream(args) => on_workers(ctx().clone(), move |ctx| async move { stream::run(&ctx, &args).await }).await,
        Command::ArchivePush(args) => archive_push::run(ctx(), &args).await,
        Command::ArchiveServer => archive_server::run(ctx()).await,
        Command::ArchiveGet(args) => archive_get::run(ctx(), &args).await,
        Command::ArchiveGetPrefetch(args) => archive_get::prefetch_worker(ctx(), &args).await,
        Command::ArchivePushPusher(args) => archive_push::pusher(ctx(), &args).await,
        Command::Daemon => unreachable!("handled above"),
    }
}
