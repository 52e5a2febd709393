//! What the tests of the ledger file's parts share: policies, a file synced through the normal
//! write path, a node appending beside the member, and looks at the journal and the record.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use super::LedgerFile;
use crate::foreign::ForeignFiles;
use crate::line::PolicyLine;
use crate::paths::LedgerPaths;
use crate::state::{FileMd5, PendingRewrite, SyncState};

pub(super) fn policy(n: u32) -> PolicyLine {
    PolicyLine::parse(format!(
        r#"{{"operator": {{"name": "op{n}", "id": "id-{n}", "ledger": "global"}}}}"#
    ))
    .unwrap()
}

pub(super) fn text(lines: &[PolicyLine]) -> String {
    lines.iter().map(|l| format!("{}\n", l.text)).collect()
}

pub(super) fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

pub(super) struct Fixture {
    _dir: tempfile::TempDir,
    pub(super) paths: LedgerPaths,
}

pub(super) fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let paths = LedgerPaths::new(&dir.path().join("blockchain.json"));
    Fixture { _dir: dir, paths }
}

/// A file holding policies 1..=n at seq n, through the normal write path.
pub(super) fn synced(f: &Fixture, n: u32) -> LedgerFile {
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
pub(super) const LOCAL: &str = "{\"config\": {\"name\": \"n\", \"id\": \"local-1\", \"date\": \"2026-12-01T00:00:00.000000Z\", \"ledger\": \"local\"}}\n";

pub(super) fn node_appends(f: &Fixture, bytes: &str) {
    let mut out = OpenOptions::new().append(true).open(&f.paths.file).unwrap();
    out.write_all(bytes.as_bytes()).unwrap();
}

pub(super) fn journaled(f: &Fixture) -> Vec<String> {
    ForeignFiles::new(&f.paths.file)
        .pending()
        .unwrap()
        .into_iter()
        .map(|p| format!("{}..{} {}", p.from, p.to, String::from_utf8_lossy(&p.bytes)))
        .collect()
}

/// The ledger's record agrees with the file: reopening trusts it as it is.
pub(super) fn assert_clean(f: &Fixture, seq: u64, lines: &[PolicyLine]) {
    assert_eq!(read(&f.paths.file), text(lines));
    let reopened = LedgerFile::open(&f.paths.file).unwrap();
    assert_eq!(reopened.seq(), seq);
    assert!(!reopened.awaiting_snapshot());
}

/// Records, as a rewrite would before its rename, that the file holds `before` at `seq` and
/// is being replaced by `after` at `pending_seq`.
pub(super) fn record_pending(f: &Fixture, seq: u64, before: &str, pending_seq: u64, after: &str) {
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
