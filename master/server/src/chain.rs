//! A master whose ledger is a contract on an Ethereum chain (issue 17): the contract is the
//! source of truth, the database the master's local copy, and members stream from the copy as
//! from any master.
//!
//! [`follow`] polls the contract's state at the followed block (the chain's head minus the
//! confirmations) and applies what changed through the master's one writer ([`chain_plan`]
//! says what), so every change gets the next local seq. [`ChainWrites`] turns `InsertPolicy`
//! and `DeletePolicy` into transactions and answers once the follower has applied them.
//!
//! The chain itself is behind [`FollowedContract`]: the master's binary gives it the contract
//! client (`ledger-chain`), the follower needs nothing else of it.

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::chain_plan::{self, Plan};
use crate::error::LedgerError;
use crate::feed::ChangeFeed;
use crate::writer::Writer;
use crate::{metrics, storage_io};
use ledger_anylog::policy::CompletedPolicy;
use ledger_storage::{
    ChainPosition, ChangeKind, NewPolicy, Rejection, SnapshotPart, Storage, StoredPolicy, WriteOp,
};

/// The health service name that says whether the chain's node answers: `NOT_SERVING` while
/// it does not (reads and streams go on from the local copy; writes are refused).
pub const CHAIN_SERVICE: &str = "ledger.v1.LedgerService/chain";

/// The `host` column of policies that came from the contract.
pub const CHAIN_HOST: &str = "chain";

/// A block of the followed chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRef {
    /// Its number.
    pub number: u64,
    /// Its hash, `0x`-prefixed hex.
    pub hash: String,
    /// Its time, in seconds since the Unix epoch.
    pub timestamp: u64,
}

/// Why a call to the chain failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContractError {
    /// The chain's node did not answer, or answered with an error of its own.
    #[error("the Ethereum node does not answer: {0}")]
    Unreachable(String),
    /// The contract refused an insert: the id is stored there.
    #[error("a policy with id {0:?} already exists on the contract")]
    AlreadyExists(String),
    /// The contract refused a delete: the id is not stored there.
    #[error("no policy with id {0:?} on the contract")]
    NotFound(String),
    /// A transaction was sent and has no receipt yet: it may still be mined.
    #[error("transaction {tx} has no receipt after {waited:?}; it may still be mined")]
    Timeout {
        /// The transaction's hash.
        tx: String,
        /// How long it was waited for.
        waited: Duration,
    },
    /// A write needs a key, and the master has none.
    #[error(
        "writes go to the contract as transactions and need a key: start the master with --ethereum-key-file"
    )]
    NoKey,
    /// The transaction failed for another reason.
    #[error("transaction {tx} failed: {reason}")]
    Reverted {
        /// The transaction's hash (empty when it failed before it was sent).
        tx: String,
        /// Why, as the chain says.
        reason: String,
    },
    /// The block a read was pinned to is no longer on the chain (a reorg): the next poll reads
    /// at the new head.
    #[error("the block read is no longer on the chain: {0}")]
    Reorged(String),
    /// The node answers, but not as the master needs: another chain than the key's, no contract
    /// at the address, an answer that does not decode.
    #[error("{0}")]
    Misconfigured(String),
}

/// The contract's two counters at a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// `transaction_count()`: one per insert, update and delete so far.
    pub transaction_count: u64,
    /// `num_policies()`: the length of its array of ids.
    pub num_policies: u64,
}

/// What a call to the chain returns.
pub type ContractCall<'a, T> = Pin<Box<dyn Future<Output = Result<T, ContractError>> + Send + 'a>>;

