//! Helpers shared by the backup and restore tests (`tests/backup_*.rs`,
//! `tests/restore_*.rs`): archiving clusters, pgbench, table digests, marker
//! rows with known commit times, and restores with replay whose result is
//! queried while the restored server still runs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::env::{Env, stderr, stdout};
use crate::common::pg::{PgCluster, PgOptions};

/// A cluster ready for archiving (archive_mode needs a restart, the command a
/// reload: `start_archiving` sets it once the repository exists), with commit
/// timestamps and WAL kept for pg_waldump.
pub fn archiving_cluster(extra: &[(&str, &str)]) -> PgCluster {
    let mut o = PgOptions::new()
        .guc("track_commit_timestamp", "on")
        .guc("archive_mode", "on")
        .guc("archive_command", "'/bin/false'")
        .guc("wal_keep_size", "'2GB'");
    for (k, v) in extra {
        o = o.guc(k, v);
    }
    PgCluster::start(o)
}

pub fn start_archiving(pg: &PgCluster, env: &Env) {
    pg.set_guc("archive_command", &env.archive_command());
}

/// Switches to a new WAL segment and waits until everything before it is
/// archived. A switch with nothing written since the last one returns the
/// first byte of the segment in use; the byte before it names the segment
/// that was completed on every version (see wal_support::wait_archived).
pub fn switch_and_wait_archived(pg: &PgCluster) {
    let last = match pg.version_num() >= 140000 {
        true => pg.psql("select pg_walfile_name(pg_switch_wal() - 1)"),
        false => pg.psql("select pg_walfile_name(pg_switch_wal())"),
    };
    wait_archived(pg, &last);
}

