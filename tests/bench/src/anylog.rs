//! (7) EdgeLake nodes: the AnyLog protocol, pushes and `get_blockchain`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ledger_anylog::digest::LedgerDigest;
use ledger_anylog::wire;
use serde_json::{Value, json};

use crate::Options;
use crate::stats::median;
use crate::workload::{connect, head, load, policy, start_master};

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

/// `get_blockchain` of the whole ledger, `runs` times: the first reads it from the database, the
/// others find it cached (the head did not move). Every file must be the ledger (`digest`).
pub(crate) async fn anylog_get_blockchain_runs(addr: &str, runs: usize, digest: &str) -> Value {
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
pub(crate) async fn anylog_only(backend: &str, opts: &Options, url: &str) -> Value {
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
pub(crate) async fn anylog_push_runs(addr: &str, runs: usize, secs: f64) -> Value {
    let (mut one, mut many) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        one.push(anylog_pushes(addr, 1, secs).await);
        many.push(anylog_pushes(addr, 16, secs).await);
    }
    eprintln!("  1 connection {one:?}\n  16 connections {many:?}");
    json!({"one_connection_per_s": median(&one), "one_connection_runs": one,
           "connections_16_per_s": median(&many), "connections_16_runs": many, "run_seconds": secs})
}
