//! `ledger-bench`: the benchmark of the whole path (issue 6) on real `master` and `member`
//! processes, SQLite then PostgreSQL.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! cargo run --release -p ledger-bench -- [--quick] [--json out.json]
//! ```
//!
//! Everything runs on loopback; every loop is bounded in count and in time. PostgreSQL is a
//! private cluster started here with `fsync=on` (the test harness runs its cluster with fsync
//! off, which would not measure durable inserts); `--pg-url URL` uses a server of yours instead.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant, SystemTime};

use ledger_anylog::digest::LedgerDigest;
use ledger_anylog::wire;
use ledger_proto::pb::ledger_service_client::LedgerServiceClient;
use ledger_proto::pb::stream_ledger_response::Event;
use ledger_proto::pb::{GetLedgerInfoRequest, InsertPolicyRequest, StreamLedgerRequest};
use ledger_testkit::member::applied_seq;
use ledger_testkit::metrics::listening_ports;
use ledger_testkit::postgres::Cluster;
use ledger_testkit::process::{Log, capture};
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint};

type Client = LedgerServiceClient<Channel>;

// ---------------------------------------------------------------------------------------------
// Options

struct Options {
    quick: bool,
    json: Option<PathBuf>,
    pg_url: Option<String>,
    backends: Vec<String>,
    /// Item (1) only.
    only_inserts: bool,
    /// Item (3) only.
    only_fanout: bool,
    /// Item (7) only.
    only_anylog: bool,
}

fn options() -> Options {
    let mut o = Options {
        quick: false,
        json: None,
        pg_url: None,
        backends: vec!["sqlite".into(), "postgres".into()],
        only_inserts: false,
        only_fanout: false,
        only_anylog: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => o.quick = true,
            "--only-inserts" => o.only_inserts = true,
            "--only-fanout" => o.only_fanout = true,
            "--only-anylog" => o.only_anylog = true,
            "--json" => o.json = Some(args.next().expect("--json FILE").into()),
            "--pg-url" => o.pg_url = Some(args.next().expect("--pg-url URL")),
            "--backend" => o.backends = vec![args.next().expect("--backend sqlite|postgres")],
            "-h" | "--help" => {
                println!(
                    "ledger-bench [--quick] [--only-inserts | --only-fanout | --only-anylog] [--json FILE] [--backend sqlite|postgres] [--pg-url postgres://USER@HOST:PORT]"
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}"),
        }
    }
    o
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A workspace binary: beside this executable (`target/<profile>/ledger-bench`), else where the
/// test harness looks (`target/<profile>/` for a test in `target/<profile>/deps/`).
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the bench's path");
    let dir = exe.parent().expect("the bench's directory");
    let here = dir.join(name);
    if here.exists() {
        return here;
    }
    ledger_testkit::binary(name)
}

