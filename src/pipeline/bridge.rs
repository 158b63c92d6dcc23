//! Bridges between async byte streams (the store) and blocking `Read`/`Write`
//! (zstd, age, files), through small bounded channels, so a large object flows
//! through with a few MiB in memory whatever its size.

use std::io::{self, Read, Write};
use std::path::Path;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::sync::mpsc;

use super::{Expected, Opener, SealError, SealSummary, Sealer, cpu_pool};
use crate::storage::{ByteStream, ObjectStore, PartSizer, StorageError, StorageErrorKind, upload_stream};

const CHANNEL_DEPTH: usize = 4;
const WRITE_CHUNK: usize = 1 << 20;

/// A blocking reader fed by an async stream (pumped by a spawned task).
pub struct StreamReader {
    rx: mpsc::Receiver<Result<Bytes, StorageError>>,
    current: Bytes,
    /// The first store error seen, kept so callers can report it as such.
    pub error: Option<StorageError>,
}

impl StreamReader {
    pub fn new(mut stream: ByteStream) -> Self {
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    break;
                }
            }
        });
        StreamReader { rx, current: Bytes::new(), error: None }
    }
}

impl Read for StreamReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.current = b,
                Some(Err(e)) => {
                    let err = io::Error::other(e.to_string());
                    self.error = Some(e);
                    return Err(err);
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}

/// A blocking writer whose bytes come out of an async stream.
pub struct ChannelWriter {
    tx: mpsc::Sender<Result<Bytes, StorageError>>,
    buf: BytesMut,
}

/// A writer and the stream that yields what is written to it; the stream ends
/// when the writer is dropped (after `finish`).
pub fn channel_writer() -> (ChannelWriter, ByteStream) {
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    (ChannelWriter { tx, buf: BytesMut::with_capacity(WRITE_CHUNK) }, Box::pin(stream))
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.tx.blocking_send(Ok(chunk)).map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
    }

    /// Sends what is buffered; dropping the writer then ends the stream.
    pub fn finish(mut self) -> io::Result<()> {
        self.send()
    }

    /// Ends the stream with an error, so the upload fails instead of completing.
    pub fn fail(self, message: &str) {
        let _ = self.tx.blocking_send(Err(StorageError::new(StorageErrorKind::Permanent, "", message.to_string())));
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= WRITE_CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Seals `input` and uploads the result to `key` as it is produced. The object
/// appears only if sealing and the upload both complete.
pub async fn seal_to_store<R>(
    store: &dyn ObjectStore,
    key: &str,
    sealer: &Sealer,
    input: R,
    parallel: usize,
) -> Result<SealSummary, crate::Error>
where
    R: Read + Send + 'static,
{
    let (writer, stream) = channel_writer();
    let sealer = sealer.clone();
    let pool = cpu_pool().clone();
    let seal = tokio::spawn(async move {
        pool.run(move || {
            // Hold the writer so an error ends the stream with a failure, never a clean end.
            let mut writer = Some(writer);
            let result = sealer.seal_stream(input, WriterRef(&mut writer));
            match (&result, writer.take()) {
                (Ok(_), Some(w)) => w.finish().map_err(SealError::Io).map(|_| result.unwrap()),
                (Err(e), Some(w)) => {
                    w.fail(&e.to_string());
                    result
                }
                (_, None) => result,
            }
        })
        .await
    });
    // Parts are buffered (parallel + 1 of 8 MiB): two in flight keeps one
    // object's memory near 24 MiB and is enough to keep the link busy.
    let uploaded = upload_stream(store, key, stream, PartSizer::default(), parallel.clamp(1, 2)).await;
    let sealed = seal.await.map_err(|e| crate::Error::failed(format!("sealing task failed: {e}")))?;
    let summary = sealed?;
    uploaded?;
    Ok(summary)
}

struct WriterRef<'a>(&'a mut Option<ChannelWriter>);

impl Write for WriterRef<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.as_mut().expect("writer present until the end").write(data)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads a sealed object (or a range of one) from the store and opens it into a
/// new file at `dest`, written atomically: a temporary file in the same directory
/// is renamed into place only when every check passed.
pub async fn open_to_file(
    stream: ByteStream,
    opener: &Opener,
    expected: Expected,
    dest: &Path,
    mode: u32,
) -> Result<SealSummary, crate::Error> {
    let opener = opener.clone();
    let dest = dest.to_path_buf();
    let reader = StreamReader::new(stream);
    cpu_pool()
        .run(move || {
            use std::os::unix::fs::OpenOptionsExt;
            let dir = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
            let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("file");
            let tmp = dir.join(format!(".{name}.walvault-{:08x}", rand::random::<u32>()));
            let mut reader = reader;
            let result = (|| {
                let file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
                let mut out = io::BufWriter::with_capacity(1 << 20, file);
                let summary = opener.open_stream(&mut reader, &mut out, &expected).map_err(|e| match reader.error.take() {
                    Some(store_err) => crate::Error::from(store_err),
                    None => crate::Error::from(e),
                })?;
                out.into_inner().map_err(|e| e.into_error())?;
                std::fs::rename(&tmp, &dest)?;
                Ok(summary)
            })();
            if result.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            result
        })
        .await
}
