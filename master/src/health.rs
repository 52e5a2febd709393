//! Watching the database: a master whose database does not answer says NOT_SERVING on
//! grpc.health.v1, ends its streams so that their subscribers move to another master, and comes
//! back by itself when the database answers again.

use std::sync::Arc;
use std::time::Duration;

use ledger_proto::server::ledger_service_server::LedgerServiceServer;
use tokio_util::sync::CancellationToken;
use tonic_health::server::HealthReporter;

use crate::feed::ChangeFeed;
use crate::follower;
use crate::service::LedgerGrpc;
use crate::storage::Storage;

/// Checks the database every `interval` until `shutdown` is cancelled, and reports each change
/// of state once: in the log, on `health`, and on the feed (which ends the streams).
pub async fn watch_database(
    storage: Arc<dyn Storage>,
    feed: ChangeFeed,
    health: HealthReporter,
    interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let checked = storage.clone();
        let answer = tokio::time::timeout(
            interval.max(Duration::from_secs(1)),
            tokio::task::spawn_blocking(move || checked.bounds()),
        )
        .await;
        let error = match answer {
            Ok(Ok(Ok(_))) => None,
            Ok(Ok(Err(e))) => Some(e.to_string()),
            Ok(Err(e)) => Some(format!("the check failed: {e}")),
            Err(_) => Some(format!("no answer within {interval:?}")),
        };
        let up = error.is_none();
        if shutdown.is_cancelled() || up == feed.database_up() {
            continue;
        }
        feed.set_database_up(up);
        match error {
            Some(error) => {
                tracing::error!(%error, "the database does not answer: NOT_SERVING, streams ended, writes UNAVAILABLE");
                health
                    .set_not_serving::<LedgerServiceServer<LedgerGrpc>>()
                    .await;
            }
            None => {
                tracing::info!("the database answers again: SERVING");
                follower::catch_up(&storage, &feed).await;
                health
                    .set_serving::<LedgerServiceServer<LedgerGrpc>>()
                    .await;
            }
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
