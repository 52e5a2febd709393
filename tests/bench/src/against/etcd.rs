//! The etcd side of `--against etcd`: the one-node etcd server the benchmark starts itself
//! (default settings, a temporary data directory, loopback ports) and its gRPC client, made
//! from our own copy of the part of etcd's API it calls (`proto/etcd/rpc.proto`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ledger_testkit::process::{Log, capture};
use tonic::transport::{Channel, Endpoint};

/// The generated messages and clients of `proto/etcd/rpc.proto` (package `etcdserverpb`).
pub(crate) mod pb {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("etcdserverpb");
}

use pb::kv_client::KvClient;
use pb::{PutRequest, RangeRequest};

/// The script that installs etcd when it is missing (as root with apt-get), from the source
/// tree this binary was built from.
const INSTALL_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/install-etcd.sh");

/// Every key the benchmark writes starts with this; watches and ranges cover exactly it.
pub(crate) const PREFIX: &str = "/policies/";

/// The end of the range of keys starting with [`PREFIX`]: the prefix with its last byte plus
/// one (`/` + 1 = `0`), as etcd's `WithPrefix` computes it.
pub(crate) const PREFIX_END: &str = "/policies0";

/// The path of `name` in a directory of `PATH`, if there is one.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The `etcd` binary. When it is not on PATH, runs `scripts/install-etcd.sh` (which installs
/// Debian's etcd-server as root, or fails saying what is missing); the comparison is never
/// run without etcd, so this panics, naming the script, rather than skip it.
pub(crate) fn ensure_installed() -> PathBuf {
    if let Some(etcd) = on_path("etcd") {
        return etcd;
    }
    eprintln!("etcd is not on PATH: running {INSTALL_SCRIPT}");
    let status = Command::new("bash").arg(INSTALL_SCRIPT).status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "{INSTALL_SCRIPT} failed ({s}): --against etcd needs an etcd server binary on PATH"
        ),
        Err(e) => panic!(
            "cannot run {INSTALL_SCRIPT} ({e}): --against etcd needs an etcd server binary on PATH"
        ),
    }
    on_path("etcd")
        .unwrap_or_else(|| panic!("{INSTALL_SCRIPT} succeeded but there is still no etcd on PATH"))
}

/// `etcd --version`'s first line, for the report.
pub(crate) fn version(etcd: &Path) -> String {
    Command::new(etcd)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// A loopback port that was free a moment ago. etcd must be given its ports up front, so a
/// start that loses the race for one tries again with others ([`Etcd::start`]).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A running one-node etcd, killed (and its data directory removed) on drop.
pub(crate) struct Etcd {
    child: Child,
    /// Its client address, HOST:PORT.
    pub(crate) addr: String,
    /// Its stderr lines (warnings and errors only: `--log-level warn`).
    log: Log,
    /// Its data directory: dropped after the process is killed.
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts `etcd` with its default settings except what a private server on loopback
    /// needs: its own data directory under `root`, client and peer URLs on 127.0.0.1 ports
    /// picked here, and warnings-only logs. Returns once it answers a `Range`.
    pub(crate) async fn start(etcd: &Path, root: &Path) -> Etcd {
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("etcd-")
                .tempdir_in(root)
                .expect("a directory for etcd");
            let (client, peer) = (free_port(), free_port());
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let mut child = Command::new(etcd)
                .arg("--name=bench")
                .arg(format!("--data-dir={}", dir.path().join("data").display()))
                .arg(format!("--listen-client-urls={client_url}"))
                .arg(format!("--advertise-client-urls={client_url}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster=bench={peer_url}"))
                .args(["--logger=zap", "--log-level=warn"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", etcd.display()));
            let log = Log::default();
            capture(&mut child, &log, None);
            let mut server = Etcd {
                child,
                addr: format!("127.0.0.1:{client}"),
                log,
                _dir: dir,
            };
            match server.wait_ready(Duration::from_secs(30)).await {
                Ok(()) => return server,
                Err(why) => {
                    let logs = server.logs();
                    let lost_port = logs.contains("address already in use");
                    drop(server);
                    if attempt == ATTEMPTS || !lost_port {
                        panic!("etcd did not start: {why}\n{logs}");
                    }
                }
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Waits (up to `timeout`) until the server answers a `Range`, or it exits.
    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("polling etcd") {
                return Err(format!("etcd exited with {status}"));
            }
            if let Ok(channel) = try_channel(&self.addr, Some(Duration::from_secs(2))).await {
                let ready = KvClient::new(channel)
                    .range(RangeRequest {
                        key: PREFIX.into(),
                        range_end: PREFIX_END.into(),
                        limit: 1,
                    })
                    .await;
                if ready.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!("no answer within {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its process id (etcd is one process).
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it logged so far.
    pub(crate) fn logs(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // SIGKILL, as the test kit stops a master: nothing of it must outlive the benchmark,
        // and what it would flush on a clean stop is not measured anyway.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- etcd log ---\n{}\n---", self.logs());
        }
    }
}

/// A channel (one HTTP/2 connection) to the etcd at `addr`, or the error of connecting.
pub(crate) async fn try_channel(
    addr: &str,
    call_timeout: Option<Duration>,
) -> Result<Channel, tonic::transport::Error> {
    let mut endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .expect("an etcd URL")
        .connect_timeout(Duration::from_secs(10));
    if let Some(timeout) = call_timeout {
        endpoint = endpoint.timeout(timeout);
    }
    endpoint.connect().await
}

/// A channel to the etcd at `addr`, each call bounded by `call_timeout` (`None` for watches),
/// as the Ledger clients of the benchmark are (`workload::connect`).
pub(crate) async fn channel(addr: &str, call_timeout: Option<Duration>) -> Channel {
    try_channel(addr, call_timeout)
        .await
        .unwrap_or_else(|e| panic!("connecting to etcd at {addr}: {e}"))
}

/// A KV client over `channel`, taking answers of up to 64 MiB (a `Range` page of 10,000
/// policies is about 3 MiB, tonic's default limit is 4 MiB).
pub(crate) fn kv(channel: Channel) -> KvClient<Channel> {
    KvClient::new(channel).max_decoding_message_size(64 << 20)
}

/// `Put(key, value)`: the revision it created.
pub(crate) async fn put(
    kv: &mut KvClient<Channel>,
    key: String,
    value: String,
) -> Result<u64, tonic::Status> {
    let answer = kv
        .put(PutRequest {
            key: key.into_bytes(),
            value: value.into_bytes(),
        })
        .await?
        .into_inner();
    Ok(answer.header.map_or(0, |h| h.revision as u64))
}
