//! The single writer: group commit of inserts and deletes.
//!
//! Writes are committed one transaction at a time, under one lock (the writer's core): the writer
//! thread drains all the requests waiting at that moment into one transaction (one commit, one
//! fsync), then answers each request and publishes the changes to the [`ChangeFeed`]. On an
//! embedded database (SQLite), a write that finds no other write committing or waiting takes the
//! lock and commits itself, on the runtime worker that received it: alone, it would only wait for
//! the writer thread to wake and then for its answer to come back, two thread hand-offs (A/B at one
//! client, issue 16: +10-23% inserts/s, -15% CPU). One lock per master means
//! seqs are published in the order they commit; acknowledging only after the commit keeps every
//! acknowledged write durable.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{mpsc, oneshot, watch};

use crate::error::LedgerError;
use crate::feed::ChangeFeed;
use ledger_storage::{Change, Storage, StorageError, WriteOp};

/// How many waiting requests the writer queues before callers wait for room.
const QUEUE_DEPTH: usize = 8192;

struct Request {
    op: WriteOp,
    reply: oneshot::Sender<Result<Change, LedgerError>>,
}

/// What the writer thread's queue carries.
enum Queued {
    /// A write to commit.
    Write(Request),
    /// A write committed on another thread panicked: the writer thread stops too, so that the
    /// master, which waits for it when it stops, can exit.
    Stop,
}

/// A handle to submit writes. Dropping every handle stops the writer once the queue is drained.
#[derive(Clone)]
pub struct Writer {
    requests: mpsc::Sender<Queued>,
    core: Arc<Mutex<Core>>,
    /// Whether a lone write may commit on the caller's thread: only where a commit waits for
    /// this machine's disk alone ([`Storage::is_embedded`]), never for a network that may hang.
    lone_writes_inline: bool,
    health: WritesHealth,
}

/// What committing needs, behind the one lock every commit holds.
struct Core {
    storage: Arc<dyn Storage>,
    feed: ChangeFeed,
    pruner: Pruner,
    health: Arc<watch::Sender<WriterHealth>>,
    /// The ids of the last batch cut off with its connection, which may have committed: looked
    /// up before anything else commits ([`Core::reconcile`]).
    unknown: Vec<String>,
}

/// The writer's health as the database watch sees it: when the database answers again on a
/// server that takes writes, writes that failed as unavailable are expected to commit again.
#[derive(Clone)]
pub struct WritesHealth(Arc<watch::Sender<WriterHealth>>);

impl WritesHealth {
    /// The database answered a check on a server that takes writes: a writer unavailable
    /// because of the database is `Writing` again (the next commit tells for sure).
    pub fn database_answers(&self) {
        self.0.send_if_modified(|h| {
            let back = matches!(h, WriterHealth::Unavailable(_));
            if back {
                tracing::info!("the database answers again on a server that takes writes: writes are accepted again");
                *h = WriterHealth::Writing;
            }
            back
        });
    }
}

/// Whether writes can be committed, as the writer last found out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriterHealth {
    /// The last transaction committed (or none was tried yet).
    Writing,
    /// The last transaction failed because the database's disk is full; the next one may
    /// succeed once space is freed.
    DiskFull(String),
    /// The last transaction failed because the database is out of reach (or gave no answer
    /// within `--write-timeout`); writes commit again once it answers: the next commit, or the
    /// database watch's next check on a server that takes writes ([`WritesHealth`]).
    Unavailable(String),
    /// The writer thread failed and stopped: no write will be committed again by this process.
    Failed(String),
}

/// Options of the writer.
#[derive(Debug, Clone, Copy)]
pub struct WriterOptions {
    /// The most writes committed in one transaction.
    pub max_batch: usize,
    /// Keep this many changes replayable; older ones are pruned. `None` keeps all.
    pub change_retention: Option<u64>,
}

