//! `walvault verify`: the audit report, as text or as JSON (docs/JSON.md,
//! `## verify --json`). Exit 0 only if everything is intact; 6 when the
//! repository is not (a problem list says what and where).

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::Ctx;
use crate::cli::VerifyArgs;
use crate::error::{Error, Result, exit};
use crate::pg::recovery::parse_time;
use crate::repo::descriptor::{Descriptor, LoadedDescriptor};
use crate::repo::verify::{self, BackupVerdict, Changes, Checked, DeepChecked, Inventory, Problem, VerifyOptions};
use crate::repo::{RepoError, layout};
use crate::storage::{self, Store};
use crate::util::{human_bytes, human_duration};

pub const SCHEMA_VERSION: u32 = 1;

/// The report. Every field is always present (null when unknown); docs/JSON.md
/// documents each one, and a test holds the two together.
#[derive(Debug, Serialize)]
pub struct Report {
    pub walvault_verify: u32,
    pub ok: bool,
    pub deep: bool,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub finished_at: chrono::DateTime<chrono::Utc>,
    pub duration_ms: u64,
    pub repository: String,
    pub system_identifier: Option<String>,
    pub trusted_key: Option<String>,
    pub trusted_key_fingerprint: Option<String>,
    pub key_pinned: bool,
    pub descriptor_generation: Option<u64>,
    pub scope: Scope,
    pub backups_checked: u64,
    pub wal_segments_checked: u64,
    pub objects_checked: Checked,
    pub bytes_read: u64,
    pub read_bytes_per_second: u64,
    pub deep_checked: Option<DeepChecked>,
    pub backups: Vec<BackupVerdict>,
    pub inventory: Option<Inventory>,
    pub previous_report: Option<PreviousSummary>,
    pub problems: Vec<Problem>,
    pub warnings: Vec<Problem>,
}

#[derive(Debug, Serialize)]
pub struct Scope {
    pub backup: Option<String>,
    pub since: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Debug, Serialize)]
pub struct PreviousSummary {
    pub file: String,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub changes: Changes,
}

/// The parts of an earlier report that a comparison needs.
#[derive(Debug, Deserialize)]
struct PreviousReport {
    walvault_verify: u32,
    started_at: chrono::DateTime<chrono::Utc>,
    system_identifier: Option<String>,
    trusted_key: Option<String>,
    inventory: Option<Inventory>,
}

