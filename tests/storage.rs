//! The storage conformance suite: one set of checks that every backend must pass,
//! run on the file backend (a temp dir) and on S3 (SeaweedFS, started by the
//! harness). The wrapper checks (retries over injected faults) run on both too.
//! Object contents are generated and hashed as streams, never held whole.

mod common;
#[path = "storage/content.rs"]
mod content;
#[path = "storage/s3_only.rs"]
mod s3_only;
#[path = "storage/wrappers.rs"]
mod wrappers;

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use walvault::storage::{self, CompletedPart, CreateOutcome, ObjectStore, PartSizer, StorageErrorKind, Store};

use common::s3::S3Server;

/// A store under test and whatever keeps it alive (its temp dir).
pub struct Backend {
    pub store: Store,
    _keep: Option<tempfile::TempDir>,
}

pub async fn file_backend() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(storage::fs::FileStore::new(dir.path().join("repo")).unwrap());
    Backend { store, _keep: Some(dir) }
}

/// A fresh bucket on the shared server, under a two-level prefix so that every
/// check also exercises the prefix mapping.
pub async fn s3_backend() -> Backend {
    let server = S3Server::shared();
    let bucket = server.fresh_bucket().await;
    let store = storage::s3::S3Store::connect(server.options(&bucket, "walvault/test")).await.unwrap();
    Backend { store: Arc::new(store), _keep: None }
}

/// Generates one `#[tokio::test]` per check and backend: `file::check`, `s3::check`.
macro_rules! on_every_backend {
    ($($check:path => $name:ident),* $(,)?) => {
        mod file {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    let backend = super::file_backend().await;
                    $check(&backend).await;
                }
            )*
        }
        mod s3 {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    let backend = super::s3_backend().await;
                    $check(&backend).await;
                }
            )*
        }
    };
}

on_every_backend! {
    crate::round_trip_tiny => round_trip_tiny,
    crate::round_trip_16mib => round_trip_16mib,
    crate::round_trip_200mib => round_trip_200mib,
    crate::ranged_gets => ranged_gets,
    crate::head_and_missing => head_and_missing,
    crate::list_prefix_and_pages => list_prefix_and_pages,
    crate::delete_many_ignores_missing => delete_many_ignores_missing,
    crate::put_if_absent_keeps_first => put_if_absent_keeps_first,
    crate::multipart_abort_leaves_nothing => multipart_abort_leaves_nothing,
    crate::nested_keys => nested_keys,
    crate::wrappers::transient_bursts_are_retried => transient_bursts_are_retried,
    crate::wrappers::cut_reads_resume => cut_reads_resume,
    crate::wrappers::failed_complete_leaves_nothing => failed_complete_leaves_nothing,
    crate::wrappers::permanent_errors_are_not_retried => permanent_errors_are_not_retried,
}

/// Uploads object `seed` of `len` bytes through `upload_stream` (a single put
/// below 8 MiB, multipart above), reads it back and compares blake3.
pub async fn round_trip(store: &dyn ObjectStore, key: &str, seed: u64, len: u64) {
    let written = storage::upload_stream(store, key, content::stream(seed, len, 1 << 20), PartSizer::default(), 4).await.unwrap();
    assert_eq!(written, len, "{key}: bytes written");
    let meta = store.head(key).await.unwrap().unwrap_or_else(|| panic!("{key}: no object after upload"));
    assert_eq!(meta.size, len, "{key}: size in head");
    let read = content::read_digest(store, key, None).await.unwrap();
    assert_eq!(read, content::digest(seed, 0..len), "{key}: content read back");
}

async fn round_trip_tiny(b: &Backend) {
    round_trip(&*b.store, "tiny/empty", 1, 0).await;
    round_trip(&*b.store, "tiny/one", 2, 1).await;
    round_trip(&*b.store, "tiny/just-below-a-part", 3, (8 << 20) - 1).await;
}

async fn round_trip_16mib(b: &Backend) {
    round_trip(&*b.store, "big/16mib", 16, 16 << 20).await;
    // An odd size: the last part is short.
    round_trip(&*b.store, "big/odd", 17, (16 << 20) + 12345).await;
}

