//! BASE_BACKUP on a replication connection: the command for the server's
//! version, and the replies turned into events. PostgreSQL 15+ sends one
//! CopyOut with typed sub-messages (`n` new archive, `d` data, `p` progress,
//! `m` manifest follows); 13 and 14 send one raw, unterminated tar per
//! tablespace (the base directory last) and then the manifest.

use bytes::Bytes;

use super::conn::{BackendMessage, Connection};
use super::{Lsn, PgError};

#[derive(Debug, Clone)]
pub struct BaseBackupOptions {
    pub label: String,
    pub fast_checkpoint: bool,
    /// kB (1024 bytes) per second, or none.
    pub max_rate_kb: Option<u32>,
}

/// A tablespace as the server lists it; the base directory has no oid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablespaceRow {
    pub oid: Option<u32>,
    pub location: Option<String>,
    pub size_kb: Option<u64>,
}

#[derive(Debug)]
pub enum BackupEvent {
    Started {
        start_lsn: Lsn,
        timeline: u32,
    },
    Tablespaces(Vec<TablespaceRow>),
    /// A new tar archive: the base directory (`tablespace == None`) or a tablespace.
    ArchiveStart {
        tablespace: Option<TablespaceRow>,
    },
    ArchiveData(Bytes),
    ArchiveEnd,
    /// Bytes sent so far (15+).
    Progress(u64),
    ManifestData(Bytes),
    Finished {
        end_lsn: Lsn,
        timeline: u32,
    },
}

/// Quotes a replication-command string literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

pub fn command(opts: &BaseBackupOptions, server_version_num: u32) -> String {
    let label = literal(&opts.label);
    if server_version_num >= 150000 {
        let mut o = vec![
            format!("LABEL {label}"),
            "PROGRESS".into(),
            format!("CHECKPOINT '{}'", if opts.fast_checkpoint { "fast" } else { "spread" }),
            "WAIT false".into(),
            "MANIFEST 'yes'".into(),
            "MANIFEST_CHECKSUMS 'CRC32C'".into(),
            "TABLESPACE_MAP".into(),
        ];
        if let Some(r) = opts.max_rate_kb {
            o.push(format!("MAX_RATE {r}"));
        }
        format!("BASE_BACKUP ({})", o.join(", "))
    } else {
        let mut c = format!("BASE_BACKUP LABEL {label} PROGRESS");
        if opts.fast_checkpoint {
            c.push_str(" FAST");
        }
        c.push_str(" NOWAIT TABLESPACE_MAP MANIFEST 'yes' MANIFEST_CHECKSUMS 'CRC32C'");
        if let Some(r) = opts.max_rate_kb {
            c.push_str(&format!(" MAX_RATE {r}"));
        }
        c
    }
}

enum Phase {
    StartResult,
    Tablespaces,
    /// Waiting for the next CopyOut (13/14: archive `next`, then the manifest).
    BetweenCopies,
    InArchive,
    InManifest,
    /// 15+: inside the single CopyOut.
    InCopy {
        manifest: bool,
        archive_open: bool,
    },
    EndResult,
    Done,
}

pub struct BaseBackupStream<'c> {
    conn: &'c mut Connection,
    decoder: BaseBackupDecoder,
}

