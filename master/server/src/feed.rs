//! The change feed: fans every committed change out to the live subscribers, in seq order.
//!
//! A bounded broadcast ring announces the recent changes, each shared by every subscriber through
//! an `Arc`, so memory does not grow with slow subscribers: a subscriber that falls more than the
//! ring's capacity behind is told so by the ring and dropped (see [`crate::subscription`]).
//! The ring is bounded in bytes too: the changes themselves are kept by the feed up to a byte
//! budget, and the ring only holds weak references to them. A subscriber that reaches a change
//! the feed no longer keeps reads it from the storage instead: large policies cannot pin the
//! ring's capacity times their size.
//! A [`SharedChange`] also keeps the change's wire encoding once a subscriber made it, so a
//! change is encoded once, not once per subscriber.
//!
//! Changes reach the feed from this master's writer and, when several masters share one
//! database, from the database's notifications; [`ChangeFeed::publish_committed`] orders both,
//! reading from the storage whatever was committed in between, so the ring never holds a gap.
//! On a relay they come from its upstream, and a snapshot from upstream that replaces the
//! relay's copy is a [`ChangeFeed::reset`]: the streams of the old copy end, and their
//! subscribers subscribe again.

use std::collections::VecDeque;
use std::ops::Deref;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};

use prost::bytes::Bytes;
use tokio::sync::{broadcast, watch};

use crate::metrics;
use crate::storage_io::PAGE;
use ledger_storage::{Change, ChangeKind, Storage, StorageError};

/// A committed change as the feed hands it to every subscriber, with room for its encoding.
///
/// It dereferences to the [`Change`]. The encoding is the gRPC edge's business: the feed only
/// keeps the first one made, so that the other subscribers send the same bytes.
#[derive(Debug)]
pub struct SharedChange {
    change: Change,
    encoded: OnceLock<Bytes>,
}

impl SharedChange {
    /// `change`, not encoded yet.
    pub fn new(change: Change) -> Self {
        SharedChange {
            change,
            encoded: OnceLock::new(),
        }
    }

    /// The change's encoding: made by `encode` for the first caller, and the same bytes (shared,
    /// not copied) for every later one. Concurrent first callers wait for one encoding.
    pub fn encoded(&self, encode: impl FnOnce(&Change) -> Bytes) -> Bytes {
        self.encoded.get_or_init(|| encode(&self.change)).clone()
    }
}

impl Deref for SharedChange {
    type Target = Change;

    fn deref(&self) -> &Change {
        &self.change
    }
}

impl SharedChange {
    /// About how many bytes the change takes in memory, once encoded.
    fn weight(&self) -> usize {
        let text = match &self.change.kind {
            ChangeKind::Inserted(policy) => {
                policy.json.len() + policy.id.len() + policy.policy_type.len()
            }
            ChangeKind::Deleted { id } => id.len(),
        };
        // The change, and its encoding once a subscriber made it.
        2 * text + 128
    }
}

/// A change as the ring announces it: its seq, and the change while the feed still keeps it.
#[derive(Debug, Clone)]
pub struct Announced {
    /// The change's seq.
    pub seq: u64,
    /// The change, unless the feed let it go to stay within its byte budget: then read it from
    /// the storage.
    pub change: Weak<SharedChange>,
}

/// The recent changes the feed keeps alive for the ring, within a byte budget.
struct Kept {
    changes: VecDeque<Arc<SharedChange>>,
    bytes: usize,
    max_count: usize,
    max_bytes: usize,
}

/// The byte budget of the recent changes kept for lagging subscribers
/// (`--subscriber-buffer-bytes`).
pub const DEFAULT_KEPT_BYTES: usize = 64 << 20;

/// Where the published changes got to.
struct Published {
    /// The seq of the last published change.
    seq: u64,
    /// How many policies the ledger holds at `seq`, once counted
    /// ([`ChangeFeed::set_policy_count`]): the `ledger_policies` gauge is set to it.
    policies: Option<u64>,
}

/// The fan-out hub of committed changes. Cloning gives another handle to the same feed.
#[derive(Clone)]
pub struct ChangeFeed {
    changes: broadcast::Sender<Announced>,
    kept: Arc<Mutex<Kept>>,
    /// The last published change; the lock orders concurrent publishers. A publisher that
    /// panicked leaves the seq it reached, which is still true: a poisoned lock is used as is.
    published: Arc<Mutex<Published>>,
    head: Arc<watch::Sender<u64>>,
    database_up: Arc<watch::Sender<bool>>,
    /// How many times the copy was replaced ([`ChangeFeed::reset`]).
    epoch: Arc<watch::Sender<u64>>,
    /// Whether there is a ledger to serve: false only on a relay that has no copy yet.
    ready: Arc<watch::Sender<bool>>,
}

