//! (6) Bytes per policy: a stream message against a line of the file, and the model of
//! AnyLog's full copy of the ledger file every 30 s.

use serde_json::{Value, json};

/// The bytes of a policy: `message_bytes` a stream message (measured by the fan-out), and the
/// average line of a ledger file of `file_bytes` holding `policies`; the model of a member
/// copying that whole file every 30 s.
pub(crate) fn bytes_per_policy(message_bytes: f64, file_bytes: u64, policies: u64) -> Value {
    let avg_line = file_bytes as f64 / policies as f64;
    json!({
        "stream_message_bytes": message_bytes,
        "stream_message_plus_framing_bytes": message_bytes + 5.0 + 9.0,
        "average_line_bytes": avg_line,
        "model_anylog_30s_full_copy": {
            "label": "MODEL: each member copies the whole ledger file every 30 s",
            "ledger_policies": policies, "ledger_bytes": file_bytes,
            "bytes_per_member_per_30s": file_bytes,
            "bytes_per_member_per_new_policy_at_200_per_s": file_bytes as f64 / (200.0 * 30.0),
            "bytes_per_member_per_new_policy_at_1_per_30s": file_bytes as f64,
        }
    })
}
