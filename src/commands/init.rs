//! `walvault init`: creates the repository for this cluster. Idempotent: a
//! second run changes nothing (or only updates changed recipients). Refuses a
//! repository that belongs to another cluster, naming both system identifiers.

use bytes::Bytes;

use super::Ctx;
use crate::error::{Error, Result};
use crate::pg::conn::{Connection, Mode};
use crate::pg::conninfo::ConnParams;
use crate::pg::lsn::parse_show_size;
use crate::pipeline::Sealer;
use crate::repo::descriptor::ClusterInfo;
use crate::repo::{Descriptor, RepoError, layout};
use crate::storage::{CreateOutcome, ObjectStore};

pub async fn run(ctx: &Ctx) -> Result<i32> {
    let key = ctx.signing_key()?;
    let sealer = Sealer::new(ctx.recipients()?, ctx.config.compression.level)?;
    let cluster = cluster_info(ctx).await?;
    let store = ctx.store().await?;
    let location = store.location();

    match Descriptor::load(store.as_ref(), Some(key.public())).await {
        Ok(loaded) => {
            let current = &loaded.descriptor;
            current.check_cluster(&location, &cluster.system_identifier)?;
            if current.cluster.major() != cluster.major() {
                return Err(Error::with_hint(
                    format!(
                        "the repository at {location} holds PostgreSQL {} backups, the server runs PostgreSQL {}",
                        current.cluster.major(),
                        cluster.major()
                    ),
                    "after pg_upgrade, the system identifier changes too: use a new repository.url (or prefix) for the upgraded cluster",
                ));
            }
            let wanted: Vec<String> = sealer.recipients().iter().map(|r| r.to_string()).collect();
            if wanted == current.recipients {
                println!("repository {location} is already initialized for this cluster; nothing changed");
                return Ok(0);
            }
            let mut next = Descriptor::new(current.cluster.clone(), &key, &sealer, current.store.conditional_create)?;
            next.created_at = current.created_at;
            next.generation = current.generation + 1;
            next.previous = Some(loaded.hash.to_hex().to_string());
            next.replace(store.as_ref(), &key).await?;
            println!("repository {location}: recipients updated (descriptor generation {})", next.generation);
            println!("note: existing objects stay sealed to the recipients they were written for");
            Ok(0)
        }
        Err(RepoError::NotInitialized { .. }) => {
            let conditional = probe_conditional_create(store.as_ref()).await?;
            if !conditional {
                tracing::warn!(
                    "the store ignores conditional writes (If-None-Match); locks will verify ownership after a settle delay (docs/REPOSITORY.md)"
                );
            }
            let desc = Descriptor::new(cluster, &key, &sealer, conditional)?;
            match desc.create(store.as_ref(), &key).await? {
                CreateOutcome::Created => {}
                CreateOutcome::AlreadyExists => {
                    // Another init won the race; accept it if it is for this cluster.
                    let loaded = Descriptor::load(store.as_ref(), Some(key.public())).await?;
                    loaded.descriptor.check_cluster(&location, &desc.cluster.system_identifier)?;
                }
            }
            print_summary(&location, &desc);
            Ok(0)
        }
        Err(RepoError::UntrustedSigner { signer, .. }) => Err(Error::with_hint(
            format!("the repository at {location} was initialized by another agent key ({signer})"),
            "use that agent's key file (signing.key_file), or a new repository.url for this agent",
        )),
        Err(e) => Err(e.into()),
    }
}

fn print_summary(location: &str, d: &Descriptor) {
    println!("initialized repository {location}");
    println!("  cluster:            system identifier {}, PostgreSQL {}", d.cluster.system_identifier, d.cluster.pg_version);
    println!("  WAL segment size:   {}", crate::util::human_bytes(d.cluster.wal_segment_size));
    println!("  signing key:        {}", d.signing_key);
    println!("  recipients:         {}", d.recipients.join(", "));
    println!("  conditional writes: {}", if d.store.conditional_create { "supported" } else { "ignored by the store" });
}

/// Reads what the repository must know of the cluster over a replication connection.
pub async fn cluster_info(ctx: &Ctx) -> Result<ClusterInfo> {
    let params = ConnParams::parse(&ctx.config.postgres.conninfo)?;
    let mut conn = Connection::connect(&params, Mode::Replication).await?;
    let sys = conn.identify_system().await?;
    let seg = conn.show("wal_segment_size").await?;
    let wal_segment_size =
        parse_show_size(&seg).ok_or_else(|| Error::failed(format!("cannot read wal_segment_size from the server ('{seg}')")))?;
    let wal_block_size = conn.show("wal_block_size").await?.trim().parse().unwrap_or(8192);
    let block_size = conn.show("block_size").await?.trim().parse().unwrap_or(8192);
    let info = ClusterInfo {
        system_identifier: sys.system_identifier.to_string(),
        pg_version_num: conn.server_version_num(),
        pg_version: conn.parameter("server_version").unwrap_or("").to_string(),
        wal_segment_size,
        wal_block_size,
        block_size,
    };
    let _ = conn.close().await;
    if !(13..=18).contains(&info.major()) {
        tracing::warn!(version = %info.pg_version, "walvault is tested with PostgreSQL 13 to 18");
    }
    Ok(info)
}

/// Learns whether the store honours If-None-Match: a second conditional create
/// of the same key must be refused and must not replace the first object.
async fn probe_conditional_create(store: &dyn ObjectStore) -> Result<bool> {
    let key = format!("{}{:016x}", layout::PROBE_PREFIX, rand::random::<u64>());
    let first = store.put_if_absent(&key, Bytes::from_static(b"first")).await?;
    let second = store.put_if_absent(&key, Bytes::from_static(b"second")).await?;
    let kept = crate::storage::get_bytes(store, &key, None).await?;
    store.delete_many(std::slice::from_ref(&key)).await?;
    Ok(first == CreateOutcome::Created && second == CreateOutcome::AlreadyExists && kept.as_ref() == b"first")
}
