//! `walvault archive-push PATH`, for `archive_command = 'walvault archive-push %p'`.
//!
//! Exits 0 only once the file is durably in the repository. When PostgreSQL has
//! a backlog (more `.ready` files in archive_status), the next ones are shipped
//! in parallel in the same call; a marker in the spool records each one, so when
//! PostgreSQL asks for it later the answer is immediate. PostgreSQL itself marks
//! a segment archived only when archive-push for that segment exits 0.
//!
//! A backlog is better served by a background pusher (like pgBackRest's
//! asynchronous archiving): a call that sees more ready segments after its own
//! starts `archive-push-pusher` (detached, one per repository, held by a file
//! lock), which keeps storing the ready segments in order, several at once,
//! writing a marker for each. The call then waits for its own segment's
//! marker, checks the object is in the store, and exits 0. If the pusher
//! fails on that segment, ends without it, or takes too long, the call stores
//! the segment itself, so its exact errors are the ones PostgreSQL logs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;

use super::Ctx;
use crate::cli::{ArchivePushArgs, PusherArgs};
use crate::error::{Error, Result, ResultExt};
use crate::pg::lsn::{HistoryEntry, WalFileKind, WalSegmentName, classify_wal_file, parse_history};
use crate::pg::walheader::{self, ExpectedWal};
use crate::repo::RepoError;
use crate::repo::wal::{PushOutcome, SealedWal, WalArchive, normalize_partial, switch_inside};
use crate::storage::Store;

pub async fn run(ctx: &Ctx, args: &ArchivePushArgs) -> Result<i32> {
    push(ctx, args, None).await
}

