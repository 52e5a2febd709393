//! The storage suite, run against SQLite files and a real PostgreSQL server alike.

use std::sync::Arc;

use ledger_storage::{
    Change, ChangeKind, DatabaseUrl, DieselStorage, NewPolicy, Rejection, SnapshotPart, Storage,
    StoredPolicy, WriteOp,
};
use ledger_testkit::PostgresServer;
use ledger_testkit::sql::{LedgerRow, ledger_rows};

/// A fresh database of the backend and its URL; the guard keeps a SQLite file's directory.
struct Fresh {
    url: DatabaseUrl,
    _dir: Option<tempfile::TempDir>,
}

fn fresh(backend: &str) -> Fresh {
    match backend {
        "sqlite" => {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}", dir.path().join("blockchain.db").display());
            Fresh {
                url: url.parse().unwrap(),
                _dir: Some(dir),
            }
        }
        "postgres" => Fresh {
            url: PostgresServer::get().create_database().parse().unwrap(),
            _dir: None,
        },
        other => panic!("unknown backend {other}"),
    }
}

fn open(url: &DatabaseUrl) -> Arc<dyn Storage> {
    Arc::new(DieselStorage::open(url, 4).expect("opening the storage"))
}

fn policy(n: usize, policy_type: &str) -> NewPolicy {
    NewPolicy {
        id: format!("id-{n}"),
        policy_type: policy_type.to_string(),
        company: Some("Acme".to_string()),
        status: None,
        date: chrono::DateTime::from_timestamp(1_780_000_000 + n as i64, 0)
            .unwrap()
            .naive_utc(),
        json: format!("{{\"{policy_type}\": {{\"name\": \"p{n}\", \"id\": \"id-{n}\"}}}}"),
        host: "127.0.0.1".to_string(),
    }
}

fn insert(n: usize) -> WriteOp {
    WriteOp::Insert(policy(n, "operator"))
}

fn delete(n: usize) -> WriteOp {
    WriteOp::Delete {
        id: format!("id-{n}"),
    }
}

fn snapshot(storage: &dyn Storage, page_size: usize) -> (u64, u64, Vec<StoredPolicy>) {
    let (mut seq, mut count, mut policies) = (0, 0, Vec::new());
    storage
        .snapshot(page_size, &mut |part| {
            match part {
                SnapshotPart::Start {
                    seq: s,
                    policy_count,
                } => {
                    seq = s;
                    count = policy_count;
                }
                SnapshotPart::Page(page) => {
                    assert!(page.len() <= page_size);
                    policies.extend(page);
                }
            }
            true
        })
        .unwrap();
    (seq, count, policies)
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test] fn $name() { super::$name("sqlite") })*
        }
        mod postgres {
            $(#[test] fn $name() { super::$name("postgres") })*
        }
    };
}

on_both_backends!(
    inserts_take_consecutive_seqs,
    rejected_writes_take_no_seq_and_do_not_abort_the_batch,
    deletes_are_changes,
    list_filters_by_type_and_pages,
    snapshot_is_in_ledger_order_and_paged,
    changes_survive_reopening,
    pruning_moves_the_replay_bound,
    concurrent_writers_commit_in_seq_order,
    hostile_strings_are_stored_exactly,
    one_batch_can_insert_delete_and_reinsert_an_id,
    anylog_columns_hold_the_policy_date_status_and_host,
    a_copy_keeps_the_upstreams_seqs_and_a_snapshot_replaces_it,
    a_ledger_of_the_first_schema_is_migrated_in_place,
    the_followed_block_survives_reopening,
);

