//! TLS for NBD: `NBD_OPT_STARTTLS` upgrades the handshake connection in
//! place, on both sides, with rustls and its `ring` provider (no C crypto).
//!
//! TLS is either off or required: a server with a certificate refuses every
//! option but `STARTTLS` and `ABORT` until the upgrade (the spec's
//! `ERR_TLS_REQD`), so nothing, not even the export list, leaks in clear.
//! Certificates and keys are X.509 PEM files, as QEMU's `tls-creds-x509`
//! uses (`server-cert.pem`, `server-key.pem`, `ca-cert.pem`).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};

pub(crate) type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub(crate) type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}", path = .path.display())]
    File { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("invalid TLS server name '{0}'")]
    ServerName(String),
}

fn file_err(path: &Path, message: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, format!("reading certificates: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, format!("parsing certificates: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server's TLS configuration, as [`crate::server::ServerConfig`] takes it.
pub type ServerTls = Arc<rustls::ServerConfig>;

/// A server configuration from a PEM certificate chain and private key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| file_err(key, format!("reading the private key: {e}")))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// A server configuration that also requires every client to present a
/// certificate signed by the CA in `ca` (QEMU's `verify-peer=on`).
pub fn server_config_verify_clients(
    cert: &Path,
    key: &Path,
    ca: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| file_err(key, format!("reading the private key: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca)? {
        roots
            .add(c)
            .map_err(|e| file_err(ca, format!("CA certificate: {e}")))?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| file_err(ca, format!("client verifier: {e}")))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// Client TLS settings: the CA that signs the server's certificate and the
/// name the certificate must carry.
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: String,
}

impl ClientTls {
    /// Trusts the CA certificates in `ca` (PEM) and expects `server_name`
    /// in the server's certificate; an empty name means the host of the URI
    /// connected to ("localhost" for a Unix socket), as QEMU's default.
    pub fn new(ca: &Path, server_name: &str) -> Result<Self, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in certs(ca)? {
            roots
                .add(c)
                .map_err(|e| file_err(ca, format!("bad CA certificate: {e}")))?;
        }
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        if !server_name.is_empty() {
            ServerName::try_from(server_name.to_string())
                .map_err(|_| TlsError::ServerName(server_name.into()))?;
        }
        Ok(ClientTls {
            config: Arc::new(config),
            server_name: server_name.into(),
        })
    }
}

/// Server side of the upgrade.
pub(crate) async fn accept(
    config: Arc<rustls::ServerConfig>,
    rd: BoxRead,
    wr: BoxWrite,
) -> io::Result<(BoxRead, BoxWrite)> {
    let tls = tokio_rustls::TlsAcceptor::from(config)
        .accept(tokio::io::join(rd, wr))
        .await?;
    let (r, w) = tokio::io::split(tls);
    Ok((Box::new(r), Box::new(w)))
}

/// Client side of the upgrade.
pub(crate) async fn connect(
    tls: &ClientTls,
    server_name: &str,
    rd: BoxRead,
    wr: BoxWrite,
) -> io::Result<(BoxRead, BoxWrite)> {
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let s = tokio_rustls::TlsConnector::from(Arc::clone(&tls.config))
        .connect(name, tokio::io::join(rd, wr))
        .await?;
    let (r, w) = tokio::io::split(s);
    Ok((Box::new(r), Box::new(w)))
}
