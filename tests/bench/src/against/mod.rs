//! `ledger-bench --against etcd` (issue 16, point 1): Ledger on SQLite, Ledger on PostgreSQL
//! and etcd side by side, driven by one Rust load generator over gRPC, on this machine, in
//! this run.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! cargo run --release -p ledger-bench -- --against etcd [--quick] [--rounds N] [--seconds S] [--json FILE] [--pg-url URL]
//! ```
//!
//! etcd is a real one-node server, started here with its default settings (a temporary data
//! directory, loopback ports); when `etcd` is not on PATH, `scripts/install-etcd.sh` installs
//! it or the run stops. Ledger is the release `master` (the test kit's [`ledger_testkit::Master`])
//! on a SQLite file, and on a private PostgreSQL cluster with fsync on. A Ledger write is an
//! `InsertPolicy` of a ~250-byte JSON policy, an etcd write a `Put` of the same text under a new
//! key: both are acknowledged once durable.
//!
//! The systems take turns, round by round (SQLite, PG, etcd; again; ...), so that the noise of
//! a shared machine falls on all three; the table shows medians over the rounds, the JSON every
//! round. Each measure starts fresh servers (new SQLite file, new database, new etcd data
//! directory) where state matters.

mod etcd;
mod measures;
mod procfs;
mod systems;
mod table;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ledger_testkit::postgres::{Cluster, PostgresServer};
use serde_json::{Value, json};

use crate::stats::{Dist, dist_json, median, median_dist};
use measures::{Fanout, OneClient, Propagation, Stop, drive, fsync_floor};
use systems::{Kind, Running, Setup};

/// The options of `--against etcd`.
pub(crate) struct Options {
    /// Shorter runs: 3 s a throughput measure, 300 paced writes, 20,000 entries to read.
    pub(crate) quick: bool,
    /// Rounds of every measure (3).
    pub(crate) rounds: Option<usize>,
    /// Seconds of a throughput measure (10; 3 with `--quick`).
    pub(crate) seconds: Option<f64>,
    /// Where to write the JSON report.
    pub(crate) json: Option<PathBuf>,
    /// A PostgreSQL server of yours instead of the private cluster.
    pub(crate) pg_url: Option<String>,
}

/// What one system did in every round of every measure.
#[derive(Default)]
pub(crate) struct Results {
    /// The 1-client runs, with the server's disk bytes and CPU.
    pub(crate) writes_1: Vec<OneClient>,
    /// Writes/s of 16 clients on one connection.
    pub(crate) writes_16: Vec<f64>,
    /// Writes/s of 64 clients on one connection.
    pub(crate) writes_64: Vec<f64>,
    /// Opening 1,000 streams, and the server's memory with them idle.
    pub(crate) fanout: Vec<Fanout>,
    /// Propagation to 10 subscribers.
    pub(crate) propagation: Vec<Propagation>,
    /// Seconds for a fresh client to read every entry.
    pub(crate) fresh_read: Vec<f64>,
    /// Seconds the bulk load before the fresh reads took.
    pub(crate) load_seconds: f64,
}

/// Streams opened at once.
const STREAMS: usize = 1000;
/// Subscribers of the propagation measure.
const SUBSCRIBERS: usize = 10;
/// Paced writes a second in the propagation measure.
const RATE: f64 = 200.0;

