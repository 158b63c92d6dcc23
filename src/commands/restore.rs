//! `walvault restore --pgdata DIR [target]`: chooses the backup for the target,
//! refuses targets it cannot reach (before writing anything), rebuilds the data
//! directory, configures recovery, and with `--replay` runs PostgreSQL until
//! the target is reached and reports what was reached.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::Ctx;
use crate::cli::RestoreArgs;
use crate::error::{Error, Result, ResultExt, exit};
use crate::pg::conn::{Connection, Mode};
use crate::pg::conninfo::ConnParams;
use crate::pg::recovery::{RecoveryConfig, RecoveryTarget, TargetTimeline, format_pg_time, parse_time, shell_quote};
use crate::pg::server::{LocalServer, binary_major, find_program, free_port, owner_of};
use crate::pg::{TimelineId, WalSegmentName};
use crate::repo::catalog::{Catalog, Window};
use crate::repo::manifest::BackupManifest;
use crate::repo::materialize::{MaterializeOptions, prepare, write};

pub async fn run(ctx: &Ctx, args: &RestoreArgs) -> Result<i32> {
    let target = parse_target(args)?;
    let timeline = match &args.target_timeline {
        Some(t) => TargetTimeline::parse(t).map_err(Error::Usage)?,
        None => TargetTimeline::Latest,
    };
    let tablespace_map = parse_tablespace_map(&args.tablespace_map)?;
    let pgdata = absolute(&args.pgdata)?;
    check_pgdata(&pgdata, args.force)?;

    let store = ctx.store().await?;
    let desc = ctx.reader_descriptor(&store).await?;
    if !desc.pinned {
        tracing::warn!(key = %desc.trusted_key, "signing.public_key is not set: trusting the key the repository names; pin it to detect a replaced repository");
    }
    let opener = ctx.opener()?;
    let catalog = Catalog::load(&store, &desc, ctx.config.repository.parallel).await?;
    for (id, why) in &catalog.broken {
        eprintln!("warning: backup {id} is ignored: {why}");
    }
    let plan = choose(&catalog, &target, &timeline, args.backup.as_deref())?;
    let backup = plan.backup.clone();

    let postgres = if args.replay {
        let bin = find_program(&ctx.config.postgres.bin_dir, "postgres")?;
        let major = binary_major(&bin)?;
        if major != backup.pg_version_num / 10000 {
            return Err(Error::with_hint(
                format!("{} is PostgreSQL {major}, the backup is PostgreSQL {}", bin.display(), backup.pg_version_num / 10000),
                format!("set postgres.bin_dir to PostgreSQL {} binaries", backup.pg_version_num / 10000),
            ));
        }
        Some(bin)
    } else {
        None
    };

    eprintln!(
        "restoring backup {} (consistent at {} on timeline {}, {})",
        backup.backup_id,
        backup.end_lsn,
        backup.end_timeline,
        format_pg_time(&backup.end_time)
    );
    eprintln!("recovery target: {target}, along timeline {}", plan.timeline);
    for note in &plan.notes {
        eprintln!("note: {note}");
    }

    let owner = restore_owner(&pgdata)?.map(|(u, g, _)| (u, g));
    let started = Instant::now();
    let spool = ctx.config.spool_dir().join(format!("restore-{}", std::process::id()));
    let bar = std::sync::Arc::new(crate::progress::Progress::new("restore", backup.stats.bytes));
    let shown = bar.clone();
    let opts = MaterializeOptions {
        dest: pgdata.clone(),
        tablespace_map,
        parallel: ctx.config.repository.parallel.max(2),
        spool: spool.clone(),
        owner,
        progress: Some(std::sync::Arc::new(move |done| shown.set(done))),
        verify_only: false,
        clear_dest: args.force,
    };
    // Refusals while preparing (a tablespace directory in use) leave the
    // directory untouched; failures while writing leave it incomplete.
    let stats = match prepare(&store, &desc, &opener, &backup, &opts).await {
        Ok(prepared) => write(prepared, &store, &opener, &backup, &opts)
            .await
            .context("restore failed; the data directory is incomplete and must not be started")
            .map_err(|e| match e.hint() {
                Some(_) => e,
                // A local failure (a full disk, permissions): say how to retry.
                None => Error::coded(
                    e.exit_code(),
                    e.to_string(),
                    Some(format!(
                        "fix the cause (free space, permissions on {}), then run the restore again with --force to replace the incomplete directory",
                        pgdata.display()
                    )),
                ),
            }),
        Err(e) => Err(e.context("nothing was written")),
    };
    bar.finish();
    let _ = std::fs::remove_dir_all(&spool);
    let stats = stats?;
    if let Some(sm) = &backup.server_manifest {
        write_server_manifest(&store, &opener, sm, &pgdata.join("backup_manifest"), owner).await?;
    }

    let recovery = RecoveryConfig {
        restore_command: restore_command(ctx)?,
        target: target.clone(),
        inclusive: !args.exclusive,
        timeline: match timeline {
            TargetTimeline::Latest if plan.explicit_timeline => TargetTimeline::Id(plan.timeline),
            t => t,
        },
        action: format!("{:?}", ctx.config.restore.target_action).to_lowercase(),
        archive_off: args.archive_mode == "off",
    };
    recovery.write(&pgdata).context("cannot write the recovery settings")?;
    if let Some((uid, gid)) = owner {
        for f in ["postgresql.auto.conf", "recovery.signal"] {
            std::os::unix::fs::chown(pgdata.join(f), Some(uid), Some(gid))?;
        }
    }
    eprintln!(
        "restored {} files ({}) in {}",
        stats.files,
        crate::util::human_bytes(stats.bytes),
        crate::util::human_duration(started.elapsed())
    );

    let Some(postgres) = postgres else {
        println!("{}", pgdata.display());
        eprintln!("start PostgreSQL on {} to replay WAL to the target (restore_command fetches it from the repository)", pgdata.display());
        return Ok(0);
    };
    let outcome = replay(ctx, &postgres, &pgdata, &target, args).await;
    if !args.keep_running {
        super::archive_get::stop_worker_and_clean(&prefetch_spool_for(ctx, &pgdata, owner.map(|o| o.0)));
    }
    outcome
}

