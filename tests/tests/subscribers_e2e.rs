//! Subscribers are known (issue 19, point 1), end to end: the real `master` as a root and as a
//! relay (`master --upstream`), real `member`s under both with `--node-name`, and the root's
//! `ListSubscribers`, `member status --all` and metrics; hostile `ReportProgress` calls.

use std::time::Duration;

use ledger_proto::errors::{Reason, key};
use ledger_proto::pb;
use ledger_proto::pb::ledger_service_client::LedgerServiceClient;
use ledger_testkit::client::{assert_refused, insert_ok as insert};
use ledger_testkit::member::member_command;
use ledger_testkit::metrics::scrape_async;
use ledger_testkit::{Master, Member, wait_until};
use tonic::transport::Channel;

type Client = LedgerServiceClient<Channel>;

fn operator(n: usize) -> String {
    format!(r#"{{"operator": {{"name": "op{n}", "company": "Acme", "port": {n}}}}}"#)
}

async fn list(client: &mut Client) -> pb::ListSubscribersResponse {
    client
        .list_subscribers(pb::ListSubscribersRequest {})
        .await
        .expect("ListSubscribers")
        .into_inner()
}

fn find<'a>(list: &'a pb::ListSubscribersResponse, node: &str) -> Option<&'a pb::SubscriberStatus> {
    list.subscribers.iter().find(|s| s.node_name == node)
}

