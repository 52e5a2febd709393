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

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use ledger_anylog::digest::LedgerDigest;

use crate::foreign::ForeignFiles;
use crate::line::PolicyLine;
use crate::paths::LedgerPaths;
use crate::state::{FileMd5, PendingRewrite, StateError, SyncState};

mod sys;

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
    /// Opens the ledger file at `path` for a daemon: locks it and repairs what a crash left.
    ///
    /// Every crash point of a write leaves one of these, and start-up does:
    /// - a stray `.tmp` without a pending marker (a rewrite or a snapshot cut short before its
    ///   marker was recorded): removed; the file and the record are those before it;
    /// - a pending marker and `.tmp` of the pending length (crash between the marker and the
    ///   rename): the rewrite is finished (old file kept as `blockchain.old`, rename, record);
    /// - a pending marker and no `.tmp`, the file of the pending length (crash after the rename,
    ///   before the record): the record is completed;
    /// - a file longer than recorded (an append cut short, torn or not, or not yet recorded):
    ///   truncated back to the recorded length, whose changes the master sends again;
    /// - a file shorter than recorded, a line that is not a valid policy, a policy twice, a
    ///   recorded part whose md5 is not the recorded one (changed outside the member), a
    ///   damaged record, a missing file, or a file without a record: the file is kept as it is
    ///   until a full snapshot replaces it, and [`LedgerFile::seq`] is 0.
    pub fn open(path: &Path) -> Result<LedgerFile, FileError> {
        let paths = LedgerPaths::new(path);
        let lock = lock(&paths)?;
        let mut distrust: Option<String> = None;
        let state = match SyncState::load(&paths) {
            Ok(state) => state,
            Err(e @ StateError::Damaged { .. }) => {
                distrust = Some(e.to_string());
                None
            }
            Err(e) => return Err(e.into()),
        };
        let state = match state {
            Some(
                state @ SyncState {
                    pending: Some(pending),
                    ..
                },
            ) => Some(finish_rewrite(&paths, state, pending, &mut distrust)?),
            other => other,
        };
        // A rewrite or snapshot that never recorded its pending marker, or a state record never
        // renamed into place: neither is part of the ledger.
        remove_if_exists(&paths.tmp)?;
        remove_if_exists(&paths.state_tmp)?;

        let file_len = file_len(&paths.file)?;
        let mut seq = 0;
        let mut len = file_len.unwrap_or(0);
        // What the recorded part of the file must hash to, and the tail to cut once it does.
        let mut recorded_md5 = FileMd5::EMPTY;
        let mut unrecorded_tail = 0;
        if distrust.is_none() {
            match (state, file_len) {
                (None, None) => {}
                (None, Some(_)) => {
                    distrust = Some(format!(
                        "{} has no state record beside it, so which seq it holds is unknown",
                        paths.file.display()
                    ))
                }
                (Some(state), None) if state.len == 0 => {
                    (seq, recorded_md5) = (state.seq, state.md5);
                }
                (Some(state), None) => {
                    distrust = Some(format!(
                        "{} is missing though seq {} was recorded",
                        paths.file.display(),
                        state.seq
                    ))
                }
                (Some(state), Some(actual)) if actual < state.len => {
                    distrust = Some(format!(
                        "{} has {actual} bytes, fewer than the {} recorded at seq {}",
                        paths.file.display(),
                        state.len,
                        state.seq
                    ))
                }
                (Some(state), Some(actual)) => {
                    (seq, len, recorded_md5) = (state.seq, state.len, state.md5);
                    unrecorded_tail = actual - state.len;
                }
            }
        }
        let mut index = HashMap::new();
        let mut md5 = LedgerDigest::new();
        if distrust.is_none() {
            let scanned = match file_len {
                Some(_) => scan(&paths.file, len),
                None => Ok((HashMap::new(), LedgerDigest::new())),
            };
            match scanned {
                Ok((_, hasher)) if FileMd5::of_digest(&hasher) != recorded_md5 => {
                    distrust = Some(format!(
                        "{} does not match its state record: the md5 of its first {len} bytes is \
                         {}, not the {recorded_md5} recorded at seq {seq}, so it was changed \
                         outside the member",
                        paths.file.display(),
                        FileMd5::of_digest(&hasher),
                    ))
                }
                Ok((scanned, hasher)) => (index, md5) = (scanned, hasher),
                Err(reason) => distrust = Some(reason),
            }
        }
        // Cut only a file whose recorded part checked out: a damaged one is kept whole until
        // a snapshot replaces it (it becomes `blockchain.old`). The tail is an append of ours
        // cut short, or lines someone else appended: journaled first, never dropped unseen.
        let foreign = ForeignFiles::new(&paths.file);
        let mut replaced = None;
        if distrust.is_none() && unrecorded_tail > 0 {
            let end = len + unrecorded_tail;
            let tail = read_range(&paths.file, len, end)?;
            foreign
                .journal(len, &tail)
                .map_err(io_error("journal the tail of", &paths.file))?;
            // Not a truncation: a node may append while this runs, and a truncation would cut
            // what it wrote after the tail was read. The recorded part goes to a new file, and
            // whatever reached the old one after the tail is journaled too.
            cut_to(&paths, len)?;
            let mut accounted = end;
            if let Some(old_len) = std::fs::metadata(&paths.old).ok().map(|m| m.len())
                && old_len > end
            {
                let later = read_range(&paths.old, end, old_len)?;
                foreign
                    .journal(end, &later)
                    .map_err(io_error("journal the tail of", &paths.file))?;
                accounted = old_len;
            }
            replaced = std::fs::metadata(&paths.old).ok().map(|m| {
                use std::os::unix::fs::MetadataExt;
                (m.ino(), accounted)
            });
            tracing::info!(
                journaled_bytes = unrecorded_tail,
                "repaired {}: moved the {unrecorded_tail} bytes after seq {seq} to {} to deal with",
                paths.file.display(),
                foreign.journal.display(),
            );
        }
        let file = match file_len {
            Some(_) => Some(open_rw(&paths.file)?),
            None => None,
        };
        let awaiting_snapshot = distrust.is_some();
        match &distrust {
            Some(reason) => {
                tracing::warn!(
                    "{reason}; resyncing from seq 0 (the master will send a full snapshot)"
                );
                seq = 0;
                index.clear();
            }
            None if seq == 0 => tracing::info!(
                "starting a full sync of {} from seq 0",
                paths.file.display()
            ),
            None => tracing::info!(
                policies = index.len(),
                bytes = len,
                "resuming from seq {seq} ({})",
                paths.file.display()
            ),
        }
        Ok(LedgerFile {
            paths,
            _lock: lock,
            file,
            seq,
            len,
            md5,
            index,
            awaiting_snapshot,
            foreign,
            replaced,
        })
    }

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

    fn append(&mut self, seq: u64, inserted: &[PolicyLine]) -> Result<(), FileError> {
        if self.file.is_none() {
            // Only a ledger that never held a policy has no file (its snapshot was empty and
            // then removed by hand, or it was recorded empty): create it.
            let file = open_rw_create(&self.paths.file)?;
            sys::sync_dir(&self.paths)
                .map_err(io_error("sync the directory of", &self.paths.file))?;
            self.file = Some(file);
        }
        let Some(file) = &self.file else {
            return Err(FileError::Inconsistent(
                "the file could not be opened".into(),
            ));
        };
        let mut bytes = Vec::with_capacity(inserted.iter().map(|l| l.file_len() as usize).sum());
        for line in inserted {
            bytes.extend_from_slice(line.text.as_bytes());
            bytes.push(b'\n');
        }
        // Reserve the blocks first: a full disk then refuses the batch before any byte of it
        // reaches the file, so readers never see a torn last line.
        sys::reserve(file, self.len, bytes.len() as u64)
            .map_err(io_error("reserve space in", &self.paths.file))?;
        // One write for the whole batch keeps the window for a torn tail as small as the
        // system allows; start-up truncates whatever was not recorded.
        if let Err(e) = file
            .write_all_at(&bytes, self.len)
            .and_then(|()| sys::fdatasync(file))
        {
            // Where reserving is not supported, cut a partial write at once rather than leave
            // it for readers until the next start; what follows the recorded part (someone
            // else's bytes too) is journaled first.
            if self
                .journal_after(&self.paths.file.clone(), self.len)
                .is_ok()
            {
                let _ = file.set_len(self.len).and_then(|()| sys::fdatasync(file));
            }
            return Err(io_error("append to", &self.paths.file)(e));
        }
        let new_len = self.len + bytes.len() as u64;
        // The file is open for appending: if someone else appended meanwhile, the batch went
        // after their bytes instead of over them. Keep theirs aside and put the file right.
        let end = file
            .metadata()
            .map_err(io_error("inspect", &self.paths.file))?
            .len();
        if end != new_len {
            return self.separate_foreign(seq, inserted, &bytes, end);
        }
        let mut md5 = self.md5.clone();
        md5.push_bytes(&bytes);
        SyncState {
            seq,
            len: new_len,
            md5: FileMd5::of_digest(&md5),
            pending: None,
        }
        .store(&self.paths)?;
        let mut offset = self.len;
        for line in inserted {
            let len = line.file_len();
            self.index.insert(line.id.clone(), Entry { offset, len });
            offset += len;
        }
        self.seq = seq;
        self.len = new_len;
        self.md5 = md5;
        Ok(())
    }

    fn rewrite(
        &mut self,
        seq: u64,
        deleted: &HashSet<String>,
        inserted: &[PolicyLine],
    ) -> Result<(), FileError> {
        self.rewrite_accounting(seq, deleted, inserted, self.len)
    }

    /// [`LedgerFile::rewrite`] of a file whose bytes up to `accounted` are known (the ledger's
    /// and foreign bytes already journaled): any byte after it is someone else's.
    fn rewrite_accounting(
        &mut self,
        seq: u64,
        deleted: &HashSet<String>,
        inserted: &[PolicyLine],
        accounted: u64,
    ) -> Result<(), FileError> {
        let source = self
            .file
            .as_ref()
            .ok_or_else(|| FileError::Inconsistent("there is no file to delete from".into()))?;
        let mut removed: Vec<Entry> = deleted.iter().map(|id| self.index[id]).collect();
        removed.sort_by_key(|entry| entry.offset);

        let tmp = File::create(&self.paths.tmp).map_err(io_error("create", &self.paths.tmp))?;
        let mut out = Md5Writer::new(BufWriter::with_capacity(1 << 20, tmp));
        let mut reader = BufReader::with_capacity(1 << 20, source);
        let mut copy = |from: u64, to: u64, out: &mut Md5Writer| -> io::Result<()> {
            reader.seek(SeekFrom::Start(from))?;
            let copied = io::copy(&mut (&mut reader).take(to - from), out)?;
            if copied != to - from {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file is shorter than its index",
                ));
            }
            Ok(())
        };
        let mut position = 0;
        let written = (|| -> io::Result<()> {
            for entry in &removed {
                copy(position, entry.offset, &mut out)?;
                position = entry.offset + entry.len;
            }
            copy(position, self.len, &mut out)?;
            for line in inserted {
                out.write_all(line.text.as_bytes())?;
                out.write_all(b"\n")?;
            }
            out.flush()?;
            sys::fsync(out.inner.get_ref())
        })();
        written.map_err(io_error("write", &self.paths.tmp))?;

        let removed_len: u64 = removed.iter().map(|entry| entry.len).sum();
        let kept_len = self.len - removed_len;
        let new_len = kept_len + inserted.iter().map(PolicyLine::file_len).sum::<u64>();
        self.swap_in(seq, new_len, out.md5, accounted)?;

        for id in deleted {
            self.index.remove(id);
        }
        // Every line after a removed one moves up by the lengths removed before it.
        let mut removed_before = Vec::with_capacity(removed.len() + 1);
        removed_before.push(0);
        for entry in &removed {
            removed_before.push(removed_before.last().copied().unwrap_or(0) + entry.len);
        }
        for entry in self.index.values_mut() {
            let before = removed.partition_point(|r| r.offset < entry.offset);
            entry.offset -= removed_before[before];
        }
        let mut offset = kept_len;
        for line in inserted {
            let len = line.file_len();
            self.index.insert(line.id.clone(), Entry { offset, len });
            offset += len;
        }
        Ok(())
    }

    /// Replaces the file by the fsynced `.tmp` of `new_len` bytes holding seq `seq`, whose
    /// content `new_md5` has hashed. The replaced file's bytes after `accounted` were written by
    /// someone else (before the rename, or through a descriptor opened before it, which now
    /// writes to `blockchain.old`): they are journaled.
    fn swap_in(
        &mut self,
        seq: u64,
        new_len: u64,
        new_md5: LedgerDigest,
        accounted: u64,
    ) -> Result<(), FileError> {
        let md5 = FileMd5::of_digest(&new_md5);
        SyncState {
            seq: self.seq,
            len: self.len,
            md5: FileMd5::of_digest(&self.md5),
            pending: Some(PendingRewrite {
                seq,
                len: new_len,
                md5,
            }),
        }
        .store(&self.paths)?;
        // The file the previous rewrite replaced goes now: what reached it late, first.
        self.check_replaced()?;
        replace_file(&self.paths)?;
        // Journaled before the record moves on: a crash here finds the same bytes in the
        // journal at the next start (journaling them twice is harmless, losing them is not).
        let old = self.paths.old.clone();
        let accounted = if self.awaiting_snapshot {
            // A distrusted file replaced by a snapshot: its lines that are not the ledger's.
            self.journal_unknown_lines(&old, false)?;
            file_len(&old)?.unwrap_or(0)
        } else {
            self.journal_after(&old, accounted)?
        };
        self.replaced = std::fs::metadata(&old).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.ino(), accounted)
        });
        SyncState {
            seq,
            len: new_len,
            md5,
            pending: None,
        }
        .store(&self.paths)?;
        self.file = Some(open_rw(&self.paths.file)?);
        self.seq = seq;
        self.len = new_len;
        self.md5 = new_md5;
        Ok(())
    }

    /// After an append of `ours` (the batch `inserted` up to `seq`) found the file `end` bytes
    /// long instead of ending with it: someone else appended before or after it. Their bytes
    /// are journaled, and the file is rewritten as the recorded part and the batch.
    fn separate_foreign(
        &mut self,
        seq: u64,
        inserted: &[PolicyLine],
        ours: &[u8],
        end: u64,
    ) -> Result<(), FileError> {
        let region = read_range(&self.paths.file, self.len, end)?;
        let Some(at) = find(&region, ours) else {
            // Not where an append puts it: the file changed under us in another way. The
            // start-up repair journals what follows the recorded part.
            return Err(FileError::Inconsistent(format!(
                "{} changed while the member appended to it",
                self.paths.file.display()
            )));
        };
        let journal = |from: usize, to: usize| {
            self.foreign
                .journal(self.len + from as u64, &region[from..to])
                .map_err(io_error("journal foreign bytes of", &self.paths.file))
        };
        journal(0, at)?;
        journal(at + ours.len(), region.len())?;
        tracing::warn!(
            "{}: someone else appended to the file while the member did; put the file right",
            self.paths.file.display()
        );
        self.rewrite_accounting(seq, &HashSet::new(), inserted, end)
    }

    /// Journals the bytes of `path` (a file this member wrote up to `accounted` bytes) after
    /// `accounted`; returns how much of it is accounted for now.
    fn journal_after(&self, path: &Path, accounted: u64) -> Result<u64, FileError> {
        let Some(len) = file_len(path)? else {
            return Ok(accounted);
        };
        if len <= accounted {
            return Ok(accounted);
        }
        let tail = read_range(path, accounted, len)?;
        self.foreign
            .journal(accounted, &tail)
            .map_err(io_error("journal foreign bytes of", path))?;
        Ok(len)
    }

    /// Journals what reached the file the last rewrite replaced since it was looked at.
    fn check_replaced(&mut self) -> Result<(), FileError> {
        use std::os::unix::fs::MetadataExt;
        let Some((ino, accounted)) = self.replaced else {
            return Ok(());
        };
        match std::fs::metadata(&self.paths.old) {
            Ok(m) if m.ino() == ino && m.len() > accounted => {
                let old = self.paths.old.clone();
                let now = self.journal_after(&old, accounted)?;
                self.replaced = Some((ino, now));
            }
            _ => {}
        }
        Ok(())
    }

    /// Looks for bytes someone else appended to the file since the member last wrote it;
    /// journals them and rewrites the file without them. Returns whether it found any.
    ///
    /// A file changed in another way (shorter, its recorded part edited, replaced by another
    /// file) is distrusted: its lines that the ledger does not hold are journaled and a full
    /// snapshot will replace it.
    pub fn take_foreign(&mut self) -> Result<bool, FileError> {
        self.check_replaced()?;
        if self.awaiting_snapshot {
            return Ok(false);
        }
        let Some(file) = &self.file else {
            return Ok(false);
        };
        let ours = file
            .metadata()
            .map_err(io_error("inspect", &self.paths.file))?;
        let on_disk = match std::fs::metadata(&self.paths.file) {
            Ok(metadata) => metadata,
            // Removed or being renamed by someone: looked at again next time.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_error("inspect", &self.paths.file)(e)),
        };
        use std::os::unix::fs::MetadataExt;
        let replaced = (ours.dev(), ours.ino()) != (on_disk.dev(), on_disk.ino());
        let size = on_disk.len();
        if !replaced && size == self.len {
            return Ok(false);
        }
        let prefix_intact = !replaced
            && size > self.len
            && FileMd5::of_digest(&hash_prefix(&self.paths.file, self.len)?) == self.md5();
        if prefix_intact {
            let tail = read_range(&self.paths.file, self.len, size)?;
            self.foreign
                .journal(self.len, &tail)
                .map_err(io_error("journal foreign bytes of", &self.paths.file))?;
            self.rewrite_accounting(self.seq, &HashSet::new(), &[], size)?;
            return Ok(true);
        }
        // Changed in another way: keep what the ledger does not hold, then resync.
        let kept = self.journal_unknown_lines(&self.paths.file.clone(), true)?;
        self.await_snapshot(&format!(
            "{} was changed by someone else ({}); journaled its {kept} lines the ledger does not hold",
            self.paths.file.display(),
            if replaced { "replaced by another file" } else if size < self.len { "made shorter" } else { "edited" }
        ));
        Ok(kept > 0)
    }

    /// Journals the lines of `path` that are not the ledger's: local policies and deletes,
    /// and lines that are no policy at all. With `by_index`, a policy line whose id the file
    /// does not hold is journaled too; without (a distrusted file, whose index is empty), the
    /// snapshot replacing it decides what the ledger holds. Returns how many it journaled.
    fn journal_unknown_lines(&self, path: &Path, by_index: bool) -> Result<usize, FileError> {
        use crate::foreign::Foreign;
        let content = match std::fs::read(path) {
            Ok(content) => content,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_error("read", path)(e)),
        };
        let mut kept = 0;
        for piece in crate::foreign::split_lines(0, &content) {
            let known = match crate::foreign::classify(&piece) {
                Foreign::Policy { id, .. } => !by_index || self.contains(&id),
                _ => false,
            };
            if !known {
                self.foreign
                    .journal(piece.from, &piece.bytes)
                    .map_err(io_error("journal foreign bytes of", path))?;
                kept += 1;
            }
        }
        Ok(kept)
    }

    /// Where foreign bytes are journaled and set aside.
    pub fn foreign_files(&self) -> &ForeignFiles {
        &self.foreign
    }

    /// Starts a snapshot in `.tmp`; the file stays untouched until [`LedgerFile::install`].
    pub fn begin_snapshot(&self) -> Result<Snapshot, FileError> {
        let file = File::create(&self.paths.tmp).map_err(io_error("create", &self.paths.tmp))?;
        Ok(Snapshot {
            out: Md5Writer::new(BufWriter::with_capacity(1 << 20, file)),
            len: 0,
            index: HashMap::new(),
            path: self.paths.tmp.clone(),
        })
    }

    /// Replaces the file by the snapshot, which holds the ledger at `seq`.
    pub fn install(&mut self, snapshot: Snapshot, seq: u64) -> Result<(), FileError> {
        let Snapshot {
            out,
            len,
            index,
            path,
        } = snapshot;
        // Only the installation is timed: the snapshot's lines were written as they streamed.
        let started = std::time::Instant::now();
        let installed = self.finish_install(out, len, &path, seq);
        crate::metrics::file_write(started.elapsed());
        installed?;
        self.index = index;
        self.awaiting_snapshot = false;
        Ok(())
    }

    fn finish_install(
        &mut self,
        mut out: Md5Writer,
        len: u64,
        path: &Path,
        seq: u64,
    ) -> Result<(), FileError> {
        out.flush()
            .and_then(|()| sys::fsync(out.inner.get_ref()))
            .map_err(io_error("write", path))?;
        let Md5Writer { inner, md5 } = out;
        drop(inner);
        self.swap_in(seq, len, md5, self.len)
    }

    /// Drops a snapshot that will not be installed (its stream broke): the file is untouched.
    pub fn abandon(&self, snapshot: Snapshot) {
        drop(snapshot.out);
        if let Err(e) = remove_if_exists(&snapshot.path) {
            // Harmless: the next snapshot or start-up removes it.
            tracing::debug!(error = %e, "could not remove the abandoned snapshot");
        }
    }
}

