//! Start-up: the daemon's lock, then the repair of whatever a crash left. An interrupted rewrite
//! is finished or discarded, the recorded part of the file is read once and checked against the
//! record, and an unrecorded tail is journaled and cut; a file that fails is distrusted and kept
//! as it is until a full snapshot replaces it.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use ledger_anylog::digest::LedgerDigest;

use super::rewrite::replace_file;
use super::{
    Entry, FileError, LedgerFile, file_len, io_error, open_rw, read_range, remove_if_exists, sys,
};
use crate::foreign::ForeignFiles;
use crate::line::PolicyLine;
use crate::paths::LedgerPaths;
use crate::state::{FileMd5, PendingRewrite, StateError, SyncState};

/// What the state record says, once an interrupted rewrite is finished or discarded.
enum Recorded {
    /// There is no record: a new member, or a file that is not this member's.
    Nothing,
    /// The record the file must agree with.
    State(SyncState),
    /// A record that cannot be trusted (damaged, or naming a rewrite that is not on disk), and
    /// why.
    Distrusted(String),
}

/// What start-up finds the file to be, against its record.
enum Found {
    /// The ledger up to `seq`: the file's first `len` bytes are the policies of `index`, every
    /// line whole, and hash to the recorded md5 (`digest` goes on from there). The `tail` bytes
    /// after them were never recorded: an append of ours cut short, or someone else's lines.
    Ledger {
        seq: u64,
        len: u64,
        index: HashMap<String, Entry>,
        digest: LedgerDigest,
        tail: u64,
    },
    /// A file that cannot be trusted, and why: it is kept as it is until a full snapshot
    /// replaces it, and the member resyncs from seq 0.
    Distrusted(String),
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
    /// - a file longer than recorded (an append cut short, torn or not, or not yet recorded, or
    ///   lines someone else appended): the tail is journaled, then the file is cut back to the
    ///   recorded length, whose changes the master sends again;
    /// - a file shorter than recorded, a line that is not a valid policy, a policy twice, a
    ///   recorded part whose md5 is not the recorded one (changed outside the member), a
    ///   damaged record, a missing file, or a file without a record: the file is kept as it is
    ///   until a full snapshot replaces it, and [`LedgerFile::seq`] is 0.
    pub fn open(path: &Path) -> Result<LedgerFile, FileError> {
        let paths = LedgerPaths::new(path);
        let lock = lock(&paths)?;
        let recorded = match SyncState::load(&paths) {
            Ok(None) => Recorded::Nothing,
            Ok(Some(state)) => match state.pending {
                Some(pending) => finish_rewrite(&paths, state, pending)?,
                None => Recorded::State(state),
            },
            Err(e @ StateError::Damaged { .. }) => Recorded::Distrusted(e.to_string()),
            Err(e) => return Err(e.into()),
        };
        // A rewrite or snapshot that never recorded its pending marker, or a state record never
        // renamed into place: neither is part of the ledger.
        remove_if_exists(&paths.tmp)?;
        remove_if_exists(&paths.state_tmp)?;

        let file_len = file_len(&paths.file)?;
        let found = examine(&paths, recorded, file_len);
        // Cut only a file whose recorded part checked out: a damaged one is kept whole until
        // a snapshot replaces it (it becomes `blockchain.old`).
        let foreign = ForeignFiles::new(&paths.file);
        let replaced = match &found {
            Found::Ledger { seq, len, tail, .. } if *tail > 0 => {
                cut_unrecorded_tail(&paths, &foreign, *seq, *len, *tail)?
            }
            _ => None,
        };
        let file = match file_len {
            Some(_) => Some(open_rw(&paths.file)?),
            None => None,
        };
        let (seq, len, md5, index, awaiting_snapshot) = match found {
            Found::Ledger {
                seq,
                len,
                index,
                digest,
                ..
            } => {
                if seq == 0 {
                    tracing::info!(
                        "starting a full sync of {} from seq 0",
                        paths.file.display()
                    );
                } else {
                    tracing::info!(
                        policies = index.len(),
                        bytes = len,
                        "resuming from seq {seq} ({})",
                        paths.file.display()
                    );
                }
                (seq, len, digest, index, false)
            }
            Found::Distrusted(reason) => {
                tracing::warn!(
                    "{reason}; resyncing from seq 0 (the master will send a full snapshot)"
                );
                let len = file_len.unwrap_or(0);
                (0, len, LedgerDigest::new(), HashMap::new(), true)
            }
        };
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
}

/// Compares the record with the file (`file_len` bytes long, `None` when missing), then reads
/// the recorded part once: every line a valid policy, no id twice, and the recorded md5.
fn examine(paths: &LedgerPaths, recorded: Recorded, file_len: Option<u64>) -> Found {
    let file = paths.file.display();
    let (seq, len, md5, tail) = match (recorded, file_len) {
        (Recorded::Distrusted(reason), _) => return Found::Distrusted(reason),
        (Recorded::Nothing, None) => (0, 0, FileMd5::EMPTY, 0),
        (Recorded::Nothing, Some(_)) => {
            return Found::Distrusted(format!(
                "{file} has no state record beside it, so which seq it holds is unknown"
            ));
        }
        (Recorded::State(state), None) if state.len == 0 => (state.seq, 0, state.md5, 0),
        (Recorded::State(state), None) => {
            return Found::Distrusted(format!(
                "{file} is missing though seq {} was recorded",
                state.seq
            ));
        }
        (Recorded::State(state), Some(actual)) if actual < state.len => {
            return Found::Distrusted(format!(
                "{file} has {actual} bytes, fewer than the {} recorded at seq {}",
                state.len, state.seq
            ));
        }
        (Recorded::State(state), Some(actual)) => {
            (state.seq, state.len, state.md5, actual - state.len)
        }
    };
    let scanned = match file_len {
        Some(_) => scan(&paths.file, len),
        None => Ok((HashMap::new(), LedgerDigest::new())),
    };
    match scanned {
        Ok((_, digest)) if FileMd5::of_digest(&digest) != md5 => Found::Distrusted(format!(
            "{file} does not match its state record: the md5 of its first {len} bytes is {}, \
             not the {md5} recorded at seq {seq}, so it was changed outside the member",
            FileMd5::of_digest(&digest),
        )),
        Ok((index, digest)) => Found::Ledger {
            seq,
            len,
            index,
            digest,
            tail,
        },
        Err(reason) => Found::Distrusted(reason),
    }
}

/// Journals the `tail` bytes after the recorded `len` (those of seq `seq`), then cuts the file
/// to `len`; returns the replaced file (now `blockchain.old`): its inode and how much of it is
/// accounted for.
///
/// The tail is an append of ours cut short, or lines someone else appended: journaled first,
/// never dropped unseen.
fn cut_unrecorded_tail(
    paths: &LedgerPaths,
    foreign: &ForeignFiles,
    seq: u64,
    len: u64,
    tail: u64,
) -> Result<Option<(u64, u64)>, FileError> {
    let end = len + tail;
    let bytes = read_range(&paths.file, len, end)?;
    foreign
        .journal(len, &bytes)
        .map_err(io_error("journal the tail of", &paths.file))?;
    // Not a truncation: a node may append while this runs, and a truncation would cut what it
    // wrote after the tail was read. The recorded part goes to a new file, and whatever reached
    // the old one after the tail is journaled too.
    cut_to(paths, len)?;
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
    let replaced = std::fs::metadata(&paths.old).ok().map(|m| {
        use std::os::unix::fs::MetadataExt;
        (m.ino(), accounted)
    });
    tracing::info!(
        journaled_bytes = tail,
        "repaired {}: moved the {tail} bytes after seq {seq} to {} to deal with",
        paths.file.display(),
        foreign.journal.display(),
    );
    Ok(replaced)
}

/// Finishes or discards the rewrite a crash interrupted; returns the record that now holds.
fn finish_rewrite(
    paths: &LedgerPaths,
    state: SyncState,
    pending: PendingRewrite,
) -> Result<Recorded, FileError> {
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
            journal_replaced_tail(paths, before.len)?;
            done.store(paths)?;
            tracing::info!(
                "finished the rewrite of {} a crash interrupted: it holds seq {}",
                paths.file.display(),
                pending.seq
            );
            Ok(Recorded::State(done))
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
            Ok(Recorded::State(before))
        }
        // Crashed after the rename: only the record is behind. A longer file got someone
        // else's lines since: the record is completed, and start-up deals with the tail. The
        // crash may also have come before what reached the replaced file late was journaled.
        None => match file_len(&paths.file)? {
            Some(len) if len >= pending.len => {
                journal_replaced_tail(paths, before.len)?;
                done.store(paths)?;
                tracing::info!(
                    "completed the record of an interrupted rewrite of {}: it holds seq {}",
                    paths.file.display(),
                    pending.seq
                );
                Ok(Recorded::State(done))
            }
            other => Ok(Recorded::Distrusted(format!(
                "a rewrite of {} was interrupted and the file has {} bytes, not the {} recorded",
                paths.file.display(),
                other.map_or_else(|| "no".to_string(), |len| len.to_string()),
                pending.len
            ))),
        },
    }
}

