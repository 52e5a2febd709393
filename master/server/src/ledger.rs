//! The ledger's operations, independent of gRPC: complete and validate policies, write them
//! through the [`Writer`] (or, on a relay, forward them upstream), read, filter and page,
//! compute the digest, open subscriptions.

use std::sync::Arc;

use ledger_anylog::digest::LedgerDigest;
use ledger_anylog::policy;
use tokio_stream::Stream;

use crate::error::LedgerError;
use crate::feed::ChangeFeed;
use crate::metrics;
use crate::storage_io::{self, PAGE};
use crate::subscribers::Subscribers;
use crate::subscription::{self, Event, SubscriptionContext};
use crate::upstream::Forwarder;
use crate::writer::Writer;
use ledger_storage::{
    ChangeKind, NewPolicy, SnapshotPart, Storage, StorageError, StoredPolicy, WriteOp,
};
use tonic::metadata::{Ascii, MetadataValue};

/// The page size of `ListPolicies` when the client names none, and the largest it may ask.
pub const DEFAULT_PAGE_SIZE: usize = 1000;

/// The most rows one `ListPolicies` call reads (then it answers with a token to go on): each
/// row is checked against every condition, so this bounds the work of one call.
pub const LIST_ROW_BUDGET: usize = 10_000;

/// The most conditions one `ListPolicies` call may carry.
pub const MAX_CONDITIONS: usize = 64;

/// The longest key or value of a condition, in bytes.
pub const MAX_CONDITION_BYTES: usize = 1024;

/// A `ListPolicies` query.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Only policies of this type.
    pub policy_type: Option<String>,
    /// Only policies whose body has each of these (key, value) attributes.
    pub conditions: Vec<(String, String)>,
    /// The most policies in the page (0: the default).
    pub page_size: usize,
    /// The page token of the previous page, empty for the first.
    pub page_token: String,
}

/// One page of a `ListPolicies` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    /// The policies, in ledger order.
    pub policies: Vec<StoredPolicy>,
    /// The token of the next page; empty when this is the last.
    pub next_page_token: String,
}

/// The head, size and digest of the ledger at one seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerInfo {
    /// The seq of the last change.
    pub head_seq: u64,
    /// How many policies the ledger holds.
    pub policy_count: u64,
    /// md5 hex of the `blockchain.json` a member holds at `head_seq`.
    pub digest: String,
    /// The lowest `after_seq` a stream can replay from.
    pub oldest_replayable_seq: u64,
    /// On a master that follows a chain: the block its copy holds, and how far the chain's
    /// head was ahead of it at the last poll.
    pub chain: Option<(ledger_storage::ChainPosition, u64)>,
}

/// The ledger at one seq as the lines of a member's `blockchain.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerFile {
    /// The seq the file shows.
    pub head_seq: u64,
    /// How many policies (lines) it holds.
    pub policy_count: u64,
    /// md5 hex of the file: [`LedgerInfo::digest`] at `head_seq`.
    pub digest: String,
    /// The file: every policy's line and `\n`, in ledger order (empty when only the digest was
    /// asked for).
    pub bytes: Vec<u8>,
}

/// The digest of the ledger's file at one seq, which later inserts extend (an insert appends
/// its line to a member's file) without reading the ledger again.
#[derive(Clone)]
struct DigestState {
    /// The feed's epoch it was read in: a relay's copy replaced since is another ledger.
    epoch: u64,
    head_seq: u64,
    policy_count: u64,
    digest: LedgerDigest,
}

impl DigestState {
    fn info(&self, oldest_replayable_seq: u64) -> LedgerInfo {
        LedgerInfo {
            head_seq: self.head_seq,
            policy_count: self.policy_count,
            digest: self.digest.hex(),
            oldest_replayable_seq,
            chain: None,
        }
    }

