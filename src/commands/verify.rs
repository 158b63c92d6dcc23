//! `walvault verify`: the audit report (docs/JSON.md for the JSON schema).
//! Exit 0 only if everything is intact.

use std::time::Instant;

use serde_json::json;

use super::Ctx;
use crate::cli::VerifyArgs;
use crate::error::{Error, Result, exit};
use crate::pg::recovery::parse_time;
use crate::repo::catalog::Catalog;
use crate::repo::verify::{VerifyOptions, verify};
use crate::util::{human_bytes, human_duration};

pub const SCHEMA_VERSION: u32 = 1;

pub async fn run(ctx: &Ctx, args: &VerifyArgs) -> Result<i32> {
    let started = Instant::now();
    let started_at = chrono::Utc::now();
    let since = match &args.since {
        Some(t) => Some(parse_time(t).map_err(Error::Usage)?.instant),
        None => None,
    };
    let store = ctx.store().await?;
    let desc = match ctx.reader_descriptor(&store).await {
        Ok(d) => d,
        Err(e) => {
            // A descriptor that does not verify is the audit's first finding.
            let report = json!({
                "walvault_verify": SCHEMA_VERSION,
                "ok": false,
                "started_at": started_at,
                "problems": [{"kind": "bad_descriptor", "key": crate::repo::layout::DESCRIPTOR, "message": e.to_string()}],
            });
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report).expect("json"));
            } else {
                println!("FAILED: {e}");
            }
            return Ok(exit::INTEGRITY);
        }
    };
    let opener = if args.deep { Some(ctx.opener()?) } else { None };
    let catalog = Catalog::load(&store, &desc, ctx.config.repository.parallel).await?;
    let opts = VerifyOptions {
        deep: opener,
        backup: args.backup.clone(),
        since,
        parallel: ctx.config.repository.parallel.max(2) * 2,
        progress: None,
    };
    let outcome = verify(&store, &desc, &catalog, &opts).await?;
    let elapsed = started.elapsed();
    let ok = outcome.problems.is_empty();
    let report = json!({
        "walvault_verify": SCHEMA_VERSION,
        "ok": ok,
        "deep": args.deep,
        "started_at": started_at,
        "duration_ms": elapsed.as_millis() as u64,
        "repository": store.location(),
        "system_identifier": desc.descriptor.cluster.system_identifier,
        "trusted_key": desc.trusted_key.to_string(),
        "trusted_key_fingerprint": desc.trusted_key.fingerprint(),
        "key_pinned": desc.pinned,
        "descriptor_generation": desc.descriptor.generation,
        "backups_checked": outcome.backups.len(),
        "wal_segments_checked": outcome.wal_segments,
        "objects_checked": outcome.checked,
        "bytes_read": outcome.checked.bytes_read,
        "backups": outcome.backups,
        "problems": outcome.problems,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).expect("json"));
    } else {
        println!(
            "verified {} with key {} ({}){}",
            store.location(),
            desc.trusted_key,
            desc.trusted_key.fingerprint(),
            if desc.pinned { "" } else { " -- NOT PINNED: set signing.public_key to the key you expect" }
        );
        println!(
            "  {} objects ({} WAL, {} packs, {} pack indexes, {} backup objects), {} read in {} ({}/s){}",
            outcome.checked.total,
            outcome.checked.wal,
            outcome.checked.packs,
            outcome.checked.pack_indexes,
            outcome.checked.backup_objects,
            human_bytes(outcome.checked.bytes_read),
            human_duration(elapsed),
            human_bytes((outcome.checked.bytes_read as f64 / elapsed.as_secs_f64().max(0.001)) as u64),
            if args.deep { ", decrypted and checked in depth" } else { "" }
        );
        for b in &outcome.backups {
            if b.restorable {
                println!("  backup {}: restorable", b.id);
            } else {
                println!("  backup {}: NOT restorable", b.id);
                for r in &b.reasons {
                    println!("    - {r}");
                }
            }
        }
        if ok {
            println!("OK: every object is present and matches its signed checksum");
        } else {
            println!("FAILED: {} problems", outcome.problems.len());
            for p in &outcome.problems {
                println!("  [{}] {}: {}", p.kind, p.key, p.message);
            }
        }
    }
    Ok(if ok { 0 } else { exit::INTEGRITY })
}
