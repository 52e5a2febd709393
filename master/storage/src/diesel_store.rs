//! [`DieselStorage`]: the ledger in SQLite or PostgreSQL through diesel.
//!
//! Both backends share every query through diesel's `MultiConnection`; the only backend-specific
//! code opens connections, applies the migrations and sets the snapshot isolation.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ManageConnection, Pool, PooledConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use crate::schema::{ledger, ledger_changes, ledger_head};
use crate::{
    Bounds, Change, ChangeKind, NewPolicy, Rejection, SnapshotPart, Storage, StorageError,
    StoredPolicy, WriteOp,
};

const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// Run on every SQLite connection.
///
/// - `synchronous = FULL` makes every commit fsync the WAL: an acknowledged insert survives a
///   crash of the machine, not only of the process.
/// - The busy timeout lets a reader wait for the writer instead of failing.
/// - `temp_store = MEMORY`: statement journals and sorts stay in memory instead of temp files
///   opened, written and unlinked during writes.
/// - `wal_autocheckpoint`: the writer copies the WAL into the database once it holds this many
///   pages, inside a commit, then fsyncs the database. At SQLite's default (1,000 pages, 4 MiB)
///   that happened every ~36 commits under 64 clients and cost ~25% of the writer's time (strace:
///   ~600 page reads and writes and a 5 ms fsync each). At 10,000 pages (40 MiB of WAL at most,
///   unless a long read holds it) pages written repeatedly (the head, the tables' last pages, the
///   id index) are copied once per checkpoint, and checkpoints are ten times rarer.
const SQLITE_CONNECTION_PRAGMAS: &str = "PRAGMA busy_timeout = 10000; \
     PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY; \
     PRAGMA wal_autocheckpoint = 10000;";

/// Held while migrating so that masters starting together on one PostgreSQL apply them once.
const MIGRATION_LOCK_KEY: i64 = 0x4c45_4447_4552; // "LEDGER"

/// The PostgreSQL channel on which a commit announces new changes to the other masters.
pub const NOTIFY_CHANNEL: &str = "ledger_changes";

const OP_INSERT: &str = "insert";
const OP_DELETE: &str = "delete";

/// A connection to either backend; queries written once run on both.
#[derive(diesel::MultiConnection)]
pub enum AnyConnection {
    /// PostgreSQL, for production and for several masters on one database.
    Postgres(PgConnection),
    /// SQLite, the embedded default.
    Sqlite(SqliteConnection),
}

/// Where the ledger lives, parsed from `--database-url`.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// `sqlite://PATH`: a SQLite file (created if missing).
    Sqlite(PathBuf),
    /// `postgres://...` or `postgresql://...`: a PostgreSQL database.
    Postgres(String),
}

impl std::str::FromStr for DatabaseUrl {
    type Err = String;

    /// Errors show the text with its secrets redacted ([`redact_secrets`]): they are printed.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("sqlite://") {
            if path.is_empty() || path == ":memory:" {
                return Err(format!(
                    "{:?}: a SQLite database URL needs a file path, as in sqlite://blockchain.db",
                    redact_secrets(s)
                ));
            }
            Ok(DatabaseUrl::Sqlite(PathBuf::from(path)))
        } else if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(DatabaseUrl::Postgres(s.to_string()))
        } else {
            Err(format!(
                "{:?} is not a database URL: use sqlite://PATH or postgres://USER@HOST:PORT/DATABASE",
                redact_secrets(s)
            ))
        }
    }
}

impl DatabaseUrl {
    /// A command-line parser of database URLs whose errors never repeat the text given: clap
    /// prints a refused value whole, secrets included, unless the parser makes the error itself.
    pub fn clap_parser() -> DatabaseUrlParser {
        DatabaseUrlParser
    }
}

/// See [`DatabaseUrl::clap_parser`].
#[derive(Debug, Clone, Copy)]
pub struct DatabaseUrlParser;

impl clap::builder::TypedValueParser for DatabaseUrlParser {
    type Value = DatabaseUrl;

    fn parse_ref(
        &self,
        _cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<DatabaseUrl, clap::Error> {
        let refuse = |reason: String| {
            let flag = arg.map_or_else(String::new, |a| format!("{a}: "));
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("{flag}{reason}\n"),
            )
        };
        let text = value
            .to_str()
            .ok_or_else(|| refuse("the database URL is not UTF-8".into()))?;
        text.parse().map_err(refuse)
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatabaseUrl::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            DatabaseUrl::Postgres(url) => f.write_str(&redact_secrets(url)),
        }
    }
}

