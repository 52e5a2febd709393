//! Bytes someone else wrote into the ledger file: an EdgeLake node beside the member appends a
//! line for `blockchain insert ... local=true` (a policy with `"ledger": "local"`) and for a
//! local delete (a `deleted` policy naming the id). The member never overwrites them nor drops
//! them silently:
//!
//! 1. [`crate::ledger_file`] finds them (after its own append, before it would write, at
//!    start-up, or when the sync loop looks) and records them in the *journal*
//!    (`blockchain.json.foreign-pending`, fsynced) before it takes them out of the file, which
//!    stays a clean copy of the ledger;
//! 2. [`settle`] deals with each journaled line once a master answers: a local policy is
//!    inserted (as `"ledger": "global"`, id and date kept, so a duplicate means it is already
//!    there) and comes back through the stream in seq order; a local delete is sent as a
//!    delete; a line that is already the ledger's is dropped; anything else (a partial line,
//!    not JSON, not a policy, a policy the master refuses) is set aside in
//!    `blockchain.json.foreign` with the reason, and counted;
//! 3. the journal is removed once every line is dealt with. A crash in between deals with the
//!    journal again at the next start: inserts of the same id are duplicates, deletes of a
//!    deleted id are not found, both harmless.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use ledger_anylog::policy;
use ledger_anylog::pyformat::json_dumps;
use ledger_proto::errors::{self, Reason};
use ledger_proto::pb;
use serde_json::{Value, json};
use tonic::Code;

use crate::sidecar::{ForeignOutcome, Sidecar};

/// One run of foreign bytes: a line (or what is left of one) and where it was in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Its first byte's offset in the ledger file when it was found.
    pub from: u64,
    /// The offset after its last byte.
    pub to: u64,
    /// The bytes, with their line break when they had one.
    pub bytes: Vec<u8>,
}

/// The files of foreign bytes beside the ledger file.
#[derive(Debug, Clone)]
pub struct ForeignFiles {
    /// The ledger file they come from.
    pub ledger: PathBuf,
    /// Pieces found and not dealt with yet (JSON lines, fsynced).
    pub journal: PathBuf,
    /// Pieces set aside, with the reason (JSON lines).
    pub set_aside: PathBuf,
}

impl ForeignFiles {
    /// The files beside the ledger file `ledger_file`.
    pub fn new(ledger_file: &Path) -> ForeignFiles {
        let with_suffix = |suffix: &str| {
            let mut name = ledger_file.as_os_str().to_owned();
            name.push(suffix);
            PathBuf::from(name)
        };
        ForeignFiles {
            ledger: ledger_file.to_path_buf(),
            journal: with_suffix(".foreign-pending"),
            set_aside: with_suffix(".foreign"),
        }
    }

    /// Records `bytes`, found at `offset` of the ledger file, durably in the journal, one piece
    /// a line. Returns the pieces.
    pub fn journal(&self, offset: u64, bytes: &[u8]) -> io::Result<Vec<Piece>> {
        let pieces = split_lines(offset, bytes);
        if pieces.is_empty() {
            return Ok(pieces);
        }
        // Each piece gets a key of its own, which its line in `.foreign` carries: a piece set
        // aside before a crash, and dealt with again after it, is not set aside twice.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let mut text = String::new();
        for piece in &pieces {
            let mut entry = piece_json(piece, None);
            entry["key"] = format!("{now:x}-{}-{}", piece.from, piece.to).into();
            text.push_str(&entry.to_string());
            text.push('\n');
            tracing::warn!(
                bytes = %format!("{}..{}", piece.from, piece.to),
                "found bytes in {} that the member did not write; moved them to {} to deal with",
                self.ledger.display(),
                self.journal.display()
            );
        }
        append_synced(&self.journal, text.as_bytes())?;
        Ok(pieces)
    }

    /// The pieces journaled and not dealt with yet.
    pub fn pending(&self) -> io::Result<Vec<Piece>> {
        Ok(self
            .pending_keyed()?
            .into_iter()
            .map(|(_, piece)| piece)
            .collect())
    }

    /// [`ForeignFiles::pending`], each with its key.
    fn pending_keyed(&self) -> io::Result<Vec<(String, Piece)>> {
        let text = match std::fs::read(&self.journal) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        // A line torn by a crash while journaling was not recorded yet: its bytes are still in
        // the ledger file, which start-up journals again. So is a piece journaled before a
        // crash that came before the file was put right: the same bytes at the same place,
        // dealt with once.
        let mut seen = std::collections::HashSet::new();
        Ok(text
            .split(|b| *b == b'\n')
            .filter_map(|line| serde_json::from_slice::<Value>(line).ok())
            .filter_map(|entry| {
                let key = entry["key"].as_str().unwrap_or_default().to_string();
                Some((key, piece_from_json(&entry)?))
            })
            .filter(|(_, piece)| seen.insert((piece.from, piece.to, piece.bytes.clone())))
            .collect())
    }

