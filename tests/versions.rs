//! The end-to-end path on whichever PostgreSQL `WALVAULT_TEST_PG_BIN` points
//! at (scripts/test.sh runs it for several versions): WAL streaming, a base
//! backup, a restore to a time with exactly the right rows, and a clean verify;
//! and a restore with binaries of another major version is refused.

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::env::Env;
use common::pg::{PgCluster, PgOptions};

struct Streamer(Child);

impl Drop for Streamer {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// Waits until the repository's recoverable window reaches the server's current position.
fn wait_until_stored(pg: &PgCluster, env: &Env) {
    let lsn: walvault::pg::Lsn = pg.psql("select pg_current_wal_lsn()").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let info = env.info_json();
        let end = info["recoverable_window"]["end_lsn"].as_str().and_then(|s| s.parse::<walvault::pg::Lsn>().ok());
        if end.is_some_and(|e| e >= lsn) {
            return;
        }
        assert!(Instant::now() < deadline, "WAL up to {lsn} never reached the repository: {info:#}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn stream_backup_restore_verify() {
    let pg = PgCluster::start(PgOptions::new().guc("track_commit_timestamp", "on"));
    let major = pg.major();
    let env = Env::builder(&pg).set("wal.partial_interval", "\"1s\"").set("wal.status_interval", "\"1s\"").build();
    env.run_ok(&["init"]);
    let _stream = Streamer(env.cmd(&["stream"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());

    pg.psql("create table marks(id int primary key, note text)");
    pg.psql("insert into marks select g, 'before the backup' from generate_series(1, 50) g");
    let backup = env.run_ok(&["backup", "--label", &format!("pg{major}")]);
    assert!(!backup.trim().is_empty());
    for i in 51..=90 {
        pg.psql(&format!("insert into marks values ({i}, 'after')"));
    }
    let target = pg.psql("select pg_xact_commit_timestamp(xmin)::text from marks where id = 70");
    wait_until_stored(&pg, &env);

    let info = env.info_json();
    assert_eq!(info["backups"].as_array().unwrap().len(), 1, "{info:#}");
    assert_eq!(info["repository"]["pg_version_num"].as_u64().unwrap() / 10000, major as u64, "the repository records the version");

    let dest = env.new_dir("restore").join("data");
    env.run_ok(&["restore", "--pgdata", dest.to_str().unwrap(), "--target-time", &target, "--replay"]);
    let restored = PgCluster::adopt(&dest);
    assert_eq!(restored.psql("select count(*), max(id) from marks"), "70|70", "PostgreSQL {major}: rows at {target}");
    drop(restored);

    let out = env.run(&["verify", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", common::env::stderr(&out)));
    assert!(out.status.success(), "verify on PostgreSQL {major}: {report:#}");
    assert_eq!(report["ok"], true);
}

#[test]
fn restore_with_another_major_version_is_refused() {
    let pg = PgCluster::start(PgOptions::new());
    let major = pg.major();
    let mut env = Env::new(&pg);
    env.run_ok(&["init"]);
    pg.psql("select pg_switch_wal()");
    // WAL for the backup comes from a one-off stream until the backup's end.
    let _stream = Streamer(env.cmd(&["stream"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    env.run_ok(&["backup"]);
    // Binaries of another major version: the system's 15, or 18 when testing 15.
    let other = if major == 15 { std::env::var("WALVAULT_TEST_OTHER_PG_BIN").ok() } else { Some("/usr/lib/postgresql/15/bin".into()) };
    let Some(other) = other.filter(|d| std::path::Path::new(d).join("postgres").exists()) else {
        // A fake `postgres` that reports another version is enough to prove the check.
        let dir = env.new_dir("fake-bin");
        let fake = dir.join("postgres");
        std::fs::write(&fake, format!("#!/bin/sh\necho 'postgres (PostgreSQL) {}.1'\n", if major == 16 { 17 } else { 16 })).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        return check_refused(&mut env, dir.to_str().unwrap(), major);
    };
    check_refused(&mut env, &other, major);
}

fn check_refused(env: &mut Env, bin_dir: &str, major: u32) {
    env.set("postgres.bin_dir", &format!("\"{bin_dir}\""));
    let dest = env.new_dir("wrong").join("data");
    let (code, err) = env.run_err(&["restore", "--pgdata", dest.to_str().unwrap(), "--target-immediate", "--replay"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains(&format!("the backup is PostgreSQL {major}")), "{err}");
    assert!(err.contains("hint: set postgres.bin_dir"), "{err}");
    assert!(!dest.exists() || std::fs::read_dir(&dest).unwrap().next().is_none(), "nothing was written");
}

/// The server's own backup manifest travels with the backup: a restored data
/// directory (before any replay) passes the same version's `pg_verifybackup`.
/// From 17 on the manifest is version 2 and names the system identifier, which
/// pg_verifybackup checks against the restored pg_control.
#[test]
fn restored_directory_passes_pg_verifybackup() {
    let pg = PgCluster::start(PgOptions::new());
    let major = pg.major();
    let env = Env::builder(&pg).set("wal.partial_interval", "\"1s\"").build();
    env.run_ok(&["init"]);
    let _stream = Streamer(env.cmd(&["stream"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    pg.psql("create table t as select g, md5(g::text) from generate_series(1, 20000) g");
    env.run_ok(&["backup"]);

    let dest = env.new_dir("plain").join("data");
    env.run_ok(&["restore", "--pgdata", dest.to_str().unwrap(), "--target-immediate"]);
    let manifest = std::fs::read_to_string(dest.join("backup_manifest")).expect("restore writes the server's backup_manifest");
    let version = if major >= 17 { 2 } else { 1 };
    assert!(manifest.contains(&format!("\"PostgreSQL-Backup-Manifest-Version\": {version}")), "PostgreSQL {major}: {}", &manifest[..200]);
    if major >= 17 {
        let sysid = pg.psql("select system_identifier from pg_control_system()");
        assert!(manifest.contains(&format!("\"System-Identifier\": {sysid}")), "the v2 manifest names the cluster");
    }
    // -n: the WAL is not in pg_wal (recovery fetches it from the repository).
    let out = pg.command(pg.bin("pg_verifybackup")).arg("-n").arg(&dest).output().unwrap();
    assert!(
        out.status.success(),
        "pg_verifybackup {major} on the restored directory: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// PostgreSQL 18 deprecates MD5 passwords (the server warns when one is set,
/// not yet at login): the client still authenticates with MD5 on every version,
/// and from 18 on walvault itself tells the operator to move to SCRAM.
#[test]
fn md5_login_works_and_the_deprecation_warning_is_shown() {
    let pg = PgCluster::start(PgOptions::new().hba("host all md5_user 127.0.0.1/32 md5").hba("host replication md5_user 127.0.0.1/32 md5"));
    let major = pg.major();
    pg.psql("SET password_encryption = 'md5'; CREATE ROLE md5_user LOGIN REPLICATION SUPERUSER PASSWORD 'md5-pw'");
    let conninfo = format!("host=127.0.0.1 port={} user=md5_user password=md5-pw dbname=postgres sslmode=disable", pg.port());
    let mut env = Env::new(&pg);
    env.set("postgres.conninfo", &format!("\"{conninfo}\""));
    let out = env.run(&["init"]);
    let err = common::env::stderr(&out);
    assert!(out.status.success(), "init over an MD5 login on PostgreSQL {major}: {err}");
    if major >= 18 {
        assert!(err.contains("deprecates MD5") && err.contains("scram-sha-256"), "the MD5 deprecation is shown: {err}");
    } else {
        assert!(!err.contains("deprecates MD5"), "no deprecation before 18: {err}");
    }
}

/// The archive module (pgext/), built for this server (its API differs
/// between 15 and 16+): PostgreSQL's archiver hands it segments, and each
/// arrives in the repository as PostgreSQL wrote it. Archive modules start
/// with PostgreSQL 15; older servers use archive_command.
#[test]
fn the_archive_module_archives_on_this_version() {
    let pg = PgCluster::start(PgOptions::new().guc("archive_mode", "on").guc("walvault.command", "'/bin/false'"));
    if pg.major() < 15 {
        eprintln!("PostgreSQL {} has no archive modules", pg.major());
        return;
    }
    let mut pg = pg;
    pg.set_guc_restart("archive_library", &common::pg::archive_module().display().to_string());
    let env = Env::new(&pg);
    env.run_ok(&["init"]);
    pg.set_guc("walvault.command", &env.archive_command().replace(" archive-push %p", ""));

    let mut names = Vec::new();
    for i in 0..3 {
        pg.psql(&format!("create table if not exists t(x int); insert into t select generate_series(1, 1000 * {})", i + 1));
        names.push(pg.psql("select pg_walfile_name(pg_current_wal_lsn())"));
        pg.psql("select pg_switch_wal()");
    }
    let last = names.last().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    while pg.psql("select coalesce(last_archived_wal, '') from pg_stat_archiver") < last {
        assert!(Instant::now() < deadline, "PostgreSQL {} did not archive {last} through the module:\n{}", pg.major(), pg.log_tail());
        std::thread::sleep(Duration::from_millis(200));
    }
    let got = env.new_dir("got");
    for name in &names {
        let dest = got.join(name);
        env.run_ok(&["archive-get", name, dest.to_str().unwrap()]);
        let wrote = std::fs::read(pg.data_dir().join("pg_wal").join(name)).unwrap();
        assert!(std::fs::read(&dest).unwrap() == wrote, "PostgreSQL {}: {name} differs from what it wrote", pg.major());
    }
    let log = std::fs::read_to_string(pg.log_file()).unwrap();
    assert!(log.contains("walvault: started the archive server (pid "), "{log}");
}
