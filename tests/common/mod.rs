//! The shared test harness: throwaway PostgreSQL clusters, an S3-protocol
//! server, and helpers to drive the built `walvault` binary.
#![allow(dead_code, unused_imports)]

pub mod daemon;
pub mod env;
pub mod pg;
pub mod s3;
pub mod tmpfs;
