//! Chunks: every file of a base backup is cut at 64 KiB boundaries of its
//! offset (8 pages of 8 KiB, so a changed page dirties one chunk). A chunk is
//! identified by a keyed blake3 of its bytes, so identifiers reveal nothing to
//! whoever can read the repository but not the key. New chunks are compressed
//! one by one (zstd frames, so any chunk can be read alone) and a run of them
//! is encrypted together as one blob (one age header per ~1 MiB, not per chunk).
//!
//! The worker also computes each chunk's blake3 chaining value at its file
//! offset; merged in order (`FileHasher`), they give the file's plain blake3
//! without a second pass over the data.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Mutex;

use blake3::hazmat::{ChainingValue, HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root};
use bytes::Bytes;

use crate::pipeline::{SealError, Sealer};

pub const CHUNK_SIZE: usize = 64 << 10;
/// Raw bytes per batch handed to a worker (and so at most per blob).
pub const BATCH_BYTES: usize = 1 << 20;

pub type ChunkId = [u8; 32];

pub fn chunk_id(key: &[u8; 32], data: &[u8]) -> ChunkId {
    *blake3::keyed_hash(key, data).as_bytes()
}

/// A chunk waiting for a worker.
pub struct PendingChunk {
    pub data: Bytes,
    pub file_offset: u64,
    /// The chunk is the whole file: its hash is the file's hash (a root hash).
    pub whole_file: bool,
}

/// Where a chunk's compressed frame sits inside a blob's plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub offset: u32,
    pub len: u32,
}

pub struct ChunkResult {
    pub id: ChunkId,
    pub raw_len: u32,
    /// The chaining value at the chunk's file offset, or the file's hash for a
    /// whole-file chunk.
    pub cv: [u8; 32],
    /// Set when this batch stored the chunk in its blob.
    pub frame: Option<Frame>,
}

pub struct SealedBlob {
    pub bytes: Vec<u8>,
    pub hash: blake3::Hash,
}

pub struct BatchResult {
    pub chunks: Vec<ChunkResult>,
    pub blob: Option<SealedBlob>,
}

/// Known chunk identifiers, for the workers' dedup check.
pub trait KnownChunks: Send + Sync {
    fn contains(&self, id: &ChunkId) -> bool;
}

impl<V: Send + Sync> KnownChunks for HashMap<ChunkId, V> {
    fn contains(&self, id: &ChunkId) -> bool {
        self.contains_key(id)
    }
}

/// The chunks a backup stores, each with the batch (numbered in the order the
/// writer submits them) that stores it. Batches run in parallel, so without
/// this a chunk that appears in several of them (the template databases'
/// identical catalogs, runs of zero pages) would be compressed and uploaded
/// once per batch. A batch leaves out a chunk an earlier batch claimed: the
/// writer applies batches in order, so it knows where that chunk went. When a
/// later batch got there first, the earlier one stores the chunk too (and
/// takes the claim), so a left-out chunk is always stored by an earlier batch.
#[derive(Default)]
pub struct ChunkClaims(Mutex<HashMap<ChunkId, u64>>);

impl ChunkClaims {
    /// Whether batch `seq` must store the chunk itself.
    pub fn claim(&self, id: &ChunkId, seq: u64) -> bool {
        let mut claims = self.0.lock().expect("claims lock");
        match claims.get_mut(id) {
            Some(by) if *by <= seq => *by == seq,
            Some(by) => {
                *by = seq;
                true
            }
            None => {
                claims.insert(*id, seq);
                true
            }
        }
    }
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
}

fn compress(level: i32, data: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        let (_, comp) = c.as_mut().expect("just set");
        let start = out.len();
        out.reserve(zstd::zstd_safe::compress_bound(data.len()));
        let spare = out.spare_capacity_mut();
        // SAFETY: compress_to_buffer writes at most compress_bound bytes into the
        // reserved capacity and reports how many; we only expose those.
        let buf = unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr() as *mut u8, spare.len()) };
        let n = comp.compress_to_buffer(data, buf)?;
        unsafe { out.set_len(start + n) };
        Ok(())
    })
}

