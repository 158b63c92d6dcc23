//! The crash suite: walvault killed like `kill -9` while it archives, streams,
//! backs up, expires and restores, at every named kill point
//! (`WALVAULT_TEST_CRASH_AT`, see src/crashpoint.rs) and at random moments
//! chosen by a seeded schedule (`WALVAULT_TEST_SEED`). After each kill the job
//! is run again to the end and the repository is checked: nothing that
//! PostgreSQL was told is archived is missing, no backup is visible that
//! cannot be restored, `verify --deep` passes; each family ends with a restore
//! with replay that must hold every committed marker row.
//!
//! `cargo test` runs a small seeded subset (a few kill points);
//! `WALVAULT_RELIABILITY_FULL=1` (scripts/reliability.sh) runs them all. Each
//! survived kill prints a `RELIABILITY kill ...` line the script counts.

mod common;
mod support;
mod wal_support;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::env::{Env, chown_tree};
use common::pg::PgCluster;
use support::{MARKERS_DDL, MarkerWriter, Rng, assert_repository_sound, restore_and_keep};
use wal_support::{SEG, Streamer, repo_wal, stored_segments, wait_for};

/// One kill: at a named point (its nth visit) or after a random delay, from outside.
#[derive(Debug, Clone)]
enum Kill {
    At(&'static str, u32),
    After(Duration),
}

impl std::fmt::Display for Kill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kill::At(p, n) => write!(f, "{p}:{n}"),
            Kill::After(d) => write!(f, "after {}ms", d.as_millis()),
        }
    }
}

fn full() -> bool {
    std::env::var("WALVAULT_RELIABILITY_FULL").is_ok_and(|v| v == "1")
}

/// The schedule of a family: every named kill and `random` random ones in full
/// mode; in quick mode `quick` of them, chosen by the seed.
fn schedule(rng: &mut Rng, named: &[(&'static str, u32)], random: usize, delay_ms: (i64, i64), quick: usize) -> Vec<Kill> {
    let mut all: Vec<Kill> = named.iter().map(|(p, n)| Kill::At(p, *n)).collect();
    for _ in 0..random {
        all.push(Kill::After(Duration::from_millis(rng.between(delay_ms.0, delay_ms.1) as u64)));
    }
    if full() {
        return all;
    }
    let mut picked = Vec::new();
    while picked.len() < quick && !all.is_empty() {
        let i = (rng.next() % all.len() as u64) as usize;
        picked.push(all.remove(i));
    }
    picked
}

fn survived(family: &str, kill: &Kill) {
    eprintln!("RELIABILITY kill family={family} at={kill} survived");
}

/// Every file PostgreSQL marked archived (`archive_status/*.done`) is in the repository.
fn assert_done_files_stored(pg: &PgCluster, env: &Env, after: &str) -> usize {
    let stored = repo_wal(env);
    // Retention rightly removes WAL older than the oldest kept backup needs.
    let info = env.info_json();
    let oldest_needed = info["backups"].as_array().and_then(|b| b.first()).and_then(|b| b["wal_first"].as_str()).unwrap_or("").to_string();
    let status = pg.data_dir().join("pg_wal/archive_status");
    let mut checked = 0;
    let mut lost = Vec::new();
    for e in std::fs::read_dir(&status).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(wal) = name.strip_suffix(".done") {
            let expired = wal.len() == 24 && wal < oldest_needed.as_str();
            checked += 1;
            if !expired && !stored.contains_key(wal) {
                lost.push(wal.to_string());
            }
        }
    }
    if !lost.is_empty() {
        eprintln!("RELIABILITY objects_lost={}", lost.len());
    }
    assert!(lost.is_empty(), "after {after}: PostgreSQL was told these are archived but the repository lacks them: {lost:?}");
    checked
}

/// Waits for a killed process, and checks it died at the planned point.
fn assert_died_at(child: &mut std::process::Child, log: &Path, point: &str) {
    let status = child.wait().unwrap();
    let log = std::fs::read_to_string(log).unwrap_or_default();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "expected death by SIGKILL at {point}; got {status}:\n{log}");
    assert!(log.contains(&format!("test crash point {point} reached")), "died elsewhere than {point}:\n{log}");
}

