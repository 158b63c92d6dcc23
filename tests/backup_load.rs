//! Base backups of a real cluster: taken under pgbench load, checked by
//! PostgreSQL's own pg_verifybackup, started with WAL from the repository and
//! compared table by table; and deduplication measured against the pages that
//! really changed between two backups.

mod common;
mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::env::Env;
use common::pg::PgCluster;
use support::*;

#[test]
fn a_backup_under_load_verifies_starts_with_archived_wal_and_holds_the_same_data() {
    let pg = archiving_cluster(&[]);
    let env = Env::new(&pg);
    env.run_ok(&["init"]);
    start_archiving(&pg, &env);
    pgbench(&pg, &["-i", "-s", "5", "-q"]);

    let mut load = pgbench_spawn(&pg, &["-n", "-c", "2", "-T", "300"]);
    std::thread::sleep(std::time::Duration::from_secs(1));
    let before = pg.psql("select count(*) from pgbench_history");
    let id = env.run_ok(&["backup", "--label", "under load"]).trim().to_string();
    let after = pg.psql("select count(*) from pgbench_history");
    assert_ne!(before, after, "pgbench kept writing during the backup");
    std::thread::sleep(std::time::Duration::from_secs(1));
    load.stop();
    switch_and_wait_archived(&pg);
    let source = pgbench_digests(|sql| pg.psql(sql));

    // What the backup holds, checked by PostgreSQL against its own manifest.
    let materialized = env.new_dir("materialized").join("data");
    env.run_ok(&["materialize", "--backup", &id, "--dest", materialized.to_str().unwrap()]);
    let out = pg.command("pg_verifybackup").arg("-n").arg(&materialized).output().unwrap();
    assert!(out.status.success(), "pg_verifybackup -n failed:\n{}\n{}", common::env::stdout(&out), common::env::stderr(&out));

    // Restored and replayed with the archived WAL, it holds what the source holds.
    let dest = env.new_dir("restored").join("data");
    let out = env.run_ok(&["restore", "--pgdata", dest.to_str().unwrap(), "--replay", "--json"]);
    let reached: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(reached["promoted"], true, "{out}");
    let restored = PgCluster::adopt(&dest);
    assert_eq!(pgbench_digests(|sql| restored.psql(sql)), source, "restored tables differ from the source");
}

/// 8 KiB pages that differ between two data directories, counting pages of
/// files (or parts of files) that only the newer one has.
fn changed_pages(old: &Path, new: &Path) -> (u64, u64) {
    fn files(root: &Path, dir: &Path, out: &mut HashMap<PathBuf, PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                files(root, &p, out);
            } else if t.is_file() {
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), p);
            }
        }
    }
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    files(old, old, &mut a);
    files(new, new, &mut b);
    let (mut changed, mut total) = (0u64, 0u64);
    for (rel, path) in &b {
        let new_bytes = std::fs::read(path).unwrap();
        let old_bytes = a.get(rel).map(|p| std::fs::read(p).unwrap()).unwrap_or_default();
        for (i, page) in new_bytes.chunks(8192).enumerate() {
            total += 1;
            if old_bytes.get(i * 8192..i * 8192 + page.len()) != Some(page) {
                changed += 1;
            }
        }
    }
    (changed, total)
}

/// The signed manifest's body (the JSON before the signature line).
fn manifest(env: &Env, id: &str) -> serde_json::Value {
    let raw = std::fs::read_to_string(env.repo_dir.as_ref().unwrap().join(format!("backups/{id}/manifest.json"))).unwrap();
    let body = &raw[..raw.rfind("\nwalvault-signature").expect("signature line")];
    serde_json::from_str(body).unwrap()
}

/// Everything a backup uploaded: new packs, its file list and the server's manifest.
fn uploaded(m: &serde_json::Value) -> u64 {
    m["stats"]["stored_new"].as_u64().unwrap()
        + m["files"]["stored_len"].as_u64().unwrap()
        + m["server_manifest"]["stored_len"].as_u64().unwrap_or(0)
}

#[test]
fn later_backups_upload_only_what_changed() {
    let pg = archiving_cluster(&[]);
    let env = Env::new(&pg);
    env.run_ok(&["init"]);
    start_archiving(&pg, &env);
    pgbench(&pg, &["-i", "-s", "5", "-q"]);
    pg.psql("vacuum analyze");
    let first = env.run_ok(&["backup"]).trim().to_string();
    let idle = env.run_ok(&["backup"]).trim().to_string();
    let (m1, m2) = (manifest(&env, &first), manifest(&env, &idle));
    let (new1, new2) = (backup_json(&env, &first)["new_bytes"].as_u64().unwrap(), backup_json(&env, &idle)["new_bytes"].as_u64().unwrap());
    eprintln!(
        "first backup: {new1} bytes of new packs ({} uploaded in all) for {} bytes of files; idle second backup: {new2} bytes of new packs ({} in all)",
        uploaded(&m1),
        m1["stats"]["bytes"],
        uploaded(&m2)
    );
    assert!(new2 * 50 < new1, "an idle database's second backup uploads under 2% of the first's: {new2} vs {new1}");
    assert!(uploaded(&m2) * 50 < uploaded(&m1), "counting its file list and manifest too: {} vs {}", uploaded(&m2), uploaded(&m1));

    // About 5% of the pages: single-row updates of random accounts (plus the
    // tellers, branches and history pgbench touches with them).
    pgbench(&pg, &["-n", "-c", "1", "-t", "400"]);
    let third = env.run_ok(&["backup"]).trim().to_string();
    let m3 = manifest(&env, &third);
    let new3 = backup_json(&env, &third)["new_bytes"].as_u64().unwrap();

    let a = env.new_dir("idle").join("data");
    let b = env.new_dir("after").join("data");
    env.run_ok(&["materialize", "--backup", &idle, "--dest", a.to_str().unwrap()]);
    env.run_ok(&["materialize", "--backup", &third, "--dest", b.to_str().unwrap()]);
    let (changed, total) = changed_pages(&a, &b);
    let changed_bytes = changed * 8192;
    eprintln!(
        "after pgbench -t 400: {changed} of {total} pages changed ({:.1}%, {changed_bytes} bytes); the backup stored {} raw bytes of new chunks, uploaded {new3} bytes of packs ({} in all): {:.2}x the changed bytes",
        changed as f64 * 100.0 / total as f64,
        m3["stats"]["bytes_new"],
        uploaded(&m3),
        new3 as f64 / changed_bytes as f64
    );
    assert!(
        changed * 100 >= total && changed * 100 <= total * 15,
        "the workload should touch a few percent of the pages: {changed} of {total}"
    );
    assert!(new3 <= 3 * changed_bytes, "upload {new3} is within 3x of the {changed_bytes} changed bytes");
    assert!(uploaded(&m3) <= 3 * changed_bytes, "also counting the file list and manifest: {}", uploaded(&m3));
}