pub fn wait_archived(pg: &PgCluster, segment: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while pg.psql(&format!("select coalesce(last_archived_wal, '') >= '{segment}' from pg_stat_archiver")) != "t" {
        assert!(Instant::now() < deadline, "archiving stalled before {segment}:\n{}", pg.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pgbench_cmd(pg: &PgCluster, args: &[&str]) -> std::process::Command {
    let mut c = pg.command("pgbench");
    c.arg("-h").arg(pg.socket_dir()).args(["-p", &pg.port().to_string(), "-U", "postgres"]).args(args).arg("postgres");
    c
}

/// Runs pgbench to completion; panics with its output on failure.
pub fn pgbench(pg: &PgCluster, args: &[&str]) -> Output {
    let out = pgbench_cmd(pg, args).output().expect("run pgbench");
    assert!(out.status.success(), "pgbench {args:?} failed:\n{}\n{}", stdout(&out), stderr(&out));
    out
}

/// pgbench in the background (its output discarded); kill it when done.
pub fn pgbench_spawn(pg: &PgCluster, args: &[&str]) -> Background {
    let child =
        pgbench_cmd(pg, args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().expect("spawn pgbench");
    Background(Some(child))
}

/// A child process killed on drop.
pub struct Background(pub Option<Child>);

impl Background {
    pub fn stop(&mut self) {
        if let Some(mut c) = self.0.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Row count and an md5 over every row in key order: equal digests, equal tables.
pub fn table_digest_sql(table: &str, key: &str) -> String {
    format!("select count(*) || ':' || coalesce(md5(string_agg(t::text, '|' order by {key})), '') from {table} t")
}

pub const PGBENCH_TABLES: [(&str, &str); 4] =
    [("pgbench_accounts", "aid"), ("pgbench_branches", "bid"), ("pgbench_tellers", "tid"), ("pgbench_history", "t::text")];

/// The pgbench tables' digests.
pub fn pgbench_digests(query: impl Fn(&str) -> String) -> Vec<(String, String)> {
    PGBENCH_TABLES.iter().map(|(t, k)| (t.to_string(), query(&table_digest_sql(t, k)))).collect()
}

/// `info --json`'s backups.
pub fn backups(env: &Env) -> Vec<serde_json::Value> {
    env.info_json()["backups"].as_array().cloned().unwrap_or_default()
}

pub fn backup_json(env: &Env, id: &str) -> serde_json::Value {
    backups(env).into_iter().find(|b| b["id"] == id).unwrap_or_else(|| panic!("backup {id} not in info --json"))
}

/// A server that `restore --replay --keep-running` left running on a restored
/// directory: queried with psql on its private socket, stopped (immediately)
/// on drop.
pub struct Replayed {
    pub reached: serde_json::Value,
    pub stderr: String,
    pub data: PathBuf,
    socket: PathBuf,
    port: u16,
    bin: PathBuf,
}

impl Replayed {
    pub fn psql(&self, pg: &PgCluster, sql: &str) -> String {
        let out = pg
            .command(self.bin.join("psql"))
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.socket)
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", "postgres", "-c", sql])
            .output()
            .expect("run psql");
        assert!(out.status.success(), "psql on the restored server failed: {}\nSQL: {sql}", stderr(&out));
        stdout(&out).trim_end_matches('\n').to_string()
    }

    /// Stops the server (immediate) and removes the restored directory: a
    /// test makes many, each with the WAL it replayed.
    pub fn stop(&mut self, pg: &PgCluster) {
        if self.port == 0 {
            return;
        }
        let _ = pg.command(self.bin.join("pg_ctl")).arg("stop").arg("-D").arg(&self.data).args(["-m", "immediate", "-w"]).output();
        if let Some(work) = self.socket.parent() {
            let _ = std::fs::remove_dir_all(work);
        }
        let _ = std::fs::remove_dir_all(&self.data);
        self.port = 0;
    }
}

/// `restore --pgdata DIR ARGS --replay --keep-running --archive-mode off --json`;
/// panics (with both streams) unless it succeeds.
pub fn restore_and_keep(env: &Env, pg: &PgCluster, dir: &Path, args: &[&str]) -> Replayed {
    let mut all = vec!["restore", "--pgdata", dir.to_str().unwrap(), "--replay", "--keep-running", "--archive-mode", "off", "--json"];
    all.extend_from_slice(args);
    let out = env.run(&all);
    let (so, se) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "walvault {all:?} failed ({}):\nstdout: {so}\nstderr: {se}", out.status);
    // stdout: the JSON report, then "PostgreSQL keeps running: port P, socket directory S, pid N".
    let json_end = so.rfind('}').expect("a JSON report") + 1;
    let reached: serde_json::Value = serde_json::from_str(&so[..json_end]).unwrap_or_else(|e| panic!("{e}: {so}"));
    let line = so.lines().find(|l| l.starts_with("PostgreSQL keeps running")).unwrap_or_else(|| panic!("no keep-running line: {so}"));
    let port: u16 = line.split("port ").nth(1).and_then(|r| r.split(',').next()).and_then(|p| p.parse().ok()).expect("port");
    let socket = PathBuf::from(line.split("socket directory ").nth(1).and_then(|r| r.split(", pid").next()).expect("socket"));
    let _ = pg;
    Replayed { reached, stderr: se, data: dir.to_path_buf(), socket, port, bin: crate::common::pg::pg_bin_dir() }
}

/// Marker rows written one by one on one connection: ids are consecutive and
/// commit in id order, so "the rows committed at or before X" is always
/// `1..=n`. Restore points are created on the same connection between two
/// markers.
/// What the writer thread returns: the restore points it made, with the last
/// marker id before each.
type MarkerResult = Result<Vec<(String, i64)>, String>;

pub struct MarkerWriter {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<MarkerResult>>,
}

pub const MARKERS_DDL: &str = "create table markers(id bigint primary key, note text not null default 'm')";

impl MarkerWriter {
    /// Writes a marker every `every`; every `restore_point_every` markers (if
    /// set), a restore point named `rp_<last marker id>`. `first_id` continues
    /// a series (ids stay consecutive across writers).
    pub fn start(conninfo: &str, every: Duration, restore_point_every: Option<u64>, first_id: i64, note: &str) -> MarkerWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let (conninfo, stop2, note) = (conninfo.to_string(), stop.clone(), note.to_string());
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                use walvault::pg::conn::{Connection, Mode};
                let params = walvault::pg::conninfo::ConnParams::parse(&conninfo).unwrap();
                let mut conn = Connection::connect(&params, Mode::Database).await.map_err(|e| format!("connect: {e}"))?;
                let mut points = Vec::new();
                let mut id = first_id;
                while !stop2.load(Ordering::SeqCst) {
                    conn.simple_query(&format!("insert into markers(id, note) values ({id}, '{note}')"))
                        .await
                        .map_err(|e| format!("insert marker {id}: {e}"))?;
                    if restore_point_every.is_some_and(|n| (id - first_id + 1) % n as i64 == 0) {
                        let name = format!("rp_{id}");
                        conn.simple_query(&format!("select pg_create_restore_point('{name}')"))
                            .await
                            .map_err(|e| format!("{name}: {e}"))?;
                        points.push((name, id));
                    }
                    id += 1;
                    tokio::time::sleep(every).await;
                }
                let _ = conn.close().await;
                Ok(points)
            })
        });
        MarkerWriter { stop, handle: Some(handle) }
    }

    /// Stops; returns the restore points as (name, last marker id before it).
    pub fn finish(mut self) -> Vec<(String, i64)> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.take().unwrap().join().expect("marker writer").unwrap_or_else(|e| panic!("marker writer: {e}"))
    }

    /// Stops a writer whose server was killed (its last insert failed).
    pub fn finish_after_crash(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.handle.take().unwrap().join();
    }
}

