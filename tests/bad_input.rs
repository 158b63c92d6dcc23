//! Bad input: malformed configuration values, garbage and truncated objects in
//! the repository, WAL from another cluster, and restore targets in every wrong
//! form. Each case pins the exact text users see (paths, ids and hashes
//! replaced by placeholders) and the exit code, and checks that nothing was
//! written: no repository created, no object changed, no data directory made.
//!
//! `WALVAULT_TEST_SNAPSHOT_PRINT=FILE` appends what each case produced to FILE
//! (JSON lines), to update the expectations after a wording change.

mod common;
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::env::{Env, chown_tree, stderr};
use common::pg::{PgCluster, PgOptions};
use support::*;

/// Collects differences so that one run shows every stale expectation.
#[derive(Default)]
struct Snapshots {
    failures: Vec<String>,
    tried: usize,
}

impl Snapshots {
    fn check(&mut self, name: &str, code: i32, want_code: i32, got: &str, want: &str) {
        self.tried += 1;
        if let Some(path) = std::env::var_os("WALVAULT_TEST_SNAPSHOT_PRINT") {
            use std::io::Write;
            let line = serde_json::json!({"name": name, "code": code, "got": got});
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
            writeln!(f, "{line}").unwrap();
        }
        if code != want_code || got.trim_end() != want.trim_end() {
            self.failures.push(format!("--- {name}: exit {code} (expected {want_code})\n{got}\n--- expected:\n{want}\n"));
        }
    }

    fn finish(self, what: &str) {
        eprintln!("{what}: {} bad inputs tried", self.tried);
        assert!(self.failures.is_empty(), "{} of {} {what} cases differ:\n{}", self.failures.len(), self.tried, self.failures.join("\n"));
    }
}

/// Replaces the run's own values, then any long hex run (hashes, ids).
fn normalize(text: &str, subs: &[(&str, &str)]) -> String {
    let mut t = text.to_string();
    for (from, to) in subs {
        if !from.is_empty() {
            t = t.replace(from, to);
        }
    }
    let mut out = String::new();
    let mut run = String::new();
    for c in t.chars().chain(std::iter::once('\n')) {
        if c.is_ascii_hexdigit() {
            run.push(c);
            continue;
        }
        out.push_str(if run.len() >= 32 { "<hex>" } else { &run });
        run.clear();
        out.push(c);
    }
    out.pop();
    // Pack directories are random; sizes and offsets vary from run to run.
    let mut parts = out.split("packs/");
    let mut t = parts.next().unwrap_or_default().to_string();
    for p in parts {
        t.push_str("packs/");
        match p.get(2..3) {
            Some("/") => t.push_str(&format!("<hh>{}", &p[2..])),
            _ => t.push_str(p),
        }
    }
    let mut out = String::new();
    let mut digits = String::new();
    let mut after_letter = false;
    for c in t.chars().chain(std::iter::once('\n')) {
        if c.is_ascii_digit() {
            if digits.is_empty() {
                after_letter = out.chars().last().is_some_and(|p| p.is_alphabetic());
            }
            digits.push(c);
            continue;
        }
        out.push_str(if digits.len() >= 5 && !after_letter { "<n>" } else { &digits });
        digits.clear();
        out.push(c);
    }
    out.pop();
    // Offsets vary too, small ones included (the first damaged blob may be at 0).
    let mut parts = out.split("offset ");
    let mut joined = parts.next().unwrap_or_default().to_string();
    for p in parts {
        let rest = p.trim_start_matches(|c: char| c.is_ascii_digit());
        joined.push_str("offset ");
        joined.push_str(if rest.len() < p.len() { "<n>" } else { "" });
        joined.push_str(rest);
    }
    let out = joined;
    out.lines()
        // The AWS SDK's own warnings are not walvault's message.
        .filter(|l| !l.contains(" WARN "))
        .map(|l| if l.starts_with("restoring backup ") { "restoring backup $BACKUP (...)" } else { l })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every file under `dir` with its contents, to show nothing changed.
fn snapshot_tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.insert(p.clone(), Vec::new());
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap_or_default());
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Configuration

struct ConfigCase {
    name: &'static str,
    /// Extra TOML after `[repository] url = ...`.
    toml: &'static str,
    env: &'static [(&'static str, &'static str)],
    set: &'static [&'static str],
    code: i32,
    message: &'static str,
}

