//! The signed backup manifest and the signed-document envelope.
fn main() {
    let key = walvault_fuzz::trusted_key();
    afl::fuzz!(|data: &[u8]| {
        let _ = walvault::repo::signing::SignedDocument::parse(data, "fuzz");
        let _ = walvault::repo::manifest::BackupManifest::from_document(data, &key, "20260101T000000Z");
    });
}
