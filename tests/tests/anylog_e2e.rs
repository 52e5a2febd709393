//! The real `master` binary used as an EdgeLake / AnyLog node uses its master: the node-to-master
//! TCP protocol (2048-byte blocks, replies on connections back to the node's own server) spoken
//! by the independent test client `ledger_testkit::anylog`, on SQLite and on a real PostgreSQL.
//! gRPC clients on the same port are checked to be unaffected.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ledger_proto::errors::{Reason, key};
use ledger_proto::pb::stream_ledger_response::Event;
use ledger_proto::pb::{GetLedgerInfoResponse, Policy, StreamLedgerResponse};
use ledger_storage::DatabaseUrl;
use ledger_testkit::anylog::{
    self, BLOCK_SIZE, Node, SendOptions, block_capacity, encode_message, error_code, generic_flag,
    info_type, offset, send_bytes, set_u16, set_u32,
};
use ledger_testkit::client::{
    Client, assert_refused, get, info, insert_ok, next_change, stream, until_caught_up,
};
use ledger_testkit::sql::{LedgerRow, ledger_rows};
use ledger_testkit::{Master, Member, PostgresServer, ledger_digest, wait_until, within};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tonic::Streaming;

/// How long a test waits to be sure the master sends nothing back.
const QUIET: Duration = Duration::from_secs(2);

/// The md5 of an empty file: the digest of an empty ledger.
const EMPTY_MD5: &str = "d41d8cd98f00b204e9800998ecf8427e";

/// A master on a fresh database of `backend`, in its own directory.
struct Fixture {
    master: Master,
    db: DatabaseUrl,
    dir: tempfile::TempDir,
}

impl Fixture {
    /// The master's AnyLog address when it shares the gRPC port (the default).
    fn anylog(&self) -> SocketAddr {
        self.master.addr
    }

    /// A destination path for ledger files, in the test's directory (nothing is written
    /// there: the node is this test).
    fn dest(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

fn start(backend: &str, args: &[&str]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let db = match backend {
        "sqlite" => DatabaseUrl::Sqlite(dir.path().join("blockchain.db")),
        "postgres" => {
            let url = PostgresServer::get().create_database();
            all.push("--database-url".into());
            all.push(url.clone());
            DatabaseUrl::Postgres(url)
        }
        other => panic!("unknown backend {other}"),
    };
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let master = Master::start(dir.path(), &all);
    Fixture { master, db, dir }
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() { super::$name("sqlite").await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() { super::$name("postgres").await })*
        }
    };
}

on_both_backends!(
    an_empty_ledger_syncs_as_a_zero_byte_file,
    ten_thousand_policies_sync_as_the_member_file,
    ledger_file_names_cycle_master_id_1_to_9,
    push_inserts_a_policy_seen_by_grpc_and_streams,
    a_complete_policy_is_stored_byte_for_byte_with_its_columns,
    failed_pushes_are_echoed_with_the_job_copied_and_change_nothing,
    push_ignore_of_a_duplicate_is_silent,
    drop_removes_and_an_unknown_id_is_echo_101,
    a_large_policy_goes_through_the_lmsg_path,
    file_get_sends_the_ledger_file,
    unsupported_commands_get_an_echo_naming_them,
    a_reply_ip_of_0_0_0_0_means_the_peer,
    malformed_messages_change_nothing_and_the_master_keeps_serving,
    idle_and_stalled_connections_do_not_block_others,
    stalled_connections_time_out_and_the_limit_leaves_grpc_alone,
    replies_to_unreachable_or_stalled_nodes_do_not_block_others,
    file_writes_from_a_node_never_touch_the_masters_disk,
    grpc_and_anylog_share_the_port_under_load,
    anylog_on_its_own_port,
    anylog_off_leaves_only_grpc,
    write_from_refuses_other_networks_but_serves_the_ledger,
    sigterm_does_not_wait_for_stalled_nodes,
);

fn operator(n: usize) -> String {
    format!(
        r#"{{"operator": {{"name": "op{n}", "company": "Acme", "ip": "10.{}.{}.{}", "port": {}}}}}"#,
        n / 65536 % 256,
        n / 256 % 256,
        n % 256,
        32148 + n % 7
    )
}

/// A complete policy as a node pushes it (`json.dumps` of a policy with `id` and `date`): the
/// master stores it as it is.
fn complete(kind: &str, id: &str) -> String {
    format!(
        r#"{{"{kind}": {{"name": "{id}-name", "company": "Acme", "id": "{id}", "date": "2026-12-02T10:11:12.131415Z", "ledger": "global"}}}}"#
    )
}

/// A stream opened after the current head and read to `caught_up`.
async fn watch(client: &mut Client) -> Streaming<StreamLedgerResponse> {
    let head = info(client).await.head_seq;
    let mut events = stream(client, head).await;
    let (_, caught_up) = until_caught_up(&mut events).await;
    assert_eq!(caught_up, head);
    events
}

/// The next change of a stream, which must be an insert: its seq and policy.
async fn next_insert(events: &mut Streaming<StreamLedgerResponse>) -> (u64, Policy) {
    let change = next_change(events).await;
    match change.event {
        Some(Event::Inserted(policy)) => (change.seq, policy),
        other => panic!("expected an insert, got {other:?}"),
    }
}

/// Inserts `count` policies through gRPC from 32 concurrent tasks.
async fn insert_many(master: &Master, count: usize) {
    let client = master.client().await;
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..32 {
        let mut client = client.clone();
        tasks.spawn(async move {
            for n in (task..count).step_by(32) {
                insert_ok(&mut client, &operator(n)).await;
            }
        });
    }
    within(600, "inserting the policies", async {
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
    })
    .await;
}

/// Waits until the master holds `count` policies (AnyLog writes are not acknowledged).
async fn wait_for_count(client: &Client, count: u64) {
    let what = format!("the master to hold {count} policies");
    wait_until(60, &what, || {
        let mut client = client.clone();
        async move { info(&mut client).await.policy_count == count }
    })
    .await;
}

/// The ledger file the master serves now, through `get_blockchain` from a fresh node.
async fn ledger_file(master: SocketAddr, dest: &str) -> anylog::ReceivedFile {
    Node::start().await.get_blockchain(master, dest, "0").await
}

