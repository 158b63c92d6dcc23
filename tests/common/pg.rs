//! Throwaway PostgreSQL clusters: initdb in a temp dir under /tmp, a free
//! port on 127.0.0.1, the Unix socket in the temp dir. PostgreSQL refuses to
//! run as root, so when the tests are root (CI) every PostgreSQL program runs
//! as the `postgres` system user and the temp dir is handed to it.
//!
//! Binaries come from `WALVAULT_TEST_PG_BIN` (default
//! `/usr/lib/postgresql/15/bin`); a missing binary fails the test rather than
//! skipping it. Set `WALVAULT_TEST_KEEP=1` to keep the temp dir for a look.

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const DEFAULT_PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The PostgreSQL bin directory under test.
pub fn pg_bin_dir() -> PathBuf {
    PathBuf::from(std::env::var("WALVAULT_TEST_PG_BIN").unwrap_or_else(|_| DEFAULT_PG_BIN.to_string()))
}

/// How to build a cluster. Local socket connections by the `postgres` role
/// are always trusted (the harness's psql needs them); `auth` is the method
/// for everything else unless `hba` lines replace those defaults.
#[derive(Debug, Clone)]
pub struct PgOptions {
    auth: String,
    hba: Vec<String>,
    gucs: Vec<(String, String)>,
    initdb_args: Vec<String>,
    server_env: Vec<(String, String)>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions { auth: "trust".into(), hba: Vec::new(), gucs: Vec::new(), initdb_args: Vec::new(), server_env: Vec::new() }
    }
}

impl PgOptions {
    pub fn new() -> Self {
        Self::default()
    }

    /// The pg_hba.conf method for non-`postgres` socket and TCP connections.
    pub fn auth(mut self, method: &str) -> Self {
        self.auth = method.into();
        self
    }

    /// A pg_hba.conf line. Given any, they replace the default lines (only
    /// the harness's own `local ... postgres trust` lines stay, first).
    pub fn hba(mut self, line: &str) -> Self {
        self.hba.push(line.into());
        self
    }

    /// A setting for postgresql.conf (value as written there, quoted if need be).
    pub fn guc(mut self, name: &str, value: &str) -> Self {
        self.gucs.push((name.into(), value.into()));
        self
    }

    pub fn initdb_arg(mut self, arg: &str) -> Self {
        self.initdb_args.push(arg.into());
        self
    }

    /// An environment variable for the server (and so archive_command).
    pub fn server_env(mut self, name: &str, value: &str) -> Self {
        self.server_env.push((name.into(), value.into()));
        self
    }
}

pub struct PgCluster {
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    bin: PathBuf,
    /// uid and gid of the `postgres` user when the tests run as root.
    owner: Option<(u32, u32)>,
    postmaster: Option<Child>,
    version_num: u32,
    options: PgOptions,
}

impl PgCluster {
    /// initdb, configure, start, and wait until it accepts connections.
    pub fn start(options: PgOptions) -> PgCluster {
        let bin = pg_bin_dir();
        assert!(
            bin.join("postgres").is_file() && bin.join("initdb").is_file(),
            "PostgreSQL binaries not found in {}; install PostgreSQL or set WALVAULT_TEST_PG_BIN",
            bin.display()
        );
        let owner = postgres_owner();
        let dir = tempfile::Builder::new().prefix("walvault-test-").tempdir_in("/tmp").expect("create a temp dir under /tmp");
        let root = dir.path().to_path_buf();
        chown(&root, owner);
        let mut cluster = PgCluster {
            data: root.join("data"),
            log: root.join("postgres.log"),
            root,
            dir: Some(dir),
            port: 0,
            version_num: 0,
            bin,
            owner,
            postmaster: None,
            options,
        };
        cluster.version_num = cluster.read_version();
        cluster.initdb();
        cluster.write_hba();
        for attempt in 1..=5 {
            cluster.port = free_port();
            cluster.append_conf(&[("port".into(), cluster.port.to_string())]);
            match cluster.spawn_and_wait() {
                Ok(()) => return cluster,
                // Another test took the port between our probe and the bind.
                Err(log) if attempt < 5 && (log.contains("could not bind") || log.contains("could not create any TCP/IP sockets")) => {
                    eprintln!("port {} was taken; retrying", cluster.port)
                }
                Err(log) => panic!("PostgreSQL did not start; log:\n{log}"),
            }
        }
        unreachable!()
    }