/// archive-push for one file; `store` is the repository's store when the
/// caller keeps one open (the archive server), else it is opened here.
pub(crate) async fn push(ctx: &Ctx, args: &ArchivePushArgs, store: Option<&Store>) -> Result<i32> {
    let name = file_name(&args.path)?;
    let kind = classify_wal_file(&name).ok_or_else(|| {
        Error::Usage(format!("'{}' is not a WAL file name (segment, .partial, .backup or .history)", args.path.display()))
    })?;
    let markers = marker_dir(ctx);
    // The segment is read only when a marker cannot vouch for it by its file
    // identity: in a backlog the pusher has stored it, and reading and hashing
    // 16 MiB per call was a sixth of the CPU time per segment.
    let identity = FileIdentity::of(&args.path);
    let mut content = Content { path: &args.path, data: None };

    let store = match store {
        Some(store) => store.clone(),
        None => ctx.store().await?,
    };
    if kind == WalFileKind::Segment
        && let Some(marker) = read_marker(&markers, &name)
        && content.is_in(&marker, identity.as_ref())?
        && store.head(&WalArchive::key_of(&name)).await?.is_some()
    {
        if marker.ahead {
            tracing::info!("{name} was already archived by an earlier call (blake3 {})", marker.plain);
            write_marker(&markers, &name, &marker.plain, false, marker.file.as_ref());
        } else {
            // PostgreSQL archives a file again after a crash.
            tracing::warn!("{name} is already in the repository with the same content (blake3 {}); nothing to do", marker.plain);
        }
        crate::crashpoint::crash_point("archive_push.before_exit");
        return Ok(0);
    }

    if kind == WalFileKind::Segment && ctx.config.wal.push_parallel > 1 {
        let wal_dir = wal_dir_of(&args.path);
        // With more ready after this one, the pusher is (or is started) at
        // the backlog. At its end, it may already be sealing this segment:
        // wait for it rather than seal the segment a second time, but start
        // no pusher for a segment that is alone.
        let spawn = !ready_after(&wal_dir, &name, 1).is_empty();
        // A marker here that did not answer above (other content, or the
        // object is gone) is one the pusher would skip: no use waiting for it.
        if (spawn || pusher_taken(&markers, &name))
            && read_marker(&markers, &name).is_none()
            && let Some(marker) = wait_for_pusher(ctx, &markers, &wal_dir, &name, spawn).await
            && content.is_in(&marker, identity.as_ref())?
            && store.head(&WalArchive::key_of(&name)).await?.is_some()
        {
            tracing::info!("{name} archived by the background pusher (blake3 {})", marker.plain);
            write_marker(&markers, &name, &marker.plain, false, marker.file.as_ref());
            prune_markers(&markers, &name);
            crate::crashpoint::crash_point("archive_push.before_exit");
            return Ok(0);
        }
    }

    let data = content.take()?;
    let archive = ctx.wal_writer(store).await?;
    let expected = archive.expected_wal();
    let data = match kind {
        WalFileKind::Partial => normalized_partial(&archive, &args.path, &name, data.to_vec(), &expected).await?,
        _ => {
            check_file(&name, kind, &data, &expected)?;
            data
        }
    };

    let mut batch = vec![(name.clone(), data)];
    // Ship the next ones too, unless the background pusher is at them.
    if kind == WalFileKind::Segment && ctx.config.wal.push_parallel > 1 && !pusher_running(&markers) {
        batch.extend(backlog(&args.path, &name, ctx.config.wal.push_parallel - 1, &expected));
    }
    let results = push_batch(&archive, batch, "archive-push", |n| marker_link(&markers, n)).await;
    crate::crashpoint::crash_point("archive_push.stored");

    let mut own = None;
    for (file, result) in results {
        match result {
            Ok((outcome, plain)) => {
                if file == name {
                    own = Some((outcome, plain.clone()));
                } else {
                    tracing::info!("{file} archived ahead of PostgreSQL's request (backlog)");
                }
                if classify_wal_file(&file) == Some(WalFileKind::Segment) {
                    write_marker(&markers, &file, &plain, file != name, None);
                }
            }
            Err(e) if file == name => return Err(push_error(&file, e)),
            Err(e) => tracing::warn!("could not archive {file} ahead of PostgreSQL's request (it will ask again): {e}"),
        }
    }
    match own {
        Some((PushOutcome::AlreadyIdentical, plain)) => {
            tracing::warn!("{name} is already in the repository with the same content (blake3 {plain}); nothing to do");
        }
        Some((PushOutcome::Stored, _)) => tracing::info!("{name} archived"),
        None => unreachable!("the requested file is always in the batch"),
    }
    if kind == WalFileKind::Segment {
        prune_markers(&markers, &name);
    }
    crate::crashpoint::crash_point("archive_push.before_exit");
    Ok(0)
}

fn push_error(file: &str, e: Error) -> Error {
    match e.root() {
        Error::Repo(RepoError::Conflict(m)) => Error::with_hint(
            format!("cannot archive {file}: {m}"),
            "two different files carry this name: is another server (a restored copy, an old primary) archiving into the same repository? \
             Check archive_command and repository.url on every server; the stored file was kept",
        ),
        _ => e.context(format!("cannot archive {file}")),
    }
}

fn file_name(path: &Path) -> Result<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| Error::Usage(format!("'{}' has no file name", path.display())))
}

/// Refuses a file that is not this cluster's WAL, or is damaged.
pub fn check_file(name: &str, kind: WalFileKind, data: &[u8], expected: &ExpectedWal) -> Result<()> {
    match kind {
        WalFileKind::Segment | WalFileKind::Partial => {
            let seg_name = &name[..24];
            let seg = WalSegmentName::parse(seg_name, expected.seg_size)
                .ok_or_else(|| Error::failed(format!("{name}: not a segment name for {} byte segments", expected.seg_size)))?;
            walheader::check_segment(data, &seg, expected, false).map_err(|e| {
                Error::with_hint(
                    format!("refusing to archive {name}: {e}"),
                    "this file is not WAL of the repository's cluster, or it is damaged; check archive_command and repository.url",
                )
            })?;
        }
        WalFileKind::History => {
            let text = std::str::from_utf8(data).map_err(|_| Error::failed(format!("refusing to archive {name}: not text")))?;
            parse_history(text).map_err(|e| Error::failed(format!("refusing to archive {name}: damaged history file ({e})")))?;
        }
        WalFileKind::BackupHistory => {
            let text = String::from_utf8_lossy(data);
            if !text.contains("START WAL LOCATION") {
                return Err(Error::failed(format!("refusing to archive {name}: not a backup history file")));
            }
        }
    }
    Ok(())
}

