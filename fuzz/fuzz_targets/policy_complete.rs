//! Policy parsing and completion (`ledger_anylog::policy`) and the Python text forms
//! (`ledger_anylog::pyformat`) on arbitrary input. No input may panic, and:
//!
//! - on `Ok`, the stored line reads back with `parse_stored` to one root key (the type), a body
//!   with the returned `id` and `ledger: "global"`; the line is `json.dumps` of what it reads back
//!   to (a fixed point); completing the stored line again (at another time) changes nothing;
//! - any JSON value: `py_repr`, `py_str` and `json_dumps` do not panic, and when the value holds
//!   no number beyond a double (which `json.dumps` writes as `Infinity`, not JSON), the
//!   `json_dumps` text parses back as JSON to a value with the same `repr` and the same `dumps`.
#![no_main]

use chrono::{TimeZone, Utc};
use ledger_anylog::policy::{self, LEDGER_GLOBAL};
use ledger_anylog::pyformat::{json_dumps, py_repr, py_str};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    // Valid UTF-8 as it is; anything else as the lossy text (what a gRPC string cannot hold).
    let text = String::from_utf8_lossy(data);
    check_complete(&text);
    check_pyformat(&text);
});

fn check_complete(text: &str) {
    let now = Utc.with_ymd_and_hms(2026, 7, 20, 18, 40, 12).unwrap();
    let Ok(p) = policy::complete(text, now) else {
        return;
    };
    let (policy_type, body) = policy::parse_stored(&p.json)
        .unwrap_or_else(|e| panic!("stored line does not read back: {e}: {}", p.json));
    assert_eq!(policy_type, p.policy_type);
    assert!(!policy_type.is_empty());
    assert_eq!(body.get("id"), Some(&Value::String(p.id.clone())), "{}", p.json);
    assert_eq!(
        body.get("ledger"),
        Some(&Value::String(LEDGER_GLOBAL.to_owned())),
        "{}",
        p.json
    );
    assert!(body.contains_key("date"), "{}", p.json);
    assert!(!p.json.contains(['\n', '\r']), "a line break in {}", p.json);
    // The stored line is canonical: json.dumps of what it reads back to.
    let root: Value = serde_json::from_str(&p.json).unwrap();
    assert_eq!(json_dumps(&root), p.json);
    // Idempotence: a completed policy completes to itself, whenever.
    let later = Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap();
    let again = policy::complete(&p.json, later)
        .unwrap_or_else(|e| panic!("completed policy refused: {e}: {}", p.json));
    assert_eq!(again.id, p.id, "{}", p.json);
    assert_eq!(again.body.get("date"), body.get("date"), "{}", p.json);
    assert_eq!(again.json, p.json);
}

fn check_pyformat(text: &str) {
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return;
    };
    let repr = py_repr(&value);
    let _ = py_str(&value);
    let dumped = json_dumps(&value);
    if !finite(&value) {
        return;
    }
    let back: Value = serde_json::from_str(&dumped)
        .unwrap_or_else(|e| panic!("json_dumps output is not JSON: {e}: {dumped}"));
    assert_eq!(py_repr(&back), repr, "{dumped}");
    assert_eq!(json_dumps(&back), dumped);
}

/// Whether every number of the value is within a double's range (what `json.dumps` writes as
/// JSON rather than `Infinity`).
fn finite(v: &Value) -> bool {
    match v {
        Value::Number(n) => {
            let text = n.to_string();
            !text.contains(['.', 'e', 'E']) || text.parse::<f64>().is_ok_and(f64::is_finite)
        }
        Value::Array(items) => items.iter().all(finite),
        Value::Object(map) => map.values().all(finite),
        _ => true,
    }
}
