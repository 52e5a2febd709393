//! (8) A master following a contract on chain (issue 17), against ganache: the time from a
//! contract write (its receipt) to a member's file holding it, and the JSON-RPC calls one poll
//! costs for a contract of 1,000 and of 10,000 policies, beside what every EdgeLake node pays
//! per sync (`num_policies()` and `policies(i)` for each policy: N + 1 calls every 30 s).

use std::path::Path;
use std::time::{Duration, Instant};

use ledger_chain::ChainClient;
use ledger_testkit::ganache::Ganache;
use ledger_testkit::metrics::{sample, scrape_async};
use ledger_testkit::{Master, Member};
use serde_json::{Value, json};

use crate::stats::median;

const RECEIPT: Duration = Duration::from_secs(60);

/// A completed policy, as a node writes it, and its id.
fn completed(name: &str) -> (String, String) {
    let text = format!(r#"{{"operator": {{"name": "{name}", "ip": "10.0.0.5", "port": 32148}}}}"#);
    let policy = ledger_anylog::policy::complete(&text, chrono::Utc::now()).unwrap();
    (policy.id, policy.json)
}

/// Fills the contract up to `total` policies: the inserts are sent one after the other without
/// waiting for their receipts (the client keeps the nonces in order), then the last is waited
/// for.
async fn fill(node: &ChainClient, from: usize, total: usize) {
    let mut last = None;
    for n in from..total {
        let (id, json) = completed(&format!("fill-{n}"));
        last = Some((node.insert(&id, &json).await.expect("insert"), id));
    }
    if let Some((tx, id)) = last {
        node.wait_receipt(tx, RECEIPT)
            .await
            .expect("receipt")
            .check(&id)
            .expect("mined");
    }
}

fn master_on(dir: &Path, ganache: &Ganache, contract: &str, poll: &str) -> Master {
    Master::start(
        dir,
        &[
            "--ethereum-rpc",
            &ganache.url(),
            "--ethereum-contract",
            contract,
            "--ethereum-poll",
            poll,
            "--metrics-addr",
            "127.0.0.1:0",
        ],
    )
}

async fn rpc_calls(master: &Master) -> (f64, f64) {
    let scraped = scrape_async(master.metrics_port()).await;
    (
        sample(&scraped, "ledger_chain_rpc_calls").unwrap_or(f64::NAN),
        sample(&scraped, "ledger_chain_rpc_requests").unwrap_or(f64::NAN),
    )
}

/// When `file` first holds `needle` (`present`) or first no longer does.
async fn wait_for(file: &Path, needle: &str, present: bool, within: Duration) -> Option<Instant> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if std::fs::read_to_string(file).is_ok_and(|text| text.contains(needle) == present) {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    None
}

async fn wait_file(file: &Path, needle: &str, within: Duration) -> Option<Instant> {
    wait_for(file, needle, true, within).await
}

/// The median time from a write's receipt to the member's file, over `writes` writes.
async fn propagation(node: &ChainClient, member: &Member, writes: usize, tag: &str) -> f64 {
    let mut times = Vec::new();
    for n in 0..writes {
        let (id, json) = completed(&format!("{tag}-{n}"));
        let tx = node.insert(&id, &json).await.expect("insert");
        node.wait_receipt(tx, RECEIPT)
            .await
            .expect("receipt")
            .check(&id)
            .expect("mined");
        let mined = Instant::now();
        let seen = wait_file(&member.file, &id, Duration::from_secs(60))
            .await
            .expect("the write in the member's file");
        times.push((seen - mined).as_secs_f64() * 1000.0);
    }
    median(&times)
}

/// What one poll costs at `size` policies: idle polls, and the poll that applies one insert.
async fn poll_cost(ganache: &Ganache, node: &ChainClient, contract: &str, size: usize) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let master = master_on(dir.path(), ganache, contract, "1s");
    let member_dir = tempfile::tempdir().unwrap();
    let member = Member::start(member_dir.path(), &[master.addr.to_string()], &[]);
    let started = Instant::now();
    let (last_id, _) = completed(&format!("fill-{}", size - 1));
    wait_file(&member.file, &last_id, Duration::from_secs(600))
        .await
        .expect("the whole contract in the member's file");
    let first_sync = started.elapsed().as_secs_f64();
    let (calls0, requests0) = rpc_calls(&master).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (calls1, requests1) = rpc_calls(&master).await;
    // Idle: ~5 polls (one a second).
    let idle_calls = (calls1 - calls0) / 5.0;
    let idle_requests = (requests1 - requests0) / 5.0;
    let (id, json) = completed(&format!("one-more-{size}"));
    let tx = node.insert(&id, &json).await.unwrap();
    node.wait_receipt(tx, RECEIPT).await.unwrap();
    wait_file(&member.file, &id, Duration::from_secs(60))
        .await
        .expect("the insert in the member's file");
    let (calls2, requests2) = rpc_calls(&master).await;
    let change_calls = calls2 - calls1;
    let change_requests = requests2 - requests1;
    // A delete moves the last id into the hole: every id is read again.
    let tx = node.delete(&id).await.unwrap();
    node.wait_receipt(tx, RECEIPT).await.unwrap();
    wait_for(&member.file, &id, false, Duration::from_secs(120))
        .await
        .expect("the delete in the member's file");
    let (calls3, requests3) = rpc_calls(&master).await;
    let delete_calls = calls3 - calls2;
    let delete_requests = requests3 - requests2;
    eprintln!(
        "  {size} policies: first sync {first_sync:.1} s; idle poll {idle_calls:.1} calls in {idle_requests:.1} requests; the poll that applied one insert ~{change_calls:.0} calls in {change_requests:.0} requests, one delete ~{delete_calls:.0} calls in {delete_requests:.0} requests (an EdgeLake node: {} calls per sync)",
        size + 1
    );
    json!({"policies": size, "first_sync_seconds": first_sync,
           "idle_poll_calls": idle_calls, "idle_poll_requests": idle_requests,
           "insert_poll_calls": change_calls, "insert_poll_requests": change_requests,
           "delete_poll_calls": delete_calls, "delete_poll_requests": delete_requests,
           "edgelake_node_calls_per_sync": size + 1})
}

