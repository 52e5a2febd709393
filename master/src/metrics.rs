//! The master's Prometheus metrics: every name and label is defined here, and recorded through
//! the `metrics` facade (a no-op until [`install`] runs, so tests and library users pay nothing).
//! [`serve`], the `/metrics` endpoint, is shared with the member.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::error::LedgerError;
use crate::storage::Rejection;

/// Serves the master's `/metrics` on `addr` and returns the address bound (see [`serve`]).
pub async fn install(addr: SocketAddr) -> Result<SocketAddr, String> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ],
        )
        .map_err(|e| e.to_string())?;
    serve(addr, builder).await
}

/// How often the recorder's upkeep runs (drains the histograms' buffers): the exporter's own
/// `install` spawns it every 5 s, `install_recorder` leaves it to the caller.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Binds `addr`, installs `builder`'s recorder as the global one and serves its Prometheus text
/// on that listener (any path but `/health`, which answers `OK`, as the exporter's own listener
/// did); logs and returns the address actually bound. Must run inside the tokio runtime.
///
/// The listener is bound here rather than by the exporter so that the bound address is known:
/// with port 0 the kernel picks a free port, and the log line `metrics on http://ADDR/metrics`
/// tells the operator (and the tests) which one, with no race for a port chosen beforehand.
/// Shared by the master and the member, which differ only in their buckets.
pub async fn serve(addr: SocketAddr, builder: PrometheusBuilder) -> Result<SocketAddr, String> {
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
    tokio::spawn(accept(listener, handle));
    tracing::info!("metrics on http://{bound}/metrics");
    Ok(bound)
}

/// Answers every connection to `listener` with HTTP/1.1, for as long as the runtime runs.
async fn accept(listener: TcpListener, handle: PrometheusHandle) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, typically: a pause instead of a busy loop, and the
                // scrape is retried by Prometheus anyway.
                tracing::warn!("metrics: cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request| respond(request, handle.clone()));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("metrics: connection ended: {e}");
            }
        });
    }
}

/// The answer to one request: `OK` for `/health`, the Prometheus text otherwise.
async fn respond(
    request: Request<Incoming>,
    handle: PrometheusHandle,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.uri().path() == "/health" {
        let mut response = Response::new(Full::new(Bytes::from_static(b"OK")));
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
            let mut response = Response::new(Full::default());
            *response.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
            return Ok(response);
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(text)));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    Ok(response)
}

/// The `outcome` label of a write.
fn outcome<T>(result: &Result<T, LedgerError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(e) => error_outcome(e),
    }
}

/// The `outcome` label of a failed write.
pub fn error_outcome(error: &LedgerError) -> &'static str {
    match error {
        LedgerError::InvalidPolicy(_) | LedgerError::InvalidArgument(_) => "invalid",
        LedgerError::Rejected(Rejection::AlreadyExists(_)) => "already_exists",
        LedgerError::Rejected(Rejection::NotFound(_)) | LedgerError::NotFound(_) => "not_found",
        LedgerError::Storage(e) if e.is_disk_full() => "disk_full",
        LedgerError::Storage(e) if e.is_unavailable() => "unavailable",
        LedgerError::ShuttingDown => "unavailable",
        LedgerError::Auth(_) => "denied",
        _ => "error",
    }
}

/// An insert finished with `result` after `elapsed`.
pub fn insert_done<T>(result: &Result<T, LedgerError>, elapsed: Duration) {
    counter!("ledger_inserts_total", "outcome" => outcome(result)).increment(1);
    histogram!("ledger_insert_duration_seconds").record(elapsed.as_secs_f64());
}

/// A delete finished with `result`.
pub fn delete_done<T>(result: &Result<T, LedgerError>) {
    counter!("ledger_deletes_total", "outcome" => outcome(result)).increment(1);
}

/// The head seq is now `seq`.
pub fn head(seq: u64) {
    gauge!("ledger_head_seq").set(seq as f64);
}

/// The ledger holds `count` policies.
pub fn policies(count: u64) {
    gauge!("ledger_policies").set(count as f64);
}

/// The number of policies changed by `delta`.
pub fn policies_changed(delta: f64) {
    gauge!("ledger_policies").increment(delta);
}

/// A subscriber joined (`+1`) or left (`-1`).
pub fn subscribers_changed(delta: f64) {
    gauge!("ledger_subscribers").increment(delta);
}

/// A subscriber was disconnected for falling behind.
pub fn subscriber_dropped() {
    counter!("ledger_subscribers_dropped_total").increment(1);
}

/// Whether the database answers (1) or not (0).
pub fn database_up(up: bool) {
    gauge!("ledger_database_up").set(if up { 1.0 } else { 0.0 });
}

/// Whether the follower's connection `LISTEN`s for the other masters' commits (1) or not (0),
/// on PostgreSQL. At 0 their commits arrive only by the read every `--notify-fallback`.
pub fn follower_listening(listening: bool) {
    gauge!("ledger_follower_listening").set(if listening { 1.0 } else { 0.0 });
}

/// The follower's listening connection could not be opened, or was lost.
pub fn follower_listen_failed() {
    counter!("ledger_follower_listen_failures_total").increment(1);
}

/// An AnyLog message (`command`: `push`, `get_blockchain`, ...; `none` when it could not be
/// read) was handled with `outcome`.
pub fn anylog_message(command: &'static str, outcome: &'static str) {
    counter!("ledger_anylog_messages_total", "command" => command, "outcome" => outcome)
        .increment(1);
}

/// `bytes` of ledger file were sent to an AnyLog node.
pub fn anylog_bytes_sent(bytes: usize) {
    counter!("ledger_anylog_file_bytes_total").increment(bytes as u64);
}

/// The ledger was read whole to compute its digest (`GetLedgerInfo`, or a node's ledger file).
pub fn digest_full_read() {
    counter!("ledger_digest_full_reads_total").increment(1);
}

/// Whether writes commit (1), fail for a full disk (0) or stopped for good (-1): see
/// [`crate::writer::WriterHealth`].
pub fn writes_state(state: f64) {
    gauge!("ledger_writes_state").set(state);
}

/// How many of the database pool's connections are in use, and how many it may open.
pub fn db_pool(in_use: u32, size: u32) {
    gauge!("ledger_db_connections_in_use").set(in_use as f64);
    gauge!("ledger_db_connections_max").set(size as f64);
}

/// How many snapshots are being read now, and how many wait for their turn.
pub fn snapshots(running: usize, waiting: usize) {
    gauge!("ledger_snapshots_running").set(running as f64);
    gauge!("ledger_snapshots_waiting").set(waiting as f64);
}

/// A snapshot was ended because its client read nothing for the stall timeout.
pub fn snapshot_stalled() {
    counter!("ledger_snapshots_stalled_total").increment(1);
}
