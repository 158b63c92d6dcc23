//! Deterministic object contents of any size, generated and checked as streams
//! (never held whole in memory): the blake3 output stream of a seed, so any
//! byte range of an object can be recomputed and misplaced bytes never match.

use std::ops::Range;

use bytes::Bytes;
use futures::{Stream, TryStreamExt};
use walvault::storage::{ObjectStore, StorageError};

const CHUNK: usize = 1 << 20;

fn reader(seed: u64, at: u64) -> blake3::OutputReader {
    let mut r = blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof();
    r.set_position(at);
    r
}

/// Bytes `range` of object `seed`.
pub fn bytes(seed: u64, range: Range<u64>) -> Vec<u8> {
    let mut out = vec![0u8; (range.end - range.start) as usize];
    reader(seed, range.start).fill(&mut out);
    out
}

/// Object `seed` of `len` bytes as a stream of chunks of `chunk` bytes (the last shorter).
pub fn stream(seed: u64, len: u64, chunk: usize) -> impl Stream<Item = Result<Bytes, StorageError>> + Unpin + Send {
    let state = (reader(seed, 0), len);
    Box::pin(futures::stream::unfold(state, move |(mut r, left)| async move {
        if left == 0 {
            return None;
        }
        let mut buf = vec![0u8; (left as usize).min(chunk)];
        r.fill(&mut buf);
        let n = buf.len() as u64;
        Some((Ok(Bytes::from(buf)), (r, left - n)))
    }))
}

/// Length and blake3 of bytes `range` of object `seed`, computed in chunks.
pub fn digest(seed: u64, range: Range<u64>) -> (u64, blake3::Hash) {
    let mut r = reader(seed, range.start);
    let mut hasher = blake3::Hasher::new();
    let mut left = range.end - range.start;
    let mut buf = vec![0u8; CHUNK];
    while left > 0 {
        let n = (left as usize).min(CHUNK);
        r.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    (range.end - range.start, hasher.finalize())
}

/// Length and blake3 of what a get returns, streamed.
pub async fn read_digest(store: &dyn ObjectStore, key: &str, range: Option<Range<u64>>) -> Result<(u64, blake3::Hash), StorageError> {
    let mut stream = store.get(key, range).await?;
    let mut hasher = blake3::Hasher::new();
    let mut len = 0u64;
    while let Some(chunk) = stream.try_next().await? {
        len += chunk.len() as u64;
        hasher.update(&chunk);
    }
    Ok((len, hasher.finalize()))
}
