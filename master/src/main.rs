//! `master`: serves the Ledger API on a SQLite or PostgreSQL ledger.

#![warn(missing_docs)]

#[cfg(feature = "ethereum")]
mod chain_client;
mod config;
mod registration;
mod run;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use ledger_ops::{config_file, logging};

use crate::config::Config;

// Every request allocates (HTTP/2 frames, JSON, SQL rows) on several threads; with glibc's
// malloc that was ~8% of the master's CPU at 64 concurrent clients (free-list consolidation),
// and mimalloc raised SQLite's 64-client throughput by ~10% in side-by-side bench runs. Built
// without transparent huge pages: with them the master's RSS per idle subscriber was 92 KiB
// (SQLite) and 316 KiB (PostgreSQL) instead of ~13 KiB.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let command = match config_file::with_config_file(Config::command()) {
        Ok(command) => command,
        Err(e) => {
            eprintln!("master: {e}");
            return ExitCode::from(2);
        }
    };
    let config = match Config::from_arg_matches(&command.get_matches()) {
        Ok(config) => config,
        Err(e) => e.exit(),
    };
    if let Err(e) = logging::init_logging(&config.log_level, config.log_format) {
        eprintln!("master: {e}");
        return ExitCode::from(2);
    }
    // Reads FAILPOINTS in builds with the `failpoints` feature (the fault suite's); a no-op in
    // release builds.
    let _failpoints = fail::FailScenario::setup();

    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = config.threads {
        runtime.worker_threads(threads.max(1));
    }
    // Storage calls run on the blocking pool and wait there for one of the pool's connections:
    // more threads than connections only wait. Tokio's default of 512 let a burst of 1,000
    // subscribers start ~100 threads. The 16 beyond the pool keep calls moving (each waits at
    // most --db-timeout for a connection) while slow snapshot readers hold connections.
    runtime.max_blocking_threads(config.db_pool_size as usize + 16);
    let runtime = match runtime.build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("master: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run::run(config, ledger_ops::signals::shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("master: {e}");
            ExitCode::FAILURE
        }
    }
}
