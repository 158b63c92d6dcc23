//! The catalog: what the repository holds, computed from the repository alone.
//! Backups (signed manifests), WAL segments per timeline, timeline ancestry
//! (from the switch points recorded with each history file), gaps, and the
//! recoverable window: from each usable backup's consistency point to the end of
//! the unbroken WAL after it.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;

use super::descriptor::LoadedDescriptor;
use super::manifest::BackupManifest;
use super::wal::{WalArchive, WalEntry};
use super::{RepoError, layout};
use crate::pg::lsn::{HistoryEntry, Lsn, TimelineId, WalFileKind, WalSegmentName};
use crate::storage::{self, Store};

#[derive(Debug, Clone)]
pub struct Catalog {
    pub seg_size: u64,
    /// Verified backups, oldest first (by end LSN, then end time).
    pub backups: Vec<BackupManifest>,
    /// Backups whose manifest exists but does not verify: (id, reason).
    pub broken: Vec<(String, String)>,
    /// Backup directories without a manifest (interrupted or in progress).
    pub incomplete: Vec<String>,
    pub wal: Vec<WalEntry>,
    /// Complete segments per timeline.
    pub segments: BTreeMap<TimelineId, BTreeSet<u64>>,
    /// The streamer's copy of the segment in progress, per timeline: (segno, valid bytes, stored at).
    pub streaming: BTreeMap<TimelineId, (u64, u64, chrono::DateTime<chrono::Utc>)>,
    /// Switch points of each timeline's history file, by timeline.
    pub histories: BTreeMap<TimelineId, Vec<HistoryEntry>>,
    /// When the newest segment of each timeline was stored.
    pub last_stored: BTreeMap<TimelineId, (u64, chrono::DateTime<chrono::Utc>)>,
    /// When each complete segment was stored.
    pub stored_at: BTreeMap<(TimelineId, u64), chrono::DateTime<chrono::Utc>>,
}

/// A stretch of recoverable history on one timeline path.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Window {
    pub timeline: TimelineId,
    pub backup_id: String,
    pub start_lsn: Lsn,
    pub start_time: chrono::DateTime<chrono::Utc>,
    pub end_lsn: Lsn,
    /// When the last WAL of the window was stored (an upper bound of its commits' times).
    pub end_time: Option<chrono::DateTime<chrono::Utc>>,
    /// The first segment missing after the window, if the WAL stops at a gap
    /// rather than at the newest segment.
    pub gap_at: Option<String>,
}

impl Catalog {
    pub async fn load(store: &Store, desc: &LoadedDescriptor, parallel: usize) -> Result<Catalog, RepoError> {
        let seg_size = desc.descriptor.cluster.wal_segment_size;
        let archive = WalArchive::new(store.clone(), std::sync::Arc::new(desc.clone()), None);
        let (backups, wal) = tokio::try_join!(load_backups(store, desc, parallel), archive.list())?;
        let (backups, broken, incomplete) = backups;
        let mut segments: BTreeMap<TimelineId, BTreeSet<u64>> = BTreeMap::new();
        let mut streaming = BTreeMap::new();
        let mut last_stored: BTreeMap<TimelineId, (u64, chrono::DateTime<chrono::Utc>)> = BTreeMap::new();
        let mut stored_at = BTreeMap::new();
        for e in &wal {
            let Some(name) = WalSegmentName::parse(&e.file[..e.file.len().min(24)], seg_size) else { continue };
            match (e.kind, e.streaming) {
                (WalFileKind::Segment, false) => {
                    segments.entry(name.tli).or_default().insert(name.segno);
                    if let Some(m) = e.modified {
                        stored_at.insert((name.tli, name.segno), m);
                        let slot = last_stored.entry(name.tli).or_insert((name.segno, m));
                        if name.segno >= slot.0 {
                            *slot = (name.segno, m);
                        }
                    }
                }
                (WalFileKind::Segment, true) => {
                    if let Some(h) = archive.streaming_header(&e.file).await? {
                        streaming.insert(name.tli, (name.segno, h.record.valid_bytes.unwrap_or(0), h.record.created_at));
                    }
                }
                _ => {}
            }
        }
        // A streaming copy older than a complete segment of the same number is stale.
        streaming.retain(|tli, (segno, _, _)| segments.get(tli).is_none_or(|s| !s.contains(segno)));
        let histories = archive.histories().await?.into_iter().collect();
        Ok(Catalog { seg_size, backups, broken, incomplete, wal, segments, streaming, histories, last_stored, stored_at })
    }

