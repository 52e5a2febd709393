//! A relay: a master whose source is another master (`master --upstream ADDR`).
//!
//! The relay keeps its own database as a copy of the upstream's ledger with the upstream's
//! seqs, and serves it with the master's own code: reads, the digest, streams and their
//! resumption mean there what they mean upstream, so a member can move between a relay and
//! the master without a reset. [`follow()`] is what a master's writer is to a master: it follows
//! the upstream's `StreamLedger` ([`ledger_client::follow`], the loop a member runs) into the
//! storage (`Storage::replicate`; a snapshot: `Storage::replace`) and publishes what it stored
//! to the feed, so the relay's subscribers get it as they would from a writer. A snapshot that
//! replaces the copy resets the feed: the streams below end and their members subscribe again.
//!
//! Writes are not the relay's to make: [`Forwarder`] sends them to the upstream it follows,
//! with the caller's own credentials (its bearer token, as it sent it), and returns the
//! upstream's answer unchanged. A caller without a token is not written for with the relay's
//! credentials unless the relay is told to (`--upstream-write-as-self`): the upstream would
//! take the write for the relay's own.

use std::sync::Arc;
use std::time::Duration;

use ledger_client::follow::{self, Event, FollowOptions, Sink, Stop};
use ledger_client::masters::{self, MasterAddr};
use ledger_client::report::Downstream;
use ledger_proto::pb;
use ledger_proto::pb::ledger_service_client::LedgerServiceClient;
use ledger_storage::{Change, ChangeKind, Storage, StorageError, StoredPolicy};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::error::LedgerError;
use crate::feed::ChangeFeed;
use crate::health::UPSTREAM_SERVICE;
use crate::ledger::Caller;
use crate::metrics;
use crate::storage_io;
use crate::subscribers::Subscribers;
use crate::writer::Pruner;

/// What a relay needs to follow its upstream and forward writes to it.
#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    /// The upstreams (masters or relays) in the order they are tried, and how to reach them.
    /// `connect_timeout` also bounds each forwarded write.
    pub follow: FollowOptions,
    /// Forward writes of callers without a bearer token with the relay's own credentials.
    pub write_as_self: bool,
    /// Keep this many changes replayable in the copy (`--change-retention`); `None`: all.
    pub change_retention: Option<u64>,
}

/// The upstream the relay streams from now, and its connection.
#[derive(Clone)]
struct Link {
    addr: MasterAddr,
    channel: Channel,
}

/// A relay's link to its upstream: made before the ledger (whose write path is its
/// [`Forwarder`]), then run with [`follow()`].
pub struct Upstream {
    options: UpstreamOptions,
    link: watch::Sender<Option<Link>>,
}

impl Upstream {
    /// The link for `options`; nothing is connected before [`follow()`] runs.
    pub fn new(options: UpstreamOptions) -> Upstream {
        Upstream {
            options,
            link: watch::channel(None).0,
        }
    }

    /// The write path of the relay's ledger: writes go to the upstream the relay follows.
    pub fn forwarder(&self) -> Forwarder {
        let client = &self.options.follow.client;
        Forwarder {
            link: self.link.subscribe(),
            own: client.authorization().cloned(),
            has_identity: client.has_identity(),
            write_as_self: self.options.write_as_self,
            timeout: self.options.follow.connect_timeout,
        }
    }
}

/// Follows the upstream into `storage` and `feed` until `shutdown` is cancelled (a batch being
/// stored is stored first), showing the link on `health` ([`UPSTREAM_SERVICE`]) and in the
/// metrics. The copy's head is read from `storage`: a relay restarted (even after `kill -9`)
/// resumes after what it holds, without a snapshot.
/// With its progress the relay reports `subscribers`, its own, upstream.
pub async fn follow(
    upstream: Upstream,
    storage: Arc<dyn Storage>,
    feed: ChangeFeed,
    subscribers: Subscribers,
    health: HealthReporter,
    shutdown: CancellationToken,
) {
    let Upstream { options, link } = upstream;
    health
        .set_service_status(UPSTREAM_SERVICE, ServingStatus::NotServing)
        .await;
    metrics::upstream_connected(false);
    let mut sink = CopySink {
        storage,
        feed,
        health,
        link,
        head: None,
        receiving: None,
        pruner: Pruner::new(options.change_retention),
        subscribers,
    };
    follow::follow(&options.follow, &mut sink, &shutdown).await;
    tracing::info!("stopped following the upstream");
}

/// A snapshot being received: held in memory until it is whole, then stored at once.
struct Receiving {
    seq: u64,
    policies: Vec<StoredPolicy>,
}

