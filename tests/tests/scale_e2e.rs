//! Scale-out on a real PostgreSQL: several real `master` processes on one database serve one
//! ledger, members fail over between them, and the masters ride out a lost database.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ledger_proto::errors::{self, Reason, key};
use ledger_proto::pb::ledger_service_client::LedgerServiceClient;
use ledger_proto::pb::stream_ledger_response::Event;
use ledger_proto::pb::{GetLedgerInfoRequest, GetPolicyRequest};
use ledger_testkit::client::{Client, assert_refused, next_change, stream, until_caught_up};
use ledger_testkit::{Master, Member, PostgresServer, wait_until, within};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Masters on one fresh PostgreSQL database, each in its own directory.
struct Cluster {
    masters: Vec<Master>,
    database: String,
    _dirs: Vec<tempfile::TempDir>,
}

/// The database name at the end of a URL.
fn database_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap()
}

fn cluster(count: usize, args: &[&str]) -> Cluster {
    let database = PostgresServer::get().create_database();
    let dirs: Vec<_> = (0..count).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut all = vec!["--database-url", database.as_str()];
    all.extend_from_slice(args);
    let masters = dirs.iter().map(|d| Master::start(d.path(), &all)).collect();
    Cluster {
        masters,
        database,
        _dirs: dirs,
    }
}

async fn insert(client: &mut Client, json: &str) -> Result<String, tonic::Status> {
    ledger_testkit::client::insert(client, json)
        .await
        .map(|p| p.id)
}

async fn digest(client: &mut Client) -> (u64, String) {
    let info = within(
        30,
        "GetLedgerInfo",
        client.get_ledger_info(GetLedgerInfoRequest {}),
    )
    .await
    .unwrap()
    .into_inner();
    (info.head_seq, info.digest)
}

