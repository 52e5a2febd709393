//! Following the other masters on a shared PostgreSQL database.
//!
//! Every commit sends `NOTIFY ledger_changes` (see the storage); each master `LISTEN`s on a
//! connection of its own ([`connect`]: the URL's TLS settings mean there what they mean to
//! libpq) and, on a notification, publishes to its feed whatever was committed after the last
//! change it published. The notification is only a wake-up: the changes are always read from
//! the database, so a lost or merged notification loses nothing. A fallback read every
//! `--notify-fallback` runs whatever the listening connection does, so that no master misses
//! the others' commits for longer than that even when it cannot listen at all.
//!
//! Whether the master listens is in the log (once per change), in the metrics
//! (`ledger_follower_listening`, `ledger_follower_listen_failures_total`) and in health, as the
//! service [`LISTEN_SERVICE`]; it does not make the master `NOT_SERVING`, since the fallback
//! read still delivers every change, later.

pub mod connect;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::MissedTickBehavior;
use tokio_postgres::AsyncMessage;
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::feed::ChangeFeed;
use crate::{metrics, storage_io};
use connect::{ListenError, ListenTarget, Listening};
use ledger_storage::{NOTIFY_CHANNEL, PgTimeouts, Storage};

/// The health service name that says whether the master listens for the other masters'
/// commits: `NOT_SERVING` while they arrive only by the fallback read.
pub const LISTEN_SERVICE: &str = "ledger.v1.LedgerService/listen";

/// Shows whether the master listens: in the metrics and in health.
async fn report_listening(health: &HealthReporter, listening: bool) {
    metrics::follower_listening(listening);
    let status = if listening {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health.set_service_status(LISTEN_SERVICE, status).await;
}

/// The first wait before trying to reconnect the listening connection, doubled at each failure.
const FIRST_RECONNECT_DELAY: Duration = Duration::from_millis(100);

/// The longest wait between two attempts to reconnect the listening connection.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(5);

/// How often the listening connection is checked (an empty query): a server that froze keeps
/// its TCP peer alive, and a notification that never comes looks like no commit at all.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);

/// How long the listening connection may take to answer a check before it is taken for dead and
/// opened anew (on the URL's next host that takes writes, after a failover).
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// Publishes the changes other masters commit, until `shutdown` is cancelled. `url` is the
/// PostgreSQL URL of the shared database; `fallback` is how often the database is read anyway,
/// listening or not.
pub async fn follow(
    url: String,
    timeouts: PgTimeouts,
    storage: Arc<dyn Storage>,
    feed: ChangeFeed,
    fallback: Duration,
    health: HealthReporter,
    shutdown: CancellationToken,
) {
    let wake = Arc::new(Notify::new());
    // The highest head seq notified since the last look.
    let notified_head = Arc::new(AtomicU64::new(0));
    report_listening(&health, false).await;
    let listener = tokio::spawn(listen(
        url,
        timeouts,
        feed.watch_database(),
        health,
        wake.clone(),
        notified_head.clone(),
        fallback,
        shutdown.clone(),
    ));
    // An interval, not a sleep restarted by every wake-up: the master's own commits wake it
    // too, and must not put the fallback read off for ever.
    let mut fallback_reads = tokio::time::interval(fallback.max(Duration::from_millis(1)));
    fallback_reads.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The first tick of an interval is immediate; the first read is one interval away.
    fallback_reads.reset();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            // This master's own commits are notified too; those it published already need no
            // read (a round trip and a pooled connection per commit).
            _ = wake.notified() => {
                if notified_head.swap(0, Ordering::Relaxed) > feed.head() {
                    catch_up(&storage, &feed).await;
                }
            }
            _ = fallback_reads.tick() => catch_up(&storage, &feed).await,
        }
    }
    // It stops on the same token.
    let _ = listener.await;
}

