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
        let [count] = self
            .views(vec![PolicyLedger::transaction_countCall {}], at.into())
            .await?[..]
        else {
            unreachable!("one call, one answer")
        };
        to_u64(count, "transaction_count")
    }

    /// `num_policies()` at `at`.
    pub async fn num_policies(&self, at: impl Into<At>) -> Result<u64> {
        let [count] = self
            .views(vec![PolicyLedger::num_policiesCall {}], at.into())
            .await?[..]
        else {
            unreachable!("one call, one answer")
        };
        to_u64(count, "num_policies")
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
        match self.views(vec![call], at.into()).await {
            Ok(mut texts) => Ok(texts.remove(0)),
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
        let owner = self.views(vec![call], at.into()).await?.remove(0);
        Ok((owner != Address::ZERO).then_some(owner))
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
        self.send(
            TxKind::Call(self.inner.contract),
            call.abi_encode().into(),
            id,
        )
        .await
    }

    /// Sends `updatePolicy(id, json)`: [`ChainError::NotFound`] or [`ChainError::NotOwner`]
    /// at the estimate, as [`ChainClient::insert`].
    pub async fn update(&self, id: &str, json: &str) -> Result<TxHash> {
        let call = PolicyLedger::updatePolicyCall {
            policy_id: id.to_string(),
            json: json.to_string(),
        };
        self.send(
            TxKind::Call(self.inner.contract),
            call.abi_encode().into(),
            id,
        )
        .await
    }

    /// Sends `deletePolicy(id)`: [`ChainError::NotFound`] at the estimate, as
    /// [`ChainClient::insert`].
    pub async fn delete(&self, id: &str) -> Result<TxHash> {
        let call = PolicyLedger::deletePolicyCall {
            policy_id: id.to_string(),
        };
        self.send(
            TxKind::Call(self.inner.contract),
            call.abi_encode().into(),
            id,
        )
        .await
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

    // ---- reads ----

    /// `at`, with [`At::Latest`] replaced by the head, so that a read of several requests sees
    /// one block.
    async fn pin(&self, at: At) -> Result<At> {
        Ok(match at {
            At::Latest => At::Block(self.head().await?),
            other => other,
        })
    }

    /// The eth_call request of `call` to the contract.
    fn call<C: SolCall>(&self, call: &C) -> CallRequest {
        CallRequest::new(None, Some(self.inner.contract), call.abi_encode().into())
    }

    /// Runs view `calls` at `at`, `batch_size` per JSON-RPC batch, `concurrent_batches` batches
    /// at once, and returns their answers in order. With [`At::Block`] each batch also asks
    /// for the block of that number and fails if its hash is not the pinned one.
    async fn views<C>(&self, calls: Vec<C>, at: At) -> Result<Vec<C::Return>>
    where
        C: SolCall + Send + Sync,
        C::Return: Send,
    {
        let size = self.inner.options.batch_size.max(1);
        let mut chunks = Vec::with_capacity(calls.len().div_ceil(size));
        let mut calls = calls.into_iter().peekable();
        while calls.peek().is_some() {
            chunks.push(calls.by_ref().take(size).collect::<Vec<C>>());
        }
        // Each chunk moves into its future: a closure borrowing the chunks makes a future
        // that rustc cannot prove `Send` for every lifetime, and callers box it as `Send`.
        let answers: Vec<Vec<C::Return>> = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|chunk| async move { self.view_batch(&chunk, at).await }),
        )
        .buffered(self.inner.options.concurrent_batches.max(1))
        .try_collect()
        .await?;
        Ok(answers.into_iter().flatten().collect())
    }

    async fn view_batch<C: SolCall>(&self, calls: &[C], at: At) -> Result<Vec<C::Return>> {
        let param = at.param();
        if calls.len() == 1 && !matches!(at, At::Block(_)) {
            // A lone call needs no batch (and some endpoints answer batches more slowly).
            let answer: Bytes = self
                .request_at("eth_call", (self.call(&calls[0]), &param), &at)
                .await?;
            return Ok(vec![decode::<C>(&answer, self.inner.contract)?]);
        }
        let mut batch = self.inner.rpc.new_batch();
        let check = match at {
            At::Block(_) => Some(self.add(&mut batch, "eth_getBlockByNumber", &(&param, false))?),
            _ => None,
        };
        let waiters = calls
            .iter()
            .map(|call| self.add::<_, Bytes>(&mut batch, "eth_call", &(self.call(call), &param)))
            .collect::<Result<Vec<_>>>()?;
        batch
            .send()
            .await
            .map_err(|e| self.error("eth_call", e, &at))?;
        if let Some(check) = check {
            self.check_block(check.await, &at)?;
        }
        let mut answers = Vec::with_capacity(calls.len());
        for waiter in waiters {
            let answer = waiter.await.map_err(|e| self.error("eth_call", e, &at))?;
            answers.push(decode::<C>(&answer, self.inner.contract)?);
        }
        Ok(answers)
    }

    /// Adds a call to a batch.
    fn add<P: RpcSend, R: RpcRecv>(
        &self,
        batch: &mut alloy::rpc::client::BatchRequest<'_>,
        method: &'static str,
        params: &P,
    ) -> Result<alloy::rpc::client::Waiter<R>> {
        batch
            .add_call(method, params)
            .map_err(|e| self.error(method, e, &At::Latest))
    }

    /// The pinned block's check: the block of its number must still have its hash.
    fn check_block(&self, answer: Result<Option<RpcBlock>, TransportError>, at: &At) -> Result<()> {
        let At::Block(pinned) = at else {
            return Ok(());
        };
        match answer.map_err(|e| self.error("eth_getBlockByNumber", e, at))? {
            Some(block) if block.hash == pinned.hash => Ok(()),
            _ => Err(ChainError::UnknownBlock {
                block: at.describe(),
            }),
        }
    }

    // ---- requests and errors ----

    async fn request<P: RpcSend, R: RpcRecv>(&self, method: &'static str, params: P) -> Result<R> {
        self.request_at(method, params, &At::Latest).await
    }

    /// A single request; `at` only names the block in an [`ChainError::UnknownBlock`].
    fn request_at<P: RpcSend, R: RpcRecv>(
        &self,
        method: &'static str,
        params: P,
        at: &At,
    ) -> impl Future<Output = Result<R>> + Send {
        let call = self.inner.rpc.request(method, params);
        let at = *at;
        async move { call.await.map_err(|e| self.error(method, e, &at)) }
    }

    /// The [`ChainError`] of a failed request.
    fn error(&self, method: &str, error: TransportError, at: &At) -> ChainError {
        match error {
            RpcError::ErrorResp(payload) => {
                if let Some(reason) = revert_reason(&payload) {
                    return ChainError::Reverted { reason, tx: None };
                }
                let message = payload.message.to_lowercase();
                // geth, op-geth and ganache: "header not found"; others "unknown block".
                if ["header not found", "unknown block", "block not found"]
                    .iter()
                    .any(|m| message.contains(m))
                {
                    return ChainError::UnknownBlock {
                        block: at.describe(),
                    };
                }
                ChainError::Rpc {
                    method: method.to_string(),
                    code: payload.code,
                    message: payload.message.to_string(),
                }
            }
            RpcError::Transport(kind) => ChainError::Unreachable {
                url: self.inner.endpoint.clone(),
                reason: transport_reason(&kind),
            },
            RpcError::DeserError { err, text } => ChainError::Malformed {
                method: method.to_string(),
                reason: format!("{err}: {}", truncate(&text, 200)),
            },
            other => ChainError::Malformed {
                method: method.to_string(),
                reason: other.to_string(),
            },
        }
    }
}

