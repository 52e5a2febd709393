//! The daemon's subscription: [`ledger_client::follow`] subscribes to the masters in order
//! after the applied seq, checks what streams in and reconnects with backoff; this module is
//! the [`Sink`] it feeds, the ledger file through the [`Replica`], plus what a member does
//! beside it: deal with the lines the node wrote into the file, tell the node to reload, keep
//! the metrics.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ledger_client::follow::{self, Event, FollowOptions, Sink, Stop};
use ledger_client::masters::{ClientOptions, MasterAddr};
use ledger_client::report::Identity;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::ledger_file::{FileError, LedgerFile};
use crate::metrics;
use crate::node::NodeNotifier;
use crate::replica::{ApplyError, BatchReport, Replica};
use crate::sidecar::Sidecar;

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
    /// What the daemon did for the node beside it, for `member status`.
    pub sidecar: Sidecar,
    /// The node told to reload after each batch that changed the file (`--node-rest`,
    /// `--node-tcp`).
    pub node: Option<NodeNotifier>,
    /// How the member names itself to the masters; it reports them the seq its file made
    /// durable (the state record's).
    pub identity: Identity,
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
}

/// Runs the daemon until `shutdown` is cancelled; a write in progress finishes first.
pub async fn run(options: SyncOptions, shutdown: CancellationToken) -> Result<(), SyncError> {
    if options.masters.is_empty() {
        return Err(SyncError::NoMaster);
    }
    let file = open(&options.ledger_file).await?;
    metrics::connected(false);
    metrics::applied(file.seq());
    let follow = FollowOptions {
        masters: options.masters.clone(),
        client: options.client.clone(),
        connect_timeout: options.connect_timeout,
        retry_min: options.retry_min,
        retry_max: options.retry_max,
        identity: Some(options.identity.clone()),
    };
    let mut sink = FileSink {
        options: &options,
        replica: Some(Replica::new(file)),
        master: None,
        caught_up_once: false,
    };
    follow::follow(&follow, &mut sink, &shutdown).await;
    tracing::info!("stopped");
    Ok(())
}

/// Opens (and repairs) the ledger file off the async threads.
async fn open(path: &Path) -> Result<LedgerFile, SyncError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || LedgerFile::open(&path))
        .await
        .map_err(|e| SyncError::Task(e.to_string()))?
        .map_err(SyncError::from)
}

/// The ledger file as the subscription's sink.
struct FileSink<'a> {
    options: &'a SyncOptions,
    /// `None` after a failed write, until start-up repair reopened the file.
    replica: Option<Replica>,
    /// The master streamed from and its connection, for the foreign lines.
    master: Option<(MasterAddr, Channel)>,
    /// Whether this subscription caught up already (the node is told once more when it does).
    caught_up_once: bool,
}

impl FileSink<'_> {
    /// A write failed: the file is reopened (start-up repair) before anything else is applied.
    fn write_failed(&mut self, e: FileError) -> Stop {
        tracing::error!("writing the ledger file failed: {e}; reopening it");
        self.replica = None;
        Stop::Later
    }

    /// Deals with the journaled foreign lines through the master streamed from.
    async fn settle(&self) {
        if let (Some(replica), Some((master, channel))) = (&self.replica, &self.master) {
            settle_foreign(replica, master, channel, self.options).await;
        }
    }
}

impl Sink for FileSink<'_> {
    fn resume_seq(&self) -> u64 {
        self.replica.as_ref().map_or(0, Replica::resume_seq)
    }

    async fn prepare(&mut self) -> Result<(), ()> {
        if self.replica.is_none() {
            // A write failed: start-up repair brings the file and its record back into
            // agreement before anything else is applied.
            match open(&self.options.ledger_file).await {
                Ok(file) => {
                    metrics::applied(file.seq());
                    self.replica = Some(Replica::new(file));
                }
                Err(e) => {
                    tracing::error!("cannot reopen the ledger file: {e}");
                    return Err(());
                }
            }
        }
        Ok(())
    }

    async fn connected(&mut self, master: &MasterAddr, channel: &Channel, again: bool) {
        metrics::connected(true);
        if again {
            metrics::reconnected();
        }
        self.caught_up_once = false;
        self.master = Some((master.clone(), channel.clone()));
        // What the node wrote while no master answered (or before a crash) goes first.
        self.settle().await;
    }

    async fn apply(&mut self, events: Vec<Event>) -> Result<(), Stop> {
        let Some(replica) = self.replica.as_mut() else {
            return Err(Stop::Later);
        };
        let seq_before = replica.resume_seq();
        let result = tokio::task::block_in_place(|| replica.apply(events));
        // What the file made durable (also before a failure midway): the node reloads it; and
        // once a subscription catches up, for what the node may have missed before.
        let first_caught_up =
            matches!(&result, Ok(r) if r.caught_up.is_some()) && !self.caught_up_once;
        let changed = replica.resume_seq() != seq_before
            || first_caught_up
            || matches!(&result, Ok(r) if r.changes > 0 || r.installed.is_some());
        if changed && let Some(node) = &self.options.node {
            node.notify();
        }
        metrics::applied(replica.resume_seq());
        if let Ok(report) = &result
            && let Some(head) = report.head.or(report.caught_up)
        {
            metrics::head(head);
        }
        match result {
            Ok(report) => {
                self.caught_up_once |= first_caught_up;
                log_batch(&report, replica);
                Ok(())
            }
            Err(ApplyError::Protocol(reason)) => {
                let master = self.master.as_ref().map(|(master, _)| master.to_string());
                tracing::warn!(
                    "dropping the stream from master {}: {reason}",
                    master.unwrap_or_default()
                );
                Err(Stop::Later)
            }
            Err(ApplyError::Diverged(reason)) => {
                replica.await_snapshot(&reason);
                Err(Stop::Later)
            }
            Err(ApplyError::File(e)) => Err(self.write_failed(e)),
        }
    }

    fn tick_interval(&self) -> Option<Duration> {
        Some(FOREIGN_LOOK_INTERVAL)
    }

    async fn tick(&mut self) -> Result<(), Stop> {
        let Some(replica) = self.replica.as_mut() else {
            return Err(Stop::Later);
        };
        match tokio::task::block_in_place(|| replica.take_foreign()) {
            Err(e) => return Err(self.write_failed(e)),
            // The file was changed by someone else and waits for a snapshot: subscribe again
            // at once.
            Ok(_) if replica.file().awaiting_snapshot() => return Err(Stop::Now),
            // The file changed: what the node reads now is the ledger alone (its own lines
            // come back through the stream once the master has them).
            Ok(true) => {
                if let Some(node) = &self.options.node {
                    node.notify();
                }
            }
            Ok(false) => {}
        }
        self.settle().await;
        Ok(())
    }

    async fn disconnected(&mut self) {
        metrics::connected(false);
        if let Some(replica) = &mut self.replica {
            replica.abandon_snapshot();
        }
    }
}

/// Deals with the foreign lines journaled beside the file (see [`crate::foreign`]) through
/// `master`; what cannot be dealt with now stays journaled for the next time.
async fn settle_foreign(
    replica: &Replica,
    master: &MasterAddr,
    channel: &Channel,
    options: &SyncOptions,
) {
    let files = replica.file().foreign_files();
    if !files.journal.exists() {
        return;
    }
    tracing::debug!(%master, "dealing with the lines someone else wrote into the ledger file");
    let settled = async {
        let mut client = options.client.client(channel.clone());
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

fn log_batch(report: &BatchReport, replica: &Replica) {
    let applied = replica.resume_seq();
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
