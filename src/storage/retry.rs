//! Retries for any store: jittered exponential backoff on transient errors, a
//! time limit per attempt, and reads that resume where a cut stream stopped.
//! Permanent errors (not found, permission, invalid input) are returned at once.

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::{
    ByteStream, CompletedPart, CreateOutcome, ListPage, MultipartUpload, ObjectMeta, ObjectStore, PendingUpload, StorageError,
    StorageErrorKind,
};

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, including the first.
    pub attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Limit for one attempt (a hung connection counts as a transient failure).
    pub attempt_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 8,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(15),
            attempt_timeout: Duration::from_secs(120),
        }
    }
}

impl RetryPolicy {
    /// Delay before attempt `n` (from 1 for the first retry): full jitter over an
    /// exponentially growing ceiling.
    pub fn delay(&self, n: u32) -> Duration {
        let ceiling = self.base_delay.saturating_mul(1u32 << n.min(16)).min(self.max_delay);
        let millis = ceiling.as_millis().max(1) as u64;
        Duration::from_millis(millis / 2 + rand::random::<u64>() % (millis / 2 + 1))
    }

    /// Runs `op` until it succeeds, fails permanently, or attempts run out.
    pub async fn run<T, F, Fut>(&self, what: &str, key: &str, mut op: F) -> Result<T, StorageError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StorageError>>,
    {
        let mut attempt = 1;
        loop {
            let result = match tokio::time::timeout(self.attempt_timeout, op()).await {
                Ok(r) => r,
                Err(_) => Err(StorageError::new(
                    StorageErrorKind::Transient,
                    key,
                    format!("{what} timed out after {}s", self.attempt_timeout.as_secs()),
                )),
            };
            match result {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() && attempt < self.attempts => {
                    let delay = self.delay(attempt);
                    tracing::warn!(op = what, key, attempt, error = %e, retry_in_ms = delay.as_millis() as u64, "store operation failed, retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) if e.is_transient() => {
                    return Err(StorageError::new(
                        StorageErrorKind::Unreachable,
                        e.key(),
                        format!("{} (gave up after {attempt} attempts)", e.message()),
                    ));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

pub struct RetryStore {
    inner: Arc<dyn ObjectStore>,
    policy: RetryPolicy,
}

impl RetryStore {
    pub fn new(inner: Arc<dyn ObjectStore>, policy: RetryPolicy) -> Self {
        RetryStore { inner, policy }
    }
}

#[async_trait]
impl ObjectStore for RetryStore {
    fn location(&self) -> String {
        self.inner.location()
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        self.policy.run("put", key, || self.inner.put(key, data.clone())).await
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<CreateOutcome, StorageError> {
        // If an attempt succeeded but its answer was lost, the retry reports
        // AlreadyExists: callers compare the stored object with what they wrote.
        self.policy.run("put_if_absent", key, || self.inner.put_if_absent(key, data.clone())).await
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream, StorageError> {
        let first = self.policy.run("get", key, || self.inner.get(key, range.clone())).await?;
        Ok(resuming_stream(self.inner.clone(), self.policy.clone(), key.to_string(), range, first))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        self.policy.run("head", key, || self.inner.head(key)).await
    }

    async fn list_page(&self, prefix: &str, continuation: Option<String>) -> Result<ListPage, StorageError> {
        self.policy.run("list", prefix, || self.inner.list_page(prefix, continuation.clone())).await
    }

    async fn delete_many(&self, keys: &[String]) -> Result<(), StorageError> {
        let first = keys.first().map(String::as_str).unwrap_or("");
        self.policy.run("delete", first, || self.inner.delete_many(keys)).await
    }

    async fn start_multipart(&self, key: &str) -> Result<MultipartUpload, StorageError> {
        self.policy.run("start_multipart", key, || self.inner.start_multipart(key)).await
    }

    async fn upload_part(&self, upload: &MultipartUpload, number: u32, data: Bytes) -> Result<CompletedPart, StorageError> {
        self.policy.run("upload_part", &upload.key, || self.inner.upload_part(upload, number, data.clone())).await
    }

    async fn complete_multipart(&self, upload: &MultipartUpload, parts: Vec<CompletedPart>) -> Result<(), StorageError> {
        self.policy.run("complete_multipart", &upload.key, || self.inner.complete_multipart(upload, parts.clone())).await
    }

    async fn abort_multipart(&self, upload: &MultipartUpload) -> Result<(), StorageError> {
        self.policy.run("abort_multipart", &upload.key, || self.inner.abort_multipart(upload)).await
    }

    async fn list_multipart(&self, prefix: &str) -> Result<Vec<PendingUpload>, StorageError> {
        self.policy.run("list_multipart", prefix, || self.inner.list_multipart(prefix)).await
    }
}

/// A read that, when the stream breaks with a transient error, asks again for the
/// bytes not yet delivered (a ranged get), within the retry policy.
fn resuming_stream(
    inner: Arc<dyn ObjectStore>,
    policy: RetryPolicy,
    key: String,
    range: Option<Range<u64>>,
    first: ByteStream,
) -> ByteStream {
    struct State {
        inner: Arc<dyn ObjectStore>,
        policy: RetryPolicy,
        key: String,
        start: u64,
        end: Option<u64>,
        delivered: u64,
        stream: Option<ByteStream>,
        failures: u32,
    }
    let state = State {
        inner,
        policy,
        key,
        start: range.as_ref().map(|r| r.start).unwrap_or(0),
        end: range.map(|r| r.end),
        delivered: 0,
        stream: Some(first),
        failures: 0,
    };
    Box::pin(futures::stream::unfold(state, |mut st| async move {
        loop {
            let stream = st.stream.as_mut()?;
            match stream.next().await {
                Some(Ok(bytes)) => {
                    st.delivered += bytes.len() as u64;
                    return Some((Ok(bytes), st));
                }
                None => return None,
                Some(Err(e)) if e.is_transient() && st.failures + 1 < st.policy.attempts => {
                    st.failures += 1;
                    tracing::warn!(key = %st.key, delivered = st.delivered, error = %e, "read interrupted, resuming");
                    tokio::time::sleep(st.policy.delay(st.failures)).await;
                    let from = st.start + st.delivered;
                    let range = match st.end {
                        Some(end) if from >= end => return None,
                        Some(end) => from..end,
                        None => from..u64::MAX,
                    };
                    match st.inner.get(&st.key, Some(range)).await {
                        Ok(s) => st.stream = Some(s),
                        Err(e) if e.is_transient() => st.stream = Some(Box::pin(futures::stream::once(async move { Err(e) }))),
                        // An open-ended read cut after its last byte: asking for the
                        // bytes from the end on is refused as out of range. The object
                        // is complete if it is no longer than what was delivered.
                        Err(e)
                            if e.kind() == StorageErrorKind::InvalidInput
                                && st.end.is_none_or(|end| end == u64::MAX)
                                && st.delivered > 0 =>
                        {
                            match st.inner.head(&st.key).await {
                                Ok(Some(meta)) if meta.size <= from => return None,
                                _ => {
                                    st.stream = None;
                                    return Some((Err(e), st));
                                }
                            }
                        }
                        Err(e) => {
                            st.stream = None;
                            return Some((Err(e), st));
                        }
                    }
                }
                Some(Err(e)) => {
                    st.stream = None;
                    return Some((Err(e), st));
                }
            }
        }
    }))
}
