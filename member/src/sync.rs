//! The daemon's subscription loop: subscribe to a master from the applied seq, apply what
//! streams in, and when the stream breaks keep the file as it is and reconnect, with backoff,
//! trying the masters in order.
//!
//! Logs follow the link's state, not the attempts: one line when a master is connected, caught
//! up, lost or unreachable; retries are logged at debug.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ledger_proto::pb;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;

use crate::backoff::Backoff;
use crate::ledger_file::{FileError, LedgerFile};
use crate::masters::{self, ClientOptions, MasterAddr};
use crate::metrics;
use crate::node::NodeNotifier;
use crate::relay::{Relay, RelayError, RelayOptions};
use crate::replica::{ApplyError, BatchReport, Replica};
use crate::sidecar::Sidecar;

/// The most events applied as one batch, so that memory and the time between two durable
/// points stay bounded while a big snapshot or replay streams in.
const MAX_BATCH_EVENTS: usize = 4096;

/// The most policy bytes applied as one batch.
const MAX_BATCH_BYTES: usize = 8 << 20;

/// How often a streaming member looks for lines someone else (the node beside it) wrote into
/// the ledger file: one `fstat` and one `stat` while there are none.
const FOREIGN_LOOK_INTERVAL: Duration = Duration::from_millis(500);

/// What the daemon needs.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// The masters, in the order they are tried.
    pub masters: Vec<MasterAddr>,
    /// The local ledger file.
    pub ledger_file: PathBuf,
    /// How to reach the masters: TLS, token.
    pub client: ClientOptions,
    /// How long connecting and subscribing may take.
    pub connect_timeout: Duration,
    /// The first reconnection delay (doubling, jittered).
    pub retry_min: Duration,
    /// The longest reconnection delay.
    pub retry_max: Duration,
    /// Serve the ledger to members below (a relay).
    pub relay: Option<RelayOptions>,
    /// What the daemon did for the node beside it, for `member status`.
    pub sidecar: Sidecar,
    /// The node told to reload after each batch that changed the file (`--node-rest`,
    /// `--node-tcp`).
    pub node: Option<NodeNotifier>,
}

