//! The member's Prometheus metrics: every name is defined here and recorded through the
//! `metrics` facade, a no-op until [`install`] runs (the operator commands never install it).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// The last head seq the stream announced, kept to compute the lag when the applied seq moves.
static HEAD: AtomicU64 = AtomicU64::new(0);
/// The last applied seq, kept to compute the lag when the head moves.
static APPLIED: AtomicU64 = AtomicU64::new(0);

/// Serves the member's `/metrics` on `addr` and returns the address bound (port 0: a free port),
/// through the master's endpoint ([`ledger_ops::metrics_endpoint::serve`]), which logs it. Must run
/// inside the tokio runtime.
pub async fn install(addr: SocketAddr) -> Result<SocketAddr, String> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            // File writes are fsyncs: from a fraction of a millisecond to seconds on a busy disk.
            &[
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
            ],
        )
        .map_err(|e| e.to_string())?;
    ledger_ops::metrics_endpoint::serve(addr, builder).await
}

/// Every change up to `seq` is durable in the file.
pub fn applied(seq: u64) {
    APPLIED.store(seq, Ordering::Relaxed);
    // A live change proves the master's head is at least its seq, so the head never shows
    // below the applied seq between two `progress` messages.
    let head = HEAD.fetch_max(seq, Ordering::Relaxed).max(seq);
    gauge!("ledger_member_applied_seq").set(seq as f64);
    publish_head(head, seq);
}

/// The master said its head is `seq` (a `progress` or `caught_up` message).
pub fn head(seq: u64) {
    HEAD.store(seq, Ordering::Relaxed);
    publish_head(seq, APPLIED.load(Ordering::Relaxed));
}

fn publish_head(head: u64, applied: u64) {
    gauge!("ledger_member_head_seq").set(head as f64);
    gauge!("ledger_member_lag").set(head.saturating_sub(applied) as f64);
}

/// A stream to a master started again after an earlier one.
pub fn reconnected() {
    counter!("ledger_member_reconnects_total").increment(1);
}

/// Whether a stream to a master is open (1) or not (0).
pub fn connected(up: bool) {
    gauge!("ledger_member_connected").set(if up { 1.0 } else { 0.0 });
}

/// An append, rewrite or snapshot installation of the ledger file took `elapsed` (fsyncs
/// included).
pub fn file_write(elapsed: Duration) {
    histogram!("ledger_member_file_write_duration_seconds").record(elapsed.as_secs_f64());
}

/// A foreign line of the ledger file (written by someone else, e.g. the node beside the member)
/// was dealt with as `outcome`.
pub fn foreign_line(outcome: crate::sidecar::ForeignOutcome) {
    use crate::sidecar::ForeignOutcome;
    let outcome = match outcome {
        ForeignOutcome::Pushed => "pushed",
        ForeignOutcome::Deleted => "deleted",
        ForeignOutcome::SetAside => "set_aside",
    };
    counter!("ledger_member_foreign_lines_total", "outcome" => outcome).increment(1);
}

/// The node beside the member was asked to reload its metadata (`ok`: it answered).
pub fn node_reload(ok: bool) {
    counter!("ledger_member_node_reloads_total", "outcome" => if ok { "ok" } else { "failed" })
        .increment(1);
}

/// One reload of the node's metadata took `elapsed` (answered, refused or timed out).
pub fn node_reload_duration(elapsed: Duration) {
    histogram!("ledger_member_node_reload_duration_seconds").record(elapsed.as_secs_f64());
}

/// Whether the node's last reload succeeded (1) or not (0).
pub fn node_reachable(up: bool) {
    gauge!("ledger_member_node_reachable").set(if up { 1.0 } else { 0.0 });
}
