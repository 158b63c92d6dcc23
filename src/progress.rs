//! Progress for long operations (backup, restore, verify): a bar with bytes,
//! rate and ETA on a terminal; a plain log line every 10 s otherwise (or with
//! JSON logs), so unattended runs are not filled with terminal noise.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

const LOG_EVERY: Duration = Duration::from_secs(10);

pub struct Progress {
    label: String,
    total: AtomicU64,
    done: AtomicU64,
    bar: Option<ProgressBar>,
    started: Instant,
    last_log: Mutex<Instant>,
}

impl Progress {
    /// `total` may be unknown (0) and set later.
    pub fn new(label: &str, total: u64) -> Progress {
        let interactive =
            std::io::stderr().is_terminal() && !crate::logging::json_logs() && std::env::var_os("WALVAULT_NO_PROGRESS").is_none();
        let bar = interactive.then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(4));
            bar.set_style(style(total > 0));
            bar.set_message(label.to_string());
            bar
        });
        Progress {
            label: label.to_string(),
            total: AtomicU64::new(total),
            done: AtomicU64::new(0),
            bar,
            started: Instant::now(),
            last_log: Mutex::new(Instant::now()),
        }
    }

    pub fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        if let Some(b) = &self.bar {
            b.set_style(style(total > 0));
            b.set_length(total);
        }
    }

    /// Records progress (bytes done so far).
    pub fn set(&self, done: u64) {
        self.done.store(done, Ordering::Relaxed);
        if let Some(b) = &self.bar {
            b.set_position(done);
            return;
        }
        let mut last = self.last_log.lock().unwrap();
        if last.elapsed() >= LOG_EVERY {
            *last = Instant::now();
            let total = self.total.load(Ordering::Relaxed);
            let rate = done as f64 / self.started.elapsed().as_secs_f64().max(0.001);
            if total > 0 {
                tracing::info!(
                    "{}: {} of {} ({:.0}%), {}/s",
                    self.label,
                    crate::util::human_bytes(done),
                    crate::util::human_bytes(total),
                    done as f64 * 100.0 / total as f64,
                    crate::util::human_bytes(rate as u64)
                );
            } else {
                tracing::info!("{}: {}, {}/s", self.label, crate::util::human_bytes(done), crate::util::human_bytes(rate as u64));
            }
        }
    }

    pub fn add(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        self.set(done);
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// A bar with the total and ETA when the total is known; bytes and rate otherwise.
fn style(known_total: bool) -> ProgressStyle {
    let color = crate::logging::use_color();
    let template = match (known_total, color) {
        (true, true) => "{msg:>10.bold} [{bar:30.cyan/blue}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        (true, false) => "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        (false, true) => "{msg:>10.bold} {spinner} {bytes} {bytes_per_sec} {elapsed}",
        (false, false) => "{msg:>10} {spinner} {bytes} {bytes_per_sec} {elapsed}",
    };
    ProgressStyle::with_template(template).expect("valid template").progress_chars("=> ")
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
