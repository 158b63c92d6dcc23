//! The repository format: the descriptor, signed documents, WAL objects and their
//! records, packs, backup manifests, the catalog built from them, retention and
//! locks. The exact format is written down in docs/REPOSITORY.md.

pub mod backup_writer;
pub mod catalog;
pub mod chunk;
pub mod descriptor;
pub mod layout;
pub mod lock;
pub mod manifest;
pub mod materialize;
pub mod pack;
pub mod record;
pub mod retention;
pub mod signing;
pub mod verify;
pub mod wal;

pub use descriptor::{ClusterInfo, Descriptor};
pub use signing::{PublicKey, SigningKey};

use std::path::PathBuf;

use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{0}")]
    BadKey(String),
    #[error("key file {path} {message}")]
    KeyFile { path: PathBuf, message: String },
    #[error("object '{object}' is not intact: {message}")]
    Integrity { object: String, message: String },
    #[error("signature of '{object}' does not verify: the object was altered or signed by someone else")]
    BadSignature { object: String },
    #[error("'{object}' is signed by {signer}, not by the trusted key {trusted}")]
    UntrustedSigner { object: String, signer: String, trusted: String },
    #[error("no repository at {location} (no descriptor walvault.json)")]
    NotInitialized { location: String },
    #[error("the repository at {location} belongs to another cluster: its system identifier is {repository}, this server's is {server}")]
    OtherCluster { location: String, repository: String, server: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot write the spool {}: {message}", path.display())]
    Spool { path: PathBuf, message: String },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Seal(#[from] crate::pipeline::SealError),
}

impl RepoError {
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            RepoError::NotInitialized { .. } => "run `walvault init` first (or check repository.url)".into(),
            RepoError::OtherCluster { .. } => {
                "point repository.url at this cluster's repository, or use a new prefix for this cluster".into()
            }
            RepoError::UntrustedSigner { .. } => {
                "if the agent's key was replaced on purpose, pin the new key in signing.public_key; otherwise treat the repository as tampered with".into()
            }
            RepoError::BadSignature { .. } | RepoError::Integrity { .. } => {
                "run `walvault verify` to list every damaged object; restore from another backup if needed".into()
            }
            RepoError::KeyFile { .. } => "generate keys with `walvault keygen --out DIR` and point signing.key_file at agent.key".into(),
            RepoError::Spool { .. } => "free space on the spool's file system or point wal.spool_dir at a larger one, then run again (nothing was recorded; what was already uploaded is re-used)".into(),
            RepoError::Storage(e) => return e.hint().map(String::from),
            RepoError::Seal(e) => return e.hint().map(String::from),
            _ => return None,
        })
    }
}