/// Keeps a connection `LISTEN`ing to [`NOTIFY_CHANNEL`] until `shutdown` is cancelled: records
/// the highest notified head in `notified_head` and wakes `wake` up; reconnects with a backoff.
/// Says in the log when it starts or stops listening, once each time, and in the metrics.
///
/// The connection is also opened anew whenever the database watch saw the database go and come
/// back (`database`): after a failover, the server that answers now is another one.
#[allow(clippy::too_many_arguments)]
async fn listen(
    url: String,
    timeouts: PgTimeouts,
    mut database: watch::Receiver<bool>,
    health: HealthReporter,
    wake: Arc<Notify>,
    notified_head: Arc<AtomicU64>,
    fallback: Duration,
    shutdown: CancellationToken,
) {
    let target = match ListenTarget::parse(&url, timeouts) {
        Ok(target) => target,
        Err(e) => {
            metrics::follower_listen_failed();
            tracing::error!(
                error = %e,
                ?fallback,
                "cannot listen for the other masters' commits: they arrive only by the fallback \
                 read, every --notify-fallback"
            );
            return;
        }
    };
    let mut delay = FIRST_RECONNECT_DELAY;
    // Whether the last attempt failed or the last connection was lost (logged already).
    let mut down = false;
    loop {
        let opened = tokio::select! {
            _ = shutdown.cancelled() => return,
            opened = open(&target, &wake, &notified_head) => opened,
        };
        let (client, mut driver, tls) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                metrics::follower_listen_failed();
                if e.is_permanent() {
                    tracing::error!(
                        error = %e,
                        ?fallback,
                        "cannot listen for the other masters' commits: they arrive only by the \
                         fallback read, every --notify-fallback"
                    );
                    return;
                }
                if down {
                    tracing::debug!(error = %e, "still cannot listen for the other masters' commits");
                } else {
                    tracing::warn!(
                        error = %e,
                        ?fallback,
                        "cannot listen for the other masters' commits: they arrive by the \
                         fallback read, every --notify-fallback, until it works again; retrying"
                    );
                    down = true;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(MAX_RECONNECT_DELAY);
                continue;
            }
        };
        report_listening(&health, true).await;
        if down {
            tracing::info!(tls, "listening again for the other masters' commits");
        } else {
            tracing::info!(tls, "listening for the other masters' commits");
        }
        delay = FIRST_RECONNECT_DELAY;
        // Commits made while not listening are read now.
        notified_head.store(u64::MAX, Ordering::Relaxed);
        wake.notify_one();
        let mut checks = tokio::time::interval(HEARTBEAT_INTERVAL);
        checks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        checks.reset();
        // Whether the database watch found the database down since this connection opened.
        let mut went_down = !*database.borrow_and_update();
        let reason = loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    driver.abort();
                    report_listening(&health, false).await;
                    return;
                }
                ended = &mut driver => break match ended {
                    Ok(Some(e)) => connect::describe_postgres_error(&e),
                    Ok(None) => "closed by the server".to_string(),
                    Err(e) => e.to_string(),
                },
                _ = checks.tick() => {
                    match tokio::time::timeout(HEARTBEAT_TIMEOUT, client.simple_query("")).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => break connect::describe_postgres_error(&e),
                        Err(_) => break format!("no answer to a check within {HEARTBEAT_TIMEOUT:?}"),
                    }
                }
                changed = database.changed() => {
                    if changed.is_err() {
                        // The feed is gone: the master is stopping.
                        driver.abort();
                        report_listening(&health, false).await;
                        return;
                    }
                    let up = *database.borrow_and_update();
                    if !up {
                        went_down = true;
                    } else if went_down {
                        break "the database went and came back (a failover, perhaps): listening anew on the server that answers now".to_string();
                    }
                }
            }
        };
        driver.abort();
        drop(client);
        report_listening(&health, false).await;
        metrics::follower_listen_failed();
        tracing::warn!(
            %reason,
            ?fallback,
            "lost the connection that listens for the other masters' commits: they arrive by the \
             fallback read, every --notify-fallback, until it is back; reconnecting"
        );
        down = true;
    }
}

/// The task that drives a listening connection: it ends with the connection's error, or `None`
/// when the server closed it.
type Driver = tokio::task::JoinHandle<Option<tokio_postgres::Error>>;

/// Connects to `target`, starts the task that delivers its notifications, and `LISTEN`s.
/// Returns the client (the connection lives as long as it does), the task, and whether the
/// connection uses TLS.
async fn open(
    target: &ListenTarget,
    wake: &Arc<Notify>,
    notified_head: &Arc<AtomicU64>,
) -> Result<(tokio_postgres::Client, Driver, bool), ListenError> {
    let Listening {
        client,
        mut connection,
        attempt,
    } = target.connect().await?;
    // The connection delivers notifications through its own polling, not through the client.
    let woken = wake.clone();
    let notified = notified_head.clone();
    let driver = tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    // A payload that is not a seq (another version of the master) means "read
                    // anyway".
                    let head = n.payload().parse().unwrap_or(u64::MAX);
                    notified.fetch_max(head, Ordering::Relaxed);
                    woken.notify_one();
                }
                Ok(_) => {}
                Err(e) => return Some(e),
            }
        }
        None
    });
    let listened = async {
        client
            .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
            .await?;
        // `prefer` does not say whether the server took TLS: ask it.
        let tls = match attempt {
            PgSslMode::Disable => false,
            PgSslMode::Require => true,
            _ => client
                .query_one(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                    &[],
                )
                .await?
                .try_get(0)?,
        };
        Ok::<bool, tokio_postgres::Error>(tls)
    };
    match listened.await {
        Ok(tls) => Ok((client, driver, tls)),
        Err(e) => {
            driver.abort();
            Err(ListenError::Connect(e))
        }
    }
}

/// Publishes what was committed after the feed's last change.
pub async fn catch_up(storage: &Arc<dyn Storage>, feed: &ChangeFeed) {
    let feed = feed.clone();
    // The database watch reports an unreachable database; here it is only a missed read. (A
    // task that panicked is logged by `storage_io::run`.)
    if let Err(e) = storage_io::run(storage, move |s| feed.catch_up(s)).await {
        tracing::debug!(error = %e, "could not read the new changes");
    }
}
