//! `walvault backup`: one base backup over the replication protocol, into
//! deduplicated packs. The backup becomes visible only when its signed manifest
//! is written, and that happens only once the WAL that makes it consistent is
//! in the repository.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Ctx;
use crate::cli::BackupArgs;
use crate::config::Checkpoint;
use crate::error::{Error, Result, ResultExt, exit};
use crate::pg::basebackup::{BackupEvent, BaseBackupOptions, BaseBackupStream, control_file_next_xid};
use crate::pg::conn::{Connection, Mode};
use crate::pg::conninfo::ConnParams;
use crate::pg::tar::{TarEvent, TarParser};
use crate::pg::{Lsn, WalSegmentName};
use crate::pipeline::{Sealer, bridge};
use crate::repo::backup_writer::{BackupWriter, WriterSettings};
use crate::repo::descriptor::LoadedDescriptor;
use crate::repo::lock::{LockError, LockOptions, ProcessId, RepoLock};
use crate::repo::manifest::{BackupManifest, FilesHeader, SealedRef, Tablespace};
use crate::repo::pack::ChunkIndex;
use crate::repo::wal::WalArchive;
use crate::repo::{SigningKey, layout};
use crate::storage::{CreateOutcome, Store};

pub async fn run(ctx: &Ctx, args: &BackupArgs) -> Result<i32> {
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let manifest = take_backup(ctx, args.label.clone(), rx).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&crate::commands::info::backup_json(&manifest)).expect("json"));
    } else {
        println!("{}", manifest.backup_id);
    }
    Ok(0)
}

/// Takes a backup; stops (releasing the lock, leaving no manifest) when `cancel` turns true.
pub async fn take_backup(ctx: &Ctx, label: Option<String>, cancel: tokio::sync::watch::Receiver<bool>) -> Result<BackupManifest> {
    let key = Arc::new(ctx.signing_key()?);
    let store = ctx.store().await?;
    let desc = ctx.agent_descriptor(&store, &key).await?;
    let sealer = desc.descriptor.sealer(ctx.config.compression.level)?;
    let opts = LockOptions { conditional_create: desc.descriptor.store.conditional_create, ..Default::default() };
    let lock = RepoLock::acquire(store.clone(), "backup", "a base backup", &opts).await.map_err(lock_error)?;
    abort_abandoned_uploads(&store).await;
    let result = backup_locked(ctx, &store, &desc, &key, &sealer, label, cancel, &lock).await;
    if let Err(e) = lock.release().await {
        tracing::warn!(error = %e, "could not release the backup lock; it expires by itself");
    }
    result
}

/// Only backups write under `packs/` and `backups/`, and only under the backup
/// lock we now hold: a multipart upload open there belongs to a backup that died
/// (kill -9, a lost machine) before it could abort it. Aborted now rather than
/// after the day `expire` waits, so a crashed backup's parts are not billed for
/// long. Best effort: a failure here never stops the backup.
async fn abort_abandoned_uploads(store: &crate::storage::Store) {
    for prefix in [layout::PACK_PREFIX, layout::BACKUP_PREFIX] {
        let pending = match store.list_multipart(prefix).await {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(prefix, error = %e, "cannot list open multipart uploads");
                continue;
            }
        };
        for u in pending {
            let upload = crate::storage::MultipartUpload { key: u.key.clone(), upload_id: u.upload_id.clone() };
            match store.abort_multipart(&upload).await {
                Ok(()) => tracing::info!(key = %u.key, "aborted a multipart upload left by an interrupted backup"),
                Err(e) => tracing::warn!(key = %u.key, error = %e, "could not abort a multipart upload left by an interrupted backup"),
            }
        }
    }
}

pub fn lock_error(e: LockError) -> Error {
    match e {
        LockError::Busy { .. } => Error::coded(
            exit::BUSY,
            e.to_string(),
            Some("wait for it to finish; a lock whose holder died is taken over once it expires".into()),
        ),
        LockError::Repo(r) => r.into(),
    }
}

