//! `member`: the daemon that keeps a local `blockchain.json` in sync with a master, and the
//! operator's commands (`insert`, `delete`, `get`, `status`).

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use ledger_master::storage::DatabaseUrl;
use ledger_member::commands::{self, CommandError};
use ledger_member::config::{Cli, Command};
use ledger_member::paths::LedgerPaths;
use ledger_member::relay::RelayOptions;
use ledger_member::sync::{self, SyncError, SyncOptions};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match EnvFilter::try_new(&cli.log_level) {
        Ok(filter) => filter,
        Err(e) => {
            eprintln!("member: invalid --log-level {:?}: {e}", cli.log_level);
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

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
        None => runtime.block_on(daemon(cli)),
        Some(command) => match runtime.block_on(operator(&cli, command)) {
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

async fn daemon(cli: Cli) -> ExitCode {
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signal.cancel();
    });
    let options = SyncOptions {
        masters: cli.masters,
        ledger_file: cli.ledger_file.clone(),
        connect_timeout: cli.timeout,
        retry_min: cli.daemon.retry_min,
        retry_max: cli.daemon.retry_max,
        relay: cli.daemon.serve.map(|serve| RelayOptions {
            serve,
            database: cli.daemon.relay_database_url.clone().unwrap_or_else(|| {
                DatabaseUrl::Sqlite(LedgerPaths::new(&cli.ledger_file).relay_db)
            }),
            timeout: cli.timeout,
        }),
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

async fn operator(cli: &Cli, command: Command) -> Result<String, CommandError> {
    match command {
        Command::Insert(args) => commands::insert(&cli.masters, cli.timeout, &args).await,
        Command::Delete { id } => commands::delete(&cli.masters, cli.timeout, &id).await,
        Command::Get {
            policy_type,
            conditions,
        } => commands::get(&cli.ledger_file, policy_type.as_deref(), &conditions),
        Command::Status => commands::status(&cli.masters, cli.timeout, &cli.ledger_file).await,
    }
}

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let ctrl_c = tokio::signal::ctrl_c();
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => tracing::info!("received Ctrl-C; stopping"),
                _ = term.recv() => tracing::info!("received SIGTERM; stopping"),
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the member");
            let _ = ctrl_c.await;
        }
    }
}
