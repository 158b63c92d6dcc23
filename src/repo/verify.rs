//! The audit behind `walvault verify`. Without the identity it checks every
//! signature, re-reads every object and compares its blake3 with the signed
//! value, follows the WAL chain and continuity on every timeline (counting only
//! WAL objects that verified), and says for each backup whether it can be
//! restored. With the identity (`deep`) it also decrypts everything: file
//! lists, every chunk (against its keyed id) and each file's plain blake3, and
//! every WAL file's plaintext checksum and page headers.
//!
//! It reads the repository itself rather than through the catalog, so that a
//! damaged object becomes a finding in the report instead of an error that
//! stops the audit. `compare` checks a report against an earlier one, which is
//! how an auditor detects what an attacker removed (docs/REPOSITORY.md).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::catalog::Catalog;
use super::descriptor::LoadedDescriptor;
use super::manifest::BackupManifest;
use super::pack::{PackInfo, parse_index};
use super::record::WalRecord;
use super::wal::{STREAMING_SUFFIX, WalArchive, WalEntry, parse_hash, split_header};
use super::{RepoError, layout};
use crate::pg::WalSegmentName;
use crate::pg::lsn::{TimelineId, WalFileKind, classify_wal_file};
use crate::pg::walheader;
use crate::pipeline::{Expected, Opener, cpu_pool};
use crate::storage::{self, ObjectMeta, StorageErrorKind, Store};

/// One finding. `kind` is one of the values listed in docs/JSON.md; `key` is
/// the object at fault (relative to the repository root).
#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub key: String,
    pub kind: &'static str,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackupVerdict {
    pub id: String,
    pub end_time: Option<chrono::DateTime<chrono::Utc>>,
    pub end_lsn: Option<String>,
    pub timeline: Option<TimelineId>,
    pub restorable: bool,
    /// Why it is not restorable (empty when it is).
    pub reasons: Vec<String>,
    /// The first WAL segment missing after the backup when the WAL stops at a
    /// gap rather than at the newest segment: replay from this backup ends there.
    pub replay_stops_at: Option<String>,
}

/// Objects read and checked, by kind (the same kinds as `info --json`'s
/// `repository.objects`), and the bytes read to check them.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Checked {
    pub total: u64,
    pub wal: u64,
    pub packs: u64,
    pub pack_indexes: u64,
    pub backup_objects: u64,
    /// The descriptor.
    pub other: u64,
    pub bytes_read: u64,
}

/// What `--deep` opened.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct DeepChecked {
    /// Files of backups rebuilt in memory and compared with their plain blake3.
    pub files: u64,
    /// Their plaintext bytes.
    pub file_bytes: u64,
    /// WAL files decrypted and compared with their plain blake3 (segments also
    /// have their page headers checked).
    pub wal_files: u64,
}

/// The state of the repository as this run saw it, for comparison by a later run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Inventory {
    pub descriptor_generation: u64,
    pub descriptor_blake3: String,
    /// Backups with a valid manifest, oldest first.
    pub backups: Vec<InventoryBackup>,
    pub timelines: Vec<TimelineInventory>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InventoryBackup {
    pub id: String,
    /// blake3 of the signed manifest document: a backup rewritten under the
    /// same id (by a holder of the signing key) shows as another checksum.
    pub manifest_blake3: String,
    pub end_time: chrono::DateTime<chrono::Utc>,
    pub end_lsn: String,
    pub timeline: TimelineId,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TimelineInventory {
    pub timeline: TimelineId,
    /// Oldest and newest complete segment stored (whatever their state).
    pub first_segment: Option<String>,
    pub last_segment: Option<String>,
    pub segments: u64,
    /// Whether the timeline's history file is stored.
    pub history: bool,
    /// When the newest segment was stored.
    pub newest_stored_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The plain blake3 the newest segment's record gives, when it verified.
    /// Records link to their predecessor's, so rewriting older WAL means
    /// rewriting this one too.
    pub last_segment_plain_blake3: Option<String>,
}

pub struct VerifyOptions {
    pub deep: Option<Opener>,
    pub backup: Option<String>,
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    pub parallel: usize,
    pub progress: Option<Arc<dyn Fn(u64) + Send + Sync>>,
    /// An earlier report's inventory and trusted key, to compare with.
    pub previous: Option<(Inventory, String)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub checked: Checked,
    pub deep: Option<DeepChecked>,
    pub backups: Vec<BackupVerdict>,
    pub wal_segments: u64,
    pub problems: Vec<Problem>,
    /// Findings that do not make the repository less than intact (an
    /// interrupted backup's leftovers, a pack nothing refers to).
    pub warnings: Vec<Problem>,
    pub inventory: Inventory,
    /// With `previous`: what changed since, besides problems.
    pub changes: Option<Changes>,
}

struct Ctx<'a> {
    store: &'a Store,
    desc: &'a LoadedDescriptor,
    bytes: AtomicU64,
    progress: Option<Arc<dyn Fn(u64) + Send + Sync>>,
}

impl Ctx<'_> {
    fn read(&self, n: u64) {
        let total = self.bytes.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(p) = &self.progress {
            p(total);
        }
    }
}

pub fn problem(kind: &'static str, key: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem { kind, key: key.into(), message: message.into() }
}

/// Maps an error on one object to a problem of the right kind.
pub fn classify(key: &str, e: &crate::Error) -> Problem {
    match e.root() {
        crate::Error::Repo(RepoError::BadSignature { .. }) => problem("bad_signature", key, e.to_string()),
        crate::Error::Repo(RepoError::UntrustedSigner { .. }) => problem("untrusted_signer", key, e.to_string()),
        crate::Error::Storage(s) | crate::Error::Repo(RepoError::Storage(s)) if s.kind() == StorageErrorKind::NotFound => {
            problem("missing", key, "the object is missing")
        }
        crate::Error::Seal(s) | crate::Error::Repo(RepoError::Seal(s)) if s.is_integrity() => {
            problem("checksum_mismatch", key, e.to_string())
        }
        _ => problem("corrupt", key, e.to_string()),
    }
}

