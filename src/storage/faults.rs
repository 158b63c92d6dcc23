//! Fault injection for tests: wraps any store and makes chosen calls fail the way
//! real stores do (503, SlowDown, connection reset, timeout, a read cut short, a
//! full disk, a store that ignores If-None-Match). Rules come from a spec string,
//! usually the `WALVAULT_TEST_FAULTS` environment variable, so end-to-end tests can
//! inject faults into the built binary:
//!
//! ```text
//! rule[;rule...]   rule = OP:WHEN:ACTION
//! OP     = put | put_if_absent | get | head | list | delete | start_multipart
//!          | upload_part | complete_multipart | abort_multipart | any
//! WHEN   = N (the Nth call of OP, from 1) | N-M | N- | * | pP (probability in percent)
//! ACTION = 503 | slowdown | reset | timeout | enospc | denied | cut=BYTES
//!          | delay=MS | ignore_if_none_match | hang
//! ```
//! Randomness is seeded from `WALVAULT_TEST_FAULTS_SEED` (default 1) so failures repeat.
//! To kill the process at a named point instead, see `crate::crashpoint` (`WALVAULT_TEST_CRASH_AT`).

use std::ops::Range;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::{
    ByteStream, CompletedPart, CreateOutcome, ListPage, MultipartUpload, ObjectMeta, ObjectStore, PendingUpload, StorageError,
    StorageErrorKind,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Put,
    PutIfAbsent,
    Get,
    Head,
    List,
    Delete,
    StartMultipart,
    UploadPart,
    CompleteMultipart,
    AbortMultipart,
    Any,
}

impl Op {
    fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "put" => Op::Put,
            "put_if_absent" => Op::PutIfAbsent,
            "get" => Op::Get,
            "head" => Op::Head,
            "list" => Op::List,
            "delete" => Op::Delete,
            "start_multipart" => Op::StartMultipart,
            "upload_part" => Op::UploadPart,
            "complete_multipart" => Op::CompleteMultipart,
            "abort_multipart" => Op::AbortMultipart,
            "any" => Op::Any,
            _ => return None,
        })
    }
    const COUNTED: usize = 11;
    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum When {
    Range(u64, u64),
    Percent(u32),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Unavailable,
    SlowDown,
    Reset,
    Timeout,
    NoSpace,
    Denied,
    Cut(u64),
    Delay(Duration),
    IgnoreIfNoneMatch,
    Hang,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub op: Op,
    pub when: When,
    pub action: Action,
}

/// Parses a fault spec (see the module docs).
pub fn parse_spec(spec: &str) -> Result<Vec<Rule>, String> {
    let mut rules = Vec::new();
    for raw in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let mut it = raw.splitn(3, ':');
        let (Some(op), Some(when), Some(action)) = (it.next(), it.next(), it.next()) else {
            return Err(format!("fault rule '{raw}' is not OP:WHEN:ACTION"));
        };
        let op = Op::parse(op).ok_or_else(|| format!("fault rule '{raw}': unknown operation '{op}'"))?;
        let num = |s: &str| s.parse::<u64>().map_err(|_| format!("fault rule '{raw}': bad number '{s}'"));
        let when = if when == "*" {
            When::Range(1, u64::MAX)
        } else if let Some(p) = when.strip_prefix('p') {
            When::Percent(num(p)?.min(100) as u32)
        } else if let Some((a, b)) = when.split_once('-') {
            When::Range(num(a)?, if b.is_empty() { u64::MAX } else { num(b)? })
        } else {
            let n = num(when)?;
            When::Range(n, n)
        };
        let action = match action {
            "503" => Action::Unavailable,
            "slowdown" => Action::SlowDown,
            "reset" => Action::Reset,
            "timeout" => Action::Timeout,
            "enospc" => Action::NoSpace,
            "denied" => Action::Denied,
            "ignore_if_none_match" => Action::IgnoreIfNoneMatch,
            "hang" => Action::Hang,
            a => {
                if let Some(n) = a.strip_prefix("cut=") {
                    Action::Cut(num(n)?)
                } else if let Some(n) = a.strip_prefix("delay=") {
                    Action::Delay(Duration::from_millis(num(n)?))
                } else {
                    return Err(format!("fault rule '{raw}': unknown action '{a}'"));
                }
            }
        };
        rules.push(Rule { op, when, action });
    }
    Ok(rules)
}

pub struct FaultStore {
    inner: Arc<dyn ObjectStore>,
    rules: Vec<Rule>,
    state: Mutex<FaultState>,
}

struct FaultState {
    counts: [u64; Op::COUNTED],
    rng: u64,
    injected: u64,
}

impl FaultStore {
    pub fn new(inner: Arc<dyn ObjectStore>, rules: Vec<Rule>, seed: u64) -> Self {
        FaultStore { inner, rules, state: Mutex::new(FaultState { counts: [0; Op::COUNTED], rng: seed.max(1), injected: 0 }) }
    }

    /// How many faults have been injected so far.
    pub fn injected(&self) -> u64 {
        self.state.lock().unwrap().injected
    }

    /// The actions that fire for this call of `op`.
    fn actions(&self, op: Op) -> Vec<Action> {
        let mut st = self.state.lock().unwrap();
        st.counts[op.index()] += 1;
        st.counts[Op::Any.index()] += 1;
        let (n, n_any) = (st.counts[op.index()], st.counts[Op::Any.index()]);
        let mut out = Vec::new();
        for rule in &self.rules {
            if rule.op != op && rule.op != Op::Any {
                continue;
            }
            let count = if rule.op == Op::Any { n_any } else { n };
            let fire = match rule.when {
                When::Range(a, b) => count >= a && count <= b,
                When::Percent(p) => {
                    // xorshift64: deterministic for a given seed.
                    st.rng ^= st.rng << 13;
                    st.rng ^= st.rng >> 7;
                    st.rng ^= st.rng << 17;
                    (st.rng % 100) < p as u64
                }
            };
            if fire {
                st.injected += 1;
                out.push(rule.action.clone());
            }
        }
        out
    }

