//! The WAL archive: one framed object per WAL file (segment, `.partial`,
//! `.backup`, `.history`), plus the streamer's copy of the segment in progress.
//! Pushing the same content twice succeeds; different content under the same
//! name is refused with both checksums named.

use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use super::descriptor::LoadedDescriptor;
use super::record::{self, Header, WalRecord};
use super::{RepoError, SigningKey, layout};
use crate::pg::lsn::{HistoryEntry, Lsn, TimelineId, WalFileKind, WalSegmentName, classify_wal_file, parse_history};
use crate::pipeline::{Expected, Opener, SealSummary, Sealer, bridge, cpu_pool};
use crate::storage::{self, ByteStream, CreateOutcome, StorageError, StorageErrorKind, Store};

/// Suffix of the streamer's copy of the segment it is receiving.
pub const STREAMING_SUFFIX: &str = ".streaming";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    Stored,
    /// An identical copy was already in the repository.
    AlreadyIdentical,
}

/// A WAL file sealed and ready to be framed with its record.
pub struct SealedWal {
    pub file: String,
    pub summary: SealSummary,
    /// record::HEADROOM bytes for the record, then the stored bytes.
    framing: Vec<u8>,
    /// The switch points of a `.history` file.
    pub history: Option<Vec<HistoryEntry>>,
}

/// The writing side: the agent's key and the recipients.
pub struct WalWriter {
    pub key: Arc<SigningKey>,
    pub sealer: Sealer,
}

pub struct WalArchive {
    store: Store,
    desc: Arc<LoadedDescriptor>,
    writer: Option<WalWriter>,
}

/// One stored WAL object as seen in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalEntry {
    pub file: String,
    pub kind: WalFileKind,
    pub size: u64,
    pub modified: Option<chrono::DateTime<chrono::Utc>>,
    /// True for the streamer's copy of a segment in progress.
    pub streaming: bool,
}