fn switch_wal(pg: &PgCluster) -> String {
    pg.psql("select pg_walfile_name(pg_switch_wal())")
}

fn archiving(extra: &[(&str, &str)]) -> PgCluster {
    let mut o = wal_support::small_segments()
        .guc("track_commit_timestamp", "on")
        .guc("archive_mode", "on")
        .guc("archive_command", "'/bin/false'")
        .guc("archive_timeout", "0");
    for (k, v) in extra {
        o = o.guc(k, v);
    }
    PgCluster::start(o)
}

/// The final check of a family: a restore with replay to the latest point holds
/// exactly the marker rows the source committed.
fn assert_restore_has_every_marker(env: &Env, pg: &PgCluster, family: &str) {
    let want = pg.psql("select count(*) || ' ' || coalesce(max(id), 0) from markers");
    let dir = env.new_dir(&format!("final-{family}")).join("data");
    let mut replayed = restore_and_keep(env, pg, &dir, &[]);
    let got = replayed.psql(pg, "select count(*) || ' ' || coalesce(max(id), 0) from markers");
    replayed.stop(pg);
    if got != want {
        eprintln!("RELIABILITY objects_lost=1");
    }
    assert_eq!(got, want, "{family}: the restored markers (count max) differ from the source's");
    eprintln!("RELIABILITY restore family={family} markers={want} ok");
}

fn marker_writer(pg: &PgCluster) -> MarkerWriter {
    pg.psql(MARKERS_DDL);
    MarkerWriter::start(&pg.conninfo(), Duration::from_millis(20), None, 1, "m")
}

// ---------------------------------------------------------------- archive-push

/// A wrapper archive_command: records its pid so the test can kill it from
/// outside, and passes the crash point or fault spec given in files next to it.
fn push_wrapper(env: &Env) -> std::path::PathBuf {
    let script = env.dir.join("push.sh");
    let d = env.dir.display();
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho $$ > {d}/push.pid.tmp && mv {d}/push.pid.tmp {d}/push.pid\n\
             [ -f {d}/crash_at ] && export WALVAULT_TEST_CRASH_AT=\"$(cat {d}/crash_at)\"\n\
             [ -f {d}/faults ] && export WALVAULT_TEST_FAULTS=\"$(cat {d}/faults)\"\n\
             exec {} --config {} archive-push \"$1\" 2>>{d}/push.log\n",
            env.bin.display(),
            env.config.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    chown_tree(&script);
    script
}

/// Whether archive-push's background pusher for this environment's
/// configuration runs (other tests' pushers have other configurations).
fn pusher_of(env: &Env) -> bool {
    let config = env.config.to_string_lossy().into_owned();
    std::fs::read_dir("/proc").into_iter().flatten().flatten().any(|p| {
        std::fs::read(p.path().join("cmdline"))
            .map(|c| {
                let c = String::from_utf8_lossy(&c).replace('\0', " ");
                c.contains("archive-push-pusher") && c.contains(&config)
            })
            .unwrap_or(false)
    })
}

fn crash_lines(env: &Env, line: &str) -> usize {
    std::fs::read_to_string(env.dir.join("push.log")).unwrap_or_default().matches(line).count()
}