const CONFIG_CASES: &[ConfigCase] = &[
    ConfigCase {
        name: "a number given as a string",
        toml: "[compression]\nlevel = \"abc\"",
        env: &[],
        set: &[],
        code: 2,
        message: "error: configuration key 'compression.level' ($DIR/walvault.toml): \"abc\" is not a whole number\nhint: see the configuration reference in README.md for each key's accepted values",
    },
    ConfigCase {
        name: "a number out of range",
        toml: "[compression]\nlevel = 30",
        env: &[],
        set: &[],
        code: 2,
        message: "error: configuration key 'compression.level' ($DIR/walvault.toml): 30 is outside 1..=19\nhint: see the configuration reference in README.md for each key's accepted values",
    },
    ConfigCase {
        name: "a negative count from --set",
        toml: "",
        env: &[],
        set: &["repository.retries=-1"],
        code: 2,
        message: "error: configuration key 'repository.retries' (--set): -1 is negative\nhint: see the configuration reference in README.md for each key's accepted values",
    },
    ConfigCase {
        name: "a count of zero",
        toml: "[wal]\npush_parallel = 0",
        env: &[],
        set: &[],
        code: 2,
        message: "error: configuration key 'wal.push_parallel' ($DIR/walvault.toml): must be at least 1\nhint: see the configuration reference in README.md for each key's accepted values",
    },
    ConfigCase {
        name: "a duration with an unknown unit",
        toml: "[wal]\npartial_interval = \"5 parsecs\"",
        env: &[],
        set: &[],
        code: 2,
        message: "error: configuration key 'wal.partial_interval' ($DIR/walvault.toml): '5 parsecs': unknown duration unit 'parsecs' (use ms, s, m, h or d)\nhint: see the configuration reference in README.md for each key's accepted values",
    },
    ConfigCase {
        name: "a duration that is not one, from the environment",
        toml: "",
        env: &[("WALVAULT_BACKUP_WAL_TIMEOUT", "soon")],
        set: &[],
        code: 2,
        message: "error: configuration key 'backup.wal_timeout' (environment variable WALVAULT_BACKUP_WAL_TIMEOUT): 'soon' is not a duration (examples: 500ms, 5s, 10m, 2h, 1d)\nhint: see the configuration reference in README.md for each key's accepted values",
    },
    ConfigCase {
        name: "a size with an unknown unit",
        toml: "[backup]\npack_size = \"12XB\"",
        env: &[],
        set: &[],
        code: 2,
        message: "error: configuration key 'backup.pack_size' ($DIR/walvault.toml): '12XB': unknown size unit 'xb'\nhint: see the configuration reference in README.md for each key's accepted values",
    },
    ConfigCase {
        name: "a size out of range",
        toml: "[backup]\npack_size = \"512KiB\"",
        env: &[],
        set: &[],
        code: 2,
        message: "error: configuration key 'backup.pack_size' ($DIR/walvault.toml): must be between 1MiB and 1GiB\nhint: see the configuration reference in README.md for each key's accepted values",
    },
    ConfigCase {
        name: "a backup rate limit below what PostgreSQL accepts, from the environment",
        toml: "",
        env: &[("WALVAULT_BACKUP_MAX_RATE", "16KiB")],
        set: &[],
        code: 2,
        message: "error: configuration key 'backup.max_rate' (environment variable WALVAULT_BACKUP_MAX_RATE): must be 0 (no limit) or between 32KiB and 1GiB (per second)\nhint: see the configuration reference in README.md for each key's accepted values",
    },
    ConfigCase {
        name: "a boolean that is a string in the file",
        toml: "[wal]\nsynchronous = \"maybe\"",
        env: &[],
        set: &[],
        code: 2,
        message: "error: configuration key 'wal.synchronous' ($DIR/walvault.toml): \"maybe\" is not true or false\nhint: see the configuration reference in README.md for each key's accepted values",
    },
    ConfigCase {
        name: "a boolean that is not one, from the environment",
        toml: "",
        env: &[("WALVAULT_REPOSITORY_PATH_STYLE", "maybe")],
        set: &[],
        code: 2,
        message: "error: configuration key 'repository.path_style' (environment variable WALVAULT_REPOSITORY_PATH_STYLE): 'maybe' is not true or false\nhint: see the configuration reference in README.md for each key's accepted values",
    },
    ConfigCase {
        name: "a repository URL of an unknown scheme",
        toml: "",
        env: &[],
        set: &["repository.url=ftp://backups/x"],
        code: 2,
        message: "error: configuration key 'repository.url' (--set): repository url 'ftp://backups/x' is neither file:///path nor s3://bucket/prefix\nhint: see the configuration reference in README.md for each key's accepted values",
    },
    ConfigCase {
        name: "an S3 URL without a bucket",
        toml: "",
        env: &[],
        set: &["repository.url=s3://"],
        code: 2,
        message: "error: configuration key 'repository.url' (--set): repository url 's3://': no bucket name, expected s3://bucket/prefix\nhint: see the configuration reference in README.md for each key's accepted values",
    },
    ConfigCase {
        name: "an S3 endpoint without a scheme",
        toml: "",
        env: &[],
        set: &["repository.endpoint=localhost:9000"],
        code: 2,
        message: "error: configuration key 'repository.endpoint' (--set): 'localhost:9000' is not a URL (expected https://host[:port] or http://host[:port])\nhint: see the configuration reference in README.md for each key's accepted values",
    },
    ConfigCase {
        name: "an unknown choice",
        toml: "[backup]\ncheckpoint = \"slow\"",
        env: &[],
        set: &[],
        code: 2,
        message: "error: configuration key 'backup.checkpoint' ($DIR/walvault.toml): \"slow\" is not one of fast, spread\nhint: see the configuration reference in README.md for each key's accepted values",
    },
    ConfigCase {
        name: "an unknown choice from --set",
        toml: "",
        env: &[],
        set: &["repository.checksums=sometimes"],
        code: 2,
        message: "error: configuration key 'repository.checksums' (--set): \"sometimes\" is not one of when_supported, when_required\nhint: see the configuration reference in README.md for each key's accepted values",
    },
    ConfigCase {
        name: "a cron expression that is not one",
        toml: "[schedule]\nbase_backup = \"every day\"",
        env: &[],
        set: &[],
        code: 2,
        message: "error: configuration key 'schedule.base_backup' ($DIR/walvault.toml): 'every day' is not a cron expression with a seconds field first, e.g. \"0 0 2 * * *\" (The 'Seconds' field does not support using names. 'every' specified.)\nhint: see the configuration reference in README.md for each key's accepted values",
    },
    ConfigCase {
        name: "a cron expression without the seconds field",
        toml: "[schedule]\nbase_backup = \"0 2 * * *\"",
        env: &[],
        set: &[],
        code: 2,
        message: "error: configuration key 'schedule.base_backup' ($DIR/walvault.toml): '0 2 * * *' is not a cron expression with a seconds field first, e.g. \"0 0 2 * * *\"\nhint: see the configuration reference in README.md for each key's accepted values",
    },
    ConfigCase {
        name: "an unknown time zone",
        toml: "[schedule]\ntime_zone = \"Mars/Olympus\"",
        env: &[],
        set: &[],
        code: 2,
        message: "error: configuration key 'schedule.time_zone' ($DIR/walvault.toml): 'Mars/Olympus' is not an IANA time zone name\nhint: see the configuration reference in README.md for each key's accepted values",
    },
    ConfigCase {
        name: "a recipient that is not an age key",
        toml: "[encryption]\nrecipients = [\"age1garbage\"]",
        env: &[],
        set: &[],
        code: 2,
        message: "error: configuration key 'encryption.recipients' ($DIR/walvault.toml): 'age1garbage' is not an age X25519 recipient: invalid Bech32 encoding\nhint: see the configuration reference in README.md for each key's accepted values",
    },
    ConfigCase {
        name: "recipients given as one string",
        toml: "[encryption]\nrecipients = \"age1garbage\"",
        env: &[],
        set: &[],
        code: 2,
        message: "error: configuration key 'encryption.recipients' ($DIR/walvault.toml): \"age1garbage\" is not a list of strings, e.g. [\"a\", \"b\"]\nhint: see the configuration reference in README.md for each key's accepted values",
    },
    ConfigCase {
        name: "a pinned public key that is not one",
        toml: "[signing]\npublic_key = \"ed25519:xyz\"",
        env: &[],
        set: &[],
        code: 2,
        message: "error: configuration key 'signing.public_key' ($DIR/walvault.toml): 'ed25519:xyz' is not a walvault signing public key (expected ed25519:<base64>)\nhint: see the configuration reference in README.md for each key's accepted values",
    },
    ConfigCase {
        name: "an unknown key in the file",
        toml: "[backup]\ncompression = 3",
        env: &[],
        set: &[],
        code: 2,
        message: "error: unknown configuration key 'backup.compression' ($DIR/walvault.toml)\nhint: see the configuration reference in README.md for the accepted keys",
    },
    ConfigCase {
        name: "an unknown section in the file",
        toml: "[storage]\nurl = \"x\"",
        env: &[],
        set: &[],
        code: 2,
        message: "error: unknown configuration key 'storage.url' ($DIR/walvault.toml)\nhint: see the configuration reference in README.md for the accepted keys",
    },
    ConfigCase {
        name: "an unknown key in the environment",
        toml: "",
        env: &[("WALVAULT_REPOSITORY_BUCKET", "x")],
        set: &[],
        code: 2,
        message: "error: unknown configuration key 'repository.bucket' (environment variable WALVAULT_REPOSITORY_BUCKET)\nhint: see the configuration reference in README.md for the accepted keys",
    },
    ConfigCase {
        name: "an unknown key from --set",
        toml: "",
        env: &[],
        set: &["repository.bucket=x"],
        code: 2,
        message: "error: unknown configuration key 'repository.bucket' (--set)\nhint: see the configuration reference in README.md for the accepted keys",
    },
    ConfigCase {
        name: "--set without a value",
        toml: "",
        env: &[],
        set: &["compression.level"],
        code: 2,
        message: "error: --set 'compression.level': expected section.key=value",
    },
    ConfigCase {
        name: "a secret on the command line",
        toml: "",
        env: &[],
        set: &["repository.secret_access_key=hunter2"],
        code: 2,
        message: "error: 'repository.secret_access_key' is a secret and cannot be given on the command line\nhint: put it in the configuration file (mode 0600) or the environment variable WALVAULT_REPOSITORY_SECRET_ACCESS_KEY",
    },
    ConfigCase {
        name: "a TOML syntax error",
        toml: "[compression\nlevel = 3",
        env: &[],
        set: &[],
        code: 2,
        message: "error: configuration file $DIR/walvault.toml: TOML parse error at line 4, column 13\n  |\n4 | [compression\n  |             ^\ninvalid table header\nexpected `.`, `]`\n\nhint: see the configuration reference in README.md for each key's accepted values",
    },
];

