//! The real binaries as child processes.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use ledger_proto::pb::ledger_service_client::LedgerServiceClient;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The path of a workspace binary (`master`, `member`) of the build that made this executable:
/// beside it (a binary such as `ledger-bench` in `target/<profile>/`), else one directory up (a
/// test in `target/<profile>/deps/`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the executable's path");
    let dir = exe.parent().expect("the executable's directory");
    let beside = dir.join(name);
    if beside.is_file() {
        return beside;
    }
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let path = dir.parent().expect("the target directory").join(name);
    assert!(
        path.exists(),
        "{} does not exist: build the binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// Log lines of a child, kept to be shown when a test fails.
pub type Log = Arc<Mutex<Vec<String>>>;

/// The line put in a process's log between two runs, so a test can read one run's logs.
pub const RESTART_MARK: &str = "=== restarted ===";

/// Collects the stderr lines of `child` into `log`; with `ready`, sends the address of the
/// first `listening on ADDR` line.
pub fn capture(child: &mut Child, log: &Log, ready: Option<mpsc::Sender<String>>) {
    let stderr = child.stderr.take().expect("piped stderr");
    let log = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let (Some(ready), Some(at)) = (&ready, line.find("listening on ")) {
                let addr = line[at + "listening on ".len()..]
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let _ = ready.send(addr);
            }
            log.lock().unwrap().push(line);
        }
    });
}

/// A master in a temporary directory of its own (its SQLite ledger, its logs' files), removed
/// after the master is killed.
pub struct TempMaster {
    /// The master (dropped first: it is killed before its directory goes).
    pub master: Master,
    /// Its working directory.
    pub dir: tempfile::TempDir,
}

impl TempMaster {
    /// Starts `master` with `args` in a new temporary directory.
    pub fn start(args: &[&str]) -> TempMaster {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let master = Master::start(dir.path(), args);
        TempMaster { master, dir }
    }
}

/// A running `master` process.
pub struct Master {
    child: Option<Child>,
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its working directory (where the default `blockchain.db` lives).
    pub dir: PathBuf,
    args: Vec<String>,
    /// Environment variables set for every run (cleared by [`Master::clear_env`]).
    env: Vec<(String, String)>,
    log: Log,
}

impl Master {
    /// Starts `master` in `dir` on an ephemeral loopback port with `args` added.
    pub fn start(dir: &Path, args: &[&str]) -> Master {
        Self::start_with_env(dir, args, &[])
    }

    /// Starts a relay: `master --upstream ADDR` for each of `upstreams` (HOST:PORT, in order),
    /// in `dir` (its own `blockchain.db` there) with `args` added. It listens at once; it
    /// serves reads and streams once it holds a copy of the upstream's ledger.
    pub fn start_relay(dir: &Path, upstreams: &[String], args: &[&str]) -> Master {
        let mut all: Vec<&str> = Vec::new();
        for upstream in upstreams {
            all.extend(["--upstream", upstream.as_str()]);
        }
        all.extend_from_slice(args);
        Self::start(dir, &all)
    }

