//! The streamer's observability hooks, through the library as the daemon uses
//! them: the last segment archived and when, the lag in bytes and seconds, and
//! the WAL the replication slot retains, checked against PostgreSQL's own view
//! while the store works, while it stalls, and after it recovers.

mod common;
mod wal_support;

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;
use walvault::commands::Ctx;
use walvault::pg::Lsn;
use walvault::pg::conninfo::ConnParams;
use walvault::pg::streamer::{self, SharedState, StreamerState};
use walvault::storage::{
    ByteStream, CompletedPart, CreateOutcome, ListPage, MultipartUpload, ObjectMeta, ObjectStore, PendingUpload, StorageError, Store,
};

use common::env::Env;
use common::pg::PgCluster;
use wal_support::*;

/// The real store, whose writes wait while the gate is closed (a store that
/// stalls, as a saturated or unreachable one does).
struct GatedStore {
    inner: Store,
    open: watch::Receiver<bool>,
}

impl GatedStore {
    async fn pass(&self) {
        let mut open = self.open.clone();
        let _ = open.wait_for(|o| *o).await;
    }
}

#[async_trait]
impl ObjectStore for GatedStore {
    fn location(&self) -> String {
        self.inner.location()
    }
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        self.pass().await;
        self.inner.put(key, data).await
    }
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<CreateOutcome, StorageError> {
        self.pass().await;
        self.inner.put_if_absent(key, data).await
    }
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream, StorageError> {
        self.inner.get(key, range).await
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        self.inner.head(key).await
    }
    async fn list_page(&self, prefix: &str, continuation: Option<String>) -> Result<ListPage, StorageError> {
        self.inner.list_page(prefix, continuation).await
    }
    async fn delete_many(&self, keys: &[String]) -> Result<(), StorageError> {
        self.inner.delete_many(keys).await
    }
    async fn start_multipart(&self, key: &str) -> Result<MultipartUpload, StorageError> {
        self.inner.start_multipart(key).await
    }
    async fn upload_part(&self, upload: &MultipartUpload, number: u32, data: Bytes) -> Result<CompletedPart, StorageError> {
        self.inner.upload_part(upload, number, data).await
    }
    async fn complete_multipart(&self, upload: &MultipartUpload, parts: Vec<CompletedPart>) -> Result<(), StorageError> {
        self.inner.complete_multipart(upload, parts).await
    }
    async fn abort_multipart(&self, upload: &MultipartUpload) -> Result<(), StorageError> {
        self.inner.abort_multipart(upload).await
    }
    async fn list_multipart(&self, prefix: &str) -> Result<Vec<PendingUpload>, StorageError> {
        self.inner.list_multipart(prefix).await
    }
}

fn snapshot(state: &SharedState) -> StreamerState {
    state.lock().unwrap().clone()
}

/// PostgreSQL's view of the slot: (restart_lsn, current WAL position).
fn slot_view(pg: &PgCluster) -> (Lsn, Lsn) {
    let row = pg.psql("select restart_lsn, pg_current_wal_lsn() from pg_replication_slots where slot_name = 'walvault'");
    let (a, b) = row.split_once('|').unwrap_or_else(|| panic!("no slot: {row:?}"));
    (a.parse().unwrap(), b.parse().unwrap())
}

fn complete_a_segment(pg: &PgCluster) -> String {
    pg.psql("create table if not exists filler(x int); insert into filler select generate_series(1, 2000)");
    let name = pg.psql("select pg_walfile_name(pg_current_wal_lsn())");
    pg.psql("select pg_switch_wal()");
    name
}

