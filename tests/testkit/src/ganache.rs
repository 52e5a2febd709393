//! A local Ethereum chain for the chain tests: ganache, from the `tests/node_modules` that
//! `scripts/test.sh` installs (`npm ci`, pinned by `tests/package-lock.json`), on 127.0.0.1 at a
//! port the kernel picks, with ganache's deterministic wallet (the same funded accounts every
//! run), mining each transaction at once. Stopped by its PID when dropped; it also stops by
//! itself when the test process dies (it watches its stdin).
//!
//! Without Node.js or the npm packages the tests fail, saying how to install them: chain tests
//! never skip.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ledger_chain::{Address, ChainClient, ChainOptions, PrivateKeySigner};

use crate::process::{Log, capture, signal, wait_for};

/// ganache's chain id (its default, written out in `ganache.js`).
pub const CHAIN_ID: u64 = 1337;

/// One of ganache's funded accounts.
#[derive(Debug, Clone)]
pub struct Account {
    /// Its address.
    pub address: Address,
    /// Its private key, `0x` and 64 hex digits (what a key file holds).
    pub key_hex: String,
}

impl Account {
    /// Its key, to sign with.
    pub fn signer(&self) -> PrivateKeySigner {
        ledger_chain::key::parse_key(&self.key_hex).expect("ganache's key")
    }

    /// Writes its key into `path` (for `--ethereum-key-file`), with a trailing newline as an
    /// editor would leave it.
    pub fn write_key_file(&self, path: &Path) {
        std::fs::write(path, format!("{}\n", self.key_hex)).expect("writing a key file");
    }
}

/// How to start ganache.
#[derive(Debug, Clone, Default)]
pub struct GanacheOptions {
    /// Funded accounts (ganache's default, 10, when 0).
    pub accounts: usize,
    /// Seconds between blocks; 0 (the default) mines each transaction when it arrives.
    pub block_time: f64,
}

/// A running ganache.
pub struct Ganache {
    child: Option<Child>,
    port: u16,
    options: GanacheOptions,
    /// Its database: a restart finds the chain there.
    dir: tempfile::TempDir,
    accounts: Vec<Account>,
    log: Log,
}

/// `tests/node_modules`, or `LEDGER_NODE_MODULES`.
pub fn node_modules() -> PathBuf {
    if let Ok(dir) = std::env::var("LEDGER_NODE_MODULES") {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../node_modules")
}

fn launcher() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("ganache.js")
}

impl Ganache {
    /// Starts ganache with 10 accounts, mining each transaction at once, and returns once it
    /// answers JSON-RPC.
    pub fn start() -> Ganache {
        Self::start_with(GanacheOptions::default())
    }

    /// Starts ganache with `options`.
    pub fn start_with(options: GanacheOptions) -> Ganache {
        let dir = tempfile::Builder::new()
            .prefix("ledger-ganache-")
            .tempdir()
            .expect("a temporary directory");
        let log = Log::default();
        let (child, port, accounts) = try_spawn(0, &options, dir.path(), &log)
            .unwrap_or_else(|log| panic!("ganache did not start:\n{log}"));
        Ganache {
            child: Some(child),
            port,
            options,
            dir,
            accounts,
            log,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The port it listens on (the same after [`Ganache::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id of the current run.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("ganache is running").id()
    }

    /// The funded accounts, the same every run (ganache's deterministic wallet).
    pub fn accounts(&self) -> &[Account] {
        &self.accounts
    }

    /// Account `index`'s key.
    pub fn signer(&self, index: usize) -> PrivateKeySigner {
        self.accounts[index].signer()
    }

    /// A client of `contract`, writing as account `index` (reading only with `None`).
    pub fn client(&self, contract: Address, account: Option<usize>) -> ChainClient {
        ChainClient::connect_with(
            &self.url(),
            contract,
            account.map(|index| self.signer(index)),
            Some(CHAIN_ID),
            test_options(),
        )
        .expect("a client of ganache")
    }

    /// Deploys a new `PolicyLedger` from the committed artifact as account `index`; returns a
    /// client of it writing as that account.
    pub async fn deploy(&self, index: usize) -> ChainClient {
        crate::within(
            60,
            "deploying PolicyLedger",
            ChainClient::deploy(
                &self.url(),
                self.signer(index),
                Some(CHAIN_ID),
                test_options(),
                Duration::from_secs(30),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("deploying PolicyLedger on ganache: {e}"))
    }

    /// A JSON-RPC call to ganache (its `evm_*` methods, or anything else).
    pub async fn rpc(&self, method: &'static str, params: serde_json::Value) -> serde_json::Value {
        let client = self.client(Address::ZERO, None);
        crate::within(30, method, client.rpc(method, params))
            .await
            .unwrap_or_else(|e| panic!("{method} on ganache: {e}"))
    }

    /// `evm_snapshot`: the id of a snapshot of the chain as it is, for [`Ganache::revert`].
    pub async fn snapshot(&self) -> String {
        let id = self.rpc("evm_snapshot", serde_json::json!([])).await;
        id.as_str().expect("a snapshot id").to_string()
    }

    /// `evm_revert`: the chain goes back to snapshot `id`, its later blocks gone (a reorg once
    /// new blocks are mined at their heights: [`Ganache::mine`]). The snapshot is used up.
    pub async fn revert(&self, id: &str) {
        let reverted = self.rpc("evm_revert", serde_json::json!([id])).await;
        assert_eq!(reverted, serde_json::json!(true), "evm_revert {id}");
    }

    /// `evm_mine`, `blocks` times: empty blocks.
    pub async fn mine(&self, blocks: u64) {
        for _ in 0..blocks {
            self.rpc("evm_mine", serde_json::json!([])).await;
        }
    }

    /// Kills ganache (SIGKILL): it answers nothing until [`Ganache::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops ganache cleanly (SIGTERM: it flushes its database) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGTERM);
            wait_for(
                &mut child,
                Duration::from_secs(30),
                "ganache after SIGTERM",
                &self.log,
            );
        }
    }

    /// Starts ganache again on the same port with the same database, after [`Ganache::stop`]
    /// (the chain is kept) or [`Ganache::kill`] (what was flushed is kept).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart after stop or kill");
        // The port is free again, but any process may take it meanwhile: ports the kernel picks
        // for outgoing connections (other tests', or a client's connect to this very port) come
        // from the same range. Such a connection ends soon, so the start is tried again.
        let deadline = Instant::now() + Duration::from_secs(30);
        let (child, port, accounts) = loop {
            match try_spawn(self.port, &self.options, self.dir.path(), &self.log) {
                Ok(started) => break started,
                Err(log) if log.contains("EADDRINUSE") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(log) => {
                    let holders = Command::new("ss")
                        .args([
                            "-Htanp",
                            &format!("( sport = :{0} or dport = :{0} )", self.port),
                        ])
                        .output()
                        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
                        .unwrap_or_default();
                    panic!(
                        "ganache did not start again on port {}:\n{log}\nsockets on the port:\n{holders}",
                        self.port
                    )
                }
            }
        };
        assert_eq!(port, self.port);
        self.child = Some(child);
        self.accounts = accounts;
    }

