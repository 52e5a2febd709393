//! Storage of the ledger: the policies, the change log and the head seq.
//!
//! Everything above this module sees only the [`Storage`] trait, so that SQLite and PostgreSQL
//! run the same code and the same test suite. The one implementation, [`DieselStorage`], speaks
//! to either through diesel.

mod diesel_store;
mod schema;

pub use diesel_store::{
    CallTimeouts, DatabaseUrl, DieselStorage, NOTIFY_CHANNEL, PgTimeouts, StorageOptions,
    redact_secrets,
};

/// A stored policy as the ledger serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPolicy {
    /// The policy id.
    pub id: String,
    /// The policy type (the root key).
    pub policy_type: String,
    /// The completed policy as one `blockchain.json` line, without the line break.
    pub json: String,
    /// The seq of the change that inserted it; ledger order is ascending seq.
    pub seq: u64,
}

/// What one change did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeKind {
    /// A policy was inserted.
    Inserted(StoredPolicy),
    /// The policy with this id was deleted.
    Deleted {
        /// The id of the deleted policy.
        id: String,
    },
}

/// One committed change of the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Its position in the ledger's history: the previous change has `seq - 1`.
    pub seq: u64,
    /// What it did.
    pub kind: ChangeKind,
}

/// A policy ready to be inserted: completed and validated by [`ledger_anylog::policy`].
#[derive(Debug, Clone)]
pub struct NewPolicy {
    /// The policy id (unique in the ledger).
    pub id: String,
    /// The policy type.
    pub policy_type: String,
    /// The body's `company`, kept in the `company_name` column as AnyLog does.
    pub company: Option<String>,
    /// The body's `status` (the `status` column), as EdgeLake's master keeps it.
    pub status: Option<String>,
    /// The `date` column: the policy's own `date`, as EdgeLake's master keeps it (its file is
    /// ordered by it), or the insert time when the policy's date is not a time.
    pub date: chrono::NaiveDateTime,
    /// The completed policy as one `blockchain.json` line.
    pub json: String,
    /// The address of the client that inserted it (the `host` column).
    pub host: String,
}

impl NewPolicy {
    /// The change that inserts this policy as `seq`.
    pub fn inserted_at(&self, seq: u64) -> Change {
        Change {
            seq,
            kind: ChangeKind::Inserted(StoredPolicy {
                id: self.id.clone(),
                policy_type: self.policy_type.clone(),
                json: self.json.clone(),
                seq,
            }),
        }
    }
}

/// One write of a batch handed to [`Storage::apply`].
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// Insert a policy unless its id exists.
    Insert(NewPolicy),
    /// Delete the policy with this id if it exists.
    Delete {
        /// The id of the policy to delete.
        id: String,
    },
}

/// Why one write of a batch changed nothing; the rest of the batch still commits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// An insert whose id is already stored.
    #[error("a policy with id {0:?} already exists")]
    AlreadyExists(String),
    /// A delete of an id that is not stored.
    #[error("no policy with id {0:?}")]
    NotFound(String),
}

/// The range of history the storage can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// The seq of the last committed change.
    pub head_seq: u64,
    /// Changes up to this seq were pruned: a subscriber with `after_seq` below it needs a reset.
    pub pruned_seq: u64,
}

/// The block of a followed blockchain whose contract state the ledger holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainPosition {
    /// The block's number.
    pub block_number: u64,
    /// The block's hash, `0x`-prefixed hex.
    pub block_hash: String,
    /// The contract's `transaction_count()` at that block.
    pub transaction_count: u64,
}

/// What [`Storage::snapshot`] hands its sink.
#[derive(Debug)]
pub enum SnapshotPart {
    /// First: the seq the snapshot shows and how many policies follow.
    Start {
        /// The head seq the snapshot is consistent with.
        seq: u64,
        /// The number of policies in the snapshot.
        policy_count: u64,
    },
    /// Then pages of policies in ledger order.
    Page(Vec<StoredPolicy>),
}

/// A failure of the storage itself (as opposed to a rejected write).
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The database could not be reached or a connection could not be opened.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database answers, but every pooled connection stayed in use for the whole wait: the
    /// master is overloaded, not cut off (health stays SERVING).
    #[error("database busy: {0}")]
    Busy(String),
    /// The disk of the database is full: nothing of the write was committed.
    #[error("the database's disk is full; nothing of the write was committed: {0}")]
    DiskFull(String),
    /// A statement failed.
    #[error("database error: {0}")]
    Query(#[from] diesel::result::Error),
    /// The migrations could not be applied.
    #[error("cannot apply the database migrations: {0}")]
    Migration(String),
    /// A failure already reported elsewhere, passed on as text (a failed batch answers every
    /// request it held).
    #[error("database error: {0}")]
    Failed(String),
    /// The connection was lost while a write was on its way to the database or being
    /// committed: the database may have committed it. A retried insert then answers
    /// `ALREADY_EXISTS` (a retried delete `NOT_FOUND`), and what was committed reaches the
    /// streams once the database answers again.
    #[error(
        "the connection to the database was lost during the write, which may have been committed (a retry then answers ALREADY_EXISTS, or NOT_FOUND for a delete): {0}"
    )]
    OutcomeUnknown(String),
    /// A stored row does not hold what the ledger wrote.
    #[error("corrupt ledger row: {0}")]
    Corrupt(String),
}

