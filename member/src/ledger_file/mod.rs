//! The local ledger file (`blockchain.json`), written so that a crash at any moment can be
//! repaired at the next start into a complete ledger that agrees with the recorded seq.
//!
//! The file is JSON Lines in ledger order, each line a policy's `json` and a line break, so its
//! md5 equals the master's digest at the same seq. Beside it, the [`SyncState`] record says
//! which seq the file holds, how long the file is at that seq, and the md5 of those bytes.
//!
//! The md5 is what lets start-up tell a file changed outside the member (a flipped byte inside a
//! string, an edited attribute: lines that still parse) from the one it wrote. It is kept up to
//! date without reading the file back: an md5 hasher of the file's content lives beside the
//! index and sees each append's bytes; a rewrite or a snapshot hashes the new file as it writes
//! it.
//!
//! - Inserts are **appended**: one positioned write of the whole batch, `fdatasync`, then the
//!   record (seq, new length) is replaced. Only an index `id -> (offset, length)` is kept in
//!   memory, so the cost of an insert does not grow with the ledger.
//! - Deletes and snapshots **rewrite**: the new file is built in `.tmp` and fsynced; the record
//!   gets a *pending* marker naming the new seq and length; the current file is hard-linked to
//!   `blockchain.old`; `.tmp` is renamed over the file; the directory is fsynced; the record is
//!   replaced by the new seq and length.
//!
//! [`LedgerFile::open`] repairs what a crash left (see its documentation for every case). After
//! an error from a write, the value must be dropped and the file opened again: the repair at
//! start is the one place that brings the file and the record back into agreement.
//!
//! The parts, one file each: `recover` (start-up: the lock, an interrupted rewrite finished or
//! discarded, the check against the record, an unrecorded tail journaled and cut), `append`,
//! `rewrite` (also the swap that installs a snapshot), `snapshot` (streamed into `.tmp`),
//! `foreign_guard` (bytes someone else wrote into the file, journaled before they leave it) and
//! `sys` (the system calls, and the only `unsafe`). This module holds the value, its accessors
//! and [`LedgerFile::commit`], which picks an append or a rewrite.
//!
//! [`SyncState`]: crate::state::SyncState

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use ledger_anylog::digest::LedgerDigest;

use crate::foreign::ForeignFiles;
use crate::line::PolicyLine;
use crate::paths::LedgerPaths;
use crate::state::{FileMd5, StateError};

mod append;
mod foreign_guard;
mod recover;
mod rewrite;
mod snapshot;
mod sys;
#[cfg(test)]
mod testing;

pub use snapshot::Snapshot;

/// Where a policy's line is in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    offset: u64,
    len: u64,
}

/// Why the ledger file could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Another process (a second member) holds the file.
    #[error("{path} is in use by another member process (its lock {lock} is held)")]
    Locked {
        /// The ledger file.
        path: String,
        /// The lock file.
        lock: String,
    },
    /// A file operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file it was done to.
        path: String,
        /// The failure.
        source: io::Error,
    },
    /// The state record could not be written.
    #[error(transparent)]
    State(#[from] StateError),
    /// A snapshot named the same policy twice.
    #[error("the snapshot holds policy {0:?} twice")]
    DuplicateInSnapshot(String),
    /// A change was offered for a policy the file does not hold as expected.
    #[error("cannot apply the change: {0}")]
    Inconsistent(String),
    /// Changes cannot be applied while the file waits for a full snapshot.
    #[error("the ledger file waits for a full snapshot; changes cannot be applied to it")]
    AwaitingSnapshot,
}

/// Turns an I/O error into a [`FileError::Io`] saying what was done to which file (for
/// `map_err`).
fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FileError {
    let path = path.display().to_string();
    move |source| FileError::Io {
        action,
        path,
        source,
    }
}

/// The ledger file of a running member, opened, repaired and locked.
#[derive(Debug)]
pub struct LedgerFile {
    paths: LedgerPaths,
    /// Held for as long as the value lives: the lock is the open file description.
    _lock: File,
    /// The ledger file, open for reading and writing; `None` until it first exists.
    file: Option<File>,
    seq: u64,
    len: u64,
    /// The digest of the file's first `len` bytes: an append feeds it only the new bytes to
    /// get the md5 its record needs.
    md5: LedgerDigest,
    index: HashMap<String, Entry>,
    /// Set when the file cannot be trusted: only a snapshot may replace it.
    awaiting_snapshot: bool,
    /// Where bytes someone else wrote into the file are journaled before they leave it.
    foreign: ForeignFiles,
    /// The file the last rewrite replaced (now `blockchain.old`): its inode and how much of it
    /// is accounted for. A node that opened the file before the rename may still write to it
    /// after: such late bytes are journaled at the next look.
    replaced: Option<(u64, u64)>,
}

impl LedgerFile {
    /// The seq of the last change the file holds (0 while it awaits a snapshot).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The file's length at [`LedgerFile::seq`].
    pub fn len(&self) -> u64 {
        self.len
    }

    /// The md5 of the file at [`LedgerFile::seq`]: the master's `GetLedgerInfo` digest at that
    /// seq when the file is in sync (meaningless while it awaits a snapshot).
    pub fn md5(&self) -> FileMd5 {
        FileMd5::of_digest(&self.md5)
    }

    /// Whether the file holds no policy.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// How many policies the file holds.
    pub fn policy_count(&self) -> usize {
        self.index.len()
    }

    /// Whether the file holds the policy `id`.
    pub fn contains(&self, id: &str) -> bool {
        self.index.contains_key(id)
    }

