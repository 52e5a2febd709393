//! The three systems compared, behind one interface: Ledger on SQLite, Ledger on PostgreSQL
//! and etcd. Each can be started fresh, written to (one durable write of a policy), subscribed
//! to (a Ledger `StreamLedger` at the head, an etcd `Watch` on the prefix) and read whole by a
//! fresh client, so that every measure runs the same code on all three.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ledger_proto::pb::StreamLedgerRequest;
use ledger_proto::pb::StreamLedgerResponse;
use ledger_proto::pb::stream_ledger_response::Event;
use ledger_testkit::Master;
use ledger_testkit::client::Client;
use ledger_testkit::postgres::{Cluster, PostgresServer};
use tonic::Streaming;
use tonic::transport::Channel;

use super::etcd::pb::watch_client::WatchClient;
use super::etcd::pb::watch_request::RequestUnion;
use super::etcd::pb::{RangeRequest, WatchCreateRequest, WatchRequest, WatchResponse};
use super::etcd::{self, Etcd, PREFIX, PREFIX_END};
use crate::workload::{connect, connect_stream, head, insert, policy, start_master};

/// One of the systems compared.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    /// A Ledger master on SQLite (a file in the benchmark's temporary directory).
    Sqlite,
    /// A Ledger master on PostgreSQL (fsync on).
    Postgres,
    /// One etcd node.
    Etcd,
}

impl Kind {
    /// In the order of every round: the two Ledger backends, then etcd.
    pub(crate) const ALL: [Kind; 3] = [Kind::Sqlite, Kind::Postgres, Kind::Etcd];

    /// The name of its column in the table.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Kind::Sqlite => "Ledger-SQLite",
            Kind::Postgres => "Ledger-PG",
            Kind::Etcd => "etcd",
        }
    }

    /// Its key in the JSON report.
    pub(crate) fn key(self) -> &'static str {
        match self {
            Kind::Sqlite => "ledger_sqlite",
            Kind::Postgres => "ledger_postgres",
            Kind::Etcd => "etcd",
        }
    }
}

/// What the systems run on: the etcd binary, the PostgreSQL server of Ledger-PG and the
/// directory that holds every SQLite file and etcd data directory.
pub(crate) struct Setup {
    /// The `etcd` binary.
    pub(crate) etcd: PathBuf,
    /// The server Ledger-PG's databases are created on.
    pub(crate) pg: PostgresServer,
    /// The private cluster behind `pg`, whose processes are counted; `None` with `--pg-url`
    /// (a server of yours: its processes cannot be told apart, so they are not counted).
    pub(crate) cluster: Option<Cluster>,
    /// The benchmark's temporary directory (also where the fsync floor is measured).
    pub(crate) root: PathBuf,
}

/// The server of one system, running.
pub(crate) enum Server {
    /// A Ledger master and its address.
    Ledger(Master, String),
    /// An etcd node.
    Etcd(Etcd),
}

/// A freshly started system: its server and which system it is.
pub(crate) struct Running<'a> {
    /// Which system.
    pub(crate) kind: Kind,
    /// Its server (killed on drop).
    pub(crate) server: Server,
    setup: &'a Setup,
}

/// Tells the SQLite files of fresh masters apart.
static NEXT_DATABASE: AtomicU64 = AtomicU64::new(0);

/// Tells etcd keys apart: every write of the run has a key of its own, as every Ledger insert
/// is a new policy (a put on an existing key would be an update, not the same work).
static NEXT_KEY: AtomicU64 = AtomicU64::new(0);

