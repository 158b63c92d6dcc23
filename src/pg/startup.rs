//! Establishing a session: the hosts in order, the socket (Unix or TCP), TLS
//! per sslmode (with libpq's allow/prefer fallbacks), the startup message,
//! authentication, and the parameters the server reports before it is ready.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::PgError;
use super::auth::{self, AuthContext};
use super::conn::{Connection, Mode, parse_server_version};
use super::conninfo::{ChannelBindingMode, ConnParams, Endpoint, Host, SslMode};
use super::errfields::ServerMessage;
use super::tls;
use super::wire::{Frame, Stream, Wire};

/// Tries each host in turn. Only failures to reach a server move on to the
/// next host; once a server answered, its verdict (a bad password, a missing
/// pg_hba.conf line) is final, as in libpq.
pub async fn connect(params: &ConnParams, mode: Mode) -> Result<Connection, PgError> {
    let mut failures: Vec<PgError> = Vec::new();
    for endpoint in &params.hosts {
        let attempt = connect_endpoint(params, endpoint, mode);
        let result = match params.connect_timeout {
            None => attempt.await,
            Some(limit) => match tokio::time::timeout(limit, attempt).await {
                Ok(r) => r,
                Err(_) => Err(PgError::Connect {
                    target: endpoint.describe(),
                    message: format!("no answer within connect_timeout ({} s)", limit.as_secs()),
                }),
            },
        };
        match result {
            Ok(conn) => return Ok(conn),
            Err(e @ (PgError::Connect { .. } | PgError::Tls(_))) => {
                if params.hosts.len() > 1 {
                    tracing::warn!(target = %endpoint.describe(), error = %e, "PostgreSQL host failed; trying the next one");
                }
                failures.push(e);
            }
            Err(e) => return Err(e),
        }
    }
    if failures.len() == 1 {
        return Err(failures.pop().unwrap());
    }
    Err(PgError::Connect { target: params.describe(), message: failures.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ") })
}

/// A failed attempt, and whether libpq's allow/prefer would retry it the
/// other way (the server refused before authentication completed).
struct Failed {
    error: PgError,
    before_auth_ok: bool,
}

impl From<PgError> for Failed {
    fn from(error: PgError) -> Failed {
        Failed { error, before_auth_ok: true }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Encryption {
    None,
    /// Ask for TLS, continue in plaintext if the server declines.
    IfOffered,
    Required,
}

async fn connect_endpoint(params: &ConnParams, endpoint: &Endpoint, mode: Mode) -> Result<Connection, PgError> {
    // sslmode is ignored for Unix sockets, as in libpq: the kernel carries them.
    if matches!(endpoint.host, Host::Unix(_)) {
        return attempt(params, endpoint, mode, Encryption::None).await.map_err(|f| f.error);
    }
    let binding_required = params.channel_binding == ChannelBindingMode::Require;
    let result = match params.sslmode {
        SslMode::Disable => attempt(params, endpoint, mode, Encryption::None).await,
        SslMode::Allow => match attempt(params, endpoint, mode, Encryption::None).await {
            Err(f) if f.before_auth_ok && retry_other_way(&f.error) => {
                tracing::debug!(error = %f.error, "plaintext connection refused; trying TLS (sslmode=allow)");
                attempt(params, endpoint, mode, Encryption::Required).await
            }
            r => r,
        },
        SslMode::Prefer => match attempt(params, endpoint, mode, Encryption::IfOffered).await {
            Err(f) if f.before_auth_ok && !binding_required && (retry_other_way(&f.error) || matches!(f.error, PgError::Tls(_))) => {
                tracing::debug!(error = %f.error, "TLS connection failed; trying without TLS (sslmode=prefer)");
                attempt(params, endpoint, mode, Encryption::None).await.map_err(|second| keep_informative(f, second))
            }
            r => r,
        },
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => attempt(params, endpoint, mode, Encryption::Required).await,
    };
    result.map_err(|f| f.error)
}

/// Errors the server sends while deciding whether to let us in.
fn retry_other_way(e: &PgError) -> bool {
    matches!(e, PgError::Server { .. } | PgError::Auth { .. })
}

/// After a prefer fallback also failed: a pg_hba.conf refusal of the
/// plaintext retry says less than why TLS failed.
fn keep_informative(first: Failed, second: Failed) -> Failed {
    match &second.error {
        PgError::Server { code, .. } if code == "28000" => first,
        _ => second,
    }
}

async fn attempt(params: &ConnParams, endpoint: &Endpoint, mode: Mode, encryption: Encryption) -> Result<Connection, Failed> {
    let target = endpoint.describe();
    let as_connect_error = |e: PgError| match e {
        PgError::Io(io) => PgError::Connect { target: target.clone(), message: io.to_string() },
        other => other,
    };
    let stream = open_socket(endpoint).await?;
    let (stream, server_end_point) = match (stream, encryption) {
        (Stream::Tcp(tcp), Encryption::IfOffered | Encryption::Required) => {
            negotiate_tls(tcp, params, endpoint, encryption == Encryption::Required).await.map_err(as_connect_error)?
        }
        (stream, _) => (stream, None),
    };
    let tls = matches!(stream, Stream::Tls(_));
    let mut wire = Wire::new(stream);

    let dbname = match mode {
        Mode::Replication => "replication".to_string(),
        Mode::Database => params.dbname.clone().unwrap_or_else(|| params.user.clone()),
    };
    let mut startup: Vec<(&str, &str)> = vec![("user", &params.user), ("database", &dbname), ("client_encoding", "UTF8")];
    if mode == Mode::Replication {
        // "true" selects the physical walsender; "database" would be logical.
        startup.push(("replication", "true"));
    }
    if let Some(name) = &params.application_name {
        startup.push(("application_name", name));
    }
    if let Some(options) = &params.options {
        startup.push(("options", options));
    }
    frontend::startup_message(startup, wire.out()).map_err(PgError::from)?;
    wire.flush().await.map_err(as_connect_error)?;

    let password = params.password_for(endpoint, &dbname);
    let ctx = AuthContext {
        user: &params.user,
        password: password.as_deref(),
        tls,
        server_end_point: server_end_point.as_deref(),
        channel_binding: params.channel_binding,
    };
    let auth_method = auth::authenticate(&mut wire, &ctx).await.map_err(as_connect_error)?;
    tracing::debug!(target = %target, tls, ?auth_method, "authenticated to PostgreSQL");

    let after_auth = |error: PgError| Failed { error: as_connect_error(error), before_auth_ok: false };
    let mut parameters = HashMap::new();
    let mut cancel_key = (0, 0);
    loop {
        match wire.read_frame().await.map_err(after_auth)? {
            Frame::Message(Message::ParameterStatus(body)) => {
                parameters.insert(body.name().map_err(PgError::from)?.to_string(), body.value().map_err(PgError::from)?.to_string());
            }
            Frame::Message(Message::BackendKeyData(body)) => cancel_key = (body.process_id(), body.secret_key()),
            Frame::Message(Message::NoticeResponse(body)) => ServerMessage::parse(body.fields()).map_err(after_auth)?.log(),
            Frame::Message(Message::ErrorResponse(body)) => {
                return Err(after_auth(ServerMessage::parse(body.fields()).map_err(after_auth)?.into_error()));
            }
            Frame::Message(Message::ReadyForQuery(_)) => break,
            _ => return Err(after_auth(PgError::Protocol("unexpected message before the server was ready".into()))),
        }
    }
    let version = parameters.get("server_version").map(String::as_str).unwrap_or("");
    let server_version_num = parse_server_version(version).unwrap_or_else(|| {
        tracing::warn!(server_version = version, "cannot read the server's version");
        0
    });
    Ok(Connection::new(wire, endpoint.clone(), parameters, cancel_key, tls, auth_method, server_version_num))
}

/// Sends SSLRequest and reads the one-byte answer straight from the socket
/// (nothing is buffered beyond it), then runs the TLS handshake on `S`.
async fn negotiate_tls(
    mut tcp: TcpStream,
    params: &ConnParams,
    endpoint: &Endpoint,
    required: bool,
) -> Result<(Stream, Option<Vec<u8>>), PgError> {
    let mut request = bytes::BytesMut::new();
    frontend::ssl_request(&mut request);
    tcp.write_all(&request).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {
            // Anything already waiting was sent before encryption, so it may
            // be a man-in-the-middle's injection (CVE-2021-23222); libpq
            // refuses it the same way. Later injected bytes fail the handshake.
            if tcp.try_read(&mut [0u8; 1]).is_ok_and(|n| n > 0) {
                return Err(PgError::Tls(format!(
                    "{} sent unencrypted data after agreeing to TLS; refusing the connection (possible man-in-the-middle)",
                    endpoint.describe()
                )));
            }
            let established = tls::handshake(tcp, params, endpoint).await?;
            Ok((Stream::Tls(Box::new(established.stream)), established.server_end_point))
        }
        b'N' if required => Err(PgError::Tls(format!(
            "the server at {} does not accept TLS connections (ssl = off), but sslmode={} requires TLS",
            endpoint.describe(),
            params.sslmode.as_str()
        ))),
        b'N' => Ok((Stream::Tcp(tcp), None)),
        // An ErrorResponse here is not read: it comes before any encryption
        // and could be forged (libpq does the same).
        b'E' => Err(PgError::Tls(format!("the server at {} answered the TLS request with an error", endpoint.describe()))),
        other => Err(PgError::Protocol(format!("unexpected answer {other:#04x} to the TLS request"))),
    }
}

/// Opens the socket for an endpoint: the Unix socket in its directory, or
/// each address of the host name in turn.
pub async fn open_socket(endpoint: &Endpoint) -> Result<Stream, PgError> {
    let connect_error = |message: String| PgError::Connect { target: endpoint.describe(), message };
    match &endpoint.host {
        Host::Unix(dir) => {
            let path = endpoint.socket_path(dir);
            let sock = UnixStream::connect(&path).await.map_err(|e| connect_error(e.to_string()))?;
            Ok(Stream::Unix(sock))
        }
        Host::Tcp(name) => {
            let addrs: Vec<SocketAddr> = match endpoint.hostaddr {
                Some(ip) => vec![SocketAddr::new(ip, endpoint.port)],
                None => tokio::net::lookup_host((name.as_str(), endpoint.port))
                    .await
                    .map_err(|e| connect_error(format!("cannot resolve host name \"{name}\": {e}")))?
                    .collect(),
            };
            let mut errors = Vec::new();
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(sock) => {
                        // Small protocol messages (status updates) must not
                        // wait for Nagle; keepalive notices a dead peer on an
                        // idle WAL stream, as libpq's defaults do.
                        sock.set_nodelay(true)?;
                        set_keepalive(&sock);
                        return Ok(Stream::Tcp(sock));
                    }
                    Err(e) => errors.push(format!("{addr}: {e}")),
                }
            }
            Err(connect_error(if errors.is_empty() { format!("host name \"{name}\" has no addresses") } else { errors.join("; ") }))
        }
    }
}

fn set_keepalive(sock: &TcpStream) {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and a correctly sized int option.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_KEEPALIVE,
            &on as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot enable TCP keepalive");
    }
}
