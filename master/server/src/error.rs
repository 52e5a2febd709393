//! The errors of the ledger, typed; [`crate::service`] maps them to gRPC statuses in one place.

use ledger_anylog::policy::PolicyError;

use ledger_storage::{Rejection, StorageError};

/// Why a ledger operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The policy text is not a valid policy.
    #[error("invalid policy: {0}")]
    InvalidPolicy(#[from] PolicyError),
    /// A request field is missing or malformed.
    #[error("{0}")]
    InvalidArgument(String),
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
    SnapshotStalled(std::time::Duration),
    /// The caller is not allowed.
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    /// Too many streams are open.
    #[error("too many streams: {0}")]
    TooManyStreams(String),
    /// The master is stopping; the client should go to another master or retry.
    #[error("the master is shutting down")]
    ShuttingDown,
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
    /// The storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}
