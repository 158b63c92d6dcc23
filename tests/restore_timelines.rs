//! Timelines: a point-in-time restore is promoted and becomes the new primary
//! (timeline 2, archiving into the same repository), writes more and takes a
//! backup. Restores along timeline 1 and along timeline 2 must each give that
//! timeline's rows, including for a time that exists on both (after the
//! branch point), and the default (latest) must follow timeline 2.

mod common;
mod support;

use std::time::Duration;

use common::env::Env;
use common::pg::PgCluster;
use support::*;

fn summary(ids: i64, notes: &str) -> String {
    format!("{ids} {ids} {notes}")
}

#[test]
fn restores_follow_the_timeline_they_are_asked_for() {
    let mut pg = archiving_cluster(&[]);
    let mut env = Env::new(&pg);
    env.run_ok(&["init"]);
    start_archiving(&pg, &env);
    pg.psql(MARKERS_DDL);
    let b1 = env.run_ok(&["backup"]).trim().to_string();
    let w = MarkerWriter::start(&pg.conninfo(), Duration::from_millis(5), None, 1, "tl1");
    std::thread::sleep(Duration::from_secs(4));
    w.finish();
    switch_and_wait_archived(&pg);
    let tl1 = markers(&pg);
    let (early, branch, late) = (&tl1[tl1.len() / 4], &tl1[tl1.len() / 2], &tl1[tl1.len() * 3 / 4]);

    // The restore that becomes the new primary: to the branch point, promoted,
    // then started with the archiving it was restored with. The old primary retires.
    let data = env.new_dir("primary2").join("data");
    env.run_ok(&["restore", "--pgdata", data.to_str().unwrap(), "--target-time", &pg_time(branch.commit_us), "--replay"]);
    pg.stop();
    let p2 = PgCluster::adopt_with(&data, true);
    assert_eq!(p2.psql("select timeline_id from pg_control_checkpoint()"), "2");
    assert_eq!(p2.psql(MARKERS_SUMMARY), summary(branch.id, "tl1"));
    let w = MarkerWriter::start(&p2.conninfo(), Duration::from_millis(5), None, branch.id + 1, "tl2");
    std::thread::sleep(Duration::from_secs(2));
    env.set("postgres.conninfo", &format!("\"{}\"", p2.conninfo()));
    let b2 = env.run_ok(&["backup"]).trim().to_string();
    std::thread::sleep(Duration::from_secs(2));
    w.finish();
    switch_and_wait_archived(&p2);
    let tl2 = markers(&p2);
    let on_tl2: Vec<&Marker> = tl2.iter().filter(|m| m.id > branch.id).collect();
    let b2_end = parse_time_us(backup_json(&env, &b2)["end_time"].as_str().unwrap());
    let before_b2 = on_tl2.iter().filter(|m| m.commit_us < b2_end).nth(10).expect("timeline 2 markers before its backup");
    let after_b2 = on_tl2.iter().rev().nth(10).unwrap();

    // The repository knows timeline 2 branched from 1 (its history file was archived).
    let info = env.info_json();
    let t2 = info["timelines"].as_array().unwrap().iter().find(|t| t["timeline"] == 2).unwrap_or_else(|| panic!("{info}"));
    assert_eq!(t2["parent"]["timeline"], 1, "{info}");
    assert_eq!(info["recoverable_window"]["timeline"], 2, "latest is the timeline written last: {info}");

    let cases: Vec<(Vec<String>, String, &str)> = vec![
        // On timeline 1, before and after the branch point.
        (
            vec!["--target-timeline".into(), "1".into(), "--target-time".into(), pg_time(early.commit_us)],
            summary(early.id, "tl1"),
            "timeline 1, early",
        ),
        (
            vec!["--target-timeline".into(), "1".into(), "--target-time".into(), pg_time(late.commit_us)],
            summary(late.id, "tl1"),
            "timeline 1, after the branch point",
        ),
        // The same instant along timeline 2 (the default, latest): timeline 1 up to the branch only.
        (
            vec!["--target-time".into(), pg_time(late.commit_us)],
            summary(branch.id, "tl1"),
            "timeline 2 (latest), at a time only timeline 1 wrote",
        ),
        // On timeline 2, from the first backup (before the second) and from the second.
        (
            vec!["--target-timeline".into(), "2".into(), "--target-time".into(), pg_time(before_b2.commit_us)],
            summary(before_b2.id, "tl1,tl2"),
            "timeline 2, before its backup",
        ),
        (vec!["--target-time".into(), pg_time(after_b2.commit_us)], summary(after_b2.id, "tl1,tl2"), "timeline 2, after its backup"),
        (vec!["--target-timeline".into(), "1".into()], summary(tl1.last().unwrap().id, "tl1"), "the end of timeline 1"),
    ];
    for (n, (args, expect, what)) in cases.iter().enumerate() {
        let dir = env.new_dir(&format!("r{n}")).join("data");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut r = restore_and_keep(&env, &p2, &dir, &args);
        let got = r.psql(&p2, MARKERS_SUMMARY);
        r.stop(&p2);
        eprintln!("{what}: expected {expect}, got {got}");
        assert_eq!(&got, expect, "{what}: {}", r.stderr);
        let from = if what.contains("after its backup") { &b2 } else { &b1 };
        assert!(r.stderr.contains(&format!("restoring backup {from}")), "{what} starts from backup {from}: {}", r.stderr);
    }
}
