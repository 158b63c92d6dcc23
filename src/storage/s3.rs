//! The `s3://bucket/prefix` backend on aws-sdk-s3. Keys given to the trait are
//! relative to the prefix. The SDK's own retries are off (the retry wrapper owns
//! retrying); errors are classified in `classify`; checksums follow `checksums`.

mod body;
mod classify;
mod client;

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::primitives::ByteStream as SdkByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart as SdkCompletedPart, Delete, ObjectIdentifier};
use bytes::Bytes;

use self::classify::{Site, classify};
use super::{
    ByteStream, CompletedPart, CreateOutcome, ListPage, MultipartUpload, ObjectMeta, ObjectStore, PendingUpload, StorageError,
    StorageErrorKind, validate_key,
};

/// How the SDK computes request checksums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChecksumMode {
    /// The SDK default: a CRC32 trailer on every upload that supports one.
    #[default]
    WhenSupported,
    /// Only where an API requires it; for S3-compatible stores that reject
    /// streamed uploads with trailing checksums.
    WhenRequired,
}

#[derive(Clone, Default)]
pub struct S3Options {
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing `/` (may be empty).
    pub prefix: String,
    /// Custom endpoint (MinIO, SeaweedFS, Ceph, Garage...). HTTPS unless the URL says http://.
    pub endpoint: Option<String>,
    /// Defaults to us-east-1.
    pub region: Option<String>,
    pub path_style: bool,
    /// Static credentials; when absent, the AWS default credential chain is used.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub checksums: ChecksumMode,
}

/// Written by hand so that printing the options never prints a secret.
impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("S3Options")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &redacted(&self.secret_access_key))
            .field("session_token", &redacted(&self.session_token))
            .field("checksums", &self.checksums)
            .finish()
    }
}

/// Batch limit of DeleteObjects.
const DELETE_BATCH: usize = 1000;
const LIST_PAGE: i32 = 1000;

pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    /// The configured prefix followed by `/`, or empty.
    base: String,
    site: Arc<Site>,
}

impl S3Store {
    /// Builds the client. Sends no request: the first operation finds out whether
    /// the store is reachable and the credentials work.
    pub async fn connect(opts: S3Options) -> Result<Self, StorageError> {
        if opts.bucket.is_empty() {
            return Err(StorageError::new(StorageErrorKind::InvalidInput, "", "no bucket name, expected s3://bucket/prefix"));
        }
        let client = client::build(&opts).await?;
        let prefix = opts.prefix.trim_matches('/');
        let base = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
        let location = if prefix.is_empty() { format!("s3://{}", opts.bucket) } else { format!("s3://{}/{prefix}", opts.bucket) };
        let endpoint = match opts.endpoint.as_deref().filter(|e| !e.trim().is_empty()) {
            Some(e) => client::endpoint_url(e),
            None => format!("the AWS S3 endpoint of {}", opts.region.as_deref().unwrap_or(client::DEFAULT_REGION)),
        };
        let virtual_hosted_custom = opts.endpoint.as_deref().is_some_and(|e| !e.trim().is_empty()) && !opts.path_style;
        let site = Arc::new(Site { location, bucket: opts.bucket.clone(), endpoint, virtual_hosted_custom });
        Ok(S3Store { client, bucket: opts.bucket, base, site })
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.base)
    }

    /// The relative key of a key from a listing; keys outside the prefix (which a
    /// listing by prefix never returns) are dropped.
    fn relative(&self, full: &str) -> Option<String> {
        full.strip_prefix(&self.base).filter(|k| !k.is_empty()).map(str::to_string)
    }

    fn err<E>(&self, op: &str, key: &str, err: SdkError<E, aws_smithy_runtime_api::client::orchestrator::HttpResponse>) -> StorageError
    where
        E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        classify(&self.site, op, key, err)
    }

    /// A zero-length range: S3 cannot express it, so check the object and the
    /// bounds as a read would, and return no bytes.
    async fn empty_range(&self, key: &str, at: u64) -> Result<ByteStream, StorageError> {
        let meta = self.head(key).await?.ok_or_else(|| StorageError::not_found(key))?;
        if at > meta.size || (at == meta.size && meta.size != 0) {
            return Err(StorageError::new(
                StorageErrorKind::InvalidInput,
                key,
                format!("range {at}..{at} outside an object of {} bytes", meta.size),
            ));
        }
        Ok(Box::pin(futures::stream::empty()))
    }
}

