//! Backup manifests. Each backup has:
//! - `files.sealed`: the file list (paths, sizes, modes, plain blake3, and where
//!   each chunk is), JSON lines, sealed like any other object;
//! - `backup_manifest.sealed`: PostgreSQL's own backup manifest, sealed;
//! - `manifest.json`: the public part, signed and written last. It names the
//!   two sealed objects and every pack the backup uses, with their checksums,
//!   so an auditor can check the whole backup without the decryption key.
//!   No `manifest.json`, no backup.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::pack::PackInfo;
use super::signing::{PublicKey, SigningKey, open_document};
use super::{RepoError, layout};
use crate::pg::Lsn;
use crate::pg::tar::EntryKind;

pub const MANIFEST_KIND: &str = "manifest";
/// 2: chunk identifiers from chaining values (see `chunk::ChunkIds`); new
/// blobs are solid (a run may still name a blob of format 1).
pub const FORMAT_VERSION: u32 = 2;

/// A sealed object named by a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedRef {
    pub key: String,
    pub stored_len: u64,
    pub stored_blake3: String,
    pub plain_len: u64,
    pub plain_blake3: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupStats {
    pub files: u64,
    pub directories: u64,
    /// Bytes of all files (the size of the data directory).
    pub bytes: u64,
    pub chunks: u64,
    /// Chunks this backup stored (not found in the repository).
    pub chunks_new: u64,
    /// Raw bytes of those chunks.
    pub bytes_new: u64,
    /// Bytes this backup uploaded in packs.
    pub stored_new: u64,
    /// Stored bytes of all blobs the backup references (its size in the repository if alone).
    pub stored_referenced: u64,
    pub duration_ms: u64,
}

/// The public, signed part of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupManifest {
    pub format_version: u32,
    pub backup_id: String,
    pub label: Option<String>,
    pub system_identifier: String,
    pub pg_version_num: u32,
    pub pg_version: String,
    pub start_lsn: Lsn,
    pub start_timeline: u32,
    pub end_lsn: Lsn,
    pub end_timeline: u32,
    pub start_time: chrono::DateTime<chrono::Utc>,
    /// When the server reported the end position: every commit stamped later
    /// lies after `end_lsn`, so time targets from here on are reachable.
    pub end_time: chrono::DateTime<chrono::Utc>,
    /// The next transaction id (with epoch) in the backup's `global/pg_control`:
    /// every transaction id at or above it was assigned after this backup began.
    /// Restore uses it to start a `--target-xid` recovery from a newer backup
    /// than the oldest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_xid: Option<u64>,
    /// The first and last WAL segments replay needs to make the backup consistent.
    pub wal_first: String,
    pub wal_last: String,
    pub files: SealedRef,
    pub server_manifest: Option<SealedRef>,
    pub packs: Vec<PackInfo>,
    pub stats: BackupStats,
    pub descriptor_generation: u64,
    pub created_by: String,
}

impl BackupManifest {
    pub fn to_document(&self, key: &SigningKey) -> Vec<u8> {
        let mut body = serde_json::to_vec_pretty(self).expect("manifest serializes");
        body.push(b'\n');
        key.sign_document(MANIFEST_KIND, &body)
    }

    pub fn from_document(raw: &[u8], trusted: &PublicKey, backup_id: &str) -> Result<BackupManifest, RepoError> {
        let key = layout::backup_manifest_key(backup_id);
        let body = open_document(raw, MANIFEST_KIND, trusted, &key)?;
        let m: BackupManifest = serde_json::from_slice(body)
            .map_err(|e| RepoError::Integrity { object: key.clone(), message: format!("unreadable manifest: {e}") })?;
        if m.backup_id != backup_id {
            return Err(RepoError::Integrity {
                object: key,
                message: format!("the manifest is for backup {}, not {backup_id}", m.backup_id),
            });
        }
        if m.format_version > FORMAT_VERSION {
            return Err(RepoError::Invalid(format!(
                "backup {backup_id} was written by a newer walvault (manifest format {}, this walvault reads up to {FORMAT_VERSION}); upgrade walvault",
                m.format_version
            )));
        }
        Ok(m)
    }
}

