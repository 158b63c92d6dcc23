//! PostgreSQL's WAL coordinates: `Lsn` (printed `X/X`), timeline ids, and WAL
//! file names with the segment-size arithmetic of xlog_internal.h.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A WAL position (log sequence number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

pub type TimelineId = u32;

impl Lsn {
    pub const INVALID: Lsn = Lsn(0);

    /// The segment number holding this position.
    pub fn segno(self, seg_size: u64) -> u64 {
        self.0 / seg_size
    }

    /// Offset inside its segment.
    pub fn segment_offset(self, seg_size: u64) -> u64 {
        self.0 % seg_size
    }

    /// Rounded down to the start of its segment.
    pub fn segment_start(self, seg_size: u64) -> Lsn {
        Lsn(self.0 - self.0 % seg_size)
    }

    pub fn is_valid(self) -> bool {
        self.0 != 0
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not an LSN (expected the form 16/B374D848)")]
pub struct LsnParseError(pub String);

impl FromStr for Lsn {
    type Err = LsnParseError;
    fn from_str(s: &str) -> Result<Lsn, LsnParseError> {
        let err = || LsnParseError(s.to_string());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(err());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn(((hi as u64) << 32) | lo as u64))
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Lsn, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a file in pg_wal (or the archive) is, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WalFileKind {
    Segment,
    /// `<segment>.partial`: the last, incomplete segment of a timeline.
    Partial,
    /// `<segment>.<offset>.backup`: a backup history file.
    BackupHistory,
    /// `<tli>.history`: a timeline history file.
    History,
}

/// A WAL segment's name: timeline and segment number. Display gives the 24
/// hex digits PostgreSQL uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WalSegmentName {
    pub tli: TimelineId,
    pub segno: u64,
    pub seg_size: u64,
}

impl WalSegmentName {
    pub fn new(tli: TimelineId, segno: u64, seg_size: u64) -> Self {
        WalSegmentName { tli, segno, seg_size }
    }

    /// The segment holding `lsn`.
    pub fn of_lsn(tli: TimelineId, lsn: Lsn, seg_size: u64) -> Self {
        Self::new(tli, lsn.segno(seg_size), seg_size)
    }

    fn per_id(seg_size: u64) -> u64 {
        0x1_0000_0000 / seg_size
    }

    /// Parses the 24 hex digits (the bare segment name).
    pub fn parse(name: &str, seg_size: u64) -> Option<Self> {
        if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let tli = u32::from_str_radix(&name[0..8], 16).ok()?;
        let log = u64::from_str_radix(&name[8..16], 16).ok()?;
        let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
        let per_id = Self::per_id(seg_size);
        if seg >= per_id || tli == 0 {
            return None;
        }
        Some(Self::new(tli, log * per_id + seg, seg_size))
    }

    pub fn start_lsn(&self) -> Lsn {
        Lsn(self.segno * self.seg_size)
    }

    pub fn end_lsn(&self) -> Lsn {
        Lsn((self.segno + 1) * self.seg_size)
    }

    pub fn next(&self) -> Self {
        Self::new(self.tli, self.segno + 1, self.seg_size)
    }

    pub fn prev(&self) -> Option<Self> {
        self.segno.checked_sub(1).map(|s| Self::new(self.tli, s, self.seg_size))
    }

    pub fn with_tli(&self, tli: TimelineId) -> Self {
        Self::new(tli, self.segno, self.seg_size)
    }
}

impl fmt::Display for WalSegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per_id = Self::per_id(self.seg_size);
        write!(f, "{:08X}{:08X}{:08X}", self.tli, self.segno / per_id, self.segno % per_id)
    }
}

/// Classifies a WAL-archive file name; `None` for anything else.
pub fn classify_wal_file(name: &str) -> Option<WalFileKind> {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase());
    if hex(name, 24) {
        return Some(WalFileKind::Segment);
    }
    if let Some(seg) = name.strip_suffix(".partial")
        && hex(seg, 24)
    {
        return Some(WalFileKind::Partial);
    }
    if let Some(rest) = name.strip_suffix(".backup")
        && let Some((seg, off)) = rest.split_once('.')
        && hex(seg, 24)
        && hex(off, 8)
    {
        return Some(WalFileKind::BackupHistory);
    }
    if let Some(tli) = name.strip_suffix(".history")
        && hex(tli, 8)
    {
        return Some(WalFileKind::History);
    }
    None
}

