//! The agent's ed25519 signing key and signed documents.
//!
//! A signed document is a UTF-8 body (JSON) followed by one trailer line:
//! `walvault-signature ed25519:<public key, base64> <signature, base64>`.
//! The signature covers a domain tag, the document's kind and the exact body
//! bytes, so a signature made for one kind of document cannot be replayed as
//! another.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signer, Verifier};

use super::RepoError;

const TRAILER: &str = "\nwalvault-signature ";
const KEY_PREFIX: &str = "WALVAULT-SIGNING-KEY-1:";
const DOMAIN: &[u8] = b"walvault signed document v1\0";

/// A public verification key, printed and pinned as `ed25519:<base64>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(pub ed25519_dalek::VerifyingKey);

impl PublicKey {
    pub fn parse(s: &str) -> Result<PublicKey, RepoError> {
        let bad = || RepoError::BadKey(format!("'{s}' is not a walvault signing public key (expected ed25519:<base64>)"));
        let b64 = s.trim().strip_prefix("ed25519:").ok_or_else(bad)?;
        let bytes: [u8; 32] = B64.decode(b64).ok().and_then(|b| b.try_into().ok()).ok_or_else(bad)?;
        Ok(PublicKey(ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|_| bad())?))
    }

    /// A short, stable fingerprint for reports: the first 16 bytes of blake3 of the key, in hex.
    pub fn fingerprint(&self) -> String {
        let h = blake3::hash(self.0.as_bytes());
        format!("blake3:{}", &h.to_hex()[..32])
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ed25519:{}", B64.encode(self.0.as_bytes()))
    }
}

/// The agent's signing key. It also derives the key of the chunk identifiers, so
/// that the agent needs one secret only.
pub struct SigningKey {
    key: ed25519_dalek::SigningKey,
}

impl SigningKey {
    pub fn generate() -> Self {
        SigningKey { key: ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng) }
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.key.verifying_key())
    }

    /// The key for chunk identifiers (keyed blake3), derived from the signing key.
    pub fn chunk_id_key(&self) -> [u8; 32] {
        blake3::derive_key("walvault 2026-11 chunk id key", self.key.as_bytes())
    }

    /// The key file's text.
    pub fn to_file_text(&self) -> String {
        format!(
            "# walvault agent signing key (ed25519). Keep it on the agent host only, mode 0600.\n# public key: {}\n{KEY_PREFIX}{}\n",
            self.public(),
            B64.encode(self.key.to_bytes())
        )
    }

    /// Reads a key file, refusing one that group or others can read.
    pub fn load(path: &Path) -> Result<SigningKey, RepoError> {
        crate::config::check_private(path).map_err(|e| match e {
            crate::config::ConfigError::Read { source, .. } => {
                RepoError::KeyFile { path: path.to_path_buf(), message: format!("cannot read: {source}") }
            }
            crate::config::ConfigError::LoosePermissions { mode, .. } => RepoError::KeyFile {
                path: path.to_path_buf(),
                message: format!("is readable by group or others (mode {mode:04o}); run: chmod 600 {}", path.display()),
            },
            other => RepoError::KeyFile { path: path.to_path_buf(), message: other.to_string() },
        })?;
        let text = std::fs::read_to_string(path)
            .map_err(|e| RepoError::KeyFile { path: path.to_path_buf(), message: format!("cannot read: {e}") })?;
        Self::parse(&text).map_err(|m| RepoError::KeyFile { path: path.to_path_buf(), message: m })
    }

    pub fn parse(text: &str) -> Result<SigningKey, String> {
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(KEY_PREFIX))
            .ok_or_else(|| "holds no walvault signing key (a line starting WALVAULT-SIGNING-KEY-1:)".to_string())?;
        let bytes: [u8; 32] = B64
            .decode(&line[KEY_PREFIX.len()..])
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| "the signing key line is damaged".to_string())?;
        Ok(SigningKey { key: ed25519_dalek::SigningKey::from_bytes(&bytes) })
    }

    /// Signs `body` as a document of `kind`; returns the whole document.
    pub fn sign_document(&self, kind: &str, body: &[u8]) -> Vec<u8> {
        let sig = self.key.sign(&message(kind, body));
        let mut out = Vec::with_capacity(body.len() + 160);
        out.extend_from_slice(body);
        out.extend_from_slice(TRAILER.as_bytes());
        out.extend_from_slice(format!("{} {}\n", self.public(), B64.encode(sig.to_bytes())).as_bytes());
        out
    }
}

