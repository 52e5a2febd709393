//! End-to-end tests of the real `master` binary through the generated gRPC client, on SQLite
//! and on a real PostgreSQL server.

use std::collections::BTreeSet;
use std::time::Duration;

use ledger_proto::errors::{Reason, key};
use ledger_proto::pb::ledger_service_client::LedgerServiceClient;
use ledger_proto::pb::stream_ledger_response::Event;
use ledger_proto::pb::{Condition, GetPolicyRequest, ListPoliciesRequest, Policy};
use ledger_testkit::client::{
    Client, assert_refused, delete, get, info, insert, next, next_change, stream, until_caught_up,
};
use ledger_testkit::{Master, PostgresServer, ledger_digest, within};
use tonic::Code;
use tonic::transport::Channel;

/// A master on a fresh database of `backend`, in its own directory.
struct Fixture {
    master: Master,
    _dir: tempfile::TempDir,
}

fn start(backend: &str, args: &[&str]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    match backend {
        // No --database-url: the default is blockchain.db in the working directory.
        "sqlite" => {}
        "postgres" => {
            all.push("--database-url".into());
            all.push(PostgresServer::get().create_database());
        }
        other => panic!("unknown backend {other}"),
    }
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let master = Master::start(dir.path(), &all);
    if backend == "sqlite" {
        assert!(dir.path().join("blockchain.db").exists());
    }
    Fixture { master, _dir: dir }
}

fn operator(n: usize) -> String {
    format!(
        r#"{{"operator": {{"name": "op{n}", "company": "{}", "ip": "10.0.0.{}", "port": {}}}}}"#,
        if n.is_multiple_of(2) { "Acme" } else { "Lit" },
        n % 250,
        32148 + n % 3
    )
}

async fn list_all(
    client: &mut Client,
    policy_type: &str,
    conditions: &[(&str, &str)],
) -> Vec<Policy> {
    let mut policies = Vec::new();
    let mut token = String::new();
    loop {
        let page = within(
            30,
            "ListPolicies",
            client.list_policies(ListPoliciesRequest {
                r#type: policy_type.to_string(),
                conditions: conditions
                    .iter()
                    .map(|(k, v)| Condition {
                        key: k.to_string(),
                        value: v.to_string(),
                    })
                    .collect(),
                page_size: 3,
                page_token: token,
            }),
        )
        .await
        .unwrap()
        .into_inner();
        assert!(page.policies.len() <= 3);
        policies.extend(page.policies);
        if page.next_page_token.is_empty() {
            return policies;
        }
        token = page.next_page_token;
    }
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name("sqlite").await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name("postgres").await })*
        }
    };
}

on_both_backends!(
    insert_completes_the_policy_and_get_returns_it,
    duplicate_id_is_already_exists_and_changes_nothing,
    bad_input_is_invalid_argument_and_changes_nothing,
    delete_removes_and_unknown_id_is_not_found,
    list_filters_by_type_and_attributes_and_pages,
    info_digest_is_the_md5_of_the_member_file,
    stream_from_zero_sends_a_snapshot_then_live_changes,
    stream_resumes_from_a_middle_seq,
    concurrent_inserts_reach_a_stream_without_gap_or_duplicate,
    slow_subscriber_is_disconnected_without_stalling_inserts,
    kill_9_loses_no_acknowledged_insert_and_streams_resume,
    sigterm_ends_streams_and_exits_zero,
    pruned_history_gets_a_reset,
    idle_streams_get_progress,
    self_registration_inserts_the_master_policy_once,
    the_digest_is_read_whole_once_and_extended_by_inserts,
);

