//! Inserts are appended: the batch's lines in one write to the file opened with `O_APPEND`, its
//! blocks reserved first, `fdatasync`, then the record. Appending, not writing at the recorded
//! length: a line a node appended meanwhile is never written over, and is found right after.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{Entry, FileError, LedgerFile, io_error, sys};
use crate::line::PolicyLine;
use crate::state::{FileMd5, SyncState};

impl LedgerFile {
    /// Appends `inserted` (none held by the file), the changes up to `seq`, and records them.
    pub(super) fn append(&mut self, seq: u64, inserted: &[PolicyLine]) -> Result<(), FileError> {
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
        // system allows; start-up journals and cuts whatever was not recorded.
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
}

/// The ledger file, created when missing, open for reading and appending (see `open_rw`).
fn open_rw_create(path: &Path) -> Result<File, FileError> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(io_error("create", path))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use crate::ledger_file::testing::*;

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
}
