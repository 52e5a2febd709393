//! Assembles a master: storage, change feed, writer, ledger and the gRPC server with health and
//! reflection; runs it until the shutdown signal.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use ledger_proto::pb::ledger_service_server::LedgerServiceServer;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use tonic::transport::Server;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::HealthReporter;

use crate::config::Config;
use crate::feed::ChangeFeed;
use crate::ledger::{Ledger, WritePath};
use crate::registration;
use crate::service::LedgerGrpc;
use crate::storage::{DatabaseUrl, DieselStorage, Storage};
use crate::subscription::SubscriptionContext;
use crate::writer::{Writer, WriterOptions};
use crate::{follower, health, metrics};

/// A failure that stops the master from starting or serving.
pub type StartError = Box<dyn std::error::Error + Send + Sync>;

/// Runs the master described by `config` until `shutdown` completes, then stops accepting,
/// ends the streams, finishes the in-flight calls and commits the queued writes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    if let Some(addr) = config.metrics_addr {
        metrics::install(addr)?;
        tracing::info!("metrics on http://{addr}/metrics");
    }
    let url = config.database_url.clone();
    let pool_size = config.db_pool_size;
    let db_timeout = config.db_timeout;
    let storage = tokio::task::spawn_blocking(move || {
        DieselStorage::open_with_timeout(&url, pool_size, db_timeout)
    })
    .await?
    .map_err(|e| format!("cannot open the ledger at {}: {e}", config.database_url))?;
    let storage: Arc<dyn Storage> = Arc::new(storage);
    let bounds = storage.bounds()?;
    let policy_count = storage.policy_count()?;
    metrics::head(bounds.head_seq);
    metrics::policies(policy_count);
    metrics::database_up(true);
    tracing::info!(database = %config.database_url, head_seq = bounds.head_seq, policy_count, "ledger opened");

    let feed = ChangeFeed::new(bounds.head_seq, config.subscriber_buffer);
    let (writer, writer_thread) = Writer::start(
        storage.clone(),
        feed.clone(),
        WriterOptions {
            max_batch: config.max_batch,
            change_retention: config.change_retention,
        },
    );
    let streams_shutdown = CancellationToken::new();
    let ledger = Arc::new(Ledger::new(
        WritePath::Local(writer),
        SubscriptionContext {
            storage,
            feed,
            progress_interval: config.progress_interval,
            shutdown: streams_shutdown.clone(),
        },
    ));

    let listener = TcpListener::bind(config.bind_addr())
        .await
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
    let (health, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(health::watch_database(
        ledger.storage().clone(),
        ledger.feed().clone(),
        health.clone(),
        config.db_check_interval,
        streams_shutdown.clone(),
    ));
    if let DatabaseUrl::Postgres(url) = &config.database_url {
        tokio::spawn(follower::follow(
            url.clone(),
            ledger.storage().clone(),
            ledger.feed().clone(),
            config.notify_fallback,
            streams_shutdown.clone(),
        ));
    }
    let result = serve(
        ledger.clone(),
        listener,
        (health, health_service),
        shutdown,
        streams_shutdown,
        config.shutdown_grace,
    )
    .await;
    // The last handle to the writer goes with the ledger: the writer commits what is queued
    // and stops.
    drop(ledger);
    tokio::task::spawn_blocking(move || writer_thread.join())
        .await?
        .map_err(|_| "the writer thread panicked")?;
    result?;
    tracing::info!("stopped");
    Ok(())
}

/// Serves `ledger` on `listener` (LedgerService, grpc.health.v1, reflection v1 and v1alpha)
/// until `shutdown` completes; then stops accepting, ends the streams through
/// `streams_shutdown`, and waits up to `grace` for in-flight calls. Masters and relays share it.
pub async fn serve(
    ledger: Arc<Ledger>,
    listener: TcpListener,
    (health, health_service): (HealthReporter, HealthServer<impl Health>),
    shutdown: impl Future<Output = ()>,
    streams_shutdown: CancellationToken,
    grace: Duration,
) -> Result<(), StartError> {
    health
        .set_serving::<LedgerServiceServer<LedgerGrpc>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ledger_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ledger_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let mut serving = Box::pin(
        Server::builder()
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(LedgerServiceServer::new(LedgerGrpc::new(ledger)))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                shutdown.await;
                tracing::info!("shutting down: no new connections; ending streams");
                health
                    .set_not_serving::<LedgerServiceServer<LedgerGrpc>>()
                    .await;
                streams_shutdown.cancel();
            }),
    );
    // Past the grace period after the signal, stop waiting for slow calls.
    let result = tokio::select! {
        result = &mut serving => result,
        _ = async { streams_shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "in-flight calls did not finish within the grace period");
            Ok(())
        }
    };
    Ok(result?)
}