/// What the master needs of the contract: reads pinned to one block, so a poll sees one state,
/// and writes that wait for their receipt.
pub trait FollowedContract: Send + Sync + 'static {
    /// The chain's newest block.
    fn head(&self) -> ContractCall<'_, BlockRef>;
    /// Block `number`.
    fn block(&self, number: u64) -> ContractCall<'_, BlockRef>;
    /// The contract's `transaction_count()` and `num_policies()` at block `at`.
    fn counts<'a>(&'a self, at: &'a BlockRef) -> ContractCall<'a, Counts>;
    /// Every policy id the contract holds at block `at`, in its array order.
    fn policy_ids<'a>(&'a self, at: &'a BlockRef) -> ContractCall<'a, Vec<String>>;
    /// The ids at positions `range` of the contract's array at block `at`.
    fn policy_ids_in<'a>(
        &'a self,
        range: Range<u64>,
        at: &'a BlockRef,
    ) -> ContractCall<'a, Vec<String>>;
    /// The texts of the policies at `indexes` of the contract's array (`policies(i)`: EdgeLake's
    /// contract answers `getPolicy` with an event, not a value) at block `at`.
    fn policies<'a>(
        &'a self,
        indexes: &'a [u64],
        at: &'a BlockRef,
    ) -> ContractCall<'a, Vec<String>>;
    /// Sends `insert(id, json)` and waits up to `within` for its receipt: the block it is in.
    fn insert<'a>(&'a self, id: &'a str, json: &'a str, within: Duration) -> ContractCall<'a, u64>;
    /// Sends `deletePolicy(id)` and waits up to `within` for its receipt: the block it is in.
    fn delete<'a>(&'a self, id: &'a str, within: Duration) -> ContractCall<'a, u64>;
    /// The JSON-RPC calls and the HTTP requests made to the node so far (a provider bills the
    /// calls); shown in the metrics after each poll.
    fn rpc_counts(&self) -> (u64, u64) {
        (0, 0)
    }
}

/// How the master follows the chain and writes to it.
#[derive(Debug, Clone, Copy)]
pub struct ChainOptions {
    /// The followed block is the head minus this many.
    pub confirmations: u64,
    /// How often the contract is read.
    pub poll: Duration,
    /// How long a write waits for its receipt, and then for the follower to apply it.
    pub write_timeout: Duration,
    /// The longest completed policy written to the contract, in bytes: its gas grows with its
    /// size, and a transaction must fit a block's gas limit.
    pub max_policy_bytes: usize,
}

/// What the follower knows, shared with the writes and the ledger info.
pub struct ChainState {
    /// The block the local copy holds; moves after each applied poll.
    position: watch::Sender<Option<ChainPosition>>,
    /// Blocks between the head and the followed block at the last poll.
    lag_blocks: Mutex<u64>,
    /// The seq of each recent delete the follower applied, for the delete's answer.
    deleted: Mutex<HashMap<String, u64>>,
}

impl ChainState {
    /// A state at `position` (the one stored, if any).
    pub fn new(position: Option<ChainPosition>) -> Arc<ChainState> {
        Arc::new(ChainState {
            position: watch::channel(position).0,
            lag_blocks: Mutex::new(0),
            deleted: Mutex::new(HashMap::new()),
        })
    }

