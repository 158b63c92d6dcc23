//! The retry wrapper over the fault-injection wrapper, on every backend: bursts
//! of transient failures are ridden out, cut reads resume with identical bytes,
//! a failed multipart upload is aborted and leaves nothing, and permanent
//! errors come back at once.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use walvault::storage::faults::{FaultStore, parse_spec};
use walvault::storage::retry::{RetryPolicy, RetryStore};
use walvault::storage::{self, ObjectStore, PartSizer, StorageErrorKind};

use crate::{Backend, content, round_trip};

/// Retries without waiting long, so the suite stays fast.
pub fn fast_policy(attempts: u32) -> RetryPolicy {
    RetryPolicy {
        attempts,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(20),
        attempt_timeout: Duration::from_secs(60),
    }
}

/// The backend behind injected faults (`spec`, see storage::faults) behind retries.
fn faulty(b: &Backend, spec: &str) -> (Arc<FaultStore>, RetryStore) {
    let faults = Arc::new(FaultStore::new(b.store.clone(), parse_spec(spec).unwrap(), 1));
    let store = RetryStore::new(faults.clone(), fast_policy(5));
    (faults, store)
}

pub async fn transient_bursts_are_retried(b: &Backend) {
    let spec = "put:1-3:503; head:1-2:reset; list:1:slowdown; get:1-2:timeout; delete:1:503; \
                start_multipart:1:reset; upload_part:2-3:503; complete_multipart:1:slowdown";
    let (faults, store) = faulty(b, spec);
    store.put("retry/small", Bytes::from_static(b"survives")).await.unwrap();
    assert_eq!(store.head("retry/small").await.unwrap().map(|m| m.size), Some(8));
    assert_eq!(storage::list_all(&store, "retry/").await.unwrap().len(), 1);
    assert_eq!(&storage::get_bytes(&store, "retry/small", None).await.unwrap()[..], b"survives");
    // Multipart (8 + 8 + 4 MiB) with a failed start, two failed parts and a failed complete.
    round_trip(&store, "retry/multipart", 11, 20 << 20).await;
    store.delete_many(&["retry/small".to_string()]).await.unwrap();
    assert_eq!(store.head("retry/small").await.unwrap(), None);
    assert_eq!(faults.injected(), 3 + 2 + 1 + 2 + 1 + 1 + 2 + 1, "every rule fired");
}

pub async fn cut_reads_resume(b: &Backend) {
    let len: u64 = 3 << 20;
    b.store.put("cut/obj", Bytes::from(content::bytes(9, 0..len))).await.unwrap();
    let whole = content::digest(9, 0..len);

    // Three cuts in a row, each resumed from where the last one stopped.
    let (faults, store) = faulty(b, "get:1-3:cut=700000");
    assert_eq!(content::read_digest(&store, "cut/obj", None).await.unwrap(), whole);
    assert_eq!(faults.injected(), 3);

    // A ranged read, cut early.
    let (_, store) = faulty(b, "get:1:cut=100");
    let range = 5000..2_000_000;
    assert_eq!(content::read_digest(&store, "cut/obj", Some(range.clone())).await.unwrap(), content::digest(9, range));

    // Cut before the first byte, and just after the last one (an open-ended
    // read must then end, not ask for bytes past the end).
    let cases = [(0, None), (len, None), (0, Some(10..u64::MAX)), (len - 10, Some(10..u64::MAX))];
    for (cut, range) in cases {
        let (faults, store) = faulty(b, &format!("get:1:cut={cut}"));
        let expected = content::digest(9, range.as_ref().map_or(0, |r| r.start)..len);
        assert_eq!(content::read_digest(&store, "cut/obj", range.clone()).await.unwrap(), expected, "cut={cut} range={range:?}");
        assert_eq!(faults.injected(), 1);
    }

    // More cuts than attempts: the read fails instead of returning short data.
    let (_, store) = faulty(b, "get:*:cut=1000");
    let err = content::read_digest(&store, "cut/obj", None).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
}

pub async fn failed_complete_leaves_nothing(b: &Backend) {
    // complete_multipart never succeeds: the upload fails after the retries and is aborted.
    let (_, store) = faulty(b, "complete_multipart:*:503");
    let err =
        storage::upload_stream(&store, "fail/obj", content::stream(12, 20 << 20, 1 << 20), PartSizer::default(), 2).await.unwrap_err();
    assert_eq!(err.kind(), StorageErrorKind::Unreachable, "{err}");
    assert_eq!(err.key(), "fail/obj");
    assert_no_trace(&*b.store, "fail/").await;

    // A permanent failure of a part (a full disk) is not retried, and also aborts.
    let (faults, store) = faulty(b, "upload_part:2-:enospc");
    let err =
        storage::upload_stream(&store, "fail/obj", content::stream(12, 20 << 20, 1 << 20), PartSizer::default(), 1).await.unwrap_err();
    assert_eq!(err.kind(), StorageErrorKind::NoSpace, "{err}");
    assert_eq!(faults.injected(), 1, "not retried");
    assert_no_trace(&*b.store, "fail/").await;
}

/// No object and no pending multipart upload under `prefix`.
async fn assert_no_trace(store: &dyn ObjectStore, prefix: &str) {
    assert!(storage::list_all(store, prefix).await.unwrap().is_empty(), "no object under {prefix}");
    assert!(store.list_multipart(prefix).await.unwrap().is_empty(), "no pending upload under {prefix}");
}

pub async fn permanent_errors_are_not_retried(b: &Backend) {
    b.store.put("perm/obj", Bytes::from_static(b"x")).await.unwrap();
    let (faults, store) = faulty(b, "put:*:denied; get:*:denied; head:*:denied");
    let err = store.put("perm/new", Bytes::from_static(b"y")).await.unwrap_err();
    assert_eq!(err.kind(), StorageErrorKind::PermissionDenied, "{err}");
    assert!(err.hint().is_some());
    assert_eq!(store.get("perm/obj", None).await.err().unwrap().kind(), StorageErrorKind::PermissionDenied);
    assert_eq!(store.head("perm/obj").await.unwrap_err().kind(), StorageErrorKind::PermissionDenied);
    assert_eq!(faults.injected(), 3, "one attempt each");

    // NotFound is an answer, not a failure: one call (the delay rule counts calls).
    let (calls, store) = faulty(b, "get:*:delay=0");
    let err = store.get("perm/missing", None).await.err().unwrap();
    assert_eq!(err.kind(), StorageErrorKind::NotFound, "{err}");
    assert_eq!(calls.injected(), 1);
    assert_eq!(b.store.head("perm/new").await.unwrap(), None);
}
