//! Object storage: a small streaming trait with two backends (local files and S3)
//! and wrappers that add behaviour (retries, fault injection). Nothing here knows
//! about WAL, backups or encryption; keys are opaque `/`-separated strings.

mod error;
pub mod faults;
pub mod fs;
pub mod retry;
pub mod s3;
mod upload;

use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

pub use error::{StorageError, StorageErrorKind};
pub use upload::{PartSizer, upload_file, upload_stream};

/// A stream of object bytes, as returned by [`ObjectStore::get`].
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, StorageError>> + Send>>;

/// What a listing or a `head` tells about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The key relative to the store's root (the configured prefix is not included).
    pub key: String,
    pub size: u64,
    /// Last modification, when the backend knows it.
    pub modified: Option<chrono::DateTime<chrono::Utc>>,
}

/// One page of a listing; `next` continues it.
#[derive(Debug, Default)]
pub struct ListPage {
    pub objects: Vec<ObjectMeta>,
    pub next: Option<String>,
}

/// Result of a conditional create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateOutcome {
    Created,
    AlreadyExists,
}

/// A multipart upload in progress, as returned by [`ObjectStore::start_multipart`].
#[derive(Debug, Clone)]
pub struct MultipartUpload {
    pub key: String,
    pub upload_id: String,
}

/// A completed part: its number (from 1) and the backend's tag for it.
#[derive(Debug, Clone)]
pub struct CompletedPart {
    pub number: u32,
    pub tag: String,
}

/// An abandoned or running multipart upload found by [`ObjectStore::list_multipart`].
#[derive(Debug, Clone)]
pub struct PendingUpload {
    pub key: String,
    pub upload_id: String,
    pub initiated: Option<chrono::DateTime<chrono::Utc>>,
}

/// The primitives every backend implements. Every method that sends data takes
/// a buffered `Bytes`, so any call can be replayed by a retry wrapper; streaming
/// uploads are built on the multipart primitives by [`upload_stream`].
#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// Where this store points, for messages (`s3://bucket/prefix`, `file:///dir`).
    fn location(&self) -> String;

    /// Stores `data` at `key`, replacing any object there. Atomic: readers see the
    /// old object or the new one, never a mix.
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError>;

    /// Stores `data` at `key` only if no object is there. A store that ignores the
    /// condition (some S3-compatible stores do) reports `Created` even when it
    /// replaced an object; callers that need safety there must verify (see locks).
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<CreateOutcome, StorageError>;

    /// Reads the object, or the given byte range of it. A missing object is an
    /// error of kind `NotFound`.
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream, StorageError>;

    /// Size and time of an object, or `None` if there is none.
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError>;

    /// One page (at most about 1000 keys) of the objects whose key starts with `prefix`.
    /// The pages together hold every key once. AWS S3 and the file store give keys
    /// in lexicographic order; some S3-compatible stores do not (SeaweedFS lists a
    /// "directory" `a/...` before siblings such as `a-b` that sort before `/`), so
    /// callers that need the order use [`list_all`], which sorts.
    async fn list_page(&self, prefix: &str, continuation: Option<String>) -> Result<ListPage, StorageError>;

    /// Deletes the objects; keys that do not exist are not an error.
    async fn delete_many(&self, keys: &[String]) -> Result<(), StorageError>;

    async fn start_multipart(&self, key: &str) -> Result<MultipartUpload, StorageError>;
    async fn upload_part(&self, upload: &MultipartUpload, number: u32, data: Bytes) -> Result<CompletedPart, StorageError>;
    async fn complete_multipart(&self, upload: &MultipartUpload, parts: Vec<CompletedPart>) -> Result<(), StorageError>;
    async fn abort_multipart(&self, upload: &MultipartUpload) -> Result<(), StorageError>;
    /// Multipart uploads under `prefix` that were started and neither completed nor aborted.
    async fn list_multipart(&self, prefix: &str) -> Result<Vec<PendingUpload>, StorageError>;
}

/// A shared store handle.
pub type Store = Arc<dyn ObjectStore>;

/// Lists every object under `prefix`, following continuation tokens, in
/// lexicographic order of key whatever order the store pages in.
pub async fn list_all(store: &dyn ObjectStore, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
    let mut out = Vec::new();
    let mut token = None;
    loop {
        let page = store.list_page(prefix, token).await?;
        out.extend(page.objects);
        match page.next {
            Some(next) => token = Some(next),
            None => break,
        }
    }
    out.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// Reads a whole object into memory. Use only for objects known to be small
/// (descriptors, records, manifests' public parts).
pub async fn get_bytes(store: &dyn ObjectStore, key: &str, range: Option<Range<u64>>) -> Result<Bytes, StorageError> {
    use futures::TryStreamExt;
    let mut stream = store.get(key, range).await?;
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = stream.try_next().await? {
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Reads an object if it exists.
pub async fn get_bytes_opt(store: &dyn ObjectStore, key: &str) -> Result<Option<Bytes>, StorageError> {
    match get_bytes(store, key, None).await {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == StorageErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Checks that a key is acceptable to every backend: relative, `/`-separated,
/// no empty, `.` or `..` segments, printable ASCII.
pub fn validate_key(key: &str) -> Result<(), StorageError> {
    let ok = !key.is_empty()
        && !key.starts_with('/')
        && key.bytes().all(|b| b.is_ascii_graphic())
        && key.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != "..");
    if ok { Ok(()) } else { Err(StorageError::new(StorageErrorKind::InvalidInput, key, "invalid object key")) }
}

/// How to reach the repository, from the configuration.
#[derive(Debug, Clone)]
pub enum StoreUrl {
    File(std::path::PathBuf),
    S3 { bucket: String, prefix: String },
}

impl StoreUrl {
    /// Parses `file:///path` (or a bare absolute path) and `s3://bucket[/prefix]`.
    pub fn parse(url: &str) -> Result<StoreUrl, String> {
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(format!("repository url '{url}': a file:// url needs an absolute path, as in file:///var/lib/walvault/repo"));
            }
            return Ok(StoreUrl::File(path.into()));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!("repository url '{url}': no bucket name, expected s3://bucket/prefix"));
            }
            return Ok(StoreUrl::S3 { bucket: bucket.to_string(), prefix: prefix.trim_matches('/').to_string() });
        }
        if url.starts_with('/') {
            return Ok(StoreUrl::File(url.into()));
        }
        Err(format!("repository url '{url}' is neither file:///path nor s3://bucket/prefix"))
    }
}
