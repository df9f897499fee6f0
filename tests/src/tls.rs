//! A certificate authority made at test time, and server certificates it signs, so receivers
//! speak real TLS and agents trust them only through `--extra-ca-cert`.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub pem: String,
    /// `ca.pem` in a temporary folder, for `--extra-ca-cert`.
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "Herald test CA");
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        let pem = cert.pem();
        let dir = tempfile::tempdir().expect("temporary folder");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, &pem).expect("write ca.pem");
        TestCa { issuer: Issuer::new(params, key), pem, path, _dir: dir }
    }

    /// A certificate for `names` signed by this CA, with `usage`: its PEM and its key's PEM.
    fn issue(&self, names: &[&str], usage: rcgen::ExtendedKeyUsagePurpose) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).expect("params");
        params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("herald"));
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        (cert.pem(), key.serialize_pem())
    }

    fn write_pair(&self, stem: &str, (cert, key): (String, String)) -> (PathBuf, PathBuf) {
        let dir = self._dir.path();
        let (cert_path, key_path) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}-key.pem")));
        std::fs::write(&cert_path, cert).expect("write certificate");
        std::fs::write(&key_path, key).expect("write key");
        (cert_path, key_path)
    }

    /// Server certificate and key files for `names`, for `herald serve --tls-cert --tls-key`.
    pub fn server_files(&self, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        self.write_pair(stem, self.issue(names, rcgen::ExtendedKeyUsagePurpose::ServerAuth))
    }

    /// Client certificate and key files, for `herald-agent --client-cert --client-key`.
    pub fn client_files(&self, stem: &str) -> (PathBuf, PathBuf) {
        self.write_pair(stem, self.issue(&[stem], rcgen::ExtendedKeyUsagePurpose::ClientAuth))
    }

    /// A rustls server configuration for `names` (host names or IP addresses), signed by this CA.
    pub fn server_config(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        let params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).expect("params");
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &self.issuer).expect("server certificate");
        let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key_der)
            .expect("server config");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}
