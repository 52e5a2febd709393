//! Following the other masters on a shared PostgreSQL database.
//!
//! Every commit sends `NOTIFY ledger_changes` (see the storage); each master `LISTEN`s on a
//! connection of its own and, on a notification, publishes to its feed whatever was committed
//! after the last change it published. The notification is only a wake-up: the changes are
//! always read from the database, so a lost or merged notification loses nothing, and a slow
//! fallback read catches what a notification lost while the listening connection was down.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use crate::feed::ChangeFeed;
use crate::storage::{NOTIFY_CHANNEL, Storage};

/// The longest wait between two attempts to reconnect the listening connection.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(5);

/// Publishes the changes other masters commit, until `shutdown` is cancelled. `url` is the
/// PostgreSQL URL of the shared database; `fallback` is how often the database is read anyway.
pub async fn follow(
    url: String,
    storage: Arc<dyn Storage>,
    feed: ChangeFeed,
    fallback: Duration,
    shutdown: CancellationToken,
) {
    let wake = Arc::new(Notify::new());
    // The highest head seq notified since the last look.
    let notified_head = Arc::new(AtomicU64::new(0));
    let mut delay = Duration::from_millis(100);
    let mut failing = false;
    loop {
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return,
            connected = tokio_postgres::connect(&url, NoTls) => connected,
        };
        let (client, mut connection) = match connected {
            Ok(pair) => pair,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot listen for the other masters' commits; retrying");
                    failing = true;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(MAX_RECONNECT_DELAY);
                continue;
            }
        };
        // The connection delivers notifications through its own polling, not through the client.
        let woken = wake.clone();
        let notified = notified_head.clone();
        let mut driver = tokio::spawn(async move {
            while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        // A payload that is not a seq (another version of the master) means
                        // "read anyway".
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
        if let Err(e) = client
            .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
            .await
        {
            tracing::warn!(error = %e, "LISTEN failed; retrying");
            driver.abort();
            continue;
        }
        tracing::info!("listening for the other masters' commits");
        failing = false;
        delay = Duration::from_millis(100);
        // Commits made while not listening are read now.
        notified_head.store(u64::MAX, Ordering::Relaxed);
        wake.notify_one();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    driver.abort();
                    return;
                }
                // This master's own commits are notified too; those it published already need
                // no read (a round trip and a pooled connection per commit).
                _ = wake.notified() => {
                    if notified_head.swap(0, Ordering::Relaxed) > feed.head() {
                        catch_up(&storage, &feed).await;
                    }
                }
                _ = tokio::time::sleep(fallback) => catch_up(&storage, &feed).await,
                ended = &mut driver => {
                    let reason = match ended {
                        Ok(Some(e)) => e.to_string(),
                        Ok(None) => "closed by the server".to_string(),
                        Err(e) => e.to_string(),
                    };
                    tracing::warn!(%reason, "lost the connection that listens for the other masters' commits; reconnecting");
                    break;
                }
            }
        }
    }
}

/// Publishes what was committed after the feed's last change.
pub async fn catch_up(storage: &Arc<dyn Storage>, feed: &ChangeFeed) {
    let (storage, feed) = (storage.clone(), feed.clone());
    match tokio::task::spawn_blocking(move || feed.catch_up(&*storage)).await {
        Ok(Ok(_)) => {}
        // The database watch reports an unreachable database; here it is only a missed read.
        Ok(Err(e)) => tracing::debug!(error = %e, "could not read the new changes"),
        Err(e) => tracing::warn!(error = %e, "the catch-up task failed"),
    }
}
