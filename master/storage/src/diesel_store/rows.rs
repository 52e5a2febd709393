//! The rows every job reads or writes, on either backend: the one `ledger_head` row (locked by
//! each writer, which serializes the seqs), a `ledger` row as a [`StoredPolicy`], and a
//! `ledger_changes` row.

use diesel::prelude::*;

use super::AnyConnection;
use crate::schema::{ledger_changes, ledger_head};
use crate::{Bounds, Change, ChangeKind, StorageError, StoredPolicy};

/// The `op` of a `ledger_changes` row that inserted a policy.
pub(super) const OP_INSERT: &str = "insert";
/// The `op` of a `ledger_changes` row that deleted one.
pub(super) const OP_DELETE: &str = "delete";

/// A row of `ledger` as the ledger serves it: id, type, line, seq.
pub(super) type PolicyRow = (String, String, Option<String>, i64);

/// The policy a `ledger` row holds; a row without its line is corrupt.
pub(super) fn stored_policy(
    (id, policy_type, json, seq): PolicyRow,
) -> Result<StoredPolicy, StorageError> {
    let json = json.ok_or_else(|| StorageError::Corrupt(format!("policy {id:?} has no text")))?;
    Ok(StoredPolicy {
        id,
        policy_type,
        json,
        seq: seq as u64,
    })
}

/// Locks the head row until the transaction ends and reads it.
pub(super) fn lock_head(c: &mut AnyConnection) -> Result<Bounds, StorageError> {
    // Locking the head row until commit makes writers, even of different masters, assign seqs
    // one transaction at a time. PostgreSQL: a row lock, read in the same round trip, and no new
    // row version (an UPDATE per transaction on one row bloats it between vacuums). SQLite: any
    // write statement takes the database's write lock, even one that changes no row: a delete
    // of the row that cannot exist (`id` is checked to be 1) takes it without writing a page.
    let (head, pruned): (i64, i64) = match c {
        AnyConnection::Postgres(pg) => ledger_head::table
            .find(1)
            .select((ledger_head::head_seq, ledger_head::pruned_seq))
            .for_update()
            .first(pg)?,
        AnyConnection::Sqlite(_) => {
            diesel::delete(ledger_head::table.find(0)).execute(c)?;
            return read_bounds(c);
        }
    };
    Ok(Bounds {
        head_seq: head as u64,
        pruned_seq: pruned as u64,
    })
}

/// The head and pruned seqs.
///
/// The head is the greater of the head row and the last change: on SQLite, commits do not write
/// the head row (one page fewer synced per insert); it holds the head only where no change does
/// (after [`Storage::replace`](crate::Storage::replace) or a prune). PostgreSQL's commits keep
/// it, as masters sharing the database lock it to take turns.
pub(super) fn read_bounds(c: &mut AnyConnection) -> Result<Bounds, StorageError> {
    let (head, pruned): (i64, i64) = ledger_head::table
        .find(1)
        .select((ledger_head::head_seq, ledger_head::pruned_seq))
        .first(c)?;
    let last_change: Option<i64> = ledger_changes::table
        .select(diesel::dsl::max(ledger_changes::seq))
        .first(c)?;
    Ok(Bounds {
        head_seq: head.max(last_change.unwrap_or(0)) as u64,
        pruned_seq: pruned as u64,
    })
}

/// Moves the head to `head`.
pub(super) fn set_head(c: &mut AnyConnection, head: u64) -> Result<(), StorageError> {
    diesel::update(ledger_head::table.find(1))
        .set(ledger_head::head_seq.eq(head as i64))
        .execute(c)?;
    Ok(())
}

/// Inserts the `ledger_changes` row of `change`, of a policy of `policy_type`.
pub(super) fn insert_change_row(
    c: &mut AnyConnection,
    change: &Change,
    policy_type: &str,
) -> Result<(), StorageError> {
    let (op, id, json) = match &change.kind {
        ChangeKind::Inserted(policy) => (OP_INSERT, &policy.id, Some(&policy.json)),
        ChangeKind::Deleted { id } => (OP_DELETE, id, None),
    };
    diesel::insert_into(ledger_changes::table)
        .values((
            ledger_changes::seq.eq(change.seq as i64),
            ledger_changes::op.eq(op),
            ledger_changes::policy_id.eq(id),
            ledger_changes::policy_type.eq(policy_type),
            ledger_changes::policy.eq(json),
        ))
        .execute(c)?;
    Ok(())
}
