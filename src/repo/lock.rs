//! Repository locks: one object per lock name, created only if absent, with an
//! owner, a token and an expiry that the holder refreshes. A lock whose expiry
//! has passed (its holder died) is taken over. On stores that ignore
//! If-None-Match (the descriptor says so), a would-be holder waits a settle
//! delay and reads the lock back: only the last writer sees its own token, so at
//! most one holder proceeds. The holder re-reads the lock at each refresh and
//! stops its work if someone else holds it.
//!
//! A holder that was killed (kill -9, OOM) leaves its lock behind. When the
//! lock names a process on this machine (same host name, boot and pid
//! namespace) that no longer runs, it is taken over at once instead of
//! after its expiry: a crashed backup must not block the next one for ten
//! minutes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{RepoError, layout};
use crate::storage::{self, CreateOutcome, Store};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LockBody {
    pub token: String,
    pub owner: String,
    pub purpose: String,
    pub acquired_at: chrono::DateTime<chrono::Utc>,
    pub expires_at: chrono::DateTime<chrono::Utc>,
    /// The holding process, to tell on the same machine that it is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessId>,
}

/// A process, identified well enough to tell that it has exited: pids are
/// reused, so the start time (clock ticks after boot) is part of it, and a
/// pid means something only in its pid namespace on one boot of one host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessId {
    pub host: String,
    pub boot_id: String,
    pub pid_namespace: String,
    pub pid: u32,
    pub start_ticks: u64,
}

impl ProcessId {
    /// This process; None where /proc does not tell (then locks only expire).
    pub fn current() -> Option<ProcessId> {
        let pid = std::process::id();
        Some(ProcessId {
            host: hostname(),
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?.trim().to_string(),
            pid_namespace: std::fs::read_link("/proc/self/ns/pid").ok()?.to_string_lossy().into_owned(),
            pid,
            start_ticks: process_start_ticks(pid)?,
        })
    }

    /// True when this process certainly no longer runs: it was on this host,
    /// and either the machine rebooted since, or (same pid namespace) no
    /// process with its pid and start time exists.
    pub fn is_gone(&self) -> bool {
        let Some(me) = ProcessId::current() else { return false };
        if self.host != me.host {
            return false;
        }
        if self.boot_id != me.boot_id {
            return true;
        }
        if self.pid_namespace != me.pid_namespace {
            return false;
        }
        process_start_ticks(self.pid) != Some(self.start_ticks)
    }
}

/// Field 22 of /proc/PID/stat: when the process started, in clock ticks after boot.
fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "unknown-host".into())
}

#[derive(Debug, Clone)]
pub struct LockOptions {
    pub ttl: Duration,
    /// Wait this long before confirming ownership on stores without conditional writes.
    pub settle: Duration,
    pub conditional_create: bool,
}

impl Default for LockOptions {
    fn default() -> Self {
        LockOptions { ttl: Duration::from_secs(600), settle: Duration::from_secs(3), conditional_create: true }
    }
}

/// A held lock; released on `release`, or left to expire if the process dies.
pub struct RepoLock {
    store: Store,
    key: String,
    body: LockBody,
    lost: Arc<AtomicBool>,
    refresher: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("the repository is locked for {purpose} by {owner} since {acquired_at} (expires {expires_at} unless refreshed)")]
    Busy { purpose: String, owner: String, acquired_at: String, expires_at: String },
    #[error(transparent)]
    Repo(#[from] RepoError),
}

fn owner() -> String {
    format!("{}:{}", hostname(), std::process::id())
}

/// Why an existing lock may be taken over, if it may.
fn stale_reason(existing: &LockBody, now: chrono::DateTime<chrono::Utc>) -> Option<String> {
    if existing.expires_at <= now {
        return Some(format!("it expired at {}", existing.expires_at.to_rfc3339()));
    }
    if existing.process.as_ref().is_some_and(ProcessId::is_gone) {
        return Some(format!("its holder {} no longer runs", existing.owner));
    }
    None
}

async fn read(store: &Store, key: &str) -> Result<Option<LockBody>, RepoError> {
    match storage::get_bytes_opt(store.as_ref(), key).await? {
        None => Ok(None),
        Some(b) => Ok(serde_json::from_slice(&b).ok()),
    }
}

