//! `info --json` is a stable interface: docs/JSON.md lists every field with its
//! type. This test reads that table and checks it against real output, both
//! ways: every documented field is present with its type, and every field the
//! command prints is documented.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::env::Env;
use common::pg::{PgCluster, PgOptions};

const DOC: &str = include_str!("../docs/JSON.md");

/// (path, type) rows of the `info --json` table.
fn documented() -> BTreeMap<String, String> {
    let start = DOC.find("## `walvault info --json`").expect("docs/JSON.md has the info --json section");
    let section = &DOC[start..];
    let section = &section[..section[3..].find("\n## ").map(|i| i + 3).unwrap_or(section.len())];
    let mut rows = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cols: Vec<&str> = line.split(" | ").collect();
        let path = cols[0].trim_start_matches("| `").trim_end_matches('`');
        assert!(rows.insert(path.to_string(), cols[1].trim().to_string()).is_none(), "{path} is documented twice");
    }
    assert!(rows.len() > 50, "the table was not found: {rows:?}");
    rows
}

fn type_ok(ty: &str, v: &serde_json::Value) -> bool {
    if let Some(base) = ty.strip_suffix(" or null") {
        return v.is_null() || type_ok(base, v);
    }
    let hex = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase());
    match ty {
        "string" => v.is_string(),
        "integer" => v.is_u64() || v.is_i64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "array of string" => v.as_array().is_some_and(|a| a.iter().all(|x| x.is_string())),
        "timestamp" => v.as_str().is_some_and(|s| s.ends_with('Z') && chrono::DateTime::parse_from_rfc3339(s).is_ok()),
        "lsn" => v.as_str().and_then(|s| s.split_once('/')).is_some_and(|(a, b)| hex(a) && hex(b)),
        "segment" => v.as_str().is_some_and(|s| s.len() == 24 && hex(s)),
        other => panic!("docs/JSON.md uses an unknown type '{other}'"),
    }
}

/// Every path in `v` (arrays as `[]`), with the values found there.
fn paths(prefix: &str, v: &serde_json::Value, doc: &BTreeMap<String, String>, out: &mut BTreeMap<String, Vec<serde_json::Value>>) {
    // The elements of an array are described by the array's row and their fields'.
    if !prefix.is_empty() && !prefix.ends_with("[]") {
        out.entry(prefix.to_string()).or_default().push(v.clone());
    }
    // An array of plain values is described by its own row.
    if doc.get(prefix).is_some_and(|t| t.starts_with("array of")) {
        return;
    }
    match v {
        serde_json::Value::Object(map) => {
            for (k, x) in map {
                let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                paths(&p, x, doc, out);
            }
        }
        serde_json::Value::Array(items) => {
            for x in items {
                paths(&format!("{prefix}[]"), x, doc, out);
            }
        }
        _ => {}
    }
}

#[test]
fn info_json_matches_its_documentation() {
    let pg = PgCluster::start(PgOptions::new());
    let env = Env::builder(&pg).set("wal.partial_interval", "\"1s\"").build();
    env.run_ok(&["init"]);
    let mut stream = env.cmd(&["stream"]).stderr(std::process::Stdio::null()).spawn().unwrap();
    let first = env.run_ok(&["backup", "--label", "documented"]).trim().to_string();
    pg.psql("create table t as select g from generate_series(1, 1000) g");
    pg.psql("select pg_switch_wal()");
    env.run_ok(&["backup"]);
    pg.psql("insert into t select g from generate_series(1, 1000) g");
    // Wait for the streamer's copy of the segment in progress.
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.info_json()["timelines"][0]["in_progress"].is_null() {
        assert!(Instant::now() < deadline, "no streaming copy appeared");
        std::thread::sleep(Duration::from_millis(300));
    }
    unsafe { libc::kill(stream.id() as i32, libc::SIGTERM) };
    stream.wait().unwrap();

    // A gap (a segment removed after the first backup), an interrupted backup
    // and a broken one, so that those lists have members to check.
    let repo = env.repo_dir.clone().unwrap();
    let info = env.info_json();
    let wal_first = info["backups"][0]["wal_first"].as_str().unwrap().to_string();
    let missing = format!("{}{:08X}", &wal_first[..16], u64::from_str_radix(&wal_first[16..], 16).unwrap() + 1);
    std::fs::remove_file(repo.join(format!("wal/{}/{missing}", &missing[..16]))).unwrap();
    std::fs::create_dir_all(repo.join("backups/20200101T000000Z")).unwrap();
    std::fs::write(repo.join("backups/20200101T000000Z/files.sealed"), b"x").unwrap();
    std::fs::create_dir_all(repo.join("backups/20200102T000000Z")).unwrap();
    std::fs::copy(repo.join(format!("backups/{first}/manifest.json")), repo.join("backups/20200102T000000Z/manifest.json")).unwrap();
    common::env::chown_tree(&repo);

    let info = env.info_json();
    assert_eq!(info["timelines"][0]["gaps"][0]["first"], missing.as_str(), "{info:#}");
    assert_eq!(info["incomplete_backups"], serde_json::json!(["20200101T000000Z"]));
    assert_eq!(info["broken_backups"][0]["id"], "20200102T000000Z");

    let doc = documented();
    let mut found = BTreeMap::new();
    paths("", &info, &doc, &mut found);
    let undocumented: Vec<&String> = found.keys().filter(|p| !doc.contains_key(*p)).collect();
    assert!(undocumented.is_empty(), "info --json prints fields docs/JSON.md does not list: {undocumented:?}");
    let mut unseen = BTreeSet::new();
    for (path, ty) in &doc {
        match found.get(path) {
            Some(values) => {
                for v in values {
                    assert!(type_ok(ty, v), "{path} is documented as {ty}, but info --json printed {v}");
                }
            }
            None => {
                unseen.insert(path.as_str());
            }
        }
    }
    // Only the parent of a branched timeline is absent here (no promotion in this test).
    assert_eq!(unseen, BTreeSet::from(["timelines[].parent.switch_lsn", "timelines[].parent.timeline"]), "documented but not printed");
}