/// A full ledger being written to `.tmp` from a snapshot stream.
#[derive(Debug)]
pub struct Snapshot {
    out: Md5Writer,
    len: u64,
    index: HashMap<String, Entry>,
    path: std::path::PathBuf,
}

impl Snapshot {
    /// Adds the next policy of the snapshot (in ledger order).
    pub fn push(&mut self, line: PolicyLine) -> Result<(), FileError> {
        if self.index.contains_key(&line.id) {
            return Err(FileError::DuplicateInSnapshot(line.id));
        }
        self.out
            .write_all(line.text.as_bytes())
            .and_then(|()| self.out.write_all(b"\n"))
            .map_err(io_error("write", &self.path))?;
        let len = line.file_len();
        self.index.insert(
            line.id,
            Entry {
                offset: self.len,
                len,
            },
        );
        self.len += len;
        Ok(())
    }

    /// How many policies it holds so far.
    pub fn policy_count(&self) -> usize {
        self.index.len()
    }
}

/// The writer of a new file (`.tmp`), hashing what it writes: a rewrite or a snapshot knows the
/// md5 of the file it installs without reading it back.
#[derive(Debug)]
struct Md5Writer {
    inner: BufWriter<File>,
    /// The md5 of every byte accepted so far.
    md5: LedgerDigest,
}

