//! Replays every input the fuzzers found crashing (fuzz/regressions/<target>/)
//! and every seed (fuzz/seeds/<target>/) through the same calls as the fuzz
//! targets in fuzz/src/bin/: none may panic. See docs/TESTING.md, "Fuzzing".

use std::path::Path;

use walvault::pg::ConnParams;
use walvault::pg::tar::TarParser;
use walvault::pg::walheader::{ExpectedWal, check_segment};
use walvault::repo::PublicKey;

const SYSTEM_IDENTIFIER: u64 = 7_710_970_192_656_507_405;

fn trusted_key() -> PublicKey {
    PublicKey::parse("ed25519:OReozW87JmOqICU3CMSvUYSSMaFM1JV5aank6OGohzA=").unwrap()
}

/// The body of each fuzz target, by name.
fn run(target: &str, data: &[u8]) {
    let key = trusted_key();
    match target {
        "tar" => {
            let Some((s, body)) = data.split_first() else { return };
            let split = (*s as usize * 37).min(body.len());
            let mut p = TarParser::new();
            let mut sink = |_e| Ok(());
            if p.feed(&body[..split], &mut sink).is_ok() {
                let _ = p.feed(&body[split..], &mut sink);
            }
        }
        "walheader" => {
            let expected = ExpectedWal { pg_major: 15, system_identifier: SYSTEM_IDENTIFIER, seg_size: 16 << 20, block_size: 8192 };
            let name = walvault::pg::WalSegmentName::parse("000000010000000000000001", 16 << 20).unwrap();
            let _ = check_segment(data, &name, &expected, true);
            let _ = check_segment(data, &name, &expected, false);
        }
        "conninfo" => {
            if let Ok(s) = std::str::from_utf8(data) {
                let _ = ConnParams::parse_with_env(s, &|_| None);
            }
        }
        "record" => {
            let _ = walvault::repo::record::decode_header(data, &key, "fuzz");
            if let Ok((h, payload)) = walvault::repo::record::decode(data, &key, "fuzz") {
                let _ = walvault::repo::record::check_payload(&h.record, payload, "fuzz");
            }
        }
        "pack_index" => {
            let _ = walvault::repo::pack::parse_index(data, &key, "packs/00/fuzz.idx");
        }
        "manifest" => {
            let _ = walvault::repo::signing::SignedDocument::parse(data, "fuzz");
            let _ = walvault::repo::manifest::BackupManifest::from_document(data, &key, "20260101T000000Z");
        }
        "descriptor" => {
            let _ = walvault::repo::Descriptor::from_document(data, Some(key));
            let _ = walvault::repo::Descriptor::from_document(data, None);
        }
        "control_file" => {
            let _ = walvault::pg::basebackup::control_file_next_xid(data, SYSTEM_IDENTIFIER);
        }
        other => panic!("no fuzz target named {other}"),
    }
}

fn replay(dir: &Path) -> usize {
    let mut n = 0;
    for target in std::fs::read_dir(dir).into_iter().flatten().flatten().filter(|e| e.path().is_dir()) {
        let name = target.file_name().to_string_lossy().into_owned();
        for input in std::fs::read_dir(target.path()).unwrap().flatten() {
            let data = std::fs::read(input.path()).unwrap();
            let shown = input.path().display().to_string();
            std::panic::catch_unwind(|| run(&name, &data)).unwrap_or_else(|_| panic!("{shown} panics the {name} parser"));
            n += 1;
        }
    }
    n
}

#[test]
fn seeds_and_crash_inputs_found_by_fuzzing_parse_without_panicking() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let seeds = replay(&root.join("seeds"));
    assert!(seeds >= 8, "the seeds are there ({seeds})");
    let regressions = replay(&root.join("regressions"));
    eprintln!("{seeds} seeds and {regressions} crash inputs replayed");
}
