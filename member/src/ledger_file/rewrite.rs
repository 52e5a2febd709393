//! Deletes rewrite the file: the kept lines and the new ones go to `.tmp`, which is fsynced; the
//! record gets a pending marker naming the new seq, length and md5; the current file is kept as
//! `blockchain.old` (a hard link); `.tmp` is renamed over the file; the directory is fsynced; the
//! record moves on. A snapshot is swapped in the same way ([`LedgerFile::swap_in`]).

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};

use ledger_anylog::digest::LedgerDigest;

use super::{Entry, FileError, LedgerFile, file_len, io_error, open_rw, remove_if_exists, sys};
use crate::line::PolicyLine;
use crate::paths::LedgerPaths;
use crate::state::{FileMd5, PendingRewrite, SyncState};

impl LedgerFile {
    /// Drops `deleted` and adds `inserted` at the end, the changes up to `seq`, by a rewrite.
    pub(super) fn rewrite(
        &mut self,
        seq: u64,
        deleted: &HashSet<String>,
        inserted: &[PolicyLine],
    ) -> Result<(), FileError> {
        self.rewrite_accounting(seq, deleted, inserted, self.len)
    }

    /// [`LedgerFile::rewrite`] of a file whose bytes up to `accounted` are known (the ledger's
    /// and foreign bytes already journaled): any byte after it is someone else's.
    pub(super) fn rewrite_accounting(
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
    pub(super) fn swap_in(
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
}

/// The writer of a new file (`.tmp`), hashing what it writes: a rewrite or a snapshot knows the
/// md5 of the file it installs without reading it back.
#[derive(Debug)]
pub(super) struct Md5Writer {
    pub(super) inner: BufWriter<File>,
    /// The md5 of every byte accepted so far.
    pub(super) md5: LedgerDigest,
}

impl Md5Writer {
    pub(super) fn new(inner: BufWriter<File>) -> Md5Writer {
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

/// Renames `.tmp` over the file, keeping the file it replaces as `blockchain.old`.
pub(super) fn replace_file(paths: &LedgerPaths) -> Result<(), FileError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::foreign::ForeignFiles;
    use crate::ledger_file::testing::*;

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
}
