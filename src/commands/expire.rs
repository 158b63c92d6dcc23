//! `walvault expire [--dry-run]`: applies retention (docs/REPOSITORY.md,
//! "Retention") under the backup lock, so it never races a running backup.

use super::Ctx;
use crate::cli::ExpireArgs;
use crate::error::{Error, Result};
use crate::repo::catalog::Catalog;
use crate::repo::lock::{LockOptions, RepoLock};
use crate::repo::retention::{self, Plan, Policy};
use crate::storage::{self, Store};
use crate::util::human_bytes;

pub async fn run(ctx: &Ctx, args: &ExpireArgs) -> Result<i32> {
    let store = ctx.store().await?;
    let plan = expire(ctx, &store, args.dry_run).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"dry_run": args.dry_run, "plan": plan})).expect("json"));
        return Ok(0);
    }
    let verb = if args.dry_run { "would delete" } else { "deleted" };
    for id in &plan.expired_backups {
        println!("{verb} backup {id}");
    }
    for id in &plan.incomplete_backups {
        println!("{verb} incomplete backup {id}");
    }
    println!(
        "{verb} {} objects ({} WAL files, {} packs), {}; kept {} backups",
        plan.objects(),
        plan.wal.len(),
        plan.packs.len(),
        human_bytes(plan.bytes),
        plan.kept_backups.len()
    );
    Ok(0)
}

pub fn policy(ctx: &Ctx) -> Policy {
    let r = &ctx.config.retention;
    Policy { full_backups: r.full_backups, window_days: r.window_days, min_backups: r.min_backups }
}

/// Plans and (unless `dry_run`) carries out retention; the daemon calls this after each backup.
pub async fn expire(ctx: &Ctx, store: &Store, dry_run: bool) -> Result<Plan> {
    let key = ctx.signing_key()?;
    let desc = ctx.agent_descriptor(store, &key).await?;
    let opts = LockOptions { conditional_create: desc.descriptor.store.conditional_create, ..Default::default() };
    let lock = RepoLock::acquire(store.clone(), "backup", "retention (expire)", &opts).await.map_err(super::backup::lock_error)?;
    let result = async {
        let catalog = Catalog::load(store, &desc, ctx.config.repository.parallel).await?;
        if !catalog.broken.is_empty() {
            // A manifest that does not verify may be a backup we must keep: stop.
            return Err(Error::with_hint(
                format!(
                    "backup {} has a manifest that does not verify ({}); not deleting anything",
                    catalog.broken[0].0, catalog.broken[0].1
                ),
                "run `walvault verify` and resolve it first",
            ));
        }
        let objects = storage::list_all(store.as_ref(), "").await?;
        let plan = retention::plan(&catalog, &policy(ctx), &objects, chrono::Utc::now());
        if dry_run {
            return Ok(plan);
        }
        for batch in [&plan.manifests, &plan.backup_objects, &plan.wal, &plan.pack_indexes, &plan.packs] {
            for keys in batch.chunks(1000) {
                if lock.is_lost() {
                    return Err(Error::failed("the lock was taken by another process; stopping retention"));
                }
                store.delete_many(keys).await?;
                crate::crashpoint::crash_point("expire.mid_delete");
            }
        }
        // Multipart uploads abandoned for a day belong to crashed writers.
        let cutoff = chrono::Utc::now() - chrono::Duration::days(1);
        for u in store.list_multipart("").await? {
            if u.initiated.is_some_and(|t| t < cutoff) {
                let upload = storage::MultipartUpload { key: u.key.clone(), upload_id: u.upload_id.clone() };
                if let Err(e) = store.abort_multipart(&upload).await {
                    tracing::warn!(key = %u.key, error = %e, "could not abort an abandoned multipart upload");
                }
            }
        }
        tracing::info!(
            expired = plan.expired_backups.len(),
            objects = plan.objects(),
            freed = %human_bytes(plan.bytes),
            kept = plan.kept_backups.len(),
            "retention applied"
        );
        Ok(plan)
    }
    .await;
    if let Err(e) = lock.release().await {
        tracing::warn!(error = %e, "could not release the lock; it expires by itself");
    }
    result
}