/// The worker: identifies every chunk, compresses the ones not known, and seals
/// them together into one blob. Blocking; run it on the CPU pool.
pub fn process_batch(
    chunks: Vec<PendingChunk>,
    key: &[u8; 32],
    known: &dyn KnownChunks,
    sealer: &Sealer,
) -> Result<BatchResult, SealError> {
    process_claimed_batch(chunks, key, known, sealer, None)
}

/// `process_batch` for one of a backup's batches: chunks an earlier batch
/// claimed (see `ChunkClaims`) are left out like known ones.
pub fn process_claimed_batch(
    chunks: Vec<PendingChunk>,
    key: &[u8; 32],
    known: &dyn KnownChunks,
    sealer: &Sealer,
    claims: Option<(&ChunkClaims, u64)>,
) -> Result<BatchResult, SealError> {
    let mut out = Vec::with_capacity(chunks.len());
    let mut frames = Vec::new();
    let mut in_batch: HashMap<ChunkId, Frame> = HashMap::new();
    for chunk in chunks {
        let id = chunk_id(key, &chunk.data);
        let cv = if chunk.whole_file {
            *blake3::hash(&chunk.data).as_bytes()
        } else {
            blake3::Hasher::new().set_input_offset(chunk.file_offset).update(&chunk.data).finalize_non_root()
        };
        let frame = if known.contains(&id) {
            None
        } else if let Some(f) = in_batch.get(&id) {
            Some(*f)
        } else if claims.is_some_and(|(c, seq)| !c.claim(&id, seq)) {
            None
        } else {
            let offset = frames.len() as u32;
            compress(sealer.level(), &chunk.data, &mut frames)?;
            let f = Frame { offset, len: frames.len() as u32 - offset };
            in_batch.insert(id, f);
            Some(f)
        };
        out.push(ChunkResult { id, raw_len: chunk.data.len() as u32, cv, frame });
    }
    let blob = if frames.is_empty() {
        None
    } else {
        let (bytes, hash) = sealer.encrypt(&frames)?;
        Some(SealedBlob { bytes, hash })
    };
    Ok(BatchResult { chunks: out, blob })
}

/// Merges chunk chaining values, in file order, into the file's blake3.
#[derive(Default)]
pub struct FileHasher {
    stack: Vec<ChainingValue>,
    count: u64,
    root: Option<[u8; 32]>,
}

impl FileHasher {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next chunk's value. `whole_file` values are final hashes.
    pub fn push(&mut self, cv: [u8; 32], whole_file: bool) {
        if whole_file {
            self.root = Some(cv);
            return;
        }
        // Merge lazily, like blake3's own hasher: keep one subtree per set bit of
        // the count, so the last value is merged only once the end is known.
        while self.stack.len() as u32 > self.count.count_ones() {
            let right = self.stack.pop().expect("stack holds two");
            let left = self.stack.pop().expect("stack holds two");
            self.stack.push(merge_subtrees_non_root(&left, &right, Mode::Hash));
        }
        self.stack.push(cv);
        self.count += 1;
    }

    pub fn finalize(mut self) -> blake3::Hash {
        if let Some(root) = self.root {
            return blake3::Hash::from_bytes(root);
        }
        match self.stack.len() {
            0 => blake3::hash(b""),
            1 => unreachable!("a file of one chunk is hashed as a whole file"),
            _ => {
                while self.stack.len() > 2 {
                    let right = self.stack.pop().unwrap();
                    let left = self.stack.pop().unwrap();
                    self.stack.push(merge_subtrees_non_root(&left, &right, Mode::Hash));
                }
                merge_subtrees_root(&self.stack[0], &self.stack[1], Mode::Hash)
            }
        }
    }
}