fn absolute(p: &Path) -> Result<PathBuf> {
    Ok(if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir()?.join(p) })
}

fn parse_target(args: &RestoreArgs) -> Result<RecoveryTarget> {
    if let Some(t) = &args.target_time {
        let parsed = parse_time(t).map_err(Error::Usage)?;
        match &parsed.assumed_zone {
            Some(zone) => eprintln!("target time '{t}' read in the local time zone ({zone}): {}", format_pg_time(&parsed.instant)),
            None => eprintln!("target time: {}", format_pg_time(&parsed.instant)),
        }
        return Ok(RecoveryTarget::Time(parsed.instant));
    }
    if let Some(l) = &args.target_lsn {
        return Ok(RecoveryTarget::Lsn(l.parse().map_err(|e: crate::pg::lsn::LsnParseError| Error::Usage(e.to_string()))?));
    }
    if let Some(x) = &args.target_xid {
        let xid: u64 = x.trim().parse().map_err(|_| Error::Usage(format!("'{x}' is not a transaction id (a positive number)")))?;
        if xid < 3 {
            return Err(Error::Usage(format!("transaction id {xid} is reserved; normal transaction ids start at 3")));
        }
        return Ok(RecoveryTarget::Xid(xid));
    }
    if let Some(n) = &args.target_name {
        if n.is_empty() || n.len() >= 64 {
            return Err(Error::Usage(format!("'{n}' is not a restore point name (1 to 63 characters)")));
        }
        return Ok(RecoveryTarget::Name(n.clone()));
    }
    Ok(if args.target_immediate { RecoveryTarget::Immediate } else { RecoveryTarget::Latest })
}

