//! The master's command line; every flag has an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use ledger_client::follow::FollowOptions;
use ledger_client::masters::{ClientOptions, MasterAddr, TlsFiles};
use ledger_client::report::Identity;
use ledger_ops::logging::LogFormat;
use ledger_storage::DatabaseUrl;

/// The Ledger master: stores the network's policies and streams every change to the members.
#[derive(Debug, Clone, Parser)]
#[command(name = "master", version, about, long_about = None)]
pub struct Config {
    /// The internal address and port. The master listens on every interface at this port, or on
    /// this address only with --bind (AnyLog's internal_ip / internal_port).
    #[arg(long, env = "LEDGER_LISTEN", default_value = "0.0.0.0:32048")]
    pub listen: SocketAddr,

    /// The address other nodes reach this master at, advertised in its `master` policy
    /// (AnyLog's external_ip / external_port). Defaults to the internal address.
    #[arg(long, env = "LEDGER_EXTERNAL_ADDR")]
    pub external_addr: Option<SocketAddr>,

    /// Listen on the internal address only instead of on every interface (AnyLog's bind).
    #[arg(long, env = "LEDGER_BIND")]
    pub bind: bool,

    /// Where the ledger is stored: sqlite://PATH or postgres://USER:PASSWORD@HOST:PORT/DATABASE.
    #[arg(
        long,
        env = "LEDGER_DATABASE_URL",
        default_value = "sqlite://blockchain.db",
        value_parser = DatabaseUrl::clap_parser()
    )]
    pub database_url: DatabaseUrl,

    /// Worker threads of the runtime (AnyLog's threads); defaults to the number of cores.
    #[arg(long, env = "LEDGER_THREADS")]
    pub threads: Option<usize>,

    /// How long a stream may stay quiet before the master sends a `progress` message.
    #[arg(long, env = "LEDGER_PROGRESS_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub progress_interval: Duration,

    /// Serve HTTP on ADDR (off unless given): the web console at http://ADDR/ (read-only; with
    /// --auth-file it needs a reader's token), Prometheus metrics at /metrics and `OK` at
    /// /health. With port 0 a free port is picked, and the address bound is logged as
    /// `metrics on http://ADDR/metrics`.
    #[arg(long, env = "LEDGER_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,

    /// The former name of --http-addr, still accepted (--http-addr wins when both are given).
    #[arg(long, env = "LEDGER_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Log filter, as RUST_LOG: a level (info, debug) or per-module directives.
    #[arg(long, env = "LEDGER_LOG", default_value = "info")]
    pub log_level: String,

    /// Log format: human-readable text, or one JSON object a line for collectors.
    #[arg(long, env = "LEDGER_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// A TOML file of settings named like the flags (`database-url = "sqlite://x.db"`);
    /// flags and environment variables win over it.
    #[arg(long, env = "LEDGER_CONFIG")]
    pub config: Option<std::path::PathBuf>,

    /// How many changes a subscriber may fall behind the live feed before it is disconnected
    /// with RESOURCE_EXHAUSTED (it then resumes from its seq).
    #[arg(long, env = "LEDGER_SUBSCRIBER_BUFFER", default_value_t = 4096)]
    pub subscriber_buffer: usize,

    /// The most bytes of recent changes kept in memory for subscribers that lag (about twice
    /// the policies' text): a subscriber that needs an older one reads it from the database.
    #[arg(long, env = "LEDGER_SUBSCRIBER_BUFFER_BYTES", default_value_t = ledger_server::feed::DEFAULT_KEPT_BYTES)]
    pub subscriber_buffer_bytes: usize,

    /// The most inserts and deletes committed together in one transaction.
    #[arg(long, env = "LEDGER_MAX_BATCH", default_value_t = 1024)]
    pub max_batch: usize,

    /// Keep this many recent changes replayable; a member further behind gets a snapshot.
    /// By default every change is kept.
    #[arg(long, env = "LEDGER_CHANGE_RETENTION")]
    pub change_retention: Option<u64>,

    /// The most database connections the master opens.
    #[arg(long, env = "LEDGER_DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: u32,

    /// How long a call waits for a database connection before it is answered UNAVAILABLE.
    #[arg(long, env = "LEDGER_DB_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub db_timeout: Duration,

    /// How long a write transaction may wait for the database before it is cut off and answered
    /// UNAVAILABLE. Such a write may have been committed: a retry then
    /// answers ALREADY_EXISTS. PostgreSQL over TCP: a frozen or cut-off server would otherwise
    /// hold every write for good.
    #[arg(long, env = "LEDGER_WRITE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub write_timeout: Duration,

    /// How long one read statement may wait for the database before it is cut off (a snapshot's
    /// pages each get this long; waiting for a slow reader does not count).
    #[arg(long, env = "LEDGER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub read_timeout: Duration,

    /// How often the master checks that its database answers; when it does not, the master
    /// reports NOT_SERVING and ends its streams until it answers again.
    #[arg(long, env = "LEDGER_DB_CHECK_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub db_check_interval: Duration,

    /// PostgreSQL: how often the master reads the changes other masters committed even without
    /// a notification (a fallback for a lost one, or for a master that cannot listen;
    /// notifications are the main path). It runs whether the master listens or not.
    #[arg(long, env = "LEDGER_NOTIFY_FALLBACK", default_value = "10s", value_parser = humantime::parse_duration)]
    pub notify_fallback: Duration,

    /// On SIGTERM, how long in-flight calls may take before the master exits anyway.
    #[arg(long, env = "LEDGER_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// TLS: the server certificate chain (PEM). With --tls-key, the master speaks only TLS.
    #[arg(long, env = "LEDGER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// TLS: the server's private key (PEM).
    #[arg(long, env = "LEDGER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// mTLS: clients must present a certificate signed by this CA (PEM); its common name can
    /// carry a role (see --auth-file).
    #[arg(long, env = "LEDGER_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// mTLS: accept clients without a certificate too (they then need a token).
    #[arg(long, env = "LEDGER_TLS_CLIENT_OPTIONAL", requires = "tls_client_ca")]
    pub tls_client_optional: bool,

    /// Who may call: a TOML file of `[[token]]` (name, role, sha256 of the token) and
    /// `[[subject]]` (cn of a client certificate, role) entries. Without it anyone may write.
    #[arg(long, env = "LEDGER_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,

    /// The largest policy accepted, in bytes of JSON text.
    #[arg(long, env = "LEDGER_MAX_POLICY_BYTES", default_value_t = 1 << 20)]
    pub max_policy_bytes: usize,

    /// The deepest nesting of objects and arrays accepted in a policy.
    #[arg(long, env = "LEDGER_MAX_POLICY_DEPTH", default_value_t = 64, value_parser = clap::value_parser!(u16).range(2..=120))]
    pub max_policy_depth: u16,

    /// The largest gRPC message accepted, in bytes.
    #[arg(long, env = "LEDGER_MAX_MESSAGE_BYTES", default_value_t = 4 << 20)]
    pub max_message_bytes: usize,

    /// The most streams open at once.
    #[arg(long, env = "LEDGER_MAX_STREAMS", default_value_t = 10_000)]
    pub max_streams: usize,

    /// HTTP/2: the most streams one connection may have open at once (advertised to clients).
    #[arg(long, env = "LEDGER_MAX_CONCURRENT_STREAMS", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,

    /// HTTP/2: how many streams the master may reset for a client's protocol errors before it
    /// ends that client's connection (a cap against the "MadeYouReset" attack).
    #[arg(long, env = "LEDGER_MAX_LOCAL_RESET_STREAMS", default_value_t = 1024)]
    pub max_local_reset_streams: usize,

    /// The most snapshots read at once. Each holds a database connection while its client reads
    /// it: keep it below --db-pool-size. Further ones wait for a turn.
    #[arg(long, env = "LEDGER_MAX_SNAPSHOTS", default_value_t = ledger_server::limits::DEFAULT_MAX_SNAPSHOTS)]
    pub max_snapshots: usize,

    /// The most snapshots read at once for one client address (an IPv6 client: its /64).
    #[arg(long, env = "LEDGER_MAX_SNAPSHOTS_PER_CLIENT", default_value_t = ledger_server::limits::DEFAULT_MAX_SNAPSHOTS_PER_CLIENT)]
    pub max_snapshots_per_client: usize,

    /// How long a snapshot waits for its client to read the next page before it is ended
    /// (RESOURCE_EXHAUSTED) and its database connection freed.
    #[arg(long, env = "LEDGER_SNAPSHOT_STALL_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub snapshot_stall_timeout: Duration,

    /// The most streams open at once from one client address (an IPv6 client: its /64).
    #[arg(long, env = "LEDGER_MAX_STREAMS_PER_CLIENT", default_value_t = 64)]
    pub max_streams_per_client: usize,

    /// HTTP/2 keepalive: ping an idle connection this often, so that NATs keep long idle streams.
    #[arg(long, env = "LEDGER_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Duration,

    /// HTTP/2 keepalive: drop a connection whose ping is not answered within this.
    #[arg(long, env = "LEDGER_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Duration,

    /// Insert this master's own `master` policy at start unless it exists (AnyLog's step 5).
    /// Not on a relay, whose writes are its callers'.
    #[arg(long, env = "LEDGER_REGISTER", conflicts_with = "upstreams")]
    pub register: bool,

    /// The `name` of the master policy.
    #[arg(long, env = "LEDGER_NAME", default_value = "master-node")]
    pub name: String,

    /// The `company` of the master policy.
    #[arg(long, env = "LEDGER_COMPANY", default_value = "My Company")]
    pub company: String,

    /// The `rest_port` of the master policy.
    #[arg(long, env = "LEDGER_REST_PORT", default_value_t = 32049)]
    pub rest_port: u16,

    /// Where EdgeLake/AnyLog nodes reach this master in their own TCP protocol: `shared` (on the
    /// --listen port, beside gRPC, told apart by each connection's first bytes), an address of
    /// its own (port 0 picks a free one, logged as `anylog on ADDR`), or `off`.
    #[arg(long, env = "LEDGER_ANYLOG_LISTEN", default_value = "shared")]
    pub anylog_listen: AnyLogListen,

    /// Which networks may insert and delete through the AnyLog protocol, which has no
    /// authentication: `any`, `none`, or addresses and CIDR networks separated by commas
    /// (`10.0.0.0/8,127.0.0.1`). Default: `any`, or `none` when --auth-file is given.
    #[arg(long, env = "LEDGER_ANYLOG_WRITE_FROM")]
    pub anylog_write_from: Option<WriteFrom>,

    /// How long an AnyLog node may take to send one 2048-byte block, or to take one.
    #[arg(long, env = "LEDGER_ANYLOG_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub anylog_timeout: Duration,

    /// The most AnyLog connections served at once (each carries one message); more wait.
    #[arg(long, env = "LEDGER_ANYLOG_MAX_CONNECTIONS", default_value_t = 512)]
    pub anylog_max_connections: usize,

    /// Makes this master a relay of the master (or relay) at ADDR, HOST:PORT: its database
    /// becomes a copy of the upstream's ledger with the upstream's seqs, served with every
    /// feature of a master; writes are forwarded upstream with the caller's credentials. Repeat
    /// the flag (or separate with commas in LEDGER_UPSTREAM) for several: the first that
    /// answers is followed, the next when it fails.
    #[arg(
        long = "upstream",
        env = "LEDGER_UPSTREAM",
        value_name = "ADDR",
        value_delimiter = ',',
        value_parser = MasterAddr::parse
    )]
    pub upstreams: Vec<MasterAddr>,

    /// Relay: the CA (PEM) that signed the upstream's certificate; the relay connects with TLS
    /// (https) when it is given.
    #[arg(
        long,
        env = "LEDGER_UPSTREAM_TLS_CA",
        value_name = "PEM",
        requires = "upstreams"
    )]
    pub upstream_tls_ca: Option<PathBuf>,

    /// Relay: its client certificate chain (PEM) for mTLS to the upstream, with
    /// --upstream-tls-key. It is the relay's identity upstream: writes are not forwarded with
    /// it (see --upstream-write-as-self).
    #[arg(
        long,
        env = "LEDGER_UPSTREAM_TLS_CERT",
        value_name = "PEM",
        requires_all = ["upstream_tls_key", "upstream_tls_ca"]
    )]
    pub upstream_tls_cert: Option<PathBuf>,

    /// Relay: the private key (PEM) of --upstream-tls-cert.
    #[arg(
        long,
        env = "LEDGER_UPSTREAM_TLS_KEY",
        value_name = "PEM",
        requires = "upstream_tls_cert"
    )]
    pub upstream_tls_key: Option<PathBuf>,

    /// Relay: the name the upstream's certificate must hold; by default the host of its address.
    #[arg(
        long,
        env = "LEDGER_UPSTREAM_TLS_DOMAIN",
        value_name = "NAME",
        requires = "upstream_tls_ca"
    )]
    pub upstream_tls_domain: Option<String>,

    /// Relay: a bearer token the relay streams from its upstream with (`authorization: Bearer
    /// TOKEN`). Writes are forwarded with their callers' tokens, not this one (see
    /// --upstream-write-as-self). Prefer the environment variable; never logged.
    #[arg(
        long,
        env = "LEDGER_UPSTREAM_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        requires = "upstreams"
    )]
    pub upstream_token: Option<String>,

    /// Relay: how long connecting to the upstream, subscribing, or one forwarded write may take.
    #[arg(long, env = "LEDGER_UPSTREAM_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub upstream_timeout: Duration,

    /// Relay: the first delay before reconnecting to an upstream; it doubles after each failure.
    #[arg(long, env = "LEDGER_UPSTREAM_RETRY_MIN", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub upstream_retry_min: Duration,

    /// Relay: the longest delay between reconnection attempts.
    #[arg(long, env = "LEDGER_UPSTREAM_RETRY_MAX", default_value = "30s", value_parser = humantime::parse_duration)]
    pub upstream_retry_max: Duration,

    /// Relay: forward the writes of callers without a bearer token (a client certificate
    /// alone, an AnyLog node, anyone when the relay has no auth file) with the relay's own
    /// credentials (its --upstream-token, its --upstream-tls-cert). A RISK: every caller the
    /// relay lets write then writes with the relay's role upstream. Without it such writes are
    /// refused (PERMISSION_DENIED) when the relay has credentials of its own upstream.
    #[arg(long, env = "LEDGER_UPSTREAM_WRITE_AS_SELF", requires = "upstreams")]
    pub upstream_write_as_self: bool,

    /// Relay: the node name it subscribes upstream with, which the upstream lists (its
    /// ListSubscribers, the `via` of the members below); by default the host name.
    #[arg(long, env = "LEDGER_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,

    /// An Ethereum node's JSON-RPC URL (http://HOST:PORT). Its presence makes a contract on that
    /// chain (--ethereum-contract) the ledger's source of truth: the master follows it into its
    /// database, its local copy, which members stream from; writes become transactions.
    #[arg(
        long,
        env = "LEDGER_ETHEREUM_RPC",
        requires = "ethereum_contract",
        conflicts_with = "upstreams"
    )]
    pub ethereum_rpc: Option<String>,

    /// The address of the ledger's contract (0x and 40 hex digits), EdgeLake's ABI.
    #[arg(long, env = "LEDGER_ETHEREUM_CONTRACT", requires = "ethereum_rpc")]
    pub ethereum_contract: Option<String>,

    /// A file holding the hex private key that signs the master's writes (with or without 0x;
    /// surrounding whitespace ignored). Without it, writes are refused (FAILED_PRECONDITION).
    #[arg(long, env = "LEDGER_ETHEREUM_KEY_FILE", requires = "ethereum_rpc")]
    pub ethereum_key_file: Option<PathBuf>,

    /// The chain's id, for signing; by default asked from the node.
    #[arg(long, env = "LEDGER_ETHEREUM_CHAIN_ID", requires = "ethereum_rpc")]
    pub ethereum_chain_id: Option<u64>,

    /// Follow the block this many below the node's head. 0 follows the head as the node reports
    /// it (on Optimism, the unsafe head): the fastest, and a reorg is only the next poll's diff
    /// (what vanished is deleted). A K > 0 keeps reorgs shorter than K blocks away from the
    /// members, and a write is answered K blocks later.
    #[arg(
        long,
        env = "LEDGER_ETHEREUM_CONFIRMATIONS",
        default_value_t = 0,
        requires = "ethereum_rpc"
    )]
    pub ethereum_confirmations: u64,

    /// How often the contract's state is read.
    #[arg(long, env = "LEDGER_ETHEREUM_POLL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub ethereum_poll: Duration,

    /// The longest completed policy written to the contract, in bytes. Its gas grows with its
    /// size: ~1,400 per byte on EdgeLake's contract (the text is stored twice; 16 KiB needs ~23 M
    /// gas, within a 30 M gas block), ~710 on PolicyLedger.
    #[arg(long, env = "LEDGER_ETHEREUM_MAX_POLICY_BYTES", default_value_t = 16 * 1024)]
    pub ethereum_max_policy_bytes: usize,

    /// How long a write waits for its transaction's receipt and for the master to apply it;
    /// past it, UNAVAILABLE (CHAIN_PENDING) with the transaction's hash: it may still take effect.
    #[arg(long, env = "LEDGER_ETHEREUM_WRITE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub ethereum_write_timeout: Duration,
}

