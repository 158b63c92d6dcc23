//! archive-push and archive-get through the built binary, as PostgreSQL runs
//! them: what is refused and how it is said, the parallel push of a backlog
//! (never acknowledging a segment before it is stored), archive-get's exit
//! codes when a file is missing and when the store is down, and a recovery
//! served from the prefetch spool.

mod common;
mod wal_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::env::{Env, chown_tree, stderr, stdout};
use common::pg::{PgCluster, PgOptions, archive_module, quote_literal};
use common::s3::S3Server;
use wal_support::*;

fn archiving(opts: PgOptions) -> PgCluster {
    PgCluster::start(opts.guc("archive_mode", "on").guc("archive_command", "'/bin/false'"))
}

/// Writes some WAL and switches: returns the name of the completed segment.
fn complete_a_segment(pg: &PgCluster) -> String {
    pg.psql("create table if not exists filler(x int); insert into filler select generate_series(1, 2000)");
    let name = pg.psql("select pg_walfile_name(pg_current_wal_lsn())");
    pg.psql("select pg_switch_wal()");
    name
}

/// A copy of pg_wal/NAME in `dir` (as the postgres user's file), under `as_name`.
fn copy_segment(pg: &PgCluster, name: &str, dir: &Path, as_name: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let dest = dir.join(as_name);
    std::fs::copy(pg.data_dir().join("pg_wal").join(name), &dest).unwrap();
    chown_tree(dir);
    dest
}

fn blake3_of(path: &Path) -> String {
    blake3::hash(&std::fs::read(path).unwrap()).to_hex().to_string()
}

#[test]
fn archive_push_accepts_the_same_segment_twice_and_refuses_others() {
    let pg = archiving(small_segments());
    let env = Env::new(&pg);
    env.run_ok(&["init"]);
    let name = complete_a_segment(&pg);
    let work = env.dir.join("work");
    let seg = copy_segment(&pg, &name, &work, &name);
    let seg_arg = seg.to_str().unwrap();
    let hash = blake3_of(&seg);

    let out = env.run(&["archive-push", seg_arg]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!(" INFO {name} archived\n")), "{}", stderr(&out));

    // PostgreSQL may archive the same file again after a crash: success, with a warning.
    let out = env.run(&["archive-push", seg_arg]);
    assert!(out.status.success(), "{}", stderr(&out));
    let warning = format!(" WARN {name} is already in the repository with the same content (blake3 {hash}); nothing to do\n");
    assert!(stderr(&out).contains(&warning), "{}", stderr(&out));

    // Other content under the same name: page headers intact, one byte of a record changed.
    let other_dir = env.dir.join("other");
    let other = copy_segment(&pg, &name, &other_dir, &name);
    let mut data = std::fs::read(&other).unwrap();
    data[8192 + 4000] ^= 0xFF;
    std::fs::write(&other, &data).unwrap();
    let other_hash = blake3_of(&other);
    let (code, err) = env.run_err(&["archive-push", other.to_str().unwrap()]);
    assert_eq!(code, 3, "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error:") || l.starts_with("hint:")).collect::<Vec<_>>(),
        vec![
            format!(
                "error: cannot archive {name}: {name} is already in the repository with different content (stored blake3 {hash}, this file blake3 {other_hash}); refusing to overwrite it"
            )
            .as_str(),
            "hint: two different files carry this name: is another server (a restored copy, an old primary) archiving into the same \
             repository? Check archive_command and repository.url on every server; the stored file was kept",
        ],
        "{err}"
    );
    assert_eq!(fetch(&env, &name).unwrap(), std::fs::read(&seg).unwrap(), "the stored segment is unchanged");

    // A segment of another cluster, even under a name the repository does not have yet.
    let stranger = archiving(small_segments());
    let theirs = complete_a_segment(&stranger);
    let foreign = copy_segment(&stranger, &theirs, &env.dir.join("foreign"), &theirs);
    let mine_id = pg.psql("select system_identifier from pg_control_system()");
    let their_id = stranger.psql("select system_identifier from pg_control_system()");
    let (code, err) = env.run_err(&["archive-push", foreign.to_str().unwrap()]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains(&format!(
            "error: refusing to archive {theirs}: {theirs} belongs to another cluster: its system identifier is {their_id}, the repository's is {mine_id}\n\
             hint: this file is not WAL of the repository's cluster, or it is damaged; check archive_command and repository.url\n"
        )),
        "{err}"
    );

    // A segment under the name of the next one (a misplaced or recycled file).
    let next = segment_of(1, &pg.psql("select pg_current_wal_lsn()"));
    let misplaced = copy_segment(&pg, &name, &env.dir.join("misplaced"), &next);
    let (code, err) = env.run_err(&["archive-push", misplaced.to_str().unwrap()]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains(&format!("error: refusing to archive {next}: {next} is damaged at offset 0: page address ")), "{err}");
    assert!(err.contains("(a recycled or misplaced segment)"), "{err}");

    // A truncated segment.
    let short_dir = env.dir.join("short");
    let short = copy_segment(&pg, &name, &short_dir, &name);
    std::fs::write(&short, &std::fs::read(&seg).unwrap()[..8192 * 3]).unwrap();
    let (code, err) = env.run_err(&["archive-push", short.to_str().unwrap()]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains(&format!("error: refusing to archive {name}: {name} is 24576 bytes, but the server's WAL segments are 1048576 bytes")),
        "{err}"
    );
    // None of the refused files reached the repository.
    assert_eq!(stored_segments(&env), vec![name.clone()]);
}