/// Why the daemon stopped other than by a signal.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// No master address was given.
    #[error("no master address given (--master or LEDGER_MASTER)")]
    NoMaster,
    /// The ledger file could not be opened.
    #[error(transparent)]
    File(#[from] FileError),
    /// A blocking file task could not run.
    #[error("the file task failed: {0}")]
    Task(String),
    /// The relay could not start.
    #[error(transparent)]
    Relay(#[from] RelayError),
}

/// Why a subscription ended.
enum End {
    /// The daemon is stopping.
    Shutdown,
    /// The master dropped us for falling behind: resume at once from the applied seq.
    Lagged(String),
    /// The stream broke or the master went away.
    Disconnected(String),
    /// The stream broke the protocol: subscribe again.
    Protocol(String),
    /// The file is not the master's ledger: resync from 0.
    Diverged(String),
    /// Writing the file failed: reopen it.
    File(FileError),
    /// Writing the relay's mirror failed: subscribe again from the mirror's head.
    Mirror(String),
    /// The file was changed by someone else and waits for a snapshot: subscribe again at once.
    Resync,
}

/// Runs the daemon until `shutdown` is cancelled; a write in progress finishes first.
pub async fn run(options: SyncOptions, shutdown: CancellationToken) -> Result<(), SyncError> {
    if options.masters.is_empty() {
        return Err(SyncError::NoMaster);
    }
    let recording = options.relay.is_some();
    let mut replica = Some(new_replica(open(&options.ledger_file).await?, recording));
    metrics::connected(false);
    if let Some(copy) = &replica {
        metrics::applied(copy.resume_seq());
    }
    let mut relay = match options.relay.clone() {
        Some(relay) => Some(Relay::start(relay, &options.masters[0]).await?),
        None => None,
    };
    let mut backoff = Backoff::new(options.retry_min, options.retry_max);
    let mut link = LinkLog::default();
    let masters = &options.masters;
    let mut current = 0;
    let mut wait = false;
    'run: loop {
        if wait {
            let delay = backoff.next_delay();
            tracing::debug!(?delay, "reconnecting after a delay");
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break 'run,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        wait = true;
        if replica.is_none() {
            // A write failed: start-up repair brings the file and its record back into
            // agreement before anything else is applied.
            match open(&options.ledger_file).await {
                Ok(file) => {
                    metrics::applied(file.seq());
                    replica = Some(new_replica(file, recording));
                }
                Err(e) => {
                    tracing::error!("cannot reopen the ledger file: {e}");
                    continue;
                }
            }
        }
        let Some(copy) = replica.as_mut() else {
            continue;
        };
        let after_seq = match &relay {
            // The mirror is never ahead of the file, but is behind it after a crash between
            // the two writes: stream from the older, and each skips what it holds.
            Some(relay) if relay.head() < copy.resume_seq() => {
                tracing::info!(
                    "the relay's mirror is at seq {}, behind the file at seq {}",
                    relay.head(),
                    copy.resume_seq()
                );
                relay.head()
            }
            _ => copy.resume_seq(),
        };

        let mut subscribed = None;
        for attempt in 0..masters.len() {
            let index = (current + attempt) % masters.len();
            let master = &masters[index];
            let subscribing =
                subscribe(master, &options.client, after_seq, options.connect_timeout);
            let result = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break 'run,
                result = subscribing => result,
            };
            match result {
                Ok(stream) => {
                    current = index;
                    subscribed = Some(stream);
                    break;
                }
                Err(reason) => link.unreachable(master, &reason),
            }
        }
        let Some(stream) = subscribed else {
            link.all_unreachable(backoff.max());
            continue;
        };
        let master = &masters[current];
        link.connected(master, after_seq);
        // What the node wrote while no master answered (or before a crash) goes first.
        settle_foreign(copy, master, &options).await;
        if let Some(relay) = relay.as_mut() {
            relay.upstream_connected(master);
        }

        let end = stream_into(
            copy,
            relay.as_mut(),
            stream,
            master,
            &shutdown,
            &mut backoff,
            &options,
        )
        .await;
        metrics::connected(false);
        copy.abandon_snapshot();
        match end {
            End::Shutdown => break 'run,
            End::Lagged(reason) => {
                tracing::info!(
                    "fell behind master {master} ({reason}); resuming from seq {}",
                    copy.resume_seq()
                );
                wait = false;
            }
            End::Disconnected(reason) => {
                link.disconnected(master, &reason);
                // Move on to the next master; with one master this is the same address.
                current = (current + 1) % masters.len();
            }
            End::Protocol(reason) => {
                tracing::warn!("dropping the stream from master {master}: {reason}");
            }
            End::Diverged(reason) => {
                copy.await_snapshot(&reason);
            }
            End::File(e) => {
                tracing::error!("writing the ledger file failed: {e}; reopening it");
                replica = None;
            }
            End::Mirror(e) => {
                tracing::error!("writing the relay's mirror failed: {e}; subscribing again");
            }
            End::Resync => wait = false,
        }
    }
    if let Some(relay) = relay {
        relay.shutdown().await;
    }
    tracing::info!("stopped");
    Ok(())
}

fn new_replica(file: LedgerFile, recording: bool) -> Replica {
    if recording {
        Replica::recording(file)
    } else {
        Replica::new(file)
    }
}

/// Opens (and repairs) the ledger file off the async threads.
async fn open(path: &Path) -> Result<LedgerFile, SyncError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || LedgerFile::open(&path))
        .await
        .map_err(|e| SyncError::Task(e.to_string()))?
        .map_err(SyncError::from)
}

/// Connects to `master` and starts a subscription after `after_seq`.
async fn subscribe(
    master: &MasterAddr,
    options: &ClientOptions,
    after_seq: u64,
    timeout: Duration,
) -> Result<Streaming<pb::StreamLedgerResponse>, String> {
    let mut client = master.connect(options, timeout).await?;
    let request = client.stream_ledger(pb::StreamLedgerRequest { after_seq });
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(masters::describe_call_failure(&status, options)),
        Err(_) => Err(format!("no answer to the subscription within {timeout:?}")),
    }
}

