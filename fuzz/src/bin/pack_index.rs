//! The signed pack index.
fn main() {
    let key = walvault_fuzz::trusted_key();
    afl::fuzz!(|data: &[u8]| {
        let _ = walvault::repo::pack::parse_index(data, &key, "packs/00/fuzz.idx");
    });
}
