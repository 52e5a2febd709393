//! The reads: a policy, a page of policies, the changes after a seq, the count, and a consistent
//! snapshot in pages bounded in rows and bytes. (The head is one row: `rows::read_bounds`.)

use diesel::prelude::*;

use super::AnyConnection;
use super::rows::{OP_DELETE, OP_INSERT, PolicyRow, read_bounds, stored_policy};
use crate::schema::ledger;
use crate::{Change, ChangeKind, SnapshotPart, StorageError, StoredPolicy};

/// About how many bytes of policies one snapshot page holds.
const SNAPSHOT_PAGE_BYTES: usize = 1 << 20;

/// [`Storage::get`](crate::Storage::get).
pub(super) fn get(c: &mut AnyConnection, id: &str) -> Result<Option<StoredPolicy>, StorageError> {
    ledger::table
        .filter(ledger::policy_id.eq(id))
        .select((
            ledger::policy_id,
            ledger::policy_type,
            ledger::policy,
            ledger::seq,
        ))
        .first::<PolicyRow>(c)
        .optional()?
        .map(stored_policy)
        .transpose()
}

/// [`Storage::list`](crate::Storage::list).
pub(super) fn list(
    c: &mut AnyConnection,
    policy_type: Option<&str>,
    after_seq: u64,
    limit: usize,
) -> Result<Vec<StoredPolicy>, StorageError> {
    let mut query = ledger::table
        .filter(ledger::sequence_id.gt(after_seq as i64))
        .select((
            ledger::policy_id,
            ledger::policy_type,
            ledger::policy,
            ledger::seq,
        ))
        .order(ledger::sequence_id.asc())
        .limit(limit as i64)
        .into_boxed();
    if let Some(policy_type) = policy_type {
        query = query.filter(ledger::policy_type.eq(policy_type));
    }
    query
        .load::<PolicyRow>(c)?
        .into_iter()
        .map(stored_policy)
        .collect()
}

/// [`Storage::changes_after`](crate::Storage::changes_after).
pub(super) fn changes_after(
    c: &mut AnyConnection,
    after_seq: u64,
    limit: usize,
) -> Result<Vec<Change>, StorageError> {
    use diesel::sql_types::{BigInt, Nullable, Text};

    #[derive(QueryableByName)]
    struct ChangeRow {
        #[diesel(sql_type = BigInt)]
        seq: i64,
        #[diesel(sql_type = Text)]
        op: String,
        #[diesel(sql_type = Text)]
        policy_id: String,
        #[diesel(sql_type = Text)]
        policy_type: String,
        #[diesel(sql_type = Nullable<Text>)]
        policy: Option<String>,
    }
    // The changes are the stored policies' rows and the change log (see `rows`). One statement
    // reads both, so both are read at one moment (on PostgreSQL each statement has its own
    // snapshot); each side takes at most `limit` rows in seq order from its own row id, from
    // `after_seq` or the pruned seq, whichever is later: a stored policy's insert below the
    // pruned seq is not replayable, as the deletes around it are gone. (Parameters appear in
    // their order: SQLite numbers `$N` by first appearance.)
    let rows = diesel::sql_query(
        "SELECT * FROM (SELECT sequence_id AS seq, $1 AS op, policy_id, policy_type, policy \
             FROM ledger WHERE sequence_id > (SELECT CASE WHEN pruned_seq > $2 THEN pruned_seq ELSE $2 END \
                 FROM ledger_head WHERE id = 1) \
             ORDER BY sequence_id LIMIT $3) AS stored \
         UNION ALL \
         SELECT * FROM (SELECT seq, op, policy_id, policy_type, policy \
             FROM ledger_changes WHERE seq > $2 ORDER BY seq LIMIT $3) AS logged \
         ORDER BY seq LIMIT $3",
    )
    .bind::<Text, _>(OP_INSERT)
    .bind::<BigInt, _>(after_seq as i64)
    .bind::<BigInt, _>(limit as i64)
    .load::<ChangeRow>(c)?;
    rows.into_iter()
        .map(|row| {
            let ChangeRow {
                seq,
                op,
                policy_id: id,
                policy_type,
                policy,
            } = row;
            let kind = match op.as_str() {
                OP_INSERT => ChangeKind::Inserted(stored_policy((id, policy_type, policy, seq))?),
                OP_DELETE => ChangeKind::Deleted { id },
                other => {
                    return Err(StorageError::Corrupt(format!(
                        "change {seq} has unknown op {other:?}"
                    )));
                }
            };
            Ok(Change {
                seq: seq as u64,
                kind,
            })
        })
        .collect()
}

/// [`Storage::policy_count`](crate::Storage::policy_count).
pub(super) fn policy_count(c: &mut AnyConnection) -> Result<u64, StorageError> {
    let count: i64 = ledger::table.count().get_result(c)?;
    Ok(count as u64)
}

/// [`Storage::snapshot`](crate::Storage::snapshot).
pub(super) fn snapshot(
    conn: &mut AnyConnection,
    page_size: usize,
    sink: &mut dyn FnMut(SnapshotPart) -> bool,
) -> Result<(), StorageError> {
    let page_size = page_size.max(1);
    conn.transaction(|c| {
        // One transaction gives one consistent view for the head, the count and every page.
        // PostgreSQL's default (read committed) would give each statement its own view.
        if matches!(c, AnyConnection::Postgres(_)) {
            diesel::sql_query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(c)?;
        }
        let bounds = read_bounds(c)?;
        let policy_count: i64 = ledger::table.count().get_result(c)?;
        if !sink(SnapshotPart::Start {
            seq: bounds.head_seq,
            policy_count: policy_count as u64,
        }) {
            return Ok(());
        }
        let mut after = 0i64;
        // Pages are bounded in bytes as well as rows: a page waits in memory while the client
        // reads the one before, and policies may be large. The first page is small; the next
        // ones take as many rows as the average so far fits into SNAPSHOT_PAGE_BYTES.
        let mut rows_per_page = page_size.min(16);
        let (mut rows_read, mut bytes_read) = (0usize, 0usize);
        loop {
            let rows = ledger::table
                .filter(ledger::sequence_id.gt(after))
                .order(ledger::sequence_id.asc())
                .limit(rows_per_page as i64)
                .select((
                    ledger::policy_id,
                    ledger::policy_type,
                    ledger::policy,
                    ledger::seq,
                ))
                .load::<PolicyRow>(c)?;
            let Some(last) = rows.last() else { break };
            after = last.3;
            let full = rows.len() == rows_per_page;
            rows_read += rows.len();
            bytes_read += rows
                .iter()
                .map(|(id, _, json, _)| id.len() + json.as_ref().map_or(0, String::len))
                .sum::<usize>();
            rows_per_page =
                (SNAPSHOT_PAGE_BYTES * rows_read / bytes_read.max(1)).clamp(1, page_size);
            let page = rows
                .into_iter()
                .map(stored_policy)
                .collect::<Result<Vec<_>, _>>()?;
            if !sink(SnapshotPart::Page(page)) || !full {
                break;
            }
        }
        Ok(())
    })
}
