//! The rows every job reads or writes, on either backend: the one `ledger_head` row (locked by
//! each writer, which serializes the seqs), a `ledger` row as a [`StoredPolicy`], and a
//! `ledger_changes` row.
//!
//! Where the changes are: a stored policy's row is the change that inserted it (its
//! `sequence_id` is that seq), so an insert writes one row, not two. `ledger_changes` holds the
//! rest: each delete, and the insert of each policy since deleted, moved there by the delete
//! ([`retire_policy`]). Every seq is in exactly one of the two tables until pruned.

use diesel::prelude::*;

use super::AnyConnection;
use crate::schema::{ledger, ledger_changes, ledger_head};
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
/// The head is the greatest of the head row, the last policy and the last logged change: on
/// SQLite, commits do not write the head row (one page fewer synced per insert); it holds the
/// head only where no change does (after [`Storage::replace`](crate::Storage::replace) or a
/// prune). PostgreSQL's commits keep it, as masters sharing the database lock it to take turns.
pub(super) fn read_bounds(c: &mut AnyConnection) -> Result<Bounds, StorageError> {
    let (head, pruned): (i64, i64) = ledger_head::table
        .find(1)
        .select((ledger_head::head_seq, ledger_head::pruned_seq))
        .first(c)?;
    let last_insert: Option<i64> = ledger::table
        .select(diesel::dsl::max(ledger::sequence_id))
        .first(c)?;
    let last_logged: Option<i64> = ledger_changes::table
        .select(diesel::dsl::max(ledger_changes::seq))
        .first(c)?;
    let head = head
        .max(last_insert.unwrap_or(0))
        .max(last_logged.unwrap_or(0));
    Ok(Bounds {
        head_seq: head as u64,
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
fn insert_change_row(
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

/// Deletes the policy `id` as change `seq`: its row goes, its insert moves into the change log
/// (unless pruned already: at or below `pruned_seq`) beside the delete. Returns its type, or
/// `None` when no policy has this id.
pub(super) fn retire_policy(
    c: &mut AnyConnection,
    id: &str,
    seq: u64,
    pruned_seq: u64,
) -> Result<Option<String>, StorageError> {
    let Some(policy) = super::read::get(c, id)? else {
        return Ok(None);
    };
    diesel::delete(ledger::table.filter(ledger::policy_id.eq(id))).execute(c)?;
    let policy_type = policy.policy_type.clone();
    if policy.seq > pruned_seq {
        let inserted = Change {
            seq: policy.seq,
            kind: ChangeKind::Inserted(policy),
        };
        insert_change_row(c, &inserted, &policy_type)?;
    }
    let deleted = Change {
        seq,
        kind: ChangeKind::Deleted { id: id.to_string() },
    };
    insert_change_row(c, &deleted, &policy_type)?;
    Ok(Some(policy_type))
}
