//! Materialize: turn a backup into a data directory. The file list is fetched
//! and verified first (its checksum is signed in the manifest), then files are
//! written in parallel: blobs are read with ranged gets (adjacent blobs of a
//! pack in one request), checked against their signed checksum, decrypted, and
//! every chunk is checked against its keyed identifier before it is written.
//! Each file's blake3 is recomputed (from the chunks' chaining values, the
//! same pass that checks format-2 identifiers) and compared. `global/pg_control` is written
//! last, so an interrupted restore never looks like a startable cluster.
//!
//! Tablespaces go to their original locations or where `tablespace_map` (the
//! option) puts them: the `pg_tblspc/<oid>` links are created, and the
//! backup's `tablespace_map` file, from which PostgreSQL recreates those links
//! when it starts, is rewritten for the tablespaces that moved.

use std::collections::{HashMap, VecDeque};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::Semaphore;

use super::chunk::{
    CHUNK_SIZE, ChunkIds, CvKey, FileHasher, Frame, chaining_value, content_chunk_id, cv_chunk_id, decompress_frame, decompress_solid,
    solid_chunk,
};
use super::descriptor::LoadedDescriptor;
use super::manifest::{BackupManifest, BlobRun, FileEntry, FileKind, FilesReader, open_files_list};
use super::pack::decode_id;
use super::{RepoError, layout};
use crate::error::{Error, Result, ResultExt};
use crate::pipeline::{Expected, Opener, cpu_pool};
use crate::storage::{self, Store};

/// Bytes fetched in one ranged get at most (adjacent blobs are coalesced).
const FETCH_MAX: u64 = 4 << 20;
/// Raw (decompressed) bytes of one fetch group at most: table data compresses
/// 10-20x, so this, not FETCH_MAX, bounds the memory a decoded group takes.
const GROUP_RAW_MAX: u64 = 4 << 20;
/// Files smaller than this are written in bundles by one task.
const SMALL_FILE: u64 = 1 << 20;
const BUNDLE_BYTES: u64 = 8 << 20;
/// Fetched ranges held in memory at once, across all tasks.
const RANGES_IN_FLIGHT: usize = 8;
/// Opened blobs a bundle of small files keeps (each up to about 1 MiB).
const BLOB_CACHE: usize = 4;

pub struct MaterializeOptions {
    pub dest: PathBuf,
    /// Tablespace OID -> directory, overriding the original locations.
    pub tablespace_map: HashMap<u32, PathBuf>,
    pub parallel: usize,
    pub spool: PathBuf,
    /// Change ownership of what is written to this uid/gid (when running as root).
    pub owner: Option<(u32, u32)>,
    /// Called with bytes written so far, for progress display.
    pub progress: Option<Arc<dyn Fn(u64) + Send + Sync>>,
    /// Check everything (blobs, chunk ids, file checksums) but write nothing
    /// (`verify --deep`).
    pub verify_only: bool,
    /// Empty `dest` first (restore --force), once the tablespace directories
    /// are known to be usable.
    pub clear_dest: bool,
}

#[derive(Debug, Default, Clone)]
pub struct MaterializeStats {
    pub files: u64,
    pub bytes: u64,
    /// Tablespaces written, with the directory used.
    pub tablespaces: Vec<(u32, PathBuf)>,
}

struct Shared {
    store: Store,
    opener: Opener,
    chunk_key: [u8; 32],
    chunk_ids: ChunkIds,
    packs: Vec<String>,
    ranges: Semaphore,
    owner: Option<(u32, u32)>,
    written: std::sync::atomic::AtomicU64,
    progress: Option<Arc<dyn Fn(u64) + Send + Sync>>,
    verify_only: bool,
}

/// A backup ready to be written: its file list fetched and opened, and the
/// tablespace directories checked. Nothing has been written yet, so a refusal
/// up to here leaves the destination as it was.
pub struct Prepared {
    chunk_key: [u8; 32],
    files_list: PathBuf,
    plain: PathBuf,
    reader: FilesReader<std::io::BufReader<std::fs::File>>,
    roots: HashMap<u32, PathBuf>,
    original: HashMap<u32, String>,
    stats: MaterializeStats,
}

