//! The S3-protocol test server (filled in by the storage work).
