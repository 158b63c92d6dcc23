//! A PostgreSQL connection speaking the simple-query and COPY sub-protocols, in
//! physical replication mode or as a normal database session. The simple
//! queries are in `query.rs`; connecting is in `startup.rs`.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::conninfo::{ConnParams, Endpoint};
use super::errfields::ServerMessage;
use super::wire::{Decoded, Frame, Wire, decode_frame};
use super::{Lsn, PgError};

pub use super::auth::AuthMethod;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A physical walsender (`replication=true`): replication commands,
    /// `SHOW`, no SQL.
    Replication,
    Database,
}

/// One result set of a simple query, in text format.
#[derive(Debug, Clone, Default)]
pub struct ResultSet {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
}

#[derive(Debug, Clone, Copy)]
pub struct SystemInfo {
    pub system_identifier: u64,
    pub timeline: u32,
    pub xlogpos: Lsn,
}

/// What the server sent, as `next_message` hands it out. NoticeResponse and
/// ParameterStatus never appear here: they are logged and recorded.
#[derive(Debug)]
pub enum BackendMessage {
    /// A CopyData payload, sharing the connection's read buffer.
    CopyData(Bytes),
    CopyDone,
    CopyOutResponse,
    CopyBothResponse,
    CopyInResponse,
    RowDescription(Vec<String>),
    DataRow(Vec<Option<Bytes>>),
    CommandComplete(String),
    EmptyQueryResponse,
    ReadyForQuery,
    /// An ErrorResponse; the server sends ReadyForQuery after it.
    Error(PgError),
}

pub struct Connection {
    wire: Wire,
    endpoint: Endpoint,
    parameters: HashMap<String, String>,
    cancel_key: (i32, i32),
    tls: bool,
    auth_method: AuthMethod,
    server_version_num: u32,
}

impl Connection {
    /// Connects to the first host in `params` that answers, with TLS per
    /// sslmode, and authenticates.
    pub async fn connect(params: &ConnParams, mode: Mode) -> Result<Connection, PgError> {
        super::startup::connect(params, mode).await
    }

