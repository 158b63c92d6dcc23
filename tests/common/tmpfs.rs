//! Small tmpfs mounts for full-disk and read-only faults. Mounting needs root
//! (as CI runs the tests); as another user the tests that use them fail, saying so.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::env::postgres_ids;

/// A tmpfs of a given size mounted on a directory, owned by postgres;
/// unmounted on drop.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        assert_eq!(unsafe { libc::geteuid() }, 0, "the full-disk tests mount tmpfs and need root (CI runs as root)");
        std::fs::create_dir_all(dir).unwrap();
        let (uid, gid) = postgres_ids().expect("a postgres user");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755,uid={uid},gid={gid}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "cannot mount a tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }

    pub fn resize(&self, size: &str) {
        let ok = Command::new("mount").args(["-o", &format!("remount,size={size}")]).arg(&self.0).status().unwrap().success();
        assert!(ok, "cannot resize the tmpfs on {}", self.0.display());
    }

    pub fn remount_read_only(&self, ro: bool) {
        let ok = Command::new("mount").args(["-o", if ro { "remount,ro" } else { "remount,rw" }]).arg(&self.0).status().unwrap().success();
        assert!(ok);
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
