//! The WAL streamer: a physical replication client (what pg_receivewal does)
//! that writes into the repository instead of a directory.
//!
//! - A replication slot holds WAL on the server until it is in the repository:
//!   the flush position we report is what the repository holds durably, never
//!   merely what was received.
//! - Completed segments are sealed and stored (several at once); the flush
//!   position advances in order as they land.
//! - The segment in progress is uploaded as a `.streaming` copy so that WAL
//!   received at time t is in the repository by t + `partial_interval`: losing
//!   the database host loses at most that much. In synchronous mode it is
//!   uploaded as soon as data arrives, and flush is reported right after, so a
//!   synchronous commit waits for the repository.
//! - Timeline switches are followed: the old timeline's last segment is kept as
//!   `.partial` (normalized, see `repo::wal::normalize_partial`), the new
//!   timeline's history file is stored.
//! - On restart it resumes at the first segment the repository lacks (see
//!   `resume_segno`), so a crash with uploads landing out of order leaves no gap.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

use super::conn::{BackendMessage, Connection, Mode};
use super::conninfo::ConnParams;
use super::lsn::{HistoryEntry, Lsn, TimelineId, WalFileKind, WalSegmentName};
use super::{PgError, walheader};
use crate::error::{Error, Result};
use crate::repo::wal::{PushOutcome, WalArchive};

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;
/// Completed segments being stored at once.
const UPLOADS_IN_FLIGHT: usize = 3;
/// Without the slot's position (PostgreSQL 13 and 14), how far back from the
/// newest stored segment a restart looks for segments that never landed.
const TAIL_LOOKBACK: u64 = 64;
/// Arrival marks for the lag in seconds are merged when closer than this.
const ARRIVAL_GRANULARITY: Duration = Duration::from_millis(100);
const MAX_ARRIVALS: usize = 4096;

#[derive(Debug, Clone)]
pub struct StreamerSettings {
    pub slot: String,
    /// Reported to the server unless the conninfo names one (match it in
    /// synchronous_standby_names).
    pub application_name: String,
    pub status_interval: Duration,
    pub partial_interval: Duration,
    pub synchronous: bool,
    /// Stop once this position is stored (tests, one-off catch-up).
    pub stop_at: Option<Lsn>,
}

/// What the streamer is doing, for metrics, health and alerts.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StreamerState {
    pub connected: bool,
    pub timeline: TimelineId,
    /// End of WAL received.
    pub received: Lsn,
    /// End of WAL durably in the repository.
    pub flushed: Lsn,
    /// The server's WAL end, from its last message.
    pub server_end: Lsn,
    /// Where the replication slot holds WAL from: the flush position last
    /// reported to the server (which moves the slot), or the slot's position
    /// read at connection.
    pub slot_restart: Lsn,
    pub last_message: Option<chrono::DateTime<chrono::Utc>>,
    /// When the server wrote the last WAL we have (its send time).
    pub last_server_time: Option<chrono::DateTime<chrono::Utc>>,
    /// The last complete segment stored, and when.
    pub last_segment: Option<String>,
    pub last_segment_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When `flushed` last advanced.
    pub last_flush_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When the oldest WAL received and not yet stored arrived.
    pub oldest_unstored_at: Option<chrono::DateTime<chrono::Utc>>,
    pub last_error: Option<String>,
    /// Set when the server no longer has WAL the repository needs: only a new
    /// base backup makes later history restorable again.
    pub needs_backup: bool,
    pub segments_stored: u64,
}

impl StreamerState {
    /// WAL the server has written that is not in the repository yet.
    pub fn lag_bytes(&self) -> u64 {
        self.server_end.0.saturating_sub(self.flushed.0)
    }

    /// How long the oldest WAL not yet in the repository has waited: since it
    /// arrived, or, for WAL not even received, since the repository last advanced.
    pub fn lag_seconds(&self, now: chrono::DateTime<chrono::Utc>) -> f64 {
        if self.lag_bytes() == 0 {
            return 0.0;
        }
        match self.oldest_unstored_at.or(self.last_flush_at) {
            Some(t) => (now - t).num_milliseconds().max(0) as f64 / 1000.0,
            None => 0.0,
        }
    }

    /// WAL the replication slot keeps on the server for walvault.
    pub fn slot_retained_bytes(&self) -> u64 {
        if self.slot_restart.is_valid() { self.server_end.0.saturating_sub(self.slot_restart.0) } else { 0 }
    }
}

pub type SharedState = Arc<Mutex<StreamerState>>;

fn now_pg_us() -> i64 {
    chrono::Utc::now().timestamp_micros() - PG_EPOCH_OFFSET_US
}

fn pg_time(us: i64) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp_micros(us + PG_EPOCH_OFFSET_US)
}