    pub(super) fn new(
        wire: Wire,
        endpoint: Endpoint,
        parameters: HashMap<String, String>,
        cancel_key: (i32, i32),
        tls: bool,
        auth_method: AuthMethod,
        server_version_num: u32,
    ) -> Connection {
        if auth_method == AuthMethod::Md5 && server_version_num >= 180000 {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    "authenticated with an MD5 password: PostgreSQL {} deprecates MD5 and a later release removes it; \
                     set password_encryption = 'scram-sha-256', set the role's password again and use scram-sha-256 in pg_hba.conf",
                    server_version_num / 10000
                )
            });
        }
        Connection { wire, endpoint, parameters, cancel_key, tls, auth_method, server_version_num }
    }

    /// `server_version_num` of the server, e.g. 150018 for 15.18.
    pub fn server_version_num(&self) -> u32 {
        self.server_version_num
    }

    /// A parameter the server reported (server_version, application_name,
    /// integer_datetimes, ...), with its latest value.
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }

    pub fn tls_in_use(&self) -> bool {
        self.tls
    }

    pub fn auth_method(&self) -> AuthMethod {
        self.auth_method
    }

    /// True if SCRAM was bound to the TLS channel (SCRAM-SHA-256-PLUS).
    pub fn channel_binding_used(&self) -> bool {
        self.auth_method == AuthMethod::ScramSha256Plus
    }

    /// The backend's process id (`pg_backend_pid()`).
    pub fn process_id(&self) -> i32 {
        self.cancel_key.0
    }

    /// Where this connection went, for messages.
    pub fn target(&self) -> String {
        self.endpoint.describe()
    }

    /// What is needed to cancel the running command from elsewhere.
    pub fn cancel_token(&self) -> CancelToken {
        CancelToken { endpoint: self.endpoint.clone(), process_id: self.cancel_key.0, secret_key: self.cancel_key.1 }
    }

    /// Sends a simple Query. Read the answer with `next_message` up to
    /// ReadyForQuery.
    pub async fn send_query(&mut self, sql: &str) -> Result<(), PgError> {
        frontend::query(sql, self.wire.out())?;
        self.wire.flush().await
    }

    /// Sends CopyData (inside CopyIn or CopyBoth).
    pub async fn send_copy_data(&mut self, data: &[u8]) -> Result<(), PgError> {
        frontend::CopyData::new(data)?.write(self.wire.out());
        self.wire.flush().await
    }

    pub async fn send_copy_done(&mut self) -> Result<(), PgError> {
        frontend::copy_done(self.wire.out());
        self.wire.flush().await
    }

    /// Aborts a CopyIn with a message the server reports back as an error.
    pub async fn send_copy_fail(&mut self, message: &str) -> Result<(), PgError> {
        frontend::copy_fail(message, self.wire.out())?;
        self.wire.flush().await
    }

    /// Writes out anything a cancelled `send_*` left queued. The `send_*`
    /// methods flush themselves.
    pub async fn flush(&mut self) -> Result<(), PgError> {
        self.wire.flush().await
    }

    /// The next message from the server, skipping (logging, recording)
    /// NoticeResponse and ParameterStatus. Cancel-safe: if the future is
    /// dropped, a partly received message is kept and completed next time.
    pub async fn next_message(&mut self) -> Result<BackendMessage, PgError> {
        loop {
            // Everything after read_frame returns is synchronous, so
            // cancellation can only happen inside it, where it is safe.
            match incoming(self.wire.read_frame().await?)? {
                Incoming::Message(m) => return Ok(m),
                Incoming::Notice(n) => n.log(),
                Incoming::Parameter(name, value) => {
                    self.parameters.insert(name, value);
                }
                Incoming::Notification(channel) => tracing::debug!(channel, "ignoring a NOTIFY"),
            }
        }
    }

    /// Ends the session politely (Terminate), so the server logs no
    /// "unexpected EOF".
    pub async fn close(mut self) -> Result<(), PgError> {
        frontend::terminate(self.wire.out());
        self.wire.flush().await?;
        self.wire.stream.shutdown().await.ok();
        Ok(())
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("target", &self.endpoint.describe())
            .field("process_id", &self.cancel_key.0)
            .field("tls", &self.tls)
            .field("auth_method", &self.auth_method)
            .field("server_version_num", &self.server_version_num)
            .finish_non_exhaustive()
    }
}

/// Cancels the command running on a connection, over a separate plaintext
/// connection (as libpq's PQcancel; the server checks the secret key).
#[derive(Debug, Clone)]
pub struct CancelToken {
    endpoint: Endpoint,
    process_id: i32,
    secret_key: i32,
}

impl CancelToken {
    pub async fn cancel(&self) -> Result<(), PgError> {
        let mut stream = super::startup::open_socket(&self.endpoint).await?;
        let mut request = BytesMut::new();
        frontend::cancel_request(self.process_id, self.secret_key, &mut request);
        stream.write_all(&request).await?;
        stream.flush().await?;
        // The server closes the socket when done; waiting for that keeps the
        // cancel from racing with whatever the caller does next.
        let mut sink = [0u8; 16];
        while stream.read(&mut sink).await? > 0 {}
        Ok(())
    }
}

/// `server_version` as a number like `server_version_num`: "15.18 (Debian
/// 15.18-0+deb12u1)" is 150018, "18.6" 180006, "17devel" and "16beta2"
/// 170000 and 160000, "9.6.24" 90624.
/// A frame as `next_message` sorts it.
enum Incoming {
    Message(BackendMessage),
    Notice(ServerMessage),
    Parameter(String, String),
    Notification(String),
}