impl Drop for MarkerWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A marker as the source saw it.
#[derive(Debug, Clone)]
pub struct Marker {
    pub id: i64,
    pub xid: u64,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_us: i64,
}

/// Every marker with its transaction id and commit time (track_commit_timestamp).
pub fn markers(pg: &PgCluster) -> Vec<Marker> {
    let text =
        pg.psql("select id, xmin::text, (extract(epoch from pg_xact_commit_timestamp(xmin)) * 1000000)::bigint from markers order by id");
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            Marker { id: f[0].parse().unwrap(), xid: f[1].parse().unwrap(), commit_us: f[2].parse().unwrap() }
        })
        .collect()
}

/// `2026-11-22 10:15:00.123456+00` for microseconds since the epoch.
pub fn pg_time(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us).unwrap().format("%Y-%m-%d %H:%M:%S%.6f+00").to_string()
}

pub fn parse_time_us(s: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(s).unwrap_or_else(|e| panic!("{e}: {s}")).timestamp_micros()
}

/// Commit record positions by transaction id, from pg_waldump over the source's pg_wal.
pub fn commit_lsns(pg: &PgCluster, from: &str, to: &str) -> std::collections::HashMap<u64, String> {
    commit_records(pg, from, to).into_iter().map(|(xid, (lsn, _))| (xid, lsn)).collect()
}

/// Commit records by transaction id: (start LSN as text, end LSN as a number).
pub fn commit_records(pg: &PgCluster, from: &str, to: &str) -> std::collections::HashMap<u64, (String, u64)> {
    let out = pg
        .command("pg_waldump")
        .arg("-p")
        .arg(pg.data_dir().join("pg_wal"))
        .args(["--rmgr=Transaction", "-s", from, "-e", to])
        .output()
        .expect("run pg_waldump");
    let text = stdout(&out);
    let mut map = std::collections::HashMap::new();
    for line in text.lines() {
        if !line.contains("desc: COMMIT") {
            continue;
        }
        let field = |name: &str| line.split(name).nth(1).and_then(|r| r.split(',').next()).map(|s| s.trim().to_string());
        if let (Some(tx), Some(lsn), Some(len)) = (field("tx:"), field("lsn:"), field("len (rec/tot):")) {
            let total: u64 = len.rsplit('/').next().unwrap().trim().parse().unwrap();
            map.insert(tx.parse().unwrap(), (lsn.clone(), parse_lsn(&lsn) + total));
        }
    }
    assert!(!map.is_empty(), "pg_waldump found no commits: {}", stderr(&out));
    map
}

pub fn parse_lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').unwrap_or_else(|| panic!("not an LSN: {s}"));
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// The markers a restored server holds, as "count max notes" (notes sorted, comma-separated).
pub const MARKERS_SUMMARY: &str =
    "select count(*) || ' ' || coalesce(max(id), 0) || ' ' || coalesce(string_agg(distinct note, ',' order by note), '') from markers";

/// A small deterministic random generator (xorshift), seeded from
/// WALVAULT_TEST_SEED or the clock, printed so a failure can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new() -> Rng {
        let seed = std::env::var("WALVAULT_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64);
        eprintln!("random targets from WALVAULT_TEST_SEED={seed}");
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [lo, hi].
    pub fn between(&mut self, lo: i64, hi: i64) -> i64 {
        assert!(lo <= hi);
        lo + (self.next() % ((hi - lo) as u64 + 1)) as i64
    }
}

/// True when the directory is absent or empty.
pub fn is_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p).map(|mut d| d.next().is_none()).unwrap_or(true)
}

/// Every backup `info --json` shows is restorable, and `verify --deep` passes.
pub fn assert_repository_sound(env: &Env, after: &str) {
    let info = env.info_json();
    for b in info["backups"].as_array().cloned().unwrap_or_default() {
        if b["restorable"] != true {
            eprintln!("RELIABILITY unrestorable_visible=1");
            panic!("after {after}: backup {} is visible but not restorable: {info}", b["id"]);
        }
    }
    let out = env.run(&["verify", "--deep"]);
    assert!(out.status.success(), "after {after}: verify --deep failed:\n{}\n{}", stdout(&out), stderr(&out));
}
