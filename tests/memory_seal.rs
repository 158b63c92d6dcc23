//! Sealing and storing a 1 GiB stream keeps peak memory bounded: the stream
//! goes through fixed buffers and at most a few multipart parts, never whole.
//! Alone in its test binary so that the process's peak RSS is its own.

use std::io::Read;
use std::sync::Arc;

use walvault::pipeline::{Expected, Opener, Sealer, bridge};
use walvault::storage::{ObjectStore, fs::FileStore};

const GIB: u64 = 1 << 30;

/// 1 GiB of table-like, compressible but not trivial data, generated lazily.
struct Generated {
    left: u64,
    counter: u64,
}

impl Read for Generated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        for chunk in buf[..n].chunks_mut(16) {
            self.counter = self.counter.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let v = (self.counter >> 40).to_le_bytes();
            for (i, b) in chunk.iter_mut().enumerate() {
                *b = if i < 3 { v[i] } else { b' ' };
            }
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealing_and_storing_a_gibibyte_stays_under_64_mib() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(FileStore::new(dir.path()).unwrap());
    let id = age::x25519::Identity::generate();
    let sealer = Sealer::new(vec![id.to_public()], 3).unwrap();
    let opener = Opener::new(vec![id]).unwrap();

    let summary = bridge::seal_to_store(store.as_ref(), "big/object", &sealer, Generated { left: GIB, counter: 1 }, 4).await.unwrap();
    assert_eq!(summary.plain_len, GIB);
    let peak = peak_rss_kib();
    eprintln!("peak RSS after sealing and storing 1 GiB: {} MiB (stored {} MiB)", peak / 1024, summary.stored_len >> 20);
    assert!(peak < 64 * 1024, "peak RSS {} KiB is over 64 MiB", peak);

    // The stored object opens to the same plaintext (checked by hash, streaming).
    let stored = std::fs::File::open(dir.path().join("big/object")).unwrap();
    let expected = Expected { stored_hash: Some(summary.stored_hash), plain_hash: Some(summary.plain_hash), plain_len: Some(GIB) };
    let opened = tokio::task::spawn_blocking(move || opener.open_stream(std::io::BufReader::new(stored), std::io::sink(), &expected))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(opened.plain_hash, summary.plain_hash);
    assert!(peak_rss_kib() < 64 * 1024, "opening stays bounded too");
}