pub async fn run(ctx: &Ctx, args: &VerifyArgs) -> Result<i32> {
    let started = Instant::now();
    let started_at = chrono::Utc::now();
    let since = match &args.since {
        Some(t) => Some(parse_time(t).map_err(Error::Usage)?.instant),
        None => None,
    };
    let previous = args.previous_report.as_deref().map(read_previous).transpose()?;
    let pinned = ctx.pinned_key()?;
    let store = ctx.store().await?;
    let mut report = Report {
        walvault_verify: SCHEMA_VERSION,
        ok: false,
        deep: args.deep,
        started_at,
        finished_at: started_at,
        duration_ms: 0,
        repository: store.location(),
        system_identifier: None,
        trusted_key: pinned.map(|k| k.to_string()),
        trusted_key_fingerprint: pinned.map(|k| k.fingerprint()),
        key_pinned: pinned.is_some(),
        descriptor_generation: None,
        scope: Scope { backup: args.backup.clone(), since },
        backups_checked: 0,
        wal_segments_checked: 0,
        objects_checked: Checked::default(),
        bytes_read: 0,
        read_bytes_per_second: 0,
        deep_checked: None,
        backups: Vec::new(),
        inventory: None,
        previous_report: None,
        problems: Vec::new(),
        warnings: Vec::new(),
    };
    let desc = match load_descriptor(&store, pinned).await? {
        Ok(d) => d,
        // A descriptor that is missing or does not verify is the audit's first
        // finding; nothing else can be trusted without it.
        Err(p) => {
            report.problems.push(p);
            return Ok(finish(report, started, args.json));
        }
    };
    if let Some((_, prev)) = &previous
        && prev.system_identifier.as_ref().is_some_and(|s| s != &desc.descriptor.cluster.system_identifier)
    {
        return Err(Error::Usage(format!(
            "the previous report is of cluster {}, this repository holds cluster {}",
            prev.system_identifier.as_deref().unwrap_or("?"),
            desc.descriptor.cluster.system_identifier
        )));
    }
    let opener = if args.deep { Some(ctx.opener()?) } else { None };
    report.system_identifier = Some(desc.descriptor.cluster.system_identifier.clone());
    report.trusted_key = Some(desc.trusted_key.to_string());
    report.trusted_key_fingerprint = Some(desc.trusted_key.fingerprint());
    report.key_pinned = desc.pinned;
    report.descriptor_generation = Some(desc.descriptor.generation);
    // The total is not known before the listing; the display shows bytes read and the rate.
    let bar = std::sync::Arc::new(crate::progress::Progress::new("verify", 0));
    let shown = bar.clone();
    let opts = VerifyOptions {
        deep: opener,
        backup: args.backup.clone(),
        since,
        parallel: ctx.config.repository.parallel.max(2) * 2,
        progress: Some(std::sync::Arc::new(move |done| shown.set(done))),
        previous: previous
            .as_ref()
            .map(|(_, p)| (p.inventory.clone().expect("checked when read"), p.trusted_key.clone().unwrap_or_default())),
    };
    let outcome = verify::verify(&store, &desc, &opts).await;
    bar.finish();
    let outcome = outcome?;
    if !desc.pinned {
        report.warnings.push(verify::problem(
            "key_not_pinned",
            layout::DESCRIPTOR,
            format!(
                "trusting the key the repository names itself ({}); anyone able to write the repository could replace it: set signing.public_key",
                desc.trusted_key
            ),
        ));
    }
    report.backups_checked = outcome.backups.len() as u64;
    report.wal_segments_checked = outcome.wal_segments;
    report.objects_checked = outcome.checked;
    report.bytes_read = outcome.checked.bytes_read;
    report.deep_checked = outcome.deep;
    report.backups = outcome.backups;
    report.problems = outcome.problems;
    report.warnings.extend(outcome.warnings);
    if let (Some((file, prev)), Some(changes)) = (previous, outcome.changes) {
        report.previous_report = Some(PreviousSummary { file, started_at: prev.started_at, changes });
    }
    report.inventory = Some(outcome.inventory);
    Ok(finish(report, started, args.json))
}

/// Loads the descriptor; a missing or unverifiable one is a problem, a store
/// that cannot be read an error.
async fn load_descriptor(store: &Store, pinned: Option<crate::repo::PublicKey>) -> Result<std::result::Result<LoadedDescriptor, Problem>> {
    let key = layout::DESCRIPTOR;
    match Descriptor::load(store.as_ref(), pinned).await {
        Ok(d) => Ok(Ok(d)),
        Err(RepoError::NotInitialized { location }) => {
            // An empty location is a wrong url; objects without a descriptor are a finding.
            if storage::list_all(store.as_ref(), "").await?.is_empty() {
                return Err(RepoError::NotInitialized { location }.into());
            }
            Ok(Err(verify::problem("missing", key, "the repository has objects but no descriptor: it was removed")))
        }
        Err(e @ (RepoError::Storage(_) | RepoError::Invalid(_))) => Err(e.into()),
        Err(e) => Ok(Err(verify::classify(key, &e.into()))),
    }
}

fn read_previous(path: &Path) -> Result<(String, PreviousReport)> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| Error::Usage(format!("--previous-report {shown}: cannot read it: {e}")))?;
    let prev: PreviousReport = serde_json::from_str(&text)
        .map_err(|e| Error::Usage(format!("--previous-report {shown}: not a report of `walvault verify --json`: {e}")))?;
    if prev.walvault_verify != SCHEMA_VERSION {
        return Err(Error::Usage(format!(
            "--previous-report {shown}: report schema {} (this walvault writes and reads {SCHEMA_VERSION})",
            prev.walvault_verify
        )));
    }
    if prev.inventory.is_none() {
        return Err(Error::Usage(format!(
            "--previous-report {shown}: the report has no inventory (that run found no valid descriptor); compare with an earlier, successful report"
        )));
    }
    Ok((shown, prev))
}

