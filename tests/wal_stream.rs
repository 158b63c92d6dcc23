//! `walvault stream` against real clusters: the streamed WAL is PostgreSQL's
//! own, byte for byte (checked against what PostgreSQL archives with `cp`),
//! across a promotion; crashes of the streamer and restarts of the server leave
//! no gap; a lost host loses at most `wal.partial_interval` of commits; and in
//! synchronous mode a commit returns only once the repository has it.

mod common;
mod wal_support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::env::{Env, stderr};
use common::pg::{PgCluster, PgOptions};
use wal_support::*;

fn toml_str(s: &str) -> String {
    format!("\"{s}\"")
}

/// Waits until the streamer is connected (its slot is active on `pg`).
fn wait_streaming(pg: &PgCluster, streamer: &mut Streamer) {
    wait_for("walvault stream to connect", Duration::from_secs(60), || {
        streamer.assert_running();
        match pg.psql("select count(*) from pg_replication_slots where slot_name = 'walvault' and active").as_str() {
            "1" => Ok(()),
            n => Err(format!("{n} active slots")),
        }
    });
}

/// Waits until the repository holds `segment` complete.
fn wait_stored(env: &Env, streamer: &mut Streamer, segment: &str) {
    wait_for(&format!("{segment} in the repository"), Duration::from_secs(90), || {
        streamer.assert_running();
        if repo_wal(env).contains_key(segment) { Ok(()) } else { Err(format!("stored: {:?}", stored_segments(env))) }
    });
}

fn verify_ok(env: &Env) {
    let out = env.run(&["verify", "--json", "--deep"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)));
    assert_eq!(report["ok"], true, "verify found problems: {}", serde_json::to_string_pretty(&report["problems"]).unwrap());
}

/// Every complete segment the streamer stored is the one PostgreSQL archived,
/// and every segment PostgreSQL archived from the streamer's first one on is
/// in the repository.
fn assert_streamed_equals_archived(env: &Env, archived: &std::collections::BTreeMap<String, Vec<u8>>) -> Vec<String> {
    let stored = stored_segments(env);
    assert!(!stored.is_empty(), "nothing was streamed");
    assert_no_gap(&stored);
    for name in &stored {
        let record = record_of(&repo_wal(env)[name]);
        assert_eq!(record["source"], "stream", "{name} was not stored by the streamer");
        let pg_copy = archived.get(name).unwrap_or_else(|| panic!("PostgreSQL never archived {name}, which the streamer stored"));
        let ours = fetch(env, name).unwrap();
        assert!(ours == *pg_copy, "{name}: the streamed segment differs from PostgreSQL's archived one");
    }
    let first = &stored[0];
    for name in archived.keys().filter(|n| n.len() == 24 && n[8..] >= first[8..]) {
        assert!(stored.contains(name), "PostgreSQL archived {name}, the repository does not have it (stored: {stored:?})");
    }
    stored
}

