//! Certificates made for a test: a CA, and certificates it signs for 127.0.0.1 and
//! localhost (PEM files in a folder of the test's own).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

/// PEM files: the CA's certificate, and a leaf certificate with its key.
pub struct TestCerts {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCerts {
    /// A CA and a certificate for `names` signed by it, written under `dir`.
    pub fn make(dir: &Path, names: &[&str]) -> TestCerts {
        std::fs::create_dir_all(dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "replicator test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "replicator test server");
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        let files = TestCerts {
            dir: dir.to_path_buf(),
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        };
        std::fs::write(&files.ca, ca.pem()).unwrap();
        // The leaf, then the chain, as servers are usually configured.
        std::fs::write(&files.cert, format!("{}{}", cert.pem(), ca.pem())).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }
}
