//! `walvault daemon`: runs until SIGTERM/SIGINT. It streams WAL, takes base
//! backups on the cron schedule (and one at start when the repository has none,
//! or when the server lost WAL the repository needed), applies retention after
//! each backup, serves /metrics and /healthz, and runs the alert command when
//! something fails. SIGHUP reloads the configuration.

mod alerts;
mod http;
mod slot;
mod state;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use state::{DaemonState, RepoSnapshot};

use super::Ctx;
use crate::config;
use crate::error::{Error, Result};
use crate::pg::conninfo::ConnParams;
use crate::pg::streamer::{self, SharedState};
use crate::repo::catalog::Catalog;
use crate::repo::layout;
use crate::storage::Store;

/// How often the repository summary (for metrics and health) is re-read.
const REFRESH: Duration = Duration::from_secs(30);
/// How often the store is probed (one HEAD request), and how long it may take.
const PROBE: Duration = Duration::from_secs(10);
/// How often the slot's retained WAL is read (a short replication connection).
const SLOT_PROBE: Duration = Duration::from_secs(15);
const TICK: Duration = Duration::from_secs(5);
/// Everything in flight gets this long to stop after SIGTERM.
const STOP_WITHIN: Duration = Duration::from_secs(8);

type Shared = Arc<Mutex<DaemonState>>;

