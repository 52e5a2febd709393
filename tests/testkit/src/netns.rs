//! A second "host" for tests that cut a server off the network: a network namespace joined to
//! the test's by a veth pair, and the isolated run that keeps the machine's own network
//! namespace untouched.
//!
//! A test that needs it runs its whole scenario in a child process of its own network namespace
//! ([`run_isolated`]: the test binary again, under `unshare`, told by [`ISOLATED_ENV`] that it is
//! the inner run). Inside, [`PeerHost::create`] makes the namespace and the pair; a server
//! started there (`nsenter -t PID -n`, as [`crate::postgres::Cluster::start_primary_in`] does)
//! is reached at [`PeerHost::peer_ip`], and [`PeerHost::cut_off`] makes it silent: a blackhole
//! route in its namespace drops every packet it sends to the test's side, with no RST and no
//! ICMP error, as a pulled cable or a partition would. (No packet filter is needed: iptables, nft
//! and tc may be missing.)
//!
//! Needs root, `unshare` and `nsenter` (util-linux) and `ip` (iproute2). Without them the tests
//! fail and say what is missing; they never skip.

use std::io::Read;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// Set (to the test's name) in the environment of the inner run of [`run_isolated`].
pub const ISOLATED_ENV: &str = "LEDGER_TEST_ISOLATED_RUN";

/// Whether this process is the inner run of [`run_isolated`], in a network namespace of its
/// own.
pub fn is_isolated() -> bool {
    std::env::var_os(ISOLATED_ENV).is_some()
}

/// The tools the isolated runs need, and who may run them.
fn require_root_and_tools() {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push(
            "root (network namespaces and veth pairs need CAP_SYS_ADMIN and CAP_NET_ADMIN)"
                .to_string(),
        );
    }
    for tool in ["unshare", "nsenter", "ip"] {
        if find_in_path(tool).is_none() {
            missing.push(format!(
                "`{tool}` in PATH ({})",
                if tool == "ip" {
                    "iproute2"
                } else {
                    "util-linux"
                }
            ));
        }
    }
    assert!(
        missing.is_empty(),
        "this test cuts a server off in a network namespace and needs: {}. Missing: {}",
        "root, unshare, nsenter and ip",
        missing.join("; ")
    );
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

/// Runs the test `test` of this test binary again, alone, in new network, pid and mount
/// namespaces (`unshare --net --pid --fork --kill-child --mount-proc`; its `/proc` is its own),
/// with [`ISOLATED_ENV`] set: the test's body sees [`is_isolated`] and runs its scenario there.
/// Everything the inner run starts (servers, masters, the namespace holder) lives in its pid
/// namespace, so the kernel kills all of it when the run ends, however it ends; the run is
/// killed after `timeout`. Prints what the inner run printed (stdout and stderr, interleaved),
/// and fails unless it passed.
///
/// Fails, saying what is missing, when not root or without `unshare`, `nsenter` or `ip`.
pub fn run_isolated(test: &str, timeout: Duration) {
    assert!(
        !is_isolated(),
        "run_isolated is called by the outer run, not inside an isolated one"
    );
    require_root_and_tools();
    let exe = std::env::current_exe().expect("the test binary's path");
    let (mut reader, writer) = std::io::pipe().expect("a pipe");
    let mut command = Command::new("unshare");
    command
        .args([
            "--net",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            "--",
        ])
        .arg(&exe)
        .args([test, "--exact", "--nocapture", "--test-threads", "1"])
        .env(ISOLATED_ENV, test)
        .stdin(Stdio::null())
        .stdout(writer.try_clone().expect("a pipe"))
        .stderr(writer);
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("running unshare for the isolated run of {test}: {e}"));
    // Our copies of the pipe's writing end go with the command: the reader sees its end when
    // the inner run's processes are gone.
    drop(command);
    let output = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = reader.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    });
    let started = Instant::now();
    let status = wait_or_kill(&mut child, timeout);
    let output = output.join().expect("reading the isolated run's output");
    println!(
        "--- isolated run of {test} (own network namespace), {:.1} s ---\n{output}--- end of \
         the isolated run ---",
        started.elapsed().as_secs_f64()
    );
    match status {
        Some(status) => assert!(
            status.success(),
            "the isolated run of {test} failed ({status}): its output is above"
        ),
        None => panic!(
            "the isolated run of {test} did not end within {timeout:?} and was killed: its \
             output is above"
        ),
    }
}

