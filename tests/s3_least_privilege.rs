//! The least-privilege S3 policy README.md gives ("Object stores"), enforced
//! by a second S3 implementation that evaluates IAM policies: moto's server
//! (PyPI `moto[server]`, installed by scripts/test.sh into .cache/moto, or
//! $WALVAULT_TEST_MOTO naming `moto_server`). With only that policy, walvault
//! archives, streams, backs up (taking and releasing its lock), checks,
//! verifies and restores; `expire`, which needs delete on backups and packs,
//! is refused with a permission error and the repository is left whole.

mod common;
mod wal_support;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::free_port;
use common::env::{Env, stderr};
use common::pg::{PgCluster, PgOptions};
use wal_support::{wait_archived, wait_for};

/// `moto_server`: $WALVAULT_TEST_MOTO, else where scripts/test.sh installs it.
fn moto_server() -> PathBuf {
    if let Some(p) = std::env::var_os("WALVAULT_TEST_MOTO").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let cached = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/moto/bin/moto_server");
    assert!(
        cached.is_file(),
        "moto_server not found at {}: run scripts/test.sh (it installs moto) or set WALVAULT_TEST_MOTO",
        cached.display()
    );
    cached
}

/// A moto server that checks signatures and IAM policies after the four
/// unauthenticated setup requests of tests/common/s3/moto_iam.py.
struct Moto {
    child: Child,
    endpoint: String,
    log: PathBuf,
}

impl Moto {
    fn start(dir: &Path) -> Moto {
        let port = free_port();
        let log = dir.join("moto.log");
        let child = Command::new(moto_server())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "4")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start moto_server");
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen on {port}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto { child, endpoint: format!("http://127.0.0.1:{port}"), log }
    }

    /// Creates `bucket` and a user with only `policy`; returns its keys.
    fn user_with_policy(&self, bucket: &str, policy: &str, dir: &Path) -> (String, String) {
        let file = dir.join("policy.json");
        std::fs::write(&file, policy).unwrap();
        let python = moto_server().with_file_name("python3");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/common/s3/moto_iam.py");
        let out = Command::new(python).arg(script).args([&self.endpoint, bucket]).arg(&file).output().unwrap();
        assert!(out.status.success(), "moto setup: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let (id, secret) = text.trim().split_once(' ').expect("access key id and secret");
        (id.to_string(), secret.to_string())
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- moto log:\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

/// The policy in README.md: the JSON block after "On AWS, for a repository at".
fn readme_policy() -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let at = readme.find("On AWS, for a repository at").expect("README's S3 policy");
    let start = readme[at..].find("```json\n").expect("a json block") + at + "```json\n".len();
    let end = readme[start..].find("```").unwrap() + start;
    let policy = readme[start..end].to_string();
    serde_json::from_str::<serde_json::Value>(&policy).expect("README's policy is JSON");
    policy
}

#[test]
fn readme_policy_is_enough_for_everything_but_expire() {
    let pg =
        PgCluster::start(PgOptions::new().guc("archive_mode", "on").guc("archive_command", "'/bin/false'").guc("wal_keep_size", "'256MB'"));
    let mut env = Env::new(&pg);
    let moto = Moto::start(&env.dir);
    // README's policy is written for s3://backups/pg-main.
    let (id, secret) = moto.user_with_policy("backups", &readme_policy(), &env.dir);
    for (key, value) in [
        ("repository.url", "s3://backups/pg-main"),
        ("repository.endpoint", moto.endpoint.as_str()),
        ("repository.region", "us-east-1"),
        ("repository.access_key_id", id.as_str()),
        ("repository.secret_access_key", secret.as_str()),
        ("wal.partial_interval", "1s"),
    ] {
        env.set(key, &format!("\"{value}\""));
    }
    env.set("repository.path_style", "true");
    env.run_ok(&["init"]);

    pg.set_guc("archive_command", &env.archive_command());
    pg.psql("create table t as select g from generate_series(1, 10000) g");
    pg.psql("select pg_switch_wal()");
    wait_archived(&pg);

    // The streamer stores the segment in progress as a `.streaming` copy and
    // deletes it once the segment is complete.
    let stream = env.cmd(&["stream"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    pg.psql("insert into t select generate_series(1, 1000)");
    std::thread::sleep(Duration::from_secs(3));
    let switched = pg.psql("select pg_walfile_name(pg_current_wal_lsn())");
    pg.psql("select pg_switch_wal()");
    wait_for("the streamed segment to be stored and its copy removed", Duration::from_secs(60), || {
        let info = env.info_json();
        let tl = &info["timelines"][0];
        let stored = tl["wal_ranges"].as_array().and_then(|r| r.last()).is_some_and(|r| r["last"].as_str() >= Some(switched.as_str()));
        let copy = tl["in_progress"]["segment"].as_str() == Some(switched.as_str());
        if stored && !copy { Ok(()) } else { Err(format!("{tl}")) }
    });
    unsafe { libc::kill(stream.id() as i32, libc::SIGINT) };
    let out = stream.wait_with_output().unwrap();
    let log = stderr(&out);
    assert!(!log.contains("denied") && !log.contains("cannot remove"), "the streamer was refused something: {log}");

    let first = env.run_ok(&["backup"]).trim().to_string();
    // The first backup's lock was released (deleted), or this one would wait.
    let second = env.run_ok(&["backup"]).trim().to_string();
    env.run_ok(&["check"]);
    let out = env.run(&["verify", "--deep"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = env.new_dir("restored").join("data");
    env.run_ok(&["restore", "--pgdata", dir.to_str().unwrap(), "--target-immediate"]);
    assert!(dir.join("PG_VERSION").is_file());

    // expire deletes backups and packs: not this identity's right.
    env.set("retention.full_backups", "1");
    let out = env.run(&["expire"]);
    let err = stderr(&out);
    eprintln!("expire with the agent's policy: {err}");
    assert!(!out.status.success(), "expire cannot delete with this policy: {err}");
    assert!(err.to_lowercase().contains("denied") || err.contains("permission"), "says it was refused: {err}");
    let info = env.info_json();
    let ids: Vec<&str> = info["backups"].as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![first.as_str(), second.as_str()], "both backups are still there: {info}");
    let out = env.run(&["verify"]);
    assert!(out.status.success(), "a refused expire leaves the repository whole: {}", stderr(&out));
}
