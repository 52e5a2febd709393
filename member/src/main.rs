//! `member`: the daemon that keeps a local `blockchain.json` in sync with a master, and the
//! operator's commands (`insert`, `delete`, `get`, `status`).

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use ledger_client::masters::ClientOptions;
use ledger_client::report::Identity;
use ledger_member::commands::{self, CommandError};
use ledger_member::config::{Cli, Command};
use ledger_member::node::{NodeNotifier, NodeOptions};
use ledger_member::sidecar::Sidecar;
use ledger_member::sync::{self, SyncError, SyncOptions};
use ledger_ops::{config_file, logging};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let command = match config_file::with_config_file(Cli::command()) {
        Ok(command) => command,
        Err(e) => {
            eprintln!("member: {e}");
            return ExitCode::from(2);
        }
    };
    let cli = match Cli::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Err(e) = logging::init_logging(&cli.log_level, cli.log_format) {
        eprintln!("member: {e}");
        return ExitCode::from(2);
    }
    let client = match cli.client.options() {
        Ok(client) => client,
        Err(e) => {
            eprintln!("member: {e}");
            return ExitCode::from(2);
        }
    };

    // Two workers: the file writes block one (block_in_place) while the other keeps the
    // connection (pings, flow control) going.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("member: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command.clone() {
        None => runtime.block_on(daemon(cli, client)),
        Some(command) => match runtime.block_on(operator(&cli, &client, command)) {
            Ok(output) => {
                println!("{output}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("member: {e}");
                ExitCode::from(e.exit_code())
            }
        },
    }
}

async fn daemon(cli: Cli, client: ClientOptions) -> ExitCode {
    if let Some(addr) = cli.daemon.metrics_addr {
        // It logs the address bound, the one to scrape when ADDR asks for port 0.
        if let Err(e) = ledger_member::metrics::install(addr).await {
            eprintln!("member: {e}");
            return ExitCode::from(2);
        }
    }
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        ledger_ops::signals::shutdown_signal().await;
        signal.cancel();
    });
    let sidecar = Sidecar::open(&cli.ledger_file);
    let node = cli.daemon.node_target().map(|target| {
        let options = NodeOptions {
            timeout: cli.daemon.node_reload_timeout,
            ..NodeOptions::default()
        };
        NodeNotifier::start_with(target, options, sidecar.clone(), shutdown.clone())
    });
    let options = SyncOptions {
        masters: cli.masters,
        ledger_file: cli.ledger_file.clone(),
        client,
        connect_timeout: cli.timeout,
        retry_min: cli.daemon.retry_min,
        retry_max: cli.daemon.retry_max,
        sidecar,
        node,
        identity: Identity {
            node_name: cli
                .daemon
                .node_name
                .clone()
                .unwrap_or_else(ledger_client::report::host_name),
            version: format!("member {}", env!("CARGO_PKG_VERSION")),
        },
    };
    match sync::run(options, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("member: {e}");
            match e {
                SyncError::NoMaster => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

async fn operator(
    cli: &Cli,
    client: &ClientOptions,
    command: Command,
) -> Result<String, CommandError> {
    match command {
        Command::Insert(args) => commands::insert(&cli.masters, client, cli.timeout, &args).await,
        Command::Delete { id } => commands::delete(&cli.masters, client, cli.timeout, &id).await,
        Command::Get {
            policy_type,
            conditions,
            format,
        } => commands::get(
            &cli.ledger_file,
            policy_type.as_deref(),
            &conditions,
            format,
        ),
        Command::Status { all: true } => {
            commands::subscribers(&cli.masters, client, cli.timeout).await
        }
        Command::Status { all: false } => {
            commands::status(&cli.masters, client, cli.timeout, &cli.ledger_file).await
        }
    }
}
