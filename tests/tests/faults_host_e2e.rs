//! The fault suite, faults of the host: a full disk under the master and under a member, and a
//! writer thread that fails. Each prints a `faults:` line with its figures (run with
//! `--nocapture`) and asserts that no acknowledged write is lost.

use std::time::{Duration, Instant};

use ledger_proto::errors::{self, Reason};
use ledger_proto::pb;
use ledger_testkit::client::{
    all_policies, assert_refused, info, insert, next_change, stream, until_caught_up,
};
use ledger_testkit::member::{applied_seq, file_md5};
use ledger_testkit::tmpfs::Tmpfs;
use ledger_testkit::{Master, Member, ledger_digest, wait_until, within};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;

/// A policy of about `padding` bytes.
fn policy(n: usize, padding: usize) -> String {
    format!(
        r#"{{"operator": {{"name": "op{n}", "ip": "10.0.{}.{}", "padding": "{}"}}}}"#,
        n / 250 % 250,
        n % 250,
        "p".repeat(padding)
    )
}

/// The master's disk fills up: inserts are refused with RESOURCE_EXHAUSTED naming the full disk,
/// the writes' health says NOT_SERVING while reads and streams go on, writes come back once
/// space is freed, and every acknowledged insert survives a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_master() {
    let disk = Tmpfs::mount(16 << 20);
    let mut master = Master::start(disk.path(), &[]);
    let mut client = master.client().await;
    let mut watcher = stream(&mut client, 0).await;
    until_caught_up(&mut watcher).await;
    let filler = disk.fill(512 << 10);
    let mut acknowledged = Vec::new();
    let refusal = within(120, "the disk to fill up", async {
        for n in 0.. {
            match insert(&mut client, &policy(n, 2048)).await {
                Ok(policy) => acknowledged.push(policy),
                Err(status) => return status,
            }
        }
        unreachable!()
    })
    .await;
    assert_refused(&refusal, Reason::DiskFull, &[]);
    assert_eq!(
        master.health("ledger.v1.LedgerService/writes").await,
        ServingStatus::NotServing
    );
    assert_eq!(
        master.health("ledger.v1.LedgerService").await,
        ServingStatus::Serving,
        "reads and streams go on"
    );
    // The watcher got every acknowledged insert, in order, and reads are served.
    for policy in &acknowledged {
        let change = within(10, "the watcher's change", next_change(&mut watcher)).await;
        assert_eq!(change.seq, policy.seq);
    }
    assert_eq!(
        info(&mut client).await.policy_count,
        acknowledged.len() as u64
    );
    // Space freed: writes come back, and the writes' health with them.
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    let n = acknowledged.len();
    let again = within(30, "an insert after space was freed", async {
        loop {
            match insert(&mut client, &policy(n, 2048)).await {
                Ok(policy) => return policy,
                Err(status) if errors::reason(&status) == Some(Reason::DiskFull) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(status) => panic!("{status:?}"),
            }
        }
    })
    .await;
    let writes_back = freed.elapsed();
    acknowledged.push(again);
    assert_eq!(
        master.health("ledger.v1.LedgerService/writes").await,
        ServingStatus::Serving
    );
    // A crash loses nothing acknowledged.
    master.kill9();
    master.restart();
    let stored = all_policies(&mut master.client().await).await;
    let lost = acknowledged.iter().filter(|p| !stored.contains(p)).count();
    println!(
        "faults: disk full under the master: {} acknowledged, {lost} lost, refused with {:?} ({:?}), writes back {writes_back:?} after space was freed",
        acknowledged.len(),
        refusal.code(),
        refusal.message()
    );
    assert_eq!(lost, 0);
    assert_eq!(stored.len(), acknowledged.len());
}

/// Whether `bytes` is a complete ledger: whole lines, each a JSON object.
fn complete_lines(bytes: &[u8]) -> Vec<String> {
    assert!(
        bytes.is_empty() || bytes.ends_with(b"\n"),
        "the file ends in a torn line"
    );
    let text = std::str::from_utf8(bytes).expect("the file is UTF-8");
    text.lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).expect("a line is JSON");
            assert!(value.is_object(), "a line is an object: {line}");
            line.to_string()
        })
        .collect()
}

