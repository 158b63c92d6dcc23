//! The `tls-server-end-point` channel binding (RFC 5929) for SCRAM-SHA-256-PLUS:
//! the server's certificate hashed with the digest of its own signature
//! algorithm, SHA-256 standing in for MD5 and SHA-1. The algorithm is read
//! from the certificate's DER with a minimal parser, since the hash must match
//! what the server computes or authentication fails.

use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HashAlg {
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

/// The channel-binding data for this DER certificate, or None when its
/// signature algorithm has no defined binding (Ed25519, Ed448, unknown).
pub fn tls_server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    Some(match signature_hash(cert_der)? {
        HashAlg::Sha224 => Sha224::digest(cert_der).to_vec(),
        HashAlg::Sha256 => Sha256::digest(cert_der).to_vec(),
        HashAlg::Sha384 => Sha384::digest(cert_der).to_vec(),
        HashAlg::Sha512 => Sha512::digest(cert_der).to_vec(),
    })
}

// OID contents (DER, without tag and length).
const RSA_PREFIX: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01]; // 1.2.840.113549.1.1
const ECDSA_SHA1: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x01]; // 1.2.840.10045.4.1
const ECDSA_SHA2_PREFIX: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03]; // 1.2.840.10045.4.3
const NIST_HASH_PREFIX: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02]; // 2.16.840.1.101.3.4.2
const DSA_SHA2_PREFIX: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x03]; // 2.16.840.1.101.3.4.3

/// Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
fn signature_hash(cert: &[u8]) -> Option<HashAlg> {
    let (tag, body, _) = tlv(cert)?;
    if tag != 0x30 {
        return None;
    }
    let (_, _, rest) = tlv(body)?; // tbsCertificate
    let (tag, alg_id, _) = tlv(rest)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, oid, params) = tlv(alg_id)?;
    if tag != 0x06 {
        return None;
    }
    if let Some(last) = oid.strip_prefix(RSA_PREFIX) {
        return match last {
            [0x04] | [0x05] => Some(HashAlg::Sha256), // md5/sha1WithRSAEncryption
            [0x0B] => Some(HashAlg::Sha256),
            [0x0C] => Some(HashAlg::Sha384),
            [0x0D] => Some(HashAlg::Sha512),
            [0x0E] => Some(HashAlg::Sha224),
            [0x0A] => pss_hash(params),
            _ => None,
        };
    }
    if oid == ECDSA_SHA1 {
        return Some(HashAlg::Sha256);
    }
    if let Some(last) = oid.strip_prefix(ECDSA_SHA2_PREFIX).or_else(|| oid.strip_prefix(DSA_SHA2_PREFIX)) {
        return match last {
            [0x01] => Some(HashAlg::Sha224),
            [0x02] => Some(HashAlg::Sha256),
            [0x03] => Some(HashAlg::Sha384),
            [0x04] => Some(HashAlg::Sha512),
            _ => None,
        };
    }
    None
}

/// RSASSA-PSS-params ::= SEQUENCE { hashAlgorithm [0] AlgorithmIdentifier
/// DEFAULT sha1, ... }; SHA-1 maps to SHA-256 like everywhere else.
fn pss_hash(params: &[u8]) -> Option<HashAlg> {
    let (tag, seq, _) = tlv(params)?;
    if tag != 0x30 {
        return None;
    }
    let Some((0xA0, explicit, _)) = tlv(seq) else {
        return Some(HashAlg::Sha256);
    };
    let (_, alg_id, _) = tlv(explicit)?;
    let (_, oid, _) = tlv(alg_id)?;
    match oid.strip_prefix(NIST_HASH_PREFIX) {
        Some([0x01]) => Some(HashAlg::Sha256),
        Some([0x02]) => Some(HashAlg::Sha384),
        Some([0x03]) => Some(HashAlg::Sha512),
        Some([0x04]) => Some(HashAlg::Sha224),
        Some(_) => None,
        None if oid == [0x2B, 0x0E, 0x03, 0x02, 0x1A] => Some(HashAlg::Sha256), // sha1
        None => None,
    }
}