pub async fn materialize(
    store: &Store,
    desc: &LoadedDescriptor,
    opener: &Opener,
    manifest: &BackupManifest,
    opts: &MaterializeOptions,
) -> Result<MaterializeStats> {
    let prepared = prepare(store, desc, opener, manifest, opts).await?;
    write(prepared, store, opener, manifest, opts).await
}

/// Fetches and opens the file list and checks the tablespace directories.
pub async fn prepare(
    store: &Store,
    desc: &LoadedDescriptor,
    opener: &Opener,
    manifest: &BackupManifest,
    opts: &MaterializeOptions,
) -> Result<Prepared> {
    let chunk_key = desc.descriptor.chunk_key(opener).context("cannot read the chunk key from the descriptor (wrong identity?)")?;
    std::fs::create_dir_all(&opts.spool).with_context(|| format!("cannot create {}", opts.spool.display()))?;
    let files_list = fetch_verified(store, &manifest.files, &opts.spool.join("files.sealed")).await?;
    let expected = Expected {
        stored_hash: Some(blake3::Hash::from_hex(&manifest.files.stored_blake3).map_err(|_| bad_manifest(manifest, "files checksum"))?),
        plain_hash: Some(blake3::Hash::from_hex(&manifest.files.plain_blake3).map_err(|_| bad_manifest(manifest, "files checksum"))?),
        plain_len: Some(manifest.files.plain_len),
    };
    let plain = {
        let (files_list, opener, key) = (files_list.clone(), opener.clone(), manifest.files.key.clone());
        cpu_pool().run(move || open_files_list(&files_list, &opener, &expected, &key)).await?
    };
    let reader = FilesReader::new(std::io::BufReader::new(std::fs::File::open(&plain)?), &manifest.files.key)?;

    let mut stats = MaterializeStats::default();
    let mut roots: HashMap<u32, PathBuf> = HashMap::new();
    let original: HashMap<u32, String> = reader.header.tablespaces.iter().map(|t| (t.oid, t.location.clone())).collect();
    for oid in opts.tablespace_map.keys() {
        if !original.contains_key(oid) {
            let known: Vec<String> = original.iter().map(|(o, l)| format!("{o} ({l})")).collect();
            return Err(Error::Usage(format!(
                "--tablespace-map {oid}=...: the backup has no tablespace with OID {oid}; its tablespaces: {}",
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            )));
        }
    }
    for ts in &reader.header.tablespaces {
        let dir = opts.tablespace_map.get(&ts.oid).cloned().unwrap_or_else(|| PathBuf::from(&ts.location));
        if !opts.verify_only {
            check_empty_dir(&dir).with_context(|| format!("tablespace {} directory", ts.oid))?;
        }
        roots.insert(ts.oid, dir.clone());
        stats.tablespaces.push((ts.oid, dir));
    }
    Ok(Prepared { chunk_key, files_list, plain, reader, roots, original, stats })
}