/// What an object key is, by the layout of docs/REPOSITORY.md.
enum ObjectClass<'a> {
    Descriptor,
    Wal,
    Pack(&'a str),
    PackIndex,
    BackupManifest(&'a str),
    BackupObject(&'a str),
    Other,
}

fn class_of(key: &str) -> ObjectClass<'_> {
    if key == layout::DESCRIPTOR {
        return ObjectClass::Descriptor;
    }
    if key.starts_with(layout::WAL_PREFIX) {
        return ObjectClass::Wal;
    }
    if let Some(rest) = key.strip_prefix(layout::PACK_PREFIX) {
        let file = rest.rsplit('/').next().unwrap_or(rest);
        if let Some(id) = file.strip_suffix(".pack") {
            return ObjectClass::Pack(id);
        }
        if file.ends_with(".idx") {
            return ObjectClass::PackIndex;
        }
        return ObjectClass::Other;
    }
    if let Some(rest) = key.strip_prefix(layout::BACKUP_PREFIX) {
        return match rest.split_once('/') {
            Some((id, "manifest.json")) => ObjectClass::BackupManifest(id),
            Some((id, _)) => ObjectClass::BackupObject(id),
            None => ObjectClass::Other,
        };
    }
    ObjectClass::Other
}

/// An object to read: one whose size and blake3 a signed document gives, or a WAL object.
enum Job<'o> {
    Stored { key: String, size: u64, hash: String, kind: &'static str },
    Wal(&'o ObjectMeta),
}

impl Job<'_> {
    fn size(&self) -> u64 {
        match self {
            Job::Stored { size, .. } => *size,
            Job::Wal(o) => o.size,
        }
    }
}

enum Done<'o> {
    Stored(&'static str, Result<(), Problem>),
    Wal(&'o ObjectMeta, Result<WalRecord, Problem>),
}

/// The audit. `desc` was loaded (and its signature checked) by the caller.
pub async fn verify(store: &Store, desc: &LoadedDescriptor, opts: &VerifyOptions) -> Result<Outcome, crate::Error> {
    let ctx = Ctx { store, desc, bytes: AtomicU64::new(0), progress: opts.progress.clone() };
    let seg_size = desc.descriptor.cluster.wal_segment_size;
    let generation = desc.descriptor.generation;
    let parallel = opts.parallel.max(1);
    let objects = storage::list_all(store.as_ref(), "").await?;
    let listed: HashMap<&str, &ObjectMeta> = objects.iter().map(|o| (o.key.as_str(), o)).collect();
    let mut problems: Vec<Problem> = Vec::new();
    let mut warnings: Vec<Problem> = Vec::new();
    let mut checked = Checked::default();
    // The newest descriptor generation any signed object says it was written under.
    let mut newest_generation: Option<(u64, String)> = None;
    let mut saw_generation = |g: u64, key: &str| {
        if g > generation && newest_generation.as_ref().is_none_or(|(n, _)| g > *n) {
            newest_generation = Some((g, key.to_string()));
        }
    };

    // The descriptor: its signature was checked when it was loaded.
    if let Some(o) = listed.get(layout::DESCRIPTOR) {
        checked.total += 1;
        checked.other += 1;
        ctx.read(o.size);
    }

    // Backup manifests: all of them (they are small), whatever the scope.
    let mut backup_dirs: BTreeMap<&str, bool> = BTreeMap::new();
    for o in &objects {
        match class_of(&o.key) {
            ObjectClass::BackupManifest(id) => {
                backup_dirs.insert(id, true);
            }
            ObjectClass::BackupObject(id) => {
                backup_dirs.entry(id).or_insert(false);
            }
            _ => {}
        }
    }
    type Loaded = (String, Result<(BackupManifest, String), crate::Error>);
    let loaded: Vec<Loaded> = futures::stream::iter(backup_dirs.iter().filter(|(_, has)| **has).map(|(id, _)| id.to_string()))
        .map(|id| {
            let ctx = &ctx;
            async move {
                let key = layout::backup_manifest_key(&id);
                let r = async {
                    let raw = storage::get_bytes(ctx.store.as_ref(), &key, None).await?;
                    ctx.read(raw.len() as u64);
                    let m = BackupManifest::from_document(&raw, &ctx.desc.trusted_key, &id)?;
                    Ok::<_, crate::Error>((m, blake3::hash(&raw).to_hex().to_string()))
                }
                .await;
                (id, r)
            }
        })
        .buffer_unordered(parallel)
        .collect()
        .await;
    let mut manifests: Vec<BackupManifest> = Vec::new();
    let mut manifest_hashes: HashMap<String, String> = HashMap::new();
    let mut broken: Vec<(String, Problem)> = Vec::new();
    for (id, r) in loaded {
        let key = layout::backup_manifest_key(&id);
        match r {
            Ok((m, hash)) => {
                manifest_hashes.insert(id.clone(), hash);
                checked.total += 1;
                checked.backup_objects += 1;
                saw_generation(m.descriptor_generation, &key);
                if m.system_identifier != desc.descriptor.cluster.system_identifier {
                    broken.push((id, problem("other_cluster", &key, format!("manifest of cluster {}", m.system_identifier))));
                } else {
                    manifests.push(m);
                }
            }
            Err(e) => {
                let p = classify(&key, &e);
                if p.kind != "missing" {
                    checked.total += 1;
                    checked.backup_objects += 1;
                }
                broken.push((id, p));
            }
        }
    }
    manifests.sort_by_key(|m| (m.end_lsn, m.end_time));
    for (id, _) in backup_dirs.iter().filter(|(_, has)| !**has) {
        warnings.push(problem(
            "incomplete_backup",
            layout::backup_prefix(id),
            "a backup directory without a manifest (an interrupted or running backup): not restorable, removed by `walvault expire`",
        ));
    }

    // Which backups and WAL are in scope.
    let in_scope: Vec<&BackupManifest> = manifests
        .iter()
        .filter(|b| opts.backup.as_ref().is_none_or(|id| &b.backup_id == id))
        .filter(|b| opts.since.is_none_or(|t| b.end_time >= t))
        .collect();
    if let Some(id) = &opts.backup
        && in_scope.is_empty()
        && !broken.iter().any(|(b, _)| b == id)
    {
        return Err(crate::Error::Usage(format!("no backup {id} in the repository (see `walvault info`)")));
    }
    let whole = opts.backup.is_none() && opts.since.is_none();
    let broken_in_scope: Vec<&(String, Problem)> = broken.iter().filter(|(id, _)| whole || opts.backup.as_ref() == Some(id)).collect();
    problems.extend(broken_in_scope.iter().map(|(_, p)| p.clone()));

    // Pack indexes, when the whole repository is audited.
    let mut index_info: HashMap<String, PackInfo> = HashMap::new();
    if whole {
        let keys: Vec<String> =
            objects.iter().filter(|o| matches!(class_of(&o.key), ObjectClass::PackIndex)).map(|o| o.key.clone()).collect();
        let results: Vec<(String, Result<super::pack::PackIndex, crate::Error>)> = futures::stream::iter(keys)
            .map(|key| {
                let ctx = &ctx;
                async move {
                    let r = async {
                        let raw = storage::get_bytes(ctx.store.as_ref(), &key, None).await?;
                        ctx.read(raw.len() as u64);
                        Ok::<_, crate::Error>(parse_index(&raw, &ctx.desc.trusted_key, &key)?)
                    }
                    .await;
                    (key, r)
                }
            })
            .buffer_unordered(parallel)
            .collect()
            .await;
        for (key, r) in results {
            let r = r.map_err(|e| classify(&key, &e));
            if !matches!(&r, Err(p) if p.kind == "missing") {
                checked.total += 1;
                checked.pack_indexes += 1;
            }
            match r {
                Ok(idx) if layout::pack_index_key(&idx.pack.id) != key => problems.push(problem(
                    "wrong_object",
                    &key,
                    format!("holds the signed index of pack {} (objects were swapped or replaced)", idx.pack.id),
                )),
                Ok(idx) => {
                    index_info.insert(idx.pack.id.clone(), idx.pack);
                }
                Err(p) => problems.push(p),
            }
        }
    }

    // Packs and sealed backup objects, each against its signed size and checksum.
    let mut pack_expect: BTreeMap<&str, &PackInfo> = BTreeMap::new();
    for b in &in_scope {
        for p in &b.packs {
            pack_expect.insert(&p.id, p);
        }
    }
    let mut to_hash: Vec<(String, u64, String, &'static str)> = Vec::new();
    for (id, info) in &pack_expect {
        to_hash.push((layout::pack_key(id), info.size, info.blake3.clone(), "pack"));
        if whole {
            let idx_key = layout::pack_index_key(id);
            match index_info.get(*id) {
                Some(i) if i != *info => problems.push(problem(
                    "corrupt",
                    &idx_key,
                    format!(
                        "the index says {} bytes with blake3 {}; the manifests say {} bytes with blake3 {}",
                        i.size, i.blake3, info.size, info.blake3
                    ),
                )),
                Some(_) => {}
                None if !listed.contains_key(idx_key.as_str()) => {
                    problems.push(problem("missing", &idx_key, "the index of a pack a backup uses is missing"))
                }
                None => {} // present but did not verify: reported above
            }
        }
    }
    if whole {
        for o in &objects {
            let ObjectClass::Pack(id) = class_of(&o.key) else { continue };
            if pack_expect.contains_key(id) {
                continue;
            }
            match index_info.get(id) {
                // A pack no backup uses yet (an interrupted backup's, re-used by the next one).
                Some(info) => to_hash.push((o.key.clone(), info.size, info.blake3.clone(), "pack")),
                None if !listed.contains_key(layout::pack_index_key(id).as_str()) => warnings.push(problem(
                    "orphan_pack",
                    &o.key,
                    "no manifest or index vouches for this pack (left by an interrupted backup or expire); `walvault expire` removes it",
                )),
                None => {}
            }
        }
        for id in index_info.keys() {
            if !pack_expect.contains_key(id.as_str()) && !listed.contains_key(layout::pack_key(id).as_str()) {
                warnings.push(problem(
                    "orphan_index",
                    layout::pack_index_key(id),
                    "the index of a pack that is not stored and no backup uses",
                ));
            }
        }
    }
    for b in &in_scope {
        for s in std::iter::once(&b.files).chain(b.server_manifest.iter()) {
            to_hash.push((s.key.clone(), s.stored_len, s.stored_blake3.clone(), "backup_object"));
        }
    }
    // WAL: every object's record and stored checksum, in scope.
    let min_segno = if whole {
        0
    } else {
        in_scope.iter().filter_map(|b| WalSegmentName::parse(&b.wal_first, seg_size)).map(|s| s.segno).min().unwrap_or(u64::MAX)
    };
    let wal_in_scope: Vec<&ObjectMeta> = objects
        .iter()
        .filter(|o| matches!(class_of(&o.key), ObjectClass::Wal))
        .filter(|o| {
            let name = o.key.rsplit('/').next().unwrap_or("");
            whole
                || WalSegmentName::parse(&name[..24.min(name.len())], seg_size).is_none_or(|s| s.segno >= min_segno)
                || opts.since.is_some_and(|t| o.modified.is_some_and(|m| m >= t))
        })
        .collect();
    let expected_wal = WalArchive::new(store.clone(), Arc::new(desc.clone()), None).expected_wal();
    let opener = opts.deep.clone();

    // One queue for both, biggest first, so that no core idles while the
    // last big pack is hashed alone.
    let mut jobs: Vec<Job> = to_hash.into_iter().map(|(key, size, hash, kind)| Job::Stored { key, size, hash, kind }).collect();
    jobs.extend(wal_in_scope.into_iter().map(Job::Wal));
    jobs.sort_by_key(|j| std::cmp::Reverse(j.size()));
    let done: Vec<Done> = futures::stream::iter(jobs)
        .map(|job| {
            let (ctx, listed, opener, expected_wal) = (&ctx, &listed, opener.clone(), &expected_wal);
            async move {
                match job {
                    Job::Stored { key, size, hash, kind } => {
                        Done::Stored(kind, check_stored_hash(ctx, &key, size, &hash, listed.get(key.as_str()).copied()).await)
                    }
                    Job::Wal(o) => Done::Wal(o, check_wal_object(ctx, &o.key, opener.as_ref(), expected_wal).await),
                }
            }
        })
        .buffer_unordered(parallel)
        .collect()
        .await;
    let mut results = Vec::new();
    for d in done {
        match d {
            Done::Stored(kind, r) => {
                if !matches!(&r, Err(p) if p.kind == "missing") {
                    checked.total += 1;
                    match kind {
                        "pack" => checked.packs += 1,
                        _ => checked.backup_objects += 1,
                    }
                }
                if let Err(p) = r {
                    problems.push(p);
                }
            }
            Done::Wal(o, r) => results.push((o, r)),
        }
    }
    let mut deep_wal = 0;
    let mut verified_wal: Vec<(&ObjectMeta, WalRecord)> = Vec::new();
    for (o, r) in results {
        if !matches!(&r, Err(p) if p.kind == "missing") {
            checked.total += 1;
            checked.wal += 1;
        }
        match r {
            Ok(rec) => {
                saw_generation(rec.descriptor_generation, &o.key);
                if opts.deep.is_some() {
                    deep_wal += 1;
                }
                verified_wal.push((o, rec));
            }
            Err(p) => problems.push(p),
        }
    }

    // The catalog of what verified: continuity is computed on it, so a WAL
    // object that failed counts as missing.
    let mut catalog = Catalog {
        seg_size,
        backups: manifests.clone(),
        broken: broken.iter().map(|(id, p)| (id.clone(), p.message.clone())).collect(),
        incomplete: backup_dirs.iter().filter(|(_, has)| !**has).map(|(id, _)| id.to_string()).collect(),
        wal: Vec::new(),
        segments: BTreeMap::new(),
        streaming: BTreeMap::new(),
        histories: BTreeMap::new(),
        last_stored: BTreeMap::new(),
        stored_at: BTreeMap::new(),
    };
    let mut records: BTreeMap<(TimelineId, u64), &WalRecord> = BTreeMap::new();
    for (o, rec) in &verified_wal {
        let streaming = o.key.ends_with(STREAMING_SUFFIX);
        let Some(kind) = classify_wal_file(&rec.file) else { continue };
        catalog.wal.push(WalEntry { file: rec.file.clone(), kind, size: o.size, modified: o.modified, streaming });
        if kind == WalFileKind::History {
            if let Some(tli) = rec.file.strip_suffix(".history").and_then(|t| u32::from_str_radix(t, 16).ok()) {
                catalog.histories.insert(tli, rec.history.clone().unwrap_or_default());
            }
            continue;
        }
        let Some(name) = WalSegmentName::parse(&rec.file[..rec.file.len().min(24)], seg_size) else { continue };
        match (kind, streaming) {
            (WalFileKind::Segment, false) => {
                catalog.segments.entry(name.tli).or_default().insert(name.segno);
                records.insert((name.tli, name.segno), rec);
                if let Some(m) = o.modified {
                    catalog.stored_at.insert((name.tli, name.segno), m);
                    let slot = catalog.last_stored.entry(name.tli).or_insert((name.segno, m));
                    if name.segno >= slot.0 {
                        *slot = (name.segno, m);
                    }
                }
            }
            (WalFileKind::Segment, true) => {
                catalog.streaming.insert(name.tli, (name.segno, rec.valid_bytes.unwrap_or(0), rec.created_at));
            }
            _ => {}
        }
    }
    let complete = catalog.segments.clone();
    catalog.streaming.retain(|tli, (segno, _, _)| complete.get(tli).is_none_or(|s| !s.contains(segno)));
    let wal_segments = records.len() as u64;

    // The chain: each record names the plaintext checksum of its predecessor.
    for ((tli, segno), rec) in &records {
        let Some(link) = &rec.prev else { continue };
        if let Some(prev) = segno.checked_sub(1).and_then(|p| records.get(&(*tli, p)))
            && &prev.plain_blake3 != link
        {
            problems.push(problem(
                "chain_broken",
                WalArchive::key_of(&rec.file),
                format!("its record links to a previous segment with blake3 {link}, but {} has {}", prev.file, prev.plain_blake3),
            ));
        }
    }

    // Timeline history files and gaps inside each timeline's stored range.
    for tli in catalog.timelines() {
        let key = layout::history_key(tli);
        if tli > 1 && !catalog.histories.contains_key(&tli) && !listed.contains_key(key.as_str()) {
            problems.push(problem("missing_history", key, format!("timeline {tli} has WAL or backups but no history file")));
        }
    }
    for (tli, gaps) in catalog.gaps() {
        for (first, last) in gaps {
            let first_name = WalSegmentName::new(tli, first, seg_size);
            let last_name = WalSegmentName::new(tli, last, seg_size);
            let what = if first == last { "missing or damaged".to_string() } else { format!("missing or damaged, through {last_name}") };
            let key = layout::wal_key(&first_name.to_string());
            if !problems.iter().any(|p| p.key == key) {
                problems.push(problem("wal_gap", key, format!("{what}: timeline {tli} has WAL before and after it")));
            }
        }
    }

    // Per backup: can it reach consistency, and how far can replay go.
    let mut verdicts = Vec::new();
    for b in &in_scope {
        let mut reasons = Vec::new();
        let windows: Vec<_> =
            catalog.timelines().into_iter().flat_map(|t| catalog.windows(t)).filter(|w| w.backup_id == b.backup_id).collect();
        let mut replay_stops_at = None;
        if windows.is_empty() {
            let path = catalog.ancestry(b.end_timeline);
            let first = WalSegmentName::parse(&b.wal_first, seg_size);
            let (_, gap) = first.map(|f| catalog.wal_reach(&path, f.segno)).unwrap_or((Default::default(), None));
            let missing = gap.map(|g| g.to_string()).unwrap_or_else(|| b.wal_last.clone());
            reasons.push(format!("WAL segment {missing} is missing or damaged: the backup cannot reach consistency"));
            let key = layout::wal_key(&missing);
            if !problems.iter().any(|p| p.key == key) {
                problems.push(problem("wal_gap", key, format!("needed by backup {} to reach consistency", b.backup_id)));
            }
        } else {
            // The longest window (the newest timeline's) says how far replay goes.
            replay_stops_at = windows.iter().max_by_key(|w| w.end_lsn).and_then(|w| w.gap_at.clone());
            if let Some(gap) = &replay_stops_at {
                let key = layout::wal_key(gap);
                if !problems.iter().any(|p| p.key == key) {
                    problems.push(problem("wal_gap", key, format!("missing or damaged: replay from backup {} stops there", b.backup_id)));
                }
            }
        }
        let own: HashSet<String> = std::iter::once(layout::backup_manifest_key(&b.backup_id))
            .chain(std::iter::once(b.files.key.clone()))
            .chain(b.server_manifest.iter().map(|s| s.key.clone()))
            .chain(b.packs.iter().map(|p| layout::pack_key(&p.id)))
            .collect();
        for p in problems.iter().filter(|p| own.contains(&p.key)) {
            reasons.push(format!("{}: {}", p.key, p.message));
        }
        verdicts.push(BackupVerdict {
            id: b.backup_id.clone(),
            end_time: Some(b.end_time),
            end_lsn: Some(b.end_lsn.to_string()),
            timeline: Some(b.end_timeline),
            restorable: reasons.is_empty(),
            reasons,
            replay_stops_at,
        });
    }
    for (id, p) in &broken_in_scope {
        verdicts.push(BackupVerdict {
            id: id.clone(),
            end_time: None,
            end_lsn: None,
            timeline: None,
            restorable: false,
            reasons: vec![format!("{}: {}", p.key, p.message)],
            replay_stops_at: None,
        });
    }

    if let Some((g, key)) = newest_generation {
        problems.push(problem(
            "descriptor_rollback",
            layout::DESCRIPTOR,
            format!(
                "the descriptor is generation {generation}, but {key} was written under generation {g}: an older descriptor was put back"
            ),
        ));
    }

    // Deep: rebuild every backup in verify-only mode (opens the file list and
    // checks every blob, chunk id and file checksum, writing nothing).
    let mut deep = None;
    if let Some(opener) = &opts.deep {
        let mut d = DeepChecked { wal_files: deep_wal, ..Default::default() };
        for b in &in_scope {
            match deep_backup(&ctx, b, opener, parallel).await {
                Ok(stats) => {
                    d.files += stats.files;
                    d.file_bytes += stats.bytes;
                }
                Err(p) => {
                    for v in verdicts.iter_mut().filter(|v| v.id == b.backup_id) {
                        v.restorable = false;
                        v.reasons.push(format!("{}: {}", p.key, p.message));
                    }
                    problems.push(p);
                }
            }
        }
        deep = Some(d);
    }

    let last_plain: BTreeMap<TimelineId, (u64, String)> =
        records.iter().map(|((tli, segno), rec)| (*tli, (*segno, rec.plain_blake3.clone()))).collect();
    let mut inventory = inventory(desc, &objects, &manifests, &manifest_hashes, seg_size);
    for t in &mut inventory.timelines {
        let last = t.last_segment.as_deref().and_then(|n| WalSegmentName::parse(n, seg_size)).map(|s| s.segno);
        t.last_segment_plain_blake3 = last_plain.get(&t.timeline).filter(|(s, _)| Some(*s) == last).map(|(_, h)| h.clone());
    }
    let changes = opts.previous.as_ref().map(|(before, before_key)| {
        let plain_now = |name: &str| {
            let s = WalSegmentName::parse(name, seg_size)?;
            records.get(&(s.tli, s.segno)).map(|r| r.plain_blake3.clone())
        };
        let broken_ids: Vec<String> = broken.iter().map(|(id, _)| id.clone()).collect();
        let (found, changes) = compare(before, before_key, &inventory, &desc.trusted_key.to_string(), &broken_ids, seg_size, &plain_now);
        problems.extend(found);
        changes
    });
    checked.bytes_read = ctx.bytes.load(Ordering::Relaxed);
    problems.sort();
    problems.dedup();
    warnings.sort();
    warnings.dedup();
    Ok(Outcome { checked, deep, backups: verdicts, wal_segments, problems, warnings, inventory, changes })
}

/// The repository's state from the listing and the valid manifests.
fn inventory(
    desc: &LoadedDescriptor,
    objects: &[ObjectMeta],
    manifests: &[BackupManifest],
    manifest_hashes: &HashMap<String, String>,
    seg_size: u64,
) -> Inventory {
    type Stored = Option<chrono::DateTime<chrono::Utc>>;
    let mut segs: BTreeMap<TimelineId, BTreeMap<u64, Stored>> = BTreeMap::new();
    let mut histories: BTreeSet<TimelineId> = BTreeSet::new();
    for o in objects.iter().filter(|o| o.key.starts_with(layout::WAL_PREFIX)) {
        let name = o.key.rsplit('/').next().unwrap_or("");
        match classify_wal_file(name) {
            Some(WalFileKind::Segment) => {
                if let Some(s) = WalSegmentName::parse(name, seg_size) {
                    segs.entry(s.tli).or_default().insert(s.segno, o.modified);
                }
            }
            Some(WalFileKind::History) => {
                if let Some(tli) = name.strip_suffix(".history").and_then(|t| u32::from_str_radix(t, 16).ok()) {
                    histories.insert(tli);
                }
            }
            _ => {}
        }
    }
    let tlis: BTreeSet<TimelineId> = segs.keys().copied().chain(histories.iter().copied()).collect();
    let timelines = tlis
        .into_iter()
        .map(|tli| {
            let set = segs.get(&tli);
            let first = set.and_then(|s| s.first_key_value());
            let last = set.and_then(|s| s.last_key_value());
            TimelineInventory {
                timeline: tli,
                first_segment: first.map(|(s, _)| WalSegmentName::new(tli, *s, seg_size).to_string()),
                last_segment: last.map(|(s, _)| WalSegmentName::new(tli, *s, seg_size).to_string()),
                segments: set.map(|s| s.len() as u64).unwrap_or(0),
                history: histories.contains(&tli),
                newest_stored_at: last.and_then(|(_, m)| *m),
                last_segment_plain_blake3: None,
            }
        })
        .collect();
    Inventory {
        descriptor_generation: desc.descriptor.generation,
        descriptor_blake3: desc.hash.to_hex().to_string(),
        backups: manifests
            .iter()
            .map(|m| InventoryBackup {
                id: m.backup_id.clone(),
                manifest_blake3: manifest_hashes.get(&m.backup_id).cloned().unwrap_or_default(),
                end_time: m.end_time,
                end_lsn: m.end_lsn.to_string(),
                timeline: m.end_timeline,
            })
            .collect(),
        timelines,
    }
}

/// Streams an object through blake3 and compares with the signed size and checksum.
async fn check_stored_hash(ctx: &Ctx<'_>, key: &str, size: u64, hash: &str, listed: Option<&ObjectMeta>) -> Result<(), Problem> {
    let Some(meta) = listed else {
        return Err(problem("missing", key, "the object is missing"));
    };
    if meta.size != size {
        return Err(problem("checksum_mismatch", key, format!("{} bytes; signed: {size} bytes with blake3 {hash}", meta.size)));
    }
    let mut stream = ctx.store.get(key, None).await.map_err(|e| classify(key, &e.into()))?;
    let mut hasher = blake3::Hasher::new();
    let mut len = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| classify(key, &e.into()))?;
        hasher.update(&chunk);
        len += chunk.len() as u64;
        ctx.read(chunk.len() as u64);
    }
    let actual = hasher.finalize().to_hex();
    if len != size || actual.as_str() != hash {
        return Err(problem(
            "checksum_mismatch",
            key,
            format!("{len} bytes with blake3 {actual}; signed: {size} bytes with blake3 {hash}"),
        ));
    }
    Ok(())
}

/// Reads a WAL object: its record's signature and that it is the record of
/// this very object, the payload against the record; with the identity, the
/// plaintext and (for segments) its page headers.
async fn check_wal_object(
    ctx: &Ctx<'_>,
    key: &str,
    opener: Option<&Opener>,
    expected: &walheader::ExpectedWal,
) -> Result<WalRecord, Problem> {
    let name = key.rsplit('/').next().unwrap_or("").to_string();
    let stream = ctx.store.get(key, None).await.map_err(|e| classify(key, &e.into()))?;
    let (header, mut payload) = split_header(stream, ctx.desc, key).await.map_err(|e| classify(key, &e))?;
    ctx.read(header.payload_offset);
    let rec = header.record;
    // A record names its file; a streaming copy's record also says how much
    // WAL it holds, so neither can stand in for the other.
    let streaming = name.ends_with(STREAMING_SUFFIX);
    let file_of_key = name.strip_suffix(STREAMING_SUFFIX).unwrap_or(&name);
    if WalArchive::key_of(file_of_key) != key.strip_suffix(STREAMING_SUFFIX).unwrap_or(key) || rec.file != file_of_key {
        return Err(problem("wrong_object", key, format!("holds the signed record of '{}' (objects were swapped or replaced)", rec.file)));
    }
    if streaming != rec.valid_bytes.is_some() {
        let what = if streaming { "a complete file's record" } else { "the record of a streaming copy (an incomplete segment)" };
        return Err(problem("wrong_object", key, format!("holds {what} (objects were replaced)")));
    }
    if rec.system_identifier != ctx.desc.descriptor.cluster.system_identifier {
        return Err(problem("other_cluster", key, format!("WAL of cluster {}", rec.system_identifier)));
    }
    // Hashed as it streams; kept only when it is to be decrypted.
    let mut data = opener.map(|_| Vec::with_capacity(rec.stored_len.min(64 << 20) as usize));
    let mut hasher = blake3::Hasher::new();
    let mut len = 0u64;
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| classify(key, &e.into()))?;
        ctx.read(chunk.len() as u64);
        hasher.update(&chunk);
        len += chunk.len() as u64;
        if let Some(d) = data.as_mut() {
            d.extend_from_slice(&chunk);
        }
    }
    let actual = hasher.finalize().to_hex();
    if len != rec.stored_len || actual.as_str() != rec.stored_blake3 {
        return Err(problem(
            "checksum_mismatch",
            key,
            format!(
                "the payload is {len} bytes with blake3 {actual}; the signed record says {} bytes with blake3 {}",
                rec.stored_len, rec.stored_blake3
            ),
        ));
    }
    if let (Some(opener), Some(data)) = (opener, data) {
        let expected_plain = Expected {
            stored_hash: None,
            plain_hash: Some(parse_hash(&rec.plain_blake3, key).map_err(|e| problem("corrupt", key, e.to_string()))?),
            plain_len: Some(rec.plain_len),
        };
        let (opener, exp, file, seg_size) = (opener.clone(), *expected, rec.file.clone(), expected.seg_size);
        let key_s = key.to_string();
        cpu_pool()
            .run(move || {
                let plain = opener.open_bytes(&data, &expected_plain).map_err(|e| problem("plaintext_mismatch", &key_s, e.to_string()))?;
                if matches!(classify_wal_file(&file), Some(WalFileKind::Segment | WalFileKind::Partial)) {
                    let seg = WalSegmentName::parse(&file[..24], seg_size).ok_or_else(|| problem("corrupt", &key_s, "bad segment name"))?;
                    walheader::check_segment(&plain, &seg, &exp, streaming)
                        .map_err(|e| problem("bad_wal_header", &key_s, e.to_string()))?;
                }
                Ok::<_, Problem>(())
            })
            .await?;
    }
    Ok(rec)
}

