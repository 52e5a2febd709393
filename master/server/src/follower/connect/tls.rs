//! The TLS half of the listening connection: the URL's TLS parameters read as libpq reads them
//! (with their `PGSSL*` variables and `~/.postgresql/` defaults), and the rustls configuration
//! and server-certificate check they stand for.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{ListenError, SslMode};

/// Where the root certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum RootCert {
    /// A PEM file; used if it exists (required by `verify-ca` and `verify-full`).
    File(PathBuf),
    /// `sslrootcert=system`: the system's trusted roots (libpq then defaults to `verify-full`).
    System,
    /// No file given and no home directory to find the default in.
    Unknown,
}

/// The URL's TLS settings, read as libpq reads them.
#[derive(Debug, Clone)]
pub(super) struct TlsSettings {
    pub(super) mode: SslMode,
    pub(super) root_cert: RootCert,
    /// The client certificate, used if the file exists (libpq ignores a missing one).
    pub(super) cert: Option<PathBuf>,
    /// Its key, required when the certificate exists.
    pub(super) key: Option<PathBuf>,
    pub(super) crl: Option<PathBuf>,
    pub(super) crl_dir: Option<PathBuf>,
    /// `sslsni`: send the host name in the handshake (never for an IP address).
    pub(super) sni: bool,
    /// `sslcertmode=disable`: never send a client certificate.
    pub(super) send_cert: bool,
    pub(super) versions: Vec<&'static rustls::SupportedProtocolVersion>,
}

/// The TLS parameters taken out of the URL, each with its libpq environment variable.
pub(super) const TLS_PARAMETERS: &[(&str, Option<&str>)] = &[
    ("sslmode", Some("PGSSLMODE")),
    ("sslrootcert", Some("PGSSLROOTCERT")),
    ("sslcert", Some("PGSSLCERT")),
    ("sslkey", Some("PGSSLKEY")),
    ("sslcrl", Some("PGSSLCRL")),
    ("sslcrldir", Some("PGSSLCRLDIR")),
    ("sslsni", Some("PGSSLSNI")),
    ("sslcertmode", Some("PGSSLCERTMODE")),
    ("ssl_min_protocol_version", Some("PGSSLMINPROTOCOLVERSION")),
    ("ssl_max_protocol_version", Some("PGSSLMAXPROTOCOLVERSION")),
    // Ignored by libpq since OpenSSL dropped compression.
    ("sslcompression", Some("PGSSLCOMPRESSION")),
    // Only for an encrypted key, which is refused below.
    ("sslpassword", None),
    // Not TLS, but libpq's and unknown to tokio-postgres.
    ("fallback_application_name", None),
];

impl TlsSettings {
    /// The settings from `setting` (the URL, then the environment), with libpq's defaults.
    pub(super) fn read(
        setting: &dyn Fn(&str) -> Option<String>,
        home: Option<&Path>,
    ) -> Result<TlsSettings, ListenError> {
        let in_home = |file: &str| home.map(|h| h.join(".postgresql").join(file));
        let root_cert = match setting("sslrootcert") {
            Some(value) if value == "system" => RootCert::System,
            Some(value) => RootCert::File(PathBuf::from(value)),
            None => in_home("root.crt").map_or(RootCert::Unknown, RootCert::File),
        };
        let mode = match setting("sslmode") {
            Some(value) => SslMode::parse(&value)?,
            // libpq 16: the system's roots make sense only with the name checked.
            None if root_cert == RootCert::System => SslMode::VerifyFull,
            None => SslMode::Prefer,
        };
        if root_cert == RootCert::System && mode != SslMode::VerifyFull {
            return Err(ListenError::Unsupported(format!(
                "weak sslmode {mode:?} may not be used with sslrootcert=system (use verify-full)"
            )));
        }
        let send_cert = match setting("sslcertmode").as_deref() {
            None | Some("allow") => true,
            Some("disable") => false,
            Some(other) => {
                return Err(ListenError::Unsupported(format!(
                    "sslcertmode={other} is not supported by the listening connection \
                     (disable and allow are)"
                )));
            }
        };
        let sni = match setting("sslsni").as_deref() {
            None | Some("1") => true,
            Some("0") => false,
            Some(other) => {
                return Err(ListenError::Unsupported(format!(
                    "invalid sslsni value: {other:?}"
                )));
            }
        };
        let version = |name: &str, default: Option<u8>| -> Result<Option<u8>, ListenError> {
            match setting(name) {
                None => Ok(default),
                Some(value) => match value.to_ascii_lowercase().as_str() {
                    "tlsv1" => Ok(Some(0)),
                    "tlsv1.1" => Ok(Some(1)),
                    "tlsv1.2" => Ok(Some(2)),
                    "tlsv1.3" => Ok(Some(3)),
                    _ => Err(ListenError::Unsupported(format!(
                        "invalid {name} value: {value:?}"
                    ))),
                },
            }
        };
        // libpq's default minimum is TLS 1.2; rustls has nothing older.
        let min = version("ssl_min_protocol_version", Some(2))?.unwrap_or(2);
        let max = version("ssl_max_protocol_version", None)?.unwrap_or(3);
        let versions: Vec<_> = [(2, &rustls::version::TLS12), (3, &rustls::version::TLS13)]
            .into_iter()
            .filter(|(v, _)| (min..=max).contains(v))
            .map(|(_, version)| version)
            .collect();
        if versions.is_empty() {
            return Err(ListenError::Unsupported(format!(
                "ssl_min_protocol_version/ssl_max_protocol_version allow no version of TLS 1.2 \
                 and 1.3, the only ones the listening connection speaks (tried TLSv1.{min} to \
                 TLSv1.{max})"
            )));
        }
        Ok(TlsSettings {
            mode,
            root_cert,
            cert: setting("sslcert")
                .map(PathBuf::from)
                .or_else(|| in_home("postgresql.crt")),
            key: setting("sslkey")
                .map(PathBuf::from)
                .or_else(|| in_home("postgresql.key")),
            crl: setting("sslcrl").map(PathBuf::from),
            crl_dir: setting("sslcrldir").map(PathBuf::from),
            sni,
            send_cert,
            versions,
        })
    }

