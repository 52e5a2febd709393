//! (10) `ListSubscribers` (issue 19: "for 10,000 streams, under 100 ms"): a real release
//! `master`, 1,000 and then 10,000 real `StreamLedger` streams each named by a `subscriber`
//! identity and with one `ReportProgress` (so each entry is complete: sent, durable, lag), then
//! `ListSubscribers` called again and again from one client; the latency as the client sees it
//! (the call until the whole answer is decoded), median and p90, and the answer's encoded size.
//! Each size has a fresh master; the list must hold every stream, or the stage fails. It runs
//! once in the full run (not per backend: the list is in memory) and alone with
//! `--only-subscribers`.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ledger_proto::pb::stream_ledger_response::Event;
use ledger_proto::pb::{
    ListSubscribersRequest, ListSubscribersResponse, ReportProgressRequest, StreamLedgerRequest,
    SubscriberIdentity,
};
use ledger_testkit::Master;
use prost::Message;
use serde_json::{Value, json};

use crate::stats::median;
use crate::workload::{connect, connect_stream, head, insert};

/// Streams per HTTP/2 connection: half the master's default `--max-concurrent-streams` (200),
/// so each connection's `ReportProgress` calls find room beside its streams.
const STREAMS_PER_CONNECTION: usize = 100;

/// The `p`th percentile (nearest rank) of `values`.
fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Raises the soft limit of open files to the hard one; the master, started after, inherits
/// it. 10,000 streams on 100 connections need far fewer, but a low default (1,024) and the
/// master's own files should not be what the stage measures.
fn raise_nofile() -> libc::rlim_t {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
    }
    limit.rlim_cur
}

