//! Local faults: a full disk under the restore target and under the spool, a
//! read-only destination, a destination walvault may not write. Each fails with
//! a clear error, leaves nothing a retry trips over, and a retry after the
//! cause is removed succeeds. The full disks are small tmpfs mounts, so these
//! tests need root (as CI runs them); as another user they fail, saying so.

mod common;

use common::env::{Env, chown_tree, stderr};
use common::pg::{PgCluster, PgOptions};
use common::tmpfs::Tmpfs;

fn survived(what: &str) {
    eprintln!("RELIABILITY fault {what} survived");
}

fn cluster_with_backup() -> (PgCluster, Env, String) {
    let pg = PgCluster::start(PgOptions::new().guc("archive_mode", "on").guc("archive_command", "'/bin/false'"));
    let env = Env::builder(&pg).set("backup.pack_size", "\"1MiB\"").build();
    env.run_ok(&["init"]);
    pg.set_guc("archive_command", &env.archive_command());
    pg.psql("create table noise as select g, md5(g::text) || md5((g * 7)::text) as t from generate_series(1, 100000) g");
    let id = env.run_ok(&["backup"]).trim().to_string();
    (pg, env, id)
}

#[test]
fn restore_targets_that_are_full_read_only_or_forbidden_fail_clearly_and_a_retry_succeeds() {
    let (_pg, env, id) = cluster_with_backup();

    // A full disk: 8 MB for a cluster of some 40 MB.
    let disk = Tmpfs::mount(&env.new_dir("small"), "8m");
    let dest = disk.path().join("data");
    let (code, err) = env.run_err(&["restore", "--pgdata", dest.to_str().unwrap(), "--backup", &id]);
    assert!(code >= 3, "{err}");
    assert!(err.contains("No space left") || err.contains("no space"), "says the disk is full: {err}");
    assert!(err.contains(dest.to_str().unwrap()), "names where: {err}");
    assert!(err.contains("hint:"), "{err}");
    assert!(!dest.join("global/pg_control").exists(), "a failed restore cannot be started by accident");
    // Freed space: the retry says to replace what the failed one left, and then works.
    disk.resize("256m");
    let (_, err) = env.run_err(&["restore", "--pgdata", dest.to_str().unwrap(), "--backup", &id]);
    assert!(err.contains("--force"), "{err}");
    env.run_ok(&["restore", "--pgdata", dest.to_str().unwrap(), "--backup", &id, "--force"]);
    assert!(dest.join("global/pg_control").exists());
    survived("restore into a full disk, retried after freeing space");

    // A read-only destination.
    let ro = Tmpfs::mount(&env.new_dir("ro"), "64m");
    let ro_dest = ro.path().join("data");
    std::fs::create_dir(&ro_dest).unwrap();
    chown_tree(&ro_dest);
    ro.remount_read_only(true);
    let (code, err) = env.run_err(&["restore", "--pgdata", ro_dest.to_str().unwrap(), "--backup", &id]);
    assert!(code >= 2, "{err}");
    assert!(err.contains("Read-only") || err.contains("read-only"), "says why: {err}");
    assert!(err.contains("hint:"), "{err}");
    ro.remount_read_only(false);
    survived("restore into a read-only destination (clean failure)");

    // A destination the postgres user may not write.
    let forbidden = env.dir.join("forbidden");
    std::fs::create_dir(&forbidden).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&forbidden, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (code, err) = env.run_err(&["restore", "--pgdata", forbidden.join("data").to_str().unwrap(), "--backup", &id]);
    assert!(code >= 2, "{err}");
    assert!(err.contains("ermission denied"), "says why: {err}");
    assert!(err.contains("hint:"), "{err}");
    survived("restore into a forbidden destination (clean failure)");
}

#[test]
fn a_full_spool_fails_the_backup_clearly_and_a_retry_after_freeing_space_succeeds() {
    let (_pg, mut env, _) = cluster_with_backup();
    let spool = Tmpfs::mount(&env.new_dir("spool-disk"), "600k");
    env.set("wal.spool_dir", &format!("\"{}\"", spool.path().display()));
    // New data, so the backup has packs to spool.
    _pg.psql("create table more as select g, md5((g * 3)::text) || md5((g * 11)::text) as t from generate_series(1, 100000) g");
    let (code, err) = env.run_err(&["backup"]);
    assert!(code >= 3, "{err}");
    assert!(err.contains("No space left") || err.contains("no space"), "says the spool is full: {err}");
    assert!(err.contains(spool.path().to_str().unwrap()), "names the spool: {err}");
    assert!(err.contains("hint:"), "{err}");
    assert_eq!(env.info_json()["backups"].as_array().unwrap().len(), 1, "the failed backup is not recorded");
    spool.resize("256m");
    env.run_ok(&["backup"]);
    let info = env.info_json();
    assert_eq!(info["backups"].as_array().unwrap().len(), 2, "{info}");
    assert_eq!(info["backups"][1]["restorable"], true, "{info}");
    let out = env.run(&["verify", "--deep"]);
    assert!(out.status.success(), "{}", stderr(&out));
    survived("backup with a full spool, retried after freeing space");
}
