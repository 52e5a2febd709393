//! Command-line plumbing shared by `master` and `member`: the TOML config file and the logs.

use std::io::IsTerminal;
use std::path::PathBuf;

use tracing_subscriber::EnvFilter;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colours only on a terminal).
    Text,
    /// One JSON object a line, for log collectors.
    Json,
}

/// Starts logging to stderr with `filter` (RUST_LOG syntax) in `format`.
pub fn init_logging(filter: &str, format: LogFormat) -> Result<(), String> {
    let filter =
        EnvFilter::try_new(filter).map_err(|e| format!("invalid log filter {filter:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().try_init(),
    }
    .map_err(|e| format!("cannot start logging: {e}"))
}

/// Reads the TOML file named by `--config FILE` (or `LEDGER_CONFIG`), if any, and turns each
/// `flag-name = value` into the flag's environment variable unless that is set already, so that
/// command-line flags win over the environment, which wins over the file. Call it first thing in
/// `main`, before other threads start and before `command` parses the arguments.
pub fn apply_config_file(command: &clap::Command) -> Result<(), String> {
    let Some(path) = config_path() else {
        return Ok(());
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("invalid config file {}: {e}", path.display()))?;
    for (key, value) in table {
        let long = key.replace('_', "-");
        let arg = command
            .get_arguments()
            .find(|arg| arg.get_long() == Some(long.as_str()))
            .ok_or_else(|| format!("{}: unknown setting {key:?}", path.display()))?;
        let env = arg
            .get_env()
            .ok_or_else(|| format!("{}: {key:?} cannot be set in a file", path.display()))?;
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Array(items) => items
                .iter()
                .map(|item| match item {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        };
        if std::env::var_os(env).is_none() {
            // SAFETY: called at the start of main, before any other thread exists.
            unsafe { std::env::set_var(env, value) };
        }
    }
    Ok(())
}

/// The config file named on the command line (`--config F`, `--config=F`) or in `LEDGER_CONFIG`.
fn config_path() -> Option<PathBuf> {
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(path) = arg.to_str().and_then(|a| a.strip_prefix("--config=")) {
            return Some(PathBuf::from(path));
        }
    }
    std::env::var_os("LEDGER_CONFIG").map(PathBuf::from)
}
