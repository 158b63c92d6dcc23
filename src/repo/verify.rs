//! The audit behind `walvault verify`. Without the identity it checks every
//! signature, re-reads every object and compares its blake3 with the signed
//! value, follows the WAL chain and continuity on every timeline, and says for
//! each backup whether it can be restored. With the identity (`deep`) it also
//! decrypts everything: file lists, every chunk (against its keyed id) and each
//! file's plain blake3, and every WAL segment's page headers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use serde::Serialize;

use super::catalog::Catalog;
use super::descriptor::LoadedDescriptor;
use super::manifest::{BackupManifest, SealedRef};
use super::pack::parse_index;
use super::record::{self, WalRecord};
use super::wal::{STREAMING_SUFFIX, parse_hash, split_header};
use super::{RepoError, layout};
use crate::pg::WalSegmentName;
use crate::pg::lsn::{WalFileKind, classify_wal_file};
use crate::pg::walheader;
use crate::pipeline::{Expected, Opener, cpu_pool};
use crate::storage::{self, ObjectMeta, StorageErrorKind, Store};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    pub kind: &'static str,
    pub key: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackupVerdict {
    pub id: String,
    pub restorable: bool,
    pub reasons: Vec<String>,
}

#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Checked {
    pub total: u64,
    pub wal: u64,
    pub packs: u64,
    pub pack_indexes: u64,
    pub backup_objects: u64,
    pub other: u64,
    pub bytes_read: u64,
}

