//! What only the S3 backend has: endpoints that do not answer, credentials the
//! store refuses, buckets that do not exist, the key prefix, a server that goes
//! away and comes back, and the `when_required` checksum mode.

use std::sync::Arc;

use bytes::Bytes;
use walvault::storage::retry::RetryStore;
use walvault::storage::s3::{ChecksumMode, S3Options, S3Store};
use walvault::storage::{self, ObjectStore, StorageErrorKind};

use crate::common::s3::{READER_ACCESS_KEY, READER_SECRET_KEY, S3Server};
use crate::wrappers::fast_policy;
use crate::{content, round_trip};

async fn connect(opts: S3Options) -> S3Store {
    S3Store::connect(opts).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_endpoint_is_reported() {
    // A port nobody listens on: connections are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let opts = S3Options {
        bucket: "walvault-nowhere".into(),
        prefix: "cluster1".into(),
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        access_key_id: Some("AKIDEXAMPLE".into()),
        secret_access_key: Some("do-not-print-me".into()),
        ..Default::default()
    };
    let store = RetryStore::new(Arc::new(connect(opts).await), fast_policy(3));
    assert_eq!(store.location(), "s3://walvault-nowhere/cluster1");
    let started = std::time::Instant::now();
    let err = store.head("base/manifest").await.unwrap_err();
    assert!(started.elapsed().as_secs() < 10, "gave up quickly");
    assert_eq!(err.kind(), StorageErrorKind::Unreachable, "{err}");
    let text = err.to_string();
    for part in ["base/manifest", "s3://walvault-nowhere/cluster1", &format!("127.0.0.1:{port}"), "refused", "3 attempts"] {
        assert!(text.contains(part), "error names {part:?}: {text}");
    }
    assert!(!text.contains("do-not-print-me"), "{text}");
    assert!(err.hint().is_some());
    let err = store.put("wal/000000010000000000000001", Bytes::from_static(b"x")).await.unwrap_err();
    assert_eq!(err.kind(), StorageErrorKind::Unreachable, "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_credentials_are_permission_errors() {
    let server = S3Server::shared();
    let bucket = server.fresh_bucket().await;
    let admin = connect(server.options(&bucket, "creds")).await;
    admin.put("obj", Bytes::from_static(b"data")).await.unwrap();

    // A wrong secret: refused at once, not retried into "unreachable".
    let mut opts = server.options(&bucket, "creds");
    opts.secret_access_key = Some("wrong-secret-value".into());
    let store = RetryStore::new(Arc::new(connect(opts).await), fast_policy(5));
    let err = store.get("obj", None).await.err().unwrap();
    assert_eq!(err.kind(), StorageErrorKind::PermissionDenied, "{err}");
    assert!(err.to_string().contains("obj"), "{err}");
    assert!(!err.to_string().contains("wrong-secret-value"), "{err}");

    // A read-only identity can read and list but not write or delete.
    let mut opts = server.options(&bucket, "creds");
    opts.access_key_id = Some(READER_ACCESS_KEY.into());
    opts.secret_access_key = Some(READER_SECRET_KEY.into());
    let reader = connect(opts).await;
    assert_eq!(&storage::get_bytes(&reader, "obj", None).await.unwrap()[..], b"data");
    assert_eq!(storage::list_all(&reader, "").await.unwrap().len(), 1);
    let err = reader.put("new", Bytes::from_static(b"x")).await.unwrap_err();
    assert_eq!(err.kind(), StorageErrorKind::PermissionDenied, "{err}");
    let err = reader.delete_many(&["obj".to_string()]).await.unwrap_err();
    assert_eq!(err.kind(), StorageErrorKind::PermissionDenied, "{err}");
    assert!(admin.head("obj").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_bucket_is_named() {
    let server = S3Server::shared();
    let store = connect(server.options("walvault-no-such-bucket", "p")).await;
    let err = store.get("some/key", None).await.err().unwrap();
    assert_eq!(err.kind(), StorageErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("bucket 'walvault-no-such-bucket' does not exist"), "{err}");
    let err = store.put("some/key", Bytes::from_static(b"x")).await.unwrap_err();
    assert_eq!(err.kind(), StorageErrorKind::NotFound, "{err}");
    let err = store.list_page("", None).await.unwrap_err();
    assert_eq!(err.kind(), StorageErrorKind::NotFound, "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn prefix_maps_keys() {
    let server = S3Server::shared();
    let bucket = server.fresh_bucket().await;
    // Slashes around the prefix are not part of it.
    let store = connect(server.options(&bucket, "/site/cluster1/")).await;
    assert_eq!(store.location(), format!("s3://{bucket}/site/cluster1"));
    store.put("wal/1", Bytes::from_static(b"one")).await.unwrap();
    let upload = store.start_multipart("pack/2").await.unwrap();

    let root = connect(server.options(&bucket, "")).await;
    assert_eq!(root.location(), format!("s3://{bucket}"));
    let keys: Vec<String> = storage::list_all(&root, "").await.unwrap().into_iter().map(|o| o.key).collect();
    assert_eq!(keys, vec!["site/cluster1/wal/1".to_string()]);
    let pending = root.list_multipart("site/").await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].key, "site/cluster1/pack/2");

    // The prefixed store sees only relative keys, and nothing outside its prefix.
    root.put("site/cluster2/wal/1", Bytes::from_static(b"other")).await.unwrap();
    let keys: Vec<String> = storage::list_all(&store, "").await.unwrap().into_iter().map(|o| o.key).collect();
    assert_eq!(keys, vec!["wal/1".to_string()]);
    assert_eq!(store.list_multipart("").await.unwrap()[0].key, "pack/2");
    store.abort_multipart(&upload).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn outage_then_recovery() {
    let mut server = S3Server::start();
    let bucket = server.fresh_bucket().await;
    let store = RetryStore::new(Arc::new(connect(server.options(&bucket, "repo")).await), fast_policy(3));
    store.put("before", Bytes::from(content::bytes(3, 0..100_000))).await.unwrap();

    server.stop();
    let err = store.get("before", None).await.err().unwrap();
    assert_eq!(err.kind(), StorageErrorKind::Unreachable, "{err}");
    let err = storage::upload_stream(&store, "during", content::stream(4, 10 << 20, 1 << 20), Default::default(), 2).await.unwrap_err();
    assert_eq!(err.kind(), StorageErrorKind::Unreachable, "{err}");

    server.start_again();
    let read = content::read_digest(&store, "before", None).await.unwrap_or_else(|e| panic!("{}", server.failure(&e.to_string())));
    assert_eq!(read, content::digest(3, 0..100_000));
    assert_eq!(store.head("during").await.unwrap(), None);
    round_trip(&store, "after", 5, 10 << 20).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn checksums_when_required() {
    let server = S3Server::shared();
    let bucket = server.fresh_bucket().await;
    let mut opts = server.options(&bucket, "sums");
    opts.checksums = ChecksumMode::WhenRequired;
    let store = connect(opts).await;
    round_trip(&store, "small", 1, 1000).await;
    round_trip(&store, "multipart", 2, 17 << 20).await;
    store.delete_many(&["small".to_string(), "multipart".into()]).await.unwrap();
    assert!(storage::list_all(&store, "").await.unwrap().is_empty());
}
