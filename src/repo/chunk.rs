//! Chunks: every file of a base backup is cut at 64 KiB boundaries of its
//! offset (8 pages of 8 KiB, so a changed page dirties one chunk). The new
//! chunks of a batch (about 1 MiB) are compressed together as one zstd frame
//! and encrypted as one blob (one age header per blob, not per chunk): a
//! "solid" blob. A 64 KiB window compresses table data about 8% worse than
//! 1 MiB does; reading one chunk alone costs decompressing its blob, which a
//! restore, reading files whole, mostly does anyway. Blobs written before
//! (format 1) hold one zstd frame per chunk; both kinds are read.
//!
//! One blake3 pass over each chunk serves two ends. Its chaining value at its
//! file offset (or, for a file of one chunk, the file's hash) is merged in
//! order by `FileHasher` into the file's plain blake3, and a keyed hash of
//! that value is the chunk's identifier ([`ChunkIds::ChainingValue`]), so
//! identifiers reveal nothing to whoever can read the repository but not the
//! key. The same bytes at another offset get another identifier; in a data
//! directory, where pages do not move, that costs almost no deduplication and
//! saves a second pass over every byte. Manifests of format 1 used a keyed
//! hash of the chunk's bytes ([`ChunkIds::Content`]); restore still checks
//! those.

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

/// How a backup's chunks were identified (fixed by its manifest's format).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkIds {
    /// Format 1: the keyed hash of the chunk's bytes.
    Content,
    /// Format 2: the keyed hash of the chunk's chaining value at its offset.
    ChainingValue,
}

impl ChunkIds {
    pub fn for_manifest_format(version: u32) -> ChunkIds {
        if version >= 2 { ChunkIds::ChainingValue } else { ChunkIds::Content }
    }
}

/// The identifier of a chunk from its bytes (manifest format 1).
pub fn content_chunk_id(key: &[u8; 32], data: &[u8]) -> ChunkId {
    *blake3::keyed_hash(key, data).as_bytes()
}

/// The identifier of a chunk from its chaining value (manifest format 2). The
/// key is derived anew, so no value can meet a format-1 identifier: the two
/// are different keyed functions, and a repository holds both kinds.
pub fn cv_chunk_id(key: &CvKey, cv: &[u8; 32]) -> ChunkId {
    *blake3::keyed_hash(&key.0, cv).as_bytes()
}

/// The key for [`cv_chunk_id`], derived from the repository's chunk key.
#[derive(Clone, Copy)]
pub struct CvKey([u8; 32]);

impl CvKey {
    pub fn new(chunk_key: &[u8; 32]) -> CvKey {
        CvKey(blake3::derive_key("walvault 2026-11 chunk id from chaining value", chunk_key))
    }
}

/// A chunk's chaining value at its file offset, or the file's hash when the
/// chunk is the whole file.
pub fn chaining_value(data: &[u8], file_offset: u64, whole_file: bool) -> [u8; 32] {
    if whole_file {
        *blake3::hash(data).as_bytes()
    } else {
        blake3::Hasher::new().set_input_offset(file_offset).update(data).finalize_non_root()
    }
}

/// A chunk waiting for a worker.
pub struct PendingChunk {
    pub data: Bytes,
    pub file_offset: u64,
    /// The chunk is the whole file: its hash is the file's hash (a root hash).
    pub whole_file: bool,
}

/// Where a chunk sits in its blob. In a solid blob: its offset and length in
/// the blob's decompressed bytes. In a blob of format 1: its own zstd frame's
/// offset and length in the blob's plaintext.
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

/// A solid blob's decompressed size at most: a batch closes at BATCH_BYTES,
/// so it holds less than that plus one chunk. Anything larger is damage.
const SOLID_MAX: u64 = (BATCH_BYTES + CHUNK_SIZE) as u64;

