//! Turns SDK errors into `StorageError`s, in one place, so that the retry wrapper
//! knows what is worth trying again and users read what happened in plain words.
//! Messages name the operation and the store; they never carry credentials (the
//! SDK's error texts do not, and we never format the request or the config).

use std::error::Error as StdError;

use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;

use crate::storage::{StorageError, StorageErrorKind};

/// What an error message says about where a request went.
#[derive(Debug, Clone)]
pub(crate) struct Site {
    /// `s3://bucket/prefix`
    pub location: String,
    pub bucket: String,
    /// The endpoint as configured, or a description of the AWS default.
    pub endpoint: String,
    /// A custom endpoint addressed with virtual-hosted buckets (bucket.host):
    /// many S3-compatible stores need path style instead.
    pub virtual_hosted_custom: bool,
}

/// Classifies a failed SDK call of operation `op` on `key`.
pub(crate) fn classify<E>(site: &Site, op: &str, key: &str, err: SdkError<E, HttpResponse>) -> StorageError
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
{
    let at = &site.location;
    match &err {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let code = service.err().code();
            let (kind, plain) = service_kind(status, code, &site.bucket);
            let detail = match (code, service.err().message()) {
                (Some(c), Some(m)) if !m.is_empty() => format!("HTTP {status} {c}: {m}"),
                (Some(c), _) => format!("HTTP {status} {c}"),
                (None, _) => format!("HTTP {status}"),
            };
            StorageError::new(kind, key, format!("{op} at {at}: {plain} ({detail})"))
        }
        SdkError::DispatchFailure(failure) => {
            if let Some(creds) = find_source::<CredentialsError>(&err) {
                return credentials_error(site, op, key, creds);
            }
            let cause = root_cause(&err);
            if failure.is_timeout() {
                StorageError::new(
                    StorageErrorKind::Transient,
                    key,
                    format!("{op} at {at}: no answer from {} in time ({cause})", site.endpoint),
                )
            } else if failure.is_user() {
                StorageError::new(StorageErrorKind::InvalidInput, key, format!("{op} at {at}: the request could not be sent ({cause})"))
            } else {
                // Connection refused or reset, DNS, TLS handshake: the retry wrapper
                // tries again and reports the store unreachable if it stays so.
                let lookup_failed = ["dns", "lookup", "name or service"].iter().any(|w| cause.to_lowercase().contains(w));
                let advice = if site.virtual_hosted_custom && lookup_failed {
                    "; if this store does not serve buckets as host names (bucket.host), set repository.path_style = true"
                } else {
                    ""
                };
                StorageError::new(
                    StorageErrorKind::Transient,
                    key,
                    format!("{op} at {at}: cannot reach {} ({cause}){advice}", site.endpoint),
                )
            }
        }
        SdkError::TimeoutError(_) => {
            StorageError::new(StorageErrorKind::Transient, key, format!("{op} at {at}: no answer from {} in time", site.endpoint))
        }
        SdkError::ResponseError(response) => {
            // The store answered but the answer could not be read (cut short, garbled):
            // a broken connection more often than a broken store.
            let status = response.raw().status().as_u16();
            let cause = root_cause(&err);
            StorageError::new(StorageErrorKind::Transient, key, format!("{op} at {at}: unreadable answer (HTTP {status}: {cause})"))
        }
        SdkError::ConstructionFailure(_) => {
            if let Some(creds) = find_source::<CredentialsError>(&err) {
                return credentials_error(site, op, key, creds);
            }
            let cause = root_cause(&err);
            StorageError::new(StorageErrorKind::Permanent, key, format!("{op} at {at}: the request could not be built ({cause})"))
        }
        _ => StorageError::new(StorageErrorKind::Permanent, key, format!("{op} at {at}: {}", root_cause(&err))),
    }
}

