//! [`DieselStorage`]: the ledger in SQLite or PostgreSQL through diesel.
//!
//! Both backends share every query through diesel's `MultiConnection`; the only backend-specific
//! code opens connections, applies the migrations, sets the snapshot isolation and takes
//! PostgreSQL's one-statement path for a batch of inserts.
//!
//! One module per job: `url` (where the ledger lives, and one connection to it), `pool` (the
//! connections: the pool, the one writes keep, the health check's), `migrate`, `write`
//! ([`Storage::apply`]), `read`, `replicate` (changes committed elsewhere, and pruning), with the
//! rows they share in `rows`; `wal` fills a new SQLite WAL to its full size; `plans` is a
//! diagnostic for the storage suite. This module assembles them: [`DieselStorage::open`] and the
//! [`Storage`] implementation, which picks the connection for each call.

use std::sync::Mutex;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::Pool;

use crate::{
    Bounds, ChainPosition, Change, Rejection, SnapshotPart, Storage, StorageError, StoredPolicy,
    WriteOp,
};

mod deadline;
mod migrate;
mod plans;
mod pool;
mod read;
mod replicate;
mod rows;
mod url;
mod wal;
mod write;

pub use url::{DatabaseUrl, PgTimeouts, redact_secrets};
pub use write::NOTIFY_CHANNEL;

use deadline::Link;
use pool::{Connector, Manager, WriteConnection};

/// A connection to either backend; queries written once run on both.
#[derive(diesel::MultiConnection)]
pub enum AnyConnection {
    /// PostgreSQL, for production and for several masters on one database.
    Postgres(PgConnection),
    /// SQLite, the embedded default.
    Sqlite(SqliteConnection),
}

/// The ledger in SQLite or PostgreSQL.
pub struct DieselStorage {
    pool: Pool<Manager>,
    url: DatabaseUrl,
    /// Kept for [`Storage::apply`]: one writer thread makes every write, one after the other.
    writes: Mutex<Option<WriteConnection>>,
    /// Kept for [`Storage::check`], outside the pool: the health check must not wait behind
    /// calls that hold every pooled connection.
    health: Mutex<Option<Link>>,
    /// Opens every connection: the pool's, the health check's.
    connector: Connector,
    timeouts: CallTimeouts,
}

/// How long a call waits for the database before it is cut off (PostgreSQL over TCP; see
/// `deadline`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallTimeouts {
    /// A write transaction, and the liveness check of a connection taken from the pool. A
    /// write cut off may have been committed: it fails as [`StorageError::OutcomeUnknown`].
    pub write: Duration,
    /// Each read statement (a snapshot's pages each get it; the wait for its reader does not
    /// count).
    pub read: Duration,
    /// The health check ([`Storage::check`]). When it fails, every call still waiting on a
    /// connection opened before it is cut off at once.
    pub check: Duration,
}

impl Default for CallTimeouts {
    fn default() -> Self {
        CallTimeouts {
            write: Duration::from_secs(5),
            read: Duration::from_secs(10),
            check: Duration::from_secs(2),
        }
    }
}

/// How [`DieselStorage::open_with`] opens the storage.
#[derive(Debug, Clone, Copy)]
pub struct StorageOptions {
    /// The most connections for reads; writes and the health check keep one each.
    pub pool_size: u32,
    /// How long a call waits for a free connection before it fails as unavailable.
    pub connection_wait: Duration,
    /// How long calls wait for the database.
    pub timeouts: CallTimeouts,
}

impl DieselStorage {
    /// Connects to `url`, applies the pending migrations and keeps a pool of up to `pool_size`
    /// connections for reads, plus the one writes keep; a call waits up to 10 s for a connection,
    /// and calls have the default deadlines.
    pub fn open(url: &DatabaseUrl, pool_size: u32) -> Result<Self, StorageError> {
        Self::open_with(
            url,
            &StorageOptions {
                pool_size,
                connection_wait: Duration::from_secs(10),
                timeouts: CallTimeouts::default(),
            },
        )
    }