fn to_chrono(t: &aws_sdk_s3::primitives::DateTime) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp(t.secs(), t.subsec_nanos())
}

fn is_status<E>(err: &SdkError<E, aws_smithy_runtime_api::client::orchestrator::HttpResponse>, status: u16) -> bool {
    matches!(err, SdkError::ServiceError(s) if s.raw().status().as_u16() == status)
}

#[async_trait]
impl ObjectStore for S3Store {
    fn location(&self) -> String {
        self.site.location.clone()
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        validate_key(key)?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .content_length(data.len() as i64)
            .body(SdkByteStream::from(data))
            .send()
            .await
            .map_err(|e| self.err("put", key, e))?;
        Ok(())
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<CreateOutcome, StorageError> {
        validate_key(key)?;
        let result = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .if_none_match("*")
            .content_length(data.len() as i64)
            .body(SdkByteStream::from(data))
            .send()
            .await;
        match result {
            Ok(_) => Ok(CreateOutcome::Created),
            // 412 PreconditionFailed: an object is there. (409 ConditionalRequestConflict,
            // a concurrent conditional write, is classified transient and retried.)
            Err(e) if is_status(&e, 412) => Ok(CreateOutcome::AlreadyExists),
            Err(e) => Err(self.err("put_if_absent", key, e)),
        }
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream, StorageError> {
        validate_key(key)?;
        let header = match &range {
            None => None,
            Some(r) if r.start > r.end => {
                return Err(StorageError::new(StorageErrorKind::InvalidInput, key, format!("range {}..{} is reversed", r.start, r.end)));
            }
            Some(r) if r.start == r.end => return self.empty_range(key, r.start).await,
            Some(r) if r.end == u64::MAX => Some(format!("bytes={}-", r.start)),
            Some(r) => Some(format!("bytes={}-{}", r.start, r.end - 1)),
        };
        let result = self.client.get_object().bucket(&self.bucket).key(self.full(key)).set_range(header).send().await;
        let out = match result {
            Ok(out) => out,
            // S3 refuses any range on an empty object; a read from 0 of one is no bytes.
            Err(e) if is_status(&e, 416) && range.as_ref().is_some_and(|r| r.start == 0) => return self.empty_range(key, 0).await,
            Err(e) => return Err(self.err("get", key, e)),
        };
        let expected = out.content_length().and_then(|l| u64::try_from(l).ok());
        Ok(body::checked_stream(out.body, expected, key.to_string(), self.site.clone()))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        validate_key(key)?;
        match self.client.head_object().bucket(&self.bucket).key(self.full(key)).send().await {
            Ok(out) => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: out.content_length().and_then(|l| u64::try_from(l).ok()).unwrap_or(0),
                modified: out.last_modified().and_then(to_chrono),
            })),
            Err(e) if is_status(&e, 404) => Ok(None),
            Err(e) => Err(self.err("head", key, e)),
        }
    }

    async fn list_page(&self, prefix: &str, continuation: Option<String>) -> Result<ListPage, StorageError> {
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(self.full(prefix))
            .max_keys(LIST_PAGE)
            .set_continuation_token(continuation)
            .send()
            .await
            .map_err(|e| self.err("list", prefix, e))?;
        let objects = out
            .contents()
            .iter()
            .filter_map(|o| {
                Some(ObjectMeta {
                    key: self.relative(o.key()?)?,
                    size: o.size().and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
                    modified: o.last_modified().and_then(to_chrono),
                })
            })
            .collect();
        let next = if out.is_truncated() == Some(true) { out.next_continuation_token().map(str::to_string) } else { None };
        Ok(ListPage { objects, next })
    }

    async fn delete_many(&self, keys: &[String]) -> Result<(), StorageError> {
        for key in keys {
            validate_key(key)?;
        }
        if let [key] = keys {
            // One key: a plain DeleteObject. Stores without batch delete accept
            // it, and an IAM policy granting s3:DeleteObject on a few key
            // patterns (README, "Object stores") is evaluated per key there.
            self.client.delete_object().bucket(&self.bucket).key(self.full(key)).send().await.map_err(|e| self.err("delete", key, e))?;
            return Ok(());
        }
        for batch in keys.chunks(DELETE_BATCH) {
            let objects = batch
                .iter()
                .map(|k| ObjectIdentifier::builder().key(self.full(k)).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| StorageError::new(StorageErrorKind::InvalidInput, &batch[0], e.to_string()))?;
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(|e| StorageError::new(StorageErrorKind::InvalidInput, &batch[0], e.to_string()))?;
            let out = self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| self.err("delete", &batch[0], e))?;
            // Per-key failures come back in a successful answer; a key that is
            // already gone is what we wanted.
            if let Some(failed) = out.errors().iter().find(|e| e.code() != Some("NoSuchKey")) {
                let full = failed.key().unwrap_or_default();
                let key = self.relative(full).unwrap_or_else(|| full.to_string());
                return Err(classify::delete_error(&self.site, &key, failed.code(), failed.message()));
            }
        }
        Ok(())
    }

    async fn start_multipart(&self, key: &str) -> Result<MultipartUpload, StorageError> {
        validate_key(key)?;
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(self.full(key))
            .send()
            .await
            .map_err(|e| self.err("start_multipart", key, e))?;
        let upload_id = out.upload_id().filter(|id| !id.is_empty()).ok_or_else(|| {
            StorageError::new(
                StorageErrorKind::Permanent,
                key,
                format!("start_multipart at {}: the store returned no upload id", self.site.location),
            )
        })?;
        Ok(MultipartUpload { key: key.to_string(), upload_id: upload_id.to_string() })
    }

    async fn upload_part(&self, upload: &MultipartUpload, number: u32, data: Bytes) -> Result<CompletedPart, StorageError> {
        let key = &upload.key;
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(self.full(key))
            .upload_id(&upload.upload_id)
            .part_number(number as i32)
            .content_length(data.len() as i64)
            .body(SdkByteStream::from(data))
            .send()
            .await
            .map_err(|e| self.err("upload_part", key, e))?;
        let tag = out.e_tag().ok_or_else(|| {
            StorageError::new(
                StorageErrorKind::Permanent,
                key,
                format!("upload_part at {}: the store returned no ETag for part {number}", self.site.location),
            )
        })?;
        Ok(CompletedPart { number, tag: tag.to_string() })
    }

    async fn complete_multipart(&self, upload: &MultipartUpload, parts: Vec<CompletedPart>) -> Result<(), StorageError> {
        let key = &upload.key;
        let parts = parts.into_iter().map(|p| SdkCompletedPart::builder().part_number(p.number as i32).e_tag(p.tag).build()).collect();
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(self.full(key))
            .upload_id(&upload.upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send()
            .await
            .map_err(|e| self.err("complete_multipart", key, e))?;
        Ok(())
    }

    async fn abort_multipart(&self, upload: &MultipartUpload) -> Result<(), StorageError> {
        let key = &upload.key;
        let result =
            self.client.abort_multipart_upload().bucket(&self.bucket).key(self.full(key)).upload_id(&upload.upload_id).send().await;
        match result {
            Ok(_) => Ok(()),
            // Already aborted or completed (an earlier attempt may have succeeded
            // without its answer arriving): nothing left to remove.
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) => Err(self.err("abort_multipart", key, e)),
        }
    }

    async fn list_multipart(&self, prefix: &str) -> Result<Vec<PendingUpload>, StorageError> {
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker) = (None, None);
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(self.full(prefix))
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(id_marker.take())
                .send()
                .await
                .map_err(|e| self.err("list_multipart", prefix, e))?;
            for u in page.uploads() {
                let (Some(key), Some(upload_id)) = (u.key().and_then(|k| self.relative(k)), u.upload_id()) else { continue };
                out.push(PendingUpload { key, upload_id: upload_id.to_string(), initiated: u.initiated().and_then(to_chrono) });
            }
            if page.is_truncated() != Some(true) {
                return Ok(out);
            }
            key_marker = page.next_key_marker().map(str::to_string);
            id_marker = page.next_upload_id_marker().map(str::to_string);
            if key_marker.is_none() && id_marker.is_none() {
                // A truncated page without markers cannot be continued.
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_secrets() {
        let opts = S3Options {
            bucket: "b".into(),
            access_key_id: Some("AKIDEXAMPLE".into()),
            secret_access_key: Some("very-secret".into()),
            session_token: Some("token-secret".into()),
            ..Default::default()
        };
        let text = format!("{opts:?}");
        assert!(!text.contains("very-secret") && !text.contains("token-secret"), "{text}");
        assert!(text.contains("AKIDEXAMPLE") && text.contains("<redacted>"), "{text}");
    }
}