async fn an_empty_ledger_syncs_as_a_zero_byte_file(backend: &str) {
    let fx = start(backend, &[]);
    let mut client = fx.master.client().await;
    let mut node = Node::start().await;
    let dest = fx.dest("blockchain.new");
    let file = node.get_blockchain(fx.anylog(), &dest, "0").await;
    assert_eq!(file.name, fx.dest("blockchain.master_id_1.new"));
    assert!(file.bytes.is_empty(), "{:?}", file.message);
    assert_eq!(file.message.blocks(), 1);
    let ledger = info(&mut client).await;
    assert_eq!(ledger.digest, EMPTY_MD5);
    assert_eq!(file.md5(), ledger.digest);
    // The master's reply is a sender's message: its own source address, no error.
    let header = file.message.header();
    assert_eq!(header.error_code, 0);
    assert!(!header.source_ip.is_empty());
    // Up to date: nothing is sent.
    node.request_blockchain(fx.anylog(), &dest, EMPTY_MD5).await;
    node.expect_nothing_for(QUIET).await;
}

async fn ten_thousand_policies_sync_as_the_member_file(backend: &str) {
    let fx = start(backend, &[]);
    let mut client = fx.master.client().await;
    insert_many(&fx.master, 10_000).await;
    let ledger = info(&mut client).await;
    assert_eq!(ledger.policy_count, 10_000);

    let member_dir = tempfile::tempdir().unwrap();
    let member = Member::start(member_dir.path(), &[fx.master.addr.to_string()], &[]);
    let digest = ledger.digest.clone();
    wait_until(120, "the member to hold the ledger", || {
        let md5 = member.file_md5();
        let digest = digest.clone();
        async move { md5 == Some(digest) }
    })
    .await;
    let member_file = member.file_bytes();

    let mut node = Node::start().await;
    let dest = fx.dest("blockchain.new");
    let file = node.get_blockchain(fx.anylog(), &dest, "0").await;
    assert_eq!(file.md5(), ledger.digest);
    assert!(
        file.bytes == member_file,
        "the ledger file ({} bytes) differs from the member's blockchain.json ({} bytes)",
        file.bytes.len(),
        member_file.len()
    );
    assert_eq!(file.lines().len(), 10_000);
    let capacity = block_capacity(file.message.command.len());
    assert_eq!(file.message.blocks(), file.bytes.len() / capacity + 1);

    // A node holding this file is answered with nothing.
    node.request_blockchain(fx.anylog(), &dest, &ledger.digest)
        .await;
    node.expect_nothing_for(QUIET).await;
    // Once the ledger changes, the same md5 is out of date.
    insert_ok(&mut client, &operator(10_000)).await;
    let newer = node
        .get_blockchain(fx.anylog(), &dest, &ledger.digest)
        .await;
    assert_eq!(newer.md5(), info(&mut client).await.digest);
    assert!(newer.bytes.starts_with(&member_file));
}

async fn ledger_file_names_cycle_master_id_1_to_9(backend: &str) {
    let fx = start(backend, &[]);
    let mut client = fx.master.client().await;
    let policy = insert_ok(&mut client, &operator(1)).await;
    // One node per request: the counter is the master's, not the node's.
    for n in 1..=11 {
        let expected = (n - 1) % 9 + 1;
        let (dest, name) = match n {
            // No extension: the suffix goes at the end.
            4 => (
                fx.dest("ledger"),
                fx.dest(&format!("ledger.master_id_{expected}")),
            ),
            // A space in the path travels as a tab, both ways.
            5 => (
                fx.dest("my dir/blockchain.new"),
                fx.dest(&format!("my dir/blockchain.master_id_{expected}.new")),
            ),
            _ => (
                fx.dest("blockchain.new"),
                fx.dest(&format!("blockchain.master_id_{expected}.new")),
            ),
        };
        let file = Node::start()
            .await
            .get_blockchain(fx.anylog(), &dest, "0")
            .await;
        assert_eq!(file.name, name, "request {n}");
        assert_eq!(
            file.message.command,
            format!("file write {}", name.replace(' ', "\t")),
            "request {n}"
        );
        assert_eq!(file.bytes, format!("{}\n", policy.json).into_bytes());
    }
}

