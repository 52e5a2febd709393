//! The AnyLog/EdgeLake policy: validation, completion (`id`, `date`, `ledger`) and the md5 id,
//! computed exactly as EdgeLake computes them so that a policy gets the same id in both systems.
//!
//! A policy is a JSON object with exactly one root key, the policy type, whose value (the body)
//! is a JSON object. The input is read as Python's `json.loads` reads it: key order is kept, a
//! duplicate key keeps its first position and its last value, and what Python cannot read the
//! same way (a number it would turn into `inf`, an integer longer than 4300 digits) is refused.

use crate::date::{format_date, parse_date};
use crate::pyformat::{json_dumps, py_repr, py_repr_str, py_str};
use chrono::{DateTime, NaiveDateTime, Utc};
use md5::{Digest, Md5};
use serde_json::{Map, Value};

/// The `ledger` value of every policy stored on the master.
pub const LEDGER_GLOBAL: &str = "global";

/// The longest integer literal Python 3.11's `json.loads` accepts (`sys.get_int_max_str_digits()`).
pub const MAX_INT_DIGITS: usize = 4300;

/// A policy after completion, ready to be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletedPolicy {
    /// The policy id: the user's, or the computed md5 hex digest.
    pub id: String,
    /// The policy type, the single root key (`operator`, `table`, ...).
    pub policy_type: String,
    /// The body's `company` attribute when it is a string.
    pub company: Option<String>,
    /// The body's `status` attribute when it is a string (the `ledger` table's `status`).
    pub status: Option<String>,
    /// The body's `date` read as a time, when it is one ([`parse_date`]): the `ledger` table's
    /// `date`, as EdgeLake's master fills it.
    pub date: Option<NaiveDateTime>,
    /// The completed body: the user's keys in order, then `id` (when computed), `date`, `ledger`.
    pub body: Map<String, Value>,
    /// `json.dumps({policy_type: body})`: one `blockchain.json` line, without the newline.
    pub json: String,
}

/// Why a text is not a valid policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The text is not JSON.
    #[error("invalid JSON at line {line} column {column}: {message}")]
    InvalidJson {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// What is wrong, from the JSON parser.
        message: String,
    },
    /// A number literal beyond the range of a double: Python would read it as `inf`.
    #[error("number {0} is out of range")]
    NumberOutOfRange(String),
    /// An integer literal Python's `json.loads` refuses to convert.
    #[error("integer with {digits} digits exceeds Python's limit of {MAX_INT_DIGITS} digits")]
    IntegerTooLong {
        /// Number of digits of the literal.
        digits: usize,
    },
    /// A first object key the JSON parser would take for one of its internal markers.
    #[error("the object key {} is not supported", quote(.0))]
    ReservedKey(String),
    /// The root is not an object with exactly one key.
    #[error("a policy is a JSON object with exactly one root key (the policy type); found {found}")]
    WrongStructure {
        /// What the root was instead, e.g. `an array` or `2 keys: "a", "b"`.
        found: String,
    },
    /// The root key is the empty string.
    #[error("policy type must not be empty")]
    EmptyType,
    /// The value of the root key is not an object.
    #[error("the body of policy type {} must be a JSON object, found {found}", quote(.policy_type))]
    BodyNotObject {
        /// The policy type (the root key).
        policy_type: String,
        /// What the body is instead, e.g. `an array`.
        found: &'static str,
    },
    /// The body has an `id` that is not a non-empty string.
    #[error("the policy id must be a non-empty string")]
    InvalidId,
    /// A policy stored under a key (a contract's policy id) whose body says another id, or none.
    #[error("the policy is stored under id {} but its body's id is {}", quote(.key), .id.as_deref().map_or_else(|| "missing".to_owned(), quote))]
    IdMismatch {
        /// The id it is stored under.
        key: String,
        /// The body's `id`, if it has a string one.
        id: Option<String>,
    },
}