/// The first line of files.sealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesHeader {
    pub walvault_files: u32,
    pub backup_id: String,
    pub tablespaces: Vec<Tablespace>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tablespace {
    pub oid: u32,
    pub location: String,
}

/// A run of a file's consecutive chunks that sit in the same blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobRun {
    /// Pack number in the manifest's pack list.
    pub p: u32,
    /// Blob offset and length in the pack, and the blake3 of its sealed bytes.
    pub o: u64,
    pub l: u32,
    pub h: String,
    /// (frame offset, frame length, raw length, chunk id) in file order.
    pub c: Vec<(u32, u32, u32, String)>,
    /// The blob is solid: the frame is the chunk's place in its decompressed
    /// bytes (see `chunk::Frame`). Absent for blobs of format 1.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub s: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
}

impl From<EntryKind> for FileKind {
    fn from(k: EntryKind) -> Self {
        match k {
            EntryKind::File => FileKind::File,
            EntryKind::Dir => FileKind::Dir,
            EntryKind::Symlink => FileKind::Symlink,
        }
    }
}

/// One line of files.sealed after the header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub path: String,
    pub kind: FileKind,
    #[serde(default)]
    pub size: u64,
    pub mode: u32,
    pub mtime: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blobs: Vec<BlobRun>,
}

/// Writes the file list as JSON lines into a spool file.
pub struct FilesWriter {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
    pub count: u64,
}

impl FilesWriter {
    pub fn create(path: PathBuf, header: &FilesHeader) -> std::io::Result<FilesWriter> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)?;
        let mut w = FilesWriter { path, out: std::io::BufWriter::with_capacity(1 << 20, file), count: 0 };
        serde_json::to_writer(&mut w.out, header)?;
        w.out.write_all(b"\n")?;
        Ok(w)
    }

    pub fn write(&mut self, entry: &FileEntry) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, entry)?;
        self.out.write_all(b"\n")?;
        self.count += 1;
        Ok(())
    }

    pub fn finish(mut self) -> std::io::Result<PathBuf> {
        self.out.flush()?;
        Ok(self.path)
    }
}

/// Reads a file list (already opened to plain JSON lines).
pub struct FilesReader<R> {
    lines: std::io::Lines<R>,
    pub header: FilesHeader,
    what: String,
}

impl<R: BufRead> FilesReader<R> {
    pub fn new(reader: R, what: &str) -> Result<FilesReader<R>, RepoError> {
        let mut lines = reader.lines();
        let bad = |m: String| RepoError::Integrity { object: what.to_string(), message: m };
        let first = lines.next().ok_or_else(|| bad("empty file list".into()))?.map_err(|e| bad(e.to_string()))?;
        let header: FilesHeader = serde_json::from_str(&first).map_err(|e| bad(format!("bad file list header: {e}")))?;
        Ok(FilesReader { lines, header, what: what.to_string() })
    }
}

impl<R: BufRead> Iterator for FilesReader<R> {
    type Item = Result<FileEntry, RepoError>;
    fn next(&mut self) -> Option<Self::Item> {
        let line = self.lines.next()?;
        Some(line.map_err(|e| RepoError::Integrity { object: self.what.clone(), message: e.to_string() }).and_then(|l| {
            serde_json::from_str(&l)
                .map_err(|e| RepoError::Integrity { object: self.what.clone(), message: format!("bad file entry: {e}") })
        }))
    }
}

/// Reads the sealed file list of a backup from a local, already verified copy.
pub fn open_files_list(
    path: &Path,
    opener: &crate::pipeline::Opener,
    expected: &crate::pipeline::Expected,
    what: &str,
) -> Result<PathBuf, RepoError> {
    let plain = path.with_extension("plain");
    let input = std::fs::File::open(path).map_err(|e| RepoError::Invalid(format!("cannot read {}: {e}", path.display())))?;
    let output = std::fs::File::create(&plain).map_err(|e| RepoError::Invalid(format!("cannot write {}: {e}", plain.display())))?;
    opener.open_stream(std::io::BufReader::new(input), std::io::BufWriter::new(output), expected).map_err(|e| match e {
        e if e.is_integrity() => RepoError::Integrity { object: what.to_string(), message: e.to_string() },
        e => RepoError::Seal(e),
    })?;
    Ok(plain)
}
