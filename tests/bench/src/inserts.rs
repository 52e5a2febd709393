//! (1) Insert throughput: inserts a second from 1 and from 64 clients.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::workload::{connect, insert};

pub(crate) async fn throughput(addr: &str, clients: usize, seconds: f64) -> f64 {
    let mut channels = Vec::new();
    for _ in 0..clients.min(4) {
        channels.push(connect(addr).await);
    }
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for k in 0..clients {
        let mut client = channels[k % channels.len()].clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                insert(&mut client).await.expect("insert");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}
