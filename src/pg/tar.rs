//! A push parser for the tar streams BASE_BACKUP sends: bytes go in as they
//! arrive (any split), events come out. It understands what PostgreSQL writes
//! (ustar headers, base-256 sizes for large files, directories, symlinks) and
//! the pax and GNU long-name extensions, and it never buffers file data.

use std::fmt;

const BLOCK: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarEntry {
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    pub mode: u32,
    pub mtime: i64,
    pub link_target: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum TarEvent<'a> {
    /// A new entry; its data (for files) follows in `Data` events.
    Entry(TarEntry),
    Data(&'a [u8]),
    /// The current file's data is complete.
    EntryEnd,
    /// Two zero blocks: the archive is complete.
    End,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarError(pub String);

impl fmt::Display for TarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed tar stream: {}", self.0)
    }
}

impl std::error::Error for TarError {}

enum State {
    Header,
    /// Inside file data: bytes left, then padding to skip.
    Data {
        left: u64,
        pad: usize,
    },
    /// Inside an extension header's payload (pax or GNU long name), collected.
    Extension {
        kind: u8,
        left: u64,
        pad: usize,
        buf: Vec<u8>,
    },
    Padding {
        left: usize,
    },
    Done,
}

pub struct TarParser {
    state: State,
    header: Vec<u8>,
    zero_blocks: u32,
    long_name: Option<String>,
    long_link: Option<String>,
    pax_path: Option<String>,
    pax_link: Option<String>,
    pax_size: Option<u64>,
}

impl Default for TarParser {
    fn default() -> Self {
        Self::new()
    }
}

/// Extension headers larger than this are refused (PostgreSQL writes none).
const MAX_EXTENSION: u64 = 1 << 20;

impl TarParser {
    pub fn new() -> Self {
        TarParser {
            state: State::Header,
            header: Vec::with_capacity(BLOCK),
            zero_blocks: 0,
            long_name: None,
            long_link: None,
            pax_path: None,
            pax_link: None,
            pax_size: None,
        }
    }

    /// True once the end-of-archive marker was seen.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// True when the parser is between entries (a stream may end here without
    /// the end marker: PostgreSQL 13 and 14 send unterminated tars).
    pub fn at_entry_boundary(&self) -> bool {
        matches!(self.state, State::Header | State::Done) && self.header.is_empty()
    }

