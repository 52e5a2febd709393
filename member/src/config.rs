//! The member's command line; every flag has an environment variable.
//!
//! Without a subcommand `member` is the daemon that keeps the ledger file in sync; the
//! subcommands are the operator's tools (AnyLog's `blockchain insert`, `blockchain drop
//! policy`, `blockchain get`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ledger_ops::logging::LogFormat;

use crate::node::NodeTarget;
use ledger_client::masters::{ClientOptions, MasterAddr, TlsFiles};

/// The Ledger member: keeps a local AnyLog `blockchain.json` in sync with a master by streaming
/// its changes. Run without a subcommand for the daemon.
#[derive(Debug, Clone, Parser)]
#[command(name = "member", version, about, long_about = None)]
pub struct Cli {
    /// A master's address, HOST:PORT. Repeat the flag (or separate with commas in
    /// LEDGER_MASTER) for several: the first that answers is used, the next when it fails.
    #[arg(
        long = "master",
        env = "LEDGER_MASTER",
        value_delimiter = ',',
        value_parser = MasterAddr::parse,
        global = true
    )]
    pub masters: Vec<MasterAddr>,

    /// The local ledger file, AnyLog's `blockchain.json`.
    #[arg(
        long,
        env = "LEDGER_FILE",
        default_value = "blockchain.json",
        global = true
    )]
    pub ledger_file: PathBuf,

    /// How long connecting to a master, or an operator's call, may take.
    #[arg(
        long,
        env = "LEDGER_TIMEOUT",
        default_value = "10s",
        value_parser = humantime::parse_duration,
        global = true
    )]
    pub timeout: Duration,

    /// Log filter, as RUST_LOG: a level (info, debug) or per-module directives. Logs go to
    /// stderr.
    #[arg(long, env = "LEDGER_LOG", default_value = "info", global = true)]
    pub log_level: String,

    /// Log format: human-readable text, or one JSON object a line for collectors.
    #[arg(
        long,
        env = "LEDGER_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,

    /// A TOML file of settings named like the flags (`master = ["a:1", "b:2"]`,
    /// `ledger-file = "/var/lib/ledger/blockchain.json"`); flags and environment variables win
    /// over it.
    #[arg(long, env = "LEDGER_CONFIG", global = true)]
    pub config: Option<PathBuf>,

    /// How to reach the masters: TLS and the bearer token.
    #[command(flatten)]
    pub client: ClientArgs,

    /// Options of the daemon.
    #[command(flatten)]
    pub daemon: DaemonArgs,

    /// An operator's command; none runs the daemon.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// How the member and its commands reach masters.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// TLS: the CA (PEM) that signed the masters' certificates. Connections use TLS (https)
    /// when it is given.
    #[arg(long, env = "LEDGER_TLS_CA", value_name = "PEM", global = true)]
    pub tls_ca: Option<PathBuf>,

    /// mTLS: this member's client certificate chain (PEM), with --tls-key.
    #[arg(long, env = "LEDGER_TLS_CERT", value_name = "PEM", global = true)]
    pub tls_cert: Option<PathBuf>,

    /// mTLS: the private key (PEM) of --tls-cert.
    #[arg(long, env = "LEDGER_TLS_KEY", value_name = "PEM", global = true)]
    pub tls_key: Option<PathBuf>,

    /// TLS: the name the master's certificate must hold; by default the host of its address.
    #[arg(long, env = "LEDGER_TLS_DOMAIN", value_name = "NAME", global = true)]
    pub tls_domain: Option<String>,

    /// A bearer token sent as `authorization: Bearer TOKEN` on every call. Prefer the
    /// environment variable (command lines are visible to other users); never logged.
    #[arg(
        long,
        env = "LEDGER_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub token: Option<String>,
}

impl ClientArgs {
    /// Reads the TLS files and prepares the token.
    pub fn options(&self) -> Result<ClientOptions, String> {
        ClientOptions::new(
            &TlsFiles {
                ca: self.tls_ca.clone(),
                cert: self.tls_cert.clone(),
                key: self.tls_key.clone(),
                domain: self.tls_domain.clone(),
            },
            self.token.as_deref(),
        )
    }
}