/// Where the AnyLog protocol is served (`--anylog-listen`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnyLogListen {
    /// On the gRPC port.
    Shared,
    /// On a port of its own.
    Own(SocketAddr),
    /// Not at all.
    Off,
}

impl std::str::FromStr for AnyLogListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "shared" => Ok(AnyLogListen::Shared),
            "off" => Ok(AnyLogListen::Off),
            addr => addr.parse().map(AnyLogListen::Own).map_err(|_| {
                format!("{addr:?} is not `shared`, `off` or an address such as 0.0.0.0:32148")
            }),
        }
    }
}

/// Who may write through the AnyLog protocol (`--anylog-write-from`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteFrom {
    /// Every network.
    Any,
    /// Only these networks (none when empty).
    Networks(Vec<ipnet::IpNet>),
}

impl std::str::FromStr for WriteFrom {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "any" => return Ok(WriteFrom::Any),
            "none" | "" => return Ok(WriteFrom::Networks(Vec::new())),
            _ => {}
        }
        s.split(',')
            .map(str::trim)
            .map(|item| {
                item.parse::<ipnet::IpNet>()
                    .or_else(|_| item.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        format!("{item:?} is not an address or a CIDR network such as 10.0.0.0/8")
                    })
            })
            .collect::<Result<_, _>>()
            .map(WriteFrom::Networks)
    }
}