async fn push_inserts_a_policy_seen_by_grpc_and_streams(backend: &str) {
    let fx = start(backend, &[]);
    let mut client = fx.master.client().await;
    insert_ok(&mut client, &operator(1)).await;
    let mut events = watch(&mut client).await;
    let mut node = Node::start().await;
    // A vector of AnyLog's id: md5 of Python's str() of the policy.
    let sent = node
        .push(
            fx.anylog(),
            r#"{"sensor": {"name": "s1", "company": "Acme"}}"#,
        )
        .await;
    assert_eq!(sent, 1);
    let (seq, policy) = next_insert(&mut events).await;
    assert_eq!(seq, 2);
    assert_eq!(policy.id, "70c300ed8df8c09954eaed8d6964fc7f");
    assert_eq!(policy.r#type, "sensor");
    let body: serde_json::Value = serde_json::from_str(&policy.json).unwrap();
    let keys: Vec<&str> = body["sensor"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["name", "company", "id", "date", "ledger"]);
    assert_eq!(body["sensor"]["ledger"], "global");
    assert_eq!(get(&mut client, &policy.id).await.unwrap(), policy);
    // Success is silent.
    node.expect_nothing_for(QUIET).await;
    // The ledger file now ends with it.
    let file = node
        .get_blockchain(fx.anylog(), &fx.dest("blockchain.new"), "0")
        .await;
    assert_eq!(file.md5(), info(&mut client).await.digest);
    assert_eq!(file.lines().last(), Some(&policy.json));
}

fn ledger_row(db: &DatabaseUrl, id: &str) -> LedgerRow {
    let rows: Vec<LedgerRow> = ledger_rows(db)
        .into_iter()
        .filter(|row| row.policy_id == id)
        .collect();
    assert_eq!(rows.len(), 1, "rows of {id}: {rows:?}");
    rows.into_iter().next().unwrap()
}

async fn a_complete_policy_is_stored_byte_for_byte_with_its_columns(backend: &str) {
    let fx = start(backend, &[]);
    let mut client = fx.master.client().await;
    let mut events = watch(&mut client).await;
    let mut node = Node::start().await;
    // A cluster as a node pushes it: completed, then `status` added after `date`.
    let cluster = r#"{"cluster": {"company": "Acme Inc", "name": "c1", "table": [{"dbms": "d", "name": "t", "status": "active"}], "id": "0d69b1e80a299a368ae9d22b146e980c", "date": "2026-12-01T22:52:57.606908Z", "status": "active", "ledger": "global"}}"#;
    node.push(fx.anylog(), cluster).await;
    let (seq, policy) = next_insert(&mut events).await;
    assert_eq!(seq, 1);
    assert_eq!(policy.json, cluster);
    assert_eq!(policy.id, "0d69b1e80a299a368ae9d22b146e980c");
    assert_eq!(
        get(&mut client, &policy.id).await.unwrap().json,
        cluster,
        "stored byte for byte"
    );
    assert_eq!(
        ledger_row(&fx.db, &policy.id),
        LedgerRow {
            policy_id: policy.id.clone(),
            policy_type: "cluster".into(),
            company_name: Some("Acme Inc".into()),
            date: "2026-12-01 22:52:57.606908".into(),
            host: "127.0.0.1".into(),
            status: Some("active".into()),
        }
    );
    // The host column is the reply IP the node put in its header, not the TCP peer.
    let operator = r#"{"operator": {"name": "op7", "company": "Lit", "ip": "10.0.0.7", "port": 32148, "cluster": "0d69b1e80a299a368ae9d22b146e980c", "id": "op7-id", "date": "2025-01-02T03:04:05.000006Z", "member": 17, "ledger": "global"}}"#;
    let options = SendOptions {
        source_ip: Some("192.0.2.7".into()),
        ..SendOptions::default()
    };
    node.send(
        fx.anylog(),
        &format!("blockchain push {operator}"),
        &[],
        &options,
    )
    .await;
    let (seq, policy) = next_insert(&mut events).await;
    assert_eq!((seq, policy.json.as_str()), (2, operator));
    assert_eq!(
        ledger_row(&fx.db, "op7-id"),
        LedgerRow {
            policy_id: "op7-id".into(),
            policy_type: "operator".into(),
            company_name: Some("Lit".into()),
            date: "2025-01-02 03:04:05.000006".into(),
            host: "192.0.2.7".into(),
            status: None,
        }
    );
    // The ledger file has them in ledger order, as sent.
    let file = ledger_file(fx.anylog(), &fx.dest("blockchain.new")).await;
    assert_eq!(file.bytes, format!("{cluster}\n{operator}\n").into_bytes());
    node.expect_nothing_for(QUIET).await;
}

async fn failed_pushes_are_echoed_with_the_job_copied_and_change_nothing(backend: &str) {
    let fx = start(backend, &[]);
    let mut client = fx.master.client().await;
    let stored = insert_ok(&mut client, &operator(1)).await;
    let before = info(&mut client).await;
    let mut node = Node::start().await;

    // A duplicate id: error 30, with the request's job location and id copied back.
    let options = SendOptions {
        job_location: 0x0102,
        job_id: 0x0304_0506,
        ..SendOptions::default()
    };
    node.send(
        fx.anylog(),
        &format!("blockchain push {}", stored.json),
        &[],
        &options,
    )
    .await;
    let echo = node.next_message(30).await;
    echo.assert_echo(
        "echo Blockchain message 'push' failed",
        Some(error_code::BLOCKCHAIN_OPERATION_FAILED),
    );
    assert_eq!(echo.header().info_type, info_type::BLOCKCHAIN_ECHO);
    assert_eq!(
        (echo.header().job_location, echo.header().job_id),
        (0x0102, 0x0304_0506),
        "the job fields are copied back"
    );
    assert!(!echo.data.is_empty(), "the echo says why: {echo:?}");
    // The same id pushed in another form: still a duplicate.
    node.push(fx.anylog(), &operator(1)).await;
    node.next_message(30)
        .await
        .assert_echo("echo Blockchain message 'push' failed", Some(30));

    for bad in [
        r#"{"operator": {"name": "#,
        r#"[1, 2]"#,
        r#"{"a": {"name": "x"}, "b": {"name": "y"}}"#,
        r#"{"operator": "x"}"#,
        "not json at all",
    ] {
        node.push(fx.anylog(), bad).await;
        let echo = node.next_message(30).await;
        echo.assert_echo("echo Blockchain message 'push' failed", None);
        assert_ne!(
            echo.header().error_code,
            error_code::BLOCKCHAIN_OPERATION_FAILED,
            "{bad}: not a duplicate"
        );
    }
    // A push without any policy is refused too.
    node.send_command(fx.anylog(), "blockchain push").await;
    node.next_message(30).await.assert_echo("echo", None);
    assert_eq!(info(&mut client).await, before);
    node.expect_nothing_for(QUIET).await;
}

async fn push_ignore_of_a_duplicate_is_silent(backend: &str) {
    let fx = start(backend, &[]);
    let mut client = fx.master.client().await;
    let stored = insert_ok(&mut client, &operator(1)).await;
    let before = info(&mut client).await;
    let mut node = Node::start().await;
    // As a node sends it (a tab between push and ignore), and with a space.
    node.push_ignore(fx.anylog(), &stored.json).await;
    node.send_command(
        fx.anylog(),
        &format!("blockchain push ignore {}", stored.json),
    )
    .await;
    node.expect_nothing_for(QUIET).await;
    assert_eq!(info(&mut client).await, before);

    // A new policy through push ignore is inserted.
    let mut events = watch(&mut client).await;
    let fresh = complete("sensor", "ignored-not");
    node.push_ignore(fx.anylog(), &fresh).await;
    let (seq, policy) = next_insert(&mut events).await;
    assert_eq!((seq, policy.json.as_str()), (2, fresh.as_str()));
    let spaced = complete("sensor", "spaced");
    node.send_command(fx.anylog(), &format!("blockchain push ignore {spaced}"))
        .await;
    let (seq, policy) = next_insert(&mut events).await;
    assert_eq!((seq, policy.json.as_str()), (3, spaced.as_str()));
    // A node's push ignore was seen with a stale generic flag 2 (left from the file write it
    // was handling): only `file write` reads that flag.
    let stale = complete("sensor", "stale-flag");
    let options = SendOptions {
        generic_flag: generic_flag::LEDGER_FILE,
        ..SendOptions::default()
    };
    node.send(
        fx.anylog(),
        &format!("blockchain push\tignore {stale}"),
        &[],
        &options,
    )
    .await;
    let (seq, policy) = next_insert(&mut events).await;
    assert_eq!((seq, policy.json.as_str()), (4, stale.as_str()));
    node.expect_nothing_for(QUIET).await;
}

async fn drop_removes_and_an_unknown_id_is_echo_101(backend: &str) {
    let fx = start(backend, &[]);
    let mut client = fx.master.client().await;
    let keep = insert_ok(&mut client, &operator(1)).await;
    let mut events = watch(&mut client).await;
    let mut node = Node::start().await;
    let doomed = complete("operator", "doomed");
    node.push(fx.anylog(), &doomed).await;
    assert_eq!(next_insert(&mut events).await.0, 2);
    node.drop_policy(fx.anylog(), "doomed").await;
    let change = next_change(&mut events).await;
    assert_eq!(
        (change.seq, change.event),
        (3, Some(Event::DeletedId("doomed".into())))
    );
    assert_refused(
        &get(&mut client, "doomed").await.unwrap_err(),
        Reason::PolicyNotFound,
        &[(key::POLICY_ID, "doomed")],
    );
    node.expect_nothing_for(QUIET).await;
    let ledger = info(&mut client).await;
    assert_eq!(ledger.digest, ledger_digest([keep.json.as_str()]));

    // Unknown (and now deleted) ids: error 101, job copied.
    for id in ["doomed", "no-such-id"] {
        let options = SendOptions {
            job_location: 9,
            job_id: 77,
            ..SendOptions::default()
        };
        node.send(
            fx.anylog(),
            &format!("blockchain drop policy where id = {id}"),
            &[],
            &options,
        )
        .await;
        let echo = node.next_message(30).await;
        echo.assert_echo(
            "echo Blockchain message 'drop' failed",
            Some(error_code::WRONG_KEY_IN_DELETE),
        );
        assert_eq!(echo.header().info_type, info_type::BLOCKCHAIN_ECHO);
        assert_eq!((echo.header().job_location, echo.header().job_id), (9, 77));
    }
    assert_eq!(info(&mut client).await, ledger);
}

async fn a_large_policy_goes_through_the_lmsg_path(backend: &str) {
    let fx = start(backend, &[]);
    let mut client = fx.master.client().await;
    let mut events = watch(&mut client).await;
    let mut node = Node::start().await;
    let big = format!(
        r#"{{"table": {{"name": "big", "dbms": "d", "create": "{}", "id": "big-id", "date": "2026-12-02T00:00:00.000001Z", "ledger": "global"}}}}"#,
        "x".repeat(3000)
    );
    let blocks = node.push(fx.anylog(), &big).await;
    assert_eq!(blocks, 2, "a ~3 KB command is two .lmsg blocks");
    let (seq, policy) = next_insert(&mut events).await;
    assert_eq!((seq, policy.json.as_str()), (1, big.as_str()));

    // A command exactly filling two blocks: an empty third block follows.
    let name_len = format!("file write cmd.{}.2.lmsg", node.addr().ip()).len();
    let target = 2 * block_capacity(name_len);
    let prefix = r#"blockchain push {"table": {"name": "exact", "dbms": "d", "id": "exact-id", "date": "2026-12-02T00:00:00.000002Z", "ledger": "global", "create": ""#;
    let pad = target - prefix.len() - r#""}}"#.len();
    let exact = format!(r#"{}{}"}}}}"#, prefix, "y".repeat(pad));
    assert_eq!(exact.len(), target);
    assert_eq!(node.send_command(fx.anylog(), &exact).await, 3);
    let (seq, policy) = next_insert(&mut events).await;
    assert_eq!(seq, 2);
    assert_eq!(
        policy.json,
        exact.strip_prefix("blockchain push ").unwrap(),
        "stored as sent"
    );
    node.expect_nothing_for(QUIET).await;

    // A duplicate through .lmsg is refused as the unwrapped push is, and changes nothing.
    let before = info(&mut client).await;
    node.push(fx.anylog(), &big).await;
    let echo = node.next_message(30).await;
    echo.assert_echo(
        "echo Blockchain message 'push' failed",
        Some(error_code::BLOCKCHAIN_OPERATION_FAILED),
    );
    assert_eq!(info(&mut client).await, before);
    let file = ledger_file(fx.anylog(), &fx.dest("blockchain.new")).await;
    assert_eq!(file.md5(), before.digest);
    assert!(file.message.blocks() >= 4);
}

async fn file_get_sends_the_ledger_file(backend: &str) {
    let fx = start(backend, &[]);
    let mut client = fx.master.client().await;
    for n in 1..=30 {
        insert_ok(&mut client, &operator(n)).await;
    }
    let ledger = info(&mut client).await;
    let mut node = Node::start().await;
    let path = fx.dest("seed dir/blockchain.json");
    let file = node.file_get(fx.anylog(), &path).await;
    assert_eq!(file.name, path);
    assert_eq!(
        file.message.command,
        format!("file write {}", path.replace(' ', "\t"))
    );
    assert_eq!(file.md5(), ledger.digest);
    assert_eq!(file.lines().len(), 30);
    assert!(file.message.blocks() >= 2);
    node.expect_nothing_for(QUIET).await;
}

async fn unsupported_commands_get_an_echo_naming_them(backend: &str) {
    let fx = start(backend, &[]);
    let mut client = fx.master.client().await;
    insert_ok(&mut client, &operator(1)).await;
    let before = info(&mut client).await;
    let mut node = Node::start().await;
    for command in [
        "get status",
        "hello",
        "blockchain get operator",
        "run client",
    ] {
        let options = SendOptions {
            job_location: 1,
            job_id: 4242,
            ..SendOptions::default()
        };
        node.send(fx.anylog(), command, &[], &options).await;
        let echo = node.next_message(30).await;
        echo.assert_echo("echo", None);
        // Named in full, or by its keywords (the first two words).
        let keywords: Vec<&str> = command.split(' ').take(2).collect();
        let keywords = keywords.join(" ");
        assert!(
            echo.command.contains(&keywords) || echo.text().contains(&keywords),
            "the echo names {command:?}: {echo:?}"
        );
        assert_eq!(
            (echo.header().job_location, echo.header().job_id),
            (1, 4242)
        );
    }
    assert_eq!(info(&mut client).await, before);
    node.expect_nothing_for(QUIET).await;
}

async fn a_reply_ip_of_0_0_0_0_means_the_peer(backend: &str) {
    let fx = start(backend, &[]);
    let mut node = Node::start().await;
    // A node with `set reply ip = dynamic` sends 0.0.0.0: the reply goes to the TCP peer's IP,
    // at the port in the header.
    let options = SendOptions {
        source_ip: Some("0.0.0.0".into()),
        ..SendOptions::default()
    };
    let dest = fx.dest("blockchain.new");
    node.send(
        fx.anylog(),
        &format!("event get_blockchain {dest} 0 0"),
        &[],
        &options,
    )
    .await;
    let file = node.next_file(60).await;
    assert_eq!(
        file.message.header().generic_flag,
        generic_flag::LEDGER_FILE
    );
    assert!(file.bytes.is_empty());
}

/// A gRPC subscriber that must see nothing but the probes while hostile input is sent, and the
/// ledger (lines, head) as it must be.
struct Watcher {
    client: Client,
    events: Streaming<StreamLedgerResponse>,
    lines: Vec<String>,
    before: GetLedgerInfoResponse,
    probes: usize,
}

impl Watcher {
    async fn open(master: &Master) -> Watcher {
        let mut client = master.client().await;
        let mut lines = Vec::new();
        for n in 1..=3 {
            lines.push(insert_ok(&mut client, &operator(n)).await.json);
        }
        let events = watch(&mut client).await;
        let before = info(&mut client).await;
        Watcher {
            client,
            events,
            lines,
            before,
            probes: 0,
        }
    }

    /// After a hostile `case`: the ledger is unchanged; the master still serves the ledger file
    /// over AnyLog and takes an AnyLog push, which is the very next change on the stream.
    async fn assert_unchanged(&mut self, anylog: SocketAddr, case: &str) {
        let now = info(&mut self.client).await;
        assert_eq!(now, self.before, "{case}: the ledger changed");
        let file = Node::start()
            .await
            .get_blockchain(anylog, "/tmp/probe/blockchain.new", "0")
            .await;
        assert_eq!(file.md5(), now.digest, "{case}: the ledger file");
        assert_eq!(file.lines(), self.lines, "{case}: the ledger file");

        self.probes += 1;
        let probe = format!(
            r#"{{"probe": {{"n": {}, "after": {}, "id": "probe-{}", "date": "2026-12-02T00:00:00.000000Z", "ledger": "global"}}}}"#,
            self.probes,
            serde_json::to_string(case).unwrap(),
            self.probes
        );
        let mut node = Node::start().await;
        node.push(anylog, &probe).await;
        let (seq, policy) = next_insert(&mut self.events).await;
        assert_eq!(
            (seq, policy.json.as_str()),
            (now.head_seq + 1, probe.as_str()),
            "{case}: the stream's next change is the probe"
        );
        self.lines.push(probe);
        self.before = info(&mut self.client).await;
        assert_eq!(self.before.head_seq, seq);
        assert_eq!(
            self.before.digest,
            ledger_digest(self.lines.iter().map(String::as_str))
        );
    }
}

/// Deterministic pseudo-random bytes (xorshift).
fn garbage(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// The blocks of a push of `json` from `node`.
fn push_blocks(node: &Node, json: &str) -> Vec<Vec<u8>> {
    encode_message(
        &node.request_header(&SendOptions::default()),
        &format!("blockchain push {json}"),
        &[],
    )
}

/// The blocks of a push of `json` through the `.lmsg` path from `node`.
fn lmsg_blocks(node: &Node, json: &str) -> Vec<Vec<u8>> {
    let options = SendOptions {
        info_type: 0,
        generic_flag: generic_flag::LARGE_MESSAGE,
        ..SendOptions::default()
    };
    encode_message(
        &node.request_header(&options),
        &format!("file write cmd.{}.1.lmsg", node.addr().ip()),
        format!("blockchain push {json}").as_bytes(),
    )
}

/// A ~4 KB complete policy (three `.lmsg` blocks).
fn large(id: &str) -> String {
    format!(
        r#"{{"table": {{"name": "{id}", "dbms": "d", "create": "{}", "id": "{id}", "date": "2026-12-02T00:00:00.000000Z", "ledger": "global"}}}}"#,
        "z".repeat(4000)
    )
}

async fn malformed_messages_change_nothing_and_the_master_keeps_serving(backend: &str) {
    let fx = start(backend, &[]);
    let anylog = fx.anylog();
    let mut watcher = Watcher::open(&fx.master).await;
    // A connection that never sends anything stays open through every case.
    let idle = TcpStream::connect(anylog).await.unwrap();
    watcher.assert_unchanged(anylog, "an idle connection").await;

    // Cases EdgeLake drops without a word: the node hears nothing back.
    type Make = fn(&Node) -> Vec<u8>;
    let silent: [(&str, Make); 7] = [
        ("a first block with counter 2", |node| {
            let mut block = push_blocks(node, &complete("bad", "counter-2")).remove(0);
            set_u32(&mut block, offset::BLOCK_COUNTER, 2);
            block
        }),
        ("a second block with counter 3", |node| {
            let mut blocks = lmsg_blocks(node, &large("counter-3"));
            assert_eq!(blocks.len(), 3);
            set_u32(&mut blocks[1], offset::BLOCK_COUNTER, 3);
            blocks.concat()
        }),
        ("a block cut short", |node| {
            push_blocks(node, &complete("bad", "short")).remove(0)[..1000].to_vec()
        }),
        ("a second block cut short", |node| {
            let blocks = lmsg_blocks(node, &large("short-2"));
            [&blocks[0][..], &blocks[1][..500]].concat()
        }),
        ("a message without its last block", |node| {
            let blocks = lmsg_blocks(node, &large("no-last"));
            blocks[..2].concat()
        }),
        ("a connection closed at once", |_| Vec::new()),
        ("an echo to the master", |node| {
            let options = SendOptions {
                info_type: info_type::ECHO,
                error_code: 1,
                ..SendOptions::default()
            };
            encode_message(
                &node.request_header(&options),
                "echo Command 'hello' not recoginzed",
                &[],
            )
            .concat()
        }),
    ];
    for (case, make) in silent {
        let mut node = Node::start().await;
        let bytes = make(&node);
        // The master may close early on a bad block: a refused write is fine.
        let _ = send_bytes(anylog, &bytes).await;
        node.expect_nothing_for(QUIET).await;
        watcher.assert_unchanged(anylog, case).await;
    }

    // Cases a master may answer with an echo (but nothing else), and must not act on.
    let answered: [(&str, Make); 8] = [
        ("a command length past the block", |node| {
            let mut block = push_blocks(node, &complete("bad", "cmdlen")).remove(0);
            set_u16(&mut block, offset::COMMAND_LEN, 3000);
            block
        }),
        ("a data length past the block", |node| {
            let mut block = push_blocks(node, &complete("bad", "datalen")).remove(0);
            set_u32(&mut block, offset::DATA_LEN, 5000);
            block
        }),
        ("a command longer than the data length", |node| {
            let mut block = push_blocks(node, &complete("bad", "shorter")).remove(0);
            set_u32(&mut block, offset::DATA_LEN, 20);
            block
        }),
        ("a command that is not UTF-8", |node| {
            let mut block = push_blocks(node, &complete("bad", "utf8")).remove(0);
            block[anylog::HEADER_SIZE + 20] = 0xff;
            block
        }),
        ("random garbage blocks", |_| {
            garbage(3 * BLOCK_SIZE, 0x9e37_79b9_7f4a_7c15)
        }),
        ("a little random garbage", |_| garbage(100, 42)),
        ("HTTP/1.1", |_| {
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()
        }),
        ("get_blockchain without its arguments", |node| {
            encode_message(
                &node.request_header(&SendOptions::default()),
                "event get_blockchain",
                &[],
            )
            .concat()
        }),
    ];
    for (case, make) in answered {
        let mut node = Node::start().await;
        let bytes = make(&node);
        let _ = send_bytes(anylog, &bytes).await;
        if let Some(reply) = node.try_next_message(QUIET).await {
            assert!(reply.is_echo(), "{case}: {reply:?}");
            assert_ne!(reply.header().error_code, 0, "{case}: {reply:?}");
        }
        watcher.assert_unchanged(anylog, case).await;
    }
    drop(idle);
    watcher
        .assert_unchanged(anylog, "the idle connection closed")
        .await;
}

async fn idle_and_stalled_connections_do_not_block_others(backend: &str) {
    let fx = start(backend, &[]);
    let anylog = fx.anylog();
    let mut watcher = Watcher::open(&fx.master).await;
    let mut held = Vec::new();
    for n in 0..64 {
        let mut stream = TcpStream::connect(anylog).await.unwrap();
        if n % 2 == 1 {
            // Half a block, then nothing.
            let node = Node::start().await;
            let block = push_blocks(&node, &complete("stalled", &format!("s{n}"))).remove(0);
            stream.write_all(&block[..BLOCK_SIZE / 2]).await.unwrap();
        }
        held.push(stream);
    }
    watcher
        .assert_unchanged(anylog, "64 idle and stalled connections")
        .await;
    drop(held);
    watcher
        .assert_unchanged(anylog, "64 idle and stalled connections dropped")
        .await;
}

async fn stalled_connections_time_out_and_the_limit_leaves_grpc_alone(backend: &str) {
    let fx = start(
        backend,
        &["--anylog-timeout", "1s", "--anylog-max-connections", "8"],
    );
    let anylog = fx.anylog();
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(anylog).await.unwrap());
    }
    let node = Node::start().await;
    let block = push_blocks(&node, &complete("stalled", "half")).remove(0);
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let mut stream = TcpStream::connect(anylog).await.unwrap();
        stream.write_all(&block[..BLOCK_SIZE / 2]).await.unwrap();
        stalled.push(stream);
    }
    // A new gRPC client is served at once, with every AnyLog slot taken.
    let mut client = within(
        10,
        "a gRPC client beside stalled AnyLog connections",
        async {
            let mut client = fx.master.client().await;
            insert_ok(&mut client, &operator(1)).await;
            client
        },
    )
    .await;
    // The master gives up on a node that does not finish its block.
    for (n, stream) in stalled.iter_mut().enumerate() {
        let mut buf = [0u8; 16];
        let what = format!("the master to close stalled connection {n}");
        match within(15, &what, tokio::io::AsyncReadExt::read(stream, &mut buf)).await {
            Ok(0) | Err(_) => {}
            Ok(len) => panic!("stalled connection {n}: {len} bytes back"),
        }
    }
    // AnyLog is served again, the idle connections still open.
    let file = ledger_file(anylog, "/tmp/after-stall/blockchain.new").await;
    assert_eq!(file.md5(), info(&mut client).await.digest);
    let mut events = watch(&mut client).await;
    let mut node = node;
    let policy = complete("sensor", "after-stall");
    node.push(anylog, &policy).await;
    assert_eq!(next_insert(&mut events).await.1.json, policy);
    // Connections that never sent a byte are closed too, in time.
    for (n, stream) in idle.iter_mut().enumerate() {
        let mut buf = [0u8; 16];
        let what = format!("the master to close idle connection {n}");
        match within(30, &what, tokio::io::AsyncReadExt::read(stream, &mut buf)).await {
            Ok(0) | Err(_) => {}
            Ok(len) => panic!("idle connection {n}: {len} bytes back"),
        }
    }
}

