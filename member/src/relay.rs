//! A relay: a member that also serves the ledger to members below it (`member --serve ADDR`).
//!
//! Besides its ledger file, the relay keeps a [`Mirror`] of the ledger with the master's seqs
//! and serves `LedgerService` from it with the master's own code
//! ([`ledger_server::serve::serve`]): reads and streams are answered from the mirror, so seqs,
//! digests and resumption mean what they mean on the master; inserts and deletes are forwarded
//! to the relay's current upstream (a master or another relay) and its answer is returned
//! unchanged ([`WritePath::Upstream`]).
//!
//! The server runs in *generations*. One generation is a feed, a ledger and a server on the
//! one listening socket (kept open across generations, so members below only see their streams
//! end and reconnect). A new generation starts when the mirror is replaced by a snapshot (the
//! feed's seq no longer follows, and the streams below must resubscribe to get a reset) and when
//! the relay moves to another upstream (the write path changes).
//!
//! Until the mirror holds a ledger (its head above 0, or a first snapshot, even an empty one),
//! no generation runs: members below wait in the socket's backlog rather than be given an empty
//! ledger.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ledger_server::auth::Authorizer;
use ledger_server::feed::ChangeFeed;
use ledger_server::ledger::{Ledger, WritePath};
use ledger_server::limits::StreamLimiter;
use ledger_server::serve::ServeOptions;
use ledger_server::service::Access;
use ledger_server::subscription::SubscriptionContext;
use ledger_storage::{Change, DatabaseUrl, StorageError};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::ServerTlsConfig;

use crate::masters::{ClientOptions, MasterAddr};
use crate::mirror::Mirror;
use crate::replica::Delivered;

/// Changes a member below may fall behind before it is disconnected (it resumes from its seq),
/// as the master's default `--subscriber-buffer`.
const SUBSCRIBER_BUFFER: usize = 4096;

/// A quiet stream below gets a `progress` message this often, as on the master.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// How long the calls in flight on a retired generation may take.
const GRACE: Duration = Duration::from_secs(5);

/// The most streams served at once, and from one client address: the master's defaults.
const MAX_STREAMS: (usize, usize) = (10_000, 64);

/// What a relay needs.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// The address the members below connect to.
    pub serve: SocketAddr,
    /// The mirror database.
    pub database: DatabaseUrl,
    /// How long a forwarded write may take.
    pub timeout: Duration,
    /// How forwarded writes reach the upstream (TLS; its client certificate is the relay's
    /// identity there).
    pub client: ClientOptions,
    /// TLS (and mTLS) for the members below; plaintext without.
    pub serve_tls: Option<ServerTlsConfig>,
    /// Who may call the relay; anyone without.
    pub serve_auth: Option<Arc<Authorizer>>,
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The mirror database could not be opened.
    #[error("cannot open the relay's mirror {url}: {source}")]
    Mirror {
        /// The database.
        url: String,
        /// The failure.
        source: StorageError,
    },
    /// The serving address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The failure.
        source: std::io::Error,
    },
}

/// One server on the relay's socket, with its own feed.
struct Generation {
    feed: ChangeFeed,
    /// Completes the server's shutdown future: stops accepting, ends its streams.
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// A running relay.
pub struct Relay {
    mirror: Mirror,
    /// The listening socket; each generation serves a duplicate of it.
    listener: std::net::TcpListener,
    addr: SocketAddr,
    /// Where forwarded writes go.
    upstream: MasterAddr,
    timeout: Duration,
    client: ClientOptions,
    serve_tls: Option<ServerTlsConfig>,
    /// Who may call, and the stream counts, shared by every generation.
    access: Access,
    serving: Option<Generation>,
    /// Generations told to stop whose in-flight calls may still run.
    retired: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Opens the mirror, listens on the serving address (logging `listening on ADDR`), and
    /// serves at once if the mirror already holds a ledger; writes go to `upstream` until
    /// [`Relay::upstream_connected`] says otherwise.
    pub async fn start(options: RelayOptions, upstream: &MasterAddr) -> Result<Relay, RelayError> {
        let mirror =
            Mirror::open(&options.database)
                .await
                .map_err(|source| RelayError::Mirror {
                    url: options.database.to_string(),
                    source,
                })?;
        let listen = |source| RelayError::Listen {
            addr: options.serve,
            source,
        };
        let listener = std::net::TcpListener::bind(options.serve).map_err(listen)?;
        listener.set_nonblocking(true).map_err(listen)?;
        let addr = listener.local_addr().map_err(listen)?;
        tracing::info!(
            "listening on {addr} (relay: serving the ledger from {})",
            mirror.url()
        );
        let mut relay = Relay {
            mirror,
            listener,
            addr,
            upstream: upstream.clone(),
            timeout: options.timeout,
            client: options.client.clone(),
            serve_tls: options.serve_tls.clone(),
            access: Access {
                authorizer: options.serve_auth.clone(),
                streams: StreamLimiter::new(MAX_STREAMS.0, MAX_STREAMS.1),
            },
            serving: None,
            retired: Vec::new(),
        };
        if relay.mirror.head() > 0 {
            relay.restart();
        } else {
            tracing::info!("the relay's mirror is empty; serving starts after its first snapshot");
        }
        Ok(relay)
    }

