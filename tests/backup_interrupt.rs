//! A backup killed half way (kill -9) leaves no backup behind, does not block
//! the next one, and its uploaded packs are re-used; a second backup while one
//! runs is refused by the repository lock.

mod common;
mod support;

use std::time::{Duration, Instant};

use common::env::{Env, stderr, stdout};
use support::*;
use walvault::repo::pack::index_from_body;
use walvault::repo::signing::SignedDocument;

/// The pack indexes in a file repository: (pack size, the backup that wrote it, pack id).
fn pack_indexes(env: &Env) -> Vec<(u64, String, String)> {
    let mut out = Vec::new();
    let packs = env.repo_dir.as_ref().unwrap().join("packs");
    for dir in std::fs::read_dir(&packs).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(dir.path()).into_iter().flatten().flatten() {
            let p = f.path();
            if p.extension().is_some_and(|e| e == "idx") {
                let Ok(raw) = std::fs::read(&p) else { continue };
                let Ok(doc) = SignedDocument::parse(&raw, "index") else { continue };
                let idx = index_from_body(doc.body, "index").unwrap();
                out.push((idx.pack.size, idx.backup, idx.pack.id));
            }
        }
    }
    out
}

#[test]
fn a_killed_backup_leaves_nothing_visible_and_the_next_one_reuses_its_packs() {
    let pg = archiving_cluster(&[]);
    let mut env = Env::builder(&pg).set("backup.pack_size", "\"1MiB\"").build();
    env.run_ok(&["init"]);
    start_archiving(&pg, &env);
    // Some 60 MB that compress about 2x (hex text), so there are many packs.
    pg.psql(
        "create table noise as select g, md5(g::text) || md5((g * 7)::text) || md5((g * 13)::text) as t from generate_series(1, 500000) g",
    );
    // Frozen now, so that autovacuum does not rewrite its pages between the
    // two backups (which would rightly make them new chunks).
    pg.psql("vacuum (freeze, analyze) noise");
    pg.psql("checkpoint");

    // Slow uploads (each pack index waits) so the kill lands half way.
    env.set_env("WALVAULT_TEST_FAULTS", "put:*:delay=400");
    let mut running =
        env.cmd(&["backup", "--label", "doomed"]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while pack_indexes(&env).len() < 3 {
        assert!(running.try_wait().unwrap().is_none(), "the backup ended before it could be interrupted");
        assert!(Instant::now() < deadline, "no pack was uploaded");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A second backup now is refused by the lock, clearly, with exit code 7.
    env.set_env("WALVAULT_TEST_FAULTS", "");
    let (code, err) = env.run_err(&["backup"]);
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("locked for a base backup by") && err.contains(&format!(":{}", running.id())), "names the holder: {err}");
    assert!(err.contains("hint:"), "{err}");

    unsafe { libc::kill(running.id() as i32, libc::SIGKILL) };
    running.wait().unwrap();
    let left = pack_indexes(&env);
    let doomed_id = left[0].1.clone();
    let doomed_packs: Vec<String> = left.iter().map(|(_, _, p)| p.clone()).collect();
    let doomed_bytes: u64 = left.iter().map(|(size, _, _)| size).sum();
    eprintln!("killed backup {doomed_id} after {} packs", doomed_packs.len());

    // Nothing visible, nothing restorable.
    let info = env.info_json();
    assert_eq!(info["backups"].as_array().unwrap().len(), 0, "{info}");
    let dest = env.dir.join("nothing");
    let (code, err) = env.run_err(&["restore", "--pgdata", dest.to_str().unwrap(), "--backup", &doomed_id]);
    assert_ne!(code, 0);
    assert!(err.contains(&doomed_id), "{err}");
    assert!(is_empty_dir(&dest), "a refused restore writes nothing");

    // The next backup takes over the dead holder's lock at once and re-uses the packs.
    let started = Instant::now();
    let out = env.cmd(&["backup", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(stderr(&out).contains("no longer runs"), "the stale lock was taken over: {}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(300), "not blocked until the lock expired");
    let b: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let id = b["id"].as_str().unwrap().to_string();
    let m = &pack_indexes(&env);
    let reused = doomed_packs.iter().filter(|p| m.iter().any(|(_, _, q)| q == *p)).count();
    assert_eq!(reused, doomed_packs.len(), "the interrupted backup's packs stay");
    let manifest_raw = std::fs::read_to_string(env.repo_dir.as_ref().unwrap().join(format!("backups/{id}/manifest.json"))).unwrap();
    for p in &doomed_packs {
        assert!(manifest_raw.contains(p.as_str()), "the new backup uses pack {p} of the interrupted one");
    }
    let new_bytes = b["new_bytes"].as_u64().unwrap();
    let referenced = b["repository_bytes"].as_u64().unwrap();
    eprintln!(
        "the next backup uploaded {new_bytes} of the {referenced} bytes it references; the interrupted one had uploaded {doomed_bytes}"
    );
    assert!(
        new_bytes + doomed_bytes <= referenced + referenced / 100,
        "only what the interrupted backup had not uploaded is uploaded: {b}"
    );
    let info = env.info_json();
    assert_eq!(info["backups"].as_array().unwrap().len(), 1);
    assert_eq!(info["backups"][0]["restorable"], true, "{info}");
}