    /// Feeds bytes; calls `emit` for each event. Data events borrow from `input`.
    pub fn feed<'a>(&mut self, mut input: &'a [u8], emit: &mut dyn FnMut(TarEvent<'a>) -> Result<(), TarError>) -> Result<(), TarError> {
        while !input.is_empty() {
            match &mut self.state {
                State::Done => {
                    // Anything after the end marker is padding (tar pads to a record size).
                    if input.iter().any(|&b| b != 0) {
                        return Err(TarError("data after the end of the archive".into()));
                    }
                    return Ok(());
                }
                State::Padding { left } => {
                    let n = (*left).min(input.len());
                    *left -= n;
                    input = &input[n..];
                    if *left == 0 {
                        self.state = State::Header;
                    }
                }
                State::Data { left, pad } => {
                    let n = (*left).min(input.len() as u64) as usize;
                    if n > 0 {
                        emit(TarEvent::Data(&input[..n]))?;
                        *left -= n as u64;
                        input = &input[n..];
                    }
                    if *left == 0 {
                        let pad = *pad;
                        emit(TarEvent::EntryEnd)?;
                        self.state = if pad > 0 { State::Padding { left: pad } } else { State::Header };
                    }
                }
                State::Extension { left, buf, .. } => {
                    let n = (*left).min(input.len() as u64) as usize;
                    buf.extend_from_slice(&input[..n]);
                    *left -= n as u64;
                    input = &input[n..];
                    if *left == 0 {
                        let State::Extension { kind, pad, buf, .. } = std::mem::replace(&mut self.state, State::Header) else {
                            unreachable!()
                        };
                        self.apply_extension(kind, &buf)?;
                        if pad > 0 {
                            self.state = State::Padding { left: pad };
                        }
                    }
                }
                State::Header => {
                    let n = (BLOCK - self.header.len()).min(input.len());
                    self.header.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if self.header.len() == BLOCK {
                        let block = std::mem::take(&mut self.header);
                        self.header.reserve(BLOCK);
                        self.on_header(&block, emit)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn on_header<'a>(&mut self, block: &[u8], emit: &mut dyn FnMut(TarEvent<'a>) -> Result<(), TarError>) -> Result<(), TarError> {
        if block.iter().all(|&b| b == 0) {
            self.zero_blocks += 1;
            if self.zero_blocks == 2 {
                self.state = State::Done;
                emit(TarEvent::End)?;
            }
            return Ok(());
        }
        if self.zero_blocks > 0 {
            return Err(TarError("a single zero block inside the archive".into()));
        }
        verify_checksum(block)?;
        let typeflag = block[156];
        let size = self.pax_size.take().map(Ok).unwrap_or_else(|| parse_number(&block[124..136], "size"))?;
        let pad = ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize;
        match typeflag {
            b'x' | b'L' | b'K' => {
                if size > MAX_EXTENSION {
                    return Err(TarError(format!("extension header of {size} bytes")));
                }
                if size == 0 {
                    return Ok(());
                }
                self.state = State::Extension { kind: typeflag, left: size, pad, buf: Vec::with_capacity(size as usize) };
                return Ok(());
            }
            b'g' => {
                // A global pax header: skip its payload, it does not describe an entry.
                self.state = if size + pad as u64 > 0 { State::Padding { left: (size + pad as u64) as usize } } else { State::Header };
                return Ok(());
            }
            _ => {}
        }
        let kind = match typeflag {
            b'0' | 0 | b'7' => EntryKind::File,
            b'5' => EntryKind::Dir,
            b'2' => EntryKind::Symlink,
            other => return Err(TarError(format!("unsupported entry type '{}'", other as char))),
        };
        let path = match self.pax_path.take().or(self.long_name.take()) {
            Some(p) => p,
            None => {
                let name = c_string(&block[0..100])?;
                let prefix = if &block[257..262] == b"ustar" { c_string(&block[345..500])? } else { String::new() };
                if prefix.is_empty() { name } else { format!("{prefix}/{name}") }
            }
        };
        let link_target = match kind {
            EntryKind::Symlink => {
                Some(self.pax_link.take().or(self.long_link.take()).map(Ok).unwrap_or_else(|| c_string(&block[157..257]))?)
            }
            _ => None,
        };
        self.pax_link = None;
        self.long_link = None;
        let path = normalize_path(&path)?;
        let mode = parse_number(&block[100..108], "mode")? as u32 & 0o7777;
        let mtime = parse_number(&block[136..148], "mtime")? as i64;
        let size = if kind == EntryKind::File { size } else { 0 };
        emit(TarEvent::Entry(TarEntry { path, kind, size, mode, mtime, link_target }))?;
        if kind == EntryKind::File {
            self.state = State::Data { left: size, pad };
            if size == 0 {
                emit(TarEvent::EntryEnd)?;
                self.state = State::Header;
            }
        }
        Ok(())
    }

    fn apply_extension(&mut self, kind: u8, buf: &[u8]) -> Result<(), TarError> {
        match kind {
            b'L' => self.long_name = Some(c_string(buf)?),
            b'K' => self.long_link = Some(c_string(buf)?),
            _ => {
                // pax records: "<len> <key>=<value>\n"
                let mut rest = buf;
                while !rest.is_empty() {
                    let sp = rest.iter().position(|&b| b == b' ').ok_or_else(|| TarError("bad pax record".into()))?;
                    let len: usize = std::str::from_utf8(&rest[..sp])
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .filter(|&l: &usize| l > sp + 1 && l <= rest.len())
                        .ok_or_else(|| TarError("bad pax record length".into()))?;
                    let record = &rest[sp + 1..len];
                    let record = record.strip_suffix(b"\n").ok_or_else(|| TarError("pax record without newline".into()))?;
                    let eq = record.iter().position(|&b| b == b'=').ok_or_else(|| TarError("pax record without '='".into()))?;
                    let value = String::from_utf8(record[eq + 1..].to_vec()).map_err(|_| TarError("pax value is not UTF-8".into()))?;
                    match &record[..eq] {
                        b"path" => self.pax_path = Some(value),
                        b"linkpath" => self.pax_link = Some(value),
                        b"size" => self.pax_size = Some(value.parse().map_err(|_| TarError("bad pax size".into()))?),
                        _ => {}
                    }
                    rest = &rest[len..];
                }
            }
        }
        Ok(())
    }
}

fn verify_checksum(block: &[u8]) -> Result<(), TarError> {
    let stored = parse_number(&block[148..156], "checksum")?;
    let sum: u64 = block.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { b' ' as u64 } else { b as u64 }).sum();
    if stored != sum {
        return Err(TarError(format!("header checksum {stored} does not match {sum}")));
    }
    Ok(())
}

/// Octal (NUL/space padded) or GNU base-256 (high bit set) numbers.
fn parse_number(field: &[u8], what: &str) -> Result<u64, TarError> {
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        if field[0] & 0x40 != 0 {
            return Err(TarError(format!("negative {what}")));
        }
        let mut v: u64 = (field[0] & 0x3F) as u64;
        for &b in &field[1..] {
            v = v.checked_mul(256).and_then(|v| v.checked_add(b as u64)).ok_or_else(|| TarError(format!("{what} overflows")))?;
        }
        return Ok(v);
    }
    let text: Vec<u8> = field.iter().copied().take_while(|&b| b != 0).collect();
    let text = std::str::from_utf8(&text).map_err(|_| TarError(format!("bad {what} field")))?.trim();
    if text.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(text, 8).map_err(|_| TarError(format!("bad {what} field '{text}'")))
}

fn c_string(field: &[u8]) -> Result<String, TarError> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8(field[..end].to_vec()).map_err(|_| TarError("a name is not UTF-8".into()))
}

