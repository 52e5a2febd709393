//! Limits that keep one client from hurting the others: policy size and nesting, how many
//! streams are open and how many snapshots are read at once, in all and per client.
//!
//! A client is its IPv4 address, or the /64 network of its IPv6 address: one IPv6 host usually
//! holds a whole /64, and would otherwise count as billions of clients.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

use crate::error::LedgerError;

/// Checks the size and the nesting depth of a policy's text before it is parsed, so that a huge
/// or deeply nested document costs a scan, not a parse.
pub fn check_policy_text(
    text: &str,
    max_bytes: usize,
    max_depth: usize,
) -> Result<(), LedgerError> {
    if text.len() > max_bytes {
        return Err(LedgerError::PolicyTooLarge {
            size: text.len(),
            limit: max_bytes,
        });
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for byte in text.bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max_depth {
                    return Err(LedgerError::PolicyTooDeep(max_depth));
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Which stream limit refused a stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamLimit {
    /// The server's: streams open in all.
    #[error("{open} streams are open; the limit is {limit}")]
    Server {
        /// How many are open.
        open: usize,
        /// How many may be.
        limit: usize,
    },
    /// One client's (an IPv4 address or an IPv6 /64).
    #[error("{client} has {open} streams open; the limit per client is {limit}")]
    Client {
        /// The client, as counted.
        client: IpAddr,
        /// How many it has open.
        open: usize,
        /// How many it may have.
        limit: usize,
    },
}

/// Counts open streams, in all and per client address.
#[derive(Clone)]
pub struct StreamLimiter {
    max_total: usize,
    max_per_client: usize,
    open: Arc<Mutex<Counts>>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

/// An open stream's place; dropping it frees the place.
pub struct StreamPermit {
    open: Arc<Mutex<Counts>>,
    client: Option<IpAddr>,
}

impl StreamLimiter {
    /// At most `max_total` streams, and `max_per_client` from one address.
    pub fn new(max_total: usize, max_per_client: usize) -> Self {
        StreamLimiter {
            max_total,
            max_per_client,
            open: Arc::default(),
        }
    }

    /// A place for one more stream from `client`, or RESOURCE_EXHAUSTED-worthy refusal.
    pub fn admit(&self, client: Option<IpAddr>) -> Result<StreamPermit, LedgerError> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.total >= self.max_total {
            return Err(LedgerError::TooManyStreams(StreamLimit::Server {
                open: open.total,
                limit: self.max_total,
            }));
        }
        let client = client.map(client_key);
        if let Some(ip) = client {
            let mine = open.per_client.entry(ip).or_default();
            if *mine >= self.max_per_client {
                return Err(LedgerError::TooManyStreams(StreamLimit::Client {
                    client: ip,
                    open: *mine,
                    limit: self.max_per_client,
                }));
            }
            *mine += 1;
        }
        open.total += 1;
        Ok(StreamPermit {
            open: self.open.clone(),
            client,
        })
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.total -= 1;
        if let Some(ip) = self.client
            && let Some(mine) = open.per_client.get_mut(&ip)
        {
            *mine -= 1;
            if *mine == 0 {
                open.per_client.remove(&ip);
            }
        }
    }
}

/// A gRPC service (reflection) whose every call counts against a [`StreamLimiter`] for as long
/// as its answer is being sent: its calls are streams a client could otherwise open by the
/// thousand. A call over the limit is answered RESOURCE_EXHAUSTED.
#[derive(Clone)]
pub struct CountedStreams<S> {
    inner: S,
    streams: StreamLimiter,
}

impl<S> CountedStreams<S> {
    /// `inner`, its calls admitted by `streams`.
    pub fn new(inner: S, streams: StreamLimiter) -> Self {
        CountedStreams { inner, streams }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for CountedStreams<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for CountedStreams<S>
where
    S: tower::Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        >,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let client = request
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(|info| info.remote_addr())
            .map(|addr| addr.ip());
        let permit = match self.streams.admit(client) {
            Ok(permit) => permit,
            Err(e) => {
                let refused = tonic::Status::from(e).into_http();
                return Box::pin(std::future::ready(Ok(refused)));
            }
        };
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            Ok(response.map(|body| tonic::body::Body::new(PermitBody { body, permit })))
        })
    }
}

/// A response body that holds its stream's place until it is dropped.
struct PermitBody {
    body: tonic::body::Body,
    permit: StreamPermit,
}

impl http_body::Body for PermitBody {
    type Data = <tonic::body::Body as http_body::Body>::Data;
    type Error = <tonic::body::Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let _held = &self.permit;
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The key a client's limits are counted under: its IPv4 address, or its IPv6 /64 network.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let network = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(network))
            }
        },
        v4 => v4,
    }
}