    /// Whether the file cannot be trusted and waits for a full snapshot.
    pub fn awaiting_snapshot(&self) -> bool {
        self.awaiting_snapshot
    }

    /// Distrusts the file from now on: the next subscription asks for a snapshot. The file is
    /// left as it is until the snapshot replaces it.
    pub fn await_snapshot(&mut self, reason: &str) {
        tracing::warn!("{reason}; resyncing from seq 0 (the master will send a full snapshot)");
        self.awaiting_snapshot = true;
        self.seq = 0;
        self.index.clear();
    }

    /// The files around the ledger file.
    pub fn paths(&self) -> &LedgerPaths {
        &self.paths
    }

    /// Applies the changes up to `seq` durably: drops the policies `deleted` (each held by the
    /// file) and adds `inserted` (none held) at the end. Appends when nothing is deleted,
    /// rewrites otherwise.
    pub fn commit(
        &mut self,
        seq: u64,
        deleted: &HashSet<String>,
        inserted: &[PolicyLine],
    ) -> Result<(), FileError> {
        if self.awaiting_snapshot {
            return Err(FileError::AwaitingSnapshot);
        }
        if let Some(id) = deleted.iter().find(|id| !self.contains(id)) {
            return Err(FileError::Inconsistent(format!(
                "policy {id:?} is not in the file"
            )));
        }
        // A policy deleted and inserted again in one batch is in the file until this commit.
        if let Some(line) = inserted
            .iter()
            .find(|line| self.contains(&line.id) && !deleted.contains(&line.id))
        {
            return Err(FileError::Inconsistent(format!(
                "policy {:?} is already in the file",
                line.id
            )));
        }
        // Someone else's bytes first: an append after them would glue our first line to a
        // partial one of theirs for as long as it takes to put the file right.
        self.take_foreign()?;
        if self.awaiting_snapshot {
            return Err(FileError::AwaitingSnapshot);
        }
        let started = std::time::Instant::now();
        let written = if deleted.is_empty() {
            self.append(seq, inserted)
        } else {
            self.rewrite(seq, deleted, inserted)
        };
        crate::metrics::file_write(started.elapsed());
        written
    }
}

/// The ledger file, open for reading and appending. Appending (`O_APPEND`), not writing at
/// the recorded length: a node beside the member may have appended a line since, and a write
/// at a position would go over it. An append goes after it, where it is found and set right.
fn open_rw(path: &Path) -> Result<File, FileError> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .open(path)
        .map_err(io_error("open", path))
}

/// Bytes `from..to` of the file at `path`.
fn read_range(path: &Path, from: u64, to: u64) -> Result<Vec<u8>, FileError> {
    let file = File::open(path).map_err(io_error("read", path))?;
    let mut bytes = vec![0; (to - from) as usize];
    file.read_exact_at(&mut bytes, from)
        .map_err(io_error("read", path))?;
    Ok(bytes)
}

/// The length of the file at `path`; `None` when there is none (a state of the ledger, not an
/// error: a new member, a file removed by hand).
fn file_len(path: &Path) -> Result<Option<u64>, FileError> {
    match std::fs::metadata(path) {
        Ok(metadata) => Ok(Some(metadata.len())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("inspect", path)(e)),
    }
}

/// Removes the file at `path`; one already gone is what was wanted.
fn remove_if_exists(path: &Path) -> Result<(), FileError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("remove", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger_file::testing::*;
    use crate::state::SyncState;

    #[test]
    fn the_recorded_md5_follows_every_write() {
        // After appends, a delete (rewrite), a snapshot, and each restart in between, the
        // recorded md5 is the file's, so a normal restart passes the check.
        let f = fixture();
        let check = |file: &LedgerFile, seq: u64| {
            let bytes = std::fs::read(&f.paths.file).unwrap();
            let state = SyncState::load(&f.paths).unwrap().unwrap();
            assert_eq!((state.seq, state.len), (seq, bytes.len() as u64));
            assert_eq!(state.md5, FileMd5::of(&bytes));
            assert_eq!(file.md5(), state.md5);
        };
        let reopen = |file: LedgerFile, seq: u64| {
            drop(file);
            let file = LedgerFile::open(&f.paths.file).unwrap();
            assert!(!file.awaiting_snapshot());
            assert_eq!(file.seq(), seq);
            check(&file, seq);
            file
        };
        let file = synced(&f, 3);
        check(&file, 3);
        let mut file = reopen(file, 3);
        file.commit(5, &HashSet::new(), &[policy(4), policy(5)])
            .unwrap();
        let mut file = reopen(file, 5);
        file.commit(6, &["id-2".to_string()].into(), &[policy(6)])
            .unwrap();
        check(&file, 6);
        let mut file = reopen(file, 6);
        file.commit(7, &HashSet::new(), &[policy(7)]).unwrap();
        let mut file = reopen(file, 7);
        let mut snapshot = file.begin_snapshot().unwrap();
        snapshot.push(policy(8)).unwrap();
        snapshot.push(policy(1)).unwrap();
        file.install(snapshot, 12).unwrap();
        check(&file, 12);
        let file = reopen(file, 12);
        // An unrecorded tail after an intact recorded part is still only cut.
        let good = read(&f.paths.file);
        drop(file);
        std::fs::write(&f.paths.file, format!("{good}{}", text(&[policy(13)]))).unwrap();
        let file = LedgerFile::open(&f.paths.file).unwrap();
        assert_eq!((file.seq(), file.awaiting_snapshot()), (12, false));
        assert_eq!(read(&f.paths.file), good);
        check(&file, 12);
    }
}
