//! The local ledger file (`blockchain.json`), written so that a crash at any moment can be
//! repaired at the next start into a complete ledger that agrees with the recorded seq.
//!
//! The file is JSON Lines in ledger order, each line a policy's `json` and a line break, so its
//! md5 equals the master's digest at the same seq. Beside it, the [`SyncState`] record says
//! which seq the file holds and how long the file is at that seq.
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
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::line::PolicyLine;
use crate::paths::LedgerPaths;
use crate::state::{PendingRewrite, StateError, SyncState};

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
    index: HashMap<String, Entry>,
    /// Set when the file cannot be trusted: only a snapshot may replace it.
    awaiting_snapshot: bool,
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
        if distrust.is_none() {
            match (state, file_len) {
                (None, None) => {}
                (None, Some(_)) => {
                    distrust = Some(format!(
                        "{} has no state record beside it, so which seq it holds is unknown",
                        paths.file.display()
                    ))
                }
                (Some(state), None) if state.len == 0 => seq = state.seq,
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
                    if actual > state.len {
                        truncate(&paths.file, state.len)?;
                        tracing::info!(
                            dropped_bytes = actual - state.len,
                            "repaired {}: dropped the tail written after seq {} was recorded",
                            paths.file.display(),
                            state.seq
                        );
                    }
                    (seq, len) = (state.seq, state.len);
                }
            }
        }
        let mut index = HashMap::new();
        if distrust.is_none() && file_len.is_some() {
            match scan(&paths.file, len) {
                Ok(scanned) => index = scanned,
                Err(reason) => distrust = Some(reason),
            }
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
            index,
            awaiting_snapshot,
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
            self.paths
                .sync_dir()
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
        // One write for the whole batch keeps the window for a torn tail as small as the
        // system allows; start-up truncates whatever was not recorded.
        file.write_all_at(&bytes, self.len)
            .and_then(|()| file.sync_data())
            .map_err(io_error("append to", &self.paths.file))?;
        let new_len = self.len + bytes.len() as u64;
        SyncState {
            seq,
            len: new_len,
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
        Ok(())
    }

    fn rewrite(
        &mut self,
        seq: u64,
        deleted: &HashSet<String>,
        inserted: &[PolicyLine],
    ) -> Result<(), FileError> {
        let source = self
            .file
            .as_ref()
            .ok_or_else(|| FileError::Inconsistent("there is no file to delete from".into()))?;
        let mut removed: Vec<Entry> = deleted.iter().map(|id| self.index[id]).collect();
        removed.sort_by_key(|entry| entry.offset);

        let tmp = File::create(&self.paths.tmp).map_err(io_error("create", &self.paths.tmp))?;
        let mut out = BufWriter::with_capacity(1 << 20, tmp);
        let mut reader = BufReader::with_capacity(1 << 20, source);
        let mut copy = |from: u64, to: u64, out: &mut BufWriter<File>| -> io::Result<()> {
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
            out.get_ref().sync_all()
        })();
        written.map_err(io_error("write", &self.paths.tmp))?;

        let removed_len: u64 = removed.iter().map(|entry| entry.len).sum();
        let kept_len = self.len - removed_len;
        let new_len = kept_len + inserted.iter().map(PolicyLine::file_len).sum::<u64>();
        self.swap_in(seq, new_len)?;

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

    /// Replaces the file by the fsynced `.tmp` of `new_len` bytes holding seq `seq`.
    fn swap_in(&mut self, seq: u64, new_len: u64) -> Result<(), FileError> {
        SyncState {
            seq: self.seq,
            len: self.len,
            pending: Some(PendingRewrite { seq, len: new_len }),
        }
        .store(&self.paths)?;
        replace_file(&self.paths)?;
        SyncState {
            seq,
            len: new_len,
            pending: None,
        }
        .store(&self.paths)?;
        self.file = Some(open_rw(&self.paths.file)?);
        self.seq = seq;
        self.len = new_len;
        Ok(())
    }

    /// Starts a snapshot in `.tmp`; the file stays untouched until [`LedgerFile::install`].
    pub fn begin_snapshot(&self) -> Result<Snapshot, FileError> {
        let file = File::create(&self.paths.tmp).map_err(io_error("create", &self.paths.tmp))?;
        Ok(Snapshot {
            out: BufWriter::with_capacity(1 << 20, file),
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
        mut out: BufWriter<File>,
        len: u64,
        path: &Path,
        seq: u64,
    ) -> Result<(), FileError> {
        out.flush()
            .and_then(|()| out.get_ref().sync_all())
            .map_err(io_error("write", path))?;
        drop(out);
        self.swap_in(seq, len)
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
    out: BufWriter<File>,
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
        // Crashed after the rename: only the record is behind.
        None => match file_len(&paths.file)? {
            Some(len) if len == pending.len => {
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
    std::fs::rename(&paths.tmp, &paths.file).map_err(io_error("rename over", &paths.file))?;
    paths
        .sync_dir()
        .map_err(io_error("sync the directory of", &paths.file))
}

/// Reads the first `len` bytes of the file as policy lines and indexes them; the error says
/// what makes the file unfit.
fn scan(path: &Path, len: u64) -> Result<HashMap<String, Entry>, String> {
    let file = File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut reader = BufReader::with_capacity(1 << 20, file.take(len));
    let mut index = HashMap::new();
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
    Ok(index)
}

/// Takes the daemon's lock beside the file, failing at once when another process holds it.
fn lock(paths: &LedgerPaths) -> Result<File, FileError> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&paths.lock)
        .map_err(io_error("open", &paths.lock))?;
    // SAFETY: flock(2) on a descriptor we own; the lock lives as long as the file stays open.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let error = io::Error::last_os_error();
        if error.kind() == io::ErrorKind::WouldBlock {
            return Err(FileError::Locked {
                path: paths.file.display().to_string(),
                lock: paths.lock.display().to_string(),
            });
        }
        return Err(io_error("lock", &paths.lock)(error));
    }
    Ok(file)
}

fn open_rw(path: &Path) -> Result<File, FileError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_error("open", path))
}

