//! The state record kept beside the ledger file: which seq the file holds, how long the file is
//! at that seq, and an interrupted rewrite's target.
//!
//! The record is small text, replaced as a whole (temporary file, fsync, rename, directory
//! fsync), so a crash leaves either the old or the new record, never a mix; it also ends with
//! the md5 of its lines, so a record damaged in any other way is recognised rather than trusted.
//!
//! ```text
//! ledger-member-state 1
//! seq 1042
//! len 318220
//! pending-seq 1043        (only while a rewrite is being swapped in)
//! pending-len 317990
//! md5 5d41402abc4b2a76b9719d911017c592
//! ```

use std::io::Write;
use std::path::Path;

use md5::{Digest, Md5};

use crate::paths::LedgerPaths;

/// The first line of every record, with the format's version.
const MAGIC: &str = "ledger-member-state 1";

/// A rewritten ledger file that is about to replace the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingRewrite {
    /// The seq the rewritten file holds.
    pub seq: u64,
    /// Its length in bytes.
    pub len: u64,
}

/// What the ledger file holds, as last made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncState {
    /// Every change up to this seq is in the file, and none after it.
    pub seq: u64,
    /// The file's length at `seq`: anything past it was written but never recorded.
    pub len: u64,
    /// Set while a rewritten file (`.tmp`) is swapped in; `seq` and `len` still describe the
    /// file it replaces.
    pub pending: Option<PendingRewrite>,
}

/// Why the state record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The record exists but is not one this member wrote intact.
    #[error("the state file {path} is damaged: {reason}")]
    Damaged {
        /// The state file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading or writing it failed.
    #[error("cannot {action} the state file {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: String,
        /// The failure.
        source: std::io::Error,
    },
}

impl SyncState {
    /// The state of a member that holds nothing yet.
    pub const EMPTY: SyncState = SyncState {
        seq: 0,
        len: 0,
        pending: None,
    };

    /// The record's text.
    pub fn encode(&self) -> String {
        let mut text = format!("{MAGIC}\nseq {}\nlen {}\n", self.seq, self.len);
        if let Some(pending) = self.pending {
            text.push_str(&format!(
                "pending-seq {}\npending-len {}\n",
                pending.seq, pending.len
            ));
        }
        let md5 = hex::encode(Md5::digest(text.as_bytes()));
        text.push_str(&format!("md5 {md5}\n"));
        text
    }

    /// Reads a record's text; the error says what is wrong with it.
    pub fn decode(text: &str) -> Result<SyncState, String> {
        let body_end = text
            .trim_end_matches('\n')
            .rfind('\n')
            .map(|at| at + 1)
            .ok_or("it has no checksum line")?;
        let (body, checksum) = text.split_at(body_end);
        let expected = checksum
            .trim_end_matches('\n')
            .strip_prefix("md5 ")
            .ok_or("its last line is not the checksum")?;
        if hex::encode(Md5::digest(body.as_bytes())) != expected {
            return Err("its checksum does not match its content".into());
        }
        let mut lines = body.lines();
        if lines.next() != Some(MAGIC) {
            return Err(format!("it does not start with {MAGIC:?}"));
        }
        let (mut seq, mut len, mut pending_seq, mut pending_len) = (None, None, None, None);
        for line in lines {
            let (key, value) = line
                .split_once(' ')
                .ok_or_else(|| format!("line {line:?} is not `key value`"))?;
            let value: u64 = value
                .parse()
                .map_err(|_| format!("{key} {value:?} is not a number"))?;
            let slot = match key {
                "seq" => &mut seq,
                "len" => &mut len,
                "pending-seq" => &mut pending_seq,
                "pending-len" => &mut pending_len,
                other => return Err(format!("unknown key {other:?}")),
            };
            if slot.replace(value).is_some() {
                return Err(format!("{key} appears twice"));
            }
        }
        let pending = match (pending_seq, pending_len) {
            (Some(seq), Some(len)) => Some(PendingRewrite { seq, len }),
            (None, None) => None,
            _ => return Err("it has half of a pending rewrite".into()),
        };
        Ok(SyncState {
            seq: seq.ok_or("it has no seq")?,
            len: len.ok_or("it has no len")?,
            pending,
        })
    }

    /// The record beside the ledger file; `None` when there is none.
    pub fn load(paths: &LedgerPaths) -> Result<Option<SyncState>, StateError> {
        let text = match std::fs::read(&paths.state) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(io_error("read", &paths.state, source)),
        };
        let damaged = |reason: String| StateError::Damaged {
            path: paths.state.display().to_string(),
            reason,
        };
        let text = String::from_utf8(text).map_err(|_| damaged("it is not text".into()))?;
        SyncState::decode(&text).map(Some).map_err(damaged)
    }

    /// Replaces the record durably: once this returns, a crash leaves this record.
    pub fn store(&self, paths: &LedgerPaths) -> Result<(), StateError> {
        let write = || -> std::io::Result<()> {
            let mut tmp = std::fs::File::create(&paths.state_tmp)?;
            tmp.write_all(self.encode().as_bytes())?;
            tmp.sync_all()?;
            std::fs::rename(&paths.state_tmp, &paths.state)?;
            paths.sync_dir()
        };
        write().map_err(|source| io_error("write", &paths.state, source))
    }
}

fn io_error(action: &'static str, path: &Path, source: std::io::Error) -> StateError {
    StateError::Io {
        action,
        path: path.display().to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back() {
        for state in [
            SyncState::EMPTY,
            SyncState {
                seq: 1042,
                len: 318220,
                pending: Some(PendingRewrite {
                    seq: 1043,
                    len: 317990,
                }),
            },
        ] {
            assert_eq!(SyncState::decode(&state.encode()), Ok(state));
        }
    }

    #[test]
    fn any_damage_is_recognised() {
        let text = SyncState {
            seq: 7,
            len: 700,
            pending: None,
        }
        .encode();
        // A flipped digit, a torn record, an empty one, a record with a valid checksum but a
        // field missing.
        assert!(SyncState::decode(&text.replace("seq 7", "seq 8")).is_err());
        assert!(SyncState::decode(&text[..text.len() / 2]).is_err());
        assert!(SyncState::decode("").is_err());
        let body = format!("{MAGIC}\nseq 3\n");
        let unsound = format!("{body}md5 {}\n", hex::encode(Md5::digest(body.as_bytes())));
        assert_eq!(SyncState::decode(&unsound), Err("it has no len".into()));
    }

    #[test]
    fn store_replaces_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let paths = LedgerPaths::new(&dir.path().join("blockchain.json"));
        assert_eq!(SyncState::load(&paths).unwrap(), None);
        let state = SyncState {
            seq: 5,
            len: 50,
            pending: None,
        };
        state.store(&paths).unwrap();
        assert_eq!(SyncState::load(&paths).unwrap(), Some(state));
        assert!(!paths.state_tmp.exists());
        std::fs::write(&paths.state, "seq 5\n").unwrap();
        assert!(matches!(
            SyncState::load(&paths),
            Err(StateError::Damaged { .. })
        ));
    }
}