/// Runs `walvault init` (which writes a repository when it gets that far) with
/// the case's configuration in a fresh directory.
fn run_config_case(bin: &Path, case: &ConfigCase) -> (i32, String) {
    let dir = tempfile::Builder::new().prefix("walvault-badcfg-").tempdir_in("/tmp").unwrap();
    let config = dir.path().join("walvault.toml");
    let text = format!("[repository]\nurl = \"file://{}/repo\"\n\n{}\n", dir.path().display(), case.toml);
    std::fs::write(&config, text).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut cmd = Command::new(bin);
    cmd.arg("--config").arg(&config);
    for s in case.set {
        cmd.args(["--set", s]);
    }
    cmd.arg("init").env_remove("WALVAULT_CONFIG").env("NO_COLOR", "1").current_dir(dir.path());
    for (k, v) in case.env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run walvault");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("walvault.toml")], "{}: nothing may be written", case.name);
    let dir_s = dir.path().display().to_string();
    (out.status.code().unwrap_or(-1), normalize(&stderr(&out), &[(&dir_s, "$DIR")]))
}

#[test]
fn malformed_configuration_is_refused_by_key_and_origin_before_anything_is_written() {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_walvault"));
    let mut snaps = Snapshots::default();
    for case in CONFIG_CASES {
        let (code, got) = run_config_case(&bin, case);
        snaps.check(case.name, code, case.code, &got, case.message);
    }
    snaps.finish("configuration");
}