fn config(writer: usize, n: usize) -> String {
    format!(r#"{{"config": {{"writer": {writer}, "n": {n}}}}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_masters_serve_one_ledger_live() {
    // With the fallback read an hour away, only notifications can deliver the other masters'
    // commits within the test's time limits.
    let cluster = cluster(3, &["--notify-fallback", "1h"]);
    // A member process on each master as well as a stream read here.
    let member_dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let members: Vec<Member> = cluster
        .masters
        .iter()
        .zip(&member_dirs)
        .map(|(master, dir)| Member::start(dir.path(), &[master.addr.to_string()], &[]))
        .collect();
    let mut clients = Vec::new();
    let mut streams = Vec::new();
    for master in &cluster.masters {
        let mut client = master.client().await;
        let mut events = stream(&mut client, 0).await;
        until_caught_up(&mut events).await;
        streams.push(events);
        clients.push(client);
    }
    let per_writer = 40;
    let writers: Vec<_> = (0..6)
        .map(|w| {
            let mut client = clients[w % 3].clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for n in 0..per_writer {
                    ids.push(insert(&mut client, &config(w, n)).await.unwrap());
                }
                ids
            })
        })
        .collect();
    let mut acknowledged = BTreeSet::new();
    for writer in writers {
        acknowledged.extend(within(120, "writers", writer).await.unwrap());
    }
    let total = 6 * per_writer;
    assert_eq!(acknowledged.len(), total);
    // Every master's subscriber gets every change, each once, in seq order: the seq means the
    // same on every master.
    for events in &mut streams {
        let mut seen = BTreeSet::new();
        for expected in 1..=total as u64 {
            let event = next_change(events).await;
            assert_eq!(event.seq, expected, "a gap or a duplicate");
            let Some(Event::Inserted(policy)) = event.event else {
                panic!("expected an insert");
            };
            seen.insert(policy.id);
        }
        assert_eq!(seen, acknowledged);
    }
    let first = digest(&mut clients[0]).await;
    assert_eq!(first.0, total as u64);
    for client in &mut clients[1..] {
        assert_eq!(digest(client).await, first);
    }
    for member in &members {
        wait_until(60, "every member to converge to the same digest", || {
            let md5 = member.file_md5();
            let expected = first.1.clone();
            async move { md5 == Some(expected) }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_policy_through_every_master_is_stored_once() {
    let cluster = cluster(3, &[]);
    let mut clients = Vec::new();
    for master in &cluster.masters {
        clients.push(master.client().await);
    }
    for round in 0..20 {
        let json = config(99, round);
        let attempts: Vec<_> = clients
            .iter()
            .map(|client| {
                let mut client = client.clone();
                let json = json.clone();
                tokio::spawn(async move { insert(&mut client, &json).await })
            })
            .collect();
        let mut won = 0;
        for attempt in attempts {
            match attempt.await.unwrap() {
                Ok(_) => won += 1,
                Err(status) => assert_refused(&status, Reason::PolicyExists, &[]),
            }
        }
        assert_eq!(won, 1, "round {round}: exactly one insert wins");
    }
    assert_eq!(digest(&mut clients[0]).await.0, 20);
}

#[test]
fn masters_starting_together_apply_the_migrations_once() {
    let database = PostgresServer::get().create_database();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let masters: Vec<Master> = std::thread::scope(|scope| {
        let started: Vec<_> = dirs
            .iter()
            .map(|dir| {
                let database = database.clone();
                scope.spawn(move || Master::start(dir.path(), &["--database-url", &database]))
            })
            .collect();
        started.into_iter().map(|s| s.join().unwrap()).collect()
    });
    let applied = masters
        .iter()
        .filter(|m| m.logs().contains("applied migration"))
        .count();
    assert_eq!(applied, 1, "exactly one master applies the migrations");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut first = masters[0].client().await;
        let id = insert(&mut first, &config(1, 1)).await.unwrap();
        let mut last = masters[2].client().await;
        within(30, "GetPolicy", last.get_policy(GetPolicyRequest { id }))
            .await
            .unwrap();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_fails_over_to_another_master_without_a_reset() {
    let mut cluster = cluster(2, &[]);
    let addresses: Vec<String> = cluster.masters.iter().map(|m| m.addr.to_string()).collect();
    let dir = tempfile::tempdir().unwrap();
    let member = Member::start(dir.path(), &addresses, &["--retry-max", "500ms"]);
    let mut first = cluster.masters[0].client().await;
    for n in 0..10 {
        insert(&mut first, &config(1, n)).await.unwrap();
    }
    let expected = digest(&mut first).await.1;
    wait_until(60, "the member to follow the first master", || {
        let md5 = member.file_md5();
        let expected = expected.clone();
        async move { md5 == Some(expected) }
    })
    .await;
    cluster.masters[0].kill9();
    let mut second = cluster.masters[1].client().await;
    for n in 0..10 {
        insert(&mut second, &config(2, n)).await.unwrap();
    }
    let (head, expected) = digest(&mut second).await;
    assert_eq!(head, 20);
    wait_until(60, "the member to follow the second master", || {
        let md5 = member.file_md5();
        let expected = expected.clone();
        async move { md5 == Some(expected) }
    })
    .await;
    let logs = member.logs();
    assert_eq!(
        logs.matches("the master sends a snapshot").count(),
        1,
        "only the first connection gets a snapshot:\n{logs}"
    );
    assert!(
        logs.contains(&format!("connected to master {}", addresses[1])),
        "{logs}"
    );
}

/// Inserts `count` policies of `writer`, retrying a call the database outage refused until it
/// is stored (ALREADY_EXISTS means an earlier try committed). Returns the ids.
async fn insert_through_outages(mut client: Client, writer: usize, count: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for n in 0..count {
        let json = config(writer, n);
        loop {
            match insert(&mut client, &json).await {
                Ok(id) => {
                    ids.push(id);
                    break;
                }
                Err(status) if errors::reason(&status) == Some(Reason::PolicyExists) => {
                    let id = errors::metadata(&status, key::POLICY_ID).expect("the id refused");
                    ids.push(id);
                    break;
                }
                Err(status) => {
                    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masters_recover_when_their_database_connections_drop_under_load() {
    let cluster = cluster(2, &["--db-timeout", "2s"]);
    let addresses: Vec<String> = cluster.masters.iter().map(|m| m.addr.to_string()).collect();
    let member_dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let members: Vec<Member> = (0..2)
        .map(|i| {
            Member::start(
                member_dirs[i].path(),
                &addresses[i..=i],
                &["--retry-max", "500ms"],
            )
        })
        .collect();
    let mut clients = Vec::new();
    for master in &cluster.masters {
        clients.push(master.client().await);
    }
    let writers: Vec<_> = (0..4)
        .map(|w| tokio::spawn(insert_through_outages(clients[w % 2].clone(), w, 100)))
        .collect();
    // Cut every connection of the masters to their database, twice, while they write.
    let name = database_name(&cluster.database).to_string();
    let done = Arc::new(AtomicBool::new(false));
    let cutter = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut cuts = 0;
            for _ in 0..2 {
                std::thread::sleep(std::time::Duration::from_millis(200));
                if done.load(Ordering::SeqCst) {
                    break;
                }
                PostgresServer::get().admin(&format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = '{name}' AND pid <> pg_backend_pid()"
                ));
                cuts += 1;
            }
            cuts
        })
    };
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(
            within(180, "writers through the outage", writer)
                .await
                .unwrap(),
        );
    }
    done.store(true, Ordering::SeqCst);
    assert_eq!(
        cutter.join().unwrap(),
        2,
        "both cuts happened while the writers wrote"
    );
    assert_eq!(acknowledged.len(), 400);
    for master in &cluster.masters {
        assert!(
            master.logs().contains("lost the connection that listens"),
            "the cut reached the master:\n{}",
            master.logs()
        );
    }
    for client in &mut clients {
        for id in &acknowledged {
            within(
                30,
                "GetPolicy",
                client.get_policy(GetPolicyRequest { id: id.clone() }),
            )
            .await
            .unwrap_or_else(|e| panic!("acknowledged policy {id} lost: {e:?}"));
        }
    }
    let expected = digest(&mut clients[0]).await;
    assert_eq!(expected.0, 400);
    assert_eq!(digest(&mut clients[1]).await, expected);
    for member in &members {
        wait_until(60, "every member to converge after the outage", || {
            let md5 = member.file_md5();
            let expected = expected.1.clone();
            async move { md5 == Some(expected) }
        })
        .await;
    }
}

async fn health_of(channel: &Channel) -> Option<i32> {
    health_of_service(channel, "ledger.v1.LedgerService").await
}

async fn health_of_service(channel: &Channel, service: &str) -> Option<i32> {
    let mut health = HealthClient::new(channel.clone());
    let request = HealthCheckRequest {
        service: service.into(),
    };
    health
        .check(request)
        .await
        .ok()
        .map(|r| r.into_inner().status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_without_its_database_is_not_serving_and_recovers_by_itself() {
    let cluster = cluster(1, &["--db-timeout", "1s", "--db-check-interval", "200ms"]);
    let master = &cluster.masters[0];
    let channel = Channel::from_shared(master.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = LedgerServiceClient::new(channel.clone());
    insert(&mut client, &config(1, 1)).await.unwrap();
    let mut events = stream(&mut client, 0).await;
    until_caught_up(&mut events).await;
    assert_eq!(
        health_of(&channel).await,
        Some(ServingStatus::Serving as i32)
    );

    let name = database_name(&cluster.database).to_string();
    PostgresServer::get().admin(&format!(
        "ALTER DATABASE {name} ALLOW_CONNECTIONS false; \
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    ));
    wait_until(30, "NOT_SERVING", || {
        let channel = channel.clone();
        async move { health_of(&channel).await == Some(ServingStatus::NotServing as i32) }
    })
    .await;
    // The server as a whole (a probe naming no service) says the same.
    assert_eq!(
        health_of_service(&channel, "").await,
        Some(ServingStatus::NotServing as i32)
    );
    // Open streams end, so their subscribers can move to a master that can serve them.
    let ended = loop {
        match within(30, "the stream to end", events.message()).await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_refused(&ended, Reason::DatabaseUnavailable, &[]);
    let refused = insert(&mut client, &config(1, 2)).await.unwrap_err();
    assert_refused(&refused, Reason::DatabaseUnavailable, &[]);

    PostgresServer::get().admin(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"));
    wait_until(30, "SERVING again", || {
        let channel = channel.clone();
        async move { health_of(&channel).await == Some(ServingStatus::Serving as i32) }
    })
    .await;
    assert_eq!(
        health_of_service(&channel, "").await,
        Some(ServingStatus::Serving as i32)
    );
    insert(&mut client, &config(1, 2)).await.unwrap();
    let mut resumed = stream(&mut client, 1).await;
    let event = next_change(&mut resumed).await;
    assert_eq!(event.seq, 2);
    assert!(master.logs().contains("the database does not answer"));
    assert!(master.logs().contains("the database answers again"));
}
