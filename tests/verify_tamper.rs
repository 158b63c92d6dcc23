//! The tamper suite: an attacker who can write to the store but does not hold
//! the agent's signing key. One real repository (two backups, a few dozen WAL
//! segments, a descriptor change) is built once; each case damages a fresh
//! copy of it, in a directory and under an S3 prefix, and `walvault verify`
//! must fail naming the damaged object with the right kind of problem. The
//! untouched copy must pass. Restore and archive-get must refuse what does not
//! verify. Removals leave nothing to check a signature against: those cases
//! show that verify alone passes and that `--previous-report` catches them.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use common::env::{Env, chown_tree, stderr, stdout};
use common::pg::{PgCluster, PgOptions};
use common::s3::S3Server;
use serde_json::Value;
use walvault::repo::manifest::BackupManifest;
use walvault::repo::record::{self, WalRecord};
use walvault::repo::signing::{PublicKey, SignedDocument, SigningKey};

/// The repository every case starts from.
struct Fixture {
    /// The file repository (`env.repo_dir`) and the configuration that pins the agent's key.
    env: Env,
    /// The same keys and pin, with the S3 server's settings.
    s3env: Env,
    bucket: String,
    /// The descriptor of generation 1, before `init` added a recipient.
    gen1_descriptor: Vec<u8>,
    /// Oldest first.
    backups: Vec<BackupManifest>,
    public_key: PublicKey,
    recipients: Vec<String>,
    system_identifier: String,
    /// (key, object): a genuine streaming copy of a segment between the backups,
    /// as the streamer stores it while the segment is being written (signed by
    /// the agent, 64 KiB of it), to put in the complete segment's place.
    old_streaming_copy: (String, Vec<u8>),
}

const FIXTURE_PREFIX: &str = "fixture";

fn fixture() -> &'static Fixture {
    // Built once; a failed build fails every test at once instead of being retried by each.
    static FIXTURE: OnceLock<Result<Fixture, String>> = OnceLock::new();
    let built = FIXTURE.get_or_init(|| {
        std::panic::catch_unwind(build_fixture).map_err(|e| {
            e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
        })
    });
    built.as_ref().unwrap_or_else(|e| panic!("the fixture could not be built: {e}"))
}

/// Directories of the fixture, removed at exit (statics are never dropped).
static CLEANUP: OnceLock<Vec<PathBuf>> = OnceLock::new();

