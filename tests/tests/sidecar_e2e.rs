//! The member beside an EdgeLake node: a fake node appends to the member's `blockchain.json` as
//! a real one does (`blockchain insert ... local=true` lines, local delete tombstones, and
//! garbage), at random moments while the member applies bursts of inserts and deletes and
//! across a `kill -9`. Nothing the node writes is lost, no line of the file is ever a fragment,
//! and every member ends with the master's ledger.

use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use ledger_proto::pb;
use ledger_proto::pb::ledger_service_client::LedgerServiceClient;
use ledger_testkit::client::{all_policies, delete_ok as delete, insert_ok as insert};
use ledger_testkit::member::{applied_seq, file_md5, member_command};
use ledger_testkit::{Master, Member, wait_until};
use tonic::transport::Channel;

type Client = LedgerServiceClient<Channel>;

const CONVERGE_SECS: u64 = 60;

/// What a node appends for `blockchain insert where policy=... and local=true`.
fn local_policy(n: usize) -> String {
    format!(
        r#"{{"config": {{"name": "local-{n}", "company": "Acme", "id": "local-id-{n}", "date": "2026-12-01T10:00:{:02}.{:06}Z", "ledger": "local"}}}}"#,
        n % 60,
        n
    )
}

/// The same policy as the ledger holds it once pushed.
fn global_policy(n: usize) -> String {
    local_policy(n).replace(r#""ledger": "local""#, r#""ledger": "global""#)
}

/// Lines of garbage a node or an editor may leave.
const GARBAGE: [&str; 3] = [
    "not json at all",
    r#"fa3e578a08939689", "date": "2026-12-01T10:00:00Z", "ledger": "local"}}"#,
    r#"{"a": {}, "b": {}}"#,
];

fn operator(n: usize) -> String {
    format!(r#"{{"operator": {{"name": "op{n}", "company": "Acme", "port": {n}}}}}"#)
}

/// Appends `text` to the file in one write, as a node does.
fn node_appends(file: &Path, text: &str) {
    let mut out = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(file)
        .unwrap();
    out.write_all(text.as_bytes()).unwrap();
}

/// Reads the file over and over while `running`, as the node's readers do, and fails on any
/// complete line that is neither a policy nor one of the node's own garbage lines: a line the
/// member glued to, or tore out of, someone's bytes.
fn watch_for_fragments(file: PathBuf, running: Arc<AtomicBool>) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut reads = 0;
        while running.load(Ordering::Relaxed) {
            let Ok(bytes) = std::fs::read(&file) else {
                continue;
            };
            reads += 1;
            let text = String::from_utf8(bytes).expect("the file is UTF-8");
            let complete = match text.rfind('\n') {
                Some(end) => &text[..end],
                None => "",
            };
            for line in complete.split('\n').filter(|l| !l.is_empty()) {
                let ok = GARBAGE.contains(&line)
                    || serde_json::from_str::<serde_json::Value>(line)
                        .is_ok_and(|v| v.as_object().is_some_and(|o| o.len() == 1));
                assert!(ok, "a fragment in the file: {line:?}");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        reads
    })
}

/// The fake node: `count` appends at random moments, a local policy most of the time, a local
/// delete of one of its earlier policies or a garbage line now and then. Returns the numbers
/// of the local policies that must stay, those it deleted, and the garbage lines it wrote.
fn fake_node(
    file: PathBuf,
    count: usize,
    first: usize,
    paused: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(Vec<usize>, Vec<usize>, usize)> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut deleted = Vec::new();
        let mut garbage = 0;
        let mut n = first;
        while kept.len() + deleted.len() + garbage < count {
            std::thread::sleep(Duration::from_micros(fastrand::u64(500..20_000)));
            if paused.load(Ordering::Relaxed) {
                continue;
            }
            match fastrand::u32(0..10) {
                0 if kept.len() > 2 => {
                    let gone: usize = kept.remove(fastrand::usize(0..kept.len()));
                    node_appends(
                        &file,
                        &format!(
                            "{{\"deleted\": {{ \"id\" : \"local-id-{gone}\", \"ledger\" : \"local\" }}}}\n"
                        ),
                    );
                    deleted.push(gone);
                }
                1 => {
                    node_appends(&file, &format!("{}\n", GARBAGE[garbage % GARBAGE.len()]));
                    garbage += 1;
                }
                _ => {
                    node_appends(&file, &format!("{}\n", local_policy(n)));
                    kept.push(n);
                    n += 1;
                }
            }
        }
        (kept, deleted, garbage)
    })
}