fn open_rw_create(path: &Path) -> Result<File, FileError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_error("create", path))
}

fn truncate(path: &Path, len: u64) -> Result<(), FileError> {
    let file = open_rw(path)?;
    file.set_len(len)
        .and_then(|()| file.sync_all())
        .map_err(io_error("truncate", path))
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

    #[test]
    fn a_rewrite_cut_after_its_marker_is_finished() {
        let f = fixture();
        drop(synced(&f, 3));
        let before = read(&f.paths.file);
        let after = text(&[policy(1), policy(3)]);
        std::fs::write(&f.paths.tmp, &after).unwrap();
        SyncState {
            seq: 3,
            len: before.len() as u64,
            pending: Some(PendingRewrite {
                seq: 4,
                len: after.len() as u64,
            }),
        }
        .store(&f.paths)
        .unwrap();
        let file = LedgerFile::open(&f.paths.file).unwrap();
        assert_eq!((file.seq(), file.policy_count()), (4, 2));
        assert_eq!(read(&f.paths.file), after);
        assert_eq!(read(&f.paths.old), before);
        assert_eq!(SyncState::load(&f.paths).unwrap().unwrap().pending, None);
    }

    #[test]
    fn a_rewrite_cut_after_its_rename_is_recorded() {
        let f = fixture();
        drop(synced(&f, 3));
        let before = read(&f.paths.file);
        let after = text(&[policy(2)]);
        std::fs::write(&f.paths.file, &after).unwrap();
        SyncState {
            seq: 3,
            len: before.len() as u64,
            pending: Some(PendingRewrite {
                seq: 5,
                len: after.len() as u64,
            }),
        }
        .store(&f.paths)
        .unwrap();
        let file = LedgerFile::open(&f.paths.file).unwrap();
        assert_eq!((file.seq(), file.policy_count()), (5, 1));
        assert_eq!(
            SyncState::load(&f.paths).unwrap().unwrap(),
            SyncState {
                seq: 5,
                len: after.len() as u64,
                pending: None
            }
        );
    }

    #[test]
    fn what_cannot_be_trusted_waits_for_a_snapshot() {
        // A short file, a corrupt line, a duplicate, a damaged record, a missing record.
        type Damage = fn(&LedgerPaths, &str);
        let damages: [(&str, Damage); 5] = [
            ("short", |p, good| {
                std::fs::write(&p.file, &good[..good.len() - 10]).unwrap()
            }),
            ("corrupt", |p, good| {
                std::fs::write(&p.file, good.replacen("\"op2\"", "\"op2\'", 1)).unwrap()
            }),
            ("duplicate", |p, good| {
                let first = good.lines().next().unwrap();
                let doubled = good.replacen(good.lines().nth(1).unwrap(), first, 1);
                std::fs::write(&p.file, doubled).unwrap();
                let mut state = SyncState::load(p).unwrap().unwrap();
                state.len = std::fs::metadata(&p.file).unwrap().len();
                state.store(p).unwrap();
            }),
            ("damaged record", |p, _| {
                let record = read(&p.state).replace("seq 3", "seq 9");
                std::fs::write(&p.state, record).unwrap()
            }),
            ("no record", |p, _| std::fs::remove_file(&p.state).unwrap()),
        ];
        for (what, damage) in damages {
            let f = fixture();
            drop(synced(&f, 3));
            let good = read(&f.paths.file);
            damage(&f.paths, &good);
            let on_disk = read(&f.paths.file);
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
        }
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
