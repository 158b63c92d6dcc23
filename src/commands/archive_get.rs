//! `walvault archive-get NAME DEST`, for `restore_command = 'walvault archive-get %f %p'`.
//!
//! Exit 0 once DEST is written (atomically); exit 1 only when the repository
//! has no such file; any other failure exits 126, which PostgreSQL treats as
//! fatal, so recovery stops instead of ending early and promoting too soon.
//!
//! Prefetch: after fetching segment N from the store, a detached worker keeps
//! the next `wal.prefetch` segments of the same timeline in a spool private to
//! the data directory; the next calls are answered from it with a rename. Only
//! complete segments are prefetched (they never change once stored).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::Ctx;
use crate::cli::{ArchiveGetArgs, PrefetchArgs};
use crate::error::{Error, Result, exit};
use crate::pg::lsn::{WalFileKind, WalSegmentName, classify_wal_file};
use crate::repo::wal::{STREAMING_SUFFIX, WalArchive};

const WANTED: &str = "wanted";
const PID_FILE: &str = "prefetch.pid";
/// The worker exits when PostgreSQL has asked for nothing new for this long.
const IDLE_EXIT: Duration = Duration::from_secs(60);
/// How long a request waits for a download the worker has under way.
const PREFETCH_WAIT: Duration = Duration::from_secs(30);

pub async fn run(ctx: &Ctx, args: &ArchiveGetArgs) -> Result<i32> {
    match fetch(ctx, args).await {
        Ok(true) => Ok(0),
        Ok(false) => {
            tracing::info!("{} is not in the repository", args.name);
            Ok(exit::NOT_FOUND)
        }
        Err(e) => {
            eprintln!("error: archive-get {}: {e}", args.name);
            if let Some(h) = e.hint() {
                eprintln!("hint: {h}");
            }
            Ok(exit::ARCHIVE_GET_FATAL)
        }
    }
}

/// The spool of prefetched segments for the data directory we run in.
pub fn prefetch_spool(ctx: &Ctx) -> PathBuf {
    // PostgreSQL runs restore_command in the data directory.
    prefetch_spool_in(&ctx.config.spool_dir(), &std::env::current_dir().unwrap_or_default())
}

/// The prefetch spool of the data directory `data_dir` under the spool `base`.
pub fn prefetch_spool_in(base: &Path, data_dir: &Path) -> PathBuf {
    let dir = data_dir.canonicalize().unwrap_or_else(|_| data_dir.to_path_buf());
    let tag = blake3::hash(dir.as_os_str().as_encoded_bytes()).to_hex();
    base.join(format!("prefetch-{}", &tag[..16]))
}

async fn fetch(ctx: &Ctx, args: &ArchiveGetArgs) -> Result<bool> {
    let Some(kind) = classify_wal_file(&args.name) else {
        return Ok(false);
    };
    let spool = prefetch_spool(ctx);
    if kind == WalFileKind::Segment
        && (spool.join(&args.name).exists() || wait_for_prefetch(&spool, &args.name).await)
        && take_from_spool(&spool.join(&args.name), &args.dest)
    {
        tracing::info!("{} served from the prefetch spool", args.name);
        want(ctx, &spool, &args.name);
        return Ok(true);
    }

    let store = ctx.store().await?;
    let desc = ctx.reader_descriptor(&store).await?;
    let archive = WalArchive::new(store, desc, None);
    let opener = ctx.opener()?;
    if archive.fetch_to_file(&args.name, &opener, &args.dest).await?.is_some() {
        tracing::info!("{} fetched from the repository", args.name);
        if kind == WalFileKind::Segment {
            want(ctx, &spool, &args.name);
        }
        return Ok(true);
    }
    if kind == WalFileKind::Segment {
        return fetch_streaming_copy(&archive, &opener, &args.name, &args.dest).await;
    }
    Ok(false)
}

/// Moves a prefetched segment to `dest`; copies when the spool is on another
/// file system. False when the spool does not have it.
fn take_from_spool(src: &Path, dest: &Path) -> bool {
    match std::fs::rename(src, dest) {
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let tmp = dest.with_file_name(format!(
                ".{}.spool-{:08x}",
                dest.file_name().and_then(|n| n.to_str()).unwrap_or("wal"),
                rand::random::<u32>()
            ));
            let copied = std::fs::copy(src, &tmp).and_then(|_| std::fs::rename(&tmp, dest));
            if copied.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            let _ = std::fs::remove_file(src);
            copied.is_ok()
        }
        Err(_) => false,
    }
}