async fn ledger_lines(client: &mut Client) -> Vec<String> {
    all_policies(client)
        .await
        .into_iter()
        .map(|p| p.json)
        .collect()
}

/// A master with one policy, and a member of it in its own directory, in sync.
async fn start(dir: &Path, master_args: &[&str]) -> (Master, Member, Client) {
    let master = Master::start(dir, master_args);
    let member_dir = dir.join("node");
    std::fs::create_dir_all(&member_dir).unwrap();
    let member = Member::start(&member_dir, &[master.addr.to_string()], &[]);
    let mut client = master.client().await;
    insert(&mut client, &operator(0)).await;
    converge(&master, &member).await;
    (master, member, client)
}

/// Waits until the member's file is the master's ledger (md5 = digest, seq = head) and no
/// foreign line waits in its journal.
async fn converge(master: &Master, member: &Member) {
    let client = master.client().await;
    let file = member.file.clone();
    let journal = PathBuf::from(format!("{}.foreign-pending", file.display()));
    wait_until(
        CONVERGE_SECS,
        "the member's file to be the master's ledger",
        || {
            let mut client = client.clone();
            let (file, journal) = (file.clone(), journal.clone());
            async move {
                let Ok(info) = client.get_ledger_info(pb::GetLedgerInfoRequest {}).await else {
                    return false;
                };
                let info = info.into_inner();
                !journal.exists()
                    && file_md5(&file) == Some(info.digest)
                    && applied_seq(&file) == Some(info.head_seq)
            }
        },
    )
    .await;
}

fn set_aside(member: &Member) -> Vec<serde_json::Value> {
    let path = format!("{}.foreign", member.file.display());
    std::fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a .foreign line is JSON"))
        .collect()
}