/// Streams until `shutdown` turns true (or `stop_at` is stored). Reconnects with
/// backoff on errors; returns only on shutdown or a fatal error.
pub async fn run(
    mut params: ConnParams,
    archive: Arc<WalArchive>,
    settings: StreamerSettings,
    state: SharedState,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
    if params.application_name.is_none() && !settings.application_name.is_empty() {
        params.application_name = Some(settings.application_name.clone());
    }
    let mut backoff = Duration::from_secs(1);
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let mut session = Session::new(&archive, &settings, &state);
        let result = tokio::select! {
            r = session.stream(&params) => r,
            _ = crate::util::until_true(&mut shutdown) => {
                session.drain().await;
                return Ok(());
            }
        };
        session.drain().await;
        state.lock().unwrap().connected = false;
        match result {
            Ok(Done::StopReached) => return Ok(()),
            Ok(Done::ServerStopped) => {
                tracing::info!("the server ended streaming (shutdown); reconnecting");
                backoff = Duration::from_secs(1);
            }
            Err(e) if is_fatal(&e) => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, retry_in_s = backoff.as_secs(), "WAL streaming interrupted");
                state.lock().unwrap().last_error = Some(e.to_string());
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = crate::util::until_true(&mut shutdown) => return Ok(()),
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Errors that retrying will not fix.
fn is_fatal(e: &Error) -> bool {
    matches!(e.root(), Error::Repo(crate::repo::RepoError::OtherCluster { .. } | crate::repo::RepoError::Conflict(_)))
        || matches!(e.root(), Error::Failed { code, .. } if *code == crate::error::exit::USAGE)
}

enum Done {
    StopReached,
    ServerStopped,
}

type UploadResult = std::result::Result<PushOutcome, crate::repo::RepoError>;
type PartialResult = std::result::Result<(), crate::repo::RepoError>;
type UploadTask = tokio::task::JoinHandle<UploadResult>;
type PartialTask = tokio::task::JoinHandle<PartialResult>;

struct Upload {
    end: Lsn,
    name: String,
    task: UploadTask,
}

/// The upload of the segment in progress (`.streaming` copy).
struct PartialUpload {
    segment: WalSegmentName,
    end: Lsn,
    started: Instant,
    task: PartialTask,
}

/// One connection's worth of streaming.
struct Session<'a> {
    archive: &'a Arc<WalArchive>,
    settings: &'a StreamerSettings,
    state: &'a SharedState,
    seg_size: u64,
    tli: TimelineId,
    /// The segment being received.
    current: Option<(WalSegmentName, BytesMut)>,
    uploads: VecDeque<Upload>,
    /// Plain blake3 of the last segment handed to an upload, for the chain.
    prev_plain: Option<(WalSegmentName, String)>,
    partial: Option<PartialUpload>,
    /// End of the WAL the last completed `.streaming` upload holds.
    partial_uploaded: Lsn,
    /// When the oldest received byte that no started upload covers arrived.
    pending_since: Option<Instant>,
    /// How long the last `.streaming` upload took.
    partial_took: Duration,
    flushed: Lsn,
    received: Lsn,
    /// (end of WAL, when it arrived), for the lag in seconds.
    arrivals: VecDeque<(Lsn, chrono::DateTime<chrono::Utc>)>,
}

impl<'a> Session<'a> {
    fn new(archive: &'a Arc<WalArchive>, settings: &'a StreamerSettings, state: &'a SharedState) -> Self {
        Session {
            archive,
            settings,
            state,
            seg_size: archive.seg_size(),
            tli: 0,
            current: None,
            uploads: VecDeque::new(),
            prev_plain: None,
            partial: None,
            partial_uploaded: Lsn(0),
            pending_since: None,
            partial_took: Duration::ZERO,
            flushed: Lsn(0),
            received: Lsn(0),
            arrivals: VecDeque::new(),
        }
    }

    async fn stream(&mut self, params: &ConnParams) -> Result<Done> {
        let mut conn = Connection::connect(params, Mode::Replication).await?;
        let sys = conn.identify_system().await?;
        self.archive.descriptor().descriptor.check_cluster(&self.archive.store().location(), &sys.system_identifier.to_string())?;
        ensure_slot(&mut conn, &self.settings.slot).await?;
        let resume = self.start_position(&mut conn, sys.timeline, sys.xlogpos).await?;
        let (mut start, tli) = (resume.start, resume.tli);
        self.tli = tli;
        self.flushed = start;
        self.received = start;
        self.partial_uploaded = start;
        {
            let mut st = self.state.lock().unwrap();
            st.connected = true;
            st.timeline = tli;
            st.flushed = start;
            st.received = start;
            st.oldest_unstored_at = None;
            if let Some(r) = resume.slot_restart {
                st.slot_restart = r;
            }
            st.last_error = None;
        }
        let mut fallback = resume.fallback;
        loop {
            tracing::info!(start = %start, timeline = self.tli, slot = %self.settings.slot, "streaming WAL");
            let cmd = format!("START_REPLICATION SLOT \"{}\" PHYSICAL {} TIMELINE {}", self.settings.slot, start, self.tli);
            conn.send_query(&cmd).await?;
            match conn.next_message().await? {
                BackendMessage::CopyBothResponse => {}
                BackendMessage::Error(e) => {
                    let removed = is_wal_removed(&e);
                    match fallback.take() {
                        // The repository has a gap the server can no longer fill:
                        // say so, and carry on after the newest stored segment.
                        Some((next, next_tli)) if removed => {
                            self.gap_is_permanent(&e, start);
                            wait_ready(&mut conn).await?;
                            start = next;
                            self.tli = next_tli;
                            self.reset_position(start);
                            self.flushed = start;
                            continue;
                        }
                        _ => return Err(self.start_error(e, start)),
                    }
                }
                other => return Err(PgError::Protocol(format!("{other:?} after START_REPLICATION")).into()),
            }
            fallback = None;
            match self.copy_loop(&mut conn).await? {
                CopyEnd::Stop => return Ok(Done::StopReached),
                CopyEnd::ServerStopped => return Ok(Done::ServerStopped),
                CopyEnd::TimelineEnded => {
                    let (next_tli, next_start) = read_timeline_end(&mut conn).await?;
                    if next_tli <= self.tli {
                        return Err(PgError::Protocol(format!("server switched to timeline {next_tli} from {}", self.tli)).into());
                    }
                    self.finish_timeline(next_start).await?;
                    self.store_history(&mut conn, next_tli).await?;
                    tracing::info!(from = self.tli, to = next_tli, at = %next_start, "following the timeline switch");
                    self.tli = next_tli;
                    self.state.lock().unwrap().timeline = next_tli;
                    start = next_start.segment_start(self.seg_size);
                    self.reset_position(start);
                }
            }
        }
    }

