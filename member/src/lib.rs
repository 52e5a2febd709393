//! The Ledger member: keeps a local AnyLog `blockchain.json` exactly in sync with a master by
//! streaming its changes, and gives operators the `insert`, `delete`, `get` and `status`
//! commands.
//!
//! A change travels `sync` (the subscription, reconnects, backoff) → `replica` (checks the
//! stream's order, groups a batch) → `ledger_file` (appends or rewrites the file crash-safely,
//! with its `state` record beside it). With `--serve`, the member is also a `relay`: a `mirror`
//! database fed from the same stream, served to members below with the master's code. See
//! `member/README.md` for the file format, the crash-recovery protocol and the command line.

#![warn(missing_docs)]

pub mod backoff;
pub mod commands;
pub mod config;
pub mod foreign;
pub mod ledger_file;
pub mod line;
pub mod masters;
pub mod metrics;
pub mod mirror;
pub mod node;
pub mod paths;
pub mod relay;
pub mod replica;
pub mod sidecar;
pub mod state;
pub mod sync;
