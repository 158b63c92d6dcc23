//! The WAL page-header checker, on segments of 16 MiB with 8 KiB pages, complete or short.
use walvault::pg::walheader::{ExpectedWal, check_segment};

fn main() {
    let expected = ExpectedWal { pg_major: 15, system_identifier: walvault_fuzz::SYSTEM_IDENTIFIER, seg_size: 16 << 20, block_size: 8192 };
    let name = walvault::pg::WalSegmentName::parse("000000010000000000000001", 16 << 20).expect("a segment name");
    afl::fuzz!(|data: &[u8]| {
        let _ = check_segment(data, &name, &expected, true);
        let _ = check_segment(data, &name, &expected, false);
    });
}
