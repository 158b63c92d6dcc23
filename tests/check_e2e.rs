//! `walvault check` against real clusters: it passes on a good setup (the
//! forced WAL switch reaches the repository) and fails, saying what to change,
//! on each setup that would lose WAL or backups.

mod common;

use common::env::{Env, stdout};
use common::pg::{PgCluster, PgOptions};

/// Runs check; returns (exit code, stdout). The report goes to stdout.
fn check(env: &Env, args: &[&str]) -> (i32, String) {
    let mut all = vec!["check"];
    all.extend_from_slice(args);
    let out = env.run(&all);
    let text = stdout(&out);
    eprintln!("{text}{}", common::env::stderr(&out));
    (out.status.code().unwrap_or(-1), text)
}

/// The report's line for one check, with its `fix:` line when it failed.
fn line<'a>(report: &'a str, check: &str) -> Vec<&'a str> {
    let lines: Vec<&str> = report.lines().collect();
    let i = lines
        .iter()
        .position(|l| l[6.min(l.len())..].starts_with(&format!("{check}:")))
        .unwrap_or_else(|| panic!("no '{check}' line in:\n{report}"));
    let mut out = vec![lines[i]];
    if let Some(fix) = lines.get(i + 1).filter(|l| l.starts_with("      fix: ")) {
        out.push(fix);
    }
    out
}

fn archiving_cluster() -> PgCluster {
    PgCluster::start(PgOptions::new().guc("archive_mode", "on").guc("archive_command", "'/bin/false'"))
}

