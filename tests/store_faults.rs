//! Store faults through the built binary, on the S3 server: bursts of 503,
//! SlowDown, connection resets, timeouts and streams cut short
//! (`WALVAULT_TEST_FAULTS`, src/storage/faults.rs) in backup, archive-push,
//! archive-get and restore; a multipart upload whose completion fails; the
//! S3 server stopped in the middle of a backup and of archiving. Every
//! operation either succeeds after retries or fails cleanly with its state
//! intact, and no half-written object is ever taken for a good one.
//!
//! Each survived fault prints a `RELIABILITY fault ...` line that
//! scripts/reliability.sh counts.

mod common;
mod support;

use std::time::{Duration, Instant};

use common::env::{Env, stderr};
use common::pg::PgCluster;
use common::s3::S3Server;
use support::{MARKERS_DDL, MarkerWriter, assert_repository_sound, restore_and_keep};

fn survived(what: &str) {
    eprintln!("RELIABILITY fault {what} survived");
}

fn archiving() -> PgCluster {
    support::archiving_cluster(&[])
}

/// archive_command with faults injected into every call.
fn archive_command_with(env: &Env, faults: &str) -> String {
    format!("WALVAULT_TEST_FAULTS=\"{faults}\" WALVAULT_TEST_FAULTS_SEED=$$ {}", env.archive_command())
}

fn bucket_of(env: &Env) -> String {
    env.repo_url.trim_start_matches("s3://").split('/').next().unwrap().to_string()
}

/// Multipart uploads started under the repository and neither completed nor aborted.
fn open_multipart_uploads(s3: &S3Server, env: &Env) -> Vec<String> {
    let bucket = bucket_of(env);
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
                    let out = s3.client().list_multipart_uploads().bucket(&bucket).prefix("repo/").send().await.unwrap();
                    out.uploads().iter().filter_map(|u| u.key().map(str::to_string)).collect()
                })
            })
            .join()
            .unwrap()
    })
}

/// Whether the process still runs (its upload is then still open by design).
fn pack_completion_pending(child: &mut std::process::Child) -> bool {
    child.try_wait().unwrap().is_none()
}

#[test]
fn backup_archive_and_restore_ride_out_bursts_of_transient_faults() {
    let s3 = S3Server::shared();
    let pg = archiving();
    let mut env = Env::builder(&pg).s3(s3).set("backup.pack_size", "\"1MiB\"").set("repository.timeout", "\"3s\"").build();
    env.run_ok(&["init"]);
    // Every archive-push meets 503s, resets and SlowDowns, yet archiving goes on.
    pg.set_guc("archive_command", &archive_command_with(&env, "put_if_absent:p30:503;put:p30:slowdown;head:p20:reset;get:p20:reset"));
    pg.psql(MARKERS_DDL);
    pg.psql("create table noise as select g, md5(g::text) as t from generate_series(1, 100000) g");
    let markers = MarkerWriter::start(&pg.conninfo(), Duration::from_millis(20), None, 1, "m");

    // A backup through 503 bursts, SlowDowns, resets, a timeout and cut reads.
    env.set_env(
        "WALVAULT_TEST_FAULTS",
        "put:p25:503;put_if_absent:2-4:slowdown;upload_part:p25:reset;get:p25:cut=700;head:3:timeout;list:p20:503",
    );
    let id = env.run_ok(&["backup"]).trim().to_string();
    survived("backup under 503/SlowDown/reset/timeout/cut");
    env.set_env("WALVAULT_TEST_FAULTS", "");
    support::switch_and_wait_archived(&pg);
    survived("archive-push under 503/SlowDown/reset");
    markers.finish();
    support::switch_and_wait_archived(&pg);
    assert_repository_sound(&env, "a backup under faults");

    // archive-get: a store that resets every read is never taken for "not found"
    // (exit 1 would end recovery early) and leaves no partial file.
    let seg = pg.psql("select pg_walfile_name(pg_current_wal_lsn() - 1)");
    let dest = env.new_dir("get").join(&seg);
    let want = std::fs::read(pg.data_dir().join("pg_wal").join(&seg)).unwrap();
    env.set_env("WALVAULT_TEST_FAULTS", "get:*:reset");
    let out = env.cmd(&["archive-get", &seg, dest.to_str().unwrap()]).env("WALVAULT_REPOSITORY_RETRIES", "3").output().unwrap();
    let (code, err) = (out.status.code().unwrap_or(-1), stderr(&out));
    assert!(code >= 3, "a failing read is not 'not found': {code}\n{err}");
    assert!(!dest.exists(), "a failed read left {} behind", dest.display());
    assert!(err.contains(&seg) && err.contains("hint:"), "{err}");
    survived("archive-get with every read reset (clean failure)");
    // Every read cut short after 5000 bytes: the retry resumes where each
    // stopped, and the bytes are the segment's.
    env.set_env("WALVAULT_TEST_FAULTS", "get:*:cut=5000");
    env.run_ok(&["archive-get", &seg, dest.to_str().unwrap()]);
    assert_eq!(std::fs::read(&dest).unwrap(), want, "a resumed read is the whole segment");
    std::fs::remove_file(&dest).unwrap();
    survived("archive-get with every read cut short (resumed)");
    env.set_env("WALVAULT_TEST_FAULTS", "get:1-2:cut=5000;get:3:reset;head:1:503");
    env.run_ok(&["archive-get", &seg, dest.to_str().unwrap()]);
    assert_eq!(std::fs::read(&dest).unwrap(), want);
    survived("archive-get with cut reads, resets and a 503");

    // A restore with replay whose reads are cut and reset, into which recovery also fetches WAL.
    env.set_env("WALVAULT_TEST_FAULTS", "get:p20:cut=3000;get:p10:reset;head:p10:503");
    let dir = env.new_dir("restored").join("data");
    let mut replayed = restore_and_keep(&env, &pg, &dir, &["--backup", &id]);
    let got = replayed.psql(&pg, "select count(*) from markers");
    replayed.stop(&pg);
    assert_eq!(got, pg.psql("select count(*) from markers"), "every marker row is restored");
    survived("restore --replay under cut reads, resets and 503");
}