    /// This state moved on to `head_seq` by the changes since, when they are all inserts and
    /// all replayable; `None` when only a full read can tell (a delete, a pruned change).
    fn extended(
        &self,
        storage: &dyn Storage,
        head_seq: u64,
    ) -> Result<Option<DigestState>, StorageError> {
        let mut next = self.clone();
        while next.head_seq < head_seq {
            let changes = storage.changes_after(next.head_seq, PAGE)?;
            if changes.is_empty() {
                return Ok(None);
            }
            for change in changes {
                if change.seq != next.head_seq + 1 {
                    return Ok(None);
                }
                match change.kind {
                    ChangeKind::Inserted(policy) => {
                        next.digest.push_line(&policy.json);
                        next.policy_count += 1;
                    }
                    ChangeKind::Deleted { .. } => return Ok(None),
                }
                next.head_seq = change.seq;
            }
        }
        Ok(Some(next))
    }
}

/// Reads the whole ledger at one seq as a file: its digest (and the digest's state, to extend),
/// and with `keep_bytes` its bytes.
fn read_file_with_state(
    storage: &dyn Storage,
    keep_bytes: bool,
) -> Result<(LedgerFile, DigestState), StorageError> {
    metrics::digest_full_read();
    let mut digest = LedgerDigest::new();
    let mut file = LedgerFile {
        head_seq: 0,
        policy_count: 0,
        digest: String::new(),
        bytes: Vec::new(),
    };
    storage.snapshot(PAGE, &mut |part| {
        match part {
            SnapshotPart::Start { seq, policy_count } => {
                file.head_seq = seq;
                file.policy_count = policy_count;
            }
            SnapshotPart::Page(policies) => {
                for policy in policies {
                    digest.push_line(&policy.json);
                    if keep_bytes {
                        file.bytes.extend_from_slice(policy.json.as_bytes());
                        file.bytes.push(b'\n');
                    }
                }
            }
        }
        true
    })?;
    let state = DigestState {
        epoch: 0,
        head_seq: file.head_seq,
        policy_count: file.policy_count,
        digest,
    };
    file.digest = state.digest.hex();
    Ok((file, state))
}

/// Where a ledger's inserts and deletes go.
pub enum WritePath {
    /// A master's own writer.
    Local(Writer),
    /// A relay's upstream (a master or another relay): writes are forwarded with the caller's
    /// credentials and the upstream's answer, success or status, is returned as it is.
    Upstream(Forwarder),
    /// A contract on a chain that the master follows: writes are its transactions, answered
    /// once the master's copy holds them.
    Chain(crate::chain::ChainWrites),
}

/// Who asks for a write: where from (the `host` column, the logs), and with which credentials,
/// which a relay forwards upstream.
#[derive(Clone, Default)]
pub struct Caller {
    /// The caller's address, with its name once authenticated (`ingest@10.0.0.5`).
    pub host: String,
    /// The `authorization` metadata the caller sent (`Bearer TOKEN`), as it was sent.
    pub authorization: Option<MetadataValue<Ascii>>,
    /// Whether the caller presented a verified client certificate.
    pub certificate: bool,
}

impl Caller {
    /// A caller at `host` without credentials: an AnyLog node, the master itself.
    pub fn at(host: impl Into<String>) -> Caller {
        Caller {
            host: host.into(),
            ..Caller::default()
        }
    }
}

impl std::fmt::Debug for Caller {
    // Never prints the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("host", &self.host)
            .field("authorization", &self.authorization.as_ref().map(|_| ".."))
            .field("certificate", &self.certificate)
            .finish()
    }
}

/// How large and how deeply nested a policy may be.
#[derive(Debug, Clone, Copy)]
pub struct PolicyLimits {
    /// The largest policy text, in bytes.
    pub max_bytes: usize,
    /// The deepest nesting of objects and arrays.
    pub max_depth: usize,
}

impl Default for PolicyLimits {
    fn default() -> Self {
        PolicyLimits {
            max_bytes: 1 << 20,
            max_depth: 64,
        }
    }
}

