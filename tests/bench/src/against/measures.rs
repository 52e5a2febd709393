//! The measures of `--against etcd`, each one function that runs the same code on any of the
//! three systems: closed-loop writes (throughput, and the bulk load), the server's disk bytes
//! and CPU per write, opening 1,000 streams and their memory, propagation to 10 subscribers,
//! and the disk's own fsync floor.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ledger_testkit::process::proc_status_kib;

use super::procfs::{Usage, delta, delta_by_role, device_bytes_written, sample};
use super::systems::{Running, Subscription, Writer};
use crate::stats::{Dist, dist};

/// When a closed loop of writes stops.
#[derive(Clone, Copy)]
pub(crate) enum Stop {
    /// After this long (a throughput run).
    After(Duration),
    /// After this many writes (a bulk load), or after 20 minutes whatever the count.
    Count(u64),
}

/// `clients` clients, client k on `writers[k % len]`'s channel, each writing as soon as its
/// previous write is acknowledged, until `stop`. Returns the writes done and the seconds.
pub(crate) async fn drive(writers: &[Writer], clients: usize, stop: Stop) -> (u64, f64) {
    let done = Arc::new(AtomicU64::new(0));
    let (end, left) = match stop {
        Stop::After(d) => (Instant::now() + d, u64::MAX),
        Stop::Count(n) => (Instant::now() + Duration::from_secs(1200), n),
    };
    let left = Arc::new(AtomicU64::new(left));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for k in 0..clients {
        let mut writer = writers[k % writers.len()].clone();
        let (done, left) = (done.clone(), left.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end
                && left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
            {
                writer.write().await.expect("a durable write");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (done.load(Ordering::Relaxed), start.elapsed().as_secs_f64())
}

/// Writes/s of `clients` clients on one channel (one HTTP/2 connection) for `seconds`.
pub(crate) async fn writes_per_second(running: &Running<'_>, clients: usize, seconds: f64) -> f64 {
    let writer = running.writer().await;
    let (writes, secs) = drive(
        &[writer],
        clients,
        Stop::After(Duration::from_secs_f64(seconds)),
    )
    .await;
    writes as f64 / secs
}

/// One client's run with what the server's processes did during it.
pub(crate) struct OneClient {
    /// Writes acknowledged.
    pub(crate) writes: u64,
    /// Seconds of the run.
    pub(crate) seconds: f64,
    /// The master's or etcd's disk bytes and CPU over the run.
    pub(crate) server: Usage,
    /// The PostgreSQL cluster's (postmaster and all its children), for Ledger-PG; `None`
    /// otherwise, or when its processes are not ours to count (`--pg-url`).
    pub(crate) database: Option<Usage>,
    /// `database` per kind of PostgreSQL process (walwriter, checkpointer, backend, ...).
    pub(crate) database_by_role: std::collections::BTreeMap<String, Usage>,
    /// Bytes the disk under the benchmark's directory wrote during the run, from every process
    /// of the machine ([`device_bytes_written`]); `None` when not readable.
    pub(crate) device_bytes: Option<u64>,
}

impl OneClient {
    /// Writes a second.
    pub(crate) fn per_second(&self) -> f64 {
        self.writes as f64 / self.seconds
    }

    /// KiB written to disk per write by `usage`.
    fn kib(&self, usage: Usage) -> f64 {
        usage.write_bytes as f64 / 1024.0 / self.writes as f64
    }

    /// µs of CPU per write by `usage`.
    fn cpu(&self, usage: Usage) -> f64 {
        usage.cpu_us as f64 / self.writes as f64
    }

    /// KiB written per write by the server and its database together, then by each.
    pub(crate) fn kib_per_write(&self) -> (f64, f64, Option<f64>) {
        let db = self.database.map(|d| self.kib(d));
        (
            self.kib(self.server) + db.unwrap_or(0.0),
            self.kib(self.server),
            db,
        )
    }

    /// KiB the whole disk wrote per write (all processes of the machine).
    pub(crate) fn device_kib_per_write(&self) -> f64 {
        self.device_bytes
            .map_or(f64::NAN, |b| b as f64 / 1024.0 / self.writes as f64)
    }

    /// CPU µs per write of the server and its database together, then of each.
    pub(crate) fn cpu_us_per_write(&self) -> (f64, f64, Option<f64>) {
        let db = self.database.map(|d| self.cpu(d));
        (
            self.cpu(self.server) + db.unwrap_or(0.0),
            self.cpu(self.server),
            db,
        )
    }
}

/// One client for `seconds`, with `/proc` sampled right before and right after: the server's
/// processes and, for Ledger-PG, every process of the cluster (listed at each sample, so a
/// backend that started during the run counts from zero).
pub(crate) async fn one_client(running: &Running<'_>, seconds: f64) -> OneClient {
    let writer = running.writer().await;
    let (server_pids, counted) = (running.server_pids(), running.database_counted());
    let device_before = device_bytes_written(running.dir());
    let server_before = sample(&server_pids);
    let database_before = sample(&running.database_pids());
    let (writes, secs) = drive(&[writer], 1, Stop::After(Duration::from_secs_f64(seconds))).await;
    let server = delta(&server_before, &sample(&server_pids));
    let device_after = device_bytes_written(running.dir());
    let database_after = sample(&running.database_pids());
    let database_by_role = delta_by_role(&database_before, &database_after);
    let database = delta(&database_before, &database_after);
    let database = (running.kind == super::systems::Kind::Postgres && counted).then_some(database);
    OneClient {
        writes,
        seconds: secs,
        server,
        database,
        database_by_role,
        device_bytes: device_before
            .zip(device_after)
            .map(|(b, a)| a.saturating_sub(b)),
    }
}

/// Opening many streams at once and what they cost the server.
pub(crate) struct Fanout {
    /// Seconds from the start until the last stream was open.
    pub(crate) open_seconds: f64,
    /// The server's VmRSS before the streams, KiB.
    pub(crate) rss_before_kib: u64,
    /// Its VmRSS with them all open and idle for a second, KiB.
    pub(crate) rss_after_kib: u64,
    /// Streams opened.
    pub(crate) streams: usize,
}

impl Fanout {
    /// VmRSS growth per idle stream, KiB.
    pub(crate) fn kib_per_stream(&self) -> f64 {
        (self.rss_after_kib as f64 - self.rss_before_kib as f64) / self.streams as f64
    }
}

/// Opens `streams` subscriptions at once, each on a connection of its own, all started
/// together; the time until the last is open (connecting included: that is what a fleet of
/// fresh subscribers waits for), then the server's VmRSS with all of them idle. They are
/// closed before returning.
pub(crate) async fn open_streams(running: &Running<'_>, streams: usize) -> Fanout {
    let after_seq = running.head_seq().await;
    let server_pid = running.server_pids()[0];
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = proc_status_kib(server_pid, "VmRSS:");
    let target = running.target();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(streams);
    for _ in 0..streams {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let opened = tokio::time::timeout(
                Duration::from_secs(120),
                Subscription::open(&target, after_seq),
            )
            .await;
            (opened, Instant::now())
        }));
    }
    let mut open = Vec::with_capacity(streams);
    let mut last = start;
    for t in tasks {
        let (opened, at) = t.await.unwrap();
        match opened {
            Ok(Ok(sub)) => open.push(sub),
            Ok(Err(e)) => panic!("opening stream {} of {streams}: {e}", open.len()),
            Err(_) => panic!("a stream did not open within 120 s"),
        }
        last = last.max(at);
    }
    let open_seconds = last.duration_since(start).as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = proc_status_kib(server_pid, "VmRSS:");
    drop(open);
    Fanout {
        open_seconds,
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        streams,
    }
}

