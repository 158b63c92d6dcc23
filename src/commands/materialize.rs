//! Hidden test helper: `walvault materialize --backup ID --dest DIR` writes a
//! backup's files (and PostgreSQL's backup_manifest) into a directory without
//! configuring recovery, so tests can run pg_verifybackup on exactly what the
//! backup holds.

use super::Ctx;
use crate::cli::MaterializeArgs;
use crate::error::{Error, Result};
use crate::repo::catalog::Catalog;
use crate::repo::materialize::{MaterializeOptions, materialize};

pub async fn run(ctx: &Ctx, args: &MaterializeArgs) -> Result<i32> {
    let store = ctx.store().await?;
    let desc = ctx.reader_descriptor(&store).await?;
    let opener = ctx.opener()?;
    let catalog = Catalog::load(&store, &desc, ctx.config.repository.parallel).await?;
    let backup = catalog.backup(&args.backup).ok_or_else(|| Error::Usage(format!("no backup {} in the repository", args.backup)))?;
    let spool = ctx.config.spool_dir().join(format!("materialize-{}", std::process::id()));
    let opts = MaterializeOptions {
        dest: args.dest.clone(),
        tablespace_map: Default::default(),
        parallel: ctx.config.repository.parallel.max(2),
        spool: spool.clone(),
        owner: None,
        progress: None,
        verify_only: false,
        clear_dest: false,
    };
    let stats = materialize(&store, &desc, &opener, backup, &opts).await;
    let _ = std::fs::remove_dir_all(&spool);
    let stats = stats?;
    if let Some(sm) = &backup.server_manifest {
        let stream = store.get(&sm.key, None).await?;
        let expected = crate::pipeline::Expected {
            stored_hash: blake3::Hash::from_hex(&sm.stored_blake3).ok(),
            plain_hash: blake3::Hash::from_hex(&sm.plain_blake3).ok(),
            plain_len: Some(sm.plain_len),
        };
        crate::pipeline::bridge::open_to_file(stream, &opener, expected, &args.dest.join("backup_manifest"), 0o600).await?;
    }
    println!("{} files, {} bytes", stats.files, stats.bytes);
    Ok(0)
}