impl PolicyError {
    /// The kind of problem as a constant name (`INVALID_JSON`, `WRONG_STRUCTURE`, ...): what a
    /// refusal's `problem` metadata says, so that clients need not read the message.
    pub fn problem(&self) -> &'static str {
        match self {
            PolicyError::InvalidJson { .. } => "INVALID_JSON",
            PolicyError::NumberOutOfRange(_) => "NUMBER_OUT_OF_RANGE",
            PolicyError::IntegerTooLong { .. } => "INTEGER_TOO_LONG",
            PolicyError::ReservedKey(_) => "RESERVED_KEY",
            PolicyError::WrongStructure { .. } => "WRONG_STRUCTURE",
            PolicyError::EmptyType => "EMPTY_TYPE",
            PolicyError::BodyNotObject { .. } => "BODY_NOT_OBJECT",
            PolicyError::InvalidId => "INVALID_ID",
            PolicyError::IdMismatch { .. } => "ID_MISMATCH",
        }
    }
}

/// Validates and completes a policy as the master does on insert.
///
/// A body that has both `id` and `date` is already complete: it is kept exactly as it is, key
/// order and `ledger` included, as EdgeLake's own completion keeps it (a node completes a policy
/// before it pushes it, then adds attributes such as a cluster's `status` after `date`).
///
/// Otherwise `id` is kept (in its place) when present, else computed with [`policy_id`]; `date`
/// keeps its value when present, else becomes [`format_date`]`(now)`; `ledger` becomes
/// `"global"`. A user `date` or `ledger` leaves its place: the body ends with `id` (when
/// computed), `date`, `ledger`.
pub fn complete(text: &str, now: DateTime<Utc>) -> Result<CompletedPolicy, PolicyError> {
    let (policy_type, mut body) = parse_policy(text)?;
    let user_id = match body.get("id") {
        Some(Value::String(id)) if !id.is_empty() => Some(id.clone()),
        Some(_) => return Err(PolicyError::InvalidId),
        None => None,
    };
    if let Some(id) = &user_id
        && body.contains_key("date")
    {
        return Ok(completed(id.clone(), policy_type, body));
    }
    // `shift_remove`, not `remove`: with preserve_order `remove` moves the last key into the gap.
    let date = body
        .shift_remove("date")
        .unwrap_or_else(|| Value::String(format_date(now)));
    body.shift_remove("ledger");
    let id = match user_id {
        Some(id) => id,
        None => {
            let id = policy_id(&policy_type, &body);
            body.insert("id".to_owned(), Value::String(id.clone()));
            id
        }
    };
    body.insert("date".to_owned(), date);
    body.insert("ledger".to_owned(), Value::String(LEDGER_GLOBAL.to_owned()));
    Ok(completed(id, policy_type, body))
}

/// Reads a policy a node completed and stored elsewhere under `key` (a contract's policy id,
/// written as `json.dumps(policy)`): validated as [`complete`] validates, completed by nobody,
/// and refused unless its body's `id` is `key`. Its line is `json.dumps` of what was read, as a
/// node syncing from the same contract writes it.
pub fn completed_elsewhere(key: &str, text: &str) -> Result<CompletedPolicy, PolicyError> {
    let (policy_type, body) = parse_policy(text)?;
    match body.get("id") {
        Some(Value::String(id)) if id == key => {}
        Some(Value::String(id)) => {
            return Err(PolicyError::IdMismatch {
                key: key.to_owned(),
                id: Some(id.clone()),
            });
        }
        _ => {
            return Err(PolicyError::IdMismatch {
                key: key.to_owned(),
                id: None,
            });
        }
    }
    Ok(completed(key.to_owned(), policy_type, body))
}

/// The policy `{policy_type: body}`, complete, with the `ledger` table's columns read from it.
fn completed(id: String, policy_type: String, body: Map<String, Value>) -> CompletedPolicy {
    let text = |key: &str| match body.get(key) {
        Some(Value::String(value)) => Some(value.clone()),
        _ => None,
    };
    let company = text("company");
    let status = text("status");
    let date = text("date").as_deref().and_then(parse_date);
    let json = stored_line(&policy_type, &body);
    CompletedPolicy {
        id,
        policy_type,
        company,
        status,
        date,
        body,
        json,
    }
}