pub async fn run(ctx: Ctx) -> Result<i32> {
    let mut ctx = Arc::new(ctx);
    // The repository must exist, and be ours, before anything starts.
    let mut store = ctx.store().await?;
    let key = ctx.signing_key()?;
    ctx.agent_descriptor(&store, &key).await?;
    let schedule = Schedule::parse(&ctx.config.schedule.base_backup, &ctx.config.schedule.time_zone)?;

    let (shutdown_tx, shutdown) = watch::channel(false);
    let reload = Arc::new(tokio::sync::Notify::new());
    spawn_signal_handlers(shutdown_tx.clone(), reload.clone());

    let stream_state: SharedState = Arc::new(Mutex::new(Default::default()));
    let state: Shared = Arc::new(Mutex::new(DaemonState::new(schedule, stream_state.clone(), ctx.config.wal.partial_interval)));

    if !ctx.config.daemon.metrics_listen.is_empty() {
        let listener = tokio::net::TcpListener::bind(&ctx.config.daemon.metrics_listen).await.map_err(|e| {
            Error::with_hint(format!("cannot listen on {}: {e}", ctx.config.daemon.metrics_listen), "change daemon.metrics_listen")
        })?;
        tracing::info!(address = %ctx.config.daemon.metrics_listen, "serving /metrics and /healthz");
        tokio::spawn(http::serve(listener, state.clone(), shutdown.clone()));
    }

    let mut streamer = Some(start_streamer(&ctx, &state).await?);
    let mut backup: Option<JoinHandle<()>> = None;
    let mut background = Background::default();
    refresh_snapshot(&ctx, &store, &state).await;
    background.refreshed = Some(Instant::now());
    let mut startup_decided = false;
    let mut gap_handled: Option<String> = None;
    let mut next_fire = state.lock().unwrap().schedule.next_after(chrono::Utc::now());
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shutdown_wait = shutdown.clone();
    loop {
        if !startup_decided && state.lock().unwrap().repo.is_some() {
            startup_decided = true;
            let why = startup_backup(&state.lock().unwrap(), chrono::Utc::now());
            if let Some(why) = why {
                tracing::info!(reason = why, "taking a backup now");
                backup = Some(spawn_backup(ctx.clone(), store.clone(), state.clone(), shutdown.clone(), why));
            }
        }
        let until_fire = next_fire.map(|t| (t - chrono::Utc::now()).to_std().unwrap_or_default()).unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            _ = crate::util::until_true(&mut shutdown_wait) => break,
            _ = reload.notified() => {
                let new = match reload_config(&ctx) {
                    Ok(new) => new,
                    Err(e) => {
                        tracing::error!(error = %e, hint = e.hint().unwrap_or_default(), "configuration reload failed; keeping the running configuration");
                        continue;
                    }
                };
                let restart = new.config.postgres.conninfo != ctx.config.postgres.conninfo
                    || new.config.postgres.slot != ctx.config.postgres.slot
                    || format!("{:?}", new.config.wal) != format!("{:?}", ctx.config.wal)
                    || format!("{:?}", new.config.repository) != format!("{:?}", ctx.config.repository);
                match Schedule::parse(&new.config.schedule.base_backup, &new.config.schedule.time_zone) {
                    Ok(s) => {
                        next_fire = s.next_after(chrono::Utc::now());
                        tracing::info!(schedule = %s.expression, next = ?next_fire, "base backup schedule");
                        state.lock().unwrap().schedule = s;
                    }
                    Err(e) => tracing::error!(error = %e, "keeping the old schedule"),
                }
                state.lock().unwrap().partial_interval = new.config.wal.partial_interval;
                ctx = Arc::new(new);
                if restart {
                    match ctx.store().await {
                        Ok(s) => store = s,
                        Err(e) => tracing::error!(error = %e, "cannot open the new repository settings; keeping the old store for probes"),
                    }
                }
                // A streamer stopped by a fatal error gets another chance too.
                if restart || streamer.as_ref().is_some_and(|s| s.task.is_finished()) {
                    tracing::info!("restarting WAL streaming with the new configuration");
                    if let Some(s) = streamer.take() {
                        s.stop(Instant::now() + STOP_WITHIN).await;
                    }
                    streamer = start_or_log(&ctx, &state).await;
                }
                background.refresh = Some(tokio::spawn(refresh_task(ctx.clone(), store.clone(), state.clone())));
                tracing::info!("configuration reloaded");
            }
            _ = tokio::time::sleep(until_fire), if next_fire.is_some() => {
                next_fire = state.lock().unwrap().schedule.next_after(chrono::Utc::now() + chrono::Duration::seconds(1));
                if backup.as_ref().is_some_and(|b| !b.is_finished()) {
                    tracing::warn!("scheduled backup skipped: the previous one is still running");
                } else {
                    backup = Some(spawn_backup(ctx.clone(), store.clone(), state.clone(), shutdown.clone(), "scheduled"));
                }
            }
            _ = tick.tick() => {
                state.lock().unwrap().observe(chrono::Utc::now());
                if streamer.is_none() {
                    streamer = start_or_log(&ctx, &state).await;
                }
                let idle = backup.as_ref().is_none_or(|b| b.is_finished());
                let needs = stream_state.lock().unwrap().needs_backup;
                let gap = state.lock().unwrap().wal_gap().map(str::to_string).filter(|g| gap_handled.as_ref() != Some(g));
                if needs && idle {
                    stream_state.lock().unwrap().needs_backup = false;
                    alerts::raise(&ctx, &state, "wal_gap", "the server removed WAL before it reached the repository; a new base backup was started so that restores are possible again", serde_json::json!({}));
                    backup = Some(spawn_backup(ctx.clone(), store.clone(), state.clone(), shutdown.clone(), "after a WAL gap"));
                } else if let (Some(g), true) = (gap, idle) {
                    // Once per gap: if this backup fails, the schedule tries again.
                    alerts::raise(&ctx, &state, "wal_gap", &format!("WAL segment {g} is missing from the repository after the newest backup; restores cannot go past it, so a new base backup was started"), serde_json::json!({"missing": g}));
                    gap_handled = Some(g);
                    backup = Some(spawn_backup(ctx.clone(), store.clone(), state.clone(), shutdown.clone(), "after a WAL gap"));
                }
                background.run_due(&ctx, &store, &state);
                alerts::watch(&ctx, &state);
            }
        }
    }
    tracing::info!("shutting down");
    let deadline = Instant::now() + STOP_WITHIN;
    // Both wind down at once: the backup abandons its work (no manifest, the
    // lock released), the streamer stores what it received.
    if let Some(s) = &streamer {
        let _ = s.stop.send(true);
    }
    if let Some(b) = backup.take()
        && tokio::time::timeout_at(deadline, b).await.is_err()
    {
        tracing::warn!("the backup did not stop in time; its lock expires by itself and its uploads are re-used by the next backup");
    }
    if let Some(s) = streamer.take() {
        s.stop(deadline).await;
    }
    tracing::info!("stopped");
    Ok(0)
}