#[test]
fn archive_push_killed_at_every_point_loses_nothing() {
    let mut rng = Rng::new();
    let plan =
        schedule(&mut rng, &[("archive_push.stored", 1), ("archive_push.before_exit", 1)], if full() { 14 } else { 2 }, (50, 1200), 2);
    let pg = archiving(&[]);
    let env = Env::builder(&pg).build();
    env.run_ok(&["init"]);
    let wrapper = push_wrapper(&env);
    pg.set_guc("archive_command", &format!("{} %p", wrapper.display()));
    let markers = marker_writer(&pg);
    env.run_ok(&["backup"]);
    for kill in &plan {
        let _ = std::fs::remove_file(env.dir.join("push.pid"));
        let mut counted = true;
        match kill {
            Kill::At(point, n) => {
                // A background pusher left from a backlog before would store the
                // next segment itself, in a process without the kill point.
                wait_for("the background pusher to exit", Duration::from_secs(30), || {
                    if pusher_of(&env) { Err("still running".into()) } else { Ok(()) }
                });
                std::fs::write(env.dir.join("crash_at"), format!("{point}:{n}")).unwrap();
                chown_tree(&env.dir.join("crash_at"));
                switch_wal(&pg);
                // A command killed by a signal makes PostgreSQL restart its
                // archiver (not count a failure): the wrapper's log tells.
                let reached = format!("test crash point {point} reached");
                let seen = crash_lines(&env, &reached);
                wait_for("archive-push to die at its kill point", Duration::from_secs(60), || {
                    if crash_lines(&env, &reached) > seen { Ok(()) } else { Err("not reached yet".into()) }
                });
                std::fs::remove_file(env.dir.join("crash_at")).unwrap();
            }
            Kill::After(delay) => {
                // Slow puts so a kill lands inside the upload more often than not.
                std::fs::write(env.dir.join("faults"), "head:*:delay=1500;put:*:delay=1500;put_if_absent:*:delay=1500").unwrap();
                chown_tree(&env.dir.join("faults"));
                switch_wal(&pg);
                let pid_file = env.dir.join("push.pid");
                wait_for("archive-push to start", Duration::from_secs(60), || {
                    if pid_file.exists() { Ok(()) } else { Err("not started".into()) }
                });
                std::thread::sleep(*delay);
                let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
                let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let landed = cmdline.contains("archive-push") && unsafe { libc::kill(pid, libc::SIGKILL) } == 0;
                std::fs::remove_file(env.dir.join("faults")).unwrap();
                if !landed {
                    eprintln!("archive-push had finished before the kill {kill}; not counted");
                }
                counted = landed;
            }
        }
        // PostgreSQL retries; everything it marks done must be stored.
        let last = switch_wal(&pg);
        wal_support::wait_archived_upto(&pg, &last);
        let n = assert_done_files_stored(&pg, &env, &kill.to_string());
        assert_repository_sound(&env, &kill.to_string());
        eprintln!("{n} archived files checked after {kill}");
        if counted {
            survived("archive-push", kill);
        }
    }
    markers.finish();
    let last = switch_wal(&pg);
    wal_support::wait_archived_upto(&pg, &last);
    assert_done_files_stored(&pg, &env, "the end");
    assert_restore_has_every_marker(&env, &pg, "archive-push");
}

// ---------------------------------------------------------------- streaming

/// Streamed WAL is stored without a gap, and the slot was never told of WAL
/// that is not stored: every segment wholly before the slot's restart_lsn is.
fn assert_stream_consistent(pg: &PgCluster, env: &Env, after: &str) {
    let segs = stored_segments(env);
    wal_support::assert_no_gap(&segs);
    let restart = pg.psql("select coalesce(restart_lsn::text, '') from pg_replication_slots");
    if let (Some(first), Some(restart)) = (segs.first(), restart.lines().next().filter(|s| !s.is_empty())) {
        let restart_seg = wal_support::segment_of(1, restart);
        let stored = repo_wal(env);
        let mut lost = Vec::new();
        let first_no = u64::from_str_radix(&first[16..24], 16).unwrap();
        let restart_no = u64::from_str_radix(&restart_seg[16..24], 16).unwrap();
        for no in first_no..restart_no {
            let name = format!("{}{:08X}", &first[..16], no);
            if !stored.contains_key(&name) {
                lost.push(name);
            }
        }
        if !lost.is_empty() {
            eprintln!("RELIABILITY objects_lost={}", lost.len());
        }
        assert!(lost.is_empty(), "after {after}: the slot is at {restart} but these segments are not stored: {lost:?}");
    }
    let _ = SEG;
}

