//! The change feed: fans every committed change out to the live subscribers, in seq order.
//!
//! One bounded broadcast ring holds the recent changes, each shared by every subscriber through
//! an `Arc`, so memory does not grow with slow subscribers: a subscriber that falls more than the
//! ring's capacity behind is told so by the ring and dropped (see [`crate::subscription`]).
//! A [`SharedChange`] also keeps the change's wire encoding once a subscriber made it, so a
//! change is encoded once, not once per subscriber.
//!
//! Changes reach the feed from this master's writer and, when several masters share one
//! database, from the database's notifications; [`ChangeFeed::publish_committed`] orders both,
//! reading from the storage whatever was committed in between, so the ring never holds a gap.

use std::ops::Deref;
use std::sync::{Arc, Mutex, OnceLock};

use prost::bytes::Bytes;
use tokio::sync::{broadcast, watch};

use crate::metrics;
use crate::storage::{Change, ChangeKind, Storage, StorageError};

/// Changes read from the storage per query when filling a gap.
const FILL_PAGE: usize = 1000;

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

/// The fan-out hub of committed changes. Cloning gives another handle to the same feed.
#[derive(Clone)]
pub struct ChangeFeed {
    changes: broadcast::Sender<Arc<SharedChange>>,
    /// The seq of the last published change; the lock orders concurrent publishers.
    published: Arc<Mutex<u64>>,
    head: Arc<watch::Sender<u64>>,
    database_up: Arc<watch::Sender<bool>>,
}

impl ChangeFeed {
    /// A feed at `head_seq` that keeps up to `capacity` changes for subscribers that lag.
    pub fn new(head_seq: u64, capacity: usize) -> Self {
        let (changes, _) = broadcast::channel(capacity.max(1));
        ChangeFeed {
            changes,
            published: Arc::new(Mutex::new(head_seq)),
            head: Arc::new(watch::channel(head_seq).0),
            database_up: Arc::new(watch::channel(true).0),
        }
    }

    /// Publishes committed `changes` (in seq order). Changes already published are skipped, and
    /// changes committed before them but not yet published (by another master) are read from
    /// `storage` and published first. Blocks while it reads.
    pub fn publish_committed(
        &self,
        storage: &dyn Storage,
        changes: impl IntoIterator<Item = Change>,
    ) -> Result<(), StorageError> {
        let mut published = self.published.lock().expect("feed lock");
        for change in changes {
            if change.seq <= *published {
                continue;
            }
            while change.seq > *published + 1 {
                let missing = storage.changes_after(*published, FILL_PAGE)?;
                if missing.is_empty() {
                    return Err(StorageError::Corrupt(format!(
                        "change {} committed but changes after {} are missing",
                        change.seq, *published
                    )));
                }
                for missed in missing.into_iter().take_while(|c| c.seq < change.seq) {
                    self.send(&mut published, missed);
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
            let after = *self.published.lock().expect("feed lock");
            let changes = storage.changes_after(after, FILL_PAGE)?;
            let full = changes.len() == FILL_PAGE;
            self.publish_committed(storage, changes)?;
            if !full {
                return Ok(*self.published.lock().expect("feed lock"));
            }
        }
    }

    fn send(&self, published: &mut u64, change: Change) {
        *published = change.seq;
        let seq = change.seq;
        metrics::head(seq);
        metrics::policies_changed(match change.kind {
            ChangeKind::Inserted(_) => 1.0,
            ChangeKind::Deleted { .. } => -1.0,
        });
        // An error only means that nobody listens right now, which is fine.
        let _ = self.changes.send(Arc::new(SharedChange::new(change)));
        self.head.send_replace(seq);
    }

    /// A receiver of every change published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<SharedChange>> {
        self.changes.subscribe()
    }

    /// The seq of the last published change.
    pub fn head(&self) -> u64 {
        *self.head.borrow()
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
}