/// A node's server that accepts connections and reads nothing until told to; then it reads each
/// connection to its end and tells how many bytes came and how it ended.
struct Sink {
    port: u16,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Vec<(usize, String)>>,
}

impl Sink {
    fn start() -> Sink {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(16).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => held.push(accepted.unwrap().0),
                    _ = &mut stopped => break,
                }
            }
            let mut ends = Vec::new();
            for mut stream in held {
                let mut total = 0;
                let mut buf = vec![0u8; 65536];
                let end = loop {
                    let read = tokio::io::AsyncReadExt::read(&mut stream, &mut buf);
                    match tokio::time::timeout(Duration::from_secs(30), read).await {
                        Err(_) => break "still open after 30s".to_string(),
                        Ok(Ok(0)) => break "closed".to_string(),
                        Ok(Ok(n)) => total += n,
                        Ok(Err(e)) => break format!("closed: {e}"),
                    }
                };
                ends.push((total, end));
            }
            ends
        });
        Sink { port, stop, task }
    }

    /// Reads what every connection held; returns (bytes, how it ended) per connection.
    async fn drain(self) -> Vec<(usize, String)> {
        let _ = self.stop.send(());
        within(120, "draining the sink", self.task).await.unwrap()
    }
}

async fn replies_to_unreachable_or_stalled_nodes_do_not_block_others(backend: &str) {
    let fx = start(backend, &["--anylog-timeout", "2s"]);
    let anylog = fx.anylog();
    // A ledger file of about 8 MB: more than socket buffers hold.
    let client = fx.master.client().await;
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..8 {
        let mut client = client.clone();
        tasks.spawn(async move {
            for n in (task..160).step_by(8) {
                let blob = format!(
                    r#"{{"blob": {{"n": {n}, "data": "{}"}}}}"#,
                    "b".repeat(50_000)
                );
                insert_ok(&mut client, &blob).await;
            }
        });
    }
    while let Some(done) = within(120, "inserting blobs", tasks.join_next()).await {
        done.unwrap();
    }
    let mut client = client;
    let full = ledger_file(anylog, "/tmp/full/blockchain.new").await;
    let mut digest = info(&mut client).await.digest;
    assert_eq!(full.md5(), digest);

    let node = Node::start().await;
    // Nobody listens at this port any more: the connection back is refused.
    let closed_port = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    };
    // A node whose server accepts the file's connection but does not read it.
    let sink = Sink::start();
    let sink_port = sink.port;
    let targets = [
        ("127.0.0.1".to_string(), u32::from(closed_port)),
        ("192.0.2.1".to_string(), 32048),
        ("127.0.0.1".to_string(), u32::from(sink_port)),
        ("127.0.0.1".to_string(), 0),
        ("not an address".to_string(), 1),
    ];
    for (ip, port) in &targets {
        let options = SendOptions {
            source_ip: Some(ip.clone()),
            source_port: Some(*port),
            ..SendOptions::default()
        };
        node.send(
            anylog,
            "event get_blockchain /tmp/sink/blockchain.new 0 0",
            &[],
            &options,
        )
        .await;
        // And an error echo to the same address (not to the sink, which gets the file only).
        if *port != u32::from(sink_port) {
            node.send(anylog, "get status", &[], &options).await;
        }
    }
    // Meanwhile others are served as usual.
    for round in 0..3 {
        let dest = format!("/tmp/other/{round}/blockchain.new");
        let file = within(30, "a ledger file beside unreachable nodes", async {
            Node::start().await.get_blockchain(anylog, &dest, "0").await
        })
        .await;
        assert_eq!(file.md5(), digest);
        insert_ok(&mut client, &operator(round)).await;
        digest = info(&mut client).await.digest;
        let file = Node::start()
            .await
            .file_get(anylog, "/tmp/other/blockchain.json")
            .await;
        assert_eq!(file.md5(), digest);
    }

    // The master gives up on the node that does not read, and says so (the first line naming
    // its address); the file is cut short and the connection closed.
    let needle = format!("127.0.0.1:{sink_port}");
    wait_until(60, "the master to log the stalled node", || {
        let logged = fx.master.logs().contains(&needle);
        async move { logged }
    })
    .await;
    let ends = sink.drain().await;
    let command_len = "file write /tmp/sink/blockchain.master_id_1.new".len();
    let whole = (full.bytes.len() / block_capacity(command_len) + 1) * BLOCK_SIZE;
    match ends.as_slice() {
        [(bytes, end)] => assert!(
            *bytes < whole && end.starts_with("closed"),
            "the file to the stalled node ({whole} bytes whole) is cut and closed: {bytes} bytes, {end}"
        ),
        other => panic!("one connection to the stalled node: {other:?}"),
    }
}

