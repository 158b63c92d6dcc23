//! Framing of protocol messages over a socket (TCP, Unix or TLS): a large
//! read buffer that holds all partial-read state, so reading a message is
//! cancel-safe, and CopyData payloads that are split off that buffer
//! without copying.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::message::backend::{self, Header, Message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::client::TlsStream;

use super::PgError;

/// Base backups push about 1 GB/s through here: large reads keep the syscall
/// count low, and CopyData slices of one buffer share its allocation.
pub const READ_BUFFER: usize = 256 * 1024;
/// Below this much free space a fresh buffer is started instead of reading
/// a few bytes into the tail of the current one.
const MIN_FREE: usize = 32 * 1024;
/// PostgreSQL never sends a message over 1 GB (MaxAllocSize); a larger length
/// means a broken stream, not something to allocate for.
const MAX_MESSAGE: usize = (1 << 30) + 64 * 1024;

pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One backend message. CopyData and CopyBothResponse are split out because
/// postgres-protocol's `Message` has no CopyBoth variant, and CopyData is
/// the hot path.
pub enum Frame {
    CopyData(Bytes),
    CopyBothResponse,
    Message(Message),
}

pub struct Wire {
    pub stream: Stream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Length of the frame at the head of `rbuf` once its header is in.
    want: usize,
}

impl Wire {
    pub fn new(stream: Stream) -> Wire {
        Wire { stream, rbuf: BytesMut::with_capacity(READ_BUFFER), wbuf: BytesMut::with_capacity(8 * 1024), want: 0 }
    }

    /// The write buffer: frontend messages are built here, then `flush`ed.
    pub fn out(&mut self) -> &mut BytesMut {
        &mut self.wbuf
    }

    /// Writes out everything queued. Cancel-safe: what was not written yet
    /// stays queued for the next call.
    pub async fn flush(&mut self) -> Result<(), PgError> {
        while self.wbuf.has_remaining() {
            let n = self.stream.write_buf(&mut self.wbuf).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "server closed the connection").into());
            }
        }
        self.stream.flush().await?;
        Ok(())
    }

    /// The next message. Cancel-safe: a partly received message stays in the
    /// read buffer and is completed by the next call.
    pub async fn read_frame(&mut self) -> Result<Frame, PgError> {
        loop {
            if let Some(frame) = self.parse_frame()? {
                return Ok(frame);
            }
            self.fill().await?;
        }
    }

    fn parse_frame(&mut self) -> Result<Option<Frame>, PgError> {
        match decode_frame(&mut self.rbuf)? {
            Decoded::Frame(f) => {
                self.want = 0;
                Ok(Some(f))
            }
            Decoded::Need(total) => {
                self.want = total;
                Ok(None)
            }
        }
    }

    async fn fill(&mut self) -> Result<(), PgError> {
        let needed = self.want.saturating_sub(self.rbuf.len());
        let free = self.rbuf.capacity() - self.rbuf.len();
        if free < needed.max(MIN_FREE) {
            // When the current allocation is still shared with CopyData
            // handed out earlier this starts a new one, copying only the
            // partial message at the head.
            self.rbuf.reserve(needed.max(READ_BUFFER));
        }
        let n = self.stream.read_buf(&mut self.rbuf).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed the connection").into());
        }
        Ok(())
    }
}

/// What `decode_frame` found at the head of a read buffer.
pub enum Decoded {
    Frame(Frame),
    /// The head frame is not complete: this many bytes (header included)
    /// are needed in all; zero when not even its header is in.
    Need(usize),
}

/// Splits the first backend message off `rbuf`, leaving an incomplete one
/// in place. Pure (no I/O), so it is fuzzed directly (fuzz/src/bin/replication.rs).
pub fn decode_frame(rbuf: &mut BytesMut) -> Result<Decoded, PgError> {
    let Some(header) = Header::parse(rbuf)? else {
        return Ok(Decoded::Need(0));
    };
    let total = header.len() as usize + 1;
    if total > MAX_MESSAGE {
        return Err(PgError::Protocol(format!("message of {total} bytes announced; the connection is out of step")));
    }
    if rbuf.len() < total {
        return Ok(Decoded::Need(total));
    }
    let frame = match header.tag() {
        backend::COPY_DATA_TAG => {
            rbuf.advance(5);
            Frame::CopyData(rbuf.split_to(total - 5).freeze())
        }
        b'W' => {
            // Same layout as CopyOutResponse; walvault only ever asks for
            // binary WAL, so the format codes need no checking.
            rbuf.advance(total);
            Frame::CopyBothResponse
        }
        backend::AUTHENTICATION_TAG => {
            let code = rbuf.get(5..9).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
            match code {
                Some(0 | 2 | 3 | 5..=12) => parse_known(rbuf)?,
                other => {
                    return Err(PgError::Unsupported(format!(
                        "the server asks for an authentication method walvault does not know (code {other:?}); \
                         use scram-sha-256 in pg_hba.conf"
                    )));
                }
            }
        }
        // Message::parse drops the frame before rejecting a tag it does
        // not know, so only known tags go to it.
        tag if KNOWN_TAGS.contains(&tag) => parse_known(rbuf)?,
        b'v' => {
            return Err(PgError::Protocol("the server sent NegotiateProtocolVersion, but walvault requested plain protocol 3.0".into()));
        }
        tag => return Err(PgError::Protocol(format!("unknown message type {:?} from the server", tag as char))),
    };
    Ok(Decoded::Frame(frame))
}

fn parse_known(rbuf: &mut BytesMut) -> Result<Frame, PgError> {
    match Message::parse(rbuf)? {
        Some(m) => Ok(Frame::Message(m)),
        None => Err(PgError::Protocol("a complete message did not parse".into())),
    }
}

const KNOWN_TAGS: &[u8] = &[
    backend::PARSE_COMPLETE_TAG,
    backend::BIND_COMPLETE_TAG,
    backend::CLOSE_COMPLETE_TAG,
    backend::NOTIFICATION_RESPONSE_TAG,
    backend::COPY_DONE_TAG,
    backend::COMMAND_COMPLETE_TAG,
    backend::DATA_ROW_TAG,
    backend::ERROR_RESPONSE_TAG,
    backend::COPY_IN_RESPONSE_TAG,
    backend::COPY_OUT_RESPONSE_TAG,
    backend::EMPTY_QUERY_RESPONSE_TAG,
    backend::BACKEND_KEY_DATA_TAG,
    backend::NO_DATA_TAG,
    backend::NOTICE_RESPONSE_TAG,
    backend::PORTAL_SUSPENDED_TAG,
    backend::PARAMETER_STATUS_TAG,
    backend::PARAMETER_DESCRIPTION_TAG,
    backend::ROW_DESCRIPTION_TAG,
    backend::READY_FOR_QUERY_TAG,
];