/// Options of the daemon.
#[derive(Debug, Clone, Args)]
pub struct DaemonArgs {
    /// The first delay before reconnecting to a master; it doubles after each failure.
    #[arg(long, env = "LEDGER_RETRY_MIN", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub retry_min: Duration,

    /// The longest delay between reconnection attempts.
    #[arg(long, env = "LEDGER_RETRY_MAX", default_value = "30s", value_parser = humantime::parse_duration)]
    pub retry_max: Duration,

    /// Serve Prometheus metrics at http://ADDR/metrics (off unless given); with port 0 a free
    /// port is picked, and the address bound is logged as `metrics on http://ADDR/metrics`.
    #[arg(long, env = "LEDGER_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Beside an EdgeLake node: after each batch of changes, send the node `blockchain reload
    /// metadata` through its REST server at this URL, `http://HOST:PORT` (e.g.
    /// http://127.0.0.1:32049; http only, https is not supported), so that its `blockchain
    /// get` shows them.
    #[arg(
        long,
        env = "LEDGER_NODE_REST",
        value_name = "URL",
        value_parser = NodeTarget::rest,
        conflicts_with = "node_tcp"
    )]
    pub node_rest: Option<NodeTarget>,

    /// Beside an EdgeLake node without a REST server: send it `blockchain reload metadata` as
    /// an AnyLog message to its TCP server at IP:PORT after each batch of changes.
    #[arg(long, env = "LEDGER_NODE_TCP", value_name = "IP:PORT")]
    pub node_tcp: Option<SocketAddr>,

    /// How long one reload of the node (--node-rest, --node-tcp) may take before it counts as
    /// failed and is tried again with backoff.
    #[arg(
        long,
        env = "LEDGER_NODE_RELOAD_TIMEOUT",
        default_value = "5s",
        value_parser = humantime::parse_duration
    )]
    pub node_reload_timeout: Duration,

    /// The name this member gives itself when it subscribes: the masters list it
    /// (ListSubscribers, `member status --all`). By default the host name.
    #[arg(long, env = "LEDGER_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
}

impl DaemonArgs {
    /// The node to tell about changes, if any (`--node-rest` or `--node-tcp`).
    pub fn node_target(&self) -> Option<NodeTarget> {
        self.node_rest
            .clone()
            .or_else(|| self.node_tcp.map(NodeTarget::Tcp))
    }
}

/// The operator's commands. Each exits 0 on success; otherwise it prints one line on stderr
/// and exits 1 (refused or failed), 2 (bad usage or input) or 3 (no master reachable).
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Inserts a policy on the master and prints the completed policy (with its id, date and
    /// ledger), as AnyLog's `blockchain insert where policy=... master=...`.
    Insert(InsertArgs),
    /// Deletes a policy on the master by id and prints the seq of the delete, as AnyLog's
    /// `blockchain drop policy where id=...`.
    Delete {
        /// The id of the policy to delete.
        #[arg(long)]
        id: String,
    },
    /// Prints, from the local ledger file only (no master needed), a JSON array of the
    /// policies of TYPE whose attributes match every --where, in ledger order, as AnyLog's
    /// `blockchain get TYPE where key=value`.
    Get {
        /// The policy type (`operator`, `table`, ...); `*` or none for every type.
        #[arg(value_name = "TYPE")]
        policy_type: Option<String>,
        /// KEY=VALUE: only policies whose attribute KEY is VALUE (a string attribute its text,
        /// any other attribute its JSON text: `port=32148`, `enabled=true`). Repeat for more.
        #[arg(long = "where", value_name = "KEY=VALUE", value_parser = parse_condition)]
        conditions: Vec<(String, String)>,
        /// `json` (an array, one policy a line) or `table` (aligned columns: type, id, and
        /// those of name, company, ip and port that any listed policy has).
        #[arg(long, value_enum, default_value = "json")]
        format: GetFormat,
    },
    /// Prints, as JSON, the applied seq of the ledger file, the master's head seq, the lag, and
    /// the file's md5 against the master's digest. With --all: the master's subscribers instead.
    Status {
        /// Print every subscriber of the master (ListSubscribers: its members, and those below
        /// its relays) as a table, the largest lag first: node, via, peer, identity, since,
        /// sent, durable, lag, bytes. The ledger file is not read.
        #[arg(long)]
        all: bool,
    },
}

