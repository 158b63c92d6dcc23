//! Point-in-time recovery is exact. Marker rows are committed one by one,
//! every 5 ms, under pgbench load, with restore points between them and three
//! base backups along the way (an early one, then two more so that the choice
//! of backup is exercised). For targets chosen at random inside the window,
//! `restore --replay` must yield exactly the markers committed up to the
//! target: by time, LSN (commit records found with pg_waldump), transaction
//! id and restore point name, inclusive and exclusive.
//!
//! The default run writes markers for 20 s and checks a handful of targets of
//! each kind (about 2 minutes). The full run, 60 s and 10 targets of each kind:
//!
//! ```sh
//! WALVAULT_TEST_PITR_FULL=1 cargo test --test restore_pitr -- --nocapture
//! ```
//!
//! (`WALVAULT_TEST_SEED=N` replays the same random targets.)

mod common;
mod support;

use std::time::Duration;

use common::env::Env;
use support::*;

struct Target {
    args: Vec<String>,
    /// The last marker id the restored cluster must hold (0: none).
    expect: i64,
    what: String,
}

#[test]
fn restores_hold_exactly_the_markers_committed_up_to_the_target() {
    let full = std::env::var_os("WALVAULT_TEST_PITR_FULL").is_some();
    let (seconds, per_kind) = if full { (60, 10) } else { (20, 3) };
    let mut rng = Rng::new();

    let pg = archiving_cluster(&[]);
    let env = Env::new(&pg);
    env.run_ok(&["init"]);
    start_archiving(&pg, &env);
    pgbench(&pg, &["-i", "-s", "2", "-q"]);
    pg.psql(MARKERS_DDL);

    let mut load = pgbench_spawn(&pg, &["-n", "-c", "2", "-R", "200", "-T", &(seconds + 60).to_string()]);
    let writer = MarkerWriter::start(&pg.conninfo(), Duration::from_millis(5), Some(97), 1, "m");
    let started = std::time::Instant::now();
    let at = |fraction: f64| started + Duration::from_secs_f64(seconds as f64 * fraction);
    let sleep_until = |t: std::time::Instant| std::thread::sleep(t.saturating_duration_since(std::time::Instant::now()));
    sleep_until(started + Duration::from_secs(2));
    let mut backups = vec![env.run_ok(&["backup", "--label", "early"]).trim().to_string()];
    for fraction in [0.4, 0.75] {
        sleep_until(at(fraction));
        backups.push(env.run_ok(&["backup"]).trim().to_string());
    }
    sleep_until(at(1.0));
    let points = writer.finish();
    load.stop();
    let end_lsn = pg.psql("select pg_current_wal_lsn()");
    switch_and_wait_archived(&pg);

    let markers = markers(&pg);
    let info = env.info_json();
    let window = &info["recoverable_window"];
    let window_start = parse_time_us(window["start_time"].as_str().unwrap());
    let b: Vec<serde_json::Value> = backups.iter().map(|id| backup_json(&env, id)).collect();
    let first_lsn = b[0]["start_lsn"].as_str().unwrap().to_string();
    let lsns = commit_lsns(&pg, &first_lsn, &end_lsn);
    // Markers committed after the first backup's consistency point are targets.
    let candidates: Vec<&Marker> = markers.iter().filter(|m| m.commit_us > window_start + 1000).collect();
    let (first, last) = (candidates[0], *candidates.last().unwrap());
    eprintln!(
        "{} markers, {} after the window opens at {}; {} restore points; backups {backups:?}",
        markers.len(),
        candidates.len(),
        pg_time(window_start),
        points.len()
    );
    assert!(candidates.len() > 1000, "markers kept coming under load");
    let pick = |rng: &mut Rng| candidates[rng.between(0, candidates.len() as i64 - 1) as usize].clone();
    let upto_time = |t: i64, inclusive: bool| {
        markers.iter().filter(|m| if inclusive { m.commit_us <= t } else { m.commit_us < t }).map(|m| m.id).max().unwrap_or(0)
    };

    let mut targets = Vec::new();
    for i in 0..per_kind {
        // A random instant in the window, and (every other time) exactly a marker's commit time.
        let t = if i % 2 == 0 { rng.between(first.commit_us, last.commit_us) } else { pick(&mut rng).commit_us };
        targets.push(Target {
            args: vec!["--target-time".into(), pg_time(t)],
            expect: upto_time(t, true),
            what: format!("time {}", pg_time(t)),
        });
        let m = pick(&mut rng);
        let lsn = lsns.get(&m.xid).unwrap_or_else(|| panic!("no commit record for marker {} (xid {})", m.id, m.xid)).clone();
        targets.push(Target {
            args: vec!["--target-lsn".into(), lsn.clone()],
            expect: m.id,
            what: format!("LSN {lsn} (commit of marker {})", m.id),
        });
        let m = pick(&mut rng);
        targets.push(Target {
            args: vec!["--target-xid".into(), m.xid.to_string()],
            expect: m.id,
            what: format!("xid {} (marker {})", m.xid, m.id),
        });
        let usable: Vec<&(String, i64)> = points.iter().filter(|(_, id)| *id >= first.id).collect();
        let (name, id) = usable[rng.between(0, usable.len() as i64 - 1) as usize];
        targets.push(Target { args: vec!["--target-name".into(), name.clone()], expect: *id, what: format!("restore point {name}") });
        // --exclusive: the target itself is left out.
        let m = pick(&mut rng);
        let exclusive = match i % 3 {
            0 => Target {
                args: vec!["--target-time".into(), pg_time(m.commit_us), "--exclusive".into()],
                expect: upto_time(m.commit_us, false),
                what: format!("time {} exclusive", pg_time(m.commit_us)),
            },
            1 => Target {
                args: vec!["--target-lsn".into(), lsns[&m.xid].clone(), "--exclusive".into()],
                expect: m.id - 1,
                what: format!("LSN {} exclusive (marker {})", lsns[&m.xid], m.id),
            },
            _ => Target {
                args: vec!["--target-xid".into(), m.xid.to_string(), "--exclusive".into()],
                expect: m.id - 1,
                what: format!("xid {} exclusive (marker {})", m.xid, m.id),
            },
        };
        targets.push(exclusive);
    }
    // A transaction assigned after the third backup began: the second backup
    // ends before it commits and is the one to start from.
    let late = markers.iter().rev().nth(50).unwrap();
    targets.push(Target {
        args: vec!["--target-xid".into(), late.xid.to_string()],
        expect: late.id,
        what: format!("late xid {} (marker {})", late.xid, late.id),
    });

    for (n, t) in targets.iter().enumerate() {
        let dir = env.new_dir(&format!("r{n}")).join("data");
        let args: Vec<&str> = t.args.iter().map(String::as_str).collect();
        let mut r = restore_and_keep(&env, &pg, &dir, &args);
        let got = r.psql(&pg, "select count(*) || ' ' || coalesce(max(id), 0) from markers");
        let tl = r.reached["timeline"].clone();
        r.stop(&pg);
        eprintln!("{}: expected markers 1..={}, got (count, max) {got}; {}", t.what, t.expect, r.reached["postgres_says"]);
        assert_eq!(got, format!("{} {}", t.expect, t.expect), "restore to {}: {}", t.what, r.stderr);
        assert_eq!(r.reached["promoted"], true);
        assert_eq!(tl, 2, "promoted onto a new timeline");
        if t.what.starts_with("late xid") {
            assert!(r.stderr.contains(&format!("restoring backup {}", backups[1])), "started from the second backup: {}", r.stderr);
        }
    }
}