/// Opens a blob and returns the plain bytes of one chunk in it.
pub fn decompress_frame(plain_blob: &[u8], frame: Frame, raw_len: usize) -> std::io::Result<Vec<u8>> {
    let end = frame.offset as usize + frame.len as usize;
    let bytes = plain_blob
        .get(frame.offset as usize..end)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "frame outside its blob"))?;
    let out = zstd::bulk::decompress(bytes, raw_len)?;
    if out.len() != raw_len {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "chunk has the wrong length"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_hash_by_chunks(data: &[u8]) -> blake3::Hash {
        let mut h = FileHasher::new();
        let whole = data.len() <= CHUNK_SIZE;
        if data.is_empty() {
            return h.finalize();
        }
        for (i, c) in data.chunks(CHUNK_SIZE).enumerate() {
            let cv = if whole {
                *blake3::hash(c).as_bytes()
            } else {
                blake3::Hasher::new().set_input_offset((i * CHUNK_SIZE) as u64).update(c).finalize_non_root()
            };
            h.push(cv, whole);
        }
        h.finalize()
    }

    #[test]
    fn file_hash_matches_blake3() {
        let data: Vec<u8> = (0..(CHUNK_SIZE * 11 + 777)).map(|i| (i * 31 % 251) as u8).collect();
        for len in [
            0,
            1,
            CHUNK_SIZE - 1,
            CHUNK_SIZE,
            CHUNK_SIZE + 1,
            2 * CHUNK_SIZE,
            3 * CHUNK_SIZE + 5,
            4 * CHUNK_SIZE,
            7 * CHUNK_SIZE,
            data.len(),
        ] {
            assert_eq!(file_hash_by_chunks(&data[..len]), blake3::hash(&data[..len]), "len {len}");
        }
    }

    #[test]
    fn claims_leave_a_chunk_to_the_earliest_batch() {
        let c = ChunkClaims::default();
        let (x, y) = ([1u8; 32], [2u8; 32]);
        assert!(c.claim(&x, 5), "first to see it stores it");
        assert!(!c.claim(&x, 7), "a later batch leaves it out");
        assert!(c.claim(&x, 5), "the claimant, asked again, still stores it");
        assert!(c.claim(&x, 3), "an earlier batch that got there second stores it too");
        assert!(!c.claim(&x, 5), "and now batch 5 may leave it out: batch 3 is applied before it");
        assert!(c.claim(&y, 9));
    }

    #[test]
    fn batch_dedups_and_round_trips() {
        let id = age::x25519::Identity::generate();
        let sealer = Sealer::new(vec![id.to_public()], 3).unwrap();
        let opener = crate::pipeline::Opener::new(vec![id]).unwrap();
        let key = [7u8; 32];
        let a = Bytes::from(vec![1u8; CHUNK_SIZE]);
        let b = Bytes::from((0..CHUNK_SIZE).map(|i| i as u8).collect::<Vec<_>>());
        let known: HashMap<ChunkId, ()> = [(chunk_id(&key, &b), ())].into_iter().collect();
        let chunks = vec![
            PendingChunk { data: a.clone(), file_offset: 0, whole_file: false },
            PendingChunk { data: b.clone(), file_offset: CHUNK_SIZE as u64, whole_file: false },
            PendingChunk { data: a.clone(), file_offset: 2 * CHUNK_SIZE as u64, whole_file: false },
        ];
        let r = process_batch(chunks, &key, &known, &sealer).unwrap();
        assert!(r.chunks[1].frame.is_none(), "known chunk not stored again");
        assert_eq!(r.chunks[0].frame, r.chunks[2].frame, "duplicate inside the batch stored once");
        let blob = r.blob.unwrap();
        assert_eq!(blob.hash, blake3::hash(&blob.bytes));
        let plain = opener.decrypt(&blob.bytes).unwrap();
        assert_eq!(decompress_frame(&plain, r.chunks[0].frame.unwrap(), CHUNK_SIZE).unwrap(), a.to_vec());
    }
}
