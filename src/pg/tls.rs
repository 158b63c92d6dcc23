//! TLS to PostgreSQL with rustls, checking the server the way libpq's sslmode
//! says: require/prefer/allow only encrypt (unless a root certificate file
//! exists, then the chain is checked as libpq does), verify-ca checks the
//! chain, verify-full also the host name.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::PgError;
use super::conninfo::{ConnParams, Endpoint, Host, SslMode};

/// A TLS session to the server, with what SCRAM needs for channel binding.
pub struct Established {
    pub stream: TlsStream<TcpStream>,
    /// `tls-server-end-point` data, None if the certificate's signature
    /// algorithm defines none.
    pub server_end_point: Option<Vec<u8>>,
}

/// Runs the TLS handshake on a socket whose SSLRequest was answered `S`.
/// The caller must not have read anything past that byte: bytes a
/// man-in-the-middle injects before the handshake would otherwise be taken
/// as coming from the server (CVE-2021-23222). Here rustls reads straight
/// from the socket, so such bytes fail the handshake.
pub async fn handshake(tcp: TcpStream, params: &ConnParams, endpoint: &Endpoint) -> Result<Established, PgError> {
    let config = client_config(params)?;
    let name = server_name(endpoint, &tcp)?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream =
        connector.connect(name, tcp).await.map_err(|e| PgError::Tls(format!("TLS handshake with {} failed: {e}", endpoint.describe())))?;
    let server_end_point =
        stream.get_ref().1.peer_certificates().and_then(|chain| chain.first()).and_then(|leaf| super::certhash::tls_server_end_point(leaf));
    Ok(Established { stream, server_end_point })
}

fn client_config(params: &ConnParams) -> Result<ClientConfig, PgError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let verifier: Arc<dyn ServerCertVerifier> = match trust(params)? {
        Some(roots) => Arc::new(ChainVerifier { roots, check_name: params.sslmode == SslMode::VerifyFull, algorithms }),
        None => Arc::new(EncryptOnly { algorithms }),
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PgError::Tls(format!("TLS setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match client_identity(params)? {
        Some((certs, key)) => builder.with_client_auth_cert(certs, key).map_err(|e| PgError::Tls(format!("client certificate: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    // PostgreSQL 17 requires this ALPN for direct TLS and checks it when
    // given; older servers ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    config.enable_sni = params.sslsni;
    Ok(config)
}

/// The roots to check the server against, or None for encryption only.
fn trust(params: &ConnParams) -> Result<Option<TrustedRoots>, PgError> {
    let verify = matches!(params.sslmode, SslMode::VerifyCa | SslMode::VerifyFull);
    let Some(path) = params.sslrootcert.as_deref() else {
        if verify {
            return Err(PgError::Tls(format!(
                "sslmode={} needs a root certificate: set sslrootcert (the home directory is unknown, so ~/.postgresql/root.crt cannot be used)",
                params.sslmode.as_str()
            )));
        }
        return Ok(None);
    };
    if path == Path::new("system") {
        let mut store = RootCertStore::empty();
        store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        return Ok(Some(TrustedRoots { store, pinned: Vec::new() }));
    }
    if !path.exists() {
        if verify {
            return Err(PgError::Tls(format!(
                "root certificate file \"{}\" does not exist; provide it, use the system's roots with sslrootcert=system, \
                 or use sslmode=require to encrypt without verifying the server",
                path.display()
            )));
        }
        return Ok(None);
    }
    let certs = read_certs(path)?;
    let mut store = RootCertStore::empty();
    for cert in &certs {
        store.add(cert.clone()).map_err(|e| PgError::Tls(format!("root certificate in {}: {e}", path.display())))?;
    }
    Ok(Some(TrustedRoots { store, pinned: certs }))
}

/// A client certificate and its key, when the certificate file exists.
fn client_identity(params: &ConnParams) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, PgError> {
    let Some(cert_path) = params.sslcert.as_deref().filter(|p| p.exists()) else {
        return Ok(None);
    };
    let certs = read_certs(cert_path)?;
    let Some(key_path) = params.sslkey.as_deref() else {
        return Err(PgError::Tls(format!("client certificate {} given without sslkey", cert_path.display())));
    };
    check_key_permissions(key_path)?;
    let pem = std::fs::read(key_path).map_err(|e| PgError::Tls(format!("cannot read private key file {}: {e}", key_path.display())))?;
    let key = rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| PgError::Tls(format!("private key file {}: {e}", key_path.display())))?
        .ok_or_else(|| PgError::Tls(format!("no private key in {}", key_path.display())))?;
    Ok(Some((certs, key)))
}

/// libpq refuses a key readable by others: 0600, or 0640 when owned by root.
fn check_key_permissions(path: &Path) -> Result<(), PgError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| PgError::Tls(format!("private key file {}: {e}", path.display())))?;
    let allowed = if meta.uid() == 0 { 0o037 } else { 0o077 };
    if meta.mode() & allowed != 0 {
        return Err(PgError::Tls(format!(
            "private key file {} has group or world access; it must be 0600 (or 0640 owned by root)",
            path.display()
        )));
    }
    Ok(())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PgError> {
    let pem = std::fs::read(path).map_err(|e| PgError::Tls(format!("cannot read certificate file {}: {e}", path.display())))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PgError::Tls(format!("certificate file {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(PgError::Tls(format!("no PEM certificate in {}", path.display())));
    }
    Ok(certs)
}

/// The name the certificate must carry under verify-full, also sent as SNI
/// (rustls sends none for IP addresses, as libpq).
fn server_name(endpoint: &Endpoint, tcp: &TcpStream) -> Result<ServerName<'static>, PgError> {
    if let Host::Tcp(name) = &endpoint.host
        && let Ok(n) = ServerName::try_from(name.clone())
    {
        return Ok(n);
    }
    let peer = tcp.peer_addr()?;
    Ok(ServerName::IpAddress(peer.ip().into()))
}

struct TrustedRoots {
    store: RootCertStore,
    /// The root file's certificates as given: a server presenting one of
    /// them itself is trusted, as OpenSSL trusts a self-signed certificate
    /// listed as a root (webpki alone rejects one marked CA:TRUE).
    pinned: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for TrustedRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TrustedRoots({} roots)", self.store.len())
    }
}

/// verify-ca and verify-full (and require with a root file).
#[derive(Debug)]
struct ChainVerifier {
    roots: TrustedRoots,
    check_name: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ChainVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        if !self.roots.pinned.iter().any(|p| p.as_ref() == end_entity.as_ref()) {
            rustls::client::verify_server_cert_signed_by_trust_anchor(&cert, &self.roots.store, intermediates, now, self.algorithms.all)?;
        }
        if self.check_name {
            rustls::client::verify_server_name(&cert, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// require/prefer/allow without a root file: any certificate is accepted (as
/// libpq does), but the handshake signatures are still checked so the
/// session key really belongs to the certificate used for channel binding.
#[derive(Debug)]
struct EncryptOnly {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