impl<'c> BaseBackupStream<'c> {
    pub async fn start(conn: &'c mut Connection, opts: &BaseBackupOptions) -> Result<BaseBackupStream<'c>, PgError> {
        let modern = conn.server_version_num() >= 150000;
        conn.send_query(&command(opts, conn.server_version_num())).await?;
        Ok(BaseBackupStream { conn, decoder: BaseBackupDecoder::new(modern) })
    }

    /// The next event; `None` once the command completed.
    pub async fn next(&mut self) -> Result<Option<BackupEvent>, PgError> {
        loop {
            if let Some(ev) = self.decoder.pending.take() {
                return Ok(Some(ev));
            }
            if self.decoder.is_done() {
                return Ok(None);
            }
            let msg = self.conn.next_message().await?;
            if let BackendMessage::Error(e) = msg {
                // Drain to ReadyForQuery so the connection stays usable, then fail.
                loop {
                    match self.conn.next_message().await {
                        Ok(BackendMessage::ReadyForQuery) | Err(_) => break,
                        _ => {}
                    }
                }
                self.decoder.phase = Phase::Done;
                return Err(e);
            }
            if let Some(ev) = self.decoder.step(msg)? {
                return Ok(Some(ev));
            }
        }
    }
}

/// The replies to BASE_BACKUP turned into events, one message at a time:
/// the state machine without the connection, so it is fuzzed directly
/// (fuzz/src/bin/replication.rs).
pub struct BaseBackupDecoder {
    modern: bool,
    phase: Phase,
    rows: Vec<Vec<Option<Bytes>>>,
    tablespaces: Vec<TablespaceRow>,
    next_archive: usize,
    end: Option<(Lsn, u32)>,
    pending: Option<BackupEvent>,
}

impl BaseBackupDecoder {
    /// `modern`: the server is PostgreSQL 15 or later (one CopyOut with typed sub-messages).
    pub fn new(modern: bool) -> BaseBackupDecoder {
        BaseBackupDecoder {
            modern,
            phase: Phase::StartResult,
            rows: Vec::new(),
            tablespaces: Vec::new(),
            next_archive: 0,
            end: None,
            pending: None,
        }
    }

    /// The command completed (ReadyForQuery after the end position).
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// Feeds one message; returns the event it completes, if any. A second
    /// event due at the same message comes from `take_pending`.
    pub fn feed(&mut self, msg: BackendMessage) -> Result<Option<BackupEvent>, PgError> {
        if let BackendMessage::Error(e) = msg {
            self.phase = Phase::Done;
            return Err(e);
        }
        self.step(msg)
    }

    pub fn take_pending(&mut self) -> Option<BackupEvent> {
        self.pending.take()
    }

