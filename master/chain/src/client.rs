//! [`ChainClient`]: reads the contract at pinned blocks, in batches, and writes to it from one
//! sender with nonces in order.

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use alloy::consensus::{SignableTransaction, TxEip1559, TxEnvelope, TxLegacy};
use alloy::eips::eip2718::Encodable2718;
use alloy::primitives::{Address, B256, Bytes, TxHash, TxKind, U64, U256};
use alloy::rpc::client::{ClientBuilder, RpcClient};
use alloy::rpc::json_rpc::{ErrorPayload, RpcError, RpcRecv, RpcSend};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::{Panic, Revert, SolCall, SolError};
use alloy::transports::http::Http;
use alloy::transports::{TransportError, TransportErrorKind};
use futures_util::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::contract::{PolicyLedger, creation_bytecode, runtime_bytecode};
use crate::error::ChainError;
use crate::stats::{Counters, CountingLayer, RpcStats};

mod rpc;
use rpc::{
    CallRequest, RpcBlock, RpcReceipt, RpcTransaction, decode, never_sent, redact, revert_reason,
    to_u64, transport_reason,
};
mod write;
use write::NonceState;

type Result<T, E = ChainError> = std::result::Result<T, E>;

/// How a [`ChainClient`] talks to its node. The defaults suit a public endpoint and a local
/// node alike.
#[derive(Debug, Clone)]
pub struct ChainOptions {
    /// How long opening a connection to the node may take.
    pub connect_timeout: Duration,
    /// How long one HTTP request (a call or a batch) may take before the node counts as
    /// unreachable.
    pub request_timeout: Duration,
    /// Contract calls per JSON-RPC batch (one HTTP request). 1 sends every call alone, for
    /// endpoints that refuse batches. Providers cap batches (geth: 1,000 calls, 25 MB of
    /// answers), and a batch of policies of 16 KB each is about 100 × 32 KB of hex: 100 stays
    /// well inside both.
    pub batch_size: usize,
    /// Batches in flight at once for one read. A few overlap the node's work with the round
    /// trips without looking like a flood to a rate-limited provider.
    pub concurrent_batches: usize,
    /// How often [`ChainClient::wait_receipt`] asks for a receipt.
    pub receipt_poll: Duration,
    /// Percent added to the node's gas estimate: the state may change between the estimate and
    /// the block (a delete that moves a longer policy into the hole costs more).
    pub gas_margin_percent: u64,
}

impl Default for ChainOptions {
    fn default() -> Self {
        ChainOptions {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            batch_size: 100,
            concurrent_batches: 4,
            receipt_poll: Duration::from_millis(100),
            gas_margin_percent: 25,
        }
    }
}

/// A block of the chain, as far as following the contract needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Block {
    /// Its number (height).
    pub number: u64,
    /// Its hash: what tells two blocks of the same number apart after a reorg.
    pub hash: B256,
    /// Its timestamp, in seconds since the Unix epoch (the follower's lag in seconds).
    pub timestamp: u64,
}

/// The state a read sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// The node's latest block. A read of several requests first asks for the head and pins
    /// itself to it, so it still sees one state.
    Latest,
    /// The block of this number, whichever it is when each request is answered.
    Number(u64),
    /// This block: each request is answered at its number, and checked (in the same batch)
    /// to be still this block; after a reorg the read fails with
    /// [`ChainError::UnknownBlock`]. Numbers and a check rather than EIP-1898's block-hash
    /// parameter, which ganache does not take.
    Block(Block),
}

impl From<u64> for At {
    fn from(number: u64) -> At {
        At::Number(number)
    }
}

impl From<Block> for At {
    fn from(block: Block) -> At {
        At::Block(block)
    }
}

impl From<&Block> for At {
    fn from(block: &Block) -> At {
        At::Block(*block)
    }
}

impl At {
    /// The JSON-RPC block parameter: `latest` or a hex number.
    fn param(&self) -> String {
        match self {
            At::Latest => "latest".into(),
            At::Number(number) => format!("{number:#x}"),
            At::Block(block) => format!("{:#x}", block.number),
        }
    }

    fn describe(&self) -> String {
        match self {
            At::Latest => "latest".into(),
            At::Number(number) => number.to_string(),
            At::Block(block) => format!("{} ({})", block.number, block.hash),
        }
    }
}

/// The contract's two counters, read together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// `transaction_count()`: inserts, updates and deletes so far.
    pub transaction_count: u64,
    /// `num_policies()`: policies stored.
    pub num_policies: u64,
}

