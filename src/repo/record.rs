//! Framed objects: a signed record followed by the sealed payload it describes.
//! WAL segments, `.partial`, `.backup` and `.history` files are stored this way,
//! one object each, so that a single read gives both the data and the proof.
//!
//! ```text
//! "WVREC001"            8 bytes, magic and framing version
//! record length         u32, big-endian
//! record                a signed document (JSON body + signature line)
//! payload               the sealed bytes (age over zstd)
//! ```

use serde::{Deserialize, Serialize};

use super::RepoError;
use super::signing::{PublicKey, SignedDocument, SigningKey};

pub const MAGIC: &[u8; 8] = b"WVREC001";
pub const DOC_KIND: &str = "wal-record";
/// Records are small; reading this much from the start of an object always covers one.
pub const HEADER_READ: u64 = 4096;
const MAX_RECORD: usize = 64 << 10;

/// What a stored WAL file is and the checksums that prove it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WalRecord {
    /// The PostgreSQL file name (`000000010000000000000003`, `00000002.history`, ...).
    pub file: String,
    pub system_identifier: String,
    pub plain_len: u64,
    pub plain_blake3: String,
    pub stored_len: u64,
    pub stored_blake3: String,
    /// For segments: plain_blake3 of the previous segment on the same timeline,
    /// when it was in the repository at push time. Ties consecutive records
    /// together so that a removed or swapped record breaks the chain.
    pub prev: Option<String>,
    /// For the streamer's copy of a segment in progress: how many bytes of WAL it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_bytes: Option<u64>,
    /// For `.history` files: the switch points it lists (not the free-text
    /// reasons), readable without the identity for the catalog and verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<crate::pg::lsn::HistoryEntry>>,
    /// `archive-push` or `stream`.
    pub source: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// The descriptor generation the writer saw.
    pub descriptor_generation: u64,
}

/// A parsed header: the record, its raw document, and where the payload starts.
#[derive(Debug, Clone)]
pub struct Header {
    pub record: WalRecord,
    /// blake3 of the signed record document.
    pub record_hash: blake3::Hash,
    pub payload_offset: u64,
}

/// Frames a record and payload into one object.
pub fn encode(key: &SigningKey, record: &WalRecord, payload: &[u8]) -> Vec<u8> {
    let head = header_bytes(key, record);
    let mut out = Vec::with_capacity(head.len() + payload.len());
    out.extend_from_slice(&head);
    out.extend_from_slice(payload);
    out
}

/// Room a writer leaves in front of a payload it seals (see `frame`): a
/// record is well under this unless it lists a long timeline history.
pub const HEADROOM: usize = 2048;

/// Frames a record and the payload that follows HEADROOM bytes of `buf` into
/// one object, writing the header into that room instead of copying the
/// payload (a WAL segment's is megabytes). A header too large for the room
/// is framed by copying.
pub fn frame(key: &SigningKey, record: &WalRecord, mut buf: Vec<u8>) -> bytes::Bytes {
    let head = header_bytes(key, record);
    match HEADROOM.checked_sub(head.len()) {
        Some(start) => {
            buf[start..HEADROOM].copy_from_slice(&head);
            bytes::Bytes::from(buf).slice(start..)
        }
        None => encode(key, record, &buf[HEADROOM..]).into(),
    }
}

/// Magic, record length and the signed record.
fn header_bytes(key: &SigningKey, record: &WalRecord) -> Vec<u8> {
    let body = serde_json::to_vec(record).expect("record serializes");
    let doc = key.sign_document(DOC_KIND, &body);
    let mut out = Vec::with_capacity(12 + doc.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(doc.len() as u32).to_be_bytes());
    out.extend_from_slice(&doc);
    out
}

