//! The errors of the ledger, typed; [`crate::service`] maps them to gRPC statuses and their
//! reasons in one place. Also [`SecurityError`], why the TLS and auth files could not be used.

use std::path::PathBuf;
use std::time::Duration;

use ledger_anylog::policy::PolicyError;

use ledger_storage::{Rejection, StorageError};

use crate::auth::AuthFileError;
use crate::limits::StreamLimit;

/// Why a ledger operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The policy text is not a valid policy.
    #[error("invalid policy: {0}")]
    InvalidPolicy(#[from] PolicyError),
    /// The policy text is longer than the limit; it was not parsed.
    #[error("the policy is {size} bytes; the limit is {limit}")]
    PolicyTooLarge {
        /// Its length in bytes.
        size: usize,
        /// The most bytes a policy may have.
        limit: usize,
    },
    /// The policy text nests deeper than the limit; it was not parsed.
    #[error("the policy nests deeper than {0} levels")]
    PolicyTooDeep(usize),
    /// A get or delete named no id.
    #[error("the policy id is empty")]
    EmptyId,
    /// A list had more conditions than the limit.
    #[error("{count} conditions; at most {limit} are accepted")]
    TooManyConditions {
        /// How many it had.
        count: usize,
        /// How many are accepted.
        limit: usize,
    },
    /// A list condition's key or value is longer than the limit.
    #[error(
        "a condition of {key_bytes} + {value_bytes} bytes; a key or a value has at most {limit}"
    )]
    ConditionTooLong {
        /// The key's length in bytes.
        key_bytes: usize,
        /// The value's length in bytes.
        value_bytes: usize,
        /// The most bytes of a key or a value.
        limit: usize,
    },
    /// A list's page token is not one this server gave.
    #[error("page_token {0:?} is not one this server gave")]
    BadPageToken(String),
    /// The write changed nothing: the id exists (insert) or does not (delete).
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// No policy with this id (a read).
    #[error("no policy with id {0:?}")]
    NotFound(String),
    /// A subscriber fell so far behind the live changes that its buffer overflowed.
    #[error(
        "subscriber fell behind: {missed} changes overflowed its buffer; resume with after_seq={resume_after}"
    )]
    SubscriberLagged {
        /// How many changes it missed.
        missed: u64,
        /// The last seq it was sent, to resume from.
        resume_after: u64,
    },
    /// A snapshot's client took none of it for this long; its turn went to other snapshots.
    #[error(
        "the snapshot was ended: the client read none of it for {0:?}; resume to get a new one"
    )]
    SnapshotStalled(Duration),
    /// The caller is not allowed.
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    /// Too many streams are open.
    #[error("too many streams: {0}")]
    TooManyStreams(StreamLimit),
    /// The master is stopping; the client should go to another master or retry.
    #[error("the master is shutting down")]
    ShuttingDown,
    /// The client's deadline passed while its stream was open.
    #[error("the client's deadline of {0:?} passed")]
    DeadlineExceeded(Duration),
    /// The upstream of a relay answered a forwarded write with this status.
    #[error("upstream: {}", .0.message())]
    Upstream(#[from] tonic::Status),
    /// A relay cannot forward this write upstream with the caller's own credentials.
    #[error("{0}")]
    CannotForward(String),
    /// A relay's copy was replaced by its upstream's snapshot while the stream was open.
    #[error(
        "this relay's copy of the ledger was replaced by its upstream's snapshot; subscribe again after the same seq"
    )]
    Reset,
    /// A relay that holds no copy of the ledger yet.
    #[error(
        "this relay holds no copy of the ledger yet: it waits for its upstream's first snapshot"
    )]
    NoCopyYet,
    /// A progress report for a session without an open stream on this master.
    #[error(
        "no open stream of session {0:?} on this master: the report is dropped (subscribe again, then report)"
    )]
    SessionUnknown(String),
    /// A progress report listed more subscribers below a relay than the master takes.
    #[error("the report lists {count} subscribers below it; at most {limit} are accepted")]
    TooManySubscribers {
        /// How many it listed.
        count: usize,
        /// How many are accepted.
        limit: usize,
    },
    /// A string of a subscriber's identity or report is longer than the limit.
    #[error("{field} is longer than {limit} bytes")]
    FieldTooLong {
        /// The field, as the proto names it (`downstream.peer`).
        field: String,
        /// The most bytes it may have.
        limit: usize,
    },
    /// The storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A write to the followed chain's contract failed or is still pending.
    #[error(transparent)]
    Chain(#[from] crate::chain::ContractError),
    /// A write's transaction is mined, in `block`, and the master has not followed the chain
    /// that far yet (it follows the head minus `confirmations`).
    #[error(
        "the transaction is in block {block}, which this master has not applied yet (it follows the chain's head minus {confirmations} confirmations): the write takes effect when it does"
    )]
    ChainBehind {
        /// The block the transaction is in.
        block: u64,
        /// How many blocks the master stays behind the head.
        confirmations: u64,
    },
}

/// Why a server's TLS files or auth file could not be used: it does not start.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// A TLS certificate, key or CA file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    ReadTlsFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The auth file could not be read.
    #[error("cannot read the auth file {}: {source}", path.display())]
    ReadAuthFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The auth file says something the master cannot use.
    #[error("auth file {}: {source}", path.display())]
    AuthFile {
        /// The file.
        path: PathBuf,
        /// What is wrong in it.
        source: AuthFileError,
    },
}