#[allow(clippy::too_many_arguments)]
async fn backup_locked(
    ctx: &Ctx,
    store: &Store,
    desc: &Arc<LoadedDescriptor>,
    key: &Arc<SigningKey>,
    sealer: &Sealer,
    label: Option<String>,
    mut cancel: tokio::sync::watch::Receiver<bool>,
    lock: &RepoLock,
) -> Result<BackupManifest> {
    let started = Instant::now();
    let start_time = chrono::Utc::now();
    let params = ConnParams::parse(&ctx.config.postgres.conninfo)?;
    let mut conn = Connection::connect(&params, Mode::Replication).await?;
    let sys = conn.identify_system().await?;
    desc.descriptor.check_cluster(&store.location(), &sys.system_identifier.to_string())?;
    let server_major = conn.server_version_num() / 10000;
    if server_major != desc.descriptor.cluster.major() {
        return Err(Error::failed(format!(
            "the server runs PostgreSQL {server_major}, the repository holds PostgreSQL {}",
            desc.descriptor.cluster.major()
        )));
    }
    let backup_id = new_backup_id(store, start_time).await?;
    sweep_abandoned_spools(&ctx.config.spool_dir());
    let spool = ctx.config.spool_dir().join(format!("{SPOOL_PREFIX}{backup_id}"));
    let _ = std::fs::remove_dir_all(&spool);
    std::fs::create_dir_all(&spool).with_context(|| format!("cannot create spool directory {}", spool.display()))?;
    if let Some(me) = ProcessId::current() {
        let _ = std::fs::write(spool.join(SPOOL_OWNER), serde_json::to_vec(&me).expect("json"));
    }
    let result = async {
        let known = Arc::new(ChunkIndex::load(store.as_ref(), &key.public(), ctx.config.repository.parallel).await?);
        tracing::info!(backup = %backup_id, known_chunks = known.chunks.len(), "starting base backup");
        let settings = WriterSettings {
            store: store.clone(),
            key: key.clone(),
            sealer: sealer.clone(),
            chunk_key: crate::repo::chunk::CvKey::new(&key.chunk_id_key()),
            known,
            backup_id: backup_id.clone(),
            spool: spool.clone(),
            pack_size: ctx.config.backup.pack_size,
            parallel: ctx.config.repository.parallel,
        };
        let label = label.unwrap_or_else(|| format!("walvault {backup_id}"));
        let bb = BaseBackupOptions {
            label: label.clone(),
            fast_checkpoint: ctx.config.backup.checkpoint == Checkpoint::Fast,
            max_rate_kb: (ctx.config.backup.max_rate > 0).then_some((ctx.config.backup.max_rate / 1024) as u32),
        };
        let streamed = tokio::select! {
            r = stream_backup(&mut conn, &bb, settings, &spool, lock) => r?,
            _ = crate::util::until_true(&mut cancel) => return Err(Error::failed("backup cancelled (shutting down); no backup was recorded")),
        };
        let (start_lsn, start_tli, end_lsn, end_tli) = (streamed.start_lsn, streamed.start_tli, streamed.end_lsn, streamed.end_tli);
        if start_tli != end_tli {
            return Err(Error::with_hint(
                format!("the server changed timeline during the backup ({start_tli} -> {end_tli}); this backup is not usable"),
                "take a new backup now that the promotion is over",
            ));
        }
        let files = seal_file(store, sealer, &streamed.files_path, &layout::backup_files_key(&backup_id), ctx).await?;
        let server_manifest = match &streamed.server_manifest {
            Some(p) => Some(seal_file(store, sealer, p, &layout::backup_server_manifest_key(&backup_id), ctx).await?),
            None => None,
        };
        crate::crashpoint::crash_point("backup.files_sealed");
        let seg = desc.descriptor.cluster.wal_segment_size;
        let wal_first = WalSegmentName::of_lsn(start_tli, start_lsn, seg);
        let wal_last = WalSegmentName::of_lsn(end_tli, Lsn(end_lsn.0.saturating_sub(1).max(start_lsn.0)), seg);
        tracing::info!(start = %start_lsn, end = %end_lsn, first = %wal_first, last = %wal_last, "backup data stored; waiting for its WAL");
        let archive = WalArchive::new(store.clone(), desc.clone(), None);
        tokio::select! {
            r = wait_for_wal(&archive, wal_first, wal_last, end_lsn, ctx.config.backup.wal_timeout) => r?,
            _ = crate::util::until_true(&mut cancel) => return Err(Error::failed("backup cancelled while waiting for WAL; no backup was recorded")),
        }
        crate::crashpoint::crash_point("backup.wal_waited");
        if lock.is_lost() {
            return Err(Error::failed("the backup lock was taken by another process; this backup is abandoned"));
        }
        let mut stats = streamed.stats;
        stats.duration_ms = started.elapsed().as_millis() as u64;
        let manifest = BackupManifest {
            format_version: crate::repo::manifest::FORMAT_VERSION,
            backup_id: backup_id.clone(),
            label: Some(label),
            system_identifier: desc.descriptor.cluster.system_identifier.clone(),
            pg_version_num: conn.server_version_num(),
            pg_version: conn.parameter("server_version").unwrap_or("").to_string(),
            start_lsn,
            start_timeline: start_tli,
            end_lsn,
            end_timeline: end_tli,
            start_time,
            end_time: streamed.finished_at,
            next_xid: streamed.control.as_deref().and_then(|c| control_file_next_xid(c, sys.system_identifier)),
            wal_first: wal_first.to_string(),
            wal_last: wal_last.to_string(),
            files,
            server_manifest,
            packs: streamed.packs,
            stats,
            descriptor_generation: desc.descriptor.generation,
            created_by: format!("walvault {}", env!("CARGO_PKG_VERSION")),
        };
        let doc = manifest.to_document(key);
        match store.put_if_absent(&layout::backup_manifest_key(&backup_id), doc.into()).await? {
            CreateOutcome::Created => {}
            CreateOutcome::AlreadyExists => return Err(Error::failed(format!("backup {backup_id} already exists (internal error)"))),
        }
        crate::crashpoint::crash_point("backup.manifest_written");
        tracing::info!(
            backup = %backup_id,
            files = manifest.stats.files,
            size = %crate::util::human_bytes(manifest.stats.bytes),
            uploaded = %crate::util::human_bytes(manifest.stats.stored_new),
            took = %crate::util::human_duration(started.elapsed()),
            "backup complete"
        );
        Ok(manifest)
    }
    .await;
    let _ = conn.close().await;
    let _ = std::fs::remove_dir_all(&spool);
    result
}