/// One DER tag-length-value: (tag, value, what follows).
fn tlv(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7F) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, &b| (acc << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    // Self-signed P-256 certificates made with `openssl req -x509 -sha256`
    // and `-sha384`; the expected values are `openssl x509 -outform der |
    // sha256sum` (sha384sum).
    const ECDSA_SHA256_CERT: &str = "MIIBbjCCARWgAwIBAgIUPbjzGI5nnpN9sN9HqWb+z7sZqBYwCgYIKoZIzj0EAwIwDDEKMAgGA1UEAwwBdDAgFw0yNjExMjIwODE3NTlaGA8yMTI2MTAyOTA4MTc1OVowDDEKMAgGA1UEAwwBdDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABPQq+Y3/e63G3TCk4rxCEN4pC05+pGLP5mzKsOIp8gfQ7MEuk8GmfN2eFNE2VXJa8u1GBQwduPY5kCeBOT/vAgejUzBRMB0GA1UdDgQWBBQ3xZ7+huDmC6dYw+Y2ur2JvjlpYDAfBgNVHSMEGDAWgBQ3xZ7+huDmC6dYw+Y2ur2JvjlpYDAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0cAMEQCIE19YOkt6/X4Fo67JdHD4TewljquqcmeS/f64UgCB4CaAiBTbT1/7Wv9bvtHP4s2CBLGv1Bse8LzCOpwCRzQeTXQtw==";
    const ECDSA_SHA384_CERT: &str = "MIIBbzCCARWgAwIBAgIUXt/mUz9M8nDmXboCsKRaOc45EycwCgYIKoZIzj0EAwMwDDEKMAgGA1UEAwwBdDAgFw0yNjExMjIwODE3NTlaGA8yMTI2MTAyOTA4MTc1OVowDDEKMAgGA1UEAwwBdDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABHh9BNGxSWcgnhvMuOD6edqRasesXmsKbfZLVjK25VTiWzEDC17GZXjt9M3dUxqoBCTbWElNOPwRqDvRSBvini6jUzBRMB0GA1UdDgQWBBT5KjddLhjzBd0CYGc+Vd6dGv0SoDAfBgNVHSMEGDAWgBT5KjddLhjzBd0CYGc+Vd6dGv0SoDAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMDA0gAMEUCIED14nTdttER7XEwvVWSpsg2koLJOBjDfrAkXIkEA/XOAiEAkVzUrxIhdFkCNckJHzeYGRuxA7p9c9hOMeCQjkGSO3Q=";

    fn der(b64: &str) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD.decode(b64).unwrap()
    }

    #[test]
    fn hash_follows_the_signature_digest() {
        assert_eq!(
            hex::encode(tls_server_end_point(&der(ECDSA_SHA256_CERT)).unwrap()),
            "efe3b9d664cde6aff9b9a8c37cd6d5f7e296aedeb9864cd629e0e442d95fbd3a"
        );
        assert_eq!(
            hex::encode(tls_server_end_point(&der(ECDSA_SHA384_CERT)).unwrap()),
            "331eb66ef0e05274e9b377080e21f5b69ed9f11a01ec57c0b82724fb947b29e174ae353b915dfdc47ede1b4f1c8d2a5e"
        );
    }

    /// Builds `SEQUENCE { SEQUENCE {} , SEQUENCE { OID oid, params } }`.
    fn fake_cert(oid: &[u8], params: &[u8]) -> Vec<u8> {
        let mut alg = vec![0x06, oid.len() as u8];
        alg.extend_from_slice(oid);
        alg.extend_from_slice(params);
        let mut body = vec![0x30, 0x00, 0x30, alg.len() as u8];
        body.extend(alg);
        let mut cert = vec![0x30, body.len() as u8];
        cert.extend(body);
        cert
    }

    #[test]
    fn algorithm_table() {
        let rsa = |last: u8| [RSA_PREFIX, &[last]].concat();
        assert_eq!(signature_hash(&fake_cert(&rsa(0x05), &[0x05, 0x00])), Some(HashAlg::Sha256), "sha1WithRSA");
        assert_eq!(signature_hash(&fake_cert(&rsa(0x0B), &[0x05, 0x00])), Some(HashAlg::Sha256));
        assert_eq!(signature_hash(&fake_cert(&rsa(0x0C), &[])), Some(HashAlg::Sha384));
        assert_eq!(signature_hash(&fake_cert(&rsa(0x0D), &[])), Some(HashAlg::Sha512));
        assert_eq!(signature_hash(&fake_cert(ECDSA_SHA1, &[])), Some(HashAlg::Sha256));
        assert_eq!(signature_hash(&fake_cert(&[ECDSA_SHA2_PREFIX, &[0x04]].concat(), &[])), Some(HashAlg::Sha512));
        assert_eq!(signature_hash(&fake_cert(&[0x2B, 0x65, 0x70], &[])), None, "Ed25519 has no binding");
        // RSASSA-PSS with hashAlgorithm [0] { sha384 }.
        let sha384 = [NIST_HASH_PREFIX, &[0x02]].concat();
        let mut hash_alg = vec![0x30, (sha384.len() + 2) as u8, 0x06, sha384.len() as u8];
        hash_alg.extend(&sha384);
        let mut explicit = vec![0xA0, hash_alg.len() as u8];
        explicit.extend(hash_alg);
        let mut params = vec![0x30, explicit.len() as u8];
        params.extend(explicit);
        assert_eq!(signature_hash(&fake_cert(&rsa(0x0A), &params)), Some(HashAlg::Sha384));
        assert_eq!(signature_hash(&fake_cert(&rsa(0x0A), &[0x30, 0x00])), Some(HashAlg::Sha256), "PSS default is SHA-1");
        assert_eq!(signature_hash(&[0x30, 0x85, 1, 2, 3, 4, 5]), None, "truncated DER");
    }
}
