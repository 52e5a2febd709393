//! The Ethereum side of a Ledger master: the `PolicyLedger` contract, which has the interface
//! EdgeLake nodes call (`insert`, `deletePolicy`, `num_policies`, `policy_ids(i)`, ...), and
//! [`ChainClient`], which reads it and writes to it.
//!
//! A master follows the contract by its state, never by its logs (inserts emit no event, and
//! the delete event does not name the policy): at each poll it reads [`ChainClient::counts`] at
//! the block it follows, and when `transaction_count` moved, [`ChainClient::policy_ids`] and the
//! new policies' texts ([`ChainClient::policies`]), every read pinned to one block ([`At`]) so
//! that a poll sees one state, in JSON-RPC batches so that it costs a few HTTP requests rather
//! than one per policy. Writes are transactions from one key ([`ChainClient::insert`],
//! [`ChainClient::delete`]) with nonces in order, and the contract's refusals come back as
//! [`ChainError::AlreadyExists`] and [`ChainError::NotFound`].
//!
//! [`ChainClient::stats`] counts the requests a client made, for the benchmark and the tests.

#![warn(missing_docs)]

mod client;
pub mod contract;
mod error;
pub mod key;
mod stats;

pub use client::{At, Block, ChainClient, ChainInfo, ChainOptions, ChainPolicy, Counts, Receipt};
pub use error::ChainError;
pub use key::{KeyFileError, read_key_file};
pub use stats::RpcStats;

/// The alloy types in this crate's API, so that its users need no alloy dependency of their own.
pub use alloy::primitives::{Address, B256, TxHash};
/// A private key that signs transactions ([`key::read_key_file`] reads one).
pub use alloy::signers::local::PrivateKeySigner;