/// Writes a prepared backup into the destination (`pg_control` last).
pub async fn write(
    prepared: Prepared,
    store: &Store,
    opener: &Opener,
    manifest: &BackupManifest,
    opts: &MaterializeOptions,
) -> Result<MaterializeStats> {
    let Prepared { chunk_key, files_list, plain, reader, roots, original, mut stats } = prepared;
    if !opts.verify_only {
        if opts.clear_dest {
            clear_dir(&opts.dest)?;
        }
        create_dir(&opts.dest, 0o700, opts.owner)?;
        for (oid, root) in &stats.tablespaces {
            create_dir(root, 0o700, opts.owner).with_context(|| format!("tablespace {oid}"))?;
        }
    }

    let shared = Arc::new(Shared {
        store: store.clone(),
        opener: opener.clone(),
        chunk_key,
        chunk_ids: ChunkIds::for_manifest_format(manifest.format_version),
        packs: manifest.packs.iter().map(|p| p.id.clone()).collect(),
        ranges: Semaphore::new(RANGES_IN_FLIGHT),
        owner: opts.owner,
        written: Default::default(),
        progress: opts.progress.clone(),
        verify_only: opts.verify_only,
    });

    // Directories and links now; files as jobs; pg_control at the very end.
    let mut jobs: Vec<Vec<(PathBuf, FileEntry)>> = Vec::new();
    let mut bundle: Vec<(PathBuf, FileEntry)> = Vec::new();
    let mut bundle_bytes = 0;
    let mut pg_control = None;
    let mut has_tablespace_map = false;
    for entry in reader {
        let entry = entry?;
        has_tablespace_map |= entry.path == "tablespace_map" && entry.kind == FileKind::File;
        let path = target_path(&opts.dest, &roots, &entry.path)?;
        match entry.kind {
            FileKind::Dir | FileKind::Symlink if opts.verify_only => {}
            FileKind::Dir if roots.values().any(|r| *r == path) => {}
            FileKind::Dir => create_dir(&path, entry.mode, opts.owner)?,
            FileKind::Symlink => {
                // A tablespace link (servers that send links rather than a
                // tablespace_map) points at wherever the tablespace goes now.
                let (path, target) = match tablespace_link(&opts.dest, &roots, &entry.path) {
                    Some(link) => link,
                    None => (path, PathBuf::from(entry.target.clone().unwrap_or_default())),
                };
                symlink(&target, &path, opts.owner)?;
            }
            FileKind::File => {
                stats.files += 1;
                stats.bytes += entry.size;
                if entry.path == "global/pg_control" {
                    pg_control = Some((path, entry));
                } else if entry.size < SMALL_FILE {
                    bundle_bytes += entry.size;
                    bundle.push((path, entry));
                    if bundle_bytes >= BUNDLE_BYTES || bundle.len() >= 512 {
                        jobs.push(std::mem::take(&mut bundle));
                        bundle_bytes = 0;
                    }
                } else {
                    jobs.push(vec![(path, entry)]);
                }
            }
        }
    }
    if !bundle.is_empty() {
        jobs.push(bundle);
    }
    // Big files first, so the longest jobs start early.
    jobs.sort_by_key(|j| std::cmp::Reverse(j.iter().map(|(_, e)| e.size).sum::<u64>()));
    let results: Vec<Result<()>> = futures::stream::iter(jobs)
        .map(|job| {
            let shared = shared.clone();
            async move {
                if job.len() == 1 && job[0].1.size >= SMALL_FILE {
                    let (path, entry) = &job[0];
                    write_file(&shared, path, entry).await
                } else {
                    write_small_files(&shared, job).await
                }
            }
        })
        .buffer_unordered(opts.parallel.max(1))
        .collect()
        .await;
    for r in results {
        r?;
    }
    if !opts.verify_only && !roots.is_empty() {
        link_tablespaces(&opts.dest, &reader_tablespaces(&roots), opts.owner)?;
        if has_tablespace_map {
            let moved: Vec<(u32, &Path)> = reader_tablespaces(&roots)
                .into_iter()
                .filter(|(oid, dir)| original.get(oid).is_none_or(|o| Path::new(o) != *dir))
                .collect();
            if !moved.is_empty() {
                rewrite_tablespace_map(&opts.dest.join("tablespace_map"), &roots, opts.owner)?;
            }
        }
    }
    let (path, entry) = pg_control.ok_or_else(|| bad_manifest(manifest, "no global/pg_control in the backup"))?;
    write_file(&shared, &path, &entry).await?;
    let _ = std::fs::remove_file(&plain);
    let _ = std::fs::remove_file(&files_list);
    Ok(stats)
}

fn bad_manifest(m: &BackupManifest, what: &str) -> Error {
    RepoError::Integrity { object: layout::backup_manifest_key(&m.backup_id), message: what.to_string() }.into()
}