fn inserts_take_consecutive_seqs(backend: &str) {
    let db = fresh(backend);
    let storage = open(&db.url);
    assert_eq!(storage.bounds().unwrap().head_seq, 0);
    let results = storage.apply(&[insert(1), insert(2), insert(3)]).unwrap();
    let seqs: Vec<u64> = results.iter().map(|r| r.as_ref().unwrap().seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
    let results = storage.apply(&[insert(4)]).unwrap();
    assert_eq!(results[0].as_ref().unwrap().seq, 4);
    assert_eq!(storage.bounds().unwrap().head_seq, 4);
    let got = storage.get("id-2").unwrap().expect("id-2 stored");
    assert_eq!(got.seq, 2);
    assert_eq!(got.policy_type, "operator");
    assert_eq!(got.json, policy(2, "operator").json);
    assert_eq!(storage.get("id-99").unwrap(), None);
}

fn rejected_writes_take_no_seq_and_do_not_abort_the_batch(backend: &str) {
    let db = fresh(backend);
    let storage = open(&db.url);
    storage.apply(&[insert(1)]).unwrap();
    let results = storage
        .apply(&[insert(1), insert(2), insert(2), delete(7), insert(3)])
        .unwrap();
    assert_eq!(
        results[0].as_ref().unwrap_err(),
        &Rejection::AlreadyExists("id-1".into())
    );
    assert_eq!(results[1].as_ref().unwrap().seq, 2);
    assert_eq!(
        results[2].as_ref().unwrap_err(),
        &Rejection::AlreadyExists("id-2".into())
    );
    assert_eq!(
        results[3].as_ref().unwrap_err(),
        &Rejection::NotFound("id-7".into())
    );
    assert_eq!(results[4].as_ref().unwrap().seq, 3);
    assert_eq!(storage.bounds().unwrap().head_seq, 3);
    let changes = storage.changes_after(0, 100).unwrap();
    assert_eq!(changes.iter().map(|c| c.seq).collect::<Vec<_>>(), [1, 2, 3]);
}

fn deletes_are_changes(backend: &str) {
    let db = fresh(backend);
    let storage = open(&db.url);
    storage.apply(&[insert(1), insert(2)]).unwrap();
    let results = storage.apply(&[delete(1), insert(1), delete(2)]).unwrap();
    let seqs: Vec<u64> = results.iter().map(|r| r.as_ref().unwrap().seq).collect();
    assert_eq!(seqs, [3, 4, 5]);
    let changes = storage.changes_after(2, 100).unwrap();
    assert_eq!(changes.len(), 3);
    assert_eq!(changes[0].kind, ChangeKind::Deleted { id: "id-1".into() });
    match &changes[1].kind {
        ChangeKind::Inserted(p) => assert_eq!((p.id.as_str(), p.seq), ("id-1", 4)),
        other => panic!("expected an insert, got {other:?}"),
    }
    // Re-inserted after its delete: it now stands at the end of the ledger.
    let (seq, count, policies) = snapshot(&*storage, 10);
    assert_eq!((seq, count), (5, 1));
    assert_eq!(policies[0].id, "id-1");
    assert_eq!(policies[0].seq, 4);
    assert_eq!(
        storage.apply(&[delete(2)]).unwrap()[0],
        Err(Rejection::NotFound("id-2".into()))
    );
    // From the start, the whole history replays in seq order, deleted policies' inserts with
    // their text, however the changes are kept.
    let history: Vec<(u64, String)> = storage
        .changes_after(0, 100)
        .unwrap()
        .into_iter()
        .map(|c| match c.kind {
            ChangeKind::Inserted(p) => (c.seq, format!("+{} {}", p.id, p.json)),
            ChangeKind::Deleted { id } => (c.seq, format!("-{id}")),
        })
        .collect();
    let json = |n: usize| policy(n, "operator").json;
    assert_eq!(
        history,
        [
            (1, format!("+id-1 {}", json(1))),
            (2, format!("+id-2 {}", json(2))),
            (3, "-id-1".to_string()),
            (4, format!("+id-1 {}", json(1))),
            (5, "-id-2".to_string()),
        ]
    );
    // Pages of the replay are gap-free runs too.
    let paged: Vec<u64> = storage
        .changes_after(1, 2)
        .unwrap()
        .iter()
        .map(|c| c.seq)
        .collect();
    assert_eq!(paged, [2, 3]);
}

fn list_filters_by_type_and_pages(backend: &str) {
    let db = fresh(backend);
    let storage = open(&db.url);
    let ops: Vec<WriteOp> = (1..=10)
        .map(|n| {
            WriteOp::Insert(policy(
                n,
                if n.is_multiple_of(2) {
                    "operator"
                } else {
                    "table"
                },
            ))
        })
        .collect();
    storage.apply(&ops).unwrap();
    let operators = storage.list(Some("operator"), 0, 100).unwrap();
    assert_eq!(
        operators.iter().map(|p| p.seq).collect::<Vec<_>>(),
        [2, 4, 6, 8, 10]
    );
    let page = storage.list(None, 3, 4).unwrap();
    assert_eq!(page.iter().map(|p| p.seq).collect::<Vec<_>>(), [4, 5, 6, 7]);
    assert!(storage.list(Some("cluster"), 0, 100).unwrap().is_empty());
}

fn snapshot_is_in_ledger_order_and_paged(backend: &str) {
    let db = fresh(backend);
    let storage = open(&db.url);
    let ops: Vec<WriteOp> = (1..=25).map(insert).collect();
    storage.apply(&ops).unwrap();
    storage.apply(&[delete(5), delete(20)]).unwrap();
    let (seq, count, policies) = snapshot(&*storage, 7);
    assert_eq!((seq, count), (27, 23));
    assert_eq!(policies.len(), 23);
    assert!(policies.windows(2).all(|w| w[0].seq < w[1].seq));
    assert!(!policies.iter().any(|p| p.id == "id-5" || p.id == "id-20"));
    // A sink that stops early stops the snapshot.
    let mut pages = 0;
    storage
        .snapshot(5, &mut |part| {
            if let SnapshotPart::Page(_) = part {
                pages += 1;
            }
            pages < 2
        })
        .unwrap();
    assert_eq!(pages, 2);
}

fn changes_survive_reopening(backend: &str) {
    let db = fresh(backend);
    {
        let storage = open(&db.url);
        storage.apply(&[insert(1), insert(2), delete(1)]).unwrap();
    }
    let storage = open(&db.url);
    assert_eq!(storage.bounds().unwrap().head_seq, 3);
    assert_eq!(storage.changes_after(0, 10).unwrap().len(), 3);
    assert_eq!(
        storage.apply(&[insert(3)]).unwrap()[0]
            .as_ref()
            .unwrap()
            .seq,
        4
    );
}

fn pruning_moves_the_replay_bound(backend: &str) {
    let db = fresh(backend);
    let storage = open(&db.url);
    let ops: Vec<WriteOp> = (1..=10).map(insert).collect();
    storage.apply(&ops).unwrap();
    storage.prune_changes(6).unwrap();
    let bounds = storage.bounds().unwrap();
    assert_eq!((bounds.head_seq, bounds.pruned_seq), (10, 6));
    assert_eq!(
        storage
            .changes_after(6, 100)
            .unwrap()
            .iter()
            .map(|c| c.seq)
            .collect::<Vec<_>>(),
        [7, 8, 9, 10]
    );
    assert!(storage.changes_after(0, 100).unwrap()[0].seq == 7);
    // Never beyond the head, never backwards.
    storage.prune_changes(99).unwrap();
    assert_eq!(storage.bounds().unwrap().pruned_seq, 10);
    storage.prune_changes(3).unwrap();
    assert_eq!(storage.bounds().unwrap().pruned_seq, 10);
    // The policies themselves stay.
    assert_eq!(snapshot(&*storage, 100).2.len(), 10);
    // With every change pruned, the head still stands: the next insert follows it.
    let next = storage.apply(&[insert(11)]).unwrap();
    assert_eq!(next[0].as_ref().unwrap().seq, 11);
    drop(storage);
    assert_eq!(open(&db.url).bounds().unwrap().head_seq, 11);
}

fn concurrent_writers_commit_in_seq_order(backend: &str) {
    // Several storages on one database stand for several masters (SQLite: several processes).
    let db = fresh(backend);
    let writers: Vec<Arc<dyn Storage>> = (0..4).map(|_| open(&db.url)).collect();
    let reader = open(&db.url);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A reader that polls the change log must always see a gap-free prefix.
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut last = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                for change in reader.changes_after(last, 1000).unwrap() {
                    assert_eq!(change.seq, last + 1, "a gap in the change log");
                    last = change.seq;
                }
            }
            last
        })
    };
    let threads: Vec<_> = writers
        .into_iter()
        .enumerate()
        .map(|(w, storage)| {
            std::thread::spawn(move || {
                for round in 0..25 {
                    let ops: Vec<WriteOp> =
                        (0..4).map(|i| insert(w * 1000 + round * 10 + i)).collect();
                    for result in storage.apply(&ops).unwrap() {
                        result.unwrap();
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    watcher.join().unwrap();
    let storage = open(&db.url);
    assert_eq!(storage.bounds().unwrap().head_seq, 400);
    let changes = storage.changes_after(0, 1000).unwrap();
    assert_eq!(
        changes.iter().map(|c| c.seq).collect::<Vec<_>>(),
        (1..=400).collect::<Vec<_>>()
    );
}

fn hostile_strings_are_stored_exactly(backend: &str) {
    let db = fresh(backend);
    let storage = open(&db.url);
    let nasty = "'; DROP TABLE ledger; -- \"quoted\" \\ \t\u{1}\u{7f} 𝄞 é 中";
    let json = format!(
        "{{\"config\": {{\"v\": {}}}}}",
        serde_json::Value::from(nasty)
    );
    let op = WriteOp::Insert(NewPolicy {
        id: nasty.to_string(),
        policy_type: "config".into(),
        company: Some(nasty.to_string()),
        status: Some(nasty.to_string()),
        date: chrono::Utc::now().naive_utc(),
        json: json.clone(),
        host: "::1".into(),
    });
    storage.apply(&[op]).unwrap()[0].as_ref().unwrap();
    let got = storage.get(nasty).unwrap().unwrap();
    assert_eq!(got.id, nasty);
    assert_eq!(got.json, json);
    assert_eq!(snapshot(&*storage, 10).2[0].json, json);
}

fn one_batch_can_insert_delete_and_reinsert_an_id(backend: &str) {
    let db = fresh(backend);
    let storage = open(&db.url);
    // Larger than one multi-row statement, with a delete of a row inserted earlier in the batch.
    let mut ops: Vec<WriteOp> = (1..=1200).map(insert).collect();
    ops.extend([delete(600), insert(600), insert(600), delete(9999)]);
    let results = storage.apply(&ops).unwrap();
    assert_eq!(results[1199].as_ref().unwrap().seq, 1200);
    assert_eq!(results[1200].as_ref().unwrap().seq, 1201);
    assert_eq!(results[1201].as_ref().unwrap().seq, 1202);
    assert_eq!(
        results[1202].as_ref().unwrap_err(),
        &Rejection::AlreadyExists("id-600".into())
    );
    assert_eq!(
        results[1203].as_ref().unwrap_err(),
        &Rejection::NotFound("id-9999".into())
    );
    assert_eq!(storage.get("id-600").unwrap().unwrap().seq, 1202);
    let (seq, count, policies) = snapshot(&*storage, 5000);
    assert_eq!((seq, count), (1202, 1200));
    assert_eq!(policies.last().unwrap().id, "id-600");
    assert_eq!(
        storage.changes_after(0, 5000).unwrap().len(),
        1202,
        "every change is in the log"
    );
}

/// PostgreSQL would switch diesel's prepared statements to a generic plan after five runs, made
/// while the ledger was nearly empty (a sequential scan for the id lookup), and keep it as the
/// ledger grows; the storage asks for plans made with each call's values instead.
#[test]
fn postgres_statements_never_run_a_stale_generic_plan() {
    let fresh = fresh("postgres");
    let storage = DieselStorage::open(&fresh.url, 2).expect("opening the storage");
    for n in 0..20 {
        // A batch with a delete takes the general write path, whose statements are prepared.
        let results = storage
            .apply(&[insert(n), insert(n + 100), delete(n + 100)])
            .unwrap();
        assert!(results.iter().all(Result::is_ok), "batch {n}: {results:?}");
        assert!(storage.get(&format!("id-{n}")).unwrap().is_some());
    }
    let (generic, custom) = storage
        .plan_counts()
        .unwrap()
        .expect("PostgreSQL counts plans");
    assert!(
        custom >= 40,
        "the writes and reads ran on this connection: {custom} custom plans"
    );
    assert_eq!(generic, 0, "statements ran with a generic plan");
}

/// On PostgreSQL a batch of inserts is one statement, whose snapshot predates its wait for the
/// head: an id another master stores meanwhile must still be refused, not fail the batch.
#[test]
fn postgres_an_id_stored_while_waiting_for_the_head_is_refused() {
    use diesel::connection::SimpleConnection;
    use diesel::{Connection, PgConnection};

    let fresh = fresh("postgres");
    let storage = Arc::new(DieselStorage::open(&fresh.url, 2).expect("opening the storage"));
    assert!(storage.apply(&[insert(1)]).unwrap()[0].is_ok());
    // Another master: holds the head, stores id-2 as seq 2, commits only later.
    let DatabaseUrl::Postgres(url) = &fresh.url else {
        unreachable!("a PostgreSQL database")
    };
    let mut other = PgConnection::establish(url).unwrap();
    other
        .batch_execute(
            "BEGIN; SELECT head_seq FROM ledger_head WHERE id = 1 FOR UPDATE; \
             INSERT INTO ledger (sequence_id, policy_type, policy_id, host, policy, seq) \
                 VALUES (2, 'operator', 'id-2', 'elsewhere', '{\"operator\": {}}', 2); \
             UPDATE ledger_head SET head_seq = 2 WHERE id = 1;",
        )
        .unwrap();
    let writer = {
        let storage = storage.clone();
        std::thread::spawn(move || storage.apply(&[insert(3), insert(2), insert(4)]))
    };
    // Let the batch reach the lock and wait there.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!writer.is_finished(), "the batch did not wait for the head");
    other.batch_execute("COMMIT").unwrap();
    let results = writer.join().unwrap().unwrap();
    let seqs: Vec<_> = results
        .iter()
        .map(|r| r.as_ref().map(|c| c.seq).map_err(Clone::clone))
        .collect();
    assert_eq!(
        seqs,
        vec![Ok(3), Err(Rejection::AlreadyExists("id-2".into())), Ok(4)]
    );
    assert_eq!(storage.bounds().unwrap().head_seq, 4);
    assert_eq!(storage.changes_after(0, 10).unwrap().len(), 4);
}

/// The connection kept for writes is cut (as by a database restart or a proxy): writes go on
/// on a new connection, and a write that failed on the dead one left nothing behind.
#[test]
fn postgres_writes_go_on_after_their_connection_is_cut() {
    use diesel::connection::SimpleConnection;
    use diesel::{Connection, PgConnection};

    let fresh = fresh("postgres");
    let DatabaseUrl::Postgres(url) = &fresh.url else {
        unreachable!("a PostgreSQL database")
    };
    let storage = DieselStorage::open(&fresh.url, 2).expect("opening the storage");
    let cut_every_other_connection = || {
        let mut admin = PgConnection::establish(url).unwrap();
        admin
            .batch_execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            .unwrap();
    };
    assert!(storage.apply(&[insert(1)]).unwrap()[0].is_ok());

    // Idle past the trust window: the connection is checked, found dead and replaced.
    cut_every_other_connection();
    std::thread::sleep(std::time::Duration::from_millis(700));
    let after_idle = storage
        .apply(&[insert(2)])
        .expect("a write after an idle cut");
    assert!(after_idle[0].is_ok(), "{after_idle:?}");

    // At once: the trusted connection may fail this write; the next one opens a new connection.
    assert!(storage.apply(&[insert(3)]).unwrap()[0].is_ok());
    cut_every_other_connection();
    let first = storage.apply(&[insert(4)]);
    let second = storage
        .apply(&[insert(5)])
        .expect("the write after a failed one");
    assert!(second[0].is_ok(), "{second:?}");

    for n in [1, 2, 3, 5] {
        assert!(storage.get(&format!("id-{n}")).unwrap().is_some(), "id-{n}");
    }
    let stored_4 = storage.get("id-4").unwrap().is_some();
    assert_eq!(
        stored_4,
        first.is_ok(),
        "id-4 is stored exactly when its write was acknowledged: {first:?}"
    );
    let (head, _, policies) = snapshot(&*open(&fresh.url), 10);
    assert_eq!(
        policies.len() as u64,
        head,
        "seqs without gaps: {policies:?}"
    );
}

fn anylog_columns_hold_the_policy_date_status_and_host(backend: &str) {
    let db = fresh(backend);
    let storage = open(&db.url);
    let at = |s: &str| ledger_anylog::date::parse_date(s).unwrap();
    let mut cluster = policy(1, "cluster");
    cluster.status = Some("active".into());
    cluster.date = at("2026-07-18T19:49:43.020405Z");
    cluster.host = "10.0.0.7".into();
    let mut older = policy(2, "operator");
    older.date = at("2025-01-02T03:04:05.000006Z");
    older.company = None;
    // The one-statement PostgreSQL path, then the general one (a batch with a delete).
    storage
        .apply(&[WriteOp::Insert(cluster), WriteOp::Insert(older)])
        .unwrap();
    let mut third = policy(3, "operator");
    third.date = at("2024-06-01T00:00:00.123456Z");
    third.status = Some("standby".into());
    storage
        .apply(&[WriteOp::Insert(third), delete(99)])
        .unwrap();
    let row = |id: &str,
               policy_type: &str,
               company: Option<&str>,
               date: &str,
               host: &str,
               status: Option<&str>| LedgerRow {
        policy_id: id.into(),
        policy_type: policy_type.into(),
        company_name: company.map(Into::into),
        date: date.into(),
        host: host.into(),
        status: status.map(Into::into),
    };
    assert_eq!(
        ledger_rows(&db.url),
        [
            row(
                "id-3",
                "operator",
                Some("Acme"),
                "2024-06-01 00:00:00.123456",
                "127.0.0.1",
                Some("standby")
            ),
            row(
                "id-2",
                "operator",
                None,
                "2025-01-02 03:04:05.000006",
                "127.0.0.1",
                None
            ),
            row(
                "id-1",
                "cluster",
                Some("Acme"),
                "2026-07-18 19:49:43.020405",
                "10.0.0.7",
                Some("active")
            ),
        ]
    );
}

/// A relay's copy: changes committed upstream stored with their own seqs (`replicate`), a
/// snapshot from upstream in place of everything (`replace`).
fn a_copy_keeps_the_upstreams_seqs_and_a_snapshot_replaces_it(backend: &str) {
    let db = fresh(backend);
    let copy = open(&db.url);
    let stored = |n: usize, seq: u64| StoredPolicy {
        id: format!("id-{n}"),
        policy_type: "operator".into(),
        json: policy(n, "operator").json,
        seq,
    };
    let inserted = |n: usize, seq: u64| Change {
        seq,
        kind: ChangeKind::Inserted(stored(n, seq)),
    };
    let deleted = |n: usize, seq: u64| Change {
        seq,
        kind: ChangeKind::Deleted {
            id: format!("id-{n}"),
        },
    };
    let changes = vec![
        inserted(1, 1),
        inserted(2, 2),
        inserted(3, 3),
        deleted(2, 4),
    ];
    copy.replicate(&changes).unwrap();
    assert_eq!(copy.bounds().unwrap().head_seq, 4);
    assert_eq!(copy.changes_after(0, 100).unwrap(), changes);
    assert_eq!(copy.policy_count().unwrap(), 2);
    assert_eq!(copy.get("id-3").unwrap(), Some(stored(3, 3)));

    // A change that does not follow the head is refused; so is a batch with a delete of an
    // unknown id, whole (one transaction).
    assert!(copy.replicate(&[inserted(6, 6)]).is_err());
    assert!(copy.replicate(&[inserted(5, 5), deleted(9, 6)]).is_err());
    assert_eq!(copy.bounds().unwrap().head_seq, 4);
    assert_eq!(copy.get("id-5").unwrap(), None);

    // A snapshot at seq 10 replaces everything: nothing before it is replayable.
    copy.replace(10, &[stored(3, 3), stored(7, 9)]).unwrap();
    let bounds = copy.bounds().unwrap();
    assert_eq!((bounds.head_seq, bounds.pruned_seq), (10, 10));
    assert!(copy.changes_after(0, 100).unwrap().is_empty());
    assert_eq!(
        snapshot(&*copy, 10),
        (10, 2, vec![stored(3, 3), stored(7, 9)])
    );
    assert_eq!(copy.get("id-1").unwrap(), None);
    // And the changes go on from there.
    copy.replicate(&[inserted(8, 11)]).unwrap();
    assert_eq!(copy.changes_after(10, 100).unwrap(), vec![inserted(8, 11)]);
    assert_eq!(copy.policy_count().unwrap(), 3);
}

/// A ledger written by the first schema (before issue 16: `sequence_id` numbered apart from
/// `seq`, the head row moved by every commit) opens with its policies, changes and head, now with
/// `sequence_id` = `seq`, and takes new writes after its head.
fn a_ledger_of_the_first_schema_is_migrated_in_place(backend: &str) {
    use diesel::connection::SimpleConnection;
    use diesel::{Connection, PgConnection, RunQueryDsl, SqliteConnection};

    let db = fresh(backend);
    // Policies id-1, id-2 (deleted by change 3) and id-4; head 4.
    let old_rows = "INSERT INTO ledger (policy_type, policy_id, host, policy, seq) VALUES \
             ('operator', 'id-1', 'h', '{\"operator\": {\"id\": \"id-1\"}}', 1), \
             ('operator', 'id-4', 'h', '{\"operator\": {\"id\": \"id-4\"}}', 4); \
         INSERT INTO ledger_changes (seq, op, policy_id, policy_type, policy) VALUES \
             (1, 'insert', 'id-1', 'operator', '{\"operator\": {\"id\": \"id-1\"}}'), \
             (2, 'insert', 'id-2', 'operator', '{\"operator\": {\"id\": \"id-2\"}}'), \
             (3, 'delete', 'id-2', 'operator', NULL), \
             (4, 'insert', 'id-4', 'operator', '{\"operator\": {\"id\": \"id-4\"}}'); \
         UPDATE ledger_head SET head_seq = 4 WHERE id = 1;";
    let record = "CREATE TABLE __diesel_schema_migrations (version VARCHAR(50) PRIMARY KEY NOT NULL, \
             run_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP); \
         INSERT INTO __diesel_schema_migrations (version) VALUES ('20261130000000');";
    #[derive(diesel::QueryableByName)]
    struct Ids {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        sequence_id: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        seq: i64,
    }
    let ids_query =
        "SELECT CAST(sequence_id AS BIGINT) AS sequence_id, seq FROM ledger ORDER BY seq";
    let ids: Vec<Ids> = match &db.url {
        DatabaseUrl::Sqlite(path) => {
            let mut c = SqliteConnection::establish(&path.to_string_lossy()).unwrap();
            c.batch_execute(include_str!(
                "../../master/storage/migrations/sqlite/2026-11-30-000000_create_ledger/up.sql"
            ))
            .unwrap();
            c.batch_execute(old_rows).unwrap();
            c.batch_execute(record).unwrap();
            drop(c);
            let storage = open(&db.url);
            let mut c = SqliteConnection::establish(&path.to_string_lossy()).unwrap();
            let ids = diesel::sql_query(ids_query).load(&mut c).unwrap();
            drop(storage);
            ids
        }
        DatabaseUrl::Postgres(url) => {
            let mut c = PgConnection::establish(url).unwrap();
            c.batch_execute(include_str!(
                "../../master/storage/migrations/postgres/2026-11-30-000000_create_ledger/up.sql"
            ))
            .unwrap();
            c.batch_execute(old_rows).unwrap();
            c.batch_execute(record).unwrap();
            drop(open(&db.url));
            diesel::sql_query(ids_query).load(&mut c).unwrap()
        }
    };
    let ids: Vec<(i64, i64)> = ids.iter().map(|r| (r.sequence_id, r.seq)).collect();
    assert_eq!(ids, [(1, 1), (4, 4)], "sequence_id takes each row's seq");
    let storage = open(&db.url);
    assert_eq!(storage.bounds().unwrap().head_seq, 4);
    let seqs: Vec<u64> = storage
        .changes_after(0, 10)
        .unwrap()
        .iter()
        .map(|c| c.seq)
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4], "the change log is kept");
    let (seq, count, policies) = snapshot(&*storage, 10);
    assert_eq!((seq, count, policies.len()), (4, 2, 2));
    let next = storage.apply(&[insert(5)]).unwrap();
    assert_eq!(next[0].as_ref().unwrap().seq, 5);
    assert_eq!(storage.get("id-5").unwrap().unwrap().seq, 5);
}

/// A master that follows a blockchain keeps the block its ledger holds: none at first, the last
/// one set afterwards, across a reopening.
fn the_followed_block_survives_reopening(backend: &str) {
    let fresh = fresh(backend);
    let storage = open(&fresh.url);
    assert_eq!(storage.chain_position().unwrap(), None);
    let first = ledger_storage::ChainPosition {
        block_number: 7,
        block_hash: format!("0x{}", "ab".repeat(32)),
        transaction_count: 3,
    };
    storage.set_chain_position(&first).unwrap();
    assert_eq!(storage.chain_position().unwrap(), Some(first));
    let later = ledger_storage::ChainPosition {
        block_number: 12,
        block_hash: format!("0x{}", "cd".repeat(32)),
        transaction_count: 5,
    };
    storage.set_chain_position(&later).unwrap();
    drop(storage);
    let reopened = open(&fresh.url);
    assert_eq!(reopened.chain_position().unwrap(), Some(later));
}
