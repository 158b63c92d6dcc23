//! End to end, through the built binary: repository creation, WAL archiving
//! with archive_command, a base backup, and a point-in-time restore with replay.

mod common;

use common::env::Env;
use common::pg::{PgCluster, PgOptions};

fn archiving_cluster() -> PgCluster {
    PgCluster::start(PgOptions::new().guc("track_commit_timestamp", "on").guc("archive_mode", "on").guc("archive_command", "'/bin/false'"))
}

fn start_archiving(pg: &PgCluster, env: &Env) {
    pg.set_guc("archive_command", &env.archive_command());
}

#[test]
fn init_is_idempotent_and_refuses_another_cluster() {
    let pg = PgCluster::start(PgOptions::new());
    let env = Env::new(&pg);
    let out = env.run_ok(&["init"]);
    assert!(out.contains("initialized repository"), "{out}");
    let descriptor = env.repo_dir.as_ref().unwrap().join("walvault.json");
    let before = std::fs::read(&descriptor).unwrap();
    let out = env.run_ok(&["init"]);
    assert!(out.contains("already initialized for this cluster; nothing changed"), "{out}");
    assert_eq!(std::fs::read(&descriptor).unwrap(), before, "a second init must not rewrite the descriptor");

    // A second cluster pointed at the same repository.
    let other = PgCluster::start(PgOptions::new());
    let mut env2 = Env::new(&other);
    env2.set("repository.url", &format!("\"{}\"", env.repo_url));
    std::fs::copy(env.keys.join("agent.key"), env2.keys.join("agent.key")).unwrap();
    let mine = pg.psql("select system_identifier from pg_control_system()");
    let theirs = other.psql("select system_identifier from pg_control_system()");
    let (code, err) = env2.run_err(&["init"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains(&mine) && err.contains(&theirs), "the error names both system identifiers: {err}");
    assert_eq!(std::fs::read(&descriptor).unwrap(), before, "a refused init writes nothing");
}

#[test]
fn archive_backup_and_restore_to_a_time() {
    let pg = archiving_cluster();
    let env = Env::new(&pg);
    env.run_ok(&["init"]);
    start_archiving(&pg, &env);
    pg.psql("create table marks(id int primary key, note text)");
    pg.psql("insert into marks select g, 'before backup' from generate_series(1, 100) g");
    let id = env.run_ok(&["backup", "--label", "e2e"]).trim().to_string();
    assert!(!id.is_empty());
    for i in 101..=140 {
        pg.psql(&format!("insert into marks values ({i}, 'after')"));
    }
    let target: String = pg.psql("select pg_xact_commit_timestamp(xmin)::text from marks where id = 120");
    pg.psql("select pg_switch_wal()");
    // Wait until the switched segment is archived.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while pg.psql("select coalesce(last_archived_wal, '') >= pg_walfile_name(pg_current_wal_lsn() - 1) from pg_stat_archiver") != "t" {
        assert!(std::time::Instant::now() < deadline, "archiving stalled:\n{}", pg.log_tail());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    let dest = env.new_dir("restore").join("data");
    let out = env.run_ok(&["restore", "--pgdata", dest.to_str().unwrap(), "--target-time", &target, "--replay", "--json"]);
    let reached: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(reached["promoted"], true, "{out}");
    assert!(reached["postgres_says"].as_str().unwrap_or("").contains("recovery stopping"), "{out}");

    // Start the restored cluster and compare: every row committed at or before the target.
    let expected = pg.psql(&format!("select count(*) from marks where pg_xact_commit_timestamp(xmin) <= '{target}'"));
    let restored = common::pg::PgCluster::adopt(&dest);
    let got = restored.psql("select count(*) from marks");
    assert_eq!(got, expected, "rows after restoring to {target}");
    assert_eq!(restored.psql("select max(id) from marks"), "120");
}
