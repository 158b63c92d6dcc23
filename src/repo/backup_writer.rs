//! Turns a stream of files (from BASE_BACKUP's tar streams) into chunks in
//! packs and a file list. Data flows one way with bounded queues:
//!
//! ```text
//! receiver -> chunk buffer -> batches (~1 MiB) -> CPU pool (hash, compress, seal)
//!          -> results in order -> blobs appended to the current pack -> uploads
//!                              -> file entries, in tar order, into the file list
//! ```
//!
//! Memory: the batches in flight (a few MiB), the parts of packs being uploaded
//! (packs are spooled on local disk; `repository.parallel` parts of 8 MiB in
//! flight across them), the files not yet complete (in tar order), the chunk
//! index, and about 120 bytes per chunk this backup stores (where each went).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::BytesMut;
use futures::StreamExt;
use futures::stream::FuturesUnordered;

use super::chunk::{BATCH_BYTES, BatchResult, CHUNK_SIZE, ChunkClaims, ChunkId, CvKey, FileHasher, PendingChunk, process_claimed_batch};
use super::manifest::{BackupStats, BlobRun, FileEntry, FileKind, FilesHeader, FilesWriter};
use super::pack::{ChunkIndex, PackIndex, PackInfo, PackWriter, upload_pack};
use super::{RepoError, SigningKey};
use crate::pg::tar::{EntryKind, TarEntry};
use crate::pipeline::{CpuPool, Sealer, cpu_pool};
use crate::storage::Store;

/// Chunks per batch at most (small files make many small chunks).
const BATCH_CHUNKS: usize = 256;
/// Pack uploads in flight at once.
const UPLOADS: usize = 2;
/// A batch closes once it holds BATCH_BYTES, so its data fits in this.
const ARENA_BYTES: usize = BATCH_BYTES + CHUNK_SIZE;

pub struct WriterSettings {
    pub store: Store,
    pub key: Arc<SigningKey>,
    pub sealer: Sealer,
    pub chunk_key: CvKey,
    pub known: Arc<ChunkIndex>,
    pub backup_id: String,
    pub spool: PathBuf,
    pub pack_size: u64,
    pub parallel: usize,
}

/// Where a chunk stored by this backup lives (its pack is numbered in the
/// manifest's pack list).
#[derive(Clone)]
struct NewChunk {
    pack: u32,
    blob_offset: u64,
    blob_len: u32,
    blob_hash: blake3::Hash,
    frame_offset: u32,
    frame_len: u32,
    raw_len: u32,
    solid: bool,
}

/// A file between its tar header and its last chunk result.
struct OpenFile {
    entry: FileEntry,
    chunks_expected: Option<u64>,
    chunks_done: u64,
    hasher: FileHasher,
}

struct InFlight {
    chunks: Vec<(u64, bool)>,
    task: tokio::task::JoinHandle<Result<BatchResult, crate::pipeline::SealError>>,
}

pub struct BackupWriter {
    s: WriterSettings,
    pool: CpuPool,
    files: FilesWriter,
    /// Files in tar order, from the first not yet written to the file list.
    open: VecDeque<OpenFile>,
    first_seq: u64,
    /// The file receiving data: its sequence number, bytes seen, where its
    /// current chunk starts in the arena, and whether it is one chunk.
    current: Option<(u64, u64, usize, bool)>,
    /// The batch's file data: its chunks are ranges of this one buffer, so
    /// that a batch of new chunks is compressed without being copied again.
    arena: BytesMut,
    /// Arenas of finished batches, for reuse: a fresh 1 MiB buffer per batch
    /// is fresh pages, and faulting them in cost more than the copy it saves.
    arenas: Arc<std::sync::Mutex<Vec<BytesMut>>>,
    /// The batch's chunks: range in the arena, file offset, whole file.
    batch: Vec<(std::ops::Range<usize>, u64, bool)>,
    batch_meta: Vec<(u64, bool)>,
    batch_bytes: usize,
    in_flight: VecDeque<InFlight>,
    /// Batches submitted so far (the next batch's number for `claims`).
    batches: u64,
    claims: Arc<ChunkClaims>,
    new_chunks: HashMap<ChunkId, NewChunk>,
    /// The manifest's pack list, and each pack id's number in it.
    packs: Vec<PackInfo>,
    pack_numbers: HashMap<String, u32>,
    pack: Option<(PackWriter, u32)>,
    uploads: FuturesUnordered<tokio::task::JoinHandle<Result<(), RepoError>>>,
    referenced_blobs: std::collections::HashSet<(u32, u64)>,
    pub stats: BackupStats,
}