fn parse_tablespace_map(items: &[String]) -> Result<HashMap<u32, PathBuf>> {
    let mut out = HashMap::new();
    for item in items {
        let (oid, dir) = item.split_once('=').ok_or_else(|| Error::Usage(format!("--tablespace-map '{item}': expected OID=DIR")))?;
        let oid: u32 = oid.trim().parse().map_err(|_| Error::Usage(format!("--tablespace-map '{item}': '{oid}' is not an OID")))?;
        let dir = PathBuf::from(dir);
        if !dir.is_absolute() {
            return Err(Error::Usage(format!("--tablespace-map '{item}': the directory must be absolute")));
        }
        out.insert(oid, dir);
    }
    Ok(out)
}

/// Refuses a non-empty directory unless --force, and always one in use by a server.
fn check_pgdata(pgdata: &Path, force: bool) -> Result<()> {
    let entries = match std::fs::read_dir(pgdata) {
        Ok(e) => e.count(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(Error::with_hint(
                format!("cannot read {}: {e}", pgdata.display()),
                format!(
                    "restore as a user that may write there (walvault runs as uid {}), give that user the directory and its parents, or choose another --pgdata",
                    unsafe { libc::geteuid() }
                ),
            ));
        }
    };
    if entries == 0 {
        return Ok(());
    }
    if let Ok(pid) = std::fs::read_to_string(pgdata.join("postmaster.pid"))
        && let Some(pid) = pid.lines().next().and_then(|l| l.trim().parse::<i32>().ok())
    {
        // EPERM: the process exists but belongs to another user.
        let alive = pid > 0 && (unsafe { libc::kill(pid, 0) } == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM));
        if alive {
            return Err(Error::with_hint(
                format!("{} is in use by a running PostgreSQL server (pid {pid})", pgdata.display()),
                "stop the server first; restore never overwrites a running cluster (if no server runs there, remove the stale postmaster.pid)",
            ));
        }
    }
    if !force {
        return Err(Error::with_hint(
            format!("{} is not empty", pgdata.display()),
            "restore into an empty or new directory, or pass --force to replace its contents",
        ));
    }
    Ok(())
}

/// When running as root, restored files belong to the owner of the data
/// directory (or of its parent when it does not exist yet), as PostgreSQL needs.
fn restore_owner(pgdata: &Path) -> Result<Option<(u32, u32, String)>> {
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let probe = if pgdata.exists() { pgdata.to_path_buf() } else { pgdata.parent().map(Path::to_path_buf).unwrap_or_else(|| "/".into()) };
    let owner = owner_of(&probe)?;
    if owner.0 == 0 {
        tracing::warn!(dir = %probe.display(), "restoring as root into a root-owned directory; PostgreSQL will refuse to start until it is owned by its user");
        return Ok(None);
    }
    Ok(Some(owner))
}

/// The restore_command: this binary, with the same configuration.
fn restore_command(ctx: &Ctx) -> Result<String> {
    let exe = std::env::current_exe()?;
    let mut cmd = shell_quote(&exe.to_string_lossy());
    match &ctx.config.source {
        Some(cfg) => {
            let cfg = absolute(cfg)?;
            cmd.push_str(&format!(" --config {}", shell_quote(&cfg.to_string_lossy())));
        }
        None => tracing::warn!("no configuration file: restore_command relies on WALVAULT_* variables being set where PostgreSQL runs"),
    }
    for s in &ctx.overrides {
        cmd.push_str(&format!(" --set {}", shell_quote(s)));
    }
    cmd.push_str(" archive-get %f %p");
    Ok(cmd)
}

