//! Runs a PostgreSQL server on a restored data directory for `restore --replay`:
//! on a private port, listening only on a socket in a private directory, with
//! trust authentication on that socket alone (a temporary hba_file passed on
//! the command line, so nothing in the data directory changes), as the data
//! directory's owner.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result, ResultExt};

/// Finds a PostgreSQL program in `bin_dir`, else on PATH.
pub fn find_program(bin_dir: &str, name: &str) -> Result<PathBuf> {
    if !bin_dir.is_empty() {
        let p = Path::new(bin_dir).join(name);
        if p.is_file() {
            return Ok(p);
        }
        return Err(Error::with_hint(format!("{} not found", p.display()), "set postgres.bin_dir to the directory of the server binaries"));
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(name)).find(|p| p.is_file()))
        .ok_or_else(|| Error::with_hint(format!("'{name}' is not on PATH"), "set postgres.bin_dir to the directory of the server binaries"))
}

/// The major version of a `postgres` binary (`postgres (PostgreSQL) 15.18 ...`).
pub fn binary_major(postgres: &Path) -> Result<u32> {
    let out = Command::new(postgres).arg("--version").output().with_context(|| format!("cannot run {}", postgres.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|w| {
            w.split('.').next().and_then(|m| m.trim_end_matches(|c: char| !c.is_ascii_digit()).parse::<u32>().ok()).filter(|m| *m >= 9)
        })
        .ok_or_else(|| Error::failed(format!("cannot read the version of {} ('{}')", postgres.display(), text.trim())))
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// The user and group that own a path, and the user's name.
pub fn owner_of(path: &Path) -> Result<(u32, u32, String)> {
    let md = std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    let name = user_name(md.uid()).unwrap_or_else(|| md.uid().to_string());
    Ok((md.uid(), md.gid(), name))
}

/// The name of a user id, from /etc/passwd.
pub fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[2].parse::<u32>().ok() == Some(uid)).then(|| f[0].to_string())
    })
}

pub struct LocalServer {
    child: Child,
    pub port: u16,
    pub socket_dir: PathBuf,
    pub log_path: PathBuf,
    pub pgdata: PathBuf,
}

impl LocalServer {
    /// Starts `postgres` on `pgdata`. `work_dir` receives the socket, the
    /// temporary hba file and the log; it must be private to the owner.
    pub fn start(postgres: &Path, pgdata: &Path, port: u16, work_dir: &Path, archive_off: bool) -> Result<LocalServer> {
        use std::os::unix::process::CommandExt;
        let (uid, gid, _) = owner_of(pgdata)?;
        let socket_dir = work_dir.join("socket");
        std::fs::create_dir_all(&socket_dir)?;
        let hba = work_dir.join("pg_hba.conf");
        std::fs::write(&hba, "# walvault restore --replay: the private socket only\nlocal all all trust\n")?;
        let log_path = work_dir.join("postgres.log");
        let log = std::fs::File::create(&log_path)?;
        let running_as_root = unsafe { libc::geteuid() } == 0;
        for p in [work_dir, &socket_dir, &hba, &log_path] {
            if running_as_root {
                std::os::unix::fs::chown(p, Some(uid), Some(gid))?;
            }
        }
        let mut cmd = Command::new(postgres);
        cmd.arg("-D")
            .arg(pgdata)
            .arg("-p")
            .arg(port.to_string())
            .arg("-c")
            .arg("listen_addresses=")
            .arg("-c")
            .arg(format!("unix_socket_directories={}", socket_dir.display()))
            .arg("-c")
            .arg(format!("hba_file={}", hba.display()))
            .arg("-c")
            .arg("logging_collector=off")
            .arg("-c")
            .arg("log_min_messages=log")
            .args(if archive_off { &["-c", "archive_mode=off"][..] } else { &[][..] })
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if running_as_root {
            // PostgreSQL refuses to run as root: run it as the data directory's
            // owner (std also drops root's supplementary groups).
            cmd.uid(uid).gid(gid);
        }
        let child = cmd.spawn().with_context(|| format!("cannot start {}", postgres.display()))?;
        Ok(LocalServer { child, port, socket_dir, log_path, pgdata: pgdata.to_path_buf() })
    }

    /// The exit status if the server has stopped.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fast shutdown (SIGINT), waiting up to `timeout`, then immediate (SIGQUIT).
    pub async fn stop(mut self, timeout: Duration) -> Result<()> {
        if self.exited().is_some() {
            return Ok(());
        }
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        unsafe { libc::kill(self.child.id() as i32, libc::SIGQUIT) };
        let _ = self.child.wait();
        Err(Error::failed("PostgreSQL did not stop within the time limit; it was stopped immediately"))
    }

    /// Leaves the server running (for --keep-running).
    pub fn detach(self) {
        std::mem::forget(self);
    }
}
