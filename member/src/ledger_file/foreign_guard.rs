//! The guard against losing bytes someone else (the EdgeLake node beside the member) wrote into
//! the file: before every write and every 500 ms the member looks ([`LedgerFile::take_foreign`]);
//! what it finds after the ledger's bytes is journaled ([`crate::foreign`]) and fsynced before
//! a rewrite takes it out of the file, and so are the bytes that reach the file a rewrite
//! replaced (`blockchain.old`) through a descriptor opened before the rename.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;

use ledger_anylog::digest::LedgerDigest;

use super::{FileError, LedgerFile, file_len, io_error, read_range};
use crate::foreign::ForeignFiles;
use crate::line::PolicyLine;
use crate::state::FileMd5;

impl LedgerFile {
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

    /// After an append of `ours` (the batch `inserted` up to `seq`) found the file `end` bytes
    /// long instead of ending with it: someone else appended before or after it. Their bytes
    /// are journaled, and the file is rewritten as the recorded part and the batch.
    pub(super) fn separate_foreign(
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
    pub(super) fn journal_after(&self, path: &Path, accounted: u64) -> Result<u64, FileError> {
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
    pub(super) fn check_replaced(&mut self) -> Result<(), FileError> {
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

    /// Journals the lines of `path` that are not the ledger's: local policies and deletes,
    /// and lines that are no policy at all. With `by_index`, a policy line whose id the file
    /// does not hold is journaled too; without (a distrusted file, whose index is empty), the
    /// snapshot replacing it decides what the ledger holds. Returns how many it journaled.
    pub(super) fn journal_unknown_lines(
        &self,
        path: &Path,
        by_index: bool,
    ) -> Result<usize, FileError> {
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

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::io::Write;

    use super::*;
    use crate::ledger_file::testing::*;

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
}
