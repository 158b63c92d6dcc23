//! WAL object framing and the signed WAL record.
use walvault::repo::record;

fn main() {
    let key = walvault_fuzz::trusted_key();
    afl::fuzz!(|data: &[u8]| {
        let _ = record::decode_header(data, &key, "fuzz");
        if let Ok((h, payload)) = record::decode(data, &key, "fuzz") {
            let _ = record::check_payload(&h.record, payload, "fuzz");
        }
    });
}