async fn round_trip_200mib(b: &Backend) {
    round_trip(&*b.store, "big/200mib", 200, 200 << 20).await;
}

async fn ranged_gets(b: &Backend) {
    let store = &*b.store;
    let len: u64 = 3 << 20;
    round_trip(store, "ranged/obj", 7, len).await;
    let cases = [
        (0..100, 0..100),                             // start
        (1_000_000..1_000_123, 1_000_000..1_000_123), // middle
        (len - 10..len, len - 10..len),               // to the end
        (1234..u64::MAX, 1234..len),                  // open-ended
        (len - 5..len + 1000, len - 5..len),          // past the end: what exists
        (0..len, 0..len),                             // all of it
    ];
    for (asked, got) in cases {
        let read = content::read_digest(store, "ranged/obj", Some(asked.clone())).await.unwrap();
        assert_eq!(read, content::digest(7, got), "range {asked:?}");
    }
    // Exact bytes of a small range, not just a hash.
    let small = storage::get_bytes(store, "ranged/obj", Some(4096..4100)).await.unwrap();
    assert_eq!(&small[..], &content::bytes(7, 4096..4100)[..]);
    // A range that starts past the end is refused as invalid.
    let err = match store.get("ranged/obj", Some(len + 10..len + 20)).await {
        Ok(mut s) => s.next().await.expect("an error").unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(err.kind(), StorageErrorKind::InvalidInput, "{err}");
    // From 0 of an empty object is no bytes, not an error.
    store.put("ranged/empty", Bytes::new()).await.unwrap();
    assert_eq!(content::read_digest(store, "ranged/empty", Some(0..u64::MAX)).await.unwrap().0, 0);
}

async fn head_and_missing(b: &Backend) {
    let store = &*b.store;
    store.put("head/present", Bytes::from_static(b"hello")).await.unwrap();
    let meta = store.head("head/present").await.unwrap().expect("present");
    assert_eq!(meta.key, "head/present");
    assert_eq!(meta.size, 5);
    assert!(meta.modified.is_some());
    assert_eq!(store.head("head/missing").await.unwrap(), None);
    // A "directory" of other objects is not an object, nor is a name below an object.
    assert_eq!(store.head("head").await.unwrap(), None);
    assert_eq!(store.head("head/present/below").await.unwrap(), None);
    let err = store.get("head/present/below", None).await.err().expect("get below an object fails");
    assert_eq!(err.kind(), StorageErrorKind::NotFound, "{err}");
    let err = store.get("head", None).await.err().expect("get of a directory fails");
    assert_eq!(err.kind(), StorageErrorKind::NotFound, "{err}");
    let err = store.get("head/missing", None).await.err().expect("get of a missing key fails");
    assert_eq!(err.kind(), StorageErrorKind::NotFound, "{err}");
    assert_eq!(err.key(), "head/missing");
    assert_eq!(storage::get_bytes_opt(store, "head/missing").await.unwrap(), None);
    // put replaces.
    store.put("head/present", Bytes::from_static(b"bye")).await.unwrap();
    assert_eq!(&storage::get_bytes(store, "head/present", None).await.unwrap()[..], b"bye");
}

/// Puts `keys` (content: the key itself), 16 at a time.
pub async fn put_keys(store: &dyn ObjectStore, keys: &[String]) {
    futures::stream::iter(keys).for_each_concurrent(16, |k| async move { store.put(k, Bytes::from(k.clone())).await.unwrap() }).await;
}

async fn listed(store: &dyn ObjectStore, prefix: &str) -> Vec<String> {
    storage::list_all(store, prefix).await.unwrap().into_iter().map(|o| o.key).collect()
}

/// Compares key lists; on a mismatch says how, without printing a thousand keys.
pub fn assert_keys(actual: &[String], expected: &[String], what: &str) {
    if actual == expected {
        return;
    }
    let (a, e): (BTreeSet<&String>, BTreeSet<&String>) = (actual.iter().collect(), expected.iter().collect());
    let missing: Vec<_> = e.difference(&a).take(5).collect();
    let unexpected: Vec<_> = a.difference(&e).take(5).collect();
    let first = actual.iter().zip(expected).position(|(x, y)| x != y);
    panic!(
        "{what}: got {} keys ({} distinct), expected {}; missing {missing:?}; unexpected {unexpected:?}; first difference at {first:?}: {:?} instead of {:?}",
        actual.len(),
        a.len(),
        expected.len(),
        first.map(|i| &actual[i]),
        first.map(|i| &expected[i]),
    );
}

async fn list_prefix_and_pages(b: &Backend) {
    let store = &*b.store;
    // Exactly 1000 keys under list/a/, some a level deeper, so that a listing of
    // list/ crosses a page boundary right where the list/a/ "directory" ends and
    // its siblings that sort before '/' (list/a-sibling) follow.
    let mut many: Vec<String> = (0..900).map(|i| format!("list/a/{i:05}")).chain((0..100).map(|i| format!("list/a/sub/{i:03}"))).collect();
    many.sort();
    let decoys: Vec<String> = ["list/a-sibling", "list/ab", "list/b/x", "lis", "other/list/a/1"].iter().map(|s| s.to_string()).collect();
    put_keys(store, &many).await;
    put_keys(store, &decoys).await;
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };

    assert_keys(&listed(store, "list/a/").await, &many, "list/a/");
    let partial = sorted(many.iter().cloned().chain(["list/a-sibling".into(), "list/ab".into()]).collect());
    assert_keys(&listed(store, "list/a").await, &partial, "list/a (not a whole segment)");
    assert_keys(&listed(store, "list/b/").await, &["list/b/x".to_string()], "list/b/");
    assert!(listed(store, "list/nothing/").await.is_empty());
    let everything = sorted(many.iter().chain(&decoys).cloned().collect());
    assert_keys(&listed(store, "").await, &everything, "the whole store");

    // Page by page: more than one page, none over 1000, every key exactly once.
    let under_list = sorted(many.iter().cloned().chain(["list/a-sibling".into(), "list/ab".into(), "list/b/x".into()]).collect());
    let (mut paged, mut pages, mut token) = (Vec::new(), 0, None);
    loop {
        let page = store.list_page("list/", token).await.unwrap();
        assert!(page.objects.len() <= 1000, "page of {} keys", page.objects.len());
        pages += 1;
        paged.extend(page.objects.into_iter().map(|o| o.key));
        match page.next {
            Some(next) => token = Some(next),
            None => break,
        }
    }
    assert!(pages >= 2, "{} keys in {pages} page(s)", paged.len());
    assert_keys(&sorted(paged), &under_list, "pages of list/");

    // More keys than one delete batch.
    store.delete_many(&everything).await.unwrap();
    assert!(listed(store, "").await.is_empty());
}