async fn insert_completes_the_policy_and_get_returns_it(backend: &str) {
    let fx = start(backend, &[]);
    let mut client = fx.master.client().await;
    // A vector from AnyLog's own id computation (tests/data/policy-ids.jsonl).
    let input = r#"{"table": {"dbms": "monitoring", "name": "rand_data", "create": "CREATE TABLE IF NOT EXISTS t (ts TIMESTAMP, v FLOAT)"}}"#;
    let policy = insert(&mut client, input).await.unwrap();
    assert_eq!(policy.id, "baf0fe3bb314c6f2a781430cfa174a92");
    assert_eq!(policy.r#type, "table");
    assert_eq!(policy.seq, 1);
    let body: serde_json::Value = serde_json::from_str(&policy.json).unwrap();
    let keys: Vec<&str> = body["table"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["dbms", "name", "create", "id", "date", "ledger"]);
    assert_eq!(body["table"]["ledger"], "global");
    assert!(
        policy
            .json
            .starts_with(r#"{"table": {"dbms": "monitoring", "name": "rand_data""#)
    );

    let got = get(&mut client, &policy.id).await.unwrap();
    assert_eq!(got, policy);
    let missing = within(
        30,
        "GetPolicy",
        client.get_policy(GetPolicyRequest { id: "nope".into() }),
    )
    .await
    .unwrap_err();
    assert_refused(
        &missing,
        Reason::PolicyNotFound,
        &[(key::POLICY_ID, "nope")],
    );

    // A policy with both an id and a date is complete: stored exactly as sent, key order and
    // all, as EdgeLake's completion keeps it.
    let complete = r#"{"operator": {"date": "2026-01-01T00:00:00.000000Z", "name": "x", "id": "my-id", "status": "active"}}"#;
    let given = insert(&mut client, complete).await.unwrap();
    assert_eq!(given.id, "my-id");
    assert_eq!(given.json, complete);
    // An id without a date is completed around it.
    let given = insert(&mut client, r#"{"operator": {"name": "y", "id": "id-2"}}"#)
        .await
        .unwrap();
    assert_eq!(given.id, "id-2");
    assert!(
        given
            .json
            .starts_with(r#"{"operator": {"name": "y", "id": "id-2", "date": ""#)
            && given.json.ends_with(r#"Z", "ledger": "global"}}"#),
        "{}",
        given.json
    );
}

async fn duplicate_id_is_already_exists_and_changes_nothing(backend: &str) {
    let fx = start(backend, &[]);
    let mut client = fx.master.client().await;
    let first = insert(&mut client, &operator(1)).await.unwrap();
    let before = info(&mut client).await;
    let again = insert(&mut client, &operator(1)).await.unwrap_err();
    assert_refused(&again, Reason::PolicyExists, &[(key::POLICY_ID, &first.id)]);
    assert_eq!(info(&mut client).await, before);
    // The next insert takes the next seq: the rejected one took none.
    assert_eq!(insert(&mut client, &operator(2)).await.unwrap().seq, 2);
}

async fn bad_input_is_invalid_argument_and_changes_nothing(backend: &str) {
    let fx = start(backend, &[]);
    let mut client = fx.master.client().await;
    insert(&mut client, &operator(1)).await.unwrap();
    let before = info(&mut client).await;
    // The problem is in the refusal's metadata; invalid JSON also says where.
    let cases: [(&str, &[(&str, &str)]); 9] = [
        (
            r#"{"operator": {"name": "#,
            &[
                (key::PROBLEM, "INVALID_JSON"),
                (key::LINE, "1"),
                (key::COLUMN, "22"),
            ],
        ),
        (
            r#"[{"operator": {}}]"#,
            &[(key::PROBLEM, "WRONG_STRUCTURE")],
        ),
        ("42", &[(key::PROBLEM, "WRONG_STRUCTURE")]),
        (
            r#"{"a": {}, "b": {}}"#,
            &[(key::PROBLEM, "WRONG_STRUCTURE")],
        ),
        (
            r#"{"operator": [1, 2]}"#,
            &[(key::PROBLEM, "BODY_NOT_OBJECT")],
        ),
        (r#"{"operator": "x"}"#, &[(key::PROBLEM, "BODY_NOT_OBJECT")]),
        (r#"{"": {"name": "x"}}"#, &[(key::PROBLEM, "EMPTY_TYPE")]),
        (
            r#"{"operator": {"id": 5}}"#,
            &[(key::PROBLEM, "INVALID_ID")],
        ),
        (
            r#"{"operator": {"n": 1e400}}"#,
            &[(key::PROBLEM, "NUMBER_OUT_OF_RANGE")],
        ),
    ];
    for (input, metadata) in cases {
        let status = insert(&mut client, input).await.unwrap_err();
        assert_refused(&status, Reason::PolicyInvalid, metadata);
    }
    let empty = delete(&mut client, "").await.unwrap_err();
    assert_refused(&empty, Reason::PolicyIdEmpty, &[]);
    assert_eq!(info(&mut client).await, before);
}

async fn delete_removes_and_unknown_id_is_not_found(backend: &str) {
    let fx = start(backend, &[]);
    let mut client = fx.master.client().await;
    let a = insert(&mut client, &operator(1)).await.unwrap();
    let b = insert(&mut client, &operator(2)).await.unwrap();
    assert_eq!(delete(&mut client, &a.id).await.unwrap(), 3);
    let gone = delete(&mut client, &a.id).await.unwrap_err();
    assert_refused(&gone, Reason::PolicyNotFound, &[(key::POLICY_ID, &a.id)]);
    let unknown = delete(&mut client, "no-such-id").await.unwrap_err();
    assert_refused(
        &unknown,
        Reason::PolicyNotFound,
        &[(key::POLICY_ID, "no-such-id")],
    );
    let ledger = info(&mut client).await;
    assert_eq!((ledger.head_seq, ledger.policy_count), (3, 1));
    assert_eq!(ledger.digest, ledger_digest([b.json.as_str()]));
    // Deleted, it can be inserted again, at the end of the ledger.
    let again = insert(&mut client, &operator(1)).await.unwrap();
    assert_eq!((again.id.as_str(), again.seq), (a.id.as_str(), 4));
}

async fn list_filters_by_type_and_attributes_and_pages(backend: &str) {
    let fx = start(backend, &[]);
    let mut client = fx.master.client().await;
    for n in 1..=8 {
        insert(&mut client, &operator(n)).await.unwrap();
    }
    insert(
        &mut client,
        r#"{"table": {"name": "t1", "dbms": "d", "company": "Acme"}}"#,
    )
    .await
    .unwrap();
    let all = list_all(&mut client, "", &[]).await;
    assert_eq!(all.len(), 9);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(list_all(&mut client, "operator", &[]).await.len(), 8);
    let acme = list_all(&mut client, "operator", &[("company", "Acme")]).await;
    assert_eq!(acme.iter().map(|p| p.seq).collect::<Vec<_>>(), [2, 4, 6, 8]);
    // Non-string attributes match their JSON text.
    let port = list_all(&mut client, "operator", &[("port", "32149")]).await;
    assert_eq!(port.iter().map(|p| p.seq).collect::<Vec<_>>(), [1, 4, 7]);
    let both = list_all(&mut client, "", &[("company", "Acme"), ("port", "32149")]).await;
    assert_eq!(both.iter().map(|p| p.seq).collect::<Vec<_>>(), [4]);
    assert!(list_all(&mut client, "cluster", &[]).await.is_empty());
    let bad = within(
        30,
        "ListPolicies",
        client.list_policies(ListPoliciesRequest {
            page_token: "garbage".into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap_err();
    assert_refused(&bad, Reason::PageTokenInvalid, &[]);
}

async fn info_digest_is_the_md5_of_the_member_file(backend: &str) {
    let fx = start(backend, &[]);
    let mut client = fx.master.client().await;
    let empty = info(&mut client).await;
    assert_eq!((empty.head_seq, empty.policy_count), (0, 0));
    assert_eq!(empty.digest, "d41d8cd98f00b204e9800998ecf8427e");
    let mut lines = Vec::new();
    for n in 1..=5 {
        lines.push(insert(&mut client, &operator(n)).await.unwrap().json);
    }
    let second = list_all(&mut client, "", &[]).await[1].id.clone();
    delete(&mut client, &second).await.unwrap();
    lines.remove(1);
    let ledger = info(&mut client).await;
    assert_eq!((ledger.head_seq, ledger.policy_count), (6, 4));
    assert_eq!(
        ledger.digest,
        ledger_digest(lines.iter().map(String::as_str))
    );
    // Asked again with no change in between: the same answer.
    assert_eq!(info(&mut client).await, ledger);
}

async fn stream_from_zero_sends_a_snapshot_then_live_changes(backend: &str) {
    let fx = start(backend, &[]);
    let mut client = fx.master.client().await;
    let mut policies = Vec::new();
    for n in 1..=5 {
        policies.push(insert(&mut client, &operator(n)).await.unwrap());
    }
    delete(&mut client, &policies[0].id).await.unwrap();
    let mut events = stream(&mut client, 0).await;
    let reset = next(&mut events).await.unwrap();
    match reset.event {
        Some(Event::Reset(r)) => assert_eq!((r.snapshot_seq, r.policy_count, reset.seq), (6, 4, 6)),
        other => panic!("expected a reset first, got {other:?}"),
    }
    let (snapshot, caught_up) = until_caught_up(&mut events).await;
    assert_eq!(caught_up, 6);
    let lines: Vec<String> = snapshot
        .iter()
        .map(|e| match &e.event {
            Some(Event::Inserted(p)) => {
                assert_eq!(e.seq, p.seq);
                p.json.clone()
            }
            other => panic!("expected only inserts in a snapshot, got {other:?}"),
        })
        .collect();
    assert_eq!(
        ledger_digest(lines.iter().map(String::as_str)),
        info(&mut client).await.digest
    );

    // Live: each change with the next seq, in commit order.
    let live = insert(&mut client, &operator(6)).await.unwrap();
    let event = next_change(&mut events).await;
    assert_eq!(event.seq, 7);
    assert_eq!(event.event, Some(Event::Inserted(live.clone())));
    delete(&mut client, &live.id).await.unwrap();
    let event = next_change(&mut events).await;
    assert_eq!(
        (event.seq, event.event),
        (8, Some(Event::DeletedId(live.id)))
    );
}

async fn stream_resumes_from_a_middle_seq(backend: &str) {
    let fx = start(backend, &[]);
    let mut client = fx.master.client().await;
    let mut policies = Vec::new();
    for n in 1..=6 {
        policies.push(insert(&mut client, &operator(n)).await.unwrap());
    }
    delete(&mut client, &policies[1].id).await.unwrap(); // seq 7
    let mut events = stream(&mut client, 4).await;
    let (replayed, caught_up) = until_caught_up(&mut events).await;
    assert_eq!(caught_up, 7);
    assert_eq!(
        replayed.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [5, 6, 7],
        "exactly the changes after 4"
    );
    assert_eq!(
        replayed[0].event,
        Some(Event::Inserted(policies[4].clone()))
    );
    assert_eq!(
        replayed[2].event,
        Some(Event::DeletedId(policies[1].id.clone()))
    );
    // At the head: nothing to replay.
    let mut at_head = stream(&mut client, 7).await;
    let (nothing, caught_up) = until_caught_up(&mut at_head).await;
    assert!(nothing.is_empty());
    assert_eq!(caught_up, 7);
    // Which reads nothing from the database (issue 16), and still gets the next change.
    let next_policy = insert(&mut client, &operator(7)).await.unwrap();
    let event = next_change(&mut at_head).await;
    assert_eq!(
        (event.seq, event.event),
        (8, Some(Event::Inserted(next_policy)))
    );
    // Beyond the head (another ledger's seq): a reset, not a silent gap.
    let mut beyond = stream(&mut client, 1000).await;
    assert!(matches!(
        next(&mut beyond).await.unwrap().event,
        Some(Event::Reset(_))
    ));
}

async fn concurrent_inserts_reach_a_stream_without_gap_or_duplicate(backend: &str) {
    let fx = start(backend, &[]);
    let mut client = fx.master.client().await;
    for n in 0..20 {
        insert(&mut client, &operator(n)).await.unwrap();
    }
    let mut events = stream(&mut client, 10).await;
    let (replayed, caught_up) = until_caught_up(&mut events).await;
    assert_eq!(replayed.len(), 10);
    assert_eq!(caught_up, 20);

    let (tasks, per_task) = (16, 40);
    let writers: Vec<_> = (0..tasks)
        .map(|t| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..per_task {
                    let json = format!(r#"{{"config": {{"writer": {t}, "n": {i}}}}}"#);
                    ids.push(insert(&mut client, &json).await.unwrap().id);
                }
                ids
            })
        })
        .collect();
    // A second subscriber joins in the middle of the burst, from 0.
    let mut late = stream(&mut client, 0).await;
    let mut acknowledged = BTreeSet::new();
    for writer in writers {
        acknowledged.extend(within(120, "writers", writer).await.unwrap());
    }
    let total = tasks * per_task;
    assert_eq!(acknowledged.len(), total);

    let mut seen = BTreeSet::new();
    let mut expected_seq = 21;
    while seen.len() < total {
        let event = next_change(&mut events).await;
        assert_eq!(event.seq, expected_seq, "a gap or a duplicate");
        expected_seq += 1;
        match event.event {
            Some(Event::Inserted(p)) => assert!(seen.insert(p.id), "duplicate"),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, acknowledged);

    // The late subscriber's snapshot plus its live changes is the whole ledger, each once.
    let mut late_ids = BTreeSet::new();
    let mut last = 0;
    loop {
        let event = next(&mut late).await.unwrap();
        match event.event {
            Some(Event::Inserted(p)) => {
                assert!(late_ids.insert(p.id), "duplicate in the late stream");
                if last > 0 {
                    assert_eq!(event.seq, last + 1, "a gap after caught_up");
                    last = event.seq;
                }
            }
            Some(Event::CaughtUp(_)) => last = event.seq,
            Some(Event::Reset(_)) | Some(Event::Progress(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
        if late_ids.len() == 20 + total {
            break;
        }
    }
    let ledger = info(&mut client).await;
    assert_eq!(ledger.policy_count as usize, 20 + total);
}

async fn slow_subscriber_is_disconnected_without_stalling_inserts(backend: &str) {
    let fx = start(backend, &["--subscriber-buffer", "16"]);
    let mut client = fx.master.client().await;
    // Its own connection, as a real member has (on a shared connection the unread stream would
    // hold the connection's flow-control window and block the writers' calls), with small HTTP/2
    // windows so that what the transport buffers is far less than what the writers insert.
    let channel = tonic::transport::Endpoint::from_shared(fx.master.url())
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut slow = stream(&mut LedgerServiceClient::new(channel), 0).await;
    let (_, caught_up) = until_caught_up(&mut slow).await;
    assert_eq!(caught_up, 0);
    // The subscriber stops reading; 1,500 inserts must still complete.
    let writers: Vec<_> = (0..10)
        .map(|t| {
            let mut client = client.clone();
            tokio::spawn(async move {
                for i in 0..150 {
                    let json = format!(
                        r#"{{"config": {{"writer": {t}, "n": {i}, "pad": "{}"}}}}"#,
                        "x".repeat(200)
                    );
                    insert(&mut client, &json).await.unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        within(120, "inserts while a subscriber does not read", writer)
            .await
            .unwrap();
    }
    // Reading again: what was buffered, then the status that says it fell behind.
    let mut last = 0;
    let status = loop {
        match next(&mut slow).await {
            Ok(event) => match event.event {
                Some(Event::Inserted(_)) => {
                    assert_eq!(event.seq, last + 1);
                    last = event.seq;
                }
                Some(Event::Progress(_)) => panic!(
                    "idle after seq {last}: the subscriber kept up and was never disconnected"
                ),
                other => panic!("unexpected {other:?}"),
            },
            Err(status) => break status,
        }
    };
    // It is told to resume after the last change it was sent.
    assert_refused(
        &status,
        Reason::SubscriberLagged,
        &[(key::RESUME_AFTER, &last.to_string())],
    );
    assert!(last < 1500, "it was disconnected before the end");
    // It resumes from its seq and gets the rest, with no gap.
    let mut resumed = stream(&mut client, last).await;
    let (rest, caught_up) = until_caught_up(&mut resumed).await;
    assert_eq!(caught_up, 1500);
    assert_eq!(
        rest.iter().map(|e| e.seq).collect::<Vec<_>>(),
        ((last + 1)..=1500).collect::<Vec<_>>()
    );
}

async fn kill_9_loses_no_acknowledged_insert_and_streams_resume(backend: &str) {
    let mut fx = start(backend, &[]);
    let mut client = fx.master.client().await;
    let mut open = stream(&mut client, 0).await;
    until_caught_up(&mut open).await;
    let writers: Vec<_> = (0..8)
        .map(|t| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..25 {
                    let json = format!(r#"{{"config": {{"writer": {t}, "n": {i}}}}}"#);
                    ids.push(insert(&mut client, &json).await.unwrap().id);
                }
                ids
            })
        })
        .collect();
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(within(120, "writers", writer).await.unwrap());
    }
    // Read part of the stream, then kill the master right after the last acknowledgement.
    let mut last = 0;
    for _ in 0..50 {
        last = next_change(&mut open).await.seq;
    }
    fx.master.kill9();
    let cut = loop {
        match within(30, "the stream to break", open.message()).await {
            Ok(Some(_)) => {}
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    assert!(cut.is_none() || cut.is_some_and(|s| s.code() != Code::Ok));

    fx.master.restart();
    let mut client = fx.master.client().await;
    let ledger = info(&mut client).await;
    assert_eq!((ledger.head_seq, ledger.policy_count), (200, 200));
    for id in &acknowledged {
        within(
            30,
            "GetPolicy",
            client.get_policy(GetPolicyRequest { id: id.clone() }),
        )
        .await
        .unwrap_or_else(|e| panic!("acknowledged policy {id} lost: {e:?}"));
    }
    // The stream resumes from where it was cut.
    let mut resumed = stream(&mut client, last).await;
    let (rest, caught_up) = until_caught_up(&mut resumed).await;
    assert_eq!(caught_up, 200);
    assert_eq!(
        rest.iter().map(|e| e.seq).collect::<Vec<_>>(),
        ((last + 1)..=200).collect::<Vec<_>>()
    );
    // And the restarted master takes new writes after the old head.
    assert_eq!(insert(&mut client, &operator(1)).await.unwrap().seq, 201);
}

async fn sigterm_ends_streams_and_exits_zero(backend: &str) {
    let mut fx = start(backend, &[]);
    let mut client = fx.master.client().await;
    insert(&mut client, &operator(1)).await.unwrap();
    let mut open = stream(&mut client, 0).await;
    until_caught_up(&mut open).await;
    let master = std::thread::spawn(move || {
        let status = fx.master.terminate();
        (status, fx)
    });
    let ended = loop {
        match within(30, "the stream to end on SIGTERM", open.message()).await {
            Ok(Some(_)) => {}
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    let status = ended.expect("the stream ends with a status");
    assert_refused(&status, Reason::ShuttingDown, &[]);
    let (exit, fx) = master.join().unwrap();
    assert!(
        exit.success(),
        "master exited with {exit}:\n{}",
        fx.master.logs()
    );
    assert!(fx.master.logs().contains("stopped"));
}

async fn pruned_history_gets_a_reset(backend: &str) {
    let fx = start(backend, &["--change-retention", "4"]);
    let mut client = fx.master.client().await;
    for n in 1..=20 {
        insert(&mut client, &operator(n)).await.unwrap();
    }
    let ledger = info(&mut client).await;
    assert!(ledger.oldest_replayable_seq >= 12, "{ledger:?}");
    let mut old = stream(&mut client, 2).await;
    let first = next(&mut old).await.unwrap();
    assert!(matches!(first.event, Some(Event::Reset(_))), "{first:?}");
    let (snapshot, caught_up) = until_caught_up(&mut old).await;
    assert_eq!((snapshot.len(), caught_up), (20, 20));
    let mut recent = stream(&mut client, 19).await;
    let (replayed, _) = until_caught_up(&mut recent).await;
    assert_eq!(replayed.iter().map(|e| e.seq).collect::<Vec<_>>(), [20]);
}

async fn idle_streams_get_progress(backend: &str) {
    let fx = start(backend, &["--progress-interval", "200ms"]);
    let mut client = fx.master.client().await;
    insert(&mut client, &operator(1)).await.unwrap();
    let mut events = stream(&mut client, 0).await;
    until_caught_up(&mut events).await;
    let started = std::time::Instant::now();
    let event = next(&mut events).await.unwrap();
    assert_eq!(
        event.event,
        Some(Event::Progress(ledger_proto::pb::Progress { head_seq: 1 }))
    );
    assert_eq!(event.seq, 1);
    assert!(started.elapsed() >= Duration::from_millis(150));
}

async fn self_registration_inserts_the_master_policy_once(backend: &str) {
    let mut fx = start(
        backend,
        &[
            "--register",
            "--name",
            "m1",
            "--company",
            "Acme",
            "--rest-port",
            "32049",
        ],
    );
    let mut client = fx.master.client().await;
    let masters = list_all(&mut client, "master", &[]).await;
    assert_eq!(masters.len(), 1);
    let body: serde_json::Value = serde_json::from_str(&masters[0].json).unwrap();
    let master = &body["master"];
    assert_eq!(master["name"], "m1");
    assert_eq!(master["company"], "Acme");
    // Bound to one address: ip is that address and there is no local_ip.
    assert_eq!(master["ip"], "127.0.0.1");
    assert_eq!(master["port"], fx.master.addr.port());
    assert_eq!(master["rest_port"], 32049);
    assert!(master.get("local_ip").is_none());
    // A restart finds its id and inserts nothing.
    fx.master.terminate();
    fx.master.restart();
    let mut client = fx.master.client().await;
    assert_eq!(info(&mut client).await.head_seq, 1);
    assert!(fx.master.logs().contains("already registered"));
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let fx = start("sqlite", &[]);
    let channel = Channel::from_shared(fx.master.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "ledger.v1.LedgerService"] {
        let status = within(
            30,
            "health check",
            health.check(HealthCheckRequest {
                service: service.into(),
            }),
        )
        .await
        .unwrap()
        .into_inner()
        .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = within(
        30,
        "reflection",
        reflection.server_reflection_info(tokio_stream::iter([request])),
    )
    .await
    .unwrap()
    .into_inner();
    let answer = within(30, "reflection answer", answers.message())
        .await
        .unwrap()
        .unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("unexpected reflection answer {answer:?}");
    };
    let names: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["ledger.v1.LedgerService", "grpc.health.v1.Health"] {
        assert!(
            names.contains(expected),
            "{expected} missing from {names:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_at_the_clients_deadline() {
    let fx = start("sqlite", &[]);
    let mut client = fx.master.client().await;
    insert(&mut client, &operator(1)).await.unwrap();
    let mut request = tonic::Request::new(ledger_proto::pb::StreamLedgerRequest {
        after_seq: 0,
        subscriber: None,
    });
    request.set_timeout(Duration::from_millis(500));
    let mut events = within(30, "StreamLedger", client.stream_ledger(request))
        .await
        .unwrap()
        .into_inner();
    let status = loop {
        match next(&mut events).await {
            Ok(_) => {}
            Err(status) => break status,
        }
    };
    assert_refused(
        &status,
        Reason::DeadlineExceeded,
        &[(key::TIMEOUT_MS, "500")],
    );
    // The master goes on serving.
    assert_eq!(insert(&mut client, &operator(2)).await.unwrap().seq, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_survive_keepalive_pings_both_ways() {
    // Pings from both ends every few hundred milliseconds, and no progress messages: the
    // connection carries nothing but pings while the stream is idle.
    let fx = start(
        "sqlite",
        &[
            "--keepalive-interval",
            "300ms",
            "--keepalive-timeout",
            "2s",
            "--progress-interval",
            "1h",
        ],
    );
    let channel = tonic::transport::Endpoint::from_shared(fx.master.url())
        .unwrap()
        .http2_keep_alive_interval(Duration::from_millis(200))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .unwrap();
    let mut idle = LedgerServiceClient::new(channel);
    let mut events = stream(&mut idle, 0).await;
    until_caught_up(&mut events).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut writer = fx.master.client().await;
    let policy = insert(&mut writer, &operator(1)).await.unwrap();
    let event = next_change(&mut events).await;
    assert_eq!(event.event, Some(Event::Inserted(policy)));
    // The pinging client is still welcome (no GOAWAY for too many pings).
    assert_eq!(info(&mut idle).await.head_seq, 1);
}

/// `GetLedgerInfo` does not read the whole ledger again when the head moved by inserts (the
/// digest's md5 state is extended by their lines), and concurrent callers share one read when
/// one is needed (after a delete). Counted by `ledger_digest_full_reads_total` (issue 15,
/// point 6).
async fn the_digest_is_read_whole_once_and_extended_by_inserts(backend: &str) {
    use ledger_testkit::metrics::{sample, scrape_async};
    let fx = start(backend, &["--metrics-addr", "127.0.0.1:0"]);
    let port = fx.master.metrics_port();
    let full_reads = || async {
        sample(&scrape_async(port).await, "ledger_digest_full_reads_total").unwrap_or(0.0)
    };
    let mut client = fx.master.client().await;
    let mut lines = Vec::new();
    for n in 0..300 {
        lines.push(insert(&mut client, &operator(n)).await.unwrap().json);
    }
    let digest_of = |lines: &[String]| ledger_digest(lines.iter().map(String::as_str));
    assert_eq!(info(&mut client).await.digest, digest_of(&lines));
    assert_eq!(full_reads().await, 1.0);
    // Inserts move the head: the digest follows them without a full read.
    for n in 300..320 {
        lines.push(insert(&mut client, &operator(n)).await.unwrap().json);
        if n % 5 == 0 {
            assert_eq!(info(&mut client).await.digest, digest_of(&lines));
        }
    }
    let concurrent = |client: &Client| {
        let calls: Vec<_> = (0..50)
            .map(|_| {
                let mut client = client.clone();
                tokio::spawn(async move { info(&mut client).await.digest })
            })
            .collect();
        async move {
            let mut digests = BTreeSet::new();
            for call in calls {
                digests.insert(call.await.unwrap());
            }
            digests
        }
    };
    lines.push(insert(&mut client, &operator(999)).await.unwrap().json);
    assert_eq!(
        concurrent(&client).await,
        BTreeSet::from([digest_of(&lines)])
    );
    assert_eq!(full_reads().await, 1.0, "inserts took a full read");
    // A delete takes one full read, however many callers ask at once.
    let gone = lines.remove(7);
    let id = serde_json::from_str::<serde_json::Value>(&gone).unwrap()["operator"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    delete(&mut client, &id).await.unwrap();
    assert_eq!(
        concurrent(&client).await,
        BTreeSet::from([digest_of(&lines)])
    );
    assert_eq!(
        full_reads().await,
        2.0,
        "one full read for 50 callers after a delete"
    );
}
