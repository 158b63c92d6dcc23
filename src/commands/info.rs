//! `walvault info`: backups, WAL per timeline, the recoverable window.

use crate::repo::manifest::BackupManifest;

/// A backup as info --json shows it (see docs/JSON.md).
pub fn backup_json(m: &BackupManifest) -> serde_json::Value {
    serde_json::json!({
        "id": m.backup_id,
        "label": m.label,
        "start_time": m.start_time,
        "end_time": m.end_time,
        "start_lsn": m.start_lsn,
        "end_lsn": m.end_lsn,
        "timeline": m.end_timeline,
        "size_bytes": m.stats.bytes,
        "stored_new_bytes": m.stats.stored_new,
        "stored_referenced_bytes": m.stats.stored_referenced,
        "duration_ms": m.stats.duration_ms,
        "files": m.stats.files,
        "wal_first": m.wal_first,
        "wal_last": m.wal_last,
    })
}
