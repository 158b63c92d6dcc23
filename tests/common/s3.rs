//! The S3-protocol test server: SeaweedFS (`weed mini`) on 127.0.0.1, either a
//! private instance per test (`S3Server::start`, killed on drop, can be stopped
//! and started again for outage tests) or one shared by the whole run
//! (`S3Server::shared`: the server named by WALVAULT_TEST_S3_ENDPOINT, as started
//! by scripts/s3-server.sh, else one started once for this test binary).
//! A missing server binary fails the test; it never skips.

mod weed;

use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use walvault::storage::s3::{ChecksumMode, S3Options};

#[allow(unused_imports)] // the reader keys are for tests that use them, not every test binary
pub use weed::{ACCESS_KEY, READER_ACCESS_KEY, READER_SECRET_KEY, SECRET_KEY};

const REGION: &str = "us-east-1";

pub struct S3Server {
    endpoint: String,
    access_key: String,
    secret_key: String,
    /// None for a server started outside this process.
    weed: Option<weed::Weed>,
    /// Owns the private server's files; removed on drop.
    _dir: Option<tempfile::TempDir>,
}

impl S3Server {
    /// A private server with its own data directory and ports.
    pub fn start() -> S3Server {
        remove_abandoned_dirs();
        let dir = tempfile::Builder::new().prefix(DIR_PREFIX).tempdir().expect("create a temp dir for the S3 server");
        std::fs::write(dir.path().join("owner.pid"), std::process::id().to_string()).expect("write owner.pid");
        let weed = weed::Weed::start(dir.path());
        S3Server {
            endpoint: weed.endpoint(),
            access_key: ACCESS_KEY.into(),
            secret_key: SECRET_KEY.into(),
            weed: Some(weed),
            _dir: Some(dir),
        }
    }

    /// The server shared by all tests of this run: the one named by
    /// WALVAULT_TEST_S3_ENDPOINT (with WALVAULT_TEST_S3_ACCESS_KEY and
    /// WALVAULT_TEST_S3_SECRET_KEY), else one started on first use that lives
    /// until this test process exits. Tests sharing it use fresh buckets.
    pub fn shared() -> &'static S3Server {
        static SHARED: OnceLock<S3Server> = OnceLock::new();
        SHARED.get_or_init(|| match std::env::var("WALVAULT_TEST_S3_ENDPOINT") {
            Ok(endpoint) if !endpoint.is_empty() => {
                let var = |name: &str| {
                    std::env::var(name)
                        .unwrap_or_else(|_| panic!("WALVAULT_TEST_S3_ENDPOINT is set but {name} is not (see scripts/s3-server.sh)"))
                };
                S3Server {
                    endpoint,
                    access_key: var("WALVAULT_TEST_S3_ACCESS_KEY"),
                    secret_key: var("WALVAULT_TEST_S3_SECRET_KEY"),
                    weed: None,
                    _dir: None,
                }
            }
            _ => {
                let server = S3Server::start();
                // Statics are never dropped: clean up at exit. (The process itself
                // dies with us anyway, see weed::spawn_dying_with_us.)
                let weed = server.weed.as_ref().unwrap();
                CLEANUP.set((weed.pid().unwrap(), weed.dir().to_path_buf(), weed.ports)).ok();
                // SAFETY: registers a plain function, run once at process exit.
                unsafe { libc::atexit(cleanup_shared) };
                server
            }
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    pub fn region(&self) -> &str {
        REGION
    }

    /// Options for a store on `bucket` under `prefix`, with the admin credentials.
    pub fn options(&self, bucket: &str, prefix: &str) -> S3Options {
        S3Options {
            bucket: bucket.into(),
            prefix: prefix.into(),
            endpoint: Some(self.endpoint.clone()),
            region: Some(REGION.into()),
            path_style: true,
            access_key_id: Some(self.access_key.clone()),
            secret_access_key: Some(self.secret_key.clone()),
            session_token: None,
            checksums: ChecksumMode::WhenSupported,
        }
    }

    /// A raw SDK client with the admin credentials, for setting up and checking
    /// what the store under test cannot (buckets, raw keys). Build one per test:
    /// a client keeps connections tied to the runtime it first ran on.
    pub fn client(&self) -> aws_sdk_s3::Client {
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(&self.endpoint)
            .force_path_style(true)
            .credentials_provider(Credentials::new(&self.access_key, &self.secret_key, None, None, "walvault-tests"))
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }

    pub async fn create_bucket(&self, name: &str) {
        if let Err(e) = self.client().create_bucket().bucket(name).send().await {
            let text = aws_sdk_s3::error::DisplayErrorContext(&e).to_string();
            if !text.contains("BucketAlreadyOwnedByYou") {
                panic!("{}", self.failure(&format!("cannot create bucket {name} on {}: {text}", self.endpoint)));
            }
        }
    }

    /// Creates a bucket with a name no other test uses and returns the name.
    pub async fn fresh_bucket(&self) -> String {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!("wv-{:08x}-{}", rand::random::<u32>(), COUNTER.fetch_add(1, Ordering::Relaxed));
        self.create_bucket(&name).await;
        name
    }

    /// Kills the server (as a crash would); its data and ports are kept.
    pub fn stop(&mut self) {
        self.weed.as_mut().expect("cannot stop an S3 server started outside the tests").kill();
    }

    /// Starts a stopped server again, on the same data and ports.
    pub fn start_again(&mut self) {
        self.weed.as_mut().expect("cannot restart an S3 server started outside the tests").restart();
    }

    /// `what`, followed by the tail of the server log when we run the server.
    pub fn failure(&self, what: &str) -> String {
        match &self.weed {
            Some(w) => w.failure(what),
            None => what.to_string(),
        }
    }
}

const DIR_PREFIX: &str = "walvault-s3-";

/// Removes the data directories of servers whose test process was killed before
/// it could clean up (they can hold hundreds of MiB).
fn remove_abandoned_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(DIR_PREFIX) {
            continue;
        }
        let Ok(owner) = std::fs::read_to_string(entry.path().join("owner.pid")) else { continue };
        if !Path::new("/proc").join(owner.trim()).exists() {
            let ports = std::fs::read_to_string(entry.path().join("ports")).unwrap_or_default();
            weed::remove_port_sockets(&ports.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u16>>());
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

static CLEANUP: OnceLock<(u32, std::path::PathBuf, weed::Ports)> = OnceLock::new();

extern "C" fn cleanup_shared() {
    if let Some((pid, dir, ports)) = CLEANUP.get() {
        // SAFETY: signals and reaps our own child.
        unsafe {
            libc::kill(*pid as libc::pid_t, libc::SIGKILL);
            libc::waitpid(*pid as libc::pid_t, std::ptr::null_mut(), 0);
        }
        let _ = std::fs::remove_dir_all(dir);
        weed::remove_port_sockets(&ports.all());
    }
}
