//! The state record kept beside the ledger file: which seq the file holds, how long the file is
//! at that seq, the md5 of those bytes, and an interrupted rewrite's target.
//!
//! The state file has two fixed-size slots, each holding one record with a generation number;
//! the record with the highest generation among the intact ones is the state. A new record
//! overwrites the *other* slot in place and is made durable with one `fdatasync`: a crash during
//! the write tears at most that slot, and the previous record, still whole in its slot, is read
//! instead (which is what a crash just before the write would have left). Writing in place costs
//! one data flush per applied batch, where replacing a file costs a new inode, a rename and two
//! journal commits. Each record ends with the md5 of its lines, so a torn or damaged one is
//! recognised rather than trusted.
//!
//! ```text
//! ledger-member-state 3
//! gen 57
//! seq 1042
//! len 318220
//! file-md5 0f343b0931126a20f133d67c2b018a3b
//! pending-seq 1043        (only while a rewrite is being swapped in)
//! pending-len 317990
//! pending-md5 9e107d9d372bb6826bd81d3542a419d6
//! md5 5d41402abc4b2a76b9719d911017c592
//! ```
//!
//! (then line breaks up to the slot's end). `file-md5` is the md5 of the file's first `len`
//! bytes: what lets start-up recognise a file changed outside the member even when every line is
//! still a valid policy. At `seq` it is the master's `GetLedgerInfo` digest, since the file is
//! the same bytes.
//!
//! Format 3 is the only one: the formats before it were never released. A state file in any
//! other shape is damaged, and the member resyncs from seq 0 rather than trust it.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use ledger_anylog::digest::LedgerDigest;
// The record's own checksum, which is not a ledger's digest.
use md5::{Digest, Md5};

use crate::paths::LedgerPaths;

/// The record format this member writes and reads.
const VERSION: u32 = 3;

/// The size of each of the state file's two slots; a record is at most about 300 bytes.
const SLOT: usize = 512;

/// The first word of every record, followed by the format's version.
const MAGIC: &str = "ledger-member-state";

/// The md5 of a ledger file's content (of its first `len` bytes): the ledger's digest
/// ([`LedgerDigest`]) at the recorded seq, kept as its 16 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileMd5(pub [u8; 16]);

impl FileMd5 {
    /// The md5 of no bytes: an empty or missing file.
    pub const EMPTY: FileMd5 = FileMd5([
        0xd4, 0x1d, 0x8c, 0xd9, 0x8f, 0x00, 0xb2, 0x04, 0xe9, 0x80, 0x09, 0x98, 0xec, 0xf8, 0x42,
        0x7e,
    ]);

    /// The md5 of a file holding `bytes`.
    pub fn of(bytes: &[u8]) -> FileMd5 {
        let mut digest = LedgerDigest::new();
        digest.push_bytes(bytes);
        FileMd5::of_digest(&digest)
    }

    /// The md5 of what `digest` has seen so far; the digest can go on.
    pub fn of_digest(digest: &LedgerDigest) -> FileMd5 {
        FileMd5(digest.md5())
    }

    /// Reads 32 hex digits.
    pub fn parse(hex_text: &str) -> Option<FileMd5> {
        let mut bytes = [0; 16];
        hex::decode_to_slice(hex_text, &mut bytes).ok()?;
        Some(FileMd5(bytes))
    }
}

impl fmt::Display for FileMd5 {
    /// Lower-case hex, as the master's `GetLedgerInfo.digest`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for FileMd5 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FileMd5({self})")
    }
}

/// A rewritten ledger file that is about to replace the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingRewrite {
    /// The seq the rewritten file holds.
    pub seq: u64,
    /// Its length in bytes.
    pub len: u64,
    /// Its md5.
    pub md5: FileMd5,
}