    /// Applies the failing actions; returns the remaining ones (cut, ignore).
    async fn apply(&self, op: Op, key: &str) -> Result<Vec<Action>, StorageError> {
        let mut rest = Vec::new();
        for action in self.actions(op) {
            let transient = |m: &str| Err(StorageError::new(StorageErrorKind::Transient, key, format!("injected fault: {m}")));
            match action {
                Action::Unavailable => return transient("503 Service Unavailable"),
                Action::SlowDown => return transient("503 SlowDown: please reduce your request rate"),
                Action::Reset => return transient("connection reset by peer"),
                Action::Timeout => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    return transient("operation timed out");
                }
                Action::NoSpace => {
                    return Err(StorageError::new(StorageErrorKind::NoSpace, key, "injected fault: no space left on device"));
                }
                Action::Denied => return Err(StorageError::new(StorageErrorKind::PermissionDenied, key, "injected fault: access denied")),
                Action::Delay(d) => tokio::time::sleep(d).await,
                Action::Hang => futures::future::pending::<()>().await,
                other => rest.push(other),
            }
        }
        Ok(rest)
    }
}

#[async_trait]
impl ObjectStore for FaultStore {
    fn location(&self) -> String {
        self.inner.location()
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        self.apply(Op::Put, key).await?;
        self.inner.put(key, data).await
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<CreateOutcome, StorageError> {
        let rest = self.apply(Op::PutIfAbsent, key).await?;
        if rest.contains(&Action::IgnoreIfNoneMatch) {
            self.inner.put(key, data).await?;
            return Ok(CreateOutcome::Created);
        }
        self.inner.put_if_absent(key, data).await
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream, StorageError> {
        let rest = self.apply(Op::Get, key).await?;
        let stream = self.inner.get(key, range).await?;
        let Some(limit) = rest.iter().find_map(|a| if let Action::Cut(n) = a { Some(*n) } else { None }) else {
            return Ok(stream);
        };
        let key = key.to_string();
        // Deliver `limit` bytes, then fail as a dropped connection would.
        let cut = futures::stream::unfold((stream, limit, key, false), |(mut s, left, key, done)| async move {
            if done {
                return None;
            }
            match s.next().await {
                Some(Ok(b)) if (b.len() as u64) < left => {
                    let l = left - b.len() as u64;
                    Some((Ok(b), (s, l, key, false)))
                }
                Some(Ok(b)) => {
                    let head = b.slice(..left as usize);
                    let err = StorageError::new(StorageErrorKind::Transient, &key, "injected fault: stream cut short");
                    let items: Vec<Result<Bytes, StorageError>> = if head.is_empty() { vec![Err(err)] } else { vec![Ok(head), Err(err)] };
                    // Emit the head now and the error on the next poll.
                    let mut items = items.into_iter();
                    let first = items.next().unwrap();
                    let rest: ByteStream = Box::pin(futures::stream::iter(items.collect::<Vec<_>>()));
                    Some((first, (rest, u64::MAX, key, false)))
                }
                other => other.map(|r| (r, (s, left, key, true))),
            }
        });
        Ok(Box::pin(cut))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        self.apply(Op::Head, key).await?;
        self.inner.head(key).await
    }

    async fn list_page(&self, prefix: &str, continuation: Option<String>) -> Result<ListPage, StorageError> {
        self.apply(Op::List, prefix).await?;
        self.inner.list_page(prefix, continuation).await
    }

    async fn delete_many(&self, keys: &[String]) -> Result<(), StorageError> {
        self.apply(Op::Delete, keys.first().map(String::as_str).unwrap_or("")).await?;
        self.inner.delete_many(keys).await
    }

    async fn start_multipart(&self, key: &str) -> Result<MultipartUpload, StorageError> {
        self.apply(Op::StartMultipart, key).await?;
        self.inner.start_multipart(key).await
    }

    async fn upload_part(&self, upload: &MultipartUpload, number: u32, data: Bytes) -> Result<CompletedPart, StorageError> {
        self.apply(Op::UploadPart, &upload.key).await?;
        self.inner.upload_part(upload, number, data).await
    }

    async fn complete_multipart(&self, upload: &MultipartUpload, parts: Vec<CompletedPart>) -> Result<(), StorageError> {
        self.apply(Op::CompleteMultipart, &upload.key).await?;
        self.inner.complete_multipart(upload, parts).await
    }

    async fn abort_multipart(&self, upload: &MultipartUpload) -> Result<(), StorageError> {
        self.apply(Op::AbortMultipart, &upload.key).await?;
        self.inner.abort_multipart(upload).await
    }

    async fn list_multipart(&self, prefix: &str) -> Result<Vec<PendingUpload>, StorageError> {
        self.inner.list_multipart(prefix).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rules() {
        let rules = parse_spec("put:3:503; get:2-4:cut=100;any:p30:delay=5;put_if_absent:*:ignore_if_none_match").unwrap();
        assert_eq!(rules.len(), 4);
        assert_eq!(rules[0], Rule { op: Op::Put, when: When::Range(3, 3), action: Action::Unavailable });
        assert_eq!(rules[1].action, Action::Cut(100));
        assert_eq!(rules[2].when, When::Percent(30));
        assert!(parse_spec("put:x:503").unwrap_err().contains("bad number"));
        assert!(parse_spec("frob:1:503").unwrap_err().contains("unknown operation"));
    }
}
