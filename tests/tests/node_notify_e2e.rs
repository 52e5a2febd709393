//! The member beside an EdgeLake node: after each batch that changed its file, the real `member`
//! binary tells the node to reload its metadata (`--node-rest`, `--node-tcp`). A small HTTP
//! server in the test stands in for the node's REST server and records every request with the
//! member's file as it was when the request arrived; an AnyLog listener stands in for its TCP
//! server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ledger_testkit::client::{Client, delete_ok as delete, insert_ok as insert};
use ledger_testkit::member::{applied_seq, member_command_with_env};
use ledger_testkit::{Master, Member, wait_until, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const RELOAD: &str = "blockchain reload metadata";
/// What the member logs, once, when the node stops answering.
const UNREACHABLE: &str = "cannot reload the metadata of the node";
/// What it logs, once, when the node answers again.
const REACHABLE_AGAIN: &str = "is reachable again";
const BURST: usize = 1000;

fn operator(n: usize) -> String {
    format!(
        r#"{{"operator": {{"name": "op{n}", "company": "Acme", "ip": "10.0.0.{}", "port": {}}}}}"#,
        n % 250 + 1,
        32148 + n
    )
}

/// One request the stand-in node received.
#[derive(Debug, Clone)]
struct Request {
    method: String,
    /// Header names in lower case, in arrival order.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// When its head had arrived.
    at: Instant,
    /// The member's ledger file at that moment.
    file: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// How the stand-in node answers.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// `200 OK`, empty body, after this delay.
    Ok(Duration),
    /// As EdgeLake refuses: the error in the status line, then a malformed chunked body.
    Refuse,
    /// Reads the request and never answers.
    Never,
}

/// The node's REST server, as far as a reload goes.
struct RestNode {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
    /// Requests being answered, and the most at once.
    busy: Arc<AtomicUsize>,
    max_busy: Arc<AtomicUsize>,
    /// Connections open, and the most at once.
    open: Arc<AtomicUsize>,
    max_open: Arc<AtomicUsize>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for RestNode {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl RestNode {
    /// Listens on a free loopback port; each request records `file` as it is on arrival.
    async fn start(answer: Answer, file: PathBuf) -> RestNode {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        RestNode::serve(listener, answer, file)
    }

    fn serve(listener: TcpListener, answer: Answer, file: PathBuf) -> RestNode {
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let [busy, max_busy, open, max_open] = [(); 4].map(|_| Arc::new(AtomicUsize::new(0)));
        let accept = tokio::spawn({
            let (requests, busy, max_busy) = (requests.clone(), busy.clone(), max_busy.clone());
            let (open, max_open) = (open.clone(), max_open.clone());
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                    max_open.fetch_max(now, Ordering::SeqCst);
                    let (requests, busy, max_busy) =
                        (requests.clone(), busy.clone(), max_busy.clone());
                    let (open, file) = (open.clone(), file.clone());
                    tokio::spawn(async move {
                        serve_connection(stream, answer, &file, &requests, &busy, &max_busy).await;
                        open.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            }
        });
        RestNode {
            addr,
            requests,
            busy,
            max_busy,
            open,
            max_open,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    /// Waits (up to `seconds`) for more than `n` requests; returns request `n`.
    async fn request_after(&self, n: usize, seconds: u64) -> Request {
        wait_until(seconds, "a reload request", || async { self.count() > n }).await;
        self.requests()[n].clone()
    }

    /// Waits until no request has arrived, and none is being answered, for `quiet`.
    async fn settle(&self, quiet: Duration) {
        within(60, "the reloads to settle", async {
            loop {
                let n = self.count();
                tokio::time::sleep(quiet).await;
                if self.count() == n && self.busy.load(Ordering::SeqCst) == 0 {
                    return;
                }
            }
        })
        .await;
    }
}

/// Reads one request (head and `content-length` body), records it, answers it.
async fn serve_connection(
    mut stream: TcpStream,
    answer: Answer,
    file: &std::path::Path,
    requests: &Mutex<Vec<Request>>,
    busy: &AtomicUsize,
    max_busy: &AtomicUsize,
) {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
        }
        assert!(bytes.len() < 65536, "a request head over 64 KiB");
    };
    let at = Instant::now();
    let file = std::fs::read(file).unwrap_or_default();
    let head = String::from_utf8(bytes[..head_end].to_vec()).expect("a UTF-8 request head");
    let mut lines = head.split("\r\n");
    let method = lines
        .next()
        .and_then(|line| line.split(' ').next())
        .unwrap_or_default()
        .to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0);
    let mut body = bytes[head_end + 4..].to_vec();
    while body.len() < length {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&buf[..n]),
        }
    }
    requests.lock().unwrap().push(Request {
        method,
        headers,
        body,
        at,
        file,
    });
    match answer {
        Answer::Ok(delay) => {
            let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
            max_busy.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            busy.fetch_sub(1, Ordering::SeqCst);
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await;
        }
        Answer::Refuse => {
            let _ = stream
                .write_all(
                    b"HTTP/1.1 400 {\"method\": \"post\", \"err_code\": 113, \"err_text\": \"Needed Policy is not available\"}\r\n\
                      Transfer-Encoding: chunked\r\n\r\nthis is not a chunk\r\n",
                )
                .await;
        }
        Answer::Never => {
            // Hold the connection until the member drops it.
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
            return;
        }
    }
    let _ = stream.shutdown().await;
}

/// A loopback address nothing listens on (until a test binds it again).
fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().unwrap()
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// The master's digest and head seq.
async fn master_info(client: &mut Client) -> (String, u64) {
    let info = ledger_testkit::client::info(client).await;
    (info.digest, info.head_seq)
}

/// Whether the member's file is the master's ledger at `info`.
fn holds(member: &Member, info: &(String, u64)) -> bool {
    member.file_md5().as_ref() == Some(&info.0) && applied_seq(&member.file) == Some(info.1)
}

/// What the member's daemon recorded about the node (`blockchain.json.sidecar`).
fn sidecar(member: &Member) -> serde_json::Value {
    let path = ledger_member::sidecar::sidecar_path(&member.file);
    ledger_member::sidecar::read(&path).unwrap_or_default()
}

fn reloads_failed(member: &Member) -> u64 {
    sidecar(member)["node"]["reloads_failed"]
        .as_u64()
        .unwrap_or(0)
}

/// Inserts `BURST` policies one after another; returns when the last was acknowledged.
async fn burst(client: &Client, from: usize) -> Instant {
    let mut client = client.clone();
    for n in from..from + BURST {
        insert(&mut client, &operator(n)).await;
    }
    Instant::now()
}

fn assert_reload_request(request: &Request) {
    assert_eq!(request.method, "POST", "{request:?}");
    assert_eq!(request.header("command"), Some(RELOAD), "{request:?}");
    assert_eq!(
        request.header("user-agent"),
        Some("AnyLog/1.23"),
        "{request:?}"
    );
    assert!(request.body.is_empty(), "{request:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_change_is_followed_by_one_reload_once_the_file_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), &[]);
    let member_dir = tempfile::tempdir().unwrap();
    let file = member_dir.path().join("blockchain.json");
    let node = RestNode::start(Answer::Ok(Duration::ZERO), file.clone()).await;
    let mut member = Member::start(
        member_dir.path(),
        &[master.addr.to_string()],
        &["--node-rest", &node.url()],
    );
    member.wait_for_log(30, "caught up with master").await;
    // One reload once the member caught up (here: installed the empty ledger).
    let first = node.request_after(0, 10).await;
    assert_reload_request(&first);
    assert_eq!(
        first.header("host"),
        Some(node.addr.to_string().as_str()),
        "{first:?}"
    );
    node.settle(Duration::from_millis(500)).await;
    assert_eq!(node.count(), 1, "{:?}", node.requests());

    let mut client = master.client().await;
    let mut ids = Vec::new();
    for n in 0..5 {
        let before = node.count();
        let policy = insert(&mut client, &operator(n)).await;
        let inserted = Instant::now();
        let reload = node.request_after(before, 10).await;
        assert_reload_request(&reload);
        let after = reload.at.saturating_duration_since(inserted);
        assert!(
            after < Duration::from_secs(2),
            "the reload came {after:?} after the insert"
        );
        // The node is told only once the change is in the file.
        let text = String::from_utf8(reload.file.clone()).unwrap();
        assert!(
            text.contains(&policy.id),
            "the file did not hold {} when the reload arrived:\n{text}",
            policy.id
        );
        assert_eq!(text.lines().count(), n + 1);
        // One change, one reload.
        node.settle(Duration::from_millis(300)).await;
        assert_eq!(node.count(), before + 1, "{:?}", node.requests());
        ids.push(policy.id);
    }

    let before = node.count();
    delete(&mut client, &ids[2]).await;
    let reload = node.request_after(before, 10).await;
    let text = String::from_utf8(reload.file.clone()).unwrap();
    assert!(
        !text.contains(&ids[2]),
        "the delete was not in the file yet"
    );
    assert_eq!(text.lines().count(), 4);
    node.settle(Duration::from_millis(300)).await;
    assert_eq!(node.count(), before + 1);

    let shown = sidecar(&member);
    assert_eq!(shown["node"]["target"], format!("{}/ (REST)", node.url()));
    assert_eq!(shown["node"]["reloads_ok"], node.count() as u64);
    assert_eq!(shown["node"]["reloads_failed"], 0);
    assert!(!member.logs().contains(UNREACHABLE), "{}", member.logs());

    // A restarted member tells the node once it caught up, even with nothing new: the node may
    // have missed the last change while the member was down.
    assert!(member.terminate().success());
    let before = node.count();
    member.restart();
    member.wait_for_log(30, "caught up with master").await;
    let reload = node.request_after(before, 10).await;
    assert_reload_request(&reload);
    assert_eq!(reload.file, member.file_bytes());
    node.settle(Duration::from_millis(500)).await;
    assert_eq!(node.count(), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_coalesced_into_few_reloads_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), &[]);
    let member_dir = tempfile::tempdir().unwrap();
    let file = member_dir.path().join("blockchain.json");
    // A slow node: each reload takes 200 ms.
    let node = RestNode::start(Answer::Ok(Duration::from_millis(200)), file.clone()).await;
    let member = Member::start(
        member_dir.path(),
        &[master.addr.to_string()],
        &["--node-rest", &node.url()],
    );
    member.wait_for_log(30, "caught up with master").await;
    node.request_after(0, 10).await;
    node.settle(Duration::from_millis(500)).await;
    let before = node.count();

    let client = master.client().await;
    let started = Instant::now();
    within(120, "the burst", burst(&client, 0)).await;
    let info = master_info(&mut client.clone()).await;
    wait_until(60, "the member to hold the burst", || async {
        holds(&member, &info)
    })
    .await;
    node.settle(Duration::from_secs(1)).await;
    let took = started.elapsed();

    let reloads = &node.requests()[before..];
    for request in reloads {
        assert_reload_request(request);
    }
    assert!(
        reloads.len() * 5 <= BURST,
        "{} reloads for {BURST} inserts in {took:?}",
        reloads.len()
    );
    // Never two at once: each starts after the previous one was answered.
    assert_eq!(node.max_busy.load(Ordering::SeqCst), 1);
    for pair in reloads.windows(2) {
        assert!(pair[1].at.duration_since(pair[0].at) >= Duration::from_millis(195));
    }
    // The last one saw the whole burst.
    let last = reloads.last().expect("reloads during the burst");
    assert_eq!(last.file, member.file_bytes());
    assert_eq!(
        String::from_utf8_lossy(&last.file).lines().count(),
        BURST,
        "the last reload came before the last insert was in the file"
    );
    eprintln!(
        "{BURST} inserts in {took:?}: {} reloads of 200 ms",
        reloads.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_node_slows_nothing_and_gets_the_reload_when_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), &[]);
    let masters = [master.addr.to_string()];
    // Without a node; with a node whose port is closed; with a node that never answers.
    let (plain_dir, closed_dir, silent_dir) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let closed = closed_port();
    let silent = RestNode::start(Answer::Never, silent_dir.path().join("blockchain.json")).await;
    let plain = Member::start(plain_dir.path(), &masters, &[]);
    let closed_url = format!("http://{closed}");
    let to_closed = Member::start(
        closed_dir.path(),
        &masters,
        &["--node-rest", &closed_url, "--node-reload-timeout", "1s"],
    );
    let to_silent = Member::start(
        silent_dir.path(),
        &masters,
        &["--node-rest", &silent.url(), "--node-reload-timeout", "1s"],
    );
    for member in [&plain, &to_closed, &to_silent] {
        member.wait_for_log(30, "caught up with master").await;
    }

    let client = master.client().await;
    let started = Instant::now();
    let last_insert = within(120, "the burst", burst(&client, 0)).await;
    let info = master_info(&mut client.clone()).await;
    // How long after the last insert each member held the whole burst.
    let mut lag = Vec::new();
    let members = [&plain, &to_closed, &to_silent];
    let mut pending: Vec<usize> = (0..members.len()).collect();
    lag.resize(members.len(), Duration::ZERO);
    within(60, "every member to hold the burst", async {
        while !pending.is_empty() {
            pending.retain(|&i| {
                if holds(members[i], &info) {
                    lag[i] = last_insert.elapsed();
                    false
                } else {
                    true
                }
            });
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    eprintln!(
        "burst of {BURST} in {:?}; members done after the last insert: plain {:?}, closed port {:?}, silent node {:?}",
        last_insert - started,
        lag[0],
        lag[1],
        lag[2]
    );
    for (i, name) in [(1, "closed port"), (2, "silent node")] {
        assert!(
            lag[i] <= lag[0] + Duration::from_secs(2),
            "the member beside a {name} was {:?} behind the last insert, the plain member {:?}",
            lag[i],
            lag[0]
        );
    }

    // Both kept trying, and said so once.
    wait_until(30, "several failed reloads of each", || async {
        reloads_failed(&to_closed) >= 3 && reloads_failed(&to_silent) >= 3
    })
    .await;
    for member in [&to_closed, &to_silent] {
        let logs = member.logs();
        assert_eq!(count(&logs, UNREACHABLE), 1, "{logs}");
        assert_eq!(count(&logs, REACHABLE_AGAIN), 0, "{logs}");
        assert_eq!(sidecar(member)["node"]["reloads_ok"], 0);
        assert_eq!(sidecar(member)["node"]["last_reload"]["ok"], false);
    }
    assert!(to_silent.logs().contains("no answer within 1s"));
    // A timed-out reload ends its connection: one at a time, however many attempts.
    assert!(silent.count() >= 3);
    assert_eq!(silent.max_open.load(Ordering::SeqCst), 1);

    // The node comes back on its port: it gets a reload of the whole file (retries are at most
    // 5 s apart), and the member says so once.
    let listener = TcpListener::bind(closed)
        .await
        .expect("the closed port again");
    let back = RestNode::serve(listener, Answer::Ok(Duration::ZERO), to_closed.file.clone());
    let reload = back.request_after(0, 15).await;
    assert_reload_request(&reload);
    assert_eq!(reload.file, to_closed.file_bytes());
    to_closed.wait_for_log(10, REACHABLE_AGAIN).await;
    back.settle(Duration::from_millis(500)).await;
    assert_eq!(back.count(), 1, "one reload once it is back");
    assert_eq!(count(&to_closed.logs(), REACHABLE_AGAIN), 1);
    assert_eq!(count(&to_closed.logs(), UNREACHABLE), 1);
    // Open connections of the silent node: the member's attempt in flight, at most.
    assert!(silent.open.load(Ordering::SeqCst) <= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_is_logged_with_the_nodes_error_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), &[]);
    let member_dir = tempfile::tempdir().unwrap();
    let file = member_dir.path().join("blockchain.json");
    let node = RestNode::start(Answer::Refuse, file).await;
    let member = Member::start(
        member_dir.path(),
        &[master.addr.to_string()],
        &["--node-rest", &node.url()],
    );
    member.wait_for_log(30, "caught up with master").await;
    let mut client = master.client().await;
    insert(&mut client, &operator(0)).await;
    wait_until(30, "several refused reloads", || async {
        reloads_failed(&member) >= 3 && node.count() >= 3
    })
    .await;
    let info = master_info(&mut client).await;
    wait_until(30, "the member to hold the insert", || async {
        holds(&member, &info)
    })
    .await;
    let logs = member.logs();
    assert_eq!(count(&logs, UNREACHABLE), 1, "{logs}");
    let warning = logs
        .lines()
        .find(|line| line.contains(UNREACHABLE))
        .unwrap();
    assert!(
        warning.contains("HTTP 400") && warning.contains("Needed Policy is not available"),
        "{warning}"
    );
    let last = &sidecar(&member)["node"]["last_reload"];
    assert_eq!(last["ok"], false);
    assert!(
        last["error"]
            .as_str()
            .unwrap()
            .contains("Needed Policy is not available")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_tcp_sends_the_command_as_an_anylog_message() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), &[]);
    let mut node = ledger_testkit::anylog::Node::start().await;
    let member_dir = tempfile::tempdir().unwrap();
    let member = Member::start(
        member_dir.path(),
        &[master.addr.to_string()],
        &["--node-tcp", &node.addr().to_string()],
    );
    member.wait_for_log(30, "caught up with master").await;
    let check = |message: &ledger_testkit::anylog::Received| {
        assert_eq!(message.command, RELOAD, "{message:?}");
        assert_eq!(message.blocks(), 1, "{message:?}");
        assert!(message.data.is_empty(), "{message:?}");
        let header = message.header();
        assert_eq!(
            header.info_type,
            ledger_testkit::anylog::info_type::REQUEST,
            "{message:?}"
        );
        assert_eq!(header.error_code, 0);
        assert_eq!(header.source_ip, "0.0.0.0");
        assert_eq!(header.source_port, 0);
    };
    // The reload at start.
    check(&node.next_message(10).await);
    node.expect_nothing_for(Duration::from_millis(500)).await;

    let mut client = master.client().await;
    for n in 0..3 {
        let policy = insert(&mut client, &operator(n)).await;
        let inserted = Instant::now();
        let message = node.next_message(10).await;
        assert!(inserted.elapsed() < Duration::from_secs(2));
        check(&message);
        let text = String::from_utf8(member.file_bytes()).unwrap();
        assert!(text.contains(&policy.id));
        node.expect_nothing_for(Duration::from_millis(300)).await;
    }
    let shown = sidecar(&member);
    assert_eq!(shown["node"]["target"], format!("{} (TCP)", node.addr()));
    assert_eq!(shown["node"]["reloads_ok"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_node_flags_stop_the_daemon_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blockchain.json").display().to_string();
    let base = ["--master", "127.0.0.1:1", "--ledger-file", &file];

    let mut https = base.to_vec();
    https.extend(["--node-rest", "https://127.0.0.1:32049"]);
    let out = member_command_with_env(&https, &[], None).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("https is not supported"), "{out:?}");

    let out = member_command_with_env(
        &base,
        &[
            ("LEDGER_NODE_REST", "http://127.0.0.1:32049"),
            ("LEDGER_NODE_TCP", "127.0.0.1:32048"),
        ],
        None,
    )
    .await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("cannot be used with"), "{out:?}");

    let mut no_scheme = base.to_vec();
    no_scheme.extend(["--node-rest", "127.0.0.1:32049"]);
    let out = member_command_with_env(&no_scheme, &[], None).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("http://"), "{out:?}");
    // Nothing was started: no ledger file.
    assert!(!std::path::Path::new(&file).exists());
}
