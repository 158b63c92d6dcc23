//! Repository locks: one object per lock name, created only if absent, with an
//! owner, a token and an expiry that the holder refreshes. A lock whose expiry
//! has passed (its holder died) is taken over. On stores that ignore
//! If-None-Match (the descriptor says so), a would-be holder waits a settle
//! delay and reads the lock back: only the last writer sees its own token, so at
//! most one holder proceeds. The holder re-reads the lock at each refresh and
//! stops its work if someone else holds it.

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
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "unknown-host".into());
    format!("{host}:{}", std::process::id())
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
            };
            if !opts.conditional_create {
                // Look first: the store would not refuse the create below.
                if let Some(existing) = read(&store, &key).await? {
                    if existing.expires_at > now {
                        return Err(busy(existing));
                    }
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
                    Some(existing) if existing.expires_at > chrono::Utc::now() => return Err(busy(existing)),
                    Some(existing) => {
                        tracing::warn!(owner = %existing.owner, expired = %existing.expires_at, "taking over an expired lock (its holder stopped)");
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
        if let Some(current) = read(&self.store, &self.key).await? {
            if current.token == self.body.token {
                self.store.delete_many(std::slice::from_ref(&self.key)).await?;
            }
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
