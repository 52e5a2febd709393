//! A throwaway PostgreSQL server for the tests.
//!
//! `LEDGER_TEST_POSTGRES_URL` names an existing server (a URL to its `postgres` database, whose
//! user may create databases); otherwise the first test that asks starts a private cluster with
//! the server binaries installed on the machine, and it is stopped when the test process exits.
//! Without either, the tests fail: PostgreSQL tests never skip.
//!
//! [`PostgresServer::tls_only`] is another private cluster, for the tests of TLS to the database:
//! it takes TLS connections only, with a certificate signed by a test CA.
//!
//! For failover tests, [`Cluster::start_primary`] (or [`Cluster::start_primary_in`], in a network
//! namespace of its own) and [`Cluster::start_standby_of`] make a primary and a synchronous
//! standby; [`Cluster::freeze`], [`Cluster::kill9`] and [`crate::netns::PeerHost::cut_off`] take
//! the primary away, [`Cluster::promote`] promotes the standby.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};

use crate::netns::PeerHost;
use crate::tls::{CertFiles, TestPki};

/// A PostgreSQL server the tests may create databases on.
pub struct PostgresServer {
    /// `postgres://USER@HOST:PORT` without a database.
    base_url: String,
}

static SERVER: OnceLock<PostgresServer> = OnceLock::new();
static SHARED_CLUSTER: OnceLock<Cluster> = OnceLock::new();
static TLS_ONLY: OnceLock<TlsPostgres> = OnceLock::new();
static NEXT_DATABASE: AtomicU32 = AtomicU32::new(0);

impl PostgresServer {
    /// The server at `base_url` (`postgres://USER@HOST:PORT`, without a database; a trailing
    /// `/` is dropped), whose user may create databases.
    pub fn at(base_url: &str) -> PostgresServer {
        PostgresServer {
            base_url: base_url.trim_end_matches('/').to_string(),
        }
    }

