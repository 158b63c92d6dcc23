//! Retention: which backups to keep, and so which WAL, packs and leftovers can
//! go. Nothing a kept backup needs is ever selected: its manifest, file lists,
//! every pack it references, and the WAL from its first segment on.

use std::collections::{BTreeSet, HashSet};

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
        // Every backup that ended inside the window, and the newest one before it,
        // so that every point of the window stays reachable.
        keep.extend(catalog.backups.iter().filter(|b| b.end_time >= cutoff).map(|b| b.backup_id.as_str()));
        if let Some(b) = catalog.backups.iter().rev().find(|b| b.end_time < cutoff) {
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
    let size = |key: &str| objects.iter().find(|o| o.key == key).map(|o| o.size).unwrap_or(0);

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