/// How `member get` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GetFormat {
    /// A JSON array of the policy lines.
    Json,
    /// Aligned columns for people.
    Table,
}

/// Where the policy to insert comes from.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct InsertArgs {
    /// The policy as JSON text, e.g. `{"operator": {"name": "op1", "port": 32148}}`.
    #[arg(long)]
    pub policy: Option<String>,
    /// A file holding the policy as JSON text; `-` reads standard input.
    #[arg(long)]
    pub policy_file: Option<PathBuf>,
}

/// Reads a `--where KEY=VALUE`.
fn parse_condition(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn subcommands_take_the_global_flags_after_them() {
        let cli = Cli::try_parse_from([
            "member",
            "get",
            "operator",
            "--where",
            "company=Acme",
            "--where",
            "port=1",
            "--ledger-file",
            "x.json",
        ])
        .unwrap();
        assert_eq!(cli.ledger_file, PathBuf::from("x.json"));
        match cli.command {
            Some(Command::Get {
                policy_type,
                conditions,
                format,
            }) => {
                assert_eq!(format, GetFormat::Json);
                assert_eq!(policy_type.as_deref(), Some("operator"));
                assert_eq!(conditions.len(), 2);
                assert_eq!(conditions[0], ("company".into(), "Acme".into()));
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from([
            "member", "insert", "--master", "a:1", "--master", "b:2", "--policy", "{}",
        ])
        .unwrap();
        assert_eq!(cli.masters.len(), 2);
        assert!(
            Cli::try_parse_from(["member", "insert", "--policy", "{}", "--policy-file", "-"])
                .is_err()
        );
        assert!(Cli::try_parse_from(["member", "insert"]).is_err());
        assert!(Cli::try_parse_from(["member", "get", "--where", "nokey"]).is_err());
    }

    #[test]
    fn the_node_name_and_status_all() {
        let cli = Cli::try_parse_from(["member", "--node-name", "edge-7"]).unwrap();
        assert_eq!(cli.daemon.node_name.as_deref(), Some("edge-7"));
        assert_eq!(
            Cli::try_parse_from(["member"]).unwrap().daemon.node_name,
            None
        );
        let cli = Cli::try_parse_from(["member", "status", "--all", "--master", "a:1"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Status { all: true })));
        let cli = Cli::try_parse_from(["member", "status"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Status { all: false })));
    }

    #[test]
    fn the_node_is_reached_by_rest_or_tcp_not_both() {
        let cli = Cli::try_parse_from(["member", "--node-rest", "http://127.0.0.1:32049"]).unwrap();
        assert!(matches!(
            cli.daemon.node_target(),
            Some(crate::node::NodeTarget::Rest(_))
        ));
        assert_eq!(cli.daemon.node_reload_timeout, Duration::from_secs(5));
        let cli = Cli::try_parse_from([
            "member",
            "--node-tcp",
            "127.0.0.1:32048",
            "--node-reload-timeout",
            "1s",
        ])
        .unwrap();
        assert_eq!(
            cli.daemon.node_target(),
            Some(crate::node::NodeTarget::Tcp(
                "127.0.0.1:32048".parse().unwrap()
            ))
        );
        assert_eq!(cli.daemon.node_reload_timeout, Duration::from_secs(1));
        assert!(
            Cli::try_parse_from(["member"])
                .unwrap()
                .daemon
                .node_target()
                .is_none()
        );
        assert!(
            Cli::try_parse_from([
                "member",
                "--node-rest",
                "http://127.0.0.1:32049",
                "--node-tcp",
                "127.0.0.1:32048"
            ])
            .is_err()
        );
        let https = Cli::try_parse_from(["member", "--node-rest", "https://127.0.0.1:32049"])
            .unwrap_err()
            .to_string();
        assert!(https.contains("https is not supported"), "{https}");
    }
}
