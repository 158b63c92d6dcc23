//! `walvault check`: is everything in place for backups to work? PostgreSQL
//! reachable with a replication role and the right settings, the slot, WAL
//! actually reaching the repository (forced switch, then wait), the store
//! writable, the keys readable and consistent. Each failure says what to change.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::Ctx;
use crate::cli::CheckArgs;
use crate::config::parse_duration;
use crate::error::{Error, Result, exit};
use crate::pg::conn::{Connection, Mode};
use crate::pg::conninfo::ConnParams;
use crate::pg::{Lsn, WalSegmentName};
use crate::repo::wal::WalArchive;
use crate::repo::{Descriptor, layout};
use crate::storage;

struct Report {
    failed: usize,
    json: Vec<serde_json::Value>,
}

impl Report {
    fn ok(&mut self, what: &str, detail: impl Into<String>) {
        let detail = detail.into();
        println!("ok    {what}{}", if detail.is_empty() { String::new() } else { format!(": {detail}") });
        self.json.push(serde_json::json!({"check": what, "ok": true, "detail": detail}));
    }
    fn warn(&mut self, what: &str, detail: impl Into<String>) {
        let detail = detail.into();
        println!("warn  {what}: {detail}");
        self.json.push(serde_json::json!({"check": what, "ok": true, "warning": detail}));
    }
    fn skip(&mut self, what: &str, why: impl Into<String>) {
        let why = why.into();
        println!("skip  {what}: {why}");
        self.json.push(serde_json::json!({"check": what, "ok": null, "skipped": why}));
    }
    fn fail(&mut self, what: &str, problem: impl Into<String>, fix: impl Into<String>) {
        let (problem, fix) = (problem.into(), fix.into());
        println!("FAIL  {what}: {problem}");
        println!("      fix: {fix}");
        self.failed += 1;
        self.json.push(serde_json::json!({"check": what, "ok": false, "problem": problem, "fix": fix}));
    }
}

