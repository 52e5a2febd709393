//! [`DieselStorage`]: the ledger in SQLite or PostgreSQL through diesel.
//!
//! Both backends share every query through diesel's `MultiConnection`; the only backend-specific
//! code opens connections, applies the migrations, sets the snapshot isolation and takes
//! PostgreSQL's one-statement path for a batch of inserts.
//!
//! One module per job: `url` (where the ledger lives, and one connection to it), `pool` (the
//! connections: the pool, the one writes keep, the health check's), `migrate`, `write`
//! ([`Storage::apply`]), `read`, `replicate` (changes committed elsewhere, and pruning), with the
//! rows they share in `rows`; `plans` is a diagnostic for the storage suite. This module assembles
//! them: [`DieselStorage::open`] and the [`Storage`] implementation, which picks the connection
//! for each call.

use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::Pool;

use crate::{
    Bounds, Change, Rejection, SnapshotPart, Storage, StorageError, StoredPolicy, WriteOp,
};

mod migrate;
mod plans;
mod pool;
mod read;
mod replicate;
mod rows;
mod url;
mod write;

pub use url::{DatabaseUrl, redact_secrets};
pub use write::NOTIFY_CHANNEL;

use pool::{Manager, WriteConnection};

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
    health: Mutex<Option<AnyConnection>>,
    /// Set when a check failed: the database may have ended every connection since the last
    /// write, so the connection kept for writes is checked before it is trusted again.
    writes_suspect: AtomicBool,
}

impl DieselStorage {
    /// Connects to `url`, applies the pending migrations and keeps a pool of up to `pool_size`
    /// connections for reads, plus the one writes keep; a call waits up to 10 s for a connection.
    pub fn open(url: &DatabaseUrl, pool_size: u32) -> Result<Self, StorageError> {
        Self::open_with_timeout(url, pool_size, Duration::from_secs(10))
    }

    /// [`DieselStorage::open`], with calls waiting up to `timeout` for a connection before they
    /// fail as unavailable.
    pub fn open_with_timeout(
        url: &DatabaseUrl,
        pool_size: u32,
        timeout: Duration,
    ) -> Result<Self, StorageError> {
        if let DatabaseUrl::Sqlite(path) = url {
            let mut conn = url
                .connect()
                .map_err(|e| StorageError::Unavailable(format!("{}: {e}", path.display())))?;
            // WAL lets readers (streams, queries) run beside the writer; it is a property of
            // the file, so setting it once is enough. The page size takes effect only in a new
            // file, and must come first: the file is created in the page size of that moment.
            conn.batch_execute(&format!(
                "PRAGMA page_size = {}; PRAGMA journal_mode = WAL;",
                url::SQLITE_NEW_PAGE_SIZE
            ))?;
        }
        let pool = pool::build(url, pool_size, timeout)?;
        let storage = DieselStorage {
            pool,
            url: url.clone(),
            writes: Mutex::new(None),
            health: Mutex::new(None),
            writes_suspect: AtomicBool::new(false),
        };
        storage.migrate()?;
        // The health check's connection is opened now, with the pool's: a database that takes
        // no new connection later (a connection limit reached, a failover in progress) must not
        // fail a check that the connections already open would pass.
        storage.check()?;
        Ok(storage)
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
        read::get(&mut *self.conn()?, id)
    }

    fn list(
        &self,
        policy_type: Option<&str>,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredPolicy>, StorageError> {
        read::list(&mut *self.conn()?, policy_type, after_seq, limit)
    }

    fn changes_after(&self, after_seq: u64, limit: usize) -> Result<Vec<Change>, StorageError> {
        read::changes_after(&mut *self.conn()?, after_seq, limit)
    }

    fn bounds(&self) -> Result<Bounds, StorageError> {
        rows::read_bounds(&mut *self.conn()?)
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
        read::policy_count(&mut *self.conn()?)
    }

    fn snapshot(
        &self,
        page_size: usize,
        sink: &mut dyn FnMut(SnapshotPart) -> bool,
    ) -> Result<(), StorageError> {
        read::snapshot(&mut *self.conn()?, page_size, sink)
    }

    fn replicate(&self, changes: &[Change]) -> Result<(), StorageError> {
        replicate::replicate(&mut *self.conn()?, changes)
    }

    fn replace(&self, seq: u64, policies: &[StoredPolicy]) -> Result<(), StorageError> {
        replicate::replace(&mut *self.conn()?, seq, policies)
    }

    fn prune_changes(&self, through_seq: u64) -> Result<(), StorageError> {
        replicate::prune_changes(&mut *self.conn()?, through_seq)
    }
}