/// Where a member goes: under the data directory, or in its tablespace's directory.
fn target_path(dest: &Path, roots: &HashMap<u32, PathBuf>, rel: &str) -> Result<PathBuf> {
    if rel.split('/').any(|p| p == ".." || p.is_empty()) || rel.starts_with('/') {
        return Err(Error::failed(format!("unsafe path '{rel}' in the backup's file list")));
    }
    if let Some(rest) = rel.strip_prefix("pg_tblspc/") {
        let (oid, sub) = rest.split_once('/').unwrap_or((rest, ""));
        if let Some(root) = oid.parse::<u32>().ok().and_then(|o| roots.get(&o)) {
            return Ok(if sub.is_empty() { root.clone() } else { root.join(sub) });
        }
    }
    Ok(dest.join(rel))
}

/// The link `pg_tblspc/<oid>` and where it points, for a tablespace link member.
fn tablespace_link(dest: &Path, roots: &HashMap<u32, PathBuf>, rel: &str) -> Option<(PathBuf, PathBuf)> {
    let oid: u32 = rel.strip_prefix("pg_tblspc/")?.parse().ok()?;
    Some((dest.join(rel), roots.get(&oid)?.clone()))
}

fn reader_tablespaces(roots: &HashMap<u32, PathBuf>) -> Vec<(u32, &Path)> {
    let mut v: Vec<(u32, &Path)> = roots.iter().map(|(o, p)| (*o, p.as_path())).collect();
    v.sort();
    v
}

/// Creates (or replaces) the `pg_tblspc/<oid>` links, as pg_basebackup does
/// for a plain-format backup, so the directory is complete before PostgreSQL
/// ever starts (pg_verifybackup follows these links).
fn link_tablespaces(dest: &Path, tablespaces: &[(u32, &Path)], owner: Option<(u32, u32)>) -> Result<()> {
    let dir = dest.join("pg_tblspc");
    if !dir.exists() {
        create_dir(&dir, 0o700, owner)?;
    }
    for (oid, root) in tablespaces {
        let link = dir.join(oid.to_string());
        if std::fs::symlink_metadata(&link).is_ok() {
            std::fs::remove_file(&link).with_context(|| format!("cannot replace {}", link.display()))?;
        }
        symlink(root, &link, owner)?;
    }
    Ok(())
}

/// Writes `tablespace_map` with the tablespaces' new directories, in the
/// server's format: `<oid> <path>` per line, with `\`, `\n` and `\r` in the
/// path escaped by a backslash.
fn rewrite_tablespace_map(path: &Path, roots: &HashMap<u32, PathBuf>, owner: Option<(u32, u32)>) -> Result<()> {
    let mut text = String::new();
    for (oid, root) in reader_tablespaces(roots) {
        let mut escaped = String::new();
        for c in root.to_string_lossy().chars() {
            if matches!(c, '\\' | '\n' | '\r') {
                escaped.push('\\');
            }
            escaped.push(c);
        }
        text.push_str(&format!("{oid} {escaped}\n"));
    }
    crate::util::write_file_atomic(path, text.as_bytes(), 0o600).with_context(|| format!("cannot write {}", path.display()))?;
    chown(path, owner)
}

fn symlink(target: &Path, link: &Path, owner: Option<(u32, u32)>) -> Result<()> {
    std::os::unix::fs::symlink(target, link).with_context(|| format!("cannot create link {}", link.display()))?;
    chown(link, owner)
}

/// Empties a directory (restore --force).
fn clear_dir(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for e in entries.flatten() {
        let p = e.path();
        let r = if e.file_type().map(|t| t.is_dir()).unwrap_or(false) { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        r.with_context(|| format!("--force: cannot remove {}", p.display()))?;
    }
    Ok(())
}

fn check_empty_dir(dir: &Path) -> Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut it) => {
            if it.next().is_some() {
                return Err(Error::with_hint(
                    format!("{} is not empty", dir.display()),
                    "empty it, or map the tablespace elsewhere with --tablespace-map OID=DIR",
                ));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::failed(format!("cannot read {}: {e}", dir.display()))),
    }
}

fn create_dir(path: &Path, mode: u32, owner: Option<(u32, u32)>) -> Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("cannot create directory {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777))?;
    chown(path, owner)
}