#[test]
fn check_passes_when_archive_command_delivers_wal() {
    let pg = archiving_cluster();
    let env = Env::new(&pg);
    env.run_ok(&["init"]);
    pg.set_guc("archive_command", &env.archive_command());
    let (code, report) = check(&env, &["--wait", "60s"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(line(&report, "archive_command"), vec![format!("ok    archive_command: {}", env.archive_command()).as_str()]);
    let delivery = line(&report, "WAL delivery")[0];
    assert!(delivery.starts_with("ok    WAL delivery: switched WAL; 0000000100000000000000"), "{delivery}");
    assert!(delivery.contains(" reached the repository in "), "{delivery}");
    // PostgreSQL's own account agrees: the segment check waited for is the
    // last one its archiver reports.
    let segment = delivery["ok    WAL delivery: switched WAL; ".len()..].split(' ').next().unwrap();
    let archiver = line(&report, "archiver")[0];
    assert!(archiver.starts_with(&format!("ok    archiver: files archived: 1, the last, {segment}, at ")), "{archiver}");
    assert!(report.ends_with("all checks passed\n"), "{report}");
    assert!(!report.contains("FAIL"), "{report}");
}

/// An archive_command that names walvault but fails: the command looks right,
/// so it is PostgreSQL's archiver statistics that say what is wrong, with the
/// file that failed, when, and the backlog waiting behind it.
#[test]
fn check_fails_when_the_archiver_is_failing() {
    let pg = archiving_cluster();
    let env = Env::new(&pg);
    env.run_ok(&["init"]);
    let missing = env.new_dir("elsewhere").join("no-such-walvault.toml");
    let command = env.archive_command().replace(&env.config.display().to_string(), &missing.display().to_string());
    pg.set_guc("archive_command", &command);
    let (code, report) = check(&env, &["--wait", "5s"]);
    assert_eq!(code, 3, "{report}");
    assert!(line(&report, "archive_command")[0].starts_with("ok    archive_command: "), "{report}");
    let delivery = line(&report, "WAL delivery")[0];
    let segment = delivery
        .strip_prefix("FAIL  WAL delivery: switched WAL, but ")
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("{report}"));
    let archiver = line(&report, "archiver");
    assert!(archiver[0].starts_with(&format!("FAIL  archiver: PostgreSQL's last attempt to archive failed: {segment} at ")), "{report}");
    assert!(archiver[0].contains("files archived: 0, none since the statistics were reset"), "{report}");
    assert!(archiver[0].ends_with(&format!("; 1 file waits to be archived ({segment})")), "{report}");
    assert!(archiver[1].starts_with("      fix: read the server log at "), "{report}");
    // Fixed, the same check passes: the failure is history once a file is archived.
    pg.set_guc("archive_command", &env.archive_command());
    let (code, report) = check(&env, &["--wait", "60s"]);
    assert_eq!(code, 0, "{report}");
    assert!(line(&report, "archiver")[0].starts_with("ok    archiver: files archived: "), "{report}");
}

#[test]
fn check_fails_on_wal_level_minimal() {
    let mut pg = PgCluster::start(PgOptions::new());
    let env = Env::new(&pg);
    env.run_ok(&["init"]);
    // wal_level = minimal needs max_wal_senders = 0.
    pg.psql("ALTER SYSTEM SET wal_level = 'minimal'");
    pg.psql("ALTER SYSTEM SET max_wal_senders = 0");
    pg.restart();
    let (code, report) = check(&env, &[]);
    assert_eq!(code, 3, "{report}");
    assert_eq!(
        line(&report, "wal_level"),
        vec![
            "FAIL  wal_level: wal_level is minimal: WAL cannot be archived or streamed",
            "      fix: set wal_level = replica in postgresql.conf and restart PostgreSQL",
        ]
    );
    assert_eq!(
        line(&report, "max_wal_senders"),
        vec![
            "FAIL  max_wal_senders: max_wal_senders is 0; walvault needs 2 (streaming and a backup)",
            "      fix: set max_wal_senders = 10 and restart PostgreSQL",
        ]
    );
    let connection = line(&report, "replication connection");
    assert!(connection[0].starts_with("FAIL  replication connection: "), "{report}");
    assert_eq!(connection[1], "      fix: set max_wal_senders = 10 (and wal_level = replica) in postgresql.conf and restart PostgreSQL");
}

#[test]
fn check_fails_without_replication_permission() {
    let pg = PgCluster::start(PgOptions::new());
    let mut env = Env::new(&pg);
    env.run_ok(&["init"]);
    pg.psql("CREATE ROLE no_replication LOGIN");
    env.set("postgres.conninfo", &format!("\"host={} port={} user=no_replication dbname=postgres\"", pg.socket_dir().display(), pg.port()));
    let (code, report) = check(&env, &[]);
    assert_eq!(code, 3, "{report}");
    // PostgreSQL's own words vary by version (15: "must be superuser or
    // replication role to start walsender"; 16+: "permission denied to start
    // WAL sender"); the SQLSTATE and walvault's fix do not.
    let connection = line(&report, "replication connection");
    assert!(connection[0].starts_with("FAIL  replication connection: PostgreSQL: "), "{report}");
    assert!(connection[0].contains(" (SQLSTATE 42501)"), "{report}");
    assert_eq!(
        connection[1],
        "      fix: give the role replication rights and allow it in pg_hba.conf: ALTER ROLE \"no_replication\" REPLICATION; `host replication no_replication <address> scram-sha-256`"
    );
    // The settings themselves are fine, and the report says so.
    assert_eq!(line(&report, "wal_level"), vec!["ok    wal_level: replica"]);
}

#[test]
fn check_fails_when_archive_command_points_elsewhere() {
    let pg = archiving_cluster();
    let env = Env::new(&pg);
    env.run_ok(&["init"]);
    let elsewhere = env.new_dir("elsewhere");
    let command = format!("cp %p {}/%f", elsewhere.display());
    pg.set_guc("archive_command", &command);
    let (code, report) = check(&env, &["--wait", "5s"]);
    assert_eq!(code, 3, "{report}");
    assert_eq!(
        line(&report, "archive_command"),
        vec![
            format!("FAIL  archive_command: archive_command is '{command}': it does not call walvault archive-push, so archived WAL does not reach this repository").as_str(),
            "      fix: set archive_command = 'walvault archive-push %p' (with --config if needed) and reload PostgreSQL",
        ]
    );
    // And indeed the switched segment never arrives.
    let delivery = line(&report, "WAL delivery");
    assert!(delivery[0].starts_with("FAIL  WAL delivery: switched WAL, but 0000000100000000000000"), "{report}");
    assert!(delivery[0].ends_with(" did not reach the repository within 5.0s"), "{report}");
    assert_eq!(delivery[1], "      fix: check the server log for archive_command failures (pg_stat_archiver)");
}

#[test]
fn check_fails_on_an_unwritable_store() {
    let pg = PgCluster::start(PgOptions::new());
    let env = Env::new(&pg);
    env.run_ok(&["init"]);
    let repo = env.repo_dir.clone().unwrap();
    let chmod = |mode: &str| assert!(std::process::Command::new("chmod").args(["-R", mode]).arg(&repo).status().unwrap().success());
    chmod("a-w");
    let (code, report) = check(&env, &[]);
    chmod("u+w");
    assert_eq!(code, 3, "{report}");
    let writable = line(&report, "repository writable");
    let expected = format!("FAIL  repository writable: cannot write to {}: permission denied on object 'probe/check-", env.repo_url);
    assert!(writable[0].starts_with(&expected), "{report}");
    assert_eq!(
        writable[1],
        "      fix: check the repository credentials and permissions (file mode, or the S3 policy: put/get/list, delete on locks/, probe/ and wal/*.streaming, and everywhere for expire; see README, Object stores)"
    );
    assert_eq!(line(&report, "WAL delivery"), vec!["skip  WAL delivery: the repository is not writable"]);
    // The rest still ran.
    assert_eq!(line(&report, "repository descriptor")[0].split(':').next(), Some("ok    repository descriptor"));
    assert_eq!(line(&report, "wal_level"), vec!["ok    wal_level: replica"]);
    assert!(report.ends_with("1 check(s) failed\n"), "{report}");
}

/// `sslmode=verify-full` through the binary: with the server's certificate as
/// the root and the name it was issued for, init, backup and check connect
/// (pg_hba.conf allows TCP only over TLS); under another name the backup is
/// refused before it starts, naming the host, and nothing is recorded.
#[test]
fn verify_full_tls_through_the_binary() {
    let pg = PgCluster::start(
        PgOptions::new()
            .guc("archive_mode", "on")
            .guc("archive_command", "'/bin/false'")
            .hba("hostssl all postgres 127.0.0.1/32 trust")
            .hba("hostssl replication postgres 127.0.0.1/32 trust"),
    );
    let (crt, key) =
        common::pg::make_cert(&pg, "server", &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"], "-sha256", "DNS:localhost");
    pg.set_gucs(&[("ssl_cert_file", &crt.display().to_string()), ("ssl_key_file", &key.display().to_string()), ("ssl", "on")]);
    let conninfo = |host: &str| {
        format!(
            "\"host={host} hostaddr=127.0.0.1 port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert={}\"",
            pg.port(),
            crt.display()
        )
    };
    let mut env = Env::new(&pg);
    env.set("postgres.conninfo", &conninfo("localhost"));
    env.run_ok(&["init"]);
    pg.set_guc("archive_command", &env.archive_command());
    env.run_ok(&["backup", "--label", "over-tls"]);
    let (code, report) = check(&env, &[]);
    assert_eq!(code, 0, "{report}");

    env.set("postgres.conninfo", &conninfo("wrong.example"));
    let out = env.run(&["backup"]);
    let err = common::env::stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("wrong.example"), "{err}");
    assert_eq!(env.info_json()["backups"].as_array().map(|b| b.len()), Some(1));
}

/// archive_library names walvault's module, but the module is not installed:
/// the archiver cannot start (which only the server log would say), and check
/// finds it by loading the module as the archiver does.
#[test]
fn check_fails_when_the_archive_module_is_not_installed() {
    let pg = archiving_cluster();
    if pg.major() < 15 {
        eprintln!("PostgreSQL {} has no archive modules", pg.major());
        return;
    }
    let missing = pg.dir().join("no-module").join("walvault");
    pg.set_gucs(&[("archive_command", ""), ("archive_library", &missing.display().to_string())]);
    let env = Env::new(&pg);
    env.run_ok(&["init"]);
    let (code, report) = check(&env, &["--wait", "2s"]);
    assert_eq!(code, 3, "{report}");
    let library = line(&report, "archive_library");
    assert_eq!(
        library[0],
        format!(
            "FAIL  archive_library: archive_library is '{0}', but PostgreSQL cannot load it, so its archiver cannot start: PostgreSQL: could not access file \"{0}\": No such file or directory (SQLSTATE 58P01)",
            missing.display()
        ),
        "{report}"
    );
    assert!(library[1].starts_with("      fix: build and install walvault's module for this PostgreSQL version"), "{report}");
}