/// Serves the streamer's copy of a segment that never completed (the primary
/// was lost mid-segment), padded with zeros to a full segment, unless a later
/// timeline branched off before its end: then the copy holds an abandoned
/// timeline's tail, which must not be replayed.
async fn fetch_streaming_copy(archive: &WalArchive, opener: &crate::pipeline::Opener, name: &str, dest: &Path) -> Result<bool> {
    let seg_size = archive.seg_size();
    let Some(seg) = WalSegmentName::parse(name, seg_size) else { return Ok(false) };
    if archive.streaming_header(name).await?.is_none() {
        return Ok(false);
    }
    if let Some(switch) = archive.abandoned_at(seg.tli).await?
        && switch < seg.end_lsn()
    {
        tracing::info!(file = name, switch = %switch, "not serving the streamed copy: its timeline was abandoned at that point");
        return Ok(false);
    }
    let tmp = dest.with_file_name(format!(".{name}.streaming-{:08x}", rand::random::<u32>()));
    let streamed = format!("{name}{STREAMING_SUFFIX}");
    let result = async {
        archive.fetch_to_file(&streamed, opener, &tmp).await?;
        let f = std::fs::OpenOptions::new().write(true).open(&tmp)?;
        f.set_len(seg_size)?;
        std::fs::rename(&tmp, dest)?;
        Ok::<_, Error>(())
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    tracing::warn!(file = name, "served the streamed copy of an incomplete segment (the last WAL received before the primary stopped)");
    Ok(true)
}

/// Records the segment PostgreSQL asked for and makes sure a prefetch worker runs.
fn want(ctx: &Ctx, spool: &Path, name: &str) {
    if ctx.config.wal.prefetch == 0 {
        return;
    }
    use std::os::unix::fs::DirBuilderExt;
    if std::fs::DirBuilder::new().recursive(true).mode(0o700).create(spool).is_err() {
        return;
    }
    if crate::util::write_file_atomic(&spool.join(WANTED), name.as_bytes(), 0o600).is_err() {
        return;
    }
    if worker_alive(spool) {
        return;
    }
    if let Err(e) = spawn_worker(ctx, spool) {
        tracing::warn!(error = %e, "cannot start the prefetch worker; segments will be fetched one at a time");
    }
}

/// Stops the prefetch worker of a spool (after a replay) and removes the spool.
pub fn stop_worker_and_clean(spool: &Path) {
    if let Ok(pid) = std::fs::read_to_string(spool.join(PID_FILE))
        && let Ok(pid) = pid.trim().parse::<i32>()
        && pid > 0
    {
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let _ = std::fs::remove_dir_all(spool);
}

fn worker_alive(spool: &Path) -> bool {
    let Ok(pid) = std::fs::read_to_string(spool.join(PID_FILE)) else { return false };
    let Ok(pid) = pid.trim().parse::<i32>() else { return false };
    // Signal 0 checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

fn spawn_worker(ctx: &Ctx, spool: &Path) -> std::io::Result<()> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(spool.join("prefetch.log"))?;
    ctx.spawn_worker(&["archive-get-prefetch".as_ref(), "--spool".as_ref(), spool.as_os_str()], log.into())
}

/// The worker: keeps the segments after the one last asked for in the spool.
pub async fn prefetch_worker(ctx: &Ctx, args: &PrefetchArgs) -> Result<i32> {
    let spool = &args.spool;
    let pid_path = spool.join(PID_FILE);
    if worker_alive(spool) {
        return Ok(0);
    }
    std::fs::write(&pid_path, std::process::id().to_string())?;
    let result = prefetch_loop(ctx, spool).await;
    let _ = std::fs::remove_file(&pid_path);
    result.map(|_| 0)
}

async fn prefetch_loop(ctx: &Ctx, spool: &Path) -> Result<()> {
    let store = ctx.store().await?;
    let desc = ctx.reader_descriptor(&store).await?;
    let archive = WalArchive::new(store, desc, None);
    let opener = ctx.opener()?;
    let seg_size = archive.seg_size();
    let depth = ctx.config.wal.prefetch.max(1) as u64;
    let parallel = ctx.config.repository.parallel.max(1);
    let mut last_wanted = String::new();
    let mut last_change = Instant::now();
    let mut missing: std::collections::HashMap<String, Instant> = Default::default();
    // Downloads run continuously: as one lands the next starts, so replay
    // never waits for a whole batch.
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut fetching: std::collections::HashSet<String> = Default::default();
    remove_temporaries(spool);
    loop {
        if recovery_finished() {
            tracing::info!("recovery has finished; removing the prefetched segments");
            break;
        }
        let wanted = std::fs::read_to_string(spool.join(WANTED)).unwrap_or_default().trim().to_string();
        if wanted != last_wanted {
            last_wanted = wanted.clone();
            last_change = Instant::now();
        } else if last_change.elapsed() > IDLE_EXIT && in_flight.is_empty() {
            break;
        }
        if let Some(current) = WalSegmentName::parse(&wanted, seg_size) {
            let window: Vec<String> =
                (1..=depth).map(|i| WalSegmentName::new(current.tli, current.segno + i, seg_size).to_string()).collect();
            remove_outside(spool, &window);
            for n in &window {
                if in_flight.len() >= parallel {
                    break;
                }
                if fetching.contains(n) || spool.join(n).exists() || missing.get(n).is_some_and(|t| t.elapsed() < Duration::from_secs(2)) {
                    continue;
                }
                fetching.insert(n.clone());
                let (archive, opener, n) = (&archive, &opener, n.clone());
                in_flight.push(async move {
                    let r = archive.fetch_to_file(&n, opener, &spool.join(&n)).await.map(|r| r.is_some());
                    (n, r)
                });
            }
        }
        let done = tokio::select! {
            Some(done) = in_flight.next(), if !in_flight.is_empty() => Some(done),
            _ = tokio::time::sleep(Duration::from_millis(50)) => None,
        };
        if let Some((n, r)) = done {
            fetching.remove(&n);
            match r {
                Ok(true) => {
                    crate::crashpoint::crash_point("archive_get.prefetch");
                    missing.remove(&n);
                }
                Ok(false) => {
                    missing.insert(n, Instant::now());
                }
                Err(e) => {
                    // The foreground call will fetch it and report the error itself.
                    tracing::warn!(file = %n, error = %e, "prefetch failed");
                    missing.insert(n, Instant::now());
                }
            }
        }
    }
    while in_flight.next().await.is_some() {}
    remove_outside(spool, &[]);
    remove_temporaries(spool);
    Ok(())
}

/// Whether the worker is downloading `name` right now: then waiting for it
/// beats downloading it a second time.
fn being_prefetched(spool: &Path, name: &str) -> bool {
    let prefix = format!(".{name}.walvault-");
    std::fs::read_dir(spool)
        .map(|entries| entries.flatten().any(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(&prefix))))
        .unwrap_or(false)
}

/// Waits (a bounded time) for the worker's download of `name` to land in the spool.
async fn wait_for_prefetch(spool: &Path, name: &str) -> bool {
    let deadline = Instant::now() + PREFETCH_WAIT;
    while being_prefetched(spool, name) && worker_alive(spool) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    spool.join(name).exists()
}

/// The worker runs in the data directory PostgreSQL ran restore_command in
/// (it inherits the working directory): once recovery.signal and
/// standby.signal are gone, recovery is over and nothing more will be asked.
fn recovery_finished() -> bool {
    let here = Path::new(".");
    here.join("PG_VERSION").is_file() && !here.join("recovery.signal").exists() && !here.join("standby.signal").exists()
}

/// Temporary files of fetches cut short (a worker killed mid-download).
fn remove_temporaries(spool: &Path) {
    let Ok(entries) = std::fs::read_dir(spool) else { return };
    for e in entries.flatten() {
        if e.file_name().to_str().is_some_and(|n| n.starts_with('.') && n.contains(".walvault-")) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Deletes prefetched segments that are not in the window any more.
fn remove_outside(spool: &Path, window: &[String]) {
    let Ok(entries) = std::fs::read_dir(spool) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if classify_wal_file(&name) == Some(WalFileKind::Segment) && !window.contains(&name) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
