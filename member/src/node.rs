//! Telling the EdgeLake node beside the member that its ledger changed.
//!
//! An EdgeLake node answers `blockchain get` from memory and reads `blockchain.json` again only
//! on its own sync or on the command `blockchain reload metadata`. With `--node-rest` (or
//! `--node-tcp`) the daemon sends it that command after each batch that changed the file.
//!
//! Reloads never hold up the file: [`NodeNotifier::notify`] only marks a reload as wanted, and a
//! task of its own sends them, one at a time. Changes that arrive while a reload is in flight
//! are covered by exactly one more reload after it, however many there are. A reload that fails
//! (no answer within the timeout, a refused connection, an HTTP status other than 2xx) is tried
//! again with backoff until one succeeds; newer changes are covered by that retry. The log says
//! once that the node cannot be reached and once that it is reachable again.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::header::{CONNECTION, CONTENT_LENGTH, HOST, USER_AGENT};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use ledger_anylog::wire::{Envelope, Message, info_type, write_message};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics;
use crate::sidecar::Sidecar;
use ledger_client::backoff::Backoff;

/// The command that makes an EdgeLake node read its ledger file again.
pub const RELOAD_COMMAND: &str = "blockchain reload metadata";

/// The User-Agent an EdgeLake REST server requires to run a command (without it a request is
/// answered like a ping and nothing runs).
pub const USER_AGENT_VALUE: &str = "AnyLog/1.23";

/// The most bytes of a refusal's body put in the log.
const MAX_ERROR_BODY: usize = 512;

/// Where the node takes commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeTarget {
    /// The node's REST server, `http://HOST:PORT`: an HTTP POST with the `command` header.
    Rest(Uri),
    /// The node's TCP server: one AnyLog message on a new connection, no answer.
    Tcp(SocketAddr),
}

impl NodeTarget {
    /// Reads `--node-rest`: an `http://HOST[:PORT][/PATH]` URL. `https` is refused: EdgeLake's
    /// REST server is reached in plain HTTP here.
    pub fn rest(text: &str) -> Result<NodeTarget, String> {
        let uri: Uri = text
            .parse()
            .map_err(|e| format!("{text:?} is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(format!(
                    "{text:?}: https is not supported for the node's REST server; give its http:// URL (e.g. http://127.0.0.1:32049)"
                ));
            }
            Some(other) => {
                return Err(format!(
                    "{text:?}: the scheme {other:?} is not supported; give an http:// URL (e.g. http://127.0.0.1:32049)"
                ));
            }
            None => {
                return Err(format!(
                    "{text:?} has no scheme; give an http:// URL (e.g. http://127.0.0.1:32049)"
                ));
            }
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(format!("{text:?} has no host"));
        }
        Ok(NodeTarget::Rest(uri))
    }
}

impl fmt::Display for NodeTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeTarget::Rest(uri) => write!(f, "{uri} (REST)"),
            NodeTarget::Tcp(addr) => write!(f, "{addr} (TCP)"),
        }
    }
}

/// How reloads are sent.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// How long one reload may take (connecting included) before it counts as failed.
    pub timeout: Duration,
    /// The first delay before a failed reload is tried again; it doubles after each failure.
    pub retry_min: Duration,
    /// The longest delay between two attempts.
    pub retry_max: Duration,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            timeout: Duration::from_secs(5),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
        }
    }
}

/// A handle on the task that tells the node to reload; cheap to clone.
#[derive(Debug, Clone)]
pub struct NodeNotifier {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Counts the changes notified: a reload that starts after the count reached `n` covers
    /// them all.
    wanted: AtomicU64,
    /// Wakes the task; a wake-up while it is busy is kept (one, however many arrive).
    wake: Notify,
}

impl NodeNotifier {
    /// Starts the task telling `target` to reload, with the default [`NodeOptions`]; it stops
    /// when `shutdown` is cancelled.
    pub fn start(target: NodeTarget, sidecar: Sidecar, shutdown: CancellationToken) -> Self {
        Self::start_with(target, NodeOptions::default(), sidecar, shutdown)
    }

    /// Starts the task telling `target` to reload, with `options`. Nothing is sent before the
    /// first [`NodeNotifier::notify`].
    pub fn start_with(
        target: NodeTarget,
        options: NodeOptions,
        sidecar: Sidecar,
        shutdown: CancellationToken,
    ) -> Self {
        let shared = Arc::new(Shared {
            wanted: AtomicU64::new(0),
            wake: Notify::new(),
        });
        sidecar.set_node(&target.to_string());
        tracing::info!(
            "telling the node at {target} to reload its metadata after each change (`{RELOAD_COMMAND}`)"
        );
        tokio::spawn(run(target, options, sidecar, shared.clone(), shutdown));
        NodeNotifier { shared }
    }

