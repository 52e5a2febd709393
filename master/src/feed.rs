//! The change feed: fans every committed change out to the live subscribers.
//!
//! One bounded broadcast ring holds the recent changes, each shared by every subscriber through
//! an `Arc`, so memory does not grow with slow subscribers: a subscriber that falls more than the
//! ring's capacity behind is told so by the ring and dropped (see [`crate::subscription`]).

use std::sync::Arc;

use tokio::sync::{broadcast, watch};

use crate::storage::Change;

/// The fan-out hub of committed changes. Cloning gives another handle to the same feed.
#[derive(Clone)]
pub struct ChangeFeed {
    changes: broadcast::Sender<Arc<Change>>,
    head: Arc<watch::Sender<u64>>,
}

impl ChangeFeed {
    /// A feed at `head_seq` that keeps up to `capacity` changes for subscribers that lag.
    pub fn new(head_seq: u64, capacity: usize) -> Self {
        let (changes, _) = broadcast::channel(capacity.max(1));
        let (head, _) = watch::channel(head_seq);
        ChangeFeed {
            changes,
            head: Arc::new(head),
        }
    }

    /// Publishes a committed change. Changes must be published in seq order, each once.
    pub fn publish(&self, change: Change) {
        let seq = change.seq;
        // An error only means that nobody listens right now, which is fine.
        let _ = self.changes.send(Arc::new(change));
        self.head.send_if_modified(|head| {
            let advanced = seq > *head;
            if advanced {
                *head = seq;
            }
            advanced
        });
    }

    /// A receiver of every change published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.changes.subscribe()
    }

    /// The seq of the last published change.
    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// How many subscribers listen now.
    pub fn subscriber_count(&self) -> usize {
        self.changes.receiver_count()
    }
}
