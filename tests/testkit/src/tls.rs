//! A throwaway PKI for TLS tests: a CA, a server certificate for 127.0.0.1 and localhost, and
//! client certificates with a common name, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::within;

/// PEM files of a test CA and of certificates it signed.
pub struct TestPki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (PEM file).
    pub ca: PathBuf,
}

/// A certificate and its key, as PEM files.
pub struct CertFiles {
    /// The certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

impl TestPki {
    /// A new CA whose files go to `dir`.
    pub fn new(dir: &Path) -> TestPki {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Ledger test CA");
        let cert = params.self_signed(&key).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, cert.pem()).unwrap();
        TestPki {
            dir: dir.to_path_buf(),
            issuer: Issuer::new(params, key),
            ca,
        }
    }

    fn issue(&self, file: &str, names: Vec<String>, common_name: &str) -> CertFiles {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let files = CertFiles {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    /// A server certificate for `127.0.0.1` and `localhost`.
    pub fn server(&self) -> CertFiles {
        self.issue(
            "server",
            vec!["localhost".into(), "127.0.0.1".into()],
            "localhost",
        )
    }

    /// A client certificate whose subject's common name is `common_name`.
    pub fn client(&self, common_name: &str) -> CertFiles {
        self.issue(&format!("client-{common_name}"), Vec::new(), common_name)
    }
}

/// A TLS connection to the server at `addr` (HOST:PORT) whose certificate `ca` signed, with the
/// client certificate `identity` if given. A server just started may reset the very first
/// connection: connecting is retried for up to 30 s.
pub async fn channel(addr: &str, ca: &Path, identity: Option<&CertFiles>) -> Channel {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    if let Some(identity) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(&identity.cert).unwrap(),
            std::fs::read(&identity.key).unwrap(),
        ));
    }
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap();
    within(30, "connecting over TLS", async {
        loop {
            match endpoint.connect().await {
                Ok(channel) => break channel,
                Err(e) => {
                    eprintln!("connecting to {addr} over TLS: {e:?}; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    })
    .await
}

/// `message` as a request carrying `authorization: Bearer TOKEN`.
pub fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .expect("a printable token"),
    );
    request
}
