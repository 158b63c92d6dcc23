//! The body of a GET as a stream of `Bytes` that fails, as a transient error,
//! when the connection breaks or ends before Content-Length bytes arrived, so
//! the retry wrapper resumes the read with a ranged get instead of returning a
//! silently truncated object.

use std::sync::Arc;

use aws_sdk_s3::primitives::ByteStream as SdkByteStream;

use super::classify::{Site, body_error};
use crate::storage::{ByteStream, StorageError, StorageErrorKind};

struct Body {
    inner: SdkByteStream,
    expected: Option<u64>,
    received: u64,
    key: String,
    site: Arc<Site>,
    done: bool,
}

pub(crate) fn checked_stream(inner: SdkByteStream, expected: Option<u64>, key: String, site: Arc<Site>) -> ByteStream {
    let body = Body { inner, expected, received: 0, key, site, done: false };
    Box::pin(futures::stream::unfold(body, |mut b| async move {
        if b.done {
            return None;
        }
        match b.inner.next().await {
            Some(Ok(bytes)) => {
                b.received += bytes.len() as u64;
                Some((Ok(bytes), b))
            }
            Some(Err(e)) => {
                b.done = true;
                let err = body_error(&b.site, &b.key, &e);
                Some((Err(err), b))
            }
            None => {
                b.done = true;
                match b.expected {
                    Some(expected) if b.received < expected => {
                        let err = StorageError::new(
                            StorageErrorKind::Transient,
                            &b.key,
                            format!("get at {}: the object ended after {} of {expected} bytes", b.site.location, b.received),
                        );
                        Some((Err(err), b))
                    }
                    _ => None,
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use futures::TryStreamExt;

    use super::*;

    fn site() -> Arc<Site> {
        Arc::new(Site {
            location: "s3://b/p".into(),
            bucket: "b".into(),
            endpoint: "http://127.0.0.1:1".into(),
            virtual_hosted_custom: false,
        })
    }

    #[tokio::test]
    async fn a_complete_body_passes() {
        let body = SdkByteStream::from(bytes::Bytes::from_static(b"0123456789"));
        let got: Vec<bytes::Bytes> = checked_stream(body, Some(10), "k".into(), site()).try_collect().await.unwrap();
        assert_eq!(got.concat(), b"0123456789");
    }

    #[tokio::test]
    async fn a_short_body_is_a_transient_error() {
        let body = SdkByteStream::from(bytes::Bytes::from_static(b"01234"));
        let mut stream = checked_stream(body, Some(10), "wal/1".into(), site());
        assert_eq!(&stream.try_next().await.unwrap().unwrap()[..], b"01234");
        let err = stream.try_next().await.unwrap_err();
        assert_eq!(err.kind(), StorageErrorKind::Transient);
        assert_eq!(err.key(), "wal/1");
        assert!(err.to_string().contains("ended after 5 of 10 bytes"), "{err}");
        assert!(stream.try_next().await.unwrap().is_none(), "nothing after the error");
    }
}