/// A `.partial` in the repository's form (see `normalize_partial`): the switch
/// point comes from the history files next to it in pg_wal (PostgreSQL writes
/// the new timeline's history before it renames the old segment), else from
/// the repository.
async fn normalized_partial(archive: &WalArchive, path: &Path, name: &str, mut data: Vec<u8>, expected: &ExpectedWal) -> Result<Bytes> {
    let seg = WalSegmentName::parse(&name[..24], expected.seg_size)
        .ok_or_else(|| Error::failed(format!("{name}: not a segment name for {} byte segments", expected.seg_size)))?;
    let mut switch = switch_inside(&seg, &local_histories(path));
    if switch.is_none() {
        let stored: Vec<Vec<HistoryEntry>> = archive.histories().await?.into_iter().map(|(_, h)| h).collect();
        switch = switch_inside(&seg, &stored);
    }
    match switch {
        Some(at) => {
            normalize_partial(&mut data, &seg, at);
            check_file(name, WalFileKind::Partial, &data, expected)?;
        }
        None => check_file(name, WalFileKind::Partial, &data, expected).map_err(|e| {
            Error::with_hint(
                format!("{e}; and no timeline history file says where timeline {} ended inside this segment", seg.tli),
                format!(
                    "PostgreSQL archives the new timeline's history file first: check that a history file listing timeline {} is in pg_wal or in the repository",
                    seg.tli
                ),
            )
        })?,
    }
    Ok(Bytes::from(data))
}

/// The switch points of the history files in the directory of `path` (pg_wal).
fn local_histories(path: &Path) -> Vec<Vec<HistoryEntry>> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| e.file_name().to_str().and_then(classify_wal_file) == Some(WalFileKind::History))
        .filter_map(|e| parse_history(&std::fs::read_to_string(e.path()).ok()?).ok())
        .collect()
}

/// The pg_wal directory of a WAL file path (relative paths stay relative).
fn wal_dir_of(path: &Path) -> PathBuf {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf()
}

/// Up to `max` segment names after `current` that PostgreSQL marked ready, in order.
fn ready_after(wal_dir: &Path, current: &str, max: usize) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(wal_dir.join("archive_status")) else { return Vec::new() };
    let mut ready: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".ready").map(str::to_string))
        .filter(|n| classify_wal_file(n) == Some(WalFileKind::Segment) && n.as_str() > current)
        .collect();
    ready.sort();
    ready.truncate(max);
    ready
}

/// The next `.ready` segments after `current`, read and checked; ones that fail
/// their check are left for PostgreSQL to push (and fail) itself.
fn backlog(path: &Path, current: &str, max: usize, expected: &ExpectedWal) -> Vec<(String, Bytes)> {
    let wal_dir = wal_dir_of(path);
    ready_after(&wal_dir, current, max)
        .into_iter()
        .filter_map(|n| {
            let (data, _) = read_wal_file(&wal_dir.join(&n)).ok()?;
            check_file(&n, WalFileKind::Segment, &data, expected).ok()?;
            Some((n, data))
        })
        .collect()
}

