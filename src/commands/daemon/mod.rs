//! `walvault daemon`: runs until SIGTERM/SIGINT. It streams WAL, takes base
//! backups on the cron schedule (and one at start when the repository has none,
//! or when the server lost WAL the repository needed), applies retention after
//! each backup, serves /metrics and /healthz, and runs the alert command when
//! something fails. SIGHUP reloads the configuration.

mod alerts;
mod http;
mod state;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

pub use state::{DaemonState, RepoSnapshot};

use super::Ctx;
use crate::config;
use crate::error::{Error, Result};
use crate::pg::conninfo::ConnParams;
use crate::pg::streamer::{self, SharedState};
use crate::repo::catalog::Catalog;

/// How often the repository summary (for metrics) and the store probe refresh.
const REFRESH: Duration = Duration::from_secs(30);
const TICK: Duration = Duration::from_secs(5);

pub async fn run(ctx: Ctx) -> Result<i32> {
    let ctx = Arc::new(ctx);
    // The repository must exist, and be ours, before anything starts.
    let store = ctx.store().await?;
    let key = ctx.signing_key()?;
    ctx.agent_descriptor(&store, &key).await?;
    let schedule = Schedule::parse(&ctx.config.schedule.base_backup, &ctx.config.schedule.time_zone)?;

    let (shutdown_tx, shutdown) = watch::channel(false);
    let reload = Arc::new(tokio::sync::Notify::new());
    spawn_signal_handlers(shutdown_tx.clone(), reload.clone());

    let state = Arc::new(Mutex::new(DaemonState::new(schedule.clone(), ctx.config.wal.partial_interval)));
    let stream_state: SharedState = Arc::new(Mutex::new(Default::default()));
    state.lock().unwrap().streamer = stream_state.clone();

    if !ctx.config.daemon.metrics_listen.is_empty() {
        let listener = tokio::net::TcpListener::bind(&ctx.config.daemon.metrics_listen).await.map_err(|e| {
            Error::with_hint(format!("cannot listen on {}: {e}", ctx.config.daemon.metrics_listen), "change daemon.metrics_listen")
        })?;
        tracing::info!(address = %ctx.config.daemon.metrics_listen, "serving /metrics and /healthz");
        tokio::spawn(http::serve(listener, state.clone(), shutdown.clone()));
    }

    let mut ctx = ctx;
    let mut streamer = start_streamer(&ctx, stream_state.clone()).await?;
    let mut backup: Option<tokio::task::JoinHandle<()>> = None;
    let mut snapshot_due = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(TICK);
    let mut shutdown_wait = shutdown.clone();
    refresh_snapshot(&ctx, &state).await;
    if state.lock().unwrap().repo.as_ref().is_some_and(|r| r.backups == 0) {
        tracing::info!("the repository has no backup yet: taking one now");
        backup = Some(spawn_backup(ctx.clone(), state.clone(), shutdown.clone(), "first backup"));
    }
    let mut next_fire = state.lock().unwrap().schedule.next_after(chrono::Utc::now());
    loop {
        let until_fire = next_fire.map(|t| (t - chrono::Utc::now()).to_std().unwrap_or_default()).unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            _ = crate::util::until_true(&mut shutdown_wait) => break,
            _ = reload.notified() => {
                match reload_config(&ctx) {
                    Ok(new) => {
                        let restart = new.config.postgres.conninfo != ctx.config.postgres.conninfo
                            || new.config.postgres.slot != ctx.config.postgres.slot
                            || format!("{:?}", new.config.wal) != format!("{:?}", ctx.config.wal)
                            || format!("{:?}", new.config.repository) != format!("{:?}", ctx.config.repository);
                        match Schedule::parse(&new.config.schedule.base_backup, &new.config.schedule.time_zone) {
                            Ok(s) => {
                                next_fire = s.next_after(chrono::Utc::now());
                                state.lock().unwrap().schedule = s;
                            }
                            Err(e) => tracing::error!(error = %e, "keeping the old schedule"),
                        }
                        ctx = Arc::new(new);
                        if restart {
                            tracing::info!("connection settings changed: restarting WAL streaming");
                            streamer.stop().await;
                            streamer = start_streamer(&ctx, stream_state.clone()).await?;
                        }
                        tracing::info!("configuration reloaded");
                    }
                    Err(e) => tracing::error!(error = %e, hint = e.hint().unwrap_or_default(), "configuration reload failed; keeping the running configuration"),
                }
            }
            _ = tokio::time::sleep(until_fire), if next_fire.is_some() => {
                next_fire = state.lock().unwrap().schedule.next_after(chrono::Utc::now() + chrono::Duration::seconds(1));
                if backup.as_ref().is_some_and(|b| !b.is_finished()) {
                    tracing::warn!("scheduled backup skipped: the previous one is still running");
                } else {
                    backup = Some(spawn_backup(ctx.clone(), state.clone(), shutdown.clone(), "scheduled"));
                }
            }
            _ = tick.tick() => {
                let needs = stream_state.lock().unwrap().needs_backup;
                if needs && backup.as_ref().is_none_or(|b| b.is_finished()) {
                    tracing::warn!("the server lost WAL the repository needed: taking a new base backup so that restores are possible again");
                    stream_state.lock().unwrap().needs_backup = false;
                    alerts::raise(&ctx, &state, "wal_gap", "the server removed WAL before it reached the repository; a new base backup was started", serde_json::json!({})).await;
                    backup = Some(spawn_backup(ctx.clone(), state.clone(), shutdown.clone(), "after a WAL gap"));
                }
                if tokio::time::Instant::now() >= snapshot_due {
                    snapshot_due = tokio::time::Instant::now() + REFRESH;
                    let c = ctx.clone();
                    let s = state.clone();
                    tokio::spawn(async move { refresh_snapshot(&c, &s).await });
                }
                alerts::watch_lag(&ctx, &state).await;
            }
        }
    }
    tracing::info!("shutting down");
    if let Some(b) = backup.take() {
        if tokio::time::timeout(Duration::from_secs(8), b).await.is_err() {
            tracing::warn!("the backup did not stop in time");
        }
    }
    streamer.stop().await;
    tracing::info!("stopped");
    Ok(0)
}