/// Parses and verifies the header at the start of `data` (which may hold just the
/// first HEADER_READ bytes of the object).
pub fn decode_header(data: &[u8], trusted: &PublicKey, what: &str) -> Result<Header, RepoError> {
    let bad = |m: String| RepoError::Integrity { object: what.to_string(), message: m };
    if data.len() < 12 || &data[..8] != MAGIC {
        return Err(bad("not a walvault WAL object (bad magic)".into()));
    }
    let len = u32::from_be_bytes(data[8..12].try_into().unwrap()) as usize;
    if len > MAX_RECORD {
        return Err(bad(format!("record length {len} is implausible")));
    }
    let doc = data.get(12..12 + len).ok_or_else(|| bad("truncated record".into()))?;
    let body = SignedDocument::parse(doc, what)?.verify(DOC_KIND, trusted, what)?;
    let record: WalRecord = serde_json::from_slice(body).map_err(|e| bad(format!("unreadable record: {e}")))?;
    Ok(Header { record, record_hash: blake3::hash(doc), payload_offset: 12 + len as u64 })
}

/// Parses a whole object: verifies the record and that the payload matches it.
pub fn decode<'a>(data: &'a [u8], trusted: &PublicKey, what: &str) -> Result<(Header, &'a [u8]), RepoError> {
    let header = decode_header(data, trusted, what)?;
    let payload = &data[header.payload_offset as usize..];
    check_payload(&header.record, payload, what)?;
    Ok((header, payload))
}

/// Checks a payload against the record's stored length and checksum.
pub fn check_payload(record: &WalRecord, payload: &[u8], what: &str) -> Result<(), RepoError> {
    if payload.len() as u64 != record.stored_len {
        return Err(RepoError::Integrity {
            object: what.to_string(),
            message: format!("payload is {} bytes, the signed record says {}", payload.len(), record.stored_len),
        });
    }
    let actual = blake3::hash(payload).to_hex();
    if actual.as_str() != record.stored_blake3 {
        return Err(RepoError::Integrity {
            object: what.to_string(),
            message: format!("stored bytes have blake3 {actual}, the signed record says {}", record.stored_blake3),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> WalRecord {
        WalRecord {
            file: "000000010000000000000003".into(),
            system_identifier: "1".into(),
            plain_len: 3,
            plain_blake3: "p".into(),
            stored_len: 5,
            stored_blake3: blake3::hash(b"hello").to_hex().to_string(),
            prev: None,
            valid_bytes: None,
            history: None,
            source: "test".into(),
            created_at: chrono::Utc::now(),
            descriptor_generation: 1,
        }
    }

    #[test]
    fn framing_in_the_headroom_makes_the_same_object_as_encoding() {
        let k = SigningKey::generate();
        let mut rec = record();
        let mut buf = vec![0u8; HEADROOM];
        buf.extend_from_slice(b"hello");
        let framed = frame(&k, &rec, buf.clone());
        let (h, payload) = decode(&framed, &k.public(), "x").unwrap();
        assert_eq!((payload, &h.record), (&b"hello"[..], &rec));
        assert_eq!(framed.len(), encode(&k, &rec, b"hello").len());

        // A record too large for the room (a long history) is framed by copying.
        let entry = crate::pg::lsn::HistoryEntry { tli: 1, switch_lsn: crate::pg::lsn::Lsn(0x1000000) };
        rec.history = Some(vec![entry; 200]);
        let framed = frame(&k, &rec, buf);
        let (h, payload) = decode(&framed, &k.public(), "x").unwrap();
        assert!(h.payload_offset as usize > HEADROOM, "the header did not fit the room");
        assert_eq!((payload, &h.record), (&b"hello"[..], &rec));
    }

    #[test]
    fn round_trip_and_tamper() {
        let k = SigningKey::generate();
        let rec = record();
        let obj = encode(&k, &rec, b"hello");
        let (h, payload) = decode(&obj, &k.public(), "x").unwrap();
        assert_eq!(payload, b"hello");
        assert_eq!(h.record, rec);
        let mut bad = obj.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(decode(&bad, &k.public(), "x").unwrap_err().to_string().contains("the signed record says"));
        let mut bad = obj.clone();
        bad[20] ^= 1;
        assert!(decode(&bad, &k.public(), "x").is_err());
        assert!(decode_header(&obj[..obj.len() - 5], &k.public(), "x").is_ok());
    }
}
