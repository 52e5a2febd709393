//! The connections: an r2d2 pool for reads, the pool connection that writes keep between calls
//! (one writer thread makes every write), and a connection outside the pool for the health
//! check, so that a pool whose connections are all taken is busy, not down.

use std::sync::PoisonError;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::r2d2::{ManageConnection, Pool, PooledConnection};

use super::rows::read_bounds;
use super::{AnyConnection, DatabaseUrl, DieselStorage};
use crate::{Bounds, StorageError};

/// Opens connections for the r2d2 pool by the parsed URL: diesel's own manager would try every
/// backend in turn, and SQLite accepts any string as a file name.
pub(super) struct Manager(DatabaseUrl);

impl ManageConnection for Manager {
    type Connection = AnyConnection;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<AnyConnection, Self::Error> {
        self.0.connect()
    }

    fn is_valid(&self, conn: &mut AnyConnection) -> Result<(), Self::Error> {
        check_alive(conn).map_err(diesel::r2d2::Error::QueryError)
    }

    fn has_broken(&self, conn: &mut AnyConnection) -> bool {
        diesel::r2d2::R2D2Connection::is_broken(conn)
    }
}

/// diesel cannot tell a connection whose socket died until a query fails on it: ask.
fn check_alive(conn: &mut AnyConnection) -> Result<(), diesel::result::Error> {
    conn.batch_execute("SELECT 1")
}

/// The pool's connection that writes keep between calls, and when it last served one.
pub(super) struct WriteConnection {
    pub(super) conn: PooledConnection<Manager>,
    used: Instant,
}

/// A write connection that served a write this recently is used without the liveness query
/// that the pool runs on every checkout: on PostgreSQL that query is a round trip, beside the
/// one statement of an insert. An older one is checked first, as the database may have
/// restarted meanwhile (HikariCP skips its check for 500 ms the same way).
const WRITE_CONNECTION_TRUSTED_FOR: Duration = Duration::from_millis(500);

/// The pool for `url`: up to `pool_size` connections for reads plus the one writes keep; a call
/// waits up to `timeout` for one.
pub(super) fn build(
    url: &DatabaseUrl,
    pool_size: u32,
    timeout: Duration,
) -> Result<Pool<Manager>, StorageError> {
    Pool::builder()
        // One more than asked: writes keep theirs, and a slow snapshot holding a read
        // connection must still leave one for the other reads (and the health check).
        .max_size(pool_size.max(2) + 1)
        .min_idle(Some(1))
        .connection_timeout(timeout)
        .build(Manager(url.clone()))
        .map_err(|e| StorageError::Unavailable(format!("{url}: {e}")))
}

impl DieselStorage {
    /// Runs `write` on the connection kept for writes: reused while it keeps succeeding,
    /// given back to the pool after an error (the pool checks it before anyone reuses it).
    pub(super) fn with_write_connection<T>(
        &self,
        write: impl FnOnce(&mut AnyConnection) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        let mut kept = self.writes.lock().unwrap_or_else(PoisonError::into_inner);
        let suspect = self.writes_suspect.swap(false, Ordering::Relaxed);
        let reusable = kept.take().and_then(|mut w| {
            let trusted = !suspect && w.used.elapsed() < WRITE_CONNECTION_TRUSTED_FOR;
            let alive = trusted || check_alive(&mut w.conn).is_ok();
            alive.then_some(w.conn)
        });
        let mut conn = match reusable {
            Some(conn) => conn,
            None => self.conn()?,
        };
        let result = write(&mut conn);
        if result.is_ok() {
            *kept = Some(WriteConnection {
                conn,
                used: Instant::now(),
            });
        }
        result
    }

    /// A connection of the pool; when none is free for the whole wait, busy (every one in
    /// use) or unavailable (the database does not answer).
    pub(super) fn conn(&self) -> Result<PooledConnection<Manager>, StorageError> {
        self.pool.get().map_err(|e| {
            let state = self.pool.state();
            if state.connections == self.pool.max_size() && state.idle_connections == 0 {
                StorageError::Busy(format!(
                    "all {} connections to {} stayed in use for {:?}",
                    state.connections,
                    self.url,
                    self.pool.connection_timeout()
                ))
            } else {
                StorageError::Unavailable(format!("{}: {e}", self.url))
            }
        })
    }