    /// The keys of the pieces already in `.foreign`, and how many lines it holds.
    fn set_aside_keys(&self) -> io::Result<(std::collections::HashSet<String>, u64)> {
        let text = match std::fs::read(&self.set_aside) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Default::default()),
            Err(e) => return Err(e),
        };
        let entries: Vec<Value> = text
            .split(|b| *b == b'\n')
            .filter_map(|line| serde_json::from_slice(line).ok())
            .collect();
        let keys = entries
            .iter()
            .filter_map(|e| e["key"].as_str().map(str::to_string))
            .collect();
        Ok((keys, entries.len() as u64))
    }

    /// Removes the journal: every pending piece is dealt with.
    pub fn clear(&self) -> io::Result<()> {
        match std::fs::remove_file(&self.journal) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn set_aside(&self, key: &str, piece: &Piece, reason: &str) -> io::Result<()> {
        tracing::warn!(
            bytes = %format!("{}..{}", piece.from, piece.to),
            "set a line the member did not write aside in {}: {reason}",
            self.set_aside.display()
        );
        let mut entry = piece_json(piece, Some(reason));
        entry["key"] = key.into();
        let mut line = entry.to_string();
        line.push('\n');
        append_synced(&self.set_aside, line.as_bytes())
    }
}

/// Splits foreign bytes into lines; the last piece has no line break when the bytes end inside
/// a line.
pub fn split_lines(offset: u64, bytes: &[u8]) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut start = 0;
    while start < bytes.len() {
        let end = bytes[start..]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(bytes.len(), |at| start + at + 1);
        pieces.push(Piece {
            from: offset + start as u64,
            to: offset + end as u64,
            bytes: bytes[start..end].to_vec(),
        });
        start = end;
    }
    pieces
}

/// What a foreign line is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Foreign {
    /// A node's local policy: insert it, as this global policy text.
    LocalPolicy {
        /// Its id.
        id: String,
        /// The policy with `"ledger": "global"` in place of `"local"`.
        json: String,
    },
    /// A node's local delete of `id`.
    LocalDelete(String),
    /// A policy that is not local: the ledger's own line (written by this member and not
    /// recorded before a crash) if the master holds exactly it.
    Policy {
        /// Its id.
        id: String,
        /// The line without its line break.
        json: String,
    },
    /// Anything else: set aside for this reason.
    Unusable(String),
}

/// Tells what one foreign line is.
pub fn classify(piece: &Piece) -> Foreign {
    let Some(line) = piece.bytes.strip_suffix(b"\n") else {
        return Foreign::Unusable("a partial line (no line break)".into());
    };
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Ok(text) = std::str::from_utf8(line) else {
        return Foreign::Unusable("not UTF-8 text".into());
    };
    if text.trim().is_empty() {
        return Foreign::Unusable("an empty line".into());
    }
    let (policy_type, mut body) = match policy::parse_stored(text) {
        Ok(parsed) => parsed,
        Err(e) => return Foreign::Unusable(format!("not a policy: {e}")),
    };
    let Some(id) = body.get("id").and_then(Value::as_str).map(str::to_string) else {
        return Foreign::Unusable("a policy without an id".into());
    };
    let local = body
        .get("ledger")
        .and_then(Value::as_str)
        .is_some_and(|ledger| ledger.eq_ignore_ascii_case("local"));
    if !local {
        return Foreign::Policy {
            id,
            json: text.to_string(),
        };
    }
    if policy_type == "deleted" {
        return Foreign::LocalDelete(id);
    }
    // As a node re-sends its local policies after a merge: `ledger` becomes global in place.
    body.insert("ledger".into(), Value::String(policy::LEDGER_GLOBAL.into()));
    let mut root = serde_json::Map::new();
    root.insert(policy_type, Value::Object(body));
    Foreign::LocalPolicy {
        id,
        json: json_dumps(&Value::Object(root)),
    }
}

/// Why [`settle`] stopped before the end of the journal.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// The master could not be asked: try again later.
    #[error("the master did not answer: {0}")]
    Master(String),
    /// The journal or the set-aside file could not be read or written.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Deals with every journaled piece through `client` (see the module's documentation), then