/// One stored policy: its id and JSON text, as the contract holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainPolicy {
    /// `policy_ids(i)`.
    pub id: String,
    /// `policies(i)`.
    pub json: String,
}

/// The outcome of a mined transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The transaction.
    pub tx: TxHash,
    /// The number of the block it was mined in.
    pub block: u64,
    /// That block's hash.
    pub block_hash: B256,
    /// Whether it succeeded (status 1). A failed one changed nothing but its sender's nonce
    /// and balance.
    pub success: bool,
    /// Why it failed: the contract's revert reason, found by replaying the transaction at its
    /// block (a receipt carries none); a description when there was none to find.
    pub revert_reason: Option<String>,
    /// Gas used.
    pub gas_used: u64,
    /// The contract it created (a deployment).
    pub contract_address: Option<Address>,
}

impl Receipt {
    /// The receipt when the transaction succeeded; otherwise the error its revert reason
    /// stands for ([`ChainError::from_revert`]) about policy `id`.
    pub fn check(self, id: &str) -> Result<Receipt> {
        if self.success {
            return Ok(self);
        }
        let reason = self.revert_reason.as_deref().unwrap_or("no reason given");
        Err(ChainError::from_revert(reason, id, Some(self.tx)))
    }
}

/// What [`ChainClient::check`] found out about the node and the contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainInfo {
    /// The node's chain id.
    pub chain_id: u64,
    /// The node's head.
    pub head: Block,
    /// Whether the code at the contract address is exactly this crate's `PolicyLedger` (false
    /// for another deployment of EdgeLake's interface, such as EdgeLake's own contract).
    pub is_policy_ledger: bool,
    /// The sender's address, when the client has a key.
    pub sender: Option<Address>,
}

/// A client of one contract on one node.
///
/// Cheap to clone (the clones share the connection pool, the nonce and the counters). It
/// connects lazily: [`ChainClient::connect`] makes no request, so a master starts while its
/// node is down, and each call fails with [`ChainError::Unreachable`] until it is back.
#[derive(Clone)]
pub struct ChainClient {
    inner: Arc<Inner>,
}

struct Inner {
    rpc: RpcClient,
    /// The URL without its path and credentials: what errors and logs show.
    endpoint: String,
    contract: Address,
    signer: Option<PrivateKeySigner>,
    configured_chain_id: Option<u64>,
    node_chain_id: tokio::sync::OnceCell<u64>,
    /// What this client last sent. Held across choosing the nonce, signing and sending, so
    /// concurrent writers get consecutive nonces and the node receives them in order.
    nonce: tokio::sync::Mutex<NonceState>,
    counters: Arc<Counters>,
    options: ChainOptions,
}

impl std::fmt::Debug for ChainClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key, nor the URL's path (which may hold an API key).
        f.debug_struct("ChainClient")
            .field("endpoint", &self.inner.endpoint)
            .field("contract", &self.inner.contract)
            .field("sender", &self.sender())
            .finish()
    }
}

impl ChainClient {
    /// A client of the contract at `contract` through the node at `rpc_url` (`http://` or
    /// `https://`), writing with `key` (reads only without one), for chain `chain_id` (asked
    /// from the node on first need when `None`). Makes no request.
    pub fn connect(
        rpc_url: &str,
        contract: Address,
        key: Option<PrivateKeySigner>,
        chain_id: Option<u64>,
    ) -> Result<ChainClient> {
        Self::connect_with(rpc_url, contract, key, chain_id, ChainOptions::default())
    }

    /// [`ChainClient::connect`] with `options`.
    pub fn connect_with(
        rpc_url: &str,
        contract: Address,
        key: Option<PrivateKeySigner>,
        chain_id: Option<u64>,
        options: ChainOptions,
    ) -> Result<ChainClient> {
        // The URL is not repeated in errors: its path or user part may be an API key.
        let url: reqwest::Url = rpc_url
            .parse()
            .map_err(|e| ChainError::InvalidUrl(format!("not a URL ({e})")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ChainError::InvalidUrl(format!(
                "the scheme is {:?}; only http and https are supported",
                url.scheme()
            )));
        }
        let endpoint = redact(&url);
        let http = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .timeout(options.request_timeout)
            .build()
            .map_err(|e| ChainError::Unreachable {
                url: endpoint.clone(),
                reason: format!("cannot set up an HTTP client: {e}"),
            })?;
        let counters = Arc::new(Counters::default());
        let is_local = url
            .host_str()
            .is_some_and(|host| matches!(host, "localhost" | "127.0.0.1" | "[::1]"));
        let rpc = ClientBuilder::default()
            .layer(CountingLayer(counters.clone()))
            .transport(Http::with_client(http, url), is_local);
        Ok(ChainClient {
            inner: Arc::new(Inner {
                rpc,
                endpoint,
                contract,
                signer: key,
                configured_chain_id: chain_id,
                node_chain_id: tokio::sync::OnceCell::new(),
                nonce: tokio::sync::Mutex::new(NonceState::Unknown),
                counters,
                options,
            }),
        })
    }

