//! Simple queries on a `Connection`: text result sets (one command may return
//! several), and the small replication commands built on them.

use super::conn::{BackendMessage, Connection, ResultSet, SystemInfo};
use super::{Lsn, PgError};

impl Connection {
    /// Runs `sql` with the simple-query protocol and collects every result
    /// set in text form. A server error is returned after the server is ready
    /// again, so the connection stays usable. COPY commands are refused:
    /// they need `send_query` and `next_message`.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<ResultSet>, PgError> {
        self.send_query(sql).await?;
        let mut sets: Vec<ResultSet> = Vec::new();
        let mut error: Option<PgError> = None;
        loop {
            match self.next_message().await? {
                BackendMessage::RowDescription(columns) => sets.push(ResultSet { columns, rows: Vec::new() }),
                BackendMessage::DataRow(values) => {
                    let Some(set) = sets.last_mut() else {
                        return Err(PgError::Protocol("a data row without a row description".into()));
                    };
                    let row = values.into_iter().map(|v| v.map(text).transpose()).collect::<Result<Vec<_>, _>>()?;
                    set.rows.push(row);
                }
                BackendMessage::CommandComplete(_) | BackendMessage::EmptyQueryResponse => {}
                BackendMessage::Error(e) => {
                    error.get_or_insert(e);
                }
                BackendMessage::ReadyForQuery => return error.map_or(Ok(sets), Err),
                BackendMessage::CopyInResponse => {
                    self.send_copy_fail("walvault: simple_query does not send COPY data").await?;
                    error.get_or_insert(copy_refused(sql));
                }
                // Drained until CopyDone; the server then completes normally.
                BackendMessage::CopyOutResponse => {
                    error.get_or_insert(copy_refused(sql));
                }
                BackendMessage::CopyData(_) | BackendMessage::CopyDone => {}
                BackendMessage::CopyBothResponse => return Err(copy_refused(sql)),
            }
        }
    }

    /// IDENTIFY_SYSTEM (replication mode): the cluster's system identifier,
    /// current timeline and WAL flush position.
    pub async fn identify_system(&mut self) -> Result<SystemInfo, PgError> {
        let sets = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = single_row(&sets, "IDENTIFY_SYSTEM")?;
        let field = |i: usize, name: &str| -> Result<&str, PgError> {
            row.get(i).and_then(|v| v.as_deref()).ok_or_else(|| PgError::Protocol(format!("IDENTIFY_SYSTEM returned no {name}")))
        };
        let bad = |name: &str, v: &str| PgError::Protocol(format!("IDENTIFY_SYSTEM returned an invalid {name}: {v:?}"));
        let systemid = field(0, "systemid")?;
        let timeline = field(1, "timeline")?;
        let xlogpos = field(2, "xlogpos")?;
        Ok(SystemInfo {
            system_identifier: systemid.parse().map_err(|_| bad("systemid", systemid))?,
            timeline: timeline.parse().map_err(|_| bad("timeline", timeline))?,
            xlogpos: xlogpos.parse::<Lsn>().map_err(|_| bad("xlogpos", xlogpos))?,
        })
    }

    /// `SHOW name`, which the walsender also understands.
    pub async fn show(&mut self, name: &str) -> Result<String, PgError> {
        // The name is spliced into the command: allow only what GUC names use.
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') {
            return Err(PgError::Protocol(format!("\"{name}\" is not a setting name")));
        }
        let sets = self.simple_query(&format!("SHOW {name}")).await?;
        single_row(&sets, "SHOW")?.first().cloned().flatten().ok_or_else(|| PgError::Protocol(format!("SHOW {name} returned no value")))
    }
}

fn single_row<'a>(sets: &'a [ResultSet], command: &str) -> Result<&'a Vec<Option<String>>, PgError> {
    match sets {
        [set] if set.rows.len() == 1 => Ok(&set.rows[0]),
        _ => Err(PgError::Protocol(format!("{command} did not return exactly one row"))),
    }
}

fn text(value: bytes::Bytes) -> Result<String, PgError> {
    String::from_utf8(value.to_vec()).map_err(|_| PgError::Protocol("the server sent text that is not UTF-8".into()))
}

fn copy_refused(sql: &str) -> PgError {
    PgError::Unsupported(format!("simple_query cannot run the COPY-mode command {sql:?}; use send_query and next_message"))
}