impl Md5Writer {
    fn new(inner: BufWriter<File>) -> Md5Writer {
        Md5Writer {
            inner,
            md5: LedgerDigest::new(),
        }
    }
}

impl Write for Md5Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        // Only what was accepted: a short write is retried with the rest by the caller.
        self.md5.push_bytes(&buf[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Finishes or discards the rewrite a crash interrupted; returns the record that now holds.
fn finish_rewrite(
    paths: &LedgerPaths,
    state: SyncState,
    pending: PendingRewrite,
    distrust: &mut Option<String>,
) -> Result<SyncState, FileError> {
    let done = SyncState {
        seq: pending.seq,
        len: pending.len,
        md5: pending.md5,
        pending: None,
    };
    let before = SyncState {
        pending: None,
        ..state
    };
    match file_len(&paths.tmp)? {
        // Crashed between the marker and the rename: the new file is complete and fsynced.
        Some(len) if len == pending.len => {
            replace_file(paths)?;
            // What someone else appended to the file it replaced is theirs, not the ledger's.
            if let Some(old_len) = std::fs::metadata(&paths.old).ok().map(|m| m.len())
                && old_len > before.len
            {
                let tail = read_range(&paths.old, before.len, old_len)?;
                ForeignFiles::new(&paths.file)
                    .journal(before.len, &tail)
                    .map_err(io_error("journal the tail of", &paths.old))?;
            }
            done.store(paths)?;
            tracing::info!(
                "finished the rewrite of {} a crash interrupted: it holds seq {}",
                paths.file.display(),
                pending.seq
            );
            Ok(done)
        }
        // Not the file the marker names: keep the current one.
        Some(len) => {
            tracing::warn!(
                "discarding an interrupted rewrite of {}: {} has {len} bytes, not the {} recorded",
                paths.file.display(),
                paths.tmp.display(),
                pending.len
            );
            remove_if_exists(&paths.tmp)?;
            before.store(paths)?;
            Ok(before)
        }
        // Crashed after the rename: only the record is behind. A longer file got someone
        // else's lines since: the record is completed, and start-up deals with the tail.
        None => match file_len(&paths.file)? {
            Some(len) if len >= pending.len => {
                done.store(paths)?;
                tracing::info!(
                    "completed the record of an interrupted rewrite of {}: it holds seq {}",
                    paths.file.display(),
                    pending.seq
                );
                Ok(done)
            }
            other => {
                *distrust = Some(format!(
                    "a rewrite of {} was interrupted and the file has {} bytes, not the {} recorded",
                    paths.file.display(),
                    other.map_or_else(|| "no".to_string(), |len| len.to_string()),
                    pending.len
                ));
                Ok(before)
            }
        },
    }
}

/// Renames `.tmp` over the file, keeping the file it replaces as `blockchain.old`.
fn replace_file(paths: &LedgerPaths) -> Result<(), FileError> {
    remove_if_exists(&paths.old)?;
    if paths.file.exists() {
        // A hard link keeps the previous file without copying it; where links are not
        // supported, a copy does.
        if std::fs::hard_link(&paths.file, &paths.old).is_err() {
            std::fs::copy(&paths.file, &paths.old)
                .map_err(io_error("keep a copy of", &paths.file))?;
        }
    }
    sys::rename(&paths.tmp, &paths.file).map_err(io_error("rename over", &paths.file))?;
    sys::sync_dir(paths).map_err(io_error("sync the directory of", &paths.file))
}

/// Reads the first `len` bytes of the file as policy lines, indexes them and hashes them (in the
/// same pass: the file is read once); the error says what makes the file unfit.
fn scan(path: &Path, len: u64) -> Result<(HashMap<String, Entry>, LedgerDigest), String> {
    let file = File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut reader = BufReader::with_capacity(1 << 20, file.take(len));
    let mut index = HashMap::new();
    let mut md5 = LedgerDigest::new();
    let mut bytes = Vec::new();
    let mut offset = 0;
    for number in 1.. {
        bytes.clear();
        let read = reader
            .read_until(b'\n', &mut bytes)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if read == 0 {
            break;
        }
        md5.push_bytes(&bytes);
        let at = || format!("{} line {number}", path.display());
        if bytes.pop() != Some(b'\n') {
            return Err(format!("{} is incomplete", at()));
        }
        let text = String::from_utf8(std::mem::take(&mut bytes))
            .map_err(|_| format!("{} is not UTF-8", at()))?;
        let line =
            PolicyLine::parse(text).map_err(|e| format!("{} is not a valid policy: {e}", at()))?;
        let entry = Entry {
            offset,
            len: read as u64,
        };
        offset += read as u64;
        if index.insert(line.id.clone(), entry).is_some() {
            return Err(format!("{} repeats policy {:?}", at(), line.id));
        }
    }
    Ok((index, md5))
}

/// Takes the daemon's lock beside the file, failing at once when another process holds it.
fn lock(paths: &LedgerPaths) -> Result<File, FileError> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&paths.lock)
        .map_err(io_error("open", &paths.lock))?;
    if !sys::try_lock(&file).map_err(io_error("lock", &paths.lock))? {
        return Err(FileError::Locked {
            path: paths.file.display().to_string(),
            lock: paths.lock.display().to_string(),
        });
    }
    Ok(file)
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

fn open_rw_create(path: &Path) -> Result<File, FileError> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(io_error("create", path))
}