async fn write_server_manifest(
    store: &crate::storage::Store,
    opener: &crate::pipeline::Opener,
    r: &crate::repo::manifest::SealedRef,
    dest: &Path,
    owner: Option<(u32, u32)>,
) -> Result<()> {
    let stream = store.get(&r.key, None).await?;
    let expected = crate::pipeline::Expected {
        stored_hash: blake3::Hash::from_hex(&r.stored_blake3).ok(),
        plain_hash: blake3::Hash::from_hex(&r.plain_blake3).ok(),
        plain_len: Some(r.plain_len),
    };
    crate::pipeline::bridge::open_to_file(stream, opener, expected, dest, 0o600).await?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(dest, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// The chosen backup and the timeline path.
pub struct Plan {
    pub backup: BackupManifest,
    pub timeline: TimelineId,
    /// The timeline was given as a number (write it, not `latest`).
    pub explicit_timeline: bool,
    pub notes: Vec<String>,
}

fn window_text(w: &Window) -> String {
    format!(
        "{} ({}) to {}{}",
        format_pg_time(&w.start_time),
        w.start_lsn,
        w.end_time.map(|t| format_pg_time(&t)).unwrap_or_else(|| "?".into()),
        format_args!(" ({})", w.end_lsn)
    )
}

fn refuse(message: String, hint: impl Into<String>) -> Error {
    Error::coded(exit::NOT_REACHED, message, Some(hint.into()))
}

/// Chooses the backup for a target: the newest whose consistency point is at or
/// before the target, on the target timeline's history, with unbroken WAL up to
/// the target. Every refusal names the window or the missing segment.
pub fn choose(catalog: &Catalog, target: &RecoveryTarget, timeline: &TargetTimeline, forced: Option<&str>) -> Result<Plan> {
    if let Some((id, why)) = forced.and_then(|id| catalog.broken.iter().find(|(b, _)| b == id)) {
        return Err(Error::coded(
            exit::INTEGRITY,
            format!("backup {id} cannot be restored: {why}"),
            Some("run `walvault verify` to list every damaged object; restore from another backup".into()),
        ));
    }
    if let Some(id) = forced.filter(|id| catalog.backup(id).is_none()) {
        let why = if catalog.incomplete.iter().any(|i| i == id) {
            "it was interrupted before its manifest was written, so it does not exist as a backup"
        } else {
            "see `walvault info` for the backups there are"
        };
        return Err(Error::Usage(format!("no backup {id} in the repository: {why}")));
    }
    if catalog.backups.is_empty() {
        return Err(refuse("the repository has no backup".into(), "take one with `walvault backup`"));
    }
    let (tli, explicit) = match timeline {
        TargetTimeline::Id(t) => (*t, true),
        // Written as a number: PostgreSQL's own `latest` would follow the highest-numbered
        // timeline, which may be an abandoned branch.
        TargetTimeline::Latest => (catalog.latest_timeline().unwrap_or(1), true),
        TargetTimeline::Current => {
            let b = match forced {
                Some(id) => catalog.backup(id).ok_or_else(|| Error::Usage(format!("no backup {id} in the repository")))?,
                None => catalog.backups.last().expect("not empty"),
            };
            (b.end_timeline, true)
        }
    };
    let mut windows = catalog.windows(tli);
    if let Some(id) = forced {
        let b = catalog.backup(id).ok_or_else(|| Error::Usage(format!("no backup {id} in the repository (see `walvault info`)")))?;
        windows.retain(|w| w.backup_id == b.backup_id);
        if windows.is_empty() {
            let path = catalog.ancestry(tli);
            if !catalog.backup_on_path(b, &path) {
                return Err(refuse(
                    format!("backup {id} is not on the history of timeline {tli}"),
                    "choose another backup or --target-timeline",
                ));
            }
            let first = WalSegmentName::parse(&b.wal_first, catalog.seg_size).expect("valid");
            let (_, gap) = catalog.wal_reach(&path, first.segno);
            let missing = gap.map(|g| g.to_string()).unwrap_or_else(|| "the end of the backup".into());
            return Err(refuse(
                format!("backup {id} cannot be made consistent: WAL is missing from {missing}"),
                "run `walvault verify` for details",
            ));
        }
    }
    if windows.is_empty() {
        return Err(refuse(
            format!("no backup on the history of timeline {tli} has the WAL it needs to be consistent"),
            "check WAL archiving (`walvault check`, `walvault info`) and take a new backup",
        ));
    }
    let newest = windows.last().expect("not empty").clone();
    let first = windows.first().expect("not empty").clone();
    let mut notes = Vec::new();
    let pick = |w: &Window| catalog.backup(&w.backup_id).expect("window of a known backup").clone();
    let backup = match target {
        RecoveryTarget::Latest => {
            if let Some(gap) = &newest.gap_at {
                return Err(refuse(
                    format!(
                        "WAL segment {gap} is missing: replay from backup {} would stop at {} and lose what follows",
                        newest.backup_id, newest.end_lsn
                    ),
                    format!(
                        "restore to a target before {} (e.g. --target-lsn {}), or find the missing segment",
                        newest.end_lsn, newest.end_lsn
                    ),
                ));
            }
            pick(&newest)
        }
        RecoveryTarget::Immediate => pick(&newest),
        RecoveryTarget::Lsn(l) => {
            let Some(w) = windows.iter().rev().find(|w| w.start_lsn <= *l) else {
                return Err(before_window(catalog, &first, &format!("LSN {l}"), |b| b.start_lsn <= *l && *l < b.end_lsn));
            };
            if *l > w.end_lsn {
                return Err(after_window(w, &format!("LSN {l}")));
            }
            pick(w)
        }
        RecoveryTarget::Time(t) => {
            if *t > chrono::Utc::now() {
                return Err(refuse(
                    format!("target time {} is in the future", format_pg_time(t)),
                    format!("the recoverable window is {}", window_text(&newest)),
                ));
            }
            let Some(w) = windows.iter().rev().find(|w| w.start_time <= *t) else {
                return Err(before_window(catalog, &first, &format!("time {}", format_pg_time(t)), |b| {
                    b.start_time <= *t && *t < b.end_time
                }));
            };
            if w.end_time.is_some_and(|e| *t > e) {
                return Err(after_window(w, &format!("time {}", format_pg_time(t))));
            }
            pick(w)
        }
        RecoveryTarget::Xid(xid) if forced.is_none() => {
            let w = backup_for_xid(catalog, &windows, *xid);
            match &w {
                Some(w) => notes.push(format!(
                    "transaction {xid} was assigned after backup {} began (by its next transaction id), so backup {} ends before it commits",
                    successor(&windows, w).map(|s| s.backup_id.as_str()).unwrap_or("?"),
                    w.backup_id
                )),
                None if windows.len() > 1 => notes.push(format!(
                    "transaction {xid} may have committed before the second backup ended: starting from the oldest backup with unbroken WAL. Pass --backup to start from a newer one."
                )),
                None => {}
            }
            let w = w.unwrap_or_else(|| oldest_unbroken(&windows));
            if let Some(gap) = &w.gap_at {
                notes.push(format!("WAL segment {gap} is missing: the target must lie before {}", w.end_lsn));
            }
            pick(&w)
        }
        RecoveryTarget::Xid(_) | RecoveryTarget::Name(_) => {
            // Where a restore point lies is only known by replaying WAL: use
            // the oldest backup whose WAL is unbroken to the end.
            let w = match forced {
                Some(_) => newest.clone(),
                None => oldest_unbroken(&windows),
            };
            if forced.is_none() && windows.len() > 1 {
                notes.push(format!(
                    "a restore point cannot be located without replaying WAL; using the oldest backup with unbroken WAL ({}). Pass --backup to start from a newer one.",
                    w.backup_id
                ));
            }
            if let Some(gap) = &w.gap_at {
                notes.push(format!("WAL segment {gap} is missing: the target must lie before {}", w.end_lsn));
            }
            pick(&w)
        }
    };
    Ok(Plan { backup, timeline: tli, explicit_timeline: explicit, notes })
}

fn oldest_unbroken(windows: &[Window]) -> Window {
    windows.iter().find(|w| w.gap_at.is_none()).unwrap_or(windows.last().expect("not empty")).clone()
}

fn successor<'a>(windows: &'a [Window], w: &Window) -> Option<&'a Window> {
    windows.iter().skip_while(|x| x.backup_id != w.backup_id).nth(1)
}

