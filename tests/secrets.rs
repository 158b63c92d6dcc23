//! Secrets and least privilege: a full cycle (init, archive, backup, restore,
//! verify, a failing S3 login, a failing PostgreSQL login) run with a role
//! that has only REPLICATION, a PostgreSQL password and an S3 secret; no output,
//! log, spool file or process argv captured along the way may contain either.
//! Files that hold secrets or keys and are readable by others are refused.

mod common;
mod support;

use std::path::Path;

use common::env::{Env, stderr, stdout};
use common::pg::{PgCluster, PgOptions};
use common::s3::S3Server;
use support::*;

const PG_PASSWORD: &str = "Pg-Secret-7f3a9c51";
const WRONG_PG_PASSWORD: &str = "Wrong-Pg-Pass-c0ffee42";
const WRONG_S3_SECRET: &str = "Wrong-S3-Secret-91b2d4e6";

/// Every walvault argv visible in /proc right now.
fn walvault_argvs() -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(raw) = std::fs::read(e.path().join("cmdline"))
            && let text = String::from_utf8_lossy(&raw).replace('\0', " ")
            && text.contains("walvault")
        {
            out.push(text);
        }
    }
    out
}

/// Every file's bytes under `dir` (logs, spool), as text.
fn tree_text(dir: &Path) -> String {
    let mut text = String::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n != "walvault.toml") {
                text.push_str(&String::from_utf8_lossy(&std::fs::read(&p).unwrap_or_default()));
            }
        }
    }
    text
}