/// Replaces the ledger file by its first `len` bytes (through `.tmp`, fsynced, renamed; the
/// file it replaces is kept as `blockchain.old`).
fn cut_to(paths: &LedgerPaths, len: u64) -> Result<(), FileError> {
    let source = File::open(&paths.file).map_err(io_error("read", &paths.file))?;
    let mut tmp = File::create(&paths.tmp).map_err(io_error("create", &paths.tmp))?;
    io::copy(&mut source.take(len), &mut tmp)
        .and_then(|_| sys::fsync(&tmp))
        .map_err(io_error("write", &paths.tmp))?;
    replace_file(paths)
}

/// Bytes `from..to` of the file at `path`.
fn read_range(path: &Path, from: u64, to: u64) -> Result<Vec<u8>, FileError> {
    let file = File::open(path).map_err(io_error("read", path))?;
    let mut bytes = vec![0; (to - from) as usize];
    file.read_exact_at(&mut bytes, from)
        .map_err(io_error("read", path))?;
    Ok(bytes)
}

/// The digest of the first `len` bytes of the file at `path`.
fn hash_prefix(path: &Path, len: u64) -> Result<LedgerDigest, FileError> {
    let file = File::open(path).map_err(io_error("read", path))?;
    let mut md5 = LedgerDigest::new();
    io::copy(
        &mut BufReader::with_capacity(1 << 20, file.take(len)),
        &mut md5,
    )
    .map_err(io_error("read", path))?;
    Ok(md5)
}

