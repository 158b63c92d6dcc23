//! `walvault expire` against a real repository: --dry-run deletes nothing and
//! says what it would; the policies (full_backups, window_days, min_backups);
//! what is deleted is never needed by a kept backup (verify passes and the
//! oldest kept backup restores and replays to the end); and expire and backup
//! exclude each other through the repository lock.

mod common;

use std::time::{Duration, Instant};

use common::daemon::{assert_no_orphans, list_files};
use common::env::{Env, stderr, stdout};
use common::pg::{PgCluster, PgOptions};

fn archiving_cluster() -> PgCluster {
    PgCluster::start(PgOptions::new().guc("archive_mode", "on").guc("archive_command", "'/bin/false'"))
}

/// Switches WAL and waits until the switched segment is archived.
fn archive_all(pg: &PgCluster) {
    pg.psql("select pg_switch_wal()");
    let deadline = Instant::now() + Duration::from_secs(60);
    while pg.psql("select coalesce(last_archived_wal, '') >= pg_walfile_name(pg_current_wal_lsn() - 1) from pg_stat_archiver") != "t" {
        assert!(Instant::now() < deadline, "archiving stalled:\n{}", pg.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `expire --json` with policy flags; the plan.
fn expire_json(env: &Env, policy: &[&str], dry_run: bool) -> serde_json::Value {
    let mut args: Vec<&str> = Vec::new();
    for p in policy {
        args.extend(["--set", p]);
    }
    args.extend(["expire", "--json"]);
    if dry_run {
        args.push("--dry-run");
    }
    let out = env.run_ok(&args);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["dry_run"], dry_run);
    v["plan"].clone()
}

/// Runs a command to success within `limit` (a hung restore fails the test
/// instead of hanging it); its stdout. Output goes through files, never a full pipe.
fn run_within(mut cmd: std::process::Command, limit: Duration) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child =
        cmd.stdout(std::fs::File::create(&out_path).unwrap()).stderr(std::fs::File::create(&err_path).unwrap()).spawn().unwrap();
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            panic!("{cmd:?} did not finish within {limit:?}; stderr:\n{}", std::fs::read_to_string(&err_path).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (out, err) = (std::fs::read_to_string(&out_path).unwrap(), std::fs::read_to_string(&err_path).unwrap());
    assert!(status.success(), "{cmd:?} failed ({status}): {out}{err}");
    out
}

fn ids(v: &serde_json::Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect()
}

#[test]
fn expire_removes_only_what_no_kept_backup_needs() {
    let pg = archiving_cluster();
    let env = Env::new(&pg);
    env.run_ok(&["init"]);
    pg.set_guc("archive_command", &env.archive_command());
    pg.psql("create table marks(id int primary key, batch int, pad text)");
    let mut backups = Vec::new();
    for batch in 0..4 {
        pg.psql(&format!(
            "insert into marks select g, {batch}, repeat('x', 500) from generate_series({0} * 20000 + 1, {0} * 20000 + 20000) g",
            batch
        ));
        backups.push(env.run_ok(&["backup", "--label", &format!("b{batch}")]).trim().to_string());
        archive_all(&pg);
    }
    pg.psql("insert into marks select g, 9, 'after the last backup' from generate_series(100001, 100100) g");
    archive_all(&pg);
    let repo = env.repo_dir.clone().unwrap();
    let before = list_files(&repo);

    // --dry-run: the plan, and nothing deleted.
    let plan = expire_json(&env, &["retention.full_backups=2"], true);
    assert_eq!(ids(&plan["kept_backups"]), backups[2..].to_vec());
    assert_eq!(ids(&plan["expired_backups"]), backups[..2].to_vec());
    assert!(!plan["wal"].as_array().unwrap().is_empty(), "{plan:#}");
    assert!(plan["bytes"].as_u64().unwrap() > 0);
    let text = env.run_ok(&["--set", "retention.full_backups=2", "expire", "--dry-run"]);
    assert!(text.contains(&format!("would delete backup {}\n", backups[0])), "{text}");
    assert!(text.contains(&format!("would delete backup {}\n", backups[1])), "{text}");
    assert!(text.contains("; kept 2 backups"), "{text}");
    assert_eq!(list_files(&repo), before, "a dry run deleted something");

    // The policies. All four backups are minutes old: a one-day window keeps them all.
    assert_eq!(ids(&expire_json(&env, &["retention.window_days=1"], true)["kept_backups"]), backups);
    // min_backups is a floor under full_backups.
    let plan = expire_json(&env, &["retention.full_backups=1", "retention.min_backups=3"], true);
    assert_eq!(ids(&plan["kept_backups"]), backups[1..].to_vec());
    // No policy at all: nothing expires.
    assert_eq!(ids(&expire_json(&env, &[], true)["expired_backups"]), Vec::<String>::new());

    // For real.
    let plan = expire_json(&env, &["retention.full_backups=2"], false);
    assert_eq!(ids(&plan["expired_backups"]), backups[..2].to_vec());
    let info = env.info_json();
    let kept: Vec<String> = info["backups"].as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(kept, backups[2..].to_vec());
    assert_no_orphans(&repo, &kept);
    assert_eq!(info["timelines"][0]["gaps"], serde_json::json!([]));
    // Idempotent: nothing left to do.
    let again = expire_json(&env, &["retention.full_backups=2"], false);
    assert_eq!(again["bytes"], 0, "{again:#}");

    // What is left is intact and enough: verify passes, and the oldest kept
    // backup restores and replays through all the WAL after it.
    env.run_ok(&["verify"]);
    let dest = env.new_dir("restore").join("data");
    let out = run_within(
        env.cmd(&["restore", "--pgdata", dest.to_str().unwrap(), "--backup", &backups[2], "--replay", "--json"]),
        Duration::from_secs(300),
    );
    let reached: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(reached["promoted"], true, "{out}");
    let restored = PgCluster::adopt(&dest);
    assert_eq!(restored.psql("select count(*) from marks"), pg.psql("select count(*) from marks"));
    assert_eq!(restored.psql("select count(*) from marks where batch = 9"), "100");
}

#[test]
fn expire_and_backup_exclude_each_other() {
    let pg = archiving_cluster();
    let env = Env::new(&pg);
    env.run_ok(&["init"]);
    pg.set_guc("archive_command", &env.archive_command());
    env.run_ok(&["backup"]);
    let lock = env.repo_dir.as_ref().unwrap().join("locks/backup.lock");
    let wait_for_lock = |child: &mut std::process::Child| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !lock.exists() {
            assert!(child.try_wait().unwrap().is_none(), "the process ended before taking the lock");
            assert!(Instant::now() < deadline, "the lock never appeared");
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    // A backup slowed down by the store holds the lock: expire refuses.
    let mut backup = env.cmd(&["backup"]).env("WALVAULT_TEST_FAULTS", "put:*:delay=1500").spawn().unwrap();
    wait_for_lock(&mut backup);
    let (code, err) = env.run_err(&["--set", "retention.full_backups=1", "expire"]);
    assert_eq!(code, 7, "{err}");
    assert!(err.starts_with("error: the repository is locked for a base backup by "), "{err}");
    assert!(err.contains("hint: wait for it to finish; a lock whose holder died is taken over once it expires"), "{err}");
    assert!(backup.wait().unwrap().success());
    assert_eq!(env.info_json()["backups"].as_array().unwrap().len(), 2);

    // Retention slowed down by the store holds the lock: a backup refuses.
    let mut expire =
        env.cmd(&["--set", "retention.full_backups=1", "expire"]).env("WALVAULT_TEST_FAULTS", "delete:*:delay=3000").spawn().unwrap();
    wait_for_lock(&mut expire);
    let out = env.run(&["backup"]);
    assert_eq!(out.status.code(), Some(7), "{}{}", stdout(&out), stderr(&out));
    assert!(stderr(&out).starts_with("error: the repository is locked for retention (expire) by "), "{}", stderr(&out));
    assert!(expire.wait().unwrap().success());
    assert_eq!(env.info_json()["backups"].as_array().unwrap().len(), 1);
}