    /// The block the local copy holds, and how far behind the head it was at the last poll.
    pub fn position(&self) -> (Option<ChainPosition>, u64) {
        (
            self.position.borrow().clone(),
            *self
                .lag_blocks
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Waits until the local copy holds block `number` or a later one; false after `within`.
    async fn reached(&self, number: u64, within: Duration) -> bool {
        let mut watched = self.position.subscribe();
        let reached = watched.wait_for(|p| p.as_ref().is_some_and(|p| p.block_number >= number));
        matches!(tokio::time::timeout(within, reached).await, Ok(Ok(_)))
    }
}

/// Writes as transactions: sent to the contract, answered once the follower has applied them.
#[derive(Clone)]
pub struct ChainWrites {
    contract: Arc<dyn FollowedContract>,
    state: Arc<ChainState>,
    storage: Arc<dyn Storage>,
    options: ChainOptions,
}

impl ChainWrites {
    /// Writes to `contract`, answered from `storage` once `state` has moved past them.
    pub fn new(
        contract: Arc<dyn FollowedContract>,
        state: Arc<ChainState>,
        storage: Arc<dyn Storage>,
        options: ChainOptions,
    ) -> ChainWrites {
        ChainWrites {
            contract,
            state,
            storage,
            options,
        }
    }

    /// The follower's state (for the ledger info).
    pub fn state(&self) -> &Arc<ChainState> {
        &self.state
    }

    /// Inserts a completed policy: `insert(id, json)` from the master's key; answers with the
    /// local copy's row once the follower applied the block holding the transaction.
    pub async fn insert(&self, policy: CompletedPolicy) -> Result<StoredPolicy, LedgerError> {
        if policy.json.len() > self.options.max_policy_bytes {
            return Err(LedgerError::PolicyTooLarge {
                size: policy.json.len(),
                limit: self.options.max_policy_bytes,
            });
        }
        let started = Instant::now();
        let block = self
            .contract
            .insert(&policy.id, &policy.json, self.options.write_timeout)
            .await?;
        self.applied(block, started).await?;
        let id = policy.id.clone();
        storage_io::run(&self.storage, move |s| s.get(&id))
            .await?
            // Mined, applied, and not in the copy: the follower skipped it (it says why).
            .ok_or_else(|| LedgerError::NotFound(policy.id))
    }

    /// Deletes a policy: `deletePolicy(id)`; answers with the seq of the delete in the local
    /// copy once the follower applied it.
    pub async fn delete(&self, id: &str) -> Result<u64, LedgerError> {
        let started = Instant::now();
        let block = self.contract.delete(id, self.options.write_timeout).await?;
        self.applied(block, started).await?;
        self.state
            .deleted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .copied()
            .ok_or_else(|| LedgerError::NotFound(id.to_string()))
    }

    /// Waits for the follower to apply `block`, within what is left of the write timeout.
    async fn applied(&self, block: u64, started: Instant) -> Result<(), LedgerError> {
        let left = self.options.write_timeout.saturating_sub(started.elapsed());
        if self.state.reached(block, left).await {
            Ok(())
        } else {
            Err(LedgerError::ChainBehind {
                block,
                confirmations: self.options.confirmations,
            })
        }
    }
}

/// Follows the contract until `shutdown` is cancelled: polls its state every `options.poll` and
/// applies what changed through `writer`; reports the node's state on `health` and in metrics.
///
/// Until its first poll is applied, a master that never followed the chain serves nothing
/// (`feed` not ready, as a relay without a copy): an empty ledger is not the chain's.
#[allow(clippy::too_many_arguments)]
pub async fn follow(
    contract: Arc<dyn FollowedContract>,
    storage: Arc<dyn Storage>,
    writer: Writer,
    feed: ChangeFeed,
    state: Arc<ChainState>,
    options: ChainOptions,
    health: HealthReporter,
    shutdown: CancellationToken,
) {
    if state.position().0.is_none() {
        feed.set_ready(false);
        tracing::info!(
            "this master holds no copy of the chain's ledger yet: it serves once its first poll is applied"
        );
    }
    let mut follower = match Follower::start(contract, storage, writer, state, options).await {
        Ok(follower) => follower,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the local copy of the chain's ledger: not following the chain");
            return;
        }
    };
    let mut up: Option<bool> = None;
    let mut polls = tokio::time::interval(options.poll.max(Duration::from_millis(10)));
    polls.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = polls.tick() => {}
        }
        let result = follower.poll().await;
        let (calls, requests) = follower.contract.rpc_counts();
        metrics::chain_rpc(calls, requests);
        if result.is_ok() && !feed.ready() {
            tracing::info!("the chain's ledger is applied: serving");
            feed.set_ready(true);
        }
        let now_up = !matches!(result, Err(PollError::Chain(ContractError::Unreachable(_))));
        if up != Some(now_up) {
            up = Some(now_up);
            metrics::chain_up(now_up);
            let status = if now_up {
                tracing::info!("following the chain: its node answers");
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status(CHAIN_SERVICE, status).await;
        }
        match result {
            Ok(()) => {}
            Err(PollError::Chain(ContractError::Unreachable(reason))) => {
                tracing::debug!(%reason, "the chain's node does not answer");
                if up == Some(false) && follower.down_logged.replace(true) != Some(true) {
                    tracing::error!(%reason, "the chain's node does not answer: reads and streams go on from the local copy; writes are refused (UNAVAILABLE) until it answers");
                }
            }
            Err(PollError::Chain(ContractError::Reorged(reason))) => {
                tracing::info!(%reason, "the chain reorganised during a poll; the next one reads the new head");
            }
            Err(e) => {
                tracing::warn!(error = %e, "a poll of the contract failed; the next one tries again")
            }
        }
        if up == Some(true) {
            follower.down_logged = None;
        }
    }
}