extern "C" fn cleanup() {
    if std::env::var_os("WALVAULT_TEST_KEEP").is_some() {
        return;
    }
    for d in CLEANUP.get().into_iter().flatten() {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Writes a little and switches to a new segment, `n` times; returns the last segment completed.
fn switch_segments(pg: &PgCluster, n: usize) -> String {
    let mut last = String::new();
    for i in 0..n {
        last = pg.psql(&format!("insert into marks values ({i}, 'segment'); select pg_walfile_name(pg_switch_wal())"));
    }
    last
}

fn wait_archived(pg: &PgCluster, segment: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while pg.psql(&format!("select coalesce(last_archived_wal, '') >= '{segment}' from pg_stat_archiver")) != "t" {
        assert!(std::time::Instant::now() < deadline, "archiving stalled before {segment}:\n{}", pg.log_tail());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn build_fixture() -> Fixture {
    let pg =
        PgCluster::start(PgOptions::new().guc("archive_mode", "on").guc("archive_command", "'/bin/false'").guc("max_wal_size", "'1GB'"));
    let mut env = Env::new(&pg);
    env.run_ok(&["init"]);
    pg.set_guc("archive_command", &env.archive_command());
    pg.psql("create table marks(id int, note text)");
    pg.psql("insert into marks select g, md5(g::text) from generate_series(1, 20000) g");
    let first = env.run_ok(&["backup", "--label", "first"]).trim().to_string();
    let last = switch_segments(&pg, 12);
    wait_archived(&pg, &last);

    // A second recipient makes descriptor generation 2; what follows is written under it.
    let gen1_descriptor = std::fs::read(env.repo_dir.as_ref().unwrap().join("walvault.json")).unwrap();
    let more_keys = env.new_dir("more-keys");
    let out = env.run_ok(&["keygen", "--out", more_keys.join("k").to_str().unwrap()]);
    let second = out.split("recipients = [\"").nth(1).and_then(|s| s.split('"').next()).expect("keygen prints a recipient").to_string();
    let recipients = vec![env.recipient.clone(), second];
    env.set("encryption.recipients", &format!("[\"{}\", \"{}\"]", recipients[0], recipients[1]));
    let out = env.run_ok(&["init"]);
    assert!(out.contains("generation 2"), "{out}");
    switch_segments(&pg, 6);
    let second_backup = env.run_ok(&["backup", "--label", "second"]).trim().to_string();
    let last = switch_segments(&pg, 12);
    wait_archived(&pg, &last);
    let system_identifier = pg.psql("select system_identifier from pg_control_system()");
    // The same keys and pin, with the S3 server's settings.
    let mut s3env = Env::builder(&pg).s3(S3Server::shared()).build();
    drop(pg);

    let public_key = PublicKey::parse(&env.public_key).unwrap();
    let repo = env.repo_dir.clone().unwrap();
    let backups: Vec<BackupManifest> = [first, second_backup]
        .iter()
        .map(|id| {
            let raw = std::fs::read(repo.join(format!("backups/{id}/manifest.json"))).unwrap();
            BackupManifest::from_document(&raw, &public_key, id).unwrap()
        })
        .collect();

    // The same repository under an S3 prefix, read with the same keys.
    for key in ["signing.key_file", "encryption.identity_file", "signing.public_key", "encryption.recipients"] {
        let value = match key {
            "signing.key_file" => format!("\"{}\"", env.keys.join("agent.key").display()),
            "encryption.identity_file" => format!("\"{}\"", env.keys.join("restore.key").display()),
            "signing.public_key" => format!("\"{}\"", env.public_key),
            _ => format!("[\"{}\", \"{}\"]", recipients[0], recipients[1]),
        };
        s3env.set(key, &value);
    }
    let bucket = s3env.repo_url.trim_start_matches("s3://").split('/').next().unwrap().to_string();
    let s3x = S3Access::new();
    for key in FileRepo(repo.clone()).keys() {
        s3x.put(&bucket, &format!("{FIXTURE_PREFIX}/{key}"), &std::fs::read(repo.join(&key)).unwrap());
    }
    let old_streaming_copy = streaming_copy(&env, &backups, &recipients, &system_identifier);
    CLEANUP.set(vec![env.dir.clone(), s3env.dir.clone()]).ok();
    // SAFETY: registers a plain function, run once at process exit.
    unsafe { libc::atexit(cleanup) };
    Fixture { env, s3env, bucket, gen1_descriptor, backups, public_key, recipients, system_identifier, old_streaming_copy }
}

/// What the streamer stored for a segment while it was being written: its first
/// 64 KiB, framed with a record that says so, signed by the agent.
fn streaming_copy(env: &Env, backups: &[BackupManifest], recipients: &[String], system_identifier: &str) -> (String, Vec<u8>) {
    let key = middle_segment(backups, &FileRepo(env.repo_dir.clone().unwrap()));
    let name = key.rsplit('/').next().unwrap();
    let dest = env.new_dir("streaming").join(name);
    env.run_ok(&["--set", "wal.prefetch=0", "archive-get", name, dest.to_str().unwrap()]);
    let plain = std::fs::read(&dest).unwrap()[..64 << 10].to_vec();
    let sealer =
        walvault::pipeline::Sealer::new(recipients.iter().map(|r| walvault::pipeline::seal::parse_recipient(r).unwrap()).collect(), 3)
            .unwrap();
    let (payload, summary) = sealer.seal_bytes(&plain).unwrap();
    let rec = WalRecord {
        file: name.to_string(),
        system_identifier: system_identifier.to_string(),
        plain_len: summary.plain_len,
        plain_blake3: summary.plain_hash.to_hex().to_string(),
        stored_len: summary.stored_len,
        stored_blake3: summary.stored_hash.to_hex().to_string(),
        prev: None,
        valid_bytes: Some(plain.len() as u64),
        history: None,
        source: "stream".into(),
        created_at: chrono::Utc::now(),
        descriptor_generation: 2,
    };
    let agent = SigningKey::load(&env.keys.join("agent.key")).unwrap();
    (key, record::encode(&agent, &rec, &payload))
}

/// A raw S3 client for tampering, with its own runtime.
struct S3Access {
    rt: tokio::runtime::Runtime,
    client: aws_sdk_s3::Client,
}

impl S3Access {
    fn new() -> S3Access {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let client = S3Server::shared().client();
        S3Access { rt, client }
    }

    fn put(&self, bucket: &str, key: &str, data: &[u8]) {
        self.rt
            .block_on(self.client.put_object().bucket(bucket).key(key).body(data.to_vec().into()).send())
            .unwrap_or_else(|e| panic!("put {key}: {}", aws_sdk_s3::error::DisplayErrorContext(&e)));
    }

    fn get(&self, bucket: &str, key: &str) -> Vec<u8> {
        self.rt.block_on(async {
            let out = self
                .client
                .get_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .unwrap_or_else(|e| panic!("get {key}: {}", aws_sdk_s3::error::DisplayErrorContext(&e)));
            out.body.collect().await.unwrap().into_bytes().to_vec()
        })
    }

    fn delete(&self, bucket: &str, key: &str) {
        self.rt.block_on(self.client.delete_object().bucket(bucket).key(key).send()).unwrap();
    }

    fn list(&self, bucket: &str, prefix: &str) -> Vec<String> {
        self.rt.block_on(async {
            let mut keys = Vec::new();
            let mut token = None;
            loop {
                let out =
                    self.client.list_objects_v2().bucket(bucket).prefix(prefix).set_continuation_token(token.clone()).send().await.unwrap();
                keys.extend(out.contents().iter().filter_map(|o| o.key().map(str::to_string)));
                match out.next_continuation_token() {
                    Some(t) => token = Some(t.to_string()),
                    None => break,
                }
            }
            keys
        })
    }

    fn copy(&self, bucket: &str, from: &str, to: &str) {
        self.rt
            .block_on(self.client.copy_object().bucket(bucket).key(to).copy_source(format!("{bucket}/{from}")).send())
            .unwrap_or_else(|e| panic!("copy {from}: {}", aws_sdk_s3::error::DisplayErrorContext(&e)));
    }
}

/// A copy of the repository that a case damages, through the store's own interface.
trait Repo {
    /// `repository.url` for this copy.
    fn url(&self) -> String;
    /// Every object key, relative to the repository.
    fn keys(&self) -> Vec<String>;
    fn read(&self, key: &str) -> Vec<u8>;
    fn write(&self, key: &str, data: &[u8]);
    fn delete(&self, key: &str);
}

struct FileRepo(PathBuf);

impl Repo for FileRepo {
    fn url(&self) -> String {
        format!("file://{}", self.0.display())
    }
    fn keys(&self) -> Vec<String> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(root, &p, out);
                } else {
                    out.push(p.strip_prefix(root).unwrap().to_str().unwrap().to_string());
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.0, &self.0, &mut out);
        out.sort();
        out
    }
    fn read(&self, key: &str) -> Vec<u8> {
        std::fs::read(self.0.join(key)).unwrap_or_else(|e| panic!("read {key}: {e}"))
    }
    fn write(&self, key: &str, data: &[u8]) {
        let p = self.0.join(key);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
        chown_tree(&p);
    }
    fn delete(&self, key: &str) {
        std::fs::remove_file(self.0.join(key)).unwrap_or_else(|e| panic!("delete {key}: {e}"));
    }
}

struct S3Repo<'a> {
    s3: &'a S3Access,
    bucket: String,
    prefix: String,
}

impl Repo for S3Repo<'_> {
    fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }
    fn keys(&self) -> Vec<String> {
        let p = format!("{}/", self.prefix);
        let mut keys: Vec<String> = self.s3.list(&self.bucket, &p).into_iter().map(|k| k[p.len()..].to_string()).collect();
        keys.sort();
        keys
    }
    fn read(&self, key: &str) -> Vec<u8> {
        self.s3.get(&self.bucket, &format!("{}/{key}", self.prefix))
    }
    fn write(&self, key: &str, data: &[u8]) {
        self.s3.put(&self.bucket, &format!("{}/{key}", self.prefix), data)
    }
    fn delete(&self, key: &str) {
        self.s3.delete(&self.bucket, &format!("{}/{key}", self.prefix))
    }
}

