//! PostgreSQL faults around walvault: the server restarted in the middle of a
//! base backup (the backup fails clearly and is not recorded; the next one
//! works), WAL removed before the streamer stored it (the daemon says a
//! new backup is needed and takes one), and the slot dropped while the daemon
//! streams through it (recreated, no gap), and a standby promoted while it is
//! being backed up (the backup fails clearly and is not recorded; the next
//! one, of the new primary, works), and pg_wal filling up while the store is
//! down (the server stops; once there is room again and the store is back, the
//! daemon catches up and a restore has every committed row). A server
//! restarted mid-stream and a
//! promotion while streaming are in tests/wal_stream.rs.

mod common;
mod support;
mod wal_support;

use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::env::{Env, stderr};
use common::pg::{PgCluster, PgOptions};
use common::s3::S3Server;
use common::tmpfs::Tmpfs;

fn survived(what: &str) {
    eprintln!("RELIABILITY fault {what} survived");
}

fn pack_indexes(env: &Env) -> usize {
    let packs = env.repo_dir.as_ref().unwrap().join("packs");
    std::fs::read_dir(&packs)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .filter(|f| f.path().extension().is_some_and(|e| e == "idx"))
        .count()
}

#[test]
fn a_server_restart_mid_backup_fails_the_backup_clearly_and_records_nothing() {
    let mut pg =
        PgCluster::start(PgOptions::new().guc("archive_mode", "on").guc("archive_command", "'/bin/false'").guc("wal_keep_size", "'512MB'"));
    let mut env = Env::builder(&pg).set("backup.pack_size", "\"1MiB\"").build();
    env.run_ok(&["init"]);
    pg.set_guc("archive_command", &env.archive_command());
    pg.psql("create table noise as select g, md5(g::text) || md5((g * 7)::text) as t from generate_series(1, 300000) g");
    // Slow uploads hold the backup's stream back, so the restart lands inside it.
    env.set_env("WALVAULT_TEST_FAULTS", "put:*:delay=400");
    let running = env.cmd(&["backup"]).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while pack_indexes(&env) < 2 {
        assert!(Instant::now() < deadline, "no pack was uploaded");
        std::thread::sleep(Duration::from_millis(50));
    }
    pg.restart();
    let out = running.wait_with_output().unwrap();
    env.set_env("WALVAULT_TEST_FAULTS", "");
    let err = stderr(&out);
    assert!(!out.status.success(), "a backup whose server restarted under it cannot succeed: {err}");
    assert!(out.status.code().unwrap_or(0) >= 3, "{err}");
    assert!(err.contains("error:") && err.contains("hint:"), "says what failed and what to do: {err}");
    assert_eq!(env.info_json()["backups"].as_array().unwrap().len(), 0, "nothing recorded");
    survived("server restarted mid-backup (clean failure)");

    let id = env.run_ok(&["backup"]).trim().to_string();
    let info = env.info_json();
    assert_eq!(info["backups"][0]["id"], id.as_str());
    assert_eq!(info["backups"][0]["restorable"], true, "{info}");
    let out = env.run(&["verify", "--deep"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn wal_removed_before_it_was_streamed_makes_the_daemon_take_a_new_backup() {
    let pg = PgCluster::start(
        PgOptions::new().initdb_arg("--wal-segsize=1").guc("wal_keep_size", "0").guc("max_wal_size", "'32MB'").guc("min_wal_size", "'2MB'"),
    );
    let mut env = Env::builder(&pg).set("schedule.base_backup", "\"0 0 3 1 1 *\"").set("wal.partial_interval", "\"1s\"").build();
    env.run_ok(&["init"]);
    pg.psql("create table t(id int, pad text)");
    let daemon = Daemon::start(&mut env);
    daemon.wait_for("a healthy daemon (first backup taken, streaming)", Duration::from_secs(180), || daemon.health().0 == 200);
    let first = env.info_json()["backups"].as_array().unwrap().len();
    assert_eq!(first, 1);
    daemon.stop();

    // While nobody streams, the slot goes and the server recycles the WAL.
    pg.psql("select pg_drop_replication_slot('walvault')");
    for _ in 0..4 {
        pg.psql("insert into t select g, repeat('x', 500) from generate_series(1, 20000) g");
        pg.psql("select pg_switch_wal()");
        pg.psql("checkpoint");
    }

    let daemon = Daemon::start(&mut env);
    daemon.wait_for("the daemon to say a new backup is needed", Duration::from_secs(120), || {
        daemon.log_text().contains("a new base backup is needed")
    });
    daemon.wait_for("a second backup, taken after the gap", Duration::from_secs(180), || {
        env.info_json()["backups"].as_array().is_some_and(|b| b.len() == 2)
    });
    let info = env.info_json();
    assert_eq!(info["backups"][1]["restorable"], true, "{info}");
    daemon.stop();
    survived("WAL removed before it was streamed (new backup taken)");
}

/// An operator drops the slot while the daemon streams through it (terminating
/// the walsender first: an active slot cannot be dropped). The daemon
/// reconnects, creates the slot again and carries on from the repository's
/// position, which the server still has: no gap, nothing lost, the backup
/// still restorable.
#[test]
fn the_slot_dropped_while_streaming_is_recreated_without_a_gap() {
    let pg = PgCluster::start(PgOptions::new().initdb_arg("--wal-segsize=1"));
    let mut env = Env::builder(&pg).set("schedule.base_backup", "\"0 0 3 1 1 *\"").set("wal.partial_interval", "\"1s\"").build();
    env.run_ok(&["init"]);
    pg.psql("create table t(id int, pad text)");
    let daemon = Daemon::start(&mut env);
    daemon.wait_for("a healthy daemon (first backup taken, streaming)", Duration::from_secs(180), || daemon.health().0 == 200);
    pg.psql("insert into t select g, repeat('a', 300) from generate_series(1, 5000) g");

    // The daemon reconnects within a second: terminate and drop until the drop wins.
    let dropped = (0..200).any(|_| {
        pg.psql(
            "select pg_terminate_backend(active_pid) from pg_replication_slots where slot_name = 'walvault' and active_pid is not null",
        );
        let r = pg.try_psql("select pg_drop_replication_slot('walvault')");
        if r.is_err() {
            std::thread::sleep(Duration::from_millis(20));
        }
        r.is_ok()
    });
    assert!(dropped, "could not drop the slot while the daemon reconnects");
    pg.psql("insert into t select g, repeat('b', 300) from generate_series(5001, 10000) g");
    daemon.wait_for("the slot created again and in use", Duration::from_secs(60), || {
        pg.psql("select count(*) from pg_replication_slots where slot_name = 'walvault' and active") == "1"
    });
    pg.psql("select pg_switch_wal()");
    let last = pg.psql("select pg_walfile_name(pg_current_wal_lsn() - 1)");
    let stored = env.repo_dir.as_ref().unwrap().join("wal").join(&last[..16]).join(&last);
    daemon.wait_for("the last segment stored", Duration::from_secs(60), || stored.exists());
    assert!(daemon.log_text().matches("created replication slot").count() >= 2, "{}", daemon.log_text());
    daemon.stop();
    let info = env.info_json();
    for tl in info["timelines"].as_array().unwrap() {
        assert_eq!(tl["gaps"].as_array().map(|g| g.len()), Some(0), "{info}");
    }
    assert_eq!(info["backups"][0]["restorable"], true, "{info}");
    let out = env.run(&["verify"]);
    assert!(out.status.success(), "{}", stderr(&out));
    survived("the slot dropped while streaming (recreated, no gap)");
}

#[test]
fn a_standby_promoted_during_its_backup_fails_the_backup_and_records_nothing() {
    let primary = PgCluster::start(PgOptions::new().guc("autovacuum", "off"));
    primary.psql("create table noise as select g, md5(g::text) || md5((g * 7)::text) as t from generate_series(1, 300000) g");
    let mut env = Env::builder(&primary).build();
    let standby =
        wal_support::start_standby(&primary, &env, "standby", &[("archive_mode", "on"), ("archive_command", &env.archive_command())]);
    env.set("postgres.conninfo", &format!("\"{}\"", standby.conninfo()));
    // Some 40 MB at 4 MiB/s: the promotion lands well inside the backup.
    env.set("backup.max_rate", "\"4MiB\"");
    env.set("backup.pack_size", "\"1MiB\"");
    env.run_ok(&["init"]);
    let started = Instant::now();
    let running = env.cmd(&["backup"]).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while pack_indexes(&env) < 1 {
        assert!(Instant::now() < deadline, "no pack was uploaded");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(standby.psql("select pg_promote()"), "t");
    let out = running.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(!out.status.success(), "a backup of a standby promoted under it cannot succeed: {err}");
    assert!(err.contains("promoted during online backup"), "names the cause: {err}");
    assert!(err.contains("hint:"), "says what to do: {err}");
    assert!(started.elapsed() > Duration::from_secs(5), "the rate limit held the backup back ({:?})", started.elapsed());
    assert_eq!(env.info_json()["backups"].as_array().unwrap().len(), 0, "nothing recorded");
    survived("standby promoted mid-backup (clean failure)");

    // The promoted standby is a primary now, archiving to the repository.
    env.set("backup.max_rate", "\"0\"");
    let id = env.run_ok(&["backup"]).trim().to_string();
    let info = env.info_json();
    assert_eq!(info["backups"][0]["id"], id.as_str());
    assert_eq!(info["backups"][0]["restorable"], true, "{info}");
    assert_eq!(info["backups"][0]["timeline"], 2, "{info}");
    let out = env.run(&["verify", "--deep"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_full_pg_wal_stops_the_server_and_once_there_is_room_nothing_committed_is_lost() {
    let mut s3 = S3Server::start();
    let mount = tempfile::Builder::new().prefix("walvault-test-pgwal-").tempdir_in("/tmp").unwrap();
    // Ten segments: the slot holds on to WAL while the store is down, so this fills.
    let disk = Tmpfs::mount(mount.path(), "160m");
    let waldir = disk.path().join("pg_wal");
    let mut pg = PgCluster::start(
        PgOptions::new()
            .initdb_arg(&format!("--waldir={}", waldir.display()))
            .guc("autovacuum", "off")
            .guc("min_wal_size", "'32MB'")
            .guc("max_wal_size", "'64MB'"),
    );
    let mut env = Env::builder(&pg).s3(&s3).set("schedule.base_backup", "\"0 0 3 1 1 *\"").set("wal.partial_interval", "\"1s\"").build();
    env.run_ok(&["init"]);
    pg.psql(support::MARKERS_DDL);
    pg.psql("create table bulk(id int, pad text)");
    let daemon = Daemon::start(&mut env);
    daemon.wait_for("a healthy daemon (first backup taken, streaming)", Duration::from_secs(180), || daemon.health().0 == 200);

    s3.stop();
    // Each round commits some 5 MB of rows and then its marker, in one transaction.
    let mut committed = 0;
    let mut failure = String::new();
    for round in 1..=200 {
        match pg.try_psql(&format!(
            "insert into bulk select g, repeat('x', 1000) from generate_series(1, 5000) g; insert into markers(id) values ({round})"
        )) {
            Ok(_) => committed = round,
            Err(e) => {
                failure = e;
                break;
            }
        }
    }
    assert!(!failure.is_empty(), "pg_wal never filled ({committed} rounds committed)");
    // PostgreSQL PANICs; its crash recovery may need WAL space too. Either way it goes down.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pg.exited() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    pg.stop();
    let log = std::fs::read_to_string(pg.log_file()).unwrap();
    assert!(log.contains("No space left on device"), "the server stopped for lack of space in pg_wal: {failure}\n{}", pg.log_tail());
    eprintln!("pg_wal full after {committed} committed rounds: {failure}");
    daemon.wait_for("/healthz to say streaming is down", Duration::from_secs(60), || {
        let (status, health) = daemon.health();
        status == 503 && health["problems"].to_string().contains("WAL streaming is not connected")
    });
    assert!(!daemon.exited(), "the daemon rides out the server's absence");
    survived("pg_wal full while the store was down (server stopped, daemon kept running)");

    // The operator makes room and brings the store back; the server recovers.
    s3.start_again();
    disk.resize("1g");
    pg.start_again();
    let source = pg.psql(support::MARKERS_SUMMARY);
    let count: i64 = source.split(' ').next().unwrap().parse().unwrap();
    assert!(count == committed || count == committed + 1, "the source has every committed marker: {source} ({committed} committed)");
    daemon.wait_for("/healthz to turn healthy again", Duration::from_secs(240), || daemon.health().0 == 200);
    let switched = pg.psql("select pg_walfile_name(pg_switch_wal())");
    daemon.wait_for("the switched segment in the repository", Duration::from_secs(120), || {
        let info = env.info_json();
        info["timelines"][0]["wal_ranges"].as_array().and_then(|r| r.last()).is_some_and(|r| r["last"].as_str() >= Some(switched.as_str()))
    });
    let info = env.info_json();
    assert_eq!(info["timelines"][0]["gaps"], serde_json::json!([]), "{info:#}");
    assert_eq!(info["timelines"][0]["wal_ranges"].as_array().unwrap().len(), 1, "{info:#}");

    let dir = env.new_dir("restored").join("data");
    let mut r = support::restore_and_keep(&env, &pg, &dir, &[]);
    let restored = r.psql(&pg, support::MARKERS_SUMMARY);
    r.stop(&pg);
    assert_eq!(restored, source, "a restore to latest has every committed marker: {}", r.stderr);
    let (status, _) = daemon.stop();
    assert!(status.success());
}
