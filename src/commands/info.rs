//! `walvault info [--json]`: backups, WAL ranges per timeline with gaps, the
//! recoverable window per timeline, the last archived segment and its age, and
//! the repository's size. The JSON is a stable interface (docs/JSON.md).

use serde_json::{Value, json};

use super::Ctx;
use crate::cli::InfoArgs;
use crate::error::Result;
use crate::pg::WalSegmentName;
use crate::pg::recovery::format_pg_time;
use crate::repo::catalog::Catalog;
use crate::repo::descriptor::LoadedDescriptor;
use crate::repo::layout;
use crate::repo::manifest::BackupManifest;
use crate::storage::{self, Store};
use crate::util::{human_bytes, human_duration};

pub const SCHEMA_VERSION: u32 = 1;

pub async fn run(ctx: &Ctx, args: &InfoArgs) -> Result<i32> {
    let store = ctx.store().await?;
    let desc = ctx.reader_descriptor(&store).await?;
    let catalog = Catalog::load(&store, &desc, ctx.config.repository.parallel).await?;
    let counts = ObjectCounts::load(&store).await?;
    let report = report(&store, &desc, &catalog, &counts);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).expect("json"));
    } else {
        print_human(&report);
    }
    Ok(0)
}

/// Objects in the repository, by kind, and their total size.
#[derive(Debug, Default, Clone, Copy, serde::Serialize, PartialEq, Eq)]
pub struct ObjectCounts {
    pub total: u64,
    pub bytes: u64,
    pub wal: u64,
    pub wal_bytes: u64,
    pub packs: u64,
    pub pack_bytes: u64,
    pub pack_indexes: u64,
    pub backup_objects: u64,
    pub other: u64,
}

impl ObjectCounts {
    pub async fn load(store: &Store) -> Result<ObjectCounts> {
        let mut c = ObjectCounts::default();
        for o in storage::list_all(store.as_ref(), "").await? {
            c.total += 1;
            c.bytes += o.size;
            if o.key.starts_with(layout::WAL_PREFIX) {
                c.wal += 1;
                c.wal_bytes += o.size;
            } else if o.key.starts_with(layout::PACK_PREFIX) && o.key.ends_with(".pack") {
                c.packs += 1;
                c.pack_bytes += o.size;
            } else if o.key.starts_with(layout::PACK_PREFIX) && o.key.ends_with(".idx") {
                c.pack_indexes += 1;
            } else if o.key.starts_with(layout::BACKUP_PREFIX) {
                c.backup_objects += 1;
            } else {
                c.other += 1;
            }
        }
        Ok(c)
    }
}

fn ratio(a: u64, b: u64) -> Value {
    if b == 0 { Value::Null } else { json!(((a as f64 / b as f64) * 100.0).round() / 100.0) }
}

/// A backup as info --json shows it (see docs/JSON.md).
pub fn backup_json(m: &BackupManifest) -> Value {
    json!({
        "id": m.backup_id,
        "label": m.label,
        "start_time": m.start_time,
        "end_time": m.end_time,
        "start_lsn": m.start_lsn,
        "end_lsn": m.end_lsn,
        "timeline": m.end_timeline,
        "pg_version": m.pg_version,
        "files": m.stats.files,
        "size_bytes": m.stats.bytes,
        "repository_bytes": m.stats.stored_referenced,
        "new_bytes": m.stats.stored_new,
        "new_raw_bytes": m.stats.bytes_new,
        "dedup_ratio": ratio(m.stats.bytes, m.stats.bytes_new),
        "compression_ratio": ratio(m.stats.bytes_new, m.stats.stored_new),
        "duration_ms": m.stats.duration_ms,
        "wal_first": m.wal_first,
        "wal_last": m.wal_last,
    })
}