/// What a [`StorageError`] means to its caller, whichever backend said it and however.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The disk of the database is full: nothing of the write was committed.
    DiskFull,
    /// The connection was lost while a write was on its way or being committed: it may have
    /// been committed.
    OutcomeUnknown,
    /// Every pooled connection stayed in use for the whole wait: overloaded, not cut off.
    Busy,
    /// The database is out of reach (worth retrying later); nothing was committed.
    Unavailable,
    /// A stored row does not hold what the ledger wrote.
    Corrupt,
    /// Anything else: a statement the database refused, migrations that could not be applied.
    Other,
}

impl StorageError {
    /// What this error means, from its variant or, for a statement that failed, from what
    /// diesel tells of the database's error.
    pub fn failure(&self) -> Failure {
        use diesel::result::Error;
        match self {
            StorageError::DiskFull(_) => Failure::DiskFull,
            StorageError::OutcomeUnknown(_) => Failure::OutcomeUnknown,
            StorageError::Busy(_) => Failure::Busy,
            StorageError::Unavailable(_) => Failure::Unavailable,
            StorageError::Corrupt(_) => Failure::Corrupt,
            StorageError::Query(Error::DatabaseError(_, info))
                if untyped_failure(info.message()) == Some(Failure::DiskFull) =>
            {
                Failure::DiskFull
            }
            StorageError::Query(_) if self.connection_lost() => Failure::Unavailable,
            StorageError::Query(_) | StorageError::Migration(_) | StorageError::Failed(_) => {
                Failure::Other
            }
        }
    }

    /// Whether a statement failed because its connection did (as diesel classifies it, or as
    /// libpq says it), not because of the statement.
    fn connection_lost(&self) -> bool {
        use diesel::result::{DatabaseErrorKind, Error};
        match self {
            StorageError::Query(Error::BrokenTransactionManager) => true,
            StorageError::Query(Error::DatabaseError(
                DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
                _,
            )) => true,
            StorageError::Query(Error::DatabaseError(_, info)) => {
                untyped_failure(info.message()) == Some(Failure::Unavailable)
            }
            _ => false,
        }
    }

    /// Whether the error says the database is out of reach (worth retrying later) rather than
    /// that a statement is wrong.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self.failure(),
            Failure::Unavailable | Failure::Busy | Failure::OutcomeUnknown
        )
    }

    /// Whether a write that failed with this error may have been committed all the same: its
    /// statement or commit was cut off with the connection, so only the database knows. (A
    /// connection that could not be had, [`StorageError::Unavailable`], sent nothing.)
    pub fn outcome_unknown(&self) -> bool {
        match self {
            StorageError::OutcomeUnknown(_) => true,
            StorageError::Query(_) => self.connection_lost(),
            _ => false,
        }
    }

    /// Whether the error says the disk is full: SQLite's `SQLITE_FULL`, PostgreSQL's
    /// `53100 disk_full` or an `ENOSPC` it passes on. Worth telling apart: the operator frees
    /// space, and nothing else is wrong.
    pub fn is_disk_full(&self) -> bool {
        self.failure() == Failure::DiskFull
    }
}

/// The failures a database reports that diesel gives no kind for, told by the message: the one
/// place where the storage reads an error's text.
///
/// Why text: diesel's `DatabaseErrorKind` has no kind for a full disk and keeps the codes to
/// itself (PostgreSQL's SQLSTATE `53100` and `57P01`, SQLite's `SQLITE_FULL` are not exposed),
/// and libpq has no code at all for a connection lost on the client's side (`server closed the
/// connection unexpectedly` is libpq's own text, with no SQLSTATE). What diesel does classify
/// (`ClosedConnection`, `UnableToSendCommand`) is matched by kind in [`StorageError::failure`].
fn untyped_failure(message: &str) -> Option<Failure> {
    /// What SQLite's and PostgreSQL's messages say when the disk is full.
    const DISK_FULL: &[&str] = &[
        "database or disk is full",
        "No space left on device",
        "could not extend file",
    ];
    /// What libpq's messages say when the connection, not the statement, failed: lost
    /// mid-statement, or ended by the server (57P01 admin shutdown).
    const CONNECTION_LOST: &[&str] = &[
        "server closed the connection",
        "terminating connection",
        "no connection to the server",
        "connection to server",
        "could not receive data from server",
        "could not send data to server",
    ];
    if DISK_FULL.iter().any(|sign| message.contains(sign)) {
        Some(Failure::DiskFull)
    } else if CONNECTION_LOST.iter().any(|sign| message.contains(sign)) {
        Some(Failure::Unavailable)
    } else {
        None
    }
}

