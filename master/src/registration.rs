//! Self-registration: the master's own `master` policy, as AnyLog's step 5 creates it.

use std::net::SocketAddr;

use serde_json::json;

use crate::config::Config;
use ledger_server::error::LedgerError;
use ledger_server::ledger::{Caller, Ledger};
use ledger_storage::Rejection;

/// The `master` policy describing this master. `internal` is the address it listens on (with
/// the real port when an ephemeral one was asked for).
pub fn master_policy(config: &Config, internal: SocketAddr) -> serde_json::Value {
    let name = &config.name;
    let company = &config.company;
    if config.bind {
        // Bound to one address: nodes reach it there, and there is no separate local address.
        json!({"master": {
            "name": name, "company": company,
            "ip": internal.ip().to_string(), "port": internal.port(),
            "rest_port": config.rest_port,
        }})
    } else {
        let external = config.external_addr.unwrap_or(internal);
        json!({"master": {
            "name": name, "company": company,
            "ip": external.ip().to_string(), "local_ip": internal.ip().to_string(),
            "port": external.port(), "rest_port": config.rest_port,
        }})
    }
}

/// Inserts the master policy unless a policy with its id exists.
pub async fn register(
    ledger: &Ledger,
    config: &Config,
    internal: SocketAddr,
) -> Result<(), LedgerError> {
    let policy = master_policy(config, internal).to_string();
    match ledger.insert(&policy, &Caller::at("self")).await {
        Ok(stored) => {
            tracing::info!(id = %stored.id, "registered this master's policy");
            Ok(())
        }
        Err(LedgerError::Rejected(Rejection::AlreadyExists(id))) => {
            tracing::info!(%id, "this master's policy is already registered");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn config(args: &[&str]) -> Config {
        Config::parse_from(std::iter::once("master").chain(args.iter().copied()))
    }

    #[test]
    fn without_bind_ip_is_external_and_local_ip_internal() {
        let config = config(&[
            "--listen",
            "10.0.0.5:32048",
            "--external-addr",
            "203.0.113.7:40048",
            "--name",
            "m1",
        ]);
        let policy = master_policy(&config, "10.0.0.5:32048".parse().unwrap());
        assert_eq!(
            policy.to_string(),
            r#"{"master":{"name":"m1","company":"My Company","ip":"203.0.113.7","local_ip":"10.0.0.5","port":40048,"rest_port":32049}}"#
        );
    }

    #[test]
    fn without_external_address_ip_is_the_internal_one() {
        let config = config(&["--listen", "10.0.0.5:32048"]);
        let policy = master_policy(&config, "10.0.0.5:32048".parse().unwrap());
        assert_eq!(policy["master"]["ip"], "10.0.0.5");
        assert_eq!(policy["master"]["local_ip"], "10.0.0.5");
        assert_eq!(policy["master"]["port"], 32048);
    }

    #[test]
    fn with_bind_ip_is_internal_and_there_is_no_local_ip() {
        let config = config(&[
            "--listen",
            "10.0.0.5:32048",
            "--bind",
            "--external-addr",
            "203.0.113.7:40048",
        ]);
        let policy = master_policy(&config, "10.0.0.5:32048".parse().unwrap());
        assert_eq!(
            policy.to_string(),
            r#"{"master":{"name":"master-node","company":"My Company","ip":"10.0.0.5","port":32048,"rest_port":32049}}"#
        );
    }
}
