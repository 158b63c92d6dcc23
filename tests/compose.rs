//! docker-compose.yml cannot run here (no Docker engine), so this checks what
//! can be checked without one: the file parses; the services, volumes and
//! secrets it names are consistent; every WALVAULT_* variable is a real
//! configuration key with a valid value; the metrics port is published; and
//! the Dockerfile builds the binary the way the README says.

use std::collections::BTreeMap;

use yaml_rust2::{Yaml, YamlLoader};

fn load(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn keys(y: &Yaml) -> Vec<String> {
    y.as_hash().map(|h| h.keys().filter_map(|k| k.as_str().map(String::from)).collect()).unwrap_or_default()
}

#[test]
fn compose_file_is_consistent() {
    let doc = &YamlLoader::load_from_str(&load("docker-compose.yml")).expect("docker-compose.yml parses")[0];
    let services = &doc["services"];
    let names = keys(services);
    for s in ["postgres", "minio", "minio-bucket", "walvault"] {
        assert!(names.contains(&s.to_string()), "service {s} is defined");
    }
    let volumes = keys(&doc["volumes"]);
    let secrets = keys(&doc["secrets"]);
    for name in &names {
        let svc = &services[name.as_str()];
        for dep in keys(&svc["depends_on"])
            .into_iter()
            .chain(svc["depends_on"].as_vec().into_iter().flatten().filter_map(|d| d.as_str().map(String::from)))
        {
            assert!(names.contains(&dep), "{name} depends on unknown service {dep}");
        }
        for v in svc["volumes"].as_vec().into_iter().flatten().filter_map(|v| v.as_str()) {
            let source = v.split(':').next().unwrap();
            if !source.starts_with('.') && !source.starts_with('/') {
                assert!(volumes.contains(&source.to_string()), "{name} uses undeclared volume {source}");
            } else {
                let path = format!("{}/{}", env!("CARGO_MANIFEST_DIR"), source.trim_start_matches("./"));
                assert!(std::path::Path::new(&path).exists(), "{name} mounts {source}, which is not in the repository");
            }
        }
        for s in svc["secrets"].as_vec().into_iter().flatten().filter_map(|s| s.as_str()) {
            assert!(secrets.contains(&s.to_string()), "{name} uses undeclared secret {s}");
        }
    }

    // walvault: every WALVAULT_* variable is a configuration key, and the whole
    // environment loads as a valid configuration.
    let wv = &services["walvault"];
    assert_eq!(wv["build"].as_str(), Some("."), "walvault is built from this repository's Dockerfile");
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in wv["environment"].as_hash().expect("environment is a map") {
        let k = k.as_str().unwrap().to_string();
        let v = match v {
            Yaml::String(s) => s.clone(),
            Yaml::Integer(i) => i.to_string(),
            Yaml::Boolean(b) => b.to_string(),
            other => panic!("{k}: unexpected value {other:?}"),
        };
        if let Some(rest) = k.strip_prefix("WALVAULT_") {
            let lower = rest.to_lowercase();
            assert!(
                walvault::config::KEYS.iter().any(|key| lower == format!("{}_{}", key.section, key.key)),
                "{k} is not a configuration key (see README, Configuration)"
            );
        }
        // Compose substitutes ${VAR:?msg} at run time; stand in a valid value.
        let v = if v.starts_with("${WALVAULT_RECIPIENT") { age::x25519::Identity::generate().to_public().to_string() } else { v };
        env.insert(k, v);
    }
    let config = walvault::config::load(Some(std::path::Path::new("/nonexistent/walvault.toml")), &env, &[]);
    match config {
        Err(walvault::config::ConfigError::Read { .. }) => {
            let config = walvault::config::load(None, &env, &[]).expect("the compose environment is a valid configuration");
            assert!(config.repository.url.starts_with("s3://"));
            assert!(config.repository.endpoint.contains("minio:9000"));
            let port = config.daemon.metrics_listen.rsplit(':').next().unwrap().to_string();
            let published: Vec<String> = wv["ports"].as_vec().unwrap().iter().filter_map(|p| p.as_str().map(String::from)).collect();
            assert!(published.iter().any(|p| p.ends_with(&format!(":{port}"))), "metrics port {port} is published: {published:?}");
            assert!(config.encryption.recipients.len() == 1);
        }
        other => panic!("unexpected: {other:?}"),
    }
    // The bucket the daemon uses is the one minio-bucket creates.
    let bucket = env["WALVAULT_REPOSITORY_URL"].trim_start_matches("s3://").split('/').next().unwrap().to_string();
    let mk = services["minio-bucket"]["entrypoint"].as_vec().unwrap().iter().filter_map(|e| e.as_str()).collect::<Vec<_>>().join(" ");
    assert!(mk.contains(&format!("local/{bucket}")), "minio-bucket creates {bucket}: {mk}");
}

#[test]
fn dockerfile_builds_what_the_readme_documents() {
    let dockerfile = load("Dockerfile");
    let readme = load("README.md");
    assert!(readme.contains("cargo build --release"), "README documents the release build");
    assert!(dockerfile.contains("cargo build --release --locked"), "the image builds the same release binary");
    assert!(dockerfile.contains("USER walvault"), "the daemon does not run as root");
    assert!(readme.contains("docker compose up"), "README explains how to use the compose file");
    assert!(load(".dockerignore").lines().any(|l| l == "target"), "the build context excludes target/");
}
