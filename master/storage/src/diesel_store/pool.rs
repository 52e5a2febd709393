//! The connections: an r2d2 pool for reads, the pool connection that writes keep between calls
//! (one writer thread makes every write), and a connection outside the pool for the health
//! check, so that a pool whose connections are all taken is busy, not down. Every call runs
//! within a deadline (see `deadline`): `--write-timeout` for writes and the health check,
//! `--read-timeout` for each read statement.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ManageConnection, Pool, PooledConnection};

use super::deadline::{Epoch, Link, Socket, moment};
use super::rows::read_bounds;
use super::{AnyConnection, DatabaseUrl, DieselStorage, redact_secrets};
use crate::{Bounds, StorageError};

/// Opens connections for the r2d2 pool by the parsed URL: diesel's own manager would try every
/// backend in turn, and SQLite accepts any string as a file name.
pub(super) struct Manager {
    connector: Connector,
    /// The deadline of the liveness check a connection passes when taken from the pool.
    check_within: Duration,
}

impl ManageConnection for Manager {
    type Connection = Link;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<Link, Self::Error> {
        self.connector.open()
    }

    fn is_valid(&self, link: &mut Link) -> Result<(), Self::Error> {
        if link.is_stale() {
            return Err(diesel::r2d2::Error::ConnectionError(
                diesel::ConnectionError::BadConnection(STALE.into()),
            ));
        }
        link.call(self.check_within, StorageError::Unavailable, |c| {
            check_alive(c).map_err(StorageError::from)
        })
        .map_err(|e| match e {
            StorageError::Query(e) => diesel::r2d2::Error::QueryError(e),
            other => diesel::r2d2::Error::ConnectionError(diesel::ConnectionError::BadConnection(
                other.to_string(),
            )),
        })
    }

    fn has_broken(&self, link: &mut Link) -> bool {
        link.is_stale() || diesel::r2d2::R2D2Connection::is_broken(link.conn())
    }
}

/// Why a connection is not used again: see [`Link::is_stale`].
const STALE: &str = "opened before the database last failed to answer: replaced by a new one";

/// Logs what the pool's connections fail with (r2d2's own handler logs every failure as an
/// error, a replaced stale connection too): a connection that cannot be made or fails its check
/// at checkout is a warning, one replaced as stale a debug line.
#[derive(Debug)]
struct LogPoolErrors;

impl diesel::r2d2::HandleError<diesel::r2d2::Error> for LogPoolErrors {
    fn handle_error(&self, error: diesel::r2d2::Error) {
        let text = error.to_string();
        if text.contains(STALE) {
            tracing::debug!(error = %text, "database connection replaced");
        } else {
            tracing::warn!(error = %redact_secrets(&text), "database connection failed");
        }
    }
}

/// Opens the storage's connections: the URL, the [`Epoch`] they are trusted in, and, with
/// several PostgreSQL hosts, the one that took the last connection, tried first by the next:
/// after a failover, libpq would otherwise try the old primary first every time, and a frozen
/// one costs every new connection its whole `connect_timeout`.
#[derive(Clone)]
pub(super) struct Connector {
    pub(super) url: DatabaseUrl,
    pub(super) epoch: Epoch,
    /// The URL's host (from 1) that took the last connection; 0 for none known.
    last_host: Arc<AtomicUsize>,
}

