//! What one poll of a followed contract changes in the ledger (issue 17): the contract's state at
//! the followed block, diffed against the local copy.
//!
//! The contract emits no event for an insert and a delete event without the id, so it is
//! followed by its state: the ids it holds at a block, and the bodies of those that are new or
//! changed. A reorg needs no special case: the next poll's state is diffed like any other, and a
//! policy whose transaction vanished is deleted. Deletes come first, so that an id deleted and
//! inserted again (an update) ends with its new body.

use std::collections::{HashMap, HashSet};

use ledger_anylog::policy::{CompletedPolicy, PolicyError, completed_elsewhere};

use crate::chain::Counts;

/// Whether every transaction between a held state (`transaction_count`, `length` ids) and a
/// later one on the same chain (`now`) was an insert, so the array only grew at its end.
///
/// An insert adds one id and one transaction, an update only a transaction, a delete removes
/// an id and adds a transaction (or none, on a contract that does not count deletes): the ids
/// grow by as many as the transactions only when every one was an insert. Valid only when the
/// held block is an ancestor of the later one (after a reorg, compare the ids instead).
pub fn only_appended(transaction_count: u64, length: u64, now: Counts) -> bool {
    now.transaction_count > transaction_count
        && now.num_policies >= length
        && now.transaction_count - transaction_count == now.num_policies - length
}

/// The ids a poll must act on, before any body is read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdDiff {
    /// Stored locally, gone from the contract: deleted.
    pub deleted: Vec<String>,
    /// On the contract, not stored locally: their bodies are read, then inserted.
    pub added: Vec<String>,
}

/// The ids deleted from and added to the contract since the local copy: `local` are the ids
/// stored here, `on_chain` those the contract holds (in its array order, which deletes change:
/// the order says nothing). An id the contract holds twice counts once.
pub fn diff_ids<'a>(local: impl IntoIterator<Item = &'a str>, on_chain: &[String]) -> IdDiff {
    let local: HashSet<&str> = local.into_iter().collect();
    let chain: HashSet<&str> = on_chain.iter().map(String::as_str).collect();
    let mut deleted: Vec<String> = local
        .iter()
        .filter(|id| !chain.contains(*id))
        .map(|id| id.to_string())
        .collect();
    // A stable order, for logs and for tests: the storage's seqs follow it.
    deleted.sort();
    let mut seen = HashSet::new();
    let added = on_chain
        .iter()
        .filter(|id| !local.contains(id.as_str()) && seen.insert(id.as_str()))
        .cloned()
        .collect();
    IdDiff { deleted, added }
}

/// What a poll applies, in this order: every delete, then every insert.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Ids to delete: gone from the contract, or changed there (deleted, then inserted again).
    pub deletes: Vec<String>,
    /// Policies to insert: new on the contract, or the new body of a changed one.
    pub inserts: Vec<CompletedPolicy>,
    /// Policies on the contract that are not valid policies (or whose body's id is not their
    /// key): skipped, never blocking the rest.
    pub skipped: Vec<(String, PolicyError)>,
}

/// The plan for a poll: `deleted` (from [`diff_ids`]); `bodies`, the contract's text of each id
/// read (the added ones, and on an update every one, since a changed `transaction_count` with
/// the same ids means some body changed); `local`, the stored line of each local id. A body
/// whose stored line differs is an update: a delete and an insert. A skipped id that is stored
/// locally is deleted: the local copy holds only what the contract holds and is valid.
pub fn plan(
    deleted: Vec<String>,
    bodies: Vec<(String, String)>,
    local: &HashMap<String, String>,
) -> Plan {
    let mut plan = Plan {
        deletes: deleted,
        ..Plan::default()
    };
    for (id, text) in bodies {
        match completed_elsewhere(&id, &text) {
            Ok(policy) => match local.get(&id) {
                Some(stored) if *stored == policy.json => {}
                Some(_) => {
                    plan.deletes.push(id);
                    plan.inserts.push(policy);
                }
                None => plan.inserts.push(policy),
            },
            Err(e) => {
                if local.contains_key(&id) {
                    plan.deletes.push(id.clone());
                }
                plan.skipped.push((id, e));
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn line(id: &str, name: &str) -> String {
        format!(r#"{{"operator": {{"name": "{name}", "id": "{id}"}}}}"#)
    }

    #[test]
    fn ids_gone_are_deleted_and_new_ones_added_whatever_the_array_order() {
        let diff = diff_ids(["a", "b", "c"], &ids(&["c", "d", "a", "d"]));
        assert_eq!(diff.deleted, ids(&["b"]));
        assert_eq!(diff.added, ids(&["d"]));
        // A contract whose delete moved its last policy into the hole: same ids, nothing to do.
        let same = diff_ids(["a", "b", "c"], &ids(&["c", "b", "a"]));
        assert_eq!(same, IdDiff::default());
        let everything_gone = diff_ids(["b", "a"], &[]);
        assert_eq!(everything_gone.deleted, ids(&["a", "b"]));
    }

    #[test]
    fn only_a_growth_by_as_many_ids_as_transactions_is_appends_alone() {
        let now = |transaction_count, num_policies| Counts {
            transaction_count,
            num_policies,
        };
        // Three inserts.
        assert!(only_appended(10, 7, now(13, 10)));
        // Nothing written: nothing to append (the caller only moves its position).
        assert!(!only_appended(10, 7, now(10, 7)));
        // An update and an insert; a delete and two inserts; a delete alone.
        assert!(!only_appended(10, 7, now(12, 8)));
        assert!(!only_appended(10, 7, now(13, 8)));
        assert!(!only_appended(10, 7, now(11, 6)));
        // Fewer transactions than the held state (never on one chain): not appends.
        assert!(!only_appended(10, 7, now(9, 8)));
    }

    #[test]
    fn a_changed_body_is_a_delete_and_an_insert_and_an_invalid_one_is_skipped() {
        let local: HashMap<String, String> = [
            ("a".to_string(), line("a", "one")),
            ("b".to_string(), line("b", "two")),
            ("c".to_string(), line("c", "three")),
        ]
        .into();
        let plan = plan(
            ids(&["gone"]),
            vec![
                ("a".into(), line("a", "one")),
                ("b".into(), line("b", "TWO")),
                ("c".into(), "not json".into()),
                ("d".into(), line("d", "four")),
                ("e".into(), line("not-e", "five")),
            ],
            &local,
        );
        assert_eq!(plan.deletes, ids(&["gone", "b", "c"]));
        let inserted: Vec<&str> = plan.inserts.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(inserted, ["b", "d"]);
        assert_eq!(plan.inserts[0].json, line("b", "TWO"));
        let skipped: Vec<(&str, &str)> = plan
            .skipped
            .iter()
            .map(|(id, e)| (id.as_str(), e.problem()))
            .collect();
        assert_eq!(skipped, [("c", "INVALID_JSON"), ("e", "ID_MISMATCH")]);
    }
}