/// Propagation to subscribers, one round.
pub(crate) struct Propagation {
    /// Arrival at a subscriber minus the instant the write was sent, ms, over every delivery.
    pub(crate) from_send: Dist,
    /// Deliveries seen, and expected (writes × subscribers).
    pub(crate) delivered: usize,
    /// Deliveries expected.
    pub(crate) expected: usize,
}

/// `subscribers` subscriptions open, then `writes` writes from one client on one channel,
/// paced at `rate` a second (open loop: each is sent at its time whether or not the previous
/// was answered, as `workload::paced_inserts` does for Ledger alone); each subscriber records
/// when each write arrives.
pub(crate) async fn propagation(
    running: &Running<'_>,
    subscribers: usize,
    writes: usize,
    rate: f64,
) -> Propagation {
    let after_seq = running.head_seq().await;
    let target = running.target();
    let mut subs = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        subs.push(
            Subscription::open(&target, after_seq)
                .await
                .unwrap_or_else(|e| panic!("opening a subscriber: {e}")),
        );
    }
    // Every subscriber stops once it saw `writes` writes (the writer is the only one), or
    // at the deadline: a lost delivery shows as `delivered < expected`, not as a hang.
    let deadline = Instant::now() + Duration::from_secs_f64(writes as f64 / rate + 60.0);
    let readers: Vec<_> = subs
        .into_iter()
        .map(|mut sub| {
            tokio::spawn(async move {
                let mut got: Vec<(u64, Instant)> = Vec::with_capacity(writes);
                while got.len() < writes {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match tokio::time::timeout(left, sub.next_writes()).await {
                        Ok(Some(ids)) => {
                            let now = Instant::now();
                            got.extend(ids.into_iter().map(|id| (id, now)));
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
                got
            })
        })
        .collect();
    let writer = running.writer().await;
    let period = Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now();
    let mut sends = Vec::with_capacity(writes);
    for i in 0..writes {
        tokio::time::sleep_until(start + period * i as u32).await;
        let mut writer = writer.clone();
        sends.push(tokio::spawn(async move {
            let sent = Instant::now();
            let id = writer.write().await.expect("a paced write");
            (id, sent)
        }));
    }
    let mut sent: HashMap<u64, Instant> = HashMap::with_capacity(writes);
    for s in sends {
        let (id, at) = s.await.unwrap();
        sent.insert(id, at);
    }
    let mut ms = Vec::with_capacity(writes * subscribers);
    for r in readers {
        for (id, arrived) in r.await.unwrap() {
            if let Some(at) = sent.get(&id) {
                ms.push(arrived.saturating_duration_since(*at).as_secs_f64() * 1e3);
            }
        }
    }
    Propagation {
        delivered: ms.len(),
        expected: writes * subscribers,
        from_send: dist(ms),
    }
}

/// The disk's fsync floor: `iterations` times a 4 KiB `pwrite` then `fdatasync`, in a file of
/// `dir` written and synced whole first (so no write grows it and each fdatasync flushes
/// data only, no size change): the cheapest durable write this disk does. Latencies in ms.
pub(crate) fn fsync_floor(dir: &Path, iterations: usize) -> Dist {
    let path = dir.join("fsync-floor");
    let file = File::create(&path).expect("the fsync floor's file");
    let block = [0x5au8; 4096];
    for i in 0..iterations {
        file.write_all_at(&block, (i * 4096) as u64).unwrap();
    }
    file.sync_all().unwrap();
    let mut ms = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let start = Instant::now();
        file.write_all_at(&block, (i * 4096) as u64).unwrap();
        file.sync_data().unwrap();
        ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    dist(ms)
}
