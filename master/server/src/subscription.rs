//! One `StreamLedger` subscription: a snapshot or a replay, `caught_up`, then live changes.
//!
//! The subscriber joins the [`ChangeFeed`] *before* reading the storage, so a change commits
//! either before the read (and comes from the storage) or after it (and comes from the feed);
//! changes seen in both are recognised by their seq and sent once. A seq that jumps ahead of
//! the next expected one is filled from the storage, so no change is ever skipped.
//!
//! On a relay, the copy served can be replaced by a snapshot from upstream
//! ([`ChangeFeed::reset`]): a stream that began before ends with [`LedgerError::Reset`], and its
//! subscriber subscribes again (a snapshot if it is now behind what the relay can replay). A
//! relay without a copy yet holds new streams until it has one.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;

use crate::error::LedgerError;
use crate::feed::{Announced, ChangeFeed, SharedChange};
use crate::limits::SnapshotLimiter;
use crate::log_limit::{self, LogLimit};
use crate::metrics;
use crate::storage_io::{self, PAGE};
use ledger_storage::{SnapshotPart, Storage, StorageError, StoredPolicy};

/// One event of a subscription, before it is turned into a gRPC message.
#[derive(Debug, Clone)]
pub enum Event {
    /// Drop the local copy: a snapshot at `snapshot_seq` follows.
    Reset {
        /// The seq the snapshot shows.
        snapshot_seq: u64,
        /// How many policies follow.
        policy_count: u64,
    },
    /// One policy of a snapshot.
    Snapshot(StoredPolicy),
    /// One change, replayed or live; a live one is shared with every other subscriber.
    Change(Arc<SharedChange>),
    /// Everything up to `seq` was sent; live changes follow.
    CaughtUp {
        /// The seq the subscriber is at.
        seq: u64,
    },
    /// Nothing happened for a while; the head is `head_seq`.
    Progress {
        /// The head seq of the ledger.
        head_seq: u64,
    },
}

/// What every subscription needs from the master.
#[derive(Clone)]
pub struct SubscriptionContext {
    /// Where snapshots and replays are read from.
    pub storage: Arc<dyn Storage>,
    /// Where live changes come from.
    pub feed: ChangeFeed,
    /// How long a stream stays quiet before a `progress` event.
    pub progress_interval: Duration,
    /// Cancelled when the master shuts down: streams end with [`LedgerError::ShuttingDown`].
    pub shutdown: CancellationToken,
    /// Turns to read a snapshot, and how long a reader waits for a client that does not read.
    pub snapshots: SnapshotLimiter,
}

/// Counts a subscription in the `ledger_subscribers` gauge for as long as it lives.
struct SubscriberGauge;

impl SubscriberGauge {
    fn new() -> Self {
        metrics::subscribers_changed(1.0);
        SubscriberGauge
    }
}

impl Drop for SubscriberGauge {
    fn drop(&mut self) {
        metrics::subscribers_changed(-1.0);
    }
}

/// What woke the live loop up.
enum Wake {
    Change(Result<Announced, broadcast::error::RecvError>),
    Idle,
    Shutdown,
    DatabaseDown,
    Reset,
}

/// The error that ends a stream when the database stops answering.
fn database_down() -> LedgerError {
    StorageError::Unavailable(
        "the master lost its database; resume on another master or later".into(),
    )
    .into()
}

