//! The daemon rides out a store outage: its own S3 server is stopped for 30 s
//! while PostgreSQL keeps writing; /healthz turns 503 in between, the WAL lag
//! alert fires, the slot's retained WAL is reported, and after the store comes
//! back the daemon catches up by itself with no gap in the WAL.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, pgbench};
use common::env::Env;
use common::pg::{PgCluster, PgOptions};
use common::s3::S3Server;

#[test]
fn a_store_outage_turns_health_red_and_streaming_recovers_without_a_gap() {
    let mut s3 = S3Server::start();
    let pg = PgCluster::start(PgOptions::new().guc("autovacuum", "off"));
    let mut env = Env::builder(&pg)
        .s3(&s3)
        .set("schedule.base_backup", "\"0 0 3 1 1 *\"")
        .set("wal.partial_interval", "\"1s\"")
        .set("alerts.wal_lag", "\"10s\"")
        // Above what the slot holds while the streamer catches up at start (some 20 MiB).
        .set("daemon.slot_warn_bytes", "\"32MiB\"")
        .build();
    let alerts = env.dir.join("alerts.jsonl");
    env.set("alerts.command", &format!("\"cat >> {}\"", alerts.display()));
    env.run_ok(&["init"]);
    let out = pgbench(&pg, &["-i", "-s", "1", "-q"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    pg.psql("create table bulk(id int, pad text)");

    let daemon = Daemon::start(&mut env);
    daemon.wait_for("a healthy daemon (first backup taken, streaming)", Duration::from_secs(180), || daemon.health().0 == 200);
    let mut load = pgbench(&pg, &["-n", "-c", "1", "-R", "50", "-T", "300"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();

    s3.stop();
    let stopped = Instant::now();
    // More than two segments of WAL the streamer cannot store meanwhile.
    pg.psql("insert into bulk select g, repeat('x', 1000) from generate_series(1, 40000) g");
    daemon.wait_for("/healthz to turn unhealthy", Duration::from_secs(60), || daemon.health().0 == 503);
    let (_, health) = daemon.health();
    eprintln!("unhealthy after {:?}: {health}", stopped.elapsed());
    // The slot keeps what the repository does not have yet; the daemon says so.
    daemon.wait_for("the retained WAL warning", Duration::from_secs(60), || daemon.log_text().contains("makes the server keep"));
    assert!(daemon.metric("slot_retained_bytes") >= (32 << 20) as f64);
    if let Some(rest) = Duration::from_secs(30).checked_sub(stopped.elapsed()) {
        std::thread::sleep(rest);
    }
    let (status, health) = daemon.health();
    assert_eq!(status, 503, "{health}");
    let problems = health["problems"].to_string();
    assert!(problems.contains("repository unreachable"), "{health}");
    assert!(problems.contains("to reach the repository"), "{health}");

    s3.start_again();
    let back = Instant::now();
    let recovered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        daemon.wait_for("/healthz to turn healthy again", Duration::from_secs(240), || daemon.health().0 == 200)
    }));
    if let Err(panic) = recovered {
        eprintln!("{}", s3.failure("the S3 server after its restart"));
        std::panic::resume_unwind(panic);
    }
    eprintln!("healthy again {:?} after the store came back", back.elapsed());
    load.kill().ok();
    load.wait().ok();

    // Everything written is in the repository, with no gap.
    let switched = pg.psql("select pg_walfile_name(pg_switch_wal())");
    daemon.wait_for("the switched segment in the repository", Duration::from_secs(120), || {
        let info = env.info_json();
        info["timelines"][0]["wal_ranges"].as_array().and_then(|r| r.last()).is_some_and(|r| r["last"].as_str() >= Some(switched.as_str()))
    });
    let info = env.info_json();
    let timeline = &info["timelines"][0];
    assert_eq!(info["timelines"].as_array().unwrap().len(), 1, "{info:#}");
    assert_eq!(timeline["gaps"], serde_json::json!([]), "{info:#}");
    assert_eq!(timeline["wal_ranges"].as_array().unwrap().len(), 1, "{info:#}");
    assert!(timeline["wal_ranges"][0]["first"].as_str() <= info["backups"][0]["wal_first"].as_str(), "{info:#}");
    assert_eq!(info["backups"][0]["restorable"], true);
    assert!(daemon.metrics()["walvault_failures_total{kind=\"store\"}"] >= 1.0);

    let events: Vec<serde_json::Value> =
        std::fs::read_to_string(&alerts).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"wal_lag"), "{events:?}");
    assert!(kinds.contains(&"slot_retained"), "{events:?}");
    let lag = events.iter().find(|e| e["event"] == "wal_lag").unwrap();
    assert!(lag["details"]["lag_seconds"].as_f64().unwrap() > 10.0, "{lag}");

    let (status, _) = daemon.stop();
    assert!(status.success());
}
