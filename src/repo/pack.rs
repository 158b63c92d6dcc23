//! Packs: objects of tens of MiB holding sealed blobs of chunks, written to a
//! local spool file first (so an upload can be retried by re-reading it, and
//! memory does not grow with the pack size), then uploaded with a signed index
//! listing every blob and chunk in it. The index is uploaded after its pack, so
//! an index always describes a complete pack; the next backup reads the indexes
//! to know which chunks the repository already has (an interrupted backup's
//! packs are re-used this way).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::chunk::{ChunkId, Frame, KnownChunks};
use super::signing::{PublicKey, SigningKey, open_document};
use super::{RepoError, layout};
use crate::storage::{self, ObjectStore, PartSizer};

pub const INDEX_KIND: &str = "pack-index";

/// A pack as listed in manifests and indexes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackInfo {
    pub id: String,
    pub size: u64,
    pub blake3: String,
}

/// The signed index of one pack.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackIndex {
    pub pack: PackInfo,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// The backup that wrote the pack.
    pub backup: String,
    /// (offset, length, blake3 of the sealed blob)
    pub blobs: Vec<(u64, u32, String)>,
    /// (chunk id, blob number, frame offset, frame length, raw length)
    pub chunks: Vec<(String, u32, u32, u32, u32)>,
    /// Every blob is solid (one zstd frame for all its chunks; see `chunk`).
    /// Absent in packs of format 1.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub solid: bool,
}

/// Where a blob is: in which pack (by number in the holder's pack table), at
/// which offset, and its checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLoc {
    pub pack: u32,
    pub offset: u64,
    pub len: u32,
    pub hash: [u8; 32],
    pub solid: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLoc {
    pub blob: u32,
    pub frame: Frame,
    pub raw_len: u32,
}

/// Every chunk the repository has, with its location. Memory: about 80 bytes
/// per distinct 64 KiB chunk (~0.12% of the distinct data).
#[derive(Default)]
pub struct ChunkIndex {
    pub packs: Vec<PackInfo>,
    pub blobs: Vec<BlobLoc>,
    pub chunks: HashMap<ChunkId, ChunkLoc>,
}

impl KnownChunks for ChunkIndex {
    fn contains(&self, id: &ChunkId) -> bool {
        self.chunks.contains_key(id)
    }
}

impl ChunkIndex {
    /// Loads every pack index in the repository, verifying each signature. An
    /// index that does not verify, or whose pack is gone, is skipped with a
    /// warning: its chunks are simply uploaded again.
    pub async fn load(store: &dyn ObjectStore, trusted: &PublicKey, parallel: usize) -> Result<ChunkIndex, RepoError> {
        let objects = storage::list_all(store, layout::PACK_PREFIX).await?;
        let packs: std::collections::HashSet<&str> =
            objects.iter().filter_map(|o| o.key.strip_suffix(".pack")).map(|k| k.rsplit('/').next().unwrap_or(k)).collect();
        let indexes: Vec<String> = objects.iter().filter(|o| o.key.ends_with(".idx")).map(|o| o.key.clone()).collect();
        let loaded: Vec<Result<Option<PackIndex>, RepoError>> = futures::stream::iter(indexes)
            .map(|key| async move {
                let raw = storage::get_bytes(store, &key, None).await?;
                match parse_index(&raw, trusted, &key) {
                    Ok(idx) => Ok(Some(idx)),
                    Err(e) => {
                        tracing::warn!(object = %key, error = %e, "ignoring a pack index that does not verify");
                        Ok(None)
                    }
                }
            })
            .buffer_unordered(parallel.max(1))
            .collect()
            .await;
        let mut index = ChunkIndex::default();
        for idx in loaded {
            let Some(idx) = idx? else { continue };
            if !packs.contains(idx.pack.id.as_str()) {
                tracing::warn!(pack = %idx.pack.id, "pack index without its pack; ignoring it");
                continue;
            }
            index.add(&idx)?;
        }
        Ok(index)
    }

    /// Adds a pack's blobs and chunks.
    pub fn add(&mut self, idx: &PackIndex) -> Result<(), RepoError> {
        let what = layout::pack_index_key(&idx.pack.id);
        let bad = |m: &str| RepoError::Integrity { object: what.clone(), message: m.to_string() };
        let pack = self.packs.len() as u32;
        self.packs.push(idx.pack.clone());
        let first_blob = self.blobs.len() as u32;
        for (offset, len, hash) in &idx.blobs {
            let hash = blake3::Hash::from_hex(hash).map_err(|_| bad("bad blob checksum"))?;
            self.blobs.push(BlobLoc { pack, offset: *offset, len: *len, hash: *hash.as_bytes(), solid: idx.solid });
        }
        for (id, blob, frame_off, frame_len, raw_len) in &idx.chunks {
            let id = decode_id(id).ok_or_else(|| bad("bad chunk id"))?;
            if *blob as usize >= idx.blobs.len() {
                return Err(bad("chunk in a blob the index does not list"));
            }
            self.chunks.entry(id).or_insert(ChunkLoc {
                blob: first_blob + blob,
                frame: Frame { offset: *frame_off, len: *frame_len },
                raw_len: *raw_len,
            });
        }
        Ok(())
    }

