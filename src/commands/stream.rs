//! `walvault stream`: WAL streaming alone, in the foreground, until SIGINT or
//! SIGTERM (or `--until LSN` is stored).

use std::sync::Arc;

use super::Ctx;
use crate::cli::StreamArgs;
use crate::error::{Error, Result};
use crate::pg::conninfo::ConnParams;
use crate::pg::streamer::{self, StreamerSettings};

pub async fn run(ctx: &Ctx, args: &StreamArgs) -> Result<i32> {
    let stop_at = match &args.until {
        Some(l) => Some(l.parse().map_err(|e: crate::pg::lsn::LsnParseError| Error::Usage(e.to_string()))?),
        None => None,
    };
    let params = ConnParams::parse(&ctx.config.postgres.conninfo)?;
    let archive = Arc::new(ctx.wal_writer(ctx.store().await?).await?);
    let settings = settings(ctx, stop_at);
    let state = Arc::new(std::sync::Mutex::new(Default::default()));
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("stopping: storing what was received");
        let _ = tx.send(true);
    });
    streamer::run(params, archive, settings, state, rx).await?;
    Ok(0)
}

pub fn settings(ctx: &Ctx, stop_at: Option<crate::pg::Lsn>) -> StreamerSettings {
    StreamerSettings {
        slot: ctx.config.postgres.slot.clone(),
        application_name: ctx.config.postgres.application_name.clone(),
        status_interval: ctx.config.wal.status_interval,
        partial_interval: ctx.config.wal.partial_interval,
        synchronous: ctx.config.wal.synchronous,
        stop_at,
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