    /// The file changed: the node should reload. Returns at once; a reload follows, after the
    /// one in flight if there is one.
    pub fn notify(&self) {
        self.shared.wanted.fetch_add(1, Ordering::SeqCst);
        self.shared.wake.notify_one();
    }
}

/// Sends reloads while they are wanted, until `shutdown`.
async fn run(
    target: NodeTarget,
    options: NodeOptions,
    sidecar: Sidecar,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(options.retry_min, options.retry_max);
    // The count of changes the last successful reload covered.
    let mut covered = 0;
    // Whether the node was reported unreachable and has not answered since.
    let mut failing = false;
    loop {
        if shared.wanted.load(Ordering::SeqCst) == covered {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = shared.wake.notified() => continue,
            }
        }
        // Every change notified up to here is in the file: this reload covers it.
        let wanted = shared.wanted.load(Ordering::SeqCst);
        let started = Instant::now();
        let attempt = tokio::time::timeout(options.timeout, reload(&target));
        let result = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            result = attempt => match result {
                Ok(result) => result,
                Err(_) => Err(format!("no answer within {:?}", options.timeout)),
            },
        };
        metrics::node_reload_duration(started.elapsed());
        metrics::node_reload(result.is_ok());
        metrics::node_reachable(result.is_ok());
        sidecar.reload_done(result.as_ref().err().map(String::as_str));
        match result {
            Ok(()) => {
                covered = wanted;
                backoff.reset();
                if failing {
                    failing = false;
                    tracing::info!(
                        "the node at {target} is reachable again and reloaded its metadata"
                    );
                } else {
                    tracing::debug!(elapsed = ?started.elapsed(), "the node reloaded its metadata");
                }
            }
            Err(reason) => {
                if failing {
                    tracing::debug!("the node at {target} did not reload its metadata: {reason}");
                } else {
                    failing = true;
                    tracing::warn!(
                        "cannot reload the metadata of the node at {target}: {reason}; retrying with backoff (at most {:?} apart) until it answers",
                        backoff.max()
                    );
                }
                let delay = backoff.next_delay();
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Sends the node one `blockchain reload metadata`.
async fn reload(target: &NodeTarget) -> Result<(), String> {
    match target {
        NodeTarget::Rest(uri) => reload_rest(uri).await,
        NodeTarget::Tcp(addr) => reload_tcp(*addr).await,
    }
}

/// An HTTP POST with the command in the `command` header and an empty body, on a connection of
/// its own: success is a 2xx status. EdgeLake puts an error's text in the status line (and may
/// follow it with a malformed body), so the status line is what the error reports.
async fn reload_rest(uri: &Uri) -> Result<(), String> {
    let host = uri.host().unwrap_or_default();
    let port = uri.port_u16().unwrap_or(80);
    let stream = TcpStream::connect(format!("{host}:{port}"))
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    // Ends the connection when the attempt ends, answered or not (a timeout drops it here).
    let _connection = AbortOnDrop(tokio::spawn(async move {
        let _ = connection.await;
    }));
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or_default();
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = Request::post(path)
        .header(HOST, authority)
        .header(USER_AGENT, USER_AGENT_VALUE)
        .header("command", RELOAD_COMMAND)
        .header(CONTENT_LENGTH, 0)
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("no valid HTTP answer: {e}"))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let reason = response
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
        .or_else(|| status.canonical_reason().map(str::to_string))
        .unwrap_or_default();
    let body = match Limited::new(response.into_body(), MAX_ERROR_BODY)
        .collect()
        .await
    {
        Ok(body) => String::from_utf8_lossy(&body.to_bytes()).trim().to_string(),
        Err(_) => String::new(),
    };
    let mut text = format!("HTTP {} {reason}", status.as_u16());
    if !body.is_empty() {
        text.push_str(": ");
        text.push_str(&body);
    }
    Err(text)
}

/// One AnyLog message on a new connection to the node's TCP server. The node has nowhere to
/// answer (source 0.0.0.0:0), and does not: success is the message written.
async fn reload_tcp(addr: SocketAddr) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let message = Message {
        envelope: Envelope {
            source_ip: "0.0.0.0".into(),
            source_port: 0,
            info_type: info_type::COMMAND,
            ..Envelope::default()
        },
        ..Message::new(RELOAD_COMMAND, Vec::new())
    };
    // The whole attempt is bounded by the caller's timeout; this one is per block.
    write_message(&mut stream, &message, false, Duration::from_secs(3600))
        .await
        .map_err(|e| format!("cannot send the message: {e}"))?;
    stream
        .shutdown()
        .await
        .map_err(|e| format!("cannot close the connection: {e}"))
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_urls_are_http_only() {
        let target = NodeTarget::rest("http://127.0.0.1:32049").unwrap();
        assert_eq!(target.to_string(), "http://127.0.0.1:32049/ (REST)");
        assert!(NodeTarget::rest("http://node.local").is_ok());
        let https = NodeTarget::rest("https://127.0.0.1:32049").unwrap_err();
        assert!(https.contains("https is not supported"), "{https}");
        assert!(NodeTarget::rest("127.0.0.1:32049").is_err());
        assert!(NodeTarget::rest("ftp://127.0.0.1:21").is_err());
        assert!(NodeTarget::rest("not a url").is_err());
    }

    /// A listener that counts requests and answers each with `answer` after `delay`.
    async fn counting_server(
        delay: Duration,
        answer: &'static str,
    ) -> (SocketAddr, Arc<AtomicU64>, Arc<AtomicU64>) {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let busy = Arc::new(AtomicU64::new(0));
        let max_busy = Arc::new(AtomicU64::new(0));
        let (count, max) = (requests.clone(), max_busy.clone());
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let (count, busy, max) = (count.clone(), busy.clone(), max.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
                    max.fetch_max(now, Ordering::SeqCst);
                    count.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    busy.fetch_sub(1, Ordering::SeqCst);
                    let _ = stream.write_all(answer.as_bytes()).await;
                });
            }
        });
        (addr, requests, max_busy)
    }

    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";

    #[tokio::test]
    async fn notifications_while_a_reload_is_in_flight_make_one_more() {
        let dir = tempfile::tempdir().unwrap();
        let sidecar = Sidecar::open(&dir.path().join("blockchain.json"));
        let (addr, requests, max_busy) = counting_server(Duration::from_millis(200), OK).await;
        let shutdown = CancellationToken::new();
        let target = NodeTarget::rest(&format!("http://{addr}")).unwrap();
        let node = NodeNotifier::start(target, sidecar, shutdown.clone());
        let reach = |n: u64| {
            let requests = requests.clone();
            async move {
                while requests.load(Ordering::SeqCst) < n {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        // While one reload is in flight, a hundred notifications make one more.
        node.notify();
        tokio::time::timeout(Duration::from_secs(10), reach(1))
            .await
            .unwrap();
        for _ in 0..100 {
            node.notify();
        }
        tokio::time::timeout(Duration::from_secs(10), reach(2))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(requests.load(Ordering::SeqCst), 2);
        assert_eq!(max_busy.load(Ordering::SeqCst), 1);
        // Once idle, one notification is one reload.
        node.notify();
        tokio::time::timeout(Duration::from_secs(10), reach(3))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(requests.load(Ordering::SeqCst), 3);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_refusal_is_retried_and_recorded_with_its_status_line() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = dir.path().join("blockchain.json");
        let sidecar = Sidecar::open(&ledger);
        // As EdgeLake answers: the error in the status line, then a malformed chunked body.
        let (addr, requests, _) = counting_server(
            Duration::ZERO,
            "HTTP/1.1 400 {\"err_code\": 156, \"err_text\": \"Wrong HTTP method used\"}\r\n\
             transfer-encoding: chunked\r\n\r\nnot a chunk\r\n",
        )
        .await;
        let shutdown = CancellationToken::new();
        let target = NodeTarget::rest(&format!("http://{addr}/")).unwrap();
        let options = NodeOptions {
            retry_min: Duration::from_millis(10),
            retry_max: Duration::from_millis(20),
            ..NodeOptions::default()
        };
        let node = NodeNotifier::start_with(target, options, sidecar, shutdown.clone());
        node.notify();
        tokio::time::sleep(Duration::from_millis(500)).await;
        shutdown.cancel();
        assert!(requests.load(Ordering::SeqCst) >= 5);
        let shown = crate::sidecar::read(&crate::sidecar::sidecar_path(&ledger)).unwrap();
        assert_eq!(shown["node"]["reloads_ok"], 0);
        assert!(shown["node"]["reloads_failed"].as_u64().unwrap() >= 5);
        let error = shown["node"]["last_reload"]["error"].as_str().unwrap();
        assert!(
            error.contains("HTTP 400") && error.contains("Wrong HTTP method used"),
            "{error}"
        );
    }
}