/// Applies the stream to the replica until it ends.
async fn stream_into(
    replica: &mut Replica,
    mut relay: Option<&mut Relay>,
    mut stream: Streaming<pb::StreamLedgerResponse>,
    master: &MasterAddr,
    shutdown: &CancellationToken,
    backoff: &mut Backoff,
    options: &SyncOptions,
) -> End {
    let mut caught_up_once = false;
    let mut look = tokio::time::interval(FOREIGN_LOOK_INTERVAL);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return End::Shutdown,
            message = stream.message() => message,
            _ = look.tick() => {
                match tokio::task::block_in_place(|| replica.take_foreign()) {
                    Err(e) => return End::File(e),
                    Ok(_) if replica.file().awaiting_snapshot() => return End::Resync,
                    // The file changed: what the node reads now is the ledger alone (its own
                    // lines come back through the stream once the master has them).
                    Ok(true) => {
                        if let Some(node) = &options.node {
                            node.notify();
                        }
                    }
                    Ok(false) => {}
                }
                settle_foreign(replica, master, options).await;
                continue;
            }
        };
        let mut batch = match first {
            Ok(Some(event)) => vec![event],
            Ok(None) => return End::Disconnected("the master ended the stream".into()),
            Err(status) => return ended(&status),
        };
        // Take whatever else has already arrived, without waiting, to apply it together.
        let mut bytes = event_bytes(&batch[0]);
        let mut end = None;
        while batch.len() < MAX_BATCH_EVENTS && bytes < MAX_BATCH_BYTES {
            match ready_now(stream.message()) {
                None => break,
                Some(Ok(Some(event))) => {
                    bytes += event_bytes(&event);
                    batch.push(event);
                }
                Some(Ok(None)) => {
                    end = Some(End::Disconnected("the master ended the stream".into()));
                    break;
                }
                Some(Err(status)) => {
                    end = Some(ended(&status));
                    break;
                }
            }
        }
        // The write runs to its end even when a signal arrives meanwhile: shutdown is only
        // looked at between batches.
        let seq_before = replica.resume_seq();
        let result = tokio::task::block_in_place(|| replica.apply(batch));
        // What the file made durable (also before a failure midway): the node reloads it; and
        // once a subscription catches up, for what the node may have missed before.
        let changed = replica.resume_seq() != seq_before
            || matches!(&result, Ok(r) if r.changes > 0 || r.installed.is_some()
                || (r.caught_up.is_some() && !caught_up_once));
        if changed && let Some(node) = &options.node {
            node.notify();
        }
        metrics::applied(replica.resume_seq());
        if let Ok(report) = &result
            && let Some(head) = report.head.or(report.caught_up)
        {
            metrics::head(head);
        }
        // The mirror follows what the file made durable, even when the batch failed midway.
        let mirror = match relay.as_deref_mut() {
            Some(relay) => {
                let delivered = replica.take_delivered();
                relay.follow(delivered, replica.resume_seq()).await
            }
            None => Ok(()),
        };
        match result {
            Ok(report) => {
                let first_caught_up = report.caught_up.is_some() && !caught_up_once;
                if first_caught_up {
                    // Only a subscription that got this far counts as a success: one that a
                    // master accepts and then fails keeps backing off.
                    caught_up_once = true;
                    backoff.reset();
                }
                log_batch(&report, replica, master, first_caught_up);
            }
            Err(ApplyError::Protocol(reason)) => return End::Protocol(reason),
            Err(ApplyError::Diverged(reason)) => return End::Diverged(reason),
            Err(ApplyError::File(e)) => return End::File(e),
        }
        if let Err(e) = mirror {
            return End::Mirror(e.to_string());
        }
        if let Some(end) = end {
            return end;
        }
    }
}

