//! Object keys of the repository (format version 1). docs/REPOSITORY.md
//! describes the same layout; change both together.

/// The signed repository descriptor.
pub const DESCRIPTOR: &str = "walvault.json";
/// Timeline history files.
pub const HISTORY_PREFIX: &str = "wal/history/";
pub const WAL_PREFIX: &str = "wal/";
pub const PACK_PREFIX: &str = "packs/";
pub const BACKUP_PREFIX: &str = "backups/";
pub const LOCK_PREFIX: &str = "locks/";
/// Probe objects written by init to learn what the store supports.
pub const PROBE_PREFIX: &str = "probe/";

/// The directory of a WAL file: timeline and log number (the first 16 hex digits).
pub fn wal_dir(file_name: &str) -> &str {
    &file_name[..16.min(file_name.len())]
}

/// Key of a WAL segment, `.partial`, `.backup` or streaming copy (not history files).
pub fn wal_key(file_name: &str) -> String {
    format!("{WAL_PREFIX}{}/{file_name}", wal_dir(file_name))
}

pub fn history_key(tli: u32) -> String {
    format!("{HISTORY_PREFIX}{tli:08X}.history")
}

pub fn pack_key(pack_id: &str) -> String {
    format!("{PACK_PREFIX}{}/{pack_id}.pack", &pack_id[..2])
}

pub fn pack_index_key(pack_id: &str) -> String {
    format!("{PACK_PREFIX}{}/{pack_id}.idx", &pack_id[..2])
}

pub fn backup_prefix(backup_id: &str) -> String {
    format!("{BACKUP_PREFIX}{backup_id}/")
}

/// The signed public manifest of a backup; written last.
pub fn backup_manifest_key(backup_id: &str) -> String {
    format!("{BACKUP_PREFIX}{backup_id}/manifest.json")
}

/// The sealed file list of a backup.
pub fn backup_files_key(backup_id: &str) -> String {
    format!("{BACKUP_PREFIX}{backup_id}/files.sealed")
}

/// The sealed copy of the server's own backup_manifest.
pub fn backup_server_manifest_key(backup_id: &str) -> String {
    format!("{BACKUP_PREFIX}{backup_id}/backup_manifest.sealed")
}

pub fn lock_key(name: &str) -> String {
    format!("{LOCK_PREFIX}{name}.lock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert_eq!(wal_key("000000010000000200000003"), "wal/0000000100000002/000000010000000200000003");
        assert_eq!(wal_key("000000010000000200000003.00000028.backup"), "wal/0000000100000002/000000010000000200000003.00000028.backup");
        assert_eq!(history_key(10), "wal/history/0000000A.history");
        assert_eq!(pack_key("ab12"), "packs/ab/ab12.pack");
    }
}
