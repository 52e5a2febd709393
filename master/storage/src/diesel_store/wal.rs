//! SQLite's write-ahead log, written in place from the first commit on.
//!
//! Every commit appends its pages to the WAL and syncs it. While the WAL grows (from empty at
//! each start, to [`SQLITE_WAL_CHECKPOINT_BYTES`] where the checkpoint lets it start over from
//! its beginning), each sync must also write the file's new size, a second write to the disk:
//! on the VM of issue 16, 5.7 KiB appended + `fdatasync` took 0.19-0.23 ms, the same written
//! inside zeros already on disk 0.12-0.15 ms, and one client inserted 2,142-2,177/s into a new
//! ledger against 2,502-2,587/s once its WAL had reached full size. etcd preallocates its WAL
//! segments for the same reason. So at start, once the WAL is empty, it is filled with zeros to
//! its full size: 44 MB written once (~25 ms here), which the WAL would reach anyway before its
//! first checkpoint.
//!
//! Zeros are never mistaken for frames: SQLite reads a WAL from its header and stops at the
//! first frame whose salt or checksum does not match, which is also how it reads a WAL it is
//! reusing after a checkpoint. The zeros are written only while the WAL is empty, checkpointed
//! into the database and truncated, and under the write lock, so no frame can be overwritten.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;

use super::AnyConnection;
use super::url::{SQLITE_WAL_CHECKPOINT_BYTES, wal_checkpoint_pages};
use crate::StorageError;

/// The WAL's size when its checkpoint lets it start over: `pages` frames of a header (24 bytes)
/// and a page each (the pages are [`SQLITE_WAL_CHECKPOINT_BYTES`]), after the WAL's header (32
/// bytes), plus 1 MiB for the batch that crosses the checkpoint's threshold.
fn full_size(pages: u64) -> u64 {
    32 + pages * 24 + SQLITE_WAL_CHECKPOINT_BYTES as u64 + (1 << 20)
}

/// The WAL file of the database at `database`.
fn wal_path(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// What [`presize`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Presized {
    /// The WAL now holds this many bytes of zeros.
    Filled(u64),
    /// The WAL was already at least this size.
    AlreadyFull(u64),
    /// Left as it was, and why: another connection uses the WAL, or the disk has no room.
    Skipped(String),
}

#[derive(QueryableByName)]
struct Checkpoint {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    busy: i32,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    log: i32,
}

#[derive(QueryableByName)]
struct BusyTimeout {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    timeout: i32,
}

/// Fills the WAL of the SQLite database at `database` with zeros to its full size, on `conn`
/// (a connection to it that stays open, so that closing it does not delete the WAL). Errors
/// are the database's; a WAL that cannot be pre-sized is [`Presized::Skipped`], as the ledger
/// works the same without it.
pub(super) fn presize(conn: &mut AnyConnection, database: &Path) -> Result<Presized, StorageError> {
    let AnyConnection::Sqlite(conn) = conn else {
        return Ok(Presized::Skipped("not SQLite".into()));
    };
    let size = full_size(wal_checkpoint_pages(conn)? as u64);
    let wal = wal_path(database);
    let current = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    if current >= size {
        return Ok(Presized::AlreadyFull(current));
    }
    // Without waiting for anyone: the connection's busy timeout (10 s) would hold the master's
    // start while another process reads the ledger; the WAL is then left as it is.
    let busy_timeout = diesel::sql_query("PRAGMA busy_timeout")
        .get_result::<BusyTimeout>(conn)?
        .timeout;
    conn.batch_execute("PRAGMA busy_timeout = 0")?;
    let presized = checkpoint_and_fill(conn, &wal, size);
    conn.batch_execute(&format!("PRAGMA busy_timeout = {busy_timeout}"))?;
    presized
}

/// [`presize`], on a connection that does not wait for locks.
fn checkpoint_and_fill(
    conn: &mut SqliteConnection,
    wal: &Path,
    size: u64,
) -> Result<Presized, StorageError> {
    // Every frame into the database, and the WAL truncated: an empty WAL, which the next commit
    // writes from its beginning. Busy or not whole when another connection reads or writes.
    let checkpoint =
        diesel::sql_query("PRAGMA wal_checkpoint(TRUNCATE)").get_result::<Checkpoint>(conn)?;
    if checkpoint.busy != 0 || checkpoint.log != 0 {
        return Ok(Presized::Skipped(format!(
            "the WAL is in use ({} frames left after a checkpoint)",
            checkpoint.log
        )));
    }
    // The write lock, so that no commit appends while the zeros are written.
    if conn.batch_execute("BEGIN IMMEDIATE").is_err() {
        return Ok(Presized::Skipped("another connection is writing".into()));
    }
    let filled = fill(wal, size);
    // Nothing was written in the transaction; a connection left inside one would fail every
    // later write, so it is rolled back if it does not end.
    if let Err(e) = conn.batch_execute("COMMIT") {
        let _ = conn.batch_execute("ROLLBACK");
        return Err(e.into());
    }
    Ok(match filled {
        Ok(()) => Presized::Filled(size),
        Err(reason) => Presized::Skipped(reason),
    })
}

