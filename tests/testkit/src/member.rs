//! The real `member` binary as a child process: the daemon following masters, and its operator
//! commands.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::process::{Log, RESTART_MARK, binary, capture, signal, wait_for};
use crate::within;

/// A running `member` daemon.
pub struct Member {
    child: Option<Child>,
    /// Its working directory.
    pub dir: PathBuf,
    /// Its ledger file, `dir/blockchain.json`.
    pub file: PathBuf,
    args: Vec<String>,
    /// Environment variables set for every run, after the default `LEDGER_LOG=info`.
    env: Vec<(String, String)>,
    log: Log,
}

impl Member {
    /// Starts `member` in `dir` with the ledger file `dir/blockchain.json`, following
    /// `masters` (HOST:PORT, in order), with `args` added.
    pub fn start(dir: &Path, masters: &[String], args: &[&str]) -> Member {
        Self::start_with_env(dir, masters, args, &[])
    }

    /// [`Member::start`] with environment variables (`LEDGER_LOG=warn` for a quiet member).
    pub fn start_with_env(
        dir: &Path,
        masters: &[String],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Member {
        let file = dir.join("blockchain.json");
        let mut all = vec!["--ledger-file".to_string(), file.display().to_string()];
        for master in masters {
            all.push("--master".into());
            all.push(master.clone());
        }
        all.extend(args.iter().map(|a| a.to_string()));
        let mut member = Member {
            child: None,
            dir: dir.to_path_buf(),
            file,
            args: all,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log: Arc::default(),
        };
        member.spawn();
        member
    }

    fn spawn(&mut self) {
        let mut child = Command::new(binary("member"))
            .current_dir(&self.dir)
            .args(&self.args)
            .env_remove("LEDGER_MASTER")
            .env_remove("LEDGER_FILE")
            .env("LEDGER_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting member");
        capture(&mut child, &self.log, None);
        self.child = Some(child);
    }

    /// Starts a new process with the same directory and arguments (after a kill); its logs are
    /// added after the previous run's.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart after kill9 or terminate");
        self.log.lock().unwrap().push(RESTART_MARK.to_string());
        self.spawn();
    }

    /// The process id of the current run.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("member is running").id()
    }

    /// The one TCP port the current run listens on, read from `/proc` (up to 30 s): for a
    /// member started with `--metrics-addr 127.0.0.1:0` whose log does not say it (a quiet
    /// `LEDGER_LOG=warn` one). The kernel picks the port when the member binds, so no other
    /// process can take it first.
    pub fn listening_port(&mut self) -> u16 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match crate::metrics::listening_ports(self.pid())[..] {
                [port] => return port,
                [] => {}
                ref many => panic!("member listens on several ports {many:?}:\n{}", self.logs()),
            }
            let child = self.child.as_mut().expect("member is running");
            if let Some(status) = child.try_wait().expect("polling member") {
                panic!("member exited with {status}:\n{}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "member did not listen within 30s:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the process with SIGKILL: no chance to finish anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill -9 member");
            child.wait().expect("reaping member");
        }
    }

    /// Kills the process with SIGKILL as soon as `moment` holds, to hit a short phase of its
    /// work (a snapshot being received, a rewrite): `moment` is polled every 100 µs or so, for
    /// up to `timeout`. Returns whether it killed; when the moment never came, the process runs
    /// on. Blocks the calling thread (from async code: `tokio::task::block_in_place`).
    pub fn kill9_when(&mut self, timeout: Duration, mut moment: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if moment() {
                self.kill9();
                return true;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        false
    }

    /// Sends SIGTERM and waits (up to 30 s) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("member is running");
        signal(&child, libc::SIGTERM);
        wait_for(
            &mut child,
            Duration::from_secs(30),
            "member after SIGTERM",
            &self.log,
        )
    }

    /// Everything the process logged so far, over all its runs.
    pub fn logs(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// What the current run logged so far.
    pub fn run_logs(&self) -> String {
        crate::process::run_logs(&self.log)
    }

    /// Waits until the current run logged a line containing `needle`.
    pub async fn wait_for_log(&self, seconds: u64, needle: &str) {
        let what = format!("member to log {needle:?}");
        wait_until(seconds, &what, || async {
            self.run_logs().contains(needle)
        })
        .await;
    }

    /// The loopback port of the current run's metrics endpoint, read from its log (up to 60 s):
    /// start it with `--metrics-addr 127.0.0.1:0` so the kernel picks a port nobody holds.
    pub async fn metrics_port(&self) -> u16 {
        wait_until(60, "member to log its metrics address", || async {
            crate::metrics::logged_metrics_addr(&self.run_logs()).is_some()
        })
        .await;
        crate::metrics::logged_metrics_addr(&self.run_logs())
            .expect("the logged metrics address")
            .port()
    }

    /// The ledger file's bytes (empty when it does not exist).
    pub fn file_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.file).unwrap_or_default()
    }

    /// The md5 hex of the ledger file; `None` when it does not exist.
    pub fn file_md5(&self) -> Option<String> {
        file_md5(&self.file)
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "--- member log ({}) ---\n{}\n---",
                self.dir.display(),
                self.logs()
            );
        }
    }
}