// ---------------------------------------------------------------------------
// The repository, restore targets, WAL from elsewhere

/// A repository with one backup and archived WAL after it.
struct Fixture {
    pg: PgCluster,
    env: Env,
    repo: PathBuf,
    backup: String,
    /// A complete segment archived after the backup.
    segment: String,
}

fn fixture() -> Fixture {
    let pg = archiving_cluster(&[]);
    let env = Env::new(&pg);
    env.run_ok(&["init"]);
    start_archiving(&pg, &env);
    pg.psql("create table t(id int); insert into t select generate_series(1, 10000)");
    let backup = env.run_ok(&["backup"]).trim().to_string();
    pg.psql("insert into t select generate_series(1, 1000)");
    let segment = pg.psql("select pg_walfile_name(pg_switch_wal())");
    wait_archived(&pg, &segment);
    let repo = env.repo_dir.clone().unwrap();
    Fixture { pg, env, repo, backup, segment }
}

impl Fixture {
    /// A fresh copy of the repository to damage.
    fn copy(&self, name: &str) -> PathBuf {
        let dest = self.env.dir.join(format!("copy-{name}"));
        let ok = Command::new("cp").arg("-a").arg(&self.repo).arg(&dest).status().unwrap().success();
        assert!(ok, "copy the repository");
        chown_tree(&dest);
        dest
    }

