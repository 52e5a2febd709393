//! Writes: estimating, signing and sending a transaction from the client's one key, with its
//! nonces in order, and waiting for receipts.

use super::*;

impl ChainClient {
    // ---- writes ----

    /// Estimates, signs and sends a transaction to `to` with `input` from the client's key;
    /// returns its hash once the node took it. `id` names the policy in refusals.
    pub(super) async fn send(&self, to: TxKind, input: Bytes, id: &str) -> Result<TxHash> {
        let signer = self.inner.signer.as_ref().ok_or(ChainError::NoKey)?;
        let from = signer.address();
        let chain_id = self.chain_id().await?;
        // One request: the estimate (which runs the call: a refusal stops here, before a nonce
        // is taken), the latest block (base fee, gas limit), the tip, the legacy gas price.
        let estimate_request = CallRequest::new(Some(from), to.to().copied(), input.clone());
        let mut batch = self.inner.rpc.new_batch();
        let gas = self.add::<_, U64>(&mut batch, "eth_estimateGas", &(estimate_request,))?;
        let latest = self.add::<_, Option<RpcBlock>>(
            &mut batch,
            "eth_getBlockByNumber",
            &("latest", false),
        )?;
        let tip = self.add::<_, U256>(&mut batch, "eth_maxPriorityFeePerGas", &())?;
        let gas_price = self.add::<_, U256>(&mut batch, "eth_gasPrice", &())?;
        batch
            .send()
            .await
            .map_err(|e| self.error("eth_estimateGas", e, &At::Latest))?;
        let gas: u64 = match gas.await {
            Ok(gas) => gas.to(),
            Err(e) => {
                return Err(match self.error("eth_estimateGas", e, &At::Latest) {
                    ChainError::Reverted { reason, .. } => {
                        ChainError::from_revert(&reason, id, None)
                    }
                    other => other,
                });
            }
        };
        let latest = latest
            .await
            .map_err(|e| self.error("eth_getBlockByNumber", e, &At::Latest))?
            .ok_or_else(|| ChainError::UnknownBlock {
                block: "latest".into(),
            })?;
        let gas_price: u128 = gas_price
            .await
            .map_err(|e| self.error("eth_gasPrice", e, &At::Latest))?
            .to();
        // Nodes without eth_maxPriorityFeePerGas: the gas price over the base fee.
        let base_fee = latest.base_fee_per_gas.map(|fee| fee.to::<u128>());
        let tip: u128 = match tip.await {
            Ok(tip) => tip.to(),
            Err(_) => gas_price.saturating_sub(base_fee.unwrap_or(0)).max(1),
        };
        let margin = gas.saturating_mul(self.inner.options.gas_margin_percent) / 100;
        let gas_limit = gas.saturating_add(margin).min(latest.gas_limit.to());
        let fees = match base_fee {
            // Twice the base fee covers six full blocks of +12.5% before the transaction is
            // priced out; the sender pays only the base fee of its block plus the tip.
            Some(base_fee) => Fees::Eip1559 {
                max_fee: base_fee.saturating_mul(2).saturating_add(tip),
                tip,
            },
            None => Fees::Legacy(gas_price),
        };

        let mut nonce = self.inner.nonce.lock().await;
        // Twice at most: a nonce that another user of the same key took is asked again.
        for attempt in 0..2 {
            let next = self.next_nonce(from, &nonce).await?;
            let (hash, raw) = sign(signer, chain_id, next, gas_limit, fees, to, input.clone())?;
            match self
                .inner
                .rpc
                .request::<_, TxHash>("eth_sendRawTransaction", (raw,))
                .await
            {
                Ok(_) => {
                    *nonce = NonceState::Sent {
                        next: next + 1,
                        last: hash,
                    };
                    return Ok(hash);
                }
                Err(RpcError::ErrorResp(payload)) => {
                    let message = payload.message.to_lowercase();
                    if message.contains("already known") || message.contains("known transaction") {
                        // This very transaction is in the pool already (a retry of ours).
                        *nonce = NonceState::Sent {
                            next: next + 1,
                            last: hash,
                        };
                        return Ok(hash);
                    }
                    // Refused, so the nonce is still free; what the node counts decides next.
                    *nonce = NonceState::Unknown;
                    if message.contains("nonce too low") && attempt == 0 {
                        continue;
                    }
                    return Err(match revert_reason(&payload) {
                        Some(reason) => ChainError::from_revert(&reason, id, None),
                        None => ChainError::Rpc {
                            method: "eth_sendRawTransaction".into(),
                            code: payload.code,
                            message: payload.message.to_string(),
                        },
                    });
                }
                Err(RpcError::Transport(kind)) if never_sent(&kind) => {
                    return Err(ChainError::Unreachable {
                        url: self.inner.endpoint.clone(),
                        reason: transport_reason(&kind),
                    });
                }
                Err(e) => {
                    // The request may have reached the node: if it did, the transaction is
                    // known by its hash and the next send counts it.
                    *nonce = NonceState::Sent {
                        next: next + 1,
                        last: hash,
                    };
                    return Err(ChainError::SendOutcomeUnknown {
                        tx: hash,
                        reason: match &e {
                            RpcError::Transport(kind) => transport_reason(kind),
                            other => other.to_string(),
                        },
                    });
                }
            }
        }
        unreachable!("the second attempt returns")
    }