    /// Restarting at `start` (a new timeline, or past a gap): nothing of the
    /// segment in progress carries over.
    fn reset_position(&mut self, start: Lsn) {
        self.received = start;
        self.partial_uploaded = start;
        self.pending_since = None;
        self.current = None;
        self.arrivals.clear();
        let mut st = self.state.lock().unwrap();
        st.received = start;
        st.timeline = self.tli;
    }

    fn gap_is_permanent(&self, e: &PgError, start: Lsn) {
        let msg = format!("the repository lacks WAL from {start} that the server has already removed: {e}");
        tracing::error!(
            "{msg}; streaming continues after the newest stored segment, and a new base backup is needed to restore past the gap"
        );
        let mut st = self.state.lock().unwrap();
        st.needs_backup = true;
        st.last_error = Some(msg);
    }

    /// Maps an error answering START_REPLICATION; removed WAL means a new backup is needed.
    fn start_error(&self, e: PgError, start: Lsn) -> Error {
        if is_wal_removed(&e) {
            let mut st = self.state.lock().unwrap();
            st.needs_backup = true;
            st.last_error = Some(e.to_string());
            tracing::error!(start = %start, "the server no longer has the WAL the repository needs: the repository has a gap, and a new base backup is needed");
        }
        e.into()
    }

    /// Where to start: the first segment the repository lacks on the server's
    /// timeline history (see `resume_segno`); with an empty repository, where
    /// the slot holds WAL, else the server's current position. Also stores the
    /// history files of the server's timelines and removes stale `.streaming` copies.
    async fn start_position(&mut self, conn: &mut Connection, server_tli: TimelineId, xlogpos: Lsn) -> Result<Resume> {
        let history = if server_tli > 1 { self.store_history(conn, server_tli).await? } else { Vec::new() };
        for e in history.iter().filter(|e| e.tli > 1) {
            // The ancestors' own history files, for recovery along the path.
            if let Err(err) = self.store_history(conn, e.tli).await {
                tracing::warn!(timeline = e.tli, error = %err, "cannot store the history file of an ancestor timeline");
            }
        }
        let path = timeline_path(&history, server_tli);
        let slot_restart = self.read_slot(conn).await?;

        let wal = self.archive.list().await?;
        let complete: BTreeSet<(TimelineId, u64)> = wal
            .iter()
            .filter(|e| e.kind == WalFileKind::Segment && !e.streaming)
            .filter_map(|e| WalSegmentName::parse(&e.file, self.seg_size))
            .map(|s| (s.tli, s.segno))
            .collect();
        self.remove_stale_streaming_copies(&wal).await;
        let on_path: BTreeSet<u64> =
            complete.iter().filter(|(t, s)| tli_of_segment(&path, *s, self.seg_size) == *t).map(|(_, s)| *s).collect();
        // A segment stored only as a streaming copy: its WAL was reported
        // flushed (so the slot may have moved past it) but the complete
        // segment never landed (the connection or the store failed between
        // the two). Stream it again while the server still has it.
        let unfinished = wal
            .iter()
            .filter(|e| e.kind == WalFileKind::Segment && e.streaming)
            .filter_map(|e| WalSegmentName::parse(&e.file, self.seg_size))
            .filter(|s| !complete.contains(&(s.tli, s.segno)) && tli_of_segment(&path, s.segno, self.seg_size) == s.tli)
            .map(|s| s.segno)
            .min();

        let slot_segno = slot_restart.filter(|l| l.is_valid()).map(|l| l.segno(self.seg_size));
        let from_slot = slot_segno.map(|r| unfinished.map_or(r, |u| r.min(u)));
        let Some(segno) = resume_segno(&on_path, from_slot) else {
            // Nothing stored yet: from the slot, or from where the server is.
            let base = match slot_restart {
                Some(r) if r.is_valid() && r < xlogpos => r,
                _ => xlogpos,
            }
            .segment_start(self.seg_size);
            if let Some(u) = unfinished.map(|u| Lsn(u * self.seg_size)).filter(|u| *u < base) {
                tracing::warn!(segment = %WalSegmentName::of_lsn(tli_of_lsn(&path, u), u, self.seg_size), "a segment was stored only as a streaming copy; streaming it again");
                return Ok(Resume { start: u, tli: tli_of_lsn(&path, u), slot_restart, fallback: Some((base, tli_of_lsn(&path, base))) });
            }
            return Ok(Resume { start: base, tli: tli_of_lsn(&path, base), slot_restart, fallback: None });
        };
        let newest = *on_path.last().expect("resume_segno found stored segments");
        if slot_segno.is_some_and(|r| r > newest + 1) {
            let msg = format!(
                "the replication slot starts at {} but the repository's WAL ends at segment {}: the WAL between was never stored and the server no longer has it",
                slot_restart.unwrap_or_default(),
                WalSegmentName::new(tli_of_segment(&path, newest, self.seg_size), newest, self.seg_size)
            );
            tracing::error!("{msg}; a new base backup is needed to restore past the gap");
            let mut st = self.state.lock().unwrap();
            st.needs_backup = true;
            st.last_error = Some(msg);
        }
        let start = Lsn(segno * self.seg_size);
        let tli = tli_of_lsn(&path, start);
        if let Some(prev) = segno.checked_sub(1) {
            let prev = WalSegmentName::new(tli_of_segment(&path, prev, self.seg_size), prev, self.seg_size);
            self.prev_plain = self.archive.read_header(&prev.to_string()).await?.map(|h| (prev, h.record.plain_blake3));
        }
        if segno <= newest {
            tracing::warn!(
                segment = %WalSegmentName::new(tli, segno, self.seg_size),
                newest = %WalSegmentName::new(tli_of_segment(&path, newest, self.seg_size), newest, self.seg_size),
                "the repository lacks a segment before its newest one (an upload that never landed); streaming again from there"
            );
        }
        let after_newest = Lsn((newest + 1) * self.seg_size);
        let fallback = (segno <= newest || unfinished == Some(segno)).then(|| (after_newest, tli_of_lsn(&path, after_newest)));
        Ok(Resume { start, tli, slot_restart, fallback })
    }