pub fn report(store: &Store, desc: &LoadedDescriptor, catalog: &Catalog, counts: &ObjectCounts) -> Value {
    let d = &desc.descriptor;
    let now = chrono::Utc::now();
    let seg = catalog.seg_size;
    let gaps = catalog.gaps();
    let ranges = catalog.ranges();
    let restorable: std::collections::HashSet<String> =
        catalog.timelines().iter().flat_map(|t| catalog.windows(*t)).map(|w| w.backup_id).collect();
    let backups: Vec<Value> = catalog
        .backups
        .iter()
        .map(|b| {
            let mut v = backup_json(b);
            v["restorable"] = json!(restorable.contains(&b.backup_id));
            v
        })
        .collect();
    let timelines: Vec<Value> = catalog
        .timelines()
        .into_iter()
        .map(|tli| {
            let history = catalog.histories.get(&tli);
            let parent = history.and_then(|h| h.last()).map(|e| json!({"timeline": e.tli, "switch_lsn": e.switch_lsn}));
            let count = catalog.segments.get(&tli).map(|s| s.len()).unwrap_or(0);
            json!({
                "timeline": tli,
                "parent": parent,
                "segments": count,
                "wal_ranges": ranges.get(&tli).map(|r| r.iter().map(|(a, b)| json!({"first": a, "last": b})).collect::<Vec<_>>()).unwrap_or_default(),
                "gaps": gaps.get(&tli).map(|g| g.iter().map(|(a, b)| json!({
                    "first": WalSegmentName::new(tli, *a, seg).to_string(),
                    "last": WalSegmentName::new(tli, *b, seg).to_string(),
                    "segments": b - a + 1,
                })).collect::<Vec<_>>()).unwrap_or_default(),
                "in_progress": catalog.streaming.get(&tli).map(|(s, valid, at)| json!({
                    "segment": WalSegmentName::new(tli, *s, seg).to_string(),
                    "valid_bytes": valid,
                    "stored_at": at,
                })),
                "windows": catalog.windows(tli),
            })
        })
        .collect();
    let latest = catalog.latest_timeline();
    let window = latest.and_then(|t| {
        let w = catalog.windows(t);
        let (first, last) = (w.first()?, w.last()?);
        Some(json!({
            "timeline": t,
            "start_time": first.start_time,
            "start_lsn": first.start_lsn,
            "end_time": last.end_time,
            "end_lsn": last.end_lsn,
            "backup_id": first.backup_id,
        }))
    });
    let last = catalog
        .last_stored
        .iter()
        .map(|(tli, (segno, at))| (*at, WalSegmentName::new(*tli, *segno, seg).to_string()))
        .chain(catalog.streaming.iter().map(|(tli, (segno, _, at))| (*at, format!("{}.streaming", WalSegmentName::new(*tli, *segno, seg)))))
        .max();
    json!({
        "walvault_info": SCHEMA_VERSION,
        "generated_at": now,
        "repository": {
            "location": store.location(),
            "format_version": d.format_version,
            "system_identifier": d.cluster.system_identifier,
            "pg_version": d.cluster.pg_version,
            "pg_version_num": d.cluster.pg_version_num,
            "wal_segment_size": d.cluster.wal_segment_size,
            "signing_key": d.signing_key,
            "signing_key_pinned": desc.pinned,
            "descriptor_generation": d.generation,
            "size_bytes": counts.bytes,
            "objects": counts,
        },
        "backups": backups,
        "incomplete_backups": catalog.incomplete,
        "broken_backups": catalog.broken.iter().map(|(id, why)| json!({"id": id, "reason": why})).collect::<Vec<_>>(),
        "timelines": timelines,
        "recoverable_window": window,
        "last_archived": last.map(|(at, file)| json!({
            "file": file,
            "stored_at": at,
            "age_seconds": (now - at).num_seconds().max(0),
        })),
    })
}