/// Runs the measures; `quick` skips the 10,000-policy contract.
pub fn run(quick: bool, json_out: Option<&Path>) {
    crate::report::run_alone(json_out, async {
        let ganache = Ganache::start();
        let node = ganache.deploy(0).await;
        let contract = format!("{:#x}", node.contract());
        let mut out = serde_json::Map::new();
        eprintln!("(8) chain: contract write to a member's file");
        let mut latencies = serde_json::Map::new();
        for poll in ["2s", "200ms"] {
            let dir = tempfile::tempdir().unwrap();
            let master = master_on(dir.path(), &ganache, &contract, poll);
            let member_dir = tempfile::tempdir().unwrap();
            let member = Member::start(member_dir.path(), &[master.addr.to_string()], &[]);
            let p50 = propagation(&node, &member, if quick { 10 } else { 30 }, poll).await;
            eprintln!("  --ethereum-poll {poll}: receipt to the member's file, p50 {p50:.0} ms");
            latencies.insert(poll.into(), json!({"p50_ms": p50}));
        }
        out.insert("write_to_member_file".into(), Value::Object(latencies));
        eprintln!("(8) chain: RPC calls per poll");
        let mut costs = Vec::new();
        let sizes: &[usize] = if quick { &[1_000] } else { &[1_000, 10_000] };
        let mut filled = 0;
        for &size in sizes {
            let started = Instant::now();
            fill(&node, filled, size).await;
            eprintln!(
                "  filled the contract to {size} policies in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            filled = size;
            costs.push(poll_cost(&ganache, &node, &contract, size).await);
        }
        out.insert("poll_cost".into(), Value::Array(costs));
        Value::Object(out)
    });
}