/// The relay's database as the subscription's sink.
struct CopySink {
    storage: Arc<dyn Storage>,
    feed: ChangeFeed,
    health: HealthReporter,
    link: watch::Sender<Option<Link>>,
    /// The seq of the last change the copy holds; `None` until read, and after a failed write
    /// (whose outcome the storage knows).
    head: Option<u64>,
    receiving: Option<Receiving>,
    pruner: Pruner,
    /// The relay's own subscribers, reported upstream.
    subscribers: Subscribers,
}

impl CopySink {
    /// Stores `changes` (the next ones after the head) in one transaction and publishes them.
    async fn store(&mut self, changes: Vec<Change>) -> Result<(), Stop> {
        let Some(last) = changes.last().map(|change| change.seq) else {
            return Ok(());
        };
        let (feed, mut pruner) = (self.feed.clone(), self.pruner);
        let stored = storage_io::run(&self.storage, move |storage| {
            storage.replicate(&changes)?;
            // Published as a writer publishes its commits: subscribers below get the changes
            // from memory, or read what they missed from the storage.
            feed.publish_committed(storage, changes)?;
            pruner.committed(storage, last);
            Ok(pruner)
        })
        .await;
        match stored {
            Ok(pruner) => {
                self.head = Some(last);
                self.pruner = pruner;
                Ok(())
            }
            Err(e) => Err(self.write_failed(e)),
        }
    }

    /// Replaces the copy with the snapshot at `seq`, resets the feed (the streams below end
    /// and subscribe again) and serves from now on.
    async fn replace(&mut self, seq: u64, policies: Vec<StoredPolicy>) -> Result<(), Stop> {
        let count = policies.len() as u64;
        let replaced = storage_io::run(&self.storage, move |s| s.replace(seq, &policies)).await;
        if let Err(e) = replaced {
            return Err(self.write_failed(e));
        }
        self.head = Some(seq);
        self.pruner.replaced(seq);
        self.feed.reset(seq, count);
        self.feed.set_ready(true);
        metrics::upstream_reset();
        tracing::info!(
            "replaced the relay's copy with the upstream's snapshot: {count} policies at seq {seq}"
        );
        Ok(())
    }

    fn write_failed(&mut self, e: StorageError) -> Stop {
        tracing::error!(
            "cannot write the relay's copy of the ledger: {e}; subscribing again after what it holds"
        );
        self.head = None;
        Stop::Later
    }
}

impl Sink for CopySink {
    fn resume_seq(&self) -> u64 {
        self.head.unwrap_or(0)
    }

    async fn prepare(&mut self) -> Result<(), ()> {
        if self.head.is_none() {
            match storage_io::run(&self.storage, |s| s.bounds()).await {
                Ok(bounds) => self.head = Some(bounds.head_seq),
                Err(e) => {
                    tracing::error!("cannot read the relay's copy of the ledger: {e}");
                    return Err(());
                }
            }
        }
        Ok(())
    }

    async fn connected(&mut self, master: &MasterAddr, channel: &Channel, again: bool) {
        metrics::upstream_connected(true);
        if again {
            metrics::upstream_reconnected();
        }
        let moved = self
            .link
            .borrow()
            .as_ref()
            .is_some_and(|link| link.addr != *master);
        if moved {
            tracing::info!("the relay forwards writes to {master} now");
        }
        self.link.send_replace(Some(Link {
            addr: master.clone(),
            channel: channel.clone(),
        }));
    }

    async fn apply(&mut self, events: Vec<Event>) -> Result<(), Stop> {
        let mut changes = Vec::new();
        for event in events {
            match event {
                Event::Reset { seq, policy_count } => {
                    self.store(std::mem::take(&mut changes)).await?;
                    self.receiving = Some(Receiving {
                        seq,
                        // What the upstream announces is only a hint: never reserve much.
                        policies: Vec::with_capacity(policy_count.min(65_536) as usize),
                    });
                }
                Event::Snapshot(policy) => {
                    if let Some(receiving) = &mut self.receiving {
                        receiving.policies.push(stored(policy));
                    }
                }
                Event::SnapshotEnd { seq } => {
                    let Some(receiving) = self.receiving.take().filter(|r| r.seq == seq) else {
                        continue;
                    };
                    self.replace(seq, receiving.policies).await?;
                }
                Event::Inserted(policy) => changes.push(Change {
                    seq: policy.seq,
                    kind: ChangeKind::Inserted(stored(policy)),
                }),
                Event::Deleted { seq, id } => changes.push(Change {
                    seq,
                    kind: ChangeKind::Deleted { id },
                }),
                Event::CaughtUp { .. } => {
                    self.store(std::mem::take(&mut changes)).await?;
                    // A copy that was never made waits for its first snapshot, which comes
                    // before this; from here on the relay has a ledger to serve.
                    self.feed.set_ready(true);
                    self.health
                        .set_service_status(UPSTREAM_SERVICE, ServingStatus::Serving)
                        .await;
                }
                Event::Progress { head_seq } => metrics::upstream_head(head_seq),
            }
        }
        self.store(changes).await
    }

