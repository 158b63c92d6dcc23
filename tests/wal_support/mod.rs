//! Helpers shared by the WAL tests (`tests/wal_*.rs`): a `walvault stream`
//! process, standbys, PostgreSQL's own archive in a directory as the reference,
//! and reading WAL back out of the repository.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::common::env::{Env, chown_tree};
use crate::common::pg::{PgCluster, PgOptions};

/// 1 MiB segments: many segment boundaries for little WAL.
pub const SEG: u64 = 1 << 20;

pub fn small_segments() -> PgOptions {
    PgOptions::new().initdb_arg("--wal-segsize=1").guc("wal_keep_size", "'64MB'")
}

/// Polls `cond` until it holds; panics with `what` (and its own report) after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    loop {
        match cond() {
            Ok(()) => return,
            Err(why) if Instant::now() > deadline => panic!("timed out after {timeout:?} waiting for {what}: {why}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// A directory PostgreSQL archives into with `cp` (the reference archive).
pub struct CopyArchive {
    pub dir: PathBuf,
}

impl CopyArchive {
    pub fn new(env: &Env, name: &str) -> CopyArchive {
        CopyArchive { dir: env.new_dir(name) }
    }

    pub fn command(&self) -> String {
        let d = self.dir.display();
        format!("test ! -f {d}/%f && cp %p {d}/.%f.tmp && mv {d}/.%f.tmp {d}/%f")
    }

    /// File name -> content.
    pub fn files(&self) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        for e in std::fs::read_dir(&self.dir).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') {
                out.insert(name, std::fs::read(e.path()).unwrap());
            }
        }
        out
    }
}

/// `walvault stream` running in the background, its log in the env's directory.
pub struct Streamer {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Streamer {
    pub fn start(env: &Env, tag: &str) -> Streamer {
        let log = env.dir.join(format!("stream-{tag}.log"));
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = env
            .cmd(&["-v", "stream"])
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("start walvault stream");
        Streamer { child: Some(child), log }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no chance to store anything more.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGSTOP / SIGCONT.
    pub fn pause(&self) {
        unsafe { libc::kill(self.pid(), libc::SIGSTOP) };
    }

    pub fn resume(&self) {
        unsafe { libc::kill(self.pid(), libc::SIGCONT) };
    }

    /// SIGTERM and wait: stores what it received, then exits 0.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Some(status) = c.try_wait().unwrap() {
                    assert!(status.success(), "walvault stream exited with {status}:\n{}", self.log_text());
                    return;
                }
                if Instant::now() > deadline {
                    c.kill().ok();
                    c.wait().ok();
                    panic!("walvault stream did not stop on SIGTERM:\n{}", self.log_text());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
            panic!("walvault stream exited with {status}:\n{}", self.log_text());
        }
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
        if std::thread::panicking() {
            eprintln!("--- walvault stream log ({}):\n{}", self.log.display(), self.log_text());
        }
    }
}

/// A streaming standby of `primary` (pg_basebackup -R), started on its own port,
/// with `gucs` set (ALTER SYSTEM) before it starts serving.
pub fn start_standby(primary: &PgCluster, env: &Env, name: &str, gucs: &[(&str, &str)]) -> PgCluster {
    let data = env.new_dir(name).join("data");
    let out = primary
        .command("pg_basebackup")
        .arg("-D")
        .arg(&data)
        .args(["-R", "-X", "stream", "-c", "fast", "-h"])
        .arg(primary.socket_dir())
        .args(["-p", &primary.port().to_string(), "-U", "postgres"])
        .output()
        .unwrap();
    assert!(out.status.success(), "pg_basebackup: {}", String::from_utf8_lossy(&out.stderr));
    chown_tree(&data);
    let mut standby = PgCluster::adopt(&data);
    if !gucs.is_empty() {
        for (k, v) in gucs {
            standby.psql(&format!("ALTER SYSTEM SET {k} = {}", crate::common::pg::quote_literal(v)));
        }
        standby.restart();
    }
    standby
}

/// Runs pgbench against the cluster; panics on failure.
pub fn pgbench(pg: &PgCluster, args: &[&str]) {
    let out = pg
        .command("pgbench")
        .arg("-h")
        .arg(pg.socket_dir())
        .args(["-p", &pg.port().to_string(), "-U", "postgres"])
        .args(args)
        .arg("postgres")
        .output()
        .unwrap();
    assert!(out.status.success(), "pgbench {args:?}: {}\n{}", String::from_utf8_lossy(&out.stderr), pg.log_tail());
}