/// The ledger of a master (or of a relay).
pub struct Ledger {
    writes: WritePath,
    limits: PolicyLimits,
    subscriptions: SubscriptionContext,
    /// The digest costs a read of the whole ledger: its md5 state is kept and extended by the
    /// inserts that follow; the lock makes one computation serve every caller waiting for it.
    digest: tokio::sync::Mutex<Option<DigestState>>,
    /// The last [`Ledger::file`] with the feed's epoch it was read in, kept until the head
    /// moves; the lock makes one read serve every caller waiting for it.
    file_cache: tokio::sync::Mutex<Option<(u64, Arc<LedgerFile>)>>,
    /// Who streams from this ledger, and (through relays) who streams below them.
    subscribers: Subscribers,
}

impl Ledger {
    /// A ledger writing through `writes`, reading and streaming with `subscriptions`.
    pub fn new(writes: WritePath, subscriptions: SubscriptionContext) -> Self {
        Ledger {
            writes,
            limits: PolicyLimits::default(),
            subscribers: Subscribers::new(subscriptions.feed.watch_head()),
            subscriptions,
            digest: tokio::sync::Mutex::new(None),
            file_cache: tokio::sync::Mutex::new(None),
        }
    }

    /// The same ledger with other policy limits.
    pub fn with_policy_limits(mut self, limits: PolicyLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The storage the ledger reads from.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.subscriptions.storage
    }

    /// The feed of committed changes.
    pub fn feed(&self) -> &ChangeFeed {
        &self.subscriptions.feed
    }

    /// The registry of this ledger's subscribers (`ListSubscribers`, `ReportProgress`).
    pub fn subscribers(&self) -> &Subscribers {
        &self.subscribers
    }

    /// Completes the policy in `policy_json` and stores it for `caller`.
    pub async fn insert(
        &self,
        policy_json: &str,
        caller: &Caller,
    ) -> Result<StoredPolicy, LedgerError> {
        let started = std::time::Instant::now();
        let result = self.insert_policy(policy_json, caller).await;
        metrics::insert_done(&result, started.elapsed());
        result
    }

    async fn insert_policy(
        &self,
        policy_json: &str,
        caller: &Caller,
    ) -> Result<StoredPolicy, LedgerError> {
        crate::limits::check_policy_text(
            policy_json,
            self.limits.max_bytes,
            self.limits.max_depth,
        )?;
        let host = &caller.host;
        let writer = match &self.writes {
            WritePath::Local(writer) => writer,
            WritePath::Upstream(upstream) => {
                // The upstream completes the policy (its id and date are the ledger's).
                let policy = upstream.insert(policy_json, caller).await?;
                tracing::debug!(id = %policy.id, seq = policy.seq, %host, "forwarded an insert upstream");
                return Ok(policy);
            }
            WritePath::Chain(chain) => {
                // Completed here, as a node completes a policy before it writes it on chain.
                let completed = policy::complete(policy_json, chrono::Utc::now())?;
                let policy = chain.insert(completed).await?;
                tracing::info!(id = %policy.id, seq = policy.seq, %host, "inserted policy through the chain");
                return Ok(policy);
            }
        };
        let now = chrono::Utc::now();
        let completed = policy::complete(policy_json, now)?;
        self.require_database()?;
        let change = writer
            .submit(WriteOp::Insert(NewPolicy {
                id: completed.id,
                policy_type: completed.policy_type,
                company: completed.company,
                status: completed.status,
                date: completed.date.unwrap_or(now.naive_utc()),
                json: completed.json,
                host: host.to_string(),
            }))
            .await?;
        match change.kind {
            ChangeKind::Inserted(policy) => {
                tracing::debug!(id = %policy.id, policy_type = %policy.policy_type, seq = policy.seq, %host, "inserted policy");
                Ok(policy)
            }
            ChangeKind::Deleted { .. } => Err(StorageError::Corrupt(
                "the writer answered an insert with a delete".into(),
            )
            .into()),
        }
    }

    /// Deletes the policy `id` for `caller`; returns the seq of the delete.
    pub async fn delete(&self, id: &str, caller: &Caller) -> Result<u64, LedgerError> {
        let result = self.delete_policy(id, caller).await;
        metrics::delete_done(&result);
        result
    }

