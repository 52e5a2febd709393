//! (5) Apply cost: a member's file write (append, fdatasync, state record) and propagation on a
//! 100-policy file against a 100,000-policy one.

use std::path::Path;
use std::time::Instant;

use ledger_testkit::metrics::{sample, scrape_async};
use serde_json::{Value, json};

use crate::stats::{dist, median};
use crate::watch::{arrival, wait_members, watch};
use crate::workload::{connect, head, paced_inserts};

/// (sum, count) of the member's `ledger_member_file_write_duration_seconds`.
async fn write_metric(port: u16) -> (f64, f64) {
    let text = scrape_async(port).await;
    let find = |series: &str| sample(&text, series).unwrap_or(0.0);
    (
        find("ledger_member_file_write_duration_seconds_sum"),
        find("ledger_member_file_write_duration_seconds_count"),
    )
}

pub(crate) struct Apply {
    pub(crate) write_ms: f64,
    /// From the insert being sent: includes the master's commit.
    pub(crate) propagation_p50_ms: f64,
    /// From the acknowledgement: delivery and the member's apply only.
    pub(crate) from_ack_p50_ms: f64,
}

impl Apply {
    pub(crate) fn json(&self) -> Value {
        json!({"write_ms": self.write_ms, "propagation_p50_ms": self.propagation_p50_ms,
               "from_ack_p50_ms": self.from_ack_p50_ms})
    }

    /// Each figure's median over `rounds`.
    pub(crate) fn median(rounds: &[Apply]) -> Apply {
        let of = |f: fn(&Apply) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
        Apply {
            write_ms: of(|a| a.write_ms),
            propagation_p50_ms: of(|a| a.propagation_p50_ms),
            from_ack_p50_ms: of(|a| a.from_ack_p50_ms),
        }
    }
}

/// Mean file-write time (append + fdatasync + state record, from the member's histogram) and
/// p50 propagation of `count` single inserts spaced 20 ms apart.
pub(crate) async fn apply_cost(addr: &str, dir: &Path, metrics_port: u16, count: usize) -> Apply {
    let mut client = connect(addr).await;
    let (h, _, _) = head(&mut client).await;
    assert!(wait_members(&[dir.to_path_buf()], h, 120).await);
    let before = write_metric(metrics_port).await;
    let watcher = watch(vec![dir.to_path_buf()]);
    let sent = paced_inserts(&mut client, count, 50.0).await;
    let last = sent.last().unwrap().0;
    assert!(wait_members(&[dir.to_path_buf()], last, 60).await);
    let events = watcher.finish();
    let after = write_metric(metrics_port).await;
    let since = |pick: fn(&(u64, Instant, Instant)) -> Instant| -> Vec<f64> {
        sent.iter()
            .map(|x| {
                arrival(&events[0], x.0)
                    .unwrap()
                    .saturating_duration_since(pick(x))
                    .as_secs_f64()
                    * 1e3
            })
            .collect()
    };
    let from_send = since(|x| x.2);
    let from_ack = since(|x| x.1);
    Apply {
        write_ms: (after.0 - before.0) / (after.1 - before.1).max(1.0) * 1e3,
        propagation_p50_ms: dist(from_send).p50,
        from_ack_p50_ms: dist(from_ack).p50,
    }
}
