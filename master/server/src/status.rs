//! The one place where ledger errors become gRPC statuses: each [`LedgerError`] gets its
//! reason (`ledger/v1/errors.proto`), which fixes the code, and the reason's metadata; the
//! message is the error's text, for people. The gRPC edge (`service`) answers with these; the
//! AnyLog edge has its own mapping (`anylog`).

use tonic::Status;

use crate::auth::AuthError;
use crate::error::LedgerError;
use crate::limits::StreamLimit;
use ledger_anylog::policy::PolicyError;
use ledger_storage::{Failure, Rejection};

/// A ledger error as its status (the module's doc says how).
impl From<LedgerError> for Status {
    fn from(error: LedgerError) -> Status {
        use ledger_proto::errors::{Reason, key, refusal};
        let message = error.to_string();
        let (reason, metadata): (Reason, Vec<(&str, String)>) = match error {
            LedgerError::InvalidPolicy(problem) => {
                let mut metadata = vec![(key::PROBLEM, problem.problem().to_string())];
                if let PolicyError::InvalidJson { line, column, .. } = problem {
                    metadata.push((key::LINE, line.to_string()));
                    metadata.push((key::COLUMN, column.to_string()));
                }
                (Reason::PolicyInvalid, metadata)
            }
            LedgerError::PolicyTooLarge { size, limit } => (
                Reason::PolicyTooLarge,
                vec![
                    (key::SIZE_BYTES, size.to_string()),
                    (key::LIMIT_BYTES, limit.to_string()),
                ],
            ),
            LedgerError::PolicyTooDeep(limit) => (
                Reason::PolicyTooDeep,
                vec![(key::LIMIT_DEPTH, limit.to_string())],
            ),
            LedgerError::EmptyId => (Reason::PolicyIdEmpty, vec![]),
            LedgerError::TooManyConditions { count, limit } => (
                Reason::TooManyConditions,
                vec![
                    (key::COUNT, count.to_string()),
                    (key::LIMIT, limit.to_string()),
                ],
            ),
            LedgerError::ConditionTooLong { limit, .. } => (
                Reason::ConditionTooLong,
                vec![(key::LIMIT_BYTES, limit.to_string())],
            ),
            LedgerError::BadPageToken(_) => (Reason::PageTokenInvalid, vec![]),
            LedgerError::Rejected(Rejection::AlreadyExists(id)) => {
                (Reason::PolicyExists, vec![(key::POLICY_ID, id)])
            }
            LedgerError::Rejected(Rejection::NotFound(id)) | LedgerError::NotFound(id) => {
                (Reason::PolicyNotFound, vec![(key::POLICY_ID, id)])
            }
            LedgerError::SubscriberLagged {
                missed,
                resume_after,
            } => (
                Reason::SubscriberLagged,
                vec![
                    (key::RESUME_AFTER, resume_after.to_string()),
                    (key::MISSED, missed.to_string()),
                ],
            ),
            LedgerError::SnapshotStalled(stall) => (
                Reason::SnapshotStalled,
                vec![(key::STALL_TIMEOUT_MS, stall.as_millis().to_string())],
            ),
            LedgerError::TooManyStreams(limit) => {
                let (scope, limit) = match limit {
                    StreamLimit::Server { limit, .. } => ("server", limit),
                    StreamLimit::Client { limit, .. } => ("client", limit),
                };
                (
                    Reason::TooManyStreams,
                    vec![(key::SCOPE, scope.into()), (key::LIMIT, limit.to_string())],
                )
            }
            LedgerError::Auth(AuthError::CredentialsMissing) => {
                (Reason::CredentialsMissing, vec![])
            }
            LedgerError::Auth(AuthError::MalformedAuthorization) => {
                (Reason::CredentialsMalformed, vec![])
            }
            LedgerError::Auth(AuthError::UnknownToken) => (
                Reason::CredentialsUnknown,
                vec![(key::CREDENTIAL, "token".into())],
            ),
            LedgerError::Auth(AuthError::UnknownSubject(_)) => (
                Reason::CredentialsUnknown,
                vec![(key::CREDENTIAL, "certificate".into())],
            ),
            LedgerError::Auth(AuthError::PermissionDenied { role, needed, .. }) => (
                Reason::RoleInsufficient,
                vec![
                    (key::ROLE, role.to_string()),
                    (key::REQUIRED_ROLE, needed.to_string()),
                ],
            ),
            LedgerError::ShuttingDown => (Reason::ShuttingDown, vec![]),
            LedgerError::NoCopyYet => (Reason::LedgerNotReady, vec![]),
            LedgerError::CannotForward(_) => (Reason::CredentialsNotForwardable, vec![]),
            // The subscriber resubscribes at once (a member does, on ABORTED).
            LedgerError::Reset => (Reason::LedgerReplaced, vec![]),
            LedgerError::DeadlineExceeded(timeout) => (
                Reason::DeadlineExceeded,
                vec![(key::TIMEOUT_MS, timeout.as_millis().to_string())],
            ),
            // A relay passes its upstream's answer on unchanged, reason and all.
            LedgerError::Upstream(status) => return status,
            LedgerError::Chain(e) => {
                use crate::chain::ContractError;
                match e {
                    ContractError::AlreadyExists(id) => {
                        (Reason::PolicyExists, vec![(key::POLICY_ID, id)])
                    }
                    ContractError::NotFound(id) => {
                        (Reason::PolicyNotFound, vec![(key::POLICY_ID, id)])
                    }
                    ContractError::Unreachable(_)
                    | ContractError::Reorged(_)
                    | ContractError::Misconfigured(_) => (Reason::ChainUnavailable, vec![]),
                    ContractError::Timeout { tx, .. } => {
                        (Reason::ChainPending, vec![(key::TX_HASH, tx)])
                    }
                    ContractError::NoKey => (Reason::ChainKeyMissing, vec![]),
                    ContractError::Reverted { tx, .. } => {
                        (Reason::ChainReverted, vec![(key::TX_HASH, tx)])
                    }
                }
            }
            LedgerError::SessionUnknown(session) => {
                (Reason::SessionUnknown, vec![(key::SESSION_ID, session)])
            }
            LedgerError::TooManySubscribers { count, limit } => (
                Reason::TooManySubscribers,
                vec![
                    (key::COUNT, count.to_string()),
                    (key::LIMIT, limit.to_string()),
                ],
            ),
            LedgerError::FieldTooLong { field, limit } => (
                Reason::FieldTooLong,
                vec![(key::FIELD, field), (key::LIMIT_BYTES, limit.to_string())],
            ),
            LedgerError::ChainBehind { block, .. } => {
                (Reason::ChainPending, vec![(key::BLOCK, block.to_string())])
            }
            LedgerError::Storage(e) => match e.failure() {
                Failure::DiskFull => (Reason::DiskFull, vec![]),
                Failure::OutcomeUnknown => (Reason::WriteOutcomeUnknown, vec![]),
                Failure::Busy => (Reason::DatabaseBusy, vec![]),
                Failure::Unavailable => (Reason::DatabaseUnavailable, vec![]),
                failure @ (Failure::Corrupt | Failure::Other) => {
                    tracing::error!(error = %e, "storage failure");
                    if failure == Failure::Corrupt {
                        (Reason::LedgerCorrupt, vec![])
                    } else {
                        (Reason::DatabaseError, vec![])
                    }
                }
            },
        };
        refusal(reason, message, metadata)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::auth::Role;

    /// Each error becomes its reason's code, its text, and its reason with the metadata
    /// `errors.proto` documents.
    #[test]
    fn every_error_gets_its_reason_and_metadata() {
        use ledger_proto::errors::{Reason, key, metadata, reason};
        use ledger_storage::StorageError;
        let invalid_json =
            ledger_anylog::policy::complete("{\"a\": ", chrono::Utc::now()).unwrap_err();
        /// An error, the reason it must get, and metadata it must carry.
        type Case = (LedgerError, Reason, Vec<(&'static str, &'static str)>);
        let cases: Vec<Case> = vec![
            (
                invalid_json.into(),
                Reason::PolicyInvalid,
                vec![
                    (key::PROBLEM, "INVALID_JSON"),
                    (key::LINE, "1"),
                    (key::COLUMN, "6"),
                ],
            ),
            (
                PolicyError::EmptyType.into(),
                Reason::PolicyInvalid,
                vec![(key::PROBLEM, "EMPTY_TYPE"), (key::LINE, "")],
            ),
            (
                LedgerError::PolicyTooLarge { size: 9, limit: 8 },
                Reason::PolicyTooLarge,
                vec![(key::SIZE_BYTES, "9"), (key::LIMIT_BYTES, "8")],
            ),
            (
                LedgerError::PolicyTooDeep(64),
                Reason::PolicyTooDeep,
                vec![(key::LIMIT_DEPTH, "64")],
            ),
            (LedgerError::EmptyId, Reason::PolicyIdEmpty, vec![]),
            (
                LedgerError::TooManyConditions {
                    count: 65,
                    limit: 64,
                },
                Reason::TooManyConditions,
                vec![(key::COUNT, "65"), (key::LIMIT, "64")],
            ),
            (
                LedgerError::ConditionTooLong {
                    key_bytes: 2000,
                    value_bytes: 1,
                    limit: 1024,
                },
                Reason::ConditionTooLong,
                vec![(key::LIMIT_BYTES, "1024")],
            ),
            (
                LedgerError::BadPageToken("x".into()),
                Reason::PageTokenInvalid,
                vec![],
            ),
            (
                Rejection::AlreadyExists("a1".into()).into(),
                Reason::PolicyExists,
                vec![(key::POLICY_ID, "a1")],
            ),
            (
                Rejection::NotFound("a2".into()).into(),
                Reason::PolicyNotFound,
                vec![(key::POLICY_ID, "a2")],
            ),
            (
                LedgerError::NotFound("a3".into()),
                Reason::PolicyNotFound,
                vec![(key::POLICY_ID, "a3")],
            ),
            (
                AuthError::CredentialsMissing.into(),
                Reason::CredentialsMissing,
                vec![],
            ),
            (
                AuthError::MalformedAuthorization.into(),
                Reason::CredentialsMalformed,
                vec![],
            ),
            (
                AuthError::UnknownToken.into(),
                Reason::CredentialsUnknown,
                vec![(key::CREDENTIAL, "token")],
            ),
            (
                AuthError::UnknownSubject("cn".into()).into(),
                Reason::CredentialsUnknown,
                vec![(key::CREDENTIAL, "certificate")],
            ),
            (
                AuthError::PermissionDenied {
                    name: "dash".into(),
                    role: Role::Reader,
                    needed: Role::Admin,
                    action: "delete policies",
                }
                .into(),
                Reason::RoleInsufficient,
                vec![(key::ROLE, "reader"), (key::REQUIRED_ROLE, "admin")],
            ),
            (
                LedgerError::TooManyStreams(StreamLimit::Server { open: 5, limit: 5 }),
                Reason::TooManyStreams,
                vec![(key::SCOPE, "server"), (key::LIMIT, "5")],
            ),
            (
                LedgerError::TooManyStreams(StreamLimit::Client {
                    client: [10, 0, 0, 1].into(),
                    open: 2,
                    limit: 2,
                }),
                Reason::TooManyStreams,
                vec![(key::SCOPE, "client"), (key::LIMIT, "2")],
            ),
            (
                LedgerError::SubscriberLagged {
                    missed: 7,
                    resume_after: 41,
                },
                Reason::SubscriberLagged,
                vec![(key::RESUME_AFTER, "41"), (key::MISSED, "7")],
            ),
            (
                LedgerError::SnapshotStalled(Duration::from_secs(30)),
                Reason::SnapshotStalled,
                vec![(key::STALL_TIMEOUT_MS, "30000")],
            ),
            (
                LedgerError::SessionUnknown("s1".into()),
                Reason::SessionUnknown,
                vec![(key::SESSION_ID, "s1")],
            ),
            (
                LedgerError::TooManySubscribers {
                    count: 10_001,
                    limit: 10_000,
                },
                Reason::TooManySubscribers,
                vec![(key::COUNT, "10001"), (key::LIMIT, "10000")],
            ),
            (
                LedgerError::FieldTooLong {
                    field: "downstream.peer".into(),
                    limit: 256,
                },
                Reason::FieldTooLong,
                vec![(key::FIELD, "downstream.peer"), (key::LIMIT_BYTES, "256")],
            ),
            (LedgerError::ShuttingDown, Reason::ShuttingDown, vec![]),
            (LedgerError::NoCopyYet, Reason::LedgerNotReady, vec![]),
            (
                LedgerError::CannotForward("certificate only".into()),
                Reason::CredentialsNotForwardable,
                vec![],
            ),
            (LedgerError::Reset, Reason::LedgerReplaced, vec![]),
            (
                LedgerError::DeadlineExceeded(Duration::from_millis(1500)),
                Reason::DeadlineExceeded,
                vec![(key::TIMEOUT_MS, "1500")],
            ),
            (
                StorageError::DiskFull("full".into()).into(),
                Reason::DiskFull,
                vec![],
            ),
            (
                StorageError::OutcomeUnknown("cut".into()).into(),
                Reason::WriteOutcomeUnknown,
                vec![],
            ),
            (
                StorageError::Busy("pool".into()).into(),
                Reason::DatabaseBusy,
                vec![],
            ),
            (
                StorageError::Unavailable("down".into()).into(),
                Reason::DatabaseUnavailable,
                vec![],
            ),
            (
                StorageError::Corrupt("row".into()).into(),
                Reason::LedgerCorrupt,
                vec![],
            ),
            (
                StorageError::Migration("m".into()).into(),
                Reason::DatabaseError,
                vec![],
            ),
        ];
        for (error, expected, pairs) in cases {
            let text = error.to_string();
            let status = Status::from(error);
            assert_eq!(status.code(), expected.code(), "{text}");
            assert_eq!(status.message(), text);
            assert_eq!(reason(&status), Some(expected), "{text}");
            for (key, value) in pairs {
                // An empty value: the key is absent.
                let value = Some(value).filter(|v| !v.is_empty());
                assert_eq!(metadata(&status, key).as_deref(), value, "{text}: {key}");
            }
        }
        // A relay passes its upstream's refusal on as it came, reason included.
        let upstream = ledger_proto::errors::refusal(
            Reason::PolicyExists,
            "upstream says",
            [(key::POLICY_ID, "u1".to_string())],
        );
        let passed = Status::from(LedgerError::Upstream(upstream.clone()));
        assert_eq!(
            (passed.code(), passed.message(), passed.details()),
            (upstream.code(), upstream.message(), upstream.details())
        );
    }
}
