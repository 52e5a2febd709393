//! The member's start-up loader (`LedgerFile::open`) on arbitrary files: a `blockchain.json`
//! and, beside it, a state record (valid for the file's length, for a shorter or longer length,
//! with a pending rewrite, or arbitrary bytes), a rewrite `.tmp`, a stray `.state.tmp`.
//!
//! Input layout: `[mode, a, b, rest...]`, where `mode & 7` picks the layout (see [`lay_out`]),
//! `mode & 8` adds a stray `.state.tmp`, `a` is a seq and `b` a length or a split point.
//!
//! It must never panic nor fail (nothing here is an I/O error), and either it distrusts the file
//! (seq 0, empty index, waiting for a snapshot) or the file it keeps is a valid ledger of exactly
//! the recorded length: every line a stored policy, the ids unique, as many as it indexed.
#![no_main]

use std::collections::HashSet;
use std::path::Path;
use std::sync::OnceLock;

use ledger_member::ledger_file::LedgerFile;
use ledger_member::line::PolicyLine;
use ledger_member::paths::LedgerPaths;
use ledger_member::state::{FileMd5, PendingRewrite, SyncState};
use libfuzzer_sys::fuzz_target;

/// One directory for the whole run (on tmpfs when there is one), emptied before each input.
fn dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            tempfile::tempdir_in(shm).unwrap()
        } else {
            tempfile::tempdir().unwrap()
        }
    })
    .path()
}

fuzz_target!(|data: &[u8]| {
    let [mode, a, b, rest @ ..] = data else {
        return;
    };
    let dir = dir();
    for entry in std::fs::read_dir(dir).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let paths = LedgerPaths::new(&dir.join("blockchain.json"));
    let expected_seq = lay_out(&paths, *mode, u64::from(*a), usize::from(*b), rest);
    if mode & 8 != 0 {
        std::fs::write(&paths.state_tmp, rest).unwrap();
    }

    let file = LedgerFile::open(&paths.file).unwrap_or_else(|e| panic!("open failed: {e}"));
    assert!(!paths.tmp.exists(), "a .tmp survived the start");
    assert!(!paths.state_tmp.exists(), "a .state.tmp survived the start");
    if file.awaiting_snapshot() {
        assert_eq!(file.seq(), 0);
        assert_eq!(file.policy_count(), 0);
        return;
    }
    if let Some(seq) = expected_seq {
        assert_eq!(file.seq(), seq);
    }
    // What it trusts is a valid ledger of the recorded length.
    let state = SyncState::load(&paths).unwrap();
    let content = match std::fs::read(&paths.file) {
        Ok(content) => content,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert_eq!(file.len(), 0);
            assert_eq!(file.policy_count(), 0);
            return;
        }
        Err(e) => panic!("{e}"),
    };
    assert_eq!(content.len() as u64, file.len(), "file length != recorded length");
    if let Some(state) = state {
        assert_eq!((state.seq, state.len, state.pending), (file.seq(), file.len(), None));
        assert_eq!(state.md5, FileMd5::of(&content), "the record's md5 is the file's");
    }
    assert_eq!(file.md5(), FileMd5::of(&content));
    let mut ids = HashSet::new();
    if !content.is_empty() {
        assert_eq!(content.last(), Some(&b'\n'), "the last line is incomplete");
        for line in content[..content.len() - 1].split(|&c| c == b'\n') {
            let text = String::from_utf8(line.to_vec()).expect("a trusted line is UTF-8");
            let line = PolicyLine::parse(text).expect("a trusted line is a policy");
            assert!(ids.insert(line.id.clone()), "policy {:?} twice", line.id);
            assert!(file.contains(&line.id));
        }
    }
    assert_eq!(ids.len(), file.policy_count());
});

/// Writes the files for `mode & 7`; returns the seq the loader must resume from when it trusts
/// the file, if that is known.
///
/// 0. the file `rest`, no record;
/// 1. the file `rest`, a record of seq `a` and its length;
/// 2. the file `rest`, a record of seq `a` and `b` bytes fewer (an unrecorded tail);
/// 3. the file `rest`, a record of seq `a` and `b` bytes more (a file cut short);
/// 4. `rest` split at `b`: the file and a `.tmp`; a record of seq `a` and the file's length with
///    a pending rewrite to seq `a + 1` of the `.tmp`'s length (crash before the rename);
/// 5. the file `rest`, a record of seq `a` and length `b` with a pending rewrite to seq `a + 1`
///    of the file's length (crash after the rename);
/// 6. `rest` split at `b`: arbitrary record bytes, then the file;
/// 7. no file, a record of seq `a` and length `b`.
fn lay_out(paths: &LedgerPaths, mode: u8, a: u64, b: usize, rest: &[u8]) -> Option<u64> {
    // A record of `len` bytes whose md5 is that of `content` (the file's recorded part when
    // they agree), with an optional pending rewrite to `(seq, its content)`.
    let store = |seq: u64, len: usize, content: &[u8], pending: Option<(u64, &[u8])>| {
        SyncState {
            seq,
            len: len as u64,
            md5: FileMd5::of(content),
            pending: pending.map(|(seq, tmp)| PendingRewrite {
                seq,
                len: tmp.len() as u64,
                md5: FileMd5::of(tmp),
            }),
        }
        .store(paths)
        .unwrap()
    };
    let write = |path: &Path, bytes: &[u8]| std::fs::write(path, bytes).unwrap();
    let cut = b.min(rest.len());
    match mode & 7 {
        0 => {
            write(&paths.file, rest);
            None
        }
        1 => {
            write(&paths.file, rest);
            store(a, rest.len(), rest, None);
            Some(a)
        }
        2 => {
            write(&paths.file, rest);
            let recorded = rest.len().saturating_sub(b);
            store(a, recorded, &rest[..recorded], None);
            Some(a)
        }
        3 => {
            write(&paths.file, rest);
            store(a, rest.len() + b, rest, None);
            None
        }
        4 => {
            let (file, tmp) = rest.split_at(cut);
            write(&paths.file, file);
            write(&paths.tmp, tmp);
            store(a, file.len(), file, Some((a + 1, tmp)));
            Some(a + 1)
        }
        5 => {
            write(&paths.file, rest);
            store(a, b, &rest[..cut], Some((a + 1, rest)));
            Some(a + 1)
        }
        6 => {
            let (state, file) = rest.split_at(cut);
            write(&paths.state, state);
            write(&paths.file, file);
            None
        }
        _ => {
            store(a, b, &[], None);
            None
        }
    }
}