#[test]
fn streamed_segments_equal_archived_ones_across_a_promotion() {
    let mut primary = PgCluster::start(small_segments().guc("archive_mode", "on").guc("archive_command", "'/bin/false'"));
    let mut env = Env::builder(&primary).set("wal.partial_interval", "\"1s\"").set("wal.status_interval", "\"1s\"").build();
    env.run_ok(&["init"]);
    let primary_archive = CopyArchive::new(&env, "archive-primary");
    primary.set_guc("archive_command", &primary_archive.command());
    let standby_archive = CopyArchive::new(&env, "archive-standby");
    let standby = start_standby(&primary, &env, "standby", &[("archive_mode", "on"), ("archive_command", &standby_archive.command())]);
    // The streamer follows the standby: its promotion comes down the same connection.
    env.set("postgres.conninfo", &toml_str(&standby.conninfo()));
    let mut streamer = Streamer::start(&env, "promotion");
    wait_streaming(&standby, &mut streamer);

    pgbench(&primary, &["-i", "-s", "2", "-q"]);
    pgbench(&primary, &["-n", "-c", "2", "-T", "4"]);
    // The primary's last segment stays incomplete: it never archives it, and
    // the promoted standby archives it as `.partial`.
    let current = primary.psql("select pg_walfile_name(pg_current_wal_lsn())");
    let before = walvault::pg::lsn::WalSegmentName::parse(&current, SEG).unwrap().prev().unwrap().to_string();
    wait_archived_upto(&primary, &before);
    // The primary is lost once the standby has everything it wrote (a clean
    // shutdown would switch to a new segment first).
    let end = primary.psql("select pg_current_wal_lsn()");
    wait_for("the standby to receive everything", Duration::from_secs(30), || {
        match standby.psql(&format!("select pg_last_wal_replay_lsn() >= '{end}'")).as_str() {
            "t" => Ok(()),
            _ => Err(standby.psql("select pg_last_wal_replay_lsn()")),
        }
    });
    primary.kill9();
    assert_eq!(standby.psql("select pg_promote()"), "t");
    pgbench(&standby, &["-n", "-c", "2", "-T", "3"]);
    standby.psql("select pg_switch_wal()");
    wait_archived(&standby);
    let last = standby.psql("select pg_walfile_name(pg_current_wal_lsn() - 1)");
    wait_stored(&env, &mut streamer, &last);
    streamer.stop();
    assert!(streamer.log_text().contains("following the timeline switch"), "{}", streamer.log_text());

    let mut archived = primary_archive.files();
    archived.extend(standby_archive.files());
    let stored = assert_streamed_equals_archived(&env, &archived);
    assert!(stored.iter().any(|n| n.starts_with("00000001")) && stored.iter().any(|n| n.starts_with("00000002")), "{stored:?}");

    // The history file, byte for byte.
    let history = String::from_utf8(archived["00000002.history"].clone()).unwrap();
    assert_eq!(fetch(&env, "00000002.history").unwrap(), history.as_bytes());
    // The old timeline's last segment: the WAL up to the switch point is the
    // same in both; the repository holds zeros after it (PostgreSQL's file may
    // hold stale bytes there; no timeline contains them).
    let switch: walvault::pg::Lsn = history.lines().next().unwrap().split('\t').nth(1).unwrap().parse().unwrap();
    let partial_name = format!("{}.partial", segment_of(1, &switch.to_string()));
    let theirs = &archived[&partial_name];
    let ours = fetch(&env, &partial_name).expect("the streamer stored the old timeline's last segment");
    let cut = (switch.0 % SEG) as usize;
    assert!(cut > 0, "the switch is inside the segment");
    assert!(ours[..cut] == theirs[..cut], "{partial_name}: the WAL before the switch point differs");
    assert!(ours[cut..].iter().all(|&b| b == 0), "{partial_name}: not zero after the switch point");
    eprintln!(
        "{partial_name}: switch at offset {cut}; PostgreSQL's copy has {} non-zero bytes after it",
        theirs[cut..].iter().filter(|&&b| b != 0).count()
    );
    assert!(!repo_wal(&env).keys().any(|k| k.starts_with(&partial_name[..24]) && k.ends_with(".streaming")), "stale streaming copy");

    // archive-push of PostgreSQL's own files agrees with the streamer on each:
    // the same content, so a repository fed by both never conflicts.
    for name in stored.iter().chain([&partial_name, &"00000002.history".to_string()]) {
        let dir = if name.starts_with("00000001") && !name.ends_with(".partial") { &primary_archive.dir } else { &standby_archive.dir };
        let out = env.run(&["archive-push", dir.join(name).to_str().unwrap()]);
        assert!(out.status.success(), "archive-push {name}: {}", stderr(&out));
        assert!(stderr(&out).contains(&format!(" WARN {name} is already in the repository with the same content")), "{}", stderr(&out));
    }
    // A promoted standby's file may hold stale bytes after the switch point (a
    // recycled segment): archive-push stores the same normalized content.
    let stale_dir = env.dir.join("stale");
    std::fs::create_dir_all(&stale_dir).unwrap();
    let mut stale = theirs.clone();
    for (i, b) in stale[cut..].iter_mut().enumerate() {
        *b = (i % 251) as u8 | 1;
    }
    std::fs::write(stale_dir.join(&partial_name), &stale).unwrap();
    std::fs::write(stale_dir.join("00000002.history"), &history).unwrap();
    common::env::chown_tree(&stale_dir);
    let out = env.run(&["archive-push", stale_dir.join(&partial_name).to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!(" WARN {partial_name} is already in the repository with the same content")), "{}", stderr(&out));
    verify_ok(&env);
}

