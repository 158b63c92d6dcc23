//! verify on a repository of two backups and 200 WAL segments: without the
//! identity (the auditor's case) and with `--deep`, both reporting the same
//! object counts as `info --json`; and the scoped runs (`--backup`, `--since`).

mod common;

use common::env::{Env, stderr, stdout};
use common::pg::{PgCluster, PgOptions};
use serde_json::Value;

/// Writes a little and switches segments `n` times in one statement; returns
/// the last segment completed.
fn switch_segments(pg: &PgCluster, n: usize) -> String {
    pg.psql(&format!(
        "do $$ begin for i in 1..{n} loop insert into marks values (i, 'segment'); perform pg_switch_wal(); end loop; end $$"
    ));
    pg.psql("select pg_walfile_name(pg_switch_wal())")
}

fn wait_archived(pg: &PgCluster, segment: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while pg.psql(&format!("select coalesce(last_archived_wal, '') >= '{segment}' from pg_stat_archiver")) != "t" {
        assert!(std::time::Instant::now() < deadline, "archiving stalled before {segment}:\n{}", pg.log_tail());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn verify(env: &Env, args: &[&str]) -> (i32, Value) {
    let out = env.run(args);
    let report = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("no JSON report ({e}):\nstdout: {}\nstderr: {}", stdout(&out), stderr(&out)));
    (out.status.code().unwrap_or(-1), report)
}

const COUNTS: [&str; 5] = ["total", "wal", "packs", "pack_indexes", "backup_objects"];

#[test]
fn verify_with_and_without_the_identity_counts_what_info_counts() {
    // wal_init_zero=off: 200 switched segments cost sparse files, not 3 GB of zeros.
    let pg = PgCluster::start(
        PgOptions::new()
            .guc("archive_mode", "on")
            .guc("archive_command", "'/bin/false'")
            .guc("wal_init_zero", "off")
            .guc("max_wal_size", "'8GB'"),
    );
    let env = Env::new(&pg);
    env.run_ok(&["init"]);
    pg.set_guc("archive_command", &env.archive_command());
    pg.psql("create table marks(id int, note text)");
    pg.psql("insert into marks select g, md5(g::text) from generate_series(1, 50000) g");
    let first = env.run_ok(&["backup"]).trim().to_string();
    let last = switch_segments(&pg, 100);
    wait_archived(&pg, &last);
    let between = chrono::Utc::now();
    pg.psql("update marks set note = 'changed' where id % 10 = 0");
    let second = env.run_ok(&["backup"]).trim().to_string();
    let last = switch_segments(&pg, 100);
    wait_archived(&pg, &last);
    drop(pg);

    let info = env.info_json();
    let objects = &info["repository"]["objects"];
    assert!(objects["wal"].as_u64().unwrap() >= 200, "{objects:#}");

    // The auditor's run: no identity at all.
    let (code, report) = verify(&env, &["--set", "encryption.identity_file=", "verify", "--json"]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["deep"], false);
    assert_eq!(report["deep_checked"], Value::Null);
    assert_eq!(report["backups_checked"], 2);
    assert!(report["wal_segments_checked"].as_u64().unwrap() >= 200, "{report:#}");
    assert!(report["backups"].as_array().unwrap().iter().all(|b| b["restorable"] == true), "{report:#}");
    for k in COUNTS {
        assert_eq!(report["objects_checked"][k], objects[k], "objects_checked.{k} against info's repository.objects.{k}");
    }
    assert_eq!(report["objects_checked"]["other"], 1, "the descriptor");
    assert!(report["bytes_read"].as_u64().unwrap() > 0);

    // --deep needs the identity, and says so.
    let out = env.run(&["--set", "encryption.identity_file=", "verify", "--deep"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("encryption.identity_file"), "{}", stderr(&out));

    // --deep with it: the same objects, each decrypted.
    let (code, deep) = verify(&env, &["verify", "--json", "--deep"]);
    assert_eq!(code, 0, "{deep:#}");
    for k in COUNTS {
        assert_eq!(deep["objects_checked"][k], objects[k], "--deep objects_checked.{k}");
    }
    assert_eq!(deep["deep_checked"]["wal_files"], objects["wal"]);
    let sizes: u64 = info["backups"].as_array().unwrap().iter().map(|b| b["size_bytes"].as_u64().unwrap()).sum();
    assert_eq!(deep["deep_checked"]["file_bytes"].as_u64().unwrap(), sizes, "every byte of both backups was rebuilt and compared");

    // Scoped runs: one backup and the WAL from its start; backups since a time.
    let (code, one) = verify(&env, &["verify", "--json", "--backup", &first]);
    assert_eq!(code, 0, "{one:#}");
    assert_eq!(one["backups_checked"], 1);
    assert_eq!(one["objects_checked"]["pack_indexes"], 0, "indexes are checked when the whole repository is");
    assert_eq!(one["inventory"]["backups"].as_array().unwrap().len(), 2, "the inventory is always whole");
    let (code, since) = verify(&env, &["verify", "--json", "--since", &between.to_rfc3339()]);
    assert_eq!(code, 0, "{since:#}");
    assert_eq!(since["backups"].as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap()).collect::<Vec<_>>(), vec![second.as_str()]);
    let since_wal = since["objects_checked"]["wal"].as_u64().unwrap();
    assert!(since_wal >= 100 && since_wal < objects["wal"].as_u64().unwrap(), "only the WAL from the second backup on: {since_wal}");
    let (code, err) = env.run_err(&["verify", "--backup", "20000101T000000Z"]);
    assert_eq!(code, 2, "{err}");
}
