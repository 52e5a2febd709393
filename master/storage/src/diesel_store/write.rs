//! [`Storage::apply`](crate::Storage::apply): a batch of writes in one transaction, each
//! effective one numbered from the locked head. The general path (any batch, both backends) and
//! PostgreSQL's one-statement path for a batch of inserts only.

use std::collections::HashMap;

use diesel::prelude::*;

use super::AnyConnection;
use super::rows::{lock_head, retire_policy};
use crate::schema::ledger;
use crate::{Change, ChangeKind, NewPolicy, Rejection, StorageError, WriteOp};

/// The PostgreSQL channel on which a commit announces new changes to the other masters.
pub const NOTIFY_CHANNEL: &str = "ledger_changes";

/// The most rows one INSERT carries (9 parameters a row stays far below both backends' limits).
const ROWS_PER_STATEMENT: usize = 500;

/// Writes the `unwritten` inserts (indexes into `results`, which hold their changes) with
/// multi-row statements, and empties the list.
fn write_inserts(
    c: &mut AnyConnection,
    results: &[Result<Change, Rejection>],
    unwritten: &mut Vec<(usize, &NewPolicy)>,
) -> Result<(), StorageError> {
    for chunk in unwritten.chunks(ROWS_PER_STATEMENT) {
        let inserted = || {
            chunk
                .iter()
                .filter_map(|(index, request)| match &results[*index] {
                    Ok(Change {
                        kind: ChangeKind::Inserted(policy),
                        ..
                    }) => Some((policy, *request)),
                    _ => None,
                })
        };
        let rows: Vec<_> = inserted()
            .map(|(policy, request)| {
                (
                    ledger::sequence_id.eq(policy.seq as i64),
                    ledger::policy_type.eq(&policy.policy_type),
                    ledger::policy_id.eq(&policy.id),
                    ledger::company_name.eq(request.company.as_deref()),
                    ledger::date.eq(request.date),
                    ledger::host.eq(&request.host),
                    ledger::status.eq(request.status.as_deref()),
                    ledger::policy.eq(&policy.json),
                    ledger::seq.eq(policy.seq as i64),
                )
            })
            .collect();
        // One row is a statement of fixed text, which diesel keeps prepared; a multi-row one
        // is parsed and planned at every call. diesel's multi-backend connection has no
        // multi-row INSERT: use the concrete one.
        match (&mut *c, rows.as_slice()) {
            (_, [row]) => diesel::insert_into(ledger::table).values(row).execute(c)?,
            (AnyConnection::Postgres(pg), _) => diesel::insert_into(ledger::table)
                .values(&rows)
                .execute(pg)?,
            (AnyConnection::Sqlite(lite), _) => diesel::insert_into(ledger::table)
                .values(&rows)
                .execute(lite)?,
        };
    }
    unwritten.clear();
    Ok(())
}