/// Deals with the foreign lines journaled beside the file (see [`crate::foreign`]) through
/// `master`; what cannot be dealt with now stays journaled for the next time.
async fn settle_foreign(replica: &Replica, master: &MasterAddr, options: &SyncOptions) {
    let files = replica.file().foreign_files();
    if !files.journal.exists() {
        return;
    }
    let settled = async {
        let mut client = master
            .connect(&options.client, options.connect_timeout)
            .await
            .map_err(crate::foreign::SettleError::Master)?;
        crate::foreign::settle(files, &mut client, &options.sidecar).await
    };
    match tokio::time::timeout(options.connect_timeout * 4, settled).await {
        Ok(Ok(0)) => {}
        Ok(Ok(count)) => tracing::info!(
            count,
            "dealt with the lines someone else wrote into the ledger file"
        ),
        Ok(Err(e)) => tracing::warn!(
            "cannot deal with the lines someone else wrote into the ledger file yet: {e}; they stay in {}",
            files.journal.display()
        ),
        Err(_) => tracing::warn!(
            "dealing with the lines someone else wrote into the ledger file took too long; they stay in {}",
            files.journal.display()
        ),
    }
}

/// The output of `future` if it is ready at once; `None` without waiting otherwise.
///
/// `tokio::time::timeout(Duration::ZERO, ..)` would wait for the timer's next 1 ms tick before
/// giving up, which delayed every applied batch by about a millisecond (strace: a 1 ms
/// `epoll_wait` between receiving a change and writing it).
fn ready_now<F: Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    // Nothing needs waking: a pending future is dropped, and the stream is polled again with
    // the task's own waker at the next `select!`. `Streaming::message` loses nothing when dropped.
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}

fn event_bytes(event: &pb::StreamLedgerResponse) -> usize {
    match &event.event {
        Some(pb::stream_ledger_response::Event::Inserted(policy)) => policy.json.len(),
        _ => 0,
    }
}

/// What a failed stream means: the master's reason says whether to resume at once.
fn ended(status: &tonic::Status) -> End {
    use ledger_proto::errors::{self, Reason};
    let reason = masters::describe_status(status);
    match errors::reason(status) {
        Some(Reason::SubscriberLagged | Reason::SnapshotStalled) => End::Lagged(reason),
        _ => End::Disconnected(reason),
    }
}

fn log_batch(report: &BatchReport, replica: &Replica, master: &MasterAddr, first_caught_up: bool) {
    let applied = replica.resume_seq();
    if let Some(seq) = report.caught_up {
        if first_caught_up {
            tracing::info!("caught up with master {master} at seq {seq}");
        } else {
            tracing::debug!(seq, "caught up");
        }
    }
    if let Some(head) = report.head {
        tracing::debug!(
            head,
            applied,
            lag = head.saturating_sub(applied),
            "progress"
        );
    }
    if report.changes > 0 {
        tracing::debug!(changes = report.changes, applied, "applied changes");
    }
}

/// Logs the link's changes of state once each.
#[derive(Default)]
struct LinkLog {
    /// Masters already reported unreachable since the last connection.
    reported: HashSet<String>,
    /// Whether "no master reachable" was said since the last connection.
    all_reported: bool,
    /// Whether the last connection has reached a stream (so the next one is a reconnect).
    connected_before: bool,
}

impl LinkLog {
    fn connected(&mut self, master: &MasterAddr, after_seq: u64) {
        let again = if self.connected_before { "re" } else { "" };
        metrics::connected(true);
        if self.connected_before {
            metrics::reconnected();
        }
        tracing::info!(
            "{again}connected to master {master}; streaming the changes after seq {after_seq}"
        );
        self.reported.clear();
        self.all_reported = false;
        self.connected_before = true;
    }

    fn disconnected(&mut self, master: &MasterAddr, reason: &str) {
        tracing::warn!(
            "disconnected from master {master}: {reason}; keeping the ledger file as it is"
        );
        // Its failures to come are the same outage: do not report them again.
        self.reported.insert(master.to_string());
    }

    fn unreachable(&mut self, master: &MasterAddr, reason: &str) {
        if self.reported.insert(master.to_string()) {
            tracing::warn!("cannot reach master {master}: {reason}");
        } else {
            tracing::debug!("cannot reach master {master}: {reason}");
        }
    }

    fn all_unreachable(&mut self, max_delay: Duration) {
        if !self.all_reported {
            self.all_reported = true;
            tracing::warn!(
                "no master is reachable; retrying with backoff (at most {max_delay:?} apart) and keeping the ledger file as it is"
            );
        }
    }
}