    pub fn get(&self, id: &ChunkId) -> Option<(ChunkLoc, BlobLoc, &PackInfo)> {
        let loc = *self.chunks.get(id)?;
        let blob = self.blobs[loc.blob as usize];
        Some((loc, blob, &self.packs[blob.pack as usize]))
    }
}

/// The zstd frame magic: a compressed index body starts with it, a JSON one with `{`.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// An index body's decompressed size at most (a 32 MiB pack of 64 KiB chunks
/// lists about 500 of them in some 60 KiB; this allows 1 GiB packs of 4 KiB).
const INDEX_MAX: usize = 64 << 20;

pub fn parse_index(raw: &[u8], trusted: &PublicKey, key: &str) -> Result<PackIndex, RepoError> {
    index_from_body(open_document(raw, INDEX_KIND, trusted, key)?, key)
}

/// Reads an index's body (its signature already checked): zstd-compressed
/// JSON, or plain JSON as written before.
pub fn index_from_body(body: &[u8], key: &str) -> Result<PackIndex, RepoError> {
    let bad = |m: String| RepoError::Integrity { object: key.into(), message: m };
    let json;
    let body = if body.starts_with(&ZSTD_MAGIC) {
        json = zstd::bulk::Decompressor::new()
            .and_then(|mut d| d.decompress(body, INDEX_MAX))
            .map_err(|e| bad(format!("pack index does not decompress: {e}")))?;
        &json[..]
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| bad(format!("unreadable pack index: {e}")))
}

/// An index's signed body: its JSON, compressed (chunk identifiers in hex
/// are half of it, and the index is about 3% of its pack's size otherwise).
pub fn index_body(index: &PackIndex) -> Vec<u8> {
    let json = serde_json::to_vec(index).expect("pack index serializes");
    zstd::bulk::compress(&json, 3).expect("compressing a buffer in memory does not fail")
}

pub fn decode_id(hex: &str) -> Option<ChunkId> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex, &mut out).ok()?;
    Some(out)
}

pub fn new_pack_id() -> String {
    format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>())
}

/// Builds one pack in a spool file.
pub struct PackWriter {
    pub id: String,
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    hasher: blake3::Hasher,
    size: u64,
    blobs: Vec<(u64, u32, String)>,
    chunks: Vec<(String, u32, u32, u32, u32)>,
}

impl PackWriter {
    pub fn create(spool: &Path) -> std::io::Result<PackWriter> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(spool)?;
        let id = new_pack_id();
        let path = spool.join(format!("{id}.pack"));
        let file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
        Ok(PackWriter {
            id,
            path,
            file: std::io::BufWriter::with_capacity(1 << 20, file),
            hasher: blake3::Hasher::new(),
            size: 0,
            blobs: Vec::new(),
            chunks: Vec::new(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    /// Appends a blob; returns its number in this pack and its offset.
    pub fn add_blob(&mut self, bytes: &[u8], hash: &blake3::Hash) -> std::io::Result<(u32, u64)> {
        let offset = self.size;
        self.file.write_all(bytes)?;
        self.hasher.update(bytes);
        self.size += bytes.len() as u64;
        self.blobs.push((offset, bytes.len() as u32, hash.to_hex().to_string()));
        Ok((self.blobs.len() as u32 - 1, offset))
    }

    pub fn add_chunk(&mut self, id: &ChunkId, blob: u32, frame: Frame, raw_len: u32) {
        self.chunks.push((hex::encode(id), blob, frame.offset, frame.len, raw_len));
    }

    /// Closes the spool file; returns the index (not yet signed) and the file.
    /// No fsync: the spool copy only serves this process's upload (and its
    /// retries), which reads it back from the page cache; a crash abandons the
    /// backup anyway. It ran on the receiving task and stalled the stream.
    pub fn finish(mut self, backup: &str) -> std::io::Result<(PackIndex, PathBuf)> {
        self.file.flush()?;
        let info = PackInfo { id: self.id, size: self.size, blake3: self.hasher.finalize().to_hex().to_string() };
        let index = PackIndex {
            pack: info,
            created_at: chrono::Utc::now(),
            backup: backup.to_string(),
            blobs: self.blobs,
            chunks: self.chunks,
            solid: true,
        };
        Ok((index, self.path))
    }
}

/// Uploads a finished pack, then its signed index, then removes the spool file.
pub async fn upload_pack(
    store: &dyn ObjectStore,
    key: &Arc<SigningKey>,
    index: &PackIndex,
    path: &Path,
    parallel: usize,
) -> Result<(), RepoError> {
    let pack_key = layout::pack_key(&index.pack.id);
    let uploaded = storage::upload_file(store, &pack_key, path, PartSizer::default(), parallel).await?;
    if uploaded != index.pack.size {
        return Err(RepoError::Integrity { object: pack_key, message: format!("uploaded {uploaded} bytes of {}", index.pack.size) });
    }
    let doc = key.sign_document(INDEX_KIND, &index_body(index));
    store.put(&layout::pack_index_key(&index.pack.id), doc.into()).await?;
    let _ = std::fs::remove_file(path);
    Ok(())
}