    fn downstream(&self) -> Option<Downstream> {
        let subscribers = self.subscribers.clone();
        Some(Arc::new(move || {
            subscribers
                .list()
                .subscribers
                .into_iter()
                .map(crate::service::subscriber_status)
                .collect()
        }))
    }

    async fn disconnected(&mut self) {
        metrics::upstream_connected(false);
        self.receiving = None;
        self.health
            .set_service_status(UPSTREAM_SERVICE, ServingStatus::NotServing)
            .await;
    }
}

/// A policy as the upstream sent it, as the storage keeps it.
fn stored(policy: pb::Policy) -> StoredPolicy {
    StoredPolicy {
        id: policy.id,
        policy_type: policy.r#type,
        json: policy.json,
        seq: policy.seq,
    }
}

/// A relay's write path: inserts and deletes go to the upstream the relay follows, with the
/// caller's credentials, and come back as the upstream answered them.
#[derive(Clone)]
pub struct Forwarder {
    link: watch::Receiver<Option<Link>>,
    /// The relay's own `authorization` (`--upstream-token`), sent only when writing as itself.
    own: Option<MetadataValue<Ascii>>,
    /// Whether the relay's connection upstream carries an identity of its own (a client
    /// certificate, a token): a call without a token would be taken for the relay's.
    has_identity: bool,
    write_as_self: bool,
    timeout: Duration,
}

impl Forwarder {
    /// Forwards an insert of `policy_json` for `caller`; the upstream completes the policy.
    pub async fn insert(
        &self,
        policy_json: &str,
        caller: &Caller,
    ) -> Result<StoredPolicy, LedgerError> {
        let (mut client, request) = self.request(
            caller,
            pb::InsertPolicyRequest {
                policy_json: policy_json.to_string(),
            },
        )?;
        let answer = client.insert_policy(request).await?.into_inner();
        let policy = answer.policy.ok_or_else(|| {
            LedgerError::Upstream(tonic::Status::internal("the upstream answered no policy"))
        })?;
        Ok(stored(policy))
    }

    /// Forwards a delete of `id` for `caller`; returns the upstream's seq of the delete.
    pub async fn delete(&self, id: &str, caller: &Caller) -> Result<u64, LedgerError> {
        let (mut client, request) =
            self.request(caller, pb::DeletePolicyRequest { id: id.to_string() })?;
        Ok(client.delete_policy(request).await?.into_inner().seq)
    }

    /// A client of the current upstream, and `message` as a request with the credentials the
    /// upstream must see: the caller's.
    fn request<T>(
        &self,
        caller: &Caller,
        message: T,
    ) -> Result<(LedgerServiceClient<Channel>, tonic::Request<T>), LedgerError> {
        let authorization = self.credentials(caller)?;
        let Some(link) = self.link.borrow().clone() else {
            return Err(LedgerError::Upstream(tonic::Status::unavailable(
                "this relay has not reached its upstream yet: retry, or write to the upstream directly",
            )));
        };
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        if let Some(value) = authorization {
            request.metadata_mut().insert("authorization", value);
        }
        Ok((
            masters::with_limits(LedgerServiceClient::new(link.channel)),
            request,
        ))
    }

    /// The `authorization` to send upstream for `caller`: its own, never the relay's unless
    /// the relay writes as itself.
    fn credentials(&self, caller: &Caller) -> Result<Option<MetadataValue<Ascii>>, LedgerError> {
        if let Some(value) = &caller.authorization {
            // The upstream checks the caller's token itself (a token wins over the relay's
            // client certificate there).
            return Ok(Some(value.clone()));
        }
        if self.write_as_self {
            return Ok(self.own.clone());
        }
        if !self.has_identity {
            // Nothing of the relay's would go with it: the upstream sees an anonymous caller.
            return Ok(None);
        }
        let how = if caller.certificate {
            "a client certificate, which cannot be forwarded"
        } else {
            "no bearer token"
        };
        Err(LedgerError::CannotForward(format!(
            "this relay forwards writes upstream with the caller's own bearer token, and this call carries {how}: \
             the upstream would take it for the relay's own write. Call with a token the upstream knows \
             (authorization: Bearer TOKEN), write to the upstream directly, or run the relay with --upstream-write-as-self"
        )))
    }
}