impl Writer {
    /// Starts the writer thread; the returned handle finishes when every [`Writer`] is dropped
    /// and the queued writes are committed. The watch tells whether writes commit: the server
    /// shows it in health, and stops when the writer failed.
    pub fn start(
        storage: Arc<dyn Storage>,
        feed: ChangeFeed,
        options: WriterOptions,
    ) -> (
        Writer,
        std::thread::JoinHandle<()>,
        watch::Receiver<WriterHealth>,
    ) {
        let (requests, queue) = mpsc::channel(QUEUE_DEPTH);
        let (health, watched) = watch::channel(WriterHealth::Writing);
        let health = Arc::new(health);
        let lone_writes_inline = storage.is_embedded();
        let core = Arc::new(Mutex::new(Core {
            storage,
            feed,
            pruner: Pruner::new(options.change_retention),
            health: health.clone(),
            unknown: Vec::new(),
        }));
        let thread = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn({
                let core = core.clone();
                move || {
                    // A panic must not leave a master that looks healthy but never writes: it
                    // is caught here and reported, and the server stops (the queue, dropped by
                    // the unwinding, answers every waiting caller UNAVAILABLE).
                    let run = AssertUnwindSafe(|| run(&core, queue, options));
                    if let Err(panic) = std::panic::catch_unwind(run) {
                        failed(&core, &*panic);
                    }
                }
            })
            .expect("spawning the writer thread");
        (
            Writer {
                requests,
                core,
                lone_writes_inline,
                health: WritesHealth(health),
            },
            thread,
            watched,
        )
    }

    /// The writer's health, for the database watch.
    pub fn health(&self) -> WritesHealth {
        self.health.clone()
    }

    /// Commits `op` and returns its change once durable.
    pub async fn submit(&self, op: WriteOp) -> Result<Change, LedgerError> {
        let (reply, answer) = oneshot::channel();
        let request = Request { op, reply };
        match self.commit_here(request) {
            None => {}
            Some(request) => self
                .requests
                .send(Queued::Write(request))
                .await
                .map_err(|_| LedgerError::ShuttingDown)?,
        }
        answer.await.map_err(|_| LedgerError::ShuttingDown)?
    }

    /// Commits `request` on this thread when no other write is committing or waiting, on an
    /// embedded database, in a runtime with another worker to go on meanwhile; otherwise gives
    /// it back, for the writer thread.
    ///
    /// The commit blocks this worker (a local commit: a write and a sync of a few KiB, ~0.4 ms
    /// here; every 40 MiB of WAL, a checkpoint of tens of ms; at worst SQLite's busy timeout,
    /// when another process holds the file's write lock). `block_in_place` would move the worker's other tasks to a new thread instead, but
    /// that hand-off cost more than it saved (A/B at one client: -10% inserts/s, +40% CPU). The
    /// lock bounds it to one worker at a time; the others go on.
    fn commit_here(&self, request: Request) -> Option<Request> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        let spare_worker = Handle::try_current().is_ok_and(|runtime| {
            runtime.runtime_flavor() == RuntimeFlavor::MultiThread
                && runtime.metrics().num_workers() >= 2
        });
        let queue_empty = self.requests.capacity() == self.requests.max_capacity();
        if !self.lone_writes_inline || !spare_worker || !queue_empty {
            return Some(request);
        }
        let mut core = match self.core.try_lock() {
            Ok(core) => core,
            // A writer thread that panicked left the lock poisoned: its caller saw the failure,
            // and the server is stopping; the write goes to the queue, which refuses it.
            Err(_) => return Some(request),
        };
        let commit = AssertUnwindSafe(|| core.commit(&mut vec![request]));
        if let Err(panic) = std::panic::catch_unwind(commit) {
            // The request, dropped by the unwinding, answers its caller UNAVAILABLE. A full
            // queue means the writer thread is busy: it stops after its commit, failed.
            failed_with(&core.health, &*panic);
            let _ = self.requests.try_send(Queued::Stop);
        }
        None
    }
}

/// The writer failed with `panic`: health says so, and the server stops.
fn failed(core: &Mutex<Core>, panic: &(dyn std::any::Any + Send)) {
    let core = core.lock().unwrap_or_else(PoisonError::into_inner);
    failed_with(&core.health, panic);
}