#[test]
fn streamer_state_tracks_archiving_lag_and_the_slot() {
    let pg = PgCluster::start(small_segments());
    let env = Env::builder(&pg).set("wal.partial_interval", "\"1s\"").set("wal.status_interval", "\"1s\"").build();
    env.run_ok(&["init"]);
    let config = walvault::config::load(Some(&env.config), &Default::default(), &[]).unwrap();
    let ctx = Ctx { config, overrides: Vec::new() };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let (gate, gate_rx) = watch::channel(true);
    let archive = rt.block_on(async {
        let store: Store = Arc::new(GatedStore { inner: ctx.store().await.unwrap(), open: gate_rx });
        Arc::new(ctx.wal_writer(store).await.unwrap())
    });
    let params = ConnParams::parse(&ctx.config.postgres.conninfo).unwrap();
    let settings = walvault::commands::stream::settings(&ctx, None);
    let state: SharedState = Default::default();
    let (stop, stop_rx) = watch::channel(false);
    let task = rt.spawn(streamer::run(params, archive, settings, state.clone(), stop_rx));
    wait_for("the streamer to connect", Duration::from_secs(30), || {
        if snapshot(&state).connected { Ok(()) } else { Err(format!("{:?}", snapshot(&state))) }
    });

    // A completed segment: reported as the last one archived, with when.
    let before = chrono::Utc::now();
    let segment = complete_a_segment(&pg);
    wait_for(&format!("{segment} reported archived"), Duration::from_secs(30), || {
        let s = snapshot(&state);
        if s.last_segment.as_deref() == Some(segment.as_str()) { Ok(()) } else { Err(format!("{:?}", s.last_segment)) }
    });
    let s = snapshot(&state);
    let at = s.last_segment_at.unwrap();
    assert!(at >= before && at <= chrono::Utc::now(), "{at} not between {before} and now");
    assert!(stored_segments(&env).contains(&segment));
    assert!(s.segments_stored >= 1);

    // Idle: nothing waits, and the slot holds WAL from exactly where the
    // repository ends (what we reported as flushed).
    wait_for("an idle, caught-up streamer", Duration::from_secs(30), || {
        let s = snapshot(&state);
        let (restart, current) = slot_view(&pg);
        if s.lag_bytes() == 0 && s.flushed == current && restart == current && s.slot_restart == restart && s.server_end == current {
            Ok(())
        } else {
            Err(format!("state {s:?}, server restart_lsn {restart}, current {current}"))
        }
    });
    let s = snapshot(&state);
    assert_eq!(s.lag_seconds(chrono::Utc::now()), 0.0);
    assert_eq!(s.slot_retained_bytes(), 0);

    // The store stalls while WAL keeps coming: lag in bytes and seconds grows,
    // and the slot retains what the repository lacks.
    gate.send_replace(false);
    let stalled_at = chrono::Utc::now();
    complete_a_segment(&pg);
    pg.psql("insert into filler select generate_series(1, 5000)");
    std::thread::sleep(Duration::from_secs(3));
    wait_for("the server to see the stalled slot", Duration::from_secs(30), || {
        let s = snapshot(&state);
        let (restart, current) = slot_view(&pg);
        if s.slot_restart == restart && s.server_end == current { Ok(()) } else { Err(format!("state {s:?}, server {restart} {current}")) }
    });
    let s = snapshot(&state);
    let now = chrono::Utc::now();
    let (restart, current) = slot_view(&pg);
    assert!(s.lag_bytes() > 1 << 20, "lag {} bytes: {s:?}", s.lag_bytes());
    assert_eq!(s.lag_bytes(), current.0 - s.flushed.0);
    assert_eq!(s.slot_retained_bytes(), current.0 - restart.0);
    assert!(s.slot_retained_bytes() >= s.lag_bytes());
    let lag = s.lag_seconds(now);
    let waited = (now - stalled_at).num_milliseconds() as f64 / 1000.0;
    assert!(lag >= 2.5 && lag <= waited, "lag {lag} s, stalled for {waited} s: {s:?}");
    assert_eq!(s.last_segment.as_deref(), Some(segment.as_str()), "nothing new was archived while stalled");

    // The store recovers: everything lands, lag returns to zero.
    gate.send_replace(true);
    wait_for("the streamer to catch up", Duration::from_secs(60), || {
        let s = snapshot(&state);
        if s.lag_bytes() == 0 && s.lag_seconds(chrono::Utc::now()) == 0.0 { Ok(()) } else { Err(format!("{s:?}")) }
    });
    assert!(snapshot(&state).last_segment.as_deref() > Some(segment.as_str()));
    stop.send_replace(true);
    rt.block_on(task).unwrap().unwrap();
}
