//! Serving a [`Ledger`] over gRPC: `LedgerService` with its auth and limits, `grpc.health.v1`
//! and reflection, on a listener or on the gRPC half of a port shared with AnyLog; the TLS and
//! auth files read; a graceful shutdown. The master's binary assembles a master around it.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ledger_proto::server::ledger_service_server::LedgerServiceServer;
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Server, ServerTlsConfig};
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::HealthReporter;

use crate::anylog;
use crate::auth::Authorizer;
use crate::error::SecurityError;
use crate::health;
use crate::ledger::Ledger;
use crate::limits::CountedStreams;
use crate::service::{Access, LedgerGrpc};

/// A failure that stops the master from starting or serving.
pub type StartError = Box<dyn std::error::Error + Send + Sync>;

/// How many connections may wait to be accepted. The socket library's default, 128, overflowed
/// when nodes opened a connection per message (AnyLog) or many members reconnected at once: the
/// kernel dropped the SYNs beyond it, and those clients waited a 1 s retransmission.
const LISTEN_BACKLOG: u32 = 4096;

/// A listening socket on `addr` with a backlog of 4096 connections (the kernel caps it at
/// `somaxconn`).
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As the standard library's bind does: a restarted master can bind its port at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The connections a gRPC server takes: all of a listener's, or those a shared port hands it.
pub enum GrpcIncoming {
    /// Every connection of this listener.
    Listener(TcpListener),
    /// The gRPC connections of a port shared with the AnyLog protocol.
    Shared(anylog::listener::GrpcConnections),
}

impl From<TcpListener> for GrpcIncoming {
    fn from(listener: TcpListener) -> Self {
        GrpcIncoming::Listener(listener)
    }
}

/// How a server listens and whom it lets in.
pub struct ServeOptions {
    /// TLS (and mTLS) settings; plaintext without.
    pub tls: Option<ServerTlsConfig>,
    /// Who may call and how many streams may be open.
    pub access: Access,
    /// The largest gRPC message accepted.
    pub max_message_bytes: usize,
    /// HTTP/2 keepalive ping interval and timeout.
    pub keepalive: (Duration, Duration),
    /// How long in-flight calls may take after the shutdown signal.
    pub grace: Duration,
    /// HTTP/2: the most streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// HTTP/2: how many streams the server may reset for a client's errors before it ends the
    /// connection (the "MadeYouReset" attack makes a server reset streams at no cost to the
    /// client; tonic leaves the cap off unless it is set).
    pub max_local_reset_streams: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            tls: None,
            access: Access::default(),
            max_message_bytes: 4 << 20,
            keepalive: (Duration::from_secs(30), Duration::from_secs(10)),
            grace: Duration::from_secs(10),
            max_concurrent_streams: 200,
            max_local_reset_streams: 1024,
        }
    }
}

/// The start of prost's `DecodeError` text, which tonic's codec puts in its INTERNAL status.
const PROST_DECODE_FAILURE: &str = "failed to decode Protobuf message";

/// Gives the refusals tonic makes itself, before any service sees the request, the reason a
/// refusal of the master's own would have (`ledger/v1/errors.proto`):
///
/// - OUT_OF_RANGE: tonic refuses a request over `--max-message-bytes` before reading it. No
///   service of this server answers OUT_OF_RANGE, so one without details is that refusal:
///   `MESSAGE_TOO_LARGE`, with the limit.
/// - INTERNAL for a request whose protobuf does not decode (invalid UTF-8 in a string field, a
///   truncated message), which tells a client the server failed: the request is what is wrong,
///   so INVALID_ARGUMENT `REQUEST_UNDECODABLE`, keeping the message, which names the field.
///   `LedgerService` refuses those itself, typed, in its codec
///   ([`ledger_proto::server::LedgerCodec`]); `grpc.health.v1` and reflection are servers that
///   tonic-health and tonic-reflection generate with prost's codec, which this server cannot
///   replace, and their status carries nothing typed: prost's message is all there is to tell
///   it by, so it is matched here, and nowhere else.
fn tonic_refusals_with_reasons(
    max_message_bytes: usize,
) -> impl Fn(http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body> + Clone {
    use ledger_proto::errors::{Reason, key, refusal};
    move |mut response| {
        let headers = response.headers_mut();
        // A status in the headers is a refusal made before any message was sent; one that has
        // details already is the master's own.
        let Some(code) = headers
            .get("grpc-status")
            .map(|code| tonic::Code::from_bytes(code.as_bytes()))
        else {
            return response;
        };
        if headers.contains_key("grpc-status-details-bin") {
            return response;
        }
        let Some(status) = tonic::Status::from_header_map(headers) else {
            return response;
        };
        let refused = match code {
            tonic::Code::OutOfRange => refusal(
                Reason::MessageTooLarge,
                status.message(),
                [(key::LIMIT_BYTES, max_message_bytes.to_string())],
            ),
            tonic::Code::Internal if status.message().starts_with(PROST_DECODE_FAILURE) => {
                refusal(Reason::RequestUndecodable, status.message(), [])
            }
            _ => return response,
        };
        // Its text was a header value already: it makes one again.
        let _ = refused.add_header(headers);
        response
    }
}

/// The files that secure a server: PEM certificate, key and client CA, and the auth file.
#[derive(Debug, Default)]
pub struct SecurityFiles<'a> {
    /// The server certificate chain; TLS only with `key`.
    pub cert: Option<&'a std::path::Path>,
    /// The server's private key.
    pub key: Option<&'a std::path::Path>,
    /// The CA that signs client certificates (mTLS).
    pub client_ca: Option<&'a std::path::Path>,
    /// Admit clients without a certificate too.
    pub client_optional: bool,
    /// The auth file (roles); without it anyone may do anything.
    pub auth_file: Option<&'a std::path::Path>,
}