/// Writes `size` bytes of zeros to the empty WAL at `wal` and syncs them; on failure (a full
/// disk) truncates it back to empty.
fn fill(wal: &Path, size: u64) -> Result<(), String> {
    let mut file = OpenOptions::new()
        .write(true)
        .open(wal)
        .map_err(|e| format!("{}: {e}", wal.display()))?;
    let empty = file.metadata().map(|m| m.len() == 0).unwrap_or(false);
    if !empty {
        return Err(format!("{} is not empty", wal.display()));
    }
    // Page by page: the page cache makes a large folio of a large write (1 MiB here), and every
    // commit then dirtied and wrote back a whole folio: filled with 1 MiB writes, the WAL cost
    // 15-20% of inserts/s at 16 and 64 clients (A/B), and `write_bytes` counted 1 MiB a commit.
    let zeros = vec![0u8; 4096];
    let written = (|| {
        let mut left = size;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            file.write_all(&zeros[..n])?;
            left -= n as u64;
        }
        file.sync_data()
    })();
    written.map_err(|e| {
        let _ = file.set_len(0);
        format!("writing {size} bytes of zeros to {}: {e}", wal.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &Path) -> SqliteConnection {
        let mut conn = SqliteConnection::establish(&path.to_string_lossy()).unwrap();
        conn.batch_execute("PRAGMA page_size = 1024; PRAGMA journal_mode = WAL;")
            .unwrap();
        conn
    }

    fn count(conn: &mut SqliteConnection) -> i64 {
        #[derive(QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        diesel::sql_query("SELECT count(*) AS n FROM t")
            .get_result::<Count>(conn)
            .unwrap()
            .n
    }

    fn insert(conn: &mut SqliteConnection, rows: usize) {
        for _ in 0..rows {
            conn.batch_execute("INSERT INTO t (v) VALUES (randomblob(300))")
                .unwrap();
        }
    }

    /// A WAL a reader still uses is left as it is; once free it is filled to its full size,
    /// commits then write inside it without growing it, and every row, committed before and
    /// after, reads back from a new connection.
    #[test]
    fn the_wal_is_filled_only_when_empty_and_commits_write_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let mut writer = AnyConnection::Sqlite(open(&path));
        let AnyConnection::Sqlite(w) = &mut writer else {
            unreachable!()
        };
        w.batch_execute(
            "PRAGMA busy_timeout = 10000; CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)",
        )
        .unwrap();
        insert(w, 50);
        let wal = wal_path(&path);
        let before = std::fs::metadata(&wal).unwrap().len();
        assert!(before > 0, "the rows are in the WAL");

        let mut reader = open(&path);
        reader.batch_execute("BEGIN").unwrap();
        assert_eq!(count(&mut reader), 50);
        let skipped = presize(&mut writer, &path).unwrap();
        assert!(matches!(skipped, Presized::Skipped(_)), "{skipped:?}");
        let AnyConnection::Sqlite(w) = &mut writer else {
            unreachable!()
        };
        let timeout = diesel::sql_query("PRAGMA busy_timeout").get_result::<BusyTimeout>(w);
        assert_eq!(
            timeout.unwrap().timeout,
            10000,
            "the busy timeout is restored"
        );
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), before);
        reader.batch_execute("COMMIT").unwrap();

        let size = full_size(40_960);
        assert_eq!(presize(&mut writer, &path).unwrap(), Presized::Filled(size));
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), size);
        assert_eq!(
            presize(&mut writer, &path).unwrap(),
            Presized::AlreadyFull(size)
        );
        let AnyConnection::Sqlite(w) = &mut writer else {
            unreachable!()
        };
        insert(w, 200);
        assert_eq!(
            std::fs::metadata(&wal).unwrap().len(),
            size,
            "written in place"
        );
        assert_eq!(count(&mut open(&path)), 250);
        assert_eq!(count(&mut reader), 250);

        // What a crash leaves on disk: the database and the WAL, frames then zeros, without the
        // shared-memory index. A new process reads the frames back and stops at the zeros.
        let crashed = tempfile::tempdir().unwrap();
        let copy = crashed.path().join("ledger.db");
        std::fs::copy(&path, &copy).unwrap();
        std::fs::copy(&wal, wal_path(&copy)).unwrap();
        let mut recovered = open(&copy);
        assert_eq!(count(&mut recovered), 250);
        insert(&mut recovered, 10);
        assert_eq!(count(&mut recovered), 260);
    }
}