    /// Timelines with WAL or backups, ascending.
    pub fn timelines(&self) -> Vec<TimelineId> {
        let mut t: BTreeSet<TimelineId> = self.segments.keys().copied().collect();
        t.extend(self.streaming.keys());
        t.extend(self.histories.keys());
        t.extend(self.backups.iter().map(|b| b.end_timeline));
        t.into_iter().collect()
    }

    /// The timeline being written: the one whose WAL reached the repository
    /// last. (The highest-numbered timeline can be an abandoned branch, e.g. a
    /// test restore that was promoted and archived into this repository.)
    ///
    /// A history file counts as WAL of its timeline: right after a promotion
    /// the new timeline has stored its history but maybe no segment yet, and
    /// the old timeline's tail may hold writes the promoted server never had.
    pub fn latest_timeline(&self) -> Option<TimelineId> {
        let histories = self
            .wal
            .iter()
            .filter(|e| e.kind == WalFileKind::History)
            .filter_map(|e| Some((e.modified?, u32::from_str_radix(e.file.strip_suffix(".history")?, 16).ok()?)));
        let newest = self
            .last_stored
            .iter()
            .map(|(t, (_, at))| (*at, *t))
            .chain(self.streaming.iter().map(|(t, (_, _, at))| (*at, *t)))
            .chain(histories)
            .max();
        newest.map(|(_, t)| t).or_else(|| self.timelines().into_iter().max())
    }

    /// The ancestry of `tli`: (timeline, LSN where it begins), oldest first,
    /// ending with `tli` itself.
    pub fn ancestry(&self, tli: TimelineId) -> Vec<(TimelineId, Lsn)> {
        let mut out = Vec::new();
        let mut begin = Lsn(0);
        if let Some(entries) = self.histories.get(&tli) {
            for e in entries {
                out.push((e.tli, begin));
                begin = e.switch_lsn;
            }
        }
        out.push((tli, begin));
        out
    }

    /// Where timeline `t` ends on the path to `target`, if it is an ancestor.
    fn end_on_path(path: &[(TimelineId, Lsn)], t: TimelineId) -> Option<Lsn> {
        let i = path.iter().position(|(x, _)| *x == t)?;
        Some(path.get(i + 1).map(|(_, begin)| *begin).unwrap_or(Lsn(u64::MAX)))
    }

    /// The timeline PostgreSQL reads segment `segno` from when recovering along `path`
    /// (the newest timeline that begins at or before that segment).
    pub fn timeline_of_segment(&self, path: &[(TimelineId, Lsn)], segno: u64) -> TimelineId {
        path.iter().rev().find(|(_, begin)| begin.segno(self.seg_size) <= segno).map(|(t, _)| *t).unwrap_or(path[0].0)
    }

    /// Whether the backup lies on the path (its timeline is an ancestor and its
    /// end comes before that timeline was left).
    pub fn backup_on_path(&self, b: &BackupManifest, path: &[(TimelineId, Lsn)]) -> bool {
        Self::end_on_path(path, b.end_timeline).is_some_and(|end| b.end_lsn <= end)
    }

    /// Follows WAL from `from` along `path`; returns the end of unbroken WAL and
    /// the first missing segment (None when the WAL simply ends with the newest).
    pub fn wal_reach(&self, path: &[(TimelineId, Lsn)], from: u64) -> (Lsn, Option<WalSegmentName>) {
        let mut segno = from;
        loop {
            let tli = self.timeline_of_segment(path, segno);
            if self.segments.get(&tli).is_some_and(|s| s.contains(&segno)) {
                segno += 1;
                continue;
            }
            if let Some((s, valid, _)) = self.streaming.get(&tli)
                && *s == segno
            {
                return (Lsn(segno * self.seg_size + valid), None);
            }
            let reach = Lsn(segno * self.seg_size);
            // Is there WAL beyond this point on the path? Then this is a gap.
            let later = path.iter().any(|(t, _)| {
                self.segments.get(t).is_some_and(|s| s.range(segno + 1..).next().is_some())
                    || self.streaming.get(t).is_some_and(|(s, _, _)| *s > segno)
            });
            let missing = WalSegmentName::new(tli, segno, self.seg_size);
            return (reach, later.then_some(missing));
        }
    }

