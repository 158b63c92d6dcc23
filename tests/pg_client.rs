//! The PostgreSQL client against real clusters: replication and SQL
//! sessions, the COPY sub-protocols, authentication methods with and without
//! TLS, certificate checks, channel binding, and connection failures.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::pg::{PgCluster, PgOptions, make_cert};
use futures::FutureExt;
use walvault::pg::{AuthMethod, BackendMessage, ConnParams, Connection, Lsn, Mode, PgError};

/// Parses a conninfo without this process's PG* variables, so the tests
/// see only what they say.
fn params(conninfo: &str) -> ConnParams {
    ConnParams::parse_with_env(conninfo, &|_| None).unwrap()
}

async fn connect(conninfo: &str, mode: Mode) -> Result<Connection, PgError> {
    Connection::connect(&params(conninfo), mode).await
}

async fn one_value(conn: &mut Connection, sql: &str) -> Option<String> {
    let sets = conn.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    sets[0].rows[0][0].clone()
}

#[tokio::test]
async fn replication_session_identifies_the_system_and_streams() {
    let cluster = PgCluster::start(PgOptions::new());
    let mut conn = connect(&cluster.conninfo(), Mode::Replication).await.unwrap();
    assert!(!conn.tls_in_use(), "Unix sockets never use TLS");
    assert_eq!(conn.auth_method(), AuthMethod::Trust);
    assert_eq!(conn.server_version_num(), cluster.version_num());
    assert!(conn.parameter("server_version").is_some());

    let system = conn.identify_system().await.unwrap();
    let expected: u64 = cluster.psql("SELECT system_identifier FROM pg_control_system()").parse().unwrap();
    assert_eq!(system.system_identifier, expected);
    assert_eq!(system.timeline, 1);
    let flush: Lsn = cluster.psql("SELECT pg_current_wal_flush_lsn()").parse().unwrap();
    assert!(system.xlogpos.is_valid() && system.xlogpos <= flush, "{} vs {flush}", system.xlogpos);
    assert_eq!(conn.show("wal_segment_size").await.unwrap(), "16MB");

    // A physical walsender refuses SQL: proves this really is replication mode.
    let err = conn.simple_query("SELECT 1").await.unwrap_err();
    assert!(matches!(err, PgError::Server { .. }), "{err:?}");

    // START_REPLICATION answers CopyBothResponse (not known to
    // postgres-protocol), then XLogData from the requested position.
    let start = system.xlogpos.segment_start(16 << 20);
    conn.send_query(&format!("START_REPLICATION PHYSICAL {start} TIMELINE 1")).await.unwrap();
    assert!(matches!(conn.next_message().await.unwrap(), BackendMessage::CopyBothResponse));
    let first_wal = loop {
        match conn.next_message().await.unwrap() {
            BackendMessage::CopyData(d) if d[0] == b'w' => break d,
            BackendMessage::CopyData(d) if d[0] == b'k' => continue,
            other => panic!("expected XLogData, got {other:?}"),
        }
    };
    let chunk_start = u64::from_be_bytes(first_wal[1..9].try_into().unwrap());
    assert_eq!(Lsn(chunk_start), start);
    assert!(first_wal.len() > 25);

    // Client-initiated end of streaming: CopyDone both ways, then the
    // session is ready for commands again.
    conn.send_copy_done().await.unwrap();
    let mut tags = Vec::new();
    loop {
        match conn.next_message().await.unwrap() {
            BackendMessage::CopyData(_) | BackendMessage::CopyDone => {}
            BackendMessage::CommandComplete(tag) => tags.push(tag),
            BackendMessage::ReadyForQuery => break,
            BackendMessage::RowDescription(_) | BackendMessage::DataRow(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(tags.iter().any(|t| t.starts_with("START_REPLICATION")), "{tags:?}");
    assert_eq!(conn.identify_system().await.unwrap().system_identifier, expected);
    conn.close().await.unwrap();

    // The harness's copy of the binary runs as the server's user (what
    // archive_command will do).
    let out = cluster.command(common::pg::walvault_for_postgres()).arg("--version").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("walvault"));
}

#[tokio::test]
async fn sql_session_queries_copy_cancel_and_errors() {
    let cluster = PgCluster::start(PgOptions::new());
    // The server has ssl=off: the default sslmode=prefer goes on in plaintext.
    let mut conn = connect(&cluster.conninfo_tcp(), Mode::Database).await.unwrap();
    assert!(!conn.tls_in_use());
    assert_eq!(conn.server_version_num(), cluster.version_num());

    // Several result sets from one query string.
    let sets = conn.simple_query("SELECT 1 AS a, NULL::text AS b; SELECT 'x' AS c UNION ALL SELECT 'ü'").await.unwrap();
    assert_eq!(sets.len(), 2);
    assert_eq!(sets[0].columns, ["a", "b"]);
    assert_eq!(sets[0].rows, vec![vec![Some("1".to_string()), None]]);
    assert_eq!(sets[1].columns, ["c"]);
    assert_eq!(sets[1].rows, vec![vec![Some("x".to_string())], vec![Some("ü".to_string())]]);
    assert!(conn.simple_query("").await.unwrap().is_empty());

    // A server error keeps its SQLSTATE, and the session stays usable.
    let err = conn.simple_query("SELECT 1/0").await.unwrap_err();
    assert_eq!(err.code(), Some("22012"), "{err}");
    assert!(err.to_string().contains("division by zero"), "{err}");
    assert_eq!(one_value(&mut conn, "SELECT 2").await.as_deref(), Some("2"));

    // Notices are skipped; ParameterStatus updates are recorded.
    conn.simple_query("DO $$BEGIN RAISE WARNING 'walvault test warning'; END$$").await.unwrap();
    conn.simple_query("SET application_name = 'changed by test'").await.unwrap();
    assert_eq!(conn.parameter("application_name"), Some("changed by test"));

    // CopyOut through the low-level API.
    conn.send_query("COPY (SELECT g FROM generate_series(1, 3) g) TO STDOUT").await.unwrap();
    let mut seen = Vec::new();
    loop {
        match conn.next_message().await.unwrap() {
            BackendMessage::CopyOutResponse => seen.push("out".to_string()),
            BackendMessage::CopyData(d) => seen.push(String::from_utf8(d.to_vec()).unwrap()),
            BackendMessage::CopyDone => seen.push("done".to_string()),
            BackendMessage::CommandComplete(tag) => seen.push(tag),
            BackendMessage::ReadyForQuery => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, ["out", "1\n", "2\n", "3\n", "done", "COPY 3"]);

    // simple_query refuses COPY but leaves the session usable.
    let err = conn.simple_query("COPY (SELECT 1) TO STDOUT").await.unwrap_err();
    assert!(matches!(err, PgError::Unsupported(_)), "{err:?}");
    assert_eq!(one_value(&mut conn, "SELECT 3").await.as_deref(), Some("3"));

    // next_message is cancel-safe: dropping it whenever it would wait (so
    // mostly with part of a message read) loses, repeats or tears nothing.
    let rows = 20_000;
    conn.send_query(&format!("COPY (SELECT lpad(g::text, 1000, 'x') FROM generate_series(1, {rows}) g) TO STDOUT")).await.unwrap();
    let (mut copied, mut dropped) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // A lost byte would leave the stream out of step and the loop waiting.
        assert!(Instant::now() < deadline, "COPY did not finish; {copied} rows read");
        match conn.next_message().now_or_never() {
            None => {
                dropped += 1;
                tokio::time::sleep(Duration::from_micros(100)).await;
            }
            Some(Ok(BackendMessage::CopyData(d))) => {
                assert_eq!(d.len(), 1001, "a row was torn");
                let number = std::str::from_utf8(&d[..1000]).unwrap().trim_start_matches('x');
                assert_eq!(number.parse::<u32>().unwrap(), copied + 1, "a row was lost or repeated");
                copied += 1;
            }
            Some(Ok(BackendMessage::ReadyForQuery)) => break,
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("{e}"),
        }
    }
    assert_eq!(copied, rows);
    assert!(dropped > 0, "next_message was never dropped mid-stream: nothing was tested");

    // Cancelling a running query from a token.
    conn.send_query("SELECT pg_sleep(60)").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    conn.cancel_token().cancel().await.unwrap();
    let mut cancelled = None;
    loop {
        match conn.next_message().await.unwrap() {
            BackendMessage::Error(e) => cancelled = Some(e),
            BackendMessage::ReadyForQuery => break,
            _ => {}
        }
    }
    assert_eq!(cancelled.and_then(|e| e.code().map(str::to_string)).as_deref(), Some("57014"));
    assert!(started.elapsed() < Duration::from_secs(30));
    conn.close().await.unwrap();

    // sslmode=require against a server without TLS.
    let err = connect(&format!("{} sslmode=require", cluster.conninfo_tcp()), Mode::Database).await.unwrap_err();
    assert!(matches!(err, PgError::Tls(_)), "{err:?}");
    assert!(err.to_string().contains("does not accept TLS"), "{err}");

    // Hosts are tried in order: a closed port first, then the server.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut conn =
        connect(&format!("host=127.0.0.1,127.0.0.1 port={closed},{} user=postgres", cluster.port()), Mode::Database).await.unwrap();
    assert_eq!(conn.target(), format!("127.0.0.1:{}", cluster.port()));
    assert_eq!(one_value(&mut conn, "SELECT 4").await.as_deref(), Some("4"));

    // Both hosts failing names both.
    let err = connect(&format!("host=127.0.0.1,/nonexistent/dir port={closed} user=postgres"), Mode::Database).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&format!("127.0.0.1:{closed}")) && text.contains("/nonexistent/dir/.s.PGSQL"), "{text}");
}

