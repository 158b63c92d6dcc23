//! PostgreSQL: a replication-protocol client on postgres-protocol + tokio, the
//! WAL coordinate types, WAL page-header checks, BASE_BACKUP and the WAL
//! streamer, and recovery configuration.

mod auth;
pub mod basebackup;
mod certhash;
pub mod conn;
pub mod conninfo;
mod errfields;
pub mod lsn;
mod query;
pub mod recovery;
pub mod server;
mod startup;
pub mod streamer;
pub mod tar;
mod tls;
pub mod walheader;
mod wire;

pub use conn::{AuthMethod, BackendMessage, CancelToken, Connection, Mode, ResultSet, SystemInfo};
pub use conninfo::ConnParams;
pub use lsn::{Lsn, TimelineId, WalSegmentName};

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("invalid connection string: {0}")]
    Conninfo(String),
    #[error("cannot connect to PostgreSQL at {target}: {message}")]
    Connect { target: String, message: String },
    #[error("PostgreSQL authentication failed for user \"{user}\": {message}")]
    Auth { user: String, message: String },
    #[error("TLS to PostgreSQL: {0}")]
    Tls(String),
    #[error("PostgreSQL: {message} (SQLSTATE {code}){}", detail.as_ref().map(|d| format!("; {d}")).unwrap_or_default())]
    Server { code: String, message: String, detail: Option<String>, hint: Option<String> },
    #[error("unexpected message from PostgreSQL: {0}")]
    Protocol(String),
    #[error("connection to PostgreSQL lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Unsupported(String),
}

impl PgError {
    /// The SQLSTATE of a server error.
    pub fn code(&self) -> Option<&str> {
        match self {
            PgError::Server { code, .. } => Some(code),
            _ => None,
        }
    }

    pub fn hint(&self) -> Option<String> {
        Some(match self {
            PgError::Server { hint: Some(h), .. } => h.clone(),
            PgError::Server { code, .. } if code == "28000" => {
                "allow the connection in pg_hba.conf, e.g. `host replication walvault 10.0.0.5/32 scram-sha-256` (the database must be `replication`)".into()
            }
            PgError::Server { code, .. } if code == "42501" => "grant the role replication: ALTER ROLE walvault REPLICATION".into(),
            PgError::Server { code, .. } if code == "53300" => "raise max_wal_senders on the server (and restart it)".into(),
            PgError::Auth { .. } => "check the password (conninfo password, PGPASSWORD or ~/.pgpass) and the pg_hba.conf method".into(),
            PgError::Connect { .. } => "check postgres.conninfo (host, port), that the server runs and accepts connections".into(),
            PgError::Tls(_) => "check sslmode, sslrootcert and the server's certificate".into(),
            PgError::Server { code, .. } if code.starts_with("57P") => {
                "the server shut down or restarted (or an administrator ended the session); once it is back, run the command again: work interrupted this way is not recorded".into()
            }
            PgError::Io(_) => {
                "the server restarted or stopped, or the network failed (see the server's log); once it is back, run the command again: work interrupted this way is not recorded".into()
            }
            _ => return None,
        })
    }
}