thread_local! {
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Idle compressors, shared by the threads: a context for 1 MiB frames holds
/// a few MiB of tables, and tokio's blocking threads come and go, so one per
/// thread would add up. There are never more than the tasks compressing at once.
static COMPRESSORS: Mutex<Vec<(i32, zstd::bulk::Compressor<'static>)>> = Mutex::new(Vec::new());

/// Compresses `parts`, in order, as one zstd frame (with its size, so the
/// reader can size its buffer) into `out`. One part is compressed where it
/// lies; several are joined first (zstd's streaming mode copies its input
/// into a window buffer anyway, and one-shot compression is faster).
fn compress_solid(level: i32, parts: &[&[u8]], out: &mut Vec<u8>) -> std::io::Result<()> {
    let idle = {
        let mut idle = COMPRESSORS.lock().expect("compressor pool lock");
        idle.iter().position(|(l, _)| *l == level).map(|i| idle.swap_remove(i).1)
    };
    let mut compressor = match idle {
        Some(c) => c,
        None => zstd::bulk::Compressor::new(level)?,
    };
    let joined;
    let input: &[u8] = match parts {
        [one] => one,
        _ => {
            joined = parts.concat();
            &joined
        }
    };
    out.clear();
    out.reserve(zstd::zstd_safe::compress_bound(input.len()));
    let result = compressor.compress_to_buffer(input, out).map(|_| ());
    if result.is_ok() {
        COMPRESSORS.lock().expect("compressor pool lock").push((level, compressor));
    }
    result
}

/// Joins parts that lie next to each other in `arena` (the batch's buffer)
/// into one slice of it, so a batch whose chunks are all new is compressed
/// from its buffer without a copy. Parts outside the arena stay as they are.
fn coalesce<'a>(parts: Vec<&'a [u8]>, arena: Option<&'a Bytes>) -> Vec<&'a [u8]> {
    let Some(arena) = arena else { return parts };
    let base = arena.as_ptr() as usize;
    // A part's offset in the arena, if it lies inside it.
    let offset_in = |p: &[u8]| {
        let start = (p.as_ptr() as usize).wrapping_sub(base);
        (start <= arena.len() && p.len() <= arena.len() - start).then_some(start)
    };
    let mut out = Vec::new();
    let mut run: Option<(usize, usize)> = None;
    for part in parts {
        match (run, offset_in(part)) {
            (Some((start, end)), Some(at)) if at == end => run = Some((start, end + part.len())),
            (prev, at) => {
                if let Some((start, end)) = prev {
                    out.push(&arena[start..end]);
                }
                run = at.map(|at| (at, at + part.len()));
                if run.is_none() {
                    out.push(part);
                }
            }
        }
    }
    if let Some((start, end)) = run {
        out.push(&arena[start..end]);
    }
    out
}

/// Decompresses one zstd frame of at most `capacity` bytes with this thread's
/// context: creating one per chunk took a sixth of restore's CPU time.
fn decompress(frame: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        d.as_mut().expect("just set").decompress(frame, capacity)
    })
}

/// Decompresses a solid blob's plaintext (one zstd frame).
pub fn decompress_solid(plain_blob: &[u8]) -> std::io::Result<Vec<u8>> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let size = match zstd::zstd_safe::get_frame_content_size(plain_blob) {
        Ok(Some(n)) if n <= SOLID_MAX => n as usize,
        Ok(Some(_)) => return Err(bad("blob claims more bytes than a blob holds")),
        _ => return Err(bad("blob is not a zstd frame with its size")),
    };
    let out = decompress(plain_blob, size)?;
    if out.len() != size {
        return Err(bad("blob decompressed to the wrong length"));
    }
    Ok(out)
}

/// A chunk's bytes in a decompressed solid blob.
pub fn solid_chunk(blob: &[u8], frame: Frame, raw_len: usize) -> std::io::Result<&[u8]> {
    let end = frame.offset as usize + frame.len as usize;
    match blob.get(frame.offset as usize..end) {
        Some(bytes) if bytes.len() == raw_len => Ok(bytes),
        _ => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "chunk outside its blob")),
    }
}

/// The worker: identifies every chunk, compresses the ones not known together,
/// and seals them into one solid blob. Blocking; run it on the CPU pool.
pub fn process_batch(chunks: Vec<PendingChunk>, key: &CvKey, known: &dyn KnownChunks, sealer: &Sealer) -> Result<BatchResult, SealError> {
    process_claimed_batch(chunks, None, key, known, sealer, None)
}