async fn file_writes_from_a_node_never_touch_the_masters_disk(backend: &str) {
    let fx = start(backend, &[]);
    let anylog = fx.anylog();
    let mut watcher = Watcher::open(&fx.master).await;
    let target = fx.dir.path().join("written-by-a-node");
    let names = [
        target.display().to_string(),
        format!("{}.lmsg", target.display()),
        format!("../../{}", target.display()),
        fx.dir.path().join("blockchain.db").display().to_string(),
    ];
    let policy = complete("sensor", "smuggled");
    for name in &names {
        for flag in [0, 1, 2, 3] {
            let mut node = Node::start().await;
            let options = SendOptions {
                generic_flag: flag,
                info_type: 0,
                ..SendOptions::default()
            };
            // For flag 2 a ledger file, which a node may not impose on its master; for flag 3
            // a large command, which may run (this one fails) but is no file to keep.
            let data = if flag == 3 {
                "blockchain drop policy where id = no-such-id".to_string()
            } else {
                format!("{policy}\n")
            };
            node.send(
                anylog,
                &format!("file write {}", name.replace(' ', "\t")),
                data.as_bytes(),
                &options,
            )
            .await;
            if let Some(reply) = node.try_next_message(Duration::from_millis(500)).await {
                assert!(reply.is_echo(), "file write {name} flag {flag}: {reply:?}");
            }
        }
    }
    assert!(!target.exists(), "a node wrote {}", target.display());
    let lmsg = PathBuf::from(format!("{}.lmsg", target.display()));
    assert!(!lmsg.exists(), "a node wrote {}", lmsg.display());
    watcher
        .assert_unchanged(anylog, "file writes to the master's disk")
        .await;
}

