//! The AnyLog edge: EdgeLake/AnyLog nodes talk to this master in their own TCP protocol, as they
//! would to an EdgeLake master, and every write goes through the same [`Ledger`] core as gRPC
//! (same completion, validation, limits, metrics, seq and streaming to members).
//!
//! One message a connection; answers go back on a new connection to the node's TCP server (the
//! address in the message's header): the ledger file after `event get_blockchain` or
//! `file get`, an `echo` with an error code after a failed write or an unsupported command. A
//! successful write is not answered, as with EdgeLake's master.

pub mod command;
pub mod listener;

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ipnet::IpNet;
use ledger_anylog::policy::{self, PolicyError};
use ledger_anylog::wire::{self, Envelope, Message, error_code, generic_flag, info_type};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::error::LedgerError;
use crate::ledger::{Caller, Ledger};
use crate::log_limit::{self, LogLimit};
use crate::metrics;
use command::{Refusal, Request, clip};
use ledger_storage::Rejection;

/// How the AnyLog edge serves nodes.
#[derive(Debug, Clone)]
pub struct AnyLogOptions {
    /// The networks whose nodes may insert and delete; `None`: any.
    pub write_from: Option<Vec<IpNet>>,
    /// The address put in the header of every message this master sends: where nodes would
    /// answer. `0.0.0.0` makes each node use the address the connection came from.
    pub reply_ip: String,
    /// The port put beside `reply_ip`.
    pub reply_port: u16,
    /// How long a node may take to send one block, and to take one the master sends.
    pub block_timeout: Duration,
    /// How long the master tries to connect back to a node.
    pub connect_timeout: Duration,
    /// The largest message accepted, in blocks (a policy of `--max-policy-bytes` and then some).
    pub max_message_blocks: u32,
    /// The most connections served at once; more wait to be accepted.
    pub max_connections: usize,
}

/// The AnyLog protocol in front of a [`Ledger`].
pub struct AnyLogEdge {
    ledger: Arc<Ledger>,
    options: AnyLogOptions,
    /// `N` of the next `.master_id_N` file name, 1 to 9 and round again, as EdgeLake names them.
    next_transfer: AtomicU32,
    /// The command words already logged as unsupported: each is logged once.
    unsupported_logged: Mutex<HashSet<String>>,
    connections: Arc<Semaphore>,
    /// Cancelled when the master stops: connections in progress are abandoned (a push whose
    /// write was queued is still committed; a node re-sends what its next sync lacks).
    shutdown: CancellationToken,
}

/// Refused pushes and drops: nodes (or anyone) choose how often they happen.
static REFUSED_WRITES: LogLimit = LogLimit::new(Duration::from_secs(10));

/// At most this many distinct unsupported command words are remembered (then they are no
/// longer logged): hostile clients cannot grow the set without bound.
const MAX_REMEMBERED_WORDS: usize = 1024;

impl AnyLogEdge {
    /// The AnyLog protocol for `ledger`.
    pub fn new(
        ledger: Arc<Ledger>,
        options: AnyLogOptions,
        shutdown: CancellationToken,
    ) -> Arc<AnyLogEdge> {
        Arc::new(AnyLogEdge {
            ledger,
            shutdown,
            connections: Arc::new(Semaphore::new(options.max_connections)),
            options,
            next_transfer: AtomicU32::new(0),
            unsupported_logged: Mutex::new(HashSet::new()),
        })
    }

    /// Waits until fewer than `--anylog-max-connections` connections are being served, and
    /// holds the place of one more. Waiting, not refusing: a node's push has no answer, so a
    /// connection closed unread would be a write lost without a word. While the master waits,
    /// new connections wait in the listen backlog and nodes in their connect.
    pub async fn admit(&self) -> OwnedSemaphorePermit {
        self.connections
            .clone()
            .acquire_owned()
            .await
            .expect("the connection semaphore is never closed")
    }

