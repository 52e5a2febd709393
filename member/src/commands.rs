//! The operator's commands: `insert` and `delete` on a master, `get` from the local file,
//! `status` comparing the two. Each returns the text to print on stdout, or a
//! [`CommandError`] that says in one line what went wrong and which exit code it gets.

use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::time::Duration;

use ledger_anylog::digest::LedgerDigest;
use ledger_anylog::policy;
use ledger_proto::pb;
use tonic::{Code, Response, Status};

use crate::config::{GetFormat, InsertArgs};
use crate::paths::LedgerPaths;
use crate::state::SyncState;
use ledger_client::masters::{self, ClientOptions, MasterAddr};

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// No master could be reached, or the one reached became unavailable.
    #[error("cannot reach a master: {0}")]
    Unreachable(String),
    /// The policy's id is already stored.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// No policy with the id.
    #[error("not found: {0}")]
    NotFound(String),
    /// The master refused the policy text (`POLICY_INVALID`, `POLICY_TOO_LARGE`,
    /// `POLICY_TOO_DEEP`): the master's message, which says why (`invalid policy: ...`).
    #[error("{0}")]
    InvalidPolicy(String),
    /// The master refused an argument.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The master failed otherwise.
    #[error("the master failed: {0}")]
    Master(String),
    /// The command's own input (a policy file, stdin) could not be read.
    #[error("{0}")]
    Input(String),
    /// The local ledger file could not be read.
    #[error("{0}")]
    LocalFile(String),
    /// The master does not know the caller (no token, a wrong token, an unknown certificate).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The caller's role does not allow the call.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
}

impl CommandError {
    /// The process exit code: 1 refused or failed, 2 bad input, 3 no master reachable.
    pub fn exit_code(&self) -> u8 {
        match self {
            CommandError::Unreachable(_) => 3,
            CommandError::Input(_)
            | CommandError::InvalidPolicy(_)
            | CommandError::InvalidArgument(_) => 2,
            CommandError::AlreadyExists(_)
            | CommandError::NotFound(_)
            | CommandError::Master(_)
            | CommandError::LocalFile(_)
            | CommandError::Unauthenticated(_)
            | CommandError::PermissionDenied(_) => 1,
        }
    }

    fn from_status(status: Status, master: &MasterAddr, options: &ClientOptions) -> CommandError {
        use ledger_proto::errors::{self, Reason};
        let message = status.message().to_string();
        if masters::is_transport_failure(&status) {
            return CommandError::Unreachable(format!(
                "{master}: {}",
                masters::describe_call_failure(&status, options)
            ));
        }
        // The reason tells a refused policy text from the other invalid arguments; the code
        // alone tells the rest.
        if let Some(Reason::PolicyInvalid | Reason::PolicyTooLarge | Reason::PolicyTooDeep) =
            errors::reason(&status)
        {
            return CommandError::InvalidPolicy(message);
        }
        match status.code() {
            Code::AlreadyExists => CommandError::AlreadyExists(message),
            Code::NotFound => CommandError::NotFound(message),
            Code::InvalidArgument => CommandError::InvalidArgument(message),
            Code::Unauthenticated => CommandError::Unauthenticated(format!("{master}: {message}")),
            Code::PermissionDenied => {
                CommandError::PermissionDenied(format!("{master}: {message}"))
            }
            Code::Unavailable => CommandError::Unreachable(format!(
                "{master}: {}",
                masters::describe_status(&status)
            )),
            _ => CommandError::Master(format!("{master}: {}", masters::describe_status(&status))),
        }
    }
}

/// Awaits one call to `master`, failing after `timeout`.
async fn call<T>(
    master: &MasterAddr,
    options: &ClientOptions,
    timeout: Duration,
    request: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<T, CommandError> {
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(CommandError::from_status(status, master, options)),
        Err(_) => Err(CommandError::Master(format!(
            "{master}: no answer within {timeout:?}"
        ))),
    }
}

async fn connect<'a>(
    masters: &'a [MasterAddr],
    options: &ClientOptions,
    timeout: Duration,
) -> Result<(masters::Client, &'a MasterAddr), CommandError> {
    masters::connect_first(masters, options, timeout)
        .await
        .map_err(CommandError::Unreachable)
}

