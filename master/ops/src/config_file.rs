//! The TOML config file (`--config FILE` or `LEDGER_CONFIG`): each `flag-name = value` becomes
//! the flag's default, so that the command line wins over the environment, which wins over the
//! file (clap's own order: argument, environment variable, default).

use std::path::PathBuf;

/// `command` with the settings of the TOML file named by `--config FILE` (or `LEDGER_CONFIG`),
/// if any, as its defaults. A key is a flag's long name (`database-url`, or `database_url`);
/// a key that names no flag, or a flag without an environment variable (one that only makes
/// sense on a command line), is an error naming the file and the key.
pub fn with_config_file(command: clap::Command) -> Result<clap::Command, String> {
    let Some(path) = config_path() else {
        return Ok(command);
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("invalid config file {}: {e}", path.display()))?;
    let mut command = command;
    for (key, value) in table {
        let long = key.replace('_', "-");
        let arg = command
            .get_arguments()
            .find(|arg| arg.get_long() == Some(long.as_str()))
            .ok_or_else(|| format!("{}: unknown setting {key:?}", path.display()))?;
        if arg.get_env().is_none() {
            return Err(format!(
                "{}: {key:?} cannot be set in a file",
                path.display()
            ));
        }
        let id = arg.get_id().clone();
        let text = |value: &toml::Value| match value {
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let values: Vec<String> = match &value {
            toml::Value::Array(items) => items.iter().map(text).collect(),
            other => vec![text(other)],
        };
        command = command.mut_arg(id, |arg| arg.default_values(values));
    }
    Ok(command)
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