/// The outcome of one `member` operator command.
#[derive(Debug)]
pub struct CommandOutput {
    /// The exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// What it printed on stdout.
    pub stdout: String,
    /// What it printed on stderr.
    pub stderr: String,
}

/// Runs `member ARGS` (an operator command) with `stdin`, failing the test after 60 s.
pub async fn member_command(args: &[&str], stdin: Option<&str>) -> CommandOutput {
    member_command_with_env(args, &[], stdin).await
}

/// Runs `member ARGS` with the environment variables `env` added (`LEDGER_MASTER` and
/// `LEDGER_FILE` are unset otherwise).
pub async fn member_command_with_env(
    args: &[&str],
    env: &[(&str, &str)],
    stdin: Option<&str>,
) -> CommandOutput {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(binary("member"))
        .args(args)
        .env_remove("LEDGER_MASTER")
        .env_remove("LEDGER_FILE")
        .env("LEDGER_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting a member command");
    if let Some(text) = stdin {
        let mut input = child.stdin.take().expect("piped stdin");
        input
            .write_all(text.as_bytes())
            .await
            .expect("writing stdin");
        // Dropping it closes stdin: the command reads to its end.
    }
    let what = format!("member {}", args.join(" "));
    let output = within(60, &what, child.wait_with_output())
        .await
        .expect("waiting for a member command");
    CommandOutput {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Polls `check` every 50 ms until it holds, failing the test after `seconds`.
pub async fn wait_until<F, Fut>(seconds: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    within(seconds, what, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// The md5 hex of a file's content (the ledger's digest when it is a `blockchain.json`), if it
/// can be read.
pub fn file_md5(path: &Path) -> Option<String> {
    let mut file = std::fs::File::open(path).ok()?;
    let mut digest = ledger_anylog::digest::LedgerDigest::new();
    std::io::copy(&mut file, &mut digest).ok()?;
    Some(digest.hex())
}

/// The seq a member recorded beside its ledger file, if the record can be read.
pub fn applied_seq(file: &Path) -> Option<u64> {
    ledger_member::state::SyncState::load(&ledger_member::paths::LedgerPaths::new(file))
        .ok()
        .flatten()
        .map(|state| state.seq)
}

/// Waits (up to `seconds`) until `file` is the ledger the master (or relay) at `client` holds:
/// its md5 equal to `GetLedgerInfo.digest`, and the seq recorded beside it equal to the head.
pub async fn wait_converged(client: &crate::client::Client, file: &Path, seconds: u64) {
    let what = format!("{} to equal the master's ledger", file.display());
    wait_until(seconds, &what, || {
        let mut client = client.clone();
        async move {
            let Ok(info) = client
                .get_ledger_info(ledger_proto::pb::GetLedgerInfoRequest {})
                .await
            else {
                return false;
            };
            let info = info.into_inner();
            file_md5(file) == Some(info.digest) && applied_seq(file) == Some(info.head_seq)
        }
    })
    .await;
}

/// Reads a ledger file as AnyLog does, with Python's `json.loads` line by line, failing the
/// test unless every line is a complete JSON object with one key (the policy's type) whose value
/// holds a string `id`, and the file ends with a line break. Returns the ids in file order.
pub async fn python_ledger_ids(file: &Path) -> Vec<String> {
    const SCRIPT: &str = r#"
import json, sys
data = open(sys.argv[1], "rb").read()
assert data == b"" or data.endswith(b"\n"), "the file does not end with a line break"
for number, line in enumerate(data.split(b"\n")[:-1], 1):
    policy = json.loads(line.decode("utf-8"))
    assert isinstance(policy, dict) and len(policy) == 1, "line %d is not one policy" % number
    (body,) = policy.values()
    assert isinstance(body, dict) and isinstance(body.get("id"), str), "line %d has no id" % number
    print(body["id"])
"#;
    let output = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg(file)
        .kill_on_drop(true)
        .output();
    let output = within(60, "python3 reading the ledger file", output)
        .await
        .expect("running python3");
    assert!(
        output.status.success(),
        "python3 could not read {} as a ledger: {}",
        file.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("ids in UTF-8")
        .lines()
        .map(str::to_string)
        .collect()
}