/// A contract call's answer decoded; an empty answer means no code at the address.
fn decode<C: SolCall>(answer: &[u8], contract: Address) -> Result<C::Return> {
    if answer.is_empty() {
        return Err(ChainError::NoContract { address: contract });
    }
    C::abi_decode_returns(answer).map_err(|e| ChainError::Malformed {
        method: C::SIGNATURE.to_string(),
        reason: e.to_string(),
    })
}

fn to_u64(value: U256, what: &str) -> Result<u64> {
    u64::try_from(value).map_err(|_| ChainError::Malformed {
        method: what.to_string(),
        reason: format!("{value} does not fit 64 bits"),
    })
}

/// Whether a transport error happened before the request left (connection refused, no route):
/// a transaction in it certainly did not reach the node.
fn never_sent(kind: &TransportErrorKind) -> bool {
    kind.as_custom()
        .and_then(|e| e.downcast_ref::<reqwest::Error>())
        .is_some_and(|e| e.is_connect())
}

/// What went wrong with a request, without the URL (reqwest's errors name it, and its path may
/// hold an API key): what failed, then each underlying cause.
fn transport_reason(kind: &TransportErrorKind) -> String {
    match kind {
        TransportErrorKind::HttpError(http) => {
            format!("HTTP status {}: {}", http.status, truncate(&http.body, 200))
        }
        TransportErrorKind::Custom(error) => match error.downcast_ref::<reqwest::Error>() {
            Some(error) => {
                let mut reason = if error.is_timeout() {
                    "no answer in time".to_string()
                } else if error.is_connect() {
                    "cannot connect".to_string()
                } else {
                    "the request failed".to_string()
                };
                let mut source = std::error::Error::source(error);
                while let Some(cause) = source {
                    reason.push_str(&format!(": {cause}"));
                    source = cause.source();
                }
                reason
            }
            None => error.to_string(),
        },
        other => other.to_string(),
    }
}