/// Inserts the policy of `args`; returns the completed policy's line.
pub async fn insert(
    masters: &[MasterAddr],
    options: &ClientOptions,
    timeout: Duration,
    args: &InsertArgs,
) -> Result<String, CommandError> {
    let policy_json = match (&args.policy, &args.policy_file) {
        (Some(text), _) => text.clone(),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).map_err(|e| {
                CommandError::Input(format!("cannot read the policy from stdin: {e}"))
            })?;
            text
        }
        (None, Some(path)) => std::fs::read_to_string(path).map_err(|e| {
            CommandError::Input(format!(
                "cannot read the policy from {}: {e}",
                path.display()
            ))
        })?,
        (None, None) => {
            return Err(CommandError::Input(
                "give the policy with --policy or --policy-file".into(),
            ));
        }
    };
    let (mut client, master) = connect(masters, options, timeout).await?;
    let response = call(
        master,
        options,
        timeout,
        client.insert_policy(pb::InsertPolicyRequest { policy_json }),
    )
    .await?;
    let policy = response
        .policy
        .ok_or_else(|| CommandError::Master(format!("{master}: the answer holds no policy")))?;
    Ok(policy.json)
}

/// Deletes the policy `id`; returns `{"id": ..., "seq": ...}`.
pub async fn delete(
    masters: &[MasterAddr],
    options: &ClientOptions,
    timeout: Duration,
    id: &str,
) -> Result<String, CommandError> {
    let (mut client, master) = connect(masters, options, timeout).await?;
    let response = call(
        master,
        options,
        timeout,
        client.delete_policy(pb::DeletePolicyRequest { id: id.to_string() }),
    )
    .await?;
    Ok(serde_json::json!({"id": id, "seq": response.seq}).to_string())
}

/// The policies of the local file of type `policy_type` (`None` or `*`: every type) whose
/// attributes match every condition, in ledger order: as a JSON array, one policy a line, or
/// as a [`table`].
///
/// Like AnyLog's readers it skips empty lines and an unfinished last line (what a member killed
/// in the middle of an append leaves until it restarts); any other line that is not a policy
/// is an error, since answering without it could be wrong.
pub fn get(
    path: &Path,
    policy_type: Option<&str>,
    conditions: &[(String, String)],
    format: GetFormat,
) -> Result<String, CommandError> {
    let file = std::fs::File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            CommandError::LocalFile(format!(
                "no ledger file at {} (has the member synced yet?)",
                path.display()
            ))
        } else {
            CommandError::LocalFile(format!("cannot read {}: {e}", path.display()))
        }
    })?;
    let policy_type = policy_type.filter(|t| *t != "*");
    let mut reader = BufReader::new(file);
    let mut matches = Vec::new();
    let mut bytes = Vec::new();
    for number in 1.. {
        bytes.clear();
        let read = reader
            .read_until(b'\n', &mut bytes)
            .map_err(|e| CommandError::LocalFile(format!("cannot read {}: {e}", path.display())))?;
        if read == 0 || bytes.last() != Some(&b'\n') {
            break;
        }
        let text = std::str::from_utf8(&bytes[..read - 1]).map_err(|_| {
            CommandError::LocalFile(format!("{} line {number} is not UTF-8", path.display()))
        })?;
        if text.trim().is_empty() {
            continue;
        }
        let (found_type, body) = policy::parse_stored(text).map_err(|e| {
            CommandError::LocalFile(format!(
                "{} line {number} is not a valid policy: {e}",
                path.display()
            ))
        })?;
        if policy_type.is_some_and(|t| t != found_type) {
            continue;
        }
        if conditions
            .iter()
            .all(|(key, value)| policy::attribute_matches(&body, key, value))
        {
            matches.push(text.to_string());
        }
    }
    if format == GetFormat::Table {
        return Ok(table(&matches));
    }
    if matches.is_empty() {
        return Ok("[]".into());
    }
    Ok(format!("[\n{}\n]", matches.join(",\n")))
}

/// The attributes a table shows besides type and id, when any listed policy has them: what
/// operators look for in AnyLog's node policies.
const TABLE_ATTRIBUTES: [&str; 4] = ["name", "company", "ip", "port"];