async fn grpc_and_anylog_share_the_port_under_load(backend: &str) {
    let fx = start(backend, &[]);
    let anylog = fx.anylog();
    let mut client = fx.master.client().await;
    let mut events = stream(&mut client, 0).await;
    let (_, caught_up) = until_caught_up(&mut events).await;
    assert_eq!(caught_up, 0);
    let per_side = 200;

    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..4 {
        tasks.spawn(async move {
            let mut node = Node::start().await;
            for n in (writer..per_side).step_by(4) {
                node.push(anylog, &complete("anypush", &format!("a{n}")))
                    .await;
            }
            node.expect_nothing_for(Duration::from_millis(200)).await;
        });
    }
    for writer in 0..4 {
        let mut client = client.clone();
        tasks.spawn(async move {
            for n in (writer..per_side).step_by(4) {
                insert_ok(&mut client, &operator(n)).await;
            }
        });
    }
    for reader in 0..3 {
        tasks.spawn(async move {
            let mut node = Node::start().await;
            for round in 0..3 {
                let dest = format!("/tmp/reader{reader}/round{round}/blockchain.new");
                let file = node.get_blockchain(anylog, &dest, "0").await;
                assert!(file.bytes.is_empty() || file.bytes.ends_with(b"\n"));
                for line in file.lines() {
                    serde_json::from_str::<serde_json::Value>(&line)
                        .unwrap_or_else(|e| panic!("a ledger line {line:?}: {e}"));
                }
            }
        });
    }
    within(300, "AnyLog and gRPC traffic together", async {
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
    })
    .await;
    wait_for_count(&client, 2 * per_side as u64).await;

    // The stream got every change once, in seq order.
    let mut lines = Vec::new();
    for expected in 1..=2 * per_side as u64 {
        let (seq, policy) = next_insert(&mut events).await;
        assert_eq!(seq, expected, "a gap or a duplicate");
        lines.push(policy.json);
    }
    let ledger = info(&mut client).await;
    assert_eq!(
        ledger.digest,
        ledger_digest(lines.iter().map(String::as_str))
    );
    let file = ledger_file(anylog, "/tmp/final/blockchain.new").await;
    assert_eq!(file.md5(), ledger.digest);
    assert_eq!(file.lines(), lines);
}