fn incoming(frame: Frame) -> Result<Incoming, PgError> {
    let message = match frame {
        Frame::CopyData(data) => return Ok(Incoming::Message(BackendMessage::CopyData(data))),
        Frame::CopyBothResponse => return Ok(Incoming::Message(BackendMessage::CopyBothResponse)),
        Frame::Message(m) => m,
    };
    let out = match message {
        Message::CopyDone => BackendMessage::CopyDone,
        Message::CopyOutResponse(_) => BackendMessage::CopyOutResponse,
        Message::CopyInResponse(_) => BackendMessage::CopyInResponse,
        Message::RowDescription(body) => BackendMessage::RowDescription(body.fields().map(|f| Ok(f.name().to_string())).collect()?),
        Message::DataRow(body) => {
            let buf = body.buffer_bytes();
            BackendMessage::DataRow(body.ranges().map(|r| Ok(r.map(|r| buf.slice(r)))).collect()?)
        }
        Message::CommandComplete(body) => BackendMessage::CommandComplete(body.tag()?.to_string()),
        Message::EmptyQueryResponse => BackendMessage::EmptyQueryResponse,
        Message::ReadyForQuery(_) => BackendMessage::ReadyForQuery,
        Message::ErrorResponse(body) => BackendMessage::Error(ServerMessage::parse(body.fields())?.into_error()),
        Message::NoticeResponse(body) => return Ok(Incoming::Notice(ServerMessage::parse(body.fields())?)),
        Message::ParameterStatus(body) => return Ok(Incoming::Parameter(body.name()?.to_string(), body.value()?.to_string())),
        Message::NotificationResponse(body) => return Ok(Incoming::Notification(body.channel()?.to_string())),
        _ => return Err(PgError::Protocol("unexpected message (extended-query or authentication) from the server".into())),
    };
    Ok(Incoming::Message(out))
}

/// The next message a connection would hand out from the bytes in `buf`
/// (notices, parameter reports and notifications skipped), or None when
/// `buf` holds no complete one. The decoding `Connection::next_message`
/// does, without a socket: for the fuzz target and tests.
pub fn decode_message(buf: &mut BytesMut) -> Result<Option<BackendMessage>, PgError> {
    loop {
        let frame = match decode_frame(buf)? {
            Decoded::Frame(f) => f,
            Decoded::Need(_) => return Ok(None),
        };
        if let Incoming::Message(m) = incoming(frame)? {
            return Ok(Some(m));
        }
    }
}

pub fn parse_server_version(s: &str) -> Option<u32> {
    let numeric: String = s.trim().chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    let mut parts = numeric.split('.').filter(|p| !p.is_empty()).map(|p| p.parse::<u32>());
    let major = parts.next()?.ok()?;
    let minor = parts.next().transpose().ok()?.unwrap_or(0);
    if major >= 10 {
        return Some(major * 10000 + minor);
    }
    let patch = parts.next().transpose().ok()?.unwrap_or(0);
    Some(major * 10000 + minor * 100 + patch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut f = vec![tag];
        f.extend(((body.len() + 4) as u32).to_be_bytes());
        f.extend(body);
        f
    }

    #[test]
    fn messages_decode_from_a_buffer_and_notices_are_skipped() {
        let mut bytes = frame(b'S', b"application_name\0x\0");
        bytes.extend(frame(b'd', b"wal"));
        bytes.extend(frame(b'C', b"SELECT 1\0"));
        let whole = bytes.len();
        bytes.extend(&frame(b'Z', b"I")[..3]);
        let mut buf = BytesMut::from(&bytes[..]);
        assert!(matches!(decode_message(&mut buf).unwrap(), Some(BackendMessage::CopyData(d)) if d == "wal"));
        assert!(matches!(decode_message(&mut buf).unwrap(), Some(BackendMessage::CommandComplete(t)) if t == "SELECT 1"));
        // An incomplete message stays in the buffer.
        assert!(decode_message(&mut buf).unwrap().is_none());
        assert_eq!(buf.len(), bytes.len() - whole);
        let mut bad = BytesMut::from(&frame(b'?', b"")[..]);
        let err = decode_message(&mut bad).err().unwrap().to_string();
        assert!(err.contains("unknown message type '?'"), "{err}");
    }

    #[test]
    fn server_versions() {
        assert_eq!(parse_server_version("15.18 (Debian 15.18-0+deb12u1)"), Some(150018));
        assert_eq!(parse_server_version("18.6"), Some(180006));
        assert_eq!(parse_server_version("17devel"), Some(170000));
        assert_eq!(parse_server_version("16beta2"), Some(160000));
        assert_eq!(parse_server_version("13.0"), Some(130000));
        assert_eq!(parse_server_version("9.6.24"), Some(90624));
        assert_eq!(parse_server_version("14.10 (Ubuntu 14.10-1.pgdg22.04+1)"), Some(140010));
        assert_eq!(parse_server_version(""), None);
        assert_eq!(parse_server_version("devel"), None);
    }
}