    /// Serves one connection from `peer`, admitted with `permit`, in a task of its own: reads
    /// its message, handles it, answers the node on a new connection if there is anything to say.
    pub fn spawn_connection(
        self: &Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) {
        let edge = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = edge.serve_connection(stream, peer) => {}
                _ = edge.shutdown.cancelled() => {
                    tracing::debug!(%peer, "anylog: connection abandoned at shutdown");
                }
            }
            drop(permit);
        });
    }

    async fn serve_connection(&self, mut stream: TcpStream, peer: SocketAddr) {
        let message = wire::read_message(
            &mut stream,
            self.options.max_message_blocks,
            self.options.block_timeout,
        )
        .await;
        // The node reads nothing on this connection: close it before working.
        drop(stream);
        match message {
            Ok(message) => self.handle(message, peer, true).await,
            Err(e) => {
                metrics::anylog_message("none", "malformed");
                static MALFORMED: LogLimit = LogLimit::new(Duration::from_secs(10));
                if let Some(suppressed) = MALFORMED.admit() {
                    tracing::info!(%peer, "anylog: dropped a connection: {e}{}", log_limit::more(suppressed));
                }
            }
        }
    }

    /// Handles one message; `outer` is false for the command a large message carried.
    async fn handle(&self, message: Message, peer: SocketAddr, outer: bool) {
        let node = Node::of(&message.envelope, peer);
        let request = match command::parse(&message.command) {
            Ok(request) => request,
            Err(refusal) => return self.refuse(&node, refusal).await,
        };
        match request {
            Request::GetBlockchain { dest, md5 } => self.get_blockchain(&node, &dest, &md5).await,
            Request::FileGet { dest } => self.file_get(&node, &dest).await,
            Request::Push {
                json,
                ignore_duplicate,
            } => self.push(&node, &json, ignore_duplicate).await,
            Request::DropIds(ids) => self.drop_ids(&node, ids).await,
            Request::DropPolicy(json) => self.drop_policy(&node, &json).await,
            Request::FileWrite { name }
                if outer && message.envelope.generic_flag == generic_flag::LARGE_MESSAGE =>
            {
                match String::from_utf8(message.data) {
                    Ok(command) => {
                        tracing::debug!(%peer, %name, bytes = command.len(), "anylog: large message");
                        let inner = Message {
                            envelope: message.envelope,
                            command,
                            auth: Vec::new(),
                            data: Vec::new(),
                        };
                        Box::pin(self.handle(inner, peer, false)).await;
                    }
                    Err(_) => {
                        let refusal = Refusal {
                            code: error_code::COMMAND_STRUCTURE,
                            reason: format!("the large message {name} is not UTF-8 text"),
                            words: "file write".into(),
                        };
                        self.refuse(&node, refusal).await;
                    }
                }
            }
            Request::FileWrite { name } => {
                let refusal = Refusal {
                    code: error_code::COMMAND_STRUCTURE,
                    reason: format!(
                        "a Ledger master takes no files (file write {name}, generic flag {}): only large messages",
                        message.envelope.generic_flag
                    ),
                    words: "file write".into(),
                };
                self.refuse(&node, refusal).await;
            }
            Request::Report(text) => {
                metrics::anylog_message("echo", "ok");
                let data = String::from_utf8_lossy(&message.data);
                tracing::info!(node = %node.address(), error = message.envelope.error, "anylog: the node says: {} {}", clip(&text), clip(&data));
            }
        }
    }

    async fn get_blockchain(&self, node: &Node, dest: &str, md5: &str) {
        let file = match self.ledger.file().await {
            Ok(file) => file,
            Err(e) => {
                metrics::anylog_message("get_blockchain", "error");
                tracing::warn!(node = %node.address(), "anylog: cannot read the ledger for get_blockchain: {e}");
                let echo = self.echo(
                    node,
                    String::from("echo"),
                    e.to_string(),
                    info_type::ECHO,
                    error_code::FAILED_TO_PULL_BLOCKCHAIN,
                );
                self.send_message(node, &echo).await;
                return;
            }
        };
        if md5 == file.digest {
            metrics::anylog_message("get_blockchain", "unchanged");
            tracing::debug!(node = %node.address(), head_seq = file.head_seq, "anylog: the node's ledger is current");
            return;
        }
        let n = self.next_transfer.fetch_add(1, Ordering::Relaxed) % 9 + 1;
        let name = master_id_name(dest, n);
        let envelope = Envelope {
            generic_flag: generic_flag::LEDGER_FILE,
            ..self.envelope(node)
        };
        let command = format!("file write {}", name.replace(' ', "\t"));
        let sent = self.send(node, &envelope, &command, &file.bytes).await;
        metrics::anylog_message("get_blockchain", if sent { "sent" } else { "error" });
        if sent {
            tracing::debug!(node = %node.address(), %name, head_seq = file.head_seq, bytes = file.bytes.len(), "anylog: sent the ledger");
        }
    }

    async fn file_get(&self, node: &Node, dest: &str) {
        let file = match self.ledger.file().await {
            Ok(file) => file,
            Err(e) => {
                metrics::anylog_message("file_get", "error");
                let echo = self.echo(
                    node,
                    "echo 'File get' operation failed".into(),
                    e.to_string(),
                    info_type::ECHO,
                    error_code::FILE_READ_FAILED,
                );
                self.send_message(node, &echo).await;
                return;
            }
        };
        let envelope = Envelope {
            generic_flag: generic_flag::PLAIN,
            ..self.envelope(node)
        };
        let command = format!("file write {}", dest.replace(' ', "\t"));
        let sent = self.send(node, &envelope, &command, &file.bytes).await;
        metrics::anylog_message("file_get", if sent { "sent" } else { "error" });
        if sent {
            tracing::info!(node = %node.address(), %dest, head_seq = file.head_seq, "anylog: seeded a node with the ledger");
        }
    }

    async fn push(&self, node: &Node, json: &str, ignore_duplicate: bool) {
        let word = if ignore_duplicate {
            "push_ignore"
        } else {
            "push"
        };
        if let Err(refusal) = self.may_write(node) {
            metrics::anylog_message(word, "denied");
            return self.fail(node, "push", refusal).await;
        }
        match self
            .ledger
            .insert(json, &Caller::at(node.host.clone()))
            .await
        {
            Ok(policy) => {
                metrics::anylog_message(word, "ok");
                tracing::debug!(node = %node.address(), id = %policy.id, seq = policy.seq, "anylog: pushed");
            }
            Err(LedgerError::Rejected(Rejection::AlreadyExists(id))) if ignore_duplicate => {
                metrics::anylog_message(word, "ok");
                tracing::debug!(node = %node.address(), %id, "anylog: pushed again (ignored)");
            }
            // Through a relay, the upstream's answer to a duplicate.
            Err(LedgerError::Upstream(status))
                if ignore_duplicate && status.code() == tonic::Code::AlreadyExists =>
            {
                metrics::anylog_message(word, "ok");
                tracing::debug!(node = %node.address(), "anylog: pushed again (ignored upstream)");
            }
            Err(e) => {
                metrics::anylog_message(word, metrics::error_outcome(&e));
                if let Some(suppressed) = REFUSED_WRITES.admit() {
                    tracing::info!(node = %node.address(), "anylog: push refused: {e}{}", log_limit::more(suppressed));
                }
                self.fail(node, "push", (echo_code(&e), e.to_string()))
                    .await;
            }
        }
    }

    async fn drop_ids(&self, node: &Node, ids: Vec<String>) {
        if let Err(refusal) = self.may_write(node) {
            metrics::anylog_message("drop", "denied");
            return self.fail(node, "drop", refusal).await;
        }
        for id in ids {
            match self
                .ledger
                .delete(&id, &Caller::at(node.host.clone()))
                .await
            {
                Ok(_) => metrics::anylog_message("drop", "ok"),
                Err(e) => {
                    metrics::anylog_message("drop", metrics::error_outcome(&e));
                    if let Some(suppressed) = REFUSED_WRITES.admit() {
                        tracing::info!(node = %node.address(), %id, "anylog: drop refused: {e}{}", log_limit::more(suppressed));
                    }
                    self.fail(node, "drop", (echo_code(&e), e.to_string()))
                        .await;
                }
            }
        }
    }

    async fn drop_policy(&self, node: &Node, json: &str) {
        // The policy names its id, or is completed to find it, as a push of it would be.
        match policy::complete(json, chrono::Utc::now()) {
            Ok(policy) => self.drop_ids(node, vec![policy.id]).await,
            Err(e) => {
                metrics::anylog_message("drop", "invalid");
                let e = LedgerError::from(e);
                self.fail(node, "drop", (echo_code(&e), e.to_string()))
                    .await;
            }
        }
    }

    /// Whether `node` may write through this protocol.
    fn may_write(&self, node: &Node) -> Result<(), (u16, String)> {
        match &self.options.write_from {
            Some(networks) if !networks.iter().any(|n| n.contains(&node.peer)) => Err((
                error_code::BLOCKCHAIN_OPERATION_FAILED,
                format!(
                    "this Ledger master takes no writes through the AnyLog protocol from {} (see --anylog-write-from)",
                    node.peer
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Answers a failed `blockchain <verb>` as EdgeLake's master does.
    async fn fail(&self, node: &Node, verb: &str, (code, reason): (u16, String)) {
        let echo = self.echo(
            node,
            format!("echo Blockchain message '{verb}' failed"),
            reason,
            info_type::BLOCKCHAIN_ECHO,
            code,
        );
        self.send_message(node, &echo).await;
    }

    async fn refuse(&self, node: &Node, refusal: Refusal) {
        metrics::anylog_message("unsupported", "refused");
        let first_time = {
            let mut logged = self
                .unsupported_logged
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            logged.len() < MAX_REMEMBERED_WORDS && logged.insert(refusal.words.clone())
        };
        if first_time {
            tracing::warn!(node = %node.address(), words = %refusal.words, "anylog: {} (logged once per command)", refusal.reason);
        }
        // A failed `blockchain <verb>` is answered as every failed blockchain message is.
        if let Some(verb) = refusal.words.strip_prefix("blockchain ") {
            let verb = verb.to_string();
            return self.fail(node, &verb, (refusal.code, refusal.reason)).await;
        }
        let echo = self.echo(
            node,
            format!("echo {}", refusal.reason),
            String::new(),
            info_type::ECHO,
            refusal.code,
        );
        self.send_message(node, &echo).await;
    }

    fn echo(&self, node: &Node, command: String, data: String, info: u8, code: u16) -> Message {
        Message {
            envelope: Envelope {
                info_type: info,
                error: code,
                ..self.envelope(node)
            },
            command,
            auth: Vec::new(),
            data: data.into_bytes(),
        }
    }

    /// This master's header for a message to `node`: its reply address, and the request's job,
    /// which lets the node hand the answer to the command that waits for it.
    fn envelope(&self, node: &Node) -> Envelope {
        Envelope {
            source_ip: self.options.reply_ip.clone(),
            source_port: u32::from(self.options.reply_port),
            job: node.job,
            ..Envelope::default()
        }
    }

    async fn send_message(&self, node: &Node, message: &Message) -> bool {
        self.send(node, &message.envelope, &message.command, &message.data)
            .await
    }

    /// Connects to the node and sends it a message; false if the node could not be reached or
    /// did not take it. A `file write` follows the rules of files (see [`wire::encode`]).
    async fn send(&self, node: &Node, envelope: &Envelope, command: &str, data: &[u8]) -> bool {
        let file_rules = command.starts_with("file write");
        let result = async {
            let Some(addr) = node.reply_addr() else {
                return Err(format!(
                    "the node gave no address to answer ({}:{})",
                    node.ip, node.port
                ));
            };
            let mut stream =
                tokio::time::timeout(self.options.connect_timeout, TcpStream::connect(addr))
                    .await
                    .map_err(|_| {
                        format!(
                            "no connection to {addr} within {:?}",
                            self.options.connect_timeout
                        )
                    })?
                    .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
            let _ = stream.set_nodelay(true);
            let blocks = wire::encode(envelope, command, data, file_rules)?;
            wire::write_blocks(&mut stream, blocks, self.options.block_timeout)
                .await
                .map_err(|e| format!("sending to {addr}: {e}"))?;
            metrics::anylog_bytes_sent(data.len());
            Ok(())
        }
        .await;
        match result {
            Ok(()) => true,
            Err(e) => {
                metrics::anylog_message("reply", "unreachable");
                tracing::warn!(node = %node.address(), "anylog: cannot answer the node: {e}");
                false
            }
        }
    }
}

/// The node a message came from.
struct Node {
    /// The node's TCP server address as its header gives it (the peer's when it gives none).
    ip: String,
    port: u32,
    /// The connection's peer address: who actually connected.
    peer: IpAddr,
    /// The `host` of its writes: the node's address, as EdgeLake's master records it.
    host: String,
    job: [u8; 6],
}

impl Node {
    fn of(envelope: &Envelope, peer: SocketAddr) -> Node {
        // A node that does not know its address says 0.0.0.0: the connection's peer is it.
        let ip = match envelope.source_ip.as_str() {
            "" | "0.0.0.0" => peer.ip().to_string(),
            ip => ip.to_string(),
        };
        Node {
            host: ip.clone(),
            ip,
            port: envelope.source_port,
            peer: peer.ip(),
            job: envelope.job,
        }
    }

    /// Where answers go.
    fn reply_addr(&self) -> Option<SocketAddr> {
        let port = u16::try_from(self.port).ok().filter(|p| *p != 0)?;
        let ip: IpAddr = self.ip.parse().ok()?;
        Some(SocketAddr::new(ip, port))
    }

    fn address(&self) -> String {
        if self.ip == self.peer.to_string() {
            format!("{}:{}", self.ip, self.port)
        } else {
            format!("{}:{} (from {})", self.ip, self.port, self.peer)
        }
    }
}

/// EdgeLake's name for the n-th ledger file a master sends: `.master_id_N` before the extension
/// of the node's path (`/x/blockchain.new` → `/x/blockchain.master_id_3.new`), or at its end.
pub fn master_id_name(dest: &str, n: u32) -> String {
    let file_name_start = dest.rfind('/').map_or(0, |at| at + 1);
    match dest.rfind('.').filter(|at| *at >= file_name_start) {
        Some(at) => format!("{}.master_id_{n}{}", &dest[..at], &dest[at..]),
        None => format!("{dest}.master_id_{n}"),
    }
}

/// The one place where ledger errors become the status codes EdgeLake nodes know.
fn echo_code(error: &LedgerError) -> u16 {
    match error {
        LedgerError::InvalidPolicy(
            PolicyError::InvalidJson { .. }
            | PolicyError::NumberOutOfRange(_)
            | PolicyError::IntegerTooLong { .. }
            | PolicyError::ReservedKey(_),
        ) => error_code::JSON_STRUCTURE,
        LedgerError::InvalidPolicy(_) => error_code::WRONG_POLICY_STRUCTURE,
        LedgerError::Rejected(Rejection::NotFound(_)) | LedgerError::NotFound(_) => {
            error_code::DELETE_WRONG_KEY
        }
        LedgerError::Upstream(status) if status.code() == tonic::Code::NotFound => {
            error_code::DELETE_WRONG_KEY
        }
        // A duplicate id, as EdgeLake's master answers it, and every other failed write.
        _ => error_code::BLOCKCHAIN_OPERATION_FAILED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_id_names() {
        assert_eq!(
            master_id_name("/app/EdgeLake/blockchain/blockchain.new", 3),
            "/app/EdgeLake/blockchain/blockchain.master_id_3.new"
        );
        assert_eq!(master_id_name("/a.b/ledger", 1), "/a.b/ledger.master_id_1");
        assert_eq!(master_id_name("ledger", 9), "ledger.master_id_9");
        assert_eq!(master_id_name("x.y.json", 2), "x.y.master_id_2.json");
    }

    #[test]
    fn nodes_without_an_address_are_answered_at_the_peer() {
        let peer: SocketAddr = "10.1.2.3:55000".parse().unwrap();
        let mut envelope = Envelope {
            source_ip: "0.0.0.0".into(),
            source_port: 32148,
            ..Envelope::default()
        };
        let node = Node::of(&envelope, peer);
        assert_eq!(node.reply_addr(), Some("10.1.2.3:32148".parse().unwrap()));
        assert_eq!(node.host, "10.1.2.3");
        envelope.source_ip = "192.168.1.9".into();
        let node = Node::of(&envelope, peer);
        assert_eq!(
            node.reply_addr(),
            Some("192.168.1.9:32148".parse().unwrap())
        );
        assert_eq!(node.address(), "192.168.1.9:32148 (from 10.1.2.3)");
        envelope.source_port = 0;
        assert_eq!(Node::of(&envelope, peer).reply_addr(), None);
        envelope.source_port = 70000;
        assert_eq!(Node::of(&envelope, peer).reply_addr(), None);
        envelope.source_ip = "node.example".into();
        envelope.source_port = 1;
        assert_eq!(Node::of(&envelope, peer).reply_addr(), None);
    }
}
