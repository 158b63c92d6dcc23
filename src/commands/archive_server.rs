//! `walvault archive-server`: archive-push for the walvault archive module
//! (`archive_library = 'walvault'`, PostgreSQL 15 and later, `pgext/`).
//!
//! The module starts one server per archiver process, its standard input and
//! output a socket. Each request is a line holding a WAL file's path, as
//! archive-push gets it (`%p`); the server runs archive-push for it and
//! answers with the exit code archive-push would have had, as a decimal line.
//! Messages go to standard error, the archiver's, so they reach the server
//! log as archive-push's do. What this saves per file is a shell, a process
//! start, reading the configuration and opening the store.
//!
//! The server reloads its configuration when the file changes, and leaves
//! when its input ends: when the archiver exits or the module replaces it.
//! When its own binary has been replaced (walvault upgraded), it answers the
//! next request with `again` instead of a code and leaves: the module then
//! starts the new walvault and asks it, so an upgrade takes effect at the
//! next file rather than at the next restart of PostgreSQL.

use std::io::{BufRead, Write};
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::time::SystemTime;

use super::Ctx;
use super::archive_push::{self, FileIdentity};
use crate::cli::ArchivePushArgs;
use crate::config;
use crate::error::{Error, Result};
use crate::storage::Store;

pub async fn run(ctx: &Ctx) -> Result<i32> {
    let mut answers = answer_channel()?;
    let mut state = Loaded::new(ctx.clone());
    let mut requests = requests();
    let binary = Binary::now();
    tracing::debug!("archive server ready");
    while let Some(line) = requests.recv().await {
        if let Some(path) = binary.replaced() {
            tracing::info!(
                "archive-server: {} was replaced since this server started (walvault upgraded?): leaving, so that the module runs the new one",
                path.display()
            );
            let _ = writeln!(answers, "again").and_then(|()| answers.flush());
            break;
        }
        let code = match state.current().await {
            Ok((ctx, store)) => {
                let args = ArchivePushArgs { path: PathBuf::from(&line) };
                match archive_push::push(ctx, &args, Some(store)).await {
                    Ok(code) => code,
                    Err(e) => e.report(),
                }
            }
            Err(e) => e.report(),
        };
        // The module is gone if this fails: nothing left to answer.
        if writeln!(answers, "{code}").and_then(|()| answers.flush()).is_err() {
            break;
        }
    }
    Ok(0)
}

/// The requests, read from standard input by a thread of their own (the
/// runtime keeps running tasks between them); the channel closes when the
/// input ends or cannot be read.
fn requests() -> tokio::sync::mpsc::Receiver<String> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(line) => {
                    if tx.blocking_send(line).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!("archive-server: cannot read a request: {e}");
                    return;
                }
            }
        }
    });
    rx
}

/// Takes standard output for the answers alone: it moves to a descriptor of
/// its own (not inherited by the processes the server starts), and standard
/// output becomes standard error, so that nothing printed by mistake can pass
/// for an answer.
fn answer_channel() -> Result<std::fs::File> {
    // SAFETY: plain descriptor calls; the new descriptor is owned by the File.
    unsafe {
        let fd = libc::fcntl(libc::STDOUT_FILENO, libc::F_DUPFD_CLOEXEC, 3);
        if fd < 0 || libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO) < 0 {
            return Err(Error::failed(format!("archive-server: cannot set up its answers: {}", std::io::Error::last_os_error())));
        }
        Ok(std::fs::File::from_raw_fd(fd))
    }
}

/// The configuration and the store, reloaded when the configuration file
/// changes (an operator's edit takes effect at the next file, as it would
/// with archive-push).
struct Loaded {
    ctx: Ctx,
    store: Option<Store>,
    stamp: Option<SystemTime>,
}

impl Loaded {
    fn new(ctx: Ctx) -> Self {
        let stamp = stamp_of(&ctx);
        Loaded { ctx, store: None, stamp }
    }

    async fn current(&mut self) -> Result<(&Ctx, &Store)> {
        let stamp = stamp_of(&self.ctx);
        if stamp != self.stamp {
            let env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
            let config = config::load(self.ctx.config.source.as_deref(), &env, &self.ctx.overrides)?;
            tracing::info!("archive-server: configuration reloaded");
            self.ctx = Ctx { config, overrides: self.ctx.overrides.clone() };
            self.store = None;
            self.stamp = stamp;
        }
        if self.store.is_none() {
            self.store = Some(self.ctx.store().await?);
        }
        Ok((&self.ctx, self.store.as_ref().expect("opened above")))
    }
}

fn stamp_of(ctx: &Ctx) -> Option<SystemTime> {
    let source = ctx.config.source.as_ref()?;
    std::fs::metadata(source).and_then(|m| m.modified()).ok()
}

/// The executable this server runs: the file it was started from, and the
/// path it was started by when that is a path (through a symlink, say), each
/// with the identity of the file there when the server started. A package
/// upgrade puts a new file at the path (a new inode), or points the symlink
/// at a new one; the running server keeps the old file.
struct Binary {
    watched: Vec<(PathBuf, Option<FileIdentity>)>,
}

impl Binary {
    fn now() -> Self {
        let path = std::env::current_exe().unwrap_or_default();
        let mut watched = vec![(path.clone(), FileIdentity::of(&path))];
        if let Some(invoked) = std::env::args_os().next().map(PathBuf::from)
            && invoked.components().count() > 1
            && invoked != path
        {
            let identity = FileIdentity::of(&invoked);
            watched.push((invoked, identity));
        }
        Binary { watched }
    }

    /// The path where another file is now, if any. A path that cannot be
    /// read for the moment (mid-upgrade) is not taken for a replacement.
    fn replaced(&self) -> Option<&std::path::Path> {
        self.watched.iter().find_map(|(path, then)| match (then, FileIdentity::of(path)) {
            (Some(then), Some(now)) if *then != now => Some(path.as_path()),
            _ => None,
        })
    }
}