impl RepoLock {
    pub async fn acquire(store: Store, name: &str, purpose: &str, opts: &LockOptions) -> Result<RepoLock, LockError> {
        let key = layout::lock_key(name);
        for _attempt in 0..3 {
            let now = chrono::Utc::now();
            let body = LockBody {
                token: format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>()),
                owner: owner(),
                purpose: purpose.to_string(),
                acquired_at: now,
                expires_at: now + chrono::Duration::from_std(opts.ttl).unwrap_or_default(),
                process: ProcessId::current(),
            };
            if !opts.conditional_create {
                // Look first: the store would not refuse the create below.
                if let Some(existing) = read(&store, &key).await? {
                    let Some(why) = stale_reason(&existing, now) else { return Err(busy(existing)) };
                    tracing::warn!(owner = %existing.owner, "taking over the {name} lock: {why}");
                    store.delete_many(std::slice::from_ref(&key)).await.map_err(RepoError::from)?;
                }
            }
            let doc = Bytes::from(serde_json::to_vec(&body).expect("lock serializes"));
            match store.put_if_absent(&key, doc).await.map_err(RepoError::from)? {
                CreateOutcome::Created => {
                    if !opts.conditional_create {
                        tokio::time::sleep(opts.settle).await;
                        match read(&store, &key).await? {
                            Some(b) if b.token == body.token => {}
                            Some(other) => return Err(busy(other)),
                            None => continue,
                        }
                    }
                    let lost = Arc::new(AtomicBool::new(false));
                    let refresher = tokio::spawn(refresh(store.clone(), key.clone(), body.clone(), opts.ttl, lost.clone()));
                    return Ok(RepoLock { store, key, body, lost, refresher: Some(refresher) });
                }
                CreateOutcome::AlreadyExists => match read(&store, &key).await? {
                    Some(existing) if existing.token == body.token => {
                        // Our own create whose answer was lost, then retried.
                        let lost = Arc::new(AtomicBool::new(false));
                        let refresher = tokio::spawn(refresh(store.clone(), key.clone(), body.clone(), opts.ttl, lost.clone()));
                        return Ok(RepoLock { store, key, body, lost, refresher: Some(refresher) });
                    }
                    Some(existing) => {
                        let Some(why) = stale_reason(&existing, chrono::Utc::now()) else { return Err(busy(existing)) };
                        tracing::warn!(owner = %existing.owner, "taking over the {name} lock: {why}");
                        store.delete_many(std::slice::from_ref(&key)).await.map_err(RepoError::from)?;
                    }
                    None => {}
                },
            }
        }
        Err(LockError::Repo(RepoError::Conflict(format!("could not take the lock {key}: it keeps changing; retry later"))))
    }

    /// True if another process took the lock (this one must stop its work).
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    pub fn owner(&self) -> &LockBody {
        &self.body
    }

    /// Removes the lock if it is still ours.
    pub async fn release(mut self) -> Result<(), RepoError> {
        if let Some(r) = self.refresher.take() {
            r.abort();
        }
        if let Some(current) = read(&self.store, &self.key).await?
            && current.token == self.body.token
        {
            self.store.delete_many(std::slice::from_ref(&self.key)).await?;
        }
        Ok(())
    }
}

impl Drop for RepoLock {
    fn drop(&mut self) {
        if let Some(r) = self.refresher.take() {
            r.abort();
        }
    }
}

fn busy(b: LockBody) -> LockError {
    LockError::Busy { purpose: b.purpose, owner: b.owner, acquired_at: b.acquired_at.to_rfc3339(), expires_at: b.expires_at.to_rfc3339() }
}

async fn refresh(store: Store, key: String, mut body: LockBody, ttl: Duration, lost: Arc<AtomicBool>) {
    let every = ttl / 3;
    loop {
        tokio::time::sleep(every).await;
        match read(&store, &key).await {
            Ok(Some(current)) if current.token == body.token => {}
            Ok(_) => {
                tracing::error!(lock = %key, "the lock was taken by another process; stopping");
                lost.store(true, Ordering::SeqCst);
                return;
            }
            Err(e) => {
                tracing::warn!(lock = %key, error = %e, "cannot read the lock to refresh it; will retry");
                continue;
            }
        }
        body.expires_at = chrono::Utc::now() + chrono::Duration::from_std(ttl).unwrap_or_default();
        let doc = Bytes::from(serde_json::to_vec(&body).expect("lock serializes"));
        if let Err(e) = store.put(&key, doc).await {
            tracing::warn!(lock = %key, error = %e, "cannot refresh the lock; will retry");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_process_is_not_gone_and_an_exited_one_is() {
        let me = ProcessId::current().expect("/proc tells who we are");
        assert!(!me.is_gone());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let started = process_start_ticks(pid);
        child.wait().unwrap();
        let exited = ProcessId { pid, start_ticks: started.unwrap_or(0), ..me.clone() };
        assert!(exited.is_gone(), "an exited child");
        assert!(ProcessId { start_ticks: me.start_ticks + 1, ..me.clone() }.is_gone(), "same pid, another start: the pid was reused");
        assert!(ProcessId { boot_id: "another boot".into(), ..me.clone() }.is_gone(), "the machine rebooted since");
        let elsewhere = ProcessId { host: "another-host".into(), pid, ..me.clone() };
        assert!(!elsewhere.is_gone(), "a process on another host is never judged from here");
        let other_ns = ProcessId { pid_namespace: "pid:[1]".into(), pid, ..me.clone() };
        assert!(!other_ns.is_gone(), "nor one in another pid namespace (another container)");
    }

    #[test]
    fn stale_reasons() {
        let now = chrono::Utc::now();
        let body = LockBody {
            token: "t".into(),
            owner: "h:1".into(),
            purpose: "p".into(),
            acquired_at: now,
            expires_at: now + chrono::Duration::seconds(600),
            process: ProcessId::current(),
        };
        assert_eq!(stale_reason(&body, now), None, "a live holder keeps its lock");
        let expired = LockBody { expires_at: now - chrono::Duration::seconds(1), ..body.clone() };
        assert!(stale_reason(&expired, now).unwrap().contains("expired"));
        let dead = LockBody { process: body.process.clone().map(|p| ProcessId { start_ticks: p.start_ticks + 1, ..p }), ..body.clone() };
        assert!(stale_reason(&dead, now).unwrap().contains("no longer runs"));
        let old_format = LockBody { process: None, ..body };
        assert_eq!(stale_reason(&old_format, now), None, "a lock without process details only expires");
    }
}