/// Snapshots read at once, in all (`--max-snapshots`).
pub const DEFAULT_MAX_SNAPSHOTS: usize = 8;
/// Snapshots read at once for one client (`--max-snapshots-per-client`).
pub const DEFAULT_MAX_SNAPSHOTS_PER_CLIENT: usize = 2;
/// How long a snapshot may wait for its client to read (`--snapshot-stall-timeout`).
pub const DEFAULT_SNAPSHOT_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Admits snapshot reads, in all and per client. A snapshot holds a database connection and a
/// blocking thread for as long as its client takes to read it: without a cap, clients that
/// stop reading (or a reconnect storm of members that all need one) take every connection.
/// Callers over the cap wait for a turn, holding nothing.
#[derive(Clone)]
pub struct SnapshotLimiter {
    max_total: usize,
    max_per_client: usize,
    /// How long a snapshot's reader waits for its client to take the next page before it gives
    /// up and frees its connection.
    pub stall_timeout: Duration,
    running: Arc<Mutex<SnapshotCounts>>,
    freed: Arc<Notify>,
}

#[derive(Default)]
struct SnapshotCounts {
    total: usize,
    waiting: usize,
    per_client: HashMap<IpAddr, usize>,
}

impl Default for SnapshotLimiter {
    fn default() -> Self {
        SnapshotLimiter::new(
            DEFAULT_MAX_SNAPSHOTS,
            DEFAULT_MAX_SNAPSHOTS_PER_CLIENT,
            DEFAULT_SNAPSHOT_STALL_TIMEOUT,
        )
    }
}

/// A running snapshot's turn; dropping it lets the next one run.
pub struct SnapshotPermit {
    running: Arc<Mutex<SnapshotCounts>>,
    freed: Arc<Notify>,
    client: Option<IpAddr>,
}

impl SnapshotLimiter {
    /// At most `max_total` snapshots at once, `max_per_client` of one client; a reader whose
    /// client takes no page for `stall_timeout` is ended.
    pub fn new(max_total: usize, max_per_client: usize, stall_timeout: Duration) -> Self {
        SnapshotLimiter {
            max_total: max_total.max(1),
            max_per_client: max_per_client.max(1),
            stall_timeout,
            running: Arc::default(),
            freed: Arc::new(Notify::new()),
        }
    }

    /// Waits for a turn to read a snapshot for `client`.
    pub async fn acquire(&self, client: Option<IpAddr>) -> SnapshotPermit {
        let client = client.map(client_key);
        // Counted among the waiters from its first refusal until its turn, or until the stream
        // is dropped while it waits.
        let mut waiter = Waiter {
            running: &self.running,
            counted: false,
        };
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the check, so a turn freed in between is not missed.
            freed.as_mut().enable();
            {
                let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
                let mine = client.map_or(0, |c| running.per_client.get(&c).copied().unwrap_or(0));
                if running.total < self.max_total && mine < self.max_per_client {
                    running.total += 1;
                    if let Some(c) = client {
                        *running.per_client.entry(c).or_default() += 1;
                    }
                    if waiter.counted {
                        running.waiting -= 1;
                        waiter.counted = false;
                    }
                    crate::metrics::snapshots(running.total, running.waiting);
                    return SnapshotPermit {
                        running: self.running.clone(),
                        freed: self.freed.clone(),
                        client,
                    };
                }
                if !waiter.counted {
                    waiter.counted = true;
                    running.waiting += 1;
                    crate::metrics::snapshots(running.total, running.waiting);
                }
            }
            freed.await;
        }
    }
}

