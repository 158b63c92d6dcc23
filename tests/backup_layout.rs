//! What a backup holds, the way pg_basebackup would: tablespaces (restored to
//! their own place or moved with --tablespace-map), unlogged tables as init
//! forks only (so they come back empty), and none of the files PostgreSQL
//! says to leave out. The moved restore runs as root, as CI does: the files
//! must still belong to the data directory's owner.

mod common;
mod support;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::env::{Env, postgres_ids, stderr, stdout};
use common::pg::PgCluster;
use support::*;

/// Starts a restored directory and waits until recovery is over (unlogged
/// tables can be read only then).
fn start_promoted(dir: &Path) -> PgCluster {
    let c = PgCluster::adopt(dir);
    let deadline = Instant::now() + Duration::from_secs(120);
    while c.psql("select pg_is_in_recovery()") != "f" {
        assert!(Instant::now() < deadline, "recovery did not end:\n{}", c.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
    c
}

/// Every path under `dir` (relative), files and links.
fn all_paths(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            if e.file_type().unwrap().is_dir() {
                walk(root, &p, out);
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}

/// The checks on a restored directory before it is started.
fn check_restored_files(data: &Path, ts_root: &Path, oid: &str, rels: &Rels) {
    let paths = all_paths(data);
    for excluded in ["postmaster.pid", "postmaster.opts", "pg_replslot/keepme", "base/pgsql_tmp/pgsql_tmp999.0", "pg_stat_tmp/leftover"] {
        assert!(!paths.iter().any(|p| p == excluded), "{excluded} must not be restored");
    }
    for p in &paths {
        assert!(!p.ends_with("pg_internal.init"), "relcache init files are excluded: {p}");
        assert!(!p.starts_with("pg_wal/0"), "no WAL segments in a restored pg_wal: {p}");
        let name = p.rsplit('/').next().unwrap();
        assert!(!(name.starts_with('t') && name[1..].contains('_') && p.starts_with("base/")), "temporary relation file restored: {p}");
    }
    for dir in
        ["pg_wal/archive_status", "pg_replslot", "pg_stat_tmp", "pg_notify", "pg_serial", "pg_snapshots", "pg_subtrans", "pg_dynshmem"]
    {
        assert!(data.join(dir).is_dir(), "{dir} is expected (empty) by PostgreSQL");
    }
    // Unlogged relations: the init fork only.
    assert!(data.join(format!("{}_init", rels.unlogged)).is_file(), "init fork of the unlogged table");
    assert!(!data.join(&rels.unlogged).exists(), "main fork of the unlogged table is excluded");
    let ts_unlogged = ts_root.join(rels.unlogged_ts.split_once(&format!("pg_tblspc/{oid}/")).unwrap().1);
    assert!(Path::new(&format!("{}_init", ts_unlogged.display())).is_file(), "init fork of the unlogged table in the tablespace");
    assert!(!ts_unlogged.exists(), "main fork of the unlogged table in the tablespace is excluded");
    // The tablespace: its files where asked, linked from pg_tblspc, and in tablespace_map.
    let in_ts = ts_root.join(rels.in_ts.split_once(&format!("pg_tblspc/{oid}/")).unwrap().1);
    assert!(in_ts.is_file(), "{} holds the tablespace's table", ts_root.display());
    assert_eq!(std::fs::read_link(data.join("pg_tblspc").join(oid)).unwrap(), ts_root);
    let map = std::fs::read_to_string(data.join("tablespace_map")).unwrap();
    assert_eq!(map, format!("{oid} {}\n", ts_root.display()));
}

struct Rels {
    unlogged: String,
    unlogged_ts: String,
    in_ts: String,
}

#[test]
fn tablespaces_unlogged_tables_and_excluded_files() {
    let mut pg = archiving_cluster(&[]);
    let env = Env::new(&pg);
    env.run_ok(&["init"]);
    start_archiving(&pg, &env);
    let ts_orig = env.new_dir("ts_orig");
    pg.psql(&format!("create tablespace ts1 location '{}'", ts_orig.display()));
    let oid = pg.psql("select oid from pg_tablespace where spcname = 'ts1'");
    pg.psql("create table in_ts(id int primary key, v text) tablespace ts1");
    pg.psql("insert into in_ts select g, md5(g::text) from generate_series(1, 20000) g");
    pg.psql("create table plain(id int primary key, v text)");
    pg.psql("insert into plain select g, md5(g::text) from generate_series(1, 20000) g");
    pg.psql("create unlogged table scratch(id int, v text)");
    pg.psql("insert into scratch select g, 'x' from generate_series(1, 10000) g");
    pg.psql("create unlogged table scratch_ts(id int) tablespace ts1");
    pg.psql("insert into scratch_ts select generate_series(1, 10000)");
    pg.psql("select pg_create_physical_replication_slot('keepme', true)");
    pg.psql("checkpoint");
    let rels = Rels {
        unlogged: pg.psql("select pg_relation_filepath('scratch')"),
        unlogged_ts: pg.psql("select pg_relation_filepath('scratch_ts')"),
        in_ts: pg.psql("select pg_relation_filepath('in_ts')"),
    };
    // Files the server must leave out: a temporary relation of a live session,
    // a leftover temporary file, statistics scratch.
    let mut session = Background(Some(
        pg.command("psql")
            .arg("-h")
            .arg(pg.socket_dir())
            .args(["-p", &pg.port().to_string(), "-U", "postgres", "-X", "-q"])
            .args(["-c", "create temp table tmp_rel as select generate_series(1, 5000) g", "-c", "select pg_sleep(600)"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while pg.psql("select count(*) from pg_class where relname = 'tmp_rel'") != "1" {
        assert!(Instant::now() < deadline, "the temporary table did not appear");
        std::thread::sleep(Duration::from_millis(50));
    }
    for f in ["base/pgsql_tmp/pgsql_tmp999.0", "pg_stat_tmp/leftover"] {
        let p = pg.data_dir().join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"scratch").unwrap();
        pg.chown_to_postgres(p.parent().unwrap());
        pg.chown_to_postgres(&p);
    }
    let digests = |q: &dyn Fn(&str) -> String| vec![q(&table_digest_sql("in_ts", "id")), q(&table_digest_sql("plain", "id"))];
    let source = digests(&|s| pg.psql(s));

    env.run_ok(&["backup"]);
    session.stop();
    switch_and_wait_archived(&pg);

    // The tablespace's own directory is in use: restoring there is refused
    // before anything is written.
    let refused = env.dir.join("refused");
    let (code, err) = env.run_err(&["restore", "--pgdata", refused.to_str().unwrap()]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains(&ts_orig.display().to_string()) && err.contains("not empty") && err.contains("--tablespace-map"), "{err}");
    assert!(is_empty_dir(&refused));
    let (code, err) = env.run_err(&["restore", "--pgdata", refused.to_str().unwrap(), "--tablespace-map", "4242=/tmp/x"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("4242"), "{err}");

    // Moved elsewhere, restored by root: owned by the data directory's owner.
    let moved = env.new_dir("moved");
    let ts_new = env.dir.join("ts_new");
    let data1 = moved.join("data");
    let mut as_root = std::process::Command::new(&env.bin);
    as_root.arg("--config").arg(&env.config).current_dir(&env.dir).env("NO_COLOR", "1");
    as_root.args(["restore", "--pgdata", data1.to_str().unwrap(), "--tablespace-map", &format!("{oid}={}", ts_new.display())]);
    let out = as_root.output().unwrap();
    assert!(out.status.success(), "restore as {}: {}\n{}", unsafe { libc::geteuid() }, stdout(&out), stderr(&out));
    check_restored_files(&data1, &ts_new, &oid, &rels);
    if let Some((uid, _)) = postgres_ids() {
        for p in
            all_paths(&data1).iter().map(|p| data1.join(p)).chain(all_paths(&ts_new).iter().map(|p| ts_new.join(p))).chain([ts_new.clone()])
        {
            assert_eq!(std::fs::symlink_metadata(&p).unwrap().uid(), uid, "{} belongs to the data directory's owner", p.display());
        }
    }
    {
        let restored = start_promoted(&data1);
        assert_eq!(digests(&|s| restored.psql(s)), source);
        assert_eq!(restored.psql("select count(*) from scratch"), "0", "unlogged tables come back empty");
        assert_eq!(restored.psql("select count(*) from scratch_ts"), "0");
        assert_eq!(
            restored.psql("select pg_tablespace_location(oid) from pg_tablespace where spcname = 'ts1'"),
            ts_new.display().to_string()
        );
        assert_eq!(restored.psql("select count(*) from pg_replication_slots"), "0", "slots are not restored");
    }

    // In its original place once that is free (the original cluster is gone).
    pg.stop();
    std::fs::rename(&ts_orig, env.dir.join("ts_orig.old")).unwrap();
    let data2 = env.new_dir("in_place").join("data");
    env.run_ok(&["restore", "--pgdata", data2.to_str().unwrap()]);
    check_restored_files(&data2, &ts_orig, &oid, &rels);
    let restored = start_promoted(&data2);
    assert_eq!(digests(&|s| restored.psql(s)), source);
    assert_eq!(restored.psql("select count(*) from scratch"), "0");
    assert_eq!(restored.psql("select pg_tablespace_location(oid) from pg_tablespace where spcname = 'ts1'"), ts_orig.display().to_string());
}
