//! Replays every input the fuzzers found crashing (fuzz/regressions/<target>/)
//! and every seed (fuzz/seeds/<target>/) through the same calls as the fuzz
//! targets in fuzz/src/bin/: none may panic. See docs/TESTING.md, "Fuzzing".

use std::path::Path;

use bytes::BytesMut;
use walvault::pg::basebackup::{BackupEvent, BaseBackupDecoder};
use walvault::pg::conn::decode_message;
use walvault::pg::streamer::ReplicationMessage;
use walvault::pg::tar::TarParser;
use walvault::pg::walheader::{ExpectedWal, check_segment};
use walvault::pg::{BackendMessage, ConnParams};
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
        "replication" => {
            let _ = backup_events(data);
        }
        other => panic!("no fuzz target named {other}"),
    }
}

/// The replication target's body: decodes the server's bytes as a connection
/// would and feeds them to the BASE_BACKUP decoder (and each CopyData to the
/// streaming decoder); returns the backup events, in order, as text.
fn backup_events(data: &[u8]) -> Vec<String> {
    let mut events = Vec::new();
    let Some((&mode, stream)) = data.split_first() else { return events };
    let mut buf = BytesMut::from(stream);
    let mut backup = Some(BaseBackupDecoder::new(mode & 1 == 1));
    while let Ok(Some(msg)) = decode_message(&mut buf) {
        if let BackendMessage::CopyData(d) = &msg {
            let _ = ReplicationMessage::decode(d.clone());
        }
        if let Some(dec) = backup.as_mut() {
            match dec.feed(msg) {
                Err(e) => {
                    events.push(format!("error: {e}"));
                    backup = None;
                }
                Ok(ev) => {
                    events.extend(ev.into_iter().chain(dec.take_pending()).map(|e| event_name(&e)));
                }
            }
        }
    }
    events
}

fn event_name(e: &BackupEvent) -> String {
    match e {
        BackupEvent::Started { start_lsn, .. } => format!("started {start_lsn}"),
        BackupEvent::Tablespaces(t) => format!("tablespaces {}", t.len()),
        BackupEvent::ArchiveStart { tablespace } => format!("archive {:?}", tablespace.as_ref().and_then(|t| t.oid)),
        BackupEvent::ArchiveData(d) => format!("data {}", d.len()),
        BackupEvent::ArchiveEnd => "end".into(),
        BackupEvent::Progress(n) => format!("progress {n}"),
        BackupEvent::ManifestData(_) => "manifest".into(),
        BackupEvent::Finished { end_lsn, .. } => format!("finished {end_lsn}"),
    }
}

/// The replication seeds are whole, well-formed replies, so the fuzzer starts
/// from inputs that reach every state; both generations give the same events.
#[test]
fn the_replication_seeds_decode_to_a_whole_backup() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/replication");
    for seed in ["modern", "legacy"] {
        let events = backup_events(&std::fs::read(root.join(seed)).unwrap());
        let shown = events.join(", ");
        assert_eq!(events.first().map(String::as_str), Some("started 0/2000028"), "{seed}: {shown}");
        assert_eq!(events.iter().filter(|e| e.starts_with("archive ")).count(), 2, "{seed}: {shown}");
        assert!(events.contains(&"archive Some(16400)".to_string()), "{seed}: {shown}");
        assert_eq!(events.iter().filter(|e| *e == "end").count(), 2, "{seed}: {shown}");
        assert!(events.contains(&"manifest".to_string()), "{seed}: {shown}");
        assert_eq!(events.last().map(String::as_str), Some("finished 0/2000100"), "{seed}: {shown}");
    }
    let events = backup_events(&std::fs::read(root.join("error")).unwrap());
    assert!(events.last().unwrap().contains("promoted during online backup"), "{events:?}");
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
    assert!(seeds >= 12, "the seeds are there ({seeds})");
    let regressions = replay(&root.join("regressions"));
    eprintln!("{seeds} seeds and {regressions} crash inputs replayed");
}
