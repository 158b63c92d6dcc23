//! Alerts: `alerts.command` is run through `sh -c` with one JSON event on its
//! standard input when something fails (a backup, retention, streaming), WAL
//! waits longer than `alerts.wal_lag`, the slot retains more WAL than
//! `daemon.slot_warn_bytes`, or the WAL has a gap. The same kind is sent at
//! most every 10 minutes. The event's fields are documented in docs/JSON.md.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::DaemonState;
use crate::commands::Ctx;
use crate::util::human_bytes;

const REPEAT_AFTER: chrono::Duration = chrono::Duration::minutes(10);

/// Logs the alert and, unless the same kind was sent lately, runs the alert
/// command in the background (a slow command never holds up the daemon).
pub fn raise(ctx: &Ctx, state: &Arc<Mutex<DaemonState>>, kind: &str, message: &str, details: serde_json::Value) {
    tracing::warn!(alert = kind, "{message}");
    let command = ctx.config.alerts.command.trim().to_string();
    if command.is_empty() {
        return;
    }
    {
        let mut st = state.lock().unwrap();
        let now = chrono::Utc::now();
        if st.alerts_sent.get(kind).is_some_and(|t| now - *t < REPEAT_AFTER) {
            return;
        }
        st.alerts_sent.insert(kind.to_string(), now);
    }
    let event = serde_json::json!({
        "walvault_event": 1,
        "event": kind,
        "message": message,
        "time": chrono::Utc::now(),
        "host": std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim(),
        "repository": ctx.config.repository.url,
        "details": details,
    });
    let kind = kind.to_string();
    tokio::spawn(async move {
        let run = async {
            let mut child = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(&command)
                .stdin(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            if let Some(mut stdin) = child.stdin.take() {
                // A command that does not read its input is not an error.
                let _ = stdin.write_all(event.to_string().as_bytes()).await;
                let _ = stdin.write_all(b"\n").await;
            }
            child.wait().await
        };
        match tokio::time::timeout(Duration::from_secs(30), run).await {
            Ok(Ok(s)) if s.success() => tracing::info!(alert = %kind, "alert command ran"),
            Ok(Ok(s)) => tracing::error!(alert = %kind, status = %s, "the alert command failed"),
            Ok(Err(e)) => tracing::error!(alert = %kind, error = %e, "cannot run the alert command"),
            Err(_) => tracing::error!(alert = %kind, "the alert command did not finish within 30s; killed it"),
        }
    });
}

/// Runs on every tick: alerts on WAL lag over the threshold, and warns each
/// time the WAL the slot retains doubles past `daemon.slot_warn_bytes`.
pub fn watch(ctx: &Ctx, state: &Arc<Mutex<DaemonState>>) {
    let now = chrono::Utc::now();
    let (bytes, seconds, retained, crossed) = {
        let mut st = state.lock().unwrap();
        let (bytes, seconds) = st.lag(now);
        let retained = st.slot_retained(now);
        let warn = ctx.config.daemon.slot_warn_bytes.max(1);
        // Level k means retained >= warn * 2^(k-1).
        let level = if retained < warn { 0 } else { 1 + (retained / warn).ilog2() };
        let crossed = level > st.slot_warn_level;
        if level == 0 && st.slot_warn_level > 0 {
            tracing::info!(retained = %human_bytes(retained), "the WAL the replication slot retains is back under daemon.slot_warn_bytes");
        }
        st.slot_warn_level = level;
        (bytes, seconds, retained, crossed)
    };
    if crossed {
        let msg = format!(
            "the replication slot '{}' makes the server keep {} of WAL (warning at {}): pg_wal grows until walvault stores it",
            ctx.config.postgres.slot,
            human_bytes(retained),
            human_bytes(ctx.config.daemon.slot_warn_bytes)
        );
        raise(ctx, state, "slot_retained", &msg, serde_json::json!({"retained_bytes": retained}));
    }
    if seconds > ctx.config.alerts.wal_lag.as_secs_f64() {
        let msg = format!("{} of WAL has waited {seconds:.0}s to reach the repository", human_bytes(bytes));
        raise(ctx, state, "wal_lag", &msg, serde_json::json!({"lag_bytes": bytes, "lag_seconds": seconds}));
    }
}