/// Runs the comparison, prints the table and writes the JSON report.
pub(crate) fn run(opts: Options) {
    let rounds = opts.rounds.unwrap_or(3).max(1);
    let seconds = opts.seconds.unwrap_or(if opts.quick { 3.0 } else { 10.0 });
    let paced = if opts.quick { 300 } else { 1000 };
    let entries: u64 = if opts.quick { 20_000 } else { 100_000 };

    // Everything it needs, before anything is measured: a missing piece fails now.
    let etcd = etcd::ensure_installed();
    let etcd_version = etcd::version(&etcd);
    let _ = ledger_testkit::binary("master");
    let root = tempfile::Builder::new()
        .prefix("ledger-vs-etcd-")
        .tempdir()
        .expect("a temporary directory");
    let (pg, cluster) = match &opts.pg_url {
        Some(url) => (PostgresServer::at(url), None),
        None => {
            eprintln!("starting a PostgreSQL cluster (fsync=on)");
            let cluster = Cluster::start(true);
            (cluster.server(), Some(cluster))
        }
    };
    let setup = Setup {
        etcd,
        pg,
        cluster,
        root: root.path().to_path_buf(),
    };

    eprintln!("fsync floor: 2,000 × (4 KiB pwrite + fdatasync)");
    let floor = fsync_floor(root.path(), 2000);

    let runtime = crate::workload::runtime();
    let started = Instant::now();
    let results = runtime.block_on(measure(&setup, rounds, seconds, paced, entries));
    drop(setup);

    let date = crate::chrono_like_now();
    let cores = crate::num_cpus();
    let t = table::table(&results, entries);
    println!(
        "\nledger-bench --against etcd{} — {date}, {cores} cores, {etcd_version}, {rounds} rounds × {seconds} s",
        if opts.quick { " --quick" } else { "" }
    );
    println!(
        "fsync floor (4 KiB pwrite + fdatasync, 2,000×, same disk): p50 {:.3} ms, p99 {:.3} ms",
        floor.p50, floor.p99
    );
    println!("{}", processes_counted(opts.pg_url.is_some()));
    println!("{WRITE_BYTES_CAVEAT}");
    if opts.quick {
        println!("--quick: the fresh read is of {entries} entries (100,000 without --quick)");
    }
    println!("\n{t}");
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());

    if let Some(path) = &opts.json {
        let report = json!({
            "date": date, "cores": cores, "quick": opts.quick, "etcd_version": etcd_version,
            "rounds": rounds, "throughput_seconds": seconds, "paced_writes": paced,
            "paced_rate_per_s": RATE, "subscribers": SUBSCRIBERS, "streams": STREAMS,
            "fresh_read_entries": entries,
            "fsync_floor": dist_json(&floor),
            "processes_counted": processes_counted(opts.pg_url.is_some()),
            "write_bytes_caveat": WRITE_BYTES_CAVEAT,
            "systems": Kind::ALL.iter().zip(&results)
                .map(|(k, r)| (k.key().to_string(), system_json(r)))
                .collect::<serde_json::Map<_, _>>(),
            "ratios_to_etcd": table::verdicts(&results).iter().map(|v| json!({
                "measure": v.measure, "sqlite": v.sqlite, "postgres": v.postgres,
                "sqlite_met": v.sqlite_met, "postgres_met": v.postgres_met,
            })).collect::<Vec<_>>(),
            "table_markdown": t,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
        println!("JSON written to {}", path.display());
    }
}

/// Why the table has a whole-disk row beside `write_bytes` (see
/// [`procfs::device_bytes_written`]).
const WRITE_BYTES_CAVEAT: &str = "write_bytes is charged per dirtied page-cache folio (large \
    folios on 6.x kernels: an 8 KiB overwrite + fdatasync in a 1 MiB file counts 1,024 KiB), so \
    small in-place commits to big files (PostgreSQL's WAL segments, SQLite's WAL) count far above \
    what the disk writes; the whole-disk row (all processes of the machine) is the cross-check";

/// The sentence of the report that says whose `/proc` counters the disk and CPU rows add up.
fn processes_counted(pg_url: bool) -> &'static str {
    if pg_url {
        "disk bytes and CPU count: Ledger-SQLite the master process; Ledger-PG the master only \
         (--pg-url: the server's processes are not ours to count); etcd the etcd process"
    } else {
        "disk bytes (write_bytes of /proc/PID/io) and CPU (utime+stime of /proc/PID/stat) count: \
         Ledger-SQLite the master process; Ledger-PG the master plus the postmaster and all its \
         children (WAL writer, checkpointer, background writer, backends, ...); etcd the etcd process"
    }
}

