//! `walvault archive-push PATH`, for `archive_command = 'walvault archive-push %p'`.
//!
//! Exits 0 only once the file is durably in the repository. When PostgreSQL has
//! a backlog (more `.ready` files in archive_status), the next ones are shipped
//! in parallel in the same call; a marker in the spool records each one, so when
//! PostgreSQL asks for it later the answer is immediate. PostgreSQL itself marks
//! a segment archived only when archive-push for that segment exits 0.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;

use super::Ctx;
use crate::cli::ArchivePushArgs;
use crate::error::{Error, Result, ResultExt};
use crate::pg::lsn::{HistoryEntry, WalFileKind, WalSegmentName, classify_wal_file, parse_history};
use crate::pg::walheader::{self, ExpectedWal};
use crate::repo::RepoError;
use crate::repo::wal::{PushOutcome, SealedWal, WalArchive, normalize_partial, switch_inside};

pub async fn run(ctx: &Ctx, args: &ArchivePushArgs) -> Result<i32> {
    let name = file_name(&args.path)?;
    let kind = classify_wal_file(&name).ok_or_else(|| {
        Error::Usage(format!("'{}' is not a WAL file name (segment, .partial, .backup or .history)", args.path.display()))
    })?;
    let data = std::fs::read(&args.path).with_context(|| format!("cannot read {}", args.path.display()))?;
    let markers = marker_dir(ctx);

    let store = ctx.store().await?;
    if kind == WalFileKind::Segment
        && let Some(marker) = marker_matches(&markers, &name, &data)
        && store.head(&WalArchive::key_of(&name)).await?.is_some()
    {
        if marker.ahead {
            tracing::info!("{name} was already archived by an earlier call (blake3 {})", marker.plain);
            write_marker(&markers, &name, &marker.plain, false);
        } else {
            // PostgreSQL archives a file again after a crash.
            tracing::warn!("{name} is already in the repository with the same content (blake3 {}); nothing to do", marker.plain);
        }
        crate::crashpoint::crash_point("archive_push.before_exit");
        return Ok(0);
    }

    let archive = ctx.wal_writer(store).await?;
    let expected = archive.expected_wal();
    let data = match kind {
        WalFileKind::Partial => normalized_partial(&archive, &args.path, &name, data, &expected).await?,
        _ => {
            check_file(&name, kind, &data, &expected)?;
            Bytes::from(data)
        }
    };

    let mut batch = vec![(name.clone(), data)];
    if kind == WalFileKind::Segment && ctx.config.wal.push_parallel > 1 {
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
                    write_marker(&markers, &file, &plain, file != name);
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

/// The next `.ready` segments after `current`, read and checked; ones that fail
/// their check are left for PostgreSQL to push (and fail) itself.
fn backlog(path: &Path, current: &str, max: usize, expected: &ExpectedWal) -> Vec<(String, Bytes)> {
    let wal_dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let Ok(entries) = std::fs::read_dir(wal_dir.join("archive_status")) else { return Vec::new() };
    let mut ready: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".ready").map(str::to_string))
        .filter(|n| classify_wal_file(n) == Some(WalFileKind::Segment) && n.as_str() > current)
        .collect();
    ready.sort();
    ready
        .into_iter()
        .take(max)
        .filter_map(|n| {
            let data = std::fs::read(wal_dir.join(&n)).ok()?;
            check_file(&n, WalFileKind::Segment, &data, expected).ok()?;
            Some((n, Bytes::from(data)))
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
                        archive.store_sealed(&s, prev, source).await.map(|o| (o, plain)).map_err(Error::from)
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

/// A marker: `<plain blake3>`, followed by ` ahead` for a segment stored
/// before PostgreSQL asked for it.
struct Marker {
    plain: String,
    ahead: bool,
}

fn read_marker(dir: &Path, name: &str) -> Option<Marker> {
    let text = std::fs::read_to_string(marker_path(dir, name)).ok()?;
    let mut words = text.split_whitespace();
    let plain = words.next().filter(|h| blake3::Hash::from_hex(h).is_ok())?.to_string();
    Some(Marker { plain, ahead: words.next() == Some("ahead") })
}

/// The marker of `name`, if it records `data`'s checksum.
fn marker_matches(dir: &Path, name: &str, data: &[u8]) -> Option<Marker> {
    let marker = read_marker(dir, name)?;
    (marker.plain == blake3::hash(data).to_hex().as_str()).then_some(marker)
}

/// The chain link to a segment stored by an earlier call: saves reading its
/// record back from the store.
fn marker_link(dir: &Path, prev: &str) -> Option<String> {
    read_marker(dir, prev).map(|m| m.plain)
}

/// Markers are shortcuts (a lost one costs a store round trip, a torn one
/// reads as absent), so they are renamed into place without an fsync.
fn write_marker(dir: &Path, name: &str, plain: &str, ahead: bool) {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let _ = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir);
    let path = marker_path(dir, name);
    let tmp = dir.join(format!(".{name}.{:08x}", rand::random::<u32>()));
    let text = if ahead { format!("{plain} ahead\n") } else { format!("{plain}\n") };
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
fn prune_markers(dir: &Path, current: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        if let Some(n) = e.file_name().to_str().and_then(|n| n.strip_suffix(".ok"))
            && n < current
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