/// A member's disk fills up: its file stays a complete ledger consistent with its recorded seq
/// (a prefix of the master's), the member says why it is stuck, and it catches up by itself
/// once space is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_a_member() {
    let master_dir = tempfile::tempdir().unwrap();
    let master = Master::start(master_dir.path(), &[]);
    let disk = Tmpfs::mount(4 << 20);
    let member = Member::start(disk.path(), &[master.addr.to_string()], &[]);
    let mut client = master.client().await;
    for n in 0..10 {
        insert(&mut client, &policy(n, 100)).await.unwrap();
    }
    let converged = |member: &Member, master: &Master| {
        let file = member.file.clone();
        let url = master.url();
        async move {
            let what = format!("{} to equal the master's ledger", file.display());
            wait_until(60, &what, || {
                let (file, url) = (file.clone(), url.clone());
                async move {
                    let Ok(mut client) =
                        pb::ledger_service_client::LedgerServiceClient::connect(url).await
                    else {
                        return false;
                    };
                    let info = info(&mut client).await;
                    file_md5(&file) == Some(info.digest)
                        && applied_seq(&file) == Some(info.head_seq)
                }
            })
            .await
        }
    };
    converged(&member, &master).await;
    let filler = disk.fill(64 << 10);
    let mut acknowledged = 10;
    for n in 10..400 {
        insert(&mut client, &policy(n, 1024)).await.unwrap();
        acknowledged += 1;
    }
    wait_until(60, "the member to report the full disk", || async {
        member.run_logs().contains("No space left on device")
    })
    .await;
    // Stuck, the file is a complete ledger: the master's first policies, as recorded.
    let lines = complete_lines(&member.file_bytes());
    let ledger = all_policies(&mut client).await;
    let stuck_at = lines.len();
    assert!(stuck_at < ledger.len(), "the member could not have kept up");
    let prefix: Vec<&str> = ledger[..stuck_at].iter().map(|p| p.json.as_str()).collect();
    assert_eq!(lines, prefix, "the file is a prefix of the master's ledger");
    assert_eq!(
        file_md5(&member.file),
        Some(ledger_digest(prefix.iter().copied()))
    );
    assert_eq!(
        applied_seq(&member.file),
        Some(ledger[stuck_at - 1].seq),
        "the recorded seq is the file's"
    );
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    converged(&member, &master).await;
    println!(
        "faults: disk full under a member: {acknowledged} acknowledged, 0 lost, file stuck at {stuck_at} complete lines, caught up {:?} after space was freed",
        freed.elapsed()
    );
}

/// The writer thread fails (a failpoint makes it panic on its third transaction): the master
/// turns NOT_SERVING, answers UNAVAILABLE, drains and exits non-zero, and what it acknowledged
/// before is all there after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_writer_stops_the_master() {
    let dir = tempfile::tempdir().unwrap();
    let mut master = Master::start_with_env(
        dir.path(),
        &["--shutdown-grace", "2s"],
        &[(
            "FAILPOINTS",
            "writer-apply=2*off->panic(injected writer fault)",
        )],
    );
    let mut client = master.client().await;
    let mut acknowledged = Vec::new();
    for n in 0..2 {
        acknowledged.push(insert(&mut client, &policy(n, 10)).await.unwrap());
    }
    let mut watch = master
        .health_client()
        .await
        .watch(HealthCheckRequest {
            service: "ledger.v1.LedgerService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = within(10, "the first health status", watch.message()).await;
    assert_eq!(
        first.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    let failed = insert(&mut client, &policy(2, 10)).await.unwrap_err();
    // The writer is gone: the master stops, and says so.
    assert_refused(&failed, Reason::ShuttingDown, &[]);
    let next = within(10, "NOT_SERVING", watch.message()).await;
    assert_eq!(
        next.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    let exit = master.wait_exit(Duration::from_secs(30));
    assert!(!exit.success(), "the master exited with {exit}");
    assert!(
        master.logs().contains("injected writer fault"),
        "the log says why:\n{}",
        master.logs()
    );
    master.clear_env();
    master.restart();
    let stored = all_policies(&mut master.client().await).await;
    let lost = acknowledged.iter().filter(|p| !stored.contains(p)).count();
    println!(
        "faults: writer thread panics: {} acknowledged, {lost} lost, the master exited with {exit}",
        acknowledged.len()
    );
    assert_eq!(lost, 0);
}