static CASES: AtomicU32 = AtomicU32::new(0);

/// A fresh copy of the fixture's repository in a directory.
fn file_copy(fx: &Fixture) -> FileRepo {
    let dir = fx.env.dir.join(format!("case-{}", CASES.fetch_add(1, Ordering::Relaxed)));
    let st = std::process::Command::new("cp").arg("-a").arg(fx.env.repo_dir.as_ref().unwrap()).arg(&dir).status().unwrap();
    assert!(st.success());
    FileRepo(dir)
}

/// A fresh copy of the fixture's repository under its own S3 prefix.
fn s3_copy<'a>(fx: &Fixture, s3: &'a S3Access) -> S3Repo<'a> {
    let prefix = format!("case-{}", CASES.fetch_add(1, Ordering::Relaxed));
    let from = format!("{FIXTURE_PREFIX}/");
    for key in s3.list(&fx.bucket, &from) {
        s3.copy(&fx.bucket, &key, &format!("{prefix}/{}", &key[from.len()..]));
    }
    S3Repo { s3, bucket: fx.bucket.clone(), prefix }
}

/// `walvault verify --json` on a copy; returns (exit code, report). `--set`
/// pairs in `extra` go before the command: clap replaces the global values
/// given before a subcommand with those given after it.
fn verify_json(env: &Env, repo: &dyn Repo, extra: &[&str]) -> (i32, Value) {
    let url = format!("repository.url={}", repo.url());
    let mut args = vec!["--set", url.as_str()];
    let mut rest = Vec::new();
    let mut it = extra.iter();
    while let Some(a) = it.next() {
        if *a == "--set" {
            args.extend(["--set", it.next().expect("--set takes a value")]);
        } else {
            rest.push(*a);
        }
    }
    args.extend(["verify", "--json"]);
    args.extend(rest);
    let out = env.run(&args);
    let report: Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("verify --json printed no JSON ({e}):\nstdout: {}\nstderr: {}", stdout(&out), stderr(&out)));
    (out.status.code().unwrap_or(-1), report)
}

fn problems(report: &Value) -> BTreeSet<(String, String)> {
    findings(&report["problems"])
}

/// (kind, key) of a list of problems or warnings.
fn findings(list: &Value) -> BTreeSet<(String, String)> {
    list.as_array().unwrap().iter().map(|p| (p["kind"].as_str().unwrap().to_string(), p["key"].as_str().unwrap().to_string())).collect()
}

fn flip(repo: &dyn Repo, key: &str, offset: isize) {
    let mut data = repo.read(key);
    let at = if offset < 0 { (data.len() as isize + offset) as usize } else { offset as usize };
    data[at] ^= 0x01;
    repo.write(key, &data);
}

fn wal_segments(repo: &dyn Repo) -> Vec<String> {
    repo.keys().into_iter().filter(|k| k.starts_with("wal/") && k.rsplit('/').next().unwrap().len() == 24).collect()
}

fn pack_key(id: &str) -> String {
    format!("packs/{}/{id}.pack", &id[..2])
}