#[test]
fn a_full_cycle_with_a_replication_only_role_leaks_no_secret() {
    let s3 = S3Server::shared();
    let pg = PgCluster::start(
        PgOptions::new()
            .auth("scram-sha-256")
            .guc("archive_mode", "on")
            .guc("archive_command", "'/bin/false'")
            .guc("wal_keep_size", "'1GB'"),
    );
    pg.psql(&format!("create role agent login replication password '{PG_PASSWORD}'"));
    let mut env = Env::builder(&pg).s3(s3).build();
    let conninfo = format!("host=127.0.0.1 port={} user=agent dbname=postgres password={PG_PASSWORD}", pg.port());
    env.set("postgres.conninfo", &format!("\"{conninfo}\""));

    let mut transcript = String::new();
    let mut argvs = Vec::new();
    let record = |out: &std::process::Output, transcript: &mut String| {
        transcript.push_str(&stdout(out));
        transcript.push_str(&stderr(out));
    };
    let out = env.run(&["-vv", "init"]);
    record(&out, &mut transcript);
    assert!(out.status.success(), "init with a replication-only role: {}", stderr(&out));
    start_archiving(&pg, &env);
    pg.psql("create table t(id int); insert into t select generate_series(1, 10000)");
    let mut backup = env.cmd(&["-vv", "backup"]).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // Sample the argv of every walvault process while the backup runs.
    while backup.try_wait().unwrap().is_none() {
        argvs.extend(walvault_argvs());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = backup.wait_with_output().unwrap();
    record(&out, &mut transcript);
    assert!(out.status.success(), "backup with a replication-only role: {}", stderr(&out));
    switch_and_wait_archived(&pg);
    // check forces a WAL switch: the one grant README's "Configuring PostgreSQL" names.
    let out = env.run(&["-vv", "check"]);
    record(&out, &mut transcript);
    // Without the grant, check warns and names it.
    assert!(out.status.success(), "check without the grant: {}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("grant it with GRANT EXECUTE ON FUNCTION pg_switch_wal() TO <role>"), "{}", stdout(&out));
    pg.psql("grant execute on function pg_switch_wal() to agent");
    let out = env.run(&["-vv", "check"]);
    record(&out, &mut transcript);
    assert!(out.status.success(), "check with the documented grant: {}{}", stdout(&out), stderr(&out));
    assert!(!stdout(&out).contains("cannot force a WAL switch"), "{}", stdout(&out));
    let dest = env.dir.join("restored");
    for args in [vec!["-vv", "restore", "--pgdata", dest.to_str().unwrap()], vec!["-vv", "verify", "--deep"], vec!["info"]] {
        let out = env.run(&args);
        record(&out, &mut transcript);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }

    // A wrong S3 secret and a wrong PostgreSQL password: failures that name neither.
    env.set_env("WALVAULT_REPOSITORY_SECRET_ACCESS_KEY", WRONG_S3_SECRET);
    let out = env.run(&["-vv", "info"]);
    assert!(!out.status.success(), "a wrong S3 secret must fail");
    record(&out, &mut transcript);
    env.set_env("WALVAULT_REPOSITORY_SECRET_ACCESS_KEY", s3.secret_key());
    let wrong = conninfo.replace(PG_PASSWORD, WRONG_PG_PASSWORD);
    env.set_env("WALVAULT_POSTGRES_CONNINFO", &wrong);
    let out = env.run(&["-vv", "backup"]);
    assert!(!out.status.success(), "a wrong PostgreSQL password must fail");
    let failed = stderr(&out);
    assert!(failed.contains("password authentication failed") || failed.contains("authentication"), "{failed}");
    record(&out, &mut transcript);

    let pg_log = std::fs::read_to_string(pg.log_file()).unwrap_or_default();
    let restored = tree_text(&dest.join("postgresql.auto.conf"));
    let spool = tree_text(&env.dir.join("spool"));
    let argv = argvs.join("\n");
    for secret in [PG_PASSWORD, WRONG_PG_PASSWORD, s3.secret_key(), WRONG_S3_SECRET] {
        for (what, text) in
            [("output", &transcript), ("argv", &argv), ("PostgreSQL log", &pg_log), ("spool", &spool), ("restore settings", &restored)]
        {
            assert!(!text.contains(secret), "{what} contains a secret ({secret}):\n{text}");
        }
    }
    assert!(!argv.is_empty(), "walvault processes were seen");
}

#[test]
fn files_holding_secrets_or_keys_must_be_private() {
    let pg = PgCluster::start(PgOptions::new());
    let mut env = Env::builder(&pg).set("repository.secret_access_key", "\"not-used-by-a-file-repository\"").build();
    env.run_ok(&["init"]);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&env.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, err) = env.run_err(&["info"]);
    assert_eq!(code, 2);
    assert_eq!(
        err.trim_end(),
        format!("error: {0} holds secrets and is readable by group or others (mode 0644)\nhint: run: chmod 600 {0}", env.config.display())
    );
    env.set("repository.secret_access_key", "\"\"");
    let identity = env.keys.join("restore.key");
    std::fs::set_permissions(&identity, std::fs::Permissions::from_mode(0o640)).unwrap();
    let dest = env.dir.join("restore-here");
    let (code, err) = env.run_err(&["verify", "--deep"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&format!("{} holds secrets and is readable by group or others (mode 0640)", identity.display())), "{err}");
    assert!(!dest.exists());
}

/// The harness's S3 identity with only Read and List (tests/common/s3/weed.rs).
const READER: (&str, &str) = ("walvaultreader", "walvaultreadersecret");

#[test]
fn read_only_store_credentials_are_enough_to_restore_and_verify_and_are_refused_for_writes() {
    let pg = archiving_cluster(&[]);
    let mut env = Env::builder(&pg).s3(S3Server::shared()).build();
    env.run_ok(&["init"]);
    start_archiving(&pg, &env);
    pg.psql("create table t(id int); insert into t select generate_series(1, 1000)");
    env.run_ok(&["backup"]);
    switch_and_wait_archived(&pg);
    pg.set_guc("archive_command", "'/bin/false'");

    env.set("repository.access_key_id", &format!("\"{}\"", READER.0));
    env.set("repository.secret_access_key", &format!("\"{}\"", READER.1));
    env.run_ok(&["info"]);
    env.run_ok(&["verify", "--deep"]);
    let dest = env.dir.join("restored");
    env.run_ok(&["restore", "--pgdata", dest.to_str().unwrap()]);

    let (code, err) = env.run_err(&["backup"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("permission denied on object"), "{err}");
    assert!(err.contains("hint: check the repository credentials and permissions"), "{err}");
    assert!(!err.contains(READER.1), "{err}");
}