/// Seals the files in parallel, links each segment to its predecessor (from the
/// batch when it is there, else from `known_link`, else from the repository),
/// and stores them in parallel.
pub async fn push_batch(
    archive: &WalArchive,
    batch: Vec<(String, Bytes)>,
    source: &str,
    known_link: impl Fn(&str) -> Option<String>,
) -> Vec<(String, Result<(PushOutcome, String)>)> {
    let names: Vec<String> = batch.iter().map(|(n, _)| n.clone()).collect();
    let sealed: Vec<Result<SealedWal>> = futures::stream::iter(batch)
        .map(|(n, d)| async move { Ok(archive.seal(&n, d).await?) })
        .buffered(archive_parallelism())
        .collect()
        .await;

    let seg_size = archive.seg_size();
    let mut links: Vec<Option<String>> = Vec::with_capacity(sealed.len());
    for (i, s) in sealed.iter().enumerate() {
        let this = WalSegmentName::parse(&names[i], seg_size);
        let from_batch = i.checked_sub(1).and_then(|j| {
            let prev = WalSegmentName::parse(&names[j], seg_size)?;
            let this = this?;
            (prev.tli == this.tli && prev.segno + 1 == this.segno).then(|| sealed[j].as_ref().ok()).flatten()
        });
        let prev_name = this.and_then(|t| t.prev()).map(|p| p.to_string());
        links.push(match (from_batch, s) {
            (Some(prev), _) => Some(prev.summary.plain_hash.to_hex().to_string()),
            (None, Ok(_)) => match prev_name.as_deref().and_then(&known_link) {
                Some(link) => Some(link),
                None => archive.chain_link(&names[i]).await.unwrap_or(None),
            },
            (None, Err(_)) => None,
        });
    }

    let archive = Arc::new(archive);
    futures::stream::iter(sealed.into_iter().zip(links).zip(names))
        .map(|((sealed, prev), name)| {
            let archive = archive.clone();
            async move {
                let result = match sealed {
                    Ok(s) => {
                        let plain = s.summary.plain_hash.to_hex().to_string();
                        archive.store_sealed(s, prev, source).await.map(|o| (o, plain)).map_err(Error::from)
                    }
                    Err(e) => Err(e),
                };
                (name, result)
            }
        })
        .buffer_unordered(archive_parallelism())
        .collect()
        .await
}

fn archive_parallelism() -> usize {
    crate::pipeline::cpu_pool().size().max(2) * 2
}

/// Markers of segments this repository holds, by name: the plaintext blake3 of
/// each segment archive-push stored (or found stored). One directory per
/// repository, so clusters sharing a spool never see each other's.
fn marker_dir(ctx: &Ctx) -> PathBuf {
    let tag = blake3::hash(ctx.config.repository.url.as_bytes()).to_hex();
    ctx.config.spool_dir().join(format!("archive-push-{}", &tag[..16]))
}

fn marker_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.ok"))
}

/// A marker: `<plain blake3>`, then ` ahead` for a segment stored before
/// PostgreSQL asked for it, then ` file=<identity>` when the writer read the
/// segment from the file it names.
struct Marker {
    plain: String,
    ahead: bool,
    file: Option<FileIdentity>,
}

fn read_marker(dir: &Path, name: &str) -> Option<Marker> {
    let text = std::fs::read_to_string(marker_path(dir, name)).ok()?;
    let mut words = text.split_whitespace();
    let plain = words.next().filter(|h| blake3::Hash::from_hex(h).is_ok())?.to_string();
    let (mut ahead, mut file) = (false, None);
    for word in words {
        match word.strip_prefix("file=") {
            Some(id) => file = FileIdentity::parse(id),
            None => ahead |= word == "ahead",
        }
    }
    Some(Marker { plain, ahead, file })
}

/// Which file a segment was read from, and as it was: device, inode, size
/// and modification time. PostgreSQL does not change a segment once it is
/// ready for archiving (a recycled one gets another name), so a segment whose
/// file still has the identity a marker recorded is the one that was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl FileIdentity {
    pub(crate) fn of(path: &Path) -> Option<FileIdentity> {
        std::fs::metadata(path).ok().map(|m| FileIdentity::from_metadata(&m))
    }

    fn from_metadata(m: &std::fs::Metadata) -> FileIdentity {
        use std::os::unix::fs::MetadataExt;
        FileIdentity { dev: m.dev(), ino: m.ino(), size: m.size(), mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128 }
    }

    fn parse(s: &str) -> Option<FileIdentity> {
        let mut parts = s.split(':');
        let mut next = || parts.next();
        let id = FileIdentity {
            dev: next()?.parse().ok()?,
            ino: next()?.parse().ok()?,
            size: next()?.parse().ok()?,
            mtime_ns: next()?.parse().ok()?,
        };
        next().is_none().then_some(id)
    }
}