impl ChangeFeed {
    /// A feed at `head_seq` that keeps up to `capacity` changes, and at most about `max_bytes`
    /// of them, for subscribers that lag.
    pub fn new(head_seq: u64, capacity: usize, max_bytes: usize) -> Self {
        let (changes, _) = broadcast::channel(capacity.max(1));
        ChangeFeed {
            changes,
            kept: Arc::new(Mutex::new(Kept {
                changes: VecDeque::new(),
                bytes: 0,
                max_count: capacity.max(1),
                max_bytes,
            })),
            published: Arc::new(Mutex::new(Published {
                seq: head_seq,
                policies: None,
            })),
            head: Arc::new(watch::channel(head_seq).0),
            database_up: Arc::new(watch::channel(true).0),
            epoch: Arc::new(watch::channel(0).0),
            ready: Arc::new(watch::channel(true).0),
        }
    }

    /// The ledger holds `count` policies at the feed's head seq (counted in the same read as
    /// the head): from now on each published change moves the count, and the
    /// `ledger_policies` gauge shows it. Without it the gauge is left alone.
    pub fn set_policy_count(&self, count: u64) {
        let mut published = self.lock_published();
        published.policies = Some(count);
        metrics::policies(count);
    }

    fn lock_published(&self) -> std::sync::MutexGuard<'_, Published> {
        self.published
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishes committed `changes` (in seq order). Changes already published are skipped, and
    /// changes committed before them but not yet published (by another master) are read from
    /// `storage` and published first. Blocks while it reads.
    pub fn publish_committed(
        &self,
        storage: &dyn Storage,
        changes: impl IntoIterator<Item = Change>,
    ) -> Result<(), StorageError> {
        let mut published = self.lock_published();
        for change in changes {
            if change.seq <= published.seq {
                continue;
            }
            while change.seq > published.seq + 1 {
                // Only the changes in between, not a whole page past them.
                let wanted = (change.seq - published.seq - 1).min(PAGE as u64) as usize;
                let missing = storage.changes_after(published.seq, wanted)?;
                if missing.is_empty() {
                    return Err(StorageError::Corrupt(format!(
                        "change {} committed but changes after {} are missing",
                        change.seq, published.seq
                    )));
                }
                let before = published.seq;
                for missed in missing.into_iter().take_while(|c| c.seq < change.seq) {
                    self.send(&mut published, missed);
                }
                if published.seq == before {
                    // Nothing between: the log does not hold the changes in between (a copy
                    // replaced under the publisher). Looping would never end.
                    return Err(StorageError::Corrupt(format!(
                        "change {} committed but the changes after {before} are not in the change log",
                        change.seq
                    )));
                }
            }
            self.send(&mut published, change);
        }
        Ok(())
    }

    /// Publishes every change committed after the last published one (by another master, or
    /// while the database was out of reach). Returns the seq published last. Blocks.
    pub fn catch_up(&self, storage: &dyn Storage) -> Result<u64, StorageError> {
        loop {
            let after = self.lock_published().seq;
            let changes = storage.changes_after(after, PAGE)?;
            let full = changes.len() == PAGE;
            self.publish_committed(storage, changes)?;
            if !full {
                return Ok(self.lock_published().seq);
            }
        }
    }

    /// The copy the feed announces was replaced by a snapshot at `seq` of `policy_count`
    /// policies (a relay's, from its upstream): changes continue from `seq`, the streams of the
    /// old copy end (see [`ChangeFeed::watch_epoch`]) and its changes kept in memory go.
    pub fn reset(&self, seq: u64, policy_count: u64) {
        let mut published = self.lock_published();
        published.seq = seq;
        published.policies = Some(policy_count);
        {
            let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
            kept.changes.clear();
            kept.bytes = 0;
        }
        // Streams see the new epoch before any change of the new copy is announced: both are
        // sent under the publishing lock.
        self.epoch.send_modify(|epoch| *epoch += 1);
        self.head.send_replace(seq);
        metrics::head(seq);
        metrics::policies(policy_count);
    }