impl BackupWriter {
    pub fn new(s: WriterSettings, header: &FilesHeader) -> Result<BackupWriter, RepoError> {
        std::fs::create_dir_all(&s.spool).map_err(|e| RepoError::Invalid(format!("cannot create spool {}: {e}", s.spool.display())))?;
        let files = FilesWriter::create(s.spool.join("files.jsonl"), header)
            .map_err(|e| RepoError::Invalid(format!("cannot write to spool {}: {e}", s.spool.display())))?;
        Ok(BackupWriter {
            pool: cpu_pool().clone(),
            s,
            files,
            open: VecDeque::new(),
            first_seq: 0,
            current: None,
            arena: BytesMut::with_capacity(ARENA_BYTES),
            arenas: Arc::default(),
            batch: Vec::new(),
            batch_meta: Vec::new(),
            batch_bytes: 0,
            in_flight: VecDeque::new(),
            batches: 0,
            claims: Arc::default(),
            new_chunks: HashMap::new(),
            packs: Vec::new(),
            pack_numbers: HashMap::new(),
            pack: None,
            uploads: FuturesUnordered::new(),
            referenced_blobs: Default::default(),
            stats: BackupStats::default(),
        })
    }

    fn spool_err(&self, e: std::io::Error) -> RepoError {
        RepoError::Spool { path: self.s.spool.clone(), message: e.to_string() }
    }

    /// A new tar member. `prefix` places tablespace members under pg_tblspc/<oid>/.
    pub async fn begin_entry(&mut self, entry: &TarEntry, prefix: &str) -> Result<(), RepoError> {
        let path = if prefix.is_empty() { entry.path.clone() } else { format!("{prefix}/{}", entry.path) };
        let seq = self.first_seq + self.open.len() as u64;
        let kind: FileKind = entry.kind.into();
        let file = OpenFile {
            entry: FileEntry {
                path,
                kind,
                size: entry.size,
                mode: entry.mode,
                mtime: entry.mtime,
                target: entry.link_target.clone(),
                blake3: None,
                blobs: Vec::new(),
            },
            chunks_expected: if entry.kind == EntryKind::File { None } else { Some(0) },
            chunks_done: 0,
            hasher: FileHasher::new(),
        };
        match entry.kind {
            EntryKind::File => {
                self.stats.files += 1;
                self.stats.bytes += entry.size;
                let whole = entry.size <= CHUNK_SIZE as u64;
                self.current = Some((seq, 0, self.arena.len(), whole));
            }
            EntryKind::Dir => self.stats.directories += 1,
            EntryKind::Symlink => {}
        }
        self.open.push_back(file);
        self.drain_complete()
    }

    /// Data of the current file.
    pub async fn data(&mut self, mut data: &[u8]) -> Result<(), RepoError> {
        while !data.is_empty() {
            let (seq, offset, start, whole) = self.current.as_mut().ok_or_else(|| RepoError::Invalid("file data outside a file".into()))?;
            let have = self.arena.len() - *start;
            let n = (CHUNK_SIZE - have).min(data.len());
            self.arena.extend_from_slice(&data[..n]);
            data = &data[n..];
            if have + n == CHUNK_SIZE {
                let (seq, off, chunk, whole) = (*seq, *offset, *start..*start + CHUNK_SIZE, *whole);
                *offset += CHUNK_SIZE as u64;
                *start += CHUNK_SIZE;
                self.queue_chunk(seq, chunk, off, whole).await?;
            }
        }
        Ok(())
    }

