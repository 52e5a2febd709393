//! Accepting AnyLog connections: on a port of their own, or on the gRPC port, where the first
//! bytes of each connection tell HTTP/2's client preface (or a TLS handshake) from an AnyLog
//! block.

use std::sync::Arc;
use std::time::Duration;

use ledger_anylog::wire::{HTTP2_PREFACE, looks_like_anylog};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::AnyLogEdge;

/// How long a new connection on a shared port may stay silent before it is closed: every client
/// of either protocol speaks first.
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

/// How the gRPC connections of a shared port are handed to the gRPC server.
pub type GrpcConnections = ReceiverStream<std::io::Result<TcpStream>>;

/// Serves AnyLog on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, edge: Arc<AnyLogEdge>, shutdown: CancellationToken) {
    loop {
        // The place first, then the connection: while the edge is busy, nodes wait in the
        // listen backlog instead of being accepted and dropped.
        let accepted = tokio::select! {
            accepted = async {
                let permit = edge.admit().await;
                (listener.accept().await, permit)
            } => accepted,
            _ = shutdown.cancelled() => return,
        };
        match accepted {
            (Ok((stream, peer)), permit) => edge.spawn_connection(stream, peer, permit),
            (Err(e), _) => accept_failed(e).await,
        }
    }
}

/// Shares `listener` between gRPC and AnyLog: AnyLog connections go to `edge`, the others are
/// returned, for the gRPC server, with TCP_NODELAY and `keepalive` set. Accepting stops when
/// the gRPC server drops the returned stream (it stops accepting at shutdown).
pub fn share(listener: TcpListener, edge: Arc<AnyLogEdge>, keepalive: Duration) -> GrpcConnections {
    let (grpc, connections) = mpsc::channel(256);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        accept_failed(e).await;
                        continue;
                    }
                },
                _ = grpc.closed() => return,
            };
            let (grpc, edge) = (grpc.clone(), edge.clone());
            tokio::spawn(async move {
                match first_bytes_say_anylog(&stream).await {
                    Some(true) => {
                        let permit = edge.admit().await;
                        edge.spawn_connection(stream, peer, permit);
                    }
                    Some(false) => {
                        // Without TCP_NODELAY a unary answer's trailers wait for the client's
                        // delayed ACK (~40 ms).
                        let _ = stream.set_nodelay(true);
                        let _ = socket2::SockRef::from(&stream)
                            .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(keepalive));
                        let _ = grpc.send(Ok(stream)).await;
                    }
                    None => {
                        tracing::debug!(%peer, "closed a connection that sent nothing to tell its protocol")
                    }
                }
            });
        }
    });
    ReceiverStream::new(connections)
}

/// Waits for the first bytes of `stream` and tells whether they open an AnyLog message; `None`
/// when the peer closed or stayed silent.
async fn first_bytes_say_anylog(stream: &TcpStream) -> Option<bool> {
    let mut first = [0u8; HTTP2_PREFACE.len()];
    let deadline = tokio::time::Instant::now() + FIRST_BYTES_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut first))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if let Some(anylog) = looks_like_anylog(&first[..n]) {
            return Some(anylog);
        }
        // Part of a preface arrived: peek returns at once until more does, so wait a little.
        tokio::time::sleep_until(
            deadline.min(tokio::time::Instant::now() + Duration::from_millis(5)),
        )
        .await;
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
    }
}

async fn accept_failed(e: std::io::Error) {
    // Out of file descriptors, typically: pause instead of spinning.
    tracing::warn!("cannot accept a connection: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}