/// Reads the TLS settings and the auth file, and warns loudly about what is left open.
/// `server` names the server in the warnings ("this master", "this relay").
pub fn load_security(
    files: &SecurityFiles<'_>,
    server: &str,
) -> Result<(Option<ServerTlsConfig>, Option<Arc<Authorizer>>), SecurityError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| SecurityError::ReadTlsFile {
            path: path.to_path_buf(),
            source,
        })
    };
    let tls = match (files.cert, files.key) {
        (Some(cert), Some(key)) => {
            let mut tls = ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(
                read(cert)?,
                read(key)?,
            ));
            if let Some(ca) = files.client_ca {
                tls = tls
                    .client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?))
                    .client_auth_optional(files.client_optional);
            }
            Some(tls)
        }
        _ => None,
    };
    let authorizer = match files.auth_file {
        Some(path) => Some(Arc::new(Authorizer::load(path)?)),
        None => {
            tracing::warn!(
                "NO AUTHENTICATION CONFIGURED: anyone who reaches {server} can insert and delete policies; configure an auth file (and TLS) outside a lab"
            );
            None
        }
    };
    if tls.is_none() && authorizer.is_some() {
        tracing::warn!(
            "{server} checks tokens that travel in clear text: configure a TLS certificate and key"
        );
    }
    Ok((tls, authorizer))
}

/// Serves `ledger` on `listener` (LedgerService, grpc.health.v1, reflection v1 and v1alpha)
/// until `shutdown` completes; then stops accepting, ends the streams through
/// `streams_shutdown`, and waits up to `grace` for in-flight calls. Plaintext, open to anyone.
pub async fn serve(
    ledger: Arc<Ledger>,
    listener: TcpListener,
    health: HealthReporter,
    shutdown: impl Future<Output = ()>,
    streams_shutdown: CancellationToken,
    grace: Duration,
) -> Result<(), StartError> {
    let options = ServeOptions {
        grace,
        ..ServeOptions::default()
    };
    serve_with(
        options,
        ledger,
        listener,
        health,
        shutdown,
        streams_shutdown,
    )
    .await
}

/// [`serve`] with TLS, access control and limits. Masters and relays share it.
pub async fn serve_with(
    options: ServeOptions,
    ledger: Arc<Ledger>,
    incoming: impl Into<GrpcIncoming>,
    health: HealthReporter,
    shutdown: impl Future<Output = ()>,
    streams_shutdown: CancellationToken,
) -> Result<(), StartError> {
    let grace = options.grace;
    let streams = options.access.streams.clone();
    // `Watch` streams count against the stream limits like `StreamLedger` ones.
    let health_service = HealthServer::new(health::LimitedHealth::new(
        tonic_health::server::HealthService::from_health_reporter(health.clone()),
        options.access.streams.clone(),
    ));
    health::set_ledger_status(&health, tonic_health::ServingStatus::Serving).await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ledger_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ledger_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let mut builder = Server::builder()
        .max_concurrent_streams(options.max_concurrent_streams)
        .http2_max_local_error_reset_streams(Some(options.max_local_reset_streams))
        .http2_keepalive_interval(Some(options.keepalive.0))
        .http2_keepalive_timeout(Some(options.keepalive.1));
    if let Some(tls) = options.tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| format!("invalid TLS settings: {e}"))?;
    }
    let service = LedgerServiceServer::new(LedgerGrpc::with_access(ledger, options.access))
        .max_decoding_message_size(options.max_message_bytes);
    let incoming: Pin<Box<dyn Stream<Item = std::io::Result<TcpStream>> + Send>> =
        match incoming.into() {
            // Without TCP_NODELAY a unary answer's trailers wait for the client's delayed ACK
            // (~40 ms): tonic sets it only on listeners it binds itself.
            GrpcIncoming::Listener(listener) => Box::pin(
                TcpIncoming::from(listener)
                    .with_nodelay(Some(true))
                    .with_keepalive(Some(options.keepalive.0)),
            ),
            GrpcIncoming::Shared(connections) => Box::pin(connections),
        };
    let mut serving = Box::pin(
        builder
            .layer(tower::util::MapResponseLayer::new(
                tonic_refusals_with_reasons(options.max_message_bytes),
            ))
            .add_service(health_service)
            // Reflection's calls are streams too: counted like the others.
            .add_service(CountedStreams::new(reflection_v1, streams.clone()))
            .add_service(CountedStreams::new(reflection_v1alpha, streams))
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async {
                shutdown.await;
                tracing::info!("shutting down: no new connections; ending streams");
                health::set_ledger_status(&health, tonic_health::ServingStatus::NotServing).await;
                streams_shutdown.cancel();
            }),
    );
    // Past the grace period after the signal, stop waiting for slow calls.
    let result = tokio::select! {
        result = &mut serving => result,
        _ = async { streams_shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "in-flight calls did not finish within the grace period");
            Ok(())
        }
    };
    Ok(result?)
}
