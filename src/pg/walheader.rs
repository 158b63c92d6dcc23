//! WAL page-header checks without replay, as XLogReaderValidatePageHeader does:
//! the magic of the server's version, known info bits, the long header of the
//! first page (system identifier, segment size, block size), and every page's
//! address. Headers are in the server's byte order; we support little-endian
//! servers (x86, ARM), which is what PostgreSQL runs on in practice.

use super::lsn::{Lsn, WalSegmentName};

const XLP_LONG_HEADER: u16 = 0x0002;
const XLP_ALL_FLAGS: u16 = 0x000F;
const SHORT_HEADER: usize = 24;
const LONG_HEADER: usize = 40;

/// XLOG_PAGE_MAGIC for a major version (13 to 18), or `None` if unknown.
pub fn page_magic(major: u32) -> Option<u16> {
    Some(match major {
        13 => 0xD106,
        14 => 0xD10D,
        15 => 0xD110,
        16 => 0xD113,
        17 => 0xD116,
        18 => 0xD118,
        _ => return None,
    })
}

/// The major version a magic belongs to, for messages.
pub fn major_of_magic(magic: u16) -> Option<u32> {
    (13..=18).find(|&m| page_magic(m) == Some(magic))
}

/// What a segment must match.
#[derive(Debug, Clone, Copy)]
pub struct ExpectedWal {
    pub pg_major: u32,
    pub system_identifier: u64,
    pub seg_size: u64,
    pub block_size: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalHeaderError {
    #[error("{name} is {actual} bytes, but the server's WAL segments are {expected} bytes")]
    WrongSize { name: String, actual: u64, expected: u64 },
    #[error("{name} belongs to another cluster: its system identifier is {found}, the repository's is {expected}")]
    OtherCluster { name: String, found: u64, expected: u64 },
    #[error("{name} is not WAL of PostgreSQL {major}: page magic {found:#06X}{}", describe_magic(*found))]
    WrongMagic { name: String, major: u32, found: u16 },
    #[error("{name} is damaged at offset {offset}: {message}")]
    Damaged { name: String, offset: u64, message: String },
}

fn describe_magic(found: u16) -> String {
    match major_of_magic(found) {
        Some(m) => format!(" (PostgreSQL {m})"),
        None => String::new(),
    }
}

/// What a checked segment holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentSummary {
    /// Bytes up to the first all-zero page (the whole segment when complete).
    pub written: u64,
    /// The highest page timeline seen.
    pub max_tli: u32,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// Checks a segment (complete, or a `.partial` padded with zeros). `allow_short`
/// accepts data shorter than a segment (an upload in progress); it must still
/// end on a page boundary.
pub fn check_segment(
    data: &[u8],
    name: &WalSegmentName,
    expected: &ExpectedWal,
    allow_short: bool,
) -> Result<SegmentSummary, WalHeaderError> {
    let n = name.to_string();
    let block = expected.block_size as usize;
    let len = data.len() as u64;
    if len > expected.seg_size || (!allow_short && len != expected.seg_size) || !(len as usize).is_multiple_of(block) {
        return Err(WalHeaderError::WrongSize { name: n, actual: len, expected: expected.seg_size });
    }
    let magic = page_magic(expected.pg_major).unwrap_or(0);
    let damaged = |offset: usize, message: String| WalHeaderError::Damaged { name: n.clone(), offset: offset as u64, message };
    let mut max_tli = 0u32;
    let mut written = len;
    for (i, page) in data.chunks(block).enumerate() {
        let offset = i * block;
        if page.iter().all(|&b| b == 0) {
            if i == 0 {
                return Err(damaged(0, "the first page is empty".into()));
            }
            if written == len {
                written = offset as u64;
            }
            continue;
        }
        let found = u16_at(page, 0);
        if found != magic {
            if i == 0 {
                return Err(WalHeaderError::WrongMagic { name: n.clone(), major: expected.pg_major, found });
            }
            return Err(damaged(offset, format!("page magic {found:#06X}, expected {magic:#06X}")));
        }
        let info = u16_at(page, 2);
        if info & !XLP_ALL_FLAGS != 0 {
            return Err(damaged(offset, format!("unknown page flags {info:#06X}")));
        }
        let tli = u32_at(page, 4);
        if tli == 0 || tli > name.tli || tli < max_tli {
            return Err(damaged(offset, format!("page timeline {tli} does not fit timeline {} of the file", name.tli)));
        }
        max_tli = tli;
        let pageaddr = u64_at(page, 8);
        let want = name.start_lsn().0 + offset as u64;
        if pageaddr != want {
            return Err(damaged(
                offset,
                format!("page address {} where {} was expected (a recycled or misplaced segment)", Lsn(pageaddr), Lsn(want)),
            ));
        }
        if i == 0 {
            if info & XLP_LONG_HEADER == 0 || page.len() < LONG_HEADER {
                return Err(damaged(0, "the first page lacks the long header".into()));
            }
            let sysid = u64_at(page, SHORT_HEADER);
            if sysid != expected.system_identifier {
                return Err(WalHeaderError::OtherCluster { name: n.clone(), found: sysid, expected: expected.system_identifier });
            }
            let seg = u32_at(page, 32) as u64;
            if seg != expected.seg_size {
                return Err(damaged(0, format!("segment size {seg} in the header, the server uses {}", expected.seg_size)));
            }
            let blcksz = u32_at(page, 36);
            if blcksz != expected.block_size {
                return Err(damaged(0, format!("WAL block size {blcksz} in the header, the server uses {}", expected.block_size)));
            }
        } else if info & XLP_LONG_HEADER != 0 {
            return Err(damaged(offset, "a long header in the middle of a segment".into()));
        }
    }
    Ok(SegmentSummary { written, max_tli })
}

/// Reads the system identifier of a segment's first page, without other checks.
pub fn segment_system_identifier(data: &[u8]) -> Option<u64> {
    if data.len() < LONG_HEADER || u16_at(data, 2) & XLP_LONG_HEADER == 0 {
        return None;
    }
    Some(u64_at(data, SHORT_HEADER))
}

/// Builds a syntactically valid segment for tests: every page has a header with
/// the right magic and address; the first page has the long header.
pub fn synthetic_segment(name: &WalSegmentName, expected: &ExpectedWal, fill: u8) -> Vec<u8> {
    let block = expected.block_size as usize;
    let mut data = vec![fill; expected.seg_size as usize];
    for (i, page) in data.chunks_mut(block).enumerate() {
        page[0..2].copy_from_slice(&page_magic(expected.pg_major).unwrap().to_le_bytes());
        let info: u16 = if i == 0 { XLP_LONG_HEADER } else { 0 };
        page[2..4].copy_from_slice(&info.to_le_bytes());
        page[4..8].copy_from_slice(&name.tli.to_le_bytes());
        page[8..16].copy_from_slice(&(name.start_lsn().0 + (i * block) as u64).to_le_bytes());
        page[16..24].fill(0);
        if i == 0 {
            page[24..32].copy_from_slice(&expected.system_identifier.to_le_bytes());
            page[32..36].copy_from_slice(&(expected.seg_size as u32).to_le_bytes());
            page[36..40].copy_from_slice(&expected.block_size.to_le_bytes());
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXP: ExpectedWal =
        ExpectedWal { pg_major: 15, system_identifier: 7_300_000_000_000_000_001, seg_size: 1 << 20, block_size: 8192 };

    fn name() -> WalSegmentName {
        WalSegmentName::new(1, 5, EXP.seg_size)
    }

    #[test]
    fn accepts_valid_and_finds_end() {
        let mut seg = synthetic_segment(&name(), &EXP, 0xAB);
        assert_eq!(check_segment(&seg, &name(), &EXP, false).unwrap().written, EXP.seg_size);
        let half = seg.len() / 2;
        seg[half..].fill(0);
        assert_eq!(check_segment(&seg, &name(), &EXP, false).unwrap().written, half as u64);
    }

    #[test]
    fn refuses_bad_segments() {
        let seg = synthetic_segment(&name(), &EXP, 1);
        let other = ExpectedWal { system_identifier: 42, ..EXP };
        let e = check_segment(&seg, &name(), &other, false).unwrap_err();
        assert!(matches!(e, WalHeaderError::OtherCluster { found: 7_300_000_000_000_000_001, expected: 42, .. }), "{e}");
        let v16 = ExpectedWal { pg_major: 16, ..EXP };
        let e = check_segment(&seg, &name(), &v16, false).unwrap_err();
        assert_eq!(e.to_string(), "000000010000000000000005 is not WAL of PostgreSQL 16: page magic 0xD110 (PostgreSQL 15)");
        // Misplaced: the content of segment 5 under the name of segment 6.
        let e = check_segment(&seg, &WalSegmentName::new(1, 6, EXP.seg_size), &EXP, false).unwrap_err();
        assert!(e.to_string().contains("recycled or misplaced"), "{e}");
        let e = check_segment(&seg[..8192 * 3], &name(), &EXP, false).unwrap_err();
        assert!(matches!(e, WalHeaderError::WrongSize { .. }));
        assert!(check_segment(&seg[..8192 * 3], &name(), &EXP, true).is_ok());
        let mut bad = seg.clone();
        bad[8192 * 7 + 9] ^= 0x40;
        let e = check_segment(&bad, &name(), &EXP, false).unwrap_err();
        assert!(matches!(e, WalHeaderError::Damaged { offset: 57344, .. }), "{e}");
    }
}