    /// The server of this test process, started on first use.
    pub fn get() -> &'static PostgresServer {
        SERVER.get_or_init(|| match std::env::var("LEDGER_TEST_POSTGRES_URL") {
            Ok(url) if !url.is_empty() => {
                let base_url = url
                    .rsplit_once('/')
                    .filter(|(base, _)| base.contains("://") && !base.ends_with('/'))
                    .map(|(base, _)| base.to_string())
                    .unwrap_or(url);
                PostgresServer { base_url }
            }
            _ => start_cluster(),
        })
    }

    /// The private cluster of this test process that takes only TLS connections, started on
    /// first use and stopped when the process exits.
    pub fn tls_only() -> &'static TlsPostgres {
        TLS_ONLY.get_or_init(|| {
            let dir = tempfile::Builder::new()
                .prefix("ledger-pg-pki-")
                .tempdir()
                .expect("a temporary directory")
                .keep();
            let pki = TestPki::new(&dir);
            let other_dir = dir.join("other");
            std::fs::create_dir(&other_dir).unwrap();
            let other_ca = TestPki::new(&other_dir).ca;
            let client = pki.client(CERT_USER);
            // libpq (and the master's listening connection) refuse a key others may read.
            set_mode(&client.key, 0o600);
            let cluster = Cluster::start_with(false, Some(&pki));
            let tls = TlsPostgres {
                server: PostgresServer {
                    base_url: cluster.base_url.clone(),
                },
                port: cluster.port,
                ca: pki.ca.clone(),
                other_ca,
                client,
            };
            tls.server
                .admin(&format!("CREATE ROLE {CERT_USER} LOGIN SUPERUSER"));
            // It lives as long as the test process: stopped at exit.
            if TLS_CLUSTER.set(cluster).is_ok() {
                // SAFETY: registering a plain extern "C" function; it runs at process exit.
                unsafe { libc::atexit(stop_tls_cluster) };
            }
            tls
        })
    }

    /// The URL of the server's `postgres` database, for administration.
    pub fn admin_url(&self) -> String {
        format!("{}/postgres", self.base_url)
    }

    /// Runs `sql` on the `postgres` database.
    pub fn admin(&self, sql: &str) {
        let mut admin = PgConnection::establish(&self.admin_url()).unwrap_or_else(|e| {
            panic!(
                "connecting to the test PostgreSQL at {}: {e}",
                self.base_url
            )
        });
        admin
            .batch_execute(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// A new, empty database; returns its URL.
    pub fn create_database(&self) -> String {
        let name = format!(
            "ledger_test_{}_{}",
            std::process::id(),
            NEXT_DATABASE.fetch_add(1, Ordering::SeqCst)
        );
        let mut admin = PgConnection::establish(&format!("{}/postgres", self.base_url))
            .unwrap_or_else(|e| {
                panic!(
                    "connecting to the test PostgreSQL at {}: {e}",
                    self.base_url
                )
            });
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        format!("{}/{name}", self.base_url)
    }
}

fn server_bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("LEDGER_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    candidates.sort();
    candidates.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL tests need a server: no initdb under /usr/lib/postgresql/*/bin. Install \
             postgresql (apt-get install postgresql), set LEDGER_PG_BIN to its bin directory, or \
             set LEDGER_TEST_POSTGRES_URL to a running server"
        )
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a server binary, as the `postgres` user when we are root (initdb refuses root).
fn run(bin: &Path, args: &[&str]) {
    if let Err(e) = try_run(bin, args) {
        panic!("{e}");
    }
}

/// [`run`], returning what the binary printed when it fails.
fn try_run(bin: &Path, args: &[&str]) -> Result<(), String> {
    try_run_in(None, bin, args)
}

/// [`try_run`] in the network namespace of the process `netns` (`nsenter -t PID -n`) when it is
/// given: a postmaster started so listens and connects there.
fn try_run_in(netns: Option<i32>, bin: &Path, args: &[&str]) -> Result<(), String> {
    let mut line: Vec<std::ffi::OsString> = Vec::new();
    if let Some(pid) = netns {
        line.extend(["nsenter", "-t", &pid.to_string(), "-n", "--"].map(Into::into));
    }
    if is_root() {
        line.extend(["runuser", "-u", "postgres", "--"].map(Into::into));
    }
    line.push(bin.into());
    let mut command = Command::new(&line[0]);
    command.args(&line[1..]);
    let output = command
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{} {args:?} failed: {}\n{}",
        bin.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}

extern "C" fn stop_cluster() {
    if let Some(cluster) = SHARED_CLUSTER.get() {
        cluster.stop();
    }
}

static TLS_CLUSTER: OnceLock<Cluster> = OnceLock::new();

extern "C" fn stop_tls_cluster() {
    if let Some(cluster) = TLS_CLUSTER.get() {
        cluster.stop();
    }
}

/// The role of [`TlsPostgres`] that logs in with a client certificate (its common name).
pub const CERT_USER: &str = "ledger_cert";

/// A private cluster that takes only TLS connections on loopback (`hostssl` lines, every
/// `hostnossl` connection rejected): its certificate, for `localhost` and `127.0.0.1`, signed by
/// the test CA [`TlsPostgres::ca`]; SCRAM passwords (so channel binding is offered); and the role
/// [`CERT_USER`] authenticated by a client certificate signed by the same CA.
pub struct TlsPostgres {
    /// The server: URLs `postgres://ledger:PASSWORD@127.0.0.1:PORT/...`, with no `sslmode`
    /// (libpq's default, `prefer`, takes TLS).
    pub server: PostgresServer,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The CA that signed the server's certificate and [`TlsPostgres::client`] (PEM file).
    pub ca: PathBuf,
    /// A CA that signed nothing the server has, for the checks that must fail (PEM file).
    pub other_ca: PathBuf,
    /// [`CERT_USER`]'s client certificate and key (mode 0600).
    pub client: CertFiles,
}

impl TlsPostgres {
    /// The server's password of the role `ledger`, as the URLs carry it.
    pub fn password(&self) -> &str {
        let after_user = &self.server.base_url["postgres://ledger:".len()..];
        &after_user[..after_user.find('@').expect("a URL with a password")]
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// Gives `path` (recursively) to the `postgres` user when we are root: the server runs as it.
fn give_to_postgres(path: &Path) {
    if !is_root() {
        return;
    }
    let status = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(path)
        .status()
        .expect("chown");
    assert!(
        status.success(),
        "chown of {} to postgres failed",
        path.display()
    );
}

/// A private PostgreSQL cluster in a temporary directory, stopped and removed on drop.
pub struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    /// `postgres://ledger@HOST:PORT` (`postgres://ledger:PASSWORD@...` with TLS), without a
    /// database.
    pub base_url: String,
    /// The port it listens on (on [`Cluster::host`]).
    pub port: u16,
    /// The address it listens on: 127.0.0.1, or the address of its network namespace.
    host: String,
    /// The pid of a process in whose network namespace the postmaster runs (started with
    /// `nsenter`), if not the test's.
    netns: Option<i32>,
    /// The server options it was started with (port included), for [`Cluster::restart`].
    options: String,
    /// The processes [`Cluster::freeze`] stopped, killed rather than asked to stop at the end.
    frozen: std::sync::Mutex<Vec<i32>>,
}

/// What [`Cluster::make`] makes.
struct Setup<'a> {
    durable: bool,
    tls: Option<&'a TestPki>,
    /// The address to listen on.
    host: String,
    /// Start the postmaster in the network namespace of this process.
    netns: Option<i32>,
    /// More server options (`-c name=value ...`, quoted for `sh`: pg_ctl runs them through it).
    extra_options: String,
    /// Lines added to `pg_hba.conf`.
    hba: String,
    /// A standby of this cluster (its data a `pg_basebackup -R`) rather than a new cluster.
    standby_of: Option<&'a Cluster>,
}

impl Setup<'_> {
    fn plain(durable: bool) -> Setup<'static> {
        Setup {
            durable,
            tls: None,
            host: "127.0.0.1".into(),
            netns: None,
            extra_options: String::new(),
            hba: String::new(),
            standby_of: None,
        }
    }
}

/// The server options of a primary whose commits wait for a synchronous standby: any standby
/// that connects is one (the first to connect is the synchronous one). Given on the command
/// line, not in its files, so a standby made from its data does not inherit them: once promoted,
/// a standby commits on its own.
const SYNC_PRIMARY_OPTIONS: &str = " -c synchronous_standby_names='*' -c wal_level=replica \
                                    -c max_wal_senders=10";

impl Cluster {
    /// Starts a cluster with the server binaries installed on the machine. `durable` keeps
    /// fsync on (for measurements); tests run without it (throwaway data, faster).
    pub fn start(durable: bool) -> Cluster {
        Self::start_with(durable, None)
    }

    /// [`Cluster::start`]; with `tls`, the cluster takes only TLS connections over TCP, with a
    /// server certificate from `tls` and SCRAM passwords (see [`TlsPostgres`]).
    pub fn start_with(durable: bool, tls: Option<&TestPki>) -> Cluster {
        Self::make(Setup {
            tls,
            ..Setup::plain(durable)
        })
    }

    /// A primary on 127.0.0.1 for a synchronous standby ([`Cluster::start_standby_of`]):
    /// `synchronous_standby_names = '*'` (a commit waits until the standby has flushed it),
    /// replication connections allowed from loopback.
    pub fn start_primary(durable: bool) -> Cluster {
        Self::make(Setup {
            extra_options: SYNC_PRIMARY_OPTIONS.into(),
            ..Setup::plain(durable)
        })
    }

    /// [`Cluster::start_primary`] in the network namespace of `peer`, listening on its address
    /// ([`PeerHost::peer_ip`]) only: reached from the test's namespace over the veth pair, and
    /// cut off from it by [`PeerHost::cut_off`]. Connections (replication too) are allowed from
    /// the test's side of the pair.
    pub fn start_primary_in(peer: &PeerHost, durable: bool) -> Cluster {
        let local = peer.local_ip();
        Self::make(Setup {
            host: peer.peer_ip().to_string(),
            netns: Some(peer.pid()),
            extra_options: SYNC_PRIMARY_OPTIONS.into(),
            hba: format!("host all all {local}/32 trust\nhost replication all {local}/32 trust\n"),
            ..Setup::plain(durable)
        })
    }

    /// A standby of `primary` on 127.0.0.1 (in the test's network namespace), on a port of its
    /// own: its data is a `pg_basebackup -R -X stream` of the primary over TCP (from the
    /// primary's [`Cluster::host`]), so it streams the primary's WAL over TCP as a replica on
    /// another machine would, and serves read-only queries (hot standby) until
    /// [`Cluster::promote`]. Returns once it accepts connections; [`Cluster::wait_sync_standby`]
    /// on the primary waits until its commits wait for this standby.
    pub fn start_standby_of(primary: &Cluster) -> Cluster {
        Self::make(Setup {
            standby_of: Some(primary),
            ..Setup::plain(false)
        })
    }

    fn make(setup: Setup<'_>) -> Cluster {
        let bin = server_bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("ledger-pg-")
            .tempdir()
            .expect("a temporary directory")
            .keep();
        let password = format!("pw{:016x}", fastrand::u64(..));
        let pwfile = dir.join("password");
        std::fs::write(&pwfile, format!("{password}\n")).unwrap();
        give_to_postgres(&dir);
        let data = dir.join("data");
        let data_str = data.to_str().unwrap();
        let tls = setup.tls;
        if let Some(primary) = setup.standby_of {
            // The replication connection's parameters go into the standby's
            // `primary_conninfo` (-R), so it connects to the primary as this backup did.
            let conninfo = format!(
                "host={} port={} user=ledger application_name=standby",
                primary.host, primary.port
            );
            run(
                &bin.join("pg_basebackup"),
                &[
                    "-D",
                    data_str,
                    "-d",
                    &conninfo,
                    "-R",
                    "-X",
                    "stream",
                    "-c",
                    "fast",
                    "--no-sync",
                ],
            );
        } else {
            let mut initdb = vec![
                "-D",
                data_str,
                "-U",
                "ledger",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ];
            let pwfile_arg = format!("--pwfile={}", pwfile.display());
            if tls.is_some() {
                initdb.push(&pwfile_arg);
            }
            run(&bin.join("initdb"), &initdb);
        }
        if !setup.hba.is_empty() {
            let hba = data.join("pg_hba.conf");
            let mut text = std::fs::read_to_string(&hba).unwrap();
            text.push_str(&setup.hba);
            std::fs::write(&hba, text).unwrap();
        }
        // TLS: the server's certificate and key in its data directory (the key readable by the
        // server alone, or it refuses to start), the CA for client certificates, and
        // authentication rules that accept TCP connections only over TLS.
        let mut tls_options = String::new();
        if let Some(pki) = tls {
            let server = pki.server();
            std::fs::copy(&server.cert, data.join("server.crt")).unwrap();
            std::fs::copy(&server.key, data.join("server.key")).unwrap();
            std::fs::copy(&pki.ca, data.join("root.crt")).unwrap();
            set_mode(&data.join("server.key"), 0o600);
            std::fs::write(
                data.join("pg_hba.conf"),
                format!(
                    "local all all trust\n\
                     hostssl all {CERT_USER} 127.0.0.1/32 cert\n\
                     hostssl all all 127.0.0.1/32 scram-sha-256\n\
                     hostnossl all all 0.0.0.0/0 reject\n\
                     hostnossl all all ::/0 reject\n"
                ),
            )
            .unwrap();
            give_to_postgres(&data);
            tls_options = " -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key \
                            -c ssl_ca_file=root.crt"
                .into();
        }
        let _ = std::fs::remove_file(&pwfile);
        let fsync = if setup.durable { "on" } else { "off" };
        let log = dir.join("postgres.log");
        let mut cluster = Cluster {
            bin,
            dir,
            base_url: String::new(),
            port: 0,
            host: setup.host,
            netns: setup.netns,
            options: String::new(),
            frozen: Default::default(),
        };
        // PostgreSQL needs its port up front: one that was free a moment ago may be taken
        // before the server binds it, so a start that fails on the bind tries another port.
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            let port = free_port();
            let options = format!(
                "-p {port} -k {} -c listen_addresses={} -c fsync={fsync} -c max_connections=300{tls_options}{}",
                cluster.dir.display(),
                cluster.host,
                setup.extra_options,
            );
            let logged_before = std::fs::metadata(&log).map_or(0, |m| m.len() as usize);
            cluster.port = port;
            let host = &cluster.host;
            cluster.base_url = if tls.is_some() {
                format!("postgres://ledger:{password}@{host}:{port}")
            } else {
                format!("postgres://ledger@{host}:{port}")
            };
            let started = try_run_in(
                cluster.netns,
                &cluster.bin.join("pg_ctl"),
                &[
                    "-D",
                    data_str,
                    "-o",
                    &options,
                    "-l",
                    log.to_str().unwrap(),
                    "-w",
                    "start",
                ],
            );
            let Err(e) = started else {
                cluster.options = options;
                return cluster;
            };
            let logged = std::fs::read(&log).unwrap_or_default();
            let logged = String::from_utf8_lossy(logged.get(logged_before..).unwrap_or_default());
            if attempt == ATTEMPTS
                || !(logged.contains("could not bind") || logged.contains("already in use"))
            {
                panic!("{e}\n{logged}");
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Stops the server and removes its directory. A server frozen by [`Cluster::freeze`] (or
    /// whose postmaster is stopped otherwise) is killed instead, with SIGKILL: `pg_ctl stop`
    /// would wait for a postmaster that cannot answer.
    pub fn stop(&self) {
        let data = self.dir.join("data");
        let frozen = std::mem::take(&mut *self.frozen.lock().unwrap_or_else(|e| e.into_inner()));
        let postmaster = self.try_postmaster_pid();
        let stopped = postmaster.is_some_and(|pid| proc_stat(pid).is_some_and(|(s, _)| s == 'T'));
        if !frozen.is_empty() || stopped {
            // The postmaster first, then its children, listed while it is stopped (it forks
            // nothing); those freeze stopped too, should one have left it.
            let mut victims: Vec<i32> = postmaster.into_iter().collect();
            victims.extend(postmaster.map(children_of).unwrap_or_default());
            victims.extend(frozen);
            for &pid in &victims {
                // SAFETY: kill(2) on the server's processes, listed while they were stopped.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while victims.iter().any(|&pid| is_alive(pid)) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        } else if postmaster.is_some_and(is_alive) {
            // Not after a kill: pg_ctl would only say that nothing runs.
            if let Err(e) = try_run(
                &self.bin.join("pg_ctl"),
                &[
                    "-D",
                    data.to_str().unwrap(),
                    "-m",
                    "immediate",
                    "-t",
                    "30",
                    "-w",
                    "stop",
                ],
            ) {
                eprintln!(
                    "stopping the PostgreSQL cluster in {}: {e}",
                    self.dir.display()
                );
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// The address it listens on: 127.0.0.1, or [`PeerHost::peer_ip`] for a cluster of
    /// [`Cluster::start_primary_in`].
    pub fn host(&self) -> &str {
        &self.host
    }

    /// `HOST:PORT`, as a libpq multi-host URL lists it.
    pub fn host_port(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Waits (up to `timeout`) until this primary's `pg_stat_replication` shows a standby
    /// streaming with `sync_state = 'sync'`: from then on each commit waits for it. Blocking
    /// (from async code: `tokio::task::spawn_blocking`). Returns the standby's
    /// `application_name`.
    pub fn wait_sync_standby(&self, timeout: std::time::Duration) -> String {
        #[derive(diesel::QueryableByName, Debug)]
        struct Replica {
            #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
            application_name: Option<String>,
            #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
            state: Option<String>,
            #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
            sync_state: Option<String>,
        }
        let url = self.server().admin_url();
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let seen: Result<Vec<Replica>, String> = PgConnection::establish(&url)
                .map_err(|e| e.to_string())
                .and_then(|mut connection| {
                    diesel::RunQueryDsl::load(
                        diesel::sql_query(
                            "SELECT application_name, state, sync_state FROM pg_stat_replication",
                        ),
                        &mut connection,
                    )
                    .map_err(|e| e.to_string())
                });
            if let Some(standby) = seen.iter().flatten().find(|r| {
                r.state.as_deref() == Some("streaming") && r.sync_state.as_deref() == Some("sync")
            }) {
                return standby.application_name.clone().unwrap_or_default();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no synchronous standby streaming from {} within {timeout:?}: \
                 pg_stat_replication: {seen:?}",
                self.base_url
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Freezes the server as a hung host would be: SIGSTOP to the postmaster (first, so it
    /// starts no process while its children are listed, as [`Cluster::kill9`] does) and to
    /// every process it started. Its sockets stay open: the kernel still completes TCP
    /// handshakes into its listen backlog and takes the bytes clients send, but nothing answers.
    /// Returns once every one of them is stopped; the number frozen. [`Cluster::thaw`] lets them
    /// go on; dropped frozen, they are killed.
    pub fn freeze(&self) -> usize {
        let postmaster = self.postmaster_pid() as i32;
        // SAFETY: kill(2) on the pid its lock file names, which is alive (it answers queries).
        let stopped = unsafe { libc::kill(postmaster, libc::SIGSTOP) };
        assert_eq!(stopped, 0, "SIGSTOP of the postmaster {postmaster}");
        let mut frozen = vec![postmaster];
        frozen.extend(children_of(postmaster));
        for &pid in &frozen[1..] {
            // SAFETY: kill(2) on the postmaster's children, listed while it is stopped.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
        *self.frozen.lock().unwrap() = frozen.clone();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while let Some(&running) = frozen.iter().find(|&&pid| {
            proc_stat(pid).is_some_and(|(state, _)| !matches!(state, 'T' | 'Z' | 'X'))
        }) {
            assert!(
                std::time::Instant::now() < deadline,
                "PostgreSQL process {running} not stopped 10s after SIGSTOP"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        frozen.len()
    }

    /// Lets a server frozen by [`Cluster::freeze`] go on (SIGCONT to each of its processes).
    pub fn thaw(&self) {
        let frozen = std::mem::take(&mut *self.frozen.lock().unwrap());
        for &pid in frozen.iter().rev() {
            // SAFETY: kill(2) on the processes freeze stopped (their parent was stopped too, so
            // none was reaped and its pid reused meanwhile).
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }

    /// Promotes a standby (`pg_ctl promote -w`): returns once it has left recovery and takes
    /// writes.
    pub fn promote(&self) {
        let data = self.dir.join("data");
        run(
            &self.bin.join("pg_ctl"),
            &["-D", data.to_str().unwrap(), "-w", "-t", "60", "promote"],
        );
    }

    /// The server's log so far (`postgres.log` in its directory), for a test that fails.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.dir.join("postgres.log")).unwrap_or_default())
            .into_owned()
    }
}

impl Cluster {
    /// A [`PostgresServer`] for this cluster: databases created on it live in this cluster.
    pub fn server(&self) -> PostgresServer {
        PostgresServer {
            base_url: self.base_url.clone(),
        }
    }

    /// The pid in `postmaster.pid`, if there is one.
    fn try_postmaster_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.dir.join("data").join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// The pid of the running postmaster (the first line of its `postmaster.pid`).
    pub fn postmaster_pid(&self) -> u32 {
        let pid_file = self.dir.join("data").join("postmaster.pid");
        let text = std::fs::read_to_string(&pid_file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", pid_file.display()));
        text.lines()
            .next()
            .and_then(|line| line.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid in {}: {text:?}", pid_file.display()))
    }

    /// The server's processes now: the postmaster and every process it started (WAL writer,
    /// checkpointer, background writer, backends, ...), for a benchmark that counts what the
    /// whole server does (`/proc/PID/io`, `/proc/PID/stat`). Backends come and go with
    /// connections, so this is a snapshot.
    pub fn processes(&self) -> Vec<u32> {
        let postmaster = self.postmaster_pid();
        let mut pids: Vec<u32> = children_of(postmaster as i32)
            .into_iter()
            .map(|pid| pid as u32)
            .collect();
        pids.push(postmaster);
        pids
    }

    /// Kills the server as a crash does: SIGKILL to the postmaster and to every process it
    /// started (backends, checkpointer, WAL writer, ...), so nothing is flushed or checkpointed
    /// on the way out. The data directory stays as the crash left it: [`Cluster::restart`]
    /// recovers it from the WAL. Returns once every one of them is gone; the number killed.
    pub fn kill9(&self) -> usize {
        let postmaster = self.postmaster_pid() as i32;
        // Stopped first, so that it starts no process while its children are listed.
        // SAFETY: kill(2) on the pid its lock file names, which is alive (it answers queries).
        let stopped = unsafe { libc::kill(postmaster, libc::SIGSTOP) };
        assert_eq!(stopped, 0, "SIGSTOP of the postmaster {postmaster}");
        let mut victims = children_of(postmaster);
        victims.push(postmaster);
        for &pid in &victims {
            // SAFETY: kill(2) on the postmaster and its children, listed while it is stopped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // Frozen or not before, they are gone now.
        self.frozen.lock().unwrap().clear();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while victims.iter().any(|&pid| is_alive(pid)) {
            assert!(
                std::time::Instant::now() < deadline,
                "PostgreSQL processes {victims:?} still alive 30s after SIGKILL"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        victims.len()
    }

    /// Starts the server again on the same data directory, port and options (after
    /// [`Cluster::kill9`]); returns once it accepts connections, crash recovery done.
    pub fn restart(&self) {
        let data = self.dir.join("data");
        let log = self.dir.join("postgres.log");
        // A postmaster that died without being reaped (as a zombie) would still hold the lock
        // file's pid: it is dead, so the lock file is stale.
        let pid_file = data.join("postmaster.pid");
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse::<i32>().ok())
            && !is_alive(pid)
            && std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_file(&pid_file);
        }
        let started = try_run_in(
            self.netns,
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &self.options,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ],
        );
        if let Err(e) = started {
            panic!("{e}");
        }
    }
}

/// The pids whose parent is `parent` (from `/proc/PID/stat`).
fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| proc_stat(pid).is_some_and(|(_, ppid)| ppid == parent))
        .collect()
}

/// The state letter and parent pid of `pid`, from `/proc/PID/stat` (`None` when it is gone).
fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses, so after the last ')'.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Whether `pid` runs (a zombie, dead but not reaped, does not).
fn is_alive(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn start_cluster() -> PostgresServer {
    let cluster = Cluster::start(false);
    let base_url = cluster.base_url.clone();
    // The shared cluster lives as long as the test process: stopped at exit.
    if SHARED_CLUSTER.set(cluster).is_ok() {
        // SAFETY: registering a plain extern "C" function; it runs at process exit.
        unsafe { libc::atexit(stop_cluster) };
    }
    PostgresServer { base_url }
}

/// A loopback port that was free a moment ago: PostgreSQL must be given its port up front (it
/// does not report one it picked), so the start retries when another process took it first.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}