/// The events of a subscription of `client` (its address, for the per-client limits), which
/// applied everything up to `after_seq`.
pub fn subscribe(
    ctx: SubscriptionContext,
    after_seq: u64,
    client: Option<IpAddr>,
) -> impl Stream<Item = Result<Event, LedgerError>> + Send + 'static {
    async_stream::stream! {
        let _counted = SubscriberGauge::new();
        // A relay without a copy yet: hand out nothing rather than an empty ledger.
        let mut ready = ctx.feed.watch_ready();
        if !*ready.borrow_and_update() {
            // No yield inside the select: its output (a watch guard) must not live across one.
            let stopping = tokio::select! {
                _ = ready.wait_for(|ready| *ready) => false,
                _ = ctx.shutdown.cancelled() => true,
            };
            if stopping {
                yield Err(LedgerError::ShuttingDown);
                return;
            }
        }
        // Taken before the feed and the storage are read: a reset after this ends the stream,
        // so no stream ever mixes two copies.
        let mut epoch = ctx.feed.watch_epoch();
        let started = *epoch.borrow_and_update();
        let reset = |epoch: &tokio::sync::watch::Receiver<u64>| *epoch.borrow() != started;
        let mut live = ctx.feed.subscribe();
        let mut database = ctx.feed.watch_database();
        if !*database.borrow_and_update() {
            yield Err(database_down());
            return;
        }
        // A subscriber at the head this master published (a member reconnecting: after a
        // restart, a thousand at once): nothing to replay, so nothing to read. It joined the
        // feed above, which carries every change published after `published_seq`. (Changes are
        // published after their commit, so that seq is never ahead of the database.)
        let mut last;
        if after_seq > 0 && after_seq == ctx.feed.published_seq() {
            last = after_seq;
        } else {
            let mut bounds = match storage_io::run(&ctx.storage, |s| s.bounds()).await {
                Ok(bounds) => bounds,
                Err(e) => {
                    yield Err(e.into());
                    return;
                }
            };
            if after_seq > bounds.head_seq {
                // A subscriber ahead of us: usually this server (a relay, a restarted master) is a
                // moment behind its upstream. Wait a little for the head to get there rather than
                // hand it an older ledger; past the wait it is another ledger and gets a reset.
                let mut head = ctx.feed.watch_head();
                let _ = tokio::time::timeout(ctx.progress_interval, head.wait_for(|h| *h >= after_seq)).await;
                bounds = match storage_io::run(&ctx.storage, |s| s.bounds()).await {
                    Ok(bounds) => bounds,
                    Err(e) => {
                        yield Err(e.into());
                        return;
                    }
                };
            }
            let replayable = after_seq > 0 && after_seq >= bounds.pruned_seq && after_seq <= bounds.head_seq;
            if replayable {
                last = after_seq;
                loop {
                    if ctx.shutdown.is_cancelled() {
                        yield Err(LedgerError::ShuttingDown);
                        return;
                    }
                    let changes = match storage_io::run(&ctx.storage, move |s| s.changes_after(last, PAGE)).await {
                        Ok(changes) => changes,
                        Err(e) => {
                            yield Err(e.into());
                            return;
                        }
                    };
                    if reset(&epoch) {
                        yield Err(LedgerError::Reset);
                        return;
                    }
                    let full = changes.len() == PAGE;
                    for change in changes {
                        last = change.seq;
                        yield Ok(Event::Change(Arc::new(SharedChange::new(change))));
                    }
                    if !full {
                        break;
                    }
                }
            } else {
                // The reader thread holds one read transaction (a pooled connection) for the whole
                // snapshot and waits on the bounded channel while the client is slow. So snapshots
                // take turns, and a reader whose client takes no page for the stall timeout gives
                // up and frees its connection; a dropped stream ends it at once.
                let turn = tokio::select! {
                    turn = ctx.snapshots.acquire(client) => turn,
                    _ = ctx.shutdown.cancelled() => {
                        yield Err(LedgerError::ShuttingDown);
                        return;
                    }
                };
                let (pages, mut received) = mpsc::channel(2);
                let storage = ctx.storage.clone();
                let stall = ctx.snapshots.stall_timeout;
                let runtime = tokio::runtime::Handle::current();
                let reader = tokio::task::spawn_blocking(move || {
                    let _turn = turn;
                    let mut stalled = false;
                    storage.snapshot(PAGE, &mut |part| {
                        match runtime.block_on(tokio::time::timeout(stall, pages.send(part))) {
                            Ok(sent) => sent.is_ok(),
                            Err(_) => {
                                stalled = true;
                                false
                            }
                        }
                    })?;
                    if stalled {
                        metrics::snapshot_stalled();
                        static STALLS: LogLimit = LogLimit::new(Duration::from_secs(10));
                        if let Some(suppressed) = STALLS.admit() {
                            tracing::warn!(client = ?client, "ended a snapshot whose client read nothing for {stall:?}{}", log_limit::more(suppressed));
                        }
                        return Err(LedgerError::SnapshotStalled(stall));
                    }
                    Ok(())
                });
                last = 0;
                loop {
                    let part = tokio::select! {
                        part = received.recv() => part,
                        _ = ctx.shutdown.cancelled() => {
                            yield Err(LedgerError::ShuttingDown);
                            return;
                        }
                    };
                    match part {
                        Some(SnapshotPart::Start { seq, policy_count }) => {
                            last = seq;
                            yield Ok(Event::Reset { snapshot_seq: seq, policy_count });
                        }
                        Some(SnapshotPart::Page(policies)) => {
                            for policy in policies {
                                yield Ok(Event::Snapshot(policy));
                            }
                        }
                        None => break,
                    }
                }
                match reader.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        yield Err(e);
                        return;
                    }
                    Err(e) => {
                        yield Err(StorageError::Failed(format!("snapshot task failed: {e}")).into());
                        return;
                    }
                }
            }
        }
        if reset(&epoch) {
            yield Err(LedgerError::Reset);
            return;
        }
        yield Ok(Event::CaughtUp { seq: last });

        let idle = tokio::time::sleep(ctx.progress_interval);
        tokio::pin!(idle);
        loop {
            let wake = tokio::select! {
                biased;
                _ = ctx.shutdown.cancelled() => Wake::Shutdown,
                _ = database.wait_for(|up| !*up) => Wake::DatabaseDown,
                _ = epoch.wait_for(|epoch| *epoch != started) => Wake::Reset,
                received = live.recv() => Wake::Change(received),
                _ = &mut idle => Wake::Idle,
            };
            match wake {
                Wake::Shutdown => {
                    yield Err(LedgerError::ShuttingDown);
                    return;
                }
                Wake::DatabaseDown => {
                    yield Err(database_down());
                    return;
                }
                Wake::Reset => {
                    yield Err(LedgerError::Reset);
                    return;
                }
                Wake::Idle => {
                    yield Ok(Event::Progress { head_seq: ctx.feed.head().max(last) });
                }
                Wake::Change(Ok(announced)) => {
                    if announced.seq <= last {
                        continue;
                    }
                    // A change committed elsewhere may be announced out of order, and a change
                    // the feed no longer keeps (its byte budget) is gone from memory: read what
                    // is missing from the storage rather than skip it.
                    let change = announced.change.upgrade();
                    let through = if change.is_some() { announced.seq - 1 } else { announced.seq };
                    while last < through {
                        // Only what is missing: a subscriber far behind the feed's byte budget
                        // fills a gap at every announcement, often of one change, and a whole
                        // page of large policies each time made its backlog crawl.
                        let wanted = (through - last).min(PAGE as u64) as usize;
                        let missing = match storage_io::run(&ctx.storage, move |s| s.changes_after(last, wanted)).await {
                            Ok(missing) => missing,
                            Err(e) => {
                                yield Err(e.into());
                                return;
                            }
                        };
                        if reset(&epoch) {
                            yield Err(LedgerError::Reset);
                            return;
                        }
                        if missing.is_empty() {
                            yield Err(StorageError::Corrupt(format!(
                                "change {} was announced but changes after {last} are missing",
                                announced.seq
                            )).into());
                            return;
                        }
                        for missed in missing.into_iter().take_while(|c| c.seq <= through) {
                            last = missed.seq;
                            yield Ok(Event::Change(Arc::new(SharedChange::new(missed))));
                        }
                    }
                    if let Some(change) = change {
                        last = change.seq;
                        yield Ok(Event::Change(change));
                    }
                }
                Wake::Change(Err(broadcast::error::RecvError::Lagged(missed))) => {
                    metrics::subscriber_dropped();
                    tracing::warn!(missed, resume_after = last, "disconnecting a subscriber that fell behind");
                    yield Err(LedgerError::SubscriberLagged { missed, resume_after: last });
                    return;
                }
                Wake::Change(Err(broadcast::error::RecvError::Closed)) => {
                    yield Err(LedgerError::ShuttingDown);
                    return;
                }
            }
            idle.as_mut().reset(Instant::now() + ctx.progress_interval);
        }
    }
}
