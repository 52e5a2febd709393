//! Assembles a master from its command line: storage, change feed, writer, ledger, the AnyLog
//! edge and the gRPC server; runs it until the shutdown signal. A relay (`--upstream`) is the
//! same master with its upstream link in the writer's place.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ledger_ops::metrics_endpoint::RouteSlot;
use ledger_server::anylog::{self, AnyLogEdge, AnyLogOptions};
use ledger_server::console::{Console, ConsoleOptions};
use ledger_server::feed::ChangeFeed;
use ledger_server::ledger::{Ledger, PolicyLimits, WritePath};
use ledger_server::limits::{SnapshotLimiter, StreamLimiter};
use ledger_server::serve::{
    GrpcIncoming, SecurityFiles, ServeOptions, StartError, listen, load_security, serve_with,
};
use ledger_server::service::Access;
use ledger_server::subscription::SubscriptionContext;
use ledger_server::upstream::{self, Upstream, UpstreamOptions};
use ledger_server::writer::{Writer, WriterOptions};
use ledger_server::{follower, health, metrics};
use ledger_storage::{
    CallTimeouts, DatabaseUrl, DieselStorage, SnapshotPart, Storage, StorageError, StorageOptions,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::config::{AnyLogListen, Config, WriteFrom};
use crate::registration;

/// Runs the master described by `config` until `shutdown` completes, then stops accepting,
/// ends the streams, finishes the in-flight calls and commits the queued writes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    // The console's routes join the listener once the ledger exists.
    let console_routes = RouteSlot::new();
    if let Some(addr) = config.http_addr() {
        // It logs the address bound, the one to scrape when ADDR asks for port 0.
        metrics::install(addr, console_routes.clone()).await?;
    }
    let url = config.database_url.clone();
    let options = StorageOptions {
        pool_size: config.db_pool_size,
        connection_wait: config.db_timeout,
        timeouts: CallTimeouts {
            write: config.write_timeout,
            read: config.read_timeout,
            // The watch takes the database for gone after `interval.max(1 s)`: its check is cut
            // off soon after, and the calls waiting with it.
            check: (config.db_check_interval.max(Duration::from_secs(1)) * 2)
                .min(config.write_timeout),
        },
    };
    let storage = tokio::task::spawn_blocking(move || DieselStorage::open_with(&url, &options))
        .await?
        .map_err(|e| format!("cannot open the ledger at {}: {e}", config.database_url))?;
    let storage: Arc<dyn Storage> = Arc::new(storage);
    let (head_seq, policy_count) = counted_head(&*storage)?;
    metrics::head(head_seq);
    metrics::database_up(true);
    tracing::info!(database = %config.database_url, head_seq, policy_count, "ledger opened");

    let feed = ChangeFeed::new(
        head_seq,
        config.subscriber_buffer,
        config.subscriber_buffer_bytes,
    );
    // Counted with the head: every published change moves it from there, so the gauge shows
    // the ledger's true size (a relay's copy replaced by a snapshot included).
    feed.set_policy_count(policy_count);
    // A master writes with its writer; a relay's writes go upstream, and its copy is written
    // by its upstream link alone.
    let mut writes_health = None;
    let mut chain_follower = None;
    let (write_path, writer, upstream) = if config.is_relay() {
        let upstream = Upstream::new(UpstreamOptions {
            follow: config.upstream_follow()?,
            write_as_self: config.upstream_write_as_self,
            change_retention: config.change_retention,
        });
        if head_seq == 0 {
            // Nothing to serve yet: members would take an empty ledger for the ledger.
            feed.set_ready(false);
            tracing::info!(
                "this relay holds no copy of the ledger yet: it serves once its upstream's first snapshot is in"
            );
        }
        if config.upstream_write_as_self {
            tracing::warn!(
                "--upstream-write-as-self: writes of callers without a bearer token go upstream with this relay's own credentials"
            );
        }
        (
            WritePath::Upstream(upstream.forwarder()),
            None,
            Some(upstream),
        )
    } else {
        let (writer, writer_thread, writer_health) = Writer::start(
            storage.clone(),
            feed.clone(),
            WriterOptions {
                max_batch: config.max_batch,
                change_retention: config.change_retention,
            },
        );
        writes_health = Some(writer.health());
        // On a chain, the writer's one client is the chain's follower; callers' writes are
        // transactions.
        let write_path = match &config.ethereum_rpc {
            Some(rpc) => {
                let (writes, follower) = chain(&config, rpc, &storage, &feed, writer).await?;
                chain_follower = Some(follower);
                WritePath::Chain(writes)
            }
            None => WritePath::Local(writer),
        };
        (write_path, Some((writer_thread, writer_health)), None)
    };
    let streams_shutdown = CancellationToken::new();
    let ledger = Arc::new(
        Ledger::new(
            write_path,
            SubscriptionContext {
                storage,
                feed,
                progress_interval: config.progress_interval,
                shutdown: streams_shutdown.clone(),
                snapshots: SnapshotLimiter::new(
                    config.max_snapshots,
                    config.max_snapshots_per_client,
                    config.snapshot_stall_timeout,
                ),
            },
        )
        .with_policy_limits(PolicyLimits {
            max_bytes: config.max_policy_bytes,
            max_depth: config.max_policy_depth as usize,
        }),
    );

    // TLS and auth files are read before the port is bound: a master that says it listens
    // has the settings it will serve with (or it fails first, naming the file).
    let options = serve_options(&config)?;
    let health = HealthReporter::new();
    if config.is_relay() {
        // Known, and NOT_SERVING, from the moment the relay says it listens.
        health
            .set_service_status(health::UPSTREAM_SERVICE, ServingStatus::NotServing)
            .await;
    }
    if config.http_addr().is_some() {
        console_routes.fill(Arc::new(Console::new(ConsoleOptions {
            ledger: Arc::downgrade(&ledger),
            authorizer: options.access.authorizer.clone(),
            writes: writer.as_ref().map(|(_, health)| health.clone()),
            relay: config.is_relay(),
            streams: options.access.streams.clone(),
        })));
    }
    let listener = listen(config.bind_addr())
        .map_err(|e| format!("cannot listen on {}: {e}", config.bind_addr()))?;
    let local: SocketAddr = listener.local_addr()?;
    let internal = SocketAddr::new(config.listen.ip(), local.port());
    if config.register {
        registration::register(&ledger, &config, internal).await?;
    }

    tracing::info!(
        "listening on {local} (internal {internal}, external {})",
        config.external_addr.unwrap_or(internal)
    );
    let incoming = start_anylog(&config, &ledger, listener, &streams_shutdown).await?;
    tokio::spawn(health::watch_database(
        ledger.storage().clone(),
        ledger.feed().clone(),
        health.clone(),
        writes_health,
        config.db_check_interval,
        streams_shutdown.clone(),
    ));
    if let Some(follower) = chain_follower {
        tokio::spawn(follower.run(health.clone(), streams_shutdown.clone()));
    }
    // A relay's copy has one writer, its upstream link: nothing to listen for.
    if let (DatabaseUrl::Postgres(url), false) = (&config.database_url, config.is_relay()) {
        tokio::spawn(follower::follow(
            url.clone(),
            config
                .database_url
                .pg_timeouts()
                .unwrap_or(ledger_storage::PgTimeouts::DEFAULT),
            ledger.storage().clone(),
            ledger.feed().clone(),
            config.notify_fallback,
            health.clone(),
            streams_shutdown.clone(),
        ));
    }
    let following = upstream.map(|upstream| {
        tracing::info!(
            "relay: following {} (writes go upstream with the caller's credentials)",
            config
                .upstreams
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        tokio::spawn(upstream::follow(
            upstream,
            ledger.storage().clone(),
            ledger.feed().clone(),
            ledger.subscribers().clone(),
            health.clone(),
            streams_shutdown.clone(),
        ))
    });
    // A writer that failed for good stops the master as a signal would, after the drain: a
    // supervisor (systemd, Kubernetes) restarts it, and clients go to another master meanwhile.
    let writer_failure = Arc::new(std::sync::OnceLock::new());
    let (writer_thread, writer_health) = writer.unzip();
    let reporter = health.clone();
    let watched = async move {
        match writer_health {
            Some(writer_health) => health::watch_writer(writer_health, reporter).await,
            None => std::future::pending().await,
        }
    };
    let failure = writer_failure.clone();
    let shutdown = async move {
        tokio::select! {
            _ = shutdown => {}
            reason = watched => {
                let _ = failure.set(reason);
            }
        }
    };
    let result = serve_with(
        options,
        ledger.clone(),
        incoming,
        health,
        shutdown,
        streams_shutdown,
    )
    .await;
    // The last handle to the writer goes with the ledger: the writer commits what is queued
    // and stops. A relay's link stops at the shutdown after the batch it is storing.
    drop(ledger);
    if let Some(writer_thread) = writer_thread {
        tokio::task::spawn_blocking(move || writer_thread.join())
            .await?
            .map_err(|_| "the writer thread panicked")?;
    }
    if let Some(following) = following
        && tokio::time::timeout(config.shutdown_grace, following)
            .await
            .is_err()
    {
        tracing::warn!("the relay's upstream link did not stop within the grace period");
    }
    result?;
    if let Some(reason) = writer_failure.get() {
        return Err(format!("stopped because writes cannot be committed: {reason}").into());
    }
    tracing::info!("stopped");
    Ok(())
}

/// What follows the chain: started once the health reporter exists.
struct ChainFollower {
    contract: Arc<dyn ledger_server::chain::FollowedContract>,
    storage: Arc<dyn Storage>,
    writer: Writer,
    feed: ChangeFeed,
    state: Arc<ledger_server::chain::ChainState>,
    options: ledger_server::chain::ChainOptions,
}

impl ChainFollower {
    async fn run(self, health: HealthReporter, shutdown: CancellationToken) {
        ledger_server::chain::follow(
            self.contract,
            self.storage,
            self.writer,
            self.feed,
            self.state,
            self.options,
            health,
            shutdown,
        )
        .await
    }
}

/// `--ethereum-rpc`: the contract's client, the writes that become its transactions, and its
/// follower, which writes the local copy with `writer`.
#[cfg(feature = "ethereum")]
async fn chain(
    config: &Config,
    rpc: &str,
    storage: &Arc<dyn Storage>,
    feed: &ChangeFeed,
    writer: Writer,
) -> Result<(ledger_server::chain::ChainWrites, ChainFollower), StartError> {
    use ledger_server::chain::{ChainOptions, ChainState, ChainWrites, FollowedContract};
    use std::str::FromStr;
    let contract_text = config.ethereum_contract.as_deref().unwrap_or_default();
    let address = ledger_chain::Address::from_str(contract_text).map_err(|e| {
        format!(
            "--ethereum-contract {contract_text:?} is not an address (0x and 40 hex digits): {e}"
        )
    })?;
    let key = match &config.ethereum_key_file {
        Some(path) => Some(ledger_chain::read_key_file(path).map_err(|e| e.to_string())?),
        None => {
            tracing::warn!(
                "no --ethereum-key-file: writes to the contract are refused (FAILED_PRECONDITION); reads and streams serve the chain's ledger"
            );
            None
        }
    };
    let client = ledger_chain::ChainClient::connect(rpc, address, key, config.ethereum_chain_id)
        .map_err(|e| format!("--ethereum-rpc: {e}"))?;
    match client.check().await {
        Ok(info) => tracing::info!(
            chain_id = info.chain_id,
            head = info.head.number,
            contract = %address,
            policy_ledger = info.is_policy_ledger,
            sender = ?client.sender(),
            "following a contract on chain"
        ),
        // The copy serves meanwhile; the follower says when the node answers.
        Err(e) => {
            tracing::warn!(error = %e, contract = %address, "the chain's node does not answer yet: serving the local copy until it does")
        }
    }
    let stored = {
        let storage = storage.clone();
        tokio::task::spawn_blocking(move || storage.chain_position())
            .await?
            .map_err(|e| format!("cannot read the followed block: {e}"))?
    };
    let options = ChainOptions {
        confirmations: config.ethereum_confirmations,
        poll: config.ethereum_poll,
        write_timeout: config.ethereum_write_timeout,
        max_policy_bytes: config.ethereum_max_policy_bytes,
    };
    let contract: Arc<dyn FollowedContract> = Arc::new(crate::chain_client::Contract(client));
    let state = ChainState::new(stored);
    let writes = ChainWrites::new(contract.clone(), state.clone(), storage.clone(), options);
    Ok((
        writes,
        ChainFollower {
            contract,
            storage: storage.clone(),
            writer,
            feed: feed.clone(),
            state,
            options,
        },
    ))
}

/// `--ethereum-rpc` in a master built without the `ethereum` feature.
#[cfg(not(feature = "ethereum"))]
async fn chain(
    _config: &Config,
    _rpc: &str,
    _storage: &Arc<dyn Storage>,
    _feed: &ChangeFeed,
    _writer: Writer,
) -> Result<(ledger_server::chain::ChainWrites, ChainFollower), StartError> {
    Err("--ethereum-rpc: this master was built without the `ethereum` feature".into())
}

/// The head seq and the number of policies at that seq, read together (in the snapshot's one
/// transaction, which stops after counting).
fn counted_head(storage: &dyn Storage) -> Result<(u64, u64), StorageError> {
    let mut start = None;
    storage.snapshot(1, &mut |part| {
        if let SnapshotPart::Start { seq, policy_count } = part {
            start = Some((seq, policy_count));
        }
        false
    })?;
    start.ok_or_else(|| StorageError::Failed("the snapshot began with no head".into()))
}

/// Starts the AnyLog protocol as `--anylog-listen` says: on the gRPC port (whose gRPC
/// connections are returned), on a port of its own, or not at all.
async fn start_anylog(
    config: &Config,
    ledger: &Arc<Ledger>,
    listener: TcpListener,
    shutdown: &CancellationToken,
) -> Result<GrpcIncoming, StartError> {
    let grpc_port = listener.local_addr()?.port();
    let own = match config.anylog_listen {
        AnyLogListen::Off => {
            tracing::info!("the AnyLog protocol is off (--anylog-listen off)");
            return Ok(GrpcIncoming::Listener(listener));
        }
        AnyLogListen::Shared => None,
        AnyLogListen::Own(addr) => Some(
            listen(addr).map_err(|e| format!("cannot listen for AnyLog nodes on {addr}: {e}"))?,
        ),
    };
    let port = match &own {
        Some(own) => own.local_addr()?.port(),
        None => grpc_port,
    };
    // Where nodes would answer this master: its external address, else its internal one (an
    // unspecified one makes each node use the address the connection came from).
    let reply_ip = config
        .external_addr
        .map_or(config.listen.ip(), |external| external.ip());
    let write_from = match (&config.anylog_write_from, &config.auth_file) {
        (Some(WriteFrom::Any), _) | (None, None) => None,
        (Some(WriteFrom::Networks(networks)), _) => Some(networks.clone()),
        (None, Some(_)) => Some(Vec::new()),
    };
    match &write_from {
        None => tracing::warn!(
            "the AnyLog protocol has no authentication: anyone who reaches port {port} can insert and delete policies (restrict it with --anylog-write-from)"
        ),
        Some(networks) if networks.is_empty() => tracing::info!(
            "AnyLog nodes may read but not write (--anylog-write-from none, the default with --auth-file)"
        ),
        Some(networks) => tracing::info!(
            "AnyLog nodes may write from {}",
            networks
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
    let edge = AnyLogEdge::new(
        ledger.clone(),
        AnyLogOptions {
            write_from,
            reply_ip: reply_ip.to_string(),
            reply_port: port,
            block_timeout: config.anylog_timeout,
            connect_timeout: config.anylog_timeout,
            // A policy of --max-policy-bytes takes this many blocks through the large-message
            // path (each carries at least ~1,800 bytes of it), and some more for the command.
            max_message_blocks: (config.max_policy_bytes / 1_024 + 8) as u32,
            max_connections: config.anylog_max_connections,
        },
        shutdown.clone(),
    );
    match own {
        Some(own) => {
            tracing::info!("anylog on {}", own.local_addr()?);
            tokio::spawn(anylog::listener::serve(own, edge, shutdown.clone()));
            Ok(GrpcIncoming::Listener(listener))
        }
        None => {
            tracing::info!("anylog on {} (shared with gRPC)", listener.local_addr()?);
            Ok(GrpcIncoming::Shared(anylog::listener::share(
                listener,
                edge,
                config.keepalive_interval,
            )))
        }
    }
}

/// The serving options a master's command line asks for; reads the TLS and auth files.
fn serve_options(config: &Config) -> Result<ServeOptions, StartError> {
    let (tls, authorizer) = load_security(
        &SecurityFiles {
            cert: config.tls_cert.as_deref(),
            key: config.tls_key.as_deref(),
            client_ca: config.tls_client_ca.as_deref(),
            client_optional: config.tls_client_optional,
            auth_file: config.auth_file.as_deref(),
        },
        "this master",
    )?;
    Ok(ServeOptions {
        tls,
        access: Access {
            authorizer,
            streams: StreamLimiter::new(config.max_streams, config.max_streams_per_client),
        },
        max_message_bytes: config.max_message_bytes,
        keepalive: (config.keepalive_interval, config.keepalive_timeout),
        grace: config.shutdown_grace,
        max_concurrent_streams: config.max_concurrent_streams,
        max_local_reset_streams: config.max_local_reset_streams,
    })
}
