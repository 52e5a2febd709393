//! Watching the database: a master whose database does not answer says NOT_SERVING on
//! grpc.health.v1, ends its streams so that their subscribers move to another master, and comes
//! back by itself when the database answers again.

use std::sync::Arc;
use std::time::Duration;

use ledger_proto::server::ledger_service_server::LedgerServiceServer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::feed::ChangeFeed;
use crate::service::LedgerGrpc;
use crate::writer::{WriterHealth, WritesHealth};
use crate::{follower, metrics, storage_io};
use ledger_storage::Storage;

/// The health service name that says, on a relay, whether its stream from upstream is open and
/// caught up: `NOT_SERVING` from the start until the first `caught_up`, and while it is lost
/// (the relay serves its copy meanwhile; writes forwarded upstream may fail).
pub const UPSTREAM_SERVICE: &str = "ledger.v1.LedgerService/upstream";

/// The health service name that says whether writes commit: `NOT_SERVING` while the database's
/// disk is full or the database is out of reach for writes (reads and streams may go on, so the
/// ledger's own service may stay `SERVING`).
pub const WRITES_SERVICE: &str = "ledger.v1.LedgerService/writes";

/// Sets the ledger's status: `ledger.v1.LedgerService` and the server as a whole (`""`, what a
/// probe that names no service asks), which follow each other.
pub async fn set_ledger_status(health: &HealthReporter, status: ServingStatus) {
    // `""` first: whoever saw the named service change finds `""` changed too.
    health.set_service_status("", status).await;
    health
        .set_service_status(
            <LedgerServiceServer<LedgerGrpc> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}

/// Checks the database every `interval` until `shutdown` is cancelled, and reports each change
/// of state once: in the log, on `health`, and on the feed (which ends the streams).
///
/// The check runs on a connection of its own ([`Storage::check`]): a pool whose connections are
/// all held (slow snapshots, a burst of reads) is reported as busy, in the log and the metrics,
/// and does not make the master `NOT_SERVING`.
pub async fn watch_database(
    storage: Arc<dyn Storage>,
    feed: ChangeFeed,
    health: HealthReporter,
    writes: Option<WritesHealth>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut busy = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        if let Some((in_use, size)) = storage.pool_usage() {
            metrics::db_pool(in_use, size);
            if (in_use >= size) != busy {
                busy = in_use >= size;
                if busy {
                    tracing::warn!(
                        connections = size,
                        "every database connection is in use: calls wait for one (the database answers; still SERVING)"
                    );
                } else {
                    tracing::info!("database connections are free again");
                }
            }
        }
        let answer = tokio::time::timeout(
            interval.max(Duration::from_secs(1)),
            storage_io::run(&storage, |s| s.check()),
        )
        .await;
        let error = match answer {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {interval:?}")),
        };
        let up = error.is_none();
        if let (true, Some(writes)) = (up, &writes) {
            // The check ran on a server that takes writes (`Storage::check`).
            writes.database_answers();
        }
        if shutdown.is_cancelled() || up == feed.database_up() {
            continue;
        }
        feed.set_database_up(up);
        match error {
            Some(error) => {
                tracing::error!(%error, "the database does not answer: NOT_SERVING, streams ended, writes UNAVAILABLE");
                set_ledger_status(&health, ServingStatus::NotServing).await;
            }
            None => {
                tracing::info!("the database answers again: SERVING");
                follower::catch_up(&storage, &feed).await;
                set_ledger_status(&health, ServingStatus::Serving).await;
            }
        }
    }
}

/// Shows the writer's state on `health` ([`WRITES_SERVICE`]), in the log and the metrics, until
/// the writer fails for good: then the whole master turns `NOT_SERVING` and this returns why,
/// for the server to drain and stop. Never returns while the writer is sound.
pub async fn watch_writer(
    mut writer: watch::Receiver<WriterHealth>,
    health: HealthReporter,
) -> String {
    health
        .set_service_status(WRITES_SERVICE, ServingStatus::Serving)
        .await;
    metrics::writes_state(1.0);
    loop {
        let state = writer.borrow_and_update().clone();
        match state {
            WriterHealth::Writing => {
                metrics::writes_state(1.0);
                health
                    .set_service_status(WRITES_SERVICE, ServingStatus::Serving)
                    .await;
            }
            WriterHealth::Unavailable(reason) => {
                tracing::error!(%reason, "writes cannot commit: the database is out of reach; they are answered UNAVAILABLE until it answers again");
                metrics::writes_state(0.0);
                health
                    .set_service_status(WRITES_SERVICE, ServingStatus::NotServing)
                    .await;
            }
            WriterHealth::DiskFull(reason) => {
                tracing::error!(%reason, "the database's disk is full: writes are refused (RESOURCE_EXHAUSTED) until space is freed; reads and streams go on");
                metrics::writes_state(0.0);
                health
                    .set_service_status(WRITES_SERVICE, ServingStatus::NotServing)
                    .await;
            }
            WriterHealth::Failed(reason) => {
                tracing::error!(%reason, "the writer stopped: NOT_SERVING; the master drains its calls and exits");
                metrics::writes_state(-1.0);
                health
                    .set_service_status(WRITES_SERVICE, ServingStatus::NotServing)
                    .await;
                set_ledger_status(&health, ServingStatus::NotServing).await;
                return reason;
            }
        }
        if writer.changed().await.is_err() {
            // The writer stopped normally (shutdown): nothing more to show.
            return std::future::pending().await;
        }
    }
}

/// `grpc.health.v1` with its `Watch` streams counted against the stream limits, as
/// `StreamLedger` streams are: without, anyone could open thousands of them, unauthenticated.
pub struct LimitedHealth<H> {
    inner: H,
    streams: crate::limits::StreamLimiter,
}

impl<H> LimitedHealth<H> {
    /// `inner`, its `Watch` streams admitted by `streams`.
    pub fn new(inner: H, streams: crate::limits::StreamLimiter) -> Self {
        LimitedHealth { inner, streams }
    }
}

type WatchStream = std::pin::Pin<
    Box<
        dyn tokio_stream::Stream<
                Item = Result<tonic_health::pb::HealthCheckResponse, tonic::Status>,
            > + Send,
    >,
>;

#[tonic::async_trait]
impl<H: tonic_health::pb::health_server::Health> tonic_health::pb::health_server::Health
    for LimitedHealth<H>
{
    async fn check(
        &self,
        request: tonic::Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<tonic::Response<tonic_health::pb::HealthCheckResponse>, tonic::Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: tonic::Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        use tokio_stream::StreamExt;
        let permit = self
            .streams
            .admit(request.remote_addr().map(|addr| addr.ip()))
            .map_err(tonic::Status::from)?;
        let stream = self.inner.watch(request).await?.into_inner();
        // The place is held for as long as the stream lives.
        let stream = stream.map(move |item| {
            let _held = &permit;
            item
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}
