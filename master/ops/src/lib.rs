//! What `master` and `member` share to run as services: the TOML config file as defaults of
//! their flags ([`config_file`]), their logs ([`logging`]), the signals that stop them
//! ([`signals`]) and the Prometheus endpoint ([`metrics_endpoint`]).
//!
//! Architecture invariant: no ledger crate, no database and no gRPC here; both binaries, the
//! thin member included, link it.

pub mod config_file;
pub mod logging;
pub mod metrics_endpoint;
pub mod signals;