/// Every measure, the systems taking turns in each round. Results in [`Kind::ALL`] order.
async fn measure(
    setup: &Setup,
    rounds: usize,
    seconds: f64,
    paced: usize,
    entries: u64,
) -> [Results; 3] {
    let mut results: [Results; 3] = Default::default();

    // Writes: a fresh server per system and round; 50 writes to warm it up (connections,
    // caches, the first pages of the files), then 1, 16 and 64 clients on one connection.
    for round in 1..=rounds {
        for (i, kind) in Kind::ALL.into_iter().enumerate() {
            let running = Running::start(kind, setup, &[]).await;
            drive(&[running.writer().await], 1, Stop::Count(50)).await;
            // Let what the warm-up left (a WAL writer's flush, etcd's batch commit) settle
            // before the counters are read.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let one = measures::one_client(&running, seconds).await;
            let w16 = measures::writes_per_second(&running, 16, seconds).await;
            let w64 = measures::writes_per_second(&running, 64, seconds).await;
            eprintln!(
                "[round {round}] {}: writes/s {:.0} / {w16:.0} / {w64:.0} (1 / 16 / 64 clients), {:.2} KiB and {:.0} µs CPU a write",
                kind.label(),
                one.per_second(),
                one.kib_per_write().0,
                one.cpu_us_per_write().0
            );
            if !one.database_by_role.is_empty() {
                let roles: Vec<String> = one
                    .database_by_role
                    .iter()
                    .map(|(role, u)| {
                        format!(
                            "{role} {:.2} KiB {:.0} µs",
                            u.write_bytes as f64 / 1024.0 / one.writes as f64,
                            u.cpu_us as f64 / one.writes as f64
                        )
                    })
                    .collect();
                eprintln!("  PostgreSQL per write: {}", roles.join(", "));
            }
            results[i].writes_1.push(one);
            results[i].writes_16.push(w16);
            results[i].writes_64.push(w64);
        }
    }

    // Streams: a fresh server per system and round (Ledger with room for 1,000 streams from
    // one address, as fanout.rs), one write so that Ledger's head is past 0 (a subscriber at
    // seq 0 would get a snapshot, not a stream at the head); 1,000 streams opened at once.
    // Then propagation to 10 subscribers, on another fresh server with one write too.
    for round in 1..=rounds {
        for (i, kind) in Kind::ALL.into_iter().enumerate() {
            let running = Running::start(kind, setup, &["--max-streams-per-client", "5000"]).await;
            drive(&[running.writer().await], 1, Stop::Count(1)).await;
            let f = measures::open_streams(&running, STREAMS).await;
            drop(running);
            // Propagation on another fresh server: right after 1,000 watches close, etcd
            // delivers events tens of ms late for a while (a trial run: p50 64 ms, against
            // 1.2 ms on a fresh etcd), which would measure the teardown, not propagation.
            let running = Running::start(kind, setup, &[]).await;
            drive(&[running.writer().await], 1, Stop::Count(1)).await;
            let p = measures::propagation(&running, SUBSCRIBERS, paced, RATE).await;
            eprintln!(
                "[round {round}] {}: {STREAMS} streams open in {:.3} s, {:.1} KiB RSS each; propagation p50 {:.2} ms p99 {:.2} ms ({}/{} delivered)",
                kind.label(),
                f.open_seconds,
                f.kib_per_stream(),
                p.from_send.p50,
                p.from_send.p99,
                p.delivered,
                p.expected
            );
            results[i].fanout.push(f);
            results[i].propagation.push(p);
        }
    }

    // Fresh reads: each system loaded once with `entries` writes (64 clients on 4
    // connections), all three kept up, then a fresh client reads everything, in turns.
    let mut loaded = Vec::new();
    for (i, kind) in Kind::ALL.into_iter().enumerate() {
        let running = Running::start(kind, setup, &[]).await;
        let mut writers = Vec::new();
        for _ in 0..4 {
            writers.push(running.writer().await);
        }
        let (done, secs) = drive(&writers, 64, Stop::Count(entries)).await;
        assert_eq!(done, entries, "{}: loading did not finish", kind.label());
        eprintln!("{}: loaded {entries} entries in {secs:.1} s", kind.label());
        results[i].load_seconds = secs;
        loaded.push(running);
    }
    // The load leaves dirty pages for the kernel to write back: flush them first, so the
    // reads do not pay for them unevenly.
    let _ = std::process::Command::new("sync").status();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for round in 1..=rounds {
        for (i, running) in loaded.iter().enumerate() {
            let (secs, read) = running.read_all().await;
            assert_eq!(
                read,
                entries,
                "{}: the fresh client read {read} entries",
                running.kind.label()
            );
            eprintln!(
                "[round {round}] {}: fresh read of {read} entries in {secs:.3} s",
                running.kind.label()
            );
            results[i].fresh_read.push(secs);
        }
    }
    drop(loaded);
    results
}