/// The newest window whose backup surely ends before transaction `xid`
/// commits: a later backup recorded a next transaction id at or below `xid`,
/// so `xid` was assigned after that later backup began, hence after this one
/// ended. None when no backup can be proven so (then the oldest is safe).
fn backup_for_xid(catalog: &Catalog, windows: &[Window], xid: u64) -> Option<Window> {
    let next_xid = |w: &Window| catalog.backup(&w.backup_id).and_then(|b| b.next_xid);
    let reference = windows.iter().filter_map(next_xid).max()?;
    let xid = widen_xid(xid, reference);
    (0..windows.len().saturating_sub(1))
        .rev()
        .find(|&i| windows[i + 1..].iter().filter_map(next_xid).min().is_some_and(|n| n <= xid))
        .map(|i| windows[i].clone())
}

/// A 32-bit transaction id as a 64-bit one (with epoch), taking the epoch
/// that puts it nearest to `reference`; 64-bit ids are returned as they are.
fn widen_xid(xid: u64, reference: u64) -> u64 {
    if xid > u32::MAX as u64 {
        return xid;
    }
    let candidate = (reference & !0xFFFF_FFFF) | xid;
    if candidate > reference.saturating_add(1 << 31) && candidate >= 1 << 32 {
        candidate - (1 << 32)
    } else if candidate.saturating_add(1 << 31) < reference {
        candidate + (1 << 32)
    } else {
        candidate
    }
}

