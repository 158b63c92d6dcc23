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
use crate::pg::lsn::{WalFileKind, WalSegmentName, classify_wal_file, parse_history};
use crate::pg::walheader::{self, ExpectedWal};
use crate::repo::wal::{PushOutcome, SealedWal, WalArchive};

pub async fn run(ctx: &Ctx, args: &ArchivePushArgs) -> Result<i32> {
    let name = file_name(&args.path)?;
    let kind = classify_wal_file(&name).ok_or_else(|| {
        Error::Usage(format!("'{}' is not a WAL file name (segment, .partial, .backup or .history)", args.path.display()))
    })?;
    let data = Bytes::from(std::fs::read(&args.path).with_context(|| format!("cannot read {}", args.path.display()))?);
    let markers = ctx.config.spool_dir().join("archive-push");

    let store = ctx.store().await?;
    if let Some(done) = marker_matches(&markers, &name, &data) {
        if store.head(&WalArchive::key_of(&name)).await?.is_some() {
            tracing::info!(file = %name, blake3 = %done, "already archived by an earlier parallel push");
            return Ok(0);
        }
    }

    let archive = ctx.wal_writer(store).await?;
    let expected = archive.expected_wal();
    check_file(&name, kind, &data, &expected)?;

    let mut batch = vec![(name.clone(), data)];
    if kind == WalFileKind::Segment && ctx.config.wal.push_parallel > 1 {
        batch.extend(backlog(&args.path, &name, ctx.config.wal.push_parallel - 1, &expected));
    }
    let results = push_batch(&archive, batch, "archive-push").await;

    let mut own = None;
    for (file, result) in results {
        match result {
            Ok((outcome, plain)) => {
                if file == name {
                    own = Some(outcome);
                } else {
                    tracing::info!(file = %file, "archived ahead of PostgreSQL's request (backlog)");
                }
                write_marker(&markers, &file, &plain);
            }
            Err(e) if file == name => return Err(e.context(format!("cannot archive {file}"))),
            Err(e) => tracing::warn!(file = %file, error = %e, "could not archive ahead; PostgreSQL will ask again"),
        }
    }
    match own {
        Some(PushOutcome::AlreadyIdentical) => {
            tracing::warn!(file = %name, "already in the repository with the same content; nothing to do");
        }
        Some(PushOutcome::Stored) => tracing::info!(file = %name, "archived"),
        None => unreachable!("the requested file is always in the batch"),
    }
    prune_markers(&markers, &name);
    Ok(0)
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
/// batch when it is there, else from the repository), and stores them in parallel.
pub async fn push_batch(archive: &WalArchive, batch: Vec<(String, Bytes)>, source: &str) -> Vec<(String, Result<(PushOutcome, String)>)> {
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
        links.push(match (from_batch, s) {
            (Some(prev), _) => Some(prev.summary.plain_hash.to_hex().to_string()),
            (None, Ok(_)) => archive.chain_link(&names[i]).await.unwrap_or(None),
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

fn marker_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.ok"))
}

/// The plaintext checksum in the marker, if it matches `data`.
fn marker_matches(dir: &Path, name: &str, data: &[u8]) -> Option<String> {
    let recorded = std::fs::read_to_string(marker_path(dir, name)).ok()?;
    let actual = blake3::hash(data).to_hex().to_string();
    (recorded.trim() == actual).then_some(actual)
}

fn write_marker(dir: &Path, name: &str, plain: &str) {
    use std::os::unix::fs::DirBuilderExt;
    let _ = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir);
    if let Err(e) = crate::util::write_file_atomic(&marker_path(dir, name), plain.as_bytes(), 0o600) {
        tracing::debug!(error = %e, "cannot write archive-push marker (only a shortcut is lost)");
    }
}

/// Markers of files before `current` are no longer needed: PostgreSQL archives in order.
fn prune_markers(dir: &Path, current: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        if let Some(n) = e.file_name().to_str().and_then(|n| n.strip_suffix(".ok")) {
            if n <= current {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}
