//! Counting what a client asks of its node: a tower layer under alloy's RPC client, so every
//! request is counted, whatever sent it (reads, writes, receipts, [`crate::ChainClient::rpc`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use alloy::rpc::json_rpc::{RequestPacket, ResponsePacket};
use alloy::transports::{TransportError, TransportFut};
use tower::{Layer, Service};

/// The requests a [`crate::ChainClient`] made so far, failed ones included.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RpcStats {
    /// HTTP requests: one per single call and one per batch.
    pub http_requests: u64,
    /// JSON-RPC calls: one per single call, and one per call inside each batch. What a
    /// provider that bills per call counts.
    pub calls: u64,
}

impl RpcStats {
    /// What was made between `earlier` and `self` (two readings of the same client).
    pub fn since(self, earlier: RpcStats) -> RpcStats {
        RpcStats {
            http_requests: self.http_requests - earlier.http_requests,
            calls: self.calls - earlier.calls,
        }
    }
}

/// The counters a client and its transport share.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    http_requests: AtomicU64,
    calls: AtomicU64,
}

impl Counters {
    pub(crate) fn read(&self) -> RpcStats {
        RpcStats {
            http_requests: self.http_requests.load(Ordering::Relaxed),
            calls: self.calls.load(Ordering::Relaxed),
        }
    }
}

/// Wraps a transport in [`Counting`].
#[derive(Debug, Clone)]
pub(crate) struct CountingLayer(pub(crate) Arc<Counters>);

impl<S> Layer<S> for CountingLayer {
    type Service = Counting<S>;

    fn layer(&self, inner: S) -> Counting<S> {
        Counting {
            inner,
            counters: self.0.clone(),
        }
    }
}

/// A transport that counts each request packet (an HTTP request) and the calls in it.
#[derive(Debug, Clone)]
pub(crate) struct Counting<S> {
    inner: S,
    counters: Arc<Counters>,
}

impl<S> Service<RequestPacket> for Counting<S>
where
    S: Service<
            RequestPacket,
            Response = ResponsePacket,
            Error = TransportError,
            Future = TransportFut<'static>,
        >,
{
    type Response = ResponsePacket;
    type Error = TransportError;
    type Future = TransportFut<'static>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: RequestPacket) -> TransportFut<'static> {
        self.counters.http_requests.fetch_add(1, Ordering::Relaxed);
        self.counters
            .calls
            .fetch_add(request.len() as u64, Ordering::Relaxed);
        self.inner.call(request)
    }
}
