//! Changes committed elsewhere, stored with their own seqs (a copy of another ledger): a run of
//! changes ([`replicate`]), a whole ledger at a seq ([`replace`]); the change log's pruned
//! prefix ([`prune_changes`]); and the block of a followed blockchain ([`chain_position`]).

use diesel::prelude::*;

use super::AnyConnection;
use super::rows::{lock_head, retire_policy, set_head};
use crate::schema::{ledger, ledger_chain, ledger_changes, ledger_head};
use crate::{ChainPosition, Change, ChangeKind, StorageError, StoredPolicy};

/// Inserts the `ledger` row of a policy copied from upstream, its columns read from its line.
fn insert_copied_row(
    c: &mut AnyConnection,
    policy: &StoredPolicy,
    now: chrono::NaiveDateTime,
) -> Result<(), StorageError> {
    let columns = RowColumns::of(&policy.json);
    diesel::insert_into(ledger::table)
        .values((
            ledger::sequence_id.eq(policy.seq as i64),
            ledger::policy_type.eq(&policy.policy_type),
            ledger::policy_id.eq(&policy.id),
            ledger::company_name.eq(columns.company),
            ledger::date.eq(columns.date.unwrap_or(now)),
            ledger::host.eq(REPLICATED_HOST),
            ledger::status.eq(columns.status),
            ledger::policy.eq(&policy.json),
            ledger::seq.eq(policy.seq as i64),
        ))
        .execute(c)?;
    Ok(())
}

/// The columns of a copied row that come from its policy, as an insert fills them.
#[derive(Default)]
struct RowColumns {
    company: Option<String>,
    status: Option<String>,
    date: Option<chrono::NaiveDateTime>,
}

impl RowColumns {
    fn of(json: &str) -> RowColumns {
        let Ok((_, body)) = ledger_anylog::policy::parse_stored(json) else {
            return RowColumns::default();
        };
        let text = |key: &str| body.get(key)?.as_str().map(str::to_string);
        RowColumns {
            company: text("company"),
            status: text("status"),
            date: text("date")
                .as_deref()
                .and_then(ledger_anylog::date::parse_date),
        }
    }
}

/// The `host` column of rows copied from upstream rather than inserted by a client.
const REPLICATED_HOST: &str = "upstream";

/// [`Storage::replicate`](crate::Storage::replicate).
pub(super) fn replicate(conn: &mut AnyConnection, changes: &[Change]) -> Result<(), StorageError> {
    conn.transaction(|c| {
        let bounds = lock_head(c)?;
        let mut head = bounds.head_seq;
        let now = chrono::Utc::now().naive_utc();
        for change in changes {
            if change.seq != head + 1 {
                return Err(StorageError::Corrupt(format!(
                    "replicated change {} does not follow the head {head}",
                    change.seq
                )));
            }
            match &change.kind {
                ChangeKind::Inserted(policy) => insert_copied_row(c, policy, now)?,
                ChangeKind::Deleted { id } => {
                    retire_policy(c, id, change.seq, bounds.pruned_seq)?.ok_or_else(|| {
                        StorageError::Corrupt(format!(
                            "replicated change {} deletes unknown policy {id:?}",
                            change.seq
                        ))
                    })?;
                }
            }
            head = change.seq;
        }
        set_head(c, head)
    })
}

/// [`Storage::replace`](crate::Storage::replace).
pub(super) fn replace(
    conn: &mut AnyConnection,
    seq: u64,
    policies: &[StoredPolicy],
) -> Result<(), StorageError> {
    conn.transaction(|c| {
        lock_head(c)?;
        diesel::delete(ledger::table).execute(c)?;
        diesel::delete(ledger_changes::table).execute(c)?;
        let now = chrono::Utc::now().naive_utc();
        for policy in policies {
            insert_copied_row(c, policy, now)?;
        }
        diesel::update(ledger_head::table.find(1))
            .set((
                ledger_head::head_seq.eq(seq as i64),
                ledger_head::pruned_seq.eq(seq as i64),
            ))
            .execute(c)?;
        Ok(())
    })
}

/// [`Storage::prune_changes`](crate::Storage::prune_changes).
pub(super) fn prune_changes(
    conn: &mut AnyConnection,
    through_seq: u64,
) -> Result<(), StorageError> {
    conn.transaction(|c| {
        let bounds = lock_head(c)?;
        let through = through_seq.min(bounds.head_seq);
        if through <= bounds.pruned_seq {
            return Ok(());
        }
        diesel::delete(ledger_changes::table.filter(ledger_changes::seq.le(through as i64)))
            .execute(c)?;
        // The head row takes the head: on SQLite it may be behind the last change (which this
        // may delete), as commits do not write it.
        diesel::update(ledger_head::table.find(1))
            .set((
                ledger_head::head_seq.eq(bounds.head_seq as i64),
                ledger_head::pruned_seq.eq(through as i64),
            ))
            .execute(c)?;
        Ok(())
    })
}

/// [`Storage::chain_position`](crate::Storage::chain_position).
pub(super) fn chain_position(c: &mut AnyConnection) -> Result<Option<ChainPosition>, StorageError> {
    let row: Option<(i64, String, i64)> = ledger_chain::table
        .find(1)
        .select((
            ledger_chain::block_number,
            ledger_chain::block_hash,
            ledger_chain::transaction_count,
        ))
        .first(c)
        .optional()?;
    Ok(row.map(|(number, hash, count)| ChainPosition {
        block_number: number as u64,
        block_hash: hash,
        transaction_count: count as u64,
    }))
}

/// [`Storage::set_chain_position`](crate::Storage::set_chain_position).
pub(super) fn set_chain_position(
    c: &mut AnyConnection,
    position: &ChainPosition,
) -> Result<(), StorageError> {
    c.transaction(|c| {
        let values = (
            ledger_chain::block_number.eq(position.block_number as i64),
            ledger_chain::block_hash.eq(&position.block_hash),
            ledger_chain::transaction_count.eq(position.transaction_count as i64),
        );
        let updated = diesel::update(ledger_chain::table.find(1))
            .set(values)
            .execute(c)?;
        if updated == 0 {
            diesel::insert_into(ledger_chain::table)
                .values((ledger_chain::id.eq(1), values.0, values.1, values.2))
                .execute(c)?;
        }
        Ok(())
    })
}