fn before_window(catalog: &Catalog, first: &Window, what: &str, inside: impl Fn(&BackupManifest) -> bool) -> Error {
    if let Some(b) = catalog.backups.iter().find(|b| inside(b)) {
        return refuse(
            format!(
                "target {what} lies inside backup {}'s own span ({} to {}): a backup is consistent only from its end",
                b.backup_id,
                format_pg_time(&b.start_time),
                format_pg_time(&b.end_time)
            ),
            format!("the earliest reachable point is {} ({})", format_pg_time(&first.start_time), first.start_lsn),
        );
    }
    refuse(
        format!(
            "target {what} is before the recoverable window, which starts at {} ({}) with backup {}",
            format_pg_time(&first.start_time),
            first.start_lsn,
            first.backup_id
        ),
        "older history is not in the repository (retention may have removed it)",
    )
}

fn after_window(w: &Window, what: &str) -> Error {
    match &w.gap_at {
        Some(gap) => refuse(
            format!(
                "target {what} is beyond a WAL gap: segment {gap} is missing, so replay from backup {} stops at {}",
                w.backup_id, w.end_lsn
            ),
            "choose an earlier target, or find the missing segment",
        ),
        None => refuse(
            format!("target {what} is after the end of the recoverable window: {}", window_text(w)),
            "the newest archived WAL ends there",
        ),
    }
}

/// The spool archive-get uses for this data directory: it runs as the data
/// directory's owner, whose default spool differs from ours when we are root.
fn prefetch_spool_for(ctx: &Ctx, pgdata: &Path, owner_uid: Option<u32>) -> PathBuf {
    let base = if ctx.config.wal.spool_dir.is_empty() {
        std::env::temp_dir().join(format!("walvault-{}", owner_uid.unwrap_or_else(|| unsafe { libc::geteuid() })))
    } else {
        PathBuf::from(&ctx.config.wal.spool_dir)
    };
    super::archive_get::prefetch_spool_in(&base, pgdata)
}

/// What replay reached.
#[derive(Debug, serde::Serialize)]
struct Reached {
    target: String,
    promoted: bool,
    last_transaction_time: Option<String>,
    replay_lsn: Option<String>,
    timeline: Option<u32>,
    postgres_says: Option<String>,
}