/// Journals what the file a rewrite replaced (now `blockchain.old`) holds after its recorded
/// `len`: someone else appended it, before the rename or through a descriptor opened before it,
/// so it is theirs, not the ledger's. (Bytes journaled before the crash are journaled again,
/// with the same range: the journal deals with each once.)
fn journal_replaced_tail(paths: &LedgerPaths, len: u64) -> Result<(), FileError> {
    if let Some(old_len) = std::fs::metadata(&paths.old).ok().map(|m| m.len())
        && old_len > len
    {
        let tail = read_range(&paths.old, len, old_len)?;
        ForeignFiles::new(&paths.file)
            .journal(len, &tail)
            .map_err(io_error("journal the tail of", &paths.old))?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::ledger_file::testing::*;

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

    /// A crash after a rewrite's rename, before the bytes a node wrote into the file it replaced
    /// (after the member's last look, before the rename: now `blockchain.old`) were journaled.
    #[test]
    fn a_rewrite_cut_after_its_rename_keeps_what_reached_the_replaced_file() {
        let f = fixture();
        drop(synced(&f, 3));
        let before = read(&f.paths.file);
        let after = text(&[policy(1), policy(3)]);
        std::fs::write(&f.paths.old, format!("{before}{LOCAL}")).unwrap();
        std::fs::write(&f.paths.file, &after).unwrap();
        record_pending(&f, 3, &before, 4, &after);
        let file = LedgerFile::open(&f.paths.file).unwrap();
        assert_eq!((file.seq(), file.awaiting_snapshot()), (4, false));
        let at = before.len();
        assert_eq!(
            journaled(&f),
            [format!("{at}..{} {LOCAL}", at + LOCAL.len())]
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
}