/// A child process killed (SIGKILL) when dropped.
struct Proc {
    child: Child,
    log: Log,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
    fn logs(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The one TCP port this process listens on, for a member started with
    /// `--metrics-addr 127.0.0.1:0` ([`METRICS_ANY_PORT`]): the kernel picks a free port when
    /// the member binds, so no other process can take it first (as it could a port picked
    /// here in advance and released before the member bound it).
    fn listening_port(&mut self) -> u16 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match listening_ports(self.pid())[..] {
                [port] => return port,
                [] => {}
                ref many => panic!("member listens on several ports {many:?}:\n{}", self.logs()),
            }
            if let Some(status) = self.child.try_wait().expect("polling member") {
                panic!("member exited with {status}:\n{}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "member did not listen within 30s:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Member arguments serving its metrics on a port the kernel picks ([`Proc::listening_port`]).
const METRICS_ANY_PORT: [&str; 2] = ["--metrics-addr", "127.0.0.1:0"];

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_master(dir: &Path, database_url: &str, extra: &[&str]) -> (Proc, String) {
    let log: Log = Arc::default();
    let mut child = Command::new(binary("master"))
        .current_dir(dir)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--bind",
            "--database-url",
            database_url,
        ])
        .args(extra)
        .env("LEDGER_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting master");
    let (ready, addr) = mpsc::channel();
    capture(&mut child, &log, Some(ready));
    let addr = addr
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| {
            panic!(
                "master did not listen within 60s:\n{}",
                log.lock().unwrap().join("\n")
            )
        });
    (Proc { child, log }, addr)
}

fn start_member(dir: &Path, master: &str, extra: &[&str]) -> Proc {
    let log: Log = Arc::default();
    let file = dir.join("blockchain.json");
    let mut child = Command::new(binary("member"))
        .current_dir(dir)
        .args(["--master", master, "--ledger-file"])
        .arg(&file)
        .args(extra)
        .env_remove("LEDGER_MASTER")
        .env_remove("LEDGER_FILE")
        .env("LEDGER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting member");
    capture(&mut child, &log, None);
    Proc { child, log }
}

/// A field of /proc/PID/status in KiB (VmRSS, VmHWM).
fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The seq a member recorded in `blockchain.json.state` (written after the file's fdatasync).
fn state_seq(dir: &Path) -> Option<u64> {
    applied_seq(&dir.join("blockchain.json"))
}

static NEXT_DB: AtomicUsize = AtomicUsize::new(0);

fn create_database(base: &str) -> String {
    use diesel::connection::SimpleConnection;
    use diesel::{Connection, PgConnection};
    let name = format!(
        "bench_{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::SeqCst)
    );
    let mut admin = PgConnection::establish(&format!("{base}/postgres")).expect("PostgreSQL admin");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
    format!("{base}/{name}")
}

// ---------------------------------------------------------------------------------------------
// Policies: about 250 bytes once completed (id, date, ledger), operator / cluster / table

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

fn policy() -> String {
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

// ---------------------------------------------------------------------------------------------
// Clients

async fn connect(addr: &str) -> Client {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .expect("connecting to master");
    LedgerServiceClient::new(channel).max_decoding_message_size(64 << 20)
}

/// A channel without a per-call timeout (for long streams).
async fn connect_stream(addr: &str) -> Client {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connecting to master");
    LedgerServiceClient::new(channel)
}

/// One insert: its seq and the instant its answer arrived.
async fn insert(client: &mut Client) -> Result<(u64, Instant, usize), tonic::Status> {
    let text = policy();
    let r = client
        .insert_policy(InsertPolicyRequest { policy_json: text })
        .await?
        .into_inner()
        .policy
        .expect("a policy");
    Ok((r.seq, Instant::now(), r.json.len()))
}

async fn head(client: &mut Client) -> (u64, u64, String) {
    let info = client
        .get_ledger_info(GetLedgerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    (info.head_seq, info.policy_count, info.digest)
}

/// Inserts `count` policies with `concurrency` clients on 4 connections, bounded in time.
async fn load(addr: &str, count: u64, concurrency: usize) -> (f64, u64) {
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

// ---------------------------------------------------------------------------------------------
// Statistics

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[derive(Clone, Copy, Default)]
struct Dist {
    p50: f64,
    p99: f64,
    max: f64,
    n: usize,
}

fn dist(mut ms: Vec<f64>) -> Dist {
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Dist {
        p50: percentile(&ms, 50.0),
        p99: percentile(&ms, 99.0),
        max: ms.last().copied().unwrap_or(f64::NAN),
        n: ms.len(),
    }
}

fn median_dist(runs: &[Dist]) -> Dist {
    Dist {
        p50: median(&runs.iter().map(|d| d.p50).collect::<Vec<_>>()),
        p99: median(&runs.iter().map(|d| d.p99).collect::<Vec<_>>()),
        max: median(&runs.iter().map(|d| d.max).collect::<Vec<_>>()),
        n: runs.iter().map(|d| d.n).sum(),
    }
}

fn dist_json(d: &Dist) -> Value {
    json!({"p50_ms": d.p50, "p99_ms": d.p99, "max_ms": d.max, "samples": d.n})
}

// ---------------------------------------------------------------------------------------------
// Watching members' state records (inotify): when each member recorded each seq

struct Watcher {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<Vec<(u64, Instant)>>>,
}

fn watch(dirs: Vec<PathBuf>) -> Watcher {
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let (ready_tx, ready_rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        // SAFETY: plain inotify calls on a descriptor this thread owns.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0, "inotify_init1");
        let mut wds = HashMap::new();
        for (k, dir) in dirs.iter().enumerate() {
            let c = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
            let wd = unsafe {
                libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_MOVED_TO | libc::IN_CLOSE_WRITE)
            };
            assert!(wd >= 0, "inotify_add_watch");
            wds.insert(wd, k);
        }
        let mut seen: Vec<Vec<(u64, Instant)>> = vec![Vec::new(); dirs.len()];
        for (k, dir) in dirs.iter().enumerate() {
            if let Some(s) = state_seq(dir) {
                seen[k].push((s, Instant::now()));
            }
        }
        ready_tx.send(()).unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let deadline = Instant::now() + Duration::from_secs(900);
        while !stopping.load(Ordering::Relaxed) && Instant::now() < deadline {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let n = unsafe { libc::poll(&mut pfd, 1, 50) };
            if n <= 0 {
                continue;
            }
            let got = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            let now = Instant::now();
            if got <= 0 {
                continue;
            }
            let mut touched = vec![false; dirs.len()];
            let mut at = 0usize;
            while at + 16 <= got as usize {
                let wd = i32::from_ne_bytes(buf[at..at + 4].try_into().unwrap());
                let len = u32::from_ne_bytes(buf[at + 12..at + 16].try_into().unwrap()) as usize;
                let name = &buf[at + 16..at + 16 + len];
                let name = name.split(|b| *b == 0).next().unwrap_or_default();
                if name == b"blockchain.json.state"
                    && let Some(k) = wds.get(&wd)
                {
                    touched[*k] = true;
                }
                at += 16 + len;
            }
            for (k, t) in touched.iter().enumerate() {
                if *t
                    && let Some(s) = state_seq(&dirs[k])
                    && seen[k].last().is_none_or(|(last, _)| s > *last)
                {
                    seen[k].push((s, now));
                }
            }
        }
        unsafe { libc::close(fd) };
        seen
    });
    ready_rx.recv().unwrap();
    Watcher { stop, handle }
}

impl Watcher {
    fn finish(self) -> Vec<Vec<(u64, Instant)>> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// When `events` (ascending seq) first held `seq`.
fn arrival(events: &[(u64, Instant)], seq: u64) -> Option<Instant> {
    let at = events.partition_point(|(s, _)| *s < seq);
    events.get(at).map(|(_, t)| *t)
}

async fn wait_members(dirs: &[PathBuf], seq: u64, seconds: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        if dirs.iter().all(|d| state_seq(d).is_some_and(|s| s >= seq)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

/// Inserts `count` policies at `rate` per second, open loop: each is sent at its scheduled time
/// whether or not the previous one was answered. Returns (seq, ack, sent) in seq order.
async fn paced_inserts(
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

// ---------------------------------------------------------------------------------------------
// (1) insert throughput

async fn throughput(addr: &str, clients: usize, seconds: f64) -> f64 {
    let mut channels = Vec::new();
    for _ in 0..clients.min(4) {
        channels.push(connect(addr).await);
    }
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for k in 0..clients {
        let mut client = channels[k % channels.len()].clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                insert(&mut client).await.expect("insert");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// (7) EdgeLake nodes: the AnyLog protocol

/// A node's side of the AnyLog protocol: its TCP server, where the master's answers arrive.
struct AnyLogNode {
    server: tokio::net::TcpListener,
    envelope: wire::Envelope,
}

impl AnyLogNode {
    async fn start() -> AnyLogNode {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        AnyLogNode {
            server,
            envelope: wire::Envelope {
                source_ip: "127.0.0.1".into(),
                source_port: u32::from(port),
                info_type: wire::info_type::COMMAND,
                ..wire::Envelope::default()
            },
        }
    }

    /// Sends `command` on a connection of its own, as a node does.
    ///
    /// Every message is a connection, and thousands a second from one address use up its
    /// ephemeral ports (closed ones wait in TIME_WAIT for a minute): the senders rotate over
    /// 1,000 loopback addresses, as many nodes would be many addresses.
    async fn send(&self, addr: &str, command: &str) {
        static NEXT_SOURCE: AtomicU64 = AtomicU64::new(0);
        let n = NEXT_SOURCE.fetch_add(1, Ordering::Relaxed) % 1000;
        let source =
            std::net::SocketAddr::from(([127, 1 + (n / 250) as u8, 0, 1 + (n % 250) as u8], 0));
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(source)
            .expect("binding a loopback source address");
        let mut stream = socket
            .connect(addr.parse().expect("the master's address"))
            .await
            .expect("connect");
        let message = wire::Message {
            envelope: self.envelope.clone(),
            command: command.into(),
            auth: Vec::new(),
            data: Vec::new(),
        };
        wire::write_message(&mut stream, &message, false, Duration::from_secs(30))
            .await
            .expect("sending an AnyLog message");
    }

    /// The next message the master sends this node.
    async fn receive(&self) -> wire::Message {
        let (mut stream, _) = tokio::time::timeout(Duration::from_secs(60), self.server.accept())
            .await
            .expect("the master answered within 60 s")
            .unwrap();
        wire::read_message(&mut stream, u32::MAX, Duration::from_secs(30))
            .await
            .expect("a message from the master")
    }
}

/// Pushes from `connections` concurrent senders for `seconds` (each push on a connection of its
/// own, as nodes send them); pushes are not answered, so the rate is the count over the time
/// until the master's head shows the last one.
async fn anylog_pushes(addr: &str, connections: usize, seconds: f64) -> f64 {
    let mut client = connect(addr).await;
    let (start_head, _, _) = head(&mut client).await;
    let node = Arc::new(AnyLogNode::start().await);
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (node, sent, addr) = (node.clone(), sent.clone(), addr.to_string());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                node.send(&addr, &format!("blockchain push {}", policy()))
                    .await;
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let target = start_head + sent.load(Ordering::Relaxed);
    let sending = start.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (h, _, _) = head(&mut client).await;
        if h >= target {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pushes stored: {} of {}",
            h - start_head,
            target - start_head
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let stored = start.elapsed().as_secs_f64();
    eprintln!(
        "  {connections} connection(s): {} pushes sent in {sending:.2} s, stored {:.2} s later",
        target - start_head,
        stored - sending
    );
    (target - start_head) as f64 / stored
}

/// Seconds from a node's `event get_blockchain` to the whole ledger file received, and its md5.
async fn anylog_get_blockchain(addr: &str) -> (f64, String, usize) {
    let node = AnyLogNode::start().await;
    let started = Instant::now();
    node.send(addr, "event get_blockchain /tmp/node/blockchain.new 0 0")
        .await;
    let file = node.receive().await;
    let seconds = started.elapsed().as_secs_f64();
    assert!(file.command.starts_with("file write "), "{}", file.command);
    let md5 = {
        let mut digest = LedgerDigest::new();
        digest.push_bytes(&file.data);
        digest.hex()
    };
    (seconds, md5, file.data.len())
}

// ---------------------------------------------------------------------------------------------
// (2) propagation

struct Propagation {
    from_ack: Dist,
    from_send: Dist,
    ahead_of_ack: f64,
}

async fn propagation(
    addr: &str,
    root: &Path,
    members: usize,
    inserts: usize,
    runs: usize,
) -> Vec<Propagation> {
    let mut client = connect(addr).await;
    let dirs: Vec<PathBuf> = (0..members)
        .map(|k| {
            let d = root.join(format!("member-{members}-{k}"));
            std::fs::create_dir_all(&d).unwrap();
            d
        })
        .collect();
    let procs: Vec<Proc> = dirs.iter().map(|d| start_member(d, addr, &[])).collect();
    let (h, _, _) = head(&mut client).await;
    assert!(
        wait_members(&dirs, h, 120).await,
        "members did not catch up:\n{}",
        procs[0].logs()
    );
    let mut results = Vec::new();
    for _ in 0..runs {
        let watcher = watch(dirs.clone());
        let sent = paced_inserts(&mut client, inserts, 200.0).await;
        let last = sent.last().unwrap().0;
        let ok = wait_members(&dirs, last, 60).await;
        let events = watcher.finish();
        assert!(ok, "members did not reach seq {last}");
        let (mut from_ack, mut from_send, mut ahead) = (Vec::new(), Vec::new(), 0usize);
        for ev in &events {
            for (seq, ack, sent_at) in &sent {
                let t = arrival(ev, *seq).expect("arrival recorded");
                if t < *ack {
                    ahead += 1;
                }
                from_ack.push(t.saturating_duration_since(*ack).as_secs_f64() * 1e3);
                from_send.push(t.saturating_duration_since(*sent_at).as_secs_f64() * 1e3);
            }
        }
        let n = from_ack.len();
        results.push(Propagation {
            from_ack: dist(from_ack),
            from_send: dist(from_send),
            ahead_of_ack: ahead as f64 / n as f64,
        });
    }
    drop(procs);
    results
}

// ---------------------------------------------------------------------------------------------
// (3) fan-out

struct FanOut {
    from_ack: Vec<Dist>,
    from_send: Vec<Dist>,
    rss_before_kib: u64,
    rss_after_kib: u64,
    subscribers: usize,
    delivered: u64,
    expected: u64,
    message_bytes: f64,
}

/// Protobuf size of a varint.
fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Serialized size of `StreamLedgerResponse { seq, inserted: Policy {id, type, json, seq} }`.
fn response_len(p: &ledger_proto::pb::Policy, seq: u64) -> usize {
    let field = |len: usize| {
        if len == 0 {
            0
        } else {
            1 + varint_len(len as u64) + len
        }
    };
    let policy = field(p.id.len())
        + field(p.r#type.len())
        + field(p.json.len())
        + if p.seq == 0 { 0 } else { 1 + varint_len(p.seq) };
    (if seq == 0 { 0 } else { 1 + varint_len(seq) }) + 1 + varint_len(policy as u64) + policy
}

async fn fan_out(
    addr: &str,
    master_pid: u32,
    subscribers: usize,
    inserts: usize,
    rounds: usize,
) -> FanOut {
    let mut client = connect(addr).await;
    let (h, _, _) = head(&mut client).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = proc_status_kib(master_pid, "VmRSS:");
    const CONNECTIONS: usize = 20;
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(connect_stream(addr).await);
    }
    let caught = Arc::new(AtomicUsize::new(0));
    let stop_at = Arc::new(AtomicU64::new(u64::MAX));
    let bytes = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut tasks = Vec::new();
    for k in 0..subscribers {
        let mut client = channels[k % CONNECTIONS].clone();
        let (caught, stop_at, bytes) = (caught.clone(), stop_at.clone(), bytes.clone());
        tasks.push(tokio::spawn(async move {
            let mut got: Vec<(u64, Instant)> = Vec::with_capacity(4096);
            let mut stream = client
                .stream_ledger(StreamLedgerRequest { after_seq: h })
                .await
                .expect("StreamLedger")
                .into_inner();
            while Instant::now() < deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                let msg = match tokio::time::timeout(left, stream.message()).await {
                    Ok(Ok(Some(m))) => m,
                    Ok(Ok(None)) => break,
                    Ok(Err(status)) => panic!("subscriber {k}: {status}"),
                    Err(_) => break,
                };
                let now = Instant::now();
                match msg.event {
                    Some(Event::CaughtUp(_)) => {
                        caught.fetch_add(1, Ordering::SeqCst);
                    }
                    Some(Event::Inserted(p)) => {
                        if k == 0 {
                            bytes.fetch_add(response_len(&p, msg.seq) as u64, Ordering::Relaxed);
                        }
                        got.push((msg.seq, now));
                        if msg.seq >= stop_at.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                    _ => {}
                }
            }
            got
        }));
    }
    let open_deadline = Instant::now() + Duration::from_secs(120);
    while caught.load(Ordering::SeqCst) < subscribers {
        assert!(
            Instant::now() < open_deadline,
            "subscribers did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let rss_after = proc_status_kib(master_pid, "VmRSS:");
    let mut sent_rounds = Vec::new();
    for _ in 0..rounds {
        let sent = paced_inserts(&mut client, inserts, 200.0).await;
        sent_rounds.push(sent);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let last = sent_rounds.last().unwrap().last().unwrap().0;
    stop_at.store(last, Ordering::Relaxed);
    // Subscribers that already received `last` before `stop_at` was set wait for one more insert.
    insert(&mut client)
        .await
        .expect("the insert that ends the fan-out");
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.unwrap());
    }
    let acks: HashMap<u64, (Instant, Instant)> = sent_rounds
        .iter()
        .flatten()
        .map(|(s, a, t)| (*s, (*a, *t)))
        .collect();
    let mut from_ack = Vec::new();
    let mut from_send = Vec::new();
    let mut delivered = 0u64;
    for round in &sent_rounds {
        let (lo, hi) = (round.first().unwrap().0, round.last().unwrap().0);
        let (mut a, mut s) = (Vec::new(), Vec::new());
        for got in &all {
            for (seq, t) in got.iter().filter(|(seq, _)| *seq >= lo && *seq <= hi) {
                if let Some((ack, sent)) = acks.get(seq) {
                    delivered += 1;
                    a.push(t.saturating_duration_since(*ack).as_secs_f64() * 1e3);
                    s.push(t.saturating_duration_since(*sent).as_secs_f64() * 1e3);
                }
            }
        }
        from_ack.push(dist(a));
        from_send.push(dist(s));
    }
    let per = (inserts * rounds) as f64;
    FanOut {
        from_ack,
        from_send,
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        subscribers,
        delivered,
        expected: (subscribers * inserts * rounds) as u64,
        message_bytes: bytes.load(Ordering::Relaxed) as f64 / per,
    }
}

// ---------------------------------------------------------------------------------------------
// (4) catch-up and (5) apply cost

struct CatchUp {
    seconds: f64,
    peak_rss_kib: u64,
}

/// A fresh member on the master's ledger: seconds until its state records the head (the file
/// complete and fsynced), and its VmHWM.
async fn catch_up(addr: &str, dir: &Path, head_seq: u64, extra: &[&str]) -> (CatchUp, Proc) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let start = Instant::now();
    let member = start_member(dir, addr, extra);
    let deadline = start + Duration::from_secs(600);
    let mut peak = 0;
    loop {
        if state_seq(dir).is_some_and(|s| s >= head_seq) {
            break;
        }
        peak = peak.max(proc_status_kib(member.pid(), "VmHWM:"));
        assert!(
            Instant::now() < deadline,
            "catch-up did not finish:\n{}",
            member.logs()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    peak = peak.max(proc_status_kib(member.pid(), "VmHWM:"));
    (
        CatchUp {
            seconds,
            peak_rss_kib: peak,
        },
        member,
    )
}

fn md5_file(path: &Path) -> String {
    let mut digest = LedgerDigest::new();
    std::io::copy(&mut std::fs::File::open(path).unwrap(), &mut digest).unwrap();
    digest.hex()
}

/// (sum, count) of the member's `ledger_member_file_write_duration_seconds`.
async fn write_metric(port: u16) -> (f64, f64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("metrics");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut text))
        .await
        .expect("metrics in time")
        .unwrap();
    let find = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        find("ledger_member_file_write_duration_seconds_sum"),
        find("ledger_member_file_write_duration_seconds_count"),
    )
}

struct Apply {
    write_ms: f64,
    /// From the insert being sent: includes the master's commit.
    propagation_p50_ms: f64,
    /// From the acknowledgement: delivery and the member's apply only.
    from_ack_p50_ms: f64,
}

impl Apply {
    fn json(&self) -> Value {
        json!({"write_ms": self.write_ms, "propagation_p50_ms": self.propagation_p50_ms,
               "from_ack_p50_ms": self.from_ack_p50_ms})
    }

    /// Each figure's median over `rounds`.
    fn median(rounds: &[Apply]) -> Apply {
        let of = |f: fn(&Apply) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
        Apply {
            write_ms: of(|a| a.write_ms),
            propagation_p50_ms: of(|a| a.propagation_p50_ms),
            from_ack_p50_ms: of(|a| a.from_ack_p50_ms),
        }
    }
}

/// Mean file-write time (append + fdatasync + state record, from the member's histogram) and
/// p50 propagation of `count` single inserts spaced 20 ms apart.
async fn apply_cost(addr: &str, dir: &Path, metrics_port: u16, count: usize) -> Apply {
    let mut client = connect(addr).await;
    let (h, _, _) = head(&mut client).await;
    assert!(wait_members(&[dir.to_path_buf()], h, 120).await);
    let before = write_metric(metrics_port).await;
    let watcher = watch(vec![dir.to_path_buf()]);
    let sent = paced_inserts(&mut client, count, 50.0).await;
    let last = sent.last().unwrap().0;
    assert!(wait_members(&[dir.to_path_buf()], last, 60).await);
    let events = watcher.finish();
    let after = write_metric(metrics_port).await;
    let since = |pick: fn(&(u64, Instant, Instant)) -> Instant| -> Vec<f64> {
        sent.iter()
            .map(|x| {
                arrival(&events[0], x.0)
                    .unwrap()
                    .saturating_duration_since(pick(x))
                    .as_secs_f64()
                    * 1e3
            })
            .collect()
    };
    let from_send = since(|x| x.2);
    let from_ack = since(|x| x.1);
    Apply {
        write_ms: (after.0 - before.0) / (after.1 - before.1).max(1.0) * 1e3,
        propagation_p50_ms: dist(from_send).p50,
        from_ack_p50_ms: dist(from_ack).p50,
    }
}

// ---------------------------------------------------------------------------------------------
// One backend

async fn bench_backend(backend: &str, opts: &Options, pg: Option<&str>) -> Value {
    let quick = opts.quick;
    let root = tempfile::Builder::new()
        .prefix("ledger-bench-")
        .tempdir()
        .unwrap();
    let url_for = |name: &str| -> String {
        match pg {
            Some(base) => create_database(base),
            None => format!(
                "sqlite://{}",
                root.path().join(format!("{name}.db")).display()
            ),
        }
    };
    let mut out = serde_json::Map::new();
    let runs = 3;
    let secs = if quick { 2.0 } else { 4.0 };

    if opts.only_anylog {
        return anylog_only(backend, opts, &url_for("anylog")).await;
    }
    if !opts.only_fanout {
        // (1) throughput
        eprintln!("[{backend}] (1) insert throughput");
        let (master, addr) = start_master(root.path(), &url_for("throughput"), &[]);
        {
            let mut c = connect(&addr).await;
            for _ in 0..50 {
                insert(&mut c).await.unwrap();
            }
        }
        let mut one = Vec::new();
        let mut many = Vec::new();
        for _ in 0..runs {
            one.push(throughput(&addr, 1, secs).await);
            many.push(throughput(&addr, 64, secs).await);
        }
        eprintln!("  1 client {one:?}\n  64 clients {many:?}");
        out.insert(
            "insert_throughput".into(),
            json!({"one_client_per_s": median(&one), "one_client_runs": one,
                   "clients_64_per_s": median(&many), "clients_64_runs": many, "run_seconds": secs}),
        );

        if opts.only_inserts {
            return Value::Object(out);
        }
        // (7) pushes from EdgeLake nodes, on the same master
        eprintln!("[{backend}] (7) AnyLog pushes");
        out.insert(
            "anylog_pushes".into(),
            anylog_push_runs(&addr, runs, secs).await,
        );
        // (2) propagation, on the same master
        eprintln!("[{backend}] (2) propagation");
        let inserts = if quick { 400 } else { 1000 };
        let p1 = propagation(&addr, root.path(), 1, inserts, runs).await;
        let p10 = propagation(&addr, root.path(), 10, inserts, runs).await;
        let prop_json = |p: &[Propagation]| {
            json!({
                "from_ack": dist_json(&median_dist(&p.iter().map(|x| x.from_ack).collect::<Vec<_>>())),
                "from_send": dist_json(&median_dist(&p.iter().map(|x| x.from_send).collect::<Vec<_>>())),
                "share_durable_before_ack": median(&p.iter().map(|x| x.ahead_of_ack).collect::<Vec<_>>()),
                "runs_from_ack": p.iter().map(|x| dist_json(&x.from_ack)).collect::<Vec<_>>(),
            })
        };
        out.insert(
            "propagation_200_per_s".into(),
            json!({"inserts_per_run": inserts, "runs": runs, "members_1": prop_json(&p1), "members_10": prop_json(&p10)}),
        );
        drop(master);
    }

    // (3) fan-out: a fresh master that allows 1,000 streams from one address
    eprintln!("[{backend}] (3) fan-out");
    let (master, addr) = start_master(
        root.path(),
        &url_for("fanout"),
        &["--max-streams-per-client", "5000"],
    );
    {
        let mut c = connect(&addr).await;
        for _ in 0..100 {
            insert(&mut c).await.unwrap();
        }
    }
    let f = fan_out(
        &addr,
        master.pid(),
        1000,
        if quick { 400 } else { 1000 },
        runs,
    )
    .await;
    let fan_ack = median_dist(&f.from_ack);
    let fan_send = median_dist(&f.from_send);
    let per_sub = (f.rss_after_kib as f64 - f.rss_before_kib as f64) / f.subscribers as f64;
    out.insert(
        "fan_out".into(),
        json!({"subscribers": f.subscribers, "inserts_per_round": if quick {400} else {1000}, "rounds": runs,
               "delivery_from_ack": dist_json(&fan_ack), "delivery_from_send": dist_json(&fan_send),
               "rounds_from_ack": f.from_ack.iter().map(dist_json).collect::<Vec<_>>(),
               "delivered": f.delivered, "expected": f.expected,
               "master_rss_before_kib": f.rss_before_kib, "master_rss_after_kib": f.rss_after_kib,
               "master_kib_per_idle_subscriber": per_sub,
               "stream_message_bytes_per_policy": f.message_bytes}),
    );
    drop(master);
    if opts.only_fanout {
        return Value::Object(out);
    }

    // (4) catch-up and (5) apply cost
    eprintln!("[{backend}] (4) catch-up, (5) apply cost");
    let (master, addr) = start_master(root.path(), &url_for("catchup"), &[]);
    let mut client = connect(&addr).await;

    // (5) compares a member of a 100-policy ledger with one of the 100,000-policy ledger below,
    // side by side: the small ledger has a master of its own, so both members stay up.
    let (small_master, small_addr) = start_master(root.path(), &url_for("apply100"), &[]);
    load(&small_addr, 100, 8).await;
    let small_dir = root.path().join("apply-100");
    let (h, _, _) = head(&mut connect(&small_addr).await).await;
    let (_, mut small_member) = catch_up(&small_addr, &small_dir, h, &METRICS_ANY_PORT).await;
    let small_port = small_member.listening_port();
    let apply_count = if quick { 100 } else { 200 };

    // grow to 100,000
    let target = 100_000u64;
    let (_, count, _) = head(&mut client).await;
    let (load_s, _) = load(&addr, target - count, 64).await;
    eprintln!("  loaded {} policies in {load_s:.1}s", target - count);
    let (h, count, digest) = head(&mut client).await;
    assert_eq!(count, target);
    let get_blockchain = anylog_get_blockchain_runs(&addr, runs, &digest).await;
    out.insert("anylog_get_blockchain_100000".into(), get_blockchain);
    let mut cu = Vec::new();
    let mut last_member = None;
    let catch_runs = if quick { 1 } else { runs };
    for r in 0..catch_runs {
        let dir = root.path().join("catchup-100k");
        // The previous run's member must be gone before its directory is removed and a new
        // member starts: alive, it would still hold its port and share the machine.
        drop(last_member.take());
        let (c, m) = catch_up(&addr, &dir, h, &METRICS_ANY_PORT).await;
        eprintln!(
            "  100k catch-up run {r}: {:.2}s, VmHWM {} KiB",
            c.seconds, c.peak_rss_kib
        );
        cu.push(c);
        last_member = Some((m, dir));
    }
    let (mut big_member, big_dir) = last_member.unwrap();
    let big_port = big_member.listening_port();
    let file_bytes = std::fs::metadata(big_dir.join("blockchain.json"))
        .unwrap()
        .len();
    let md5_ok = md5_file(&big_dir.join("blockchain.json")) == digest;
    // The load above leaves hundreds of MiB for the kernel to write back, which would slow the
    // big member's fdatasyncs only: flush it first, then alternate rounds of both members.
    let _ = std::process::Command::new("sync").status();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rounds = if quick { 2 } else { 4 };
    let (mut small_rounds, mut big_rounds) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        small_rounds
            .push(apply_cost(&small_addr, &small_dir, small_port, apply_count / rounds).await);
        big_rounds.push(apply_cost(&addr, &big_dir, big_port, apply_count / rounds).await);
    }
    let (apply_small, apply_big) = (Apply::median(&small_rounds), Apply::median(&big_rounds));
    drop(big_member);
    drop(small_member);
    drop(small_master);
    let mut catch_json = vec![json!({
        "policies": target, "seconds": median(&cu.iter().map(|c| c.seconds).collect::<Vec<_>>()),
        "runs_seconds": cu.iter().map(|c| c.seconds).collect::<Vec<_>>(),
        "peak_rss_kib": median(&cu.iter().map(|c| c.peak_rss_kib as f64).collect::<Vec<_>>()),
        "file_bytes": file_bytes, "file_md5_equals_digest": md5_ok, "load_seconds": load_s,
    })];

    if !quick {
        let target = 1_000_000u64;
        let (_, count, _) = head(&mut client).await;
        let (load_s, _) = load(&addr, target - count, 64).await;
        eprintln!("  loaded {} policies in {load_s:.1}s", target - count);
        let (h, count, digest) = head(&mut client).await;
        assert_eq!(count, target);
        let dir = root.path().join("catchup-1m");
        let (c, m) = catch_up(&addr, &dir, h, &[]).await;
        eprintln!(
            "  1M catch-up: {:.2}s, VmHWM {} KiB",
            c.seconds, c.peak_rss_kib
        );
        drop(m);
        let fb = std::fs::metadata(dir.join("blockchain.json"))
            .unwrap()
            .len();
        let ok = md5_file(&dir.join("blockchain.json")) == digest;
        catch_json.push(json!({"policies": target, "seconds": c.seconds, "runs_seconds": [c.seconds],
            "peak_rss_kib": c.peak_rss_kib, "file_bytes": fb, "file_md5_equals_digest": ok, "load_seconds": load_s}));
        let _ = std::fs::remove_dir_all(&dir);
    }
    drop(master);
    out.insert("catch_up".into(), Value::Array(catch_json));
    out.insert(
        "apply_cost".into(),
        json!({"inserts": apply_count, "rounds": rounds,
               "file_100": apply_small.json(), "file_100000": apply_big.json(),
               "ratio_write": apply_big.write_ms / apply_small.write_ms,
               "ratio_from_ack_p50": apply_big.from_ack_p50_ms / apply_small.from_ack_p50_ms,
               "ratio_propagation_p50": apply_big.propagation_p50_ms / apply_small.propagation_p50_ms}),
    );

    // (6) bytes per policy, and the model of AnyLog's 30 s full copy
    let avg_line = file_bytes as f64 / target as f64;
    out.insert(
        "bytes_per_policy".into(),
        json!({
            "stream_message_bytes": f.message_bytes,
            "stream_message_plus_framing_bytes": f.message_bytes + 5.0 + 9.0,
            "average_line_bytes": avg_line,
            "model_anylog_30s_full_copy": {
                "label": "MODEL: each member copies the whole ledger file every 30 s",
                "ledger_policies": target, "ledger_bytes": file_bytes,
                "bytes_per_member_per_30s": file_bytes,
                "bytes_per_member_per_new_policy_at_200_per_s": file_bytes as f64 / (200.0 * 30.0),
                "bytes_per_member_per_new_policy_at_1_per_30s": file_bytes as f64,
            }
        }),
    );
    Value::Object(out)
}

/// `get_blockchain` of the whole ledger, `runs` times: the first reads it from the database, the
/// others find it cached (the head did not move). Every file must be the ledger (`digest`).
async fn anylog_get_blockchain_runs(addr: &str, runs: usize, digest: &str) -> Value {
    let mut seconds = Vec::new();
    let mut bytes = 0;
    for _ in 0..runs.max(2) {
        let (s, md5, len) = anylog_get_blockchain(addr).await;
        assert_eq!(md5, digest, "the file a node received is the ledger");
        seconds.push(s);
        bytes = len;
    }
    eprintln!("  get_blockchain: {seconds:?} s for {bytes} bytes");
    json!({"first_seconds": seconds[0], "cached_seconds": median(&seconds[1..]),
           "runs_seconds": seconds, "file_bytes": bytes})
}

/// `--only-anylog`: (7) alone, on a master of its own: `get_blockchain` at 100,000 policies
/// first, then the pushes (which add more).
async fn anylog_only(backend: &str, opts: &Options, url: &str) -> Value {
    let root = tempfile::Builder::new()
        .prefix("ledger-bench-")
        .tempdir()
        .unwrap();
    let runs = 3;
    let secs = if opts.quick { 2.0 } else { 4.0 };
    let (_master, addr) = start_master(root.path(), url, &[]);
    let (load_s, _) = load(&addr, 100_000, 64).await;
    eprintln!("[{backend}] loaded 100000 policies in {load_s:.1}s");
    let (_, _, digest) = head(&mut connect(&addr).await).await;
    let get_blockchain = anylog_get_blockchain_runs(&addr, runs, &digest).await;
    eprintln!("[{backend}] (7) AnyLog pushes");
    json!({
        "anylog_pushes": anylog_push_runs(&addr, runs, secs).await,
        "anylog_get_blockchain_100000": get_blockchain,
    })
}

/// `runs` rounds of pushes from 1 and from 16 senders, alternating.
async fn anylog_push_runs(addr: &str, runs: usize, secs: f64) -> Value {
    let (mut one, mut many) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        one.push(anylog_pushes(addr, 1, secs).await);
        many.push(anylog_pushes(addr, 16, secs).await);
    }
    eprintln!("  1 connection {one:?}\n  16 connections {many:?}");
    json!({"one_connection_per_s": median(&one), "one_connection_runs": one,
           "connections_16_per_s": median(&many), "connections_16_runs": many, "run_seconds": secs})
}

// ---------------------------------------------------------------------------------------------
// The table

fn get(v: &Value, path: &str) -> f64 {
    let mut cur = v;
    for part in path.split('.') {
        cur = match part.parse::<usize>() {
            Ok(i) => &cur[i],
            Err(_) => &cur[part],
        };
    }
    cur.as_f64().unwrap_or(f64::NAN)
}

/// A number of the results at `path`, with `digits` decimals; `-` when it was not measured.
fn number(v: &Value, path: &str, digits: usize) -> String {
    let x = get(v, path);
    if x.is_nan() {
        "-".to_string()
    } else {
        format!("{x:.digits$}")
    }
}

/// A latency distribution at `path`: p50 / p99 / max in ms.
fn dist3(v: &Value, path: &str) -> String {
    format!(
        "{} / {} / {}",
        number(v, &format!("{path}.p50_ms"), 2),
        number(v, &format!("{path}.p99_ms"), 2),
        number(v, &format!("{path}.max_ms"), 1)
    )
}

/// KiB at `path`, shown in MiB.
fn mib(v: &Value, path: &str) -> String {
    let kib = get(v, path);
    if kib.is_nan() {
        "-".to_string()
    } else {
        format!("{:.0}", kib / 1024.0)
    }
}

/// Two cells of a result as `a / b`.
fn pair(v: &Value, a: &str, b: &str, digits: usize) -> String {
    format!("{} / {}", number(v, a, digits), number(v, b, digits))
}

fn table(results: &HashMap<String, Value>, quick: bool) -> String {
    let e = Value::Null;
    let s = results.get("sqlite").unwrap_or(&e);
    let p = results.get("postgres").unwrap_or(&e);
    let mut t = String::new();
    t += "| measure | SQLite | PostgreSQL | target (SQLite / PostgreSQL) |\n|---|---|---|---|\n";
    // One row: the same cell of each backend's results.
    let mut row = |name: &str, target: &str, cell: &dyn Fn(&Value) -> String| {
        t += &format!("| {name} | {} | {} | {target} |\n", cell(s), cell(p));
    };
    row(
        "(1) inserts/s, 1 client, durable",
        ">= 2,000 / 1,000",
        &|v| number(v, "insert_throughput.one_client_per_s", 0),
    );
    row(
        "(1) inserts/s, 64 clients, durable",
        ">= 20,000 / 10,000",
        &|v| number(v, "insert_throughput.clients_64_per_s", 0),
    );
    for m in ["1", "10"] {
        let target = if m == "10" { "p50 < 2, p99 < 10" } else { "-" };
        let at = format!("propagation_200_per_s.members_{m}");
        row(
            &format!("(2) propagation at 200/s, {m} member(s): ms after the ack, p50 / p99 / max"),
            target,
            &|v| dist3(v, &format!("{at}.from_ack")),
        );
        row(
            "(2) same, ms after the insert was sent, p50 / p99 / max",
            "-",
            &|v| dist3(v, &format!("{at}.from_send")),
        );
        row(
            "(2) same, share durable in the member before the ack arrived",
            "-",
            &|v| number(v, &format!("{at}.share_durable_before_ack"), 3),
        );
    }
    row(
        "(3) 1,000 subscribers: delivery ms after the ack, p50 / p99 / max",
        "p99 < 50",
        &|v| dist3(v, "fan_out.delivery_from_ack"),
    );
    row("(3) same, ms after the insert was sent", "-", &|v| {
        dist3(v, "fan_out.delivery_from_send")
    });
    row("(3) master KiB per idle subscriber", "< 32", &|v| {
        number(v, "fan_out.master_kib_per_idle_subscriber", 1)
    });
    row("(4) catch-up 100,000 policies, s", "< 1.5", &|v| {
        number(v, "catch_up.0.seconds", 2)
    });
    row("(4) member peak RSS (100,000), MiB", "-", &|v| {
        mib(v, "catch_up.0.peak_rss_kib")
    });
    if !quick {
        row("(4) catch-up 1,000,000 policies, s", "< 15", &|v| {
            number(v, "catch_up.1.seconds", 2)
        });
        row("(4) member peak RSS (1,000,000), MiB", "< 512", &|v| {
            mib(v, "catch_up.1.peak_rss_kib")
        });
    }
    row(
        "(5) member file write per insert, ms: 100 / 100,000 policies",
        "-",
        &|v| {
            pair(
                v,
                "apply_cost.file_100.write_ms",
                "apply_cost.file_100000.write_ms",
                3,
            )
        },
    );
    row(
        "(5) apply cost ratio 100,000 / 100 (file write)",
        "< 1.5",
        &|v| number(v, "apply_cost.ratio_write", 2),
    );
    row(
        "(5) apply cost ratio 100,000 / 100 (ack-to-durable p50)",
        "< 1.5",
        &|v| number(v, "apply_cost.ratio_from_ack_p50", 2),
    );
    // Not the member's cost alone: it includes the master's commit, on a database that has just
    // taken 100,000 inserts.
    row(
        "(5) ratio 100,000 / 100, send-to-durable p50 (includes the master's commit)",
        "-",
        &|v| number(v, "apply_cost.ratio_propagation_p50", 2),
    );
    row(
        "(6) bytes to a member per new policy: stream message (+gRPC/HTTP2 framing)",
        "-",
        &|v| {
            format!(
                "{} ({})",
                number(v, "bytes_per_policy.stream_message_bytes", 0),
                number(v, "bytes_per_policy.stream_message_plus_framing_bytes", 0)
            )
        },
    );
    let model = "bytes_per_policy.model_anylog_30s_full_copy";
    row(
        "(6) MODEL AnyLog 30 s full copy, 100,000-policy ledger: bytes per member per new policy at 200/s",
        "-",
        &|v| {
            number(
                v,
                &format!("{model}.bytes_per_member_per_new_policy_at_200_per_s"),
                0,
            )
        },
    );
    row(
        "(6) MODEL AnyLog 30 s full copy: bytes per member every 30 s",
        "-",
        &|v| number(v, &format!("{model}.bytes_per_member_per_30s"), 0),
    );
    row(
        "(7) EdgeLake nodes (AnyLog protocol): pushes/s stored, 1 / 16 connections",
        "-",
        &|v| {
            pair(
                v,
                "anylog_pushes.one_connection_per_s",
                "anylog_pushes.connections_16_per_s",
                0,
            )
        },
    );
    row(
        "(7) get_blockchain of 100,000 policies to a node, s: first (read) / cached",
        "-",
        &|v| {
            pair(
                v,
                "anylog_get_blockchain_100000.first_seconds",
                "anylog_get_blockchain_100000.cached_seconds",
                2,
            )
        },
    );
    t
}

fn main() {
    let opts = options();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = chrono_like_now();
    let sample = (0..3).map(|_| policy()).collect::<Vec<_>>();
    let mut results = HashMap::new();
    let mut pg_cluster = None;
    for backend in opts.backends.clone() {
        let pg = if backend == "postgres" {
            match &opts.pg_url {
                Some(u) => Some(u.trim_end_matches('/').to_string()),
                None => {
                    eprintln!("starting a PostgreSQL cluster (fsync=on)");
                    let c = Cluster::start(true);
                    let url = c.base_url.clone();
                    pg_cluster = Some(c);
                    Some(url)
                }
            }
        } else {
            None
        };
        let start = Instant::now();
        let v = runtime.block_on(bench_backend(&backend, &opts, pg.as_deref()));
        eprintln!("[{backend}] done in {:.0}s", start.elapsed().as_secs_f64());
        results.insert(backend, v);
    }
    drop(pg_cluster);
    let t = table(&results, opts.quick);
    println!(
        "\nledger-bench{} — {started}, {} cores\n",
        if opts.quick { " --quick" } else { "" },
        num_cpus()
    );
    println!("{t}");
    let report = json!({
        "date": started, "quick": opts.quick, "cores": num_cpus(),
        "sample_policies_sent": sample,
        "results": results, "table_markdown": t,
    });
    if let Some(path) = &opts.json {
        std::fs::write(path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
        println!("JSON written to {}", path.display());
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn chrono_like_now() -> String {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