/// Why to take a backup as soon as the daemon starts: the repository has none,
/// or the schedule's last run passed while the daemon was not running.
fn startup_backup(st: &DaemonState, now: chrono::DateTime<chrono::Utc>) -> Option<&'static str> {
    match st.repo.as_ref()?.newest_backup.as_ref() {
        None => Some("the repository has no backup yet"),
        Some(b) => {
            let (last_run, _) = st.schedule.previous_two(now)?;
            (b.end < last_run).then_some("the schedule's last run was missed (catching up)")
        }
    }
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
    task: JoinHandle<()>,
}

impl Streamer {
    async fn stop(self, deadline: Instant) {
        let _ = self.stop.send(true);
        if tokio::time::timeout_at(deadline, self.task).await.is_err() {
            tracing::warn!("WAL streaming did not stop in time; what it had not stored is streamed again on restart");
        }
    }
}

async fn start_or_log(ctx: &Arc<Ctx>, state: &Shared) -> Option<Streamer> {
    match start_streamer(ctx, state).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, hint = e.hint().unwrap_or_default(), "cannot start WAL streaming; retrying");
            None
        }
    }
}

async fn start_streamer(ctx: &Arc<Ctx>, state: &Shared) -> Result<Streamer> {
    let params = ConnParams::parse(&ctx.config.postgres.conninfo)?;
    let archive = Arc::new(ctx.wal_writer(ctx.store().await?).await?);
    let settings = super::stream::settings(ctx, None);
    let (stop, rx) = watch::channel(false);
    let stream_state = state.lock().unwrap().streamer.clone();
    let (c, s) = (ctx.clone(), state.clone());
    let task = tokio::spawn(async move {
        // Fatal errors (another cluster, a conflicting segment) stop streaming;
        // the daemon stays up to report them through /healthz and alerts.
        if let Err(e) = streamer::run(params, archive, settings, stream_state.clone(), rx).await {
            tracing::error!(error = %e, hint = e.hint().unwrap_or_default(), "WAL streaming stopped; fix the cause and send SIGHUP to restart it");
            {
                let mut st = stream_state.lock().unwrap();
                st.connected = false;
                st.last_error = Some(format!("stopped: {e}"));
            }
            alerts::raise(&c, &s, "stream_stopped", &e.to_string(), serde_json::json!({"hint": e.hint()}));
        }
    });
    Ok(Streamer { stop, task })
}

/// A backup's buffers are freed when it ends, but glibc keeps the freed pages
/// in its per-thread arenas: hand them back, so the daemon's RSS between
/// backups is what streaming needs, not the last backup's peak.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the kernel; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn spawn_backup(ctx: Arc<Ctx>, store: Store, state: Shared, shutdown: watch::Receiver<bool>, why: &'static str) -> JoinHandle<()> {
    // Set before the task runs, so health never sees the run without its backup.
    state.lock().unwrap().backup_running = true;
    tokio::spawn(async move {
        tracing::info!(reason = why, "starting base backup");
        let result = super::backup::take_backup(&ctx, Some(format!("walvault daemon ({why})")), shutdown.clone()).await;
        let stopping = *shutdown.borrow();
        {
            let mut st = state.lock().unwrap();
            st.backup_running = false;
            match &result {
                Ok(m) => st.backup_succeeded(m),
                Err(_) if stopping => {}
                Err(e) => {
                    st.failed("backup");
                    st.last_backup_error = Some((chrono::Utc::now(), e.to_string()));
                }
            }
        }
        match result {
            Ok(_) if stopping => {}
            Ok(_) => {
                let r = &ctx.config.retention;
                if r.full_backups.is_some() || r.window_days.is_some() {
                    state.lock().unwrap().retention_running = true;
                    let expired = super::expire::expire(&ctx, &store, false).await;
                    state.lock().unwrap().retention_running = false;
                    if let Err(e) = expired {
                        tracing::error!(error = %e, hint = e.hint().unwrap_or_default(), "retention failed");
                        state.lock().unwrap().failed("expire");
                        alerts::raise(&ctx, &state, "expire_failed", &e.to_string(), serde_json::json!({"hint": e.hint()}));
                    }
                }
                refresh_snapshot(&ctx, &store, &state).await;
            }
            Err(e) if stopping => tracing::info!("backup abandoned for shutdown: {e}"),
            Err(e) => {
                tracing::error!(error = %e, hint = e.hint().unwrap_or_default(), "base backup failed");
                alerts::raise(&ctx, &state, "backup_failed", &e.to_string(), serde_json::json!({"hint": e.hint(), "reason": why}));
            }
        }
        release_freed_memory();
    })
}