impl<'a> Running<'a> {
    /// Starts `kind` fresh: a master on a new SQLite file or a new PostgreSQL database (with
    /// `ledger_args` added), or a new etcd node with an empty data directory.
    pub(crate) async fn start(kind: Kind, setup: &'a Setup, ledger_args: &[&str]) -> Running<'a> {
        let n = NEXT_DATABASE.fetch_add(1, Ordering::Relaxed);
        let server = match kind {
            Kind::Sqlite => {
                let url = format!("sqlite://{}", setup.root.join(format!("{n}.db")).display());
                let (master, addr) = start_master(&setup.root, &url, ledger_args);
                Server::Ledger(master, addr)
            }
            Kind::Postgres => {
                let (master, addr) =
                    start_master(&setup.root, &setup.pg.create_database(), ledger_args);
                Server::Ledger(master, addr)
            }
            Kind::Etcd => Server::Etcd(Etcd::start(&setup.etcd, &setup.root).await),
        };
        Running {
            kind,
            server,
            setup,
        }
    }

    /// The benchmark's directory, on the disk every system writes to.
    pub(crate) fn dir(&self) -> &std::path::Path {
        &self.setup.root
    }

    /// The server's own processes: the master, or etcd.
    pub(crate) fn server_pids(&self) -> Vec<u32> {
        match &self.server {
            Server::Ledger(master, _) => vec![master.pid()],
            Server::Etcd(etcd) => vec![etcd.pid()],
        }
    }

    /// The processes of the database behind the server, listed now: for Ledger-PG with the
    /// private cluster, the postmaster and all its children; otherwise none (SQLite is inside
    /// the master, etcd's store inside etcd).
    pub(crate) fn database_pids(&self) -> Vec<u32> {
        match (self.kind, &self.setup.cluster) {
            (Kind::Postgres, Some(cluster)) => cluster.processes(),
            _ => Vec::new(),
        }
    }

    /// Whether the database's processes are counted (not with `--pg-url`).
    pub(crate) fn database_counted(&self) -> bool {
        self.kind != Kind::Postgres || self.setup.cluster.is_some()
    }

    /// A writer over a new channel (one HTTP/2 connection), each call bounded (30 s).
    pub(crate) async fn writer(&self) -> Writer {
        match &self.server {
            Server::Ledger(_, addr) => Writer::Ledger(connect(addr).await),
            Server::Etcd(e) => Writer::Etcd(etcd::kv(
                etcd::channel(&e.addr, Some(Duration::from_secs(30))).await,
            )),
        }
    }

    /// Where its clients connect, to hand to tasks.
    pub(crate) fn target(&self) -> Target {
        match &self.server {
            Server::Ledger(_, addr) => Target::Ledger(addr.clone()),
            Server::Etcd(e) => Target::Etcd(e.addr.clone()),
        }
    }

    /// The head seq a Ledger subscriber at the head asks after (`GetLedgerInfo`); 0 for etcd,
    /// whose watch starts at "now" without it.
    pub(crate) async fn head_seq(&self) -> u64 {
        match &self.server {
            Server::Ledger(_, addr) => head(&mut connect(addr).await).await.0,
            Server::Etcd(_) => 0,
        }
    }

    /// A fresh client (a new channel) reads every entry: Ledger's `StreamLedger` from
    /// `after_seq = 0` (a snapshot) up to `caught_up`, etcd's `Range` over the prefix, 10,000
    /// keys a call. Returns the seconds from connecting to the last entry, and the entries
    /// read.
    pub(crate) async fn read_all(&self) -> (f64, u64) {
        let deadline = Duration::from_secs(600);
        let start = Instant::now();
        let entries = match &self.server {
            Server::Ledger(_, addr) => {
                let mut client = connect_stream(addr).await;
                let read = async {
                    let mut stream = client
                        .stream_ledger(StreamLedgerRequest {
                            after_seq: 0,
                            subscriber: None,
                        })
                        .await
                        .expect("StreamLedger from 0")
                        .into_inner();
                    let mut entries = 0u64;
                    loop {
                        let msg = stream
                            .message()
                            .await
                            .expect("the snapshot")
                            .expect("the stream does not end by itself");
                        match msg.event {
                            Some(Event::Inserted(_)) => entries += 1,
                            Some(Event::CaughtUp(_)) => return entries,
                            _ => {}
                        }
                    }
                };
                tokio::time::timeout(deadline, read)
                    .await
                    .expect("a fresh read within 600 s")
            }
            Server::Etcd(e) => {
                let mut kv = etcd::kv(etcd::channel(&e.addr, Some(deadline)).await);
                let read = async {
                    let mut entries = 0u64;
                    let mut key = PREFIX.as_bytes().to_vec();
                    loop {
                        let page = kv
                            .range(RangeRequest {
                                key: key.clone(),
                                range_end: PREFIX_END.into(),
                                limit: 10_000,
                            })
                            .await
                            .expect("Range")
                            .into_inner();
                        entries += page.kvs.len() as u64;
                        match page.kvs.last() {
                            // The next page starts right after the last key: that key + \0.
                            Some(last) if page.more => {
                                key = last.key.clone();
                                key.push(0);
                            }
                            _ => return entries,
                        }
                    }
                };
                tokio::time::timeout(deadline, read)
                    .await
                    .expect("a fresh read within 600 s")
            }
        };
        (start.elapsed().as_secs_f64(), entries)
    }
}

/// The address of a running system's server (HOST:PORT), which tasks can own.
#[derive(Clone)]
pub(crate) enum Target {
    /// A Ledger master.
    Ledger(String),
    /// An etcd node.
    Etcd(String),
}

/// A client that makes durable writes: cheap to clone, and clones share its channel (one
/// HTTP/2 connection), so N clones are N clients on one connection.
#[derive(Clone)]
pub(crate) enum Writer {
    /// `InsertPolicy` of a new policy ([`policy`], about 250 bytes of JSON).
    Ledger(Client),
    /// `Put` of the same JSON text under a new key `/policies/<n>`.
    Etcd(super::etcd::pb::kv_client::KvClient<Channel>),
}

impl Writer {
    /// One write, acknowledged once durable: the seq of the insert (Ledger) or the revision of
    /// the put (etcd), the id under which subscribers see it.
    pub(crate) async fn write(&mut self) -> Result<u64, tonic::Status> {
        match self {
            Writer::Ledger(client) => insert(client).await.map(|(seq, _, _)| seq),
            Writer::Etcd(kv) => {
                let n = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
                etcd::put(kv, format!("{PREFIX}{n:012}"), policy()).await
            }
        }
    }
}

/// An open subscription of one system, on a channel of its own.
pub(crate) enum Subscription {
    /// A Ledger `StreamLedger`.
    Ledger(Streaming<StreamLedgerResponse>),
    /// An etcd `Watch` (its request side stays open as long as this lives).
    Etcd(Streaming<WatchResponse>),
}

impl Subscription {
    /// Connects to `target` and opens: Ledger's `StreamLedger` after `after_seq` (the head), counted open
    /// at its first message, which at the head is `caught_up` (the server replays the nothing
    /// after the head and says so at once); etcd's `Watch` on the prefix from now, counted open
    /// at its `created` answer.
    pub(crate) async fn open(target: &Target, after_seq: u64) -> Result<Subscription, String> {
        match target {
            Target::Ledger(addr) => {
                let mut client = try_connect_stream(addr).await?;
                let mut stream = client
                    .stream_ledger(StreamLedgerRequest {
                        after_seq,
                        subscriber: None,
                    })
                    .await
                    .map_err(|s| format!("StreamLedger: {s}"))?
                    .into_inner();
                match stream.message().await {
                    Ok(Some(m)) if matches!(m.event, Some(Event::CaughtUp(_))) => {
                        Ok(Subscription::Ledger(stream))
                    }
                    other => Err(format!("first message at the head: {other:?}")),
                }
            }
            Target::Etcd(addr) => {
                let channel = super::etcd::try_channel(addr, None)
                    .await
                    .map_err(|err| format!("connecting to etcd: {err}"))?;
                let create = WatchRequest {
                    request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                        key: PREFIX.into(),
                        range_end: PREFIX_END.into(),
                        start_revision: 0,
                    })),
                };
                // The request side must stay open: etcd ends the watch stream when it ends.
                let requests = tokio_stream::StreamExt::chain(
                    tokio_stream::once(create),
                    tokio_stream::pending(),
                );
                let mut stream = WatchClient::new(channel)
                    .max_decoding_message_size(64 << 20)
                    .watch(requests)
                    .await
                    .map_err(|s| format!("Watch: {s}"))?
                    .into_inner();
                match stream.message().await {
                    Ok(Some(m)) if m.created => Ok(Subscription::Etcd(stream)),
                    other => Err(format!("first watch answer: {other:?}")),
                }
            }
        }
    }

    /// The ids (Ledger seqs, etcd revisions) of the writes in the next message; empty for a
    /// message without one (Ledger's `progress`). `None` when the stream ended.
    pub(crate) async fn next_writes(&mut self) -> Option<Vec<u64>> {
        match self {
            Subscription::Ledger(stream) => {
                let msg = stream.message().await.ok()??;
                Some(match msg.event {
                    Some(Event::Inserted(_)) => vec![msg.seq],
                    _ => Vec::new(),
                })
            }
            Subscription::Etcd(stream) => {
                let msg = stream.message().await.ok()??;
                Some(
                    msg.events
                        .iter()
                        .filter_map(|ev| ev.kv.as_ref().map(|kv| kv.mod_revision as u64))
                        .collect(),
                )
            }
        }
    }
}

/// A stream client of the master at `addr` ([`connect_stream`]), or the error of connecting:
/// 1,000 of them connect at once, and one refused must be reported, not panic in a task.
async fn try_connect_stream(addr: &str) -> Result<Client, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(10));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connecting to master at {addr}: {e}"))?;
    Ok(
        ledger_proto::pb::ledger_service_client::LedgerServiceClient::new(channel)
            .max_decoding_message_size(64 << 20),
    )
}