fn message(kind: &str, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + kind.len() + 1 + body.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(kind.as_bytes());
    m.push(0);
    m.extend_from_slice(body);
    m
}

/// A signed document split into its parts; not yet verified.
#[derive(Debug)]
pub struct SignedDocument<'a> {
    pub body: &'a [u8],
    pub signer: PublicKey,
    signature: ed25519_dalek::Signature,
}

impl<'a> SignedDocument<'a> {
    /// Splits a document. `what` names it in errors (an object key).
    pub fn parse(doc: &'a [u8], what: &str) -> Result<SignedDocument<'a>, RepoError> {
        let bad = |m: &str| RepoError::Integrity { object: what.to_string(), message: m.to_string() };
        let pos = find_last(doc, TRAILER.as_bytes()).ok_or_else(|| bad("no signature (the walvault-signature line is missing)"))?;
        let body = &doc[..pos];
        let trailer = std::str::from_utf8(&doc[pos + TRAILER.len()..]).map_err(|_| bad("damaged signature line"))?;
        let trailer = trailer.strip_suffix('\n').ok_or_else(|| bad("truncated signature line"))?;
        let (key, sig) = trailer.split_once(' ').ok_or_else(|| bad("damaged signature line"))?;
        let signer = PublicKey::parse(key).map_err(|_| bad("damaged signer key in the signature line"))?;
        let sig: [u8; 64] = B64.decode(sig).ok().and_then(|b| b.try_into().ok()).ok_or_else(|| bad("damaged signature"))?;
        Ok(SignedDocument { body, signer, signature: ed25519_dalek::Signature::from_bytes(&sig) })
    }

    /// Checks the signature against `trusted` for a document of `kind`.
    pub fn verify(&self, kind: &str, trusted: &PublicKey, what: &str) -> Result<&'a [u8], RepoError> {
        if self.signer != *trusted {
            return Err(RepoError::UntrustedSigner {
                object: what.to_string(),
                signer: self.signer.to_string(),
                trusted: trusted.to_string(),
            });
        }
        trusted.0.verify(&message(kind, self.body), &self.signature).map_err(|_| RepoError::BadSignature { object: what.to_string() })?;
        Ok(self.body)
    }
}

fn find_last(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if hay.len() < needle.len() {
        return None;
    }
    (0..=hay.len() - needle.len()).rev().find(|&i| &hay[i..i + needle.len()] == needle)
}

/// Parses and verifies a signed document in one step.
pub fn open_document<'a>(doc: &'a [u8], kind: &str, trusted: &PublicKey, what: &str) -> Result<&'a [u8], RepoError> {
    SignedDocument::parse(doc, what)?.verify(kind, trusted, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify() {
        let k = SigningKey::generate();
        let doc = k.sign_document("descriptor", b"{\"a\":1}");
        assert_eq!(open_document(&doc, "descriptor", &k.public(), "x").unwrap(), b"{\"a\":1}");
        assert!(matches!(open_document(&doc, "manifest", &k.public(), "x"), Err(RepoError::BadSignature { .. })));
        let mut tampered = doc.clone();
        tampered[3] ^= 1;
        assert!(matches!(open_document(&tampered, "descriptor", &k.public(), "x"), Err(RepoError::BadSignature { .. })));
        let other = SigningKey::generate();
        let resigned = other.sign_document("descriptor", b"{\"a\":1}");
        assert!(matches!(open_document(&resigned, "descriptor", &k.public(), "x"), Err(RepoError::UntrustedSigner { .. })));
        assert!(matches!(open_document(b"{}", "descriptor", &k.public(), "x"), Err(RepoError::Integrity { .. })));
    }

    #[test]
    fn key_file_round_trip() {
        let k = SigningKey::generate();
        let back = SigningKey::parse(&k.to_file_text()).unwrap();
        assert_eq!(back.public(), k.public());
        assert_eq!(PublicKey::parse(&k.public().to_string()).unwrap(), k.public());
        assert!(PublicKey::parse("ed25519:abc").is_err());
    }
}