#[test]
fn a_failed_multipart_completion_leaves_no_backup_and_no_open_upload() {
    let s3 = S3Server::shared();
    let pg = archiving();
    let mut env = Env::builder(&pg).s3(s3).set("backup.pack_size", "\"20MiB\"").set("repository.retries", "3").build();
    env.run_ok(&["init"]);
    support::start_archiving(&pg, &env);
    // About 40 MB of hex text: packs of some 20 MB, uploaded in 8 MiB parts.
    pg.psql(
        "create table noise as select g, md5(g::text) || md5((g * 7)::text) || md5((g * 13)::text) as t from generate_series(1, 350000) g",
    );
    pg.psql("checkpoint");

    env.set_env("WALVAULT_TEST_FAULTS", "complete_multipart:*:503");
    let (code, err) = env.run_err(&["backup"]);
    assert!(code >= 3, "{err}");
    assert!(err.contains("complete") || err.contains("503") || err.contains("unavailable"), "says what failed: {err}");
    env.set_env("WALVAULT_TEST_FAULTS", "");
    assert_eq!(env.info_json()["backups"].as_array().unwrap().len(), 0, "a failed backup is not visible");
    let open = open_multipart_uploads(s3, &env);
    assert!(open.is_empty(), "the failed backup left multipart uploads open: {open:?}");
    survived("backup whose multipart completion fails (clean failure, uploads aborted)");

    // A backup killed while its completion hangs leaves an open upload; the
    // next backup aborts it when it starts (expire would wait a day).
    env.set_env("WALVAULT_TEST_FAULTS", "complete_multipart:*:hang");
    let mut doomed = env.cmd(&["backup"]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    while open_multipart_uploads(s3, &env).is_empty() || !pack_completion_pending(&mut doomed) {
        assert!(Instant::now() < deadline, "the backup never started a multipart upload");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    let left = open_multipart_uploads(s3, &env);
    assert!(!left.is_empty(), "a killed backup leaves its upload open");
    survived("backup killed with a multipart upload open");

    // A completion that fails once is retried.
    env.set_env("WALVAULT_TEST_FAULTS", "complete_multipart:1:503;upload_part:2:reset");
    let out = env.run(&["backup"]);
    env.set_env("WALVAULT_TEST_FAULTS", "");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("aborted a multipart upload left by an interrupted backup"),
        "the killed backup's upload is aborted by the next backup: {}",
        stderr(&out)
    );
    assert!(open_multipart_uploads(s3, &env).is_empty());
    assert_repository_sound(&env, "a multipart completion retried");
    survived("backup whose multipart completion fails once");
}

#[test]
fn the_store_stopped_mid_backup_and_mid_archiving_loses_nothing() {
    let mut s3 = S3Server::start();
    let pg = archiving();
    let mut env = Env::builder(&pg)
        .s3(&s3)
        .set("backup.pack_size", "\"1MiB\"")
        .set("repository.retries", "3")
        .set("repository.timeout", "\"5s\"")
        .build();
    env.run_ok(&["init"]);
    support::start_archiving(&pg, &env);
    pg.psql(MARKERS_DDL);
    pg.psql("create table noise as select g, md5(g::text) || md5((g * 7)::text) as t from generate_series(1, 200000) g");
    let markers = MarkerWriter::start(&pg.conninfo(), Duration::from_millis(20), None, 1, "m");

    // Slow puts so the outage lands in the middle of the backup.
    env.set_env("WALVAULT_TEST_FAULTS", "put:*:delay=200");
    let mut running = env.cmd(&["backup"]).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    s3.stop();
    // Archiving fails meanwhile: PostgreSQL keeps the segments.
    let during = pg.psql("select pg_walfile_name(pg_switch_wal())");
    let out = {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if running.try_wait().unwrap().is_some() {
                break running.wait_with_output().unwrap();
            }
            assert!(Instant::now() < deadline, "the backup did not give up while the store was down");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    env.set_env("WALVAULT_TEST_FAULTS", "");
    let err = stderr(&out);
    assert!(!out.status.success(), "the backup cannot succeed without its store: {err}");
    assert!(out.status.code().unwrap_or(0) >= 3 && err.contains("hint:"), "{err}");
    assert!(
        pg.psql(&format!("select coalesce(last_archived_wal, '') < '{during}' from pg_stat_archiver")) == "t",
        "nothing can be archived while the store is down"
    );
    survived("backup with the store stopped (clean failure)");

    s3.start_again();
    // Archiving resumes by itself; the next backup succeeds.
    support::wait_archived(&pg, &during);
    let id = env.run_ok(&["backup"]).trim().to_string();
    markers.finish();
    support::switch_and_wait_archived(&pg);
    assert_repository_sound(&env, "a store outage");
    survived("archive-push with the store stopped and started again");
    let dir = env.new_dir("restored").join("data");
    let mut replayed = restore_and_keep(&env, &pg, &dir, &["--backup", &id]);
    let got = replayed.psql(&pg, "select count(*) from markers");
    replayed.stop(&pg);
    assert_eq!(got, pg.psql("select count(*) from markers"));
    survived("restore after the outage");
}