/// A segment between the two backups: backup 1 needs it to replay further, backup 2 does not.
fn middle_segment(backups: &[BackupManifest], repo: &dyn Repo) -> String {
    let (after, before) = (&backups[0].wal_last, &backups[1].wal_first);
    let between: Vec<String> = wal_segments(repo)
        .into_iter()
        .filter(|k| {
            let n = k.rsplit('/').next().unwrap();
            n > after.as_str() && n < before.as_str()
        })
        .collect();
    assert!(between.len() >= 4, "the fixture has segments between its backups: {between:?}");
    between[between.len() / 2].clone()
}

/// Splits a framed WAL object into its signed record document and payload.
fn split_wal(object: &[u8]) -> (&[u8], &[u8]) {
    let len = u32::from_be_bytes(object[8..12].try_into().unwrap()) as usize;
    (&object[12..12 + len], &object[12 + len..])
}

fn frame(doc: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = record::MAGIC.to_vec();
    out.extend_from_slice(&(doc.len() as u32).to_be_bytes());
    out.extend_from_slice(doc);
    out.extend_from_slice(payload);
    out
}

/// What an attacker holding only public keys can build: other WAL sealed to
/// the repository's recipients, with a record that matches it in every field
/// (name, cluster, lengths, checksums), which they cannot sign as the agent.
fn forged_wal(fx: &Fixture, name: &str) -> (WalRecord, Vec<u8>) {
    let recipients = fx.recipients.iter().map(|r| walvault::pipeline::seal::parse_recipient(r).unwrap()).collect();
    let sealer = walvault::pipeline::Sealer::new(recipients, 3).unwrap();
    let mut plain = vec![0u8; 16 << 20];
    plain[..20].copy_from_slice(b"attacker's WAL bytes");
    let (payload, summary) = sealer.seal_bytes(&plain).unwrap();
    let rec = WalRecord {
        file: name.to_string(),
        system_identifier: fx.system_identifier.clone(),
        plain_len: summary.plain_len,
        plain_blake3: summary.plain_hash.to_hex().to_string(),
        stored_len: summary.stored_len,
        stored_blake3: summary.stored_hash.to_hex().to_string(),
        prev: None,
        valid_bytes: None,
        history: None,
        source: "archive-push".into(),
        created_at: chrono::Utc::now(),
        descriptor_generation: 2,
    };
    (rec, payload)
}