/// The AnyLog id of a policy: an md5 hex digest. `date` and `ledger` keys of `body` are ignored,
/// as EdgeLake removes them before hashing; any other key (an `id` included) counts.
///
/// Type `table` hashes `"table:"` followed by `"<field>:<str(value)>:"` for each of `company`,
/// `name`, `dbms` present, `cluster` the same over `company`, `name`, `parent`, `table`; every
/// other type hashes Python's `str()` of `{policy_type: body}`.
pub fn policy_id(policy_type: &str, body: &Map<String, Value>) -> String {
    let hashed = match policy_type {
        "table" => field_key(policy_type, body, &["company", "name", "dbms"]),
        "cluster" => field_key(policy_type, body, &["company", "name", "parent", "table"]),
        _ => {
            let mut s = String::from("{");
            s.push_str(&py_repr_str(policy_type));
            s.push_str(": {");
            let hashed_fields = body.iter().filter(|(k, _)| !is_completion_key(k));
            for (i, (key, value)) in hashed_fields.enumerate() {
                if i > 0 {
                    s.push_str(", ");
                }
                s.push_str(&py_repr_str(key));
                s.push_str(": ");
                s.push_str(&py_repr(value));
            }
            s.push_str("}}");
            s
        }
    };
    hex::encode(Md5::digest(hashed.as_bytes()))
}

/// Whether the body's attribute `key` has the text `value`: a string attribute its own text,
/// any other attribute its JSON text as `json.dumps` writes it (`32148`, `true`, `1.0`,
/// `["a", 1]`). A missing attribute matches nothing.
pub fn attribute_matches(body: &Map<String, Value>, key: &str, value: &str) -> bool {
    match body.get(key) {
        Some(Value::String(s)) => s == value,
        Some(other) => json_dumps(other) == value,
        None => false,
    }
}

/// Reads a stored policy (a `blockchain.json` line or a `ledger.policy` value) back into its
/// type and body, with the same checks as [`complete`] but without completing anything.
pub fn parse_stored(json_line: &str) -> Result<(String, Map<String, Value>), PolicyError> {
    parse_policy(json_line)
}

/// `json.dumps({policy_type: body})`.
fn stored_line(policy_type: &str, body: &Map<String, Value>) -> String {
    let mut root = Map::with_capacity(1);
    root.insert(policy_type.to_owned(), Value::Object(body.clone()));
    json_dumps(&Value::Object(root))
}

fn is_completion_key(key: &str) -> bool {
    key == "date" || key == "ledger"
}

/// EdgeLake's key of a table or cluster policy: `"<type>:"` then `"<field>:<str(value)>:"` per
/// field present.
fn field_key(policy_type: &str, body: &Map<String, Value>, fields: &[&str]) -> String {
    let mut s = format!("{policy_type}:");
    for field in fields {
        if let Some(value) = body.get(*field) {
            s.push_str(field);
            s.push(':');
            s.push_str(&py_str(value));
            s.push(':');
        }
    }
    s
}

/// Parses and validates a policy text into its type and body.
fn parse_policy(text: &str) -> Result<(String, Map<String, Value>), PolicyError> {
    let checked = check_literals(text);
    let root: Value = match serde_json::from_str(text) {
        Ok(root) => root,
        // A reserved first key can itself make serde_json fail: say why.
        Err(e) => {
            return Err(checked
                .err()
                .filter(is_reserved_key)
                .unwrap_or(invalid_json(&e)));
        }
    };
    checked?;
    let root = match root {
        Value::Object(root) => root,
        other => {
            return Err(PolicyError::WrongStructure {
                found: kind(&other).to_owned(),
            });
        }
    };
    if root.len() != 1 {
        return Err(PolicyError::WrongStructure {
            found: describe_keys(&root),
        });
    }
    let (policy_type, body) = root.into_iter().next().expect("one key");
    if policy_type.is_empty() {
        return Err(PolicyError::EmptyType);
    }
    match body {
        Value::Object(body) => Ok((policy_type, body)),
        other => Err(PolicyError::BodyNotObject {
            policy_type,
            found: kind(&other),
        }),
    }
}

fn is_reserved_key(e: &PolicyError) -> bool {
    matches!(e, PolicyError::ReservedKey(_))
}

fn invalid_json(e: &serde_json::Error) -> PolicyError {
    // serde_json's message ends with " at line L column C"; keep the message alone.
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let message = full.strip_suffix(&suffix).unwrap_or(&full).to_owned();
    PolicyError::InvalidJson {
        line: e.line(),
        column: e.column(),
        message,
    }
}

