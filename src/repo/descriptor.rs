//! The repository descriptor (`walvault.json`): which cluster the repository
//! belongs to, the keys, and what the store supports. Signed by the agent. Each
//! change raises `generation` and records the hash of the previous descriptor, so
//! manifests and records that name a generation expose a rolled-back descriptor.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use super::signing::{PublicKey, SignedDocument, SigningKey};
use super::{RepoError, layout};
use crate::pipeline::{Opener, Sealer};
use crate::storage::{self, CreateOutcome, ObjectStore};

pub const FORMAT: &str = "walvault-repository";
pub const FORMAT_VERSION: u32 = 1;
pub const DOC_KIND: &str = "descriptor";

/// What a repository knows of its cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterInfo {
    /// pg_control's system identifier, as a decimal string (it does not fit a JSON number).
    pub system_identifier: String,
    pub pg_version_num: u32,
    pub pg_version: String,
    pub wal_segment_size: u64,
    pub wal_block_size: u32,
    pub block_size: u32,
}

impl ClusterInfo {
    pub fn major(&self) -> u32 {
        self.pg_version_num / 10000
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreCapabilities {
    /// Whether the store honoured a conditional create (If-None-Match) when init
    /// probed it. Locks add a verification step when it does not.
    pub conditional_create: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Descriptor {
    pub format: String,
    pub format_version: u32,
    pub generation: u64,
    /// blake3 (hex) of the previous descriptor document, from generation 2 on.
    pub previous: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
    pub cluster: ClusterInfo,
    /// The agent's public signing key; every signed object must verify with it.
    pub signing_key: String,
    /// The age recipients objects are encrypted to.
    pub recipients: Vec<String>,
    /// The chunk-identifier key, sealed to the recipients, so that restore can
    /// check chunk identifiers without the agent's key.
    pub chunk_key_sealed: String,
    pub store: StoreCapabilities,
}

/// A descriptor as loaded, with the key it was verified against.
#[derive(Debug, Clone)]
pub struct LoadedDescriptor {
    pub descriptor: Descriptor,
    /// blake3 of the stored document.
    pub hash: blake3::Hash,
    pub trusted_key: PublicKey,
    /// True when the key was pinned by configuration or is the agent's own key;
    /// false when it was taken from the descriptor itself (trust on first use).
    pub pinned: bool,
}

impl Descriptor {
    pub fn new(cluster: ClusterInfo, key: &SigningKey, sealer: &Sealer, conditional_create: bool) -> Result<Descriptor, RepoError> {
        let now = chrono::Utc::now();
        let (sealed, _) = sealer.seal_bytes(&key.chunk_id_key())?;
        Ok(Descriptor {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            generation: 1,
            previous: None,
            created_at: now,
            updated_at: now,
            cluster,
            signing_key: key.public().to_string(),
            recipients: sealer.recipients().iter().map(|r| r.to_string()).collect(),
            chunk_key_sealed: B64.encode(sealed),
            store: StoreCapabilities { conditional_create },
        })
    }

    pub fn signing_key(&self) -> Result<PublicKey, RepoError> {
        PublicKey::parse(&self.signing_key)
    }

    /// The chunk-identifier key, for holders of the identity.
    pub fn chunk_key(&self, opener: &Opener) -> Result<[u8; 32], RepoError> {
        let sealed = B64
            .decode(&self.chunk_key_sealed)
            .map_err(|_| RepoError::Integrity { object: layout::DESCRIPTOR.into(), message: "chunk_key_sealed is not base64".into() })?;
        let key = opener.open_bytes(&sealed, &Default::default())?;
        key.try_into()
            .map_err(|_| RepoError::Integrity { object: layout::DESCRIPTOR.into(), message: "chunk key has the wrong length".into() })
    }

    /// The signed document for this descriptor.
    pub fn to_document(&self, key: &SigningKey) -> Vec<u8> {
        let mut body = serde_json::to_vec_pretty(self).expect("descriptor serializes");
        body.push(b'\n');
        key.sign_document(DOC_KIND, &body)
    }

    /// Writes the first descriptor; fails if one appeared meanwhile.
    pub async fn create(&self, store: &dyn ObjectStore, key: &SigningKey) -> Result<CreateOutcome, RepoError> {
        Ok(store.put_if_absent(layout::DESCRIPTOR, self.to_document(key).into()).await?)
    }

    /// Replaces the descriptor with the next generation.
    pub async fn replace(&self, store: &dyn ObjectStore, key: &SigningKey) -> Result<(), RepoError> {
        Ok(store.put(layout::DESCRIPTOR, self.to_document(key).into()).await?)
    }

    /// Reads and verifies the descriptor. `trusted` is the key to require (the
    /// agent's own, or one pinned in signing.public_key); without one, the key
    /// named inside the descriptor is used and the result says it was not pinned.
    pub async fn load(store: &dyn ObjectStore, trusted: Option<PublicKey>) -> Result<LoadedDescriptor, RepoError> {
        let raw = storage::get_bytes_opt(store, layout::DESCRIPTOR)
            .await?
            .ok_or_else(|| RepoError::NotInitialized { location: store.location() })?;
        Self::from_document(&raw, trusted)
    }

    pub fn from_document(raw: &[u8], trusted: Option<PublicKey>) -> Result<LoadedDescriptor, RepoError> {
        let what = layout::DESCRIPTOR;
        let doc = SignedDocument::parse(raw, what)?;
        let (trusted_key, pinned) = match trusted {
            Some(k) => (k, true),
            None => (doc.signer, false),
        };
        let body = doc.verify(DOC_KIND, &trusted_key, what)?;
        let descriptor: Descriptor = serde_json::from_slice(body)
            .map_err(|e| RepoError::Integrity { object: what.into(), message: format!("unreadable descriptor: {e}") })?;
        if descriptor.format != FORMAT {
            return Err(RepoError::Integrity {
                object: what.into(),
                message: format!("not a walvault descriptor (format '{}')", descriptor.format),
            });
        }
        if descriptor.format_version > FORMAT_VERSION {
            return Err(RepoError::Invalid(format!(
                "the repository uses format version {}, newer than this walvault understands ({FORMAT_VERSION}); upgrade walvault",
                descriptor.format_version
            )));
        }
        if descriptor.signing_key()? != trusted_key {
            return Err(RepoError::UntrustedSigner {
                object: what.into(),
                signer: descriptor.signing_key.clone(),
                trusted: trusted_key.to_string(),
            });
        }
        Ok(LoadedDescriptor { descriptor, hash: blake3::hash(raw), trusted_key, pinned })
    }

    /// The recipients as keys.
    pub fn sealer(&self, level: i32) -> Result<Sealer, RepoError> {
        let recipients = self.recipients.iter().map(|r| crate::pipeline::seal::parse_recipient(r)).collect::<Result<Vec<_>, _>>()?;
        Ok(Sealer::new(recipients, level)?)
    }

    /// Checks that the server is the repository's cluster.
    pub fn check_cluster(&self, location: &str, system_identifier: &str) -> Result<(), RepoError> {
        if self.cluster.system_identifier != system_identifier {
            return Err(RepoError::OtherCluster {
                location: location.into(),
                repository: self.cluster.system_identifier.clone(),
                server: system_identifier.into(),
            });
        }
        Ok(())
    }
}