/// removes the journal. Returns how many pieces it dealt with.
pub async fn settle(
    files: &ForeignFiles,
    client: &mut ledger_client::masters::Client,
    sidecar: &Sidecar,
) -> Result<usize, SettleError> {
    let pieces = files.pending_keyed()?;
    if pieces.is_empty() {
        files.clear()?;
        return Ok(0);
    }
    let (mut already_aside, _) = files.set_aside_keys()?;
    let mut dealt = 0;
    for (key, piece) in &pieces {
        let range = (piece.from, piece.to);
        let set_aside = |reason: String, already_aside: &mut std::collections::HashSet<String>| {
            // Set aside before a crash that came before the journal was removed: once only.
            if !key.is_empty() && !already_aside.insert(key.clone()) {
                return Ok::<(), io::Error>(());
            }
            files.set_aside(key, piece, &reason)?;
            let (_, count) = files.set_aside_keys()?;
            sidecar.foreign_set_aside(range, &reason, count);
            Ok(())
        };
        match classify(piece) {
            Foreign::LocalPolicy { id, json } => {
                let answer = client
                    .insert_policy(pb::InsertPolicyRequest { policy_json: json })
                    .await;
                match answer {
                    Ok(_) => sidecar.foreign_line(ForeignOutcome::Pushed, range, &id),
                    // Already there: pushed before (a crash came before the journal was removed),
                    // or the master had it.
                    Err(status) if errors::reason(&status) == Some(Reason::PolicyExists) => {
                        sidecar.foreign_line(ForeignOutcome::Pushed, range, &id)
                    }
                    Err(status) if refused(&status) => set_aside(
                        format!(
                            "the master refused local policy {id:?}: {}",
                            status.message()
                        ),
                        &mut already_aside,
                    )?,
                    Err(status) => return Err(SettleError::Master(status.message().to_string())),
                }
                tracing::info!(%id, "pushed a local policy the node wrote into the ledger file");
            }
            Foreign::LocalDelete(id) => {
                let answer = client
                    .delete_policy(pb::DeletePolicyRequest { id: id.clone() })
                    .await;
                match answer {
                    Ok(_) => sidecar.foreign_line(ForeignOutcome::Deleted, range, &id),
                    Err(status) if errors::reason(&status) == Some(Reason::PolicyNotFound) => {
                        sidecar.foreign_line(ForeignOutcome::Deleted, range, &id)
                    }
                    Err(status) if refused(&status) => set_aside(
                        format!(
                            "the master refused the delete of {id:?}: {}",
                            status.message()
                        ),
                        &mut already_aside,
                    )?,
                    Err(status) => return Err(SettleError::Master(status.message().to_string())),
                }
                tracing::info!(%id, "sent the master a local delete the node wrote into the ledger file");
            }
            Foreign::Policy { id, json } => {
                let stored = client
                    .get_policy(pb::GetPolicyRequest { id: id.clone() })
                    .await;
                match stored {
                    Ok(stored)
                        if stored
                            .get_ref()
                            .policy
                            .as_ref()
                            .is_some_and(|p| p.json == json) =>
                    {
                        tracing::debug!(%id, "a foreign line is the ledger's own: dropped");
                    }
                    Ok(_) => set_aside(
                        format!(
                            "policy {id:?} is not local and the ledger holds another version of it"
                        ),
                        &mut already_aside,
                    )?,
                    Err(status) if errors::reason(&status) == Some(Reason::PolicyNotFound) => {
                        set_aside(
                            format!("policy {id:?} is not local and not in the ledger"),
                            &mut already_aside,
                        )?
                    }
                    Err(status) => return Err(SettleError::Master(status.message().to_string())),
                }
            }
            Foreign::Unusable(reason) => set_aside(reason, &mut already_aside)?,
        }
        dealt += 1;
    }
    files.clear()?;
    Ok(dealt)
}

/// Whether the master refused the request itself (which retrying cannot change), rather than
/// failing to answer.
fn refused(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::InvalidArgument
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::FailedPrecondition
            | Code::OutOfRange
    )
}

fn piece_json(piece: &Piece, reason: Option<&str>) -> Value {
    let mut entry = json!({"from": piece.from, "to": piece.to});
    match std::str::from_utf8(&piece.bytes) {
        Ok(text) => entry["text"] = text.into(),
        Err(_) => entry["hex"] = hex::encode(&piece.bytes).into(),
    }
    if let Some(reason) = reason {
        entry["reason"] = reason.into();
        entry["at"] = ledger_anylog::date::format_date(chrono::Utc::now()).into();
    }
    entry
}