/// A backup id from its start time; unique in the repository.
async fn new_backup_id(store: &Store, at: chrono::DateTime<chrono::Utc>) -> Result<String> {
    let base = at.format("%Y%m%dT%H%M%SZ").to_string();
    for n in 0..100 {
        let id = if n == 0 { base.clone() } else { format!("{base}-{n}") };
        let existing = store.list_page(&layout::backup_prefix(&id), None).await?;
        if existing.objects.is_empty() {
            return Ok(id);
        }
    }
    Err(Error::failed("cannot find a free backup id"))
}

/// Spool directories of backups: `backup-<id>`, holding the owner's process id.
const SPOOL_PREFIX: &str = "backup-";
const SPOOL_OWNER: &str = "process.json";

/// Removes the spool directories of backups whose process is gone (killed
/// mid-backup): their packs are either uploaded (and re-used) or lost anyway.
fn sweep_abandoned_spools(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with(SPOOL_PREFIX) {
            continue;
        }
        let owner: Option<ProcessId> = std::fs::read(e.path().join(SPOOL_OWNER)).ok().and_then(|b| serde_json::from_slice(&b).ok());
        if owner.is_some_and(|p| p.is_gone()) {
            tracing::info!(dir = %e.path().display(), "removing the spool of an interrupted backup");
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

struct Streamed {
    start_lsn: Lsn,
    start_tli: u32,
    end_lsn: Lsn,
    end_tli: u32,
    /// When the server reported the end position.
    finished_at: chrono::DateTime<chrono::Utc>,
    /// The first 8 KiB of global/pg_control as the backup holds it.
    control: Option<Vec<u8>>,
    files_path: std::path::PathBuf,
    server_manifest: Option<std::path::PathBuf>,
    packs: Vec<crate::repo::pack::PackInfo>,
    stats: crate::repo::manifest::BackupStats,
}

/// What is kept of global/pg_control (the control data proper is at its start).
const CONTROL_BYTES: usize = 8192;

async fn stream_backup(
    conn: &mut Connection,
    opts: &BaseBackupOptions,
    settings: WriterSettings,
    spool: &Path,
    lock: &RepoLock,
) -> Result<Streamed> {
    let mut stream = BaseBackupStream::start(conn, opts).await?;
    let mut writer: Option<BackupWriter> = None;
    let mut settings = Some(settings);
    let mut start = None;
    let mut end = None;
    let mut parser = TarParser::new();
    let mut prefix = String::new();
    let mut manifest_file: Option<std::fs::File> = None;
    let manifest_path = spool.join("backup_manifest");
    let mut last_check = Instant::now();
    let mut received: u64 = 0;
    // The total is the server's estimate (BASE_BACKUP's PROGRESS option): the
    // tablespaces' sizes when the backup started.
    let progress = crate::progress::Progress::new("backup", 0);
    let mut control: Option<Vec<u8>> = None;
    let mut in_control = false;
    let mut finished_at = None;
    let result: Result<()> = async {
        while let Some(ev) = stream.next().await? {
            match ev {
                BackupEvent::Started { start_lsn, timeline } => {
                    tracing::info!(lsn = %start_lsn, timeline, "checkpoint done; streaming the data directory");
                    start = Some((start_lsn, timeline));
                }
                BackupEvent::Tablespaces(rows) => {
                    progress.set_total(rows.iter().filter_map(|r| r.size_kb).sum::<u64>() * 1024);
                    let tablespaces = rows
                        .iter()
                        .filter_map(|r| Some(Tablespace { oid: r.oid?, location: r.location.clone().unwrap_or_default() }))
                        .collect();
                    let s = settings.take().expect("tablespaces arrive once");
                    let header = FilesHeader { walvault_files: 1, backup_id: s.backup_id.clone(), tablespaces };
                    writer = Some(BackupWriter::new(s, &header)?);
                }
                BackupEvent::ArchiveStart { tablespace } => {
                    parser = TarParser::new();
                    prefix = tablespace.and_then(|t| t.oid).map(|oid| format!("pg_tblspc/{oid}")).unwrap_or_default();
                }
                BackupEvent::ArchiveData(bytes) => {
                    received += bytes.len() as u64;
                    let w = writer.as_mut().ok_or_else(|| Error::failed("archive data before the tablespace list"))?;
                    let mut events = Vec::new();
                    parser
                        .feed(&bytes, &mut |e| {
                            events.push(e);
                            Ok(())
                        })
                        .map_err(|e| Error::failed(e.to_string()))?;
                    for e in events {
                        match e {
                            TarEvent::Entry(entry) => {
                                in_control = prefix.is_empty() && entry.path == "global/pg_control";
                                if in_control {
                                    control = Some(Vec::with_capacity(CONTROL_BYTES));
                                }
                                w.begin_entry(&entry, &prefix).await?
                            }
                            TarEvent::Data(d) => {
                                if let Some(c) = control.as_mut().filter(|_| in_control) {
                                    c.extend_from_slice(&d[..d.len().min(CONTROL_BYTES - c.len())]);
                                }
                                w.data(d).await?
                            }
                            TarEvent::EntryEnd => {
                                in_control = false;
                                w.end_entry().await?
                            }
                            TarEvent::End => {}
                        }
                    }
                    progress.set(received);
                    if last_check.elapsed() > Duration::from_secs(10) {
                        last_check = Instant::now();
                        if lock.is_lost() {
                            return Err(Error::failed("the backup lock was taken by another process; stopping"));
                        }
                    }
                }
                BackupEvent::ArchiveEnd => {
                    if !parser.is_done() && !parser.at_entry_boundary() {
                        return Err(Error::failed("a tar stream from the server ended inside a file"));
                    }
                }
                BackupEvent::Progress(_) => {}
                BackupEvent::ManifestData(bytes) => {
                    use std::io::Write;
                    let f = match &mut manifest_file {
                        Some(f) => f,
                        None => manifest_file.insert(std::fs::File::create(&manifest_path)?),
                    };
                    f.write_all(&bytes)?;
                }
                BackupEvent::Finished { end_lsn, timeline } => {
                    finished_at = Some(chrono::Utc::now());
                    end = Some((end_lsn, timeline))
                }
            }
        }
        Ok(())
    }
    .await;
    progress.finish();
    if let Err(e) = result {
        if let Some(w) = writer {
            w.abort().await;
        }
        return Err(e);
    }
    let writer = writer.ok_or_else(|| Error::failed("the server sent no data"))?;
    let (files_path, packs, stats, _count) = writer.finish().await?;
    let (start_lsn, start_tli) = start.ok_or_else(|| Error::failed("the server sent no start position"))?;
    let (end_lsn, end_tli) = end.ok_or_else(|| Error::failed("the server sent no end position"))?;
    Ok(Streamed {
        start_lsn,
        start_tli,
        end_lsn,
        end_tli,
        finished_at: finished_at.unwrap_or_else(chrono::Utc::now),
        control,
        files_path,
        server_manifest: manifest_file.map(|_| manifest_path),
        packs,
        stats,
    })
}

/// Seals a spool file into the repository.
async fn seal_file(store: &Store, sealer: &Sealer, path: &Path, key: &str, ctx: &Ctx) -> Result<SealedRef> {
    let input = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let summary =
        bridge::seal_to_store(store.as_ref(), key, sealer, std::io::BufReader::new(input), ctx.config.repository.parallel).await?;
    Ok(SealedRef {
        key: key.to_string(),
        stored_len: summary.stored_len,
        stored_blake3: summary.stored_hash.to_hex().to_string(),
        plain_len: summary.plain_len,
        plain_blake3: summary.plain_hash.to_hex().to_string(),
    })
}

/// Waits until every segment from `first` to `last` is in the repository (the
/// last one may be the streamer's copy if it reaches `end`).
async fn wait_for_wal(archive: &WalArchive, first: WalSegmentName, last: WalSegmentName, end: Lsn, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut next = first;
    // The last segment is usually being archived as the backup ends (the
    // server switches segments at backup stop): look again soon, then less
    // often. A fixed half second made some 3-second backups take 3.5.
    let mut pause = Duration::from_millis(20);
    loop {
        while next <= last {
            let name = next.to_string();
            let present = archive.read_header(&name).await?.is_some()
                || (next == last
                    && archive
                        .streaming_header(&name)
                        .await?
                        .and_then(|h| h.record.valid_bytes)
                        .is_some_and(|v| next.start_lsn().0 + v >= end.0));
            if !present {
                break;
            }
            next = next.next();
        }
        if next > last {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::with_hint(
                format!(
                    "WAL segment {next} did not reach the repository within {}; the backup is not consistent without it and was not recorded",
                    crate::util::human_duration(timeout)
                ),
                "run `walvault stream` (or the daemon), or set archive_command = 'walvault archive-push %p'; the uploaded data is re-used by the next backup",
            ));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}