/// PostgreSQL, a batch of inserts only: the whole write in one statement, committed on its own.
///
/// Every statement is a round trip: the general path takes six (begin, lock the head, look the
/// ids up, write the rows, move the head, commit), this one: a call of the `ledger_insert_batch`
/// function. Locking the head, skipping the ids already stored or repeated in the batch,
/// numbering the rest from the head, storing them, moving the head and notifying the other
/// masters all happen in it.
///
/// Returns `None` when another master stored one of the ids while this statement waited for
/// the head (its snapshot predates that commit, so the unique index refuses the row and
/// nothing is written): the general path then rejects that id properly.
fn apply_inserts_pg(
    pg: &mut PgConnection,
    inserts: &[&NewPolicy],
) -> Result<Option<Vec<Result<Change, Rejection>>>, StorageError> {
    use diesel::result::{DatabaseErrorKind, Error};
    use diesel::sql_types::{Array, BigInt, Nullable, Text, Timestamp};

    #[derive(QueryableByName)]
    struct Numbered {
        /// The insert's position in the batch, from 1; 0 for the row that reports the new head.
        #[diesel(sql_type = BigInt)]
        ord: i64,
        #[diesel(sql_type = BigInt)]
        seq: i64,
    }
    let column = |f: fn(&NewPolicy) -> &str| inserts.iter().map(|p| f(p)).collect::<Vec<_>>();
    let optional =
        |f: fn(&NewPolicy) -> Option<&str>| inserts.iter().map(|p| f(p)).collect::<Vec<_>>();
    let dates: Vec<chrono::NaiveDateTime> = inserts.iter().map(|p| p.date).collect();
    // The statement lives in the database (`ledger_insert_batch`, see the migrations): parsed
    // and planned once per connection instead of on every commit.
    let numbered = diesel::sql_query(
        "SELECT ord, seq FROM ledger_insert_batch($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind::<Array<Text>, _>(column(|p| &p.id))
    .bind::<Array<Text>, _>(column(|p| &p.policy_type))
    .bind::<Array<Nullable<Text>>, _>(optional(|p| p.company.as_deref()))
    .bind::<Array<Text>, _>(column(|p| &p.host))
    .bind::<Array<Text>, _>(column(|p| &p.json))
    .bind::<Array<Timestamp>, _>(dates)
    .bind::<Array<Nullable<Text>>, _>(optional(|p| p.status.as_deref()))
    .bind::<Text, _>(NOTIFY_CHANNEL)
    .load::<Numbered>(pg);
    let numbered = match numbered {
        Ok(rows) => rows,
        Err(Error::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut seqs: Vec<Option<u64>> = vec![None; inserts.len()];
    for row in numbered.iter().filter(|row| row.ord > 0) {
        seqs[row.ord as usize - 1] = Some(row.seq as u64);
    }
    let results = inserts
        .iter()
        .zip(seqs)
        .map(|(p, seq)| match seq {
            Some(seq) => Ok(p.inserted_at(seq)),
            None => Err(Rejection::AlreadyExists(p.id.clone())),
        })
        .collect();
    Ok(Some(results))
}

/// [`Storage::apply`](crate::Storage::apply) on one connection.
pub(super) fn apply(
    conn: &mut AnyConnection,
    ops: &[WriteOp],
) -> Result<Vec<Result<Change, Rejection>>, StorageError> {
    if let AnyConnection::Postgres(pg) = &mut *conn {
        let inserts: Option<Vec<&NewPolicy>> = ops
            .iter()
            .map(|op| match op {
                WriteOp::Insert(p) => Some(p),
                WriteOp::Delete { .. } => None,
            })
            .collect();
        if let Some(inserts) = inserts
            && let Some(results) = apply_inserts_pg(pg, &inserts)?
        {
            return Ok(results);
        }
    }
    conn.transaction(|c| {
        let bounds = lock_head(c)?;
        let start = bounds.head_seq;
        // One query tells which of the batch's ids are stored (and their types), rather than
        // one query per write: on PostgreSQL every statement is a round trip.
        let ids: Vec<&str> = ops
            .iter()
            .map(|op| match op {
                WriteOp::Insert(p) => p.id.as_str(),
                WriteOp::Delete { id } => id.as_str(),
            })
            .collect();
        let mut stored: HashMap<String, String> = HashMap::new();
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let found = match chunk {
                // Fixed text, kept prepared (see `write_inserts`).
                [id] => ledger::table
                    .filter(ledger::policy_id.eq(id))
                    .select((ledger::policy_id, ledger::policy_type))
                    .load::<(String, String)>(c)?,
                _ => ledger::table
                    .filter(ledger::policy_id.eq_any(chunk))
                    .select((ledger::policy_id, ledger::policy_type))
                    .load::<(String, String)>(c)?,
            };
            stored.extend(found);
        }
        let mut head = start;
        let mut results: Vec<Result<Change, Rejection>> = Vec::with_capacity(ops.len());
        // Inserts not yet written: (index in `results`, the request), written together.
        let mut unwritten: Vec<(usize, &NewPolicy)> = Vec::new();
        for op in ops {
            match op {
                WriteOp::Insert(p) => {
                    if stored.contains_key(&p.id) {
                        results.push(Err(Rejection::AlreadyExists(p.id.clone())));
                        continue;
                    }
                    head += 1;
                    stored.insert(p.id.clone(), p.policy_type.clone());
                    unwritten.push((results.len(), p));
                    results.push(Ok(p.inserted_at(head)));
                }
                WriteOp::Delete { id } => {
                    if stored.remove(id).is_none() {
                        results.push(Err(Rejection::NotFound(id.clone())));
                        continue;
                    }
                    // The delete may remove a policy inserted earlier in this batch.
                    write_inserts(c, &results, &mut unwritten)?;
                    head += 1;
                    retire_policy(c, id, head, bounds.pruned_seq)?;
                    results.push(Ok(Change {
                        seq: head,
                        kind: ChangeKind::Deleted { id: id.clone() },
                    }));
                }
            }
        }
        write_inserts(c, &results, &mut unwritten)?;
        if head != start {
            match &mut *c {
                // One round trip moves the head and notifies the other masters on this
                // database (delivered at commit), which then publish the change. The payload
                // is the new head: a master that already published it skips the read.
                AnyConnection::Postgres(pg) => {
                    diesel::sql_query(
                        "WITH moved AS (UPDATE ledger_head SET head_seq = $1 WHERE id = 1 RETURNING 1) \
                         SELECT pg_notify($2, $1::text) FROM moved",
                    )
                    .bind::<diesel::sql_types::BigInt, _>(head as i64)
                    .bind::<diesel::sql_types::Text, _>(NOTIFY_CHANNEL)
                    .execute(pg)?;
                }
                // SQLite: the head is the last change (`rows::read_bounds`); writing the head row
                // too would be one more page synced per commit.
                AnyConnection::Sqlite(_) => {}
            }
        }
        Ok(results)
    })
}