async fn replay(ctx: &Ctx, postgres: &Path, pgdata: &Path, target: &RecoveryTarget, args: &RestoreArgs) -> Result<i32> {
    let port = match args.port {
        Some(p) => p,
        None => free_port()?,
    };
    let work = std::env::temp_dir().join(format!("walvault-replay-{}-{:08x}", std::process::id(), rand::random::<u32>()));
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(&work)?;
    }
    // A replay that is stopped afterwards is a verification or an extraction:
    // its new timeline must not be archived into the repository.
    let archive_off = !args.keep_running;
    let mut server = LocalServer::start(postgres, pgdata, port, &work, archive_off)?;
    eprintln!("replaying WAL with {} on port {port} (log: {})", postgres.display(), server.log_path.display());
    let (_, _, user) = owner_of(pgdata)?;
    let conninfo = format!("host={} port={port} user={user} dbname=template1 connect_timeout=5", server.socket_dir.display());
    let params = ConnParams::parse(&conninfo)?;
    let started = Instant::now();
    let mut last_report = Instant::now();
    let action = format!("{:?}", ctx.config.restore.target_action).to_lowercase();
    let mut query_failures = 0;
    let reached = loop {
        if let Some(status) = server.exited() {
            let log = server.log();
            if action == "shutdown" && log.contains("shutdown at recovery target") {
                break Reached {
                    target: target.to_string(),
                    promoted: false,
                    last_transaction_time: None,
                    replay_lsn: None,
                    timeline: None,
                    postgres_says: stopping_line(&log),
                };
            }
            // The log stays (in the private work directory) for a look.
            let why = if log.contains("recovery ended before configured recovery target was reached") {
                match target {
                    RecoveryTarget::Time(_) => "the archived WAL ends before the target: recovery stops at the first transaction that committed after the target time, and none is archived yet (on a quiet database, the latest state may already be the one wanted: restore without a target)".to_string(),
                    _ => "the archived WAL ends before the target (or the target is not on this timeline's history: see `walvault info` and --target-timeline)".to_string(),
                }
            } else {
                "if other timelines exist (`walvault info`), the target may lie on another one: pass --target-timeline".to_string()
            };
            return Err(Error::coded(
                exit::NOT_REACHED,
                format!("PostgreSQL stopped during recovery ({status}) without reaching the target: {}", fatal_lines(&log)),
                Some(format!("{why}; server log {}: {}", server.log_path.display(), last_lines(&log, 8))),
            ));
        }
        let attempt = Connection::connect(&params, Mode::Database).await;
        if let Err(e) = &attempt {
            tracing::debug!(error = %e, "not connected to the restored server yet");
        }
        if let Ok(mut conn) = attempt {
            let q = conn.simple_query(&status_query(conn.server_version_num())).await;
            match &q {
                Err(e) => {
                    tracing::debug!(error = %e, "replay status query failed");
                    query_failures += 1;
                    if query_failures >= 30 {
                        let _ = server.stop(Duration::from_secs(60)).await;
                        return Err(Error::with_hint(
                            format!("cannot read the replay status from the restored server: {e}"),
                            format!(
                                "the server was stopped; its data directory {} is restored and can be started by hand",
                                pgdata.display()
                            ),
                        ));
                    }
                }
                Ok(_) => query_failures = 0,
            }
            if let Ok(sets) = q {
                let row = sets.first().and_then(|s| s.rows.first()).cloned().unwrap_or_default();
                let get = |i: usize| row.get(i).cloned().flatten();
                let in_recovery = get(0).as_deref() == Some("true");
                let paused = get(3).as_deref() == Some("paused");
                if !in_recovery || paused {
                    let tli = if in_recovery {
                        None
                    } else {
                        conn.simple_query("SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int::text")
                            .await
                            .ok()
                            .and_then(|s| s.first().and_then(|s| s.rows.first()).and_then(|r| r.first().cloned().flatten()))
                            .and_then(|t| t.parse().ok())
                    };
                    let log = server.log();
                    break Reached {
                        target: target.to_string(),
                        promoted: !in_recovery,
                        last_transaction_time: get(2),
                        replay_lsn: get(1),
                        timeline: tli,
                        postgres_says: stopping_line(&log),
                    };
                }
                if last_report.elapsed() > Duration::from_secs(10) {
                    last_report = Instant::now();
                    eprintln!("  replaying: at {} after {}", get(1).unwrap_or_default(), crate::util::human_duration(started.elapsed()));
                }
            }
            let _ = conn.close().await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reached).expect("json"));
    } else {
        println!("target reached: {}", reached.target);
        if let Some(s) = &reached.postgres_says {
            println!("  PostgreSQL: {s}");
        }
        println!("  last replayed transaction committed at: {}", reached.last_transaction_time.as_deref().unwrap_or("(none replayed)"));
        println!("  replay position: {}", reached.replay_lsn.as_deref().unwrap_or("?"));
        match (reached.promoted, reached.timeline) {
            (true, Some(t)) => println!("  promoted, now on timeline {t}"),
            (true, None) => println!("  promoted"),
            (false, _) => println!("  recovery {} at the target", if action == "shutdown" { "shut down" } else { "paused" }),
        }
        println!("  took {}", crate::util::human_duration(started.elapsed()));
    }
    if args.keep_running && server.exited().is_none() {
        println!("PostgreSQL keeps running: port {port}, socket directory {}, pid {}", server.socket_dir.display(), server.pid());
        server.detach();
        return Ok(0);
    }
    server.stop(Duration::from_secs(60)).await?;
    let _ = std::fs::remove_dir_all(&work);
    if args.archive_mode != "off" && reached.promoted {
        queue_history_for_archiving(pgdata)?;
    }
    Ok(0)
}

