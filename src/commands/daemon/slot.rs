//! The replication slot's retained WAL, read from the server on its own
//! replication connection: the server's current WAL position (IDENTIFY_SYSTEM)
//! minus the slot's restart_lsn (READ_REPLICATION_SLOT, PostgreSQL 15 and
//! later). Unlike the streamer's own lag, this stays true while streaming is
//! down, which is when pg_wal grows.

use crate::error::Result;
use crate::pg::Lsn;
use crate::pg::conn::{Connection, Mode};
use crate::pg::conninfo::ConnParams;

/// Bytes of WAL the slot holds on the server; None when the server cannot say
/// (before 15, or the slot does not exist yet).
pub async fn retained_bytes(params: &ConnParams, slot: &str) -> Result<Option<u64>> {
    let mut conn = Connection::connect(params, Mode::Replication).await?;
    let result = async {
        let sys = conn.identify_system().await?;
        if conn.server_version_num() < 150000 {
            return Ok(None);
        }
        let sets = conn.simple_query(&format!("READ_REPLICATION_SLOT \"{slot}\"")).await?;
        let restart = sets
            .first()
            .and_then(|s| s.rows.first())
            .and_then(|row| row.get(1).cloned().flatten())
            .and_then(|l| l.parse::<Lsn>().ok())
            .filter(|l| l.is_valid());
        Ok(restart.map(|r| sys.xlogpos.0.saturating_sub(r.0)))
    }
    .await;
    let _ = conn.close().await;
    result
}