    /// The current file's data is complete.
    pub async fn end_entry(&mut self) -> Result<(), RepoError> {
        let Some((seq, offset, start, whole)) = self.current.take() else { return Ok(()) };
        let mut chunks = offset / CHUNK_SIZE as u64;
        if self.arena.len() > start {
            self.queue_chunk(seq, start..self.arena.len(), offset, whole).await?;
            chunks += 1;
        }
        let idx = (seq - self.first_seq) as usize;
        self.open[idx].chunks_expected = Some(chunks);
        self.drain_complete()
    }

    async fn queue_chunk(&mut self, seq: u64, range: std::ops::Range<usize>, file_offset: u64, whole: bool) -> Result<(), RepoError> {
        self.batch_bytes += range.len();
        self.batch.push((range, file_offset, whole));
        self.batch_meta.push((seq, whole));
        if self.batch_bytes >= BATCH_BYTES || self.batch.len() >= BATCH_CHUNKS {
            self.submit().await?;
        }
        Ok(())
    }

    /// Hands the batch to the CPU pool; waits for the oldest batch when enough are in flight.
    async fn submit(&mut self) -> Result<(), RepoError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        while self.in_flight.len() >= self.pool.size() + 2 {
            self.complete_oldest().await?;
        }
        // A batch is submitted as a chunk completes: the arena holds exactly
        // its chunks, and the current file's next chunk starts a new arena.
        debug_assert_eq!(self.batch.last().map(|(r, _, _)| r.end), Some(self.arena.len()));
        let next = self.arenas.lock().expect("arena pool lock").pop().unwrap_or_else(|| BytesMut::with_capacity(ARENA_BYTES));
        let arena = std::mem::replace(&mut self.arena, next).freeze();
        if let Some((_, _, start, _)) = self.current.as_mut() {
            *start = 0;
        }
        let chunks: Vec<PendingChunk> = std::mem::take(&mut self.batch)
            .into_iter()
            .map(|(range, file_offset, whole_file)| PendingChunk { data: arena.slice(range), file_offset, whole_file })
            .collect();
        let meta = std::mem::take(&mut self.batch_meta);
        self.batch_bytes = 0;
        let (key, known, sealer, pool) = (self.s.chunk_key, self.s.known.clone(), self.s.sealer.clone(), self.pool.clone());
        let (claims, seq, arenas) = (self.claims.clone(), self.batches, self.arenas.clone());
        self.batches += 1;
        let task = tokio::spawn(async move {
            pool.run(move || {
                let result = process_claimed_batch(chunks, Some(&arena), &key, known.as_ref(), &sealer, Some((&claims, seq)));
                // The chunks, slices of the arena, are gone with the batch.
                if let Ok(mut arena) = arena.try_into_mut() {
                    arena.clear();
                    let mut idle = arenas.lock().expect("arena pool lock");
                    if arena.capacity() >= ARENA_BYTES && idle.len() < 4 {
                        idle.push(arena);
                    }
                }
                result
            })
            .await
        });
        self.in_flight.push_back(InFlight { chunks: meta, task });
        Ok(())
    }

    async fn complete_oldest(&mut self) -> Result<(), RepoError> {
        let Some(job) = self.in_flight.pop_front() else { return Ok(()) };
        let result = job.task.await.map_err(|e| RepoError::Invalid(format!("chunk worker failed: {e}")))??;
        self.apply(job.chunks, result).await
    }

    /// Records a batch's results, in order: blob into the pack, chunk references
    /// into their files.
    async fn apply(&mut self, meta: Vec<(u64, bool)>, result: BatchResult) -> Result<(), RepoError> {
        let mut blob_at: Option<(u32, u32, u64, u32, blake3::Hash)> = None;
        if let Some(blob) = &result.blob {
            let spool = self.s.spool.clone();
            let (writer, pack_no) = self.current_pack()?;
            let (blob_no, offset) =
                writer.add_blob(&blob.bytes, &blob.hash).map_err(|e| RepoError::Spool { path: spool.clone(), message: e.to_string() })?;
            blob_at = Some((pack_no, blob_no, offset, blob.bytes.len() as u32, blob.hash));
            self.stats.stored_new += blob.bytes.len() as u64;
        }
        for (chunk, (seq, whole)) in result.chunks.into_iter().zip(meta) {
            self.stats.chunks += 1;
            let loc = match (chunk.frame, &blob_at, self.new_chunks.get(&chunk.id)) {
                (_, _, Some(existing)) => existing.clone(),
                (Some(frame), Some((pack_no, blob_no, offset, len, hash)), None) => {
                    let loc = NewChunk {
                        pack: *pack_no,
                        blob_offset: *offset,
                        blob_len: *len,
                        blob_hash: *hash,
                        frame_offset: frame.offset,
                        frame_len: frame.len,
                        raw_len: chunk.raw_len,
                        solid: true,
                    };
                    self.pack.as_mut().expect("pack open").0.add_chunk(&chunk.id, *blob_no, frame, chunk.raw_len);
                    self.new_chunks.insert(chunk.id, loc.clone());
                    self.stats.chunks_new += 1;
                    self.stats.bytes_new += chunk.raw_len as u64;
                    loc
                }
                _ => {
                    let known = self.s.known.clone();
                    let (loc, blob, pack) = known
                        .get(&chunk.id)
                        .ok_or_else(|| RepoError::Invalid("a chunk reported known is not in the index (internal error)".into()))?;
                    let pack_no = self.pack_number(pack);
                    NewChunk {
                        pack: pack_no,
                        blob_offset: blob.offset,
                        blob_len: blob.len,
                        blob_hash: blake3::Hash::from_bytes(blob.hash),
                        frame_offset: loc.frame.offset,
                        frame_len: loc.frame.len,
                        raw_len: loc.raw_len,
                        solid: blob.solid,
                    }
                }
            };
            if self.referenced_blobs.insert((loc.pack, loc.blob_offset)) {
                self.stats.stored_referenced += loc.blob_len as u64;
            }
            let file = &mut self.open[(seq - self.first_seq) as usize];
            file.hasher.push(chunk.cv, whole);
            file.chunks_done += 1;
            let c = (loc.frame_offset, loc.frame_len, loc.raw_len, hex::encode(chunk.id));
            match file.entry.blobs.last_mut() {
                Some(run) if run.p == loc.pack && run.o == loc.blob_offset => run.c.push(c),
                _ => file.entry.blobs.push(BlobRun {
                    p: loc.pack,
                    o: loc.blob_offset,
                    l: loc.blob_len,
                    h: loc.blob_hash.to_hex().to_string(),
                    c: vec![c],
                    s: loc.solid,
                }),
            }
        }
        self.drain_complete()?;
        let full = self.pack.as_ref().is_some_and(|(w, _)| w.size() >= self.s.pack_size);
        if full {
            self.rotate_pack().await?;
        }
        Ok(())
    }

    fn pack_number(&mut self, pack: &PackInfo) -> u32 {
        if let Some(n) = self.pack_numbers.get(&pack.id) {
            return *n;
        }
        let n = self.packs.len() as u32;
        self.packs.push(pack.clone());
        self.pack_numbers.insert(pack.id.clone(), n);
        n
    }

    fn current_pack(&mut self) -> Result<(&mut PackWriter, u32), RepoError> {
        if self.pack.is_none() {
            let writer = PackWriter::create(&self.s.spool).map_err(|e| self.spool_err(e))?;
            let n = self.packs.len() as u32;
            // Size and checksum are filled in when the pack is finished.
            self.packs.push(PackInfo { id: writer.id.clone(), size: 0, blake3: String::new() });
            self.pack_numbers.insert(writer.id.clone(), n);
            self.pack = Some((writer, n));
        }
        let (w, n) = self.pack.as_mut().expect("just set");
        Ok((w, *n))
    }

    /// Finishes the current pack and starts its upload.
    async fn rotate_pack(&mut self) -> Result<(), RepoError> {
        let Some((writer, n)) = self.pack.take() else { return Ok(()) };
        if writer.is_empty() {
            return Ok(());
        }
        let (index, path) = writer.finish(&self.s.backup_id).map_err(|e| self.spool_err(e))?;
        self.packs[n as usize] = index.pack.clone();
        while self.uploads.len() >= UPLOADS {
            self.next_upload().await?;
        }
        // `repository.parallel` parts in flight across the packs uploading, not
        // per pack: each part in flight is a buffer of up to 8 MiB.
        let (store, key, parallel) = (self.s.store.clone(), self.s.key.clone(), (self.s.parallel / UPLOADS).max(1));
        self.uploads.push(tokio::spawn(async move { upload(store, key, index, path, parallel).await }));
        Ok(())
    }

    async fn next_upload(&mut self) -> Result<(), RepoError> {
        if let Some(done) = self.uploads.next().await {
            done.map_err(|e| RepoError::Invalid(format!("pack upload task failed: {e}")))??;
        }
        Ok(())
    }

    /// Writes finished files, in order, to the file list.
    fn drain_complete(&mut self) -> Result<(), RepoError> {
        while let Some(front) = self.open.front() {
            let done = front.chunks_expected.is_some_and(|n| n == front.chunks_done)
                && self.current.as_ref().is_none_or(|c| c.0 != self.first_seq);
            if !done {
                break;
            }
            let mut file = self.open.pop_front().expect("front exists");
            self.first_seq += 1;
            if file.entry.kind == FileKind::File {
                file.entry.blake3 = Some(file.hasher.finalize().to_hex().to_string());
            }
            self.files.write(&file.entry).map_err(|e| self.spool_err(e))?;
        }
        Ok(())
    }

    /// Flushes everything: the last batch and pack, all uploads. Returns the file
    /// list's spool path and the manifest's pack list.
    pub async fn finish(mut self) -> Result<(PathBuf, Vec<PackInfo>, BackupStats, u64), RepoError> {
        self.end_entry().await?;
        self.submit().await?;
        while !self.in_flight.is_empty() {
            self.complete_oldest().await?;
        }
        self.rotate_pack().await?;
        while !self.uploads.is_empty() {
            self.next_upload().await?;
        }
        if !self.open.is_empty() {
            return Err(RepoError::Invalid(format!("{} files never completed (internal error)", self.open.len())));
        }
        let count = self.files.count;
        let spool = self.s.spool.clone();
        let path = self.files.finish().map_err(|e| RepoError::Spool { path: spool.clone(), message: e.to_string() })?;
        Ok((path, self.packs, self.stats, count))
    }

    /// Stops everything after a failure: in-flight work is dropped; packs already
    /// uploaded stay for the next backup to re-use.
    pub async fn abort(mut self) {
        for job in self.in_flight.drain(..) {
            job.task.abort();
        }
        while let Some(r) = self.uploads.next().await {
            let _ = r;
        }
        if let Some((w, _)) = self.pack.take()
            && let Ok((_, path)) = w.finish(&self.s.backup_id)
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

async fn upload(store: Store, key: Arc<SigningKey>, index: PackIndex, path: PathBuf, parallel: usize) -> Result<(), RepoError> {
    upload_pack(store.as_ref(), &key, &index, &path, parallel).await?;
    crate::crashpoint::crash_point("backup.pack_uploaded");
    Ok(())
}
