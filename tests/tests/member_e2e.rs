//! The member end to end: the real `master` and `member` binaries over TCP on loopback, a
//! SQLite ledger in a temporary directory, and the member's real `blockchain.json`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ledger_member::paths::LedgerPaths;
use ledger_member::state::SyncState;
use ledger_proto::pb;
use ledger_testkit::client::{all_policies as ledger, delete_ok as delete, insert_ok as insert};
use ledger_testkit::member::{applied_seq, file_md5, member_command, member_command_with_env};
use ledger_testkit::{Master, Member, wait_until, within};

/// How long a member may take to converge: generous, since speed is not what is tested.
const CONVERGE_SECS: u64 = 60;

fn operator(n: usize, company: &str) -> String {
    format!(
        r#"{{"operator": {{"name": "op{n}", "company": "{company}", "ip": "10.0.0.{}", "port": {}}}}}"#,
        n % 250 + 1,
        32148 + n
    )
}

fn line_count(member: &Member) -> usize {
    member.file_bytes().iter().filter(|&&b| b == b'\n').count()
}

/// Waits until each member's file is the master's ledger: md5 equal to the master's digest and
/// the recorded seq equal to its head.
async fn converge(master: &Master, members: &[&Member]) {
    let client = master.client().await;
    for member in members {
        let file = member.file.clone();
        let what = format!("{} to equal the master's ledger", file.display());
        wait_until(CONVERGE_SECS, &what, || {
            let mut client = client.clone();
            let file = file.clone();
            async move {
                let Ok(info) = client.get_ledger_info(pb::GetLedgerInfoRequest {}).await else {
                    return false;
                };
                let info = info.into_inner();
                file_md5(&file) == Some(info.digest) && applied_seq(&file) == Some(info.head_seq)
            }
        })
        .await;
    }
}