    /// The slot's restart position (PostgreSQL 15 and later).
    async fn read_slot(&mut self, conn: &mut Connection) -> Result<Option<Lsn>> {
        if conn.server_version_num() < 150000 {
            return Ok(None);
        }
        let sets = conn.simple_query(&format!("READ_REPLICATION_SLOT \"{}\"", self.settings.slot)).await?;
        Ok(sets
            .first()
            .and_then(|s| s.rows.first())
            .and_then(|r| r.get(1).cloned().flatten())
            .and_then(|l| l.parse::<Lsn>().ok())
            .filter(|l| l.is_valid()))
    }

    /// `.streaming` copies whose segment was completed (or ended as `.partial`)
    /// were left by a streamer stopped between storing the one and deleting the other.
    async fn remove_stale_streaming_copies(&self, wal: &[crate::repo::wal::WalEntry]) {
        let stored: BTreeSet<&str> = wal.iter().filter(|e| !e.streaming).map(|e| e.file.trim_end_matches(".partial")).collect();
        for e in wal.iter().filter(|e| e.streaming && stored.contains(e.file.as_str())) {
            match self.archive.delete_streaming(&e.file).await {
                Ok(()) => tracing::info!(segment = %e.file, "removed the stale streaming copy of a stored segment"),
                Err(err) => tracing::warn!(segment = %e.file, error = %err, "cannot remove a stale streaming copy"),
            }
        }
    }

    /// Fetches and stores a timeline history file; returns its switch points.
    async fn store_history(&mut self, conn: &mut Connection, tli: TimelineId) -> Result<Vec<HistoryEntry>> {
        let sets = conn.simple_query(&format!("TIMELINE_HISTORY {tli}")).await?;
        let row = sets.first().and_then(|s| s.rows.first()).ok_or_else(|| PgError::Protocol("TIMELINE_HISTORY returned nothing".into()))?;
        let name = row.first().cloned().flatten().ok_or_else(|| PgError::Protocol("TIMELINE_HISTORY without a file name".into()))?;
        let content = row.get(1).cloned().flatten().unwrap_or_default();
        let entries = super::lsn::parse_history(&content).map_err(|e| Error::failed(format!("the server's {name} is not valid: {e}")))?;
        match self.archive.push(&name, Bytes::from(content.into_bytes()), "stream").await {
            Ok(PushOutcome::Stored) => tracing::info!(file = %name, "stored timeline history"),
            Ok(PushOutcome::AlreadyIdentical) => tracing::debug!(file = %name, "timeline history already stored"),
            Err(crate::repo::RepoError::Conflict(m)) => tracing::warn!(file = %name, "{m}"),
            Err(e) => return Err(e.into()),
        }
        Ok(entries)
    }

