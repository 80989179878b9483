//! TLS towards Postgres servers, with libpq's words and meanings: `sslmode`
//! (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`), `sslrootcert`,
//! `sslcert`/`sslkey`. As in libpq, `require` with a root certificate file behaves as
//! `verify-ca`. The rustls client config built here serves the data path's own
//! connections and, through [`MakeRustlsConnect`], every tokio-postgres connection
//! (monitor, failover, CDC).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::protocol::auth_policy::{AuthGuard, RequireAuth};

/// libpq's sslmode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(word: &str) -> Result<SslMode, String> {
        Ok(match word {
            "disable" => SslMode::Disable,
            // allow: clear text first, TLS if refused; treated as prefer (TLS first).
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "invalid sslmode \"{other}\" (disable, allow, prefer, require, verify-ca, verify-full)"
                ));
            }
        })
    }

    /// The connection must be encrypted.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }
}

/// What a node's URI says about TLS.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerTlsSettings {
    pub mode: SslMode,
    pub root_cert: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
}

impl Default for ServerTlsSettings {
    /// libpq's default: prefer, no root certificate.
    fn default() -> Self {
        ServerTlsSettings {
            mode: SslMode::Prefer,
            root_cert: None,
            cert: None,
            key: None,
        }
    }
}

impl ServerTlsSettings {
    /// The rustls client config these settings ask for (`None` for `disable`).
    pub fn client_config(&self) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
        if self.mode == SslMode::Disable {
            return Ok(None);
        }
        let provider = super::provider();
        let verifier: Arc<dyn ServerCertVerifier> = match (&self.root_cert, self.mode) {
            (None, SslMode::VerifyCa | SslMode::VerifyFull) => {
                return Err(format!(
                    "sslmode={} needs sslrootcert (the CA that signed the server's certificate)",
                    if self.mode == SslMode::VerifyCa {
                        "verify-ca"
                    } else {
                        "verify-full"
                    }
                ));
            }
            (None, _) => Arc::new(AnyCertificate(provider.clone())),
            (Some(file), mode) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in super::read_certificates(file)? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("{file}: not a usable CA certificate: {e}"))?;
                }
                let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider.clone(),
                )
                .build()
                .map_err(|e| format!("{file}: {e}"))?;
                if mode == SslMode::VerifyFull {
                    webpki
                } else {
                    // prefer/require with a root certificate, and verify-ca: the chain,
                    // not the host name.
                    Arc::new(ChainOnly(webpki))
                }
            }
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = super::read_certificates(cert)?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("{key}: no private key could be read: {e}"))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("{cert} and its key do not go together: {e}"))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err("sslcert and sslkey go together".into()),
        };
        // PostgreSQL 17 servers check it with direct TLS; older ones ignore it.
        config.alpn_protocols = vec![super::ALPN_POSTGRESQL.to_vec()];
        Ok(Some(Arc::new(config)))
    }
}

static CLIENT_CONFIGS: std::sync::Mutex<
    Option<std::collections::HashMap<ServerTlsSettings, Arc<rustls::ClientConfig>>>,
> = std::sync::Mutex::new(None);

impl ServerTlsSettings {
    /// [`ServerTlsSettings::client_config`], built once per distinct settings (the files
    /// are read again after [`forget_client_configs`], which a reload calls).
    pub fn cached_client_config(&self) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
        if self.mode == SslMode::Disable {
            return Ok(None);
        }
        if let Ok(cache) = CLIENT_CONFIGS.lock()
            && let Some(config) = cache.as_ref().and_then(|c| c.get(self))
        {
            return Ok(Some(config.clone()));
        }
        let config = self.client_config()?;
        if let (Some(config), Ok(mut cache)) = (&config, CLIENT_CONFIGS.lock()) {
            cache
                .get_or_insert_with(Default::default)
                .insert(self.clone(), config.clone());
        }
        Ok(config)
    }
}

/// Drops the cached client configs: certificates are read again on next use.
pub fn forget_client_configs() {
    if let Ok(mut cache) = CLIENT_CONFIGS.lock() {
        *cache = None;
    }
}

/// `sslmode=require` (or prefer) without a root certificate: encryption without
/// knowing whom to, exactly as libpq. The handshake signatures are still checked.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client config that trusts exactly the leaf certificate in `cert_file` (the
/// proxy's own, for the CLI talking to the admin endpoints on the same host).
pub fn pinned_client_config(cert_file: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    let chain = super::read_certificates(cert_file)?;
    let provider = super::provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned {
            certificate: chain[0].clone(),
            any: AnyCertificate(provider),
        }))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Accepts one certificate, byte for byte (signatures still checked).
#[derive(Debug)]
struct Pinned {
    certificate: CertificateDer<'static>,
    any: AnyCertificate,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        if end_entity.as_ref() == self.certificate.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(Error::InvalidCertificate(CertificateError::UnknownIssuer))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.any.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.any.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.any.supported_verify_schemes()
    }
}

/// verify-ca: the certificate must chain to the root; its names are not checked.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The name rustls checks the certificate against (an IP address or a DNS name).
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_string()).map_err(|e| format!("\"{host}\": {e}"))
}

/// tokio-postgres' TLS hook, backed by a rustls client config.
#[derive(Clone)]
pub struct MakeRustlsConnect {
    config: Arc<rustls::ClientConfig>,
    require_auth: Option<Option<RequireAuth>>,
}

impl MakeRustlsConnect {
    pub fn new(config: Arc<rustls::ClientConfig>) -> Self {
        MakeRustlsConnect {
            config,
            require_auth: None,
        }
    }

    /// Checks the server's authentication requests inside the encrypted stream as the
    /// proxy's own logins do (see `protocol::auth_policy`).
    pub fn guarded(config: Arc<rustls::ClientConfig>, require_auth: Option<RequireAuth>) -> Self {
        MakeRustlsConnect {
            config,
            require_auth: Some(require_auth),
        }
    }
}

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for MakeRustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnect> {
        let name = server_name(domain).map_err(io::Error::other)?;
        Ok(RustlsConnect {
            connector: tokio_rustls::TlsConnector::from(self.config.clone()),
            name,
            guard: self
                .require_auth
                .clone()
                .map(|required| AuthGuard::new(required, true, false)),
        })
    }
}

pub struct RustlsConnect {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
    guard: Option<AuthGuard>,
}

type ConnectFuture<S> = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

impl<S> tokio_postgres::tls::TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = ConnectFuture<S>;

    fn connect(self, stream: S) -> ConnectFuture<S> {
        Box::pin(async move {
            let stream = self.connector.connect(self.name, stream).await?;
            Ok(RustlsStream {
                inner: stream,
                guard: self.guard,
            })
        })
    }
}

/// An encrypted connection to a server, as tokio-postgres sees it.
pub struct RustlsStream<S> {
    inner: tokio_rustls::client::TlsStream<S>,
    guard: Option<AuthGuard>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    /// SCRAM-SHA-256-PLUS towards the server: bound to the certificate it showed.
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        match super::peer_end_point(self.inner.get_ref().1) {
            Some(hash) => tokio_postgres::tls::ChannelBinding::tls_server_end_point(hash),
            None => tokio_postgres::tls::ChannelBinding::none(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(guard)) = (&result, this.guard.as_mut())
            && let Err(reason) = guard.inspect(&buf.filled()[before..])
        {
            tracing::warn!("server login refused: {reason}");
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::PermissionDenied, reason)));
        }
        result
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
