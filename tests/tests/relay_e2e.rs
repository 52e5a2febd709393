//! Relays end to end: the real `master` binary as a master and as relays (`master --upstream`,
//! each with its own SQLite database) chained over TCP on loopback, real `member`s below them,
//! and the real files and databases.

use std::path::Path;

use ledger_proto::pb;
use ledger_proto::pb::ledger_service_client::LedgerServiceClient;
use ledger_proto::pb::stream_ledger_response::Event;
use ledger_storage::DatabaseUrl;
use ledger_testkit::anylog::Node;
use ledger_testkit::auth::AuthFile;
use ledger_testkit::client::{delete_ok as delete, insert_ok as insert};
use ledger_testkit::member::wait_converged;
use ledger_testkit::metrics::{sample, scrape_async};
use ledger_testkit::sql::ledger_rows;
use ledger_testkit::tls::{CertFiles, TestPki, with_token};
use ledger_testkit::{Master, Member, PostgresServer, wait_until, within};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

type Client = LedgerServiceClient<Channel>;

/// How long a chain may take to converge: generous, since speed is not what is tested.
const CONVERGE_SECS: u64 = 60;

/// What members and relays log when they get a full snapshot.
const SNAPSHOT_LOG: &str = "the master sends a snapshot";

/// The health service that tells whether a relay's stream from upstream is up.
const UPSTREAM_HEALTH: &str = "ledger.v1.LedgerService/upstream";

fn operator(n: usize) -> String {
    format!(
        r#"{{"operator": {{"name": "op{n}", "company": "Acme", "port": {}}}}}"#,
        32148 + n
    )
}

async fn info(client: &mut Client) -> Option<pb::GetLedgerInfoResponse> {
    Some(
        client
            .get_ledger_info(pb::GetLedgerInfoRequest {})
            .await
            .ok()?
            .into_inner(),
    )
}

/// Waits until every relay answers `GetLedgerInfo` with the master's digest, head and count,
/// and every member's file is the master's ledger (md5 equal to its digest, recorded seq equal
/// to its head).
async fn converge(master: &Master, relays: &[&Master], members: &[&Member]) {
    let master_client = master.client().await;
    for relay in relays {
        let relay_client = relay.client().await;
        let what = format!("relay {} to serve the master's ledger", relay.addr);
        wait_until(CONVERGE_SECS, &what, || {
            let (mut master_client, mut relay_client) =
                (master_client.clone(), relay_client.clone());
            async move {
                let (Some(upstream), Some(served)) = (
                    info(&mut master_client).await,
                    info(&mut relay_client).await,
                ) else {
                    return false;
                };
                (upstream.digest, upstream.head_seq, upstream.policy_count)
                    == (served.digest, served.head_seq, served.policy_count)
            }
        })
        .await;
    }
    for member in members {
        wait_converged(&master_client, &member.file, CONVERGE_SECS).await;
    }
}

/// The events of a stream after `after_seq` up to and including `caught_up`, as `(seq, event)`.
async fn until_caught_up(
    client: &mut Client,
    after_seq: u64,
) -> (
    Vec<(u64, Event)>,
    tonic::Streaming<pb::StreamLedgerResponse>,
) {
    let mut stream = client
        .stream_ledger(pb::StreamLedgerRequest {
            after_seq,
            subscriber: None,
        })
        .await
        .expect("subscribing")
        .into_inner();
    let mut events = Vec::new();
    within(30, "the stream to catch up", async {
        loop {
            let message = stream
                .message()
                .await
                .expect("a stream message")
                .expect("the stream is open");
            let event = message.event.expect("an event");
            let done = matches!(event, Event::CaughtUp(_));
            events.push((message.seq, event));
            if done {
                break;
            }
        }
    })
    .await;
    (events, stream)
}