    /// Deploys a new `PolicyLedger` from the committed artifact with `key`, waits (up to
    /// `timeout`) for it to be mined, and returns a client of it with that key.
    pub async fn deploy(
        rpc_url: &str,
        key: PrivateKeySigner,
        chain_id: Option<u64>,
        options: ChainOptions,
        timeout: Duration,
    ) -> Result<ChainClient> {
        let deployer = Self::connect_with(
            rpc_url,
            Address::ZERO,
            Some(key.clone()),
            chain_id,
            options.clone(),
        )?;
        let tx = deployer
            .send(TxKind::Create, creation_bytecode(), "")
            .await?;
        let receipt = deployer.wait_receipt(tx, timeout).await?;
        if !receipt.success {
            return Err(ChainError::Reverted {
                reason: receipt
                    .revert_reason
                    .unwrap_or_else(|| "the deployment failed".into()),
                tx: Some(tx),
            });
        }
        let address = receipt
            .contract_address
            .ok_or_else(|| ChainError::Malformed {
                method: "eth_getTransactionReceipt".into(),
                reason: "a deployment's receipt without a contract address".into(),
            })?;
        Self::connect_with(rpc_url, address, Some(key), chain_id, options)
    }

    /// The contract's address.
    pub fn contract(&self) -> Address {
        self.inner.contract
    }

    /// The address writes are sent from, when the client has a key.
    pub fn sender(&self) -> Option<Address> {
        self.inner.signer.as_ref().map(|signer| signer.address())
    }

    /// The node's URL as errors show it: scheme, host and port, without the path or
    /// credentials (where providers put API keys).
    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    /// The HTTP requests and JSON-RPC calls this client (and its clones) made so far.
    pub fn stats(&self) -> RpcStats {
        self.inner.counters.read()
    }

    /// The chain id transactions are signed for: the configured one, else the node's (asked
    /// once).
    pub async fn chain_id(&self) -> Result<u64> {
        if let Some(id) = self.inner.configured_chain_id {
            return Ok(id);
        }
        self.node_chain_id().await
    }

    async fn node_chain_id(&self) -> Result<u64> {
        self.inner
            .node_chain_id
            .get_or_try_init(|| async {
                let id: U64 = self.request("eth_chainId", ()).await?;
                Ok(id.to())
            })
            .await
            .copied()
    }

    /// Asks the node for its chain id, its head and the code at the contract address: the
    /// chain id must be the configured one ([`ChainError::WrongChain`]) and there must be code
    /// ([`ChainError::NoContract`]). For a master's start-up and health.
    pub async fn check(&self) -> Result<ChainInfo> {
        let chain_id = self.node_chain_id().await?;
        if let Some(expected) = self.inner.configured_chain_id
            && expected != chain_id
        {
            return Err(ChainError::WrongChain {
                expected,
                actual: chain_id,
            });
        }
        let head = self.head().await?;
        let code: Bytes = self
            .request(
                "eth_getCode",
                (self.inner.contract, At::Block(head).param()),
            )
            .await?;
        if code.is_empty() {
            return Err(ChainError::NoContract {
                address: self.inner.contract,
            });
        }
        Ok(ChainInfo {
            chain_id,
            head,
            is_policy_ledger: code == runtime_bytecode(),
            sender: self.sender(),
        })
    }

    /// The node's latest block.
    pub async fn head(&self) -> Result<Block> {
        self.block_at(At::Latest).await
    }

    /// The block of `number`; [`ChainError::UnknownBlock`] past the head.
    pub async fn block(&self, number: u64) -> Result<Block> {
        self.block_at(At::Number(number)).await
    }

    async fn block_at(&self, at: At) -> Result<Block> {
        let block: Option<RpcBlock> = self
            .request_at("eth_getBlockByNumber", (at.param(), false), &at)
            .await?;
        block
            .map(RpcBlock::block)
            .ok_or_else(|| ChainError::UnknownBlock {
                block: at.describe(),
            })
    }

