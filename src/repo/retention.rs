//! Retention: which backups to keep, and so which WAL, packs and leftovers can
//! go. Nothing a kept backup needs is ever selected: its manifest, file lists,
//! every pack it references, and the WAL from its first segment on.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::catalog::Catalog;
use super::layout;
use crate::pg::WalSegmentName;
use crate::pg::lsn::WalFileKind;
use crate::storage::ObjectMeta;

#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub full_backups: Option<u32>,
    pub window_days: Option<u32>,
    pub min_backups: u32,
}

/// What expire deletes, by kind, in the order it deletes them.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Plan {
    pub kept_backups: Vec<String>,
    pub expired_backups: Vec<String>,
    /// Directories of backups that never completed.
    pub incomplete_backups: Vec<String>,
    /// Object keys, deleted in this order.
    pub manifests: Vec<String>,
    pub backup_objects: Vec<String>,
    pub wal: Vec<String>,
    pub pack_indexes: Vec<String>,
    pub packs: Vec<String>,
    pub bytes: u64,
}

impl Plan {
    pub fn objects(&self) -> usize {
        self.manifests.len() + self.backup_objects.len() + self.wal.len() + self.pack_indexes.len() + self.packs.len()
    }
}

/// The ids of the backups to keep (oldest first).
pub fn backups_to_keep(catalog: &Catalog, policy: &Policy, now: chrono::DateTime<chrono::Utc>) -> Vec<String> {
    let all: Vec<&str> = catalog.backups.iter().map(|b| b.backup_id.as_str()).collect();
    if policy.full_backups.is_none() && policy.window_days.is_none() {
        return all.iter().map(|s| s.to_string()).collect();
    }
    let mut keep: HashSet<&str> = HashSet::new();
    if let Some(n) = policy.full_backups {
        keep.extend(all.iter().rev().take(n as usize));
    }
    if let Some(days) = policy.window_days {
        let cutoff = now - chrono::Duration::days(days as i64);
        // Every backup that ended inside the window, and the newest one that ended
        // at or before its start, so that every point of the window stays reachable.
        keep.extend(catalog.backups.iter().filter(|b| b.end_time > cutoff).map(|b| b.backup_id.as_str()));
        if let Some(b) = catalog.backups.iter().rev().find(|b| b.end_time <= cutoff) {
            keep.insert(&b.backup_id);
        }
    }
    keep.extend(all.iter().rev().take(policy.min_backups.max(1) as usize));
    all.into_iter().filter(|id| keep.contains(id)).map(str::to_string).collect()
}