/// The next change (insert or delete) of a live stream, skipping progress messages.
async fn next_change(stream: &mut tonic::Streaming<pb::StreamLedgerResponse>) -> (u64, Event) {
    within(30, "a live change", async {
        loop {
            let message = stream
                .message()
                .await
                .expect("a stream message")
                .expect("the stream is open");
            match message.event.expect("an event") {
                Event::Progress(_) => continue,
                event => return (message.seq, event),
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_relays_converges_and_forwards_writes() {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let master = Master::start(dirs[0].path(), &[]);
    let mut client = master.client().await;
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(insert(&mut client, &operator(n)).await.id);
    }
    let first = Master::start_relay(dirs[1].path(), &[master.addr.to_string()], &[]);
    let second = Master::start_relay(dirs[2].path(), &[first.addr.to_string()], &[]);
    let member = Member::start(dirs[3].path(), &[second.addr.to_string()], &[]);
    converge(&master, &[&first, &second], &[&member]).await;

    // Live inserts and deletes on the master travel down the chain.
    for n in 10..25 {
        ids.push(insert(&mut client, &operator(n)).await.id);
    }
    for id in ids.iter().step_by(4) {
        delete(&mut client, id).await;
    }
    converge(&master, &[&first, &second], &[&member]).await;
    // Each relay keeps its own database (SQLite by default, in its directory).
    assert!(dirs[1].path().join("blockchain.db").exists());
    assert!(dirs[2].path().join("blockchain.db").exists());

    // A write sent to the last relay is forwarded to the master, whose answer comes back.
    let mut last = second.client().await;
    let forwarded = insert(&mut last, &operator(100)).await;
    let on_master = client
        .get_policy(pb::GetPolicyRequest {
            id: forwarded.id.clone(),
        })
        .await
        .expect("the forwarded insert is on the master")
        .into_inner()
        .policy
        .unwrap();
    assert_eq!(on_master, forwarded);
    let head = info(&mut client).await.unwrap().head_seq;
    assert_eq!(forwarded.seq, head, "the master's seq comes back");

    // Refusals pass through unchanged: the same code and message as from the master itself.
    let request = || pb::InsertPolicyRequest {
        policy_json: operator(100),
    };
    let direct = client.insert_policy(request()).await.unwrap_err();
    let relayed = last.insert_policy(request()).await.unwrap_err();
    assert_eq!(direct.code(), Code::AlreadyExists);
    assert_eq!(
        (relayed.code(), relayed.message()),
        (direct.code(), direct.message())
    );
    let missing = || pb::DeletePolicyRequest {
        id: "no-such-id".into(),
    };
    let direct = client.delete_policy(missing()).await.unwrap_err();
    let relayed = last.delete_policy(missing()).await.unwrap_err();
    assert_eq!(direct.code(), Code::NotFound);
    assert_eq!(
        (relayed.code(), relayed.message()),
        (direct.code(), direct.message())
    );
    // A delete through the relay is forwarded too, and everything converges on it.
    let seq = delete(&mut last, &ids[1]).await;
    assert_eq!(seq, head + 1);
    converge(&master, &[&first, &second], &[&member]).await;
    let gone = client
        .get_policy(pb::GetPolicyRequest { id: ids[1].clone() })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);

    // An EdgeLake node pushing to the last relay in its own protocol (on the relay's port)
    // writes on the master too.
    let count = info(&mut client).await.unwrap().policy_count;
    let mut node = Node::start().await;
    node.push(
        second.addr,
        r#"{"sensor": {"name": "s1", "company": "Acme"}}"#,
    )
    .await;
    wait_until(30, "the node's push to reach the master", || {
        let mut client = client.clone();
        async move { info(&mut client).await.unwrap().policy_count == count + 1 }
    })
    .await;
    converge(&master, &[&first, &second], &[&member]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_streams_the_masters_seqs() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let master = Master::start(dirs[0].path(), &[]);
    let mut client = master.client().await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(insert(&mut client, &operator(n)).await.id);
    }
    let relay = Master::start_relay(dirs[1].path(), &[master.addr.to_string()], &[]);
    let member = Member::start(dirs[2].path(), &[relay.addr.to_string()], &[]);
    converge(&master, &[&relay], &[&member]).await;
    // Replicated after the relay's snapshot (at seq 5), so the relay can replay them.
    for n in 5..12 {
        ids.push(insert(&mut client, &operator(n)).await.id);
    }
    delete(&mut client, &ids[0]).await;
    delete(&mut client, &ids[6]).await;
    converge(&master, &[&relay], &[&member]).await;

    let mut relay_client = relay.client().await;
    // A snapshot, and a replay from the middle, are the master's, seq for seq.
    for after_seq in [0, 7] {
        let (from_master, mut master_stream) = until_caught_up(&mut client, after_seq).await;
        let (from_relay, mut relay_stream) = until_caught_up(&mut relay_client, after_seq).await;
        assert_eq!(from_relay, from_master, "after seq {after_seq}");
        assert!(from_master.len() > 3, "{from_master:?}");
        // And so is a live change.
        let policy = insert(&mut client, &operator(50 + after_seq as usize)).await;
        let live = next_change(&mut master_stream).await;
        assert_eq!(live.0, policy.seq);
        assert_eq!(next_change(&mut relay_stream).await, live);
    }
    converge(&master, &[&relay], &[&member]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_and_restarted_resumes() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let master = Master::start(dirs[0].path(), &[]);
    let mut client = master.client().await;
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(insert(&mut client, &operator(n)).await.id);
    }
    let mut relay = Master::start_relay(dirs[1].path(), &[master.addr.to_string()], &[]);
    let member = Member::start(
        dirs[2].path(),
        &[relay.addr.to_string()],
        &["--retry-max", "1s"],
    );
    converge(&master, &[&relay], &[&member]).await;
    for n in 10..20 {
        ids.push(insert(&mut client, &operator(n)).await.id);
    }
    converge(&master, &[&relay], &[&member]).await;
    let before = info(&mut relay.client().await).await.unwrap().head_seq;

    relay.kill9();
    // The master moves on while the relay is down.
    for n in 20..30 {
        insert(&mut client, &operator(n)).await;
    }
    delete(&mut client, &ids[3]).await;
    relay.restart();
    converge(&master, &[&relay], &[&member]).await;

    let logs = relay.run_logs();
    assert!(
        logs.contains(&format!("streaming the changes after seq {before}")),
        "the restarted relay resumes after what its database holds:\n{logs}"
    );
    assert!(
        !logs.contains(SNAPSHOT_LOG),
        "the relay resumed without a snapshot:\n{logs}"
    );
    // The member below got its one snapshot at its start, and then only changes.
    assert_eq!(
        member.logs().matches(SNAPSHOT_LOG).count(),
        1,
        "{}",
        member.logs()
    );

    // Live changes still flow after the restart.
    insert(&mut client, &operator(99)).await;
    converge(&master, &[&relay], &[&member]).await;
}

/// Copies a stopped relay's SQLite database (and its WAL files) from `from` to `to`.
fn copy_database(from: &Path, to: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let source = format!("{}{suffix}", from.display());
        let target = format!("{}{suffix}", to.display());
        let _ = std::fs::remove_file(&target);
        if Path::new(&source).exists() {
            std::fs::copy(&source, &target).expect("copying the database");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_on_an_older_copy_of_its_database_catches_up_without_a_snapshot() {
    let (dir, relay_dir, backup) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let master = Master::start(dir.path(), &[]);
    let mut client = master.client().await;
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(insert(&mut client, &operator(n)).await.id);
    }
    let mut relay = Master::start_relay(relay_dir.path(), &[master.addr.to_string()], &[]);
    converge(&master, &[&relay], &[]).await;
    let database = relay_dir.path().join("blockchain.db");
    let saved = backup.path().join("blockchain.db");
    assert!(relay.terminate().success());
    copy_database(&database, &saved);

    relay.restart();
    for n in 10..20 {
        insert(&mut client, &operator(n)).await;
    }
    delete(&mut client, &ids[2]).await;
    converge(&master, &[&relay], &[]).await;
    assert!(relay.terminate().success());
    // A copy restored from a backup: behind the upstream, and behind what it served before.
    copy_database(&saved, &database);

    relay.restart();
    relay
        .wait_for_log(30, "streaming the changes after seq 10")
        .await;
    converge(&master, &[&relay], &[]).await;
    let logs = relay.run_logs();
    assert!(!logs.contains(SNAPSHOT_LOG), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_reset_by_its_upstream_resets_the_members_below() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    // The master keeps only 5 changes: a relay further behind gets a snapshot.
    let master = Master::start(dirs[0].path(), &["--change-retention", "5"]);
    let mut client = master.client().await;
    for n in 0..10 {
        insert(&mut client, &operator(n)).await;
    }
    let mut relay = Master::start_relay(
        dirs[1].path(),
        &[master.addr.to_string()],
        &["--metrics-addr", "127.0.0.1:0"],
    );
    let member = Member::start(
        dirs[2].path(),
        &[relay.addr.to_string()],
        &["--retry-max", "1s"],
    );
    converge(&master, &[&relay], &[&member]).await;

    relay.kill9();
    for n in 10..30 {
        insert(&mut client, &operator(n)).await;
    }
    let upstream = info(&mut client).await.unwrap();
    assert!(
        upstream.oldest_replayable_seq > 10,
        "the master pruned past the relay: {}",
        upstream.oldest_replayable_seq
    );
    relay.restart();
    converge(&master, &[&relay], &[&member]).await;
    // The relay got a snapshot and replaced its copy; the member below, now behind what the
    // relay can replay, had its stream ended and got a snapshot too.
    assert_eq!(relay.run_logs().matches(SNAPSHOT_LOG).count(), 1);
    assert!(relay.run_logs().contains("replaced the relay's copy"));
    assert_eq!(
        member.logs().matches(SNAPSHOT_LOG).count(),
        2,
        "{}",
        member.logs()
    );

    // The relay's metrics and health show its copy as it is, not deltas since its start.
    let port = relay.metrics_port();
    let scraped = scrape_async(port).await;
    let upstream = info(&mut client).await.unwrap();
    assert_eq!(
        sample(&scraped, "ledger_policies"),
        Some(upstream.policy_count as f64),
        "{scraped}"
    );
    assert_eq!(
        sample(&scraped, "ledger_head_seq"),
        Some(upstream.head_seq as f64),
        "{scraped}"
    );
    assert_eq!(sample(&scraped, "ledger_upstream_connected"), Some(1.0));
    assert_eq!(sample(&scraped, "ledger_upstream_resets_total"), Some(1.0));
    assert_eq!(relay.health(UPSTREAM_HEALTH).await, ServingStatus::Serving);

    insert(&mut client, &operator(99)).await;
    converge(&master, &[&relay], &[&member]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_on_postgresql_follows_resumes_and_takes_a_reset() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let master = Master::start(dirs[0].path(), &["--change-retention", "5"]);
    let mut client = master.client().await;
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(insert(&mut client, &operator(n)).await.id);
    }
    let url = PostgresServer::get().create_database();
    let mut relay = Master::start_relay(
        dirs[1].path(),
        &[master.addr.to_string()],
        &["--database-url", &url],
    );
    let member = Member::start(
        dirs[2].path(),
        &[relay.addr.to_string()],
        &["--retry-max", "1s"],
    );
    converge(&master, &[&relay], &[&member]).await;
    for n in 10..13 {
        insert(&mut client, &operator(n)).await;
    }
    delete(&mut client, &ids[0]).await;
    converge(&master, &[&relay], &[&member]).await;

    // Down while the master moves past what it keeps: the copy is replaced on PostgreSQL.
    relay.kill9();
    for n in 13..30 {
        insert(&mut client, &operator(n)).await;
    }
    relay.restart();
    converge(&master, &[&relay], &[&member]).await;
    let logs = relay.run_logs();
    assert!(
        logs.contains("streaming the changes after seq 14"),
        "{logs}"
    );
    assert!(logs.contains("replaced the relay's copy"), "{logs}");
    insert(&mut client, &operator(99)).await;
    delete(&mut client, &ids[5]).await;
    converge(&master, &[&relay], &[&member]).await;
}

/// An address nobody listens on.
fn closed_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_fails_over_to_its_next_upstream_without_a_reset() {
    // Two masters on one ledger (one SQLite file), behind an address nobody listens on.
    let shared = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", shared.path().join("blockchain.db").display());
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut first = Master::start(dirs[0].path(), &["--database-url", &url]);
    let second = Master::start(dirs[1].path(), &["--database-url", &url]);
    let dead = closed_port();
    let upstreams = [
        dead.clone(),
        first.addr.to_string(),
        second.addr.to_string(),
    ];
    let relay = Master::start_relay(dirs[2].path(), &upstreams, &["--upstream-retry-max", "1s"]);
    let member = Member::start(dirs[3].path(), &[relay.addr.to_string()], &[]);
    let mut client = first.client().await;
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(insert(&mut client, &operator(n)).await.id);
    }
    converge(&first, &[&relay], &[&member]).await;
    relay
        .wait_for_log(10, &format!("caught up with master {}", first.addr))
        .await;
    assert!(
        relay
            .run_logs()
            .contains(&format!("cannot reach master {dead}")),
        "{}",
        relay.run_logs()
    );
    assert_eq!(relay.health(UPSTREAM_HEALTH).await, ServingStatus::Serving);

    first.kill9();
    relay
        .wait_for_log(30, &format!("reconnected to master {}", second.addr))
        .await;
    let mut client = second.client().await;
    for n in 20..30 {
        insert(&mut client, &operator(n)).await;
    }
    for id in &ids[..3] {
        delete(&mut client, id).await;
    }
    converge(&second, &[&relay], &[&member]).await;
    // Writes through the relay follow it to the upstream it streams from.
    let mut through = relay.client().await;
    let forwarded = insert(&mut through, &operator(77)).await;
    let on_second = client
        .get_policy(pb::GetPolicyRequest {
            id: forwarded.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap();
    assert_eq!(on_second, forwarded);
    converge(&second, &[&relay], &[&member]).await;
    let logs = relay.run_logs();
    assert_eq!(logs.matches(SNAPSHOT_LOG).count(), 1, "{logs}");
    assert_eq!(member.logs().matches(SNAPSHOT_LOG).count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_relay_serves_nothing_before_its_first_snapshot() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let dead = closed_port();
    // Its only upstream is not there: the relay listens, but has no ledger to give.
    let relay = Master::start_relay(dirs[1].path(), std::slice::from_ref(&dead), &[]);
    let mut client = relay.client().await;
    let refused = client
        .get_ledger_info(pb::GetLedgerInfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(refused.message().contains("no copy"), "{refused:?}");
    assert_eq!(
        relay.health(UPSTREAM_HEALTH).await,
        ServingStatus::NotServing
    );
    // A stream waits for the copy instead of handing out an empty ledger.
    let mut stream = client
        .stream_ledger(pb::StreamLedgerRequest {
            after_seq: 0,
            subscriber: None,
        })
        .await
        .unwrap()
        .into_inner();
    let waited = tokio::time::timeout(std::time::Duration::from_secs(1), stream.message()).await;
    assert!(waited.is_err(), "the stream sent {waited:?}");
}

// --- Writes through a relay carry the caller's credentials --------------------------------

const WRITER: &str = "writer-token-5a1f";
const READER: &str = "reader-token-77c2";
const ADMIN: &str = "admin-token-0b9e";
/// A token only the relay knows.
const RELAY_ONLY: &str = "relay-only-token-d41c";

/// The upstream's callers: tokens `ingest` (writer), `dashboard` (reader), `operator` (admin);
/// certificates `relay-1` (writer: a relay's own identity) and `member-reader` (reader).
fn upstream_auth(dir: &Path) -> String {
    AuthFile::new()
        .token("ingest", "writer", WRITER)
        .token("dashboard", "reader", READER)
        .token("operator", "admin", ADMIN)
        .subject("relay-1", "writer")
        .subject("member-reader", "reader")
        .write(&dir.join("upstream-auth.toml"))
}

/// The relay's own callers: it lets the writer and admin tokens do what upstream lets them,
/// but also lets the reader token write and knows a token upstream does not; certificates
/// `ops-admin` (admin) and `member-reader` (reader).
fn relay_auth(dir: &Path) -> String {
    AuthFile::new()
        .token("ingest-here", "writer", WRITER)
        .token("dashboard-here", "writer", READER)
        .token("operator-here", "admin", ADMIN)
        .token("local", "writer", RELAY_ONLY)
        .subject("ops-admin", "admin")
        .subject("member-reader", "reader")
        .write(&dir.join("relay-auth.toml"))
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// The arguments that make a master (or relay) serve TLS with `pki`'s server certificate,
/// client certificates optional, and the auth file `auth`.
fn serving_tls(pki: &TestPki, auth: String) -> Vec<String> {
    let server = pki.server();
    vec![
        "--tls-cert".into(),
        path(&server.cert),
        "--tls-key".into(),
        path(&server.key),
        "--tls-client-ca".into(),
        path(&pki.ca),
        "--tls-client-optional".into(),
        "--auth-file".into(),
        auth,
    ]
}

/// A relay of `upstream` serving TLS with the relay auth file, connected upstream over mTLS as
/// `relay-1`; `extra` arguments added.
fn secure_relay(dir: &Path, pki: &TestPki, upstream: &Master, extra: &[&str]) -> Master {
    let identity = pki.client("relay-1");
    let mut args = serving_tls(pki, relay_auth(dir));
    args.extend([
        "--upstream-tls-ca".into(),
        path(&pki.ca),
        "--upstream-tls-cert".into(),
        path(&identity.cert),
        "--upstream-tls-key".into(),
        path(&identity.key),
        "--upstream-retry-max".into(),
        "1s".into(),
    ]);
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Master::start_relay(dir, &[upstream.addr.to_string()], &args)
}

/// A TLS client of `server`, as the certificate `identity` if given.
async fn tls_client(server: &Master, pki: &TestPki, identity: Option<&CertFiles>) -> Client {
    LedgerServiceClient::new(
        ledger_testkit::tls::channel(&server.addr.to_string(), &pki.ca, identity).await,
    )
}

/// Inserts `json` through `client` with `token` if given.
async fn insert_as(
    client: &mut Client,
    token: Option<&str>,
    json: &str,
) -> Result<pb::Policy, tonic::Status> {
    let message = pb::InsertPolicyRequest {
        policy_json: json.to_string(),
    };
    let request = match token {
        Some(token) => with_token(message, token),
        None => tonic::Request::new(message),
    };
    within(30, "InsertPolicy", client.insert_policy(request))
        .await
        .map(|answer| answer.into_inner().policy.expect("a policy"))
}

/// The `host` column the upstream stored for `id`: who the upstream took the writer for.
fn stored_host(upstream_dir: &Path, id: &str) -> String {
    let url = DatabaseUrl::Sqlite(upstream_dir.join("blockchain.db"));
    ledger_rows(&url)
        .into_iter()
        .find(|row| row.policy_id == id)
        .unwrap_or_else(|| panic!("{id} is not in the upstream's ledger table"))
        .host
}

/// The head of `client`'s ledger, read with the admin token.
async fn head(client: &mut Client) -> u64 {
    within(
        30,
        "GetLedgerInfo",
        client.get_ledger_info(with_token(pb::GetLedgerInfoRequest {}, ADMIN)),
    )
    .await
    .unwrap()
    .into_inner()
    .head_seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_a_relay_carry_the_callers_token() {
    let (dir, relay_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let pki = TestPki::new(dir.path());
    let args = serving_tls(&pki, upstream_auth(dir.path()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let master = Master::start(dir.path(), &args);
    let relay = secure_relay(relay_dir.path(), &pki, &master, &[]);
    let mut upstream = tls_client(&master, &pki, None).await;
    insert_as(&mut upstream, Some(WRITER), &operator(1))
        .await
        .unwrap();
    let admin = pki.client("ops-admin");
    let mut through = tls_client(&relay, &pki, Some(&admin)).await;
    wait_until(30, "the relay to copy the ledger", || {
        let mut through = through.clone();
        async move {
            let request = with_token(pb::GetLedgerInfoRequest {}, ADMIN);
            matches!(through.get_ledger_info(request).await, Ok(info) if info.get_ref().head_seq == 1)
        }
    })
    .await;

    // A caller known to the relay by its certificate alone: the relay will not write for it
    // with its own certificate, and says so; nothing reaches the upstream.
    let refused = insert_as(&mut through, None, &operator(2))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("client certificate") && refused.message().contains("token"),
        "{refused:?}"
    );
    assert_eq!(head(&mut upstream).await, 1);

    // The caller's token is what the upstream sees. A token the relay lets write but the
    // upstream knows as a reader's is refused by the upstream, as the upstream refuses it
    // directly (the relay's own certificate, a writer upstream, would have been let in).
    let direct = insert_as(&mut upstream, Some(READER), &operator(2))
        .await
        .unwrap_err();
    let relayed = insert_as(&mut through, Some(READER), &operator(2))
        .await
        .unwrap_err();
    assert_eq!(direct.code(), Code::PermissionDenied);
    assert!(direct.message().contains("dashboard"), "{direct:?}");
    assert_eq!(
        (relayed.code(), relayed.message()),
        (direct.code(), direct.message())
    );
    // A token only the relay knows is unknown upstream.
    let relayed = insert_as(&mut through, Some(RELAY_ONLY), &operator(2))
        .await
        .unwrap_err();
    assert_eq!(relayed.code(), Code::Unauthenticated, "{relayed:?}");
    assert_eq!(head(&mut upstream).await, 1);

    // The writer's token writes, and the upstream stored it as the token's writer's.
    let written = insert_as(&mut through, Some(WRITER), &operator(2))
        .await
        .unwrap();
    assert_eq!(written.seq, 2);
    assert_eq!(stored_host(dir.path(), &written.id), "ingest@127.0.0.1");

    // The relay's own auth still comes first: a reader certificate may not write through it,
    // whatever the upstream would say.
    let reader = pki.client("member-reader");
    let mut as_reader = tls_client(&relay, &pki, Some(&reader)).await;
    let refused = insert_as(&mut as_reader, None, &operator(3))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("member-reader"), "{refused:?}");

    // A delete goes up with the caller's token too: the admin's deletes.
    let request = with_token(
        pb::DeletePolicyRequest {
            id: written.id.clone(),
        },
        ADMIN,
    );
    let seq = through
        .delete_policy(request)
        .await
        .unwrap()
        .into_inner()
        .seq;
    assert_eq!(seq, 3);

    // A relay told to write as itself forwards the certificate caller's write with its own
    // identity: the upstream takes it for the relay's.
    let self_dir = tempfile::tempdir().unwrap();
    let as_self = secure_relay(
        self_dir.path(),
        &pki,
        &master,
        &["--upstream-write-as-self"],
    );
    let mut through = tls_client(&as_self, &pki, Some(&admin)).await;
    let written = within(30, "writing through the relay as itself", async {
        loop {
            match insert_as(&mut through, None, &operator(4)).await {
                Ok(policy) => break policy,
                // Until it reached its upstream.
                Err(status) if status.code() == Code::Unavailable => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(status) => panic!("{status:?}"),
            }
        }
    })
    .await;
    assert_eq!(stored_host(dir.path(), &written.id), "relay-1@127.0.0.1");
    assert!(
        as_self.logs().contains("--upstream-write-as-self"),
        "the risk is logged at start:\n{}",
        as_self.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_serves_tls_with_its_own_auth_file() {
    let (dir, relay_dir, below_dir) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let pki = TestPki::new(dir.path());
    let args = serving_tls(&pki, upstream_auth(dir.path()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let master = Master::start(dir.path(), &args);
    let mut upstream = tls_client(&master, &pki, None).await;
    insert_as(&mut upstream, Some(WRITER), &operator(1))
        .await
        .unwrap();
    // Members below must present a certificate: mTLS required, not optional.
    let server = pki.server();
    let identity = pki.client("relay-1");
    let ca = path(&pki.ca);
    let relay_args = [
        "--tls-cert",
        &path(&server.cert),
        "--tls-key",
        &path(&server.key),
        "--tls-client-ca",
        &ca,
        "--auth-file",
        &relay_auth(relay_dir.path()),
        "--upstream-tls-ca",
        &ca,
        "--upstream-tls-cert",
        &path(&identity.cert),
        "--upstream-tls-key",
        &path(&identity.key),
    ];
    let relay = Master::start_relay(relay_dir.path(), &[master.addr.to_string()], &relay_args);

    // A member below the relay, over mTLS with its reader certificate, gets the ledger.
    let reader = pki.client("member-reader");
    let below = Member::start(
        below_dir.path(),
        &[relay.addr.to_string()],
        &[
            "--tls-ca",
            &ca,
            "--tls-cert",
            &path(&reader.cert),
            "--tls-key",
            &path(&reader.key),
            "--retry-max",
            "1s",
        ],
    );
    let wanted = within(30, "GetLedgerInfo", async {
        upstream
            .get_ledger_info(with_token(pb::GetLedgerInfoRequest {}, READER))
            .await
            .unwrap()
            .into_inner()
            .digest
    })
    .await;
    wait_until(60, "the member below the relay to converge", || async {
        below.file_md5().as_deref() == Some(wanted.as_str())
    })
    .await;

    // The admin certificate may write on the relay, but only a token goes upstream: with the
    // writer's token (beside its certificate) the write goes through.
    let admin = pki.client("ops-admin");
    let mut through = tls_client(&relay, &pki, Some(&admin)).await;
    let refused = insert_as(&mut through, None, &operator(2))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let written = insert_as(&mut through, Some(WRITER), &operator(2))
        .await
        .unwrap();
    assert_eq!(written.seq, 2);
    let wanted = within(30, "GetLedgerInfo", async {
        upstream
            .get_ledger_info(with_token(pb::GetLedgerInfoRequest {}, READER))
            .await
            .unwrap()
            .into_inner()
            .digest
    })
    .await;
    wait_until(60, "the write to come back down to the member", || async {
        below.file_md5().as_deref() == Some(wanted.as_str())
    })
    .await;

    // Plaintext to the relay's TLS port is refused.
    let out = ledger_testkit::member::member_command(
        &["status", "--master", &relay.addr.to_string()],
        None,
    )
    .await;
    assert_eq!(out.code, Some(3), "{out:?}");
}