/// `process_batch` for one of a backup's batches: chunks an earlier batch
/// claimed (see `ChunkClaims`) are left out like known ones. `arena`: the
/// buffer the chunks are slices of, if they are.
pub fn process_claimed_batch(
    chunks: Vec<PendingChunk>,
    arena: Option<&Bytes>,
    key: &CvKey,
    known: &dyn KnownChunks,
    sealer: &Sealer,
    claims: Option<(&ChunkClaims, u64)>,
) -> Result<BatchResult, SealError> {
    let mut out = Vec::with_capacity(chunks.len());
    let mut stored: Vec<&[u8]> = Vec::new();
    let mut raw_len = 0u32;
    let mut in_batch: HashMap<ChunkId, Frame> = HashMap::new();
    for chunk in &chunks {
        let cv = chaining_value(&chunk.data, chunk.file_offset, chunk.whole_file);
        let id = cv_chunk_id(key, &cv);
        let frame = if known.contains(&id) {
            None
        } else if let Some(f) = in_batch.get(&id) {
            Some(*f)
        } else if claims.is_some_and(|(c, seq)| !c.claim(&id, seq)) {
            None
        } else {
            let f = Frame { offset: raw_len, len: chunk.data.len() as u32 };
            raw_len += f.len;
            stored.push(&chunk.data);
            in_batch.insert(id, f);
            Some(f)
        };
        out.push(ChunkResult { id, raw_len: chunk.data.len() as u32, cv, frame });
    }
    let blob = if stored.is_empty() {
        None
    } else {
        let mut compressed = Vec::new();
        compress_solid(sealer.level(), &coalesce(stored, arena), &mut compressed)?;
        let (bytes, hash) = sealer.encrypt(&compressed)?;
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

/// Returns the plain bytes of one chunk in the plaintext of a format-1 blob
/// (a zstd frame per chunk).
pub fn decompress_frame(plain_blob: &[u8], frame: Frame, raw_len: usize) -> std::io::Result<Vec<u8>> {
    let end = frame.offset as usize + frame.len as usize;
    let bytes = plain_blob
        .get(frame.offset as usize..end)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "frame outside its blob"))?;
    let out = decompress(bytes, raw_len)?;
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
            h.push(chaining_value(c, (i * CHUNK_SIZE) as u64, whole), whole);
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
    fn the_two_identifier_kinds_never_meet() {
        // A format-1 identifier of bytes equal to some chaining value must not
        // equal the format-2 identifier of that value: the keys differ.
        let key = [9u8; 32];
        let cv = chaining_value(&[5u8; CHUNK_SIZE], 0, false);
        assert_ne!(content_chunk_id(&key, &cv), cv_chunk_id(&CvKey::new(&key), &cv));
        assert_eq!(ChunkIds::for_manifest_format(1), ChunkIds::Content);
        assert_eq!(ChunkIds::for_manifest_format(2), ChunkIds::ChainingValue);
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
    fn adjacent_parts_of_the_arena_are_compressed_as_one_slice() {
        let arena = Bytes::from((0..4 * CHUNK_SIZE).map(|i| (i / 7) as u8).collect::<Vec<_>>());
        let (a, b, c, d) =
            (&arena[..CHUNK_SIZE], &arena[CHUNK_SIZE..2 * CHUNK_SIZE], &arena[2 * CHUNK_SIZE..3 * CHUNK_SIZE], &arena[3 * CHUNK_SIZE..]);
        let whole = coalesce(vec![a, b, c, d], Some(&arena));
        assert_eq!(whole.len(), 1);
        assert_eq!(whole[0].as_ptr(), arena.as_ptr(), "a slice of the arena, not a copy");
        assert_eq!(whole[0].len(), arena.len());
        // A known chunk left out: two runs. A part from elsewhere stays itself.
        let other = vec![5u8; 100];
        let parts = coalesce(vec![a, b, d, &other, c], Some(&arena));
        let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
        assert_eq!(lens, vec![2 * CHUNK_SIZE, CHUNK_SIZE, 100, CHUNK_SIZE]);
        assert_eq!(parts[2].as_ptr(), other.as_ptr());
        // Without an arena nothing is joined.
        assert_eq!(coalesce(vec![a, b], None).len(), 2);
        // Either way the frame holds the parts in order.
        for parts in [vec![&arena[..]], vec![a, b, c, d]] {
            let mut out = Vec::new();
            compress_solid(3, &parts, &mut out).unwrap();
            assert_eq!(decompress_solid(&out).unwrap(), &arena[..]);
        }
    }

    #[test]
    fn batch_dedups_and_round_trips() {
        let id = age::x25519::Identity::generate();
        let sealer = Sealer::new(vec![id.to_public()], 3).unwrap();
        let opener = crate::pipeline::Opener::new(vec![id]).unwrap();
        let key = CvKey::new(&[7u8; 32]);
        let a = Bytes::from(vec![1u8; CHUNK_SIZE]);
        let b = Bytes::from((0..CHUNK_SIZE).map(|i| i as u8).collect::<Vec<_>>());
        let known: HashMap<ChunkId, ()> = [(cv_chunk_id(&key, &chaining_value(&b, CHUNK_SIZE as u64, false)), ())].into_iter().collect();
        let chunks = vec![
            PendingChunk { data: a.clone(), file_offset: 0, whole_file: false },
            PendingChunk { data: b.clone(), file_offset: CHUNK_SIZE as u64, whole_file: false },
            // The same bytes at the same offset of another file: one chunk.
            PendingChunk { data: a.clone(), file_offset: 0, whole_file: false },
            // At another offset: another identifier, stored again.
            PendingChunk { data: a.clone(), file_offset: 2 * CHUNK_SIZE as u64, whole_file: false },
        ];
        let r = process_batch(chunks, &key, &known, &sealer).unwrap();
        assert!(r.chunks[1].frame.is_none(), "known chunk not stored again");
        assert_eq!(r.chunks[0].frame, r.chunks[2].frame, "duplicate inside the batch stored once");
        assert_ne!(r.chunks[0].id, r.chunks[3].id, "identifiers depend on the offset");
        assert_eq!(r.chunks[0].cv, chaining_value(&a, 0, false));
        let blob = r.blob.unwrap();
        assert_eq!(blob.hash, blake3::hash(&blob.bytes));
        let plain = decompress_solid(&opener.decrypt(&blob.bytes).unwrap()).unwrap();
        assert_eq!(plain.len(), 2 * CHUNK_SIZE, "a once at offset 0, once at offset 2; b is known");
        assert_eq!(solid_chunk(&plain, r.chunks[0].frame.unwrap(), CHUNK_SIZE).unwrap(), &a[..]);
        assert_eq!(solid_chunk(&plain, r.chunks[3].frame.unwrap(), CHUNK_SIZE).unwrap(), &a[..]);
        assert!(solid_chunk(&plain, r.chunks[3].frame.unwrap(), CHUNK_SIZE - 1).is_err(), "a wrong length is refused");
    }
}
