//! The documentation says what the code does: every configuration key is in the
//! README's reference with its default, every command in its table, and the
//! generated completions and man page work.

use std::process::Command;

use walvault::config::KEYS;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

#[test]
fn readme_lists_every_configuration_key_with_its_default() {
    let text = readme();
    for k in KEYS {
        let name = format!("`{}.{}`", k.section, k.key);
        let row = text.lines().find(|l| l.starts_with(&format!("| {name} |"))).unwrap_or_else(|| panic!("README lacks a row for {name}"));
        let default = row.split('|').nth(2).unwrap().trim().trim_matches('`');
        assert_eq!(default, k.default, "README's default for {name}");
    }
    // And no row for a key that does not exist.
    for line in text.lines().filter(|l| l.starts_with("| `") && l.contains('.')) {
        let name = line.split('`').nth(1).unwrap();
        if let Some((s, key)) = name.split_once('.')
            && s.chars().all(|c| c.is_ascii_lowercase())
            && !key.contains(' ')
            && KEYS.iter().any(|k| k.section == s)
        {
            assert!(KEYS.iter().any(|k| k.section == s && k.key == key), "README documents unknown key {name}");
        }
    }
}

#[test]
fn readme_lists_every_command() {
    use clap::CommandFactory;
    let text = readme();
    for sub in walvault::cli::Cli::command().get_subcommands().filter(|c| !c.is_hide_set()) {
        let name = sub.get_name();
        if name == "help" {
            continue;
        }
        assert!(text.contains(&format!("| `{name}")) || text.contains(&format!("`{name}`")), "README does not mention `{name}`");
    }
}

#[test]
fn bash_completions_load_and_man_page_renders() {
    let bin = env!("CARGO_BIN_EXE_walvault");
    let out = Command::new(bin).args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("walvault.bash");
    std::fs::write(&path, &script).unwrap();
    let check = Command::new("bash").arg("-c").arg(format!("set -e; source {}; complete -p walvault", path.display())).output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    assert!(String::from_utf8_lossy(&check.stdout).contains("walvault"));
    for shell in ["zsh", "fish"] {
        let out = Command::new(bin).args(["completions", shell]).output().unwrap();
        assert!(out.status.success() && !out.stdout.is_empty(), "{shell}");
    }
    let man = Command::new(bin).arg("man").output().unwrap();
    let text = String::from_utf8(man.stdout).unwrap();
    assert!(text.starts_with(".ie") || text.contains(".TH"), "roff output");
    assert!(text.contains("restore") && text.contains("archive\\-push"), "the man page lists the commands");
}
