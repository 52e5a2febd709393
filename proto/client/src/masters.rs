//! Master addresses, connections to them (TLS, bearer token), and readable descriptions of
//! what went wrong. A relay's upstream is a master too: the same code reaches it.

use std::fmt;
use std::time::Duration;

use std::path::PathBuf;

use ledger_proto::pb::ledger_service_client::LedgerServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A connected client of a master; every call carries the bearer token, if one is configured.
pub type Client = LedgerServiceClient<InterceptedService<Channel, BearerToken>>;

/// The largest message accepted from a master: far above any policy, so only a broken stream
/// hits it.
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// How often an idle connection is checked with an HTTP/2 ping (also while no call is open),
/// so that a master that vanished without closing the connection (a cut network) is noticed
/// and NATs keep the mapping of a long idle stream. The master accepts pings this often.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Adds `authorization: Bearer TOKEN` to every call when a token is configured.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// The metadata for `token`; `None` sends no authorization.
    pub fn new(token: Option<&str>) -> Result<BearerToken, String> {
        let Some(token) = token else {
            return Ok(BearerToken(None));
        };
        let mut value: MetadataValue<Ascii> = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| "the token must be printable ASCII".to_string())?;
        // Keeps the secret out of h2/hyper debug logs and header dumps.
        value.set_sensitive(true);
        Ok(BearerToken(Some(value)))
    }
}

impl fmt::Debug for BearerToken {
    // Never prints the token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "BearerToken(..)"
        } else {
            "BearerToken(None)"
        })
    }
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The files of the client's TLS settings, as the command line names them.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// The CA (PEM) the master's certificate must chain to; TLS is on when given.
    pub ca: Option<PathBuf>,
    /// The client certificate chain (PEM) for mTLS.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub key: Option<PathBuf>,
    /// The name the master's certificate must hold, instead of the address's host.
    pub domain: Option<String>,
}

/// How a client talks to masters: TLS, its client certificate and the bearer token. The
/// default is plaintext without a token.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    tls: Option<ClientTlsConfig>,
    /// Whether `tls` holds a client certificate.
    certificate: bool,
    token: BearerToken,
    /// How the command line names these settings, for the hints of errors: `--` (the member's
    /// `--tls-ca`, `--token`) or `--upstream-` (a relay's `--upstream-tls-ca`, ...).
    flags: &'static str,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            tls: None,
            certificate: false,
            token: BearerToken::default(),
            flags: "--",
        }
    }
}

impl ClientOptions {
    /// Reads the PEM files of `tls` and prepares `token`; errors name the member's flags
    /// (`--tls-ca`, ...).
    pub fn new(tls: &TlsFiles, token: Option<&str>) -> Result<ClientOptions, String> {
        Self::with_flag_prefix(tls, token, "--")
    }

    /// [`ClientOptions::new`] for settings whose flags start with `prefix` (`--upstream-`
    /// names `--upstream-tls-ca`, `--upstream-tls-cert`, ...), so that errors name them.
    pub fn with_flag_prefix(
        tls: &TlsFiles,
        token: Option<&str>,
        prefix: &'static str,
    ) -> Result<ClientOptions, String> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        let p = prefix;
        let mut certificate = false;
        let tls = match &tls.ca {
            None => {
                if tls.cert.is_some() || tls.domain.is_some() {
                    return Err(format!(
                        "{p}tls-cert and {p}tls-domain need {p}tls-ca (the CA that signed the master's certificate)"
                    ));
                }
                None
            }
            Some(ca) => {
                let mut config =
                    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
                match (&tls.cert, &tls.key) {
                    (Some(cert), Some(key)) => {
                        config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
                        certificate = true;
                    }
                    (None, None) => {}
                    _ => return Err(format!("{p}tls-cert and {p}tls-key go together")),
                }
                if let Some(domain) = &tls.domain {
                    config = config.domain_name(domain.clone());
                }
                Some(config)
            }
        };
        Ok(ClientOptions {
            tls,
            certificate,
            token: BearerToken::new(token)?,
            flags: prefix,
        })
    }

    /// Whether connections use TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Whether calls carry an identity of this client: a client certificate (on the
    /// connection) or a bearer token (on every call).
    pub fn has_identity(&self) -> bool {
        self.certificate || self.token.0.is_some()
    }

    /// The `authorization` metadata this client sends (`Bearer TOKEN`), if a token is set.
    pub fn authorization(&self) -> Option<&MetadataValue<Ascii>> {
        self.token.0.as_ref()
    }

    /// A client of the master at the other end of `channel` that sends this client's token.
    pub fn client(&self, channel: Channel) -> Client {
        with_limits(LedgerServiceClient::with_interceptor(
            channel,
            self.token.clone(),
        ))
    }
}

/// The address of a master, as the operator wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterAddr {
    text: String,
    /// `http://HOST:PORT`; `https` replaces `http` when TLS is on.
    uri: String,
}