async fn anylog_on_its_own_port(backend: &str) {
    let fx = start(backend, &["--anylog-listen", "127.0.0.1:0"]);
    let anylog = fx.master.anylog_addr();
    assert_ne!(anylog, fx.master.addr);
    let mut client = fx.master.client().await;
    let mut events = watch(&mut client).await;
    let mut node = Node::start().await;
    let policy = complete("sensor", "own-port");
    node.push(anylog, &policy).await;
    assert_eq!(next_insert(&mut events).await.1.json, policy);
    let file = node
        .get_blockchain(anylog, &fx.dest("blockchain.new"), "0")
        .await;
    assert_eq!(file.bytes, format!("{policy}\n").into_bytes());

    // The gRPC port speaks gRPC only now.
    let before = info(&mut client).await;
    let _ = send_bytes(
        fx.master.addr,
        &push_blocks(&node, &complete("sensor", "grpc-port")).concat(),
    )
    .await;
    node.request_blockchain(fx.master.addr, &fx.dest("blockchain.new"), "0")
        .await;
    node.expect_nothing_for(QUIET).await;
    assert_eq!(info(&mut client).await, before);
    insert_ok(&mut client, &operator(1)).await;
    assert_eq!(next_insert(&mut events).await.0, 2);
}

async fn anylog_off_leaves_only_grpc(backend: &str) {
    let fx = start(backend, &["--anylog-listen", "off"]);
    let mut client = fx.master.client().await;
    let mut events = watch(&mut client).await;
    let node = Node::start().await;
    let _ = send_bytes(
        fx.master.addr,
        &push_blocks(&node, &complete("sensor", "off")).concat(),
    )
    .await;
    let mut node = node;
    node.request_blockchain(fx.master.addr, &fx.dest("blockchain.new"), "0")
        .await;
    node.expect_nothing_for(QUIET).await;
    let ledger = info(&mut client).await;
    assert_eq!((ledger.head_seq, ledger.policy_count), (0, 0));
    assert!(
        ledger_testkit::process::logged_anylog_addr(&fx.master.logs()).is_none(),
        "no AnyLog listener:\n{}",
        fx.master.logs()
    );
    let policy = insert_ok(&mut client, &operator(1)).await;
    assert_eq!(next_insert(&mut events).await.1, policy);
}

