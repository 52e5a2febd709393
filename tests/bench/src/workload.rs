//! What every stage runs: masters and members (the test kit's processes), clients, and the
//! policies inserted, one by one, paced, or in bulk.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use ledger_testkit::client::Client;
use ledger_testkit::member::applied_seq;
use ledger_testkit::{Master, Member};

/// Member arguments serving its metrics on a port the kernel picks ([`Member::listening_port`]).
pub(crate) const METRICS_ANY_PORT: [&str; 2] = ["--metrics-addr", "127.0.0.1:0"];

/// A master in `dir` on `database_url`, with `extra` arguments, and its address (HOST:PORT).
pub(crate) fn start_master(dir: &Path, database_url: &str, extra: &[&str]) -> (Master, String) {
    let mut args = vec!["--database-url", database_url];
    args.extend_from_slice(extra);
    let master = Master::start(dir, &args);
    let addr = master.addr.to_string();
    (master, addr)
}

/// A quiet member (`LEDGER_LOG=warn`) of the master at `master`, its ledger file
/// `dir/blockchain.json`, with `extra` arguments.
pub(crate) fn start_member(dir: &Path, master: &str, extra: &[&str]) -> Member {
    Member::start_with_env(dir, &[master.to_string()], extra, &[("LEDGER_LOG", "warn")])
}

/// The seq a member recorded in `blockchain.json.state` (written after the file's fdatasync).
pub(crate) fn state_seq(dir: &Path) -> Option<u64> {
    applied_seq(&dir.join("blockchain.json"))
}

static NEXT_POLICY: AtomicU64 = AtomicU64::new(0);

fn tag() -> u64 {
    static TAG: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TAG.get_or_init(|| {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
            % 1_000_000
    })
}

pub(crate) fn policy() -> String {
    let i = NEXT_POLICY.fetch_add(1, Ordering::Relaxed);
    let t = tag();
    let (a, b, c) = ((i >> 16) & 255, (i >> 8) & 255, i & 255);
    const COMPANIES: [&str; 4] = ["Acme Industrial", "Litsa Energy", "Orics Water", "Nova Fab"];
    let company = COMPANIES[(i % 4) as usize];
    match i % 3 {
        0 => format!(
            r#"{{"operator": {{"name": "op-{t}-{i}", "company": "{company}", "hostname": "edge-{i}", "ip": "10.{a}.{b}.{c}", "port": 32148, "rest_port": 32149, "cluster": "cl-{t}-{}", "loc": "37.{c},-122.{b}"}}}}"#,
            i / 3
        ),
        1 => format!(
            r#"{{"cluster": {{"name": "cl-{t}-{i}", "company": "{company}", "dbms": "lsl_demo", "table": [{{"name": "ping_sensor", "dbms": "lsl_demo"}}], "parent": "p-{}"}}}}"#,
            i % 97
        ),
        _ => format!(
            r#"{{"table": {{"name": "t_{t}_{i}", "dbms": "lsl_demo", "company": "{company}", "create": "CREATE TABLE IF NOT EXISTS t_{i} (row_id SERIAL PRIMARY KEY, value FLOAT)"}}}}"#
        ),
    }
}

/// The runtime every measure of the bench drives its clients from: the same two workers in
/// every measure, so that each one's load generator is the same.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("the load generator's runtime")
}

/// A client of the master at `addr` whose calls are bounded (30 s).
pub(crate) async fn connect(addr: &str) -> Client {
    ledger_testkit::client::connect(addr, Some(Duration::from_secs(30))).await
}

/// A client without a per-call timeout (for long streams).
pub(crate) async fn connect_stream(addr: &str) -> Client {
    ledger_testkit::client::connect(addr, None).await
}

/// One insert of a new [`policy`]: its seq, the instant its answer arrived, its line's length.
pub(crate) async fn insert(client: &mut Client) -> Result<(u64, Instant, usize), tonic::Status> {
    let stored = ledger_testkit::client::insert(client, &policy()).await?;
    Ok((stored.seq, Instant::now(), stored.json.len()))
}

/// The master's head seq, policy count and digest.
pub(crate) async fn head(client: &mut Client) -> (u64, u64, String) {
    let info = ledger_testkit::client::info(client).await;
    (info.head_seq, info.policy_count, info.digest)
}

/// Inserts `count` policies with `concurrency` clients on 4 connections, bounded in time.
pub(crate) async fn load(addr: &str, count: u64, concurrency: usize) -> (f64, u64) {
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(connect(addr).await);
    }
    let left = Arc::new(AtomicU64::new(count));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(1200);
    let mut tasks = Vec::new();
    for k in 0..concurrency {
        let mut client = channels[k % 4].clone();
        let left = left.clone();
        tasks.push(tokio::spawn(async move {
            let mut bytes = 0u64;
            while Instant::now() < deadline
                && left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
            {
                let (_, _, len) = insert(&mut client).await.expect("insert while loading");
                bytes += len as u64 + 1;
            }
            bytes
        }));
    }
    let mut bytes = 0;
    for t in tasks {
        bytes += t.await.unwrap();
    }
    (start.elapsed().as_secs_f64(), bytes)
}

/// Inserts `count` policies at `rate` per second, open loop: each is sent at its scheduled time
/// whether or not the previous one was answered. Returns (seq, ack, sent) in seq order.
pub(crate) async fn paced_inserts(
    client: &mut Client,
    count: usize,
    rate: f64,
) -> Vec<(u64, Instant, Instant)> {
    let period = Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        tokio::time::sleep_until(start + period * i as u32).await;
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let (seq, ack, _) = insert(&mut client).await.expect("paced insert");
            (seq, ack, sent)
        }));
    }
    let mut out = Vec::with_capacity(count);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out.sort_by_key(|x| x.0);
    out
}
