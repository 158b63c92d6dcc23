//! libpq connection strings (`key=value` and `postgresql://` URIs) with the PG*
//! environment defaults and ~/.pgpass. PLACEHOLDER: implemented by the pg-client work.

use std::path::PathBuf;
use std::time::Duration;

use super::PgError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Tcp(String),
    Unix(PathBuf),
}

#[derive(Debug, Clone)]
pub struct ConnParams {
    pub hosts: Vec<(Host, u16)>,
    pub user: String,
    pub password: Option<String>,
    pub dbname: Option<String>,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub application_name: Option<String>,
    pub connect_timeout: Option<Duration>,
}

impl ConnParams {
    pub fn parse(conninfo: &str) -> Result<ConnParams, PgError> {
        let _ = conninfo;
        todo!("pg client")
    }
}
