//! Shared inputs for the fuzz targets: the public key of the repository the
//! seeds come from (fuzz/seeds/), so genuine seed documents verify and the
//! parsers behind the signature check are reached.

use walvault::repo::PublicKey;

pub fn trusted_key() -> PublicKey {
    PublicKey::parse("ed25519:OReozW87JmOqICU3CMSvUYSSMaFM1JV5aank6OGohzA=").expect("the seed repository's key")
}

/// The system identifier of the cluster the WAL and pg_control seeds come from.
pub const SYSTEM_IDENTIFIER: u64 = 7_710_970_192_656_507_405;
