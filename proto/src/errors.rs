//! Refusals as data: every error status of the Ledger carries a `google.rpc.ErrorInfo` whose
//! `reason` is a [`Reason`] (`ledger/v1/errors.proto`, whose comments list each reason's code and
//! metadata), in the domain [`DOMAIN`]. Servers build statuses with [`refusal`]; clients read
//! them with [`reason`] and [`metadata`], so that no client parses a message.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

pub use crate::pb::ErrorReason as Reason;
pub use tonic_types::ErrorInfo;

/// The `domain` of the Ledger's `ErrorInfo`s.
pub const DOMAIN: &str = "ledger.v1";

/// The keys of the `ErrorInfo` metadata, as `errors.proto` names them for each reason.
pub mod key {
    /// [`super::Reason::PolicyInvalid`]: what is wrong (`INVALID_JSON`, `WRONG_STRUCTURE`, ...).
    pub const PROBLEM: &str = "problem";
    /// `INVALID_JSON`: the 1-based line of the error.
    pub const LINE: &str = "line";
    /// `INVALID_JSON`: the 1-based column of the error.
    pub const COLUMN: &str = "column";
    /// The size of what was refused, in bytes.
    pub const SIZE_BYTES: &str = "size_bytes";
    /// A limit in bytes.
    pub const LIMIT_BYTES: &str = "limit_bytes";
    /// The nesting limit of a policy.
    pub const LIMIT_DEPTH: &str = "limit_depth";
    /// How many there were.
    pub const COUNT: &str = "count";
    /// A limit on a number of things.
    pub const LIMIT: &str = "limit";
    /// The id of the policy the refusal is about.
    pub const POLICY_ID: &str = "policy_id";
    /// Which credentials matched nobody: `token` or `certificate`.
    pub const CREDENTIAL: &str = "credential";
    /// The caller's role.
    pub const ROLE: &str = "role";
    /// The role the call needs.
    pub const REQUIRED_ROLE: &str = "required_role";
    /// Which stream limit was reached: `server` or `client`.
    pub const SCOPE: &str = "scope";
    /// The last seq a stream sent: resume after it.
    pub const RESUME_AFTER: &str = "resume_after";
    /// How many changes a lagging subscriber missed.
    pub const MISSED: &str = "missed";
    /// The snapshot stall timeout, in milliseconds.
    pub const STALL_TIMEOUT_MS: &str = "stall_timeout_ms";
    /// The client's deadline, in milliseconds.
    pub const TIMEOUT_MS: &str = "timeout_ms";
    /// The hash of a write's transaction on the followed chain, `0x`-prefixed hex.
    pub const TX_HASH: &str = "tx_hash";
    /// The number of the block a write's transaction is in.
    pub const BLOCK: &str = "block";
    /// The session id of a subscriber's ReportProgress.
    pub const SESSION_ID: &str = "session_id";
    /// The name of the request's field the refusal is about.
    pub const FIELD: &str = "field";
}

impl Reason {
    /// The status code every refusal with this reason has (the first word of its comment in
    /// `errors.proto`).
    pub fn code(self) -> Code {
        match self {
            Reason::Unspecified => Code::Unknown,
            Reason::PolicyInvalid
            | Reason::PolicyTooLarge
            | Reason::PolicyTooDeep
            | Reason::PolicyIdEmpty
            | Reason::TooManyConditions
            | Reason::ConditionTooLong
            | Reason::PageTokenInvalid
            | Reason::RequestUndecodable
            | Reason::FieldTooLong => Code::InvalidArgument,
            Reason::MessageTooLarge => Code::OutOfRange,
            Reason::PolicyExists => Code::AlreadyExists,
            Reason::PolicyNotFound | Reason::SessionUnknown => Code::NotFound,
            Reason::CredentialsMissing
            | Reason::CredentialsMalformed
            | Reason::CredentialsUnknown => Code::Unauthenticated,
            Reason::RoleInsufficient | Reason::CredentialsNotForwardable => Code::PermissionDenied,
            Reason::TooManyStreams
            | Reason::SubscriberLagged
            | Reason::SnapshotStalled
            | Reason::DiskFull
            | Reason::TooManySubscribers => Code::ResourceExhausted,
            Reason::ShuttingDown
            | Reason::DatabaseUnavailable
            | Reason::DatabaseBusy
            | Reason::WriteOutcomeUnknown
            | Reason::LedgerNotReady
            | Reason::ChainUnavailable
            | Reason::ChainPending => Code::Unavailable,
            Reason::ChainKeyMissing => Code::FailedPrecondition,
            Reason::LedgerReplaced | Reason::ChainReverted => Code::Aborted,
            Reason::DeadlineExceeded => Code::DeadlineExceeded,
            Reason::DatabaseError | Reason::LedgerCorrupt => Code::Internal,
        }
    }
}

/// The status of a refusal: `reason`'s code, `message` for people, and an `ErrorInfo` with
/// `reason`, [`DOMAIN`] and `metadata` in its details.
pub fn refusal<'a>(
    reason: Reason,
    message: impl Into<String>,
    metadata: impl IntoIterator<Item = (&'a str, String)>,
) -> Status {
    let metadata: HashMap<String, String> = metadata
        .into_iter()
        .map(|(key, value)| (key.to_string(), value))
        .collect();
    Status::with_error_details(
        reason.code(),
        message,
        ErrorDetails::with_error_info(reason.as_str_name(), DOMAIN, metadata),
    )
}

