//! Streaming uploads on top of the store's primitives: a stream of unknown length
//! is cut into buffered parts whose size grows with the part number, so that the
//! 10,000-part limit of S3 is never reached, and each part can be retried on its
//! own (the stream itself is never replayed). Small objects take a single put.

use std::path::Path;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt, stream::FuturesUnordered};
use tokio::io::AsyncReadExt;

use super::{CompletedPart, ObjectStore, StorageError, StorageErrorKind};

/// Part sizes for multipart uploads: `base` for the first 1000 parts, doubling
/// every 1000 parts after that, capped at 5 GiB (the S3 maximum).
#[derive(Debug, Clone, Copy)]
pub struct PartSizer {
    pub base: usize,
}

impl Default for PartSizer {
    fn default() -> Self {
        PartSizer { base: 8 << 20 }
    }
}

impl PartSizer {
    const MAX_PART: usize = 5 << 30;

    /// Size of part `number` (from 1).
    pub fn part_size(&self, number: u32) -> usize {
        let doublings = (number.saturating_sub(1) / 1000).min(20);
        self.base.saturating_mul(1 << doublings).min(Self::MAX_PART)
    }
}

/// Uploads a stream of unknown length to `key`. Memory: at most `parallel + 1`
/// parts are buffered. On failure, a started multipart upload is aborted so that
/// no partial object remains.
pub async fn upload_stream<S>(store: &dyn ObjectStore, key: &str, stream: S, sizer: PartSizer, parallel: usize) -> Result<u64, StorageError>
where
    S: Stream<Item = Result<Bytes, StorageError>> + Unpin + Send,
{
    let mut reader = PartReader { stream, pending: None, done: false };
    let first = reader.next_part(sizer.part_size(1)).await?;
    if reader.at_end().await? {
        let len = first.len() as u64;
        store.put(key, first).await?;
        return Ok(len);
    }

    let upload = store.start_multipart(key).await?;
    let result = async {
        let mut total = 0u64;
        let mut parts: Vec<CompletedPart> = Vec::new();
        let mut in_flight = FuturesUnordered::new();
        let mut next_data = Some(first);
        let mut number = 0u32;
        loop {
            while in_flight.len() < parallel.max(1) {
                let Some(data) = next_data.take() else { break };
                number += 1;
                if number > 10_000 {
                    return Err(StorageError::new(StorageErrorKind::InvalidInput, key, "object too large for a multipart upload"));
                }
                total += data.len() as u64;
                let upload = &upload;
                let n = number;
                in_flight.push(async move { store.upload_part(upload, n, data).await });
                if !reader.at_end().await? {
                    next_data = Some(reader.next_part(sizer.part_size(number + 1)).await?);
                }
            }
            match in_flight.next().await {
                Some(done) => parts.push(done?),
                None => break,
            }
        }
        parts.sort_by_key(|p| p.number);
        store.complete_multipart(&upload, parts).await?;
        Ok(total)
    }
    .await;
    if result.is_err()
        && let Err(e) = store.abort_multipart(&upload).await
    {
        tracing::warn!(key, error = %e, "could not abort a failed multipart upload; `walvault expire` removes it later");
    }
    result
}

/// Cuts a stream of arbitrary chunks into parts of exact sizes.
struct PartReader<S> {
    stream: S,
    pending: Option<Bytes>,
    done: bool,
}

impl<S> PartReader<S>
where
    S: Stream<Item = Result<Bytes, StorageError>> + Unpin,
{
    /// True when no byte is left. Pulls one chunk ahead if needed.
    async fn at_end(&mut self) -> Result<bool, StorageError> {
        while self.pending.as_ref().is_none_or(|p| p.is_empty()) {
            if self.done {
                return Ok(true);
            }
            match self.stream.next().await {
                Some(chunk) => self.pending = Some(chunk?),
                None => self.done = true,
            }
        }
        Ok(false)
    }

    /// Up to `size` bytes; fewer only at the end of the stream.
    async fn next_part(&mut self, size: usize) -> Result<Bytes, StorageError> {
        // Reserved once: grown by doubling, an 8 MiB part would pass through
        // copies of 1, 2 and 4 MiB first.
        let mut buf = BytesMut::new();
        if !self.at_end().await? && self.pending.as_ref().is_some_and(|p| p.len() < size) {
            buf.reserve(size);
        }
        while buf.len() < size && !self.at_end().await? {
            let mut chunk = self.pending.take().unwrap_or_default();
            let room = size - buf.len();
            if chunk.len() > room {
                self.pending = Some(chunk.split_off(room));
            }
            if buf.is_empty() && chunk.len() == size {
                return Ok(chunk);
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }
}

/// Uploads a local file, in parts when it is large. Parts are read from the file
/// again on each attempt, so a failed part is simply retried by the store wrapper.
pub async fn upload_file(store: &dyn ObjectStore, key: &str, path: &Path, sizer: PartSizer, parallel: usize) -> Result<u64, StorageError> {
    let file = tokio::fs::File::open(path).await.map_err(|e| StorageError::from_io(path.display().to_string(), &e))?;
    let stream = file_stream(file, path.display().to_string());
    upload_stream(store, key, Box::pin(stream), sizer, parallel).await
}

fn file_stream(file: tokio::fs::File, name: String) -> impl Stream<Item = Result<Bytes, StorageError>> + Send {
    futures::stream::unfold((file, name), |(mut file, name)| async move {
        let mut buf = vec![0u8; 1 << 20];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), (file, name)))
            }
            Err(e) => Some((Err(StorageError::from_io(name.clone(), &e)), (file, name))),
        }
    })
}