fn reload_config(ctx: &Ctx) -> Result<Ctx> {
    let env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
    let config = config::load(ctx.config.source.as_deref(), &env, &ctx.overrides)?;
    Ok(Ctx { config, overrides: ctx.overrides.clone() })
}

fn spawn_signal_handlers(shutdown: watch::Sender<bool>, reload: Arc<tokio::sync::Notify>) {
    use tokio::signal::unix::{SignalKind, signal};
    tokio::spawn(async move {
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => { reload.notify_one(); continue; }
            }
        }
        let _ = shutdown.send(true);
    });
}

struct Streamer {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Streamer {
    async fn stop(self) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(Duration::from_secs(8), self.task).await.is_err() {
            tracing::warn!("WAL streaming did not stop in time; what it had not stored is streamed again on restart");
        }
    }
}

async fn start_streamer(ctx: &Arc<Ctx>, state: SharedState) -> Result<Streamer> {
    let params = ConnParams::parse(&ctx.config.postgres.conninfo)?;
    let archive = Arc::new(ctx.wal_writer(ctx.store().await?).await?);
    let settings = super::stream::settings(ctx, None);
    let (stop, rx) = watch::channel(false);
    let c = ctx.clone();
    let task = tokio::spawn(async move {
        // Fatal errors (another cluster, a conflicting segment) stop streaming;
        // the daemon stays up to report them through /healthz and alerts.
        if let Err(e) = streamer::run(params, archive, settings, state.clone(), rx).await {
            tracing::error!(error = %e, hint = e.hint().unwrap_or_default(), "WAL streaming stopped");
            state.lock().unwrap().last_error = Some(format!("stopped: {e}"));
            let dummy = Arc::new(Mutex::new(DaemonState::default()));
            alerts::raise(&c, &dummy, "stream_stopped", &e.to_string(), serde_json::json!({})).await;
        }
    });
    Ok(Streamer { stop, task })
}