/// Periodic work, each kind at most once at a time.
#[derive(Default)]
struct Background {
    refresh: Option<JoinHandle<()>>,
    refreshed: Option<Instant>,
    probe: Option<JoinHandle<()>>,
    probed: Option<Instant>,
    slot: Option<JoinHandle<()>>,
    slot_read: Option<Instant>,
}

fn idle(h: &Option<JoinHandle<()>>) -> bool {
    h.as_ref().is_none_or(|h| h.is_finished())
}

fn due(last: Option<Instant>, every: Duration) -> bool {
    last.is_none_or(|t| t.elapsed() >= every)
}

impl Background {
    fn run_due(&mut self, ctx: &Arc<Ctx>, store: &Store, state: &Shared) {
        // While the repository cannot be read, retry at every tick.
        let failing = {
            let st = state.lock().unwrap();
            st.repo.is_none() || st.refresh_error.is_some()
        };
        let refresh_every = if failing { TICK } else { REFRESH };
        if idle(&self.refresh) && due(self.refreshed, refresh_every) {
            self.refreshed = Some(Instant::now());
            self.refresh = Some(tokio::spawn(refresh_task(ctx.clone(), store.clone(), state.clone())));
        }
        if idle(&self.probe) && due(self.probed, PROBE) {
            self.probed = Some(Instant::now());
            self.probe = Some(tokio::spawn(probe_store(store.clone(), state.clone())));
        }
        if idle(&self.slot) && due(self.slot_read, SLOT_PROBE) {
            self.slot_read = Some(Instant::now());
            self.slot = Some(tokio::spawn(read_slot(ctx.clone(), state.clone())));
        }
    }
}

async fn refresh_task(ctx: Arc<Ctx>, store: Store, state: Shared) {
    refresh_snapshot(&ctx, &store, &state).await
}

/// Re-reads the repository summary for metrics and health.
async fn refresh_snapshot(ctx: &Ctx, store: &Store, state: &Shared) {
    let result = async {
        let desc = ctx.reader_descriptor(store).await?;
        let catalog = Catalog::load(store, &desc, ctx.config.repository.parallel).await?;
        let counts = super::info::ObjectCounts::load(store).await?;
        Ok::<_, Error>(RepoSnapshot::from_catalog(&catalog, &counts))
    }
    .await;
    let mut st = state.lock().unwrap();
    match result {
        Ok(s) => {
            st.refresh_error = None;
            st.repo = Some(s);
            st.repo_refreshed = Some(chrono::Utc::now());
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the repository");
            st.refresh_error = Some(e.to_string());
            st.failed("store");
        }
    }
}

/// One HEAD of the descriptor, bounded in time: is the store there?
async fn probe_store(store: Store, state: Shared) {
    let result = match tokio::time::timeout(PROBE, store.head(layout::DESCRIPTOR)).await {
        Ok(Ok(Some(_))) => Ok(()),
        Ok(Ok(None)) => Err(format!("{} is missing from {}", layout::DESCRIPTOR, store.location())),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("{} did not answer within {}s", store.location(), PROBE.as_secs())),
    };
    let mut st = state.lock().unwrap();
    match result {
        Ok(()) => {
            if st.store_error.take().is_some() {
                tracing::info!("the repository's store answers again");
            }
        }
        Err(e) => {
            if st.store_error.is_none() {
                tracing::warn!(error = %e, "the repository's store is unreachable");
                st.failed("store");
            }
            st.store_error = Some(e);
        }
    }
}

async fn read_slot(ctx: Arc<Ctx>, state: Shared) {
    let result = async {
        let params = ConnParams::parse(&ctx.config.postgres.conninfo)?;
        slot::retained_bytes(&params, &ctx.config.postgres.slot).await
    };
    let result = tokio::time::timeout(PROBE, result).await.unwrap_or_else(|_| Err(Error::failed("the server did not answer in time")));
    let mut st = state.lock().unwrap();
    st.slot.at = Some(chrono::Utc::now());
    match result {
        Ok(r) => {
            st.slot.retained_bytes = r;
            st.slot.error = None;
        }
        Err(e) => {
            // Keep the last reading: the server is down or out of WAL senders,
            // and streaming health reports that already.
            tracing::debug!(error = %e, "cannot read the replication slot");
            st.slot.error = Some(e.to_string());
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