/// Makes a member path safe to join under a directory: relative, no `..`,
/// no empty or `.` segments, no trailing slash.
pub fn normalize_path(path: &str) -> Result<String, TarError> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    if parts.is_empty() || parts.contains(&"..") || path.starts_with('/') {
        return Err(TarError(format!("unsafe member path '{path}'")));
    }
    Ok(parts.join("/"))
}

/// Builds a tar header block (ustar), for tests and fuzzing seeds.
pub fn header_block(path: &str, kind: EntryKind, size: u64, mode: u32, link: Option<&str>) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    b[..path.len()].copy_from_slice(path.as_bytes());
    let octal = |b: &mut [u8], v: u64| {
        let s = format!("{:0width$o}\0", v, width = b.len() - 1);
        b.copy_from_slice(s.as_bytes());
    };
    octal(&mut b[100..108], mode as u64);
    octal(&mut b[108..116], 0);
    octal(&mut b[116..124], 0);
    octal(&mut b[124..136], size);
    octal(&mut b[136..148], 1_700_000_000);
    b[156] = match kind {
        EntryKind::File => b'0',
        EntryKind::Dir => b'5',
        EntryKind::Symlink => b'2',
    };
    if let Some(l) = link {
        b[157..157 + l.len()].copy_from_slice(l.as_bytes());
    }
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    b[148..156].fill(b' ');
    let sum: u64 = b.iter().map(|&x| x as u64).sum();
    let s = format!("{sum:06o}\0 ");
    b[148..156].copy_from_slice(s.as_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive() -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(&header_block("base/1", EntryKind::Dir, 0, 0o700, None));
        t.extend_from_slice(&header_block("base/1/123", EntryKind::File, 1000, 0o600, None));
        t.extend((0..1000).map(|i| (i % 7) as u8));
        t.extend(std::iter::repeat_n(0u8, 24));
        t.extend_from_slice(&header_block("pg_tblspc/16385", EntryKind::Symlink, 0, 0o777, Some("/mnt/ts")));
        t.extend_from_slice(&header_block("empty", EntryKind::File, 0, 0o600, None));
        t.extend(std::iter::repeat_n(0u8, 1024));
        t
    }

    fn parse_all(data: &[u8], split: usize) -> Vec<String> {
        let mut p = TarParser::new();
        let mut out = Vec::new();
        let mut data_len = 0usize;
        for piece in data.chunks(split) {
            p.feed(piece, &mut |ev| {
                match ev {
                    TarEvent::Entry(e) => out.push(format!("{:?} {} {} {:o} {:?}", e.kind, e.path, e.size, e.mode, e.link_target)),
                    TarEvent::Data(d) => data_len += d.len(),
                    TarEvent::EntryEnd => out.push(format!("end {data_len}")),
                    TarEvent::End => out.push("END".into()),
                }
                Ok(())
            })
            .unwrap();
        }
        assert!(p.is_done());
        out
    }

    #[test]
    fn parses_any_split() {
        let data = archive();
        let expected = parse_all(&data, data.len());
        assert_eq!(
            expected,
            vec![
                "Dir base/1 0 700 None",
                "File base/1/123 1000 600 None",
                "end 1000",
                "Symlink pg_tblspc/16385 0 777 Some(\"/mnt/ts\")",
                "File empty 0 600 None",
                "end 1000",
                "END"
            ]
        );
        for split in [1, 7, 511, 512, 513, 4096] {
            assert_eq!(parse_all(&data, split), expected, "split {split}");
        }
    }

    #[test]
    fn rejects_damage() {
        let mut data = archive();
        data[600] ^= 1; // in the second header
        let mut p = TarParser::new();
        let err = p.feed(&data, &mut |_| Ok(())).unwrap_err();
        assert!(err.0.contains("checksum"), "{err}");
        assert!(normalize_path("../etc/passwd").is_err());
        assert!(normalize_path("/abs").is_err());
        assert_eq!(normalize_path("./base//1/").unwrap(), "base/1");
    }

    #[test]
    fn base256_and_pax() {
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[4..].copy_from_slice(&(9_000_000_000u64).to_be_bytes());
        assert_eq!(parse_number(&f, "size").unwrap(), 9_000_000_000);
        let mut t = Vec::new();
        let record = "30 path=a/very/long/name/here\n";
        t.extend_from_slice(&header_block("PaxHeader", EntryKind::File, record.len() as u64, 0o600, None));
        t[156] = b'x';
        // fix checksum after changing the type flag
        t[148..156].fill(b' ');
        let sum: u64 = t[..512].iter().map(|&x| x as u64).sum();
        t[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        t.extend_from_slice(record.as_bytes());
        t.extend(std::iter::repeat_n(0u8, 512 - record.len()));
        t.extend_from_slice(&header_block("short", EntryKind::File, 0, 0o600, None));
        t.extend(std::iter::repeat_n(0u8, 1024));
        let out = parse_all(&t, 100);
        assert_eq!(out[0], "File a/very/long/name/here 0 600 None");
    }
}
