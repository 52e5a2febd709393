//! The master's Prometheus metrics: every name and label is defined here, and recorded through
//! the `metrics` facade (a no-op until [`install`] runs, so tests and library users pay nothing).

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::PrometheusBuilder;

use crate::error::LedgerError;
use crate::storage::Rejection;

/// Serves `/metrics` on `addr`. Must run inside the tokio runtime.
pub fn install(addr: SocketAddr) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            &[
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ],
        )
        .map_err(|e| e.to_string())?
        .install()
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))
}

/// The `outcome` label of a write.
fn outcome<T>(result: &Result<T, LedgerError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(LedgerError::InvalidPolicy(_) | LedgerError::InvalidArgument(_)) => "invalid",
        Err(LedgerError::Rejected(Rejection::AlreadyExists(_))) => "already_exists",
        Err(LedgerError::Rejected(Rejection::NotFound(_)) | LedgerError::NotFound(_)) => {
            "not_found"
        }
        Err(LedgerError::Storage(e)) if e.is_unavailable() => "unavailable",
        Err(LedgerError::ShuttingDown) => "unavailable",
        Err(LedgerError::Auth(_)) => "denied",
        Err(_) => "error",
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