/// kill -9 of the streamer while segment uploads are in flight (one held back
/// so that later ones land first), then a restart; then a fast restart of
/// PostgreSQL while streaming: no gap, no duplicate, nothing corrupt.
#[test]
fn streamer_crash_and_server_restart_leave_no_gap() {
    let mut pg = PgCluster::start(small_segments().guc("archive_mode", "on").guc("archive_command", "'/bin/false'"));
    let mut env = Env::builder(&pg).set("wal.partial_interval", "\"1s\"").set("wal.status_interval", "\"1s\"").build();
    env.run_ok(&["init"]);
    let archive = CopyArchive::new(&env, "archive");
    pg.set_guc("archive_command", &archive.command());

    // The second segment's upload hangs (10 min; the streamer is killed long
    // before): the next ones land before it.
    env.set_env("WALVAULT_TEST_FAULTS", "put_if_absent:2:delay=600000");
    let mut streamer = Streamer::start(&env, "first");
    wait_streaming(&pg, &mut streamer);
    pgbench(&pg, &["-i", "-s", "1", "-q"]);
    // The held upload may be the first segment streamed (whether a streaming
    // copy or a complete segment is stored first depends on timing): a hole is
    // then before the first stored segment, after where streaming started.
    let first_streamed = {
        let log = streamer.log_text();
        let at = log.find("streaming WAL start=").map(|i| &log[i + "streaming WAL start=".len()..]).unwrap_or_default();
        let lsn: walvault::pg::Lsn = at.split_whitespace().next().unwrap_or("0/0").parse().unwrap_or_default();
        lsn.0 >> 20 // 1 MiB segments
    };
    // Which upload is the second depends on timing: usually a segment (then
    // a hole shows), sometimes a streaming copy (then the kill lands with that
    // upload in flight instead). Either way the restart must leave no gap.
    let hole = || {
        let s = stored_segments(&env);
        let segnos: Vec<u64> = s.iter().map(|n| u64::from_str_radix(&n[16..], 16).unwrap()).collect();
        segnos.windows(2).any(|w| w[1] > w[0] + 1) || segnos.first().is_some_and(|f| *f > first_streamed)
    };
    // At most UPLOADS_IN_FLIGHT (3) uploads run at once: with the held one
    // among them, two later segments is all that can land.
    wait_for("two segments stored", Duration::from_secs(120), || {
        let s = stored_segments(&env);
        if s.len() >= 2 { Ok(()) } else { Err(format!("{s:?} (streaming started in segment {first_streamed:X})")) }
    });
    let seen = Instant::now();
    while !hole() && seen.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("a segment upload held back with later ones stored: {}", hole());
    let before = stored_segments(&env);
    streamer.kill9();
    eprintln!("killed the streamer with {before:?} stored");

    env.set_env("WALVAULT_TEST_FAULTS", "");
    let mut streamer = Streamer::start(&env, "second");
    wait_streaming(&pg, &mut streamer);
    pgbench(&pg, &["-n", "-c", "2", "-T", "3"]);
    // Mid-segment, a fast restart of the server: the walsender waits for our
    // flush to reach what it sent before it exits.
    let shutdowns_before = std::fs::read_to_string(pg.log_file()).unwrap().matches("database system is shut down").count();
    pg.restart();
    let log = std::fs::read_to_string(pg.log_file()).unwrap();
    assert_eq!(log.matches("database system is shut down").count(), shutdowns_before + 1, "no clean shutdown:\n{}", pg.log_tail());
    wait_streaming(&pg, &mut streamer);
    assert!(streamer.log_text().contains("the server ended streaming (shutdown); reconnecting"), "{}", streamer.log_text());
    pgbench(&pg, &["-n", "-c", "2", "-T", "3"]);
    // And a kill -9 mid-segment without any upload held back.
    streamer.kill9();
    pgbench(&pg, &["-n", "-c", "1", "-T", "1"]);
    let mut streamer = Streamer::start(&env, "third");
    wait_streaming(&pg, &mut streamer);
    pg.psql("select pg_switch_wal()");
    wait_archived(&pg);
    let last = pg.psql("select pg_walfile_name(pg_current_wal_lsn() - 1)");
    wait_stored(&env, &mut streamer, &last);
    streamer.stop();

    let stored = assert_streamed_equals_archived(&env, &archive.files());
    for held in before.iter() {
        assert!(stored.contains(held));
    }
    // The only streaming copy left is for a segment not complete in the repository.
    let objects = repo_wal(&env);
    let complete: BTreeSet<&String> = objects.keys().filter(|k| k.len() == 24).collect();
    for copy in objects.keys().filter_map(|k| k.strip_suffix(".streaming")) {
        assert!(!complete.contains(&copy.to_string()), "{copy} is both complete and a streaming copy");
    }
    verify_ok(&env);
}

