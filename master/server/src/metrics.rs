//! The master's Prometheus metrics: every name and label is defined here, and recorded through
//! the `metrics` facade (a no-op until [`install`] runs, so tests and library users pay nothing).
//! The `/metrics` endpoint is `ledger_ops::metrics_endpoint`, shared with the member.

use std::net::SocketAddr;
use std::time::Duration;

use ledger_ops::metrics_endpoint::RouteSlot;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use crate::error::LedgerError;
use ledger_storage::Rejection;

/// Serves the master's `/metrics` on `addr`, and the routes `routes` is filled with (the
/// console) on its other paths; returns the address bound (see
/// [`ledger_ops::metrics_endpoint::serve_with_routes`]).
pub async fn install(addr: SocketAddr, routes: RouteSlot) -> Result<SocketAddr, String> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ],
        )
        .map_err(|e| e.to_string())?
        .set_buckets_for_metric(
            Matcher::Full("ledger_subscriber_lag".into()),
            &[
                0.0,
                1.0,
                2.0,
                5.0,
                10.0,
                100.0,
                1_000.0,
                10_000.0,
                100_000.0,
                1_000_000.0,
            ],
        )
        .map_err(|e| e.to_string())?;
    ledger_ops::metrics_endpoint::serve_with_routes(addr, builder, routes).await
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
        LedgerError::InvalidPolicy(_)
        | LedgerError::PolicyTooLarge { .. }
        | LedgerError::PolicyTooDeep(_)
        | LedgerError::EmptyId => "invalid",
        LedgerError::Rejected(Rejection::AlreadyExists(_)) => "already_exists",
        LedgerError::Rejected(Rejection::NotFound(_)) | LedgerError::NotFound(_) => "not_found",
        LedgerError::Storage(e) if e.is_disk_full() => "disk_full",
        LedgerError::Storage(e) if e.is_unavailable() => "unavailable",
        LedgerError::ShuttingDown | LedgerError::NoCopyYet => "unavailable",
        LedgerError::Auth(_) | LedgerError::CannotForward(_) => "denied",
        // A relay's write refused upstream counts as the upstream refused it.
        LedgerError::Upstream(status) => match status.code() {
            tonic::Code::AlreadyExists => "already_exists",
            tonic::Code::NotFound => "not_found",
            tonic::Code::InvalidArgument => "invalid",
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => "denied",
            tonic::Code::Unavailable => "unavailable",
            tonic::Code::ResourceExhausted => "disk_full",
            _ => "error",
        },
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

/// A subscriber joined (`+1`) or left (`-1`).
pub fn subscribers_changed(delta: f64) {
    gauge!("ledger_subscribers").increment(delta);
}

/// A subscriber was disconnected for falling behind.
pub fn subscriber_dropped() {
    counter!("ledger_subscribers_dropped_total").increment(1);
}

/// A subscriber reported its durable seq `lag` changes behind the head (`ReportProgress`).
pub fn subscriber_lag(lag: u64) {
    histogram!("ledger_subscriber_lag").record(lag as f64);
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

/// Whether writes commit (1), fail for a full disk or an unreachable database (0) or stopped for
/// good (-1): see [`crate::writer::WriterHealth`].
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

/// Whether a relay's stream from its upstream is open (1) or not (0).
pub fn upstream_connected(up: bool) {
    gauge!("ledger_upstream_connected").set(if up { 1.0 } else { 0.0 });
}

/// A relay subscribed to an upstream again after an earlier stream.
pub fn upstream_reconnected() {
    counter!("ledger_upstream_reconnects_total").increment(1);
}

/// A relay's upstream said its head is `seq`.
pub fn upstream_head(seq: u64) {
    gauge!("ledger_upstream_head_seq").set(seq as f64);
}

/// A relay's copy was replaced by its upstream's snapshot.
pub fn upstream_reset() {
    counter!("ledger_upstream_resets_total").increment(1);
}

/// A snapshot was ended because its client read nothing for the stall timeout.
pub fn snapshot_stalled() {
    counter!("ledger_snapshots_stalled_total").increment(1);
}

/// Whether the followed chain's node answers (1) or not (0).
pub fn chain_up(up: bool) {
    gauge!("ledger_chain_up").set(if up { 1.0 } else { 0.0 });
}

/// The followed block's number (the chain's head minus the confirmations).
pub fn chain_block(number: u64) {
    gauge!("ledger_chain_block").set(number as f64);
}

/// How far the followed block is behind the chain's head, in blocks and in seconds.
pub fn chain_lag(blocks: u64, seconds: u64) {
    gauge!("ledger_chain_lag_blocks").set(blocks as f64);
    gauge!("ledger_chain_lag_seconds").set(seconds as f64);
}

/// A policy on the contract was skipped: not a valid policy, or its body's id is not its key.
pub fn chain_skipped() {
    counter!("ledger_chain_skipped_total").increment(1);
}

/// The JSON-RPC calls and HTTP requests the master made to the chain's node so far.
pub fn chain_rpc(calls: u64, requests: u64) {
    gauge!("ledger_chain_rpc_calls").set(calls as f64);
    gauge!("ledger_chain_rpc_requests").set(requests as f64);
}
