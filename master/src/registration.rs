//! Self-registration: the master's own `master` policy, as AnyLog's step 5 creates it.

use std::net::SocketAddr;

use serde_json::json;

use crate::config::Config;
use crate::error::LedgerError;
use crate::ledger::Ledger;
use crate::storage::Rejection;

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
    match ledger.insert(&policy, "self").await {
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
