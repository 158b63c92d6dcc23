//! What the daemon knows, for /metrics, /healthz and alerts.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::Schedule;
use crate::pg::streamer::SharedState;
use crate::repo::catalog::Catalog;
use crate::repo::manifest::BackupManifest;

/// The repository as of the last refresh.
#[derive(Debug, Clone, Default)]
pub struct RepoSnapshot {
    pub size_bytes: u64,
    pub objects: u64,
    pub backups: u64,
    pub last_backup_end: Option<chrono::DateTime<chrono::Utc>>,
    pub window_start: Option<chrono::DateTime<chrono::Utc>>,
    pub window_end: Option<chrono::DateTime<chrono::Utc>>,
    pub last_archived: Option<chrono::DateTime<chrono::Utc>>,
    pub gaps: u64,
}

impl RepoSnapshot {
    pub fn from_catalog(c: &Catalog, counts: &crate::commands::info::ObjectCounts) -> RepoSnapshot {
        let windows = c.latest_timeline().map(|t| c.windows(t)).unwrap_or_default();
        RepoSnapshot {
            size_bytes: counts.bytes,
            objects: counts.total,
            backups: c.backups.len() as u64,
            last_backup_end: c.backups.iter().map(|b| b.end_time).max(),
            window_start: windows.first().map(|w| w.start_time),
            window_end: windows.last().and_then(|w| w.end_time),
            last_archived: c.last_stored.values().map(|(_, t)| *t).chain(c.streaming.values().map(|(_, _, t)| *t)).max(),
            gaps: c.gaps().values().map(|g| g.len() as u64).sum(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LastBackup {
    pub id: String,
    pub end: chrono::DateTime<chrono::Utc>,
    pub duration_s: f64,
    pub bytes: u64,
    pub uploaded: u64,
}

#[derive(Default)]
pub struct DaemonState {
    pub schedule: Schedule,
    pub streamer: SharedState,
    pub last_backup: Option<LastBackup>,
    pub backup_running: bool,
    pub failures: BTreeMap<&'static str, u64>,
    pub repo: Option<RepoSnapshot>,
    pub store_error: Option<String>,
    pub started: Option<chrono::DateTime<chrono::Utc>>,
    pub alerts_sent: BTreeMap<String, chrono::DateTime<chrono::Utc>>,
    pub partial_interval: std::time::Duration,
}

impl DaemonState {
    pub fn new(schedule: Schedule, partial_interval: std::time::Duration) -> Self {
        DaemonState { schedule, started: Some(chrono::Utc::now()), partial_interval, ..Default::default() }
    }

    pub fn failed(&mut self, kind: &'static str) {
        *self.failures.entry(kind).or_default() += 1;
    }

    pub fn backup_succeeded(&mut self, m: &BackupManifest) {
        self.last_backup = Some(LastBackup {
            id: m.backup_id.clone(),
            end: m.end_time,
            duration_s: m.stats.duration_ms as f64 / 1000.0,
            bytes: m.stats.bytes,
            uploaded: m.stats.stored_new,
        });
    }

    /// Bytes received but not yet stored, and for how long storing has stalled.
    pub fn lag(&self) -> (u64, f64) {
        let s = self.streamer.lock().unwrap();
        let bytes = s.server_end.0.saturating_sub(s.flushed.0);
        let seconds = if bytes == 0 {
            0.0
        } else {
            s.last_flush_at.or(self.started).map(|t| (chrono::Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0).unwrap_or(0.0)
        };
        (bytes, seconds)
    }

    /// Why the daemon is unhealthy, if it is.
    pub fn health_problems(&self, partial_interval: std::time::Duration) -> Vec<String> {
        let mut out = Vec::new();
        let now = chrono::Utc::now();
        {
            let s = self.streamer.lock().unwrap();
            if !s.connected {
                out.push(format!("WAL streaming is not connected{}", s.last_error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()));
            }
        }
        let (lag_bytes, lag_s) = self.lag();
        let allowed = (3 * partial_interval.as_secs()).max(15) as f64;
        if lag_bytes > 0 && lag_s > allowed {
            out.push(format!("{lag_bytes} bytes of WAL not stored for {lag_s:.0}s"));
        }
        if let Some(e) = &self.store_error {
            out.push(format!("repository unreachable: {e}"));
        }
        // At most one scheduled backup may be missed (the one that may be running).
        let last = self.last_backup.as_ref().map(|b| b.end).or(self.repo.as_ref().and_then(|r| r.last_backup_end));
        if let Some((_, before_last)) = self.schedule.previous_two(now) {
            let started = self.started.unwrap_or(now);
            match last {
                Some(t) if t >= before_last => {}
                _ if started > before_last => {}
                Some(t) => out.push(format!("the last backup ended at {t}, before the schedule's previous run")),
                None => out.push("no backup yet".into()),
            }
        }
        out
    }

    /// Prometheus text exposition.
    pub fn metrics(&self) -> String {
        let mut m = String::new();
        let mut g = |name: &str, help: &str, value: f64| {
            let _ = writeln!(m, "# HELP walvault_{name} {help}\n# TYPE walvault_{name} gauge\nwalvault_{name} {value}");
        };
        let ts = |t: Option<chrono::DateTime<chrono::Utc>>| t.map(|t| t.timestamp_millis() as f64 / 1000.0).unwrap_or(0.0);
        let s = self.streamer.lock().unwrap().clone();
        g("up", "1 while the daemon runs", 1.0);
        g("streaming_connected", "1 while WAL streaming is connected", if s.connected { 1.0 } else { 0.0 });
        g("wal_received_lsn_bytes", "end of WAL received, as a byte position", s.received.0 as f64);
        g("wal_stored_lsn_bytes", "end of WAL stored in the repository, as a byte position", s.flushed.0 as f64);
        let (lag_bytes, lag_s) = self.lag();
        g("wal_lag_bytes", "WAL written by the server and not yet in the repository", lag_bytes as f64);
        g("wal_lag_seconds", "how long WAL has waited to reach the repository", lag_s);
        g("slot_retained_bytes", "WAL the replication slot keeps on the server for walvault", lag_bytes as f64);
        g(
            "wal_last_archived_timestamp_seconds",
            "when the last WAL segment reached the repository",
            ts(s.last_segment_at.or(self.repo.as_ref().and_then(|r| r.last_archived))),
        );
        g("wal_segments_stored_total", "segments stored by this daemon", s.segments_stored as f64);
        if let Some(b) = &self.last_backup {
            g("backup_last_success_timestamp_seconds", "when the last successful backup ended", ts(Some(b.end)));
            g("backup_last_duration_seconds", "how long the last successful backup took", b.duration_s);
            g("backup_last_size_bytes", "size of the data directory in the last backup", b.bytes as f64);
            g("backup_last_uploaded_bytes", "bytes the last backup uploaded", b.uploaded as f64);
        } else if let Some(t) = self.repo.as_ref().and_then(|r| r.last_backup_end) {
            g("backup_last_success_timestamp_seconds", "when the last successful backup ended", ts(Some(t)));
        }
        g("backup_running", "1 while a base backup runs", if self.backup_running { 1.0 } else { 0.0 });
        if let Some(r) = &self.repo {
            g("repository_size_bytes", "bytes in the repository", r.size_bytes as f64);
            g("repository_objects", "objects in the repository", r.objects as f64);
            g("repository_backups", "backups in the repository", r.backups as f64);
            g("repository_wal_gaps", "gaps in the archived WAL", r.gaps as f64);
            g("recoverable_window_start_timestamp_seconds", "earliest point a restore can reach", ts(r.window_start));
            g("recoverable_window_end_timestamp_seconds", "latest point a restore can reach (last WAL stored)", ts(r.window_end));
        }
        let _ = writeln!(m, "# HELP walvault_failures_total failures by kind\n# TYPE walvault_failures_total counter");
        for kind in ["backup", "expire", "store", "stream"] {
            let _ = writeln!(m, "walvault_failures_total{{kind=\"{kind}\"}} {}", self.failures.get(kind).copied().unwrap_or(0));
        }
        m
    }
}
