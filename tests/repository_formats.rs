//! An upgraded walvault keeps an old repository working. `tests/fixtures/format1`
//! is a repository written by walvault before manifest format 2 (commit
//! ba10005: chunk identifiers keyed on the chunk's bytes, one zstd frame per
//! chunk, pack indexes in plain JSON), holding one backup of a fresh cluster
//! with a table `fixture` of 20 000 rows, and the WAL that backup needs.
//!
//! Its backup must pass `verify --deep` and restore. The restored cluster is
//! that same cluster (same system identifier), so it then goes on in the same
//! repository: a new backup (format 2: identifiers from chaining values,
//! solid blobs, compressed indexes) shares no chunk with the old one, and both
//! backups restore.

mod common;
mod support;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use common::env::{Env, chown_tree, stdout};
use common::pg::{PgCluster, quote_literal};
use support::*;

const FIXTURE_ROWS: &str = "20000|200010000";

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn value_of(text: &str, key: &str) -> String {
    let line = text.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("{key} in {text}"));
    line.split('"').nth(1).unwrap().to_string()
}

fn manifest(env: &Env, backup: &str) -> serde_json::Value {
    let raw = std::fs::read_to_string(env.repo_dir.as_ref().unwrap().join(format!("backups/{backup}/manifest.json"))).unwrap();
    serde_json::from_str(&raw[..raw.rfind("\nwalvault-signature").unwrap()]).unwrap()
}

fn packs_of(manifest: &serde_json::Value) -> Vec<String> {
    manifest["packs"].as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap().to_string()).collect()
}

#[test]
fn a_format_1_repository_verifies_restores_and_takes_format_2_backups() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format1");
    let mut env = Env::builder_for("host=/nonexistent").build();
    let repo = env.repo_dir.clone().unwrap();
    copy_tree(&fixture.join("repo"), &repo);
    for key in ["agent.key", "restore.key"] {
        std::fs::copy(fixture.join("keys").join(key), env.keys.join(key)).unwrap();
        // A checkout makes them 0644, which walvault rightly refuses for secrets.
        std::fs::set_permissions(env.keys.join(key), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    let public = std::fs::read_to_string(fixture.join("keys/public.toml")).unwrap();
    env.set("encryption.recipients", &format!("[\"{}\"]", value_of(&public, "recipients")));
    env.set("signing.public_key", &format!("\"{}\"", value_of(&public, "public_key")));
    chown_tree(&env.dir);

    let info = env.info_json();
    let old = info["backups"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(manifest(&env, &old)["format_version"], 1, "the fixture is of format 1");
    env.run_ok(&["verify", "--deep"]);

    // The old backup restores, every chunk checked against its format-1
    // identifier, and the cluster goes on as the primary, archiving into the
    // same repository (its new timeline's history file included).
    let dest = env.new_dir("restored-old").join("data");
    env.run_ok(&["restore", "--pgdata", dest.to_str().unwrap()]);
    let mut conf = std::fs::OpenOptions::new().append(true).open(dest.join("postgresql.auto.conf")).unwrap();
    writeln!(conf, "archive_command = {}", quote_literal(&env.archive_command())).unwrap();
    let mut pg = PgCluster::adopt_with(&dest, true);
    let deadline = Instant::now() + Duration::from_secs(120);
    while pg.psql("select pg_is_in_recovery()") != "f" {
        assert!(Instant::now() < deadline, "the restored cluster did not promote: {}", pg.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(pg.psql("select count(*), sum(g) from fixture"), FIXTURE_ROWS);
    env.set("postgres.conninfo", &format!("\"{}\"", pg.conninfo()));
    pg.psql("insert into fixture select g, md5(g::text) from generate_series(20001, 30000) g");
    let new = stdout(&env.cmd(&["backup"]).output().unwrap()).trim().to_string();
    let (m_old, m_new) = (manifest(&env, &old), manifest(&env, &new));
    assert_eq!(m_new["format_version"], 2, "{new}");
    let shared: Vec<String> = packs_of(&m_new).into_iter().filter(|p| packs_of(&m_old).contains(p)).collect();
    assert!(shared.is_empty(), "format-2 identifiers never meet format-1 ones, so no old pack is used: {shared:?}");
    pg.psql("insert into fixture values (30001, 'after the new backup')");
    switch_and_wait_archived(&pg);
    env.run_ok(&["verify", "--deep"]);

    // Both restore: the old backup to its end, the new one to the latest WAL.
    let old_again = env.new_dir("restored-old-again").join("data");
    env.run_ok(&[
        "restore",
        "--pgdata",
        old_again.to_str().unwrap(),
        "--backup",
        &old,
        "--target-immediate",
        "--replay",
        "--archive-mode",
        "off",
    ]);
    let latest = env.new_dir("restored-new").join("data");
    env.run_ok(&["restore", "--pgdata", latest.to_str().unwrap(), "--replay", "--archive-mode", "off"]);
    pg.stop();
    let restored = PgCluster::adopt(&latest);
    assert_eq!(restored.psql("select count(*), sum(g) from fixture"), "30001|450045001");
    let restored_old = PgCluster::adopt(&old_again);
    assert_eq!(restored_old.psql("select count(*), sum(g) from fixture"), FIXTURE_ROWS);
}