/// Plans the deletions, given the catalog and a listing of every object.
pub fn plan(catalog: &Catalog, policy: &Policy, objects: &[ObjectMeta], now: chrono::DateTime<chrono::Utc>) -> Plan {
    let kept_ids = backups_to_keep(catalog, policy, now);
    let kept: Vec<_> = catalog.backups.iter().filter(|b| kept_ids.contains(&b.backup_id)).collect();
    let mut plan = Plan { kept_backups: kept_ids.clone(), ..Default::default() };
    plan.expired_backups = catalog.backups.iter().filter(|b| !kept_ids.contains(&b.backup_id)).map(|b| b.backup_id.clone()).collect();
    plan.incomplete_backups = catalog.incomplete.clone();
    let sizes: HashMap<&str, u64> = objects.iter().map(|o| (o.key.as_str(), o.size)).collect();
    let size = |key: &str| sizes.get(key).copied().unwrap_or(0);

    // Backups: the manifest first, so the backup disappears at once.
    let gone: BTreeSet<&str> = plan.expired_backups.iter().chain(&plan.incomplete_backups).map(String::as_str).collect();
    for o in objects.iter().filter(|o| o.key.starts_with(layout::BACKUP_PREFIX)) {
        let id = o.key[layout::BACKUP_PREFIX.len()..].split('/').next().unwrap_or("");
        if gone.contains(id) {
            if o.key.ends_with("/manifest.json") {
                plan.manifests.push(o.key.clone());
            } else {
                plan.backup_objects.push(o.key.clone());
            }
            plan.bytes += o.size;
        }
    }

    // WAL before the oldest kept backup's first segment is needed by nothing
    // (history files are small and always kept). With no backup kept, keep WAL.
    if let Some(min_segno) = kept.iter().filter_map(|b| WalSegmentName::parse(&b.wal_first, catalog.seg_size).map(|s| s.segno)).min() {
        for e in &catalog.wal {
            if e.kind == WalFileKind::History {
                continue;
            }
            let Some(seg) = WalSegmentName::parse(&e.file[..24.min(e.file.len())], catalog.seg_size) else { continue };
            let stale_copy = e.streaming && catalog.segments.get(&seg.tli).is_some_and(|s| s.contains(&seg.segno));
            if seg.segno < min_segno || stale_copy {
                let name = if e.streaming { format!("{}{}", e.file, super::wal::STREAMING_SUFFIX) } else { e.file.clone() };
                let key = layout::wal_key(&name);
                plan.bytes += size(&key);
                plan.wal.push(key);
            }
        }
    }

    // Packs no kept backup references; indexes go first so no backup dedups
    // into a pack that is about to disappear.
    let referenced: HashSet<&str> = kept.iter().flat_map(|b| b.packs.iter().map(|p| p.id.as_str())).collect();
    for o in objects.iter().filter(|o| o.key.starts_with(layout::PACK_PREFIX)) {
        let file = o.key.rsplit('/').next().unwrap_or("");
        let (id, is_index) = match (file.strip_suffix(".pack"), file.strip_suffix(".idx")) {
            (Some(id), _) => (id, false),
            (_, Some(id)) => (id, true),
            _ => continue,
        };
        if !referenced.contains(id) {
            plan.bytes += o.size;
            if is_index {
                plan.pack_indexes.push(o.key.clone());
            } else {
                plan.packs.push(o.key.clone());
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::repo::manifest::BackupManifest;
    use crate::repo::wal::WalEntry;

    const SEG: u64 = 16 << 20;

    fn at(day: u32) -> chrono::DateTime<chrono::Utc> {
        format!("2026-03-{day:02}T02:00:00Z").parse().unwrap()
    }

    /// A backup ending on March `day`, starting at segment `segno`, using `packs`.
    fn backup(day: u32, segno: u64, packs: &[&str]) -> BackupManifest {
        let wal = WalSegmentName::new(1, segno, SEG).to_string();
        serde_json::from_value(serde_json::json!({
            "format_version": 1, "backup_id": format!("202603{day:02}T020000Z"), "label": null,
            "system_identifier": "1", "pg_version_num": 150000, "pg_version": "15",
            "start_lsn": format!("0/{:X}", segno * SEG), "start_timeline": 1,
            "end_lsn": format!("0/{:X}", segno * SEG + 0x100), "end_timeline": 1,
            "start_time": at(day), "end_time": at(day), "wal_first": wal, "wal_last": wal,
            "files": {"key": "k", "stored_len": 0, "stored_blake3": "", "plain_len": 0, "plain_blake3": ""},
            "server_manifest": null,
            "packs": packs.iter().map(|p| serde_json::json!({"id": p, "size": 10, "blake3": ""})).collect::<Vec<_>>(),
            "stats": {"files": 0, "directories": 0, "bytes": 0, "chunks": 0, "chunks_new": 0, "bytes_new": 0,
                      "stored_new": 0, "stored_referenced": 0, "duration_ms": 0},
            "descriptor_generation": 1, "created_by": "test",
        }))
        .unwrap()
    }

    /// Backups on March 1, 3, 5, 7 and 9 (segments 10, 20, 30, 40, 50), WAL 10 to 55.
    fn catalog() -> Catalog {
        let backups = vec![
            backup(1, 10, &["p1"]),
            backup(3, 20, &["p1", "p2"]),
            backup(5, 30, &["p2", "p3"]),
            backup(7, 40, &["p3"]),
            backup(9, 50, &["p3", "p4"]),
        ];
        let wal = (10..=55)
            .map(|n| WalEntry {
                file: WalSegmentName::new(1, n, SEG).to_string(),
                kind: WalFileKind::Segment,
                size: 100,
                modified: None,
                streaming: false,
            })
            .collect();
        Catalog {
            seg_size: SEG,
            backups,
            broken: vec![],
            incomplete: vec!["20260310T020000Z".into()],
            wal,
            segments: BTreeMap::from([(1, (10..=55).collect())]),
            streaming: BTreeMap::new(),
            histories: BTreeMap::new(),
            last_stored: BTreeMap::new(),
            stored_at: BTreeMap::new(),
        }
    }

    fn ids(days: &[u32]) -> Vec<String> {
        days.iter().map(|d| format!("202603{d:02}T020000Z")).collect()
    }

    fn policy(full: Option<u32>, window: Option<u32>, min: u32) -> Policy {
        Policy { full_backups: full, window_days: window, min_backups: min }
    }

    #[test]
    fn without_a_policy_everything_is_kept() {
        assert_eq!(backups_to_keep(&catalog(), &policy(None, None, 1), at(20)), ids(&[1, 3, 5, 7, 9]));
    }

    #[test]
    fn full_backups_keeps_the_newest() {
        assert_eq!(backups_to_keep(&catalog(), &policy(Some(2), None, 1), at(20)), ids(&[7, 9]));
        assert_eq!(backups_to_keep(&catalog(), &policy(Some(9), None, 1), at(20)), ids(&[1, 3, 5, 7, 9]));
    }

    #[test]
    fn window_days_keeps_what_restores_to_every_point_of_the_window() {
        // Window from March 6, 02:00: backups 7 and 9 end inside it; reaching
        // March 6 itself needs the one of March 5.
        assert_eq!(backups_to_keep(&catalog(), &policy(None, Some(3), 1), at(9)), ids(&[5, 7, 9]));
        // A window starting exactly at a backup's end needs nothing older.
        assert_eq!(backups_to_keep(&catalog(), &policy(None, Some(4), 1), at(9)), ids(&[5, 7, 9]));
        // All backups are older than the window: the newest one covers it.
        assert_eq!(backups_to_keep(&catalog(), &policy(None, Some(2), 1), at(25)), ids(&[9]));
    }

    #[test]
    fn full_backups_and_window_days_keep_the_union() {
        assert_eq!(backups_to_keep(&catalog(), &policy(Some(4), Some(3), 1), at(9)), ids(&[3, 5, 7, 9]));
        assert_eq!(backups_to_keep(&catalog(), &policy(Some(1), Some(5), 1), at(9)), ids(&[3, 5, 7, 9]));
    }

    #[test]
    fn min_backups_is_a_floor() {
        assert_eq!(backups_to_keep(&catalog(), &policy(Some(1), None, 3), at(20)), ids(&[5, 7, 9]));
        assert_eq!(backups_to_keep(&catalog(), &policy(None, Some(1), 2), at(30)), ids(&[7, 9]));
    }

    #[test]
    fn the_plan_deletes_only_what_no_kept_backup_needs() {
        let c = catalog();
        let mut objects: Vec<ObjectMeta> = Vec::new();
        let obj = |key: String| ObjectMeta { key, size: 7, modified: None };
        for b in &c.backups {
            objects.push(obj(format!("backups/{}/manifest.json", b.backup_id)));
            objects.push(obj(format!("backups/{}/files.sealed", b.backup_id)));
        }
        objects.push(obj("backups/20260310T020000Z/files.sealed".into()));
        for p in ["p1", "p2", "p3", "p4", "p5"] {
            objects.push(obj(layout::pack_key(p)));
            objects.push(obj(layout::pack_index_key(p)));
        }
        for e in &c.wal {
            objects.push(obj(layout::wal_key(&e.file)));
        }
        let plan = plan(&c, &policy(Some(2), None, 1), &objects, at(20));
        assert_eq!(plan.kept_backups, ids(&[7, 9]));
        assert_eq!(plan.expired_backups, ids(&[1, 3, 5]));
        assert_eq!(plan.incomplete_backups, vec!["20260310T020000Z".to_string()]);
        assert_eq!(plan.manifests.len(), 3);
        assert_eq!(plan.backup_objects.len(), 4, "{:?}", plan.backup_objects);
        // WAL before the oldest kept backup's first segment (40) goes.
        let first_kept = layout::wal_key(&WalSegmentName::new(1, 40, SEG).to_string());
        assert_eq!(plan.wal.len(), 30);
        assert!(!plan.wal.contains(&first_kept));
        assert!(plan.wal.contains(&layout::wal_key(&WalSegmentName::new(1, 39, SEG).to_string())));
        // p3 and p4 are used by kept backups (p3 by both, p4 partly shared); p1, p2, p5 go.
        let gone: Vec<&str> = plan.packs.iter().map(|k| k.rsplit('/').next().unwrap()).collect();
        assert_eq!(gone, vec!["p1.pack", "p2.pack", "p5.pack"]);
        assert_eq!(plan.pack_indexes.len(), 3);
        assert_eq!(plan.bytes, 7 * plan.objects() as u64);
    }
}