/// Where `needle` starts in `haystack` (the last place, as an append is the latest write).
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.len() > haystack.len() {
        return None;
    }
    (0..=haystack.len() - needle.len())
        .rev()
        .find(|&at| &haystack[at..at + needle.len()] == needle)
}

fn file_len(path: &Path) -> Result<Option<u64>, FileError> {
    match std::fs::metadata(path) {
        Ok(metadata) => Ok(Some(metadata.len())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("inspect", path)(e)),
    }
}

fn remove_if_exists(path: &Path) -> Result<(), FileError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("remove", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    //! Every crash point, laid out on disk as the crash leaves it, then opened.

    use super::*;

    fn policy(n: u32) -> PolicyLine {
        PolicyLine::parse(format!(
            r#"{{"operator": {{"name": "op{n}", "id": "id-{n}", "ledger": "global"}}}}"#
        ))
        .unwrap()
    }

    fn text(lines: &[PolicyLine]) -> String {
        lines.iter().map(|l| format!("{}\n", l.text)).collect()
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        paths: LedgerPaths,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let paths = LedgerPaths::new(&dir.path().join("blockchain.json"));
        Fixture { _dir: dir, paths }
    }

    /// A file holding policies 1..=n at seq n, through the normal write path.
    fn synced(f: &Fixture, n: u32) -> LedgerFile {
        let mut file = LedgerFile::open(&f.paths.file).unwrap();
        let snapshot = file.begin_snapshot().unwrap();
        file.install(snapshot, 0).unwrap();
        for i in 1..=n {
            file.commit(u64::from(i), &HashSet::new(), &[policy(i)])
                .unwrap();
        }
        file
    }

    /// What an EdgeLake node appends for `blockchain insert ... local=true`.
    const LOCAL: &str = "{\"config\": {\"name\": \"n\", \"id\": \"local-1\", \"date\": \"2026-12-01T00:00:00.000000Z\", \"ledger\": \"local\"}}\n";

    fn node_appends(f: &Fixture, bytes: &str) {
        let mut out = OpenOptions::new().append(true).open(&f.paths.file).unwrap();
        out.write_all(bytes.as_bytes()).unwrap();
    }

    fn journaled(f: &Fixture) -> Vec<String> {
        ForeignFiles::new(&f.paths.file)
            .pending()
            .unwrap()
            .into_iter()
            .map(|p| format!("{}..{} {}", p.from, p.to, String::from_utf8_lossy(&p.bytes)))
            .collect()
    }

    /// The ledger's record agrees with the file: reopening trusts it as it is.
    fn assert_clean(f: &Fixture, seq: u64, lines: &[PolicyLine]) {
        assert_eq!(read(&f.paths.file), text(lines));
        let reopened = LedgerFile::open(&f.paths.file).unwrap();
        assert_eq!(reopened.seq(), seq);
        assert!(!reopened.awaiting_snapshot());
    }

    /// A node's line appended before the member's next append is neither overwritten nor
    /// dropped: it goes to the journal, and the file holds the ledger alone.
    #[test]
    fn an_append_never_goes_over_a_nodes_line() {
        let f = fixture();
        let mut file = synced(&f, 2);
        let at = file.len();
        node_appends(&f, LOCAL);
        file.commit(3, &HashSet::new(), &[policy(3)]).unwrap();
        drop(file);
        assert_eq!(
            journaled(&f),
            [format!("{at}..{} {LOCAL}", at + LOCAL.len() as u64)]
        );
        assert_clean(&f, 3, &[1, 2, 3].map(policy));
    }

    /// A node's line that lands between the member's look and its write: the write goes after
    /// it (the file is open for appending), where it is found, journaled and put right.
    #[test]
    fn a_line_appended_during_an_append_is_separated() {
        let f = fixture();
        let mut file = synced(&f, 2);
        let at = file.len();
        node_appends(&f, LOCAL);
        // `append` without the look `commit` takes first: the race's outcome.
        file.append(3, &[policy(3)]).unwrap();
        assert_eq!(read(&f.paths.file), text(&[1, 2, 3].map(policy)));
        // And a node's line after the member's, before it looked again.
        node_appends(&f, "tail\n");
        let end = file.len();
        file.append(4, &[policy(4)]).unwrap();
        drop(file);
        let pending = journaled(&f);
        assert_eq!(pending.len(), 2, "{pending:?}");
        assert_eq!(
            pending[0],
            format!("{at}..{} {LOCAL}", at + LOCAL.len() as u64)
        );
        assert_eq!(pending[1], format!("{end}..{} tail\n", end + 5));
        assert_clean(&f, 4, &[1, 2, 3, 4].map(policy));
    }

    /// A delete's rewrite, and a snapshot's installation, keep a node's line too.
    #[test]
    fn a_rewrite_and_a_snapshot_never_drop_a_nodes_line() {
        let f = fixture();
        let mut file = synced(&f, 3);
        node_appends(&f, LOCAL);
        let deleted: HashSet<String> = ["id-2".to_string()].into();
        file.commit(4, &deleted, &[]).unwrap();
        assert_eq!(journaled(&f).len(), 1);
        ForeignFiles::new(&f.paths.file).clear().unwrap();
        node_appends(&f, "garbage without a line break");
        let mut snapshot = file.begin_snapshot().unwrap();
        snapshot.push(policy(7)).unwrap();
        file.install(snapshot, 9).unwrap();
        drop(file);
        assert_eq!(journaled(&f).len(), 1, "{:?}", journaled(&f));
        assert!(journaled(&f)[0].ends_with("garbage without a line break"));
        assert_clean(&f, 9, &[policy(7)]);
    }

    /// A node that opened the file before a rewrite's rename and writes after it writes into
    /// `blockchain.old`: the next look journals those bytes.
    #[test]
    fn a_late_write_to_the_replaced_file_is_journaled() {
        let f = fixture();
        let mut file = synced(&f, 3);
        let mut opened_before = OpenOptions::new().append(true).open(&f.paths.file).unwrap();
        let deleted: HashSet<String> = ["id-2".to_string()].into();
        file.commit(4, &deleted, &[]).unwrap();
        opened_before.write_all(LOCAL.as_bytes()).unwrap();
        assert!(journaled(&f).is_empty());
        file.take_foreign().unwrap();
        assert_eq!(journaled(&f).len(), 1, "{:?}", journaled(&f));
        assert!(journaled(&f)[0].contains("local-1"));
        // Looked at once: not journaled again.
        file.take_foreign().unwrap();
        assert_eq!(journaled(&f).len(), 1);
        // And a write after the next rewrite's rename, to the file that rewrite replaced.
        let mut opened_before = OpenOptions::new().append(true).open(&f.paths.file).unwrap();
        file.commit(5, &["id-1".to_string()].into(), &[]).unwrap();
        opened_before.write_all(b"late\n").unwrap();
        file.commit(6, &["id-3".to_string()].into(), &[]).unwrap();
        assert_eq!(journaled(&f).len(), 2, "{:?}", journaled(&f));
        assert!(journaled(&f)[1].ends_with("late\n"));
        drop(file);
        assert_clean(&f, 6, &[]);
    }

    /// The sync loop's look at an idle file: the node's lines leave it for the journal.
    #[test]
    fn take_foreign_journals_and_rewrites() {
        let f = fixture();
        let mut file = synced(&f, 2);
        assert!(!file.take_foreign().unwrap());
        node_appends(&f, LOCAL);
        node_appends(
            &f,
            "{\"deleted\": { \"id\" : \"id-1\", \"ledger\" : \"local\" }}\n",
        );
        assert!(file.take_foreign().unwrap());
        assert_eq!(journaled(&f).len(), 2);
        assert!(!file.take_foreign().unwrap());
        file.commit(3, &HashSet::new(), &[policy(3)]).unwrap();
        drop(file);
        assert_eq!(journaled(&f).len(), 2);
        assert_clean(&f, 3, &[1, 2, 3].map(policy));
    }

    /// At start-up a tail after the recorded length is journaled before it is cut.
    #[test]
    fn start_up_journals_the_tail() {
        let f = fixture();
        drop(synced(&f, 2));
        node_appends(&f, LOCAL);
        node_appends(&f, "{\"tag\": {\"id\": ");
        let file = LedgerFile::open(&f.paths.file).unwrap();
        assert_eq!(file.seq(), 2);
        drop(file);
        let pending = journaled(&f);
        assert_eq!(pending.len(), 2, "{pending:?}");
        assert!(pending[1].ends_with("{\"tag\": {\"id\": "));
        assert_clean(&f, 2, &[1, 2].map(policy));
    }

    /// A file someone edited or replaced is resynced, and its lines the ledger does not hold
    /// are journaled first.
    #[test]
    fn an_edited_file_keeps_what_the_ledger_lacks() {
        let f = fixture();
        let mut file = synced(&f, 2);
        let mut edited = text(&[policy(1)]);
        edited.push_str(LOCAL);
        std::fs::write(f.paths.dir.join("other"), &edited).unwrap();
        std::fs::rename(f.paths.dir.join("other"), &f.paths.file).unwrap();
        assert!(file.take_foreign().unwrap());
        assert!(file.awaiting_snapshot());
        let pending = journaled(&f);
        assert_eq!(pending.len(), 1, "{pending:?}");
        assert!(pending[0].contains("local-1"));
    }

    #[test]
    fn appends_and_deletes_keep_the_index_right() {
        let f = fixture();
        let mut file = synced(&f, 5);
        let deleted: HashSet<String> = ["id-2".to_string(), "id-4".to_string()].into();
        file.commit(6, &deleted, &[policy(6)]).unwrap();
        let expected = [policy(1), policy(3), policy(5), policy(6)];
        assert_eq!(read(&f.paths.file), text(&expected));
        assert_eq!(read(&f.paths.old), text(&[1, 2, 3, 4, 5].map(policy)));
        // Offsets moved: deleting the last and the first lines must cut exactly them.
        let deleted: HashSet<String> = ["id-6".to_string(), "id-1".to_string()].into();
        file.commit(7, &deleted, &[]).unwrap();
        assert_eq!(read(&f.paths.file), text(&[policy(3), policy(5)]));
        drop(file);
        let reopened = LedgerFile::open(&f.paths.file).unwrap();
        assert_eq!((reopened.seq(), reopened.policy_count()), (7, 2));
        assert!(!reopened.awaiting_snapshot());
    }

    #[test]
    fn a_second_daemon_is_refused() {
        let f = fixture();
        let _first = synced(&f, 1);
        assert!(matches!(
            LedgerFile::open(&f.paths.file),
            Err(FileError::Locked { .. })
        ));
    }

    #[test]
    fn an_unrecorded_or_torn_tail_is_cut() {
        let f = fixture();
        drop(synced(&f, 3));
        let good = read(&f.paths.file);
        // A recorded-later append (complete line) and a torn one after it.
        let mut tail = text(&[policy(4)]);
        tail.push_str(r#"{"operator": {"na"#);
        std::fs::write(&f.paths.file, format!("{good}{tail}")).unwrap();
        let file = LedgerFile::open(&f.paths.file).unwrap();
        assert_eq!((file.seq(), file.policy_count()), (3, 3));
        assert_eq!(read(&f.paths.file), good);
    }

    #[test]
    fn a_rewrite_cut_before_its_marker_is_discarded() {
        let f = fixture();
        drop(synced(&f, 3));
        let good = read(&f.paths.file);
        std::fs::write(&f.paths.tmp, text(&[policy(1)])).unwrap();
        let file = LedgerFile::open(&f.paths.file).unwrap();
        assert_eq!(file.seq(), 3);
        assert_eq!(read(&f.paths.file), good);
        assert!(!f.paths.tmp.exists());
    }

    /// Records, as a rewrite would before its rename, that the file holds `before` at `seq` and
    /// is being replaced by `after` at `pending_seq`.
    fn record_pending(f: &Fixture, seq: u64, before: &str, pending_seq: u64, after: &str) {
        SyncState {
            seq,
            len: before.len() as u64,
            md5: FileMd5::of(before.as_bytes()),
            pending: Some(PendingRewrite {
                seq: pending_seq,
                len: after.len() as u64,
                md5: FileMd5::of(after.as_bytes()),
            }),
        }
        .store(&f.paths)
        .unwrap();
    }

    #[test]
    fn a_rewrite_cut_after_its_marker_is_finished() {
        let f = fixture();
        drop(synced(&f, 3));
        let before = read(&f.paths.file);
        let after = text(&[policy(1), policy(3)]);
        std::fs::write(&f.paths.tmp, &after).unwrap();
        record_pending(&f, 3, &before, 4, &after);
        let file = LedgerFile::open(&f.paths.file).unwrap();
        assert_eq!((file.seq(), file.policy_count()), (4, 2));
        assert_eq!(read(&f.paths.file), after);
        assert_eq!(read(&f.paths.old), before);
        assert_eq!(SyncState::load(&f.paths).unwrap().unwrap().pending, None);
        assert_eq!(file.md5(), FileMd5::of(after.as_bytes()));
    }

    #[test]
    fn a_rewrite_finished_from_a_changed_tmp_is_not_trusted() {
        // The `.tmp` a crash left has the pending length but not the pending content.
        let f = fixture();
        drop(synced(&f, 3));
        let before = read(&f.paths.file);
        let after = text(&[policy(1), policy(3)]);
        std::fs::write(&f.paths.tmp, after.replacen("op3", "op4", 1)).unwrap();
        record_pending(&f, 3, &before, 4, &after);
        let file = LedgerFile::open(&f.paths.file).unwrap();
        assert!(file.awaiting_snapshot());
        assert_eq!(file.seq(), 0);
    }

    #[test]
    fn a_rewrite_cut_after_its_rename_is_recorded() {
        let f = fixture();
        drop(synced(&f, 3));
        let before = read(&f.paths.file);
        let after = text(&[policy(2)]);
        std::fs::write(&f.paths.file, &after).unwrap();
        record_pending(&f, 3, &before, 5, &after);
        let file = LedgerFile::open(&f.paths.file).unwrap();
        assert_eq!((file.seq(), file.policy_count()), (5, 1));
        assert_eq!(
            SyncState::load(&f.paths).unwrap().unwrap(),
            SyncState {
                seq: 5,
                len: after.len() as u64,
                md5: FileMd5::of(after.as_bytes()),
                pending: None
            }
        );
    }

    #[test]
    fn what_cannot_be_trusted_waits_for_a_snapshot() {
        // A short file, a corrupt line, a duplicate, a damaged record, a missing record; then
        // changes that keep every line a valid policy, which only the recorded md5 reveals: a
        // byte flipped inside a string value, a line edited to other valid JSON of the same
        // length, two lines swapped, a recorded part changed before an unrecorded tail.
        type Damage = fn(&LedgerPaths, &str);
        let damages: [(&str, Damage); 9] = [
            ("short", |p, good| {
                std::fs::write(&p.file, &good[..good.len() - 10]).unwrap()
            }),
            ("corrupt", |p, good| {
                std::fs::write(&p.file, good.replacen("\"op2\"", "\"op2\'", 1)).unwrap()
            }),
            ("duplicate", |p, good| {
                let first = good.lines().next().unwrap();
                let doubled = good.replacen(good.lines().nth(1).unwrap(), first, 1);
                std::fs::write(&p.file, &doubled).unwrap();
                // Recorded as if the member had written it: the line check must catch it.
                let mut state = SyncState::load(p).unwrap().unwrap();
                state.len = doubled.len() as u64;
                state.md5 = FileMd5::of(doubled.as_bytes());
                state.store(p).unwrap();
            }),
            ("damaged record", |p, _| {
                // Both slots: one torn slot is a crash during a write, and the other is read.
                let record = read(&p.state).replace("len ", "lem ");
                std::fs::write(&p.state, record).unwrap()
            }),
            ("no record", |p, _| std::fs::remove_file(&p.state).unwrap()),
            ("byte flipped in a string", |p, good| {
                std::fs::write(&p.file, good.replacen("\"op2\"", "\"oq2\"", 1)).unwrap()
            }),
            ("line edited, same length", |p, good| {
                let edited = good.replacen(r#""name": "op2""#, r#""nick": "op2""#, 1);
                assert_eq!(edited.len(), good.len());
                std::fs::write(&p.file, edited).unwrap()
            }),
            ("lines swapped", |p, good| {
                let lines: Vec<&str> = good.lines().collect();
                let swapped = format!("{}\n{}\n{}\n", lines[1], lines[0], lines[2]);
                assert_eq!(swapped.len(), good.len());
                std::fs::write(&p.file, swapped).unwrap()
            }),
            ("changed before a tail", |p, good| {
                let changed = good.replacen("\"op1\"", "\"op9\"", 1);
                std::fs::write(&p.file, format!("{changed}{{\"operator\": {{\"na")).unwrap()
            }),
        ];
        for (what, damage) in damages {
            let f = fixture();
            drop(synced(&f, 3));
            let good = read(&f.paths.file);
            damage(&f.paths, &good);
            let on_disk = read(&f.paths.file);
            for line in on_disk
                .lines()
                .filter(|_| what.contains("string") || what.contains("edited"))
            {
                // These keep every line a valid policy: only the md5 can catch them.
                PolicyLine::parse(line.to_string()).unwrap();
            }
            let mut file = LedgerFile::open(&f.paths.file).unwrap();
            assert!(file.awaiting_snapshot(), "{what}");
            assert_eq!(file.seq(), 0, "{what}");
            assert_eq!(
                read(&f.paths.file),
                on_disk,
                "{what}: kept until a snapshot"
            );
            assert!(matches!(
                file.commit(4, &HashSet::new(), &[policy(4)]),
                Err(FileError::AwaitingSnapshot)
            ));
            let mut snapshot = file.begin_snapshot().unwrap();
            snapshot.push(policy(7)).unwrap();
            file.install(snapshot, 9).unwrap();
            assert_eq!(read(&f.paths.file), text(&[policy(7)]), "{what}");
            drop(file);
            let reopened = LedgerFile::open(&f.paths.file).unwrap();
            assert_eq!((reopened.seq(), reopened.awaiting_snapshot()), (9, false));
            assert_eq!(reopened.md5(), FileMd5::of(text(&[policy(7)]).as_bytes()));
        }
    }

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

    #[test]
    fn an_abandoned_snapshot_leaves_the_file_alone() {
        let f = fixture();
        let file = synced(&f, 2);
        let good = read(&f.paths.file);
        let mut snapshot = file.begin_snapshot().unwrap();
        snapshot.push(policy(9)).unwrap();
        assert!(matches!(
            snapshot.push(policy(9)),
            Err(FileError::DuplicateInSnapshot(_))
        ));
        file.abandon(snapshot);
        assert_eq!(read(&f.paths.file), good);
        assert!(!f.paths.tmp.exists());
    }
}