/// A caller of [`SnapshotLimiter::acquire`] while it is counted as waiting.
struct Waiter<'a> {
    running: &'a Mutex<SnapshotCounts>,
    counted: bool,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if self.counted {
            let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
            running.waiting -= 1;
            crate::metrics::snapshots(running.total, running.waiting);
        }
    }
}

impl Drop for SnapshotPermit {
    fn drop(&mut self) {
        {
            let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
            running.total -= 1;
            if let Some(c) = self.client
                && let Some(mine) = running.per_client.get_mut(&c)
            {
                *mine -= 1;
                if *mine == 0 {
                    running.per_client.remove(&c);
                }
            }
            crate::metrics::snapshots(running.total, running.waiting);
        }
        self.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_and_depth_are_limited_outside_strings_only() {
        assert!(check_policy_text(r#"{"a": {"b": [1]}}"#, 100, 3).is_ok());
        assert!(check_policy_text(r#"{"a": {"b": [[1]]}}"#, 100, 3).is_err());
        // Brackets inside strings, even after escaped quotes, are text.
        assert!(check_policy_text(r#"{"a": "[[[[\"{{{{"}"#, 100, 1).is_ok());
        assert!(check_policy_text(&"x".repeat(101), 100, 3).is_err());
    }

    #[test]
    fn streams_are_limited_in_all_and_per_client() {
        let limiter = StreamLimiter::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = limiter.admit(Some(a)).unwrap();
        let _second = limiter.admit(Some(a)).unwrap();
        assert!(limiter.admit(Some(a)).is_err(), "per client");
        let _third = limiter.admit(Some(b)).unwrap();
        assert!(limiter.admit(Some(b)).is_err(), "in all");
        drop(first);
        assert!(
            limiter.admit(Some(a)).is_ok(),
            "a closed stream frees its place"
        );
    }

    #[test]
    fn an_ipv6_client_is_its_64_network() {
        let limiter = StreamLimiter::new(10, 1);
        let _first = limiter.admit(Some("2001:db8::1".parse().unwrap())).unwrap();
        assert!(
            limiter
                .admit(Some("2001:db8::ffff:2".parse().unwrap()))
                .is_err(),
            "another address of the same /64"
        );
        assert!(
            limiter
                .admit(Some("2001:db8:0:1::1".parse().unwrap()))
                .is_ok(),
            "another /64"
        );
        assert_eq!(
            client_key("::ffff:10.0.0.1".parse().unwrap()),
            "10.0.0.1".parse::<IpAddr>().unwrap(),
            "an IPv4-mapped address is its IPv4 address"
        );
    }

    #[tokio::test]
    async fn snapshots_wait_for_a_turn_in_all_and_per_client() {
        let limiter = SnapshotLimiter::new(2, 1, Duration::from_secs(1));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        let first = limiter.acquire(Some(a)).await;
        let short = Duration::from_millis(50);
        assert!(
            tokio::time::timeout(short, limiter.acquire(Some(a)))
                .await
                .is_err(),
            "a second snapshot of one client waits"
        );
        let _second = limiter.acquire(Some(b)).await;
        assert!(
            tokio::time::timeout(short, limiter.acquire(Some(c)))
                .await
                .is_err(),
            "a third snapshot waits for the overall cap"
        );
        let waiting = tokio::spawn({
            let limiter = limiter.clone();
            async move { limiter.acquire(Some(c)).await }
        });
        tokio::time::sleep(short).await;
        drop(first);
        let third = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("a freed turn goes to a waiter")
            .unwrap();
        drop(third);
        let counts = limiter.running.lock().unwrap();
        assert_eq!(
            (counts.total, counts.waiting),
            (1, 0),
            "waiters that gave up are not counted"
        );
    }
}
