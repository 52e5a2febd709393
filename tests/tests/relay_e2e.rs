//! Relays end to end: the real `master` (SQLite) and `member --serve` binaries chained over TCP
//! on loopback, members below them, and the real files and mirror databases.

use std::path::Path;

use ledger_member::paths::LedgerPaths;
use ledger_proto::pb;
use ledger_proto::pb::ledger_service_client::LedgerServiceClient;
use ledger_proto::pb::stream_ledger_response::Event;
use ledger_tests::client::{delete_ok as delete, insert_ok as insert};
use ledger_tests::member::{applied_seq, file_md5};
use ledger_tests::{Master, Member, wait_until, within};
use tonic::transport::Channel;

type Client = LedgerServiceClient<Channel>;

/// How long a chain may take to converge: generous, since speed is not what is tested.
const CONVERGE_SECS: u64 = 60;

/// What members and relays log when they get a full snapshot.
const SNAPSHOT_LOG: &str = "the master sends a snapshot";

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

/// Waits until every file (relays' and members') is the master's ledger (md5 equal to the
/// master's digest, recorded seq equal to its head), and every relay answers `GetLedgerInfo`
/// with the master's digest and head.
async fn converge(master: &Master, relays: &[&Member], members: &[&Member]) {
    let master_client = master.client().await;
    for node in relays.iter().chain(members) {
        let file = node.file.clone();
        let what = format!("{} to equal the master's ledger", file.display());
        wait_until(CONVERGE_SECS, &what, || {
            let mut master_client = master_client.clone();
            let file = file.clone();
            async move {
                let Some(info) = info(&mut master_client).await else {
                    return false;
                };
                file_md5(&file) == Some(info.digest) && applied_seq(&file) == Some(info.head_seq)
            }
        })
        .await;
    }
    for relay in relays {
        let relay_client = relay.client().await;
        let what = format!("relay {} to serve the master's ledger", relay.relay_addr());
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
        .stream_ledger(pb::StreamLedgerRequest { after_seq })
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
    let first = Member::start_relay(dirs[1].path(), &[master.addr.to_string()], &[]);
    let second = Member::start_relay(dirs[2].path(), &[first.relay_addr()], &[]);
    let member = Member::start(dirs[3].path(), &[second.relay_addr()], &[]);
    converge(&master, &[&first, &second], &[&member]).await;

    // Live inserts and deletes on the master travel down the chain.
    for n in 10..25 {
        ids.push(insert(&mut client, &operator(n)).await.id);
    }
    for id in ids.iter().step_by(4) {
        delete(&mut client, id).await;
    }
    converge(&master, &[&first, &second], &[&member]).await;
    assert!(LedgerPaths::new(&first.file).relay_db.exists());

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
    assert_eq!(direct.code(), tonic::Code::AlreadyExists);
    assert_eq!(
        (relayed.code(), relayed.message()),
        (direct.code(), direct.message())
    );
    let missing = || pb::DeletePolicyRequest {
        id: "no-such-id".into(),
    };
    let direct = client.delete_policy(missing()).await.unwrap_err();
    let relayed = last.delete_policy(missing()).await.unwrap_err();
    assert_eq!(direct.code(), tonic::Code::NotFound);
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
    assert_eq!(gone.code(), tonic::Code::NotFound);
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
    let relay = Member::start_relay(dirs[1].path(), &[master.addr.to_string()], &[]);
    let member = Member::start(dirs[2].path(), &[relay.relay_addr()], &[]);
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
    let mut relay = Member::start_relay(dirs[1].path(), &[master.addr.to_string()], &[]);
    let member = Member::start(dirs[2].path(), &[relay.relay_addr()], &[]);
    converge(&master, &[&relay], &[&member]).await;
    for n in 10..20 {
        ids.push(insert(&mut client, &operator(n)).await.id);
    }
    converge(&master, &[&relay], &[&member]).await;
    let before = applied_seq(&relay.file).unwrap();

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
        logs.contains(&format!("resuming from seq {before}")),
        "{logs}"
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

/// Copies the relay's mirror database (and its WAL files) from `from` to `to`, which are
/// `blockchain.json.relay.db` paths of a stopped relay.
fn copy_mirror(from: &Path, to: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let source = format!("{}{suffix}", from.display());
        let target = format!("{}{suffix}", to.display());
        let _ = std::fs::remove_file(&target);
        if Path::new(&source).exists() {
            std::fs::copy(&source, &target).expect("copying the mirror");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_behind_the_file_catches_up_without_a_snapshot() {
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
    let mut relay = Member::start_relay(relay_dir.path(), &[master.addr.to_string()], &[]);
    converge(&master, &[&relay], &[]).await;
    let mirror = LedgerPaths::new(&relay.file).relay_db;
    let saved = backup.path().join("relay.db");
    assert!(relay.terminate().success());
    copy_mirror(&mirror, &saved);

    relay.restart();
    for n in 10..20 {
        insert(&mut client, &operator(n)).await;
    }
    delete(&mut client, &ids[2]).await;
    converge(&master, &[&relay], &[]).await;
    assert!(relay.terminate().success());
    // What a crash between the file's write and the mirror's leaves: a mirror behind the file.
    copy_mirror(&saved, &mirror);

    relay.restart();
    relay
        .wait_for_log(
            30,
            "the relay's mirror is at seq 10, behind the file at seq 21",
        )
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
    let mut relay = Member::start_relay(dirs[1].path(), &[master.addr.to_string()], &[]);
    let member = Member::start(dirs[2].path(), &[relay.relay_addr()], &[]);
    converge(&master, &[&relay], &[&member]).await;

    relay.kill9();
    for n in 10..30 {
        insert(&mut client, &operator(n)).await;
    }
    let pruned = info(&mut client).await.unwrap().oldest_replayable_seq;
    assert!(pruned > 10, "the master pruned past the relay: {pruned}");
    relay.restart();
    converge(&master, &[&relay], &[&member]).await;
    // The relay got a snapshot, replaced its mirror, and the member below, now behind what the
    // relay can replay, got one too.
    assert_eq!(relay.run_logs().matches(SNAPSHOT_LOG).count(), 1);
    assert!(relay.run_logs().contains("replaced the relay's mirror"));
    assert_eq!(
        member.logs().matches(SNAPSHOT_LOG).count(),
        2,
        "{}",
        member.logs()
    );

    insert(&mut client, &operator(99)).await;
    converge(&master, &[&relay], &[&member]).await;
}