/// `text` (a database URL, or any text that may hold one) with every password-like part
/// replaced by `***`: the password of a URL's user (`USER:PASSWORD@`, of every host of a
/// multi-host URL), and the value of every parameter whose name holds `password`, `secret` or
/// `token` (`?password=`, `&sslpassword=`, libpq's `password=` in a key/value string).
pub fn redact_secrets(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // USER:PASSWORD@ after a scheme, misspelled or not.
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        out.push_str(&rest[..at + 3]);
        rest = &rest[at + 3..];
        let authority_end = rest.find(['/', '?', '#', ' ']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        match authority.rfind('@') {
            Some(userinfo_end) => {
                let userinfo = &authority[..userinfo_end];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[userinfo_end..]);
            }
            None => out.push_str(authority),
        }
        rest = &rest[authority_end..];
    }
    out.push_str(rest);
    // NAME=VALUE parameters, in a query or a key/value string.
    let mut redacted = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(eq) = rest.find('=') {
        let name_start = rest[..eq]
            .rfind(['?', '&', ' ', ';'])
            .map_or(0, |at| at + 1);
        let name = rest[name_start..eq].to_ascii_lowercase();
        redacted.push_str(&rest[..=eq]);
        rest = &rest[eq + 1..];
        if ["password", "secret", "token"]
            .iter()
            .any(|n| name.contains(n))
        {
            let value_end = rest.find(['&', ' ', ';', '#']).unwrap_or(rest.len());
            redacted.push_str("***");
            rest = &rest[value_end..];
        }
    }
    redacted.push_str(rest);
    redacted
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl DatabaseUrl {
    fn connect(&self) -> Result<AnyConnection, diesel::r2d2::Error> {
        use diesel::r2d2::Error;
        match self {
            DatabaseUrl::Sqlite(path) => {
                let mut conn = SqliteConnection::establish(&path.to_string_lossy())
                    .map_err(Error::ConnectionError)?;
                conn.batch_execute(SQLITE_CONNECTION_PRAGMAS)
                    .map_err(Error::QueryError)?;
                Ok(AnyConnection::Sqlite(conn))
            }
            DatabaseUrl::Postgres(url) => {
                let mut conn = PgConnection::establish(url).map_err(Error::ConnectionError)?;
                // diesel keeps its statements prepared. PostgreSQL would soon switch them to one
                // generic plan, made while the ledger was small: a sequential scan that then
                // stays cached as the table grows (the id lookup cost 1.5 ms at 24,000 rows).
                conn.batch_execute("SET plan_cache_mode = force_custom_plan")
                    .map_err(Error::QueryError)?;
                Ok(AnyConnection::Postgres(conn))
            }
        }
    }
}

/// Opens connections for the r2d2 pool by the parsed URL: diesel's own manager would try every
/// backend in turn, and SQLite accepts any string as a file name.
struct Manager(DatabaseUrl);

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
struct WriteConnection {
    conn: PooledConnection<Manager>,
    used: Instant,
}

/// A write connection that served a write this recently is used without the liveness query
/// that the pool runs on every checkout: on PostgreSQL that query is a round trip, beside the
/// one statement of an insert. An older one is checked first, as the database may have
/// restarted meanwhile (HikariCP skips its check for 500 ms the same way).
const WRITE_CONNECTION_TRUSTED_FOR: Duration = Duration::from_millis(500);