fn finish(mut report: Report, started: Instant, json: bool) -> i32 {
    let elapsed = started.elapsed();
    report.finished_at = chrono::Utc::now();
    report.duration_ms = elapsed.as_millis() as u64;
    report.read_bytes_per_second = (report.bytes_read as f64 / elapsed.as_secs_f64().max(0.001)) as u64;
    report.ok = report.problems.is_empty();
    if json {
        println!("{}", serde_json::to_string_pretty(&report).expect("the report serializes"));
    } else {
        print_human(&report, elapsed);
    }
    if report.ok { 0 } else { exit::INTEGRITY }
}

fn print_human(r: &Report, elapsed: std::time::Duration) {
    match (&r.trusted_key, &r.trusted_key_fingerprint) {
        (Some(k), Some(f)) => println!(
            "verified {} with key {k} ({f}), {}",
            r.repository,
            if r.key_pinned { "pinned by signing.public_key" } else { "NOT PINNED: taken from the repository itself" }
        ),
        _ => println!("verified {}: no trusted key (set signing.public_key)", r.repository),
    }
    let c = &r.objects_checked;
    println!(
        "  {} objects ({} WAL, {} packs, {} pack indexes, {} backup objects, {} descriptor), {} read in {} ({}/s)",
        c.total,
        c.wal,
        c.packs,
        c.pack_indexes,
        c.backup_objects,
        c.other,
        human_bytes(r.bytes_read),
        human_duration(elapsed),
        human_bytes(r.read_bytes_per_second)
    );
    if let Some(d) = &r.deep_checked {
        println!(
            "  decrypted: {} files of backups ({}) and {} WAL files, all matching their checksums",
            d.files,
            human_bytes(d.file_bytes),
            d.wal_files
        );
    }
    for b in &r.backups {
        let when = b
            .end_time
            .map(|t| format!(" (ended {}, timeline {})", t.format("%Y-%m-%d %H:%M:%S UTC"), b.timeline.unwrap_or(0)))
            .unwrap_or_default();
        if b.restorable {
            match &b.replay_stops_at {
                Some(gap) => println!("  backup {}{when}: restorable; replay stops before the missing segment {gap}", b.id),
                None => println!("  backup {}{when}: restorable", b.id),
            }
        } else {
            println!("  backup {}{when}: NOT restorable", b.id);
            for reason in &b.reasons {
                println!("    - {reason}");
            }
        }
    }
    if let Some(inv) = &r.inventory {
        for t in &inv.timelines {
            match (&t.first_segment, &t.last_segment) {
                (Some(a), Some(z)) => println!(
                    "  timeline {}: {} WAL segments stored, {a} to {z}{}",
                    t.timeline,
                    t.segments,
                    t.newest_stored_at.map(|m| format!(", newest stored {}", m.format("%Y-%m-%d %H:%M:%S UTC"))).unwrap_or_default()
                ),
                _ => println!("  timeline {}: no complete WAL segment stored", t.timeline),
            }
        }
    }
    if let Some(p) = &r.previous_report {
        let ch = &p.changes;
        println!(
            "  since the previous report ({}, {}): {} new backups, {} expired{}",
            p.file,
            p.started_at.format("%Y-%m-%d %H:%M:%S UTC"),
            ch.new_backups.len(),
            ch.expired_backups.len(),
            if ch.expired_backups.is_empty() { String::new() } else { format!(" ({})", ch.expired_backups.join(", ")) }
        );
    }
    for w in &r.warnings {
        println!("  warning [{}] {}: {}", w.kind, w.key, w.message);
    }
    if r.problems.is_empty() {
        println!("OK: every object is present and matches its signed checksum");
    } else {
        println!("FAILED: {} problems", r.problems.len());
        for p in &r.problems {
            println!("  [{}] {}: {}", p.kind, p.key, p.message);
        }
    }
}
