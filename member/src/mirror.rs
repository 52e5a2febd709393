//! A relay's mirror: a copy of the master's ledger in a database of the master's own schema
//! (SQLite beside the ledger file by default), with the master's seqs, so that the master's
//! code can serve it to the members below.
//!
//! The mirror is written only after the ledger file made the same changes durable, so it is
//! never ahead of the file; after a crash between the two writes it is behind, and the relay
//! subscribes from the mirror's head (see [`crate::relay`]).

use std::sync::Arc;

use ledger_server::feed::ChangeFeed;
use ledger_storage::{Change, DatabaseUrl, DieselStorage, Storage, StorageError, StoredPolicy};

/// Database connections of the mirror: one writer (the sync loop) and a few readers (the
/// streams and queries of the members below).
const POOL_SIZE: u32 = 8;

/// The relay's copy of the ledger.
pub struct Mirror {
    storage: Arc<dyn Storage>,
    url: DatabaseUrl,
    /// The seq of the last change the mirror holds, as last read or written.
    head: u64,
}

impl Mirror {
    /// Opens (creating and migrating if needed) the mirror at `url`.
    pub async fn open(url: &DatabaseUrl) -> Result<Mirror, StorageError> {
        let target = url.clone();
        let storage: Arc<dyn Storage> =
            Arc::new(run(move || DieselStorage::open(&target, POOL_SIZE)).await?);
        let reader = storage.clone();
        let head = run(move || reader.bounds()).await?.head_seq;
        tracing::info!(database = %url, head_seq = head, "opened the relay's mirror");
        Ok(Mirror {
            storage,
            url: url.clone(),
            head,
        })
    }

    /// The seq of the last change the mirror holds.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// The mirror's storage, which the relay serves from.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Where the mirror lives.
    pub fn url(&self) -> &DatabaseUrl {
        &self.url
    }

    /// Stores `changes` (the first must be the head's next) in one transaction, then publishes
    /// them to `feed` for the members below.
    pub async fn append(
        &mut self,
        changes: Vec<Change>,
        feed: Option<ChangeFeed>,
    ) -> Result<(), StorageError> {
        let Some(last) = changes.last().map(|change| change.seq) else {
            return Ok(());
        };
        let storage = self.storage.clone();
        run(move || {
            storage.replicate(&changes)?;
            match feed {
                Some(feed) => feed.publish_committed(&*storage, changes),
                None => Ok(()),
            }
        })
        .await?;
        self.head = last;
        Ok(())
    }

    /// Replaces the whole mirror with a snapshot at `seq`, in one transaction. Nothing before
    /// `seq` is replayable from it afterwards, so members below that are behind get a snapshot.
    pub async fn replace(
        &mut self,
        seq: u64,
        policies: Vec<StoredPolicy>,
    ) -> Result<(), StorageError> {
        let storage = self.storage.clone();
        run(move || storage.replace(seq, &policies)).await?;
        self.head = seq;
        Ok(())
    }

    /// Reads the head again, after a failed write whose outcome is unknown.
    pub async fn reload_head(&mut self) -> Result<u64, StorageError> {
        let storage = self.storage.clone();
        self.head = run(move || storage.bounds()).await?.head_seq;
        Ok(self.head)
    }
}

/// Runs a blocking storage call on the blocking pool.
async fn run<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::Failed(format!("mirror task failed: {e}")))?
}