/// [`failed`], with the core's lock held.
fn failed_with(health: &watch::Sender<WriterHealth>, panic: &(dyn std::any::Any + Send)) {
    let reason = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into());
    health.send_replace(WriterHealth::Failed(format!(
        "the writer panicked: {reason}"
    )));
}

/// Keeps the change log at `--change-retention` changes: a master's writer and a relay's
/// upstream link, each after its commits.
#[derive(Debug, Clone, Copy)]
pub struct Pruner {
    keep: Option<u64>,
    /// Changes up to here were pruned by this process.
    pruned_through: u64,
}

impl Pruner {
    /// Keeps `keep` changes; `None` keeps every change.
    pub fn new(keep: Option<u64>) -> Pruner {
        Pruner {
            keep,
            pruned_through: 0,
        }
    }

    /// The changes up to `head` are committed: prune what falls out of the retention. Pruning
    /// is a transaction of its own, so it runs in steps of a quarter of the retention, not
    /// after every commit. Blocks.
    pub fn committed(&mut self, storage: &dyn Storage, head: u64) {
        let Some(keep) = self.keep else {
            return;
        };
        let through = head.saturating_sub(keep);
        if through >= self.pruned_through + (keep / 4).max(1) {
            match storage.prune_changes(through) {
                Ok(()) => self.pruned_through = through,
                Err(e) => tracing::warn!(error = %e, "could not prune the change log"),
            }
        }
    }

    /// The log was emptied up to `seq` (a relay's copy replaced by a snapshot).
    pub fn replaced(&mut self, seq: u64) {
        self.pruned_through = seq;
    }
}

/// The writer thread: every write that did not commit itself, in batches of what waits.
fn run(core: &Mutex<Core>, mut queue: mpsc::Receiver<Queued>, options: WriterOptions) {
    let max_batch = options.max_batch.max(1);
    let mut batch = Vec::with_capacity(max_batch);
    let mut stop = false;
    while let Some(Queued::Write(first)) = queue.blocking_recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match queue.try_recv() {
                Ok(Queued::Write(request)) => batch.push(request),
                Ok(Queued::Stop) => {
                    stop = true;
                    break;
                }
                Err(_) => break,
            }
        }
        let mut core = core.lock().unwrap_or_else(PoisonError::into_inner);
        core.commit(&mut batch);
        if stop || core.failed() {
            break;
        }
    }
    // Dropping the queue answers every write still in it UNAVAILABLE.
    tracing::debug!("writer stopped");
}

/// The id an insert or a delete is about.
fn op_id(op: &WriteOp) -> &str {
    match op {
        WriteOp::Insert(policy) => &policy.id,
        WriteOp::Delete { id } => id,
    }
}

impl Core {
    /// After a batch cut off with its connection (it may have committed, in part or whole, as
    /// the database alone knows), before anything else commits: publishes whatever committed
    /// since the last published change, so streams get the cut-off batch's changes in their
    /// order, and says in the log which of its writes had committed. A retried insert of one
    /// that had committed then answers ALREADY_EXISTS: acknowledged once, never twice, never
    /// lost. Until this succeeds, nothing new commits (the batch fails unavailable).
    fn reconcile(&mut self) -> Result<(), StorageError> {
        if self.unknown.is_empty() {
            return Ok(());
        }
        let head = self.feed.catch_up(&*self.storage)?;
        let mut committed = 0usize;
        for id in &self.unknown {
            if self.storage.get(id)?.is_some() {
                committed += 1;
            }
        }
        tracing::info!(
            writes = self.unknown.len(),
            stored = committed,
            head,
            "reconciled the writes cut off with their connection: their ids are looked up and what committed is published; a retry of a stored insert answers ALREADY_EXISTS"
        );
        self.unknown.clear();
        Ok(())
    }

