//! hash -> compress -> encrypt, and back. Blocking work runs on a CPU pool sized
//! to the cores; callers stream through fixed buffers so memory stays bounded.

pub mod bridge;
pub mod pool;
pub mod seal;

pub use pool::{CpuPool, cpu_pool};
pub use seal::{Expected, Opener, SealSummary, Sealer};

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("no encryption recipient configured")]
    NoRecipients,
    #[error("no identity to decrypt with")]
    NoIdentity,
    #[error("{0}")]
    BadKey(String),
    #[error("the identity does not match any recipient the object was encrypted to (wrong key)")]
    WrongKey,
    #[error("the object is truncated")]
    Truncated,
    #[error("the object is corrupt: {0}")]
    Corrupt(String),
    #[error("stored bytes do not match their signed checksum (expected blake3 {expected}, found {actual})")]
    StoredHashMismatch { expected: blake3::Hash, actual: blake3::Hash },
    #[error("decrypted content does not match its recorded checksum (expected blake3 {expected}, found {actual})")]
    PlainHashMismatch { expected: blake3::Hash, actual: blake3::Hash },
    #[error("decrypted content is {actual} bytes where {expected} were recorded")]
    LengthMismatch { expected: u64, actual: u64 },
    #[error("encryption failed: {0}")]
    Encrypt(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl SealError {
    /// True when the object itself is bad (as opposed to a key or local problem).
    pub fn is_integrity(&self) -> bool {
        matches!(
            self,
            SealError::Truncated
                | SealError::Corrupt(_)
                | SealError::StoredHashMismatch { .. }
                | SealError::PlainHashMismatch { .. }
                | SealError::LengthMismatch { .. }
        )
    }

    pub fn hint(&self) -> Option<&'static str> {
        Some(match self {
            SealError::WrongKey => "use the identity file whose public key is among encryption.recipients (encryption.identity_file)",
            SealError::NoIdentity => "set encryption.identity_file to the restore key (restore.key from `walvault keygen`)",
            SealError::NoRecipients => "set encryption.recipients to the age public key printed by `walvault keygen`",
            e if e.is_integrity() => "the repository object was altered or damaged; run `walvault verify` to list every affected object",
            _ => return None,
        })
    }
}