/// The RPO promise: with wal.partial_interval = 5s and no archive_command, the
/// database host is lost (PostgreSQL and the streamer killed at once) during a
/// burst of commits; restoring from the repository alone brings back every
/// commit older than 5 s.
#[test]
fn losing_the_host_loses_at_most_the_partial_interval() {
    let mut pg = PgCluster::start(PgOptions::new().guc("track_commit_timestamp", "on"));
    let env = Env::builder(&pg).set("wal.partial_interval", "\"5s\"").build();
    env.run_ok(&["init"]);
    let mut streamer = Streamer::start(&env, "rpo");
    wait_streaming(&pg, &mut streamer);
    pg.psql("create table markers(id bigserial primary key, note text)");
    env.run_ok(&["backup", "--label", "rpo"]);

    // A burst of commits, each its own transaction, until the host is lost.
    let script = env.dir.join("marker.sql");
    std::fs::write(&script, "insert into markers(note) values (repeat('x', 200));\n").unwrap();
    common::env::chown_tree(&script);
    let mut burst = pg
        .command("pgbench")
        .arg("-h")
        .arg(pg.socket_dir())
        .args(["-p", &pg.port().to_string(), "-U", "postgres", "-n", "-c", "2", "-R", "200", "-T", "60", "-f"])
        .arg(&script)
        .arg("postgres")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(13));
    let lost_at = chrono::Utc::now();
    streamer.kill9();
    pg.kill9();
    let _ = burst.wait();

    // What the server had committed, with commit times.
    pg.start_again();
    let committed: Vec<(i64, chrono::DateTime<chrono::Utc>)> = pg
        .psql("select id, extract(epoch from pg_xact_commit_timestamp(xmin)) from markers order by id")
        .lines()
        .map(|l| {
            let (id, t) = l.split_once('|').unwrap();
            (id.parse().unwrap(), chrono::DateTime::from_timestamp_micros((t.parse::<f64>().unwrap() * 1e6) as i64).unwrap())
        })
        .collect();
    assert!(committed.len() > 1000, "the burst committed {} rows", committed.len());

    let data = env.new_dir("restored").join("data");
    let out = env.run_ok(&["restore", "--pgdata", data.to_str().unwrap(), "--replay", "--json"]);
    let reached: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(reached["promoted"], true, "{out}");
    let restored = PgCluster::adopt(&data);
    let got: BTreeSet<i64> = restored.psql("select id from markers").lines().map(|l| l.parse().unwrap()).collect();

    let all: BTreeSet<i64> = committed.iter().map(|(id, _)| *id).collect();
    assert!(got.is_subset(&all), "the restore holds rows that were never committed");
    let limit = lost_at - chrono::Duration::seconds(5);
    let missing: Vec<&(i64, chrono::DateTime<chrono::Utc>)> = committed.iter().filter(|(id, t)| *t < limit && !got.contains(id)).collect();
    let newest = committed.iter().filter(|(id, _)| got.contains(id)).map(|(_, t)| *t).max().unwrap();
    eprintln!(
        "{} commits, {} restored; newest restored commit {:.2} s before the loss; {} commits of the last 5 s lost",
        committed.len(),
        got.len(),
        (lost_at - newest).num_milliseconds() as f64 / 1000.0,
        committed.iter().filter(|(id, _)| !got.contains(id)).count()
    );
    assert!(
        missing.is_empty(),
        "{} commits older than 5 s are not in the repository, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(3)]
    );
}

/// wal.synchronous with walvault in synchronous_standby_names: a commit waits
/// while the streamer cannot store, and every commit that returned survives
/// the loss of the host.
#[test]
fn synchronous_commits_wait_for_the_repository() {
    let mut pg = PgCluster::start(PgOptions::new().guc("synchronous_standby_names", "'walvault'"));
    let env = Env::builder(&pg).set("wal.synchronous", "true").set("wal.partial_interval", "\"10s\"").build();
    env.run_ok(&["init"]);
    let mut streamer = Streamer::start(&env, "sync");
    wait_streaming(&pg, &mut streamer);
    wait_for("walvault to be the synchronous standby", Duration::from_secs(30), || {
        match pg.psql("select sync_state from pg_stat_replication where application_name = 'walvault'").as_str() {
            "sync" => Ok(()),
            s => Err(s.to_string()),
        }
    });
    pg.psql("create table markers(id int primary key)");
    env.run_ok(&["backup"]);
    for i in 1..=20 {
        pg.psql(&format!("insert into markers values ({i})"));
    }

    // The streamer stopped: a commit does not return.
    streamer.pause();
    let mut insert = pg
        .command("psql")
        .arg("-h")
        .arg(pg.socket_dir())
        .args(["-p", &pg.port().to_string(), "-U", "postgres", "-X", "-q", "-c", "insert into markers values (21)"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(insert.try_wait().unwrap().is_none(), "a synchronous commit returned while walvault could not store it");
    streamer.resume();
    let started = Instant::now();
    assert!(insert.wait().unwrap().success());
    eprintln!("the commit returned {:?} after the streamer resumed", started.elapsed());

    // Every commit that returned is in the repository: lose the host right away.
    streamer.kill9();
    pg.kill9();
    let data = env.new_dir("restored").join("data");
    let out = env.run_ok(&["restore", "--pgdata", data.to_str().unwrap(), "--replay", "--json"]);
    let reached: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(reached["promoted"], true, "{out}");
    let restored = PgCluster::adopt(&data);
    assert_eq!(restored.psql("select count(*), max(id) from markers"), "21|21");
}