    /// rustls's configuration for the next connection, from the files as they are now.
    pub(super) fn client_config(&self) -> Result<rustls::ClientConfig, ListenError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = self.root_certificates()?;
        let chain = match roots {
            None => None,
            Some(roots) => {
                let crls = self.revocation_lists()?;
                let mut builder =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone());
                if !crls.is_empty() {
                    // Every certificate of the chain checked, an unknown status refused: as
                    // OpenSSL's CRL_CHECK_ALL, which libpq sets.
                    builder = builder.with_crls(crls);
                }
                Some(
                    builder
                        .build()
                        .map_err(|e| ListenError::Tls(rustls::Error::General(e.to_string())))?,
                )
            }
        };
        let verifier = Arc::new(ServerVerifier {
            chain,
            check_name: self.mode == SslMode::VerifyFull,
            algorithms: provider.signature_verification_algorithms,
        });
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&self.versions)?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match self.client_certificate()? {
            Some((certs, key)) => builder.with_client_auth_cert(certs, key)?,
            None => builder.with_no_client_auth(),
        };
        config.enable_sni = self.sni;
        Ok(config)
    }

    /// The root certificates to check the server's against; `None`: none to check against,
    /// which libpq allows below `verify-ca`.
    pub(super) fn root_certificates(&self) -> Result<Option<RootCertStore>, ListenError> {
        const WHAT: &str = "root certificate file";
        let path = match &self.root_cert {
            RootCert::System => return system_roots().map(Some),
            RootCert::Unknown if self.mode.verifies() => {
                return Err(ListenError::Unsupported(format!(
                    "sslmode={:?} needs a root certificate: no home directory to find \
                     ~/.postgresql/root.crt in, and no sslrootcert",
                    self.mode
                )));
            }
            RootCert::Unknown => return Ok(None),
            RootCert::File(path) => path,
        };
        let pem = match std::fs::read(path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !self.mode.verifies() => {
                return Ok(None);
            }
            Err(e) => return Err(file_error(WHAT, path, e)),
        };
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| file_error(WHAT, path, e))?;
            roots
                .add(cert)
                .map_err(|e| file_error(WHAT, path, format!("a certificate is unusable: {e}")))?;
        }
        if roots.is_empty() {
            return Err(file_error(WHAT, path, "holds no PEM certificate"));
        }
        Ok(Some(roots))
    }

    /// The certificate revocation lists of `sslcrl` and `sslcrldir`.
    fn revocation_lists(&self) -> Result<Vec<CertificateRevocationListDer<'static>>, ListenError> {
        const WHAT: &str = "certificate revocation list";
        let mut files = Vec::new();
        if let Some(file) = &self.crl {
            files.push(file.clone());
        }
        if let Some(dir) = &self.crl_dir {
            // OpenSSL looks up a CRL by its issuer's hash; reading them all finds the same.
            let entries = std::fs::read_dir(dir).map_err(|e| file_error(WHAT, dir, e))?;
            for entry in entries {
                let path = entry.map_err(|e| file_error(WHAT, dir, e))?.path();
                if path.is_file() {
                    files.push(path);
                }
            }
        }
        let mut crls = Vec::new();
        for path in files {
            let pem = std::fs::read(&path).map_err(|e| file_error(WHAT, &path, e))?;
            for crl in CertificateRevocationListDer::pem_slice_iter(&pem) {
                crls.push(crl.map_err(|e| file_error(WHAT, &path, e))?);
            }
        }
        Ok(crls)
    }

    /// The client certificate and its key, if the certificate file exists: libpq ignores a
    /// missing one, and requires the key of one that exists.
    fn client_certificate(
        &self,
    ) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, ListenError> {
        const WHAT: &str = "client certificate file";
        const KEY: &str = "client key file";
        let Some(path) = self.cert.as_ref().filter(|_| self.send_cert) else {
            return Ok(None);
        };
        let pem = match std::fs::read(path) {
            Ok(pem) => pem,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(file_error(WHAT, path, e)),
        };
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_error(WHAT, path, e))?;
        if certs.is_empty() {
            return Err(file_error(WHAT, path, "holds no PEM certificate"));
        }
        let Some(key_path) = &self.key else {
            return Err(ListenError::Unsupported(
                "a client certificate but no client key file (no sslkey, no home directory)".into(),
            ));
        };
        check_key_permissions(key_path)?;
        let key_pem = std::fs::read(key_path).map_err(|e| file_error(KEY, key_path, e))?;
        if String::from_utf8_lossy(&key_pem).contains("ENCRYPTED") {
            return Err(file_error(
                KEY,
                key_path,
                "is encrypted, which the listening connection does not support",
            ));
        }
        let key =
            PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| file_error(KEY, key_path, e))?;
        Ok(Some((certs, key)))
    }
}