async fn delete_many_ignores_missing(b: &Backend) {
    let store = &*b.store;
    let keys: Vec<String> = (0..5).map(|i| format!("del/{i}")).collect();
    put_keys(store, &keys).await;
    let doomed = vec!["del/1".to_string(), "del/3".into(), "del/never-there".into(), "nowhere/at/all".into()];
    store.delete_many(&doomed).await.unwrap();
    assert_eq!(listed(store, "del/").await, vec!["del/0".to_string(), "del/2".into(), "del/4".into()]);
    assert_eq!(store.head("del/1").await.unwrap(), None);
    // Deleting again, and deleting nothing, are fine.
    store.delete_many(&doomed).await.unwrap();
    store.delete_many(&[]).await.unwrap();
    // A name that only prefixes other objects, or runs below one, is no object.
    store.delete_many(&["del".to_string(), "del/0/below".into()]).await.unwrap();
    assert_eq!(listed(store, "del/").await.len(), 3);
}

async fn put_if_absent_keeps_first(b: &Backend) {
    let store = &*b.store;
    let first = store.put_if_absent("cond/lock", Bytes::from_static(b"first")).await.unwrap();
    assert_eq!(first, CreateOutcome::Created);
    let second = store.put_if_absent("cond/lock", Bytes::from_static(b"second")).await.unwrap();
    assert_eq!(second, CreateOutcome::AlreadyExists);
    assert_eq!(&storage::get_bytes(store, "cond/lock", None).await.unwrap()[..], b"first");
    // After a delete, the name is free again.
    store.delete_many(&["cond/lock".to_string()]).await.unwrap();
    assert_eq!(store.put_if_absent("cond/lock", Bytes::from_static(b"third")).await.unwrap(), CreateOutcome::Created);
}