    /// The recoverable windows when recovering along timeline `tli`, one per
    /// usable backup, oldest first.
    pub fn windows(&self, tli: TimelineId) -> Vec<Window> {
        let path = self.ancestry(tli);
        let mut out = Vec::new();
        for b in self.backups.iter().filter(|b| self.backup_on_path(b, &path)) {
            let Some(first) = WalSegmentName::parse(&b.wal_first, self.seg_size) else { continue };
            let (reach, gap) = self.wal_reach(&path, first.segno);
            if reach < b.end_lsn {
                continue;
            }
            // The window ends when the last WAL it reaches was stored.
            let last_segno = reach.0.saturating_sub(1) / self.seg_size;
            let reach_tli = self.timeline_of_segment(&path, last_segno);
            let end_time = self
                .streaming
                .get(&reach_tli)
                .filter(|(s, _, _)| *s == last_segno)
                .map(|(_, _, t)| *t)
                .or_else(|| self.stored_at.get(&(reach_tli, last_segno)).copied());
            out.push(Window {
                timeline: tli,
                backup_id: b.backup_id.clone(),
                start_lsn: b.end_lsn,
                start_time: b.end_time,
                end_lsn: reach,
                end_time,
                gap_at: gap.map(|g| g.to_string()),
            });
        }
        out
    }

    /// Gaps per timeline: missing segment ranges between the first and last present.
    pub fn gaps(&self) -> BTreeMap<TimelineId, Vec<(u64, u64)>> {
        let mut out = BTreeMap::new();
        for (tli, segs) in &self.segments {
            let mut gaps = Vec::new();
            let mut prev: Option<u64> = None;
            for &s in segs {
                if let Some(p) = prev
                    && s > p + 1
                {
                    gaps.push((p + 1, s - 1));
                }
                prev = Some(s);
            }
            if !gaps.is_empty() {
                out.insert(*tli, gaps);
            }
        }
        out
    }

    /// Contiguous ranges of complete segments per timeline, as (first, last) names.
    pub fn ranges(&self) -> BTreeMap<TimelineId, Vec<(String, String)>> {
        let mut out = BTreeMap::new();
        for (tli, segs) in &self.segments {
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            for &s in segs {
                match ranges.last_mut() {
                    Some(r) if r.1 + 1 == s => r.1 = s,
                    _ => ranges.push((s, s)),
                }
            }
            let names = ranges
                .into_iter()
                .map(|(a, b)| {
                    (WalSegmentName::new(*tli, a, self.seg_size).to_string(), WalSegmentName::new(*tli, b, self.seg_size).to_string())
                })
                .collect();
            out.insert(*tli, names);
        }
        out
    }

    pub fn backup(&self, id: &str) -> Option<&BackupManifest> {
        self.backups.iter().find(|b| b.backup_id == id)
    }
}

type LoadedBackups = (Vec<BackupManifest>, Vec<(String, String)>, Vec<String>);

async fn load_backups(store: &Store, desc: &LoadedDescriptor, parallel: usize) -> Result<LoadedBackups, RepoError> {
    let objects = storage::list_all(store.as_ref(), layout::BACKUP_PREFIX).await?;
    let mut ids: BTreeMap<String, bool> = BTreeMap::new();
    for o in &objects {
        let Some(rest) = o.key.strip_prefix(layout::BACKUP_PREFIX) else { continue };
        let Some((id, file)) = rest.split_once('/') else { continue };
        let has = ids.entry(id.to_string()).or_insert(false);
        if file == "manifest.json" {
            *has = true;
        }
    }
    let incomplete: Vec<String> = ids.iter().filter(|(_, has)| !**has).map(|(id, _)| id.clone()).collect();
    let with_manifest: Vec<String> = ids.into_iter().filter(|(_, has)| *has).map(|(id, _)| id).collect();
    let trusted = desc.trusted_key;
    let loaded: Vec<(String, Result<BackupManifest, RepoError>)> = futures::stream::iter(with_manifest)
        .map(|id| async move {
            let r = async {
                let raw = storage::get_bytes(store.as_ref(), &layout::backup_manifest_key(&id), None).await?;
                BackupManifest::from_document(&raw, &trusted, &id)
            }
            .await;
            (id, r)
        })
        .buffer_unordered(parallel.max(1))
        .collect()
        .await;
    let mut backups = Vec::new();
    let mut broken = Vec::new();
    for (id, r) in loaded {
        match r {
            Ok(m) => backups.push(m),
            Err(RepoError::Storage(e)) if e.kind() != storage::StorageErrorKind::NotFound => return Err(RepoError::Storage(e)),
            Err(e) => broken.push((id, e.to_string())),
        }
    }
    backups.sort_by_key(|a| (a.end_lsn, a.end_time));
    Ok((backups, broken, incomplete))
}
