//! The Ledger member: keeps a local AnyLog `blockchain.json` exactly in sync with a master by
//! streaming its changes, and gives operators the `insert`, `delete`, `get` and `status`
//! commands.
//!
//! A change travels `ledger_client::follow` (the subscription, reconnects, backoff, the
//! stream's order checked) → `sync` (the sink of the subscription) → `replica` (groups a batch,
//! checks it against the file) → `ledger_file` (appends or rewrites the file crash-safely, with
//! its `state` record beside it). See `member/README.md` for the file format, the
//! crash-recovery protocol and the command line.
//!
//! The member is a thin client: it depends on no database and no server code. A relay, which
//! serves the ledger to others, is a master (`master --upstream`), not a member.

#![warn(missing_docs)]

pub mod commands;
pub mod config;
pub mod foreign;
pub mod ledger_file;
pub mod line;
pub mod metrics;
pub mod node;
pub mod paths;
pub mod replica;
pub mod sidecar;
pub mod state;
pub mod sync;