fn chown(path: &Path, owner: Option<(u32, u32)>) -> Result<()> {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).with_context(|| format!("cannot change the owner of {}", path.display()))?;
    }
    Ok(())
}

/// Downloads a sealed object to a local file, checking its signed length and checksum.
async fn fetch_verified(store: &Store, r: &super::manifest::SealedRef, dest: &Path) -> Result<PathBuf> {
    use std::io::Write;
    let mut stream = store.get(&r.key, None).await?;
    let mut file = std::fs::File::create(dest).with_context(|| format!("cannot write {}", dest.display()))?;
    let mut hasher = blake3::Hasher::new();
    let mut len = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        hasher.update(&chunk);
        len += chunk.len() as u64;
        file.write_all(&chunk)?;
    }
    let actual = hasher.finalize().to_hex();
    if len != r.stored_len || actual.as_str() != r.stored_blake3 {
        return Err(RepoError::Integrity {
            object: r.key.clone(),
            message: format!(
                "{len} bytes with blake3 {actual}; the signed manifest says {} bytes with blake3 {}",
                r.stored_len, r.stored_blake3
            ),
        }
        .into());
    }
    Ok(dest.to_path_buf())
}

/// Runs of blobs fetched with one ranged get.
struct FetchGroup {
    pack: u32,
    start: u64,
    end: u64,
    raw: u64,
    /// The file offset of the group's first chunk.
    file_offset: u64,
    runs: Vec<BlobRun>,
}

fn fetch_groups(runs: &[BlobRun]) -> Vec<FetchGroup> {
    let mut out: Vec<FetchGroup> = Vec::new();
    let mut file_offset = 0u64;
    for run in runs {
        let end = run.o + run.l as u64;
        let raw: u64 = run.c.iter().map(|c| c.2 as u64).sum();
        match out.last_mut() {
            Some(g)
                if g.pack == run.p
                    && (run.o == g.end || (run.o >= g.start && end <= g.end))
                    && end.max(g.end) - g.start <= FETCH_MAX
                    && g.raw + raw <= GROUP_RAW_MAX =>
            {
                g.end = g.end.max(end);
                g.raw += raw;
                g.runs.push(run.clone());
            }
            _ => out.push(FetchGroup { pack: run.p, start: run.o, end, raw, file_offset, runs: vec![run.clone()] }),
        }
        file_offset += raw;
    }
    out
}

/// The decoded chunks of one fetch group, with their chaining values.
struct Decoded {
    /// Slices of the decompressed blobs, not copies.
    chunks: Vec<bytes::Bytes>,
    cvs: Vec<[u8; 32]>,
}

async fn write_file(shared: &Arc<Shared>, path: &Path, entry: &FileEntry) -> Result<()> {
    let file = create_file(shared, path, entry)?;
    let file = Arc::new(file);
    let whole = entry.size <= CHUNK_SIZE as u64;
    let mut hasher = FileHasher::new();
    let mut offset = 0u64;
    let groups = fetch_groups(&entry.blobs);
    // Decoding runs in tasks of its own: a decode that holds a CPU-pool permit
    // must finish (and give it back) even while this loop waits for the pool
    // to write the previous group; polled only from here, it would not, and
    // files waiting on each other's permits would deadlock.
    let mut decoded = futures::stream::iter(groups)
        .map(|g| {
            let shared = shared.clone();
            tokio::spawn(async move { decode_group(&shared, g, whole).await })
        })
        .buffered(2);
    while let Some(group) = decoded.next().await {
        let group = group.map_err(|e| Error::failed(format!("restoring {}: decoding task failed: {e}", entry.path)))?;
        let group = group.with_context(|| format!("restoring {}", entry.path))?;
        let file = file.clone();
        let start = offset;
        // Not on the CPU pool: the decode futures buffered above may hold its
        // permits while this task waits, and waiting for a permit here would
        // deadlock once every permit is held by a future nobody polls.
        let Decoded { chunks, cvs } = group;
        let next = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
            let mut off = start;
            for data in &chunks {
                if let Some(f) = file.as_ref() {
                    f.write_all_at(data, off)?;
                }
                off += data.len() as u64;
            }
            Ok(off)
        })
        .await
        .map_err(|e| Error::failed(format!("writing {} stopped: {e}", path.display())))?
        .with_context(|| format!("cannot write {}", path.display()))?;
        for cv in cvs {
            hasher.push(cv, whole);
        }
        crate::crashpoint::crash_point("restore.mid_write");
        let done = shared.written.fetch_add(next - offset, std::sync::atomic::Ordering::Relaxed) + (next - offset);
        if let Some(p) = &shared.progress {
            p(done);
        }
        offset = next;
    }
    check_file(entry, offset, hasher)
}