#[tokio::test]
async fn connect_timeout_gives_up_on_a_silent_server() {
    // Accepts TCP connections (the kernel's backlog) but never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let started = Instant::now();
    let err =
        connect(&format!("host=127.0.0.1 port={port} user=x connect_timeout=2 sslmode=disable"), Mode::Replication).await.unwrap_err();
    assert!(matches!(err, PgError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("connect_timeout"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(listener);
}

#[tokio::test]
async fn bytes_injected_before_the_tls_handshake_are_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A man-in-the-middle answers the SSLRequest with 'S' followed by a
    // plaintext ReadyForQuery, hoping the client takes it as encrypted.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut request = [0u8; 8];
        sock.read_exact(&mut request).await.unwrap();
        assert_eq!(request, [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f], "an SSLRequest");
        sock.write_all(b"SZ\0\0\0\x05I").await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let err = connect(&format!("host=127.0.0.1 port={port} user=x sslmode=require"), Mode::Replication).await.unwrap_err();
    assert!(matches!(err, PgError::Tls(_)) && err.to_string().contains("unencrypted data"), "{err:?}");
    server.abort();
}

/// A self-signed certificate and key made with the openssl CLI, handed to
/// the server's user.
fn write_passfile(path: &Path, line: &str, mode: u32) {
    std::fs::write(path, format!("{line}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test]
async fn authentication_with_and_without_tls() {
    let cluster = PgCluster::start(
        PgOptions::new()
            .hba("hostssl all scram_user 127.0.0.1/32 scram-sha-256")
            .hba("hostnossl all scram_user 127.0.0.1/32 scram-sha-256")
            .hba("hostssl all md5_user 127.0.0.1/32 md5")
            .hba("hostnossl all md5_user 127.0.0.1/32 md5")
            .hba("hostssl all clear_user 127.0.0.1/32 password")
            .hba("hostssl all tls_only 127.0.0.1/32 scram-sha-256")
            .hba("hostnossl all plain_only 127.0.0.1/32 scram-sha-256")
            .hba("hostssl replication repl_user 127.0.0.1/32 scram-sha-256")
            .hba("hostssl replication norepl_user 127.0.0.1/32 scram-sha-256"),
    );
    let (crt, key) =
        make_cert(&cluster, "server", &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"], "-sha256", "DNS:localhost");
    cluster.set_gucs(&[("ssl_cert_file", &crt.display().to_string()), ("ssl_key_file", &key.display().to_string()), ("ssl", "on")]);
    cluster.psql(
        "SET password_encryption = 'scram-sha-256';
         CREATE ROLE scram_user LOGIN PASSWORD 'scram-pw';
         CREATE ROLE clear_user LOGIN PASSWORD 'clear-pw';
         CREATE ROLE tls_only LOGIN PASSWORD 'tls-pw';
         CREATE ROLE plain_only LOGIN PASSWORD 'plain-pw';
         CREATE ROLE repl_user LOGIN REPLICATION PASSWORD 'repl-pw';
         CREATE ROLE norepl_user LOGIN PASSWORD 'norepl-pw';
         SET password_encryption = 'md5';
         CREATE ROLE md5_user LOGIN PASSWORD 'md5-pw';",
    );
    assert_eq!(cluster.psql("SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = 'md5_user'"), "md5");

    let port = cluster.port();
    // passfile=/nonexistent keeps a developer's ~/.pgpass out of the tests.
    let base = |user: &str, extra: &str| format!("host=127.0.0.1 port={port} dbname=postgres user={user} passfile=/nonexistent {extra}");
    let ok = |user: &'static str, extra: &'static str| {
        let conninfo = base(user, extra);
        async move {
            let mut conn = connect(&conninfo, Mode::Database).await.unwrap_or_else(|e| panic!("{conninfo}: {e}"));
            // Ask the server too: TLS as it sees it.
            let server_tls = one_value(&mut conn, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").await;
            assert_eq!(server_tls.as_deref() == Some("t"), conn.tls_in_use(), "{conninfo}");
            (conn.tls_in_use(), conn.auth_method())
        }
    };
    let fail = |user: &str, extra: &str, mode: Mode| {
        let conninfo = base(user, extra);
        async move { connect(&conninfo, mode).await.err().unwrap_or_else(|| panic!("{conninfo} connected")) }
    };

    // SCRAM and MD5, each with and without TLS; SCRAM over TLS binds the channel.
    assert_eq!(ok("scram_user", "password=scram-pw sslmode=disable").await, (false, AuthMethod::ScramSha256));
    assert_eq!(ok("scram_user", "password=scram-pw sslmode=require").await, (true, AuthMethod::ScramSha256Plus));
    assert_eq!(ok("scram_user", "password=scram-pw").await, (true, AuthMethod::ScramSha256Plus), "prefer");
    assert_eq!(ok("scram_user", "password=scram-pw sslmode=require channel_binding=require").await.1, AuthMethod::ScramSha256Plus);
    assert_eq!(ok("scram_user", "password=scram-pw sslmode=require channel_binding=disable").await, (true, AuthMethod::ScramSha256));
    assert_eq!(ok("md5_user", "password=md5-pw sslmode=disable").await, (false, AuthMethod::Md5));
    assert_eq!(ok("md5_user", "password=md5-pw sslmode=require").await, (true, AuthMethod::Md5));
    assert_eq!(ok("clear_user", "password=clear-pw sslmode=require").await, (true, AuthMethod::Cleartext));

    // channel_binding=require refuses what cannot bind.
    let err = fail("scram_user", "password=scram-pw sslmode=disable channel_binding=require", Mode::Database).await;
    assert!(matches!(err, PgError::Auth { .. }) && err.to_string().contains("not encrypted"), "{err}");
    let err = fail("md5_user", "password=md5-pw sslmode=require channel_binding=require", Mode::Database).await;
    assert!(matches!(err, PgError::Auth { .. }) && err.to_string().contains("MD5"), "{err}");

    // Wrong and missing passwords.
    for (user, extra) in [("scram_user", "sslmode=require"), ("scram_user", "sslmode=disable"), ("md5_user", "sslmode=disable")] {
        let err = fail(user, &format!("password=wrong {extra}"), Mode::Database).await;
        assert!(matches!(err, PgError::Auth { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(&format!("password authentication failed for user \"{user}\"")), "{text}");
        assert!(err.hint().unwrap().contains("password"));
    }
    let err = fail("scram_user", "sslmode=require", Mode::Database).await;
    assert!(matches!(err, PgError::Auth { .. }) && err.to_string().contains("none was given"), "{err}");

    // The password file, refused when others can read it.
    let passfile = cluster.dir().join("pgpass");
    write_passfile(&passfile, &format!("127.0.0.1:{port}:*:scram_user:scram-pw"), 0o600);
    let with_passfile = format!("host=127.0.0.1 port={port} dbname=postgres user=scram_user passfile={}", passfile.display());
    connect(&with_passfile, Mode::Database).await.unwrap();
    write_passfile(&passfile, &format!("127.0.0.1:{port}:*:scram_user:scram-pw"), 0o644);
    let err = connect(&with_passfile, Mode::Database).await.unwrap_err();
    assert!(err.to_string().contains("none was given"), "{err}");

    // hostssl-only: plaintext is refused with the server's reason and our hint;
    // allow falls back to TLS. hostnossl-only: prefer falls back to plaintext.
    let err = fail("tls_only", "password=tls-pw sslmode=disable", Mode::Database).await;
    assert_eq!(err.code(), Some("28000"), "{err:?}");
    assert!(err.to_string().contains("no pg_hba.conf entry") && err.to_string().contains("no encryption"), "{err}");
    assert!(err.hint().unwrap().contains("pg_hba.conf"));
    assert_eq!(ok("tls_only", "password=tls-pw sslmode=allow").await, (true, AuthMethod::ScramSha256Plus));
    assert_eq!(ok("plain_only", "password=plain-pw sslmode=prefer").await, (false, AuthMethod::ScramSha256));
    assert_eq!(fail("plain_only", "password=plain-pw sslmode=require", Mode::Database).await.code(), Some("28000"));

    // Certificate checks: the self-signed certificate as the root.
    let root = crt.display().to_string();
    let named = |host: &str, mode: &str, rootcert: &str| {
        format!(
            "host={host} hostaddr=127.0.0.1 port={port} user=scram_user password=scram-pw dbname=postgres sslmode={mode} sslrootcert={rootcert}"
        )
    };
    assert!(connect(&named("localhost", "verify-full", &root), Mode::Database).await.unwrap().tls_in_use());
    let err = connect(&named("wrong.example", "verify-full", &root), Mode::Database).await.unwrap_err();
    assert!(matches!(err, PgError::Tls(_)) && err.to_string().contains("wrong.example"), "{err}");
    connect(&named("wrong.example", "verify-ca", &root), Mode::Database).await.unwrap();
    let (other, _) =
        make_cert(&cluster, "other", &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"], "-sha256", "DNS:localhost");
    let err = connect(&named("localhost", "verify-ca", &other.display().to_string()), Mode::Database).await.unwrap_err();
    assert!(matches!(err, PgError::Tls(_)), "{err:?}");
    // libpq checks the chain under require too once a root file is given.
    let err = connect(&named("localhost", "require", &other.display().to_string()), Mode::Database).await.unwrap_err();
    assert!(matches!(err, PgError::Tls(_)), "{err:?}");
    let err = connect(&named("localhost", "verify-full", "/nonexistent/root.crt"), Mode::Database).await.unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");

    // Replication over TLS with SCRAM, and a role without REPLICATION.
    let mut repl = connect(
        &named("localhost", "verify-full", &root).replace("user=scram_user password=scram-pw", "user=repl_user password=repl-pw"),
        Mode::Replication,
    )
    .await
    .unwrap();
    assert!(repl.channel_binding_used());
    let expected: u64 = cluster.psql("SELECT system_identifier FROM pg_control_system()").parse().unwrap();
    assert_eq!(repl.identify_system().await.unwrap().system_identifier, expected);
    let err = fail("norepl_user", "password=norepl-pw sslmode=require", Mode::Replication).await;
    assert!(matches!(err.code(), Some("42501" | "28000")), "{err:?}");
    assert!(err.hint().is_some(), "{err:?}");

    // Channel binding hashes the certificate with its signature's digest:
    // SHA-384 here, which the server checks.
    let (crt384, key384) =
        make_cert(&cluster, "p384", &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp384r1"], "-sha384", "DNS:localhost");
    cluster.set_gucs(&[("ssl_cert_file", &crt384.display().to_string()), ("ssl_key_file", &key384.display().to_string())]);
    assert_eq!(ok("scram_user", "password=scram-pw sslmode=require channel_binding=require").await, (true, AuthMethod::ScramSha256Plus));
}

/// The harness's lifecycle, which later tests build on: restart with a
/// setting that needs one, a crash and recovery, a stop and start.
#[tokio::test]
async fn cluster_survives_restart_crash_and_stop() {
    let mut cluster = PgCluster::start(PgOptions::new().guc("max_wal_senders", "7"));
    assert_eq!(cluster.psql("SHOW max_wal_senders"), "7");
    let system = cluster.psql("SELECT system_identifier FROM pg_control_system()");
    cluster.psql("CREATE TABLE t AS SELECT 1 AS x");

    cluster.set_guc_restart("max_wal_senders", "12");
    assert_eq!(cluster.psql("SHOW max_wal_senders"), "12");

    let pid = cluster.pid().unwrap();
    cluster.kill9();
    assert!(!cluster.is_running() && cluster.try_psql("SELECT 1").is_err());
    cluster.start_again();
    assert_ne!(cluster.pid(), Some(pid));
    assert_eq!(cluster.psql("SELECT x FROM t"), "1", "crash recovery keeps committed rows");
    assert!(cluster.log_tail().contains("database system was interrupted"), "{}", cluster.log_tail());

    cluster.stop();
    cluster.start_again();
    let mut conn = connect(&cluster.conninfo(), Mode::Replication).await.unwrap();
    assert_eq!(conn.identify_system().await.unwrap().system_identifier.to_string(), system);
}