    /// `transaction_count()` at `at`.
    pub async fn transaction_count(&self, at: impl Into<At>) -> Result<u64> {
        let count = self.view(PolicyLedger::transaction_countCall {}, at.into());
        to_u64(count.await?, "transaction_count")
    }

    /// `num_policies()` at `at`.
    pub async fn num_policies(&self, at: impl Into<At>) -> Result<u64> {
        let count = self.view(PolicyLedger::num_policiesCall {}, at.into());
        to_u64(count.await?, "num_policies")
    }

    /// `transaction_count()` and `num_policies()` at `at`, in one request: what a poll reads
    /// to tell whether anything changed.
    pub async fn counts(&self, at: impl Into<At>) -> Result<Counts> {
        let at = at.into();
        let param = at.param();
        let mut batch = self.inner.rpc.new_batch();
        let check = match at {
            At::Block(_) => Some(self.add(&mut batch, "eth_getBlockByNumber", &(&param, false))?),
            _ => None,
        };
        let count = self.add(
            &mut batch,
            "eth_call",
            &(self.call(&PolicyLedger::transaction_countCall {}), &param),
        )?;
        let policies = self.add(
            &mut batch,
            "eth_call",
            &(self.call(&PolicyLedger::num_policiesCall {}), &param),
        )?;
        batch
            .send()
            .await
            .map_err(|e| self.error("eth_call", e, &at))?;
        if let Some(check) = check {
            self.check_block(check.await, &at)?;
        }
        let count: Bytes = count.await.map_err(|e| self.error("eth_call", e, &at))?;
        let policies: Bytes = policies.await.map_err(|e| self.error("eth_call", e, &at))?;
        Ok(Counts {
            transaction_count: to_u64(
                decode::<PolicyLedger::transaction_countCall>(&count, self.inner.contract)?,
                "transaction_count",
            )?,
            num_policies: to_u64(
                decode::<PolicyLedger::num_policiesCall>(&policies, self.inner.contract)?,
                "num_policies",
            )?,
        })
    }

    /// Every policy id, in the contract's order: `num_policies()`, then `policy_ids(i)` for
    /// each, in batches, all at one block (the head when `at` is [`At::Latest`]).
    pub async fn policy_ids(&self, at: impl Into<At>) -> Result<Vec<String>> {
        let at = self.pin(at.into()).await?;
        let count = self.num_policies(at).await?;
        self.policy_ids_in(0..count, at).await
    }

    /// The ids at the positions `range` of the contract's array (`policy_ids(i)` for each), in
    /// batches, all at one block: what a follower reads of a contract that only grew. A
    /// position past the end reverts ([`ChainError::Reverted`]).
    pub async fn policy_ids_in(&self, range: Range<u64>, at: impl Into<At>) -> Result<Vec<String>> {
        let at = self.pin(at.into()).await?;
        let calls = range
            .map(|i| PolicyLedger::policy_idsCall(U256::from(i)))
            .collect();
        self.views(calls, at).await
    }

    /// The JSON texts of the policies at `indexes` (`policies(i)`), in batches, all at one
    /// block (the head when `at` is [`At::Latest`]). An index past the end reverts
    /// ([`ChainError::Reverted`]).
    pub async fn policies(&self, indexes: &[u64], at: impl Into<At>) -> Result<Vec<String>> {
        let at = self.pin(at.into()).await?;
        let calls = indexes
            .iter()
            .map(|&i| PolicyLedger::policiesCall {
                index: U256::from(i),
            })
            .collect();
        self.views(calls, at).await
    }

    /// Every policy, id and text, in the contract's order, all at one block: `num_policies()`,
    /// then `policy_ids(i)` and `policies(i)` for each, in batches. What a first sync reads.
    pub async fn all_policies(&self, at: impl Into<At>) -> Result<Vec<ChainPolicy>> {
        let at = self.pin(at.into()).await?;
        let count = self.num_policies(at).await?;
        let indexes: Vec<u64> = (0..count).collect();
        let (ids, texts) = tokio::try_join!(
            self.views(
                indexes
                    .iter()
                    .map(|&i| PolicyLedger::policy_idsCall(U256::from(i)))
                    .collect(),
                at
            ),
            self.policies(&indexes, at),
        )?;
        Ok(ids
            .into_iter()
            .zip(texts)
            .map(|(id, json)| ChainPolicy { id, json })
            .collect())
    }