impl std::fmt::Display for FileIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}:{}", self.dev, self.ino, self.size, self.mtime_ns)
    }
}

/// The file archive-push was given, read at most once, when needed.
struct Content<'a> {
    path: &'a Path,
    data: Option<Bytes>,
}

impl Content<'_> {
    fn read(&mut self) -> Result<&[u8]> {
        if self.data.is_none() {
            let (data, _) = read_wal_file(self.path).with_context(|| format!("cannot read {}", self.path.display()))?;
            self.data = Some(data);
        }
        Ok(self.data.as_deref().expect("just read"))
    }

    /// Whether `marker` records this content: the same file identity, or
    /// else (the file was copied or touched since) the same checksum.
    fn is_in(&mut self, marker: &Marker, identity: Option<&FileIdentity>) -> Result<bool> {
        if marker.file.is_some() && marker.file.as_ref() == identity {
            return Ok(true);
        }
        Ok(marker.plain == blake3::hash(self.read()?).to_hex().as_str())
    }

    fn take(mut self) -> Result<Bytes> {
        self.read()?;
        Ok(self.data.take().expect("just read"))
    }
}

/// The chain link to a segment stored by an earlier call: saves reading its
/// record back from the store.
fn marker_link(dir: &Path, prev: &str) -> Option<String> {
    read_marker(dir, prev).map(|m| m.plain)
}

/// Markers are shortcuts (a lost one costs a store round trip, a torn one
/// reads as absent), so they are renamed into place without an fsync.
fn write_marker(dir: &Path, name: &str, plain: &str, ahead: bool, file: Option<&FileIdentity>) {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let _ = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir);
    let path = marker_path(dir, name);
    let tmp = dir.join(format!(".{name}.{:08x}", rand::random::<u32>()));
    let mut text = plain.to_string();
    if ahead {
        text.push_str(" ahead");
    }
    if let Some(file) = file {
        text.push_str(&format!(" file={file}"));
    }
    text.push('\n');
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
        .and_then(|_| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        tracing::debug!(error = %e, "cannot write archive-push marker (only a shortcut is lost)");
    }
}

/// Markers of segments before `current` are no longer needed: PostgreSQL
/// archives in order. `current`'s stays, for the next segment's chain link.
/// So do the pusher's notes on them (left by a pusher that died).
fn prune_markers(dir: &Path, current: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        if let Some(n) = e.file_name().to_str().and_then(|n| [".ok", ".taken", ".failed"].iter().find_map(|s| n.strip_suffix(s)))
            && n < current
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// How long a call waits for the background pusher to store its segment
/// before storing it itself (the pusher may be stuck on a slow store).
const PUSHER_WAIT: Duration = Duration::from_secs(60);
/// How long a just-started pusher has to take its lock.
const PUSHER_START: Duration = Duration::from_secs(5);
/// The pusher exits after this long with nothing ready to store.
const PUSHER_IDLE_EXIT: Duration = Duration::from_secs(1);
const PUSHER_LOCK: &str = "pusher.lock";

/// Marks a segment the pusher could not store, so the call waiting for it
/// stores it itself at once instead of waiting out PUSHER_WAIT.
fn failed_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.failed"))
}

/// Marks a segment the pusher has taken and is sealing or storing; gone once
/// its marker (or its `.failed`) is written.
fn taken_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.taken"))
}

/// Whether a running pusher has taken `name` (a `.taken` left by a pusher
/// that died does not count).
fn pusher_taken(dir: &Path, name: &str) -> bool {
    taken_path(dir, name).exists() && pusher_running(dir)
}