type Expected = Vec<(&'static str, String)>;
/// A case: its name, and what damages a copy and returns the problems expected.
type Case = (&'static str, fn(&Fixture, &dyn Repo) -> Expected);

/// The tamper cases: each damages a fresh copy and returns the problems verify
/// must report, exactly.
fn cases() -> Vec<Case> {
    vec![
        ("flip a byte in a pack", |fx, repo| {
            let key = pack_key(&fx.backups[0].packs[0].id);
            flip(repo, &key, 1000);
            vec![("checksum_mismatch", key)]
        }),
        ("flip a byte in a WAL object's payload", |fx, repo| {
            let key = middle_segment(&fx.backups, repo);
            flip(repo, &key, -10);
            vec![("checksum_mismatch", key)]
        }),
        ("flip a byte in a WAL object's signed record", |fx, repo| {
            let key = middle_segment(&fx.backups, repo);
            flip(repo, &key, 30);
            vec![("bad_signature", key)]
        }),
        ("flip a byte in a manifest", |fx, repo| {
            let key = format!("backups/{}/manifest.json", fx.backups[1].backup_id);
            flip(repo, &key, 10);
            vec![("bad_signature", key)]
        }),
        ("flip a byte in a file list", |fx, repo| {
            let key = fx.backups[1].files.key.clone();
            flip(repo, &key, 100);
            vec![("checksum_mismatch", key)]
        }),
        ("flip a byte in a pack index", |fx, repo| {
            let id = &fx.backups[0].packs[0].id;
            let key = format!("packs/{}/{id}.idx", &id[..2]);
            flip(repo, &key, 20);
            vec![("bad_signature", key)]
        }),
        ("delete a WAL segment in the middle", |fx, repo| {
            let key = middle_segment(&fx.backups, repo);
            repo.delete(&key);
            vec![("wal_gap", key)]
        }),
        ("delete a pack", |fx, repo| {
            let key = pack_key(&fx.backups[0].packs[0].id);
            repo.delete(&key);
            vec![("missing", key)]
        }),
        ("delete the descriptor", |_, repo| {
            repo.delete("walvault.json");
            vec![("missing", "walvault.json".into())]
        }),
        ("replace a WAL object by one sealed to the recipients and signed with the attacker's key", |fx, repo| {
            let key = middle_segment(&fx.backups, repo);
            let (rec, payload) = forged_wal(fx, key.rsplit('/').next().unwrap());
            repo.write(&key, &record::encode(&SigningKey::generate(), &rec, &payload));
            vec![("untrusted_signer", key)]
        }),
        ("replace a WAL object's record and payload, keeping the agent's signature line", |fx, repo| {
            let key = middle_segment(&fx.backups, repo);
            let original = repo.read(&key);
            let (doc, _) = split_wal(&original);
            let trailer_at = doc.windows(20).rposition(|w| w == b"\nwalvault-signature ").unwrap();
            let (rec, payload) = forged_wal(fx, key.rsplit('/').next().unwrap());
            let mut forged = serde_json::to_vec(&rec).unwrap();
            forged.extend_from_slice(&doc[trailer_at..]);
            repo.write(&key, &frame(&forged, &payload));
            vec![("bad_signature", key)]
        }),
        ("replace a WAL object by an unsigned one", |fx, repo| {
            let key = middle_segment(&fx.backups, repo);
            let (rec, payload) = forged_wal(fx, key.rsplit('/').next().unwrap());
            repo.write(&key, &frame(&serde_json::to_vec(&rec).unwrap(), &payload));
            vec![("corrupt", key)]
        }),
        ("replace a segment by an old streaming copy of itself (genuine, signed by the agent)", |fx, repo| {
            let (key, object) = &fx.old_streaming_copy;
            repo.write(key, object);
            vec![("wrong_object", key.clone())]
        }),
        ("re-use another segment's signed object", |fx, repo| {
            let key = middle_segment(&fx.backups, repo);
            let segs = wal_segments(repo);
            let other = &segs[segs.iter().position(|k| k == &key).unwrap() + 1];
            repo.write(&key, &repo.read(other));
            vec![("wrong_object", key)]
        }),
        ("swap two segments' objects", |fx, repo| {
            let a = middle_segment(&fx.backups, repo);
            let segs = wal_segments(repo);
            let b = segs[segs.iter().position(|k| k == &a).unwrap() + 1].clone();
            let (da, db) = (repo.read(&a), repo.read(&b));
            repo.write(&a, &db);
            repo.write(&b, &da);
            vec![("wrong_object", a), ("wrong_object", b)]
        }),
        ("roll the descriptor back to generation 1", |fx, repo| {
            repo.write("walvault.json", &fx.gen1_descriptor);
            vec![("descriptor_rollback", "walvault.json".into())]
        }),
        ("re-sign everything with another key", |_, repo| {
            resign_everything(repo, &SigningKey::generate());
            // With the agent's key pinned, nothing can be trusted past the descriptor.
            vec![("untrusted_signer", "walvault.json".into())]
        }),
    ]
}

/// What an attacker with their own key can do: re-sign every signed document
/// (and name their key in the descriptor), keeping every checksum consistent.
fn resign_everything(repo: &dyn Repo, key: &SigningKey) {
    let resign = |doc: &[u8], kind: &str| key.sign_document(kind, SignedDocument::parse(doc, "x").unwrap().body);
    for k in repo.keys() {
        let data = repo.read(&k);
        let new = if k == "walvault.json" {
            let body = SignedDocument::parse(&data, "x").unwrap().body;
            let mut d: Value = serde_json::from_slice(body).unwrap();
            d["signing_key"] = Value::String(key.public().to_string());
            let mut body = serde_json::to_vec_pretty(&d).unwrap();
            body.push(b'\n');
            key.sign_document("descriptor", &body)
        } else if k.starts_with("wal/") {
            let (doc, payload) = split_wal(&data);
            frame(&resign(doc, "wal-record"), payload)
        } else if k.ends_with("/manifest.json") {
            resign(&data, "manifest")
        } else if k.ends_with(".idx") {
            resign(&data, "pack-index")
        } else {
            continue;
        };
        repo.write(&k, &new);
    }
}

/// Runs every case on fresh copies; returns the failures, one line each.
fn run_cases<R: Repo>(env: &Env, fx: &Fixture, copy: impl Fn() -> R, backend: &str) -> Vec<String> {
    let mut failures = Vec::new();
    let untouched = copy();
    let (code, report) = verify_json(env, &untouched, &[]);
    if code != 0 || report["ok"] != true || !problems(&report).is_empty() {
        failures.push(format!("{backend}: the untouched copy does not pass (exit {code}): {:#}", report["problems"]));
    }
    if report["warnings"].as_array().is_none_or(|w| !w.is_empty()) {
        failures.push(format!("{backend}: the untouched copy has warnings: {:#}", report["warnings"]));
    }
    let (_, problem_kinds, _, _) = documented();
    for (name, tamper) in cases() {
        let repo = copy();
        let expected: BTreeSet<(String, String)> = tamper(fx, &repo).into_iter().map(|(k, key)| (k.to_string(), key)).collect();
        let (code, report) = verify_json(env, &repo, &[]);
        let found = problems(&report);
        if code != 6 || report["ok"] != false || found != expected {
            failures.push(format!("{backend}: {name}: exit {code}, expected {expected:?}, found {found:?}"));
        }
        for (kind, _) in &found {
            if !problem_kinds.contains(kind) {
                failures.push(format!("{backend}: {name}: kind '{kind}' is not documented in docs/JSON.md"));
            }
        }
    }
    failures
}

#[test]
fn verify_detects_every_tampering_in_a_directory() {
    let fx = fixture();
    let failures = run_cases(&fx.env, fx, || file_copy(fx), "file");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn verify_detects_every_tampering_on_s3() {
    let fx = fixture();
    let s3 = S3Access::new();
    let failures = run_cases(&fx.s3env, fx, || s3_copy(fx, &s3), "s3");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn damaged_objects_make_backups_unrestorable_in_the_report() {
    let fx = fixture();
    let (old, new) = (&fx.backups[0].backup_id, &fx.backups[1].backup_id);
    let verdict = |report: &Value, id: &str| report["backups"].as_array().unwrap().iter().find(|b| b["id"] == id).cloned().unwrap();

    // A pack only the first backup wrote is damaged; the second backup re-uses it too.
    let repo = file_copy(fx);
    let pack = pack_key(&fx.backups[0].packs[0].id);
    flip(&repo, &pack, 1000);
    let (_, report) = verify_json(&fx.env, &repo, &[]);
    let v = verdict(&report, old);
    assert_eq!(v["restorable"], false, "{v:#}");
    assert!(v["reasons"][0].as_str().unwrap().contains(&pack), "{v:#}");

    // A segment between the backups: the old one is restorable, but replay stops there.
    let repo = file_copy(fx);
    let seg = middle_segment(&fx.backups, &repo);
    repo.delete(&seg);
    let (_, report) = verify_json(&fx.env, &repo, &[]);
    let v = verdict(&report, old);
    assert_eq!(v["restorable"], true, "{v:#}");
    assert_eq!(v["replay_stops_at"].as_str(), seg.rsplit('/').next(), "{v:#}");
    assert_eq!(verdict(&report, new)["replay_stops_at"], Value::Null);

    // A segment the old backup needs to reach consistency, swapped with its neighbour.
    let repo = file_copy(fx);
    let needed = format!("wal/{}/{}", &fx.backups[0].wal_last[..16], fx.backups[0].wal_last);
    let segs = wal_segments(&repo);
    let next = &segs[segs.iter().position(|k| k == &needed).unwrap() + 1];
    let (a, b) = (repo.read(&needed), repo.read(next));
    repo.write(&needed, &b);
    repo.write(next, &a);
    let (code, report) = verify_json(&fx.env, &repo, &[]);
    assert_eq!(code, 6);
    let v = verdict(&report, old);
    assert_eq!(v["restorable"], false, "{v:#}");
    assert!(v["reasons"][0].as_str().unwrap().contains(&fx.backups[0].wal_last), "{v:#}");

    // A manifest that does not verify: the backup is listed, not restorable.
    let repo = file_copy(fx);
    flip(&repo, &format!("backups/{new}/manifest.json"), 10);
    let (_, report) = verify_json(&fx.env, &repo, &[]);
    assert_eq!(verdict(&report, new)["restorable"], false);
    assert_eq!(verdict(&report, old)["restorable"], true);

    // The human report names the object and the kind too.
    let out = fx.env.run(&["--set", &format!("repository.url={}", repo.url()), "verify"]);
    assert_eq!(out.status.code(), Some(6));
    let text = stdout(&out);
    assert!(text.contains(&format!("[bad_signature] backups/{new}/manifest.json")), "{text}");
    assert!(text.contains(&format!("backup {new}: NOT restorable")), "{text}");
}

#[test]
fn restore_refuses_objects_that_do_not_verify() {
    let fx = fixture();
    let new = &fx.backups[1].backup_id;

    // The chosen backup's manifest was altered.
    let repo = file_copy(fx);
    let manifest = format!("backups/{new}/manifest.json");
    flip(&repo, &manifest, 10);
    let dest = fx.env.new_dir(&format!("restore-{}", CASES.fetch_add(1, Ordering::Relaxed))).join("data");
    let url = format!("repository.url={}", repo.url());
    let (code, err) = fx.env.run_err(&["--set", &url, "restore", "--pgdata", dest.to_str().unwrap(), "--backup", new]);
    assert_eq!(code, 6, "{err}");
    assert!(err.contains(&manifest) && err.contains("signature"), "the refusal names the manifest: {err}");
    assert!(!dest.join("global/pg_control").exists());

    // Without --backup, restore says it ignores that backup.
    let out = fx.env.run(&["--set", &url, "restore", "--pgdata", dest.to_str().unwrap(), "--target-immediate"]);
    assert!(stderr(&out).contains(&format!("warning: backup {new} is ignored")), "{}", stderr(&out));

    // A pack the backup needs was altered.
    let repo = file_copy(fx);
    let pack = pack_key(&fx.backups[1].packs[0].id);
    flip(&repo, &pack, 1000);
    let dest = fx.env.new_dir(&format!("restore-{}", CASES.fetch_add(1, Ordering::Relaxed))).join("data");
    let url = format!("repository.url={}", repo.url());
    let (code, err) = fx.env.run_err(&["--set", &url, "restore", "--pgdata", dest.to_str().unwrap(), "--backup", new]);
    assert_eq!(code, 6, "{err}");
    assert!(err.contains(&pack), "the refusal names the pack: {err}");
    assert!(!dest.join("global/pg_control").exists(), "pg_control is written last, never after a failure");
}

#[test]
fn archive_get_refuses_wal_that_does_not_verify() {
    let fx = fixture();
    let get = |repo: &dyn Repo, name: &str| {
        let dest = fx.env.new_dir(&format!("get-{}", CASES.fetch_add(1, Ordering::Relaxed))).join(name);
        let url = format!("repository.url={}", repo.url());
        let out = fx.env.run(&["--set", &url, "--set", "wal.prefetch=0", "archive-get", name, dest.to_str().unwrap()]);
        (out.status.code().unwrap_or(-1), stderr(&out), dest)
    };

    let repo = file_copy(fx);
    let key = middle_segment(&fx.backups, &repo);
    let name = key.rsplit('/').next().unwrap().to_string();
    let (code, err, dest) = get(&repo, &name);
    assert_eq!(code, 0, "the untouched segment is served: {err}");
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), 16 << 20);

    // Record altered: the signature fails.
    flip(&repo, &key, 30);
    let (code, err, dest) = get(&repo, &name);
    assert_eq!(code, 126, "a fatal error for PostgreSQL, not 'not found': {err}");
    assert!(err.contains(&key) && err.contains("signature"), "names the object: {err}");
    assert!(!dest.exists());

    // Forged by someone else's key.
    let (rec, payload) = forged_wal(fx, &name);
    repo.write(&key, &record::encode(&SigningKey::generate(), &rec, &payload));
    let (code, err, _) = get(&repo, &name);
    assert_eq!(code, 126, "{err}");
    assert!(err.contains(&key) && err.contains("not by the trusted key"), "{err}");

    // Another segment's genuine object.
    let segs = wal_segments(&repo);
    let other = &segs[segs.iter().position(|k| k == &key).unwrap() + 1];
    repo.write(&key, &repo.read(other));
    let (code, err, _) = get(&repo, &name);
    assert_eq!(code, 126, "{err}");
    assert!(err.contains(&key) && err.contains("swapped"), "{err}");

    // A genuine old streaming copy of the same segment.
    let repo = file_copy(fx);
    repo.write(&fx.old_streaming_copy.0, &fx.old_streaming_copy.1);
    let copied = fx.old_streaming_copy.0.rsplit('/').next().unwrap();
    let (code, err, dest) = get(&repo, copied);
    assert_eq!(code, 126, "{err}");
    assert!(err.contains(&fx.old_streaming_copy.0) && err.contains("streaming copy"), "{err}");
    assert!(!dest.exists());

    // Payload altered, record intact.
    let repo = file_copy(fx);
    flip(&repo, &key, -10);
    let (code, err, dest) = get(&repo, &name);
    assert_eq!(code, 126, "{err}");
    assert!(err.contains(&name), "{err}");
    assert!(!dest.exists());
}

#[test]
fn removals_pass_alone_and_fail_against_the_previous_report() {
    let fx = fixture();
    let (old, new) = (&fx.backups[0], &fx.backups[1]);
    let baseline = file_copy(fx);
    let (code, report) = verify_json(&fx.env, &baseline, &[]);
    assert_eq!(code, 0, "{report:#}");
    let previous = fx.env.dir.join(format!("report-{}.json", CASES.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&previous, serde_json::to_vec_pretty(&report).unwrap()).unwrap();
    chown_tree(&previous);
    let prev = ["--previous-report", previous.to_str().unwrap()];

    // Nothing changed: the comparison passes and says so.
    let (code, r) = verify_json(&fx.env, &baseline, &prev);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["previous_report"]["changes"]["new_backups"], serde_json::json!([]));

    // The tail of the WAL after the newest backup.
    let repo = file_copy(fx);
    let segs = wal_segments(&repo);
    for k in &segs[segs.len() - 3..] {
        repo.delete(k);
    }
    let (code, _) = verify_json(&fx.env, &repo, &[]);
    assert_eq!(code, 0, "a cut tail leaves nothing to check alone (docs/REPOSITORY.md)");
    let (code, r) = verify_json(&fx.env, &repo, &prev);
    assert_eq!(code, 6);
    assert_eq!(problems(&r), BTreeSet::from([("wal_truncated".to_string(), segs.last().unwrap().clone())]), "{r:#}");

    // The newest backup, whole: manifest, file lists, and the packs only it uses with their indexes.
    let repo = file_copy(fx);
    let shared: BTreeSet<&str> = old.packs.iter().map(|p| p.id.as_str()).collect();
    for k in repo.keys() {
        let own_pack = new.packs.iter().any(|p| !shared.contains(p.id.as_str()) && k.contains(&p.id));
        if k.starts_with(&format!("backups/{}/", new.backup_id)) || own_pack {
            repo.delete(&k);
        }
    }
    let (code, _) = verify_json(&fx.env, &repo, &[]);
    assert_eq!(code, 0, "a removed backup leaves nothing to check alone");
    let (code, r) = verify_json(&fx.env, &repo, &prev);
    assert_eq!(code, 6);
    assert_eq!(problems(&r), BTreeSet::from([("removed".to_string(), format!("backups/{}/manifest.json", new.backup_id))]), "{r:#}");

    // The oldest backup, as expire removes it: a change, not a problem.
    let repo = file_copy(fx);
    for k in repo.keys().iter().filter(|k| k.starts_with(&format!("backups/{}/", old.backup_id))) {
        repo.delete(k);
    }
    let (code, r) = verify_json(&fx.env, &repo, &prev);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["previous_report"]["changes"]["expired_backups"], serde_json::json!([old.backup_id]));

    // Re-signed with another key: passes when nothing pins the key (and says
    // so), fails against the pin, and against the previous report.
    let repo = file_copy(fx);
    let attacker = SigningKey::generate();
    resign_everything(&repo, &attacker);
    let unpinned = ["--set", "signing.public_key="];
    let (code, r) = verify_json(&fx.env, &repo, &unpinned);
    assert_eq!(code, 0, "a consistent forgery verifies against its own key: {r:#}");
    assert_eq!(r["key_pinned"], false);
    assert_eq!(r["trusted_key"], attacker.public().to_string());
    assert_ne!(r["trusted_key_fingerprint"], report["trusted_key_fingerprint"]);
    assert!(findings(&r["warnings"]).contains(&("key_not_pinned".to_string(), "walvault.json".to_string())), "{r:#}");
    let (code, r) = verify_json(&fx.env, &repo, &[&unpinned[..], &prev[..]].concat());
    assert_eq!(code, 6);
    // Another key, a descriptor of the same generation with other content, and
    // every manifest rewritten under its old name.
    let expected = BTreeSet::from([
        ("key_changed".to_string(), "walvault.json".to_string()),
        ("descriptor_changed".to_string(), "walvault.json".to_string()),
        ("replaced".to_string(), format!("backups/{}/manifest.json", old.backup_id)),
        ("replaced".to_string(), format!("backups/{}/manifest.json", new.backup_id)),
    ]);
    assert_eq!(problems(&r), expected, "{r:#}");
    assert_eq!(fx.public_key.to_string(), report["trusted_key"].as_str().unwrap());
}

/// The verify section of docs/JSON.md: (field paths, problem kinds,
/// warning kinds, the example).
fn documented() -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>, Value) {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/JSON.md")).unwrap();
    let section = doc.split("\n## `walvault verify --json`").nth(1).expect("docs/JSON.md has a '## `walvault verify --json`' section");
    let section = section.split("\n## ").next().unwrap();
    let first_cells = |part: &str| -> BTreeSet<String> {
        part.lines().filter_map(|l| l.strip_prefix("| `")).map(|l| l.split('`').next().unwrap().to_string()).collect()
    };
    let (fields, rest) = section.split_once("### Problem kinds").expect("a problem kinds table");
    let (problem_kinds, rest) = rest.split_once("### Warning kinds").expect("a warning kinds table");
    let (warning_kinds, example) = rest.split_once("### Example").expect("an example");
    let example = example.split("```json").nth(1).and_then(|e| e.split("```").next()).expect("a json block");
    let example: Value = serde_json::from_str(example).unwrap_or_else(|e| panic!("the example is not JSON: {e}"));
    (first_cells(fields), first_cells(problem_kinds), first_cells(warning_kinds), example)
}