#[test]
fn streamer_killed_at_every_point_loses_nothing() {
    let mut rng = Rng::new();
    let plan = schedule(
        &mut rng,
        &[
            ("stream.segment_stored", 1),
            ("stream.segment_stored", 2),
            ("stream.segment_stored", 5),
            ("stream.before_status", 1),
            ("stream.before_status", 3),
            ("stream.before_status", 6),
        ],
        if full() { 10 } else { 1 },
        (300, 3000),
        2,
    );
    let pg = PgCluster::start(wal_support::small_segments().guc("track_commit_timestamp", "on"));
    let mut env = Env::builder(&pg).set("wal.partial_interval", "\"1s\"").build();
    env.run_ok(&["init"]);
    let mut streamer = Streamer::start(&env, "first");
    let markers = marker_writer(&pg);
    env.run_ok(&["backup"]);
    for (i, kill) in plan.iter().enumerate() {
        streamer.stop();
        match kill {
            Kill::At(point, n) => {
                env.set_env("WALVAULT_TEST_CRASH_AT", &format!("{point}:{n}"));
                let log = env.dir.join(format!("stream-kill-{i}.log"));
                let f = std::fs::File::create(&log).unwrap();
                let mut child = env.cmd(&["-v", "stream"]).stdin(Stdio::null()).stdout(f.try_clone().unwrap()).stderr(f).spawn().unwrap();
                env.set_env("WALVAULT_TEST_CRASH_AT", "");
                let deadline = Instant::now() + Duration::from_secs(90);
                while child.try_wait().unwrap().is_none() {
                    assert!(Instant::now() < deadline, "the streamer never reached {point}");
                    switch_wal(&pg);
                    std::thread::sleep(Duration::from_millis(300));
                }
                assert_died_at(&mut child, &log, point);
            }
            Kill::After(delay) => {
                let mut s = Streamer::start(&env, &format!("kill-{i}"));
                let deadline = Instant::now() + *delay;
                while Instant::now() < deadline {
                    switch_wal(&pg);
                    std::thread::sleep(Duration::from_millis(100));
                }
                s.assert_running();
                s.kill9();
            }
        }
        assert_stream_consistent(&pg, &env, &kill.to_string());
        // Restarted, it catches up without a gap.
        streamer = Streamer::start(&env, &format!("after-{i}"));
        let last = switch_wal(&pg);
        wait_for("the restarted streamer to catch up", Duration::from_secs(90), || {
            if repo_wal(&env).contains_key(&last) { Ok(()) } else { Err(format!("{last} not stored")) }
        });
        assert_stream_consistent(&pg, &env, &kill.to_string());
        assert_repository_sound(&env, &kill.to_string());
        survived("stream", kill);
    }
    markers.finish();
    let last = switch_wal(&pg);
    wait_for("the streamer to store the last segment", Duration::from_secs(90), || {
        if repo_wal(&env).contains_key(&last) { Ok(()) } else { Err(format!("{last} not stored")) }
    });
    streamer.stop();
    assert_stream_consistent(&pg, &env, "the end");
    assert_restore_has_every_marker(&env, &pg, "stream");
}

// ---------------------------------------------------------------- backup, expire, restore

fn spawn_logged(env: &Env, args: &[&str], log: &Path) -> std::process::Child {
    let f = std::fs::File::create(log).unwrap();
    env.cmd(args).stdin(Stdio::null()).stdout(f.try_clone().unwrap()).stderr(f).spawn().unwrap()
}

/// Runs `args` killed by `kill`; returns whether the kill landed (the process
/// had not finished by itself).
fn run_killed(env: &mut Env, args: &[&str], kill: &Kill, log: &Path) -> bool {
    match kill {
        Kill::At(point, n) => {
            env.set_env("WALVAULT_TEST_CRASH_AT", &format!("{point}:{n}"));
            let mut child = spawn_logged(env, args, log);
            env.set_env("WALVAULT_TEST_CRASH_AT", "");
            assert_died_at(&mut child, log, point);
            true
        }
        Kill::After(delay) => {
            let mut child = spawn_logged(env, args, log);
            std::thread::sleep(*delay);
            if child.try_wait().unwrap().is_some() {
                eprintln!("{args:?} finished before the kill {kill}; not counted");
                return false;
            }
            child.kill().unwrap();
            child.wait().unwrap();
            true
        }
    }
}

