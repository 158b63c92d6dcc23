//! `walvault keygen --out DIR`: the age identity for restores (restore.key) and
//! the agent's ed25519 signing key (agent.key), both mode 0600.

use crate::cli::KeygenArgs;
use crate::error::{Error, Result, ResultExt};
use crate::pipeline::seal;
use crate::repo::SigningKey;
use crate::util::write_file_atomic;

pub fn run(args: &KeygenArgs) -> Result<i32> {
    let restore_path = args.out.join("restore.key");
    let agent_path = args.out.join("agent.key");
    if !args.force {
        for p in [&restore_path, &agent_path] {
            if p.exists() {
                return Err(Error::with_hint(
                    format!("{} already exists; refusing to overwrite a key", p.display()),
                    "pass --force to replace it (backups sealed to the old key then need the old restore.key)",
                ));
            }
        }
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;

    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public();
    let created = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let identity_text = format!(
        "# walvault restore identity (age X25519). Keep it OFF the agent host; restores and verify --deep need it.\n\
         # created: {created}\n# public key: {recipient}\n{}\n",
        seal::identity_to_string(&identity)
    );
    let signing = SigningKey::generate();

    write_file_atomic(&restore_path, identity_text.as_bytes(), 0o600)
        .with_context(|| format!("cannot write {}", restore_path.display()))?;
    write_file_atomic(&agent_path, signing.to_file_text().as_bytes(), 0o600)
        .with_context(|| format!("cannot write {}", agent_path.display()))?;

    println!("wrote {} (restore identity: keep it offline) and {} (agent signing key)", restore_path.display(), agent_path.display());
    println!();
    println!("[encryption]");
    println!("recipients = [\"{recipient}\"]");
    println!("[signing]");
    println!("key_file = \"{}\"", agent_path.display());
    println!("public_key = \"{}\"", signing.public());
    Ok(0)
}