    /// [`Master::start`] with environment variables (`FAILPOINTS`, for the fault suite).
    pub fn start_with_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Master {
        Self::start_at(
            dir,
            "127.0.0.1:0",
            args.iter().map(|a| a.to_string()).collect(),
            env.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn start_at(dir: &Path, listen: &str, args: Vec<String>, env: Vec<(String, String)>) -> Master {
        let log: Log = Arc::default();
        let mut child = Command::new(binary("master"))
            .current_dir(dir)
            .args(["--listen", listen, "--bind"])
            .args(&args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("LEDGER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting master");
        let (ready, addr) = mpsc::channel();
        capture(&mut child, &log, Some(ready));
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = loop {
            if let Ok(addr) = addr.recv_timeout(Duration::from_millis(50)) {
                break addr;
            }
            if let Some(status) = child.try_wait().expect("polling master") {
                panic!(
                    "master exited with {status} before listening:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "master did not listen within 60s:\n{}",
                log.lock().unwrap().join("\n")
            );
        };
        Master {
            child: Some(child),
            addr: addr.parse().expect("the address master logged"),
            dir: dir.to_path_buf(),
            args,
            env,
            log,
        }
    }

    /// The process id of the current run.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("master is running").id()
    }

    /// Forgets the environment variables given at start, for the next [`Master::restart`].
    pub fn clear_env(&mut self) {
        self.env.clear();
    }

    /// Waits (up to `timeout`) for the process to exit by itself and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("master is running");
        wait_for(&mut child, timeout, "master", &self.log)
    }

    /// Starts a new process with the same directory, port and arguments (after a kill).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart after kill9 or terminate");
        let again = Self::start_at(
            &self.dir,
            &self.addr.to_string(),
            self.args.clone(),
            self.env.clone(),
        );
        let mut old_log = std::mem::take(&mut *self.log.lock().unwrap());
        old_log.push(RESTART_MARK.to_string());
        again.log.lock().unwrap().splice(0..0, old_log);
        *self = again;
    }

    /// `http://ADDR`, for clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A connected client.
    pub async fn client(&self) -> LedgerServiceClient<Channel> {
        LedgerServiceClient::connect(self.url())
            .await
            .unwrap_or_else(|e| panic!("connecting to master at {}: {e}", self.addr))
    }

    /// A connected `grpc.health.v1` client.
    pub async fn health_client(&self) -> HealthClient<Channel> {
        let channel = Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connecting to master at {}: {e}", self.addr));
        HealthClient::new(channel)
    }

    /// The `grpc.health.v1` status of `service` ("" for the whole server), within 10 s.
    pub async fn health(&self, service: &str) -> ServingStatus {
        let mut client = self.health_client().await;
        let answer = crate::within(
            10,
            "Health/Check",
            client.check(HealthCheckRequest {
                service: service.into(),
            }),
        )
        .await
        .unwrap_or_else(|e| panic!("Health/Check {service:?}: {e}"));
        ServingStatus::try_from(answer.into_inner().status).expect("a known status")
    }

    /// Kills the process with SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill -9 master");
            child.wait().expect("reaping master");
        }
    }

    /// Freezes the process (SIGSTOP): its sockets stay open and the kernel keeps accepting
    /// connections into its backlog, but it answers nothing until [`Master::resume`].
    pub fn pause(&self) {
        signal(
            self.child.as_ref().expect("master is running"),
            libc::SIGSTOP,
        );
    }

    /// Lets a process frozen by [`Master::pause`] go on (SIGCONT).
    pub fn resume(&self) {
        signal(
            self.child.as_ref().expect("master is running"),
            libc::SIGCONT,
        );
    }

    /// Sends SIGTERM and waits (up to 30 s) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("master is running");
        signal(&child, libc::SIGTERM);
        wait_for(
            &mut child,
            Duration::from_secs(30),
            "master after SIGTERM",
            &self.log,
        )
    }

    /// Everything the process logged so far, over all its runs.
    pub fn logs(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// What the current run logged so far.
    pub fn run_logs(&self) -> String {
        run_logs(&self.log)
    }

    /// Waits (up to `seconds`) until the current run logged a line containing `needle`.
    pub async fn wait_for_log(&self, seconds: u64, needle: &str) {
        let what = format!("master to log {needle:?}");
        crate::wait_until(seconds, &what, || async {
            self.run_logs().contains(needle)
        })
        .await;
    }

    /// The loopback port of the current run's metrics endpoint, read from its log: start it
    /// with `--metrics-addr 127.0.0.1:0`. The master binds it before its gRPC port, so the line
    /// is normally there once [`Master::start`] returns; the wait covers a slow log reader.
    pub fn metrics_port(&self) -> u16 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let logs = self.logs();
            if let Some(addr) = crate::metrics::logged_metrics_addr(&logs) {
                return addr.port();
            }
            assert!(
                Instant::now() < deadline,
                "master logged no metrics address within 30s:\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The address of the current run's separate AnyLog listener, read from its last
    /// `anylog on ADDR` log line (up to 30 s): start it with `--anylog-listen 127.0.0.1:0`.
    pub fn anylog_addr(&self) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let logs = self.logs();
            if let Some(addr) = logged_anylog_addr(&logs) {
                return addr;
            }
            assert!(
                Instant::now() < deadline,
                "master logged no `anylog on ADDR` within 30s:\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The lines of `log` after its last [`RESTART_MARK`]: the current run's.
pub fn run_logs(log: &Log) -> String {
    let log = log.lock().unwrap();
    let start = log
        .iter()
        .rposition(|line| line == RESTART_MARK)
        .map_or(0, |at| at + 1);
    log[start..].join("\n")
}

/// The address in the last `anylog on ADDR` line of `log` (text or JSON lines) whose ADDR is
/// an address.
pub fn logged_anylog_addr(log: &str) -> Option<SocketAddr> {
    const LINE: &str = "anylog on ";
    log.rmatch_indices(LINE).find_map(|(at, _)| {
        let addr: String = log[at + LINE.len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']'))
            .collect();
        addr.parse().ok()
    })
}

impl Drop for Master {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- master log ---\n{}\n---", self.logs());
        }
    }
}

/// A field of `/proc/PID/status` in KiB (`VmRSS:`, `VmHWM:`); 0 when it cannot be read.
pub fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Sends `sig` to a child.
pub fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on the pid of a child we have not reaped yet.
    let rc = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(rc, 0, "kill({}, {sig})", child.id());
}

/// Waits for a child to exit, killing it and failing the test after `timeout`.
pub fn wait_for(child: &mut Child, timeout: Duration, what: &str, log: &Log) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("polling child") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} did not exit within {timeout:?}:\n{}",
                log.lock().unwrap().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
