//! The WAL streamer: a physical replication client (what pg_receivewal does)
//! that writes into the repository instead of a directory.
//!
//! - A replication slot holds WAL on the server until it is in the repository:
//!   the flush position we report is what the repository holds durably, never
//!   merely what was received.
//! - Completed segments are sealed and stored (several at once); the flush
//!   position advances in order as they land.
//! - The segment in progress is uploaded every `partial_interval` as a
//!   `.streaming` copy, so losing the database host loses at most that much.
//!   In synchronous mode it is uploaded as soon as data arrives, and flush is
//!   reported right after, so a synchronous commit waits for the repository.
//! - Timeline switches are followed: the old timeline's last segment is kept as
//!   `.partial`, the new timeline's history file is stored.
//! - On restart it resumes at the first segment the repository lacks.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

use super::conn::{BackendMessage, Connection, Mode};
use super::conninfo::ConnParams;
use super::lsn::{Lsn, TimelineId, WalSegmentName};
use super::{PgError, walheader};
use crate::error::{Error, Result};
use crate::repo::wal::{PushOutcome, WalArchive};

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;
/// Completed segments being stored at once.
const UPLOADS_IN_FLIGHT: usize = 3;

#[derive(Debug, Clone)]
pub struct StreamerSettings {
    pub slot: String,
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
    pub last_message: Option<chrono::DateTime<chrono::Utc>>,
    /// When the server wrote the last WAL we have (its send time).
    pub last_server_time: Option<chrono::DateTime<chrono::Utc>>,
    pub last_segment: Option<String>,
    pub last_segment_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When `flushed` last advanced.
    pub last_flush_at: Option<chrono::DateTime<chrono::Utc>>,
    pub last_error: Option<String>,
    /// Set when the server no longer has WAL the repository needs: only a new
    /// base backup makes later history restorable again.
    pub needs_backup: bool,
    pub segments_stored: u64,
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
    params: ConnParams,
    archive: Arc<WalArchive>,
    settings: StreamerSettings,
    state: SharedState,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
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

struct Upload {
    end: Lsn,
    name: String,
    task: tokio::task::JoinHandle<std::result::Result<PushOutcome, crate::repo::RepoError>>,
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
    partial: Option<(Lsn, tokio::task::JoinHandle<std::result::Result<(), crate::repo::RepoError>>)>,
    partial_uploaded: Lsn,
    flushed: Lsn,
    received: Lsn,
    /// A segment upload failed: later segments may still land, but WAL is no
    /// longer stored in order, so `flushed` stays where the failure is.
    upload_failed: bool,
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
            flushed: Lsn(0),
            received: Lsn(0),
            upload_failed: false,
        }
    }

    async fn stream(&mut self, params: &ConnParams) -> Result<Done> {
        let mut conn = Connection::connect(params, Mode::Replication).await?;
        let sys = conn.identify_system().await?;
        self.archive.descriptor().descriptor.check_cluster(&self.archive.store().location(), &sys.system_identifier.to_string())?;
        ensure_slot(&mut conn, &self.settings.slot).await?;
        let (start, tli) = self.start_position(&mut conn, sys.timeline, sys.xlogpos).await?;
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
            st.last_error = None;
        }
        let mut start = start;
        loop {
            tracing::info!(start = %start, timeline = self.tli, slot = %self.settings.slot, "streaming WAL");
            let cmd = format!("START_REPLICATION SLOT \"{}\" PHYSICAL {} TIMELINE {}", self.settings.slot, start, self.tli);
            conn.send_query(&cmd).await?;
            match conn.next_message().await? {
                BackendMessage::CopyBothResponse => {}
                BackendMessage::Error(e) => return Err(self.start_error(e, start)),
                other => return Err(PgError::Protocol(format!("{other:?} after START_REPLICATION")).into()),
            }
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
                    self.tli = next_tli;
                    self.state.lock().unwrap().timeline = next_tli;
                    start = next_start.segment_start(self.seg_size);
                    self.received = start;
                }
            }
        }
    }

    /// Maps an error answering START_REPLICATION; removed WAL means a new backup is needed.
    fn start_error(&self, e: PgError, start: Lsn) -> Error {
        let msg = e.to_string();
        if msg.contains("has already been removed") || e.code() == Some("58P01") {
            let mut st = self.state.lock().unwrap();
            st.needs_backup = true;
            st.last_error = Some(msg.clone());
            tracing::error!(start = %start, "the server no longer has the WAL the repository needs: the repository has a gap, and a new base backup is needed");
        }
        e.into()
    }

    /// Where to start: after the last complete segment in the repository; else
    /// where the slot holds WAL; else the server's current position.
    async fn start_position(&mut self, conn: &mut Connection, server_tli: TimelineId, xlogpos: Lsn) -> Result<(Lsn, TimelineId)> {
        let wal = self.archive.list().await?;
        let newest = wal
            .iter()
            .filter(|e| e.kind == super::lsn::WalFileKind::Segment && !e.streaming)
            .filter_map(|e| WalSegmentName::parse(&e.file, self.seg_size))
            .max_by_key(|s| (s.segno, s.tli));
        let slot_restart = self.slot_restart(conn).await?;
        if let Some(seg) = newest {
            let mut start = seg.end_lsn();
            // Segments are stored several at once, so a later one can be in the
            // repository while an earlier one failed (the store went away).
            // Resume where WAL is stored in order: the slot's restart_lsn follows
            // the flush position reported, which only advances in order, and so
            // does this process's own. Segments already stored are pushed again
            // as identical.
            let own = Some(self.state.lock().unwrap().flushed).filter(|l| l.is_valid());
            if let Some(in_order) = slot_restart.into_iter().chain(own).max() {
                let resume = in_order.segment_start(self.seg_size);
                if resume < start {
                    tracing::info!(resume = %resume, newest = %seg, "resuming before the newest stored segment: the WAL after {resume} was not all stored");
                    start = resume;
                }
            }
            let tli = self.timeline_for(conn, server_tli, seg.tli, start).await?;
            let first = WalSegmentName::of_lsn(tli, start, self.seg_size);
            self.prev_plain = match first.prev() {
                Some(p) => self.archive.read_header(&p.to_string()).await?.map(|h| (p, h.record.plain_blake3)),
                None => None,
            };
            return Ok((start, tli));
        }
        let mut start = xlogpos;
        if let Some(restart) = slot_restart {
            if restart < start {
                start = restart;
            }
        }
        if server_tli > 1 {
            self.store_history(conn, server_tli).await?;
        }
        Ok((start.segment_start(self.seg_size), server_tli))
    }

    /// The slot's restart_lsn (PostgreSQL 15 and later; None before, or for a new slot).
    async fn slot_restart(&self, conn: &mut Connection) -> Result<Option<Lsn>> {
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

    /// The timeline that holds `start` on the server's history.
    async fn timeline_for(&mut self, conn: &mut Connection, server_tli: TimelineId, our_tli: TimelineId, start: Lsn) -> Result<TimelineId> {
        if server_tli <= our_tli {
            return Ok(our_tli.max(server_tli));
        }
        let history = self.store_history(conn, server_tli).await?;
        // The first ancestor (at or after ours) that was still current at `start`.
        for e in &history {
            if e.tli >= our_tli && start < e.switch_lsn {
                return Ok(e.tli);
            }
        }
        Ok(server_tli)
    }

    /// Fetches and stores a timeline history file; returns its switch points.
    async fn store_history(&mut self, conn: &mut Connection, tli: TimelineId) -> Result<Vec<super::lsn::HistoryEntry>> {
        let sets = conn.simple_query(&format!("TIMELINE_HISTORY {tli}")).await?;
        let row = sets.first().and_then(|s| s.rows.first()).ok_or_else(|| PgError::Protocol("TIMELINE_HISTORY returned nothing".into()))?;
        let name = row.first().cloned().flatten().ok_or_else(|| PgError::Protocol("TIMELINE_HISTORY without a file name".into()))?;
        let content = row.get(1).cloned().flatten().unwrap_or_default();
        let entries = super::lsn::parse_history(&content).map_err(|e| Error::failed(format!("the server's {name} is not valid: {e}")))?;
        match self.archive.push(&name, Bytes::from(content.into_bytes()), "stream").await {
            Ok(_) => tracing::info!(file = %name, "stored timeline history"),
            Err(crate::repo::RepoError::Conflict(m)) => tracing::warn!(file = %name, "{m}"),
            Err(e) => return Err(e.into()),
        }
        Ok(entries)
    }

    async fn copy_loop(&mut self, conn: &mut Connection) -> Result<CopyEnd> {
        let mut status_tick = tokio::time::interval(self.settings.status_interval);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut partial_tick = tokio::time::interval(self.settings.partial_interval);
        partial_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_reported = Lsn(0);
        loop {
            self.reap().await?;
            if self.flushed != last_reported {
                last_reported = self.flushed;
                if self.settings.synchronous {
                    send_status(conn, self.received, self.flushed, false).await?;
                }
                if let Some(stop) = self.settings.stop_at {
                    if self.flushed >= stop {
                        send_status(conn, self.received, self.flushed, false).await?;
                        return Ok(CopyEnd::Stop);
                    }
                }
            }
            tokio::select! {
                msg = conn.next_message() => {
                    match msg? {
                        BackendMessage::CopyData(data) => {
                            if let Some(end) = self.on_copy_data(conn, data).await? {
                                return Ok(end);
                            }
                            if self.settings.synchronous && self.partial.is_none() {
                                self.start_partial_upload();
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
                _ = status_tick.tick() => send_status(conn, self.received, self.flushed, false).await?,
                _ = partial_tick.tick() => {
                    if self.partial.is_none() {
                        self.start_partial_upload();
                    }
                }
            }
        }
    }

    /// Handles XLogData and keepalives.
    async fn on_copy_data(&mut self, conn: &mut Connection, data: Bytes) -> Result<Option<CopyEnd>> {
        match data.first() {
            Some(b'w') if data.len() >= 25 => {
                let start = Lsn(u64::from_be_bytes(data[1..9].try_into().unwrap()));
                let server_end = Lsn(u64::from_be_bytes(data[9..17].try_into().unwrap()));
                let sent = i64::from_be_bytes(data[17..25].try_into().unwrap());
                self.write_wal(start, data.slice(25..)).await?;
                let mut st = self.state.lock().unwrap();
                st.received = self.received;
                st.server_end = server_end.max(self.received);
                st.last_message = Some(chrono::Utc::now());
                st.last_server_time = pg_time(sent);
            }
            Some(b'k') if data.len() >= 18 => {
                let server_end = Lsn(u64::from_be_bytes(data[1..9].try_into().unwrap()));
                let reply = data[17] != 0;
                {
                    let mut st = self.state.lock().unwrap();
                    st.server_end = server_end;
                    st.last_message = Some(chrono::Utc::now());
                }
                if reply {
                    send_status(conn, self.received, self.flushed, false).await?;
                }
            }
            Some(t) => tracing::warn!(tag = %(*t as char), "ignoring an unknown replication message"),
            None => {}
        }
        Ok(None)
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
                self.complete_segment(seg, buf.freeze()).await?;
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
        let archive = self.archive.clone();
        let name = seg.to_string();
        let task_name = name.clone();
        let task = tokio::spawn(async move {
            let sealed = archive.seal(&task_name, data).await?;
            let outcome = archive.store_sealed(&sealed, prev, "stream").await?;
            archive.delete_streaming(&task_name).await?;
            Ok(outcome)
        });
        self.uploads.push_back(Upload { end: seg.end_lsn(), name, task });
        Ok(())
    }

    async fn wait_oldest_upload(&mut self) -> Result<()> {
        let Some(up) = self.uploads.pop_front() else { return Ok(()) };
        let outcome = match up.task.await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => {
                self.upload_failed = true;
                return Err(e.into());
            }
            Err(e) => {
                self.upload_failed = true;
                return Err(Error::failed(format!("segment upload task failed: {e}")));
            }
        };
        if self.upload_failed {
            // Stored, but an earlier segment is not: reporting it flushed would
            // let the server recycle the missing one.
            tracing::debug!(segment = %up.name, "segment stored after an earlier one failed; the flush position stays");
            return Ok(());
        }
        if outcome == PushOutcome::AlreadyIdentical {
            tracing::debug!(segment = %up.name, "segment was already in the repository");
        }
        self.flushed = self.flushed.max(up.end);
        let now = chrono::Utc::now();
        let mut st = self.state.lock().unwrap();
        st.flushed = self.flushed;
        st.last_segment = Some(up.name.clone());
        st.last_segment_at = Some(now);
        st.last_flush_at = Some(now);
        st.segments_stored += 1;
        tracing::debug!(segment = %up.name, "segment stored");
        Ok(())
    }

    /// Collects finished uploads without waiting.
    async fn reap(&mut self) -> Result<()> {
        while self.uploads.front().is_some_and(|u| u.task.is_finished()) {
            self.wait_oldest_upload().await?;
        }
        if self.partial.as_ref().is_some_and(|(_, t)| t.is_finished()) {
            let (end, task) = self.partial.take().expect("checked");
            match task.await {
                Ok(Ok(())) => {
                    self.partial_uploaded = end;
                    if !self.upload_failed && self.uploads.is_empty() && end > self.flushed {
                        self.flushed = end;
                        let mut st = self.state.lock().unwrap();
                        st.flushed = end;
                        st.last_flush_at = Some(chrono::Utc::now());
                    }
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "uploading the segment in progress failed; will retry"),
                Err(e) => tracing::warn!(error = %e, "partial upload task failed"),
            }
        }
        Ok(())
    }

    /// Uploads the segment in progress if it grew since the last upload.
    fn start_partial_upload(&mut self) {
        let Some((seg, buf)) = &self.current else { return };
        let end = Lsn(seg.start_lsn().0 + buf.len() as u64);
        if end <= self.partial_uploaded || buf.is_empty() {
            return;
        }
        let data = Bytes::copy_from_slice(buf);
        let (archive, name, valid) = (self.archive.clone(), seg.to_string(), buf.len() as u64);
        self.partial = Some((end, tokio::spawn(async move { archive.put_streaming(&name, data, valid).await })));
    }

    /// The old timeline ended at `switch`: keep its last segment as `.partial`.
    async fn finish_timeline(&mut self, switch: Lsn) -> Result<()> {
        self.flush_uploads().await?;
        if let Some((seg, buf)) = self.current.take() {
            if !buf.is_empty() {
                let mut full = buf;
                full.resize(self.seg_size as usize, 0);
                let name = format!("{seg}.partial");
                match self.archive.push(&name, full.freeze(), "stream").await {
                    Ok(_) => tracing::info!(file = %name, switch = %switch, "stored the end of the old timeline"),
                    Err(crate::repo::RepoError::Conflict(m)) => tracing::warn!("{m}"),
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    async fn flush_uploads(&mut self) -> Result<()> {
        while !self.uploads.is_empty() {
            self.wait_oldest_upload().await?;
        }
        if let Some((end, task)) = self.partial.take() {
            if let Ok(Ok(())) = task.await {
                self.partial_uploaded = end;
            }
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
}

enum CopyEnd {
    Stop,
    ServerStopped,
    TimelineEnded,
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

/// A standby status update: write and flush positions (apply is not tracked).
async fn send_status(conn: &mut Connection, write: Lsn, flush: Lsn, reply: bool) -> Result<()> {
    let mut msg = Vec::with_capacity(34);
    msg.push(b'r');
    msg.extend_from_slice(&write.0.to_be_bytes());
    msg.extend_from_slice(&flush.0.to_be_bytes());
    msg.extend_from_slice(&0u64.to_be_bytes());
    msg.extend_from_slice(&now_pg_us().to_be_bytes());
    msg.push(reply as u8);
    conn.send_copy_data(&msg).await?;
    conn.flush().await?;
    Ok(())
}
