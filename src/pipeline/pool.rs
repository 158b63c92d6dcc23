//! A bounded pool for CPU-heavy work (zstd, age, blake3): as many tasks at once
//! as there are cores, run on tokio's blocking threads, so async I/O keeps
//! flowing while the cores compress and encrypt.

use std::sync::{Arc, OnceLock};

use tokio::sync::Semaphore;

#[derive(Clone)]
pub struct CpuPool {
    permits: Arc<Semaphore>,
    size: usize,
}

impl CpuPool {
    pub fn new(size: usize) -> Self {
        let size = size.max(1);
        CpuPool { permits: Arc::new(Semaphore::new(size)), size }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Runs `f` on a blocking thread once a core is free.
    pub async fn run<T, F>(&self, f: F) -> T
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let _permit = self.permits.clone().acquire_owned().await.expect("cpu pool semaphore is never closed");
        match tokio::task::spawn_blocking(f).await {
            Ok(v) => v,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("cpu task cancelled: {e}"),
        }
    }
}

/// The process-wide pool, sized to the available cores.
pub fn cpu_pool() -> &'static CpuPool {
    static POOL: OnceLock<CpuPool> = OnceLock::new();
    POOL.get_or_init(|| CpuPool::new(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)))
}