/// A measure's rounds and their median.
fn rounds_json(values: &[f64]) -> Value {
    json!({"median": median(values), "rounds": values})
}

/// One system's results: every round and the medians.
fn system_json(r: &Results) -> Value {
    let one = |f: fn(&OneClient) -> f64| -> Vec<f64> { r.writes_1.iter().map(f).collect() };
    let prop: Vec<Dist> = r.propagation.iter().map(|p| p.from_send).collect();
    json!({
        "writes_per_s_1_client": rounds_json(&one(OneClient::per_second)),
        "writes_per_s_16_clients": rounds_json(&r.writes_16),
        "writes_per_s_64_clients": rounds_json(&r.writes_64),
        "kib_written_per_write_1_client": rounds_json(&one(|o| o.kib_per_write().0)),
        "kib_written_per_write_server_process": rounds_json(&one(|o| o.kib_per_write().1)),
        "kib_written_per_write_postgresql": rounds_json(&one(|o| o.kib_per_write().2.unwrap_or(f64::NAN))),
        "device_kib_written_per_write_1_client": rounds_json(&one(OneClient::device_kib_per_write)),
        "cpu_us_per_write_1_client": rounds_json(&one(|o| o.cpu_us_per_write().0)),
        "cpu_us_per_write_server_process": rounds_json(&one(|o| o.cpu_us_per_write().1)),
        "cpu_us_per_write_postgresql": rounds_json(&one(|o| o.cpu_us_per_write().2.unwrap_or(f64::NAN))),
        "one_client_runs": r.writes_1.iter().map(|o| json!({
            "writes": o.writes, "seconds": o.seconds,
            "device_write_bytes": o.device_bytes,
            "server_write_bytes": o.server.write_bytes, "server_cpu_us": o.server.cpu_us,
            "postgresql_write_bytes": o.database.map(|d| d.write_bytes),
            "postgresql_cpu_us": o.database.map(|d| d.cpu_us),
            "postgresql_by_process": o.database_by_role.iter().map(|(role, u)| (role.clone(), json!({
                "write_bytes": u.write_bytes, "cpu_us": u.cpu_us,
            }))).collect::<serde_json::Map<_, _>>(),
        })).collect::<Vec<_>>(),
        "open_1000_streams_seconds": rounds_json(&r.fanout.iter().map(|f| f.open_seconds).collect::<Vec<_>>()),
        "rss_kib_per_idle_subscriber": rounds_json(&r.fanout.iter().map(|f| f.kib_per_stream()).collect::<Vec<_>>()),
        "fanout_runs": r.fanout.iter().map(|f| json!({
            "streams": f.streams, "open_seconds": f.open_seconds,
            "rss_before_kib": f.rss_before_kib, "rss_after_kib": f.rss_after_kib,
        })).collect::<Vec<_>>(),
        "propagation_from_send": dist_json(&median_dist(&prop)),
        "propagation_runs": r.propagation.iter().map(|p| json!({
            "from_send": dist_json(&p.from_send), "delivered": p.delivered, "expected": p.expected,
        })).collect::<Vec<_>>(),
        "fresh_read_seconds": rounds_json(&r.fresh_read),
        "load_seconds": r.load_seconds,
    })
}

/// `ledger-bench against-load SYSTEM ADDR CLIENTS SECONDS`: the closed-loop writes of the
/// comparison (one channel, `clients` clients) on a server started by hand, a Ledger master
/// (`ledger`) or an etcd (`etcd`), so that two builds of the master and etcd can be run side by
/// side with perf or strace watching: writes a second.
pub(crate) fn load(system: &str, addr: &str, clients: usize, seconds: f64) -> f64 {
    let runtime = crate::workload::runtime();
    runtime.block_on(async {
        let writer = match system {
            "ledger" => systems::Writer::Ledger(crate::workload::connect(addr).await),
            "etcd" => systems::Writer::Etcd(etcd::kv(
                etcd::channel(addr, Some(std::time::Duration::from_secs(30))).await,
            )),
            other => panic!("against-load {other}: the system is `ledger` or `etcd`"),
        };
        let stop = measures::Stop::After(std::time::Duration::from_secs_f64(seconds));
        let (writes, secs) = measures::drive(&[writer], clients, stop).await;
        writes as f64 / secs
    })
}