/// The storage of a ledger. Methods block: async callers run them on the blocking pool.
pub trait Storage: Send + Sync + 'static {
    /// Applies `ops` in order in one transaction (one commit, one fsync), assigning each
    /// effective write the next seq. A rejected write takes no seq and does not abort the
    /// others. Returns only after the transaction is durably committed.
    fn apply(&self, ops: &[WriteOp]) -> Result<Vec<Result<Change, Rejection>>, StorageError>;

    /// The policy with this id, if stored.
    fn get(&self, id: &str) -> Result<Option<StoredPolicy>, StorageError>;

    /// Up to `limit` policies with seq above `after_seq`, in ledger order, of `policy_type` if
    /// given.
    fn list(
        &self,
        policy_type: Option<&str>,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredPolicy>, StorageError>;

    /// Up to `limit` changes with seq above `after_seq`, in seq order. The result is always a
    /// gap-free run: seqs commit in increasing order.
    fn changes_after(&self, after_seq: u64, limit: usize) -> Result<Vec<Change>, StorageError>;

    /// The head seq and the pruned prefix of the change log.
    fn bounds(&self) -> Result<Bounds, StorageError>;

    /// [`Storage::bounds`] for the health check, on a connection kept for it alone: a pool whose
    /// connections are all taken (slow snapshots, a burst of reads) is busy, not down.
    fn check(&self) -> Result<Bounds, StorageError> {
        self.bounds()
    }

    /// Whether the database is embedded, a file of this machine (SQLite): a commit then waits
    /// for this machine's disk alone, never for a network that may hang. The writer commits a
    /// lone write on the caller's thread only then.
    fn is_embedded(&self) -> bool {
        false
    }

    /// How many of the pool's connections are in use, and how many it may open; `None` for a
    /// storage without a pool.
    fn pool_usage(&self) -> Option<(u32, u32)> {
        None
    }

    /// How many policies the ledger holds (a full count: not for hot paths).
    fn policy_count(&self) -> Result<u64, StorageError>;

    /// Reads the whole ledger at one consistent seq: `sink` gets a [`SnapshotPart::Start`], then
    /// pages of up to `page_size` policies. Stops early, without error, when `sink` returns false.
    fn snapshot(
        &self,
        page_size: usize,
        sink: &mut dyn FnMut(SnapshotPart) -> bool,
    ) -> Result<(), StorageError>;

    /// Stores changes committed upstream with their own seqs (a relay's copy of a master's
    /// ledger), in one transaction. The first must follow the head: `head_seq + 1`.
    fn replicate(&self, changes: &[Change]) -> Result<(), StorageError>;

    /// Replaces the whole ledger with `policies` at `seq` (a relay's copy after a reset), in one
    /// transaction: the change log is emptied and nothing before `seq` is replayable.
    fn replace(&self, seq: u64, policies: &[StoredPolicy]) -> Result<(), StorageError>;

    /// Drops the change-log entries up to `through_seq` (never beyond the head); subscribers
    /// behind it get a snapshot instead of a replay.
    fn prune_changes(&self, through_seq: u64) -> Result<(), StorageError>;

    /// The followed blockchain's block the ledger holds, if the master follows one and applied
    /// a poll.
    fn chain_position(&self) -> Result<Option<ChainPosition>, StorageError>;

    /// Records the block the ledger now holds (after its changes were committed: a crash in
    /// between makes the next poll diff again, which finds nothing left to apply).
    fn set_chain_position(&self, position: &ChainPosition) -> Result<(), StorageError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::result::{DatabaseErrorKind, Error};

    fn query(kind: DatabaseErrorKind, message: &str) -> StorageError {
        StorageError::Query(Error::DatabaseError(kind, Box::new(message.to_string())))
    }

    #[test]
    fn failures_are_told_by_kind_and_else_by_the_one_list_of_messages() {
        use DatabaseErrorKind::{ClosedConnection, UniqueViolation, Unknown};
        let cases = [
            (query(ClosedConnection, "gone"), Failure::Unavailable, true),
            (
                query(Unknown, "server closed the connection unexpectedly"),
                Failure::Unavailable,
                true,
            ),
            (
                query(
                    Unknown,
                    "terminating connection due to administrator command",
                ),
                Failure::Unavailable,
                true,
            ),
            (
                query(Unknown, "database or disk is full"),
                Failure::DiskFull,
                false,
            ),
            (
                query(
                    Unknown,
                    "could not extend file \"base/1/2\": No space left on device",
                ),
                Failure::DiskFull,
                false,
            ),
            (
                query(UniqueViolation, "duplicate key"),
                Failure::Other,
                false,
            ),
            (StorageError::Busy("pool".into()), Failure::Busy, false),
            (
                StorageError::OutcomeUnknown("cut".into()),
                Failure::OutcomeUnknown,
                true,
            ),
            (StorageError::Corrupt("row".into()), Failure::Corrupt, false),
            (
                StorageError::Failed("earlier".into()),
                Failure::Other,
                false,
            ),
        ];
        for (error, failure, unknown) in cases {
            assert_eq!(error.failure(), failure, "{error}");
            assert_eq!(error.outcome_unknown(), unknown, "{error}");
            assert_eq!(
                error.is_disk_full(),
                failure == Failure::DiskFull,
                "{error}"
            );
        }
    }
}