    fn pack(&self, repo: &Path, ext: &str) -> PathBuf {
        let mut found: Vec<PathBuf> =
            snapshot_tree(&repo.join("packs")).into_keys().filter(|p| p.extension().is_some_and(|e| e == ext)).collect();
        found.sort();
        found.pop().expect("a pack")
    }

    fn subs<'a>(&'a self, repo: &'a str, extra: &'a [(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut v = vec![(repo, "$REPO"), (self.env.dir.to_str().unwrap(), "$DIR"), (self.backup.as_str(), "$BACKUP")];
        v.extend_from_slice(extra);
        v.push((self.segment.as_str(), "$SEGMENT"));
        v
    }
}

/// How a case damages the repository copy.
type Damage = fn(&Fixture, &Path);

fn write(p: &Path, data: &[u8]) {
    std::fs::write(p, data).unwrap();
    chown_tree(p);
}

fn truncate_half(p: &Path) {
    let data = std::fs::read(p).unwrap();
    write(p, &data[..data.len() / 2]);
}

fn segment_key(f: &Fixture, repo: &Path) -> PathBuf {
    repo.join("wal").join(&f.segment[..16]).join(&f.segment)
}

struct RepoCase {
    name: &'static str,
    damage: Damage,
    /// `restore`, `info`, `verify` or `archive-get` (of the fixture's segment).
    command: &'static str,
    code: i32,
    message: &'static str,
}

const REPO_CASES: &[RepoCase] = &[
    RepoCase {
        name: "garbage descriptor",
        damage: |_, r| write(&r.join("walvault.json"), b"\x00\x01garbage\xff"),
        command: "info",
        code: 6,
        message: "error: object 'walvault.json' is not intact: no signature (the walvault-signature line is missing)\nhint: run `walvault verify` to list every damaged object; restore from another backup if needed",
    },
    RepoCase {
        name: "truncated descriptor",
        damage: |_, r| truncate_half(&r.join("walvault.json")),
        command: "restore",
        code: 6,
        message: "error: object 'walvault.json' is not intact: no signature (the walvault-signature line is missing)\nhint: run `walvault verify` to list every damaged object; restore from another backup if needed",
    },
    RepoCase {
        name: "garbage manifest",
        damage: |f, r| write(&r.join(format!("backups/{}/manifest.json", f.backup)), b"{\"not\": \"a manifest\"}"),
        command: "restore",
        code: 8,
        message: "warning: backup $BACKUP is ignored: object 'backups/$BACKUP/manifest.json' is not intact: no signature (the walvault-signature line is missing)\nerror: the repository has no backup\nhint: take one with `walvault backup`",
    },
    RepoCase {
        name: "truncated manifest",
        damage: |f, r| truncate_half(&r.join(format!("backups/{}/manifest.json", f.backup))),
        command: "restore",
        code: 8,
        message: "warning: backup $BACKUP is ignored: object 'backups/$BACKUP/manifest.json' is not intact: no signature (the walvault-signature line is missing)\nerror: the repository has no backup\nhint: take one with `walvault backup`",
    },
    RepoCase {
        name: "garbage file list",
        damage: |f, r| write(&r.join(format!("backups/{}/files.sealed", f.backup)), &[7u8; 1000]),
        command: "restore",
        code: 6,
        message: "restoring backup $BACKUP (...)\nrecovery target: the end of the archived WAL (latest), along timeline 1\nerror: nothing was written: object 'backups/$BACKUP/files.sealed' is not intact: 1000 bytes with blake3 <hex>; the signed manifest says <n> bytes with blake3 <hex>\nhint: run `walvault verify` to list every damaged object; restore from another backup if needed",
    },
    RepoCase {
        name: "truncated file list",
        damage: |f, r| truncate_half(&r.join(format!("backups/{}/files.sealed", f.backup))),
        command: "restore",
        code: 6,
        message: "restoring backup $BACKUP (...)\nrecovery target: the end of the archived WAL (latest), along timeline 1\nerror: nothing was written: object 'backups/$BACKUP/files.sealed' is not intact: <n> bytes with blake3 <hex>; the signed manifest says <n> bytes with blake3 <hex>\nhint: run `walvault verify` to list every damaged object; restore from another backup if needed",
    },
    RepoCase {
        name: "garbage pack index",
        damage: |f, r| write(&f.pack(r, "idx"), b"garbage"),
        // Restore reads blobs by the offsets in the file list (each checked by
        // its hash) and does not need the index; verify does.
        command: "verify",
        code: 6,
        message: "FAILED: 1 problems\n  [corrupt] packs/<hh>/<hex>.idx: object 'packs/<hh>/<hex>.idx' is not intact: no signature (the walvault-signature line is missing)",
    },
    RepoCase {
        name: "truncated pack index",
        damage: |f, r| truncate_half(&f.pack(r, "idx")),
        command: "verify",
        code: 6,
        message: "FAILED: 1 problems\n  [corrupt] packs/<hh>/<hex>.idx: object 'packs/<hh>/<hex>.idx' is not intact: no signature (the walvault-signature line is missing)",
    },
    RepoCase {
        name: "a pack missing",
        damage: |f, r| std::fs::remove_file(f.pack(r, "pack")).unwrap(),
        command: "restore",
        code: 4,
        message: "restoring backup $BACKUP (...)\nrecovery target: the end of the archived WAL (latest), along timeline 1\nerror: restore failed; the data directory is incomplete and must not be started: restoring <file>: not found on object 'packs/<hh>/<hex>.pack': No such file or directory (os error 2)\nhint: the object is missing from the repository; run `walvault verify` to see what else is\n[files left in the destination]",
    },
    RepoCase {
        name: "a blob range outside its pack (truncated pack)",
        damage: |f, r| truncate_half(&f.pack(r, "pack")),
        command: "restore",
        code: 6,
        message: "restoring backup $BACKUP (...)\nrecovery target: the end of the archived WAL (latest), along timeline 1\nerror: restore failed; the data directory is incomplete and must not be started: restoring <file>: object 'packs/<hh>/<hex>.pack' is not intact: pack is shorter than the manifest says\nhint: run `walvault verify` to list every damaged object; restore from another backup if needed\n[files left in the destination]",
    },
    RepoCase {
        name: "garbage pack",
        damage: |f, r| {
            let p = f.pack(r, "pack");
            let n = std::fs::metadata(&p).unwrap().len() as usize;
            write(&p, &vec![0x5a; n]);
        },
        command: "restore",
        code: 6,
        message: "restoring backup $BACKUP (...)\nrecovery target: the end of the archived WAL (latest), along timeline 1\nerror: restore failed; the data directory is incomplete and must not be started: restoring <file>: object 'packs/<hh>/<hex>.pack' is not intact: blob at offset <n> has blake3 <hex>, the backup recorded <hex>\nhint: run `walvault verify` to list every damaged object; restore from another backup if needed\n[files left in the destination]",
    },
    RepoCase {
        name: "garbage WAL object",
        damage: |f, r| write(&segment_key(f, r), b"WVREC001garbage"),
        command: "archive-get",
        code: 126,
        message: "error: archive-get $SEGMENT: object 'wal/<n>/$SEGMENT' is not intact: record length <n> is implausible\nhint: run `walvault verify` to list every damaged object; restore from another backup if needed",
    },
    RepoCase {
        name: "truncated WAL object",
        damage: |f, r| truncate_half(&segment_key(f, r)),
        command: "archive-get",
        code: 126,
        message: "error: archive-get $SEGMENT: WAL file $SEGMENT: the object is corrupt: decryption error\nhint: the repository object was altered or damaged; run `walvault verify` to list every affected object",
    },
    RepoCase {
        name: "corrupted timeline history file",
        damage: |_, r| {
            std::fs::create_dir_all(r.join("wal/history")).unwrap();
            write(&r.join("wal/history/00000002.history"), b"1\t0/3000000\tno recovery target specified\n");
        },
        command: "archive-get-history",
        code: 126,
        message: "error: archive-get <n>.history: object 'wal/history/<n>.history' is not intact: not a walvault WAL object (bad magic)\nhint: run `walvault verify` to list every damaged object; restore from another backup if needed",
    },
    RepoCase {
        name: "corrupted timeline history file, on restore",
        damage: |_, r| {
            std::fs::create_dir_all(r.join("wal/history")).unwrap();
            write(&r.join("wal/history/00000002.history"), b"WVREC001\x00\x00\x00\x05junk");
        },
        command: "restore",
        code: 6,
        message: "error: object 'wal/history/<n>.history' is not intact: truncated record\nhint: run `walvault verify` to list every damaged object; restore from another backup if needed",
    },
];

fn run_repo_case(f: &Fixture, case: &RepoCase, i: usize) -> (i32, String) {
    let repo = f.copy(&i.to_string());
    (case.damage)(f, &repo);
    let before = snapshot_tree(&repo);
    let url = format!("repository.url=file://{}", repo.display());
    let dest = f.env.dir.join(format!("dest-{i}"));
    let args: Vec<String> = match case.command {
        "restore" => vec!["restore".into(), "--pgdata".into(), dest.display().to_string()],
        "archive-get" => vec!["archive-get".into(), f.segment.clone(), dest.display().to_string()],
        "archive-get-history" => vec!["archive-get".into(), "00000002.history".into(), dest.display().to_string()],
        other => vec![other.into()],
    };
    let mut all = vec!["--set", &url, "--set", "wal.prefetch=0"];
    all.extend(args.iter().map(String::as_str));
    let out = f.env.run(&all);
    assert!(snapshot_tree(&repo) == before, "{}: the repository must not change", case.name);
    let code = out.status.code().unwrap_or(-1);
    let left = if dest.exists() { snapshot_tree(&dest).len() } else { 0 };
    let repo_s = repo.display().to_string();
    // verify reports on stdout; its problems follow the summary (which names times and sizes).
    let shown = if case.command == "verify" {
        let report = common::env::stdout(&out);
        format!("{}{}", stderr(&out), report.find("FAILED").map(|i| &report[i..]).unwrap_or(&report))
    } else {
        stderr(&out)
    };
    let mut text = normalize(&shown, &f.subs(&repo_s, &[]));
    // Files are restored in parallel: which one meets the damage first varies.
    let marker = "must not be started: restoring ";
    if let Some(i) = text.find(marker) {
        let start = i + marker.len();
        if let Some(end) = text[start..].find(": ") {
            text.replace_range(start..start + end, "<file>");
        }
    }
    if left > 0 {
        text.push_str("\n[files left in the destination]");
    }
    (code, text)
}

#[test]
fn damaged_repository_objects_wal_from_another_cluster_and_wrong_restore_targets_are_named() {
    let f = fixture();
    let mut snaps = Snapshots::default();
    for (i, case) in REPO_CASES.iter().enumerate() {
        let (code, got) = run_repo_case(&f, case, i);
        snaps.check(case.name, code, case.code, &got, case.message);
    }

    // WAL from another cluster: refused, nothing stored.
    let other = PgCluster::start(PgOptions::new());
    let seg = other.psql("select pg_walfile_name(pg_current_wal_lsn())");
    other.psql("select pg_switch_wal()");
    let copy = f.env.new_dir("other-wal").join(&seg);
    std::fs::copy(other.data_dir().join("pg_wal").join(&seg), &copy).unwrap();
    chown_tree(&copy);
    drop(other);
    let before = snapshot_tree(&f.repo);
    let out = f.env.run(&["archive-push", copy.to_str().unwrap()]);
    assert!(snapshot_tree(&f.repo) == before, "a foreign segment must not be stored");
    let sysid = f.pg.psql("select system_identifier from pg_control_system()");
    let repo_s = f.repo.display().to_string();
    let got = normalize(&stderr(&out), &f.subs(&repo_s, &[(&sysid, "$SYSID"), (&seg, "$OTHER_SEGMENT")]));
    snaps.check("WAL from another cluster", out.status.code().unwrap_or(-1), 3, &got, "error: refusing to archive $OTHER_SEGMENT: $OTHER_SEGMENT belongs to another cluster: its system identifier is <n>, the repository's is $SYSID\nhint: this file is not WAL of the repository's cluster, or it is damaged; check archive_command and repository.url");

    // Restore targets in every wrong form: refused before anything is written.
    for (args, code, message) in TARGET_CASES {
        let dest = f.env.dir.join("target-dest");
        let mut all = vec!["restore", "--pgdata", dest.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = f.env.run(&all);
        let mut got = normalize(&stderr(&out), &f.subs(&repo_s, &[]));
        if dest.exists() {
            got.push_str("\n[the destination was created]");
            let _ = std::fs::remove_dir_all(&dest);
        }
        snaps.check(&format!("restore {args:?}"), out.status.code().unwrap_or(-1), *code, &got, message);
    }
    snaps.finish("repository and target");
}

const TARGET_CASES: &[(&[&str], i32, &str)] = &[
    (
        &["--target-time", "yesterday"],
        2,
        "error: 'yesterday' is not a timestamp; use a form such as '2026-11-22 10:15:00+00', '2026-11-22T10:15:00Z', '2026-11-22 10:15:00 Europe/Paris' or '2026-11-22 10:15' (local time)\nhint: see `walvault --help`",
    ),
    (
        &["--target-time", "2026-13-45 00:00:00"],
        2,
        "error: '2026-13-45 00:00:00' is not a timestamp; use a form such as '2026-11-22 10:15:00+00', '2026-11-22T10:15:00Z', '2026-11-22 10:15:00 Europe/Paris' or '2026-11-22 10:15' (local time)\nhint: see `walvault --help`",
    ),
    (
        &["--target-time", "2026-01-01 25:00:00+00"],
        2,
        "error: '2026-01-01 25:00:00+00' is not a timestamp; use a form such as '2026-11-22 10:15:00+00', '2026-11-22T10:15:00Z', '2026-11-22 10:15:00 Europe/Paris' or '2026-11-22 10:15' (local time)\nhint: see `walvault --help`",
    ),
    (
        &["--target-time", "2026-01-01 10:00:00 Mars/Olympus"],
        2,
        "error: '2026-01-01 10:00:00 Mars/Olympus': unknown time zone 'Mars/Olympus'\nhint: see `walvault --help`",
    ),
    (&["--target-lsn", "0/XYZ"], 2, "error: '0/XYZ' is not an LSN (expected the form 16/B374D848)\nhint: see `walvault --help`"),
    (&["--target-lsn", "12345"], 2, "error: '<n>' is not an LSN (expected the form 16/B374D848)\nhint: see `walvault --help`"),
    (&["--target-xid", "abc"], 2, "error: 'abc' is not a transaction id (a positive number)\nhint: see `walvault --help`"),
    (
        &["--target-xid", "-5"],
        2,
        "error: unexpected argument '-5' found\n\nUsage: walvault restore [OPTIONS] --pgdata <DIR>\n\nFor more information, try '--help'.",
    ),
    (&["--target-xid", "2"], 2, "error: transaction id 2 is reserved; normal transaction ids start at 3\nhint: see `walvault --help`"),
    (&["--target-name", ""], 2, "error: '' is not a restore point name (1 to 63 characters)\nhint: see `walvault --help`"),
    (
        &["--target-name", "a-restore-point-name-that-is-far-too-long-for-postgresql-to-accept-it"],
        2,
        "error: 'a-restore-point-name-that-is-far-too-long-for-postgresql-to-accept-it' is not a restore point name (1 to 63 characters)\nhint: see `walvault --help`",
    ),
    (
        &["--target-timeline", "abc"],
        2,
        "error: 'abc' is not a timeline (a positive number, `latest` or `current`)\nhint: see `walvault --help`",
    ),
    (
        &["--target-timeline", "0"],
        2,
        "error: '0' is not a timeline (a positive number, `latest` or `current`)\nhint: see `walvault --help`",
    ),
    (
        &["--target-timeline", "7"],
        8,
        "error: no backup on the history of timeline 7 has the WAL it needs to be consistent\nhint: check WAL archiving (`walvault check`, `walvault info`) and take a new backup",
    ),
    (&["--tablespace-map", "16384"], 2, "error: --tablespace-map '<n>': expected OID=DIR\nhint: see `walvault --help`"),
    (&["--tablespace-map", "abc=/tmp/x"], 2, "error: --tablespace-map 'abc=/tmp/x': 'abc' is not an OID\nhint: see `walvault --help`"),
    (
        &["--tablespace-map", "16384=relative/dir"],
        2,
        "error: --tablespace-map '<n>=relative/dir': the directory must be absolute\nhint: see `walvault --help`",
    ),
    (
        &["--target-time", "2026-01-01 00:00:00+00", "--target-lsn", "0/3000000"],
        2,
        "error: the argument '--target-time <TIME>' cannot be used with '--target-lsn <LSN>'\n\nUsage: walvault restore --pgdata <DIR> --target-time <TIME>\n\nFor more information, try '--help'.",
    ),
    (
        &["--target-immediate", "--target-xid", "1000"],
        2,
        "error: the argument '--target-immediate' cannot be used with '--target-xid <XID>'\n\nUsage: walvault restore --pgdata <DIR> --target-immediate\n\nFor more information, try '--help'.",
    ),
    (
        &["--backup", "20990101T000000Z"],
        2,
        "error: no backup <n>T000000Z in the repository: see `walvault info` for the backups there are\nhint: see `walvault --help`",
    ),
];