/// Every local policy the node kept is in the master and exactly once in the file (as a global
/// policy); every one it deleted is in neither; every garbage line is set aside with its byte
/// range and reason.
async fn check_outcome(
    master: &Master,
    member: &Member,
    kept: &[usize],
    deleted: &[usize],
    garbage: usize,
) {
    converge(master, member).await;
    let mut client = master.client().await;
    let ledger = ledger_lines(&mut client).await;
    let file = String::from_utf8(member.file_bytes()).unwrap();
    let file_lines: Vec<&str> = file.lines().collect();
    assert_eq!(file_lines.len(), ledger.len());
    assert_eq!(
        file_lines.iter().collect::<HashSet<_>>().len(),
        file_lines.len(),
        "a line is twice in the file"
    );
    for n in kept {
        let line = global_policy(*n);
        assert!(
            ledger.contains(&line),
            "local policy {n} is not in the master"
        );
        assert_eq!(
            file_lines.iter().filter(|l| **l == line).count(),
            1,
            "local policy {n} is not exactly once in the file"
        );
    }
    for n in deleted {
        let id = format!("\"local-id-{n}\"");
        assert!(
            !ledger.iter().any(|l| l.contains(&id)),
            "deleted policy {n} is in the master"
        );
    }
    let aside = set_aside(member);
    let aside_texts: Vec<&str> = aside.iter().filter_map(|e| e["text"].as_str()).collect();
    assert_eq!(aside.len(), garbage, "set aside: {aside:?}");
    for entry in &aside {
        assert!(entry["reason"].as_str().is_some_and(|r| !r.is_empty()));
        assert!(entry["to"].as_u64() > entry["from"].as_u64());
    }
    for text in aside_texts {
        assert!(GARBAGE.contains(&text.trim_end_matches('\n')), "{text:?}");
    }
    let sidecar: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{}.sidecar", member.file.display())).unwrap(),
    )
    .unwrap();
    assert_eq!(sidecar["foreign"]["set_aside"], garbage as u64);
    assert!(sidecar["foreign"]["pushed"].as_u64().unwrap() >= kept.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_local_writes_during_a_burst_end_in_the_master_and_once_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (master, member, client) = start(dir.path(), &[]).await;

    let running = Arc::new(AtomicBool::new(true));
    let watcher = watch_for_fragments(member.file.clone(), running.clone());
    let node = fake_node(
        member.file.clone(),
        120,
        0,
        Arc::new(AtomicBool::new(false)),
    );
    // 1,000 inserts, with a delete after every tenth: appends and rewrites under the node.
    let inserted = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut client = client.clone();
        let inserted = inserted.clone();
        writers.push(tokio::spawn(async move {
            for k in 0..250 {
                let n = 1 + w * 250 + k;
                let policy = insert(&mut client, &operator(n)).await;
                inserted.fetch_add(1, Ordering::Relaxed);
                if k % 10 == 9 {
                    delete(&mut client, &policy.id).await;
                }
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let (kept, deleted, garbage) = node.join().unwrap();
    check_outcome(&master, &member, &kept, &deleted, garbage).await;
    running.store(false, Ordering::Relaxed);
    let reads = watcher.join().unwrap();
    assert!(reads > 100, "the file was read {reads} times");
    assert_eq!(inserted.load(Ordering::Relaxed), 1000);
    assert!(kept.len() > 50, "{} local policies", kept.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_local_writes_survive_a_member_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let (master, mut member, client) = start(dir.path(), &[]).await;

    let paused = Arc::new(AtomicBool::new(false));
    let node = fake_node(member.file.clone(), 80, 1000, paused.clone());
    let writer = {
        let mut client = client.clone();
        tokio::spawn(async move {
            for n in 1..=400 {
                insert(&mut client, &operator(n)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    member.kill9();
    // The node goes on writing while the member is down, and the master changes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    writer.await.unwrap();
    member.restart();
    let (kept, deleted, garbage) = node.join().unwrap();
    check_outcome(&master, &member, &kept, &deleted, garbage).await;
    assert!(!paused.load(Ordering::Relaxed));
}

/// A partial line (the node stopped mid-write, or an editor's leftover) and a local policy the
/// master refuses both end in `.foreign`, with their byte range and reason; the member goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_line_and_a_refused_policy_are_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let (master, member, mut client) = start(dir.path(), &["--max-policy-bytes", "400"]).await;
    let before = member.file_bytes().len() as u64;

    let big = format!(
        r#"{{"config": {{"name": "{}", "id": "too-big", "date": "2026-12-01T10:00:00.000000Z", "ledger": "local"}}}}"#,
        "x".repeat(500)
    );
    node_appends(&member.file, &format!("{big}\n"));
    node_appends(&member.file, &format!("{}\n", local_policy(1)));
    node_appends(&member.file, r#"{"config": {"name": "cut"#);
    wait_until(CONVERGE_SECS, "three lines set aside or pushed", || {
        let aside = set_aside(&member);
        async move { aside.len() == 2 }
    })
    .await;
    let aside = set_aside(&member);
    let refused = &aside[0];
    assert_eq!(refused["from"], before);
    assert!(
        refused["reason"].as_str().unwrap().contains("refused"),
        "{refused}"
    );
    assert_eq!(refused["text"].as_str().unwrap(), format!("{big}\n"));
    assert!(aside[1]["reason"].as_str().unwrap().contains("partial"));
    assert_eq!(aside[1]["text"], r#"{"config": {"name": "cut"#);
    // The member goes on: the accepted one and later changes arrive.
    insert(&mut client, &operator(1)).await;
    converge(&master, &member).await;
    let file = String::from_utf8(member.file_bytes()).unwrap();
    assert!(file.contains(&global_policy(1)));
    assert!(!file.contains("too-big") && !file.contains("cut"));
    let ids: BTreeSet<&str> = file.lines().collect();
    assert_eq!(ids.len(), file.lines().count());
    // `member status` tells the operator.
    let status = member_command(
        &[
            "status",
            "--master",
            &master.addr.to_string(),
            "--ledger-file",
            &member.file.display().to_string(),
        ],
        None,
    )
    .await;
    let status: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(status["foreign_lines"]["set_aside"], 2, "{status}");
    assert_eq!(status["foreign_lines"]["pushed"], 1, "{status}");
    assert_eq!(status["foreign_lines"]["found"], 3, "{status}");
    assert_eq!(status["in_sync"], true, "{status}");
}