/// What the ledger file holds, as last made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncState {
    /// Every change up to this seq is in the file, and none after it.
    pub seq: u64,
    /// The file's length at `seq`: anything past it was written but never recorded.
    pub len: u64,
    /// The md5 of the file's first `len` bytes.
    pub md5: FileMd5,
    /// Set while a rewritten file (`.tmp`) is swapped in; `seq`, `len` and `md5` still describe
    /// the file it replaces.
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
        md5: FileMd5::EMPTY,
        pending: None,
    };

    /// The record's text, as generation `generation` (its `gen` line).
    pub fn encode(&self, generation: u64) -> String {
        let mut text = format!(
            "{MAGIC} {VERSION}\ngen {generation}\nseq {}\nlen {}\nfile-md5 {}\n",
            self.seq, self.len, self.md5
        );
        if let Some(pending) = self.pending {
            text.push_str(&format!(
                "pending-seq {}\npending-len {}\npending-md5 {}\n",
                pending.seq, pending.len, pending.md5
            ));
        }
        let md5 = hex::encode(Md5::digest(text.as_bytes()));
        text.push_str(&format!("md5 {md5}\n"));
        text
    }

    /// Reads a record's text; the error says what is wrong with it.
    pub fn decode(text: &str) -> Result<SyncState, String> {
        Self::decode_record(text).map(|(state, _)| state)
    }

    /// Reads a record's text and its generation.
    fn decode_record(text: &str) -> Result<(SyncState, u64), String> {
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
        let version: u32 = lines
            .next()
            .and_then(|first| first.strip_prefix(MAGIC)?.strip_prefix(' ')?.parse().ok())
            .ok_or_else(|| format!("it does not start with {MAGIC:?} and a version"))?;
        if version != VERSION {
            return Err(format!(
                "its format {version} is not this member's {VERSION}"
            ));
        }
        let (mut seq, mut len, mut pending_seq, mut pending_len) = (None, None, None, None);
        let mut generation = None;
        let (mut md5, mut pending_md5) = (None, None);
        for line in lines {
            let (key, value) = line
                .split_once(' ')
                .ok_or_else(|| format!("line {line:?} is not `key value`"))?;
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("{key} {value:?} is not a number"))
            };
            let digest =
                || FileMd5::parse(value).ok_or_else(|| format!("{key} {value:?} is not an md5"));
            let twice = match key {
                "gen" => generation.replace(number()?).is_some(),
                "seq" => seq.replace(number()?).is_some(),
                "len" => len.replace(number()?).is_some(),
                "file-md5" => md5.replace(digest()?).is_some(),
                "pending-seq" => pending_seq.replace(number()?).is_some(),
                "pending-len" => pending_len.replace(number()?).is_some(),
                "pending-md5" => pending_md5.replace(digest()?).is_some(),
                other => return Err(format!("unknown key {other:?}")),
            };
            if twice {
                return Err(format!("{key} appears twice"));
            }
        }
        let pending = match (pending_seq, pending_len, pending_md5) {
            (Some(seq), Some(len), Some(md5)) => Some(PendingRewrite { seq, len, md5 }),
            (None, None, None) => None,
            _ => return Err("it has part of a pending rewrite".into()),
        };
        let generation = generation.ok_or("it has no gen")?;
        let state = SyncState {
            seq: seq.ok_or("it has no seq")?,
            len: len.ok_or("it has no len")?,
            md5: md5.ok_or("it has no file-md5")?,
            pending,
        };
        Ok((state, generation))
    }

    /// The record beside the ledger file; `None` when there is none.
    pub fn load(paths: &LedgerPaths) -> Result<Option<SyncState>, StateError> {
        let bytes = match std::fs::read(&paths.state) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(io_error("read", &paths.state, source)),
        };
        let path = paths.state.display().to_string();
        let damaged = |reason: String| StateError::Damaged {
            path: path.clone(),
            reason,
        };
        if bytes.len() != 2 * SLOT {
            return Err(damaged(format!(
                "it has {} bytes, not the two slots of {SLOT}",
                bytes.len()
            )));
        }
        match current_slot(&bytes) {
            Ok((_, state, _)) => Ok(Some(state)),
            Err(reason) => Err(damaged(reason)),
        }
    }

    /// Records this state durably: once this returns, a crash leaves this record.
    pub fn store(&self, paths: &LedgerPaths) -> Result<(), StateError> {
        let in_place = || -> std::io::Result<bool> {
            let mut file = match OpenOptions::new().read(true).write(true).open(&paths.state) {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(e),
            };
            let mut bytes = Vec::with_capacity(2 * SLOT);
            file.read_to_end(&mut bytes)?;
            if bytes.len() != 2 * SLOT {
                return Ok(false);
            }
            let Ok((slot, _, generation)) = current_slot(&bytes) else {
                return Ok(false);
            };
            let other = 1 - slot;
            file.write_all_at(&padded(&self.encode(generation + 1)), (other * SLOT) as u64)?;
            // The slot's blocks exist already: only data is flushed, no metadata.
            file.sync_data()?;
            Ok(true)
        };
        // No slot file yet (a new member), or no intact record in it: a new file
        // with the record in the first slot replaces it whole.
        let replace = || -> std::io::Result<()> {
            let mut bytes = padded(&self.encode(1));
            bytes.extend(std::iter::repeat_n(b'\n', SLOT));
            let mut tmp = File::create(&paths.state_tmp)?;
            tmp.write_all(&bytes)?;
            tmp.sync_all()?;
            std::fs::rename(&paths.state_tmp, &paths.state)?;
            paths.sync_dir()
        };
        match in_place() {
            Ok(true) => Ok(()),
            Ok(false) => replace(),
            Err(e) => Err(e),
        }
        .map_err(|source| io_error("write", &paths.state, source))
    }
}