/// The pusher's lock, taken without waiting. It lasts as long as the file
/// is open (it dies with the process).
enum PusherLock {
    Taken(#[allow(dead_code)] std::fs::File),
    /// A pusher holds it.
    Busy,
    /// The spool cannot hold it (not writable, say): no pusher can run.
    Unavailable,
}

fn try_pusher_lock(dir: &Path) -> PusherLock {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let _ = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir);
    let Ok(file) = std::fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(dir.join(PUSHER_LOCK)) else {
        return PusherLock::Unavailable;
    };
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 { PusherLock::Taken(file) } else { PusherLock::Busy }
}

fn pusher_running(dir: &Path) -> bool {
    matches!(try_pusher_lock(dir), PusherLock::Busy)
}

/// Waits for the background pusher (started here if none runs and `spawn`)
/// to store `name`; returns its marker. None when this call must store it itself.
async fn wait_for_pusher(ctx: &Ctx, markers: &Path, wal_dir: &Path, name: &str, spawn: bool) -> Option<Marker> {
    let started = Instant::now();
    let mut spawned: Option<Instant> = None;
    let mut seen_running = false;
    loop {
        if let Some(marker) = read_marker(markers, name) {
            return Some(marker);
        }
        if failed_path(markers, name).exists() {
            let _ = std::fs::remove_file(failed_path(markers, name));
            tracing::info!("the background pusher could not store {name}; storing it here");
            return None;
        }
        // (A lock taken here is released at once: the pusher must get it.)
        let busy = match try_pusher_lock(markers) {
            PusherLock::Unavailable => {
                tracing::warn!("the spool {} cannot hold the background pusher's lock; storing {name} here", markers.display());
                return None;
            }
            PusherLock::Busy => true,
            PusherLock::Taken(_) => false,
        };
        if busy {
            seen_running = true;
        } else if seen_running || !spawn || spawned.is_some_and(|at| at.elapsed() > PUSHER_START) {
            // It ended (or died, or never got going) without this segment.
            return None;
        } else if spawned.is_none() {
            if let Err(e) = spawn_pusher(ctx, wal_dir) {
                tracing::warn!(error = %e, "cannot start the background pusher; storing segments one call at a time");
                return None;
            }
            spawned = Some(Instant::now());
        }
        if started.elapsed() > PUSHER_WAIT {
            tracing::warn!("the background pusher has not stored {name} after {}s; storing it here", PUSHER_WAIT.as_secs());
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn spawn_pusher(ctx: &Ctx, wal_dir: &Path) -> std::io::Result<()> {
    let wal_dir = std::fs::canonicalize(wal_dir)?;
    // Its log lines go where archive-push's go: PostgreSQL's log.
    ctx.spawn_worker(&["archive-push-pusher".as_ref(), "--wal-dir".as_ref(), wal_dir.as_os_str()], std::process::Stdio::inherit())
}

/// Where the pusher gets a segment's chain link (its predecessor's plaintext
/// checksum): known (from a marker), or from the predecessor's sealing, still
/// under way in the pipeline. None falls back to the predecessor's record in the store.
#[derive(Clone)]
enum Link {
    Known(Option<String>),
    Pending(futures::future::Shared<tokio::sync::oneshot::Receiver<String>>),
}

/// The background pusher: stores the ready segments of `wal_dir` in order,
/// `wal.push_parallel` at a time (as one is stored the next starts), each
/// linked to its predecessor, and writes a marker for each one stored. Exits
/// when nothing has been ready for PUSHER_IDLE_EXIT, or at once if another
/// pusher holds the lock.
pub async fn pusher(ctx: &Ctx, args: &PusherArgs) -> Result<i32> {
    use futures::FutureExt;
    use futures::stream::FuturesUnordered;

    let markers = marker_dir(ctx);
    let PusherLock::Taken(_lock) = try_pusher_lock(&markers) else { return Ok(0) };
    keep_segment_buffers();
    let store = ctx.store().await?;
    let archive = Arc::new(ctx.wal_writer(store).await?);
    let expected = archive.expected_wal();
    let seg_size = archive.seg_size();
    let parallel = ctx.config.wal.push_parallel.max(1);
    let mut in_flight = FuturesUnordered::new();
    let mut last: Option<(String, Link)> = None;
    let mut idle_since = Instant::now();
    let (mut stored, mut failed) = (0u64, 0u64);
    loop {
        if in_flight.len() < parallel {
            let after = last.as_ref().map(|(n, _)| n.clone()).unwrap_or_default();
            for name in ready_after(&args.wal_dir, &after, parallel - in_flight.len()) {
                let prev = WalSegmentName::parse(&name, seg_size).and_then(|s| s.prev()).map(|p| p.to_string());
                let link = match (&last, prev) {
                    (Some((n, link)), Some(p)) if *n == p => link.clone(),
                    (_, Some(p)) => Link::Known(marker_link(&markers, &p)),
                    _ => Link::Known(None),
                };
                if let Some(m) = read_marker(&markers, &name) {
                    // Stored already (by a call, or by this pusher earlier).
                    last = Some((name, Link::Known(Some(m.plain))));
                    continue;
                }
                let _ = std::fs::write(taken_path(&markers, &name), b"");
                let (tx, rx) = tokio::sync::oneshot::channel();
                last = Some((name.clone(), Link::Pending(rx.shared())));
                in_flight.push(push_one(archive.clone(), args.wal_dir.join(&name), name, link, tx, expected));
            }
        }
        if in_flight.is_empty() {
            if idle_since.elapsed() > PUSHER_IDLE_EXIT {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let done = tokio::select! {
            Some(done) = in_flight.next() => Some(done),
            _ = tokio::time::sleep(Duration::from_millis(20)) => None,
        };
        idle_since = Instant::now();
        match done {
            Some((name, Ok((_, plain, file)))) => {
                crate::crashpoint::crash_point("archive_push.stored");
                write_marker(&markers, &name, &plain, true, Some(&file));
                // Only now: with neither note nor marker, a call at the
                // frontier would seal the segment itself.
                let _ = std::fs::remove_file(taken_path(&markers, &name));
                stored += 1;
            }
            Some((name, Err(e))) => {
                tracing::warn!("the background pusher could not store {name} (archive-push will try it itself): {e}");
                let _ = std::fs::write(failed_path(&markers, &name), format!("{e}\n"));
                let _ = std::fs::remove_file(taken_path(&markers, &name));
                failed += 1;
            }
            None => {}
        }
    }
    tracing::info!(stored, failed, "background pusher done: nothing more is ready");
    Ok(0)
}

/// The pusher allocates and frees segment-sized buffers (the file, its
/// compressed and encrypted forms) for every segment. glibc hands buffers that
/// large back to the kernel when freed, and the next segment faults fresh
/// pages in again: keep them in the heap for the pusher's life instead (its
/// peak is `push_parallel` segments' buffers either way). Measured on a
/// 100-segment backlog: 63-65 against 65-66 ms of machine time per segment
/// (three alternating runs each).
fn keep_segment_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before the
    // pusher's buffers exist, and any value is safe for the allocator.
    unsafe {
        // 32 MiB is glibc's largest mmap threshold: 16 MiB segments (and
        // their compression bound) stay below it.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// Reads, checks, seals and stores one segment for the pusher; hands its
/// plaintext checksum to the next segment's task as soon as it is sealed.
async fn push_one(
    archive: Arc<WalArchive>,
    path: PathBuf,
    name: String,
    prev: Link,
    sealed_tx: tokio::sync::oneshot::Sender<String>,
    expected: ExpectedWal,
) -> (String, Result<(PushOutcome, String, FileIdentity)>) {
    let result = async {
        let (data, file) = tokio::task::spawn_blocking(move || {
            read_wal_file(&path).map_err(|e| std::io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display())))
        })
        .await
        .map_err(|e| Error::failed(format!("reading a segment stopped: {e}")))??;
        check_file(&name, WalFileKind::Segment, &data, &expected)?;
        let sealed = archive.seal(&name, data).await?;
        let plain = sealed.summary.plain_hash.to_hex().to_string();
        let _ = sealed_tx.send(plain.clone());
        let link = match prev {
            Link::Known(l) => l,
            // A predecessor that failed drops its sender: no link from it.
            Link::Pending(rx) => rx.await.ok(),
        };
        let link = match link {
            Some(l) => Some(l),
            None => archive.chain_link(&name).await.unwrap_or(None),
        };
        let outcome = archive.store_sealed(sealed, link, "archive-push").await?;
        Ok::<_, Error>((outcome, plain, file))
    }
    .await;
    (name, result)
}

/// A WAL file's bytes and the identity of the file they were read from (the
/// same open file): mapped (see MappedFile), or read where the file
/// system cannot map it.
fn read_wal_file(path: &Path) -> std::io::Result<(Bytes, FileIdentity)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let meta = f.metadata()?;
    let identity = FileIdentity::from_metadata(&meta);
    if let Ok(mapped) = MappedFile::map(&f, meta.len()) {
        return Ok((Bytes::from_owner(mapped), identity));
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    f.read_to_end(&mut data)?;
    Ok((Bytes::from(data), identity))
}

/// A WAL file mapped read-only: sealing reads it straight from the page cache
/// instead of copying 16 MiB into the heap first (that copy was about a tenth
/// of the pusher's time per segment; 6% more segments/s without it).
/// PostgreSQL neither writes nor truncates a file that waits for archiving.
/// It recycles a segment (renames and overwrites it) only after archive-push
/// has reported it stored, so the repository holds it by then: a pusher
/// still sealing it finds the object there and, should what it read differ,
/// refuses to replace it (the store's create-if-absent).
struct MappedFile {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value alone.
unsafe impl Send for MappedFile {}
unsafe impl Sync for MappedFile {}

impl MappedFile {
    fn map(file: &std::fs::File, len: u64) -> std::io::Result<MappedFile> {
        use std::os::fd::AsRawFd;
        // An empty file cannot be mapped (EINVAL): it is read instead.
        let len = usize::try_from(len).map_err(|_| std::io::Error::other("file too large to map"))?;
        // SAFETY: a fresh private read-only mapping of an open file; the
        // kernel chooses the address. MAP_POPULATE maps every page at once.
        let ptr =
            unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE | libc::MAP_POPULATE, file.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(MappedFile { ptr, len })
    }
}

impl AsRef<[u8]> for MappedFile {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: ptr maps len readable bytes for as long as self lives.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`, once.
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_vouches_by_file_identity_and_else_by_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("000000010000000000000001");
        std::fs::write(&path, b"segment bytes").unwrap();
        let id = FileIdentity::of(&path).unwrap();
        assert_eq!(FileIdentity::parse(&id.to_string()), Some(id), "the marker text round-trips");
        assert_eq!(FileIdentity::parse("1:2:3"), None);

        write_marker(dir.path(), "seg", &"0".repeat(64), true, Some(&id));
        let marker = read_marker(dir.path(), "seg").unwrap();
        assert!(marker.ahead);
        assert_eq!(marker.file, Some(id));
        // The checksum is deliberately wrong: only the identity can vouch here.
        let mut content = Content { path: &path, data: None };
        assert!(content.is_in(&marker, Some(&id)).unwrap(), "same file as stored: no need to read it");
        assert!(content.data.is_none(), "and it was not read");

        // Another file under the name (other size and time): the checksum decides.
        std::thread::sleep(Duration::from_millis(10));
        std::fs::write(&path, b"other segment bytes").unwrap();
        let now = FileIdentity::of(&path).unwrap();
        assert_ne!(now, id);
        let mut content = Content { path: &path, data: None };
        assert!(!content.is_in(&marker, Some(&now)).unwrap(), "a wrong checksum is not vouched for");
        let right = blake3::hash(b"other segment bytes").to_hex().to_string();
        write_marker(dir.path(), "seg", &right, false, None);
        assert!(content.is_in(&read_marker(dir.path(), "seg").unwrap(), Some(&now)).unwrap(), "the right checksum is");
    }
}