/// Kind and a plain description for an error answer of the store.
fn service_kind(status: u16, code: Option<&str>, bucket: &str) -> (StorageErrorKind, String) {
    use StorageErrorKind as K;
    let (kind, plain): (K, &str) = match code.unwrap_or("") {
        "NoSuchKey" => (K::NotFound, "no such object"),
        "NoSuchBucket" => return (K::NotFound, format!("bucket '{bucket}' does not exist")),
        "NoSuchUpload" => (K::NotFound, "no such multipart upload (completed or aborted already)"),
        "AccessDenied" | "AllAccessDisabled" | "AccountProblem" => (K::PermissionDenied, "access denied"),
        "InvalidAccessKeyId" => (K::PermissionDenied, "the store does not know this access key"),
        "SignatureDoesNotMatch" => (K::PermissionDenied, "the secret key does not match the access key"),
        "ExpiredToken" | "InvalidToken" | "TokenRefreshRequired" => (K::PermissionDenied, "the session token is invalid or expired"),
        "SlowDown" | "Throttling" | "ThrottlingException" | "RequestThrottled" | "TooManyRequests" | "RequestLimitExceeded" => {
            (K::Transient, "the store asks to slow down")
        }
        "RequestTimeout" => (K::Transient, "the store timed out waiting for the request"),
        "InternalError" | "ServiceUnavailable" => (K::Transient, "the store failed internally"),
        "ConditionalRequestConflict" => (K::Transient, "a concurrent conditional write conflicted"),
        "InvalidRange" => (K::InvalidInput, "the byte range is outside the object"),
        "EntityTooSmall" | "EntityTooLarge" | "InvalidPart" | "InvalidPartOrder" | "KeyTooLongError" | "InvalidArgument" => {
            (K::InvalidInput, "the store refused the request as invalid")
        }
        "QuotaExceeded" | "XMinioStorageFull" | "InsufficientStorage" => (K::NoSpace, "the store is full or over quota"),
        _ => match status {
            404 => (K::NotFound, "no such object"),
            401 | 403 => (K::PermissionDenied, "access denied"),
            416 => (K::InvalidInput, "the byte range is outside the object"),
            507 => (K::NoSpace, "the store is full"),
            408 | 429 => (K::Transient, "the store is busy"),
            500..=599 => (K::Transient, "the store failed internally"),
            _ => (K::Permanent, "the store refused the request"),
        },
    };
    (kind, plain.to_string())
}

fn credentials_error(site: &Site, op: &str, key: &str, err: &CredentialsError) -> StorageError {
    let kind = match err {
        CredentialsError::ProviderTimedOut(_) => StorageErrorKind::Transient,
        _ => StorageErrorKind::PermissionDenied,
    };
    let cause = root_cause(err);
    StorageError::new(
        kind,
        key,
        format!(
            "{op} at {}: no usable S3 credentials ({cause}); set repository.access_key_id and secret_access_key, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or a profile",
            site.location
        ),
    )
}

/// A key that DeleteObjects reported as not deleted.
pub(crate) fn delete_error(site: &Site, key: &str, code: Option<&str>, message: Option<&str>) -> StorageError {
    let (kind, plain) = service_kind(0, code, &site.bucket);
    let code = code.unwrap_or("no error code");
    let detail = match message {
        Some(m) if !m.is_empty() => format!("{code}: {m}"),
        _ => code.to_string(),
    };
    StorageError::new(kind, key, format!("delete at {}: {plain} ({detail})", site.location))
}

/// A failure while streaming a response body (connection reset, stalled, cut short).
pub(crate) fn body_error(site: &Site, key: &str, err: &(dyn StdError + 'static)) -> StorageError {
    StorageError::new(
        StorageErrorKind::Transient,
        key,
        format!("get at {}: the connection broke while reading ({})", site.location, root_cause(err)),
    )
}

fn find_source<'a, T: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        cur = e.source();
    }
    None
}

/// The innermost error's text ("Connection refused (os error 111)"), which says
/// more than the SDK's wrappers ("dispatch failure", "io error").
pub(crate) fn root_cause(err: &(dyn StdError + 'static)) -> String {
    let mut last = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let text = e.to_string();
        if !text.is_empty() {
            last = text;
        }
        cur = e.source();
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use StorageErrorKind as K;

    #[test]
    fn service_errors_by_code_and_status() {
        let kind = |status, code| service_kind(status, code, "b").0;
        assert_eq!(kind(404, Some("NoSuchKey")), K::NotFound);
        assert_eq!(kind(404, None), K::NotFound);
        assert_eq!(kind(403, Some("AccessDenied")), K::PermissionDenied);
        assert_eq!(kind(403, Some("SignatureDoesNotMatch")), K::PermissionDenied);
        assert_eq!(kind(403, Some("InvalidAccessKeyId")), K::PermissionDenied);
        assert_eq!(kind(503, Some("SlowDown")), K::Transient);
        assert_eq!(kind(503, None), K::Transient);
        assert_eq!(kind(500, Some("InternalError")), K::Transient);
        assert_eq!(kind(400, Some("RequestTimeout")), K::Transient);
        assert_eq!(kind(409, Some("ConditionalRequestConflict")), K::Transient);
        assert_eq!(kind(416, Some("InvalidRange")), K::InvalidInput);
        assert_eq!(kind(400, Some("Whatever")), K::Permanent);
        assert_eq!(kind(507, None), K::NoSpace);
        let (k, msg) = service_kind(404, Some("NoSuchBucket"), "backups");
        assert_eq!(k, K::NotFound);
        assert!(msg.contains("bucket 'backups' does not exist"), "{msg}");
    }

    #[derive(Debug)]
    struct Wrapper(std::io::Error);
    impl std::fmt::Display for Wrapper {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("dispatch failure")
        }
    }
    impl StdError for Wrapper {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn root_cause_is_innermost() {
        let outer = Wrapper(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused (os error 111)"));
        assert_eq!(root_cause(&outer), "Connection refused (os error 111)");
        assert!(find_source::<std::io::Error>(&outer).is_some());
    }
}
