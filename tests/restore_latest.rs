//! Restore to latest after losing the primary: the WAL streamer uploads the
//! segment in progress every `wal.partial_interval` (1 s here), PostgreSQL and
//! the streamer are both killed (-9) while markers are being committed, and
//! the restore must replay everything the repository holds, the streamed copy
//! of the unfinished segment included: every marker whose commit record lies
//! in the stored WAL, hence every marker committed more than the partial
//! interval before the crash.

mod common;
mod support;

use std::time::{Duration, Instant};

use common::env::Env;
use common::pg::{PgCluster, PgOptions};
use support::*;

#[test]
fn latest_after_the_primary_died_loses_nothing_older_than_the_partial_interval() {
    let mut pg = PgCluster::start(PgOptions::new().guc("track_commit_timestamp", "on").guc("wal_keep_size", "'1GB'"));
    let env = Env::builder(&pg).set("wal.partial_interval", "\"1s\"").build();
    env.run_ok(&["init"]);
    let mut streamer =
        Background(Some(env.cmd(&["stream"]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap()));
    pg.psql(MARKERS_DDL);
    let backup = env.run_ok(&["backup"]).trim().to_string();
    let writer = MarkerWriter::start(&pg.conninfo(), Duration::from_millis(10), None, 1, "m");
    std::thread::sleep(Duration::from_secs(5));

    // The host dies: the database and the agent at the same moment.
    let crash_us = chrono::Utc::now().timestamp_micros();
    unsafe { libc::kill(streamer.0.as_ref().unwrap().id() as i32, libc::SIGKILL) };
    pg.kill9();
    streamer.stop();
    writer.finish_after_crash();

    // What the repository holds: complete segments and the streamed copy.
    let info = env.info_json();
    let tl = info["timelines"].as_array().unwrap().iter().find(|t| t["timeline"] == 1).unwrap().clone();
    let stored_end = match &tl["in_progress"] {
        serde_json::Value::Null => panic!("expected a streamed copy of the unfinished segment: {tl}"),
        p => {
            let seg = p["segment"].as_str().unwrap();
            let segno = u64::from_str_radix(&seg[8..16], 16).unwrap() * 0x100 + u64::from_str_radix(&seg[16..24], 16).unwrap();
            segno * 16 * 1024 * 1024 + p["valid_bytes"].as_u64().unwrap()
        }
    };

    // The source's own account, after its crash recovery.
    pg.start_again();
    let markers = markers(&pg);
    let start_lsn = backup_json(&env, &backup)["start_lsn"].as_str().unwrap().to_string();
    let end = pg.psql("select pg_current_wal_lsn()");
    let commits = commit_records(&pg, &start_lsn, &end);
    let stored: Vec<&Marker> = markers.iter().filter(|m| commits[&m.xid].1 <= stored_end).collect();
    let expect = stored.last().map(|m| m.id).unwrap_or(0);

    let started = Instant::now();
    let dir = env.new_dir("restored").join("data");
    let mut r = restore_and_keep(&env, &pg, &dir, &[]);
    let got = r.psql(&pg, MARKERS_SUMMARY);
    r.stop(&pg);
    let lost_us = markers.iter().find(|m| m.id == expect + 1).map(|m| crash_us - m.commit_us).unwrap_or(0);
    eprintln!(
        "{} markers committed before the crash; the repository held WAL to {stored_end:X}, i.e. markers 1..={expect}; restored: {got} in {:?}; the first marker lost committed {:.3} s before the crash",
        markers.len(),
        started.elapsed(),
        lost_us as f64 / 1e6
    );
    assert_eq!(got, format!("{expect} {expect} m"), "restore to latest replays all the stored WAL: {}", r.stderr);
    // The streamer's side (its own tests are stricter): the copy is uploaded
    // every second, and an upload takes a moment on a busy machine.
    for m in &markers {
        if m.commit_us < crash_us - 1_500_000 {
            assert!(m.id <= expect, "marker {} committed {:.3} s before the crash is lost", m.id, (crash_us - m.commit_us) as f64 / 1e6);
        }
    }
}
