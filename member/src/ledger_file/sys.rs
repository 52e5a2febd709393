//! The system calls the ledger file's safety rests on, in one place: the daemon's lock,
//! reserving an append's blocks, flushing data (`fdatasync`) or data and metadata (`fsync`),
//! renaming, and flushing the directory after a rename or a creation. The member's only
//! `unsafe` is here, one block per call that the standard library does not wrap.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::paths::LedgerPaths;

/// Takes an exclusive `flock(2)` on `file` without waiting: `Ok(false)` when another process
/// holds it. The lock lives as long as the file's open description (the `File`) does.
pub(super) fn try_lock(file: &File) -> io::Result<bool> {
    // SAFETY: flock(2) on a descriptor `file` owns and keeps open during the call; it reads and
    // writes no memory of ours.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let error = io::Error::last_os_error();
    match error.kind() {
        io::ErrorKind::WouldBlock => Ok(false),
        _ => Err(error),
    }
}

/// Allocates the blocks for `len` bytes at `offset` without changing the file's size, so that a
/// full disk refuses an append before any byte of it is written. A file system that cannot
/// (EOPNOTSUPP, ENOSYS) is left to the write itself.
pub(super) fn reserve(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: fallocate(2) on a descriptor `file` owns and keeps open during the call, with
    // sizes in range; it only allocates blocks and reads and writes no memory of ours.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(()),
        _ => Err(error),
    }
}

/// `fsync(2)`: the file's data and metadata (its length) are durable. For a new file (`.tmp`)
/// before it is renamed into place.
pub(super) fn fsync(file: &File) -> io::Result<()> {
    file.sync_all()
}

/// `fdatasync(2)`: the file's data is durable, and its length, but not its other metadata
/// (times). For an append: one flush instead of two.
pub(super) fn fdatasync(file: &File) -> io::Result<()> {
    file.sync_data()
}

/// `rename(2)` of `from` over `to`: atomic, but durable only once the directory is flushed
/// ([`sync_dir`]).
pub(super) fn rename(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::rename(from, to)
}

/// `fsync(2)` of the directory holding the ledger file: the renames and creations done in it
/// are durable.
pub(super) fn sync_dir(paths: &LedgerPaths) -> io::Result<()> {
    paths.sync_dir()
}