fn piece_from_json(entry: &Value) -> Option<Piece> {
    let bytes = match (entry["text"].as_str(), entry["hex"].as_str()) {
        (Some(text), _) => text.as_bytes().to_vec(),
        (None, Some(hex_text)) => hex::decode(hex_text).ok()?,
        _ => return None,
    };
    Some(Piece {
        from: entry["from"].as_u64()?,
        to: entry["to"].as_u64()?,
        bytes,
    })
}

fn append_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let created = !path.exists();
    let mut file: File = OpenOptions::new().create(true).append(true).open(path)?;
    file.write_all(bytes)?;
    file.sync_data()?;
    if created && let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_with_their_ranges() {
        let pieces = split_lines(100, b"ab\ncd\nef");
        assert_eq!(
            pieces,
            [
                Piece {
                    from: 100,
                    to: 103,
                    bytes: b"ab\n".to_vec()
                },
                Piece {
                    from: 103,
                    to: 106,
                    bytes: b"cd\n".to_vec()
                },
                Piece {
                    from: 106,
                    to: 108,
                    bytes: b"ef".to_vec()
                },
            ]
        );
        assert!(split_lines(0, b"").is_empty());
    }

    fn piece(text: &str) -> Piece {
        Piece {
            from: 0,
            to: text.len() as u64,
            bytes: text.as_bytes().to_vec(),
        }
    }

    #[test]
    fn what_a_node_appends() {
        // `blockchain insert ... local=true`: global in place, id and date kept.
        assert_eq!(
            classify(&piece(
                "{\"config\": {\"name\": \"n\", \"id\": \"i1\", \"date\": \"2026-12-01T00:00:00.000000Z\", \"ledger\": \"local\", \"x\": 1}}\n"
            )),
            Foreign::LocalPolicy {
                id: "i1".into(),
                json: "{\"config\": {\"name\": \"n\", \"id\": \"i1\", \"date\": \"2026-12-01T00:00:00.000000Z\", \"ledger\": \"global\", \"x\": 1}}".into()
            }
        );
        // A local delete, with EdgeLake's spacing.
        assert_eq!(
            classify(&piece(
                "{\"deleted\": { \"id\" : \"i2\", \"ledger\" : \"local\" }}\n"
            )),
            Foreign::LocalDelete("i2".into())
        );
        assert_eq!(
            classify(&piece(
                "{\"config\": {\"id\": \"i3\", \"ledger\": \"global\"}}\r\n"
            )),
            Foreign::Policy {
                id: "i3".into(),
                json: "{\"config\": {\"id\": \"i3\", \"ledger\": \"global\"}}".into()
            }
        );
        for (text, why) in [
            (
                "fa3e578a08939689\", \"date\": \"x\", \"ledger\": \"local\"}}\n",
                "not a policy",
            ),
            (
                "{\"config\": {\"id\": \"i4\", \"ledger\": \"local\"",
                "partial",
            ),
            ("{\"config\": {\"ledger\": \"local\"}}\n", "without an id"),
            ("[1, 2]\n", "not a policy"),
            ("\n", "empty"),
        ] {
            match classify(&piece(text)) {
                Foreign::Unusable(reason) => assert!(reason.contains(why), "{text}: {reason}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        let garbage = Piece {
            from: 0,
            to: 3,
            bytes: vec![0xff, 0xfe, b'\n'],
        };
        assert!(matches!(classify(&garbage), Foreign::Unusable(r) if r.contains("UTF-8")));
    }

    #[test]
    fn the_journal_keeps_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let files = ForeignFiles::new(&dir.path().join("blockchain.json"));
        assert!(files.pending().unwrap().is_empty());
        files.journal(10, b"line one\n").unwrap();
        files.journal(19, &[0xff, b'x', b'\n', b'y']).unwrap();
        // Journaled again after a crash: once.
        files.journal(10, b"line one\n").unwrap();
        let pending = files.pending().unwrap();
        assert_eq!(
            pending,
            [
                Piece {
                    from: 10,
                    to: 19,
                    bytes: b"line one\n".to_vec()
                },
                Piece {
                    from: 19,
                    to: 22,
                    bytes: vec![0xff, b'x', b'\n']
                },
                Piece {
                    from: 22,
                    to: 23,
                    bytes: b"y".to_vec()
                },
            ]
        );
        files.clear().unwrap();
        assert!(files.pending().unwrap().is_empty());
    }
}