/// Deep check of a backup: rebuilds it in verify-only mode, which opens the
/// file list and checks every blob, chunk id and file checksum, writing nothing.
async fn deep_backup(
    ctx: &Ctx<'_>,
    b: &BackupManifest,
    opener: &Opener,
    parallel: usize,
) -> Result<super::materialize::MaterializeStats, Problem> {
    let files_key = b.files.key.clone();
    let spool = std::env::temp_dir().join(format!("walvault-verify-{}-{:08x}", std::process::id(), rand::random::<u32>()));
    let opts = super::materialize::MaterializeOptions {
        dest: spool.join("data"),
        tablespace_map: Default::default(),
        parallel,
        spool: spool.clone(),
        owner: None,
        progress: None,
        verify_only: true,
        clear_dest: false,
    };
    let result = super::materialize::materialize(ctx.store, ctx.desc, opener, b, &opts).await.map_err(|e| match e.root() {
        // Materialize names repository objects, or a file of the backup by its path.
        crate::Error::Repo(RepoError::Integrity { object, message }) if object.contains('/') && is_repository_key(object) => {
            problem("plaintext_mismatch", object.clone(), message.clone())
        }
        crate::Error::Repo(RepoError::Integrity { object, message }) => {
            problem("plaintext_mismatch", &files_key, format!("file {object} of backup {}: {message}", b.backup_id))
        }
        _ => classify(&files_key, &e),
    });
    let _ = std::fs::remove_dir_all(&spool);
    let stats = result?;
    if let Some(sm) = &b.server_manifest {
        let raw = storage::get_bytes(ctx.store.as_ref(), &sm.key, None).await.map_err(|e| classify(&sm.key, &e.into()))?;
        let exp = Expected {
            stored_hash: blake3::Hash::from_hex(&sm.stored_blake3).ok(),
            plain_hash: blake3::Hash::from_hex(&sm.plain_blake3).ok(),
            plain_len: Some(sm.plain_len),
        };
        let opener = opener.clone();
        let key = sm.key.clone();
        cpu_pool()
            .run(move || opener.open_bytes(&raw, &exp).map(|_| ()).map_err(|e| problem("plaintext_mismatch", &key, e.to_string())))
            .await?;
    }
    Ok(stats)
}