fn print_human(r: &Value) {
    let repo = &r["repository"];
    println!(
        "repository  {} (format {}), cluster {}, PostgreSQL {}, {} WAL segments",
        repo["location"].as_str().unwrap_or(""),
        repo["format_version"],
        repo["system_identifier"].as_str().unwrap_or(""),
        repo["pg_version"].as_str().unwrap_or(""),
        human_bytes(repo["wal_segment_size"].as_u64().unwrap_or(0))
    );
    println!("            {} objects, {}", repo["objects"]["total"], human_bytes(repo["size_bytes"].as_u64().unwrap_or(0)));
    println!();
    let backups = r["backups"].as_array().cloned().unwrap_or_default();
    if backups.is_empty() {
        println!("backups     none");
    } else {
        println!("backups");
        println!(
            "  {:<18} {:<20} {:<12} {:>4} {:>10} {:>10} {:>10} {:>9}  LABEL",
            "ID", "END (UTC)", "END LSN", "TLI", "SIZE", "NEW", "STORED", "TOOK"
        );
        for b in &backups {
            let end: Option<chrono::DateTime<chrono::Utc>> = serde_json::from_value(b["end_time"].clone()).ok();
            println!(
                "  {:<18} {:<20} {:<12} {:>4} {:>10} {:>10} {:>10} {:>9}  {}{}",
                b["id"].as_str().unwrap_or(""),
                end.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_default(),
                b["end_lsn"].as_str().unwrap_or(""),
                b["timeline"],
                human_bytes(b["size_bytes"].as_u64().unwrap_or(0)),
                human_bytes(b["new_bytes"].as_u64().unwrap_or(0)),
                human_bytes(b["repository_bytes"].as_u64().unwrap_or(0)),
                human_duration(std::time::Duration::from_millis(b["duration_ms"].as_u64().unwrap_or(0))),
                b["label"].as_str().unwrap_or(""),
                if b["restorable"].as_bool() == Some(false) { "  (NOT RESTORABLE: WAL missing)" } else { "" },
            );
        }
    }
    for id in r["incomplete_backups"].as_array().into_iter().flatten() {
        println!("  {} incomplete (interrupted or running; not restorable)", id.as_str().unwrap_or(""));
    }
    for b in r["broken_backups"].as_array().into_iter().flatten() {
        println!("  {} BROKEN: {}", b["id"].as_str().unwrap_or(""), b["reason"].as_str().unwrap_or(""));
    }
    println!();
    println!("WAL");
    for t in r["timelines"].as_array().into_iter().flatten() {
        let ranges: Vec<String> = t["wal_ranges"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| format!("{} - {}", x["first"].as_str().unwrap_or(""), x["last"].as_str().unwrap_or("")))
            .collect();
        println!(
            "  timeline {}: {} segments{}",
            t["timeline"],
            t["segments"],
            if ranges.is_empty() { String::new() } else { format!(", {}", ranges.join(", ")) }
        );
        for g in t["gaps"].as_array().into_iter().flatten() {
            println!(
                "    GAP: {} - {} ({} segments missing)",
                g["first"].as_str().unwrap_or(""),
                g["last"].as_str().unwrap_or(""),
                g["segments"]
            );
        }
        if let Some(p) = t["in_progress"].as_object() {
            println!("    in progress: {} ({})", p["segment"].as_str().unwrap_or(""), human_bytes(p["valid_bytes"].as_u64().unwrap_or(0)));
        }
    }
    println!();
    match r["recoverable_window"].as_object() {
        Some(w) => {
            let t = |v: &Value| {
                serde_json::from_value::<chrono::DateTime<chrono::Utc>>(v.clone()).map(|t| format_pg_time(&t)).unwrap_or("?".into())
            };
            println!(
                "recoverable window (timeline {}): {} ({}) to {} ({})",
                w["timeline"],
                t(&w["start_time"]),
                w["start_lsn"].as_str().unwrap_or(""),
                t(&w["end_time"]),
                w["end_lsn"].as_str().unwrap_or("")
            );
        }
        None => println!("recoverable window: none (no backup with its WAL)"),
    }
    if let Some(l) = r["last_archived"].as_object() {
        println!(
            "last archived: {}, {} ago",
            l["file"].as_str().unwrap_or(""),
            human_duration(std::time::Duration::from_secs(l["age_seconds"].as_u64().unwrap_or(0)))
        );
    }
}
