//! Kill points for the crash tests: `WALVAULT_TEST_CRASH_AT=<point>[:<nth>]`
//! makes the process die like `kill -9` (SIGKILL to itself, nothing unwinds,
//! nothing is flushed) the nth time (default the first) it reaches the named
//! `crash_point`. Read once, at the first call; unset, a call costs one atomic load.
//!
//! Points (each placed where a crash leaves the most interesting state behind):
//!
//! | point | where |
//! |---|---|
//! | `backup.pack_uploaded` | a pack and its index are stored, the manifest is not |
//! | `backup.files_sealed` | the backup's file list (and server manifest) are stored, before the WAL wait |
//! | `backup.wal_waited` | its WAL is all in the store, `manifest.json` is not written |
//! | `backup.manifest_written` | `manifest.json` is stored, the lock not yet released |
//! | `stream.segment_stored` | a streamed segment is stored, its streaming copy not yet removed |
//! | `stream.before_status` | a segment upload finished, the flush position not yet advanced or reported |
//! | `archive_push.stored` | archive-push stored its batch (or the background pusher a segment), markers not written, exit not yet reached |
//! | `archive_push.before_exit` | everything done, about to exit 0 |
//! | `expire.mid_delete` | between two delete batches of retention (after the manifests) |
//! | `restore.mid_write` | a restore has written part of a file |
//! | `archive_get.prefetch` | the prefetch worker stored a segment in its spool |
//!
//! The process prints `walvault: test crash point <point> reached` on stderr first,
//! so a test can tell a planned death from an accident. Test use only.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable naming the point.
pub const ENV: &str = "WALVAULT_TEST_CRASH_AT";

struct Target {
    point: String,
    nth: u64,
    seen: AtomicU64,
}

static TARGET: OnceLock<Option<Target>> = OnceLock::new();

fn target() -> &'static Option<Target> {
    TARGET.get_or_init(|| {
        let raw = std::env::var(ENV).ok()?;
        let raw = raw.trim();
        if raw.is_empty() {
            return None;
        }
        let (point, nth) = match raw.rsplit_once(':') {
            Some((p, n)) => (p, n.parse::<u64>().ok().filter(|n| *n > 0).unwrap_or(1)),
            None => (raw, 1),
        };
        Some(Target { point: point.to_string(), nth, seen: AtomicU64::new(0) })
    })
}

/// Dies here (SIGKILL) if `WALVAULT_TEST_CRASH_AT` names this point and this is its nth visit.
#[inline]
pub fn crash_point(name: &str) {
    let Some(t) = target() else { return };
    if t.point != name {
        return;
    }
    if t.seen.fetch_add(1, Ordering::SeqCst) + 1 == t.nth {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "walvault: test crash point {name} reached");
        // SAFETY: kill and getpid have no preconditions.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        std::process::abort();
    }
}
