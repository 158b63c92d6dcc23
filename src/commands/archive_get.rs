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

pub async fn run(ctx: &Ctx, args: &ArchiveGetArgs) -> Result<i32> {
    match fetch(ctx, args).await {
        Ok(true) => Ok(0),
        Ok(false) => {
            tracing::info!(file = %args.name, "not in the repository");
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
    if kind == WalFileKind::Segment {
        if std::fs::rename(spool.join(&args.name), &args.dest).is_ok() {
            tracing::debug!(file = %args.name, "served from the prefetch spool");
            want(ctx, &spool, &args.name);
            return Ok(true);
        }
    }

    let store = ctx.store().await?;
    let desc = ctx.reader_descriptor(&store).await?;
    let archive = WalArchive::new(store, desc, None);
    let opener = ctx.opener()?;
    if archive.fetch_to_file(&args.name, &opener, &args.dest).await?.is_some() {
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
    if let Some(switch) = archive.abandoned_at(seg.tli).await? {
        if switch < seg.end_lsn() {
            tracing::info!(file = name, switch = %switch, "not serving the streamed copy: its timeline was abandoned at that point");
            return Ok(false);
        }
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
    if let Ok(pid) = std::fs::read_to_string(spool.join(PID_FILE)) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            if pid > 0 {
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
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
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    if let Some(cfg) = &ctx.config.source {
        cmd.arg("--config").arg(cfg);
    }
    for s in &ctx.overrides {
        cmd.arg("--set").arg(s);
    }
    let log = std::fs::OpenOptions::new().create(true).append(true).open(spool.join("prefetch.log"))?;
    cmd.arg("archive-get-prefetch")
        .arg("--spool")
        .arg(spool)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    // Detach from PostgreSQL's process group so the worker outlives this call.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn()?;
    Ok(())
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
    loop {
        let wanted = std::fs::read_to_string(spool.join(WANTED)).unwrap_or_default().trim().to_string();
        if wanted != last_wanted {
            last_wanted = wanted.clone();
            last_change = Instant::now();
        } else if last_change.elapsed() > IDLE_EXIT {
            break;
        }
        let Some(current) = WalSegmentName::parse(&wanted, seg_size) else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let window: Vec<String> = (1..=depth).map(|i| WalSegmentName::new(current.tli, current.segno + i, seg_size).to_string()).collect();
        remove_outside(spool, &window);
        let todo: Vec<String> = window
            .iter()
            .filter(|n| !spool.join(n).exists())
            .filter(|n| missing.get(*n).is_none_or(|t| t.elapsed() > Duration::from_secs(2)))
            .cloned()
            .collect();
        if todo.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let results: Vec<(String, Result<bool>)> = futures::stream::iter(todo)
            .map(|n| {
                let (archive, opener) = (&archive, &opener);
                async move {
                    let dest = spool.join(&n);
                    let r = archive.fetch_to_file(&n, opener, &dest).await.map(|r| r.is_some());
                    (n, r)
                }
            })
            .buffer_unordered(parallel)
            .collect()
            .await;
        for (n, r) in results {
            match r {
                Ok(true) => {
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
    remove_outside(spool, &[]);
    Ok(())
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