/// Every field path of a report: `a.b`, and `a[].b` inside arrays of objects.
fn field_paths(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                out.insert(p.clone());
                field_paths(x, &p, out);
            }
        }
        Value::Array(items) => {
            for x in items.iter().filter(|x| x.is_object()) {
                field_paths(x, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn json_report_matches_the_documentation() {
    let fx = fixture();
    let (fields, problem_kinds, warning_kinds, example) = documented();
    let repo = file_copy(fx);
    let (code, clean) = verify_json(&fx.env, &repo, &["--deep"]);
    assert_eq!(code, 0, "{clean:#}");
    assert_eq!(clean["deep_checked"]["wal_files"], clean["objects_checked"]["wal"], "--deep opens every WAL object");
    assert!(clean["deep_checked"]["files"].as_u64().unwrap() > 100, "{clean:#}");
    let previous = fx.env.dir.join(format!("report-{}.json", CASES.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&previous, serde_json::to_vec(&clean).unwrap()).unwrap();
    chown_tree(&previous);

    // A report where every part is filled in: a gap, expired WAL, an
    // interrupted backup, no pin, --deep, and a previous report.
    let segs = wal_segments(&repo);
    repo.delete(&segs[0]);
    repo.delete(&middle_segment(&fx.backups, &repo));
    repo.write("backups/20990101T000000Z/files.sealed", b"interrupted");
    let (code, report) =
        verify_json(&fx.env, &repo, &["--deep", "--previous-report", previous.to_str().unwrap(), "--set", "signing.public_key="]);
    assert_eq!(code, 6, "{report:#}");
    let mut found = BTreeSet::new();
    field_paths(&report, "", &mut found);
    let undocumented: Vec<&String> = found.difference(&fields).collect();
    let absent: Vec<&String> = fields.difference(&found).collect();
    assert!(undocumented.is_empty(), "fields missing from docs/JSON.md: {undocumented:?}");
    assert!(absent.is_empty(), "documented fields the report lacks: {absent:?}");
    for (list, kinds) in [(&report["problems"], &problem_kinds), (&report["warnings"], &warning_kinds)] {
        for (kind, _) in findings(list) {
            assert!(kinds.contains(&kind), "kind '{kind}' is not documented");
        }
    }
    assert_eq!(findings(&report["warnings"]).len(), 2, "{:#}", report["warnings"]);
    assert_eq!(report["previous_report"]["changes"]["wal"][0]["first_before"].as_str(), segs[0].rsplit('/').next());

    // The example is a report too.
    let mut in_example = BTreeSet::new();
    field_paths(&example, "", &mut in_example);
    let unknown: Vec<&String> = in_example.difference(&fields).collect();
    assert!(unknown.is_empty(), "the example has undocumented fields: {unknown:?}");
    for top in report.as_object().unwrap().keys() {
        assert!(example.get(top).is_some(), "the example lacks '{top}'");
    }

    // The text report says the same things.
    let out = fx.env.run(&["--set", &format!("repository.url={}", repo.url()), "--set", "signing.public_key=", "verify"]);
    assert_eq!(out.status.code(), Some(6));
    let text = stdout(&out);
    assert!(text.contains("NOT PINNED") && text.contains(report["trusted_key_fingerprint"].as_str().unwrap()), "{text}");
    assert!(text.contains("warning [incomplete_backup] backups/20990101T000000Z/"), "{text}");
    assert!(text.contains("FAILED: 1 problems") && text.contains("[wal_gap]"), "{text}");
}