    async fn delete_policy(&self, id: &str, caller: &Caller) -> Result<u64, LedgerError> {
        require_id(id)?;
        let seq = match &self.writes {
            WritePath::Local(writer) => {
                self.require_database()?;
                writer
                    .submit(WriteOp::Delete { id: id.to_string() })
                    .await?
                    .seq
            }
            WritePath::Upstream(upstream) => upstream.delete(id, caller).await?,
            WritePath::Chain(chain) => chain.delete(id).await?,
        };
        tracing::info!(%id, seq, host = %caller.host, "deleted policy");
        Ok(seq)
    }

    /// The policy `id`.
    pub async fn get(&self, id: &str) -> Result<StoredPolicy, LedgerError> {
        self.require_ready()?;
        require_id(id)?;
        let key = id.to_string();
        storage_io::run(self.storage(), move |s| s.get(&key))
            .await?
            .ok_or_else(|| LedgerError::NotFound(id.to_string()))
    }

    /// One page of the policies that match `query`, in ledger order.
    ///
    /// The rows are read and filtered on the blocking pool, not on the async workers that
    /// serve every other call, and one call reads at most [`LIST_ROW_BUDGET`] rows: a page may
    /// then hold fewer policies than asked, with a token to go on from where it stopped.
    /// Conditions are capped in number and length ([`MAX_CONDITIONS`], [`MAX_CONDITION_BYTES`]).
    pub async fn list(&self, query: ListQuery) -> Result<ListPage, LedgerError> {
        self.require_ready()?;
        if query.conditions.len() > MAX_CONDITIONS {
            return Err(LedgerError::TooManyConditions {
                count: query.conditions.len(),
                limit: MAX_CONDITIONS,
            });
        }
        if let Some((key, value)) = query
            .conditions
            .iter()
            .find(|(k, v)| k.len() > MAX_CONDITION_BYTES || v.len() > MAX_CONDITION_BYTES)
        {
            return Err(LedgerError::ConditionTooLong {
                key_bytes: key.len(),
                value_bytes: value.len(),
                limit: MAX_CONDITION_BYTES,
            });
        }
        let page_size = match query.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(DEFAULT_PAGE_SIZE),
        };
        let start = match query.page_token.as_str() {
            "" => 0,
            token => token
                .parse::<u64>()
                .map_err(|_| LedgerError::BadPageToken(token.to_string()))?,
        };
        storage_io::run(self.storage(), move |s| {
            let mut cursor = start;
            let mut scanned = 0;
            let mut policies = Vec::new();
            loop {
                let rows = s.list(query.policy_type.as_deref(), cursor, PAGE)?;
                let exhausted = rows.len() < PAGE;
                let row_count = rows.len();
                for (index, row) in rows.into_iter().enumerate() {
                    cursor = row.seq;
                    scanned += 1;
                    if matches_conditions(&row, &query.conditions) {
                        policies.push(row);
                    }
                    let more = !exhausted || index + 1 < row_count;
                    if policies.len() == page_size || (scanned >= LIST_ROW_BUDGET && more) {
                        return Ok(ListPage {
                            policies,
                            next_page_token: if more {
                                cursor.to_string()
                            } else {
                                String::new()
                            },
                        });
                    }
                }
                if exhausted {
                    return Ok(ListPage {
                        policies,
                        next_page_token: String::new(),
                    });
                }
            }
        })
        .await
        .map_err(LedgerError::from)
    }

    /// The head, size and digest of the ledger. Computed once for concurrent callers, and
    /// kept up to date by the inserts that follow without reading the ledger again; a delete
    /// (or a change no longer replayable) takes one full read.
    pub async fn info(&self) -> Result<LedgerInfo, LedgerError> {
        let mut info = self.ledger_info().await?;
        if let WritePath::Chain(chain) = &self.writes
            && let (Some(position), lag) = chain.state().position()
        {
            info.chain = Some((position, lag));
        }
        Ok(info)
    }

    /// [`Ledger::info`] but the chain's position.
    async fn ledger_info(&self) -> Result<LedgerInfo, LedgerError> {
        self.require_ready()?;
        // Read before the storage: a copy replaced after this is read whole again next time.
        let epoch = self.feed().epoch();
        let bounds = storage_io::run(self.storage(), |s| s.bounds()).await?;
        let mut digest = self.digest.lock().await;
        if let Some(state) = digest.as_ref().filter(|state| state.epoch == epoch) {
            if state.head_seq == bounds.head_seq {
                return Ok(state.info(bounds.pruned_seq));
            }
            let (state, head) = (state.clone(), bounds.head_seq);
            if state.head_seq < head
                && let Some(next) =
                    storage_io::run(self.storage(), move |s| state.extended(s, head)).await?
            {
                let info = next.info(bounds.pruned_seq);
                *digest = Some(next);
                return Ok(info);
            }
        }
        let (_, mut state) =
            storage_io::run(self.storage(), |s| read_file_with_state(s, false)).await?;
        state.epoch = epoch;
        let info = state.info(bounds.pruned_seq);
        *digest = Some(state);
        Ok(info)
    }

    /// The ledger as a synced member's `blockchain.json` holds it: what a node that syncs from
    /// this master with AnyLog's protocol is sent. Read once per head: callers at the same head
    /// share one copy, and concurrent callers wait for one read.
    pub async fn file(&self) -> Result<Arc<LedgerFile>, LedgerError> {
        self.require_ready()?;
        let epoch = self.feed().epoch();
        let mut cached = self.file_cache.lock().await;
        if let Some((file_epoch, file)) = cached.as_ref()
            && *file_epoch == epoch
            && file.head_seq == self.feed().head()
        {
            return Ok(file.clone());
        }
        // Drop the old copy before reading the new one: two would double the memory.
        *cached = None;
        let (file, mut state) =
            storage_io::run(self.storage(), |s| read_file_with_state(s, true)).await?;
        state.epoch = epoch;
        let file = Arc::new(file);
        // The read gave the digest's state too.
        let mut digest = self.digest.lock().await;
        if digest
            .as_ref()
            .is_none_or(|d| d.epoch != epoch || d.head_seq < state.head_seq)
        {
            *digest = Some(state);
        }
        *cached = Some((epoch, file.clone()));
        Ok(file)
    }

    /// The events of a subscriber at `client` that applied everything up to `after_seq`.
    pub fn subscribe(
        &self,
        after_seq: u64,
        client: Option<std::net::IpAddr>,
    ) -> impl Stream<Item = Result<Event, LedgerError>> + Send + 'static {
        subscription::subscribe(self.subscriptions.clone(), after_seq, client)
    }
}

impl Ledger {
    /// Fails fast while the database is known not to answer, instead of queueing a write that
    /// would wait for a connection.
    fn require_database(&self) -> Result<(), LedgerError> {
        if self.feed().database_up() {
            Ok(())
        } else {
            Err(StorageError::Unavailable("the master's database does not answer".into()).into())
        }
    }

    /// Refuses reads on a relay that holds no copy of the ledger yet: an empty answer would be
    /// taken for an empty ledger.
    fn require_ready(&self) -> Result<(), LedgerError> {
        if self.feed().ready() {
            Ok(())
        } else {
            Err(LedgerError::NoCopyYet)
        }
    }
}

fn require_id(id: &str) -> Result<(), LedgerError> {
    if id.is_empty() {
        return Err(LedgerError::EmptyId);
    }
    Ok(())
}

fn matches_conditions(policy: &StoredPolicy, conditions: &[(String, String)]) -> bool {
    if conditions.is_empty() {
        return true;
    }
    match policy::parse_stored(&policy.json) {
        Ok((_, body)) => conditions
            .iter()
            .all(|(key, value)| policy::attribute_matches(&body, key, value)),
        Err(_) => false,
    }
}