fn spawn_backup(
    ctx: Arc<Ctx>,
    state: Arc<Mutex<DaemonState>>,
    shutdown: watch::Receiver<bool>,
    why: &'static str,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        state.lock().unwrap().backup_running = true;
        tracing::info!(reason = why, "starting base backup");
        let result = super::backup::take_backup(&ctx, Some(format!("walvault daemon ({why})")), shutdown.clone()).await;
        {
            let mut st = state.lock().unwrap();
            st.backup_running = false;
            match &result {
                Ok(m) => st.backup_succeeded(m),
                Err(_) => st.failed("backup"),
            }
        }
        match result {
            Ok(_) => {
                if *shutdown.borrow() {
                    return;
                }
                if ctx.config.retention.full_backups.is_some() || ctx.config.retention.window_days.is_some() {
                    match ctx.store().await {
                        Ok(store) => {
                            if let Err(e) = super::expire::expire(&ctx, &store, false).await {
                                tracing::error!(error = %e, "retention failed");
                                state.lock().unwrap().failed("expire");
                                alerts::raise(&ctx, &state, "expire_failed", &e.to_string(), serde_json::json!({})).await;
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "retention skipped: store unavailable"),
                    }
                }
                refresh_snapshot(&ctx, &state).await;
            }
            Err(e) if *shutdown.borrow() => tracing::info!("backup abandoned for shutdown: {e}"),
            Err(e) => {
                tracing::error!(error = %e, hint = e.hint().unwrap_or_default(), "base backup failed");
                alerts::raise(&ctx, &state, "backup_failed", &e.to_string(), serde_json::json!({"hint": e.hint()})).await;
            }
        }
    })
}

/// Re-reads the repository summary for metrics; marks the store unreachable on failure.
async fn refresh_snapshot(ctx: &Ctx, state: &Arc<Mutex<DaemonState>>) {
    let result = async {
        let store = ctx.store().await?;
        let desc = ctx.reader_descriptor(&store).await?;
        let catalog = Catalog::load(&store, &desc, ctx.config.repository.parallel).await?;
        let counts = super::info::ObjectCounts::load(&store).await?;
        Ok::<_, Error>(RepoSnapshot::from_catalog(&catalog, &counts))
    }
    .await;
    let mut st = state.lock().unwrap();
    match result {
        Ok(s) => {
            st.store_error = None;
            st.repo = Some(s);
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the repository");
            st.store_error = Some(e.to_string());
            st.failed("store");
        }
    }
}

/// The base backup schedule: a cron expression (seconds first) in a time zone.
#[derive(Clone, Debug)]
pub struct Schedule {
    cron: cron::Schedule,
    tz: chrono_tz::Tz,
    pub expression: String,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::parse("0 0 2 * * *", "UTC").expect("valid default")
    }
}

impl Schedule {
    pub fn parse(expr: &str, tz: &str) -> Result<Schedule> {
        use std::str::FromStr;
        let cron = cron::Schedule::from_str(expr).map_err(|e| {
            Error::Config(config::ConfigError::BadValue {
                key: "schedule.base_backup".into(),
                origin: "configuration".into(),
                message: format!("'{expr}' is not a cron expression with a seconds field first, e.g. \"0 0 2 * * *\" ({e})"),
            })
        })?;
        let tz: chrono_tz::Tz = if tz.is_empty() {
            chrono_tz::UTC
        } else {
            tz.parse().map_err(|_| Error::Usage(format!("schedule.time_zone '{tz}' is unknown")))?
        };
        Ok(Schedule { cron, tz, expression: expr.to_string() })
    }

    pub fn next_after(&self, t: chrono::DateTime<chrono::Utc>) -> Option<chrono::DateTime<chrono::Utc>> {
        self.cron.after(&t.with_timezone(&self.tz)).next().map(|n| n.with_timezone(&chrono::Utc))
    }

    /// The last two fire times before `t` (most recent first).
    pub fn previous_two(&self, t: chrono::DateTime<chrono::Utc>) -> Option<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)> {
        let local = t.with_timezone(&self.tz);
        let mut it = self.cron.after(&local).rev();
        let a = it.next()?.with_timezone(&chrono::Utc);
        let b = it.next()?.with_timezone(&chrono::Utc);
        Some((a, b))
    }
}