/// Parses `wal_segment_size` as SHOW prints it (`16MB`, `1GB`, `64MB`).
pub fn parse_show_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..split].parse().ok()?;
    let mult = match &s[split..] {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        _ => return None,
    };
    Some(n * mult)
}

/// One entry of a timeline history file: `tli` ended at `switch_lsn`, where the
/// next timeline of the file begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub tli: TimelineId,
    pub switch_lsn: Lsn,
}

/// Parses the content of `<tli>.history`. Lines are `parentTLI<TAB>switchpoint<TAB>reason`;
/// comments and blank lines are skipped. Entries must be in increasing order.
pub fn parse_history(content: &str) -> Result<Vec<HistoryEntry>, String> {
    let mut out: Vec<HistoryEntry> = Vec::new();
    for (i, line) in content.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let tli = fields.next().and_then(|f| f.parse::<u32>().ok()).ok_or_else(|| format!("line {}: bad timeline id", i + 1))?;
        let lsn: Lsn = fields
            .next()
            .ok_or_else(|| format!("line {}: no switch point", i + 1))?
            .parse()
            .map_err(|_| format!("line {}: bad switch point", i + 1))?;
        if let Some(prev) = out.last()
            && (tli <= prev.tli || lsn < prev.switch_lsn)
        {
            return Err(format!("line {}: timeline ids and switch points must increase", i + 1));
        }
        out.push(HistoryEntry { tli, switch_lsn: lsn });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    #[test]
    fn lsn_parse_and_display() {
        let l: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert_eq!("0/3000060".parse::<Lsn>().unwrap().0, 0x300_0060);
        assert_eq!("00000000/03000060".parse::<Lsn>().unwrap().0, 0x300_0060);
        for bad in ["", "1", "/1", "1/", "x/1", "123456789/0", "1/2/3"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad}");
        }
    }

    #[test]
    fn segment_names() {
        let lsn: Lsn = "0/3000060".parse().unwrap();
        let name = WalSegmentName::of_lsn(1, lsn, SEG);
        assert_eq!(name.to_string(), "000000010000000000000003");
        assert_eq!(WalSegmentName::parse("000000010000000000000003", SEG), Some(name));
        let high = WalSegmentName::of_lsn(2, "1/FF000000".parse().unwrap(), SEG);
        assert_eq!(high.to_string(), "0000000200000001000000FF");
        assert_eq!(high.next().to_string(), "000000020000000200000000");
        assert_eq!(high.next().prev(), Some(high));
        // 1 GB segments: 4 per log id.
        let big = WalSegmentName::of_lsn(1, "5/C0000000".parse().unwrap(), 1 << 30);
        assert_eq!(big.to_string(), "000000010000000500000003");
        assert!(WalSegmentName::parse("000000010000000000000100", SEG).is_none());
        assert!(WalSegmentName::parse("000000010000000000000004", 1 << 30).is_none());
        assert_eq!(name.start_lsn().0, 3 * SEG);
        assert_eq!(name.end_lsn().0, 4 * SEG);
    }

    #[test]
    fn classify() {
        assert_eq!(classify_wal_file("000000010000000000000003"), Some(WalFileKind::Segment));
        assert_eq!(classify_wal_file("000000010000000000000003.partial"), Some(WalFileKind::Partial));
        assert_eq!(classify_wal_file("000000010000000000000003.00000028.backup"), Some(WalFileKind::BackupHistory));
        assert_eq!(classify_wal_file("00000002.history"), Some(WalFileKind::History));
        assert_eq!(classify_wal_file("00000002.historyx"), None);
        assert_eq!(classify_wal_file("00000001000000000000000g"), None);
        assert_eq!(classify_wal_file("../etc/passwd"), None);
    }

    #[test]
    fn history_files() {
        let h = parse_history("1\t0/3000158\tno recovery target specified\n\n2\t0/5000000\tbefore 2026\n").unwrap();
        assert_eq!(
            h,
            vec![
                HistoryEntry { tli: 1, switch_lsn: "0/3000158".parse().unwrap() },
                HistoryEntry { tli: 2, switch_lsn: "0/5000000".parse().unwrap() },
            ]
        );
        assert!(parse_history("2\t0/5\n1\t0/6\n").is_err());
        assert!(parse_history("x\t0/5\n").is_err());
        assert_eq!(parse_show_size("16MB"), Some(SEG));
        assert_eq!(parse_show_size("1GB"), Some(1 << 30));
    }
}