    /// Whether a commit panicked: then nothing is committed again.
    fn failed(&self) -> bool {
        matches!(*self.health.borrow(), WriterHealth::Failed(_))
    }

    /// Commits `batch` in one transaction, answers each request and publishes the changes;
    /// empties the batch.
    fn commit(&mut self, batch: &mut Vec<Request>) {
        if self.failed() {
            // A commit panicked: nothing is committed again by this process, whose state the
            // panic may have left half-changed. The dropped requests answer UNAVAILABLE.
            batch.clear();
            return;
        }
        let ops: Vec<WriteOp> = batch.iter().map(|r| r.op.clone()).collect();
        fail::fail_point!("writer-apply");
        let applied = self.reconcile().and_then(|()| self.storage.apply(&ops));
        let (storage, feed, health) = (&self.storage, &self.feed, &*self.health);
        match applied {
            Ok(results) => {
                health.send_if_modified(|h| {
                    let changed = *h != WriterHealth::Writing;
                    if changed {
                        tracing::info!("writes commit again");
                    }
                    *h = WriterHealth::Writing;
                    changed
                });
                let committed: Vec<_> = results.iter().flatten().cloned().collect();
                let head = committed.last().map(|change| change.seq);
                // Publish before answering: by the time a client holds its acknowledgement,
                // every subscriber of this master can already receive the change.
                if let Err(e) = feed.publish_committed(&**storage, committed) {
                    tracing::warn!(error = %e, "could not publish committed changes; streams will read them from the database");
                }
                for (request, result) in batch.drain(..).zip(results) {
                    // The caller may have gone (deadline, disconnect); the write stands anyway.
                    let _ = request.reply.send(result.map_err(LedgerError::from));
                }
                if let Some(head) = head {
                    self.pruner.committed(&**storage, head);
                }
            }
            Err(e) => {
                use ledger_storage::Failure;
                let disk_full = e.is_disk_full();
                let unknown = e.outcome_unknown();
                if unknown {
                    // The database may have committed before the connection went: the writes
                    // are answered as such, and what did commit is published once the
                    // database answers again (the health check's catch-up, or the gap filled
                    // at the next commit).
                    tracing::error!(error = %e, writes = batch.len(), "write transaction cut off with its connection to the database: whether it committed is unknown");
                } else {
                    tracing::error!(error = %e, writes = batch.len(), "write transaction failed; nothing of it was committed");
                }
                let message = match &e {
                    // The inner text, not the error's own: it is wrapped again for each caller.
                    StorageError::Unavailable(m)
                    | StorageError::Busy(m)
                    | StorageError::DiskFull(m)
                    | StorageError::OutcomeUnknown(m)
                    | StorageError::Corrupt(m)
                    | StorageError::Failed(m) => m.clone(),
                    StorageError::Query(e) => e.to_string(),
                    other => other.to_string(),
                };
                if disk_full {
                    health.send_replace(WriterHealth::DiskFull(message.clone()));
                } else if matches!(e.failure(), Failure::Unavailable | Failure::OutcomeUnknown) {
                    health.send_if_modified(|h| {
                        let first = !matches!(h, WriterHealth::Unavailable(_));
                        *h = WriterHealth::Unavailable(message.clone());
                        first
                    });
                }
                if unknown && self.unknown.is_empty() {
                    self.unknown = ops.iter().map(|op| op_id(op).to_string()).collect();
                }
                for request in batch.drain(..) {
                    // Each caller gets the failure's own kind (its reason on the wire).
                    let message = message.clone();
                    let error = match e.failure() {
                        Failure::DiskFull => StorageError::DiskFull(message),
                        _ if unknown => StorageError::OutcomeUnknown(message),
                        Failure::Busy => StorageError::Busy(message),
                        Failure::Unavailable | Failure::OutcomeUnknown => {
                            StorageError::Unavailable(message)
                        }
                        Failure::Corrupt => StorageError::Corrupt(message),
                        Failure::Other => StorageError::Failed(message),
                    };
                    let _ = request.reply.send(Err(error.into()));
                }
            }
        }
    }
}
