//! The files a member keeps beside its ledger file, all named after it.

use std::path::{Path, PathBuf};

/// Where the ledger file and its companions live.
///
/// For `DIR/blockchain.json`: the state record `DIR/blockchain.json.state` (and its temporary
/// `.state.tmp`), the rewrite temporary `DIR/blockchain.json.tmp`, the previous file kept on a
/// rewrite `DIR/blockchain.old` (as EdgeLake names it), and the lock `DIR/blockchain.json.lock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerPaths {
    /// The ledger file itself.
    pub file: PathBuf,
    /// The state record: applied seq and the file length it corresponds to.
    pub state: PathBuf,
    /// Where a new state record is written before it is renamed over `state`.
    pub state_tmp: PathBuf,
    /// Where a rewritten ledger (a delete or a snapshot) is built before it replaces `file`.
    pub tmp: PathBuf,
    /// The previous ledger file, kept on every rewrite.
    pub old: PathBuf,
    /// Locked by the running daemon so that two members never write one file.
    pub lock: PathBuf,
    /// The directory holding them, fsynced after each rename.
    pub dir: PathBuf,
}

impl LedgerPaths {
    /// The paths around the ledger file `file`.
    pub fn new(file: &Path) -> LedgerPaths {
        let with_suffix = |suffix: &str| {
            let mut name = file.as_os_str().to_owned();
            name.push(suffix);
            PathBuf::from(name)
        };
        // EdgeLake keeps `blockchain.old` beside `blockchain.json`; a file already named
        // `*.old` would collide with its own backup, so it gets `*.old.old`.
        let old = match file.with_extension("old") {
            same if same == file => with_suffix(".old"),
            old => old,
        };
        let dir = match file.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        LedgerPaths {
            file: file.to_path_buf(),
            state: with_suffix(".state"),
            state_tmp: with_suffix(".state.tmp"),
            tmp: with_suffix(".tmp"),
            old,
            lock: with_suffix(".lock"),
            dir,
        }
    }

    /// Makes the renames and creations done in the directory durable.
    pub fn sync_dir(&self) -> std::io::Result<()> {
        std::fs::File::open(&self.dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn companions_are_named_after_the_file() {
        let paths = LedgerPaths::new(Path::new("/var/lib/anylog/blockchain.json"));
        assert_eq!(
            paths.state,
            Path::new("/var/lib/anylog/blockchain.json.state")
        );
        assert_eq!(paths.tmp, Path::new("/var/lib/anylog/blockchain.json.tmp"));
        assert_eq!(paths.old, Path::new("/var/lib/anylog/blockchain.old"));
        assert_eq!(paths.dir, Path::new("/var/lib/anylog"));
    }

    #[test]
    fn a_bare_name_lives_in_the_current_directory() {
        let paths = LedgerPaths::new(Path::new("blockchain.json"));
        assert_eq!(paths.dir, Path::new("."));
        let odd = LedgerPaths::new(Path::new("ledger.old"));
        assert_eq!(odd.old, Path::new("ledger.old.old"));
    }
}