    fn step(&mut self, msg: BackendMessage) -> Result<Option<BackupEvent>, PgError> {
        use BackendMessage as M;
        let unexpected = |m: &BackendMessage, phase: &str| PgError::Protocol(format!("{m:?} during BASE_BACKUP ({phase})"));
        match (&mut self.phase, msg) {
            (Phase::StartResult | Phase::Tablespaces | Phase::EndResult, M::RowDescription(_)) => {
                self.rows.clear();
                Ok(None)
            }
            (Phase::StartResult | Phase::Tablespaces | Phase::EndResult, M::DataRow(row)) => {
                self.rows.push(row);
                Ok(None)
            }
            (Phase::StartResult, M::CommandComplete(_)) => {
                let (lsn, tli) = lsn_row(&self.rows, "start")?;
                self.phase = Phase::Tablespaces;
                Ok(Some(BackupEvent::Started { start_lsn: lsn, timeline: tli }))
            }
            (Phase::Tablespaces, M::CommandComplete(_)) => {
                self.tablespaces = self.rows.iter().map(|r| tablespace_row(r)).collect::<Result<_, _>>()?;
                self.phase = if self.modern { Phase::InCopy { manifest: false, archive_open: false } } else { Phase::BetweenCopies };
                Ok(Some(BackupEvent::Tablespaces(self.tablespaces.clone())))
            }
            (Phase::BetweenCopies, M::CopyOutResponse) => {
                if self.next_archive < self.tablespaces.len() {
                    let ts = self.tablespaces[self.next_archive].clone();
                    self.next_archive += 1;
                    self.phase = Phase::InArchive;
                    Ok(Some(BackupEvent::ArchiveStart { tablespace: ts.oid.map(|_| ts) }))
                } else {
                    self.phase = Phase::InManifest;
                    Ok(None)
                }
            }
            (Phase::BetweenCopies, M::RowDescription(_)) => {
                self.rows.clear();
                self.phase = Phase::EndResult;
                Ok(None)
            }
            (Phase::InArchive, M::CopyData(d)) => Ok(Some(BackupEvent::ArchiveData(d))),
            (Phase::InArchive, M::CopyDone) => {
                self.phase = Phase::BetweenCopies;
                Ok(Some(BackupEvent::ArchiveEnd))
            }
            (Phase::InManifest, M::CopyData(d)) => Ok(Some(BackupEvent::ManifestData(d))),
            (Phase::InManifest, M::CopyDone) => {
                self.phase = Phase::BetweenCopies;
                Ok(None)
            }
            (Phase::InCopy { .. }, M::CopyOutResponse) => Ok(None),
            (Phase::InCopy { manifest, archive_open }, M::CopyData(d)) => {
                let Some(&kind) = d.first() else { return Err(PgError::Protocol("empty CopyData in BASE_BACKUP".into())) };
                match kind {
                    b'n' => {
                        let mut parts = d[1..].split(|&b| b == 0);
                        let _name = parts.next().unwrap_or_default();
                        let path = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
                        let ts = self.tablespaces.iter().find(|t| t.location.as_deref() == Some(path.as_str()) && t.oid.is_some()).cloned();
                        let start = BackupEvent::ArchiveStart { tablespace: ts };
                        if *archive_open {
                            self.pending = Some(start);
                            *archive_open = true;
                            return Ok(Some(BackupEvent::ArchiveEnd));
                        }
                        *archive_open = true;
                        Ok(Some(start))
                    }
                    b'd' if *manifest => Ok(Some(BackupEvent::ManifestData(d.slice(1..)))),
                    b'd' => Ok(Some(BackupEvent::ArchiveData(d.slice(1..)))),
                    b'p' => {
                        let n = d.get(1..9).map(|b| i64::from_be_bytes(b.try_into().unwrap())).unwrap_or(0);
                        Ok(Some(BackupEvent::Progress(n.max(0) as u64)))
                    }
                    b'm' => {
                        *manifest = true;
                        if *archive_open {
                            *archive_open = false;
                            return Ok(Some(BackupEvent::ArchiveEnd));
                        }
                        Ok(None)
                    }
                    other => Err(PgError::Protocol(format!("unknown BASE_BACKUP message type '{}'", other as char))),
                }
            }
            (Phase::InCopy { archive_open, .. }, M::CopyDone) => {
                let was_open = *archive_open;
                self.phase = Phase::EndResult;
                Ok(was_open.then_some(BackupEvent::ArchiveEnd))
            }
            (Phase::EndResult, M::CommandComplete(_)) => {
                if self.end.is_none() && !self.rows.is_empty() {
                    self.end = Some(lsn_row(&self.rows, "end")?);
                    self.rows.clear();
                    let (lsn, tli) = self.end.expect("just set");
                    return Ok(Some(BackupEvent::Finished { end_lsn: lsn, timeline: tli }));
                }
                Ok(None)
            }
            (Phase::EndResult, M::ReadyForQuery) => {
                self.phase = Phase::Done;
                if self.end.is_none() {
                    return Err(PgError::Protocol("BASE_BACKUP ended without its end position".into()));
                }
                Ok(None)
            }
            (phase, m) => {
                let name = match phase {
                    Phase::StartResult => "start",
                    Phase::Tablespaces => "tablespaces",
                    Phase::BetweenCopies => "between archives",
                    Phase::InArchive => "archive",
                    Phase::InManifest => "manifest",
                    Phase::InCopy { .. } => "copy",
                    Phase::EndResult => "end",
                    Phase::Done => "done",
                };
                Err(unexpected(&m, name))
            }
        }
    }
}

fn text(row: &[Option<Bytes>], i: usize) -> Option<String> {
    row.get(i).and_then(|v| v.as_ref()).map(|b| String::from_utf8_lossy(b).into_owned())
}

fn lsn_row(rows: &[Vec<Option<Bytes>>], what: &str) -> Result<(Lsn, u32), PgError> {
    let row = rows.first().ok_or_else(|| PgError::Protocol(format!("BASE_BACKUP sent no {what} position")))?;
    let lsn: Lsn =
        text(row, 0).and_then(|s| s.parse().ok()).ok_or_else(|| PgError::Protocol(format!("BASE_BACKUP {what} position is not an LSN")))?;
    let tli = text(row, 1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((lsn, tli))
}

fn tablespace_row(row: &[Option<Bytes>]) -> Result<TablespaceRow, PgError> {
    Ok(TablespaceRow {
        oid: text(row, 0).map(|s| s.parse().map_err(|_| PgError::Protocol(format!("bad tablespace oid '{s}'")))).transpose()?,
        location: text(row, 1),
        size_kb: text(row, 2).and_then(|s| s.parse().ok()),
    })
}

/// The next transaction id (64-bit, epoch included) recorded in a copy of
/// `global/pg_control`: the value at the control file's latest checkpoint. In
/// a base backup that checkpoint is the backup's own start checkpoint or a
/// later one, so every transaction id at or above it was assigned after the
/// backup began. None for a file that is not a pg_control of the expected
/// cluster, or of a layout this code does not know.
///
/// ControlFileData starts with the system identifier (u64), pg_control_version
/// (u32) and catalog version (u32), the state, the time and the checkpoint
/// LSN; the checkpoint copy follows at offset 40, and its nextXid
/// (FullTransactionId) at offset 24 in it, for every version from 13 (1300) to
/// 18 (1800). Native byte order, as written by the server.
pub fn control_file_next_xid(data: &[u8], system_identifier: u64) -> Option<u64> {
    const KNOWN_VERSIONS: [u32; 3] = [1300, 1700, 1800];
    let u64_at = |o: usize| data.get(o..o + 8).map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes")));
    let version = data.get(8..12).map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")))?;
    if u64_at(0)? != system_identifier || !KNOWN_VERSIONS.contains(&version) {
        return None;
    }
    u64_at(64).filter(|&x| x >= 3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_xid_from_a_control_file() {
        let mut data = vec![0u8; 8192];
        data[0..8].copy_from_slice(&7_000_000_000_000_000_123u64.to_ne_bytes());
        data[8..12].copy_from_slice(&1300u32.to_ne_bytes());
        data[64..72].copy_from_slice(&((2u64 << 32) | 745).to_ne_bytes());
        assert_eq!(control_file_next_xid(&data, 7_000_000_000_000_000_123), Some((2 << 32) | 745));
        assert_eq!(control_file_next_xid(&data, 42), None, "another cluster's control file");
        data[8..12].copy_from_slice(&1100u32.to_ne_bytes());
        assert_eq!(control_file_next_xid(&data, 7_000_000_000_000_000_123), None, "an unknown layout");
        assert_eq!(control_file_next_xid(&data[..40], 7_000_000_000_000_000_123), None, "too short");
    }

    #[test]
    fn commands_by_version() {
        let o = BaseBackupOptions { label: "nightly 'x'".into(), fast_checkpoint: true, max_rate_kb: None };
        assert_eq!(
            command(&o, 150004),
            "BASE_BACKUP (LABEL 'nightly ''x''', PROGRESS, CHECKPOINT 'fast', WAIT false, MANIFEST 'yes', MANIFEST_CHECKSUMS 'CRC32C', TABLESPACE_MAP)"
        );
        assert_eq!(
            command(&BaseBackupOptions { fast_checkpoint: false, ..o }, 140010),
            "BASE_BACKUP LABEL 'nightly ''x''' PROGRESS NOWAIT TABLESPACE_MAP MANIFEST 'yes' MANIFEST_CHECKSUMS 'CRC32C'"
        );
    }
}