/// Refuses, in a text serde_json has accepted, what Python's `json.loads` reads differently:
/// numbers beyond a double (Python makes them `inf`), integers longer than Python's limit, and
/// the object key serde_json's `arbitrary_precision` parser takes for a number (Python keeps it
/// as a dict). The text may be invalid JSON: then only the reserved key error is of use.
fn check_literals(text: &str) -> Result<(), PolicyError> {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                let start = i;
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                if i >= bytes.len() {
                    break; // An unterminated string: invalid JSON.
                }
                i += 1;
                let literal = &text[start..i];
                // Only the first key of an object can be a marker, and spelling it needs a `$`
                // or an escape.
                if literal.contains(['$', '\\']) {
                    let first_key = text[..start].trim_end().ends_with('{')
                        && text[i..].trim_start().starts_with(':');
                    let key = serde_json::from_str::<String>(literal).unwrap_or_default();
                    if first_key && RESERVED_KEYS.contains(&key.as_str()) {
                        return Err(PolicyError::ReservedKey(key));
                    }
                }
            }
            // Outside strings, a JSON text has `-` and digits only in numbers.
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < bytes.len()
                    && matches!(bytes[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                check_number(&text[start..i])?;
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// Object keys serde_json treats as markers of its own (`arbitrary_precision` numbers and,
/// should any crate enable the `raw_value` feature, raw values).
const RESERVED_KEYS: [&str; 2] = [
    "$serde_json::private::Number",
    "$serde_json::private::RawValue",
];

fn check_number(literal: &str) -> Result<(), PolicyError> {
    if literal.contains(['.', 'e', 'E']) {
        let value: f64 = literal.parse().unwrap_or(f64::INFINITY);
        if value.is_infinite() {
            return Err(PolicyError::NumberOutOfRange(literal.to_owned()));
        }
    } else {
        let digits = literal.trim_start_matches('-').len();
        if digits > MAX_INT_DIGITS {
            return Err(PolicyError::IntegerTooLong { digits });
        }
    }
    Ok(())
}

/// `"a", "b"` style description of the root keys for an error message.
fn describe_keys(root: &Map<String, Value>) -> String {
    const SHOWN: usize = 10;
    if root.is_empty() {
        return "an empty object".to_owned();
    }
    let mut keys: Vec<String> = root.keys().take(SHOWN).map(|k| quote(k)).collect();
    if root.len() > SHOWN {
        keys.push("...".to_owned());
    }
    format!("{} keys: {}", root.len(), keys.join(", "))
}

/// A JSON-quoted string, for error messages.
fn quote(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serializes")
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 7, 20, 18, 40, 12).unwrap()
            + chrono::Duration::microseconds(114_402)
    }

    fn keys(body: &Map<String, Value>) -> Vec<&str> {
        body.keys().map(String::as_str).collect()
    }

    fn err(text: &str) -> String {
        complete(text, now()).unwrap_err().to_string()
    }

    /// `tests/data/policy-ids.jsonl`: ids computed by EdgeLake.
    #[test]
    fn vectors_give_edgelake_ids() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/data/policy-ids.jsonl"
        );
        let data = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let lines: Vec<&str> = data.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(
            lines.len() >= 360,
            "{path} has {} vectors, expected 360",
            lines.len()
        );
        for (n, line) in lines.iter().enumerate() {
            let vector: Value = serde_json::from_str(line).unwrap();
            let input = vector["input"].as_str().unwrap();
            let expected = vector["id"].as_str().unwrap();
            let policy =
                complete(input, now()).unwrap_or_else(|e| panic!("vector {}: {e}: {input}", n + 1));
            assert_eq!(policy.id, expected, "vector {}: {input}", n + 1);
            assert_eq!(policy.body["id"], expected, "vector {}", n + 1);
            assert_eq!(policy.body["ledger"], "global", "vector {}", n + 1);
            // The stored line reads back to the same policy.
            let (policy_type, body) = parse_stored(&policy.json).unwrap();
            assert_eq!((policy_type, body), (policy.policy_type, policy.body));
        }
    }

    #[test]
    fn table_and_cluster_ids() {
        let table = complete(
            r#"{"table": {"name": "syslog", "dbms": "monitoring", "create": "x"}}"#,
            now(),
        )
        .unwrap();
        assert_eq!(table.id, "011886bb90df2d265ab9a0854eddf07f");
        let md5 = |s: &str| hex::encode(Md5::digest(s.as_bytes()));
        let cluster = complete(
            r#"{"cluster": {"table": [{"dbms": "d", "name": "t"}], "parent": 7, "name": "c", "company": "Acme", "x": 1}}"#,
            now(),
        )
        .unwrap();
        assert_eq!(
            cluster.id,
            md5("cluster:company:Acme:name:c:parent:7:table:[{'dbms': 'd', 'name': 't'}]:")
        );
    }

    #[test]
    fn completion_order_and_values() {
        let p = complete(
            r#"{"operator": {"date": "d0", "name": "x", "ledger": "local", "port": 1}}"#,
            now(),
        )
        .unwrap();
        assert_eq!(keys(&p.body), ["name", "port", "id", "date", "ledger"]);
        assert_eq!(p.id, "1c698b51bf9c806c4cf224b71d649763");
        assert_eq!(p.body["date"], "d0");
        assert_eq!(p.body["ledger"], "global");
        assert_eq!(p.policy_type, "operator");
        assert_eq!(p.company, None);

        // A user id stays in its place; a missing date is the insert time.
        let p = complete(
            r#"{"operator": {"name": "caf\u00e9", "id": "abc", "port": 32148, "x": 1.0, "company": "Acme"}}"#,
            now(),
        )
        .unwrap();
        assert_eq!(p.id, "abc");
        assert_eq!(
            keys(&p.body),
            ["name", "id", "port", "x", "company", "date", "ledger"]
        );
        assert_eq!(p.body["date"], "2026-07-20T18:40:12.114402Z");
        assert_eq!(p.company.as_deref(), Some("Acme"));
        assert_eq!(
            p.json,
            r#"{"operator": {"name": "caf\u00e9", "id": "abc", "port": 32148, "x": 1.0, "company": "Acme", "date": "2026-07-20T18:40:12.114402Z", "ledger": "global"}}"#
        );

        // A date of any JSON kind is kept as it is; a non-string company is no company.
        let p = complete(r#"{"config": {"date": 5, "company": 3}}"#, now()).unwrap();
        assert_eq!(p.body["date"], 5);
        assert_eq!(p.company, None);
        assert_eq!(p.id, "b14898eec6d1134e55718f0cd5c274f4");
    }

    /// A body with both `id` and `date` arrives complete from a node: it is stored as it came,
    /// `ledger` (or its absence) and attributes after `date` included.
    #[test]
    fn complete_policies_keep_their_bytes() {
        let cases = [
            r#"{"cluster": {"company": "Acme", "name": "c1", "table": [{"dbms": "d", "name": "t", "status": "active"}], "id": "c1id", "date": "2026-07-18T19:49:43.020405Z", "status": "active"}}"#,
            r#"{"operator": {"name": "op1", "id": "x", "date": "2026-07-18T19:49:43.020405Z", "ledger": "local", "member": 77}}"#,
            r#"{"config": {"date": "d0", "ledger": "global", "id": "i0", "name": "c"}}"#,
            r#"{"operator": {"id": "x", "date": 5}}"#,
        ];
        for text in cases {
            let p = complete(text, now()).unwrap();
            assert_eq!(p.json, text, "stored as sent");
            let (_, body) = parse_stored(text).unwrap();
            assert_eq!(p.body, body);
        }
        let p = complete(cases[0], now()).unwrap();
        assert_eq!(p.id, "c1id");
        assert_eq!(p.status.as_deref(), Some("active"));
        assert_eq!(p.date, parse_date("2026-07-18T19:49:43.020405Z"));
        assert_eq!(p.company.as_deref(), Some("Acme"));
        // Python's form, whatever the spacing of the text that came.
        let p = complete(r#"{"config":{"id":"i","date":"d","x":[1,2]}}"#, now()).unwrap();
        assert_eq!(
            p.json,
            r#"{"config": {"id": "i", "date": "d", "x": [1, 2]}}"#
        );
        // With only one of the two, the policy is completed as before.
        let p = complete(r#"{"config": {"id": "i", "x": 1}}"#, now()).unwrap();
        assert_eq!(keys(&p.body), ["id", "x", "date", "ledger"]);
        let p = complete(r#"{"config": {"date": "d", "status": 1}}"#, now()).unwrap();
        assert_eq!(keys(&p.body), ["status", "id", "date", "ledger"]);
        assert_eq!((p.status, p.date), (None, None));
    }

    /// `tests/data/complete-policies.jsonl` (made by CPython's `json`, see
    /// `scripts/gen_complete_policy_vectors.py`): complete policies are stored as
    /// `json.dumps` of what arrived.
    #[test]
    fn complete_policy_vectors_are_stored_as_python_dumps_them() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/data/complete-policies.jsonl"
        );
        let data = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let lines: Vec<&str> = data.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(lines.len() >= 8, "{path} has {} vectors", lines.len());
        for (n, line) in lines.iter().enumerate() {
            let vector: Value = serde_json::from_str(line).unwrap();
            let input = vector["input"].as_str().unwrap();
            let policy = complete(input, now()).unwrap_or_else(|e| panic!("vector {}: {e}", n + 1));
            assert_eq!(
                policy.json,
                vector["stored"].as_str().unwrap(),
                "vector {}",
                n + 1
            );
        }
    }

    #[test]
    fn duplicate_keys_like_python() {
        // Python: first position, last value.
        let p = complete(r#"{"operator": {"a": 1, "b": 2, "a": 3}}"#, now()).unwrap();
        assert_eq!(keys(&p.body)[..2], ["a", "b"]);
        assert_eq!(p.body["a"], 3);
        assert_eq!(p.id, "37875ec8449d3ae23593ce44df562316");
    }

    #[test]
    fn policy_id_ignores_date_and_ledger() {
        let body: Map<String, Value> =
            serde_json::from_str(r#"{"name": "x", "date": "d", "port": 1, "ledger": "g"}"#)
                .unwrap();
        assert_eq!(
            policy_id("operator", &body),
            "1c698b51bf9c806c4cf224b71d649763"
        );
    }

    #[test]
    fn errors() {
        assert_eq!(
            err(r#"{"a": }"#),
            "invalid JSON at line 1 column 7: expected value"
        );
        assert_eq!(
            err(""),
            "invalid JSON at line 1 column 0: EOF while parsing a value"
        );
        assert_eq!(
            err(r#"{"a": {}, "b": {}}"#),
            "a policy is a JSON object with exactly one root key (the policy type); found 2 keys: \"a\", \"b\""
        );
        assert_eq!(
            err("{}"),
            "a policy is a JSON object with exactly one root key (the policy type); found an empty object"
        );
        assert_eq!(
            err("[1]"),
            "a policy is a JSON object with exactly one root key (the policy type); found an array"
        );
        assert_eq!(
            err(r#"{"operator": [1]}"#),
            "the body of policy type \"operator\" must be a JSON object, found an array"
        );
        assert_eq!(
            err(r#"{"operator": "x"}"#),
            "the body of policy type \"operator\" must be a JSON object, found a string"
        );
        assert_eq!(err(r#"{"": {}}"#), "policy type must not be empty");
        assert_eq!(
            err(r#"{"operator": {"x": 1e400}}"#),
            "number 1e400 is out of range"
        );
        assert_eq!(
            err(r#"{"operator": {"x": [-1.5E+309]}}"#),
            "number -1.5E+309 is out of range"
        );
        for id in [r#""""#, "5", "null", r#"["a"]"#] {
            assert_eq!(
                err(&format!(r#"{{"operator": {{"id": {id}}}}}"#)),
                "the policy id must be a non-empty string"
            );
        }
        let long = format!(r#"{{"operator": {{"x": -{}}}}}"#, "9".repeat(4301));
        assert_eq!(
            err(&long),
            "integer with 4301 digits exceeds Python's limit of 4300 digits"
        );
        assert_eq!(
            err(r#"{"operator": {"x": {"\u0024serde_json::private::Number": "1"}}}"#),
            "the object key \"$serde_json::private::Number\" is not supported"
        );
        // serde_json itself fails on this one; the reason given is still the key.
        assert_eq!(
            err(r#"{"operator": {"$serde_json::private::Number": 1}}"#),
            "the object key \"$serde_json::private::Number\" is not supported"
        );
        // Error values compare equal.
        assert_eq!(complete(r#"{"": {}}"#, now()), Err(PolicyError::EmptyType));
    }

    #[test]
    fn accepted_like_python() {
        // Python reads these: an underflow is 0.0, 4300 digits is the limit (floats have none),
        // a marker that is not a first key is a plain key for serde_json too.
        let ok = [
            r#"{"operator": {"x": 1e-400}}"#.to_owned(),
            format!(r#"{{"operator": {{"x": -{}}}}}"#, "9".repeat(4300)),
            format!(r#"{{"operator": {{"x": 0.{}}}}}"#, "9".repeat(5000)),
            r#"{"operator": {"y": "$serde_json::private::Number"}}"#.to_owned(),
            r#"{"operator": {"x": {"a": "$serde_json::private::Number"}}}"#.to_owned(),
            r#"{"operator": {"x": {"a": 1, "$serde_json::private::Number": 2}}}"#.to_owned(),
            " \n{\"operator\": {}}\n ".to_owned(),
        ];
        for text in ok {
            complete(&text, now()).unwrap_or_else(|e| panic!("{e}: {text}"));
        }
    }

    #[test]
    fn a_policy_completed_elsewhere_keeps_its_text_and_needs_its_id() {
        let text = r#"{"operator": {"name": "op1", "company": "Acme", "id": "abc", "date": "2026-12-01T10:00:00.000000Z", "ledger": "global"}}"#;
        let policy = completed_elsewhere("abc", text).unwrap();
        assert_eq!(policy.id, "abc");
        assert_eq!(policy.policy_type, "operator");
        assert_eq!(policy.company.as_deref(), Some("Acme"));
        assert!(policy.date.is_some());
        assert_eq!(
            policy.json, text,
            "json.dumps of json.loads of a json.dumps text is itself"
        );
        // Other spacing is written back as json.dumps writes it.
        let compact = r#"{"operator":{"name":"op1","id":"abc"}}"#;
        assert_eq!(
            completed_elsewhere("abc", compact).unwrap().json,
            r#"{"operator": {"name": "op1", "id": "abc"}}"#
        );
        assert_eq!(
            completed_elsewhere("xyz", text),
            Err(PolicyError::IdMismatch {
                key: "xyz".into(),
                id: Some("abc".into())
            })
        );
        let no_id = completed_elsewhere("abc", r#"{"operator": {"name": "op1"}}"#).unwrap_err();
        assert_eq!(no_id.problem(), "ID_MISMATCH");
        assert!(no_id.to_string().contains("missing"), "{no_id}");
        assert!(matches!(
            completed_elsewhere("abc", "[1]"),
            Err(PolicyError::WrongStructure { .. })
        ));
    }

    #[test]
    fn parse_stored_reads_lines() {
        let (t, body) =
            parse_stored(r#"{"tag": {"name": "t", "id": "1", "ledger": "global"}}"#).unwrap();
        assert_eq!(t, "tag");
        assert_eq!(keys(&body), ["name", "id", "ledger"]);
        assert!(parse_stored(r#"{"tag": {"name": "t"}"#).is_err());
        assert_eq!(
            parse_stored(r#"{"tag": 1}"#),
            Err(PolicyError::BodyNotObject {
                policy_type: "tag".to_owned(),
                found: "a number"
            })
        );
    }

    #[test]
    fn attribute_matching() {
        let body: Map<String, Value> = serde_json::from_str(
            r#"{"name": "n1", "port": 32148, "ok": true, "x": 1.0, "nothing": null, "l": ["a", 1], "s": "32148"}"#,
        )
        .unwrap();
        assert!(attribute_matches(&body, "name", "n1"));
        assert!(!attribute_matches(&body, "name", "\"n1\""));
        assert!(!attribute_matches(&body, "name", "n"));
        assert!(attribute_matches(&body, "port", "32148"));
        assert!(!attribute_matches(&body, "port", "32148.0"));
        assert!(attribute_matches(&body, "ok", "true"));
        assert!(!attribute_matches(&body, "ok", "True"));
        assert!(attribute_matches(&body, "x", "1.0"));
        assert!(attribute_matches(&body, "nothing", "null"));
        assert!(attribute_matches(&body, "l", r#"["a", 1]"#));
        assert!(attribute_matches(&body, "s", "32148"));
        assert!(!attribute_matches(&body, "missing", "null"));
    }
}