/// libpq refuses a key file others may read: one root owns may be read by its group (0640,
/// for system-wide keys), any other must be its owner's alone (0600).
fn check_key_permissions(path: &Path) -> Result<(), ListenError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| file_error("client key file", path, e))?;
    let too_open = if meta.uid() == 0 {
        meta.mode() & 0o037 != 0
    } else {
        meta.mode() & 0o077 != 0
    };
    if meta.is_file() && too_open {
        return Err(file_error(
            "client key file",
            path,
            "has group or world access; file must have permissions u=rw (0600) or less if owned \
             by the current user, or permissions u=rw,g=r (0640) or less if owned by root",
        ));
    }
    Ok(())
}

/// The system's trusted roots, where OpenSSL (libpq's) finds them on the usual systems.
fn system_roots() -> Result<RootCertStore, ListenError> {
    let candidates = std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            [
                "/etc/ssl/certs/ca-certificates.crt",
                "/etc/pki/tls/certs/ca-bundle.crt",
                "/etc/ssl/cert.pem",
            ]
            .map(PathBuf::from),
        );
    for path in candidates {
        let Ok(pem) = std::fs::read(&path) else {
            continue;
        };
        let mut roots = RootCertStore::empty();
        let certs = CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok);
        roots.add_parsable_certificates(certs);
        if !roots.is_empty() {
            return Ok(roots);
        }
    }
    Err(ListenError::Unsupported(
        "sslrootcert=system: no system certificate bundle found (set SSL_CERT_FILE)".into(),
    ))
}

fn file_error(what: &'static str, path: &Path, reason: impl std::fmt::Display) -> ListenError {
    ListenError::File {
        what,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The home directory libpq looks in for `~/.postgresql/`.
pub(super) fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

/// A connector that is never asked for a handshake (plaintext attempts).
pub(super) fn plaintext_connector() -> MakeRustlsConnect {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier {
            chain: None,
            check_name: false,
            algorithms,
        }))
        .with_no_client_auth();
    MakeRustlsConnect::new(config)
}

/// The server certificate check libpq asks of OpenSSL: none without root certificates, the
/// chain with them, and the host name too for `verify-full`. The handshake's signatures are
/// always checked against the certificate's key.
#[derive(Debug)]
struct ServerVerifier {
    chain: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        // webpki checks the name last, after the chain, the dates and the revocation lists: a
        // name error means everything else passed.
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            checked => checked,
        }
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