pub struct VerifyOptions {
    pub deep: Option<Opener>,
    pub backup: Option<String>,
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    pub parallel: usize,
    pub progress: Option<Arc<dyn Fn(u64) + Send + Sync>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub checked: Checked,
    pub backups: Vec<BackupVerdict>,
    pub problems: Vec<Problem>,
    pub wal_segments: u64,
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

fn problem(kind: &'static str, key: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem { kind, key: key.into(), message: message.into() }
}

/// Maps a repository error on one object to a problem of the right kind.
fn classify(key: &str, e: &crate::Error) -> Problem {
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

pub async fn verify(store: &Store, desc: &LoadedDescriptor, catalog: &Catalog, opts: &VerifyOptions) -> Result<Outcome, crate::Error> {
    let ctx = Ctx { store, desc, bytes: AtomicU64::new(0), progress: opts.progress.clone() };
    let objects = storage::list_all(store.as_ref(), "").await?;
    let sizes: HashMap<&str, u64> = objects.iter().map(|o| (o.key.as_str(), o.size)).collect();
    let mut problems = Vec::new();
    let mut checked = Checked::default();

    // Which backups and WAL are in scope.
    let backups: Vec<&BackupManifest> = catalog
        .backups
        .iter()
        .filter(|b| opts.backup.as_ref().is_none_or(|id| &b.backup_id == id))
        .filter(|b| opts.since.is_none_or(|t| b.end_time >= t))
        .collect();
    if let Some(id) = &opts.backup {
        if backups.is_empty() {
            return Err(crate::Error::Usage(format!("no backup {id} in the repository (see `walvault info`)")));
        }
    }
    for (id, why) in &catalog.broken {
        problems.push(problem("bad_manifest", layout::backup_manifest_key(id), why.clone()));
    }
    let generation = desc.descriptor.generation;
    for b in &backups {
        if b.descriptor_generation > generation {
            problems.push(problem(
                "descriptor_rollback",
                layout::DESCRIPTOR,
                format!(
                    "backup {} was written under descriptor generation {}, newer than the repository's ({generation})",
                    b.backup_id, b.descriptor_generation
                ),
            ));
        }
        if b.system_identifier != desc.descriptor.cluster.system_identifier {
            problems.push(problem("other_cluster", layout::backup_manifest_key(&b.backup_id), "manifest of another cluster"));
        }
    }
    checked.total += 1;
    checked.other += 1;

    // Backup objects and the packs they use, each against its signed checksum.
    let mut pack_expect: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let mut sealed: Vec<SealedRef> = Vec::new();
    for b in &backups {
        checked.total += 1;
        checked.backup_objects += 1;
        sealed.push(b.files.clone());
        sealed.extend(b.server_manifest.clone());
        for p in &b.packs {
            pack_expect.insert(p.id.clone(), (p.size, p.blake3.clone()));
        }
    }
    let in_scope_all = opts.backup.is_none() && opts.since.is_none();
    // Every pack in the store is read when the whole repository is audited.
    let pack_objects: Vec<&ObjectMeta> =
        objects.iter().filter(|o| o.key.starts_with(layout::PACK_PREFIX) && o.key.ends_with(".pack")).collect();
    let index_objects: Vec<&ObjectMeta> =
        objects.iter().filter(|o| o.key.starts_with(layout::PACK_PREFIX) && o.key.ends_with(".idx")).collect();
    let mut index_hashes: HashMap<String, String> = HashMap::new();
    if in_scope_all {
        let results: Vec<(String, Result<super::pack::PackIndex, crate::Error>)> =
            futures::stream::iter(index_objects.iter().map(|o| o.key.clone()))
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
                .buffer_unordered(opts.parallel)
                .collect()
                .await;
        for (key, r) in results {
            checked.total += 1;
            checked.pack_indexes += 1;
            match r {
                Ok(idx) => {
                    index_hashes.insert(idx.pack.id.clone(), idx.pack.blake3.clone());
                }
                Err(e) => problems.push(classify(&key, &e)),
            }
        }
    }
    let mut to_hash: Vec<(String, Option<(u64, String)>, &'static str)> = Vec::new();
    for (id, (size, hash)) in &pack_expect {
        to_hash.push((layout::pack_key(id), Some((*size, hash.clone())), "pack"));
    }
    if in_scope_all {
        for o in &pack_objects {
            let id = o.key.rsplit('/').next().unwrap_or("").trim_end_matches(".pack");
            if !pack_expect.contains_key(id) {
                let expected = index_hashes.get(id).map(|h| (o.size, h.clone()));
                to_hash.push((o.key.clone(), expected, "pack"));
            }
        }
    }
    for s in &sealed {
        to_hash.push((s.key.clone(), Some((s.stored_len, s.stored_blake3.clone())), "backup_object"));
    }
    let results: Vec<(String, &'static str, Result<(), Problem>)> = futures::stream::iter(to_hash)
        .map(|(key, expected, kind)| {
            let ctx = &ctx;
            let sizes = &sizes;
            async move {
                let r = check_stored_hash(ctx, &key, expected, sizes.contains_key(key.as_str())).await;
                (key, kind, r)
            }
        })
        .buffer_unordered(opts.parallel)
        .collect()
        .await;
    for (_, kind, r) in results {
        checked.total += 1;
        if kind == "pack" {
            checked.packs += 1;
        } else {
            checked.backup_objects += 1;
        }
        if let Err(p) = r {
            problems.push(p);
        }
    }

    // WAL: every object's record and stored checksum; the chain; continuity.
    let wal_keys: Vec<&ObjectMeta> = objects.iter().filter(|o| o.key.starts_with(layout::WAL_PREFIX)).collect();
    let opener = opts.deep.clone();
    let expected_wal = {
        let c = &desc.descriptor.cluster;
        walheader::ExpectedWal {
            pg_major: c.major(),
            system_identifier: c.system_identifier.parse().unwrap_or(0),
            seg_size: c.wal_segment_size,
            block_size: c.wal_block_size,
        }
    };
    let min_segno = if in_scope_all {
        0
    } else {
        backups.iter().filter_map(|b| WalSegmentName::parse(&b.wal_first, catalog.seg_size)).map(|s| s.segno).min().unwrap_or(u64::MAX)
    };
    let wal_in_scope: Vec<String> = wal_keys
        .iter()
        .filter(|o| {
            let name = o.key.rsplit('/').next().unwrap_or("");
            WalSegmentName::parse(&name[..24.min(name.len())], catalog.seg_size).is_none_or(|s| s.segno >= min_segno)
        })
        .map(|o| o.key.clone())
        .collect();
    let results: Vec<(String, Result<WalRecord, Problem>)> = futures::stream::iter(wal_in_scope)
        .map(|key| {
            let ctx = &ctx;
            let opener = opener.clone();
            async move {
                let r = check_wal_object(ctx, &key, opener.as_ref(), &expected_wal).await;
                (key, r)
            }
        })
        .buffer_unordered(opts.parallel)
        .collect()
        .await;
    let mut records: BTreeMap<(u32, u64), WalRecord> = BTreeMap::new();
    let mut wal_segments = 0;
    for (key, r) in results {
        checked.total += 1;
        checked.wal += 1;
        match r {
            Ok(rec) => {
                if rec.descriptor_generation > generation {
                    problems.push(problem(
                        "descriptor_rollback",
                        &key,
                        format!(
                            "written under descriptor generation {}, newer than the repository's ({generation})",
                            rec.descriptor_generation
                        ),
                    ));
                }
                if classify_wal_file(&rec.file) == Some(WalFileKind::Segment) && !key.ends_with(STREAMING_SUFFIX) {
                    if let Some(s) = WalSegmentName::parse(&rec.file, catalog.seg_size) {
                        wal_segments += 1;
                        records.insert((s.tli, s.segno), rec);
                    }
                }
            }
            Err(p) => problems.push(p),
        }
    }
    for ((tli, segno), rec) in &records {
        let Some(link) = &rec.prev else { continue };
        if let Some(prev) = segno.checked_sub(1).and_then(|p| records.get(&(*tli, p))) {
            if &prev.plain_blake3 != link {
                problems.push(problem(
                    "chain_broken",
                    super::wal::WalArchive::key_of(&rec.file),
                    format!("its record links to a previous segment with blake3 {link}, but {} has {}", prev.file, prev.plain_blake3),
                ));
            }
        }
    }
    // Continuity and history files, per timeline and per backup.
    for tli in catalog.timelines() {
        if tli > 1 && !catalog.histories.contains_key(&tli) {
            problems.push(problem("missing_history", layout::history_key(tli), format!("timeline {tli} has WAL but no history file")));
        }
    }
    let mut verdicts = Vec::new();
    for b in &backups {
        let mut reasons = Vec::new();
        let windows: Vec<_> =
            catalog.timelines().into_iter().flat_map(|t| catalog.windows(t)).filter(|w| w.backup_id == b.backup_id).collect();
        if windows.is_empty() {
            let path = catalog.ancestry(b.end_timeline);
            let first = WalSegmentName::parse(&b.wal_first, catalog.seg_size);
            let (_, gap) = first.map(|f| catalog.wal_reach(&path, f.segno)).unwrap_or((Default::default(), None));
            let missing = gap.map(|g| g.to_string()).unwrap_or_else(|| b.wal_last.clone());
            reasons.push(format!("WAL segment {missing} is missing: the backup cannot reach consistency"));
            problems.push(problem("wal_gap", layout::wal_key(&missing), format!("needed by backup {} to reach consistency", b.backup_id)));
        }
        for w in &windows {
            if let Some(gap) = &w.gap_at {
                problems.push(problem(
                    "wal_gap",
                    layout::wal_key(gap),
                    format!("missing: replay from backup {} on timeline {} stops at {}", b.backup_id, w.timeline, w.end_lsn),
                ));
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
        verdicts.push(BackupVerdict { id: b.backup_id.clone(), restorable: reasons.is_empty(), reasons });
    }
    problems.dedup();

    // Deep: open the file lists and every chunk of every file.
    if let Some(opener) = &opts.deep {
        for b in &backups {
            if let Err(p) = deep_backup(&ctx, b, opener, opts.parallel).await {
                for v in verdicts.iter_mut().filter(|v| v.id == b.backup_id) {
                    v.restorable = false;
                    v.reasons.push(format!("{}: {}", p.key, p.message));
                }
                problems.push(p);
            }
        }
    }
    checked.bytes_read = ctx.bytes.load(Ordering::Relaxed);
    Ok(Outcome { checked, backups: verdicts, problems, wal_segments })
}

/// Streams an object through blake3 and compares with the signed size and checksum.
async fn check_stored_hash(ctx: &Ctx<'_>, key: &str, expected: Option<(u64, String)>, exists: bool) -> Result<(), Problem> {
    if !exists {
        return Err(problem("missing", key, "the object is missing"));
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
    let Some((size, hash)) = expected else {
        return Err(problem("unsigned", key, "no manifest or index vouches for this pack"));
    };
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

/// Reads a WAL object: its record's signature and name, the payload against the
/// record; with the identity, the plaintext and (for segments) its page headers.
async fn check_wal_object(
    ctx: &Ctx<'_>,
    key: &str,
    opener: Option<&Opener>,
    expected: &walheader::ExpectedWal,
) -> Result<WalRecord, Problem> {
    let name = key.rsplit('/').next().unwrap_or("").to_string();
    let stream = ctx.store.get(key, None).await.map_err(|e| classify(key, &e.into()))?;
    let (header, mut payload) = split_header(stream, ctx.desc, key).await.map_err(|e| classify(key, &e))?;
    let rec = header.record;
    let file_of_key = name.strip_suffix(STREAMING_SUFFIX).unwrap_or(&name);
    if rec.file != file_of_key && rec.file != name {
        return Err(problem("wrong_object", key, format!("holds the signed record of '{}' (objects were swapped or replaced)", rec.file)));
    }
    if rec.system_identifier != ctx.desc.descriptor.cluster.system_identifier {
        return Err(problem("other_cluster", key, format!("WAL of cluster {}", rec.system_identifier)));
    }
    let mut data = Vec::with_capacity(rec.stored_len.min(64 << 20) as usize);
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| classify(key, &e.into()))?;
        ctx.read(chunk.len() as u64);
        data.extend_from_slice(&chunk);
    }
    ctx.read(header.payload_offset);
    record::check_payload(&rec, &data, key).map_err(|e| problem("checksum_mismatch", key, e.to_string()))?;
    if let Some(opener) = opener {
        let expected_plain = Expected {
            stored_hash: None,
            plain_hash: Some(parse_hash(&rec.plain_blake3, key).map_err(|e| problem("corrupt", key, e.to_string()))?),
            plain_len: Some(rec.plain_len),
        };
        let (opener, exp, file, seg_size) = (opener.clone(), *expected, rec.file.clone(), expected.seg_size);
        let key_s = key.to_string();
        let streaming = name.ends_with(STREAMING_SUFFIX);
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
async fn deep_backup(ctx: &Ctx<'_>, b: &BackupManifest, opener: &Opener, parallel: usize) -> Result<(), Problem> {
    let key = b.files.key.clone();
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
        crate::Error::Repo(RepoError::Integrity { object, message }) => problem("plaintext_mismatch", object.clone(), message.clone()),
        _ => classify(&key, &e),
    });
    let _ = std::fs::remove_dir_all(&spool);
    result?;
    if let Some(sm) = &b.server_manifest {
        let raw = storage::get_bytes(ctx.store.as_ref(), &sm.key, None).await.map_err(|e| classify(&sm.key, &e.into()))?;
        let exp = Expected {
            stored_hash: blake3::Hash::from_hex(&sm.stored_blake3).ok(),
            plain_hash: blake3::Hash::from_hex(&sm.plain_blake3).ok(),
            plain_len: Some(sm.plain_len),
        };
        opener.open_bytes(&raw, &exp).map_err(|e| problem("plaintext_mismatch", &sm.key, e.to_string()))?;
    }
    Ok(())
}
