//! (3) Fan-out: 1,000 subscribers of one master, their delivery latency, the master's memory
//! per idle subscriber and the bytes of a stream message.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ledger_proto::pb::StreamLedgerRequest;
use ledger_proto::pb::stream_ledger_response::Event;
use ledger_testkit::process::proc_status_kib;

use crate::stats::{Dist, dist};
use crate::workload::{connect, connect_stream, head, insert, paced_inserts};

pub(crate) struct FanOut {
    pub(crate) from_ack: Vec<Dist>,
    pub(crate) from_send: Vec<Dist>,
    pub(crate) rss_before_kib: u64,
    pub(crate) rss_after_kib: u64,
    pub(crate) subscribers: usize,
    pub(crate) delivered: u64,
    pub(crate) expected: u64,
    pub(crate) message_bytes: f64,
}

/// Protobuf size of a varint.
fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Serialized size of `StreamLedgerResponse { seq, inserted: Policy {id, type, json, seq} }`.
fn response_len(p: &ledger_proto::pb::Policy, seq: u64) -> usize {
    let field = |len: usize| {
        if len == 0 {
            0
        } else {
            1 + varint_len(len as u64) + len
        }
    };
    let policy = field(p.id.len())
        + field(p.r#type.len())
        + field(p.json.len())
        + if p.seq == 0 { 0 } else { 1 + varint_len(p.seq) };
    (if seq == 0 { 0 } else { 1 + varint_len(seq) }) + 1 + varint_len(policy as u64) + policy
}

pub(crate) async fn fan_out(
    addr: &str,
    master_pid: u32,
    subscribers: usize,
    inserts: usize,
    rounds: usize,
) -> FanOut {
    let mut client = connect(addr).await;
    let (h, _, _) = head(&mut client).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = proc_status_kib(master_pid, "VmRSS:");
    const CONNECTIONS: usize = 20;
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(connect_stream(addr).await);
    }
    let caught = Arc::new(AtomicUsize::new(0));
    let stop_at = Arc::new(AtomicU64::new(u64::MAX));
    let bytes = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut tasks = Vec::new();
    for k in 0..subscribers {
        let mut client = channels[k % CONNECTIONS].clone();
        let (caught, stop_at, bytes) = (caught.clone(), stop_at.clone(), bytes.clone());
        tasks.push(tokio::spawn(async move {
            let mut got: Vec<(u64, Instant)> = Vec::with_capacity(4096);
            let mut stream = client
                .stream_ledger(StreamLedgerRequest {
                    after_seq: h,
                    subscriber: None,
                })
                .await
                .expect("StreamLedger")
                .into_inner();
            while Instant::now() < deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                let msg = match tokio::time::timeout(left, stream.message()).await {
                    Ok(Ok(Some(m))) => m,
                    Ok(Ok(None)) => break,
                    Ok(Err(status)) => panic!("subscriber {k}: {status}"),
                    Err(_) => break,
                };
                let now = Instant::now();
                match msg.event {
                    Some(Event::CaughtUp(_)) => {
                        caught.fetch_add(1, Ordering::SeqCst);
                    }
                    Some(Event::Inserted(p)) => {
                        if k == 0 {
                            bytes.fetch_add(response_len(&p, msg.seq) as u64, Ordering::Relaxed);
                        }
                        got.push((msg.seq, now));
                        if msg.seq >= stop_at.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                    _ => {}
                }
            }
            got
        }));
    }
    let open_deadline = Instant::now() + Duration::from_secs(120);
    while caught.load(Ordering::SeqCst) < subscribers {
        assert!(
            Instant::now() < open_deadline,
            "subscribers did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let rss_after = proc_status_kib(master_pid, "VmRSS:");
    let mut sent_rounds = Vec::new();
    for _ in 0..rounds {
        let sent = paced_inserts(&mut client, inserts, 200.0).await;
        sent_rounds.push(sent);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let last = sent_rounds.last().unwrap().last().unwrap().0;
    stop_at.store(last, Ordering::Relaxed);
    // Subscribers that already received `last` before `stop_at` was set wait for one more insert.
    insert(&mut client)
        .await
        .expect("the insert that ends the fan-out");
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.unwrap());
    }
    let acks: HashMap<u64, (Instant, Instant)> = sent_rounds
        .iter()
        .flatten()
        .map(|(s, a, t)| (*s, (*a, *t)))
        .collect();
    let mut from_ack = Vec::new();
    let mut from_send = Vec::new();
    let mut delivered = 0u64;
    for round in &sent_rounds {
        let (lo, hi) = (round.first().unwrap().0, round.last().unwrap().0);
        let (mut a, mut s) = (Vec::new(), Vec::new());
        for got in &all {
            for (seq, t) in got.iter().filter(|(seq, _)| *seq >= lo && *seq <= hi) {
                if let Some((ack, sent)) = acks.get(seq) {
                    delivered += 1;
                    a.push(t.saturating_duration_since(*ack).as_secs_f64() * 1e3);
                    s.push(t.saturating_duration_since(*sent).as_secs_f64() * 1e3);
                }
            }
        }
        from_ack.push(dist(a));
        from_send.push(dist(s));
    }
    let per = (inserts * rounds) as f64;
    FanOut {
        from_ack,
        from_send,
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        subscribers,
        delivered,
        expected: (subscribers * inserts * rounds) as u64,
        message_bytes: bytes.load(Ordering::Relaxed) as f64 / per,
    }
}
