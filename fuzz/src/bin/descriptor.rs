//! The signed repository descriptor.
fn main() {
    let key = walvault_fuzz::trusted_key();
    afl::fuzz!(|data: &[u8]| {
        let _ = walvault::repo::Descriptor::from_document(data, Some(key));
        let _ = walvault::repo::Descriptor::from_document(data, None);
    });
}
