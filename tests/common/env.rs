//! An end-to-end environment: keys from `walvault keygen`, a configuration
//! file, a repository (a directory or an S3 bucket prefix), and the built
//! binary, run as the `postgres` user like a real agent (so the files it
//! writes are the same ones archive_command and restore_command use).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::pg::{PgCluster, pg_bin_dir, walvault_for_postgres};
use super::s3::S3Server;

pub struct Env {
    _tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub bin: PathBuf,
    pub config: PathBuf,
    pub keys: PathBuf,
    pub repo_url: String,
    /// The repository directory, for the file backend.
    pub repo_dir: Option<PathBuf>,
    pub recipient: String,
    pub public_key: String,
    settings: Vec<(String, String)>,
    env: Vec<(String, String)>,
}

pub struct EnvBuilder<'a> {
    conninfo: String,
    s3: Option<&'a S3Server>,
    settings: Vec<(String, String)>,
}

/// uid/gid of `postgres` when the tests run as root.
pub fn postgres_ids() -> Option<(u32, u32)> {
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&"postgres")).then(|| (f[2].parse().ok(), f[3].parse().ok())).and_then(|(u, g)| Some((u?, g?)))
    })
}

/// Gives a path (recursively) to the postgres user when running as root.
pub fn chown_tree(path: &Path) {
    if let Some((uid, gid)) = postgres_ids() {
        let _ = Command::new("chown").arg("-R").arg(format!("{uid}:{gid}")).arg(path).status();
    }
}

impl<'a> EnvBuilder<'a> {
    /// A configuration key (TOML value syntax: strings quoted).
    pub fn set(mut self, key: &str, toml_value: &str) -> Self {
        self.settings.push((key.into(), toml_value.into()));
        self
    }

    pub fn s3(mut self, s3: &'a S3Server) -> Self {
        self.s3 = Some(s3);
        self
    }

    pub fn build(self) -> Env {
        let tmp = tempfile::Builder::new().prefix("walvault-env-").tempdir_in("/tmp").expect("temp dir");
        let dir = tmp.path().to_path_buf();
        chown_tree(&dir);
        let bin = walvault_for_postgres();
        let keys = dir.join("keys");
        let mut env = Env {
            _tmp: tmp,
            dir: dir.clone(),
            bin,
            config: dir.join("walvault.toml"),
            keys: keys.clone(),
            repo_url: String::new(),
            repo_dir: None,
            recipient: String::new(),
            public_key: String::new(),
            settings: Vec::new(),
            env: Vec::new(),
        };
        let out = env.run_ok(&["keygen", "--out", keys.to_str().unwrap()]);
        env.recipient = value_after(&out, "recipients = [\"").expect("keygen prints the recipient");
        env.public_key = value_after(&out, "public_key = \"").expect("keygen prints the public key");
        let mut s: Vec<(String, String)> = vec![
            ("postgres.conninfo".into(), toml_str(&self.conninfo)),
            ("postgres.bin_dir".into(), toml_str(&pg_bin_dir().display().to_string())),
            ("encryption.recipients".into(), format!("[{}]", toml_str(&env.recipient))),
            ("encryption.identity_file".into(), toml_str(&keys.join("restore.key").display().to_string())),
            ("signing.key_file".into(), toml_str(&keys.join("agent.key").display().to_string())),
            ("signing.public_key".into(), toml_str(&env.public_key)),
            ("wal.spool_dir".into(), toml_str(&dir.join("spool").display().to_string())),
            ("backup.wal_timeout".into(), toml_str("120s")),
            ("daemon.metrics_listen".into(), toml_str("")),
        ];
        match self.s3 {
            Some(s3) => {
                // The harness's S3 client is async; tests may or may not run in a runtime.
                let bucket = std::thread::scope(|scope| {
                    scope
                        .spawn(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(s3.fresh_bucket()))
                        .join()
                        .unwrap()
                });
                env.repo_url = format!("s3://{bucket}/repo");
                s.push(("repository.url".into(), toml_str(&env.repo_url)));
                s.push(("repository.endpoint".into(), toml_str(s3.endpoint())));
                s.push(("repository.region".into(), toml_str(s3.region())));
                s.push(("repository.path_style".into(), "true".into()));
                s.push(("repository.access_key_id".into(), toml_str(s3.access_key())));
                s.push(("repository.secret_access_key".into(), toml_str(s3.secret_key())));
            }
            None => {
                let repo = dir.join("repo");
                env.repo_url = format!("file://{}", repo.display());
                env.repo_dir = Some(repo);
                s.push(("repository.url".into(), toml_str(&env.repo_url)));
            }
        }
        s.extend(self.settings);
        env.settings = s;
        env.write_config();
        std::fs::create_dir_all(dir.join("spool")).unwrap();
        chown_tree(&dir);
        env
    }
}

fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn value_after(text: &str, marker: &str) -> Option<String> {
    let start = text.find(marker)? + marker.len();
    let end = text[start..].find('"')? + start;
    Some(text[start..end].to_string())
}

impl Env {
    pub fn builder(pg: &PgCluster) -> EnvBuilder<'static> {
        Self::builder_for(&pg.conninfo())
    }

    /// An environment for a server that is not running yet (set
    /// `postgres.conninfo` once it is).
    pub fn builder_for(conninfo: &str) -> EnvBuilder<'static> {
        EnvBuilder { conninfo: conninfo.to_string(), s3: None, settings: Vec::new() }
    }

    /// A file-backed environment with defaults.
    pub fn new(pg: &PgCluster) -> Env {
        Self::builder(pg).build()
    }

    /// Changes or adds a configuration key and rewrites the file.
    pub fn set(&mut self, key: &str, toml_value: &str) {
        self.settings.retain(|(k, _)| k != key);
        self.settings.push((key.into(), toml_value.into()));
        self.write_config();
    }

    /// An environment variable for every walvault run (e.g. WALVAULT_TEST_FAULTS).
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.env.retain(|(k, _)| k != name);
        self.env.push((name.into(), value.into()));
    }

    pub fn write_config(&self) {
        let mut sections: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
        for (k, v) in &self.settings {
            let (section, key) = k.split_once('.').expect("section.key");
            sections.entry(section).or_default().push(format!("{key} = {v}"));
        }
        let mut text = String::new();
        for (section, lines) in sections {
            text.push_str(&format!("[{section}]\n{}\n\n", lines.join("\n")));
        }
        std::fs::write(&self.config, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&self.config, std::fs::Permissions::from_mode(0o600)).unwrap();
        chown_tree(&self.config);
    }

    /// `walvault --config <cfg> ARGS`, as the postgres user.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--config").arg(&self.config).args(args).current_dir(&self.dir);
        c.env_remove("WALVAULT_CONFIG").env("NO_COLOR", "1");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        if let Some((uid, gid)) = postgres_ids() {
            c.uid(uid).gid(gid);
        }
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run walvault")
    }

    /// Runs and returns stdout; panics with both streams on failure.
    pub fn run_ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "walvault {args:?} failed ({}):\nstdout: {}\nstderr: {}", out.status, stdout(&out), stderr(&out));
        stdout(&out)
    }

    /// Runs, expecting failure; returns (exit code, stderr).
    pub fn run_err(&self, args: &[&str]) -> (i32, String) {
        let out = self.run(args);
        assert!(!out.status.success(), "walvault {args:?} should have failed:\nstdout: {}\nstderr: {}", stdout(&out), stderr(&out));
        (out.status.code().unwrap_or(-1), stderr(&out))
    }

    /// `archive_command` for the cluster (unquoted; `set_guc` quotes it).
    pub fn archive_command(&self) -> String {
        format!("{} --config {} archive-push %p", self.bin.display(), self.config.display())
    }

    /// The repository as a store, for tests that look at or damage objects.
    pub fn info_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.run_ok(&["info", "--json"])).expect("info --json is JSON")
    }

    /// A directory the postgres user owns, for restores.
    pub fn new_dir(&self, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::create_dir_all(&p).unwrap();
        chown_tree(&p);
        p
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