/// One size: a fresh master, `streams` named streams with a report each, `calls` listings.
async fn measure(streams: usize, calls: usize) -> (Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let limit = (2 * streams).to_string();
    let master = Master::start(
        dir.path(),
        &["--max-streams", &limit, "--max-streams-per-client", &limit],
    );
    let addr = master.addr.to_string();
    let mut client = connect(&addr).await;
    for _ in 0..10 {
        insert(&mut client)
            .await
            .expect("an insert before the streams");
    }
    let (h, _, _) = head(&mut client).await;

    let connections = streams.div_ceil(STREAMS_PER_CONNECTION);
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(connect_stream(&addr).await);
    }
    let reported = Arc::new(AtomicUsize::new(0));
    let opened = Instant::now();
    let mut tasks = Vec::with_capacity(streams);
    for k in 0..streams {
        let mut client = channels[k % connections].clone();
        let reported = reported.clone();
        tasks.push(tokio::spawn(async move {
            let session_id = format!("{:016x}", 0xbe4c_0000_0000u64 + k as u64);
            let mut stream = client
                .stream_ledger(StreamLedgerRequest {
                    after_seq: h,
                    subscriber: Some(SubscriberIdentity {
                        node_name: format!("bench-node-{k:05}"),
                        version: format!("ledger-bench {}", env!("CARGO_PKG_VERSION")),
                        session_id: session_id.clone(),
                    }),
                })
                .await
                .unwrap_or_else(|status| panic!("StreamLedger {k}: {status}"))
                .into_inner();
            let mut reported_once = false;
            // Read until the stage ends (the task is aborted) or the master goes.
            loop {
                let msg = match stream.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => return,
                    Err(status) => panic!("stream {k}: {status}"),
                };
                if matches!(msg.event, Some(Event::CaughtUp(_))) && !reported_once {
                    client
                        .report_progress(ReportProgressRequest {
                            session_id: session_id.clone(),
                            durable_seq: h,
                            downstream: Vec::new(),
                        })
                        .await
                        .unwrap_or_else(|status| panic!("ReportProgress {k}: {status}"));
                    reported_once = true;
                    reported.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    while reported.load(Ordering::SeqCst) < streams {
        assert!(
            Instant::now() < deadline,
            "{} of {streams} streams open and reported after 180 s",
            reported.load(Ordering::SeqCst)
        );
        if let Some(done) = tasks.iter().position(|t| t.is_finished()) {
            let t = tasks.swap_remove(done);
            t.await.expect("a stream task");
            panic!("a stream ended before the listing");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let open_s = opened.elapsed().as_secs_f64();

    // The listing client has a connection of its own, as an operator's would.
    let mut lister = connect(&addr).await;
    let list = |lister: &mut ledger_testkit::client::Client| {
        let mut lister = lister.clone();
        async move {
            let started = Instant::now();
            let answer: ListSubscribersResponse = lister
                .list_subscribers(ListSubscribersRequest {})
                .await
                .expect("ListSubscribers")
                .into_inner();
            (started.elapsed().as_secs_f64() * 1e3, answer)
        }
    };
    // One call first, not counted: the connection's first large answer grows its windows.
    let (_, first) = list(&mut lister).await;
    check(&first, streams, h);
    let mut ms = Vec::with_capacity(calls);
    let mut bytes = 0;
    for _ in 0..calls {
        let (t, answer) = list(&mut lister).await;
        assert_eq!(answer.subscribers.len(), streams, "a partial list");
        bytes = answer.encoded_len();
        ms.push(t);
    }
    check(&list(&mut lister).await.1, streams, h);
    for t in &tasks {
        t.abort();
    }
    drop(master);
    let (p50, p90) = (median(&ms), percentile(&ms, 90.0));
    let line = format!(
        "{streams} streams on {connections} connections (opened and reported in {open_s:.1} s): ListSubscribers median {p50:.1} ms, p90 {p90:.1} ms, max {:.1} ms over {calls} calls; answer {bytes} bytes ({:.0} per subscriber)",
        ms.iter().copied().fold(0.0, f64::max),
        bytes as f64 / streams as f64
    );
    let v = json!({
        "streams": streams,
        "connections": connections,
        "open_and_report_seconds": open_s,
        "calls": calls,
        "median_ms": p50,
        "p90_ms": p90,
        "max_ms": ms.iter().copied().fold(0.0, f64::max),
        "runs_ms": ms,
        "response_bytes": bytes,
        "response_bytes_per_subscriber": bytes as f64 / streams as f64,
    });
    (v, line)
}

/// The list holds every stream once, each named, reported at `head` and not lagging.
fn check(answer: &ListSubscribersResponse, streams: usize, head: u64) {
    assert_eq!(answer.subscribers.len(), streams, "a partial list");
    let names: HashSet<&str> = answer
        .subscribers
        .iter()
        .map(|s| s.node_name.as_str())
        .collect();
    assert_eq!(names.len(), streams, "every stream listed once");
    for s in &answer.subscribers {
        assert!(
            s.node_name.starts_with("bench-node-") && !s.version.is_empty() && !s.peer.is_empty(),
            "{s:?}"
        );
        assert_eq!((s.durable_seq, s.lag), (head, 0), "{s:?}");
        assert!(s.sent_seq >= head && s.bytes_sent > 0, "{s:?}");
    }
}

/// The stage in the full run: both sizes, each a line on stderr; the JSON of both, and the
/// lines again for the report.
pub(crate) async fn stage(quick: bool) -> (Value, Vec<String>) {
    let nofile = raise_nofile();
    let calls = if quick { 11 } else { 21 };
    eprintln!(
        "(10) ListSubscribers: 1,000 and 10,000 named streams, {calls} calls each (open files: {nofile})"
    );
    let (mut out, mut lines) = (Vec::new(), Vec::new());
    for streams in [1_000, 10_000] {
        let (v, line) = measure(streams, calls).await;
        eprintln!("  {line}");
        out.push(v);
        lines.push(line);
    }
    (Value::Array(out), lines)
}

/// `--only-subscribers`: the stage alone, its JSON on stdout (and in `--json FILE`).
pub fn run(quick: bool, json_out: Option<&Path>) {
    crate::report::run_alone(json_out, async {
        let (list, _) = stage(quick).await;
        json!({ "list_subscribers": list })
    });
}
