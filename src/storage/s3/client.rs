//! Builds the SDK client from `S3Options`: endpoint, addressing, region,
//! credentials, checksums, timeouts, and the SDK's own retries turned off so that
//! they do not multiply with the retry wrapper's.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::stalled_stream_protection::StalledStreamProtectionConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation};

use super::{ChecksumMode, S3Options};
use crate::storage::{StorageError, StorageErrorKind};

/// A blackholed address should fail fast; a refused connection fails at once anyway.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A transfer that moves no byte for this long (either way) fails, and the retry
/// wrapper tries again (a ranged get resumes a download). No overall read timeout
/// is set on the SDK: an upload's duration grows with its part size, and the retry
/// wrapper's per-attempt limit already bounds every request.
const STALL_GRACE: Duration = Duration::from_secs(30);

pub(crate) const DEFAULT_REGION: &str = "us-east-1";

/// The endpoint URL to use: as given when it has a scheme, else https.
pub(crate) fn endpoint_url(raw: &str) -> String {
    let raw = raw.trim().trim_end_matches('/');
    if raw.contains("://") { raw.to_string() } else { format!("https://{raw}") }
}

pub(crate) async fn build(opts: &S3Options) -> Result<aws_sdk_s3::Client, StorageError> {
    let region = opts.region.clone().filter(|r| !r.is_empty()).unwrap_or_else(|| DEFAULT_REGION.to_string());
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(region))
        .retry_config(RetryConfig::disabled())
        .timeout_config(TimeoutConfig::builder().connect_timeout(CONNECT_TIMEOUT).build())
        .stalled_stream_protection(StalledStreamProtectionConfig::enabled().grace_period(STALL_GRACE).build());
    match (&opts.access_key_id, &opts.secret_access_key) {
        (Some(id), Some(secret)) => {
            loader = loader.credentials_provider(Credentials::new(id, secret, opts.session_token.clone(), None, "walvault-config"));
            // With the keys given, nothing is wanted from ~/.aws: not reading it
            // also spares a warning on every run where HOME is not the running
            // user's (runuser -u postgres from root keeps HOME=/root).
            loader = loader.profile_files(no_profile_files());
        }
        (None, None) => {} // the AWS default chain: environment, profile, web identity, container, IMDS
        _ => {
            return Err(StorageError::new(
                StorageErrorKind::InvalidInput,
                "",
                "only one of repository.access_key_id and repository.secret_access_key is set; set both, or neither to use the AWS credential chain",
            ));
        }
    }
    let shared = loader.load().await;

    let (request, response) = match opts.checksums {
        ChecksumMode::WhenSupported => (RequestChecksumCalculation::WhenSupported, ResponseChecksumValidation::WhenSupported),
        ChecksumMode::WhenRequired => (RequestChecksumCalculation::WhenRequired, ResponseChecksumValidation::WhenRequired),
    };
    let mut config = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(opts.path_style)
        .request_checksum_calculation(request)
        .response_checksum_validation(response);
    if let Some(endpoint) = opts.endpoint.as_deref().filter(|e| !e.trim().is_empty()) {
        let url = endpoint_url(endpoint);
        if url.starts_with("http://") && !is_loopback(&url) {
            tracing::warn!(endpoint = %url, "the S3 endpoint is plain http: backups travel unencrypted in transit (they are still age-encrypted)");
        }
        config = config.endpoint_url(url);
    }
    Ok(aws_sdk_s3::Client::from_conf(config.build()))
}

/// A profile file set holding only /dev/null (the set may not be empty).
/// (aws-config re-exports aws-runtime's `EnvConfigFiles` under these
/// deprecated names; they are the same types, without another dependency.)
#[allow(deprecated)]
fn no_profile_files() -> aws_config::profile::profile_file::ProfileFiles {
    use aws_config::profile::profile_file::{ProfileFileKind, ProfileFiles};
    ProfileFiles::builder().with_file(ProfileFileKind::Config, "/dev/null").build()
}

fn is_loopback(url: &str) -> bool {
    let host = url.split("://").nth(1).unwrap_or("").split('/').next().unwrap_or("");
    let host = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
    matches!(host, "localhost" | "127.0.0.1" | "[::1]") || host.starts_with("127.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_without_scheme_is_https() {
        assert_eq!(endpoint_url("s3.example.com"), "https://s3.example.com");
        assert_eq!(endpoint_url("s3.example.com:9000/"), "https://s3.example.com:9000");
        assert_eq!(endpoint_url("http://127.0.0.1:9000"), "http://127.0.0.1:9000");
        assert_eq!(endpoint_url(" https://x "), "https://x");
    }

    #[test]
    fn loopback_detection() {
        assert!(is_loopback("http://127.0.0.1:9000"));
        assert!(is_loopback("http://localhost"));
        assert!(is_loopback("http://[::1]:9000"));
        assert!(!is_loopback("http://10.0.0.1:9000"));
        assert!(!is_loopback("http://minio.internal"));
    }
}