    /// The seq of the last change the mirror holds.
    pub fn head(&self) -> u64 {
        self.mirror.head()
    }

    /// The sync loop subscribed to `master`: forward writes there from now on.
    pub fn upstream_connected(&mut self, master: &MasterAddr) {
        if *master != self.upstream {
            self.upstream = master.clone();
            if self.serving.is_some() {
                tracing::info!("the relay forwards writes to {master} now");
                self.restart();
            }
        }
    }

    /// Brings the mirror up to the ledger file: applies what the stream `delivered`, skipping
    /// changes the mirror holds and those past `file_seq` (not durable in the file). On an
    /// error the mirror's head is read again and the caller subscribes again from it.
    pub async fn follow(
        &mut self,
        delivered: Vec<Delivered>,
        file_seq: u64,
    ) -> Result<(), StorageError> {
        let result = self.apply(delivered, file_seq).await;
        if result.is_err()
            && let Err(e) = self.mirror.reload_head().await
        {
            tracing::warn!("cannot read the relay's mirror head: {e}");
        }
        result
    }

    async fn apply(
        &mut self,
        delivered: Vec<Delivered>,
        file_seq: u64,
    ) -> Result<(), StorageError> {
        let mut changes = Vec::new();
        for item in delivered {
            match item {
                Delivered::Change(change) => {
                    let last = changes
                        .last()
                        .map_or(self.mirror.head(), |c: &Change| c.seq);
                    if change.seq > last && change.seq <= file_seq {
                        changes.push(change);
                    }
                }
                Delivered::Snapshot { seq, policies } => {
                    self.append(std::mem::take(&mut changes)).await?;
                    let count = policies.len();
                    self.mirror.replace(seq, policies).await?;
                    tracing::info!("replaced the relay's mirror: {count} policies at seq {seq}");
                    // The feed's seq does not follow any more, and the streams below must see
                    // a reset: start over with a new feed.
                    self.restart();
                }
            }
        }
        self.append(changes).await
    }

    async fn append(&mut self, changes: Vec<Change>) -> Result<(), StorageError> {
        let feed = self
            .serving
            .as_ref()
            .map(|generation| generation.feed.clone());
        self.mirror.append(changes, feed).await
    }

    /// Retires the running generation, if any, and starts a new one at the mirror's head.
    fn restart(&mut self) {
        if let Some(old) = self.serving.take() {
            old.stop.cancel();
            self.retired.push(old.task);
        }
        self.retired.retain(|task| !task.is_finished());
        match self.generation() {
            Ok(generation) => {
                tracing::info!(
                    "serving the ledger at seq {} on {} (writes go to {})",
                    self.mirror.head(),
                    self.addr,
                    self.upstream
                );
                self.serving = Some(generation);
            }
            Err(e) => tracing::error!("the relay cannot serve on {}: {e}", self.addr),
        }
    }

    fn generation(&self) -> Result<Generation, String> {
        let storage = self.mirror.storage().clone();
        let feed = ChangeFeed::new(
            self.mirror.head(),
            SUBSCRIBER_BUFFER,
            ledger_server::feed::DEFAULT_KEPT_BYTES,
        );
        let streams = CancellationToken::new();
        let client = self.upstream.lazy_client(&self.client, self.timeout)?;
        let ledger = Arc::new(Ledger::new(
            WritePath::Upstream(client),
            SubscriptionContext {
                storage,
                feed: feed.clone(),
                progress_interval: PROGRESS_INTERVAL,
                shutdown: streams.clone(),
                snapshots: Default::default(),
            },
        ));
        let listener = self
            .listener
            .try_clone()
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|e| e.to_string())?;
        let stop = CancellationToken::new();
        let stopped = stop.clone().cancelled_owned();
        let options = ServeOptions {
            tls: self.serve_tls.clone(),
            access: self.access.clone(),
            grace: GRACE,
            ..ServeOptions::default()
        };
        let task = tokio::spawn(async move {
            let health = tonic_health::server::HealthReporter::new();
            if let Err(e) = ledger_server::serve::serve_with(
                options, ledger, listener, health, stopped, streams,
            )
            .await
            {
                tracing::error!("the relay's server failed: {e}");
            }
        });
        Ok(Generation { feed, stop, task })
    }

    /// Stops serving: ends the streams below and waits (a bounded time) for the calls in flight.
    pub async fn shutdown(mut self) {
        if let Some(generation) = self.serving.take() {
            generation.stop.cancel();
            self.retired.push(generation.task);
        }
        for task in self.retired {
            if tokio::time::timeout(GRACE * 2, task).await.is_err() {
                tracing::warn!("the relay's server did not stop within {:?}", GRACE * 2);
            }
        }
    }
}