/// WAL is compressed at `compression.wal_level`, base backups at
/// `compression.level`: the same segment stored at two WAL levels differs in
/// size, and the backup level does not touch it.
#[test]
fn wal_is_compressed_at_its_own_level() {
    let pg = archiving(small_segments());
    let mut env = Env::new(&pg);
    env.run_ok(&["init"]);
    let name = complete_a_segment(&pg);
    let seg = copy_segment(&pg, &name, &env.dir.join("work"), &name);
    let stored_size = |env: &Env| std::fs::metadata(&repo_wal(env)[&name]).unwrap().len();
    let mut sizes = Vec::new();
    for (level, wal_level) in [("19", None), ("1", None), ("1", Some("19"))] {
        env.set("compression.level", level);
        if let Some(w) = wal_level {
            env.set("compression.wal_level", w);
        }
        let object = repo_wal(&env).get(&name).cloned();
        if let Some(o) = object {
            std::fs::remove_file(o).unwrap();
        }
        let out = env.run(&["archive-push", seg.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        sizes.push(stored_size(&env));
    }
    // (The signed record in front of the payload varies by some bytes: its
    // time, its link to the predecessor. The levels differ by far more.)
    assert!(sizes[0].abs_diff(sizes[1]) * 100 < sizes[1], "compression.level must not change how WAL is stored: {sizes:?}");
    assert!(sizes[2] * 100 < sizes[1] * 95, "wal_level 19 must pack the segment tighter than the default 1: {sizes:?}");
}

/// A backlog of 16 segments archived through a wrapper that records, for each
/// segment PostgreSQL is told is archived, whether the repository had it then.
struct BacklogRun {
    pg: PgCluster,
    env: Env,
    made: Vec<String>,
    acks: String,
    log: String,
    reference: CopyArchive,
}

fn archive_a_backlog(server_env: &[(&str, &str)], settings: &[(&str, &str)]) -> BacklogRun {
    let pg = archiving(server_env.iter().fold(small_segments(), |o, (k, v)| o.server_env(k, v)));
    let mut env = Env::builder(&pg).set("wal.push_parallel", "4").build();
    for (k, v) in settings {
        env.set(k, v);
    }
    env.run_ok(&["init"]);
    let reference = CopyArchive::new(&env, "reference");
    let acks = env.dir.join("acks.log");
    let repo = env.repo_dir.clone().unwrap();
    // The archive_command PostgreSQL runs: keep a reference copy, push, and
    // record whether the object was in the repository when PostgreSQL was told.
    let wrapper = env.dir.join("archive.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nf=$(basename \"$1\")\ncp \"$1\" {refdir}/$f\n{push} || exit $?\n\
             if [ -f {repo}/wal/$(echo $f | cut -c1-16)/$f ]; then echo \"$f stored\" >> {acks}; else echo \"$f ACKNOWLEDGED-BEFORE-STORED\" >> {acks}; fi\n",
            refdir = reference.dir.display(),
            push = env.archive_command().replace("%p", "\"$1\""),
            repo = repo.display(),
            acks = acks.display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    chown_tree(&env.dir);

    // While archive_command fails, a backlog builds up.
    let mut made = Vec::new();
    for _ in 0..16 {
        made.push(complete_a_segment(&pg));
    }
    let status = pg.data_dir().join("pg_wal/archive_status");
    let ready = std::fs::read_dir(&status).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".ready")).count();
    assert!(ready >= 16, "{ready} .ready files");

    pg.set_guc("archive_command", &format!("{} %p", wrapper.display()));
    wait_archived(&pg);
    let acks = std::fs::read_to_string(&acks).unwrap();
    let log = std::fs::read_to_string(pg.log_file()).unwrap();
    BacklogRun { pg, env, made, acks, log, reference }
}

impl BacklogRun {
    /// PostgreSQL was told of each segment only once it was stored, and the
    /// repository holds what PostgreSQL archived, byte for byte.
    fn assert_nothing_acknowledged_early(&self) {
        assert!(!self.acks.contains("ACKNOWLEDGED-BEFORE-STORED"), "{}", self.acks);
        for m in &self.made {
            assert!(self.acks.contains(&format!("{m} stored\n")), "{m} acknowledged: {}", self.acks);
        }
        for (name, data) in self.reference.files().into_iter().filter(|(n, _)| n.len() == 24) {
            assert_eq!(fetch(&self.env, &name).as_deref(), Some(data.as_slice()), "{name}");
        }
        let _ = &self.pg;
    }
}

/// A backlog of `.ready` segments is stored by the background pusher, and
/// PostgreSQL is told a segment is archived only once the repository has it,
/// even when the pusher fails on some (the call then stores its segment itself).
#[test]
fn backlog_is_pushed_ahead_and_never_acknowledged_early() {
    // Every fourth store of a WAL object fails (in each archive-push process).
    let run = archive_a_backlog(&[("WALVAULT_TEST_FAULTS", "put_if_absent:4:enospc")], &[]);
    run.assert_nothing_acknowledged_early();
    let log = &run.log;
    // A call either waits for the pusher to store its segment, or finds it stored.
    let by_pusher = log.matches(" archived by the background pusher (blake3 ").count()
        + log.matches(" was already archived by an earlier call (blake3 ").count();
    let pusher_failed = log.matches(" (archive-push will try it itself): ").count();
    let stored_itself = log.matches("; storing it here").count();
    eprintln!("{by_pusher} segments stored by the background pusher, {pusher_failed} failed there and were stored by the call itself");
    assert!(by_pusher >= 8, "the backlog was not stored by the background pusher:\n{log}");
    assert!(
        pusher_failed >= 1 && stored_itself >= pusher_failed,
        "the injected failures did not hit the pusher, or the calls did not take over:\n{log}"
    );
}

/// The call for the last segment of a backlog (nothing ready after it) waits
/// for the pusher already sealing that segment instead of sealing it a second
/// time. The pusher's last store (of 16) is slowed, so it is still at the
/// last segment when PostgreSQL asks for it.
#[test]
fn the_end_of_a_backlog_is_sealed_once() {
    let run = archive_a_backlog(&[("WALVAULT_TEST_FAULTS", "put_if_absent:16:delay=2000")], &[]);
    run.assert_nothing_acknowledged_early();
    for m in &run.made {
        assert!(
            run.log.contains(&format!("{m} archived by the background pusher (blake3 "))
                || run.log.contains(&format!("{m} was already archived by an earlier call (blake3 ")),
            "{m} was sealed by its call, not (only) by the background pusher:\n{}",
            run.log
        );
    }
}

/// The background pusher killed (like kill -9) between storing a segment and
/// writing its marker, again and again: the calls take over, and still
/// nothing is acknowledged before it is stored or lost.
#[test]
fn a_pusher_killed_mid_backlog_loses_nothing() {
    let run = archive_a_backlog(&[("WALVAULT_TEST_CRASH_AT", "archive_push.stored:3")], &[]);
    run.assert_nothing_acknowledged_early();
    let kills = run.log.matches("test crash point archive_push.stored reached").count();
    eprintln!("the pusher was killed {kills} times");
    assert!(kills >= 1, "the pusher never reached its kill point:\n{}", run.log);
}

/// A spool walvault cannot write (no markers, no pusher lock): each call
/// stores its segment itself, at once, rather than waiting for a pusher.
#[test]
fn a_backlog_with_an_unwritable_spool_is_archived_by_the_calls() {
    let spool = tempfile::Builder::new().prefix("walvault-ro-spool-").tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(spool.path(), std::os::unix::fs::PermissionsExt::from_mode(0o555)).unwrap();
    let started = std::time::Instant::now();
    let run = archive_a_backlog(&[], &[("wal.spool_dir", &format!("\"{}\"", spool.path().display()))]);
    run.assert_nothing_acknowledged_early();
    assert!(run.log.contains("cannot hold the background pusher's lock"), "{}", run.log);
    assert!(started.elapsed() < Duration::from_secs(50), "the calls waited for a pusher that cannot run: {:?}", started.elapsed());
}

/// The archive module (`archive_library = 'walvault'`, pgext/): while
/// walvault.command cannot run walvault, PostgreSQL keeps the backlog and the
/// log says why; once it can, one archive server stores the whole backlog,
/// byte for byte, through the background pusher. Injected store failures are
/// reported and retried; a killed server is replaced at the next file; the
/// server leaves with PostgreSQL.
#[test]
fn the_archive_module_archives_through_one_long_lived_server() {
    let module = archive_module();
    let mut pg = PgCluster::start(
        small_segments()
            .guc("archive_mode", "on")
            .guc("archive_library", &quote_literal(&module.display().to_string()))
            .guc("walvault.command", "'/bin/false'")
            // The second and third stores fail in each walvault process: the
            // pusher's, which the server then stores itself, and the server's
            // own, which PostgreSQL is told of and retries.
            .server_env("WALVAULT_TEST_FAULTS", "put_if_absent:2-3:enospc"),
    );
    let env = Env::builder(&pg).set("wal.push_parallel", "4").build();
    env.run_ok(&["init"]);

    let mut made = Vec::new();
    for _ in 0..12 {
        made.push(complete_a_segment(&pg));
    }
    wait_for("the module to report that walvault.command does not run walvault", Duration::from_secs(30), || {
        let log = std::fs::read_to_string(pg.log_file()).unwrap();
        match log.contains("walvault: the archive server (pid ") && log.contains("check walvault.command") {
            true => Ok(()),
            false => Err(pg.log_tail()),
        }
    });
    assert_eq!(
        pg.psql("select last_archived_wal is null from pg_stat_archiver"),
        "t",
        "something was archived while walvault.command was /bin/false"
    );

    let command = env.archive_command().replace(" archive-push %p", "");
    pg.set_guc("walvault.command", &command);
    wait_archived(&pg);
    for name in &made {
        let data = std::fs::read(pg.data_dir().join("pg_wal").join(name)).unwrap();
        assert_eq!(fetch(&env, name).as_deref(), Some(data.as_slice()), "{name}");
    }
    let log = std::fs::read_to_string(pg.log_file()).unwrap();
    let started = format!("): exec {command} archive-server");
    assert_eq!(log.matches(&started).count(), 1, "the backlog did not go through one server:\n{log}");
    assert!(log.contains(" archived by the background pusher (blake3 "), "the backlog was not pushed ahead:\n{log}");
    assert!(
        log.contains("walvault: could not archive \"") && log.contains("(archive-push exit code "),
        "no injected store failure was reported through the module:\n{log}"
    );

    // check recognizes the module, and WAL it switches arrives through it.
    let out = env.run(&["check", "--wait", "60s"]);
    let report = stdout(&out);
    assert!(out.status.success(), "{report}{}", stderr(&out));
    let expected = format!("ok    archive_library: {}: walvault's archive module, running {command} archive-server", module.display());
    assert!(report.contains(&expected), "{report}");

    // A killed server is replaced at the next file; nothing is lost.
    let pid = server_pid(&log, &started);
    nix_kill9(pid);
    let more: Vec<String> = (0..3).map(|_| complete_a_segment(&pg)).collect();
    wait_archived(&pg);
    for name in &more {
        let data = std::fs::read(pg.data_dir().join("pg_wal").join(name)).unwrap();
        assert_eq!(fetch(&env, name).as_deref(), Some(data.as_slice()), "{name}");
    }
    let log = std::fs::read_to_string(pg.log_file()).unwrap();
    assert_eq!(log.matches(&started).count(), 2, "the killed server was not replaced:\n{log}");

    // walvault upgraded under a running server, both ways installs do it: a
    // symlink pointed at a new binary, then a new file put at the binary's
    // path (a new inode, as a package manager does). Each time the next file
    // goes to a server running the new binary, without a failed attempt, and
    // nothing is lost.
    let bin_dir = env.dir.join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let install = |name: &str| {
        let staged = bin_dir.join(format!("{name}.staged"));
        std::fs::copy(&env.bin, &staged).unwrap();
        chown_tree(&staged);
        std::fs::rename(&staged, bin_dir.join(name)).unwrap();
    };
    let point_at = |target: &str| {
        let staged = bin_dir.join("walvault.link");
        std::os::unix::fs::symlink(target, &staged).unwrap();
        std::fs::rename(&staged, bin_dir.join("walvault")).unwrap();
    };
    install("walvault-1");
    point_at("walvault-1");
    let command = command.replace(&env.bin.display().to_string(), &bin_dir.join("walvault").display().to_string());
    pg.set_guc("walvault.command", &command);
    let first = complete_a_segment(&pg);
    wait_archived(&pg);
    let started = format!("): exec {command} archive-server");
    let lost = "ended before answering";
    let mut archived = vec![first];
    let upgrades: [(&str, &dyn Fn()); 2] = [
        ("a symlink pointed at a new binary", &|| {
            install("walvault-2");
            point_at("walvault-2");
        }),
        ("a new file at the binary's path", &|| install("walvault-2")),
    ];
    for (step, (how, upgrade)) in upgrades.iter().enumerate() {
        let log = std::fs::read_to_string(pg.log_file()).unwrap();
        assert_eq!(log.matches(&started).count(), step + 1, "no server of its own before upgrade by {how}:\n{log}");
        let old_pid = server_pid(&log, &started);
        let lost_before = log.matches(lost).count();
        upgrade();
        archived.extend((0..2).map(|_| complete_a_segment(&pg)));
        wait_archived(&pg);
        let log = std::fs::read_to_string(pg.log_file()).unwrap();
        let noticed = format!(
            "walvault: the archive server (pid {old_pid}) runs a walvault binary that has since been replaced; starting the new one"
        );
        assert!(log.contains(&noticed), "the upgrade by {how} was not noticed:\n{log}");
        assert_eq!(log.matches(&started).count(), step + 2, "the upgrade by {how} got no server of its own:\n{log}");
        assert_eq!(log.matches(lost).count(), lost_before, "a server was lost across the upgrade by {how}:\n{log}");
        assert!(!Path::new(&format!("/proc/{old_pid}")).exists(), "the old server {old_pid} is still there");
    }
    for name in &archived {
        let data = std::fs::read(pg.data_dir().join("pg_wal").join(name)).unwrap();
        assert_eq!(fetch(&env, name).as_deref(), Some(data.as_slice()), "{name}");
    }
    let log = std::fs::read_to_string(pg.log_file()).unwrap();

    // The server leaves with the archiver.
    let pid = server_pid(&log, &started);
    pg.stop();
    wait_for("the archive server to leave with PostgreSQL", Duration::from_secs(10), || {
        match Path::new(&format!("/proc/{pid}")).exists() {
            true => Err(format!("pid {pid} still runs")),
            false => Ok(()),
        }
    });
}

/// The pid in the last "started the archive server (pid N)" line for `started`.
fn server_pid(log: &str, started: &str) -> i32 {
    let line = log.lines().rfind(|l| l.contains(started)).expect("a started line");
    let rest = &line[line.find("(pid ").expect("a pid") + 5..];
    rest[..rest.find(')').unwrap()].parse().unwrap()
}

fn nix_kill9(pid: i32) {
    // SAFETY: sends a signal; the pid is the server's, a child of the archiver.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill -9 {pid}");
}

#[test]
fn archive_get_exits_1_only_for_a_missing_file() {
    let pg = archiving(small_segments());
    let mut env = Env::builder(&pg).set("repository.retries", "2").build();
    env.run_ok(&["init"]);
    pg.set_guc("archive_command", &env.archive_command());
    let name = complete_a_segment(&pg);
    wait_archived(&pg);
    let dest = env.dir.join("RECOVERYXLOG");
    let dest_arg = dest.to_str().unwrap();

    let out = env.run(&["archive-get", &name, dest_arg]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(pg.data_dir().join("pg_wal").join(&name)).unwrap());

    // Missing: a segment never written, and the history file recovery probes for.
    for missing in ["0000000100000000000000F0", "00000002.history"] {
        let out = env.run(&["archive-get", missing, dest_arg]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(stderr(&out).contains(&format!(" INFO {missing} is not in the repository\n")), "{}", stderr(&out));
    }

    // The store fails (every read a 503, retried): never "missing", for a file
    // that is there or one that is not.
    env.set_env("WALVAULT_TEST_FAULTS", "get:*:503;head:*:503;list:*:503");
    for file in [name.as_str(), "0000000100000000000000F0"] {
        let out = env.run(&["archive-get", file, dest_arg]);
        assert_eq!(out.status.code(), Some(126), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(&format!("error: archive-get {file}: ")), "{err}");
        assert!(err.contains("503"), "{err}");
    }
    env.set_env("WALVAULT_TEST_FAULTS", "");

    // The repository directory cannot be read.
    let repo = env.repo_dir.clone().unwrap();
    std::fs::set_permissions(&repo, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    let out = env.run(&["archive-get", &name, dest_arg]);
    std::fs::set_permissions(&repo, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    assert_eq!(out.status.code(), Some(126), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("error: archive-get {name}: ")), "{}", stderr(&out));
    assert!(stderr(&out).contains("\nhint: "), "{}", stderr(&out));
}

#[test]
fn archive_get_with_the_s3_store_down_is_not_missing() {
    let mut s3 = S3Server::start();
    let pg = archiving(small_segments());
    let env = Env::builder(&pg).s3(&s3).set("repository.retries", "2").set("repository.timeout", "\"3s\"").build();
    env.run_ok(&["init"]);
    pg.set_guc("archive_command", &env.archive_command());
    let name = complete_a_segment(&pg);
    wait_archived(&pg);
    let dest = env.dir.join("RECOVERYXLOG");
    let dest_arg = dest.to_str().unwrap();
    assert_eq!(env.run(&["archive-get", &name, dest_arg]).status.code(), Some(0));

    s3.stop();
    for file in [name.as_str(), "0000000100000000000000F0", "00000002.history"] {
        let out = env.run(&["archive-get", file, dest_arg]);
        assert_eq!(out.status.code(), Some(126), "{file}: {}", stderr(&out));
        assert!(stderr(&out).contains(&format!("error: archive-get {file}: ")), "{}", stderr(&out));
    }
    s3.start_again();
    let out = env.run(&["archive-get", &name, dest_arg]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(env.run(&["archive-get", "0000000100000000000000F0", dest_arg]).status.code(), Some(1));
}

/// Recovery over many segments: restore_command is answered from the prefetch
/// spool, which never holds more than `wal.prefetch` segments and is emptied
/// when recovery ends.
#[test]
fn recovery_is_served_from_a_bounded_prefetch_spool() {
    let pg = archiving(small_segments());
    let env = Env::builder(&pg).set("wal.prefetch", "6").build();
    env.run_ok(&["init"]);
    pg.set_guc("archive_command", &env.archive_command());
    env.run_ok(&["backup"]);
    pgbench(&pg, &["-i", "-s", "3", "-q"]);
    pgbench(&pg, &["-n", "-c", "2", "-t", "2000"]);
    let rows = pg.psql("select count(*) from pgbench_history");
    pg.psql("select pg_switch_wal()");
    wait_archived(&pg);

    let data = env.new_dir("restored").join("data");
    env.run_ok(&["restore", "--pgdata", data.to_str().unwrap()]);
    let spool = env.dir.join("spool");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (spool, stop) = (spool.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut most = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                most = most.max(spooled_segments(&spool));
                std::thread::sleep(Duration::from_millis(20));
            }
            most
        })
    };
    let restored = PgCluster::adopt(&data);
    wait_for("recovery to end", Duration::from_secs(120), || match restored.psql("select pg_is_in_recovery()").as_str() {
        "f" => Ok(()),
        other => Err(other.to_string()),
    });
    assert_eq!(restored.psql("select count(*) from pgbench_history"), rows);
    wait_for("the prefetch spool to be emptied", Duration::from_secs(30), || match spooled_segments(&spool) {
        0 => Ok(()),
        n => Err(format!("{n} segments left")),
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let most = sampler.join().unwrap();

    let log = std::fs::read_to_string(restored.log_file()).unwrap();
    let spooled = log.matches(" served from the prefetch spool").count();
    let direct = log.matches(" fetched from the repository").count();
    eprintln!("restore_command: {spooled} segments from the spool, {direct} files fetched directly; spool held at most {most}");
    assert!(most <= 6, "the spool held {most} segments, more than wal.prefetch");
    assert!(spooled >= 2 * direct, "recovery was not served from the spool ({spooled} from the spool, {direct} directly):\n{log}");
    let fatal: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("FATAL") || l.contains("PANIC") || l.contains("error: archive-get"))
        .filter(|l| !l.contains("not yet accepting connections") && !l.contains("is starting up"))
        .collect();
    assert!(fatal.is_empty(), "{fatal:?}");
}

/// Prefetched segments in every prefetch spool under `spool`.
fn spooled_segments(spool: &Path) -> usize {
    let Ok(dirs) = std::fs::read_dir(spool) else { return 0 };
    dirs.flatten()
        .filter(|d| d.file_name().to_string_lossy().starts_with("prefetch-"))
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .filter(|f| f.file_name().to_string_lossy().len() == 24)
        .count()
}