pub async fn run(ctx: &Ctx, args: &CheckArgs) -> Result<i32> {
    let wait = parse_duration(&args.wait).map_err(Error::Usage)?;
    let mut r = Report { failed: 0, json: Vec::new() };

    // Keys.
    let key = match ctx.signing_key() {
        Ok(k) => {
            r.ok("signing key", format!("{} ({})", ctx.config.signing.key_file, k.public()));
            Some(k)
        }
        Err(e) => {
            r.fail("signing key", e.to_string(), e.hint().unwrap_or_default());
            None
        }
    };
    match ctx.recipients() {
        Ok(rs) => r.ok("encryption recipients", format!("{} valid", rs.len())),
        Err(e) => r.fail("encryption recipients", e.to_string(), e.hint().unwrap_or_default()),
    }
    if !ctx.config.encryption.identity_file.is_empty() {
        r.warn("identity file", "encryption.identity_file is set on this host; keep the restore identity off the agent host if you can");
    }

    // The repository.
    let store = match ctx.store().await {
        Ok(s) => Some(s),
        Err(e) => {
            r.fail("repository", e.to_string(), e.hint().unwrap_or_default());
            None
        }
    };
    let mut desc = None;
    let mut writable = false;
    if let (Some(store), Some(key)) = (&store, &key) {
        match Descriptor::load(store.as_ref(), Some(key.public())).await {
            Ok(d) => {
                r.ok("repository descriptor", format!("{} (cluster {})", store.location(), d.descriptor.cluster.system_identifier));
                desc = Some(d);
            }
            Err(e) => r.fail("repository descriptor", e.to_string(), e.hint().unwrap_or_else(|| "run `walvault init`".into())),
        }
        let probe = format!("{}check-{:016x}", layout::PROBE_PREFIX, rand::random::<u64>());
        let data = Bytes::from(format!("walvault check {}", chrono::Utc::now()));
        let round_trip = async {
            store.put(&probe, data.clone()).await?;
            let back = storage::get_bytes(store.as_ref(), &probe, None).await?;
            store.delete_many(std::slice::from_ref(&probe)).await?;
            Ok::<_, storage::StorageError>(back == data)
        }
        .await;
        match round_trip {
            Ok(true) => {
                writable = true;
                r.ok("repository writable", "an object was written, read back and deleted")
            }
            Ok(false) => {
                r.fail("repository writable", "an object read back differs from what was written", "check the store's consistency settings")
            }
            Err(e) => r.fail(
                "repository writable",
                format!("cannot write to {}: {e}", store.location()),
                e.hint().unwrap_or("check the store's credentials: walvault needs put, get, list and delete"),
            ),
        }
    }

    // PostgreSQL.
    let params = match ConnParams::parse(&ctx.config.postgres.conninfo) {
        Ok(p) => p,
        Err(e) => {
            r.fail("postgres.conninfo", e.to_string(), "fix the connection string");
            return finish(r);
        }
    };
    let mut conn = match Connection::connect(&params, Mode::Replication).await {
        Ok(c) => c,
        Err(e) => {
            // Find out why from a normal connection, when the role can open one:
            // wal_level = minimal forbids WAL senders, and so replication connections.
            let settings = server_settings(&params).await.ok();
            let fix = match e.code() {
                Some("42501") | Some("28000") => format!(
                    "give the role replication rights and allow it in pg_hba.conf: ALTER ROLE \"{0}\" REPLICATION; `host replication {0} <address> scram-sha-256`",
                    params.user
                ),
                Some("53300") if settings.as_ref().is_some_and(|(_, senders)| *senders < 2) => {
                    "set max_wal_senders = 10 (and wal_level = replica) in postgresql.conf and restart PostgreSQL".to_string()
                }
                _ => e.hint().unwrap_or_else(|| "check postgres.conninfo".into()),
            };
            r.fail("replication connection", e.to_string(), fix);
            if let Some((wal_level, senders)) = settings {
                check_wal_settings(&mut r, &wal_level, senders);
            }
            return finish(r);
        }
    };
    let sys = conn.identify_system().await?;
    r.ok(
        "replication connection",
        format!("PostgreSQL {}, system identifier {}", conn.parameter("server_version").unwrap_or("?"), sys.system_identifier),
    );
    if let Some(d) = &desc
        && d.descriptor.cluster.system_identifier != sys.system_identifier.to_string()
    {
        r.fail(
            "cluster",
            format!(
                "the repository belongs to cluster {}, the server is {}",
                d.descriptor.cluster.system_identifier, sys.system_identifier
            ),
            "point repository.url at this cluster's repository",
        );
    }
    let wal_level = conn.show("wal_level").await?;
    let senders: u32 = conn.show("max_wal_senders").await?.parse().unwrap_or(0);
    check_wal_settings(&mut r, &wal_level, senders);
    let slots: u32 = conn.show("max_replication_slots").await?.parse().unwrap_or(0);
    if slots < 1 {
        r.fail("max_replication_slots", "no replication slots are allowed", "set max_replication_slots = 10 and restart PostgreSQL");
    }
    if conn.server_version_num() >= 150000 {
        let slot = &ctx.config.postgres.slot;
        let sets = conn.simple_query(&format!("READ_REPLICATION_SLOT \"{slot}\"")).await?;
        let restart = sets.first().and_then(|s| s.rows.first()).and_then(|row| row.get(1).cloned().flatten());
        match restart {
            Some(lsn) => r.ok("replication slot", format!("{slot} holds WAL from {lsn}")),
            None => r.warn("replication slot", format!("{slot} does not exist yet; `walvault stream` or the daemon creates it")),
        }
    }
    let archive_mode = conn.show("archive_mode").await?;
    let archive_command = conn.show("archive_command").await.unwrap_or_default();
    // PostgreSQL 15 and later can archive through a module instead; when one
    // is set, archive_command is not used.
    let archive_library = match conn.server_version_num() >= 150000 {
        true => conn.show("archive_library").await.unwrap_or_default(),
        false => String::new(),
    };
    let archiving = archive_mode != "off";
    if archiving && !archive_library.is_empty() {
        if is_walvault_module(&archive_library) {
            // Known to this session only when set in the configuration.
            let command = conn.show("walvault.command").await.unwrap_or_default();
            let command = if command.is_empty() { "walvault (the default)".to_string() } else { command };
            let running = format!("{archive_library}: walvault's archive module, running {command} archive-server");
            match load_module(&params, &archive_library).await {
                ModuleLoad::Loaded => r.ok("archive_library", running),
                ModuleLoad::Unchecked(why) => r.ok("archive_library", format!("{running} ({why})")),
                ModuleLoad::Fails(e) => r.fail(
                    "archive_library",
                    format!("archive_library is '{archive_library}', but PostgreSQL cannot load it, so its archiver cannot start: {e}"),
                    "build and install walvault's module for this PostgreSQL version on the database host (make -C pgext PG_CONFIG=<this server's pg_config> install, see docs/WAL.md), or clear archive_library and use archive_command; then reload PostgreSQL",
                ),
            }
        } else {
            r.fail(
                "archive_library",
                format!("archive_library is '{archive_library}': it is not walvault's archive module, so archived WAL does not reach this repository"),
                "set archive_library = 'walvault' (the module in pgext/, see docs/WAL.md), or clear it and set archive_command = 'walvault archive-push %p'; then reload PostgreSQL",
            );
        }
    } else if archiving {
        if archive_command.contains("walvault") && archive_command.contains("archive-push") {
            r.ok("archive_command", archive_command.clone());
        } else if archive_command.is_empty() || archive_command == "(disabled)" {
            r.fail(
                "archive_command",
                "archive_mode is on but archive_command is empty: WAL piles up in pg_wal",
                "set archive_command = 'walvault archive-push %p', or archive_mode = off if the walvault daemon streams WAL",
            );
        } else {
            r.fail(
                "archive_command",
                format!("archive_command is '{archive_command}': it does not call walvault archive-push, so archived WAL does not reach this repository"),
                "set archive_command = 'walvault archive-push %p' (with --config if needed) and reload PostgreSQL",
            );
        }
    } else {
        r.ok("archive_mode", "off (WAL reaches the repository by streaming: run the daemon or `walvault stream`)");
    }
    let _ = conn.close().await;

    // Does WAL actually arrive? Switch segments and wait for the one just closed.
    let mut delivered = None;
    if !args.no_switch && !writable {
        r.skip("WAL delivery", "the repository is not writable");
    } else if !args.no_switch
        && let (Some(store), Some(d)) = (&store, &desc)
    {
        match switch_wal(&params).await {
                Ok(lsn) => {
                    let seg = WalSegmentName::of_lsn(sys.timeline, Lsn(lsn.0.saturating_sub(1)), d.descriptor.cluster.wal_segment_size);
                    let archive = WalArchive::new(store.clone(), std::sync::Arc::new(d.clone()), None);
                    let started = Instant::now();
                    let mut arrived = false;
                    while started.elapsed() < wait {
                        if archive.read_header(&seg.to_string()).await?.is_some() {
                            arrived = true;
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    if arrived {
                        delivered = Some(seg.to_string());
                        r.ok("WAL delivery", format!("switched WAL; {seg} reached the repository in {}", crate::util::human_duration(started.elapsed())));
                    } else {
                        r.fail(
                            "WAL delivery",
                            format!("switched WAL, but {seg} did not reach the repository within {}", crate::util::human_duration(wait)),
                            if archiving && !archive_library.is_empty() {
                                "check the server log for the archive module's messages (lines starting 'walvault:'; walvault.command) and pg_stat_archiver"
                            } else if archiving {
                                "check the server log for archive_command failures (pg_stat_archiver)"
                            } else {
                                "start the walvault daemon (or `walvault stream`), or set archive_command = 'walvault archive-push %p'"
                            },
                        );
                    }
                }
                Err(e) => r.warn(
                    "WAL delivery",
                    format!("cannot force a WAL switch ({e}); grant it with GRANT EXECUTE ON FUNCTION pg_switch_wal() TO <role>, or pass --no-switch"),
                ),
            }
    }
    // PostgreSQL's own account, read after the switch so that it covers the
    // attempt to archive the switched segment.
    if archiving {
        let state = async {
            let mut conn = Connection::connect(&database_params(&params), Mode::Database).await?;
            let mut state = archiver_state(&mut conn).await?;
            // The object is stored before PostgreSQL's archiver records the
            // success: give its statistics a moment to catch up with the delivery.
            if let Some(seg) = &delivered {
                let until = Instant::now() + Duration::from_secs(5);
                while state.last_archived.as_ref().is_none_or(|(wal, _, _)| wal < seg) && Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    state = archiver_state(&mut conn).await?;
                }
            }
            let _ = conn.close().await;
            Ok::<_, Error>(state)
        }
        .await;
        match state {
            Ok(state) => report_archiver(&mut r, &state),
            Err(e) => r.skip("archiver", format!("cannot read pg_stat_archiver: {e}")),
        }
    }
    finish(r)
}

/// What pg_stat_archiver and pg_wal/archive_status say about archiving.
#[derive(Debug)]
struct ArchiverState {
    archived: i64,
    /// The last file archived, when, and how long ago (seconds).
    last_archived: Option<(String, String, i64)>,
    failed: i64,
    last_failed: Option<(String, String, i64)>,
    /// Whether the last attempt failed (no success since the last failure).
    failing: bool,
    /// Files waiting as .ready; unknown without the rights to list archive_status.
    ready: Option<(i64, String)>,
}

async fn archiver_state(conn: &mut Connection) -> Result<ArchiverState> {
    let when = |col: &str| {
        format!(
            "coalesce(to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS\"Z\"'), ''), coalesce(extract(epoch FROM now() - {col})::bigint, 0)"
        )
    };
    let sql = format!(
        "SELECT archived_count, coalesce(last_archived_wal, ''), {}, failed_count, coalesce(last_failed_wal, ''), {}, \
         coalesce(last_failed_time > coalesce(last_archived_time, '-infinity'), false) FROM pg_stat_archiver",
        when("last_archived_time"),
        when("last_failed_time")
    );
    let sets = conn.simple_query(&sql).await?;
    let row = sets.first().and_then(|s| s.rows.first()).cloned().unwrap_or_default();
    let col = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    let int = |i: usize| col(i).parse::<i64>().unwrap_or(0);
    let file = |i: usize| Some((col(i), col(i + 1), int(i + 2))).filter(|(f, _, _)| !f.is_empty());
    let mut state = ArchiverState {
        archived: int(0),
        last_archived: file(1),
        failed: int(4),
        last_failed: file(5),
        failing: col(8) == "t",
        ready: None,
    };
    // pg_ls_archive_statusdir (PostgreSQL 12+) needs pg_monitor or superuser.
    let ready =
        conn.simple_query("SELECT count(*), coalesce(min(name), '') FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'").await;
    if let Ok(sets) = ready
        && let Some(row) = sets.first().and_then(|s| s.rows.first())
    {
        let n = row.first().cloned().flatten().and_then(|v| v.parse().ok()).unwrap_or(0);
        let oldest = row.get(1).cloned().flatten().unwrap_or_default();
        state.ready = Some((n, oldest.trim_end_matches(".ready").to_string()));
    }
    Ok(state)
}

/// More files than this waiting to be archived means archiving trails WAL.
const ARCHIVE_BACKLOG_WARN: i64 = 16;

fn report_archiver(r: &mut Report, s: &ArchiverState) {
    let ago = |secs: i64| match secs {
        ..=0 => "just now".to_string(),
        s => format!("{} ago", crate::util::human_duration(Duration::from_secs(s as u64))),
    };
    let last = match &s.last_archived {
        Some((wal, at, secs)) => format!("the last, {wal}, at {at} ({})", ago(*secs)),
        None => "none since the statistics were reset".to_string(),
    };
    let waiting = match &s.ready {
        Some((0, _)) => "; no file waits to be archived".to_string(),
        Some((1, oldest)) => format!("; 1 file waits to be archived ({oldest})"),
        Some((n, oldest)) => format!("; {n} files wait to be archived, the oldest {oldest}"),
        None => String::new(),
    };
    if s.failing
        && let Some((wal, at, secs)) = &s.last_failed
    {
        r.fail(
            "archiver",
            format!(
                "PostgreSQL's last attempt to archive failed: {wal} at {at} ({}), {} failure(s) in all; files archived: {}, {last}{waiting}",
                ago(*secs),
                s.failed,
                s.archived
            ),
            format!("read the server log at {at} for the error (walvault's own lines say what failed and what to do); PostgreSQL keeps retrying, and nothing is lost while the files wait in pg_wal"),
        );
    } else if let Some((n, oldest)) = &s.ready
        && *n > ARCHIVE_BACKLOG_WARN
    {
        r.warn(
            "archiver",
            format!("{n} files wait to be archived, the oldest {oldest}: archiving trails WAL; files archived: {}, {last}", s.archived),
        );
    } else {
        r.ok("archiver", format!("files archived: {}, {last}{waiting}", s.archived));
    }
}

fn finish(r: Report) -> Result<i32> {
    if r.failed > 0 {
        println!("{} check(s) failed", r.failed);
        Ok(exit::FAILURE)
    } else {
        println!("all checks passed");
        Ok(0)
    }
}

fn check_wal_settings(r: &mut Report, wal_level: &str, senders: u32) {
    if wal_level == "minimal" {
        r.fail(
            "wal_level",
            "wal_level is minimal: WAL cannot be archived or streamed",
            "set wal_level = replica in postgresql.conf and restart PostgreSQL",
        );
    } else {
        r.ok("wal_level", wal_level);
    }
    if senders < 2 {
        r.fail(
            "max_wal_senders",
            format!("max_wal_senders is {senders}; walvault needs 2 (streaming and a backup)"),
            "set max_wal_senders = 10 and restart PostgreSQL",
        );
    } else {
        r.ok("max_wal_senders", senders.to_string());
    }
}

/// wal_level and max_wal_senders over a normal connection (for when a
/// replication connection is refused).
async fn server_settings(params: &ConnParams) -> Result<(String, u32)> {
    let mut conn = Connection::connect(&database_params(params), Mode::Database).await?;
    let wal_level = conn.show("wal_level").await?;
    let senders = conn.show("max_wal_senders").await?.parse().unwrap_or(0);
    let _ = conn.close().await;
    Ok((wal_level, senders))
}

/// The replication conninfo, for a normal connection to a database.
fn database_params(params: &ConnParams) -> ConnParams {
    let mut params = params.clone();
    if params.dbname.as_deref().is_none_or(|d| d == "replication") {
        params.dbname = Some("postgres".into());
    }
    params
}

/// Forces a WAL segment switch over a normal SQL connection; returns the switch LSN.
async fn switch_wal(params: &ConnParams) -> Result<Lsn> {
    let mut conn = Connection::connect(&database_params(params), Mode::Database).await?;
    // On an idle server pg_switch_wal does nothing and names a segment that may
    // have been archived long ago; a restore point makes sure there is new WAL
    // to switch. (It needs the same rights as pg_switch_wal; without them the
    // switch below fails and says so.)
    let _ = conn.simple_query("SELECT pg_create_restore_point('walvault check')").await;
    let sets = conn.simple_query("SELECT pg_switch_wal()::text").await?;
    let _ = conn.close().await;
    let text = sets.first().and_then(|s| s.rows.first()).and_then(|r| r.first().cloned().flatten()).unwrap_or_default();
    text.parse().map_err(|_| Error::failed(format!("pg_switch_wal returned '{text}'")))
}

/// Whether PostgreSQL can load the archive module.
enum ModuleLoad {
    Loaded,
    /// Not known: the role may not LOAD it (a superuser's right), or cannot
    /// open a session to a database.
    Unchecked(String),
    Fails(crate::pg::PgError),
}

/// Loads the archive module into a session of its own, as the archiver
/// loads it: a module that is not installed, or was built for another major
/// version, fails here as it fails there (where it shows only in the server
/// log).
async fn load_module(params: &ConnParams, library: &str) -> ModuleLoad {
    let mut conn = match Connection::connect(&database_params(params), Mode::Database).await {
        Ok(c) => c,
        Err(e) => return ModuleLoad::Unchecked(format!("cannot open a session to try loading it: {e}")),
    };
    let loaded = conn.simple_query(&format!("LOAD '{}'", library.replace('\'', "''"))).await;
    let _ = conn.close().await;
    match loaded {
        Ok(_) => ModuleLoad::Loaded,
        Err(e) if e.code() == Some("42501") => ModuleLoad::Unchecked("whether it loads is not checked: LOAD needs a superuser".into()),
        Err(e) if e.code().is_some() => ModuleLoad::Fails(e),
        Err(e) => ModuleLoad::Unchecked(format!("could not try loading it: {e}")),
    }
}

/// Whether an archive_library setting names walvault's module (`walvault`,
/// or a path to `walvault.so`).
fn is_walvault_module(library: &str) -> bool {
    let file = library.rsplit('/').next().unwrap_or(library);
    file.strip_suffix(".so").unwrap_or(file) == "walvault"
}
