//! The tar stream parser (BASE_BACKUP archives), fed in two pieces split at a
//! point taken from the input, as a network stream arrives.
use walvault::pg::tar::TarParser;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let (split, body) = match data.split_first() {
            Some((s, b)) => (*s as usize * 37, b),
            None => return,
        };
        let split = split.min(body.len());
        let mut p = TarParser::new();
        let mut sink = |_e| Ok(());
        if p.feed(&body[..split], &mut sink).is_ok() {
            let _ = p.feed(&body[split..], &mut sink);
        }
        let _ = p.is_done();
    });
}