/// Waits for `child` up to `timeout`; kills it (SIGKILL) after, and returns `None`.
fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("polling a child") {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `program args`, failing the test with what it printed unless it succeeds.
fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {program} {args:?}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The next /30 network of the pairs made by this process: 10.201.N.0/30.
static NEXT_NETWORK: AtomicU8 = AtomicU8::new(0);

/// A network namespace held open by a process of its own (`unshare -n sleep infinity`), joined
/// to the test's namespace by a veth pair: [`PeerHost::local_ip`] on the test's side,
/// [`PeerHost::peer_ip`] in the namespace. Its holder is killed on drop.
pub struct PeerHost {
    holder: Child,
    local: Ipv4Addr,
    peer: Ipv4Addr,
    cut: std::sync::atomic::AtomicBool,
}

impl PeerHost {
    /// Brings the test's loopback up (a new network namespace starts with it down), makes the
    /// namespace and the veth pair `vA<N>` (here, `10.201.N.1/30`) / `vB<N>` (there,
    /// `10.201.N.2/30`), both up. Only in the inner run of [`run_isolated`]: the machine's own
    /// namespace is never changed.
    pub fn create() -> PeerHost {
        assert!(
            is_isolated(),
            "PeerHost changes the network namespace it runs in: only in a run_isolated test"
        );
        require_root_and_tools();
        run("ip", &["link", "set", "lo", "up"]);
        let n = NEXT_NETWORK.fetch_add(1, Ordering::SeqCst);
        let local = Ipv4Addr::new(10, 201, n, 1);
        let peer = Ipv4Addr::new(10, 201, n, 2);
        let holder = Command::new("unshare")
            .args(["-n", "sleep", "infinity"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting `unshare -n sleep infinity`");
        let host = PeerHost {
            holder,
            local,
            peer,
            cut: Default::default(),
        };
        // unshare makes the namespace, then executes sleep: wait until the holder is in it.
        let ours = std::fs::read_link("/proc/self/ns/net").expect("our network namespace");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_link(format!("/proc/{}/ns/net", host.pid())).ok() == Some(ours.clone())
        {
            assert!(
                Instant::now() < deadline,
                "`unshare -n sleep infinity` made no network namespace within 10 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let pid = host.pid().to_string();
        let (a, b) = (format!("vA{n}"), format!("vB{n}"));
        run(
            "ip",
            &["link", "add", &a, "type", "veth", "peer", "name", &b],
        );
        run("ip", &["link", "set", &b, "netns", &pid]);
        run("ip", &["addr", "add", &format!("{local}/30"), "dev", &a]);
        run("ip", &["link", "set", &a, "up"]);
        host.ip(&["addr", "add", &format!("{peer}/30"), "dev", &b]);
        host.ip(&["link", "set", &b, "up"]);
        host.ip(&["link", "set", "lo", "up"]);
        host
    }

    /// `ip ARGS` in the namespace.
    fn ip(&self, args: &[&str]) {
        let pid = self.pid().to_string();
        let mut all = vec!["-t", &pid, "-n", "--", "ip"];
        all.extend_from_slice(args);
        run("nsenter", &all);
    }

    /// The pid of the process holding the namespace (`nsenter -t PID -n` enters it).
    pub fn pid(&self) -> i32 {
        self.holder.id() as i32
    }

    /// The address of the test's side of the pair.
    pub fn local_ip(&self) -> Ipv4Addr {
        self.local
    }

    /// The address of the namespace's side: where a server started there listens.
    pub fn peer_ip(&self) -> Ipv4Addr {
        self.peer
    }

    /// Cuts the namespace off: `ip route add blackhole LOCAL/32` in it. Every packet it sends
    /// to the test's side is dropped without a word (the test's side sees no RST, no ICMP
    /// error: its connections hang, its new connections get no SYN-ACK); what the test's side
    /// sends still arrives, and goes unanswered.
    pub fn cut_off(&self) {
        self.ip(&["route", "add", "blackhole", &format!("{}/32", self.local)]);
        self.cut.store(true, Ordering::SeqCst);
    }

    /// Undoes [`PeerHost::cut_off`].
    pub fn reconnect(&self) {
        self.ip(&["route", "del", "blackhole", &format!("{}/32", self.local)]);
        self.cut.store(false, Ordering::SeqCst);
    }

    /// Whether it is cut off now.
    pub fn is_cut_off(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }
}

impl Drop for PeerHost {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}
