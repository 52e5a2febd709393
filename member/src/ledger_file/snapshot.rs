//! A snapshot streams into `.tmp` as it arrives, hashed as it is written, while the file stays
//! untouched; at `caught_up` it is swapped in as a rewrite is ([`LedgerFile::install`]), or
//! dropped when its stream breaks ([`LedgerFile::abandon`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::rewrite::Md5Writer;
use super::{Entry, FileError, LedgerFile, io_error, remove_if_exists, sys};
use crate::line::PolicyLine;

impl LedgerFile {
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

    /// Makes the snapshot's `.tmp` (of `len` bytes, at `path`) durable and swaps it in.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger_file::testing::*;

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