fn is_repository_key(s: &str) -> bool {
    [layout::PACK_PREFIX, layout::BACKUP_PREFIX, layout::WAL_PREFIX].iter().any(|p| s.starts_with(p))
}

/// What changed since an earlier report, besides problems.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Changes {
    pub new_backups: Vec<String>,
    /// Backups gone that were older than every backup still present (what
    /// retention removes).
    pub expired_backups: Vec<String>,
    /// Per timeline: the first and last segment then and now.
    pub wal: Vec<WalChange>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct WalChange {
    pub timeline: TimelineId,
    pub first_before: Option<String>,
    pub first_now: Option<String>,
    pub last_before: Option<String>,
    pub last_now: Option<String>,
}

/// Compares the repository now with an earlier report's inventory. Removing
/// objects leaves nothing to check a signature against, so this is how an
/// auditor sees a truncated WAL, a removed backup, a rolled-back descriptor or
/// a replaced key: the earlier report, archived elsewhere, remembers them.
pub fn compare(
    before: &Inventory,
    before_key: &str,
    now: &Inventory,
    now_key: &str,
    broken_now: &[String],
    seg_size: u64,
    plain_now: &dyn Fn(&str) -> Option<String>,
) -> (Vec<Problem>, Changes) {
    let mut problems = Vec::new();
    let mut changes = Changes::default();
    if before_key != now_key {
        problems.push(problem(
            "key_changed",
            layout::DESCRIPTOR,
            format!("the previous report trusted {before_key}; this run trusts {now_key}: the repository was re-signed with another key"),
        ));
    }
    if before.descriptor_generation > now.descriptor_generation {
        problems.push(problem(
            "descriptor_rollback",
            layout::DESCRIPTOR,
            format!(
                "the previous report saw descriptor generation {}; it is now {}: an older descriptor was put back",
                before.descriptor_generation, now.descriptor_generation
            ),
        ));
    } else if before.descriptor_generation == now.descriptor_generation && before.descriptor_blake3 != now.descriptor_blake3 {
        problems.push(problem(
            "descriptor_changed",
            layout::DESCRIPTOR,
            format!("descriptor generation {} has another checksum than in the previous report", now.descriptor_generation),
        ));
    }
    let now_ids: HashSet<&str> = now.backups.iter().map(|b| b.id.as_str()).collect();
    let before_ids: HashSet<&str> = before.backups.iter().map(|b| b.id.as_str()).collect();
    let oldest_now = now.backups.iter().map(|b| b.end_time).min();
    for b in &before.backups {
        if now_ids.contains(b.id.as_str()) || broken_now.contains(&b.id) {
            continue;
        }
        match oldest_now {
            Some(oldest) if b.end_time < oldest => changes.expired_backups.push(b.id.clone()),
            _ => problems.push(problem(
                "removed",
                layout::backup_manifest_key(&b.id),
                format!(
                    "backup {} (ended {}) was in the previous report and is gone, while older backups remain: retention does not remove it",
                    b.id, b.end_time
                ),
            )),
        }
    }
    for b in &before.backups {
        if let Some(n) = now.backups.iter().find(|n| n.id == b.id && n.manifest_blake3 != b.manifest_blake3) {
            problems.push(problem(
                "replaced",
                layout::backup_manifest_key(&b.id),
                format!(
                    "backup {}'s manifest had blake3 {} in the previous report and has {} now: it was rewritten with the signing key",
                    b.id, b.manifest_blake3, n.manifest_blake3
                ),
            ));
        }
    }
    changes.new_backups = now.backups.iter().filter(|b| !before_ids.contains(b.id.as_str())).map(|b| b.id.clone()).collect();
    let segno = |name: &Option<String>| name.as_deref().and_then(|n| WalSegmentName::parse(n, seg_size)).map(|s| s.segno);
    for t in &before.timelines {
        let now_t = now.timelines.iter().find(|x| x.timeline == t.timeline);
        let (first_now, last_now) = now_t.map(|x| (x.first_segment.clone(), x.last_segment.clone())).unwrap_or((None, None));
        if let Some(last) = &t.last_segment
            && segno(&last_now).is_none_or(|n| Some(n) < segno(&t.last_segment))
        {
            problems.push(problem(
                "wal_truncated",
                layout::wal_key(last),
                format!(
                    "timeline {}'s WAL ended at {last} in the previous report; it now ends at {}: newer WAL was removed",
                    t.timeline,
                    last_now.as_deref().unwrap_or("nothing")
                ),
            ));
        }
        // The segment that was the newest then must still hold the same WAL.
        if let (Some(last), Some(then)) = (&t.last_segment, &t.last_segment_plain_blake3)
            && plain_now(last).is_some_and(|h| &h != then)
        {
            problems.push(problem(
                "replaced",
                layout::wal_key(last),
                format!(
                    "{last} had plain blake3 {then} in the previous report; its record now says otherwise: it was rewritten with the signing key"
                ),
            ));
        }
        if t.history && !now_t.is_some_and(|x| x.history) {
            problems.push(problem(
                "removed",
                layout::history_key(t.timeline),
                format!("timeline {}'s history file was in the previous report and is gone", t.timeline),
            ));
        }
        if t.first_segment != first_now || t.last_segment != last_now {
            changes.wal.push(WalChange {
                timeline: t.timeline,
                first_before: t.first_segment.clone(),
                first_now,
                last_before: t.last_segment.clone(),
                last_now,
            });
        }
    }
    for t in now.timelines.iter().filter(|t| !before.timelines.iter().any(|b| b.timeline == t.timeline)) {
        changes.wal.push(WalChange {
            timeline: t.timeline,
            first_before: None,
            first_now: t.first_segment.clone(),
            last_before: None,
            last_now: t.last_segment.clone(),
        });
    }
    problems.sort();
    (problems, changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    fn inv(generation: u64, backups: &[(&str, i64)], timelines: &[(u32, &str, &str, bool)]) -> Inventory {
        Inventory {
            descriptor_generation: generation,
            descriptor_blake3: format!("hash-{generation}"),
            backups: backups
                .iter()
                .map(|(id, t)| InventoryBackup {
                    id: id.to_string(),
                    manifest_blake3: format!("m-{id}"),
                    end_time: chrono::DateTime::from_timestamp(*t, 0).unwrap(),
                    end_lsn: "0/0".into(),
                    timeline: 1,
                })
                .collect(),
            timelines: timelines
                .iter()
                .map(|(tli, first, last, history)| TimelineInventory {
                    timeline: *tli,
                    first_segment: Some(first.to_string()),
                    last_segment: Some(last.to_string()),
                    segments: 0,
                    history: *history,
                    newest_stored_at: None,
                    last_segment_plain_blake3: Some(format!("p-{last}")),
                })
                .collect(),
        }
    }

    const A: &str = "000000010000000000000002";
    const B: &str = "000000010000000000000009";
    const C: &str = "000000010000000000000010";
    const T2: &str = "000000020000000000000011";

    #[test]
    fn growth_and_retention_are_not_problems() {
        let before = inv(1, &[("b1", 100), ("b2", 200)], &[(1, A, B, false)]);
        let now = inv(1, &[("b2", 200), ("b3", 300)], &[(1, "000000010000000000000005", C, false)]);
        let (problems, changes) = compare(&before, "k", &now, "k", &[], SEG, &|_| None);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(changes.expired_backups, vec!["b1"]);
        assert_eq!(changes.new_backups, vec!["b3"]);
        assert_eq!(changes.wal.len(), 1);
    }

    #[test]
    fn removals_rollback_and_key_change_are_problems() {
        let before = inv(2, &[("b1", 100), ("b2", 200)], &[(1, A, C, false), (2, T2, T2, true)]);
        // The newest backup is gone, timeline 1's tail is cut, timeline 2 and its history vanished.
        let now = inv(1, &[("b1", 100)], &[(1, A, B, false)]);
        let (problems, _) = compare(&before, "k", &now, "other", &[], SEG, &|_| None);
        let kinds: Vec<(&str, &str)> = problems.iter().map(|p| (p.kind, p.key.as_str())).collect();
        assert!(kinds.contains(&("key_changed", "walvault.json")), "{kinds:?}");
        assert!(kinds.contains(&("descriptor_rollback", "walvault.json")), "{kinds:?}");
        assert!(kinds.contains(&("removed", "backups/b2/manifest.json")), "{kinds:?}");
        assert!(kinds.contains(&("wal_truncated", "wal/0000000100000000/000000010000000000000010")), "{kinds:?}");
        assert!(kinds.contains(&("wal_truncated", "wal/0000000200000000/000000020000000000000011")), "{kinds:?}");
        assert!(kinds.contains(&("removed", "wal/history/00000002.history")), "{kinds:?}");
        // A backup whose manifest is now damaged is reported by the audit itself, not as removed.
        let (problems, _) =
            compare(&before, "k", &inv(2, &[("b1", 100)], &[(1, A, C, false), (2, T2, T2, true)]), "k", &["b2".into()], SEG, &|_| None);
        assert!(problems.is_empty(), "{problems:?}");
        // Same generation, other document.
        let mut changed = before.clone();
        changed.descriptor_blake3 = "x".into();
        let (problems, _) = compare(&before, "k", &changed, "k", &[], SEG, &|_| None);
        assert_eq!(problems.iter().map(|p| p.kind).collect::<Vec<_>>(), vec!["descriptor_changed"]);
        // Rewritten with the key: a manifest and the newest segment under their old names.
        let mut rewritten = before.clone();
        rewritten.backups[1].manifest_blake3 = "other".into();
        let (problems, _) = compare(&before, "k", &rewritten, "k", &[], SEG, &|n| (n == C).then(|| "other".to_string()));
        let kinds: Vec<(&str, &str)> = problems.iter().map(|p| (p.kind, p.key.as_str())).collect();
        assert_eq!(kinds, vec![("replaced", "backups/b2/manifest.json"), ("replaced", "wal/0000000100000000/000000010000000000000010")]);
    }

    #[test]
    fn removing_every_backup_is_a_problem() {
        let before = inv(1, &[("b1", 100)], &[(1, A, B, false)]);
        let now = inv(1, &[], &[(1, A, B, false)]);
        let (problems, _) = compare(&before, "k", &now, "k", &[], SEG, &|_| None);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].kind, "removed");
    }
}