/// About how many bytes of policies one snapshot page holds.
const SNAPSHOT_PAGE_BYTES: usize = 1 << 20;

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
            // the file, so setting it once is enough.
            conn.batch_execute("PRAGMA journal_mode = WAL;")?;
        }
        let pool = Pool::builder()
            // One more than asked: writes keep theirs, and a slow snapshot holding a read
            // connection must still leave one for the other reads (and the health check).
            .max_size(pool_size.max(2) + 1)
            .min_idle(Some(1))
            .connection_timeout(timeout)
            .build(Manager(url.clone()))
            .map_err(|e| StorageError::Unavailable(format!("{url}: {e}")))?;
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

    /// On PostgreSQL, how often the prepared statements of the connection kept for writes and of
    /// the one the next read would use ran with a generic plan and with a custom plan
    /// (`pg_prepared_statements`; statements without parameters, which always run one plan, are
    /// left out); `None` on SQLite.
    /// A diagnostic: a generic plan made while the ledger was small would stay cached.
    pub fn plan_counts(&self) -> Result<Option<(u64, u64)>, StorageError> {
        #[derive(QueryableByName)]
        struct Counts {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            generic: i64,
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            custom: i64,
        }
        fn counts(pg: &mut PgConnection) -> Result<(u64, u64), StorageError> {
            let counts: Counts = diesel::sql_query(
                "SELECT COALESCE(sum(generic_plans) FILTER (WHERE cardinality(parameter_types) > 0), 0)::bigint AS generic, \
                        COALESCE(sum(custom_plans), 0)::bigint AS custom FROM pg_prepared_statements",
            )
            .get_result(pg)?;
            Ok((counts.generic as u64, counts.custom as u64))
        }
        // The read connection goes back before the write one is locked: writes take that lock
        // first and a pool connection second.
        let (mut generic, mut custom) = {
            let mut read = self.conn()?;
            let AnyConnection::Postgres(pg) = &mut *read else {
                return Ok(None);
            };
            counts(pg)?
        };
        let mut kept = self.writes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(WriteConnection { conn, .. }) = kept.as_mut()
            && let AnyConnection::Postgres(pg) = &mut **conn
        {
            let (g, c) = counts(pg)?;
            generic += g;
            custom += c;
        }
        Ok(Some((generic, custom)))
    }

    /// Runs `write` on the connection kept for writes: reused while it keeps succeeding,
    /// given back to the pool after an error (the pool checks it before anyone reuses it).
    fn with_write_connection<T>(
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

    fn conn(&self) -> Result<PooledConnection<Manager>, StorageError> {
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

    fn migrate(&self) -> Result<(), StorageError> {
        let mut conn = self.conn()?;
        let applied: Vec<String> = match &mut *conn {
            AnyConnection::Sqlite(c) => c
                .run_pending_migrations(SQLITE_MIGRATIONS)
                .map_err(|e| StorageError::Migration(e.to_string()))?
                .iter()
                .map(|v| v.to_string())
                .collect(),
            AnyConnection::Postgres(c) => {
                c.batch_execute(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"))?;
                let result = c
                    .run_pending_migrations(POSTGRES_MIGRATIONS)
                    .map(|v| v.iter().map(|v| v.to_string()).collect())
                    .map_err(|e| StorageError::Migration(e.to_string()));
                c.batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"))?;
                result?
            }
        };
        for version in &applied {
            tracing::info!(%version, database = %self.url, "applied migration");
        }
        Ok(())
    }
}

/// A row of `ledger` as the ledger serves it.
type PolicyRow = (String, String, Option<String>, i64);

fn stored_policy((id, policy_type, json, seq): PolicyRow) -> Result<StoredPolicy, StorageError> {
    let json = json.ok_or_else(|| StorageError::Corrupt(format!("policy {id:?} has no text")))?;
    Ok(StoredPolicy {
        id,
        policy_type,
        json,
        seq: seq as u64,
    })
}

fn lock_head(c: &mut AnyConnection) -> Result<Bounds, StorageError> {
    // Locking the head row until commit makes writers, even of different masters, assign seqs
    // one transaction at a time. PostgreSQL: a row lock, read in the same round trip, and no new
    // row version (an UPDATE per transaction on one row bloats it between vacuums). SQLite: any
    // write takes the database's write lock.
    let (head, pruned): (i64, i64) = match c {
        AnyConnection::Postgres(pg) => ledger_head::table
            .find(1)
            .select((ledger_head::head_seq, ledger_head::pruned_seq))
            .for_update()
            .first(pg)?,
        AnyConnection::Sqlite(_) => {
            diesel::update(ledger_head::table.find(1))
                .set(ledger_head::head_seq.eq(ledger_head::head_seq))
                .execute(c)?;
            return read_bounds(c);
        }
    };
    Ok(Bounds {
        head_seq: head as u64,
        pruned_seq: pruned as u64,
    })
}

fn read_bounds(c: &mut AnyConnection) -> Result<Bounds, StorageError> {
    let (head, pruned): (i64, i64) = ledger_head::table
        .find(1)
        .select((ledger_head::head_seq, ledger_head::pruned_seq))
        .first(c)?;
    Ok(Bounds {
        head_seq: head as u64,
        pruned_seq: pruned as u64,
    })
}

fn set_head(c: &mut AnyConnection, head: u64) -> Result<(), StorageError> {
    diesel::update(ledger_head::table.find(1))
        .set(ledger_head::head_seq.eq(head as i64))
        .execute(c)?;
    Ok(())
}

/// Inserts the `ledger` row of a policy copied from upstream, its columns read from its line.
fn insert_copied_row(
    c: &mut AnyConnection,
    policy: &StoredPolicy,
    now: chrono::NaiveDateTime,
) -> Result<(), StorageError> {
    let columns = RowColumns::of(&policy.json);
    diesel::insert_into(ledger::table)
        .values((
            ledger::policy_type.eq(&policy.policy_type),
            ledger::policy_id.eq(&policy.id),
            ledger::company_name.eq(columns.company),
            ledger::date.eq(columns.date.unwrap_or(now)),
            ledger::host.eq(REPLICATED_HOST),
            ledger::status.eq(columns.status),
            ledger::policy.eq(&policy.json),
            ledger::seq.eq(policy.seq as i64),
        ))
        .execute(c)?;
    Ok(())
}

fn insert_change_row(
    c: &mut AnyConnection,
    change: &Change,
    policy_type: &str,
) -> Result<(), StorageError> {
    let (op, id, json) = match &change.kind {
        ChangeKind::Inserted(policy) => (OP_INSERT, &policy.id, Some(&policy.json)),
        ChangeKind::Deleted { id } => (OP_DELETE, id, None),
    };
    diesel::insert_into(ledger_changes::table)
        .values((
            ledger_changes::seq.eq(change.seq as i64),
            ledger_changes::op.eq(op),
            ledger_changes::policy_id.eq(id),
            ledger_changes::policy_type.eq(policy_type),
            ledger_changes::policy.eq(json),
        ))
        .execute(c)?;
    Ok(())
}

/// The columns of a copied row that come from its policy, as an insert fills them.
#[derive(Default)]
struct RowColumns {
    company: Option<String>,
    status: Option<String>,
    date: Option<chrono::NaiveDateTime>,
}

impl RowColumns {
    fn of(json: &str) -> RowColumns {
        let Ok((_, body)) = ledger_anylog::policy::parse_stored(json) else {
            return RowColumns::default();
        };
        let text = |key: &str| body.get(key)?.as_str().map(str::to_string);
        RowColumns {
            company: text("company"),
            status: text("status"),
            date: text("date")
                .as_deref()
                .and_then(ledger_anylog::policy::parse_date),
        }
    }
}

/// The `host` column of rows copied from upstream rather than inserted by a client.
const REPLICATED_HOST: &str = "upstream";

/// The most rows one INSERT carries (7 parameters a row stays far below both backends' limits).
const ROWS_PER_STATEMENT: usize = 500;

/// Writes the `unwritten` inserts (indexes into `results`, which hold their changes) with
/// multi-row statements, and empties the list.
fn write_inserts(
    c: &mut AnyConnection,
    results: &[Result<Change, Rejection>],
    unwritten: &mut Vec<(usize, &NewPolicy)>,
) -> Result<(), StorageError> {
    for chunk in unwritten.chunks(ROWS_PER_STATEMENT) {
        let inserted = || {
            chunk
                .iter()
                .filter_map(|(index, request)| match &results[*index] {
                    Ok(Change {
                        kind: ChangeKind::Inserted(policy),
                        ..
                    }) => Some((policy, *request)),
                    _ => None,
                })
        };
        let rows: Vec<_> = inserted()
            .map(|(policy, request)| {
                (
                    ledger::policy_type.eq(&policy.policy_type),
                    ledger::policy_id.eq(&policy.id),
                    ledger::company_name.eq(request.company.as_deref()),
                    ledger::date.eq(request.date),
                    ledger::host.eq(&request.host),
                    ledger::status.eq(request.status.as_deref()),
                    ledger::policy.eq(&policy.json),
                    ledger::seq.eq(policy.seq as i64),
                )
            })
            .collect();
        // diesel's multi-backend connection has no multi-row INSERT: use the concrete one.
        match &mut *c {
            AnyConnection::Postgres(pg) => diesel::insert_into(ledger::table)
                .values(&rows)
                .execute(pg)?,
            AnyConnection::Sqlite(lite) => diesel::insert_into(ledger::table)
                .values(&rows)
                .execute(lite)?,
        };
        let changes: Vec<_> = inserted()
            .map(|(policy, _)| {
                (
                    ledger_changes::seq.eq(policy.seq as i64),
                    ledger_changes::op.eq(OP_INSERT),
                    ledger_changes::policy_id.eq(&policy.id),
                    ledger_changes::policy_type.eq(&policy.policy_type),
                    ledger_changes::policy.eq(Some(&policy.json)),
                )
            })
            .collect();
        match &mut *c {
            AnyConnection::Postgres(pg) => diesel::insert_into(ledger_changes::table)
                .values(&changes)
                .execute(pg)?,
            AnyConnection::Sqlite(lite) => diesel::insert_into(ledger_changes::table)
                .values(&changes)
                .execute(lite)?,
        };
    }
    unwritten.clear();
    Ok(())
}

/// PostgreSQL, a batch of inserts only: the whole write in one statement, committed on its own.
///
/// Every statement is a round trip: the general path takes six (begin, lock the head, look the
/// ids up, write both tables, move the head, commit), this one. Locking the head, skipping the
/// ids already stored or repeated in the batch, numbering the rest from the head, writing them
/// to both tables, moving the head and notifying the other masters all happen in it.
///
/// Returns `None` when another master stored one of the ids while this statement waited for
/// the head (its snapshot predates that commit, so the unique index refuses the row and
/// nothing is written): the general path then rejects that id properly.
fn apply_inserts_pg(
    pg: &mut PgConnection,
    inserts: &[&NewPolicy],
) -> Result<Option<Vec<Result<Change, Rejection>>>, StorageError> {
    use diesel::result::{DatabaseErrorKind, Error};
    use diesel::sql_types::{Array, BigInt, Nullable, Text, Timestamp};

    #[derive(QueryableByName)]
    struct Numbered {
        /// The insert's position in the batch, from 1; 0 for the row that reports the new head.
        #[diesel(sql_type = BigInt)]
        ord: i64,
        #[diesel(sql_type = BigInt)]
        seq: i64,
    }
    let column = |f: fn(&NewPolicy) -> &str| inserts.iter().map(|p| f(p)).collect::<Vec<_>>();
    let optional =
        |f: fn(&NewPolicy) -> Option<&str>| inserts.iter().map(|p| f(p)).collect::<Vec<_>>();
    let dates: Vec<chrono::NaiveDateTime> = inserts.iter().map(|p| p.date).collect();
    let numbered = diesel::sql_query(
        "WITH head AS (SELECT head_seq FROM ledger_head WHERE id = 1 FOR UPDATE), \
         input AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::timestamp[], $9::text[]) \
             WITH ORDINALITY AS r(policy_id, policy_type, company_name, host, policy, date, status, ord)), \
         fresh AS (SELECT DISTINCT ON (policy_id) * FROM input \
             WHERE NOT EXISTS (SELECT 1 FROM ledger l WHERE l.policy_id = input.policy_id) \
             ORDER BY policy_id, ord), \
         numbered AS (SELECT fresh.*, head.head_seq + row_number() OVER (ORDER BY ord) AS seq \
             FROM fresh, head), \
         policies AS (INSERT INTO ledger (policy_type, policy_id, company_name, date, host, status, policy, seq) \
             SELECT policy_type, policy_id, company_name, date, host, status, policy, seq FROM numbered), \
         changes AS (INSERT INTO ledger_changes (seq, op, policy_id, policy_type, policy) \
             SELECT seq, $7, policy_id, policy_type, policy FROM numbered), \
         moved AS (UPDATE ledger_head SET head_seq = (SELECT max(seq) FROM numbered) \
             WHERE id = 1 AND EXISTS (SELECT 1 FROM numbered) RETURNING head_seq) \
         SELECT ord, seq FROM numbered \
         UNION ALL SELECT 0, head_seq FROM moved, LATERAL (SELECT pg_notify($8, head_seq::text)) AS n",
    )
    .bind::<Array<Text>, _>(column(|p| &p.id))
    .bind::<Array<Text>, _>(column(|p| &p.policy_type))
    .bind::<Array<Nullable<Text>>, _>(optional(|p| p.company.as_deref()))
    .bind::<Array<Text>, _>(column(|p| &p.host))
    .bind::<Array<Text>, _>(column(|p| &p.json))
    .bind::<Array<Timestamp>, _>(dates)
    .bind::<Text, _>(OP_INSERT)
    .bind::<Text, _>(NOTIFY_CHANNEL)
    .bind::<Array<Nullable<Text>>, _>(optional(|p| p.status.as_deref()))
    .load::<Numbered>(pg);
    let numbered = match numbered {
        Ok(rows) => rows,
        Err(Error::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut seqs: Vec<Option<u64>> = vec![None; inserts.len()];
    for row in numbered.iter().filter(|row| row.ord > 0) {
        seqs[row.ord as usize - 1] = Some(row.seq as u64);
    }
    let results = inserts
        .iter()
        .zip(seqs)
        .map(|(p, seq)| match seq {
            Some(seq) => Ok(p.inserted_at(seq)),
            None => Err(Rejection::AlreadyExists(p.id.clone())),
        })
        .collect();
    Ok(Some(results))
}

/// [`Storage::apply`] on one connection.
fn apply_on(
    conn: &mut AnyConnection,
    ops: &[WriteOp],
) -> Result<Vec<Result<Change, Rejection>>, StorageError> {
    if let AnyConnection::Postgres(pg) = &mut *conn {
        let inserts: Option<Vec<&NewPolicy>> = ops
            .iter()
            .map(|op| match op {
                WriteOp::Insert(p) => Some(p),
                WriteOp::Delete { .. } => None,
            })
            .collect();
        if let Some(inserts) = inserts
            && let Some(results) = apply_inserts_pg(pg, &inserts)?
        {
            return Ok(results);
        }
    }
    conn.transaction(|c| {
        let start = lock_head(c)?.head_seq;
        // One query tells which of the batch's ids are stored (and their types), rather than
        // one query per write: on PostgreSQL every statement is a round trip.
        let ids: Vec<&str> = ops
            .iter()
            .map(|op| match op {
                WriteOp::Insert(p) => p.id.as_str(),
                WriteOp::Delete { id } => id.as_str(),
            })
            .collect();
        let mut stored: HashMap<String, String> = HashMap::new();
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            stored.extend(
                ledger::table
                    .filter(ledger::policy_id.eq_any(chunk))
                    .select((ledger::policy_id, ledger::policy_type))
                    .load::<(String, String)>(c)?,
            );
        }
        let mut head = start;
        let mut results: Vec<Result<Change, Rejection>> = Vec::with_capacity(ops.len());
        // Inserts not yet written: (index in `results`, the request), written together.
        let mut unwritten: Vec<(usize, &NewPolicy)> = Vec::new();
        for op in ops {
            match op {
                WriteOp::Insert(p) => {
                    if stored.contains_key(&p.id) {
                        results.push(Err(Rejection::AlreadyExists(p.id.clone())));
                        continue;
                    }
                    head += 1;
                    stored.insert(p.id.clone(), p.policy_type.clone());
                    unwritten.push((results.len(), p));
                    results.push(Ok(p.inserted_at(head)));
                }
                WriteOp::Delete { id } => {
                    let Some(policy_type) = stored.remove(id) else {
                        results.push(Err(Rejection::NotFound(id.clone())));
                        continue;
                    };
                    // The delete may remove a policy inserted earlier in this batch.
                    write_inserts(c, &results, &mut unwritten)?;
                    head += 1;
                    diesel::delete(ledger::table.filter(ledger::policy_id.eq(id)))
                        .execute(c)?;
                    let change = Change {
                        seq: head,
                        kind: ChangeKind::Deleted { id: id.clone() },
                    };
                    insert_change_row(c, &change, &policy_type)?;
                    results.push(Ok(change));
                }
            }
        }
        write_inserts(c, &results, &mut unwritten)?;
        if head != start {
            match &mut *c {
                // One round trip moves the head and notifies the other masters on this
                // database (delivered at commit), which then publish the change. The payload
                // is the new head: a master that already published it skips the read.
                AnyConnection::Postgres(pg) => {
                    diesel::sql_query(
                        "WITH moved AS (UPDATE ledger_head SET head_seq = $1 WHERE id = 1 RETURNING 1) \
                         SELECT pg_notify($2, $1::text) FROM moved",
                    )
                    .bind::<diesel::sql_types::BigInt, _>(head as i64)
                    .bind::<diesel::sql_types::Text, _>(NOTIFY_CHANNEL)
                    .execute(pg)?;
                }
                AnyConnection::Sqlite(_) => set_head(c, head)?,
            }
        }
        Ok(results)
    })
}

impl Storage for DieselStorage {
    fn apply(&self, ops: &[WriteOp]) -> Result<Vec<Result<Change, Rejection>>, StorageError> {
        self.with_write_connection(|conn| apply_on(conn, ops))
    }

    fn get(&self, id: &str) -> Result<Option<StoredPolicy>, StorageError> {
        let mut conn = self.conn()?;
        ledger::table
            .filter(ledger::policy_id.eq(id))
            .select((
                ledger::policy_id,
                ledger::policy_type,
                ledger::policy,
                ledger::seq,
            ))
            .first::<PolicyRow>(&mut *conn)
            .optional()?
            .map(stored_policy)
            .transpose()
    }

    fn list(
        &self,
        policy_type: Option<&str>,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredPolicy>, StorageError> {
        let mut conn = self.conn()?;
        let mut query = ledger::table
            .filter(ledger::seq.gt(after_seq as i64))
            .select((
                ledger::policy_id,
                ledger::policy_type,
                ledger::policy,
                ledger::seq,
            ))
            .order(ledger::seq.asc())
            .limit(limit as i64)
            .into_boxed();
        if let Some(policy_type) = policy_type {
            query = query.filter(ledger::policy_type.eq(policy_type));
        }
        query
            .load::<PolicyRow>(&mut *conn)?
            .into_iter()
            .map(stored_policy)
            .collect()
    }

    fn changes_after(&self, after_seq: u64, limit: usize) -> Result<Vec<Change>, StorageError> {
        let mut conn = self.conn()?;
        let rows = ledger_changes::table
            .filter(ledger_changes::seq.gt(after_seq as i64))
            .order(ledger_changes::seq.asc())
            .limit(limit as i64)
            .select((
                ledger_changes::seq,
                ledger_changes::op,
                ledger_changes::policy_id,
                ledger_changes::policy_type,
                ledger_changes::policy,
            ))
            .load::<(i64, String, String, String, Option<String>)>(&mut *conn)?;
        rows.into_iter()
            .map(|(seq, op, id, policy_type, policy)| {
                let kind = match op.as_str() {
                    OP_INSERT => {
                        ChangeKind::Inserted(stored_policy((id, policy_type, policy, seq))?)
                    }
                    OP_DELETE => ChangeKind::Deleted { id },
                    other => {
                        return Err(StorageError::Corrupt(format!(
                            "change {seq} has unknown op {other:?}"
                        )));
                    }
                };
                Ok(Change {
                    seq: seq as u64,
                    kind,
                })
            })
            .collect()
    }

    fn bounds(&self) -> Result<Bounds, StorageError> {
        read_bounds(&mut *self.conn()?)
    }

    fn check(&self) -> Result<Bounds, StorageError> {
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

    fn pool_usage(&self) -> Option<(u32, u32)> {
        let state = self.pool.state();
        Some((
            state.connections - state.idle_connections,
            self.pool.max_size(),
        ))
    }

    fn policy_count(&self) -> Result<u64, StorageError> {
        let count: i64 = ledger::table.count().get_result(&mut *self.conn()?)?;
        Ok(count as u64)
    }

    fn snapshot(
        &self,
        page_size: usize,
        sink: &mut dyn FnMut(SnapshotPart) -> bool,
    ) -> Result<(), StorageError> {
        let page_size = page_size.max(1);
        let mut conn = self.conn()?;
        conn.transaction(|c| {
            // One transaction gives one consistent view for the head, the count and every page.
            // PostgreSQL's default (read committed) would give each statement its own view.
            if matches!(&**c, AnyConnection::Postgres(_)) {
                diesel::sql_query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    .execute(c)?;
            }
            let bounds = read_bounds(c)?;
            let policy_count: i64 = ledger::table.count().get_result(c)?;
            if !sink(SnapshotPart::Start {
                seq: bounds.head_seq,
                policy_count: policy_count as u64,
            }) {
                return Ok(());
            }
            let mut after = 0i64;
            // Pages are bounded in bytes as well as rows: a page waits in memory while the client
            // reads the one before, and policies may be large. The first page is small; the next
            // ones take as many rows as the average so far fits into SNAPSHOT_PAGE_BYTES.
            let mut rows_per_page = page_size.min(16);
            let (mut rows_read, mut bytes_read) = (0usize, 0usize);
            loop {
                let rows = ledger::table
                    .filter(ledger::seq.gt(after))
                    .order(ledger::seq.asc())
                    .limit(rows_per_page as i64)
                    .select((
                        ledger::policy_id,
                        ledger::policy_type,
                        ledger::policy,
                        ledger::seq,
                    ))
                    .load::<PolicyRow>(c)?;
                let Some(last) = rows.last() else { break };
                after = last.3;
                let full = rows.len() == rows_per_page;
                rows_read += rows.len();
                bytes_read += rows
                    .iter()
                    .map(|(id, _, json, _)| id.len() + json.as_ref().map_or(0, String::len))
                    .sum::<usize>();
                rows_per_page =
                    (SNAPSHOT_PAGE_BYTES * rows_read / bytes_read.max(1)).clamp(1, page_size);
                let page = rows
                    .into_iter()
                    .map(stored_policy)
                    .collect::<Result<Vec<_>, _>>()?;
                if !sink(SnapshotPart::Page(page)) || !full {
                    break;
                }
            }
            Ok(())
        })
    }

    fn replicate(&self, changes: &[Change]) -> Result<(), StorageError> {
        let mut conn = self.conn()?;
        conn.transaction(|c| {
            let mut head = lock_head(c)?.head_seq;
            let now = chrono::Utc::now().naive_utc();
            for change in changes {
                if change.seq != head + 1 {
                    return Err(StorageError::Corrupt(format!(
                        "replicated change {} does not follow the head {head}",
                        change.seq
                    )));
                }
                let policy_type = match &change.kind {
                    ChangeKind::Inserted(policy) => {
                        insert_copied_row(c, policy, now)?;
                        policy.policy_type.clone()
                    }
                    ChangeKind::Deleted { id } => {
                        let policy_type = ledger::table
                            .filter(ledger::policy_id.eq(id))
                            .select(ledger::policy_type)
                            .first::<String>(c)
                            .optional()?
                            .ok_or_else(|| {
                                StorageError::Corrupt(format!(
                                    "replicated change {} deletes unknown policy {id:?}",
                                    change.seq
                                ))
                            })?;
                        diesel::delete(ledger::table.filter(ledger::policy_id.eq(id)))
                            .execute(c)?;
                        policy_type
                    }
                };
                insert_change_row(c, change, &policy_type)?;
                head = change.seq;
            }
            set_head(c, head)
        })
    }

    fn replace(&self, seq: u64, policies: &[StoredPolicy]) -> Result<(), StorageError> {
        let mut conn = self.conn()?;
        conn.transaction(|c| {
            lock_head(c)?;
            diesel::delete(ledger::table).execute(c)?;
            diesel::delete(ledger_changes::table).execute(c)?;
            let now = chrono::Utc::now().naive_utc();
            for policy in policies {
                insert_copied_row(c, policy, now)?;
            }
            diesel::update(ledger_head::table.find(1))
                .set((
                    ledger_head::head_seq.eq(seq as i64),
                    ledger_head::pruned_seq.eq(seq as i64),
                ))
                .execute(c)?;
            Ok(())
        })
    }

    fn prune_changes(&self, through_seq: u64) -> Result<(), StorageError> {
        let mut conn = self.conn()?;
        conn.transaction(|c| {
            let bounds = lock_head(c)?;
            let through = through_seq.min(bounds.head_seq);
            if through <= bounds.pruned_seq {
                return Ok(());
            }
            diesel::delete(ledger_changes::table.filter(ledger_changes::seq.le(through as i64)))
                .execute(c)?;
            diesel::update(ledger_head::table.find(1))
                .set(ledger_head::pruned_seq.eq(through as i64))
                .execute(c)?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
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
    struct Checkpoint {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        wal_autocheckpoint: i32,
    }

    #[test]
    fn secrets_never_show() {
        for (given, shown) in [
            (
                "postgres://ledger:SECRET@db:5432/blockchain",
                "postgres://ledger:***@db:5432/blockchain",
            ),
            (
                "postgres://127.0.0.1:1/db?password=SECRET",
                "postgres://127.0.0.1:1/db?password=***",
            ),
            (
                "postgres:///db?host=/run&sslpassword=SECRET&sslmode=require",
                "postgres:///db?host=/run&sslpassword=***&sslmode=require",
            ),
            (
                "postgresql://u:SECRET@h1:5432,h2:5433/db?PassWord=SECRET#x",
                "postgresql://u:***@h1:5432,h2:5433/db?PassWord=***#x",
            ),
            ("postgress://u:p@ss:SECRET@h/db", "postgress://u:***@h/db"),
            (
                "host=db user=u password=SECRET dbname=x",
                "host=db user=u password=*** dbname=x",
            ),
            (
                "postgres://u@h/db?token=SECRET",
                "postgres://u@h/db?token=***",
            ),
            ("sqlite://blockchain.db", "sqlite://blockchain.db"),
        ] {
            assert_eq!(redact_secrets(given), shown, "{given}");
        }
        let url: DatabaseUrl = "postgres://u:SECRET@h/db?password=SECRET".parse().unwrap();
        assert!(!url.to_string().contains("SECRET"), "{url}");
        assert!(!format!("{url:?}").contains("SECRET"));
        let error = "postgress://u:SECRET@h/db"
            .parse::<DatabaseUrl>()
            .unwrap_err();
        assert!(!error.contains("SECRET"), "{error}");
        assert!(error.contains("postgress://u:***@h/db"), "{error}");
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
            assert_eq!(checkpoint.wal_autocheckpoint, 10_000);
            assert_eq!(setting(&mut c, "temp_store"), "2", "2 is MEMORY");
            held.push(c);
        }
    }
}
