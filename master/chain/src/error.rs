//! What a chain call can fail with: the contract's refusals as their own variants (the master
//! maps them to gRPC codes), the node being out of reach, and the rest.

use std::time::Duration;

use alloy::primitives::{Address, TxHash};

use crate::contract::revert::{self, Refusal};

/// A failed chain call.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The contract refused an insert: the id is stored already (`ALREADY_EXISTS`).
    #[error("policy {id:?} already exists on the contract")]
    AlreadyExists {
        /// The policy id.
        id: String,
    },
    /// The contract refused a delete, update or read: the id is not stored (`NOT_FOUND`).
    #[error("policy {id:?} does not exist on the contract")]
    NotFound {
        /// The policy id.
        id: String,
    },
    /// The contract refused an update: only the account that inserted the policy may.
    #[error("policy {id:?} was inserted by another account: only that account may update it")]
    NotOwner {
        /// The policy id.
        id: String,
    },
    /// The contract reverted for a reason that is none of the refusals above (out of gas, a
    /// panic code, another contract's text), or with no reason at all.
    #[error("the contract reverted{}: {reason}", tx.map(|tx| format!(" transaction {tx}")).unwrap_or_default())]
    Reverted {
        /// The revert reason, or a description when the node gave none.
        reason: String,
        /// The transaction, when it was mined (a revert found while estimating gas has none).
        tx: Option<TxHash>,
    },
    /// The node could not be reached: connection refused, no answer within the request
    /// timeout, an HTTP error status (`UNAVAILABLE`). Nothing was written.
    #[error("the Ethereum node at {url} is unreachable: {reason}")]
    Unreachable {
        /// The endpoint, without the path or credentials it may carry (an API key).
        url: String,
        /// What failed.
        reason: String,
    },
    /// A signed transaction was handed to the node but the answer was lost (a timeout or a
    /// broken connection after the request was sent): it may or may not be in the pool. Its
    /// receipt, or its absence, tells ([`crate::ChainClient::wait_receipt`]).
    #[error("transaction {tx} may or may not have reached the node: {reason}")]
    SendOutcomeUnknown {
        /// The hash of the signed transaction.
        tx: TxHash,
        /// What failed.
        reason: String,
    },
    /// A transaction was sent but no receipt came within the time allowed: it may still be
    /// mined later, or never (`UNAVAILABLE` with the hash).
    #[error("no receipt for transaction {tx} within {timeout:?}")]
    Timeout {
        /// The transaction's hash.
        tx: TxHash,
        /// How long was waited.
        timeout: Duration,
    },
    /// A write was asked of a client built without a private key.
    #[error("no Ethereum private key was given: writes to the contract need one")]
    NoKey,
    /// A read was pinned to a block the node does not know, or no longer knows (a reorg took
    /// it away, or the node pruned its state): read again at a new head.
    #[error("the node does not know block {block}")]
    UnknownBlock {
        /// The block asked for, as given (a number or a hash).
        block: String,
    },
    /// The node's chain id is not the one configured: the key would sign for another chain.
    #[error("the node serves chain id {actual}, not the configured {expected}")]
    WrongChain {
        /// The configured chain id.
        expected: u64,
        /// The node's.
        actual: u64,
    },
    /// No contract code at the configured address (at the block read).
    #[error("no contract code at {address}")]
    NoContract {
        /// The configured address.
        address: Address,
    },
    /// The node answered a call with a JSON-RPC error that is not a revert.
    #[error("the node refused {method}: error {code}: {message}")]
    Rpc {
        /// The JSON-RPC method.
        method: String,
        /// The JSON-RPC error code.
        code: i64,
        /// The node's message.
        message: String,
    },
    /// The node's answer could not be decoded (not the contract expected at the address, or
    /// not an Ethereum node).
    #[error("unexpected answer to {method}: {reason}")]
    Malformed {
        /// The JSON-RPC method (or contract function).
        method: String,
        /// What was wrong.
        reason: String,
    },
    /// The RPC URL is not an `http://` or `https://` URL.
    #[error("invalid Ethereum RPC URL: {0}")]
    InvalidUrl(String),
}

impl ChainError {
    /// The error for a revert with `reason` of a call about policy `id`: the contract's known
    /// refusals become [`ChainError::AlreadyExists`], [`ChainError::NotFound`] and
    /// [`ChainError::NotOwner`], anything else [`ChainError::Reverted`].
    pub fn from_revert(reason: &str, id: &str, tx: Option<TxHash>) -> ChainError {
        let id = id.to_string();
        match revert::classify(reason) {
            Some(Refusal::Exists) => ChainError::AlreadyExists { id },
            Some(Refusal::NotFound) => ChainError::NotFound { id },
            Some(Refusal::NotOwner) => ChainError::NotOwner { id },
            None => ChainError::Reverted {
                reason: reason.to_string(),
                tx,
            },
        }
    }

    /// Whether the call may succeed if tried again later, unchanged: the node was out of reach
    /// or slow, or the block read went away. Refusals and malformed answers will not.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ChainError::Unreachable { .. }
                | ChainError::Timeout { .. }
                | ChainError::SendOutcomeUnknown { .. }
                | ChainError::UnknownBlock { .. }
        )
    }
}
