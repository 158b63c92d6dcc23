//! What the daemon knows, for /metrics, /healthz and alerts: the streamer's
//! position, the last backups, the repository as of the last refresh, and the
//! replication slot as of the last probe.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::Schedule;
use crate::pg::Lsn;
use crate::pg::streamer::SharedState;
use crate::repo::catalog::Catalog;
use crate::repo::manifest::BackupManifest;

/// The repository as of the last refresh.
#[derive(Debug, Clone, Default)]
pub struct RepoSnapshot {
    pub size_bytes: u64,
    pub objects: u64,
    pub backups: u64,
    pub newest_backup: Option<LastBackup>,
    pub window_start: Option<DateTime<Utc>>,
    pub window_end: Option<DateTime<Utc>>,
    pub last_archived: Option<DateTime<Utc>>,
    pub gaps: u64,
    /// The first segment missing after the newest restorable backup, and where
    /// it starts, if its WAL stops at a gap: restores cannot go past it until
    /// the next backup.
    pub gap_after_newest: Option<(String, Lsn)>,
}

impl RepoSnapshot {
    pub fn from_catalog(c: &Catalog, counts: &crate::commands::info::ObjectCounts) -> RepoSnapshot {
        let windows = c.latest_timeline().map(|t| c.windows(t)).unwrap_or_default();
        RepoSnapshot {
            size_bytes: counts.bytes,
            objects: counts.total,
            backups: c.backups.len() as u64,
            newest_backup: c.backups.iter().max_by_key(|b| b.end_time).map(LastBackup::of),
            window_start: windows.first().map(|w| w.start_time),
            window_end: windows.last().and_then(|w| w.end_time),
            last_archived: c.last_stored.values().map(|(_, t)| *t).chain(c.streaming.values().map(|(_, _, t)| *t)).max(),
            gaps: c.gaps().values().map(|g| g.len() as u64).sum(),
            gap_after_newest: windows.last().and_then(|w| {
                let name = w.gap_at.clone()?;
                let seg = crate::pg::WalSegmentName::parse(&name, c.seg_size)?;
                Some((name, seg.start_lsn()))
            }),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LastBackup {
    pub id: String,
    pub end: DateTime<Utc>,
    pub duration_s: f64,
    pub bytes: u64,
    pub uploaded: u64,
}

impl LastBackup {
    pub fn of(m: &BackupManifest) -> LastBackup {
        LastBackup {
            id: m.backup_id.clone(),
            end: m.end_time,
            duration_s: m.stats.duration_ms as f64 / 1000.0,
            bytes: m.stats.bytes,
            uploaded: m.stats.stored_new,
        }
    }
}

/// The replication slot as the last probe saw it.
#[derive(Debug, Clone, Default)]
pub struct SlotReading {
    /// WAL the server keeps for the slot: its current position minus the slot's restart_lsn.
    pub retained_bytes: Option<u64>,
    pub at: Option<DateTime<Utc>>,
    pub error: Option<String>,
}

/// Samples of the server's WAL end kept to date the oldest WAL not yet stored.
const MAX_SAMPLES: usize = 4096;

pub struct DaemonState {
    pub schedule: Schedule,
    pub streamer: SharedState,
    /// The last backup this daemon took (the repository snapshot may lag behind it).
    pub last_backup: Option<LastBackup>,
    pub last_backup_error: Option<(DateTime<Utc>, String)>,
    /// Backups this daemon completed.
    pub backups_completed: u64,
    pub backup_running: bool,
    pub retention_running: bool,
    pub failures: BTreeMap<&'static str, u64>,
    pub repo: Option<RepoSnapshot>,
    pub repo_refreshed: Option<DateTime<Utc>>,
    /// Why the store's last probe failed.
    pub store_error: Option<String>,
    /// Why the last repository refresh failed.
    pub refresh_error: Option<String>,
    pub slot: SlotReading,
    /// How many doublings of `daemon.slot_warn_bytes` the slot has crossed (0: under it).
    pub slot_warn_level: u32,
    pub started: DateTime<Utc>,
    pub alerts_sent: BTreeMap<String, DateTime<Utc>>,
    pub partial_interval: Duration,
    /// (server WAL end, when first seen), ascending: the front entry past the
    /// stored position dates the oldest WAL still waiting for the repository.
    lag_samples: VecDeque<(Lsn, DateTime<Utc>)>,
    was_connected: bool,
}

impl DaemonState {
    pub fn new(schedule: Schedule, streamer: SharedState, partial_interval: Duration) -> Self {
        DaemonState {
            schedule,
            streamer,
            last_backup: None,
            last_backup_error: None,
            backups_completed: 0,
            backup_running: false,
            retention_running: false,
            failures: BTreeMap::new(),
            repo: None,
            repo_refreshed: None,
            store_error: None,
            refresh_error: None,
            slot: SlotReading::default(),
            slot_warn_level: 0,
            started: Utc::now(),
            alerts_sent: BTreeMap::new(),
            partial_interval,
            lag_samples: VecDeque::new(),
            was_connected: false,
        }
    }

    pub fn failed(&mut self, kind: &'static str) {
        *self.failures.entry(kind).or_default() += 1;
    }

    pub fn backup_succeeded(&mut self, m: &BackupManifest) {
        self.last_backup = Some(LastBackup::of(m));
        self.last_backup_error = None;
        self.backups_completed += 1;
    }

    /// The newest backup known, from this daemon or the repository.
    pub fn newest_backup(&self) -> Option<&LastBackup> {
        let own = self.last_backup.as_ref();
        let repo = self.repo.as_ref().and_then(|r| r.newest_backup.as_ref());
        match (own, repo) {
            (Some(a), Some(b)) => Some(if a.end >= b.end { a } else { b }),
            (a, b) => a.or(b),
        }
    }

    /// Called on every daemon tick: samples the WAL positions (for lag in
    /// seconds) and counts interrupted streaming sessions.
    pub fn observe(&mut self, now: DateTime<Utc>) {
        let (server_end, flushed, connected) = {
            let s = self.streamer.lock().unwrap();
            (s.server_end.max(s.received), s.flushed, s.connected)
        };
        if self.was_connected && !connected {
            self.failed("stream");
        }
        self.was_connected = connected;
        if self.lag_samples.back().is_none_or(|(l, _)| server_end > *l) {
            self.lag_samples.push_back((server_end, now));
        }
        while self.lag_samples.front().is_some_and(|(l, _)| *l <= flushed) {
            self.lag_samples.pop_front();
        }
        if self.lag_samples.len() > MAX_SAMPLES {
            // Keep the oldest (it dates the lag); drop the next ones.
            let oldest = self.lag_samples.pop_front();
            self.lag_samples.drain(..MAX_SAMPLES / 2);
            if let Some(o) = oldest {
                self.lag_samples.push_front(o);
            }
        }
    }

    /// WAL the server has written that is not in the repository yet (bytes),
    /// and how long the oldest of it has waited (seconds, to the daemon's tick).
    /// Measured from when that WAL was first seen, not from the last store: a
    /// server idle for an hour that writes one record is not an hour behind.
    pub fn lag(&self, now: DateTime<Utc>) -> (u64, f64) {
        let s = self.streamer.lock().unwrap();
        let end = s.server_end.max(s.received);
        let bytes = end.0.saturating_sub(s.flushed.0);
        if bytes == 0 {
            return (0, 0.0);
        }
        let since = self.lag_samples.iter().find(|(l, _)| *l > s.flushed).map(|(_, t)| *t);
        let seconds = since.map(|t| (now - t).num_milliseconds().max(0) as f64 / 1000.0).unwrap_or(0.0);
        (bytes, seconds)
    }

    /// WAL the replication slot makes the server keep: the probe's reading when
    /// there is one, else what the streamer has not stored.
    pub fn slot_retained(&self, now: DateTime<Utc>) -> u64 {
        self.slot.retained_bytes.unwrap_or_else(|| self.lag(now).0)
    }

    /// How much lag is still "current": three partial uploads, at least 15 s.
    pub fn lag_allowed(&self) -> f64 {
        (3 * self.partial_interval.as_secs()).max(15) as f64
    }

    /// Why the daemon is unhealthy, if it is. Healthy means: WAL streaming is
    /// connected and nothing the server wrote has waited longer than
    /// `lag_allowed` for the repository (an idle server is current); the store
    /// answers; and the newest backup is as recent as the schedule allows: it
    /// ended after the schedule's last run, or after the run before that while
    /// the backup of the last run is still going.
    pub fn health_problems(&self, now: DateTime<Utc>) -> Vec<String> {
        let mut out = Vec::new();
        {
            let s = self.streamer.lock().unwrap();
            if !s.connected {
                out.push(format!("WAL streaming is not connected{}", s.last_error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()));
            }
        }
        let (lag_bytes, lag_s) = self.lag(now);
        if lag_s > self.lag_allowed() {
            out.push(format!("{lag_bytes} bytes of WAL have waited {lag_s:.0}s to reach the repository"));
        }
        if let Some(e) = &self.store_error {
            out.push(format!("repository unreachable: {e}"));
        } else if let Some(e) = &self.refresh_error {
            out.push(format!("cannot read the repository: {e}"));
        }
        if let Some(p) = self.backup_problem(now) {
            out.push(p);
        }
        if let Some(seg) = self.wal_gap() {
            out.push(format!(
                "the WAL after the newest backup stops at a gap ({seg} is missing): restores cannot go past it until a new backup"
            ));
        }
        out
    }

    /// A gap in the WAL after the newest backup, unless it is only segments
    /// still being uploaded (several go at once, so a later one can land first):
    /// a real gap starts before the position the streamer has stored in order.
    pub fn wal_gap(&self) -> Option<&str> {
        let (name, start) = self.repo.as_ref()?.gap_after_newest.as_ref()?;
        let flushed = self.streamer.lock().unwrap().flushed;
        (!flushed.is_valid() || *start < flushed).then_some(name.as_str())
    }

    fn backup_problem(&self, now: DateTime<Utc>) -> Option<String> {
        let newest = self.newest_backup().map(|b| b.end);
        let failed = self.last_backup_error.as_ref().map(|(at, e)| format!("; the last attempt failed at {at}: {e}")).unwrap_or_default();
        let Some(newest) = newest else {
            let running = if self.backup_running { " (the first one is running)" } else { "" };
            return Some(format!("no backup yet{running}{failed}"));
        };
        let (last_run, run_before) = self.schedule.previous_two(now)?;
        if newest >= last_run || (self.backup_running && newest >= run_before) {
            return None;
        }
        Some(format!("the newest backup ended at {newest}, before the scheduled run at {last_run} ({}){failed}", self.schedule.expression))
    }

    /// Prometheus text exposition.
    pub fn metrics(&self, now: DateTime<Utc>) -> String {
        let mut m = String::new();
        let mut g = |name: &str, help: &str, value: f64| {
            let _ = writeln!(m, "# HELP walvault_{name} {help}\n# TYPE walvault_{name} gauge\nwalvault_{name} {value}");
        };
        let ts = |t: Option<DateTime<Utc>>| t.map(|t| t.timestamp_millis() as f64 / 1000.0).unwrap_or(0.0);
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        let s = self.streamer.lock().unwrap().clone();
        g("up", "1 while the daemon runs", 1.0);
        g("healthy", "1 when /healthz answers 200", flag(self.health_problems(now).is_empty()));
        g("start_timestamp_seconds", "when the daemon started", ts(Some(self.started)));
        g("streaming_connected", "1 while WAL streaming is connected", flag(s.connected));
        g("wal_timeline", "timeline being streamed", s.timeline as f64);
        g("wal_received_lsn_bytes", "end of WAL received, as a byte position", s.received.0 as f64);
        g("wal_stored_lsn_bytes", "end of WAL stored in the repository, as a byte position", s.flushed.0 as f64);
        let (lag_bytes, lag_s) = self.lag(now);
        g("wal_lag_bytes", "WAL written by the server and not yet in the repository", lag_bytes as f64);
        g("wal_lag_seconds", "how long the oldest WAL not yet in the repository has waited", lag_s);
        g("slot_retained_bytes", "WAL the replication slot makes the server keep", self.slot_retained(now) as f64);
        g(
            "wal_last_archived_timestamp_seconds",
            "when the last WAL reached the repository",
            ts(s.last_segment_at.into_iter().chain(self.repo.as_ref().and_then(|r| r.last_archived)).max()),
        );
        g("wal_segments_stored_total", "segments stored by this daemon", s.segments_stored as f64);
        if let Some(b) = self.newest_backup() {
            g("backup_last_success_timestamp_seconds", "when the newest backup ended", ts(Some(b.end)));
            g("backup_last_duration_seconds", "how long the newest backup took", b.duration_s);
            g("backup_last_size_bytes", "size of the data directory in the newest backup", b.bytes as f64);
            g("backup_last_uploaded_bytes", "bytes the newest backup uploaded", b.uploaded as f64);
        }
        if let Some((at, _)) = &self.last_backup_error {
            g("backup_last_failure_timestamp_seconds", "when the last failed backup attempt ended", ts(Some(*at)));
        }
        g("backup_next_timestamp_seconds", "when the schedule runs the next backup", ts(self.schedule.next_after(now)));
        g("backup_running", "1 while a base backup runs", flag(self.backup_running));
        g("retention_running", "1 while retention runs", flag(self.retention_running));
        g("store_up", "1 when the last probe of the repository's store succeeded", flag(self.store_error.is_none()));
        if let Some(r) = &self.repo {
            g("repository_refresh_timestamp_seconds", "when the repository figures below were read", ts(self.repo_refreshed));
            g("repository_size_bytes", "bytes in the repository", r.size_bytes as f64);
            g("repository_objects", "objects in the repository", r.objects as f64);
            g("repository_backups", "backups in the repository", r.backups as f64);
            g("repository_wal_gaps", "gaps in the archived WAL", r.gaps as f64);
            g("recoverable_window_start_timestamp_seconds", "earliest point a restore can reach", ts(r.window_start));
            g("recoverable_window_end_timestamp_seconds", "latest point a restore can reach (last WAL stored)", ts(r.window_end));
        }
        let _ = writeln!(
            m,
            "# HELP walvault_backups_completed_total backups this daemon completed\n# TYPE walvault_backups_completed_total counter\nwalvault_backups_completed_total {}",
            self.backups_completed
        );
        let _ = writeln!(m, "# HELP walvault_failures_total failures by kind\n# TYPE walvault_failures_total counter");
        for kind in ["backup", "expire", "store", "stream"] {
            let _ = writeln!(m, "walvault_failures_total{{kind=\"{kind}\"}} {}", self.failures.get(kind).copied().unwrap_or(0));
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::pg::streamer::StreamerState;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn state(schedule: &str) -> DaemonState {
        let streamer = Arc::new(Mutex::new(StreamerState { connected: true, ..Default::default() }));
        let mut st = DaemonState::new(Schedule::parse(schedule, "UTC").unwrap(), streamer, Duration::from_secs(5));
        st.started = t("2026-01-01T00:00:00Z");
        st
    }

    fn backup(end: &str) -> LastBackup {
        LastBackup { id: "b".into(), end: t(end), duration_s: 1.0, bytes: 1, uploaded: 1 }
    }

    #[test]
    fn an_idle_server_is_current() {
        let mut st = state("0 0 2 * * *");
        st.last_backup = Some(backup("2026-01-10T02:05:00Z"));
        {
            let mut s = st.streamer.lock().unwrap();
            s.server_end = Lsn(0x3000000);
            s.received = Lsn(0x3000000);
            s.flushed = Lsn(0x3000000);
            // The last store was long ago: nothing waits, so no lag.
            s.last_flush_at = Some(t("2026-01-10T01:00:00Z"));
        }
        st.observe(t("2026-01-10T09:00:00Z"));
        assert_eq!(st.lag(t("2026-01-10T09:00:00Z")), (0, 0.0));
        assert!(st.health_problems(t("2026-01-10T09:00:00Z")).is_empty());
        // One record after hours of silence: lag counts from when it appeared.
        st.streamer.lock().unwrap().server_end = Lsn(0x3000100);
        st.observe(t("2026-01-10T09:00:05Z"));
        assert_eq!(st.lag(t("2026-01-10T09:00:10Z")), (0x100, 5.0));
        assert!(st.health_problems(t("2026-01-10T09:00:10Z")).is_empty());
        // It is still not stored 30 s later: unhealthy.
        let problems = st.health_problems(t("2026-01-10T09:00:40Z"));
        assert_eq!(problems, vec!["256 bytes of WAL have waited 35s to reach the repository".to_string()]);
        // Stored: current again.
        st.streamer.lock().unwrap().flushed = Lsn(0x3000100);
        st.observe(t("2026-01-10T09:00:45Z"));
        assert!(st.health_problems(t("2026-01-10T09:00:45Z")).is_empty());
    }

    #[test]
    fn steady_load_is_current_while_stores_keep_up() {
        let mut st = state("0 0 2 * * *");
        st.last_backup = Some(backup("2026-01-10T02:05:00Z"));
        // WAL grows every tick and is stored one tick later: never all stored at
        // once, but nothing waits long.
        let base = t("2026-01-10T09:00:00Z");
        for i in 0..100i64 {
            let now = base + chrono::Duration::seconds(5 * i);
            {
                let mut s = st.streamer.lock().unwrap();
                s.flushed = s.server_end;
                s.server_end = Lsn(s.server_end.0 + 1_000_000);
            }
            st.observe(now);
            let (bytes, secs) = st.lag(now);
            assert_eq!(bytes, 1_000_000);
            assert!(secs <= 5.0, "{secs}");
        }
        assert!(st.health_problems(base + chrono::Duration::seconds(500)).is_empty());
    }

    #[test]
    fn backup_age_follows_the_schedule() {
        let mut st = state("0 0 2 * * *");
        let now = t("2026-01-10T09:00:00Z");
        assert_eq!(st.health_problems(now), vec!["no backup yet".to_string()]);
        st.backup_running = true;
        assert_eq!(st.health_problems(now), vec!["no backup yet (the first one is running)".to_string()]);
        st.backup_running = false;
        // Today's 02:00 run is done.
        st.last_backup = Some(backup("2026-01-10T02:10:00Z"));
        assert!(st.health_problems(now).is_empty());
        // Only yesterday's: today's run did not complete.
        st.last_backup = Some(backup("2026-01-09T02:10:00Z"));
        st.last_backup_error = Some((t("2026-01-10T02:01:00Z"), "connection refused".into()));
        assert_eq!(
            st.health_problems(now),
            vec![
                "the newest backup ended at 2026-01-09 02:10:00 UTC, before the scheduled run at 2026-01-10 02:00:00 UTC (0 0 2 * * *); the last attempt failed at 2026-01-10 02:01:00 UTC: connection refused"
                    .to_string()
            ]
        );
        // ...unless today's backup is still running.
        st.backup_running = true;
        assert!(st.health_problems(now).is_empty());
        // A backup the repository has (taken by `walvault backup`) counts too.
        st.backup_running = false;
        st.repo = Some(RepoSnapshot { newest_backup: Some(backup("2026-01-10T03:00:00Z")), ..Default::default() });
        assert!(st.health_problems(now).is_empty());
    }

    #[test]
    fn a_gap_after_the_newest_backup_is_unhealthy() {
        let mut st = state("0 0 2 * * *");
        st.last_backup = Some(backup("2026-01-10T02:10:00Z"));
        st.repo = Some(RepoSnapshot { gap_after_newest: Some(("000000010000000000000007".into(), Lsn(0x7000000))), ..Default::default() });
        let now = t("2026-01-10T09:00:00Z");
        // The streamer stores segments 7, 8 and 9 at once and 8 landed first: not a gap.
        st.streamer.lock().unwrap().flushed = Lsn(0x7000000);
        assert!(st.health_problems(now).is_empty());
        assert_eq!(st.wal_gap(), None);
        // The streamer has stored past it in order, or is not streaming: a gap.
        st.streamer.lock().unwrap().flushed = Lsn(0xA000000);
        let problems = st.health_problems(now);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("000000010000000000000007 is missing"), "{problems:?}");
        st.streamer.lock().unwrap().flushed = Lsn(0);
        assert_eq!(st.wal_gap(), Some("000000010000000000000007"));
    }

    #[test]
    fn schedule_runs_before_and_after() {
        let s = Schedule::parse("*/20 * * * * *", "UTC").unwrap();
        let now = t("2026-01-10T09:00:45Z");
        assert_eq!(s.previous_two(now), Some((t("2026-01-10T09:00:40Z"), t("2026-01-10T09:00:20Z"))));
        assert_eq!(s.next_after(now), Some(t("2026-01-10T09:01:00Z")));
        let s = Schedule::parse("0 30 1 * * *", "Europe/Paris").unwrap();
        assert_eq!(s.next_after(t("2026-01-10T09:00:00Z")), Some(t("2026-01-11T00:30:00Z")));
    }
}