impl Config {
    /// The HTTP listener's address: `--http-addr`, or its former name `--metrics-addr`.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr.or(self.metrics_addr)
    }

    /// Whether this master is a relay (`--upstream`).
    pub fn is_relay(&self) -> bool {
        !self.upstreams.is_empty()
    }

    /// How a relay follows its upstreams: reads the `--upstream-tls-*` files.
    pub fn upstream_follow(&self) -> Result<FollowOptions, String> {
        let client = ClientOptions::with_flag_prefix(
            &TlsFiles {
                ca: self.upstream_tls_ca.clone(),
                cert: self.upstream_tls_cert.clone(),
                key: self.upstream_tls_key.clone(),
                domain: self.upstream_tls_domain.clone(),
            },
            self.upstream_token.as_deref(),
            "--upstream-",
        )?;
        Ok(FollowOptions {
            masters: self.upstreams.clone(),
            client,
            connect_timeout: self.upstream_timeout,
            retry_min: self.upstream_retry_min,
            retry_max: self.upstream_retry_max,
            identity: Some(Identity {
                node_name: self
                    .node_name
                    .clone()
                    .unwrap_or_else(ledger_client::report::host_name),
                version: format!("master {}", env!("CARGO_PKG_VERSION")),
            }),
        })
    }

    /// The address the listening socket binds: the internal address with --bind, else every
    /// interface at its port.
    pub fn bind_addr(&self) -> SocketAddr {
        if self.bind {
            self.listen
        } else {
            let any: std::net::IpAddr = if self.listen.is_ipv6() {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            } else {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            };
            SocketAddr::new(any, self.listen.port())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Config::command().debug_assert();
    }

    #[test]
    fn the_http_address_has_its_former_name_too() {
        let parse = |args: &[&str]| {
            Config::try_parse_from(std::iter::once("master").chain(args.iter().copied()))
                .unwrap()
                .http_addr()
        };
        let addr = |text: &str| Some(text.parse::<SocketAddr>().unwrap());
        assert_eq!(parse(&[]), None);
        assert_eq!(
            parse(&["--http-addr", "127.0.0.1:9100"]),
            addr("127.0.0.1:9100")
        );
        assert_eq!(
            parse(&["--metrics-addr", "127.0.0.1:9101"]),
            addr("127.0.0.1:9101")
        );
        assert_eq!(
            parse(&[
                "--metrics-addr",
                "127.0.0.1:9101",
                "--http-addr",
                "127.0.0.1:9100"
            ]),
            addr("127.0.0.1:9100")
        );
    }

    #[test]
    fn a_relay_takes_its_upstreams_in_order_and_their_client_settings() {
        let config = Config::try_parse_from([
            "master",
            "--upstream",
            "a:1",
            "--upstream",
            "b:2",
            "--upstream-token",
            "t",
            "--upstream-write-as-self",
        ])
        .unwrap();
        assert!(config.is_relay());
        let follow = config.upstream_follow().unwrap();
        let names: Vec<String> = follow.masters.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["a:1", "b:2"]);
        assert!(follow.client.has_identity());
        assert!(config.upstream_write_as_self);
        assert!(!Config::try_parse_from(["master"]).unwrap().is_relay());
        // The relay's settings need a relay; a relay does not register itself.
        for args in [
            &["master", "--upstream-token", "t"][..],
            &["master", "--upstream-write-as-self"],
            &["master", "--upstream", "a:1", "--register"],
            &[
                "master",
                "--upstream",
                "a:1",
                "--upstream-tls-cert",
                "c.pem",
            ],
        ] {
            assert!(Config::try_parse_from(args).is_err(), "{args:?}");
        }
    }
}