/// A record filling one slot: its text, then line breaks.
fn padded(record: &str) -> Vec<u8> {
    assert!(record.len() <= SLOT, "a state record outgrew its slot");
    let mut bytes = record.as_bytes().to_vec();
    bytes.resize(SLOT, b'\n');
    bytes
}

/// The slot holding the newest intact record of a two-slot state file, that record and its
/// generation; otherwise why neither slot can be used. A blank slot (never written) is skipped.
fn current_slot(bytes: &[u8]) -> Result<(usize, SyncState, u64), String> {
    let mut best: Option<(usize, SyncState, u64)> = None;
    let mut reasons = Vec::new();
    for (slot, chunk) in bytes.chunks(SLOT).enumerate() {
        let record = match std::str::from_utf8(chunk) {
            Ok(text) => text.trim_end_matches('\n'),
            Err(_) => {
                reasons.push(format!("slot {}: it is not text", slot + 1));
                continue;
            }
        };
        if record.is_empty() {
            continue;
        }
        match SyncState::decode_record(&format!("{record}\n")) {
            Ok((state, generation)) if best.as_ref().is_none_or(|(_, _, g)| generation > *g) => {
                best = Some((slot, state, generation))
            }
            Ok(_) => {}
            Err(reason) => reasons.push(format!("slot {}: {reason}", slot + 1)),
        }
    }
    best.ok_or_else(|| match reasons.is_empty() {
        true => "both slots are blank".to_string(),
        false => reasons.join("; "),
    })
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

    fn damaged(reason: &str) -> Result<SyncState, String> {
        Err(reason.into())
    }

    /// A record body with a valid checksum, whatever its lines say.
    fn sealed(body: &str) -> String {
        format!("{body}md5 {}\n", hex::encode(Md5::digest(body.as_bytes())))
    }

    #[test]
    fn a_record_reads_back() {
        for state in [
            SyncState::EMPTY,
            SyncState {
                seq: 1042,
                len: 318220,
                md5: FileMd5::of(b"the file"),
                pending: Some(PendingRewrite {
                    seq: 1043,
                    len: 317990,
                    md5: FileMd5::of(b"the rewritten file"),
                }),
            },
        ] {
            assert_eq!(SyncState::decode(&state.encode(9)), Ok(state));
            assert_eq!(SyncState::decode_record(&state.encode(9)), Ok((state, 9)));
        }
    }

    #[test]
    fn the_digest_is_the_masters() {
        // The master's digest is lower-case hex of the md5 of the file's bytes.
        assert_eq!(
            FileMd5::of(b"").to_string(),
            "d41d8cd98f00b204e9800998ecf8427e"
        );
        assert_eq!(FileMd5::of(b""), FileMd5::EMPTY);
        let mut digest = LedgerDigest::new();
        digest.push_line("{\"a\": 1}");
        let so_far = FileMd5::of_digest(&digest);
        digest.push_line("{\"b\": 2}");
        assert_eq!(so_far, FileMd5::of(b"{\"a\": 1}\n"));
        assert_eq!(
            so_far.to_string(),
            ledger_anylog::digest::of_lines(["{\"a\": 1}"])
        );
        assert_eq!(
            FileMd5::of_digest(&digest),
            FileMd5::of(b"{\"a\": 1}\n{\"b\": 2}\n")
        );
        assert_eq!(FileMd5::parse(&so_far.to_string()), Some(so_far));
        assert_eq!(FileMd5::parse("d41d8cd98f00b204e9800998ecf8427"), None);
    }

    #[test]
    fn any_damage_is_recognised() {
        let text = SyncState {
            seq: 7,
            len: 700,
            md5: FileMd5::of(b"x"),
            pending: None,
        }
        .encode(4);
        // A flipped digit, a torn record, an empty one, records with a valid checksum but a
        // field missing, a bad digest, a half pending rewrite.
        assert!(SyncState::decode(&text.replace("seq 7", "seq 8")).is_err());
        assert!(SyncState::decode(&text[..text.len() / 2]).is_err());
        assert!(SyncState::decode("").is_err());
        let unsound = sealed(&format!(
            "{MAGIC} 3\ngen 1\nseq 3\nfile-md5 {}\n",
            FileMd5::EMPTY
        ));
        assert_eq!(SyncState::decode(&unsound), damaged("it has no len"));
        let unsound = sealed(&format!("{MAGIC} 3\ngen 1\nseq 3\nlen 0\n"));
        assert_eq!(SyncState::decode(&unsound), damaged("it has no file-md5"));
        let unsound = sealed(&format!("{MAGIC} 3\ngen 1\nseq 3\nlen 0\nfile-md5 00\n"));
        assert_eq!(
            SyncState::decode(&unsound),
            damaged("file-md5 \"00\" is not an md5")
        );
        let unsound = sealed(&format!(
            "{MAGIC} 3\ngen 1\nseq 3\nlen 0\nfile-md5 {}\npending-seq 4\npending-len 9\n",
            FileMd5::EMPTY
        ));
        assert_eq!(
            SyncState::decode(&unsound),
            damaged("it has part of a pending rewrite")
        );
        let no_gen = sealed(&format!(
            "{MAGIC} 3\nseq 3\nlen 0\nfile-md5 {}\n",
            FileMd5::EMPTY
        ));
        assert_eq!(SyncState::decode(&no_gen), damaged("it has no gen"));
        let newer = sealed(&format!("{MAGIC} 4\nseq 3\n"));
        assert_eq!(
            SyncState::decode(&newer),
            damaged("its format 4 is not this member's 3")
        );
    }

    #[test]
    fn store_replaces_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let paths = LedgerPaths::new(&dir.path().join("blockchain.json"));
        assert_eq!(SyncState::load(&paths).unwrap(), None);
        let state = SyncState {
            seq: 5,
            len: 50,
            md5: FileMd5::of(b"fifty bytes"),
            pending: None,
        };
        state.store(&paths).unwrap();
        assert_eq!(SyncState::load(&paths).unwrap(), Some(state));
        assert!(!paths.state_tmp.exists());
        assert_eq!(
            std::fs::metadata(&paths.state).unwrap().len(),
            2 * SLOT as u64
        );
        std::fs::write(&paths.state, "seq 5\n").unwrap();
        assert!(matches!(
            SyncState::load(&paths),
            Err(StateError::Damaged { .. })
        ));
    }

    fn state(seq: u64) -> SyncState {
        SyncState {
            seq,
            len: seq * 100,
            md5: FileMd5::of(seq.to_string().as_bytes()),
            pending: None,
        }
    }

    #[test]
    fn a_torn_slot_leaves_the_previous_record() {
        let dir = tempfile::tempdir().unwrap();
        let paths = LedgerPaths::new(&dir.path().join("blockchain.json"));
        for seq in 1..=3 {
            state(seq).store(&paths).unwrap();
            assert_eq!(SyncState::load(&paths).unwrap(), Some(state(seq)));
        }
        // Records go to alternate slots, so the slot holding seq 3 is the one not holding 2.
        let bytes = std::fs::read(&paths.state).unwrap();
        let newest = bytes
            .chunks(SLOT)
            .position(|slot| String::from_utf8_lossy(slot).contains("\nseq 3\n"))
            .unwrap();
        let mut torn = bytes.clone();
        let start = newest * SLOT + 40;
        torn[start..start + 30].copy_from_slice(&[0; 30]);
        std::fs::write(&paths.state, &torn).unwrap();
        assert_eq!(SyncState::load(&paths).unwrap(), Some(state(2)));
        // The next record goes over the torn slot and is the newest.
        state(4).store(&paths).unwrap();
        assert_eq!(SyncState::load(&paths).unwrap(), Some(state(4)));
        let bytes = std::fs::read(&paths.state).unwrap();
        assert!(String::from_utf8_lossy(&bytes[newest * SLOT..]).starts_with(&state(4).encode(3)));
        // Both slots damaged: nothing is trusted.
        let both = String::from_utf8(bytes).unwrap().replace("len ", "lem ");
        std::fs::write(&paths.state, both).unwrap();
        let error = SyncState::load(&paths).unwrap_err();
        assert!(
            error.to_string().contains("slot 1") && error.to_string().contains("slot 2"),
            "{error}"
        );
        // A record written over a damaged file replaces it whole.
        state(5).store(&paths).unwrap();
        assert_eq!(SyncState::load(&paths).unwrap(), Some(state(5)));
    }
}