/// The revert reason of an error answer, if it is a revert: decoded from the revert data
/// (`Error(string)`, or a `Panic(uint256)` code), else taken from the message
/// (`execution reverted: REASON`, ganache's `... revert REASON`); "no reason given" for a
/// revert without one.
fn revert_reason(payload: &ErrorPayload) -> Option<String> {
    let message = &payload.message;
    if !message.to_lowercase().contains("revert") {
        return None;
    }
    if let Some(data) = payload.as_revert_data() {
        if let Ok(revert) = Revert::abi_decode(&data) {
            return Some(revert.reason);
        }
        if let Ok(panic) = Panic::abi_decode(&data) {
            return Some(match panic.kind() {
                Some(kind) => format!("panic: {kind}"),
                None => format!("panic code {}", panic.code),
            });
        }
    }
    for marker in ["execution reverted: ", "revert "] {
        if let Some(at) = message.find(marker) {
            let reason = message[at + marker.len()..].trim();
            if !reason.is_empty() {
                return Some(reason.to_string());
            }
        }
    }
    Some("no reason given".into())
}

/// `scheme://host:port`, with `/…` when the URL has a path: what is safe to log.
fn redact(url: &reqwest::Url) -> String {
    let mut shown = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() {
        shown.push_str("/…");
    }
    shown
}

fn truncate(text: &str, limit: usize) -> String {
    match text.char_indices().nth(limit) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

/// The call object of `eth_call` and `eth_estimateGas`. The input goes as both `input` (the
/// current name) and `data` (what older nodes read).
#[derive(Debug, Clone, Serialize)]
struct CallRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<Address>,
    #[serde(skip_serializing_if = "Option::is_none")]
    to: Option<Address>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "alloy::serde::quantity::opt"
    )]
    gas: Option<u64>,
    input: Bytes,
    data: Bytes,
}

impl CallRequest {
    fn new(from: Option<Address>, to: Option<Address>, input: Bytes) -> CallRequest {
        CallRequest {
            from,
            to,
            gas: None,
            data: input.clone(),
            input,
        }
    }
}

/// The fields of a block this client reads (the rest of the node's answer is ignored).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RpcBlock {
    number: U64,
    hash: B256,
    timestamp: U64,
    gas_limit: U64,
    #[serde(default)]
    base_fee_per_gas: Option<U256>,
}

impl RpcBlock {
    fn block(self) -> Block {
        Block {
            number: self.number.to(),
            hash: self.hash,
            timestamp: self.timestamp.to(),
        }
    }
}

/// The fields of a receipt this client reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RpcReceipt {
    transaction_hash: TxHash,
    block_number: U64,
    block_hash: B256,
    #[serde(default)]
    status: Option<U64>,
    gas_used: U64,
    #[serde(default)]
    contract_address: Option<Address>,
}

/// The fields of a transaction this client reads (to replay a failed one).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RpcTransaction {
    from: Address,
    #[serde(default)]
    to: Option<Address>,
    input: Bytes,
    gas: U64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_paths_and_credentials() {
        let shown = |url: &str| redact(&url.parse().unwrap());
        assert_eq!(shown("http://127.0.0.1:8545"), "http://127.0.0.1:8545");
        assert_eq!(
            shown("https://mainnet.example/v3/0123456789abcdef"),
            "https://mainnet.example/…"
        );
        assert_eq!(
            shown("https://user:secret@node.example:8443/?key=abc"),
            "https://node.example:8443/…"
        );
    }

    #[test]
    fn bad_urls_are_refused_without_repeating_them() {
        for url in ["not a url with-secret", "ws://127.0.0.1:8545/secret"] {
            let error = ChainClient::connect(url, Address::ZERO, None, None).unwrap_err();
            assert!(matches!(error, ChainError::InvalidUrl(_)), "{error}");
            assert!(!error.to_string().contains("secret"), "{error}");
        }
    }

    fn payload(json: &str) -> ErrorPayload {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn revert_reasons_from_data_and_messages() {
        // ganache's eth_call: the Error(string) encoding as data.
        let data = "0x08c379a00000000000000000000000000000000000000000000000000000000000000020000000000000000000000000000000000000000000000000000000000000000d706f6c6963792065786973747300000000000000000000000000000000000000";
        let call = payload(&format!(
            r#"{{"code":-32000,"message":"VM Exception while processing transaction: revert policy exists","data":"{data}"}}"#
        ));
        assert_eq!(revert_reason(&call).as_deref(), Some("policy exists"));
        // ganache's eth_estimateGas: an object holding it.
        let estimate = payload(&format!(
            r#"{{"code":-32000,"message":"VM Exception while processing transaction: revert policy exists","data":{{"hash":null,"programCounter":485,"result":"{data}","reason":"policy exists","message":"revert"}}}}"#
        ));
        assert_eq!(revert_reason(&estimate).as_deref(), Some("policy exists"));
        // geth without data.
        let geth = payload(r#"{"code":3,"message":"execution reverted: policy not found"}"#);
        assert_eq!(revert_reason(&geth).as_deref(), Some("policy not found"));
        let bare = payload(
            r#"{"code":-32000,"message":"VM Exception while processing transaction: revert","data":"0x"}"#,
        );
        assert_eq!(revert_reason(&bare).as_deref(), Some("no reason given"));
        let other =
            payload(r#"{"code":-32000,"message":"insufficient funds for gas * price + value"}"#);
        assert_eq!(revert_reason(&other), None);
    }
}
