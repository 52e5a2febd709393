//! A subscriber's identity and its progress reports: who it is when it subscribes
//! (`StreamLedgerRequest.subscriber`), and what it made durable, told to the master it streams
//! from with `ReportProgress` at most once a second (when the durable seq moved or, for a
//! relay, the subscribers below it changed) and every [`KEEP_ALIVE`] otherwise.

use std::sync::Arc;
use std::time::Duration;

use ledger_proto::pb;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;

use crate::masters::ClientOptions;

/// The shortest time between two reports.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// A report is sent at least this often, even when nothing moved.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// The most subscribers a report lists below its sender (the master's limit).
pub const MAX_DOWNSTREAM: usize = 10_000;

/// How a subscriber names itself to the masters it streams from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Its node name (a member's `--node-name`, a relay's `--name`).
    pub node_name: String,
    /// Its software and version, e.g. `member 0.1.0`.
    pub version: String,
}

/// The subscribers below a subscriber (a relay's own), listed for each report.
pub type Downstream = Arc<dyn Fn() -> Vec<pb::SubscriberStatus> + Send + Sync>;

/// A random session id: 128 bits in hex, drawn once per run of [`crate::follow::follow`].
pub fn new_session_id() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

/// This machine's host name, or `unknown` when the system does not tell.
pub fn host_name() -> String {
    let kernel = || std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
    let file = || std::fs::read_to_string("/etc/hostname").ok();
    let variable = || std::env::var("HOSTNAME").ok();
    [kernel(), file(), variable()]
        .into_iter()
        .flatten()
        .map(|name| name.trim().to_string())
        .find(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

/// Reports the durable seq `durable` watches (and `downstream`) for `session_id` on `channel`
/// until the task is aborted (the stream ended). A master that does not know `ReportProgress`
/// (an older version) is not asked again on this stream.
pub async fn report(
    channel: Channel,
    options: ClientOptions,
    session_id: String,
    mut durable: watch::Receiver<u64>,
    downstream: Option<Downstream>,
) {
    let mut client = options.client(channel);
    let mut tick = tokio::time::interval(REPORT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last: Option<(u64, Vec<Position>, Instant)> = None;
    loop {
        tick.tick().await;
        let durable_seq = *durable.borrow_and_update();
        let mut below = downstream.as_ref().map(|list| list()).unwrap_or_default();
        if below.len() > MAX_DOWNSTREAM {
            tracing::debug!(
                count = below.len(),
                "reporting only the first {MAX_DOWNSTREAM} subscribers below"
            );
            below.truncate(MAX_DOWNSTREAM);
        }
        // What the subscribers below send moves all the time; who they are and what they made
        // durable is what a report is due for. The rest goes with the keep-alive.
        let positions: Vec<Position> = below.iter().map(Position::of).collect();
        let due = match &last {
            None => true,
            Some((seq, sent_positions, at)) => {
                *seq != durable_seq || *sent_positions != positions || at.elapsed() >= KEEP_ALIVE
            }
        };
        if !due {
            continue;
        }
        let mut request = tonic::Request::new(pb::ReportProgressRequest {
            session_id: session_id.clone(),
            durable_seq,
            downstream: below,
        });
        request.set_timeout(KEEP_ALIVE);
        match client.report_progress(request).await {
            Ok(_) => last = Some((durable_seq, positions, Instant::now())),
            Err(status) if status.code() == Code::Unimplemented => {
                tracing::debug!("the master does not take progress reports: not reporting");
                return;
            }
            Err(status) => {
                // The stream tells of a lost master; a report is tried again at the next tick.
                tracing::debug!("progress report failed: {}", status.message());
            }
        }
    }
}

/// Who a subscriber below is and what it made durable: a change of it makes a report due.
#[derive(Debug, PartialEq, Eq)]
struct Position {
    node_name: String,
    peer: String,
    via: String,
    durable_seq: u64,
}

impl Position {
    fn of(status: &pb::SubscriberStatus) -> Position {
        Position {
            node_name: status.node_name.clone(),
            peer: status.peer.clone(),
            via: status.via.clone(),
            durable_seq: status.durable_seq,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_random_hex_within_the_masters_limit() {
        let (a, b) = (new_session_id(), new_session_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()), "{a}");
    }

    #[test]
    fn the_host_name_is_never_empty() {
        let name = host_name();
        assert!(!name.is_empty() && name == name.trim(), "{name:?}");
    }

    #[test]
    fn only_who_is_below_and_what_it_made_durable_makes_a_report_due() {
        let status = pb::SubscriberStatus {
            node_name: "m1".into(),
            durable_seq: 4,
            bytes_sent: 10,
            ..Default::default()
        };
        let more_sent = pb::SubscriberStatus {
            bytes_sent: 99,
            sent_seq: 7,
            ..status.clone()
        };
        assert_eq!(Position::of(&status), Position::of(&more_sent));
        let durable = pb::SubscriberStatus {
            durable_seq: 5,
            ..status.clone()
        };
        assert_ne!(Position::of(&status), Position::of(&durable));
    }
}