    /// [`DieselStorage::open`] with every option given.
    pub fn open_with(url: &DatabaseUrl, options: &StorageOptions) -> Result<Self, StorageError> {
        if let DatabaseUrl::Sqlite(path) = url {
            let mut conn = url
                .connect(None)
                .map_err(|e| StorageError::Unavailable(format!("{}: {e}", path.display())))?;
            // WAL lets readers (streams, queries) run beside the writer; it is a property of
            // the file, so setting it once is enough. The page size takes effect only in a new
            // file, and must come first: the file is created in the page size of that moment.
            conn.batch_execute(&format!(
                "PRAGMA page_size = {}; PRAGMA journal_mode = WAL;",
                url::SQLITE_NEW_PAGE_SIZE
            ))?;
        }
        let connector = Connector::new(url);
        let pool = pool::build(
            &connector,
            options.pool_size,
            options.connection_wait,
            options.timeouts.write,
        )?;
        let storage = DieselStorage {
            pool,
            url: url.clone(),
            writes: Mutex::new(None),
            health: Mutex::new(None),
            connector,
            timeouts: options.timeouts,
        };
        storage.migrate()?;
        // The health check's connection is opened now, with the pool's: a database that takes
        // no new connection later (a connection limit reached, a failover in progress) must not
        // fail a check that the connections already open would pass.
        storage.check()?;
        if let DatabaseUrl::Sqlite(path) = url {
            storage.presize_wal(path);
        }
        Ok(storage)
    }

    /// Fills an empty SQLite WAL to its full size on the connection writes keep, which stays
    /// open (see [`wal`]); says so in the log, and why not when it cannot.
    fn presize_wal(&self, path: &std::path::Path) {
        match self.with_write_connection(|conn| wal::presize(conn, path)) {
            Ok(wal::Presized::Filled(bytes)) => tracing::info!(
                database = %path.display(),
                bytes,
                "WAL pre-sized: commits write inside it instead of growing the file"
            ),
            Ok(wal::Presized::AlreadyFull(bytes)) => {
                tracing::debug!(database = %path.display(), bytes, "WAL already at full size")
            }
            Ok(wal::Presized::Skipped(reason)) => {
                tracing::info!(database = %path.display(), "WAL not pre-sized: {reason}")
            }
            Err(e) => tracing::warn!(database = %path.display(), "WAL not pre-sized: {e}"),
        }
    }

    /// The database this storage uses, without credentials.
    pub fn url(&self) -> &DatabaseUrl {
        &self.url
    }
}

impl Storage for DieselStorage {
    fn apply(&self, ops: &[WriteOp]) -> Result<Vec<Result<Change, Rejection>>, StorageError> {
        self.with_write_connection(|conn| write::apply(conn, ops))
    }

    fn get(&self, id: &str) -> Result<Option<StoredPolicy>, StorageError> {
        self.read(|c| read::get(c, id))
    }

    fn list(
        &self,
        policy_type: Option<&str>,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredPolicy>, StorageError> {
        self.read(|c| read::list(c, policy_type, after_seq, limit))
    }

    fn changes_after(&self, after_seq: u64, limit: usize) -> Result<Vec<Change>, StorageError> {
        self.read(|c| read::changes_after(c, after_seq, limit))
    }

    fn bounds(&self) -> Result<Bounds, StorageError> {
        self.read(rows::read_bounds)
    }

    fn check(&self) -> Result<Bounds, StorageError> {
        self.check_health()
    }

    fn pool_usage(&self) -> Option<(u32, u32)> {
        self.usage()
    }

    fn is_embedded(&self) -> bool {
        matches!(self.url, DatabaseUrl::Sqlite(_))
    }

    fn policy_count(&self) -> Result<u64, StorageError> {
        self.read(read::policy_count)
    }

    fn snapshot(
        &self,
        page_size: usize,
        sink: &mut dyn FnMut(SnapshotPart) -> bool,
    ) -> Result<(), StorageError> {
        self.conn()?
            .call_pausing(self.timeouts.read, StorageError::Unavailable, |c, armed| {
                read::snapshot(c, page_size, &mut |part| armed.paused(|| sink(part)))
            })
    }

    fn replicate(&self, changes: &[Change]) -> Result<(), StorageError> {
        self.conn()?
            .call(self.timeouts.write, StorageError::OutcomeUnknown, |c| {
                replicate::replicate(c, changes)
            })
    }

    fn replace(&self, seq: u64, policies: &[StoredPolicy]) -> Result<(), StorageError> {
        // Without a deadline: a whole ledger may take longer than any statement should.
        replicate::replace(self.conn()?.conn(), seq, policies)
    }

    fn chain_position(&self) -> Result<Option<ChainPosition>, StorageError> {
        self.read(replicate::chain_position)
    }

    fn set_chain_position(&self, position: &ChainPosition) -> Result<(), StorageError> {
        self.conn()?
            .call(self.timeouts.write, StorageError::OutcomeUnknown, |c| {
                replicate::set_chain_position(c, position)
            })
    }

    fn prune_changes(&self, through_seq: u64) -> Result<(), StorageError> {
        self.conn()?
            .call(self.timeouts.read, StorageError::Unavailable, |c| {
                replicate::prune_changes(c, through_seq)
            })
    }
}