async fn multipart_abort_leaves_nothing(b: &Backend) {
    let store = &*b.store;
    let upload = store.start_multipart("mp/aborted").await.unwrap();
    assert_eq!(upload.key, "mp/aborted");
    store.upload_part(&upload, 1, Bytes::from(content::bytes(5, 0..(5 << 20)))).await.unwrap();
    store.upload_part(&upload, 2, Bytes::from_static(b"tail")).await.unwrap();
    let pending = store.list_multipart("mp/").await.unwrap();
    assert!(pending.iter().any(|p| p.key == "mp/aborted" && p.upload_id == upload.upload_id), "pending upload listed: {pending:?}");
    assert!(store.list_multipart("elsewhere/").await.unwrap().is_empty(), "list_multipart honours the prefix");

    store.abort_multipart(&upload).await.unwrap();
    assert!(store.list_multipart("mp/").await.unwrap().iter().all(|p| p.upload_id != upload.upload_id));
    assert_eq!(store.head("mp/aborted").await.unwrap(), None);
    assert!(listed(store, "mp/").await.is_empty());
    // Aborting again is not an error: a retried abort whose first answer was lost.
    store.abort_multipart(&upload).await.unwrap();

    // And a completed one is an object, no longer pending.
    let upload = store.start_multipart("mp/done").await.unwrap();
    let p1 = store.upload_part(&upload, 1, Bytes::from(content::bytes(6, 0..(5 << 20)))).await.unwrap();
    let p2 = store.upload_part(&upload, 2, Bytes::from(content::bytes(6, (5 << 20)..(5 << 20) + 10))).await.unwrap();
    // Completing with a part that was never uploaded is refused.
    let bogus = CompletedPart { number: 3, tag: "\"0123456789abcdef0123456789abcdef\"".into() };
    let err = store.complete_multipart(&upload, vec![p1.clone(), p2.clone(), bogus]).await.unwrap_err();
    assert_eq!(err.kind(), StorageErrorKind::InvalidInput, "{err}");
    store.complete_multipart(&upload, vec![p1, p2]).await.unwrap();
    assert_eq!(content::read_digest(store, "mp/done", None).await.unwrap(), content::digest(6, 0..(5 << 20) + 10));
    assert!(store.list_multipart("mp/").await.unwrap().is_empty());
}

async fn nested_keys(b: &Backend) {
    let store = &*b.store;
    // '-' and '.' sort before '/', '0' after: "x-1" and "x.1" come before the
    // "x/..." keys and "x0" after them, though a store that walks directories
    // (files, SeaweedFS) meets them in another order.
    let keys: Vec<String> =
        ["n/x/1", "n/x-1", "n/x.1", "n/x0", "n/x/y/z/deep.bin", "n/x/y/a", "n/w"].iter().map(|s| s.to_string()).collect();
    put_keys(store, &keys).await;
    let mut expected = keys.clone();
    expected.sort();
    assert_eq!(listed(store, "n/").await, expected);
    assert_eq!(listed(store, "n/x/y/").await, vec!["n/x/y/a".to_string(), "n/x/y/z/deep.bin".into()]);
    assert_eq!(&storage::get_bytes(store, "n/x/y/z/deep.bin", None).await.unwrap()[..], b"n/x/y/z/deep.bin");
    store.delete_many(&keys).await.unwrap();
    assert!(listed(store, "n/").await.is_empty());
    // Keys the store refuses, whatever the backend.
    for bad in ["", "/abs", "a//b", "a/./b", "a/../b", "sp ace"] {
        let err = store.put(bad, Bytes::new()).await.unwrap_err();
        assert_eq!(err.kind(), StorageErrorKind::InvalidInput, "key {bad:?}: {err}");
    }
}