/// Creates a file to restore, with its mode and owner; `None` when only verifying.
fn create_file(shared: &Shared, path: &Path, entry: &FileEntry) -> Result<Option<std::fs::File>> {
    if shared.verify_only {
        return Ok(None);
    }
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(entry.mode & 0o777)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(entry.mode & 0o7777))?;
    chown(path, shared.owner)?;
    Ok(Some(f))
}

/// Checks a restored file's length and blake3 against the file list.
fn check_file(entry: &FileEntry, len: u64, hasher: FileHasher) -> Result<()> {
    if len != entry.size {
        return Err(RepoError::Integrity {
            object: entry.path.clone(),
            message: format!("the backup holds {len} bytes of a {} byte file", entry.size),
        }
        .into());
    }
    let actual = hasher.finalize();
    if let Some(expected) = &entry.blake3
        && actual.to_hex().as_str() != expected
    {
        return Err(RepoError::Integrity {
            object: entry.path.clone(),
            message: format!("restored content has blake3 {}, the backup recorded {expected}", actual.to_hex()),
        }
        .into());
    }
    Ok(())
}

/// Small files, in file-list order. Consecutive ones were batched together
/// when backed up, so they share blobs: each blob is fetched and opened once
/// for all of them (opening it per file cost an X25519 agreement and a 1 MiB
/// decompression for each few-KiB file), and each file is checked and written
/// in one call on the CPU pool.
async fn write_small_files(shared: &Arc<Shared>, files: Vec<(PathBuf, FileEntry)>) -> Result<()> {
    let mut cache: VecDeque<OpenedBlob> = VecDeque::new();
    for (path, entry) in files {
        let mut fetched = Vec::new();
        let _permit = shared.ranges.acquire().await.expect("semaphore open");
        for run in &entry.blobs {
            if !cache.iter().any(|b| b.holds(run)) && !fetched.iter().any(|(r, _): &(BlobRun, bytes::Bytes)| r.p == run.p && r.o == run.o) {
                let bytes =
                    fetch_range(shared, run.p, run.o, run.o + run.l as u64).await.with_context(|| format!("restoring {}", entry.path))?;
                fetched.push((run.clone(), bytes));
            }
        }
        let blobs: Vec<OpenedBlob> = entry.blobs.iter().filter_map(|r| cache.iter().find(|b| b.holds(r)).cloned()).collect();
        let shared2 = shared.clone();
        let opened = cpu_pool()
            .run(move || -> Result<Vec<OpenedBlob>> {
                let whole = entry.size <= CHUNK_SIZE as u64;
                let (mut chunks, mut cvs) = (Vec::new(), Vec::new());
                let opened = (|| -> Result<Vec<OpenedBlob>> {
                    let mut blobs = blobs;
                    let mut opened = Vec::new();
                    for (run, bytes) in &fetched {
                        let blob = open_blob(&shared2, run, bytes)?;
                        opened.push(blob.clone());
                        blobs.push(blob);
                    }
                    let cv_key = CvKey::new(&shared2.chunk_key);
                    let mut offset = 0u64;
                    for run in &entry.blobs {
                        let blob = blobs.iter().find(|b| b.holds(run)).expect("every blob of the file is open");
                        run_chunks(&shared2, &cv_key, blob, run, &mut offset, whole, &mut chunks, &mut cvs)?;
                    }
                    Ok(opened)
                })()
                .with_context(|| format!("restoring {}", entry.path))?;
                let file = create_file(&shared2, &path, &entry)?;
                let mut hasher = FileHasher::new();
                let mut off = 0u64;
                for (data, cv) in chunks.iter().zip(cvs) {
                    if let Some(f) = file.as_ref() {
                        f.write_all_at(data, off).with_context(|| format!("cannot write {}", path.display()))?;
                    }
                    off += data.len() as u64;
                    hasher.push(cv, whole);
                }
                check_file(&entry, off, hasher)?;
                let done = shared2.written.fetch_add(off, std::sync::atomic::Ordering::Relaxed) + off;
                if let Some(p) = &shared2.progress {
                    p(done);
                }
                Ok(opened)
            })
            .await?;
        crate::crashpoint::crash_point("restore.mid_write");
        for blob in opened {
            if cache.len() >= BLOB_CACHE {
                cache.pop_front();
            }
            cache.push_back(blob);
        }
    }
    Ok(())
}

