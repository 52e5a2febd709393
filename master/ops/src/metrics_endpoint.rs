//! The HTTP listener both binaries serve: Prometheus text at `/metrics` and `OK` at `/health`
//! over HTTP/1.1; the master adds its console's routes ([`Routes`], through a [`RouteSlot`]).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

/// How often the recorder's upkeep runs (drains the histograms' buffers): the exporter's own
/// `install` spawns it every 5 s, `install_recorder` leaves it to the caller.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The body of an answer: whole (`Full`) or streamed (server-sent events), boxed.
pub type HttpBody = UnsyncBoxBody<Bytes, Infallible>;

/// The answer to a request of a [`Routes`], made asynchronously.
pub type RouteFuture = Pin<Box<dyn Future<Output = Response<HttpBody>> + Send>>;

/// More routes served on the listener beside `/metrics` and `/health` (the master's console).
pub trait Routes: Send + Sync + 'static {
    /// Answers `request`, whose path is neither `/metrics` nor `/health`.
    fn route(&self, request: Request<Incoming>) -> RouteFuture;
}

/// Where the routes served beside `/metrics` go, once they exist: the listener is bound (and
/// its address logged) first thing at start-up, before what the routes serve is built. Until it
/// is filled, and when it never is, every other path answers the Prometheus text as before.
#[derive(Clone, Default)]
pub struct RouteSlot(Arc<OnceLock<Arc<dyn Routes>>>);

impl RouteSlot {
    /// An empty slot.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `routes` from now on; a slot is filled once (a second call is ignored and
    /// returns false).
    pub fn fill(&self, routes: Arc<dyn Routes>) -> bool {
        self.0.set(routes).is_ok()
    }

    fn get(&self) -> Option<Arc<dyn Routes>> {
        self.0.get().cloned()
    }
}

/// The address of the client that sent a request, in the request's extensions (for the
/// routes' per-client limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer(pub SocketAddr);

/// A whole body.
pub fn full(bytes: impl Into<Bytes>) -> HttpBody {
    Full::new(bytes.into()).boxed_unsync()
}

/// Binds `addr`, installs `builder`'s recorder as the global one and serves its Prometheus text
/// on that listener (any path but `/health`, which answers `OK`, as the exporter's own listener
/// did); logs and returns the address actually bound. Must run inside the tokio runtime.
///
/// The listener is bound here rather than by the exporter so that the bound address is known:
/// with port 0 the kernel picks a free port, and the log line `metrics on http://ADDR/metrics`
/// tells the operator (and the tests) which one, with no race for a port chosen beforehand.
/// Shared by the master and the member, which differ only in their buckets.
pub async fn serve(addr: SocketAddr, builder: PrometheusBuilder) -> Result<SocketAddr, String> {
    serve_with_routes(addr, builder, RouteSlot::new()).await
}

/// [`serve`], and the routes `slot` is filled with on every path but `/metrics` and `/health`
/// (from the moment it is filled).
pub async fn serve_with_routes(
    addr: SocketAddr,
    builder: PrometheusBuilder,
    slot: RouteSlot,
) -> Result<SocketAddr, String> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    let bound = listener
        .local_addr()
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    let handle = builder
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            ticks.tick().await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(accept(listener, handle, slot));
    tracing::info!("metrics on http://{bound}/metrics");
    Ok(bound)
}

/// Answers every connection to `listener` with HTTP/1.1, for as long as the runtime runs.
async fn accept(listener: TcpListener, handle: PrometheusHandle, slot: RouteSlot) {
    loop {
        let stream = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, typically: a pause instead of a busy loop, and the
                // scrape is retried by Prometheus anyway.
                tracing::warn!("metrics: cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (stream, peer) = stream;
        let handle = handle.clone();
        let slot = slot.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(Peer(peer));
                respond(request, handle.clone(), slot.clone())
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("metrics: connection ended: {e}");
            }
        });
    }
}

/// The answer to one request: `OK` for `/health`, the Prometheus text for `/metrics`, the
/// routes' answer for any other path once there are routes, the Prometheus text otherwise.
async fn respond(
    request: Request<Incoming>,
    handle: PrometheusHandle,
    slot: RouteSlot,
) -> Result<Response<HttpBody>, Infallible> {
    let path = request.uri().path();
    if path != "/health"
        && path != "/metrics"
        && let Some(routes) = slot.get()
    {
        return Ok(routes.route(request).await);
    }
    if path == "/health" {
        let mut response = Response::new(full(Bytes::from_static(b"OK")));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        return Ok(response);
    }
    // Rendering walks every series under locks: off the async workers, which serve gRPC.
    let text = match tokio::task::spawn_blocking(move || handle.render()).await {
        Ok(text) => text,
        Err(e) => {
            tracing::warn!("metrics: rendering failed: {e}");
            let mut response = Response::new(full(Bytes::new()));
            *response.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
            return Ok(response);
        }
    };
    let mut response = Response::new(full(text));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    Ok(response)
}