    /// What ganache printed on stderr.
    pub fn logs(&self) -> String {
        log_text(&self.log)
    }
}

impl Drop for Ganache {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- ganache log ---\n{}\n---", self.logs());
        }
    }
}

/// The client options of the tests: the defaults, but a short receipt poll and small batches
/// (so a few dozen policies already take several batches).
pub fn test_options() -> ChainOptions {
    ChainOptions {
        receipt_poll: Duration::from_millis(20),
        batch_size: 8,
        request_timeout: Duration::from_secs(20),
        ..ChainOptions::default()
    }
}

/// The lines of `log`, also after a panic while it was held.
fn log_text(log: &Log) -> String {
    log.lock().unwrap_or_else(|e| e.into_inner()).join("\n")
}

/// Starts the launcher and waits (up to 60 s) for its line, then until it answers; the log when
/// it exits before listening (a port taken: `EADDRINUSE`).
fn try_spawn(
    port: u16,
    options: &GanacheOptions,
    dir: &Path,
    log: &Log,
) -> Result<(Child, u16, Vec<Account>), String> {
    let modules = node_modules();
    assert!(
        modules.join("ganache/package.json").is_file(),
        "ganache is not installed in {}: run scripts/test.sh, or `npm ci` in tests/ (Node.js and \
         npm needed); the chain tests never skip",
        modules.display()
    );
    let config = serde_json::json!({
        "port": port,
        "dbPath": dir.join("chain"),
        "accounts": if options.accounts == 0 { 10 } else { options.accounts },
        "blockTime": options.block_time,
    });
    let mut child = Command::new("node")
        .arg(launcher())
        .arg(config.to_string())
        .env("LEDGER_NODE_MODULES", &modules)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("starting ganache with node: {e} (the chain tests need Node.js: apt-get install nodejs)")
        });
    capture(&mut child, log, None);
    let stdout = child.stdout.take().expect("piped stdout");
    let (line_tx, line_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = line_tx.send(line);
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let line = loop {
        if let Ok(line) = line_rx.recv_timeout(Duration::from_millis(50)) {
            break line;
        }
        if let Some(status) = child.try_wait().expect("polling ganache") {
            // Its last lines may still be on their way from the stderr reader.
            std::thread::sleep(Duration::from_millis(100));
            return Err(format!("exited with {status}:\n{}", log_text(log)));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ganache did not listen within 60s:\n{}", log_text(log));
        }
    };
    let ready: serde_json::Value = match serde_json::from_str(&line) {
        Ok(ready) => ready,
        Err(e) => {
            // No line: stdout closed as it exited (a port taken); wait for that.
            let status = child.wait().expect("reaping ganache");
            std::thread::sleep(Duration::from_millis(100));
            return Err(format!(
                "exited with {status} (ready line {line:?}: {e}):\n{}",
                log_text(log)
            ));
        }
    };
    let port = ready["port"].as_u64().expect("a port") as u16;
    let accounts = ready["accounts"]
        .as_array()
        .expect("accounts")
        .iter()
        .map(|account| Account {
            address: account["address"]
                .as_str()
                .and_then(|a| a.parse().ok())
                .expect("an address"),
            key_hex: account["key"].as_str().expect("a key").to_string(),
        })
        .collect();
    wait_answering(port, &child, log);
    Ok((child, port, accounts))
}

/// Waits until ganache answers a JSON-RPC call over HTTP (it prints its line once it listens;
/// this proves the whole path).
fn wait_answering(port: u16, child: &Child, log: &Log) {
    use std::io::{Read, Write};
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"eth_blockNumber","params":[]}"#;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answered = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut stream| {
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(
                stream,
                "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer)?;
            Ok(answer.contains("\"result\""))
        });
        if answered.unwrap_or(false) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "ganache (pid {}) did not answer eth_blockNumber within 30s:\n{}",
            child.id(),
            log_text(log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