/// A blob's plaintext, decrypted and (for a solid blob) decompressed.
#[derive(Clone)]
struct OpenedBlob {
    pack: u32,
    offset: u64,
    key: Arc<str>,
    plain: bytes::Bytes,
}

impl OpenedBlob {
    /// Whether this is the blob `run` describes.
    fn holds(&self, run: &BlobRun) -> bool {
        self.pack == run.p && self.offset == run.o
    }
}

/// Reads a byte range of a pack (the semaphore bounds the ranges held).
async fn fetch_range(shared: &Shared, pack: u32, start: u64, end: u64) -> Result<bytes::Bytes> {
    let pack_id =
        shared.packs.get(pack as usize).ok_or_else(|| Error::failed(format!("file list names pack #{pack} that the manifest lacks")))?;
    let key = layout::pack_key(pack_id);
    let bytes = match storage::get_bytes(shared.store.as_ref(), &key, Some(start..end)).await {
        Ok(b) => b,
        // The range the manifest recorded starts past the pack's end: the pack
        // was truncated or replaced, which is damage, not a bad request.
        // (The same words as a range cut short below: which one a truncated
        // pack meets first depends on which fetch fails first.)
        Err(e) if e.kind() == crate::storage::StorageErrorKind::InvalidInput => {
            tracing::debug!(error = %e, "ranged read past the end of a pack");
            return Err(RepoError::Integrity { object: key, message: "pack is shorter than the manifest says".into() }.into());
        }
        Err(e) => return Err(e.into()),
    };
    if bytes.len() as u64 != end - start {
        return Err(RepoError::Integrity { object: key, message: "pack is shorter than the manifest says".into() }.into());
    }
    Ok(bytes)
}

/// Checks a blob against its signed checksum, decrypts it and, if solid,
/// decompresses it.
fn open_blob(shared: &Shared, run: &BlobRun, blob: &[u8]) -> Result<OpenedBlob> {
    let key: Arc<str> = layout::pack_key(shared.packs.get(run.p as usize).map(String::as_str).unwrap_or("?")).into();
    let damaged = |message: String| Error::from(RepoError::Integrity { object: key.to_string(), message });
    let actual = blake3::hash(blob);
    if actual.to_hex().as_str() != run.h {
        return Err(damaged(format!("blob at offset {} has blake3 {}, the backup recorded {}", run.o, actual.to_hex(), run.h)));
    }
    let plain = shared.opener.decrypt(blob).map_err(|e| damaged(e.to_string()))?;
    let plain = if run.s { decompress_solid(&plain).map_err(|e| damaged(format!("blob at offset {}: {e}", run.o)))? } else { plain };
    Ok(OpenedBlob { pack: run.p, offset: run.o, key, plain: bytes::Bytes::from(plain) })
}