    /// `getPolicy(id)`: the text of one policy, [`ChainError::NotFound`] when it is not stored.
    /// Only on `PolicyLedger`: EdgeLake's own contract answers `getPolicy` with an event, not a
    /// return value (read it by index there: [`ChainClient::policies`]).
    pub async fn get_policy(&self, id: &str, at: impl Into<At>) -> Result<String> {
        let call = PolicyLedger::getPolicyCall {
            policy_id: id.to_string(),
        };
        match self.view(call, at.into()).await {
            Ok(text) => Ok(text),
            Err(ChainError::Reverted { reason, tx }) => {
                Err(ChainError::from_revert(&reason, id, tx))
            }
            Err(e) => Err(e),
        }
    }

    /// `getPolicyOwner(id)`: the account that inserted a policy, `None` when it is not stored.
    /// Only on `PolicyLedger`, as [`ChainClient::get_policy`].
    pub async fn policy_owner(&self, id: &str, at: impl Into<At>) -> Result<Option<Address>> {
        let call = PolicyLedger::getPolicyOwnerCall {
            policy_id: id.to_string(),
        };
        let owner = self.view(call, at.into()).await?;
        Ok((owner != Address::ZERO).then_some(owner))
    }

    /// Sends `call` to the contract ([`ChainClient::send`]); `id` names the policy in refusals.
    async fn send_call<C: SolCall>(&self, call: &C, id: &str) -> Result<TxHash> {
        let input = call.abi_encode().into();
        self.send(TxKind::Call(self.inner.contract), input, id)
            .await
    }

    /// Sends `insert(id, json)`. The node's gas estimate runs it first: an id that is stored
    /// fails here with [`ChainError::AlreadyExists`], sending nothing. Returns once the node
    /// took the transaction; [`ChainClient::wait_receipt`] tells whether it was mined and
    /// succeeded (another writer may take the id in between).
    pub async fn insert(&self, id: &str, json: &str) -> Result<TxHash> {
        let call = PolicyLedger::insertCall {
            policy_id: id.to_string(),
            json: json.to_string(),
        };
        self.send_call(&call, id).await
    }

    /// Sends `updatePolicy(id, json)`: [`ChainError::NotFound`] or [`ChainError::NotOwner`]
    /// at the estimate, as [`ChainClient::insert`].
    pub async fn update(&self, id: &str, json: &str) -> Result<TxHash> {
        let call = PolicyLedger::updatePolicyCall {
            policy_id: id.to_string(),
            json: json.to_string(),
        };
        self.send_call(&call, id).await
    }

    /// Sends `deletePolicy(id)`: [`ChainError::NotFound`] at the estimate, as
    /// [`ChainClient::insert`].
    pub async fn delete(&self, id: &str) -> Result<TxHash> {
        let call = PolicyLedger::deletePolicyCall {
            policy_id: id.to_string(),
        };
        self.send_call(&call, id).await
    }

    /// Waits up to `timeout` for the receipt of `tx`, asking every
    /// [`ChainOptions::receipt_poll`]. The node being out of reach meanwhile is waited out
    /// too; past the timeout: [`ChainError::Timeout`] with the hash. A failed transaction's
    /// receipt comes with its revert reason ([`Receipt::check`] maps it).
    pub async fn wait_receipt(&self, tx: TxHash, timeout: Duration) -> Result<Receipt> {
        let deadline = Instant::now() + timeout;
        let timed_out = || ChainError::Timeout { tx, timeout };
        loop {
            let asked = tokio::time::timeout_at(
                deadline,
                self.request::<_, Option<RpcReceipt>>("eth_getTransactionReceipt", (tx,)),
            )
            .await
            .map_err(|_| timed_out())?;
            match asked {
                Ok(Some(receipt)) => return Ok(self.receipt(receipt).await),
                Ok(None) => {}
                Err(ChainError::Unreachable { .. }) => {}
                Err(e) => return Err(e),
            }
            if Instant::now() + self.inner.options.receipt_poll >= deadline {
                return Err(timed_out());
            }
            tokio::time::sleep(self.inner.options.receipt_poll).await;
        }
    }

    /// Any JSON-RPC method, with its parameters and answer as JSON: a node's own methods
    /// (ganache's `evm_snapshot`, `evm_revert`, `evm_mine` in tests), counted like the rest.
    pub async fn rpc(
        &self,
        method: &'static str,
        params: serde_json::Value,
    ) -> Result<serde_json::Value> {
        self.request(method, params).await
    }
}
