//! The conninfo parser (key=value and postgresql:// URIs).
use walvault::pg::ConnParams;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(s) = std::str::from_utf8(data) {
            let _ = ConnParams::parse_with_env(s, &|_| None);
        }
    });
}
