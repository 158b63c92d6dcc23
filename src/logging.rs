//! One tracing subscriber, set up once: text or JSON lines on stderr. Colors only
//! on a terminal and never with NO_COLOR. `WALVAULT_LOG` takes a filter
//! (`debug`, `walvault=trace,aws_smithy_runtime=warn`) and overrides -v/-q.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

static JSON: AtomicBool = AtomicBool::new(false);

/// Whether logs are JSON lines (then no progress bars either).
pub fn json_logs() -> bool {
    JSON.load(Ordering::Relaxed)
}

pub fn init(format: LogFormat, verbose: u8, quiet: bool) {
    JSON.store(format == LogFormat::Json, Ordering::Relaxed);
    let level = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    // The AWS SDK is chatty at info; keep it at warn unless asked.
    let default = format!("{level},aws_config=warn,aws_smithy_runtime=warn,aws_sdk_s3=warn,hyper=warn,rustls=warn");
    let filter = std::env::var("WALVAULT_LOG").ok().filter(|s| !s.is_empty()).unwrap_or(default);
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    let _ = match format {
        LogFormat::Json => builder.json().with_current_span(false).flatten_event(true).try_init(),
        LogFormat::Text => builder.with_ansi(use_color()).try_init(),
    };
}

/// Colors only on a terminal, and never when NO_COLOR is set (https://no-color.org).
pub fn use_color() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}
