//! Targets restore cannot reach are refused before anything is written, with
//! a message naming the recoverable window or the missing WAL segment; times
//! are read as PostgreSQL reads them and printed back as an absolute instant
//! first; the data directory is protected (non-empty without --force, a
//! running server's directory always).

mod common;
mod support;

use std::path::Path;

use common::env::{Env, stderr, stdout};
use support::*;

/// Runs a restore that must be refused; returns stderr. The directory must be
/// left exactly as it was.
fn refused(env: &Env, dir: &Path, args: &[&str], code: i32, needles: &[&str]) -> String {
    let before = listing(dir);
    let mut all = vec!["restore", "--pgdata", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    let (got, err) = env.run_err(&all);
    assert_eq!(got, code, "{args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: the message names {n:?}: {err}");
    }
    assert!(err.contains("hint:"), "{err}");
    assert_eq!(listing(dir), before, "{args:?}: the directory must be untouched");
    err
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

fn seg_time(info: &serde_json::Value) -> (String, String) {
    let w = &info["recoverable_window"];
    (w["start_time"].as_str().unwrap().to_string(), w["end_time"].as_str().unwrap().to_string())
}

/// The RFC 3339 instant as restore prints it.
fn printed(rfc3339: &str) -> String {
    pg_time(parse_time_us(rfc3339))
}

#[test]
fn unreachable_targets_and_unsafe_directories_are_refused_before_anything_is_written() {
    let pg = archiving_cluster(&[]);
    let env = Env::new(&pg);
    env.run_ok(&["init"]);
    start_archiving(&pg, &env);
    pg.psql(MARKERS_DDL);
    let id = env.run_ok(&["backup"]).trim().to_string();
    let b = backup_json(&env, &id);
    for round in 0..3 {
        pg.psql(&format!("insert into markers select g, 'r{round}' from generate_series({0} * 1000 + 1, {0} * 1000 + 1000) g", round));
        switch_and_wait_archived(&pg);
    }
    let info = env.info_json();
    let (start, end) = seg_time(&info);
    let fresh = env.dir.join("fresh");

    // Before the first backup: the window is named.
    let before = pg_time(parse_time_us(b["start_time"].as_str().unwrap()) - 3_600_000_000);
    refused(&env, &fresh, &["--target-time", &before], 8, &["before the recoverable window", &printed(&start), &id]);
    // Inside the backup's own span (not yet consistent), by time and by LSN.
    let (s_us, e_us) = (parse_time_us(b["start_time"].as_str().unwrap()), parse_time_us(b["end_time"].as_str().unwrap()));
    let inside = pg_time((s_us + e_us) / 2);
    refused(&env, &fresh, &["--target-time", &inside], 8, &["inside backup", &id, "earliest reachable point", &printed(&start)]);
    refused(&env, &fresh, &["--target-lsn", b["start_lsn"].as_str().unwrap()], 8, &["inside backup", "earliest reachable point"]);
    // In the future; and after the end of the archived WAL.
    refused(
        &env,
        &fresh,
        &["--target-time", "2099-01-01 00:00:00 Europe/Paris"],
        8,
        &["2098-12-31 23:00:00.000000+00", "in the future", &printed(&start)],
    );
    refused(&env, &fresh, &["--target-lsn", "FF/0"], 8, &["after the end of the recoverable window", &printed(&end)]);
    assert!(!fresh.exists(), "no refusal created the directory");

    // Times without an offset are local (TZ), printed as an instant before anything else.
    let out = env
        .cmd(&["restore", "--pgdata", fresh.to_str().unwrap(), "--target-time", "2099-06-01 09:00"])
        .env("TZ", "Asia/Tokyo")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(8), "{err}");
    let shown = err.find("read in the local time zone (Asia/Tokyo): 2099-06-01 00:00:00.000000+00").unwrap_or_else(|| panic!("{err}"));
    assert!(shown < err.find("in the future").unwrap(), "the instant is printed before anything is done: {err}");
    // ... and written into the recovery settings as that instant.
    // Halfway between the backup's end and the window's end: reachable however
    // quickly the rounds above ran.
    let target_us = (e_us + parse_time_us(info["recoverable_window"]["end_time"].as_str().unwrap())) / 2;
    let local_target = {
        let t = target_us;
        chrono::DateTime::from_timestamp_micros(t)
            .unwrap()
            .with_timezone(&chrono_tz::Asia::Tokyo)
            .format("%Y-%m-%d %H:%M:%S%.6f")
            .to_string()
    };
    let dir = env.new_dir("local").join("data");
    let out =
        env.cmd(&["restore", "--pgdata", dir.to_str().unwrap(), "--target-time", &local_target]).env("TZ", "Asia/Tokyo").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let utc = pg_time(target_us);
    let auto = std::fs::read_to_string(dir.join("postgresql.auto.conf")).unwrap();
    assert!(auto.contains(&format!("recovery_target_time = '{utc}'")), "{auto}");

    // A non-empty directory: refused without --force, even for a target that is
    // refused anyway; with --force, only once the target is known to be reachable.
    let used = env.new_dir("used");
    std::fs::write(used.join("keep.txt"), "precious").unwrap();
    refused(&env, &used, &[], 3, &["not empty", "--force"]);
    refused(&env, &used, &["--force", "--target-time", &before], 8, &["before the recoverable window"]);
    let out = env.run_ok(&["restore", "--pgdata", used.to_str().unwrap(), "--force"]);
    assert!(out.contains(used.to_str().unwrap()), "{out}");
    assert!(!used.join("keep.txt").exists() && used.join("PG_VERSION").exists(), "--force replaced the contents");
    // A running server's directory: never, --force or not.
    refused(&env, pg.data_dir(), &["--force"], 3, &["running PostgreSQL server", &pg.pid().unwrap().to_string()]);

    // A WAL segment deleted from the repository: targets beyond it are refused
    // naming it; targets before it are fine.
    let wal = env.repo_dir.as_ref().unwrap().join("wal");
    let mut segments: Vec<std::path::PathBuf> = std::fs::read_dir(wal.join("0000000100000000"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().len() == 24)
        .collect();
    segments.sort();
    let last_needed = b["wal_last"].as_str().unwrap();
    let victim = segments.iter().find(|p| p.file_name().unwrap().to_str().unwrap() > last_needed).unwrap().clone();
    let victim_name = victim.file_name().unwrap().to_string_lossy().into_owned();
    let first_after: String = pg.psql("select min(pg_xact_commit_timestamp(xmin))::text from markers where note = 'r2'");
    std::fs::remove_file(&victim).unwrap();
    refused(&env, &fresh, &[], 8, &[&victim_name, "missing"]);
    refused(&env, &fresh, &["--target-time", &first_after], 8, &[&victim_name, "missing"]);
    let info = env.info_json();
    let gaps = &info["timelines"][0]["gaps"];
    assert_eq!(gaps[0]["first"], victim_name.as_str(), "info shows the gap: {info}");
    let dir = env.new_dir("before_gap").join("data");
    let out = env.cmd(&["restore", "--pgdata", dir.to_str().unwrap(), "--target-immediate"]).output().unwrap();
    assert!(out.status.success(), "a target before the gap is still reachable: {}\n{}", stdout(&out), stderr(&out));
}