impl WalArchive {
    pub fn new(store: Store, desc: Arc<LoadedDescriptor>, writer: Option<WalWriter>) -> Self {
        WalArchive { store, desc, writer }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn descriptor(&self) -> &LoadedDescriptor {
        &self.desc
    }

    pub fn seg_size(&self) -> u64 {
        self.desc.descriptor.cluster.wal_segment_size
    }

    /// The object key of a WAL file name (history files live apart).
    pub fn key_of(file: &str) -> String {
        match file.strip_suffix(".history") {
            Some(tli) if tli.len() == 8 => format!("{}{file}", layout::HISTORY_PREFIX),
            _ => layout::wal_key(file),
        }
    }

    /// What this repository's WAL must look like (for page-header checks).
    pub fn expected_wal(&self) -> crate::pg::walheader::ExpectedWal {
        let c = &self.desc.descriptor.cluster;
        crate::pg::walheader::ExpectedWal {
            pg_major: c.major(),
            system_identifier: c.system_identifier.parse().unwrap_or(0),
            seg_size: c.wal_segment_size,
            block_size: c.wal_block_size,
        }
    }

    fn writer(&self) -> &WalWriter {
        self.writer.as_ref().expect("WalArchive opened without a writer")
    }

    /// Reads and verifies the record of a stored WAL file, without its payload.
    pub async fn read_header(&self, file: &str) -> Result<Option<Header>, RepoError> {
        let key = Self::key_of(file);
        let head = match storage::get_bytes(self.store.as_ref(), &key, Some(0..record::HEADER_READ)).await {
            Ok(b) => b,
            Err(e) if e.kind() == StorageErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let header = record::decode_header(&head, &self.desc.trusted_key, &key)?;
        check_record(&header.record, file, &key)?;
        Ok(Some(header))
    }

    /// Seals a WAL file on the CPU pool.
    pub async fn seal(&self, file: &str, data: Bytes) -> Result<SealedWal, RepoError> {
        let sealer = self.writer().sealer.clone();
        let file = file.to_string();
        cpu_pool()
            .run(move || {
                let history = match classify_wal_file(&file) {
                    Some(WalFileKind::History) => Some(
                        std::str::from_utf8(&data)
                            .map_err(|e| e.to_string())
                            .and_then(parse_history)
                            .map_err(|e| RepoError::Invalid(format!("{file} is not a valid timeline history file: {e}")))?,
                    ),
                    _ => None,
                };
                let (framing, summary) = sealer.seal_bytes_after(record::HEADROOM, &data)?;
                Ok(SealedWal { file, summary, framing, history })
            })
            .await
    }

    /// The `prev` link for a segment: the plaintext checksum of the previous
    /// segment on the same timeline, if the repository has it.
    pub async fn chain_link(&self, file: &str) -> Result<Option<String>, RepoError> {
        let Some(prev) = WalSegmentName::parse(file, self.seg_size()).and_then(|s| s.prev()) else {
            return Ok(None);
        };
        Ok(self.read_header(&prev.to_string()).await?.map(|h| h.record.plain_blake3))
    }

    fn record_for(&self, sealed: &SealedWal, prev: Option<String>, source: &str, valid_bytes: Option<u64>) -> WalRecord {
        WalRecord {
            file: sealed.file.clone(),
            system_identifier: self.desc.descriptor.cluster.system_identifier.clone(),
            plain_len: sealed.summary.plain_len,
            plain_blake3: sealed.summary.plain_hash.to_hex().to_string(),
            stored_len: sealed.summary.stored_len,
            stored_blake3: sealed.summary.stored_hash.to_hex().to_string(),
            prev,
            valid_bytes,
            history: sealed.history.clone(),
            source: source.to_string(),
            created_at: chrono::Utc::now(),
            descriptor_generation: self.desc.descriptor.generation,
        }
    }

    /// Stores a sealed WAL file, unless the repository already has it. The same
    /// content is success; other content is an error naming both checksums.
    pub async fn store_sealed(&self, sealed: SealedWal, prev: Option<String>, source: &str) -> Result<PushOutcome, RepoError> {
        let key = Self::key_of(&sealed.file);
        let plain = sealed.summary.plain_hash.to_hex().to_string();
        // Where the store may ignore If-None-Match, look first (see docs/REPOSITORY.md).
        if !self.desc.descriptor.store.conditional_create
            && let Some(existing) = self.read_header(&sealed.file).await?
        {
            return self.compare_existing(&sealed.file, &existing, &plain);
        }
        let record = self.record_for(&sealed, prev, source, None);
        let object = record::frame(&self.writer().key, &record, sealed.framing);
        match self.store.put_if_absent(&key, object).await? {
            CreateOutcome::Created => Ok(PushOutcome::Stored),
            CreateOutcome::AlreadyExists => {
                let existing = self
                    .read_header(&sealed.file)
                    .await?
                    .ok_or_else(|| RepoError::Conflict(format!("{} was reported present and then missing; retry the push", sealed.file)))?;
                self.compare_existing(&sealed.file, &existing, &plain)
            }
        }
    }

    fn compare_existing(&self, file: &str, existing: &Header, plain: &str) -> Result<PushOutcome, RepoError> {
        if existing.record.plain_blake3 == plain {
            Ok(PushOutcome::AlreadyIdentical)
        } else {
            Err(RepoError::Conflict(format!(
                "{file} is already in the repository with different content (stored blake3 {}, this file blake3 {plain}); refusing to overwrite it",
                existing.record.plain_blake3
            )))
        }
    }

    /// Seals and stores one file, linking it to its predecessor.
    pub async fn push(&self, file: &str, data: Bytes, source: &str) -> Result<PushOutcome, RepoError> {
        let (sealed, prev) = tokio::try_join!(self.seal(file, data), self.chain_link(file))?;
        self.store_sealed(sealed, prev, source).await
    }

    /// Stores (replacing) the streamer's copy of a segment in progress; it holds
    /// `valid_bytes` of WAL padded with zeros to the segment size when restored.
    pub async fn put_streaming(&self, segment: &str, data: Bytes, valid_bytes: u64) -> Result<(), RepoError> {
        let sealed = self.seal(segment, data).await?;
        let record = self.record_for(&sealed, None, "stream", Some(valid_bytes));
        let object = record::frame(&self.writer().key, &record, sealed.framing);
        let key = layout::wal_key(&format!("{segment}{STREAMING_SUFFIX}"));
        self.store.put(&key, object).await?;
        Ok(())
    }

    /// Removes the streamer's copy once the complete segment is stored.
    pub async fn delete_streaming(&self, segment: &str) -> Result<(), RepoError> {
        self.store.delete_many(&[layout::wal_key(&format!("{segment}{STREAMING_SUFFIX}"))]).await?;
        Ok(())
    }

    /// Reads the streamer's copy of a segment: its record, if any.
    pub async fn streaming_header(&self, segment: &str) -> Result<Option<Header>, RepoError> {
        self.read_header(&format!("{segment}{STREAMING_SUFFIX}")).await
    }

    /// Fetches a WAL file (`file` may carry the `.streaming` suffix), verifies its
    /// record and checksums, decrypts it and writes it atomically to `dest`.
    /// `Ok(None)` when the repository has no such file.
    pub async fn fetch_to_file(&self, file: &str, opener: &Opener, dest: &Path) -> Result<Option<WalRecord>, crate::Error> {
        let key = Self::key_of(file);
        let stream = match self.store.get(&key, None).await {
            Ok(s) => s,
            Err(e) if e.kind() == StorageErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let (header, payload) = split_header(stream, &self.desc, &key).await?;
        check_record(&header.record, file, &key)?;
        let expected = Expected {
            stored_hash: Some(parse_hash(&header.record.stored_blake3, &key)?),
            plain_hash: Some(parse_hash(&header.record.plain_blake3, &key)?),
            plain_len: Some(header.record.plain_len),
        };
        bridge::open_to_file(payload, opener, expected, dest, 0o600).await.map_err(|e| e.context(format!("WAL file {file}")))?;
        Ok(Some(header.record))
    }

    /// The switch points of every stored timeline history, by child timeline.
    pub async fn histories(&self) -> Result<Vec<(TimelineId, Vec<HistoryEntry>)>, RepoError> {
        let objects = storage::list_all(self.store.as_ref(), layout::HISTORY_PREFIX).await?;
        let mut out = Vec::new();
        for o in objects {
            let Some(name) = o.key.rsplit('/').next() else { continue };
            let Some(tli) = name.strip_suffix(".history").and_then(|h| u32::from_str_radix(h, 16).ok()) else { continue };
            if let Some(h) = self.read_header(name).await? {
                out.push((tli, h.record.history.unwrap_or_default()));
            }
        }
        out.sort_by_key(|(t, _)| *t);
        Ok(out)
    }

    /// Where timeline `tli` ended, if a later timeline branched off it.
    pub async fn abandoned_at(&self, tli: TimelineId) -> Result<Option<Lsn>, RepoError> {
        Ok(self
            .histories()
            .await?
            .into_iter()
            .filter(|(child, _)| *child > tli)
            .filter_map(|(_, entries)| entries.into_iter().find(|e| e.tli == tli).map(|e| e.switch_lsn))
            .min())
    }

    /// Every WAL object in the repository, sorted by file name.
    pub async fn list(&self) -> Result<Vec<WalEntry>, RepoError> {
        let objects = storage::list_all(self.store.as_ref(), layout::WAL_PREFIX).await?;
        let mut out: Vec<WalEntry> = objects
            .into_iter()
            .filter_map(|o| {
                let name = o.key.rsplit('/').next()?.to_string();
                let (name, streaming) = match name.strip_suffix(STREAMING_SUFFIX) {
                    Some(n) => (n.to_string(), true),
                    None => (name, false),
                };
                let kind = classify_wal_file(&name)?;
                Some(WalEntry { file: name, kind, size: o.size, modified: o.modified, streaming })
            })
            .collect();
        out.sort_by(|a, b| a.file.cmp(&b.file).then(a.streaming.cmp(&b.streaming)));
        Ok(out)
    }
}

/// Checks that a stored object's signed record is the one for `file`: a
/// streaming copy's record names the segment it is a copy of and says how much
/// WAL it holds; a complete file's record does not. Anything else means objects
/// were swapped or replaced (say, a genuine old streaming copy standing in for
/// the complete segment).
fn check_record(record: &WalRecord, file: &str, key: &str) -> Result<(), RepoError> {
    let streaming = file.ends_with(STREAMING_SUFFIX);
    if record.file != file.strip_suffix(STREAMING_SUFFIX).unwrap_or(file) {
        return Err(RepoError::Integrity {
            object: key.to_string(),
            message: format!("the signed record is for '{}', not '{file}' (objects were swapped)", record.file),
        });
    }
    if record.valid_bytes.is_some() != streaming {
        let holds = if streaming { "a complete file's record" } else { "the record of a streaming copy (an incomplete segment)" };
        return Err(RepoError::Integrity { object: key.to_string(), message: format!("holds {holds} (objects were replaced)") });
    }
    Ok(())
}

/// The repository's form of an abandoned timeline's last segment (`.partial`):
/// its WAL up to `switch`, where the next timeline branched off, and zeros after.
///
/// Two writers produce this file and must agree byte for byte: the streamer
/// receives exactly the WAL up to the switch point (and pads with zeros), while
/// PostgreSQL archives the promoted standby's own file, which may hold stale
/// bytes of a recycled segment, or a torn record, past the switch point. Those
/// bytes belong to no timeline (recovery never reads a `.partial`, and replay of
/// the old timeline ends at the switch point), so dropping them loses nothing.
pub fn normalize_partial(data: &mut [u8], seg: &WalSegmentName, switch: Lsn) {
    if switch > seg.start_lsn() && switch < seg.end_lsn() {
        let offset = (switch.0 - seg.start_lsn().0) as usize;
        if offset < data.len() {
            data[offset..].fill(0);
        }
    }
}

/// Where timeline `seg.tli` ended inside segment `seg`, according to any of
/// the given history files' switch points.
pub fn switch_inside(seg: &WalSegmentName, histories: &[Vec<HistoryEntry>]) -> Option<Lsn> {
    histories
        .iter()
        .flatten()
        .find(|e| e.tli == seg.tli && e.switch_lsn > seg.start_lsn() && e.switch_lsn < seg.end_lsn())
        .map(|e| e.switch_lsn)
}

pub fn parse_hash(hex: &str, object: &str) -> Result<blake3::Hash, RepoError> {
    blake3::Hash::from_hex(hex)
        .map_err(|_| RepoError::Integrity { object: object.into(), message: format!("'{hex}' is not a blake3 checksum") })
}

/// Reads the framed header from the front of a stream; returns it and a stream
/// of the payload that follows.
pub async fn split_header(mut stream: ByteStream, desc: &LoadedDescriptor, key: &str) -> Result<(Header, ByteStream), crate::Error> {
    let mut buf = BytesMut::new();
    loop {
        if buf.len() >= 12 {
            let need = 12 + u32::from_be_bytes(buf[8..12].try_into().unwrap()) as usize;
            if buf.len() >= need || need > 1 << 20 {
                let header = record::decode_header(&buf, &desc.trusted_key, key)?;
                let rest = buf.split_off(header.payload_offset as usize).freeze();
                let head: ByteStream = Box::pin(futures::stream::once(async move { Ok::<_, StorageError>(rest) }));
                return Ok((header, Box::pin(head.chain(stream))));
            }
        }
        match stream.next().await {
            Some(chunk) => buf.extend_from_slice(&chunk?),
            None => {
                return Err(RepoError::Integrity { object: key.into(), message: "object ends inside its record".into() }.into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 1 << 20;

    #[test]
    fn partial_segments_are_cut_at_the_switch_point() {
        let seg = WalSegmentName::new(1, 5, SEG);
        let switch = Lsn(5 * SEG + 0x2345);
        let histories = vec![
            vec![HistoryEntry { tli: 1, switch_lsn: Lsn(2 * SEG) }],
            vec![HistoryEntry { tli: 1, switch_lsn: switch }, HistoryEntry { tli: 2, switch_lsn: Lsn(9 * SEG) }],
        ];
        assert_eq!(switch_inside(&seg, &histories), Some(switch));
        assert_eq!(switch_inside(&WalSegmentName::new(2, 5, SEG), &histories), None);
        // A switch on the segment's end leaves no partial segment.
        assert_eq!(switch_inside(&WalSegmentName::new(2, 8, SEG), &histories), None);

        let mut stale = vec![0xAB; SEG as usize];
        let mut clean = stale.clone();
        clean[0x2345..].fill(0);
        normalize_partial(&mut stale, &seg, switch);
        assert_eq!(stale, clean);
        // A switch point outside the segment changes nothing.
        let mut other = vec![0xAB; SEG as usize];
        normalize_partial(&mut other, &seg, Lsn(7 * SEG + 1));
        assert!(other.iter().all(|&b| b == 0xAB));
    }

    #[test]
    fn records_match_their_objects() {
        let record = |file: &str, valid: Option<u64>| WalRecord {
            file: file.into(),
            system_identifier: "1".into(),
            plain_len: 0,
            plain_blake3: String::new(),
            stored_len: 0,
            stored_blake3: String::new(),
            prev: None,
            valid_bytes: valid,
            history: None,
            source: "stream".into(),
            created_at: chrono::Utc::now(),
            descriptor_generation: 1,
        };
        let seg = "000000010000000000000005";
        assert!(check_record(&record(seg, None), seg, "k").is_ok());
        assert!(check_record(&record(seg, Some(8192)), &format!("{seg}.streaming"), "k").is_ok());
        // A complete segment put in place of a streaming copy, and the reverse.
        assert!(check_record(&record(seg, None), &format!("{seg}.streaming"), "k").is_err());
        assert!(check_record(&record(seg, Some(8192)), seg, "k").is_err());
        assert!(check_record(&record("000000010000000000000006", None), seg, "k").is_err());
    }
}
