//! The client side of the Ledger contract, shared by the member and by a relay's upstream link:
//! master addresses and connections (TLS, client certificates, bearer tokens), readable
//! descriptions of failures, backoff, and [`follow`]: following a `StreamLedger` subscription
//! into a copy of the ledger, with reconnects, failover between masters, resumption after a
//! seq, snapshots and the protocol's ordering checks.
//!
//! No database and no server code: the member, a thin client, depends on this crate and not on
//! the master's.

#![warn(missing_docs)]

pub mod backoff;
pub mod checker;
pub mod follow;
pub mod masters;
pub mod report;