    /// Starts a server on an existing data directory (a restored one): a new
    /// port and socket directory, archiving off (a restored copy must not
    /// archive into the repository it came from). Stopped on drop; the data
    /// directory is left where it is.
    pub fn adopt(data: &Path) -> PgCluster {
        Self::adopt_with(data, false)
    }

    /// `adopt`, keeping the directory's archiving settings when `archiving`
    /// (a restored cluster that becomes the new primary, archiving into the
    /// repository it came from).
    pub fn adopt_with(data: &Path, archiving: bool) -> PgCluster {
        let bin = pg_bin_dir();
        let owner = postgres_owner();
        let dir = tempfile::Builder::new().prefix("walvault-adopt-").tempdir_in("/tmp").expect("create a temp dir under /tmp");
        let root = dir.path().to_path_buf();
        chown(&root, owner);
        let mut cluster = PgCluster {
            data: data.to_path_buf(),
            log: root.join("postgres.log"),
            root,
            dir: Some(dir),
            port: 0,
            version_num: 0,
            bin,
            owner,
            postmaster: None,
            options: PgOptions::new(),
        };
        cluster.version_num = cluster.read_version();
        for attempt in 1..=5 {
            cluster.port = free_port();
            let mut f = OpenOptions::new().append(true).open(data.join("postgresql.auto.conf")).expect("open postgresql.auto.conf");
            writeln!(
                f,
                "port = {}\nunix_socket_directories = {}\nlisten_addresses = ''{}",
                cluster.port,
                quote_literal(&cluster.root.display().to_string()),
                if archiving { "" } else { "\narchive_mode = off" }
            )
            .unwrap();
            match cluster.spawn_and_wait() {
                Ok(()) => return cluster,
                Err(log) if attempt < 5 && log.contains("could not bind") => {}
                Err(log) => panic!("the restored cluster did not start; log:\n{log}"),
            }
        }
        unreachable!()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn socket_dir(&self) -> &Path {
        &self.root
    }

    /// The temp dir: holds data/, the log and the socket; a place for test
    /// files the server must read (see `chown_to_postgres`).
    pub fn dir(&self) -> &Path {
        &self.root
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    pub fn log_file(&self) -> &Path {
        &self.log
    }

    /// Unix-socket connection string for the `postgres` superuser.
    pub fn conninfo(&self) -> String {
        format!("host={} port={} user=postgres dbname=postgres", self.root.display(), self.port)
    }

    pub fn conninfo_tcp(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port)
    }

    /// `server_version_num` of the binaries, e.g. 150018.
    pub fn version_num(&self) -> u32 {
        self.version_num
    }

    pub fn major(&self) -> u32 {
        self.version_num / 10000
    }

    /// A program from the PostgreSQL bin directory.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// A command that runs as the cluster's owner in its temp dir, with a
    /// clean environment. Bare names are looked up in the bin directory.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let program = program.as_ref();
        let in_bin = self.bin.join(program);
        let mut cmd = Command::new(if !program.to_string_lossy().contains('/') && in_bin.exists() { in_bin.as_os_str() } else { program });
        cmd.current_dir(&self.root).env_clear().env("PATH", "/usr/local/bin:/usr/bin:/bin").env("HOME", &self.root).env("LC_ALL", "C");
        if let Ok(tz) = std::env::var("TZ") {
            cmd.env("TZ", tz);
        }
        if let Some((uid, gid)) = self.owner {
            // std drops supplementary groups when root changes uid.
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// Runs SQL with psql as `postgres`; the unaligned, tuples-only output
    /// without its final newline. Panics with psql's error and the log tail.
    pub fn psql(&self, sql: &str) -> String {
        self.try_psql(sql).unwrap_or_else(|e| panic!("psql failed: {e}\nSQL: {sql}\nserver log tail:\n{}", self.log_tail()))
    }

    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        self.try_psql_db("postgres", sql)
    }

    pub fn try_psql_db(&self, dbname: &str, sql: &str) -> Result<String, String> {
        let out = self
            .command("psql")
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.root)
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", dbname, "-c", sql])
            .output()
            .expect("run psql");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim_end_matches('\n').to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// ALTER SYSTEM, reload, and wait until new sessions see the new
    /// configuration (a reload is asynchronous).
    pub fn set_guc(&self, name: &str, value: &str) {
        self.set_gucs(&[(name, value)]);
    }

    /// Several settings with one reload.
    pub fn set_gucs(&self, settings: &[(&str, &str)]) {
        let before = self.psql("SELECT pg_conf_load_time()");
        for (name, value) in settings {
            self.psql(&format!("ALTER SYSTEM SET {name} = {}", quote_literal(value)));
        }
        self.psql("SELECT pg_reload_conf()");
        let deadline = Instant::now() + READY_TIMEOUT;
        while self.psql("SELECT pg_conf_load_time()") == before {
            assert!(Instant::now() < deadline, "the server did not reload its configuration; log:\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// ALTER SYSTEM and restart, for settings that need one.
    pub fn set_guc_restart(&mut self, name: &str, value: &str) {
        self.psql(&format!("ALTER SYSTEM SET {name} = {}", quote_literal(value)));
        self.restart();
    }

    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Fast shutdown (SIGINT), waiting for the postmaster to exit.
    pub fn stop(&mut self) {
        if let Some(child) = self.postmaster.take() {
            self.signal_and_reap(child, libc::SIGINT, STOP_TIMEOUT);
        }
    }

    /// Starts the stopped (or killed) cluster again.
    pub fn start_again(&mut self) {
        assert!(self.postmaster.is_none(), "the cluster is running");
        if let Err(log) = self.spawn_and_wait() {
            panic!("PostgreSQL did not start again; log:\n{log}");
        }
    }

    /// SIGKILL to the postmaster: a crash, with recovery on the next start.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.postmaster.take() {
            child.kill().expect("SIGKILL the postmaster");
            child.wait().expect("reap the postmaster");
            // Orphaned backends notice the postmaster's death and exit;
            // give them a moment so the next start finds the shared memory free.
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Whether the postmaster exited by itself (after a PANIC it could not
    /// recover from, say); reaps it if so.
    pub fn exited(&mut self) -> bool {
        let gone = self.postmaster.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_some());
        if gone {
            self.postmaster = None;
        }
        gone
    }

    pub fn is_running(&self) -> bool {
        self.postmaster.is_some()
    }

    /// The postmaster's pid.
    pub fn pid(&self) -> Option<u32> {
        self.postmaster.as_ref().map(|c| c.id())
    }

    /// The last 60 lines of the server log.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// Gives a file (or directory) the tests wrote to the server's user,
    /// e.g. a TLS key, which PostgreSQL wants owned by itself and 0600.
    pub fn chown_to_postgres(&self, path: &Path) {
        chown(path, self.owner);
    }

    fn read_version(&self) -> u32 {
        let out = run(self.command("postgres").arg("-V"));
        let text = String::from_utf8_lossy(&out.stdout);
        // "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
        let version = text.split(") ").nth(1).unwrap_or("");
        walvault::pg::conn::parse_server_version(version).unwrap_or_else(|| panic!("cannot read the version from {text:?}"))
    }

    fn initdb(&self) {
        let mut cmd = self.command("initdb");
        cmd.arg("-D").arg(&self.data).args(["-U", "postgres", "-A", "trust", "-k", "-E", "UTF8", "--locale=C", "-N"]);
        cmd.args(&self.options.initdb_args);
        run(&mut cmd);
        let mut conf = vec![
            ("listen_addresses", "'127.0.0.1'".to_string()),
            ("unix_socket_directories", quote_literal(&self.root.display().to_string())),
            ("wal_level", "replica".into()),
            ("max_wal_senders", "10".into()),
            ("max_replication_slots", "10".into()),
            ("logging_collector", "off".into()),
            ("log_destination", "'stderr'".into()),
            ("log_line_prefix", "'%m [%p] %q%u@%d '".into()),
            ("lc_messages", "'C'".into()),
            ("shared_buffers", "'16MB'".into()),
            // Tests crash servers with SIGKILL, never the machine.
            ("fsync", "off".into()),
        ];
        conf.extend(self.options.gucs.iter().map(|(k, v)| (k.as_str(), v.clone())));
        let owned: Vec<(String, String)> = conf.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        self.append_conf(&owned);
    }

    fn write_hba(&self) {
        let mut lines = vec!["local all postgres trust".to_string(), "local replication postgres trust".to_string()];
        if self.options.hba.is_empty() {
            let auth = &self.options.auth;
            lines.extend([
                format!("local all all {auth}"),
                format!("local replication all {auth}"),
                format!("host all all 127.0.0.1/32 {auth}"),
                format!("host replication all 127.0.0.1/32 {auth}"),
            ]);
        } else {
            lines.extend(self.options.hba.iter().cloned());
        }
        fs::write(self.data.join("pg_hba.conf"), lines.join("\n") + "\n").expect("write pg_hba.conf");
    }

    fn append_conf(&self, settings: &[(String, String)]) {
        let mut f = OpenOptions::new().append(true).open(self.data.join("postgresql.conf")).expect("open postgresql.conf");
        for (k, v) in settings {
            writeln!(f, "{k} = {v}").expect("write postgresql.conf");
        }
    }

    /// Starts the postmaster as our child (so it can be reaped after kill9)
    /// and waits for pg_isready. Err carries the log tail.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = OpenOptions::new().create(true).append(true).open(&self.log).expect("open the server log");
        chown(&self.log, self.owner);
        let mut cmd = self.command("postgres");
        cmd.arg("-D").arg(&self.data).stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        for (k, v) in &self.options.server_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn postgres");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("poll postgres") {
                return Err(format!("postgres exited with {status}\n{}", self.log_tail()));
            }
            let ready = self
                .command("pg_isready")
                .arg("-q")
                .arg("-h")
                .arg(&self.root)
                .args(["-p", &self.port.to_string()])
                .status()
                .expect("run pg_isready");
            if ready.success() {
                self.postmaster = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                child.kill().ok();
                child.wait().ok();
                return Err(format!("not ready after {READY_TIMEOUT:?}\n{}", self.log_tail()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal_and_reap(&self, mut child: Child, signal: i32, timeout: Duration) {
        // SAFETY: signalling our own child process by its pid.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + timeout;
        while child.try_wait().expect("poll postgres").is_none() {
            if Instant::now() > deadline {
                eprintln!("postgres did not stop within {timeout:?}; killing it\n{}", self.log_tail());
                child.kill().ok();
                child.wait().ok();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Some(child) = self.postmaster.take() {
            // Immediate shutdown: nothing of a test cluster needs saving.
            self.signal_and_reap(child, libc::SIGQUIT, Duration::from_secs(10));
        }
        if std::env::var_os("WALVAULT_TEST_KEEP").is_some()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("keeping the test cluster in {}", dir.keep().display());
        }
    }
}

/// Makes the built `walvault` binary runnable by the server's user (for
/// archive_command and restore_command): a copy in a 0755 directory under
/// /tmp, since the build directory may not be reachable for `postgres`.
/// Test processes of one build share the copy; copies of older builds of
/// the same binary, and any unused for a day, are removed.
pub fn walvault_for_postgres() -> PathBuf {
    static COPY: OnceLock<PathBuf> = OnceLock::new();
    COPY.get_or_init(|| {
        let built = Path::new(env!("CARGO_BIN_EXE_walvault"));
        let meta = fs::metadata(built).expect("the walvault binary is built");
        let source = format!("walvault-bin-{:016x}-", hash(&built));
        let name = format!("{source}{:016x}", hash(&(meta.len(), meta.modified().ok())));
        sweep_binary_copies(&source, &name);
        let dir = Path::new("/tmp").join(&name);
        fs::create_dir_all(&dir).expect("create the binary directory");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        // Marks the directory as in use for the day-old sweep.
        fs::write(dir.join("last-used"), std::process::id().to_string()).unwrap();
        let target = dir.join("walvault");
        if fs::metadata(&target).map(|m| m.len()).ok() != Some(meta.len()) {
            let tmp = dir.join(format!("walvault.{}.tmp", std::process::id()));
            fs::copy(built, &tmp).expect("copy the walvault binary");
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).unwrap();
            fs::rename(&tmp, &target).unwrap();
        }
        target
    })
    .clone()
}

fn hash(value: &impl std::hash::Hash) -> u64 {
    use std::hash::Hasher;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// Removes copies of other builds of this binary (`source` prefix) and any
/// copy unused for a day; each is some 100 MB.
fn sweep_binary_copies(source: &str, keep: &str) {
    let Ok(entries) = fs::read_dir("/tmp") else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("walvault-bin-") || name == keep {
            continue;
        }
        let day_old = entry
            .metadata()
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(86_400));
        if name.starts_with(source) || day_old {
            fs::remove_dir_all(entry.path()).ok();
        }
    }
}

/// A single-quoted SQL (and postgresql.conf) literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// uid and gid of `postgres` when we are root; None means run as ourselves.
fn postgres_owner() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let passwd = fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .expect("running as root, the tests need the `postgres` system user to run PostgreSQL");
    let fields: Vec<&str> = line.split(':').collect();
    Some((fields[2].parse().unwrap(), fields[3].parse().unwrap()))
}

fn chown(path: &Path, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().unwrap().port()
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A self-signed certificate and its key in the cluster's directory, owned by
/// the postgres user (the server refuses a key others can read).
pub fn make_cert(cluster: &PgCluster, name: &str, key_args: &[&str], digest: &str, san: &str) -> (PathBuf, PathBuf) {
    let dir = cluster.dir();
    let (crt, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-nodes", "-days", "2", "-subj", "/CN=walvault-test", digest, "-addext"])
        .arg(format!("subjectAltName={san}"))
        .args(key_args)
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    cluster.chown_to_postgres(&key);
    cluster.chown_to_postgres(&crt);
    (crt, key)
}

/// The walvault archive module (`pgext/`) built for the PostgreSQL under
/// test, with its own `pg_config`: a `walvault.so` the postgres user can load
/// (`archive_library = '<path>'`). Built once per source and server; a
/// missing `pg_config` or missing server headers fail the test (scripts/test.sh
/// installs them).
pub fn archive_module() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("pgext");
            let pg_config = pg_bin_dir().join("pg_config");
            let text = fs::read(source.join("walvault.c")).expect("pgext/walvault.c");
            let makefile = fs::read(source.join("Makefile")).expect("pgext/Makefile");
            let dir = Path::new("/tmp").join(format!("walvault-pgext-{:016x}", hash(&(text, makefile, &pg_config))));
            let module = dir.join("walvault.so");
            if module.exists() {
                return module;
            }
            // Built in a directory of this process's, then moved in whole:
            // test processes build it concurrently.
            let work = Path::new("/tmp").join(format!("walvault-pgext-build-{}", std::process::id()));
            fs::remove_dir_all(&work).ok();
            fs::create_dir_all(&work).unwrap();
            for file in ["walvault.c", "Makefile"] {
                fs::copy(source.join(file), work.join(file)).unwrap();
            }
            let out = Command::new("make")
                .arg("-C")
                .arg(&work)
                .arg(format!("PG_CONFIG={}", pg_config.display()))
                .output()
                .expect("run make (apt-get install make)");
            assert!(
                out.status.success(),
                "building the archive module with {} failed (scripts/test.sh installs postgresql-server-dev-15):\n{}{}",
                pg_config.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            fs::set_permissions(&work, fs::Permissions::from_mode(0o755)).unwrap();
            fs::set_permissions(work.join("walvault.so"), fs::Permissions::from_mode(0o755)).unwrap();
            if fs::rename(&work, &dir).is_err() {
                // Another process got there first.
                fs::remove_dir_all(&work).ok();
            }
            module
        })
        .clone()
}