    fn send(&self, published: &mut Published, change: Change) {
        published.seq = change.seq;
        let seq = change.seq;
        metrics::head(seq);
        if let Some(count) = &mut published.policies {
            match change.kind {
                ChangeKind::Inserted(_) => *count += 1,
                ChangeKind::Deleted { .. } => *count = count.saturating_sub(1),
            }
            metrics::policies(*count);
        }
        let change = Arc::new(SharedChange::new(change));
        let announced = Announced {
            seq,
            change: Arc::downgrade(&change),
        };
        {
            let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
            kept.bytes += change.weight();
            kept.changes.push_back(change);
            // The newest change is always kept: the subscribers that are up to date take it
            // from memory.
            while kept.changes.len() > kept.max_count
                || (kept.bytes > kept.max_bytes && kept.changes.len() > 1)
            {
                if let Some(old) = kept.changes.pop_front() {
                    kept.bytes -= old.weight();
                }
            }
        }
        // An error only means that nobody listens right now, which is fine.
        let _ = self.changes.send(announced);
        self.head.send_replace(seq);
    }

    /// A receiver of every change published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Announced> {
        self.changes.subscribe()
    }

    /// The seq of the last published change.
    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// The seq of the last change sent to subscribers, read under the lock that publishing
    /// holds while it sends: a subscriber that joined ([`ChangeFeed::subscribe`]) before reading
    /// it gets every later change from the feed. ([`ChangeFeed::head`] moves just after the
    /// send, so it may still show the seq before a change the subscriber missed.)
    pub fn published_seq(&self) -> u64 {
        self.lock_published().seq
    }

    /// A watch of [`ChangeFeed::head`].
    pub fn watch_head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// How many subscribers listen now.
    pub fn subscriber_count(&self) -> usize {
        self.changes.receiver_count()
    }

    /// Records whether the database answers; streams end when it stops answering, so that their
    /// subscribers move to a master that can serve them.
    pub fn set_database_up(&self, up: bool) {
        metrics::database_up(up);
        self.database_up.send_replace(up);
    }

    /// Whether the database answered at the last check.
    pub fn database_up(&self) -> bool {
        *self.database_up.borrow()
    }

    /// A watch of [`ChangeFeed::database_up`].
    pub fn watch_database(&self) -> watch::Receiver<bool> {
        self.database_up.subscribe()
    }

    /// How many times the copy was replaced ([`ChangeFeed::reset`]); 0 on a master.
    pub fn epoch(&self) -> u64 {
        *self.epoch.borrow()
    }

    /// A watch of [`ChangeFeed::epoch`]: a stream that began in one epoch ends when it changes.
    pub fn watch_epoch(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    /// Records whether there is a ledger to serve. A relay that holds no copy yet says false
    /// until its upstream's first snapshot is in: it must not hand an empty ledger to members
    /// (whose files an empty snapshot would empty) or nodes.
    pub fn set_ready(&self, ready: bool) {
        self.ready.send_replace(ready);
    }

    /// Whether there is a ledger to serve (always on a master).
    pub fn ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// A watch of [`ChangeFeed::ready`].
    pub fn watch_ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ledger_storage::{DatabaseUrl, DieselStorage, StoredPolicy};

    fn inserted(seq: u64, bytes: usize) -> Change {
        Change {
            seq,
            kind: ChangeKind::Inserted(StoredPolicy {
                id: format!("id{seq}"),
                policy_type: "operator".into(),
                json: "x".repeat(bytes),
                seq,
            }),
        }
    }

    #[test]
    fn the_ring_keeps_changes_within_its_byte_budget() {
        let dir = tempfile::tempdir().unwrap();
        let url: DatabaseUrl = format!("sqlite://{}", dir.path().join("l.db").display())
            .parse()
            .unwrap();
        // Consecutive seqs never make the feed read the storage; it is only there to satisfy
        // the signature.
        let storage = DieselStorage::open(&url, 2).unwrap();
        let feed = ChangeFeed::new(0, 100, 3 << 20);
        let mut ring = feed.subscribe();
        feed.publish_committed(&storage, (1..=10).map(|seq| inserted(seq, 1 << 20)))
            .unwrap();
        let announced: Vec<Announced> = (0..10).map(|_| ring.try_recv().unwrap()).collect();
        let alive: Vec<u64> = announced
            .iter()
            .filter(|a| a.change.upgrade().is_some())
            .map(|a| a.seq)
            .collect();
        // 1 MiB of text weighs about 2 MiB: one fits into 3 MiB, and the newest always stays.
        assert_eq!(alive, vec![10], "only the newest change is kept in memory");
        // Small changes are all kept, up to the ring's count.
        feed.publish_committed(&storage, (11..=60).map(|seq| inserted(seq, 100)))
            .unwrap();
        let alive = (0..50)
            .filter(|_| ring.try_recv().unwrap().change.upgrade().is_some())
            .count();
        assert_eq!(alive, 50);
    }
}
