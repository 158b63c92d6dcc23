//! Storage errors, classified where they happen so the retry wrapper knows what
//! can be tried again (`Transient`) and what cannot.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageErrorKind {
    /// The object (or bucket) does not exist.
    NotFound,
    /// A conditional create found an object already there.
    AlreadyExists,
    /// Credentials refused or the operation is not permitted.
    PermissionDenied,
    /// Worth retrying: 5xx, throttling, timeouts, connection resets, short reads.
    Transient,
    /// The store cannot be reached at all (DNS, connection refused) after retries.
    Unreachable,
    /// Local or remote space exhausted.
    NoSpace,
    /// A request the store will never accept (bad key, bad range, unsupported).
    InvalidInput,
    /// Anything else that retrying will not fix.
    Permanent,
}

#[derive(Debug, Clone)]
pub struct StorageError {
    kind: StorageErrorKind,
    key: String,
    message: String,
}

impl StorageError {
    pub fn new(kind: StorageErrorKind, key: impl Into<String>, message: impl Into<String>) -> Self {
        StorageError { kind, key: key.into(), message: message.into() }
    }

    pub fn kind(&self) -> StorageErrorKind {
        self.kind
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn is_transient(&self) -> bool {
        matches!(self.kind, StorageErrorKind::Transient | StorageErrorKind::Unreachable)
    }

    pub fn not_found(key: impl Into<String>) -> Self {
        Self::new(StorageErrorKind::NotFound, key, "no such object")
    }

    /// Classifies a local I/O error.
    pub fn from_io(key: impl Into<String>, err: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        let kind = match err.kind() {
            K::NotFound => StorageErrorKind::NotFound,
            K::AlreadyExists => StorageErrorKind::AlreadyExists,
            K::PermissionDenied | K::ReadOnlyFilesystem => StorageErrorKind::PermissionDenied,
            K::StorageFull | K::QuotaExceeded => StorageErrorKind::NoSpace,
            K::Interrupted | K::TimedOut | K::WouldBlock | K::UnexpectedEof => StorageErrorKind::Transient,
            K::InvalidInput | K::InvalidFilename => StorageErrorKind::InvalidInput,
            _ => StorageErrorKind::Permanent,
        };
        Self::new(kind, key, err.to_string())
    }

    /// What a user can do about it.
    pub fn hint(&self) -> Option<&'static str> {
        Some(match self.kind {
            StorageErrorKind::NotFound => "the object is missing from the repository; run `walvault verify` to see what else is",
            StorageErrorKind::PermissionDenied => {
                "check the repository credentials and permissions (file mode, or the S3 policy: put/get/list, delete on locks/, probe/ and wal/*.streaming, and everywhere for expire; see README, Object stores)"
            }
            StorageErrorKind::Unreachable | StorageErrorKind::Transient => {
                "check that the object store is reachable (repository.url, repository.endpoint, network, TLS); walvault retried before giving up"
            }
            StorageErrorKind::NoSpace => "free space on the repository's file system or raise the store's quota",
            _ => return None,
        })
    }
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            StorageErrorKind::NotFound => "not found",
            StorageErrorKind::AlreadyExists => "already exists",
            StorageErrorKind::PermissionDenied => "permission denied",
            StorageErrorKind::Transient => "transient store error",
            StorageErrorKind::Unreachable => "store unreachable",
            StorageErrorKind::NoSpace => "no space left",
            StorageErrorKind::InvalidInput => "invalid request",
            StorageErrorKind::Permanent => "store error",
        };
        if self.key.is_empty() {
            write!(f, "{what}: {}", self.message)
        } else {
            write!(f, "{what} on object '{}': {}", self.key, self.message)
        }
    }
}

impl std::error::Error for StorageError {}