async fn write_from_refuses_other_networks_but_serves_the_ledger(backend: &str) {
    let fx = start(backend, &["--anylog-write-from", "10.0.0.0/8"]);
    let anylog = fx.anylog();
    let mut client = fx.master.client().await;
    let stored = insert_ok(&mut client, &operator(1)).await;
    let before = info(&mut client).await;
    let mut node = Node::start().await;

    node.push(anylog, &complete("sensor", "refused")).await;
    node.next_message(30).await.assert_echo("echo", None);
    node.push_ignore(anylog, &complete("sensor", "refused-too"))
        .await;
    node.next_message(30).await.assert_echo("echo", None);
    node.drop_policy(anylog, &stored.id).await;
    node.next_message(30).await.assert_echo("echo", None);
    node.send_lmsg(
        anylog,
        &format!("blockchain push {}", large("refused-large")),
    )
    .await;
    node.next_message(30).await.assert_echo("echo", None);
    // The header's source IP is what the node claims; it does not open the door.
    let claimed = SendOptions {
        source_ip: Some("10.1.2.3".into()),
        ..SendOptions::default()
    };
    node.send(
        anylog,
        &format!("blockchain push {}", complete("sensor", "claimed")),
        &[],
        &claimed,
    )
    .await;
    node.expect_nothing_for(QUIET).await;
    assert_eq!(info(&mut client).await, before, "nothing stored or dropped");

    // Reading is not writing.
    let file = node
        .get_blockchain(anylog, &fx.dest("blockchain.new"), "0")
        .await;
    assert_eq!(file.md5(), before.digest);
    let file = node.file_get(anylog, &fx.dest("blockchain.json")).await;
    assert_eq!(file.md5(), before.digest);

    // A listed network may write.
    let open = start(backend, &["--anylog-write-from", "10.0.0.0/8,127.0.0.0/8"]);
    let mut open_client = open.master.client().await;
    let mut events = watch(&mut open_client).await;
    let policy = complete("sensor", "allowed");
    node.push(open.anylog(), &policy).await;
    assert_eq!(next_insert(&mut events).await.1.json, policy);
    node.expect_nothing_for(QUIET).await;
}

/// Nodes that stall mid-message, on the shared port and on a port of its own, do not hold the
/// master's exit: it stops within its grace period and exits 0, with what was pushed kept.
async fn sigterm_does_not_wait_for_stalled_nodes(backend: &str) {
    let mut fx = start(
        backend,
        &["--anylog-timeout", "120s", "--shutdown-grace", "5s"],
    );
    let anylog = fx.anylog();
    let mut node = Node::start().await;
    node.push(anylog, &complete("config", "kept")).await;
    let client = fx.master.client().await;
    wait_for_count(&client, 1).await;
    let mut held = Vec::new();
    for n in 0..8 {
        let mut stream = TcpStream::connect(anylog).await.unwrap();
        let block = push_blocks(&node, &complete("stalled", &format!("s{n}"))).remove(0);
        stream.write_all(&block[..BLOCK_SIZE / 2]).await.unwrap();
        held.push(stream);
    }
    // Let the master take them in before the signal.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let exit = fx.master.terminate();
    let took = started.elapsed();
    assert!(
        exit.success(),
        "master exited with {exit}:\n{}",
        fx.master.logs()
    );
    assert!(
        took < Duration::from_secs(15),
        "the master took {took:?} to stop with stalled AnyLog nodes:\n{}",
        fx.master.logs()
    );
    drop(held);
    fx.master.restart();
    let mut client = fx.master.client().await;
    let kept = get(&mut client, "kept")
        .await
        .expect("the pushed policy survives");
    assert_eq!(kept.id, "kept");
}