/// `lines` (stored policies) as aligned columns under a header: `type`, `id`, then those of
/// name, company, ip and port that any policy has. A string shows as its text, another value
/// as its JSON text, a missing one as `-`. No policy prints the header only.
pub fn table(lines: &[String]) -> String {
    let rows: Vec<(String, serde_json::Map<String, serde_json::Value>)> = lines
        .iter()
        .filter_map(|line| policy::parse_stored(line).ok())
        .collect();
    let shown: Vec<&str> = TABLE_ATTRIBUTES
        .into_iter()
        .filter(|key| rows.iter().any(|(_, body)| body.contains_key(*key)))
        .collect();
    let mut cells = vec![
        ["type", "id"]
            .into_iter()
            .chain(shown.iter().copied())
            .map(str::to_string)
            .collect::<Vec<_>>(),
    ];
    for (kind, body) in &rows {
        let text = |key: &str| match body.get(key) {
            Some(serde_json::Value::String(s)) => terminal_safe(s),
            Some(other) => other.to_string(),
            None => "-".to_string(),
        };
        let mut row = vec![terminal_safe(kind), text("id")];
        row.extend(shown.iter().map(|key| text(key)));
        cells.push(row);
    }
    aligned(&cells)
}

/// `cells` (a header row first) as aligned columns, two spaces apart.
fn aligned(cells: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..cells[0].len())
        .map(|column| {
            cells
                .iter()
                .map(|row| row[column].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    cells
        .iter()
        .map(|row| {
            let line: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect();
            line.join("  ").trim_end().to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `text` as a table cell on an operator's terminal: control characters (an ESC that would
/// start a terminal sequence, a line break that would forge a row) are shown escaped, as Rust
/// escapes them (`\u{1b}`, `\n`), and so is a backslash, so an escape cannot be forged either.
fn terminal_safe(text: &str) -> String {
    let mut safe = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control()
            || c == '\\'
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        {
            safe.extend(c.escape_debug());
        } else {
            safe.push(c);
        }
    }
    safe
}

/// The subscribers of the first master that answers (`ListSubscribers`: its streams, and the
/// members below its relays) as a table, the largest lag first: a line with the master and its
/// head seq, then `node`, `via`, `peer`, `identity`, `since` (UTC), `sent`, `durable`, `lag`,
/// `bytes` (`-` for an empty text).
pub async fn subscribers(
    masters: &[MasterAddr],
    options: &ClientOptions,
    timeout: Duration,
) -> Result<String, CommandError> {
    let (mut client, master) = connect(masters, options, timeout).await?;
    let list = call(
        master,
        options,
        timeout,
        client.list_subscribers(pb::ListSubscribersRequest {}),
    )
    .await?;
    Ok(format!(
        "master {master} head_seq {} subscribers {}\n{}",
        list.head_seq,
        list.subscribers.len(),
        subscriber_table(list.subscribers)
    ))
}

/// The rows of `member status --all`, the largest lag first (then by via and node name).
pub fn subscriber_table(mut subscribers: Vec<pb::SubscriberStatus>) -> String {
    subscribers.sort_by(|a, b| {
        b.lag
            .cmp(&a.lag)
            .then_with(|| a.via.cmp(&b.via))
            .then_with(|| a.node_name.cmp(&b.node_name))
    });
    let text = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            terminal_safe(s)
        }
    };
    let mut cells = vec![
        [
            "node", "via", "peer", "identity", "since", "sent", "durable", "lag", "bytes",
        ]
        .map(str::to_string)
        .to_vec(),
    ];
    for s in &subscribers {
        let since = chrono::DateTime::from_timestamp_millis(s.since_unix_ms).map_or_else(
            || "-".to_string(),
            |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        );
        cells.push(vec![
            text(&s.node_name),
            text(&s.via),
            text(&s.peer),
            text(&s.identity),
            since,
            s.sent_seq.to_string(),
            s.durable_seq.to_string(),
            s.lag.to_string(),
            s.bytes_sent.to_string(),
        ]);
    }
    aligned(&cells)
}

/// The local file against the master, as a JSON object: `applied_seq`, `head_seq`, `lag`,
/// `file_md5`, `master_digest`, `in_sync`, the policy counts, and which master answered.
pub async fn status(
    masters: &[MasterAddr],
    options: &ClientOptions,
    timeout: Duration,
    path: &Path,
) -> Result<String, CommandError> {
    let paths = LedgerPaths::new(path);
    let (applied_seq, state_error) = match SyncState::load(&paths) {
        Ok(state) => (state.map(|s| s.seq), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let (file_md5, file_policies) = match digest(path) {
        Ok(found) => found.unzip(),
        Err(e) => return Err(CommandError::LocalFile(e)),
    };
    let (mut client, master) = connect(masters, options, timeout).await?;
    let info = call(
        master,
        options,
        timeout,
        client.get_ledger_info(pb::GetLedgerInfoRequest {}),
    )
    .await?;
    let lag = applied_seq.map(|applied| info.head_seq.saturating_sub(applied));
    let in_sync = applied_seq == Some(info.head_seq) && file_md5.as_deref() == Some(&info.digest);
    let mut status = serde_json::json!({
        "master": master.to_string(),
        "ledger_file": path.display().to_string(),
        "applied_seq": applied_seq,
        "head_seq": info.head_seq,
        "lag": lag,
        "file_md5": file_md5,
        "master_digest": info.digest,
        "in_sync": in_sync,
        "file_policies": file_policies,
        "master_policies": info.policy_count,
    });
    if let Some(error) = state_error {
        status["state_error"] = error.into();
    }
    // Beside an EdgeLake node: the lines it wrote into the file, and its reloads.
    if let Some(sidecar) = crate::sidecar::read(&crate::sidecar::sidecar_path(path)) {
        status["foreign_lines"] = sidecar["foreign"].clone();
        status["node"] = sidecar["node"].clone();
    }
    let journal = crate::foreign::ForeignFiles::new(path);
    if let Ok(pending) = journal.pending()
        && !pending.is_empty()
    {
        status["foreign_lines_pending"] = pending.len().into();
    }
    Ok(status.to_string())
}

/// The md5 hex and line count of the file; `None` when it does not exist.
fn digest(path: &Path) -> Result<Option<(String, u64)>, String> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut digest = LedgerDigest::new();
    let mut lines = 0;
    loop {
        let chunk = reader
            .fill_buf()
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if chunk.is_empty() {
            break;
        }
        digest.push_bytes(chunk);
        lines += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
        let consumed = chunk.len();
        reader.consume(consumed);
    }
    Ok(Some((digest.hex(), lines)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_are_listed_the_largest_lag_first_their_names_escaped() {
        let at = |node: &str, via: &str, durable_seq: u64, lag: u64| pb::SubscriberStatus {
            node_name: node.into(),
            via: via.into(),
            peer: "127.0.0.1:4000".into(),
            since_unix_ms: 1_700_000_000_000,
            sent_seq: 9,
            durable_seq,
            lag,
            bytes_sent: 1234,
            ..Default::default()
        };
        let text = subscriber_table(vec![
            at("m1", "", 9, 0),
            at("m2", "relay-a", 4, 5),
            at("evil\n\u{1b}[2J", "", 8, 1),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            [
                "node", "via", "peer", "identity", "since", "sent", "durable", "lag", "bytes"
            ]
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            [
                "m2",
                "relay-a",
                "127.0.0.1:4000",
                "-",
                "2023-11-14T22:13:20Z",
                "9",
                "4",
                "5",
                "1234"
            ]
        );
        assert!(lines[2].starts_with("evil\\n\\u{1b}[2J "), "{text}");
        assert!(lines[3].starts_with("m1 "), "{text}");
        // Empty: the header alone.
        assert_eq!(subscriber_table(Vec::new()).lines().count(), 1);
    }

    #[test]
    fn a_table_aligns_the_columns_that_appear() {
        let lines = [
            r#"{"operator": {"name": "op1", "port": 32148, "id": "a1"}}"#.to_string(),
            r#"{"table": {"name": "readings", "id": "b22"}}"#.to_string(),
        ];
        assert_eq!(
            table(&lines),
            "type      id   name      port\n\
             operator  a1   op1       32148\n\
             table     b22  readings  -"
        );
        assert_eq!(table(&[]), "type  id");
    }

    /// A hostile name cannot move the cursor, clear the screen or forge a row (issue 15, point 9).
    #[test]
    fn table_cells_are_escaped() {
        let lines = [
            r#"{"operator": {"name": "x\u001b[2J\u001b[1;1Hfake  row\nop2\r\t\\ok \u202e", "id": "a\u0007"}}"#
                .to_string(),
        ];
        let shown = table(&lines);
        assert!(
            !shown.chars().any(|c| c.is_control() && c != '\n'),
            "{shown:?}"
        );
        assert_eq!(shown.lines().count(), 2, "{shown}");
        assert!(
            shown.contains(r"x\u{1b}[2J\u{1b}[1;1Hfake  row\nop2\r\t\\ok \u{202e}"),
            "{shown}"
        );
        assert!(shown.contains(r"a\u{7}"), "{shown}");
    }
}