    /// [`Storage::check`](crate::Storage::check): [`Storage::bounds`](crate::Storage::bounds) on the connection kept for the health check,
    /// outside the pool. A failed check makes the write connection suspect.
    pub(super) fn check_health(&self) -> Result<Bounds, StorageError> {
        // A check still waiting for the database (the watch gave up on it) holds the lock: the
        // database has not answered it, so it does not answer this one either.
        let mut kept = self.health.try_lock().map_err(|_| {
            StorageError::Unavailable(format!("{}: the previous check has not answered", self.url))
        })?;
        let checked = match kept.take() {
            Some(conn) => Ok(conn),
            None => self
                .url
                .connect()
                .map_err(|e| StorageError::Unavailable(format!("{}: {e}", self.url))),
        }
        .and_then(|mut conn| {
            // A connection that failed is dropped: the next check opens a new one.
            let bounds = read_bounds(&mut conn)?;
            *kept = Some(conn);
            Ok(bounds)
        });
        if checked.is_err() {
            self.writes_suspect.store(true, Ordering::Relaxed);
        }
        checked
    }

    /// [`Storage::pool_usage`](crate::Storage::pool_usage): connections in use, and the most the pool opens.
    pub(super) fn usage(&self) -> Option<(u32, u32)> {
        let state = self.pool.state();
        Some((
            state.connections - state.idle_connections,
            self.pool.max_size(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use diesel::prelude::*;

    use super::*;

    #[derive(QueryableByName)]
    struct Setting {
        #[diesel(sql_type = diesel::sql_types::Text)]
        value: String,
    }

    fn setting(c: &mut AnyConnection, pragma: &str) -> String {
        diesel::sql_query(format!(
            "SELECT CAST(\"{pragma}\" AS TEXT) AS value FROM pragma_{pragma}"
        ))
        .get_result::<Setting>(c)
        .unwrap_or_else(|e| panic!("PRAGMA {pragma}: {e}"))
        .value
    }

    #[derive(QueryableByName)]
    struct CompileOption {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        used: i32,
    }

    #[derive(QueryableByName)]
    struct PageSize {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        page_size: i32,
    }

    #[derive(QueryableByName)]
    struct Checkpoint {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        wal_autocheckpoint: i32,
    }

    /// Every pooled SQLite connection, not only the first, commits with a WAL fsync, checkpoints
    /// rarely and keeps temporary data in memory.
    #[test]
    fn every_sqlite_connection_is_durable_and_checkpoints_rarely() {
        let dir = tempfile::tempdir().unwrap();
        let url: DatabaseUrl = format!("sqlite://{}", dir.path().join("ledger.db").display())
            .parse()
            .unwrap();
        let storage = DieselStorage::open(&url, 3).unwrap();
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut c = storage.conn().unwrap();
            assert_eq!(setting(&mut c, "journal_mode"), "wal");
            assert_eq!(setting(&mut c, "synchronous"), "2", "2 is FULL");
            // Not a table-valued pragma: it has a side effect when given a value.
            let checkpoint = diesel::sql_query("PRAGMA wal_autocheckpoint")
                .get_result::<Checkpoint>(&mut *c)
                .unwrap();
            // A new ledger has pages of 1 KiB: 40 MiB of them.
            assert_eq!(checkpoint.wal_autocheckpoint, 40_960);
            let page = diesel::sql_query("PRAGMA page_size")
                .get_result::<PageSize>(&mut *c)
                .unwrap();
            assert_eq!(page.page_size, 1024);
            // Built with the flags of `.cargo/config.toml` (a build from outside the workspace
            // would miss them): statements stay prepared.
            let qpsg = diesel::sql_query("SELECT sqlite_compileoption_used('ENABLE_QPSG') AS used")
                .get_result::<CompileOption>(&mut *c)
                .unwrap();
            assert_eq!(qpsg.used, 1, "SQLite built without SQLITE_ENABLE_QPSG");
            assert_eq!(setting(&mut c, "temp_store"), "2", "2 is MEMORY");
            held.push(c);
        }
    }
}
