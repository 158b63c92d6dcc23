//! The `s3://bucket/prefix` backend on aws-sdk-s3. The SDK's own retries are
//! off (the retry wrapper owns retrying); checksums follow `checksums`.

use super::StorageError;

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

#[derive(Debug, Clone, Default)]
pub struct S3Options {
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing `/` (may be empty).
    pub prefix: String,
    /// Custom endpoint (MinIO, SeaweedFS, Ceph, Garage...). HTTPS unless the URL says http://.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
    /// Static credentials; when absent, the AWS default credential chain is used.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub checksums: ChecksumMode,
}

pub struct S3Store {
    _opts: S3Options,
}

impl S3Store {
    pub async fn connect(opts: S3Options) -> Result<Self, StorageError> {
        Ok(S3Store { _opts: opts })
    }
}

// PLACEHOLDER until the S3 backend lands.
#[async_trait::async_trait]
impl super::ObjectStore for S3Store {
    fn location(&self) -> String {
        format!("s3://{}/{}", self._opts.bucket, self._opts.prefix)
    }
    async fn put(&self, _: &str, _: bytes::Bytes) -> Result<(), StorageError> {
        todo!()
    }
    async fn put_if_absent(&self, _: &str, _: bytes::Bytes) -> Result<super::CreateOutcome, StorageError> {
        todo!()
    }
    async fn get(&self, _: &str, _: Option<std::ops::Range<u64>>) -> Result<super::ByteStream, StorageError> {
        todo!()
    }
    async fn head(&self, _: &str) -> Result<Option<super::ObjectMeta>, StorageError> {
        todo!()
    }
    async fn list_page(&self, _: &str, _: Option<String>) -> Result<super::ListPage, StorageError> {
        todo!()
    }
    async fn delete_many(&self, _: &[String]) -> Result<(), StorageError> {
        todo!()
    }
    async fn start_multipart(&self, _: &str) -> Result<super::MultipartUpload, StorageError> {
        todo!()
    }
    async fn upload_part(&self, _: &super::MultipartUpload, _: u32, _: bytes::Bytes) -> Result<super::CompletedPart, StorageError> {
        todo!()
    }
    async fn complete_multipart(&self, _: &super::MultipartUpload, _: Vec<super::CompletedPart>) -> Result<(), StorageError> {
        todo!()
    }
    async fn abort_multipart(&self, _: &super::MultipartUpload) -> Result<(), StorageError> {
        todo!()
    }
    async fn list_multipart(&self, _: &str) -> Result<Vec<super::PendingUpload>, StorageError> {
        todo!()
    }
}