impl MasterAddr {
    /// Reads `HOST:PORT` or `http://HOST:PORT`.
    pub fn parse(text: &str) -> Result<MasterAddr, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("a master address is empty".into());
        }
        let authority = text
            .strip_prefix("http://")
            .or_else(|| text.strip_prefix("https://"))
            .unwrap_or(text);
        if authority.contains("://") {
            return Err(format!("{text}: the scheme must be http:// or https://"));
        }
        // The scheme is chosen at connection time from the TLS options; `https://` alone asks
        // for TLS, which needs a CA (checked then).
        let uri = format!("http://{authority}");
        Endpoint::from_shared(uri.clone()).map_err(|e| format!("{text}: {}", describe(&e)))?;
        Ok(MasterAddr {
            text: text.to_string(),
            uri,
        })
    }

    /// Connects with `options` (TLS, token), failing after `timeout`.
    pub async fn connect(
        &self,
        options: &ClientOptions,
        timeout: Duration,
    ) -> Result<Client, String> {
        Ok(options.client(self.channel(options, timeout).await?))
    }

    /// Opens a connection with the TLS settings (and client certificate) of `options`,
    /// failing after `timeout`. Calls on it carry no token unless the client made of it adds
    /// one ([`ClientOptions::client`]), so one connection can carry calls with other
    /// credentials too (a relay forwards its callers' tokens on it).
    pub async fn channel(
        &self,
        options: &ClientOptions,
        timeout: Duration,
    ) -> Result<Channel, String> {
        let endpoint = self.endpoint(options, timeout)?;
        tokio::time::timeout(timeout, endpoint.connect())
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))?
            .map_err(|e| describe(&e))
    }

    fn endpoint(&self, options: &ClientOptions, timeout: Duration) -> Result<Endpoint, String> {
        let uri = match &options.tls {
            Some(_) => self.uri.replacen("http://", "https://", 1),
            None if self.text.starts_with("https://") => {
                return Err(format!(
                    "https:// needs {}tls-ca (the CA that signed the master's certificate)",
                    options.flags
                ));
            }
            None => self.uri.clone(),
        };
        let mut endpoint = Endpoint::from_shared(uri)
            .map_err(|e| describe(&e))?
            .connect_timeout(timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_INTERVAL)
            .keep_alive_while_idle(true);
        if let Some(tls) = &options.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| format!("invalid TLS settings: {}", describe(&e)))?;
        }
        Ok(endpoint)
    }
}

/// `client` with the message size limits of every client here: far above any policy.
pub fn with_limits<T>(client: LedgerServiceClient<T>) -> LedgerServiceClient<T>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    client
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

impl fmt::Display for MasterAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Connects to the first of `masters` that answers, in order; the error lists why each failed.
pub async fn connect_first<'a>(
    masters: &'a [MasterAddr],
    options: &ClientOptions,
    timeout: Duration,
) -> Result<(Client, &'a MasterAddr), String> {
    if masters.is_empty() {
        return Err("no master address given (--master or LEDGER_MASTER)".into());
    }
    let mut failures = Vec::new();
    for master in masters {
        match master.connect(options, timeout).await {
            Ok(client) => return Ok((client, master)),
            Err(e) => failures.push(format!("{master}: {e}")),
        }
    }
    Err(failures.join("; "))
}

/// An error with its causes, `outer: inner: root`, without repeating a cause that its parent
/// already quotes (transport errors do).
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Whether a call failed in the transport before the master answered: what a plaintext
/// client gets from a TLS-only server (`Unknown: transport error`, `Cancelled`, `Internal: h2
/// protocol error`, depending on timing). Such statuses are made locally: they keep the error
/// as their source, or carry no response headers at all, while an answer of a gRPC server
/// always has its `content-type`.
pub fn is_transport_failure(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
        || (matches!(
            status.code(),
            tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Internal
        ) && status.metadata().get("content-type").is_none())
}

/// A failed call as one line; a transport failure without TLS adds the likely reason, since
/// the status alone (`transport error`) does not say it.
pub fn describe_call_failure(status: &tonic::Status, options: &ClientOptions) -> String {
    let text = describe_status(status);
    if is_transport_failure(status) && !options.is_tls() {
        format!(
            "{text} (the connection failed: if the master speaks TLS, give {}tls-ca)",
            options.flags
        )
    } else {
        text
    }
}

/// A gRPC status as one line: its message, or its code when the message is empty.
pub fn describe_status(status: &tonic::Status) -> String {
    if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {}", status.code(), status.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_with_or_without_a_scheme() {
        let bare = MasterAddr::parse("127.0.0.1:32048").unwrap();
        assert_eq!(bare.uri, "http://127.0.0.1:32048");
        assert_eq!(bare.to_string(), "127.0.0.1:32048");
        assert_eq!(
            MasterAddr::parse("http://master:32048").unwrap().uri,
            "http://master:32048"
        );
        assert!(MasterAddr::parse("").is_err());
        assert_eq!(
            MasterAddr::parse("https://master:1").unwrap().uri,
            "http://master:1"
        );
        assert!(MasterAddr::parse("ftp://master:1").is_err());
        assert!(MasterAddr::parse("not an address").is_err());
    }
}