    async fn copy_loop(&mut self, conn: &mut Connection) -> Result<CopyEnd> {
        let mut status_tick = tokio::time::interval(self.settings.status_interval);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_reported = Lsn(0);
        loop {
            self.reap().await?;
            self.maybe_start_partial_upload();
            if self.flushed != last_reported {
                if self.settings.synchronous {
                    last_reported = self.flushed;
                    self.send_status(conn, false).await?;
                }
                if let Some(stop) = self.settings.stop_at
                    && self.flushed >= stop
                {
                    self.send_status(conn, false).await?;
                    return Ok(CopyEnd::Stop);
                }
            }
            let deadline = self.partial_deadline();
            // Completions wake the loop: the flush position (and in
            // synchronous mode, a waiting commit) advances at once.
            let (partial, uploads) = (&mut self.partial, &mut self.uploads);
            let partial_done = async move {
                match partial.as_mut() {
                    Some(p) => (&mut p.task).await,
                    None => std::future::pending().await,
                }
            };
            let upload_done = async move {
                match uploads.front_mut() {
                    Some(u) => (&mut u.task).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                msg = conn.next_message() => {
                    match msg? {
                        BackendMessage::CopyData(data) => {
                            if let Some(end) = self.on_copy_data(conn, data).await? {
                                return Ok(end);
                            }
                        }
                        BackendMessage::CopyDone => {
                            conn.send_copy_done().await?;
                            return Ok(CopyEnd::TimelineEnded);
                        }
                        BackendMessage::CommandComplete(_) => {
                            // The server is shutting down: COPY ends without CopyDone.
                            self.flush_all().await?;
                            return Ok(CopyEnd::ServerStopped);
                        }
                        BackendMessage::Error(e) => return Err(e.into()),
                        other => return Err(PgError::Protocol(format!("{other:?} while streaming")).into()),
                    }
                }
                r = partial_done => {
                    let p = self.partial.take().expect("a partial upload was running");
                    self.partial_finished(&p, r);
                }
                r = upload_done => {
                    let up = self.uploads.pop_front().expect("an upload was running");
                    self.upload_finished(&up, r)?;
                }
                _ = status_tick.tick() => {
                    last_reported = self.flushed;
                    self.send_status(conn, false).await?;
                }
                _ = sleep_until(deadline) => {}
            }
        }
    }

    /// When the segment in progress must next be uploaded: early enough that
    /// the upload completes within `partial_interval` of the oldest WAL it adds.
    fn partial_deadline(&self) -> Option<Instant> {
        if self.settings.synchronous || self.partial.is_some() {
            return None;
        }
        let since = self.pending_since?;
        let interval = self.settings.partial_interval;
        let margin = (self.partial_took * 2 + Duration::from_millis(200)).min(interval / 2);
        Some(since + interval - margin)
    }

    fn maybe_start_partial_upload(&mut self) {
        if self.partial.is_some() || self.pending_since.is_none() {
            return;
        }
        if self.settings.synchronous || self.partial_deadline().is_some_and(|d| d <= Instant::now()) {
            self.start_partial_upload();
        }
    }

    /// Handles XLogData and keepalives.
    async fn on_copy_data(&mut self, conn: &mut Connection, data: Bytes) -> Result<Option<CopyEnd>> {
        match ReplicationMessage::decode(data)? {
            ReplicationMessage::XLogData { start, server_end, sent_at, wal } => {
                self.write_wal(start, wal).await?;
                let now = chrono::Utc::now();
                self.note_arrival(now);
                let oldest = self.oldest_unstored();
                let mut st = self.state.lock().unwrap();
                st.received = self.received;
                st.server_end = server_end.max(self.received);
                st.last_message = Some(now);
                st.last_server_time = pg_time(sent_at);
                st.oldest_unstored_at = oldest;
            }
            ReplicationMessage::Keepalive { server_end, reply_requested: reply, .. } => {
                {
                    let mut st = self.state.lock().unwrap();
                    st.server_end = server_end.max(self.received);
                    st.last_message = Some(chrono::Utc::now());
                }
                if reply {
                    // The server asks when it has been silent for a while or is
                    // shutting down and waits for our flush to reach what it
                    // sent: store what we have now rather than at the deadline.
                    if server_end <= self.received && self.partial.is_none() && self.pending_since.is_some() {
                        self.start_partial_upload();
                    }
                    self.send_status(conn, false).await?;
                }
            }
            ReplicationMessage::Unknown(tag) => tracing::warn!(tag = %(tag as char), "ignoring an unknown replication message"),
        }
        Ok(None)
    }

    fn note_arrival(&mut self, now: chrono::DateTime<chrono::Utc>) {
        let end = self.received;
        match self.arrivals.back_mut() {
            Some((lsn, t)) if (now - *t).to_std().unwrap_or_default() < ARRIVAL_GRANULARITY => *lsn = end,
            _ => self.arrivals.push_back((end, now)),
        }
        if self.arrivals.len() > MAX_ARRIVALS {
            // Coarser but bounded: drop every other mark.
            let kept: VecDeque<_> = self.arrivals.iter().copied().enumerate().filter(|(i, _)| i % 2 == 1).map(|(_, a)| a).collect();
            self.arrivals = kept;
        }
    }

    /// When the oldest received WAL not in the repository arrived.
    fn oldest_unstored(&mut self) -> Option<chrono::DateTime<chrono::Utc>> {
        while self.arrivals.front().is_some_and(|(end, _)| *end <= self.flushed) {
            self.arrivals.pop_front();
        }
        self.arrivals.front().map(|(_, t)| *t)
    }

    /// Appends WAL at `start`, splitting at segment boundaries.
    async fn write_wal(&mut self, mut start: Lsn, mut data: Bytes) -> Result<()> {
        if start != self.received {
            return Err(PgError::Protocol(format!("WAL arrived at {start}, expected {}", self.received)).into());
        }
        while !data.is_empty() {
            let name = WalSegmentName::of_lsn(self.tli, start, self.seg_size);
            let offset = start.segment_offset(self.seg_size) as usize;
            let (seg, buf) = self.current.get_or_insert_with(|| (name, BytesMut::with_capacity(self.seg_size as usize)));
            if *seg != name || buf.len() != offset {
                return Err(PgError::Protocol(format!("WAL at {start} does not continue segment {seg}")).into());
            }
            let room = self.seg_size as usize - offset;
            let n = room.min(data.len());
            buf.put_slice(&data[..n]);
            data = data.slice(n..);
            start = Lsn(start.0 + n as u64);
            self.received = start;
            if n == room {
                let (seg, buf) = self.current.take().expect("current segment");
                self.pending_since = None;
                self.complete_segment(seg, buf.freeze()).await?;
            } else if self.pending_since.is_none() {
                self.pending_since = Some(Instant::now());
            }
        }
        Ok(())
    }

    async fn complete_segment(&mut self, seg: WalSegmentName, data: Bytes) -> Result<()> {
        let expected = self.archive.expected_wal();
        walheader::check_segment(&data, &seg, &expected, false).map_err(|e| Error::failed(format!("streamed {e}")))?;
        while self.uploads.len() >= UPLOADS_IN_FLIGHT {
            self.wait_oldest_upload().await?;
        }
        let plain = blake3::hash(&data).to_hex().to_string();
        let prev = match &self.prev_plain {
            Some((p, hash)) if p.tli == seg.tli && p.segno + 1 == seg.segno => Some(hash.clone()),
            Some((p, _)) if p.segno + 1 == seg.segno => self.archive.chain_link(&seg.to_string()).await.ok().flatten(),
            _ => None,
        };
        self.prev_plain = Some((seg, plain));
        // The copy of this segment in progress must land before it is deleted.
        let partial = self.partial.take_if(|p| p.segment == seg).map(|p| p.task);
        let archive = self.archive.clone();
        let name = seg.to_string();
        let task_name = name.clone();
        let task = tokio::spawn(async move {
            let sealed = archive.seal(&task_name, data).await?;
            let outcome = archive.store_sealed(sealed, prev, "stream").await?;
            crate::crashpoint::crash_point("stream.segment_stored");
            if let Some(p) = partial {
                let _ = p.await;
            }
            archive.delete_streaming(&task_name).await?;
            Ok(outcome)
        });
        self.uploads.push_back(Upload { end: seg.end_lsn(), name, task });
        Ok(())
    }

    async fn wait_oldest_upload(&mut self) -> Result<()> {
        let Some(mut up) = self.uploads.pop_front() else { return Ok(()) };
        let r = (&mut up.task).await;
        self.upload_finished(&up, r)
    }

    fn upload_finished(&mut self, up: &Upload, r: std::result::Result<UploadResult, tokio::task::JoinError>) -> Result<()> {
        let outcome = r.map_err(|e| Error::failed(format!("segment upload task failed: {e}")))??;
        crate::crashpoint::crash_point("stream.before_status");
        if outcome == PushOutcome::AlreadyIdentical {
            tracing::debug!(segment = %up.name, "segment was already in the repository");
        }
        let mut flushed = self.flushed.max(up.end);
        if self.uploads.is_empty() {
            // A copy of the segment after it may have landed first.
            flushed = flushed.max(self.partial_uploaded);
        }
        self.advance_flush(flushed);
        let now = chrono::Utc::now();
        let mut st = self.state.lock().unwrap();
        st.last_segment = Some(up.name.clone());
        st.last_segment_at = Some(now);
        st.segments_stored += 1;
        tracing::debug!(segment = %up.name, "segment stored");
        Ok(())
    }

    fn advance_flush(&mut self, to: Lsn) {
        if to <= self.flushed {
            return;
        }
        self.flushed = to;
        let oldest = self.oldest_unstored();
        let mut st = self.state.lock().unwrap();
        st.flushed = to;
        st.last_flush_at = Some(chrono::Utc::now());
        st.oldest_unstored_at = oldest;
    }

    /// Collects finished uploads without waiting.
    async fn reap(&mut self) -> Result<()> {
        while self.uploads.front().is_some_and(|u| u.task.is_finished()) {
            self.wait_oldest_upload().await?;
        }
        if self.partial.as_ref().is_some_and(|p| p.task.is_finished()) {
            let mut p = self.partial.take().expect("checked");
            let r = (&mut p.task).await;
            self.partial_finished(&p, r);
        }
        Ok(())
    }

    fn partial_finished(&mut self, p: &PartialUpload, r: std::result::Result<PartialResult, tokio::task::JoinError>) {
        self.partial_took = p.started.elapsed();
        match r {
            Ok(Ok(())) => {
                self.partial_uploaded = self.partial_uploaded.max(p.end);
                if self.uploads.is_empty() {
                    self.advance_flush(p.end);
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "uploading the segment in progress failed; will retry");
                self.pending_since.get_or_insert_with(Instant::now);
            }
            Err(e) => {
                tracing::warn!(error = %e, "partial upload task failed");
                self.pending_since.get_or_insert_with(Instant::now);
            }
        }
    }

    /// Uploads the segment in progress if it grew since the last upload.
    fn start_partial_upload(&mut self) {
        let Some((seg, buf)) = &self.current else { return };
        let end = Lsn(seg.start_lsn().0 + buf.len() as u64);
        if end <= self.partial_uploaded || buf.is_empty() || self.partial.is_some() {
            return;
        }
        self.pending_since = None;
        // Whole pages, as every WAL file holds: zeros after the last byte received.
        let block = self.archive.expected_wal().block_size.max(1) as usize;
        let mut data = BytesMut::with_capacity(buf.len().next_multiple_of(block));
        data.extend_from_slice(buf);
        data.resize(buf.len().next_multiple_of(block), 0);
        let data = data.freeze();
        let (archive, name, valid) = (self.archive.clone(), seg.to_string(), buf.len() as u64);
        let task = tokio::spawn(async move { archive.put_streaming(&name, data, valid).await });
        self.partial = Some(PartialUpload { segment: *seg, end, started: Instant::now(), task });
    }

    /// The old timeline ended at `switch`: keep its last segment as `.partial`.
    async fn finish_timeline(&mut self, switch: Lsn) -> Result<()> {
        self.flush_uploads().await?;
        if let Some((seg, buf)) = self.current.take()
            && !buf.is_empty()
        {
            let mut full = buf;
            full.resize(self.seg_size as usize, 0);
            crate::repo::wal::normalize_partial(&mut full, &seg, switch);
            let name = format!("{seg}.partial");
            match self.archive.push(&name, full.freeze(), "stream").await {
                Ok(_) => tracing::info!(file = %name, switch = %switch, "stored the end of the old timeline"),
                Err(crate::repo::RepoError::Conflict(m)) => tracing::warn!("{m}"),
                Err(e) => return Err(e.into()),
            }
            // The copy in progress is superseded by the `.partial`.
            if let Err(e) = self.archive.delete_streaming(&seg.to_string()).await {
                tracing::warn!(segment = %seg, error = %e, "cannot remove the streaming copy of the old timeline's last segment");
            }
        }
        self.pending_since = None;
        Ok(())
    }

    async fn flush_uploads(&mut self) -> Result<()> {
        while !self.uploads.is_empty() {
            self.wait_oldest_upload().await?;
        }
        if let Some(mut p) = self.partial.take() {
            let r = (&mut p.task).await;
            self.partial_finished(&p, r);
        }
        Ok(())
    }

    /// Before a disconnect: everything received is stored (a last partial upload).
    async fn flush_all(&mut self) -> Result<()> {
        self.flush_uploads().await?;
        self.start_partial_upload();
        self.flush_uploads().await
    }

    /// Finishes what is in flight when the session ends for any reason.
    async fn drain(&mut self) {
        if let Err(e) = self.flush_all().await {
            tracing::warn!(error = %e, "could not store all received WAL before stopping; it will be streamed again");
        }
    }

    /// A standby status update: write and flush positions (apply is not tracked).
    async fn send_status(&mut self, conn: &mut Connection, reply: bool) -> Result<()> {
        let (write, flush) = (self.received, self.flushed);
        let mut msg = Vec::with_capacity(34);
        msg.push(b'r');
        msg.extend_from_slice(&write.0.to_be_bytes());
        msg.extend_from_slice(&flush.0.to_be_bytes());
        msg.extend_from_slice(&0u64.to_be_bytes());
        msg.extend_from_slice(&now_pg_us().to_be_bytes());
        msg.push(reply as u8);
        conn.send_copy_data(&msg).await?;
        conn.flush().await?;
        if flush.is_valid() {
            // The server moves the slot to a valid flush position.
            let mut st = self.state.lock().unwrap();
            st.slot_restart = st.slot_restart.max(flush);
        }
        Ok(())
    }
}

/// Where a session starts streaming.
struct Resume {
    start: Lsn,
    tli: TimelineId,
    slot_restart: Option<Lsn>,
    /// When `start` is a gap before the newest stored segment: where to go on
    /// if the server no longer has that WAL.
    fallback: Option<(Lsn, TimelineId)>,
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

fn is_wal_removed(e: &PgError) -> bool {
    e.to_string().contains("has already been removed") || e.code() == Some("58P01")
}

/// After an ErrorResponse: reads up to ReadyForQuery.
async fn wait_ready(conn: &mut Connection) -> Result<()> {
    loop {
        if let BackendMessage::ReadyForQuery = conn.next_message().await? {
            return Ok(());
        }
    }
}

/// The timelines of a server's history, oldest first: (timeline, LSN where it
/// begins), ending with the server's own timeline.
pub fn timeline_path(history: &[HistoryEntry], server_tli: TimelineId) -> Vec<(TimelineId, Lsn)> {
    let mut out = Vec::new();
    let mut begin = Lsn(0);
    for e in history {
        out.push((e.tli, begin));
        begin = e.switch_lsn;
    }
    out.push((server_tli, begin));
    out
}

/// The timeline whose WAL holds `lsn` on the path.
pub fn tli_of_lsn(path: &[(TimelineId, Lsn)], lsn: Lsn) -> TimelineId {
    path.iter().rev().find(|(_, begin)| *begin <= lsn).map(|(t, _)| *t).unwrap_or(path[0].0)
}

/// The timeline whose file of segment `segno` recovery reads on the path (a
/// segment where a timeline begins is read from the new timeline's file).
pub fn tli_of_segment(path: &[(TimelineId, Lsn)], segno: u64, seg_size: u64) -> TimelineId {
    path.iter().rev().find(|(_, begin)| begin.segno(seg_size) <= segno).map(|(t, _)| *t).unwrap_or(path[0].0)
}

/// The segment to resume streaming at, given the complete segments the
/// repository holds on the server's timeline path, and the segment of the
/// slot's restart position when known. `None` when nothing is stored.
///
/// Completed segments are uploaded several at once, so a streamer killed
/// mid-way can leave a later segment stored and an earlier one missing: resume
/// at the first missing one, never merely after the newest. With the slot's
/// position, every gap from there is found (the server still has that WAL);
/// without it, the last `TAIL_LOOKBACK` segments are searched.
pub fn resume_segno(on_path: &BTreeSet<u64>, slot_segno: Option<u64>) -> Option<u64> {
    let newest = *on_path.last()?;
    let lowest = *on_path.first()?;
    let from = match slot_segno {
        Some(r) if r > newest + 1 => return Some(r),
        Some(r) => r.max(lowest),
        None => on_path.range(newest.saturating_sub(TAIL_LOOKBACK)..).next().copied().unwrap_or(newest),
    };
    (from..=newest + 1).find(|s| !on_path.contains(s))
}

enum CopyEnd {
    Stop,
    ServerStopped,
    TimelineEnded,
}

/// A CopyData message of START_REPLICATION from the server.
#[derive(Debug, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// WAL from `start`; `server_end` is the server's current end of WAL.
    XLogData {
        start: Lsn,
        server_end: Lsn,
        sent_at: i64,
        wal: Bytes,
    },
    Keepalive {
        server_end: Lsn,
        sent_at: i64,
        reply_requested: bool,
    },
    /// A type this version does not know (ignored, logged).
    Unknown(u8),
}

impl ReplicationMessage {
    /// Decodes one message; a known type that is too short is a protocol
    /// error, not something to guess at.
    pub fn decode(data: Bytes) -> std::result::Result<ReplicationMessage, PgError> {
        let be64 = |at: usize| u64::from_be_bytes(data[at..at + 8].try_into().expect("8 bytes"));
        let short =
            |what: &str, need: usize| PgError::Protocol(format!("{what} message of {} bytes (at least {need} expected)", data.len()));
        match data.first() {
            Some(b'w') if data.len() < 25 => Err(short("XLogData", 25)),
            Some(b'w') => Ok(ReplicationMessage::XLogData {
                start: Lsn(be64(1)),
                server_end: Lsn(be64(9)),
                sent_at: be64(17) as i64,
                wal: data.slice(25..),
            }),
            Some(b'k') if data.len() < 18 => Err(short("keepalive", 18)),
            Some(b'k') => {
                Ok(ReplicationMessage::Keepalive { server_end: Lsn(be64(1)), sent_at: be64(9) as i64, reply_requested: data[17] != 0 })
            }
            Some(&t) => Ok(ReplicationMessage::Unknown(t)),
            None => Err(PgError::Protocol("empty CopyData during streaming".into())),
        }
    }
}

/// After CopyDone at the end of a timeline: the next timeline and where it starts.
async fn read_timeline_end(conn: &mut Connection) -> Result<(TimelineId, Lsn)> {
    let mut next = None;
    loop {
        match conn.next_message().await? {
            BackendMessage::DataRow(row) => {
                let get = |i: usize| row.get(i).cloned().flatten().map(|b| String::from_utf8_lossy(&b).into_owned());
                let tli = get(0).and_then(|s| s.parse().ok());
                let lsn = get(1).and_then(|s| s.parse().ok());
                if let (Some(t), Some(l)) = (tli, lsn) {
                    next = Some((t, l));
                }
            }
            BackendMessage::ReadyForQuery => break,
            BackendMessage::Error(e) => return Err(e.into()),
            BackendMessage::CopyData(_) => {}
            _ => {}
        }
    }
    next.ok_or_else(|| PgError::Protocol("timeline ended without the next timeline".into()).into())
}

/// Creates the physical slot if it does not exist.
pub async fn ensure_slot(conn: &mut Connection, slot: &str) -> Result<()> {
    let cmd = if conn.server_version_num() >= 150000 {
        format!("CREATE_REPLICATION_SLOT \"{slot}\" PHYSICAL (RESERVE_WAL)")
    } else {
        format!("CREATE_REPLICATION_SLOT \"{slot}\" PHYSICAL RESERVE_WAL")
    };
    match conn.simple_query(&cmd).await {
        Ok(_) => {
            tracing::info!(slot, "created replication slot");
            Ok(())
        }
        Err(e) if e.code() == Some("42710") => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &[u64]) -> BTreeSet<u64> {
        s.iter().copied().collect()
    }

    #[test]
    fn resumes_at_the_first_missing_segment() {
        assert_eq!(resume_segno(&set(&[]), None), None);
        assert_eq!(resume_segno(&set(&[3, 4, 5]), None), Some(6));
        // Uploads landed out of order before a crash: 6 never landed.
        assert_eq!(resume_segno(&set(&[3, 4, 5, 7, 8]), None), Some(6));
        // An old gap beyond the lookback is not searched without the slot...
        let mut old: Vec<u64> = (1..10).collect();
        old.extend(20..200);
        assert_eq!(resume_segno(&set(&old), None), Some(200));
        // ...but is with it, as long as the slot still holds that WAL.
        assert_eq!(resume_segno(&set(&old), Some(5)), Some(10));
        assert_eq!(resume_segno(&set(&old), Some(30)), Some(200));
        // Segments expired below the repository's first are not streamed again.
        assert_eq!(resume_segno(&set(&[10, 11]), Some(2)), Some(12));
        // The slot is past the repository's end: the gap cannot be filled.
        assert_eq!(resume_segno(&set(&[3, 4]), Some(9)), Some(9));
    }

    #[test]
    fn timelines_on_the_path() {
        let seg = 16 << 20;
        let history = vec![HistoryEntry { tli: 1, switch_lsn: Lsn(5 * seg + 0x100) }, HistoryEntry { tli: 2, switch_lsn: Lsn(9 * seg) }];
        let path = timeline_path(&history, 3);
        assert_eq!(path, vec![(1, Lsn(0)), (2, Lsn(5 * seg + 0x100)), (3, Lsn(9 * seg))]);
        // Segment 5 holds the switch: recovery reads it from timeline 2's file,
        // but streaming from its start is on timeline 1 (which ends inside it).
        assert_eq!(tli_of_segment(&path, 5, seg), 2);
        assert_eq!(tli_of_lsn(&path, Lsn(5 * seg)), 1);
        assert_eq!(tli_of_segment(&path, 4, seg), 1);
        // A switch on a segment boundary: the segment is entirely the new timeline's.
        assert_eq!(tli_of_segment(&path, 9, seg), 3);
        assert_eq!(tli_of_lsn(&path, Lsn(9 * seg)), 3);
    }

    #[test]
    fn lag_and_slot() {
        let now = chrono::Utc::now();
        let mut st = StreamerState { server_end: Lsn(1000), flushed: Lsn(400), slot_restart: Lsn(300), ..Default::default() };
        assert_eq!(st.lag_bytes(), 600);
        assert_eq!(st.slot_retained_bytes(), 700);
        st.oldest_unstored_at = Some(now - chrono::Duration::seconds(7));
        assert!((st.lag_seconds(now) - 7.0).abs() < 0.01);
        st.flushed = Lsn(1000);
        assert_eq!(st.lag_seconds(now), 0.0);
    }

    #[test]
    fn replication_messages_decode_and_short_ones_are_errors() {
        let mut w = vec![b'w'];
        w.extend(0x1_0000_0028u64.to_be_bytes());
        w.extend(0x1_0000_1000u64.to_be_bytes());
        w.extend(77i64.to_be_bytes());
        w.extend(b"wal bytes");
        let m = ReplicationMessage::decode(Bytes::from(w.clone())).unwrap();
        assert_eq!(
            m,
            ReplicationMessage::XLogData {
                start: Lsn(0x1_0000_0028),
                server_end: Lsn(0x1_0000_1000),
                sent_at: 77,
                wal: Bytes::from_static(b"wal bytes")
            }
        );
        let mut k = vec![b'k'];
        k.extend(5u64.to_be_bytes());
        k.extend(9i64.to_be_bytes());
        k.push(1);
        assert_eq!(
            ReplicationMessage::decode(Bytes::from(k.clone())).unwrap(),
            ReplicationMessage::Keepalive { server_end: Lsn(5), sent_at: 9, reply_requested: true }
        );
        let err = ReplicationMessage::decode(Bytes::from(w[..24].to_vec())).unwrap_err().to_string();
        assert!(err.contains("XLogData message of 24 bytes (at least 25 expected)"), "{err}");
        assert!(ReplicationMessage::decode(Bytes::from(k[..17].to_vec())).is_err());
        assert!(ReplicationMessage::decode(Bytes::new()).is_err());
        assert_eq!(ReplicationMessage::decode(Bytes::from_static(b"z")).unwrap(), ReplicationMessage::Unknown(b'z'));
    }
}
