//! walvault: backup and point-in-time recovery for PostgreSQL.
//!
//! Layers depend downward only: `commands` uses `pg`, `repo`, `pipeline` and
//! `storage`; `storage` knows nothing of WAL or backups.

pub mod cli;
pub mod commands;
pub mod config;
pub mod crashpoint;
pub mod error;
pub mod logging;
pub mod pg;
pub mod pipeline;
pub mod progress;
pub mod repo;
pub mod storage;
pub mod util;

pub use error::{Error, Result};