/// Sends a signal to a process by its id (`kill -SIG PID`).
fn kill(signal: &str, pid: u32) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill {signal} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_master_knows_every_subscriber_of_the_tree() {
    let dirs: Vec<tempfile::TempDir> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let root = Master::start(dirs[0].path(), &["--metrics-addr", "127.0.0.1:0"]);
    let mut client = root.client().await;
    insert(&mut client, &operator(1)).await;
    let relay = Master::start_relay(
        dirs[1].path(),
        &[root.addr.to_string()],
        &["--node-name", "relay-a"],
    );
    let root_addr = root.addr.to_string();
    let relay_addr = relay.addr.to_string();
    let mut direct = Member::start(
        dirs[2].path(),
        std::slice::from_ref(&root_addr),
        &["--node-name", "m-direct"],
    );
    let mut paused = Member::start(
        dirs[3].path(),
        std::slice::from_ref(&root_addr),
        &["--node-name", "m-paused"],
    );
    // The variable names it: flags and LEDGER_NODE_NAME are the same setting.
    let mut below = Member::start_with_env(
        dirs[4].path(),
        &[relay_addr],
        &[],
        &[("LEDGER_NODE_NAME", "m-below")],
    );
    let head = insert(&mut client, &operator(2)).await.seq;

    // Every node of the tree, each durable at the head: the members' files and the relay's
    // copy, the relay's member named with the relay it is below.
    wait_until(30, "every subscriber durable at the head", || {
        let mut client = client.clone();
        async move {
            let list = list(&mut client).await;
            ["m-direct", "m-paused", "m-below", "relay-a"]
                .iter()
                .all(|node| find(&list, node).is_some_and(|s| s.durable_seq == head && s.lag == 0))
        }
    })
    .await;
    let listed = list(&mut client).await;
    assert_eq!(listed.head_seq, head);
    assert_eq!(listed.subscribers.len(), 4, "{listed:?}");
    for node in ["m-direct", "m-paused"] {
        let s = find(&listed, node).unwrap();
        assert_eq!(s.via, "", "{s:?}");
        assert!(s.version.starts_with("member "), "{s:?}");
        assert!(s.peer.starts_with("127.0.0.1:"), "{s:?}");
        assert_eq!(s.identity, "", "no auth file: no identity ({s:?})");
        assert!(s.sent_seq >= head && s.bytes_sent > 0, "{s:?}");
        let now_ms = chrono::Utc::now().timestamp_millis();
        assert!(
            s.since_unix_ms > now_ms - 120_000 && s.since_unix_ms <= now_ms,
            "{s:?}"
        );
    }
    let relay_a = find(&listed, "relay-a").unwrap();
    assert!(
        (relay_a.via.as_str(), relay_a.version.starts_with("master ")) == ("", true),
        "{relay_a:?}"
    );
    let m_below = find(&listed, "m-below").unwrap();
    assert_eq!(m_below.via, "relay-a", "{m_below:?}");
    assert!(m_below.version.starts_with("member "), "{m_below:?}");
    // The relay lists it too, as its own (direct) subscriber.
    let mut relay_client = relay.client().await;
    let on_relay = list(&mut relay_client).await;
    assert_eq!(
        on_relay
            .subscribers
            .iter()
            .map(|s| (s.node_name.as_str(), s.via.as_str()))
            .collect::<Vec<_>>(),
        [("m-below", "")]
    );

    // A member that stops (SIGSTOP) keeps its stream open and its durable seq where it was:
    // its lag grows with each insert, while the others keep up.
    kill("-STOP", paused.pid());
    let mut last = head;
    for n in 3..6 {
        last = insert(&mut client, &operator(n)).await.seq;
    }
    wait_until(
        30,
        "the others at the new head, the stopped member behind",
        || {
            let mut client = client.clone();
            async move {
                let list = list(&mut client).await;
                let at_head = ["m-direct", "m-below", "relay-a"]
                    .iter()
                    .all(|node| find(&list, node).is_some_and(|s| s.durable_seq == last));
                at_head
                    && find(&list, "m-paused")
                        .is_some_and(|s| s.durable_seq == head && s.lag == last - head)
            }
        },
    )
    .await;

    // The operator's table, the largest lag first.
    let output = member_command(&["status", "--all", "--master", &root_addr], None).await;
    assert_eq!(output.code, Some(0), "{output:?}");
    let lines: Vec<&str> = output.stdout.lines().collect();
    assert_eq!(
        lines[0],
        format!("master {root_addr} head_seq {last} subscribers 4"),
        "{}",
        output.stdout
    );
    let header: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "node", "via", "peer", "identity", "since", "sent", "durable", "lag", "bytes"
        ]
    );
    let rows: Vec<Vec<&str>> = lines[2..]
        .iter()
        .map(|line| line.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 4, "{}", output.stdout);
    assert_eq!(rows[0][0], "m-paused", "{}", output.stdout);
    assert_eq!(
        (rows[0][6], rows[0][7]),
        (
            head.to_string().as_str(),
            (last - head).to_string().as_str()
        )
    );
    let row_below = rows.iter().find(|row| row[0] == "m-below").unwrap();
    assert_eq!((row_below[1], row_below[3]), ("relay-a", "-"));
    assert!(rows.iter().all(|row| row.len() == 9), "{}", output.stdout);
    kill("-CONT", paused.pid());
    wait_until(30, "the member that went on to catch up", || {
        let mut client = client.clone();
        async move { find(&list(&mut client).await, "m-paused").is_some_and(|s| s.lag == 0) }
    })
    .await;

    // A member that stops is no longer listed, on the root nor (below a relay) through it.
    direct.terminate();
    below.terminate();
    wait_until(30, "stopped members gone from the list", || {
        let mut client = client.clone();
        async move {
            let list = list(&mut client).await;
            find(&list, "m-direct").is_none()
                && find(&list, "m-below").is_none()
                && find(&list, "relay-a").is_some()
        }
    })
    .await;
    paused.terminate();

    // Each report was observed in the lag histogram.
    let scraped = scrape_async(root.metrics_port()).await;
    let count = scraped
        .lines()
        .find_map(|line| line.strip_prefix("ledger_subscriber_lag_count "))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no ledger_subscriber_lag_count in\n{scraped}"));
    assert!(count >= 4, "{count}");
    assert!(
        scraped.contains("ledger_subscriber_lag_bucket{le=\"0\"}"),
        "{scraped}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_reports_get_precise_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), &[]);
    let mut client = master.client().await;

    let unknown = client
        .report_progress(pb::ReportProgressRequest {
            session_id: "nobody".into(),
            durable_seq: 1,
            downstream: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_refused(
        &unknown,
        Reason::SessionUnknown,
        &[(key::SESSION_ID, "nobody")],
    );

    // A subscriber whose name is too long is refused before its stream opens.
    let long_name = client
        .stream_ledger(pb::StreamLedgerRequest {
            after_seq: 0,
            subscriber: Some(pb::SubscriberIdentity {
                node_name: "n".repeat(257),
                version: String::new(),
                session_id: "s".into(),
            }),
        })
        .await
        .unwrap_err();
    assert_refused(
        &long_name,
        Reason::FieldTooLong,
        &[
            (key::FIELD, "subscriber.node_name"),
            (key::LIMIT_BYTES, "256"),
        ],
    );

    let _stream = client
        .stream_ledger(pb::StreamLedgerRequest {
            after_seq: 0,
            subscriber: Some(pb::SubscriberIdentity {
                node_name: "relay-x".into(),
                version: "test".into(),
                session_id: "session-1".into(),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let report = |downstream: Vec<pb::SubscriberStatus>| pb::ReportProgressRequest {
        session_id: "session-1".into(),
        durable_seq: 0,
        downstream,
    };
    let too_many = client
        .report_progress(report(vec![pb::SubscriberStatus::default(); 10_001]))
        .await
        .unwrap_err();
    assert_refused(
        &too_many,
        Reason::TooManySubscribers,
        &[(key::COUNT, "10001"), (key::LIMIT, "10000")],
    );
    let long_peer = client
        .report_progress(report(vec![pb::SubscriberStatus {
            peer: "p".repeat(10_000),
            ..Default::default()
        }]))
        .await
        .unwrap_err();
    assert_refused(
        &long_peer,
        Reason::FieldTooLong,
        &[(key::FIELD, "downstream.peer"), (key::LIMIT_BYTES, "256")],
    );
    // Nothing refused was kept; a good report is.
    assert_eq!(list(&mut client).await.subscribers.len(), 1);
    client
        .report_progress(report(vec![pb::SubscriberStatus {
            node_name: "m-far".into(),
            ..Default::default()
        }]))
        .await
        .unwrap();
    let listed = list(&mut client).await;
    assert_eq!(
        find(&listed, "m-far").map(|s| s.via.as_str()),
        Some("relay-x")
    );
    // The stream ends: its session and what it reported go.
    drop(_stream);
    wait_until(10, "the closed stream gone", || {
        let mut client = client.clone();
        async move { list(&mut client).await.subscribers.is_empty() }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let gone = client
        .report_progress(report(Vec::new()))
        .await
        .unwrap_err();
    assert_refused(
        &gone,
        Reason::SessionUnknown,
        &[(key::SESSION_ID, "session-1")],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_auth_file_subscribers_show_who_they_are_to_readers_only() {
    use ledger_testkit::auth::AuthFile;
    use ledger_testkit::member::member_command_with_env;
    use ledger_testkit::tls::with_token;
    const READER: &str = "reader-secret-1";
    let dir = tempfile::tempdir().unwrap();
    let auth = AuthFile::new()
        .token("edge-reader", "reader", READER)
        .write(&dir.path().join("auth.toml"));
    let master = Master::start(dir.path(), &["--auth-file", &auth]);
    let member_dir = tempfile::tempdir().unwrap();
    let _member = Member::start_with_env(
        member_dir.path(),
        &[master.addr.to_string()],
        &["--node-name", "m-auth"],
        &[("LEDGER_TOKEN", READER)],
    );
    let mut client = master.client().await;
    let anonymous = client
        .list_subscribers(pb::ListSubscribersRequest {})
        .await
        .unwrap_err();
    assert_refused(&anonymous, Reason::CredentialsMissing, &[]);
    let anonymous = client
        .report_progress(pb::ReportProgressRequest::default())
        .await
        .unwrap_err();
    assert_refused(&anonymous, Reason::CredentialsMissing, &[]);
    wait_until(30, "the member listed with its identity", || {
        let mut client = client.clone();
        async move {
            let list = client
                .list_subscribers(with_token(pb::ListSubscribersRequest {}, READER))
                .await
                .unwrap()
                .into_inner();
            find(&list, "m-auth").is_some_and(|s| s.identity == "edge-reader")
        }
    })
    .await;
    let addr = master.addr.to_string();
    let output = member_command_with_env(
        &["status", "--all", "--master", &addr],
        &[("LEDGER_TOKEN", READER)],
        None,
    )
    .await;
    assert_eq!(output.code, Some(0), "{output:?}");
    let row: Vec<&str> = output
        .stdout
        .lines()
        .nth(2)
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        (row[0], row[3]),
        ("m-auth", "edge-reader"),
        "{}",
        output.stdout
    );
    // Without the token the command says why, as the other commands do.
    let refused = member_command(&["status", "--all", "--master", &addr], None).await;
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(refused.stderr.contains("unauthenticated"), "{refused:?}");
}
