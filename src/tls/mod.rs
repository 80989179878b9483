//! TLS with rustls: the proxy's certificate towards clients (`[proxy] tls_cert_file`,
//! `tls_key_file`, `client_tls`), the client streams that may or may not be encrypted,
//! and the certificate hash SCRAM-SHA-256-PLUS binds to (tls-server-end-point).

pub mod connect;
pub mod negotiate;
pub mod stream;

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::Digest;

use crate::config::{ClientTls, ProxySettings};

/// The ALPN protocol name PostgreSQL 17 clients send with `sslnegotiation=direct`.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// What the client listener needs to offer TLS: the rustls config and the hash of the
/// leaf certificate for channel binding.
pub struct ServerTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub end_point: Vec<u8>,
    pub mode: ClientTls,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("mode", &self.mode)
            .finish()
    }
}

/// The TLS the proxy offers clients under `proxy`: `None` when `client_tls` is
/// `disable` (or no certificate is set). Errors name the file and what is wrong.
pub fn load_server_tls(proxy: &ProxySettings) -> Result<Option<Arc<ServerTls>>, String> {
    let mode = proxy.client_tls();
    if mode == ClientTls::Disable {
        return Ok(None);
    }
    let (Some(cert_file), Some(key_file)) = (&proxy.tls_cert_file, &proxy.tls_key_file) else {
        return Err("client_tls needs tls_cert_file and tls_key_file".into());
    };
    let chain = read_certificates(cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("{key_file}: no private key could be read: {e}"))?;
    let end_point = end_point_hash(&chain[0]);
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("{cert_file} and {key_file} do not go together: {e}"))?;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Some(Arc::new(ServerTls {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        end_point,
        mode,
    })))
}

/// Every certificate in a PEM file (a leaf, then its chain).
pub fn read_certificates(file: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let iter = CertificateDer::pem_file_iter(file).map_err(|e| format!("{file}: {e}"))?;
    let chain: Vec<CertificateDer<'static>> = iter
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{file}: not a PEM certificate file: {e}"))?;
    if chain.is_empty() {
        return Err(format!("{file}: no certificate in it"));
    }
    Ok(chain)
}

/// The one crypto provider the proxy uses (ring), chosen explicitly so that nothing
/// depends on a process-wide default.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// RFC 5929's tls-server-end-point: the certificate hashed with its own signature's
/// hash function, SHA-256 when that is MD5 or SHA-1 (or cannot be read).
pub fn end_point_hash(certificate: &[u8]) -> Vec<u8> {
    match signature_hash(certificate) {
        Some(SignatureHash::Sha384) => sha2::Sha384::digest(certificate).to_vec(),
        Some(SignatureHash::Sha512) => sha2::Sha512::digest(certificate).to_vec(),
        _ => sha2::Sha256::digest(certificate).to_vec(),
    }
}

/// The tls-server-end-point hash of the certificate a server showed.
pub fn peer_end_point(connection: &rustls::ClientConnection) -> Option<Vec<u8>> {
    connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| end_point_hash(leaf))
}

#[derive(Debug, PartialEq)]
enum SignatureHash {
    Sha384,
    Sha512,
}

/// The hash of a DER certificate's outer signatureAlgorithm, when it is SHA-384 or
/// SHA-512 (RSA, RSA-PSS is not told apart, or ECDSA); everything else hashes with
/// SHA-256.
fn signature_hash(der: &[u8]) -> Option<SignatureHash> {
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
    let (certificate, _) = der_element(der, 0x30)?;
    let (_, after_tbs) = der_element(certificate, 0x30)?;
    let (algorithm, _) = der_element(after_tbs, 0x30)?;
    let (oid, _) = der_element(algorithm, 0x06)?;
    const SHA384: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c], // sha384WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],       // ecdsa-with-SHA384
    ];
    const SHA512: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d], // sha512WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],       // ecdsa-with-SHA512
    ];
    if SHA384.contains(&oid) {
        Some(SignatureHash::Sha384)
    } else if SHA512.contains(&oid) {
        Some(SignatureHash::Sha512)
    } else {
        None
    }
}

/// One DER element with tag `tag` at the start of `input`: its contents and what
/// follows it.
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, rest) = input.split_first()?;
    if first != tag {
        return None;
    }
    let (&len_byte, rest) = rest.split_first()?;
    let (len, rest) = if len_byte < 0x80 {
        (usize::from(len_byte), rest)
    } else {
        let count = usize::from(len_byte & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[count..])
    };
    if rest.len() < len {
        return None;
    }
    Some(rest.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_point_hash_follows_the_signature_algorithm() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(signature_hash(cert.der()), Some(SignatureHash::Sha384));
        assert_eq!(end_point_hash(cert.der()).len(), 48);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(signature_hash(cert.der()), None);
        assert_eq!(
            end_point_hash(cert.der()),
            sha2::Sha256::digest(cert.der()).to_vec()
        );
        // Garbage hashes with SHA-256 instead of failing.
        assert_eq!(end_point_hash(b"\x30\x82").len(), 32);
    }
}
