//! `walvault daemon` end to end against real clusters: scheduled backups under
//! load with retention, /metrics and /healthz against `info --json`, SIGHUP,
//! SIGTERM in the middle of a backup, and alerts for a failing backup.

mod common;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, assert_no_orphans, list_files, pgbench, signed_body};
use common::env::Env;
use common::pg::{PgCluster, PgOptions};

/// A timestamp from info --json, as Unix seconds with milliseconds (the metrics' precision).
fn unix(v: &serde_json::Value) -> f64 {
    let t: chrono::DateTime<chrono::Utc> = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{v} is not a timestamp: {e}"));
    t.timestamp_millis() as f64 / 1000.0
}

fn run_ok(cmd: &mut std::process::Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// The WAL position the server has written, in bytes.
fn current_wal_bytes(pg: &PgCluster) -> f64 {
    pg.psql("select pg_current_wal_lsn() - '0/0'::pg_lsn").parse().unwrap()
}

/// After SIGHUP the daemon re-reads the repository; returns info --json and
/// /metrics once both describe the same repository (the streamer may still
/// replace its copy of the segment in progress between two reads).
fn info_and_metrics(env: &Env, daemon: &Daemon) -> (serde_json::Value, std::collections::BTreeMap<String, f64>) {
    for _ in 0..10 {
        let before = daemon.metric("repository_refresh_timestamp_seconds");
        daemon.signal(libc::SIGHUP);
        daemon.wait_for("a repository refresh", Duration::from_secs(60), || daemon.metric("repository_refresh_timestamp_seconds") > before);
        let metrics = daemon.metrics();
        let info = env.info_json();
        if Some(metrics["walvault_repository_size_bytes"]) == info["repository"]["size_bytes"].as_f64() {
            return (info, metrics);
        }
    }
    panic!("info --json and /metrics never agreed on the repository's size");
}

#[test]
fn scheduled_backups_under_load_keep_two_with_no_gap_and_metrics_match_info() {
    let pg = PgCluster::start(PgOptions::new().guc("autovacuum", "off"));
    let mut env = Env::builder(&pg)
        .set("schedule.base_backup", "\"*/20 * * * * *\"")
        .set("retention.full_backups", "2")
        .set("wal.partial_interval", "\"1s\"")
        .build();
    env.run_ok(&["init"]);
    run_ok(&mut pgbench(&pg, &["-i", "-s", "2", "-q"]));
    let daemon = Daemon::start(&mut env);
    let started = Instant::now();
    let mut load = pgbench(&pg, &["-n", "-c", "2", "-T", "60"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();

    // `check` passes with WAL delivered by the daemon's streaming (no archive_command).
    let out = env.run(&["check", "--wait", "90s"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("ok    archive_mode: off (WAL reaches the repository by streaming"), "{text}");
    assert!(text.contains("ok    WAL delivery: switched WAL; "), "{text}");
    assert!(text.ends_with("all checks passed\n"), "{text}");

    // The first backup at start, then one every 20 s: at least two more.
    daemon.wait_for("three completed backups", Duration::from_secs(180), || daemon.metric("backups_completed_total") >= 3.0);
    let status = load.wait().unwrap();
    assert!(status.success(), "pgbench failed: {:?}", load.stderr.take().map(std::io::read_to_string));
    eprintln!("load ran for {:?}; the daemon completed {} backups", started.elapsed(), daemon.metric("backups_completed_total"));

    // SIGHUP reloads the configuration: no more scheduled backups.
    env.set("schedule.base_backup", "\"0 0 3 1 1 *\"");
    daemon.signal(libc::SIGHUP);
    daemon.wait_for("the new schedule", Duration::from_secs(30), || daemon.log_text().contains("schedule=0 0 3 1 1 *"));
    daemon.wait_for("the last backup and its retention", Duration::from_secs(120), || {
        let m = daemon.metrics();
        m["walvault_backup_running"] == 0.0 && m["walvault_retention_running"] == 0.0
    });
    let written = current_wal_bytes(&pg);
    daemon.wait_for("all WAL stored", Duration::from_secs(60), || daemon.metric("wal_stored_lsn_bytes") >= written);

    let (info, m) = info_and_metrics(&env, &daemon);
    let backups = info["backups"].as_array().unwrap();
    // Retention: exactly the two newest backups.
    assert_eq!(backups.len(), 2, "{info:#}");
    assert!(daemon.metric("backups_completed_total") >= 3.0);
    assert_eq!(m["walvault_repository_backups"], 2.0);
    assert_eq!(m["walvault_repository_objects"], info["repository"]["objects"]["total"].as_f64().unwrap());
    let newest_end = backups.iter().map(|b| unix(&b["end_time"])).fold(0.0, f64::max);
    assert!((m["walvault_backup_last_success_timestamp_seconds"] - newest_end).abs() < 0.0015, "{m:?} vs {newest_end}");
    let window = &info["recoverable_window"];
    assert!((m["walvault_recoverable_window_start_timestamp_seconds"] - unix(&window["start_time"])).abs() < 0.0015, "{window}");
    assert!((m["walvault_recoverable_window_end_timestamp_seconds"] - unix(&window["end_time"])).abs() < 0.0015, "{window}");
    assert_eq!(m["walvault_repository_wal_gaps"], 0.0);
    assert_eq!(m["walvault_streaming_connected"], 1.0);
    let (status, health) = daemon.health();
    assert_eq!((status, &health), (200, &serde_json::json!({"healthy": true, "problems": []})));
    assert_eq!(m["walvault_healthy"], 1.0);

    // No WAL gap: one unbroken run of segments from the oldest kept backup's first segment.
    let timelines = info["timelines"].as_array().unwrap();
    assert_eq!(timelines.len(), 1, "{info:#}");
    assert_eq!(timelines[0]["gaps"], serde_json::json!([]));
    let ranges = timelines[0]["wal_ranges"].as_array().unwrap();
    assert_eq!(ranges.len(), 1, "{ranges:?}");
    assert_eq!(ranges[0]["first"], backups[0]["wal_first"]);
    assert!(backups.iter().all(|b| b["restorable"] == true), "{backups:?}");
    assert_eq!(window["backup_id"], backups[0]["id"]);

    // The store holds nothing else: no orphaned packs or WAL, no incomplete backup.
    let kept: Vec<String> = backups.iter().map(|b| b["id"].as_str().unwrap().to_string()).collect();
    assert_no_orphans(env.repo_dir.as_ref().unwrap(), &kept);

    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
    env.run_ok(&["verify"]);
}

#[test]
fn sigterm_during_a_backup_exits_cleanly_and_the_next_run_reuses_its_packs() {
    let pg = PgCluster::start(PgOptions::new());
    let mut env = Env::builder(&pg)
        .set("schedule.base_backup", "\"0 0 3 1 1 *\"")
        .set("backup.pack_size", "\"1MiB\"")
        .set("wal.partial_interval", "\"1s\"")
        .build();
    env.run_ok(&["init"]);
    // Hex digits compress about 2:1: some 20 MiB of packs.
    pg.psql("create table noise as select g, md5(random()::text) || md5(random()::text) as a, md5(random()::text) as b from generate_series(1, 300000) g");
    let repo = env.repo_dir.clone().unwrap();

    // Every put takes 2 s, so the first backup (taken at start: the repository
    // has none) is still uploading packs when SIGTERM arrives.
    let daemon = Daemon::start_with(&mut env, &[("WALVAULT_TEST_FAULTS", "put:*:delay=2000")]);
    daemon.wait_for("a stored pack", Duration::from_secs(180), || list_files(&repo).iter().any(|f| f.ends_with(".idx")));
    assert_eq!(daemon.metric("backup_running"), 1.0);
    let log = daemon.log.clone();
    let (status, took) = daemon.stop();
    let log = std::fs::read_to_string(log).unwrap();
    assert!(status.success(), "{status}\n{log}");
    // The bar for a service manager's stop timeout.
    assert!(took < Duration::from_secs(10), "stopping took {took:?}\n{log}");
    assert!(log.contains("backup abandoned for shutdown"), "{log}");

    let files = list_files(&repo);
    assert!(!files.iter().any(|f| f.starts_with("backups/") && f.ends_with("/manifest.json")), "a manifest was written: {files:?}");
    assert!(!files.iter().any(|f| f.starts_with("locks/")), "the lock was not released: {files:?}");
    // Packs are stored as they fill; nothing under backups/ is written before
    // the backup's data is all stored, and the manifest comes last.
    let info = env.info_json();
    assert_eq!(info["backups"], serde_json::json!([]));
    assert_eq!(info["recoverable_window"], serde_json::Value::Null);
    let interrupted: BTreeSet<String> =
        files.iter().filter(|f| f.ends_with(".idx")).map(|f| f.rsplit('/').next().unwrap().trim_end_matches(".idx").to_string()).collect();

    // The next run takes the lock and completes a backup that uses those packs.
    let daemon = Daemon::start(&mut env);
    daemon.wait_for("a completed backup", Duration::from_secs(180), || daemon.metric("backups_completed_total") >= 1.0);
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
    let info = env.info_json();
    let backups = info["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 1, "{info:#}");
    let id = backups[0]["id"].as_str().unwrap();
    let manifest = signed_body(&std::fs::read(repo.join(format!("backups/{id}/manifest.json"))).unwrap());
    let used: BTreeSet<String> = manifest["packs"].as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap().to_string()).collect();
    let reused = used.intersection(&interrupted).count();
    assert!(reused > 0, "the completed backup uses none of the {} packs the interrupted one stored", interrupted.len());
    assert!(backups[0]["new_bytes"].as_u64() < backups[0]["repository_bytes"].as_u64(), "{:#}", backups[0]);
    eprintln!("the completed backup re-used {reused} of the {} packs the interrupted one stored", interrupted.len());
}

#[test]
fn a_failing_scheduled_backup_raises_an_alert_and_turns_health_red() {
    // One WAL sender: the daemon's streamer takes it, so its backups cannot connect.
    let pg =
        PgCluster::start(PgOptions::new().guc("max_wal_senders", "1").guc("archive_mode", "on").guc("archive_command", "'/bin/false'"));
    let mut env = Env::builder(&pg).set("wal.partial_interval", "\"1s\"").build();
    env.run_ok(&["init"]);
    pg.set_guc("archive_command", &env.archive_command());
    env.run_ok(&["backup", "--label", "before the daemon"]);
    let alerts = env.dir.join("alerts.jsonl");
    env.set("alerts.command", &format!("\"cat >> {}\"", alerts.display()));
    // A daily schedule whose run comes 15 s from now: the backup just taken is
    // newer than the schedule's previous run, so the daemon does not catch up at start.
    let fire = chrono::Utc::now() + chrono::Duration::seconds(15);
    env.set("schedule.base_backup", &format!("\"{}\"", fire.format("%-S %-M %-H * * *")));
    let daemon = Daemon::start(&mut env);
    daemon.wait_for("a healthy daemon before the scheduled run", Duration::from_secs(14), || daemon.health().0 == 200);

    daemon.wait_for("the backup_failed alert", Duration::from_secs(120), || {
        std::fs::read_to_string(&alerts).unwrap_or_default().contains("\"backup_failed\"")
    });
    let text = std::fs::read_to_string(&alerts).unwrap();
    let event: serde_json::Value =
        text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).find(|e| e["event"] == "backup_failed").unwrap();
    assert_eq!(event["walvault_event"], 1);
    assert_eq!(event["repository"], env.repo_url.as_str());
    assert_eq!(event["details"]["reason"], "scheduled");
    assert!(event["message"].as_str().unwrap().contains("max_wal_senders"), "{event}");
    assert!(event["host"].as_str().is_some_and(|h| !h.is_empty()), "{event}");
    unix(&event["time"]);

    assert_eq!(daemon.metrics()["walvault_failures_total{kind=\"backup\"}"], 1.0);
    assert!(daemon.metric("backup_last_failure_timestamp_seconds") > 0.0);
    let (status, health) = daemon.health();
    assert_eq!(status, 503, "{health}");
    let problems = health["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{health}");
    let problem = problems[0].as_str().unwrap();
    assert!(problem.starts_with("the newest backup ended at ") && problem.contains("; the last attempt failed at "), "{problem}");
    let (status, _) = daemon.stop();
    assert!(status.success());
}