impl Connector {
    pub(super) fn new(url: &DatabaseUrl) -> Connector {
        Connector {
            url: url.clone(),
            epoch: Epoch::default(),
            last_host: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Opens a connection; on PostgreSQL over TCP, with its socket, so that its calls can be cut
    /// off at their deadlines.
    pub(super) fn open(&self) -> Result<Link, diesel::r2d2::Error> {
        let first = self.last_host.load(Ordering::Relaxed).checked_sub(1);
        let link = open_link(&self.url, &self.epoch, first)?;
        if let Some(host) = link
            .socket()
            .and_then(|s| s.peer())
            .and_then(|peer| self.url.host_at(peer))
        {
            self.last_host.store(host + 1, Ordering::Relaxed);
        }
        Ok(link)
    }
}

/// Opens a connection to `url` in `epoch`, trying host number `first` first.
fn open_link(
    url: &DatabaseUrl,
    epoch: &Epoch,
    first: Option<usize>,
) -> Result<Link, diesel::r2d2::Error> {
    let opened = moment();
    let mut conn = url.connect(first)?;
    let socket = match &mut conn {
        AnyConnection::Postgres(pg) => {
            #[derive(QueryableByName)]
            struct Ports {
                #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Integer>)]
                local: Option<i32>,
                #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Integer>)]
                remote: Option<i32>,
            }
            // As the server sees the connection; both NULL over a Unix socket.
            let ports = diesel::sql_query(
                "SELECT inet_client_port() AS local, inet_server_port() AS remote",
            )
            .get_result::<Ports>(pg)
            .map_err(diesel::r2d2::Error::QueryError)?;
            match (ports.local, ports.remote) {
                (Some(local), Some(remote)) => {
                    let socket = Socket::find(local as u16, remote as u16);
                    if socket.is_none() {
                        tracing::warn!(
                            local,
                            remote,
                            "cannot find this PostgreSQL connection's socket: its calls run without a deadline"
                        );
                    }
                    socket
                }
                _ => None,
            }
        }
        AnyConnection::Sqlite(_) => None,
    };
    Ok(Link::new(conn, socket, opened, epoch))
}

/// diesel cannot tell a connection whose socket died until a query fails on it: ask.
fn check_alive(conn: &mut AnyConnection) -> Result<(), diesel::result::Error> {
    conn.batch_execute("SELECT 1")
}

/// The pool's connection that writes keep between calls, and when it last served one.
pub(super) struct WriteConnection {
    pub(super) link: PooledConnection<Manager>,
    used: Instant,
}

/// A write connection that served a write this recently is used without the liveness query
/// that the pool runs on every checkout: on PostgreSQL that query is a round trip, beside the
/// one statement of an insert. An older one is checked first, as the database may have
/// restarted meanwhile (HikariCP skips its check for 500 ms the same way).
const WRITE_CONNECTION_TRUSTED_FOR: Duration = Duration::from_millis(500);

/// The pool for `url`: up to `pool_size` connections for reads plus the one writes keep; a call
/// waits up to `timeout` for one. A connection taken from the pool is checked within
/// `check_within`.
pub(super) fn build(
    connector: &Connector,
    pool_size: u32,
    timeout: Duration,
    check_within: Duration,
) -> Result<Pool<Manager>, StorageError> {
    Pool::builder()
        // One more than asked: writes keep theirs, and a slow snapshot holding a read
        // connection must still leave one for the other reads (and the health check).
        .max_size(pool_size.max(2) + 1)
        .min_idle(Some(1))
        .connection_timeout(timeout)
        .error_handler(Box::new(LogPoolErrors))
        .build(Manager {
            connector: connector.clone(),
            check_within,
        })
        .map_err(|e| StorageError::Unavailable(format!("{}: {e}", connector.url)))
}

impl DieselStorage {
    /// Runs `write` on the connection kept for writes, within the write deadline: reused while
    /// it keeps succeeding, given back to the pool after an error (the pool checks it before
    /// anyone reuses it). A write cut off at its deadline may have been committed: it fails as
    /// [`StorageError::OutcomeUnknown`].
    pub(super) fn with_write_connection<T>(
        &self,
        write: impl FnOnce(&mut AnyConnection) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        let mut kept = self.writes.lock().unwrap_or_else(PoisonError::into_inner);
        let reusable = kept.take().and_then(|mut w| {
            if w.link.is_stale() {
                return None;
            }
            let trusted = w.used.elapsed() < WRITE_CONNECTION_TRUSTED_FOR;
            let alive = trusted
                || w.link
                    .call(self.timeouts.write, StorageError::Unavailable, |c| {
                        check_alive(c).map_err(StorageError::from)
                    })
                    .is_ok();
            alive.then_some(w.link)
        });
        let mut link = match reusable {
            Some(link) => link,
            None => self.conn()?,
        };
        let result = link.call(self.timeouts.write, StorageError::OutcomeUnknown, write);
        if result.is_ok() {
            *kept = Some(WriteConnection {
                link,
                used: Instant::now(),
            });
        }
        result
    }

    /// Runs `read` on a connection of the pool, within the read deadline.
    pub(super) fn read<T>(
        &self,
        read: impl FnOnce(&mut AnyConnection) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        self.conn()?
            .call(self.timeouts.read, StorageError::Unavailable, read)
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

    /// [`Storage::check`](crate::Storage::check): [`Storage::bounds`](crate::Storage::bounds)
    /// on the connection kept for the health check, outside the pool, within its own deadline;
    /// on PostgreSQL, also whether the server takes writes (a standby does not). A
    /// failed check makes every connection opened before it stale.
    pub(super) fn check_health(&self) -> Result<Bounds, StorageError> {
        // A check still waiting for the database (the watch gave up on it) holds the lock: the
        // database has not answered it, so it does not answer this one either.
        let mut kept = self.health.try_lock().map_err(|_| {
            StorageError::Unavailable(format!("{}: the previous check has not answered", self.url))
        })?;
        let began = moment();
        let checked = match kept.take() {
            Some(link) if !link.is_stale() => Ok(link),
            _ => self
                .connector
                .open()
                .map_err(|e| StorageError::Unavailable(format!("{}: {e}", self.url))),
        }
        .and_then(|mut link| {
            // A connection that failed is dropped: the next check opens a new one.
            let bounds = link.call(self.timeouts.check, StorageError::Unavailable, |c| {
                refuse_standby(c)?;
                read_bounds(c)
            })?;
            *kept = Some(link);
            Ok(bounds)
        });
        if checked.is_err() {
            // The database may have ended every connection, or moved (a failover): none opened
            // before this check began is trusted again, and calls still waiting on them are cut
            // off now. (One opened since, perhaps to the new primary, stays.)
            self.connector.epoch.cut_off(began);
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

/// Fails unless the server takes writes: a PostgreSQL standby (in recovery) answers reads, but
/// no write commits there. (A URL with `target_session_attrs=read-write` never connects to one;
/// a server demoted under a connection would be one.)
fn refuse_standby(c: &mut AnyConnection) -> Result<(), StorageError> {
    let AnyConnection::Postgres(pg) = c else {
        return Ok(());
    };
    #[derive(QueryableByName)]
    struct Recovery {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        standby: bool,
    }
    let recovery =
        diesel::sql_query("SELECT pg_is_in_recovery() AS standby").get_result::<Recovery>(pg)?;
    if recovery.standby {
        return Err(StorageError::Unavailable(
            "the database server is a standby in recovery: it takes no writes".into(),
        ));
    }
    Ok(())
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
            let mut link = storage.conn().unwrap();
            let c = link.conn();
            assert_eq!(setting(c, "journal_mode"), "wal");
            assert_eq!(setting(c, "synchronous"), "2", "2 is FULL");
            // Not a table-valued pragma: it has a side effect when given a value.
            let checkpoint = diesel::sql_query("PRAGMA wal_autocheckpoint")
                .get_result::<Checkpoint>(c)
                .unwrap();
            // A new ledger has pages of 1 KiB: 40 MiB of them.
            assert_eq!(checkpoint.wal_autocheckpoint, 40_960);
            let page = diesel::sql_query("PRAGMA page_size")
                .get_result::<PageSize>(c)
                .unwrap();
            assert_eq!(page.page_size, 1024);
            // Built with the flags of `.cargo/config.toml` (a build from outside the workspace
            // would miss them): statements stay prepared.
            let qpsg = diesel::sql_query("SELECT sqlite_compileoption_used('ENABLE_QPSG') AS used")
                .get_result::<CompileOption>(c)
                .unwrap();
            assert_eq!(qpsg.used, 1, "SQLite built without SQLITE_ENABLE_QPSG");
            assert_eq!(setting(c, "temp_store"), "2", "2 is MEMORY");
            held.push(link);
        }
    }
}
