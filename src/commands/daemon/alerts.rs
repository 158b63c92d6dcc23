//! Alerts: `alerts.command` is run through `sh -c` with one JSON event on its
//! standard input when something fails (a backup, retention, streaming) or WAL
//! lags more than `alerts.wal_lag`. The same kind is sent at most every 10 minutes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::DaemonState;
use crate::commands::Ctx;

const REPEAT_AFTER: chrono::Duration = chrono::Duration::minutes(10);

pub async fn raise(ctx: &Ctx, state: &Arc<Mutex<DaemonState>>, kind: &str, message: &str, details: serde_json::Value) {
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
        "event": kind,
        "message": message,
        "time": chrono::Utc::now(),
        "host": std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim(),
        "repository": ctx.config.repository.url,
        "details": details,
    });
    let run = async {
        let mut child = tokio::process::Command::new("sh").arg("-c").arg(&command).stdin(std::process::Stdio::piped()).spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(event.to_string().as_bytes()).await?;
            stdin.write_all(b"\n").await?;
        }
        let status = child.wait().await?;
        Ok::<_, std::io::Error>(status)
    };
    match tokio::time::timeout(Duration::from_secs(30), run).await {
        Ok(Ok(s)) if s.success() => tracing::info!(alert = kind, "alert command ran"),
        Ok(Ok(s)) => tracing::error!(alert = kind, status = %s, "the alert command failed"),
        Ok(Err(e)) => tracing::error!(alert = kind, error = %e, "cannot run the alert command"),
        Err(_) => tracing::error!(alert = kind, "the alert command did not finish within 30s"),
    }
}

/// Alerts on WAL lag over the threshold, and warns when the slot retains much WAL.
pub async fn watch_lag(ctx: &Ctx, state: &Arc<Mutex<DaemonState>>) {
    let (bytes, seconds) = state.lock().unwrap().lag();
    if bytes > ctx.config.daemon.slot_warn_bytes {
        tracing::warn!(retained = %crate::util::human_bytes(bytes), "the replication slot retains much WAL that is not in the repository yet; pg_wal grows until it is");
    }
    if seconds > ctx.config.alerts.wal_lag.as_secs_f64() {
        let msg = format!("{} of WAL has waited {seconds:.0}s to reach the repository", crate::util::human_bytes(bytes));
        raise(ctx, state, "wal_lag", &msg, serde_json::json!({"lag_bytes": bytes, "lag_seconds": seconds})).await;
    }
}
