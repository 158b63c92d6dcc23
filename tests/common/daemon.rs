//! A running `walvault daemon` for tests: started like the other commands (as
//! the `postgres` user, with the environment's configuration), its log in a
//! file, /metrics and /healthz fetched over HTTP, and stopped with SIGTERM.
//! Killed on drop if a test fails before stopping it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::env::Env;

pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
    pub address: String,
}

/// A free TCP port on 127.0.0.1 (free when asked; tests bind it soon after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Daemon {
    /// Points `daemon.metrics_listen` at a free port and starts the daemon.
    pub fn start(env: &mut Env) -> Daemon {
        Self::start_with(env, &[])
    }

    /// The same, with extra environment variables (e.g. WALVAULT_TEST_FAULTS).
    pub fn start_with(env: &mut Env, vars: &[(&str, &str)]) -> Daemon {
        let address = format!("127.0.0.1:{}", free_port());
        env.set("daemon.metrics_listen", &format!("\"{address}\""));
        let n = std::fs::read_dir(&env.dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("daemon"))
            .count();
        let log = env.dir.join(format!("daemon-{n}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = env.cmd(&["daemon"]);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let child = cmd.stdin(Stdio::null()).stdout(file.try_clone().unwrap()).stderr(file).spawn().expect("start walvault daemon");
        let daemon = Daemon { child: Some(child), log, address };
        daemon.wait_for("the HTTP listener", Duration::from_secs(60), || daemon.try_get("/healthz").is_some());
        daemon
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: signals our own child by its pid.
        unsafe { libc::kill(self.pid(), signal) };
    }

    /// True once the process has exited (a zombie until `stop` reaps it).
    pub fn exited(&self) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        stat.rsplit_once(')').is_none_or(|(_, rest)| rest.trim_start().starts_with('Z'))
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Polls `check` every 200 ms until it holds; panics with the log tail after `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !check() {
            assert!(!self.exited(), "the daemon exited while waiting for {what}; log tail:\n{}", self.log_tail());
            assert!(Instant::now() < deadline, "timed out waiting for {what}; daemon log tail:\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// GET `path`: (status, body), or None if the daemon does not answer.
    pub fn try_get(&self, path: &str) -> Option<(u16, String)> {
        let mut sock = std::net::TcpStream::connect(&self.address).ok()?;
        sock.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        sock.write_all(format!("GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.address).as_bytes()).ok()?;
        let mut response = String::new();
        sock.read_to_string(&mut response).ok()?;
        let status = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Some((status, body))
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        self.try_get(path).unwrap_or_else(|| panic!("the daemon does not answer {path}; log tail:\n{}", self.log_tail()))
    }

    /// /healthz: (status, {"healthy", "problems"}).
    pub fn health(&self) -> (u16, serde_json::Value) {
        let (status, body) = self.get("/healthz");
        (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("/healthz is not JSON ({e}): {body}")))
    }

    /// /metrics as name (with labels) -> value.
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "{body}");
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (name, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad metrics line {l:?}"));
                (name.to_string(), value.parse().unwrap_or_else(|_| panic!("bad metrics value {l:?}")))
            })
            .collect()
    }

    /// One metric (`walvault_` is prepended); 0 when absent.
    pub fn metric(&self, name: &str) -> f64 {
        self.metrics().get(&format!("walvault_{name}")).copied().unwrap_or(0.0)
    }

    /// SIGTERM and wait (up to a minute) for the exit; returns the status and how long it took.
    pub fn stop(mut self) -> (ExitStatus, Duration) {
        let started = Instant::now();
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status, started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(60) {
                child.kill().ok();
                child.wait().ok();
                panic!("the daemon did not stop within a minute of SIGTERM; log tail:\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
            if std::thread::panicking() {
                // The environment's directory goes with the test: keep the whole log.
                let keep = std::env::temp_dir().join(format!("walvault-daemon-{}-{}.log", std::process::id(), child.id()));
                let kept = std::fs::copy(&self.log, &keep).is_ok();
                eprintln!(
                    "daemon log tail{}:\n{}",
                    if kept { format!(" (all of it in {})", keep.display()) } else { String::new() },
                    self.log_tail()
                );
            }
        }
    }
}

/// Every file under `dir`, as paths relative to it ('/'-separated), sorted.
pub fn list_files(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.push(path.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out.sort();
    out
}

/// The JSON body of a signed document (the signature is its last line).
pub fn signed_body(raw: &[u8]) -> serde_json::Value {
    let text = std::str::from_utf8(raw).expect("a signed document is UTF-8");
    let body = text.trim_end().rsplit_once('\n').map(|(b, _)| b).unwrap_or(text);
    serde_json::from_str(body).expect("a signed document's body is JSON")
}

/// A WAL segment name's segment number, for 16 MiB segments.
pub fn segno(name: &str) -> u64 {
    let log = u64::from_str_radix(&name[8..16], 16).unwrap();
    let seg = u64::from_str_radix(&name[16..24], 16).unwrap();
    log * 0x100 + seg
}

/// pgbench as the cluster's owner against its `postgres` database.
pub fn pgbench(pg: &super::pg::PgCluster, args: &[&str]) -> std::process::Command {
    let mut cmd = pg.command("pgbench");
    cmd.arg("-h").arg(pg.socket_dir()).args(["-p", &pg.port().to_string(), "-U", "postgres"]).args(args).arg("postgres");
    cmd
}

/// Asserts the repository under `repo` (a file store) holds nothing retention
/// should have removed: every backup directory is complete and among `kept`,
/// every pack and pack index is referenced by a kept manifest, and no WAL
/// segment precedes the oldest kept backup's first segment.
pub fn assert_no_orphans(repo: &Path, kept: &[String]) {
    let files = list_files(repo);
    let mut dirs: Vec<String> =
        files.iter().filter_map(|f| f.strip_prefix("backups/")).map(|f| f.split('/').next().unwrap().to_string()).collect();
    // Keys list in byte order ("<id>-1/" before "<id>/"): compare as sets.
    dirs.sort();
    dirs.dedup();
    let mut sorted_kept = kept.to_vec();
    sorted_kept.sort();
    assert_eq!(dirs, sorted_kept, "backup directories in the store");
    let mut referenced = std::collections::BTreeSet::new();
    let mut oldest_first: Option<u64> = None;
    for id in kept {
        let manifest = signed_body(
            &std::fs::read(repo.join(format!("backups/{id}/manifest.json"))).unwrap_or_else(|e| panic!("backup {id} has no manifest: {e}")),
        );
        for p in manifest["packs"].as_array().unwrap() {
            referenced.insert(p["id"].as_str().unwrap().to_string());
        }
        let first = segno(manifest["wal_first"].as_str().unwrap());
        oldest_first = Some(oldest_first.map_or(first, |o: u64| o.min(first)));
    }
    for f in files.iter().filter(|f| f.starts_with("packs/")) {
        let name = f.rsplit('/').next().unwrap();
        let id = name.trim_end_matches(".pack").trim_end_matches(".idx");
        assert!(referenced.contains(id), "{f} is not referenced by any kept backup (kept: {kept:?})");
    }
    for id in &referenced {
        assert!(files.iter().any(|f| f.ends_with(&format!("/{id}.pack"))), "pack {id} of a kept backup is missing");
        assert!(files.iter().any(|f| f.ends_with(&format!("/{id}.idx"))), "the index of pack {id} is missing");
    }
    let oldest_first = oldest_first.expect("at least one kept backup");
    for f in files.iter().filter(|f| f.starts_with("wal/") && !f.starts_with("wal/history/")) {
        let name = f.rsplit('/').next().unwrap();
        assert!(segno(&name[..24]) >= oldest_first, "{f} is older than the oldest kept backup's first segment");
    }
}