/// The replay ran with archiving off, so the history file of the timeline it
/// created was never queued for archiving. Queue it now: if this directory is
/// later started with archiving (as the new primary), its new timeline must
/// not reach the repository without the history that says where it branched.
fn queue_history_for_archiving(pgdata: &Path) -> Result<()> {
    let wal = pgdata.join("pg_wal");
    let status = wal.join("archive_status");
    let owner = owner_of(pgdata)?;
    for e in std::fs::read_dir(&wal).with_context(|| format!("cannot read {}", wal.display()))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".history") || status.join(format!("{name}.done")).exists() {
            continue;
        }
        let ready = status.join(format!("{name}.ready"));
        if !ready.exists() {
            std::fs::write(&ready, b"").with_context(|| format!("cannot write {}", ready.display()))?;
            if unsafe { libc::geteuid() } == 0 {
                std::os::unix::fs::chown(&ready, Some(owner.0), Some(owner.1))?;
            }
        }
    }
    Ok(())
}

/// Whether recovery is still going, where, and whether it paused. PostgreSQL
/// 13 has no pg_get_wal_replay_pause_state(), and a query naming it fails there
/// even in a branch that is never taken.
fn status_query(server_version_num: u32) -> String {
    let paused = if server_version_num >= 140000 {
        "pg_get_wal_replay_pause_state()::text"
    } else {
        "CASE WHEN pg_is_wal_replay_paused() THEN 'paused' ELSE 'not paused' END"
    };
    format!(
        "SELECT pg_is_in_recovery()::text, pg_last_wal_replay_lsn()::text, pg_last_xact_replay_timestamp()::text, \
         CASE WHEN pg_is_in_recovery() THEN {paused} ELSE 'not paused' END"
    )
}

fn stopping_line(log: &str) -> Option<String> {
    log.lines()
        .filter(|l| {
            l.contains("recovery stopping") || l.contains("archive recovery complete") || l.contains("consistent recovery state reached")
        })
        .find(|l| l.contains("recovery stopping"))
        .or_else(|| log.lines().rev().find(|l| l.contains("archive recovery complete") || l.contains("redo done")))
        .map(|l| l.split_once("LOG:").map(|(_, m)| m.trim()).unwrap_or(l).to_string())
}

fn fatal_lines(log: &str) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("FATAL:") || l.contains("PANIC:")).collect();
    if lines.is_empty() {
        last_lines(log, 3)
    } else {
        lines.iter().map(|l| l.split_once(':').map(|x| x.1).unwrap_or(l).trim()).collect::<Vec<_>>().join("; ")
    }
}

fn last_lines(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_ids_are_widened_near_the_reference() {
        assert_eq!(widen_xid(745, 700), 745);
        assert_eq!(widen_xid(745, (3 << 32) | 700), (3 << 32) | 745);
        assert_eq!(widen_xid(0xFFFF_FF00, (3 << 32) | 100), (2 << 32) | 0xFFFF_FF00, "just before the epoch wrapped");
        assert_eq!(widen_xid(100, (3 << 32) | 0xFFFF_FF00), (4 << 32) | 100, "just after it wraps");
        assert_eq!(widen_xid((5 << 32) | 9, 700), (5 << 32) | 9, "64-bit ids as given");
        assert_eq!(widen_xid(0xFFFF_FF00, 100), 0xFFFF_FF00, "no epoch before the first");
    }
}