/// The WAL objects in a file repository: file name (with `.streaming` for the
/// streamer's copies) -> object path.
pub fn repo_wal(env: &Env) -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, out: &mut BTreeMap<String, PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                let name = e.file_name().to_string_lossy().into_owned();
                if !name.starts_with('.') {
                    out.insert(name, p);
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&env.repo_dir.as_ref().expect("a file repository").join("wal"), &mut out);
    out
}

/// The signed record of a WAL object in a file repository (its JSON body).
pub fn record_of(path: &Path) -> serde_json::Value {
    let data = std::fs::read(path).unwrap();
    assert_eq!(&data[..8], b"WVREC001", "{}", path.display());
    let len = u32::from_be_bytes(data[8..12].try_into().unwrap()) as usize;
    let doc = std::str::from_utf8(&data[12..12 + len]).unwrap();
    let body = doc.rsplit_once("\nwalvault-signature ").map(|(b, _)| b).unwrap_or(doc);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("record of {}: {e}\n{body}", path.display()))
}

/// Fetches a WAL file with `walvault archive-get` (decrypted, checked): its
/// content, or None when archive-get says it is not in the repository.
pub fn fetch(env: &Env, name: &str) -> Option<Vec<u8>> {
    let dest = env.dir.join(format!("fetched-{name}"));
    let out = env.run(&["archive-get", name, dest.to_str().unwrap()]);
    match out.status.code() {
        Some(0) => {
            let data = std::fs::read(&dest).unwrap();
            std::fs::remove_file(&dest).unwrap();
            Some(data)
        }
        Some(1) => None,
        _ => panic!("archive-get {name} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr)),
    }
}

/// Complete segment names (24 hex digits) stored in the repository, sorted.
pub fn stored_segments(env: &Env) -> Vec<String> {
    repo_wal(env).into_keys().filter(|n| n.len() == 24).collect()
}

/// Asserts the segments of each timeline form one unbroken run; returns them.
pub fn assert_no_gap(names: &[String]) {
    let mut by_tli: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for n in names {
        let segno = u64::from_str_radix(&n[8..16], 16).unwrap() * (0x1_0000_0000 / SEG) + u64::from_str_radix(&n[16..24], 16).unwrap();
        by_tli.entry(&n[..8]).or_default().push(segno);
    }
    for (tli, segs) in by_tli {
        for w in segs.windows(2) {
            assert_eq!(w[1], w[0] + 1, "timeline {tli}: segment {:X} is missing from the repository ({names:?})", w[0] + 1);
        }
    }
}

/// The segment name of an LSN printed by PostgreSQL, for 1 MiB segments.
pub fn segment_of(tli: u32, lsn: &str) -> String {
    let l: walvault::pg::Lsn = lsn.parse().unwrap();
    walvault::pg::lsn::WalSegmentName::of_lsn(tli, l, SEG).to_string()
}

/// Waits until the cluster's archiver has archived everything written so
/// far (callers switch first). It switches again: WAL written after the
/// caller's switch (a checkpoint's record, say) would otherwise leave the
/// last segment unfinished, and never archived. With nothing written since,
/// the switch does nothing and returns the start of the segment in use, one
/// byte after the caller's segment: the byte before it names that segment on
/// every version (pg_walfile_name of a segment's first byte names that segment
/// from PostgreSQL 17 on, the one before it until 16).
pub fn wait_archived(pg: &PgCluster) {
    let last = match pg.version_num() >= 140000 {
        true => pg.psql("select pg_walfile_name(pg_switch_wal() - 1)"),
        // No pg_lsn arithmetic before 14; pg_walfile_name still names the
        // segment before a boundary there.
        false => pg.psql("select pg_walfile_name(pg_switch_wal())"),
    };
    wait_archived_upto(pg, &last);
}

/// Waits until the cluster's archiver has archived `last` (and so all before it).
/// On a timeout it reports the server log's tail too, where archive-push's
/// own log lines are.
pub fn wait_archived_upto(pg: &PgCluster, last: &str) {
    wait_for(&format!("PostgreSQL to archive {last}"), Duration::from_secs(60), || {
        let r = pg.psql("select coalesce(last_archived_wal, ''), coalesce(last_failed_wal, '') from pg_stat_archiver");
        let (archived, failed) = r.split_once('|').unwrap();
        if archived >= last {
            Ok(())
        } else {
            Err(format!("archived {archived:?}, last failed {failed:?}\nserver log tail:\n{}", pg.log_tail()))
        }
    });
}