/// The seq N of the current run's `resuming from seq N` line.
fn resumed_from(member: &Member) -> Option<u64> {
    let logs = member.run_logs();
    let at = logs.find("resuming from seq ")? + "resuming from seq ".len();
    logs[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// How many warnings contain `needle`.
fn warnings(logs: &str, needle: &str) -> usize {
    logs.lines()
        .filter(|line| line.contains(" WARN ") && line.contains(needle))
        .count()
}

/// A loopback address nothing listens on.
fn closed_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_and_deletes_converge_in_every_member() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), &[]);
    let addr = master.addr.to_string();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = Member::start(dir_a.path(), std::slice::from_ref(&addr), &[]);
    let mut b = Member::start(dir_b.path(), std::slice::from_ref(&addr), &[]);
    let mut client = master.client().await;

    let mut ids = Vec::new();
    for n in 0..30 {
        ids.push(insert(&mut client, &operator(n, "Acme")).await.id);
    }
    converge(&master, &[&a, &b]).await;
    assert_eq!(line_count(&a), 30);
    // Inserts append: nothing was rewritten, so there is no previous file.
    assert!(!LedgerPaths::new(&a.file).old.exists());

    // Deletes rewrite the file, keeping the previous one as blockchain.old.
    let deleted: Vec<&String> = ids.iter().step_by(3).collect();
    for id in &deleted {
        delete(&mut client, id).await;
    }
    for n in 30..35 {
        insert(&mut client, &operator(n, "Beta")).await;
    }
    converge(&master, &[&a, &b]).await;
    assert_eq!(line_count(&a), 30 - 10 + 5);
    let master_lines: Vec<String> = ledger(&mut client)
        .await
        .into_iter()
        .map(|p| p.json)
        .collect();
    let file_lines: Vec<String> = String::from_utf8(b.file_bytes())
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(file_lines, master_lines);
    for member in [&a, &b] {
        // The file before the last rewrite still holds the policy that rewrite deleted.
        let old =
            std::fs::read_to_string(LedgerPaths::new(&member.file).old).expect("blockchain.old");
        let old_ids: Vec<String> = old
            .lines()
            .map(|line| {
                let (_, body) = ledger_anylog::policy::parse_stored(line).expect("a policy line");
                body["id"].as_str().unwrap().to_string()
            })
            .collect();
        assert!(old_ids.contains(deleted.last().unwrap()), "{old}");
    }

    assert!(a.terminate().success(), "SIGTERM: exit 0");
    assert!(b.terminate().success(), "SIGTERM: exit 0");
    a.wait_for_log(10, "stopped").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_started_late_gets_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), &[]);
    let mut client = master.client().await;
    let mut ids = Vec::new();
    for n in 0..200 {
        ids.push(insert(&mut client, &operator(n, "Acme")).await.id);
    }
    for id in &ids[..20] {
        delete(&mut client, id).await;
    }

    let member_dir = tempfile::tempdir().unwrap();
    let member = Member::start(member_dir.path(), &[master.addr.to_string()], &[]);
    converge(&master, &[&member]).await;
    member
        .wait_for_log(10, "installed the snapshot: 180 policies at seq 220")
        .await;
    let logs = member.run_logs();
    assert!(
        logs.contains("the master sends a snapshot: 180 policies at seq 220"),
        "{logs}"
    );

    // Live changes follow the snapshot.
    insert(&mut client, &operator(500, "Acme")).await;
    converge(&master, &[&member]).await;
    assert_eq!(line_count(&member), 181);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_killed_in_a_burst_resumes_without_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), &[]);
    let member_dir = tempfile::tempdir().unwrap();
    let mut member = Member::start(member_dir.path(), &[master.addr.to_string()], &[]);
    member.wait_for_log(30, "caught up with master").await;

    const BURST: usize = 1000;
    let done = Arc::new(AtomicUsize::new(0));
    let burst = tokio::spawn({
        let mut client = master.client().await;
        let done = done.clone();
        async move {
            for n in 0..BURST {
                insert(&mut client, &operator(n, "Acme")).await;
                done.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    wait_until(60, "the member to apply part of the burst", || async {
        line_count(&member) >= 100
    })
    .await;
    member.kill9();
    let inserted_at_kill = done.load(Ordering::SeqCst);

    // What kill -9 left: the recorded part of the file is complete lines of valid policies;
    // past it there may only be a tail the next start cuts.
    let state = SyncState::load(&LedgerPaths::new(&member.file))
        .expect("a readable state record")
        .expect("a state record");
    assert!(state.seq > 0);
    let bytes = member.file_bytes();
    assert!(bytes.len() as u64 >= state.len);
    let recorded = std::str::from_utf8(&bytes[..state.len as usize]).expect("UTF-8");
    assert!(recorded.is_empty() || recorded.ends_with('\n'));
    for line in recorded.lines() {
        ledger_anylog::policy::parse_stored(line).expect("a valid policy line");
    }

    member.restart();
    within(120, "the burst to finish", burst)
        .await
        .expect("the burst task");
    converge(&master, &[&member]).await;
    // The logs up to its catching up (a snapshot would be logged before).
    member.wait_for_log(10, "caught up with master").await;
    let resumed = resumed_from(&member).expect("the restarted member logs where it resumes");
    assert!(resumed > 0, "resumed from seq {resumed}");
    let logs = member.run_logs();
    assert!(
        !logs.contains("sends a snapshot"),
        "no snapshot after the restart:\n{logs}"
    );
    assert_eq!(line_count(&member), BURST);
    assert!(
        inserted_at_kill < BURST,
        "the member was killed in the middle of the burst ({inserted_at_kill} of {BURST} inserted)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_keep_their_file_while_the_master_is_down_and_converge_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut master = Master::start(dir.path(), &[]);
    let addr = master.addr.to_string();
    // The subscription loop (its reconnections) is `ledger_client::follow`.
    let debug = [
        "--log-level",
        "info,ledger_member=debug,ledger_client=debug",
        "--retry-max",
        "1s",
    ];
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Member::start(dir_a.path(), std::slice::from_ref(&addr), &debug);
    let b = Member::start(dir_b.path(), std::slice::from_ref(&addr), &debug);
    let mut client = master.client().await;
    let mut ids = Vec::new();
    for n in 0..50 {
        ids.push(insert(&mut client, &operator(n, "Acme")).await.id);
    }
    converge(&master, &[&a, &b]).await;
    let kept = a.file_bytes();

    master.kill9();
    for member in [&a, &b] {
        member.wait_for_log(30, "disconnected from master").await;
        // Several attempts fail while the master is down...
        wait_until(30, "several reconnection attempts", || async {
            count(&member.run_logs(), "reconnecting after a delay") >= 4
        })
        .await;
    }
    // ...but the outage is logged once, and the file stays as it was.
    let logs = a.run_logs();
    assert_eq!(warnings(&logs, "disconnected from master"), 1, "{logs}");
    assert_eq!(warnings(&logs, "cannot reach master"), 0, "{logs}");
    assert_eq!(warnings(&logs, "no master is reachable"), 1, "{logs}");
    assert_eq!(a.file_bytes(), kept);

    master.restart();
    let mut client = master.client().await;
    for n in 50..70 {
        insert(&mut client, &operator(n, "Beta")).await;
    }
    for id in &ids[..5] {
        delete(&mut client, id).await;
    }
    converge(&master, &[&a, &b]).await;
    for member in [&a, &b] {
        member
            .wait_for_log(10, &format!("reconnected to master {addr}"))
            .await;
        wait_until(10, "the member to log that it caught up again", || async {
            count(&member.run_logs(), "caught up with master") == 2
        })
        .await;
        let logs = member.run_logs();
        assert_eq!(
            count(&logs, "sends a snapshot"),
            1,
            "only the first sync: {logs}"
        );
    }
    assert_eq!(line_count(&a), 65);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_uses_the_first_master_that_answers_and_the_next_when_it_fails() {
    // Two masters on one ledger (one SQLite file), behind an address nobody listens on.
    let shared = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", shared.path().join("blockchain.db").display());
    let (dir_1, dir_2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut first = Master::start(dir_1.path(), &["--database-url", &url]);
    let second = Master::start(dir_2.path(), &["--database-url", &url]);
    let dead = closed_port();
    let masters = [
        dead.clone(),
        first.addr.to_string(),
        second.addr.to_string(),
    ];
    let member_dir = tempfile::tempdir().unwrap();
    let member = Member::start(member_dir.path(), &masters, &["--retry-max", "1s"]);

    let mut client = first.client().await;
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(insert(&mut client, &operator(n, "Acme")).await.id);
    }
    converge(&first, &[&member]).await;
    member
        .wait_for_log(10, &format!("caught up with master {}", first.addr))
        .await;
    let logs = member.run_logs();
    assert_eq!(
        warnings(&logs, &format!("cannot reach master {dead}")),
        1,
        "{logs}"
    );
    assert!(
        logs.contains(&format!("connected to master {}", first.addr)),
        "{logs}"
    );

    first.kill9();
    member
        .wait_for_log(30, &format!("reconnected to master {}", second.addr))
        .await;
    let mut client = second.client().await;
    for n in 20..30 {
        insert(&mut client, &operator(n, "Beta")).await;
    }
    for id in &ids[..3] {
        delete(&mut client, id).await;
    }
    converge(&second, &[&member]).await;
    assert_eq!(line_count(&member), 27);
    member
        .wait_for_log(10, &format!("caught up with master {}", second.addr))
        .await;
    assert_eq!(count(&member.run_logs(), "sends a snapshot"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_get_filters_the_local_file_without_a_master() {
    let dir = tempfile::tempdir().unwrap();
    let mut master = Master::start(dir.path(), &[]);
    let member_dir = tempfile::tempdir().unwrap();
    let member = Member::start(member_dir.path(), &[master.addr.to_string()], &[]);
    let mut client = master.client().await;
    for (n, company) in ["Acme", "Beta", "Acme", "Gamma", "Acme"].iter().enumerate() {
        insert(&mut client, &operator(n, company)).await;
    }
    insert(
        &mut client,
        r#"{"table": {"name": "syslog", "dbms": "monitoring", "company": "Acme"}}"#,
    )
    .await;
    converge(&master, &[&member]).await;
    master.kill9();

    let file = member.file.display().to_string();
    let get = |args: Vec<&'static str>| {
        let file = file.clone();
        async move {
            let mut all = vec!["get"];
            all.extend(args);
            all.extend(["--ledger-file", file.as_str()]);
            let output = member_command(&all, None).await;
            assert_eq!(output.code, Some(0), "member {all:?}: {output:?}");
            let policies: serde_json::Value =
                serde_json::from_str(&output.stdout).expect("a JSON array");
            policies.as_array().expect("an array").clone()
        }
    };
    let names = |policies: &[serde_json::Value], policy_type: &str| -> Vec<String> {
        policies
            .iter()
            .map(|p| p[policy_type]["name"].as_str().unwrap().to_string())
            .collect()
    };

    let acme = get(vec!["operator", "--where", "company=Acme"]).await;
    assert_eq!(names(&acme, "operator"), ["op0", "op2", "op4"]);
    let one = get(vec![
        "operator",
        "--where",
        "company=Acme",
        "--where",
        "port=32150",
    ])
    .await;
    assert_eq!(names(&one, "operator"), ["op2"]);
    let tables = get(vec!["table", "--where", "company=Acme"]).await;
    assert_eq!(names(&tables, "table"), ["syslog"]);
    assert_eq!(get(vec!["*"]).await.len(), 6);
    assert_eq!(get(vec![]).await.len(), 6);
    assert_eq!(get(vec!["*", "--where", "company=Acme"]).await.len(), 4);
    assert!(
        get(vec!["operator", "--where", "company=Nobody"])
            .await
            .is_empty()
    );
    assert!(get(vec!["cluster"]).await.is_empty());

    // A missing file and a malformed condition fail with one line.
    let missing = member_dir.path().join("nothing.json").display().to_string();
    let output = member_command(&["get", "operator", "--ledger-file", &missing], None).await;
    assert_eq!(output.code, Some(1), "{output:?}");
    assert!(output.stderr.contains("no ledger file"), "{output:?}");
    assert_eq!(output.stderr.trim_end().lines().count(), 1, "{output:?}");
    let output = member_command(
        &[
            "get",
            "operator",
            "--where",
            "company",
            "--ledger-file",
            &file,
        ],
        None,
    )
    .await;
    assert_eq!(output.code, Some(2), "{output:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_insert_delete_and_status_commands() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), &[]);
    let addr = master.addr.to_string();
    let member_dir = tempfile::tempdir().unwrap();
    let member = Member::start(member_dir.path(), std::slice::from_ref(&addr), &[]);
    let mut client = master.client().await;

    // --policy: prints the completed policy, as stored.
    let output = member_command(
        &[
            "insert",
            "--master",
            &addr,
            "--policy",
            &operator(1, "Acme"),
        ],
        None,
    )
    .await;
    assert_eq!(output.code, Some(0), "{output:?}");
    let printed = output.stdout.trim_end().to_string();
    let completed: serde_json::Value = serde_json::from_str(&printed).unwrap();
    let id = completed["operator"]["id"]
        .as_str()
        .expect("an id")
        .to_string();
    assert_eq!(completed["operator"]["ledger"], "global");
    assert!(completed["operator"]["date"].is_string());
    let stored = client
        .get_policy(pb::GetPolicyRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap();
    assert_eq!(stored.json, printed);

    // --policy-file F and --policy-file - (stdin); the first master that answers is used.
    let policy_file = member_dir.path().join("policy.json");
    std::fs::write(&policy_file, operator(2, "Beta")).unwrap();
    let dead = closed_port();
    let output = member_command(
        &[
            "insert",
            "--master",
            &dead,
            "--master",
            &addr,
            "--policy-file",
            policy_file.to_str().unwrap(),
        ],
        None,
    )
    .await;
    assert_eq!(output.code, Some(0), "{output:?}");
    assert!(output.stdout.contains("\"op2\""), "{output:?}");
    let output = member_command(
        &["insert", "--master", &addr, "--policy-file", "-"],
        Some(&operator(3, "Gamma")),
    )
    .await;
    assert_eq!(output.code, Some(0), "{output:?}");
    assert!(output.stdout.contains("\"op3\""), "{output:?}");

    // Refusals: one line on stderr, non-zero exit.
    let output = member_command(
        &[
            "insert",
            "--master",
            &addr,
            "--policy",
            &operator(1, "Acme"),
        ],
        None,
    )
    .await;
    assert_eq!(output.code, Some(1), "{output:?}");
    assert!(
        output.stderr.starts_with("member: already exists: "),
        "{output:?}"
    );
    assert_eq!(output.stderr.trim_end().lines().count(), 1, "{output:?}");
    let output = member_command(
        &[
            "insert",
            "--master",
            &addr,
            "--policy",
            r#"{"a": {}, "b": {}}"#,
        ],
        None,
    )
    .await;
    assert_eq!(output.code, Some(2), "{output:?}");
    assert!(
        output.stderr.starts_with("member: invalid policy: "),
        "{output:?}"
    );
    let output = member_command(
        &["insert", "--master", &addr, "--policy", "{not json"],
        None,
    )
    .await;
    assert_eq!(output.code, Some(2), "{output:?}");
    assert!(
        output.stderr.starts_with("member: invalid policy: "),
        "{output:?}"
    );
    let output = member_command(
        &[
            "insert",
            "--master",
            &dead,
            "--policy",
            &operator(9, "Acme"),
        ],
        None,
    )
    .await;
    assert_eq!(output.code, Some(3), "{output:?}");
    assert!(
        output.stderr.starts_with("member: cannot reach a master: "),
        "{output:?}"
    );
    let missing = member_dir.path().join("missing.json").display().to_string();
    let output = member_command(
        &["insert", "--master", &addr, "--policy-file", &missing],
        None,
    )
    .await;
    assert_eq!(output.code, Some(2), "{output:?}");

    // Delete, then delete again.
    let output = member_command(&["delete", "--master", &addr, "--id", &id], None).await;
    assert_eq!(output.code, Some(0), "{output:?}");
    let deleted: serde_json::Value = serde_json::from_str(&output.stdout).unwrap();
    assert_eq!(deleted["id"], id.as_str());
    assert_eq!(deleted["seq"], 4);
    let output = member_command(&["delete", "--master", &addr, "--id", &id], None).await;
    assert_eq!(output.code, Some(1), "{output:?}");
    assert!(
        output.stderr.starts_with("member: not found: "),
        "{output:?}"
    );

    // Status once the member caught up.
    converge(&master, &[&member]).await;
    let file = member.file.display().to_string();
    let output = member_command(&["status", "--master", &addr, "--ledger-file", &file], None).await;
    assert_eq!(output.code, Some(0), "{output:?}");
    let status: serde_json::Value = serde_json::from_str(&output.stdout).unwrap();
    assert_eq!(status["applied_seq"], 4, "{status}");
    assert_eq!(status["head_seq"], 4, "{status}");
    assert_eq!(status["lag"], 0, "{status}");
    assert_eq!(status["in_sync"], true, "{status}");
    assert_eq!(status["file_md5"], status["master_digest"], "{status}");
    assert_eq!(status["file_policies"], 2, "{status}");

    // A change the member has not got: status shows the lag.
    let lagging_dir = tempfile::tempdir().unwrap();
    let lagging = lagging_dir.path().join("blockchain.json");
    std::fs::copy(&member.file, &lagging).unwrap();
    std::fs::copy(
        LedgerPaths::new(&member.file).state,
        LedgerPaths::new(&lagging).state,
    )
    .unwrap();
    insert(&mut client, &operator(4, "Acme")).await;
    let output = member_command(
        &[
            "status",
            "--master",
            &addr,
            "--ledger-file",
            lagging.to_str().unwrap(),
        ],
        None,
    )
    .await;
    assert_eq!(output.code, Some(0), "{output:?}");
    let status: serde_json::Value = serde_json::from_str(&output.stdout).unwrap();
    assert_eq!(
        (status["applied_seq"].clone(), status["lag"].clone()),
        (4.into(), 1.into()),
        "{status}"
    );
    assert_eq!(status["in_sync"], false, "{status}");
    let output = member_command(&["status", "--master", &dead, "--ledger-file", &file], None).await;
    assert_eq!(output.code, Some(3), "{output:?}");

    // The environment instead of flags: LEDGER_MASTER lists masters separated by commas.
    let masters = format!("{dead},{addr}");
    let env = [
        ("LEDGER_MASTER", masters.as_str()),
        ("LEDGER_FILE", file.as_str()),
    ];
    converge(&master, &[&member]).await;
    let output = member_command_with_env(&["status"], &env, None).await;
    assert_eq!(output.code, Some(0), "{output:?}");
    let status: serde_json::Value = serde_json::from_str(&output.stdout).unwrap();
    assert_eq!(status["master"], addr.as_str(), "{status}");
    assert_eq!(status["ledger_file"], file.as_str(), "{status}");
    assert_eq!(status["applied_seq"], 5, "{status}");
    assert_eq!(status["in_sync"], true, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_json_loads_reads_the_file_as_the_masters_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), &[]);
    let member_dir = tempfile::tempdir().unwrap();
    let member = Member::start(member_dir.path(), &[master.addr.to_string()], &[]);
    let mut client = master.client().await;
    let policies = [
        r#"{"operator": {"name": "café", "city": "Zürich \u263a", "port": 32148}}"#,
        r#"{"config": {"name": "floats", "values": [1.0, 1e16, 1e-05, -0.0, 0.1], "nested": {"a": null, "b": true}}}"#,
        r#"{"table": {"name": "syslog", "dbms": "monitoring", "company": "Acme"}}"#,
        r#"{"query": {"name": "quotes \" and \\ and \t tab", "emoji": "\ud83d\ude00"}}"#,
        r#"{"cluster": {"company": "Acme", "name": "c1", "table": [{"dbms": "d", "name": "t"}]}}"#,
    ];
    let mut ids = Vec::new();
    for policy in policies {
        ids.push(insert(&mut client, policy).await.id);
    }
    delete(&mut client, &ids[2]).await;
    converge(&master, &[&member]).await;

    let expected = member_dir.path().join("expected.jsonl");
    let lines: String = ledger(&mut client)
        .await
        .iter()
        .map(|p| format!("{}\n", p.json))
        .collect();
    std::fs::write(&expected, lines).unwrap();
    // A reader as AnyLog's: json.loads line by line; each must be what the master stores, and
    // written the way Python's json.dumps writes it.
    let script = r#"
import json, sys
def read(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]
ours, theirs = read(sys.argv[1]), read(sys.argv[2])
assert [json.loads(l) for l in ours] == [json.loads(l) for l in theirs], "policies differ"
for line in ours:
    assert json.dumps(json.loads(line)) == line, "not json.dumps form: " + line
print("ok", len(ours))
"#;
    let output = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&member.file)
        .arg(&expected)
        .output();
    let output = within(60, "python3", output)
        .await
        .expect("running python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "python3 failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.trim(), "ok 4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_repaired_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), &[]);
    let member_dir = tempfile::tempdir().unwrap();
    let mut member = Member::start(member_dir.path(), &[master.addr.to_string()], &[]);
    let mut client = master.client().await;
    for n in 0..20 {
        insert(&mut client, &operator(n, "Acme")).await;
    }
    converge(&master, &[&member]).await;
    assert!(member.terminate().success());
    let good = member.file_bytes();

    // What a crash in the middle of an append leaves: a complete line never recorded, and a
    // torn one.
    let mut torn = good.clone();
    torn.extend_from_slice(format!("{}\n", operator(98, "Ghost")).as_bytes());
    torn.extend_from_slice(br#"{"operator": {"name": "op99", "comp"#);
    std::fs::write(&member.file, &torn).unwrap();

    member.restart();
    member.wait_for_log(30, "resuming from seq 20").await;
    let logs = member.run_logs();
    assert!(logs.contains("repaired"), "{logs}");
    assert_eq!(member.file_bytes(), good);
    insert(&mut client, &operator(20, "Acme")).await;
    converge(&master, &[&member]).await;
    member.wait_for_log(10, "caught up with master").await;
    assert!(!member.run_logs().contains("sends a snapshot"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_line_or_state_makes_it_resync_from_zero() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), &[]);
    let member_dir = tempfile::tempdir().unwrap();
    let mut member = Member::start(member_dir.path(), &[master.addr.to_string()], &[]);
    let mut client = master.client().await;
    for n in 0..20 {
        insert(&mut client, &operator(n, "Acme")).await;
    }
    converge(&master, &[&member]).await;
    assert!(member.terminate().success());

    // A line in the middle that is not JSON, the file's length unchanged.
    let good = String::from_utf8(member.file_bytes()).unwrap();
    let corrupted = good.replacen("\"op5\"", "\"op5'", 1);
    assert_ne!(corrupted, good);
    std::fs::write(&member.file, &corrupted).unwrap();
    member.restart();
    converge(&master, &[&member]).await;
    member.wait_for_log(10, "caught up with master").await;
    let logs = member.run_logs();
    assert!(logs.contains("line 6 is not a valid policy"), "{logs}");
    assert!(logs.contains("resyncing from seq 0"), "{logs}");
    assert!(
        logs.contains("the master sends a snapshot: 20 policies at seq 20"),
        "{logs}"
    );
    assert_eq!(member.file_bytes(), good.as_bytes());
    // The corrupted file is the one kept as blockchain.old.
    let old = std::fs::read_to_string(LedgerPaths::new(&member.file).old).unwrap();
    assert_eq!(old, corrupted);

    // A damaged state record.
    assert!(member.terminate().success());
    let state = LedgerPaths::new(&member.file).state;
    let record = std::fs::read_to_string(&state).unwrap();
    std::fs::write(&state, record.replace("seq 20", "seq 21")).unwrap();
    member.restart();
    converge(&master, &[&member]).await;
    member.wait_for_log(10, "caught up with master").await;
    let logs = member.run_logs();
    assert!(logs.contains("is damaged"), "{logs}");
    assert!(
        logs.contains("the master sends a snapshot: 20 policies at seq 20"),
        "{logs}"
    );
    assert_eq!(member.file_bytes(), good.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_with_a_new_ledger_makes_the_member_replace_its_copy() {
    let dir = tempfile::tempdir().unwrap();
    let mut master = Master::start(dir.path(), &[]);
    let member_dir = tempfile::tempdir().unwrap();
    let member = Member::start(
        member_dir.path(),
        &[master.addr.to_string()],
        &["--retry-max", "1s"],
    );
    let mut client = master.client().await;
    for n in 0..10 {
        insert(&mut client, &operator(n, "Acme")).await;
    }
    converge(&master, &[&member]).await;
    let previous = member.file_bytes();

    // The master comes back on an empty database: the member is ahead of its head, so the
    // master sends a snapshot, which replaces the member's copy.
    master.kill9();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("blockchain.db")
        {
            std::fs::remove_file(path).unwrap();
        }
    }
    master.restart();
    let mut client = master.client().await;
    for n in 100..103 {
        insert(&mut client, &operator(n, "Beta")).await;
    }
    converge(&master, &[&member]).await;
    assert_eq!(line_count(&member), 3);
    // The copy it replaced is kept as blockchain.old.
    let old = std::fs::read(LedgerPaths::new(&member.file).old).unwrap();
    assert_eq!(old, previous);
}