/// Why a poll failed.
#[derive(Debug, thiserror::Error)]
enum PollError {
    #[error(transparent)]
    Chain(#[from] ContractError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// The follower's working state: the local copy's ids and lines, kept in step with what it
/// applies (the local copy has no other writer).
struct Follower {
    contract: Arc<dyn FollowedContract>,
    storage: Arc<dyn Storage>,
    writer: Writer,
    state: Arc<ChainState>,
    options: ChainOptions,
    local: HashMap<String, String>,
    /// The contract's ids in its array order at the held position, when this process read
    /// them: a contract that only grew since is then read from the end of it alone.
    order: Option<Vec<String>>,
    /// Ids skipped as invalid, each logged once.
    skipped: HashMap<String, String>,
    /// Whether the node's being down was logged (reset once it answers).
    down_logged: Option<bool>,
}

impl Follower {
    async fn start(
        contract: Arc<dyn FollowedContract>,
        storage: Arc<dyn Storage>,
        writer: Writer,
        state: Arc<ChainState>,
        options: ChainOptions,
    ) -> Result<Follower, LedgerError> {
        let local = storage_io::run(&storage, |s| {
            let mut local = HashMap::new();
            s.snapshot(1024, &mut |part| {
                if let SnapshotPart::Page(page) = part {
                    local.extend(page.into_iter().map(|p| (p.id, p.json)));
                }
                true
            })?;
            Ok(local)
        })
        .await?;
        Ok(Follower {
            contract,
            storage,
            writer,
            state,
            options,
            local,
            order: None,
            skipped: HashMap::new(),
            down_logged: None,
        })
    }

    /// One poll: the state at the followed block, diffed and applied.
    async fn poll(&mut self) -> Result<(), PollError> {
        let head = self.contract.head().await?;
        let target = head.number.saturating_sub(self.options.confirmations);
        let block = if target == head.number {
            head.clone()
        } else {
            self.contract.block(target).await?
        };
        let lag = head.number - block.number;
        *self
            .state
            .lag_blocks
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = lag;
        metrics::chain_lag(lag, head.timestamp.saturating_sub(block.timestamp));
        let held = self.state.position.borrow().clone();
        if held.as_ref().is_some_and(|p| p.block_hash == block.hash) {
            return Ok(());
        }
        let counts = self.contract.counts(&block).await?;
        // Whether the block held is still on the chain (no reorg under it): then the state
        // at `block` is the held one plus the transactions since.
        let held_on_chain = match &held {
            Some(p) if p.block_number <= block.number => {
                self.contract.block(p.block_number).await?.hash == p.block_hash
            }
            _ => false,
        };
        // The order read by this process is good for one position: taken now, put back only
        // once the poll is applied (a failed poll leaves the copy between two states).
        let order = self.order.take();
        let order = match held.as_ref() {
            Some(p) if held_on_chain && p.transaction_count == counts.transaction_count => {
                // Nothing written since: only the position moves.
                order
            }
            _ => Some(
                self.apply_state(&block, counts, held.as_ref(), held_on_chain, order)
                    .await?,
            ),
        };
        let position = ChainPosition {
            block_number: block.number,
            block_hash: block.hash,
            transaction_count: counts.transaction_count,
        };
        let stored = position.clone();
        storage_io::run(&self.storage, move |s| s.set_chain_position(&stored))
            .await
            .map_err(LedgerError::from)?;
        metrics::chain_block(position.block_number);
        self.state.position.send_replace(Some(position));
        self.order = order;
        Ok(())
    }

    /// Reads the contract's state at block `at` and applies what differs from the local copy;
    /// returns the contract's ids there, in its order. `order` is the order at `held`, if
    /// known; `held_on_chain` says whether `held` is an ancestor of `at`.
    async fn apply_state(
        &mut self,
        at: &BlockRef,
        counts: Counts,
        held: Option<&ChainPosition>,
        held_on_chain: bool,
        order: Option<Vec<String>>,
    ) -> Result<Vec<String>, PollError> {
        if let (Some(held), true, Some(order)) = (held, held_on_chain, order)
            && chain_plan::only_appended(held.transaction_count, order.len() as u64, counts)
        {
            return self.apply_appended(at, order, counts.num_policies).await;
        }
        let ids = self.contract.policy_ids(at).await?;
        let diff = chain_plan::diff_ids(self.local.keys().map(String::as_str), &ids);
        // Each insert, update and delete counts one transaction: more than the ids show means
        // updates (or a reorg), and then every body is compared.
        let written = counts
            .transaction_count
            .abs_diff(held.map_or(0, |p| p.transaction_count));
        // An id skipped before is not stored, so it is "added" at every poll without a
        // transaction of its own (it is read again all the same: it may have been fixed).
        let newly_added = diff
            .added
            .iter()
            .filter(|id| !self.skipped.contains_key(*id))
            .count();
        let explained = (newly_added + diff.deleted.len()) as u64;
        let read_all = held.is_none() || written > explained;
        let added: std::collections::HashSet<&str> =
            diff.added.iter().map(String::as_str).collect();
        let indexes: Vec<u64> = ids
            .iter()
            .enumerate()
            .filter(|(_, id)| read_all || added.contains(id.as_str()))
            .map(|(i, _)| i as u64)
            .collect();
        let bodies = if indexes.is_empty() {
            Vec::new()
        } else {
            let texts = self.contract.policies(&indexes, at).await?;
            indexes
                .iter()
                .map(|&i| ids[i as usize].clone())
                .zip(texts)
                .collect()
        };
        let plan = chain_plan::plan(diff.deleted, bodies, &self.local);
        self.apply(plan).await?;
        Ok(ids)
    }

    /// Applies a contract that only grew since `order` (its ids at the held position) to
    /// `length` ids: reads the new ids and their bodies, nothing else.
    async fn apply_appended(
        &mut self,
        at: &BlockRef,
        mut order: Vec<String>,
        length: u64,
    ) -> Result<Vec<String>, PollError> {
        let start = order.len() as u64;
        let ids = self.contract.policy_ids_in(start..length, at).await?;
        let indexes: Vec<u64> = (start..length).collect();
        let texts = self.contract.policies(&indexes, at).await?;
        let bodies = ids.iter().cloned().zip(texts).collect();
        let plan = chain_plan::plan(Vec::new(), bodies, &self.local);
        self.apply(plan).await?;
        order.extend(ids);
        Ok(order)
    }

    /// Applies `plan` through the writer: every delete, then every insert, each its own seq.
    async fn apply(&mut self, plan: Plan) -> Result<(), PollError> {
        for (id, error) in plan.skipped {
            metrics::chain_skipped();
            let reason = error.to_string();
            if self.skipped.get(&id) != Some(&reason) {
                tracing::warn!(%id, %reason, "a policy on the contract is skipped: it is not a valid policy, or its body's id is not its key");
                self.skipped.insert(id, reason);
            }
        }
        let now = chrono::Utc::now();
        let deletes = plan.deletes.into_iter().map(|id| WriteOp::Delete { id });
        let inserts = plan.inserts.into_iter().map(|p| {
            WriteOp::Insert(NewPolicy {
                date: p.date.unwrap_or(now.naive_utc()),
                id: p.id,
                policy_type: p.policy_type,
                company: p.company,
                status: p.status,
                json: p.json,
                host: CHAIN_HOST.to_string(),
            })
        });
        // One at a time, in order: the writer batches what waits, and the seqs follow the plan.
        for op in deletes.chain(inserts) {
            match self.writer.submit(op).await {
                Ok(change) => match change.kind {
                    ChangeKind::Inserted(policy) => {
                        self.local.insert(policy.id, policy.json);
                    }
                    ChangeKind::Deleted { id } => {
                        self.local.remove(&id);
                        let mut deleted = self
                            .state
                            .deleted
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner);
                        // Kept for the writes waiting for them; bounded.
                        if deleted.len() >= 10_000 {
                            deleted.clear();
                        }
                        deleted.insert(id, change.seq);
                    }
                },
                // The copy already agrees (applied before a crash, before the position moved).
                Err(LedgerError::Rejected(
                    Rejection::AlreadyExists(_) | Rejection::NotFound(_),
                )) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}