#[test]
fn backup_expire_and_restore_killed_at_every_point_leave_nothing_broken() {
    let mut rng = Rng::new();
    let backup_plan = schedule(
        &mut rng,
        &[
            ("backup.pack_uploaded", 1),
            ("backup.pack_uploaded", 2),
            ("backup.pack_uploaded", 5),
            ("backup.files_sealed", 1),
            ("backup.wal_waited", 1),
            ("backup.manifest_written", 1),
        ],
        if full() { 8 } else { 1 },
        (100, 1200),
        1,
    );
    let expire_plan = schedule(&mut rng, &[("expire.mid_delete", 1), ("expire.mid_delete", 2), ("expire.mid_delete", 3)], 0, (0, 0), 1);
    let restore_plan = schedule(
        &mut rng,
        &[("restore.mid_write", 1), ("restore.mid_write", 3), ("restore.mid_write", 10), ("restore.mid_write", 40)],
        if full() { 5 } else { 0 },
        (100, 900),
        1,
    );

    let pg = archiving(&[]);
    let mut env = Env::builder(&pg).set("backup.pack_size", "\"1MiB\"").set("retention.full_backups", "1").build();
    env.run_ok(&["init"]);
    pg.set_guc("archive_command", &env.archive_command());
    // Some 20 MB of poorly compressible rows, so a backup has many packs.
    pg.psql("create table noise as select g, md5(g::text) || md5((g * 7)::text) as t from generate_series(1, 200000) g");
    let markers = marker_writer(&pg);

    for (i, kill) in backup_plan.iter().enumerate() {
        pg.psql(&format!("update noise set t = md5(t) where g % 50 = {i}"));
        let log = env.dir.join(format!("backup-kill-{i}.log"));
        let landed = run_killed(&mut env, &["backup", "--label", "doomed"], kill, &log);
        let info = env.info_json();
        for b in info["backups"].as_array().unwrap() {
            assert_eq!(b["restorable"], true, "after {kill}: {info}");
        }
        // The job finished: the next backup takes over the dead one's lock.
        env.run_ok(&["backup"]);
        assert_repository_sound(&env, &kill.to_string());
        if landed {
            survived("backup", kill);
        }
    }

    for (i, kill) in expire_plan.iter().enumerate() {
        // At least two backups, so expire has something to delete.
        pg.psql(&format!("update noise set t = md5(t) where g % 50 = {}", 20 + i));
        env.run_ok(&["backup"]);
        let log = env.dir.join(format!("expire-kill-{i}.log"));
        let landed = run_killed(&mut env, &["expire"], kill, &log);
        assert_repository_sound(&env, &kill.to_string());
        env.run_ok(&["expire"]);
        assert_repository_sound(&env, &kill.to_string());
        let n = env.info_json()["backups"].as_array().unwrap().len();
        assert_eq!(n, 1, "after {kill} and a second expire, one backup is kept");
        if landed {
            survived("expire", kill);
        }
    }

    for (i, kill) in restore_plan.iter().enumerate() {
        let dir = env.new_dir(&format!("restore-kill-{i}")).join("data");
        let log = env.dir.join(format!("restore-kill-{i}.log"));
        let landed = run_killed(&mut env, &["restore", "--pgdata", dir.to_str().unwrap()], kill, &log);
        if landed {
            // Half written, it cannot start by accident (pg_control comes last) ...
            assert!(!dir.join("global/pg_control").exists(), "after {kill}: pg_control written before the rest");
            // ... and the retry says what to do, then succeeds with --force.
            let (code, err) = env.run_err(&["restore", "--pgdata", dir.to_str().unwrap()]);
            assert_ne!(code, 0, "{err}");
            assert!(err.contains("not empty") && err.contains("--force"), "{err}");
        }
        env.run_ok(&["restore", "--pgdata", dir.to_str().unwrap(), "--force"]);
        assert!(dir.join("global/pg_control").exists());
        let _ = std::fs::remove_dir_all(&dir);
        if landed {
            survived("restore", kill);
        }
    }

    markers.finish();
    let last = switch_wal(&pg);
    wal_support::wait_archived_upto(&pg, &last);
    assert_done_files_stored(&pg, &env, "the end");
    // The replay's restore_command runs with a prefetch worker that dies once.
    env.set_env("WALVAULT_TEST_CRASH_AT", "archive_get.prefetch:2");
    assert_restore_has_every_marker(&env, &pg, "backup");
    env.set_env("WALVAULT_TEST_CRASH_AT", "");
}