/// The status of a request whose protobuf does not decode: [`Reason::RequestUndecodable`] with
/// prost's description, which names the message and the field.
pub fn undecodable(error: &prost::DecodeError) -> Status {
    refusal(Reason::RequestUndecodable, error.to_string(), [])
}

/// The Ledger's `ErrorInfo` in `status`, if it has one (whatever its reason: a newer server may
/// send one this client does not know).
pub fn error_info(status: &Status) -> Option<ErrorInfo> {
    status
        .get_details_error_info()
        .filter(|info| info.domain == DOMAIN)
}

/// Why the Ledger refused: the reason of `status`'s `ErrorInfo`. `None` for a status that did
/// not come from the Ledger's code (the transport, a deadline the client enforced), and for a
/// reason this client does not know: then the status code tells what to do.
pub fn reason(status: &Status) -> Option<Reason> {
    error_info(status)
        .and_then(|info| Reason::from_str_name(&info.reason))
        .filter(|reason| *reason != Reason::Unspecified)
}

/// The value of `key` (one of [`key`]) in the metadata of `status`'s `ErrorInfo`.
pub fn metadata(status: &Status, key: &str) -> Option<String> {
    error_info(status).and_then(|mut info| info.metadata.remove(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value of the enum, from its generated `TryFrom<i32>`.
    fn all_reasons() -> Vec<Reason> {
        (1..).map_while(|n| Reason::try_from(n).ok()).collect()
    }

    #[test]
    fn a_refusal_carries_its_reason_code_and_metadata() {
        let status = refusal(
            Reason::PolicyExists,
            "a policy with id \"x\" already exists",
            [(key::POLICY_ID, "x".to_string())],
        );
        assert_eq!(status.code(), Code::AlreadyExists);
        assert_eq!(status.message(), "a policy with id \"x\" already exists");
        assert_eq!(reason(&status), Some(Reason::PolicyExists));
        assert_eq!(metadata(&status, key::POLICY_ID).as_deref(), Some("x"));
        assert_eq!(metadata(&status, key::ROLE), None);
        let info = error_info(&status).unwrap();
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("POLICY_EXISTS", DOMAIN)
        );
    }

    #[test]
    fn statuses_from_elsewhere_have_no_reason() {
        assert_eq!(reason(&Status::unavailable("transport error")), None);
        // Another domain's ErrorInfo is not ours, even with a reason of the same name.
        let foreign = Status::with_error_details(
            Code::AlreadyExists,
            "exists",
            ErrorDetails::with_error_info("POLICY_EXISTS", "example.com", HashMap::new()),
        );
        assert_eq!(reason(&foreign), None);
        // A reason this client does not know: the ErrorInfo is there, the reason is not.
        let newer = Status::with_error_details(
            Code::Unavailable,
            "new",
            ErrorDetails::with_error_info("SOMETHING_NEW", DOMAIN, HashMap::new()),
        );
        assert_eq!(reason(&newer), None);
        assert_eq!(error_info(&newer).unwrap().reason, "SOMETHING_NEW");
    }

    #[test]
    fn a_request_that_does_not_decode_is_invalid_argument() {
        let error = <crate::pb::InsertPolicyRequest as prost::Message>::decode(&b"\x0a\x05ab"[..])
            .unwrap_err();
        let status = undecodable(&error);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(reason(&status), Some(Reason::RequestUndecodable));
        assert!(!status.message().is_empty());
    }

    /// `errors.proto` gives each reason's code as the first word of its comment: it and
    /// [`Reason::code`] must agree, for every reason.
    #[test]
    fn the_codes_are_the_ones_the_proto_documents() {
        let proto = include_str!("../ledger/v1/errors.proto");
        let reasons = all_reasons();
        assert_eq!(
            reasons.len(),
            36,
            "a reason was added: update this test's count"
        );
        for reason in reasons {
            let name = reason.as_str_name();
            let at = proto
                .find(&format!("  {name} = "))
                .unwrap_or_else(|| panic!("{name} is not in errors.proto"));
            // The comment block right above the value.
            let comment: Vec<&str> = proto[..at]
                .lines()
                .rev()
                .take_while(|line| line.trim_start().starts_with("//"))
                .collect();
            let first = comment
                .last()
                .unwrap_or_else(|| panic!("{name} has no comment"));
            let code = first
                .trim_start()
                .trim_start_matches("// ")
                .split(':')
                .next();
            let expected = format!("{:?}", reason.code());
            let documented: String = code.unwrap().split('_').map(title_case).collect();
            assert_eq!(documented, expected, "{name}: errors.proto says {first:?}");
        }
    }

    fn title_case(word: &str) -> String {
        let lower = word.to_ascii_lowercase();
        let mut chars = lower.chars();
        chars
            .next()
            .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
            .unwrap_or_default()
    }

    /// The README's error table has a row for every reason.
    #[test]
    fn the_readme_lists_every_reason() {
        let readme = include_str!("../../README.md");
        for reason in all_reasons() {
            assert!(
                readme.contains(&format!("| `{}` |", reason.as_str_name())),
                "README.md does not list {}",
                reason.as_str_name()
            );
        }
    }
}