    /// The nonce of the next transaction from `from`, under the nonce lock: the node's count
    /// of the sender's transactions (pending ones included), unless it does not count the last
    /// one this client sent yet (a load-balanced provider's other backend has not seen it):
    /// then one past that, as long as the node knows that transaction. A transaction the node
    /// lost (a reorg dropped it, the node restarted without its pool) leaves no gap behind.
    pub(super) async fn next_nonce(&self, from: Address, state: &NonceState) -> Result<u64> {
        let counted: U64 = self
            .request("eth_getTransactionCount", (from, "pending"))
            .await?;
        let counted: u64 = counted.to();
        Ok(match *state {
            NonceState::Sent { next, last } if next > counted => {
                let known: Option<serde_json::Value> =
                    self.request("eth_getTransactionByHash", (last,)).await?;
                if known.is_some() { next } else { counted }
            }
            _ => counted,
        })
    }

    /// The receipt of a mined transaction; for a failed one, its revert reason, found by
    /// running the same call again at its block (the state after it: an id inserted by an
    /// earlier transaction of the block is there).
    pub(super) async fn receipt(&self, receipt: RpcReceipt) -> Receipt {
        let success = receipt.status.is_some_and(|status| status == U64::from(1));
        let revert_reason = if success {
            None
        } else {
            Some(self.replay(&receipt).await)
        };
        Receipt {
            tx: receipt.transaction_hash,
            block: receipt.block_number.to(),
            block_hash: receipt.block_hash,
            success,
            revert_reason,
            gas_used: receipt.gas_used.to(),
            contract_address: receipt.contract_address,
        }
    }

    pub(super) async fn replay(&self, receipt: &RpcReceipt) -> String {
        let tx: RpcTransaction = match self
            .request::<_, Option<RpcTransaction>>(
                "eth_getTransactionByHash",
                (receipt.transaction_hash,),
            )
            .await
        {
            Ok(Some(tx)) => tx,
            _ => return "failed (the transaction could not be read back for its reason)".into(),
        };
        if receipt.gas_used == tx.gas {
            return format!("out of gas (used all {} of its gas limit)", tx.gas);
        }
        let mut request = CallRequest::new(Some(tx.from), tx.to, tx.input);
        request.gas = Some(tx.gas.to());
        let at = At::Number(receipt.block_number.to());
        match self
            .request_at::<_, Bytes>("eth_call", (request, at.param()), &at)
            .await
        {
            Err(ChainError::Reverted { reason, .. }) => reason,
            _ => "failed, and succeeds when replayed at its block: no reason to give".into(),
        }
    }
}

/// The sender's nonce as this client knows it.
#[derive(Debug, Clone, Copy)]
pub(super) enum NonceState {
    /// Nothing sent yet, or the last send was refused: the node's count decides.
    Unknown,
    /// `last` was sent (or may have been) with nonce `next - 1`.
    Sent { next: u64, last: TxHash },
}

#[derive(Debug, Clone, Copy)]
enum Fees {
    Eip1559 { max_fee: u128, tip: u128 },
    Legacy(u128),
}

/// Signs a transaction; returns its hash and its raw encoding.
fn sign(
    signer: &PrivateKeySigner,
    chain_id: u64,
    nonce: u64,
    gas_limit: u64,
    fees: Fees,
    to: TxKind,
    input: Bytes,
) -> Result<(TxHash, Bytes)> {
    let failed = |e: alloy::signers::Error| ChainError::Malformed {
        method: "signing".into(),
        reason: e.to_string(),
    };
    let envelope: TxEnvelope = match fees {
        Fees::Eip1559 { max_fee, tip } => {
            let tx = TxEip1559 {
                chain_id,
                nonce,
                gas_limit,
                max_fee_per_gas: max_fee,
                max_priority_fee_per_gas: tip,
                to,
                value: U256::ZERO,
                access_list: Default::default(),
                input,
            };
            let signature = signer
                .sign_hash_sync(&tx.signature_hash())
                .map_err(failed)?;
            tx.into_signed(signature).into()
        }
        Fees::Legacy(gas_price) => {
            let tx = TxLegacy {
                chain_id: Some(chain_id),
                nonce,
                gas_price,
                gas_limit,
                to,
                value: U256::ZERO,
                input,
            };
            let signature = signer
                .sign_hash_sync(&tx.signature_hash())
                .map_err(failed)?;
            tx.into_signed(signature).into()
        }
    };
    Ok((*envelope.tx_hash(), envelope.encoded_2718().into()))
}