/// The chunks of a run, out of its opened blob, each checked against its
/// identifier; their chaining values go to `cvs`.
#[allow(clippy::too_many_arguments)]
fn run_chunks(
    shared: &Shared,
    cv_key: &CvKey,
    blob: &OpenedBlob,
    run: &BlobRun,
    file_offset: &mut u64,
    whole: bool,
    chunks: &mut Vec<bytes::Bytes>,
    cvs: &mut Vec<[u8; 32]>,
) -> Result<()> {
    let damaged = |message: String| Error::from(RepoError::Integrity { object: blob.key.to_string(), message });
    for (frame_offset, frame_len, raw_len, id) in &run.c {
        let frame = Frame { offset: *frame_offset, len: *frame_len };
        let data = if run.s {
            solid_chunk(&blob.plain, frame, *raw_len as usize).map(|c| blob.plain.slice_ref(c))
        } else {
            decompress_frame(&blob.plain, frame, *raw_len as usize).map(bytes::Bytes::from)
        }
        .map_err(|e| damaged(format!("chunk at offset {}: {e}", run.o)))?;
        let want = decode_id(id).ok_or_else(|| Error::failed(format!("bad chunk id '{id}' in the file list")))?;
        let cv = chaining_value(&data, *file_offset, whole);
        let actual = match shared.chunk_ids {
            ChunkIds::ChainingValue => cv_chunk_id(cv_key, &cv),
            ChunkIds::Content => content_chunk_id(&shared.chunk_key, &data),
        };
        if actual != want {
            return Err(damaged(format!("a chunk in the blob at offset {} does not match its identifier {id}", run.o)));
        }
        *file_offset += data.len() as u64;
        chunks.push(data);
        cvs.push(cv);
    }
    Ok(())
}

/// Fetches a group's byte range, then checks, decrypts and decompresses each
/// blob, computes every chunk's chaining value and checks the chunk against
/// its identifier. `whole`: the file is one chunk.
async fn decode_group(shared: &Arc<Shared>, g: FetchGroup, whole: bool) -> Result<Decoded> {
    let _permit = shared.ranges.acquire().await.expect("semaphore open");
    let bytes = fetch_range(shared, g.pack, g.start, g.end).await?;
    let shared = shared.clone();
    cpu_pool()
        .run(move || {
            let cv_key = CvKey::new(&shared.chunk_key);
            let mut file_offset = g.file_offset;
            let (mut chunks, mut cvs) = (Vec::new(), Vec::new());
            let mut opened: Option<OpenedBlob> = None;
            for run in &g.runs {
                if opened.as_ref().is_none_or(|b| b.offset != run.o) {
                    let blob = &bytes[(run.o - g.start) as usize..(run.o - g.start + run.l as u64) as usize];
                    opened = Some(open_blob(&shared, run, blob)?);
                }
                let blob = opened.as_ref().expect("opened");
                run_chunks(&shared, &cv_key, blob, run, &mut file_offset, whole, &mut chunks, &mut cvs)?;
            }
            Ok(Decoded { chunks, cvs })
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(p: u32, o: u64, l: u32, raw_chunks: usize) -> BlobRun {
        BlobRun { p, o, l, h: String::new(), c: (0..raw_chunks).map(|_| (0, 0, CHUNK_SIZE as u32, String::new())).collect(), s: true }
    }

    #[test]
    fn fetch_groups_coalesce_adjacent_blobs_within_bounds() {
        // Adjacent blobs of one pack: one group; another pack: a new group.
        let g = fetch_groups(&[run(0, 0, 100, 1), run(0, 100, 100, 1), run(1, 200, 100, 1)]);
        assert_eq!(g.iter().map(|g| (g.pack, g.start, g.end, g.runs.len())).collect::<Vec<_>>(), vec![(0, 0, 200, 2), (1, 200, 300, 1)]);
        // A second run in the same blob joins its group.
        assert_eq!(fetch_groups(&[run(0, 0, 100, 1), run(0, 0, 100, 1)]).len(), 1);
        // Well-compressed blobs: the raw size, not the stored size, ends a group.
        let runs: Vec<BlobRun> = (0..40).map(|i| run(0, i * 1000, 1000, 16)).collect();
        let groups = fetch_groups(&runs);
        assert!(groups.iter().all(|g| g.raw <= GROUP_RAW_MAX), "decoded groups stay bounded");
        assert_eq!(groups.iter().map(|g| g.runs.len()).sum::<usize>(), 40);
        assert!(groups.len() >= 10);
    }
}
