//! `--ethereum-rpc`: `ledger-chain`'s contract client as the followed contract of the server's
//! chain follower and writes (`ledger_server::chain`). Only translation lives here.

use std::ops::Range;
use std::str::FromStr;
use std::time::Duration;

use ledger_chain::{At, B256, Block, ChainClient, ChainError, TxHash};
use ledger_server::chain::{BlockRef, ContractCall, ContractError, Counts, FollowedContract};

/// The contract at `--ethereum-contract` through the node at `--ethereum-rpc`.
pub struct Contract(pub ChainClient);

fn block_ref(block: Block) -> BlockRef {
    BlockRef {
        number: block.number,
        hash: format!("{:#x}", block.hash),
        timestamp: block.timestamp,
    }
}

/// A read pinned to `block`: answered at its number, and checked to be still that block.
fn pinned(block: &BlockRef) -> Result<At, ContractError> {
    let hash = B256::from_str(&block.hash)
        .map_err(|e| ContractError::Misconfigured(format!("block hash {:?}: {e}", block.hash)))?;
    Ok(At::Block(Block {
        number: block.number,
        hash,
        timestamp: block.timestamp,
    }))
}

fn contract_error(error: ChainError) -> ContractError {
    let text = error.to_string();
    match error {
        ChainError::AlreadyExists { id } => ContractError::AlreadyExists(id),
        ChainError::NotFound { id } => ContractError::NotFound(id),
        ChainError::NoKey => ContractError::NoKey,
        ChainError::Unreachable { .. } => ContractError::Unreachable(text),
        ChainError::Timeout { tx, timeout } => ContractError::Timeout {
            tx: format!("{tx:#x}"),
            waited: timeout,
        },
        // Sent, and the answer lost: as pending as a transaction without a receipt.
        ChainError::SendOutcomeUnknown { tx, .. } => ContractError::Timeout {
            tx: format!("{tx:#x}"),
            waited: Duration::ZERO,
        },
        ChainError::Reverted { reason, tx } => ContractError::Reverted {
            tx: tx.map(|tx| format!("{tx:#x}")).unwrap_or_default(),
            reason,
        },
        ChainError::NotOwner { .. } => ContractError::Reverted {
            tx: String::new(),
            reason: text,
        },
        ChainError::UnknownBlock { .. } => ContractError::Reorged(text),
        _ => ContractError::Misconfigured(text),
    }
}

impl Contract {
    /// Waits up to `within` for the receipt of `tx`, a write of policy `id`: the block it is in,
    /// or the contract's refusal as an error.
    async fn mined(&self, tx: TxHash, id: &str, within: Duration) -> Result<u64, ContractError> {
        let receipt = self
            .0
            .wait_receipt(tx, within)
            .await
            .map_err(contract_error)?;
        Ok(receipt.check(id).map_err(contract_error)?.block)
    }
}

impl FollowedContract for Contract {
    fn head(&self) -> ContractCall<'_, BlockRef> {
        Box::pin(async move { self.0.head().await.map(block_ref).map_err(contract_error) })
    }

    fn block(&self, number: u64) -> ContractCall<'_, BlockRef> {
        Box::pin(async move {
            self.0
                .block(number)
                .await
                .map(block_ref)
                .map_err(contract_error)
        })
    }

    fn counts<'a>(&'a self, at: &'a BlockRef) -> ContractCall<'a, Counts> {
        Box::pin(async move {
            let counts = self.0.counts(pinned(at)?).await.map_err(contract_error)?;
            Ok(Counts {
                transaction_count: counts.transaction_count,
                num_policies: counts.num_policies,
            })
        })
    }

    fn policy_ids_in<'a>(
        &'a self,
        range: Range<u64>,
        at: &'a BlockRef,
    ) -> ContractCall<'a, Vec<String>> {
        Box::pin(async move {
            self.0
                .policy_ids_in(range, pinned(at)?)
                .await
                .map_err(contract_error)
        })
    }

    fn policy_ids<'a>(&'a self, at: &'a BlockRef) -> ContractCall<'a, Vec<String>> {
        Box::pin(async move { self.0.policy_ids(pinned(at)?).await.map_err(contract_error) })
    }

    fn policies<'a>(
        &'a self,
        indexes: &'a [u64],
        at: &'a BlockRef,
    ) -> ContractCall<'a, Vec<String>> {
        Box::pin(async move {
            self.0
                .policies(indexes, pinned(at)?)
                .await
                .map_err(contract_error)
        })
    }

    fn insert<'a>(&'a self, id: &'a str, json: &'a str, within: Duration) -> ContractCall<'a, u64> {
        Box::pin(async move {
            let tx = self.0.insert(id, json).await.map_err(contract_error)?;
            self.mined(tx, id, within).await
        })
    }

    fn rpc_counts(&self) -> (u64, u64) {
        let stats = self.0.stats();
        (stats.calls, stats.http_requests)
    }

    fn delete<'a>(&'a self, id: &'a str, within: Duration) -> ContractCall<'a, u64> {
        Box::pin(async move {
            let tx = self.0.delete(id).await.map_err(contract_error)?;
            self.mined(tx, id, within).await
        })
    }
}
