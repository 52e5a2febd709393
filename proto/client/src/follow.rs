//! Following a `StreamLedger` subscription: the one loop that a member (into its ledger file)
//! and a relay (into its database) both run.
//!
//! [`follow`] subscribes after the seq the [`Sink`] holds, trying the masters in order; reads
//! what streams in, a batch at a time (whatever already arrived, without waiting); checks it
//! with a [`Checker`] (each change the next seq, a snapshot complete and ending at its seq,
//! `caught_up` where the changes end); hands the checked [`Event`]s to the sink; and when the
//! stream breaks, subscribes again after what the sink holds, with backoff, moving on to the
//! next master. The sink decides nothing about connections: it applies, and says when to
//! subscribe again ([`Stop`]).
//!
//! Logs follow the link's state, not the attempts: one line when a master is connected, caught
//! up, lost or unreachable; retries are logged at debug.

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use ledger_proto::pb;
use ledger_proto::pb::stream_ledger_response::Event as Proto;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use crate::backoff::Backoff;
use crate::masters::{self, ClientOptions, MasterAddr};
use crate::report::{self, Downstream, Identity};

/// The most events handed to the sink as one batch, so that memory and the time between two
/// durable points stay bounded while a big snapshot or replay streams in.
const MAX_BATCH_EVENTS: usize = 4096;

/// The most policy bytes handed to the sink as one batch.
const MAX_BATCH_BYTES: usize = 8 << 20;

/// Where to subscribe and how.
#[derive(Debug, Clone)]
pub struct FollowOptions {
    /// The masters (or relays), in the order they are tried.
    pub masters: Vec<MasterAddr>,
    /// How to reach them: TLS, token.
    pub client: ClientOptions,
    /// How long connecting and subscribing may take.
    pub connect_timeout: Duration,
    /// The first reconnection delay (doubling, jittered).
    pub retry_min: Duration,
    /// The longest reconnection delay.
    pub retry_max: Duration,
    /// How the subscriber names itself when it subscribes; with it, its durable seq is
    /// reported to the master it streams from ([`crate::report`]). `None`: anonymous, no
    /// reports.
    pub identity: Option<Identity>,
}

/// One event of a subscription, checked: it comes in the order the protocol promises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A snapshot of `policy_count` policies at `seq` begins: drop the copy (and any snapshot
    /// being received) once it ends.
    Reset {
        /// The seq the snapshot shows.
        seq: u64,
        /// How many policies it announces.
        policy_count: u64,
    },
    /// One policy of the snapshot, in ledger order, with the seq that inserted it.
    Snapshot(pb::Policy),
    /// The snapshot is complete: every announced policy came, and it ends at its seq. The copy
    /// is now the snapshot; [`Event::CaughtUp`] follows.
    SnapshotEnd {
        /// The seq the snapshot shows.
        seq: u64,
    },
    /// A policy was inserted: the change right after the last one.
    Inserted(pb::Policy),
    /// The policy `id` was deleted: the change right after the last one.
    Deleted {
        /// The change's seq.
        seq: u64,
        /// The deleted policy's id.
        id: String,
    },
    /// Everything up to `seq` was sent; live changes follow.
    CaughtUp {
        /// The seq the subscriber is at.
        seq: u64,
    },
    /// The master's head is `head_seq` (a quiet stream's heartbeat).
    Progress {
        /// The master's head seq.
        head_seq: u64,
    },
}

/// The stream broke the protocol: subscribe again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected event from the master: {0}")]
pub struct ProtocolError(pub String);

/// A snapshot being received.
#[derive(Debug)]
struct Receiving {
    seq: u64,
    expected: u64,
    received: u64,
}

/// Checks that one subscription's messages come as the protocol promises, and turns them into
/// [`Event`]s. A change already applied (its seq at or below the last) is skipped.
#[derive(Debug)]
pub struct Checker {
    /// The seq of the last change handed on, or the seq subscribed after.
    last: u64,
    /// A subscription after seq 0 starts with a reset: no change or `caught_up` before it.
    awaiting_reset: bool,
    receiving: Option<Receiving>,
}

impl Checker {
    /// The checker of a subscription that asked for the changes after `after_seq`.
    pub fn new(after_seq: u64) -> Checker {
        Checker {
            last: after_seq,
            awaiting_reset: after_seq == 0,
            receiving: None,
        }
    }

    /// The seq of the last change handed on (or of the snapshot installed).
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Checks `message` and appends what it means to `events` (nothing for a change already
    /// applied, two events for the `caught_up` that ends a snapshot).
    pub fn check(
        &mut self,
        message: pb::StreamLedgerResponse,
        events: &mut Vec<Event>,
    ) -> Result<(), ProtocolError> {
        let seq = message.seq;
        let Some(event) = message.event else {
            return Err(ProtocolError(format!("event {seq} is empty")));
        };
        match event {
            Proto::Reset(reset) => {
                if self.receiving.take().is_some() {
                    tracing::info!("the snapshot being received is replaced by a new one");
                }
                tracing::info!(
                    "the master sends a snapshot: {} policies at seq {}",
                    reset.policy_count,
                    reset.snapshot_seq
                );
                self.receiving = Some(Receiving {
                    seq: reset.snapshot_seq,
                    expected: reset.policy_count,
                    received: 0,
                });
                self.awaiting_reset = false;
                events.push(Event::Reset {
                    seq: reset.snapshot_seq,
                    policy_count: reset.policy_count,
                });
            }
            Proto::Inserted(policy) => {
                if let Some(receiving) = &mut self.receiving {
                    if policy.seq > receiving.seq {
                        return Err(ProtocolError(format!(
                            "the snapshot at seq {} holds policy {:?} of seq {}",
                            receiving.seq, policy.id, policy.seq
                        )));
                    }
                    receiving.received += 1;
                    events.push(Event::Snapshot(policy));
                } else if self.next(seq)? {
                    if policy.seq != seq {
                        return Err(ProtocolError(format!(
                            "change {seq} inserts policy {:?} with seq {}",
                            policy.id, policy.seq
                        )));
                    }
                    events.push(Event::Inserted(policy));
                }
            }
            Proto::DeletedId(id) => {
                if self.receiving.is_some() {
                    return Err(ProtocolError(format!(
                        "a delete (seq {seq}) inside a snapshot"
                    )));
                }
                if self.next(seq)? {
                    events.push(Event::Deleted { seq, id });
                }
            }
            Proto::CaughtUp(_) => {
                if let Some(receiving) = self.receiving.take() {
                    if seq != receiving.seq {
                        return Err(ProtocolError(format!(
                            "the snapshot at seq {} ended at seq {seq}",
                            receiving.seq
                        )));
                    }
                    if receiving.received != receiving.expected {
                        return Err(ProtocolError(format!(
                            "the snapshot announced {} policies and sent {}",
                            receiving.expected, receiving.received
                        )));
                    }
                    self.last = seq;
                    events.push(Event::SnapshotEnd { seq });
                } else if self.awaiting_reset {
                    return Err(ProtocolError(
                        "caught up without the snapshot a subscription after seq 0 starts with"
                            .into(),
                    ));
                } else if seq != self.last {
                    return Err(ProtocolError(format!(
                        "caught up at seq {seq}, but the changes applied end at seq {}",
                        self.last
                    )));
                }
                events.push(Event::CaughtUp { seq });
            }
            Proto::Progress(progress) => {
                events.push(Event::Progress {
                    head_seq: progress.head_seq.max(seq),
                });
            }
        }
        Ok(())
    }

    /// Whether the change `seq` is the next one (then it is the last from now on); `false` for
    /// one already applied, which is skipped.
    fn next(&mut self, seq: u64) -> Result<bool, ProtocolError> {
        if self.awaiting_reset {
            return Err(ProtocolError(format!(
                "change {seq} arrived before the snapshot a subscription after seq 0 starts with"
            )));
        }
        if seq <= self.last {
            tracing::debug!(
                seq,
                applied = self.last,
                "skipping a change already applied"
            );
            return Ok(false);
        }
        if seq != self.last + 1 {
            return Err(ProtocolError(format!(
                "change {seq} follows change {}: the changes between are missing",
                self.last
            )));
        }
        self.last = seq;
        Ok(true)
    }
}

/// When a [`Sink`] wants the subscription to start again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// At once, after the seq the sink now holds (it dropped its copy and waits for a snapshot,
    /// say).
    Now,
    /// After the backoff delay (a write failed: the sink repairs itself in
    /// [`Sink::prepare`]).
    Later,
}

/// The copy a subscription feeds: a member's ledger file, a relay's database.
pub trait Sink: Send {
    /// The seq to subscribe after: every change up to it is in the copy (0: none, send a
    /// snapshot).
    fn resume_seq(&self) -> u64;

    /// Gets ready before each subscription (reopens what a failed write left). An error is
    /// logged by the sink; the subscription is tried again after the backoff delay.
    fn prepare(&mut self) -> impl Future<Output = Result<(), ()>> + Send {
        async { Ok(()) }
    }

    /// Subscribed to `master` on `channel` (a connection that calls besides the stream may
    /// use); `again` when an earlier subscription had reached its stream.
    fn connected(
        &mut self,
        master: &MasterAddr,
        channel: &Channel,
        again: bool,
    ) -> impl Future<Output = ()> + Send;

    /// Applies checked events: changes in seq order, snapshots whole. What came before a
    /// failing event stays applied.
    fn apply(&mut self, events: Vec<Event>) -> impl Future<Output = Result<(), Stop>> + Send;

    /// How often [`Sink::tick`] runs while a stream is open; never by default.
    fn tick_interval(&self) -> Option<Duration> {
        None
    }

    /// Runs every [`Sink::tick_interval`] while a stream is open, between batches.
    fn tick(&mut self) -> impl Future<Output = Result<(), Stop>> + Send {
        async { Ok(()) }
    }

    /// The subscription ended, however it ended: a snapshot being received is dropped.
    fn disconnected(&mut self) -> impl Future<Output = ()> + Send;

    /// The subscribers below this one, reported upstream with its progress (a relay's own);
    /// none by default.
    fn downstream(&self) -> Option<Downstream> {
        None
    }
}

/// Why a subscription ended.
enum End {
    /// The follower is stopping.
    Shutdown,
    /// The master dropped us for falling behind: resume at once from the applied seq.
    Lagged(String),
    /// The master's copy was reset under the stream (a relay whose upstream sent it a
    /// snapshot): resume at once, and get a snapshot if now behind what it can replay.
    Reset(String),
    /// The stream broke or the master went away.
    Disconnected(String),
    /// The stream broke the protocol: subscribe again.
    Protocol(String),
    /// The sink asked to subscribe again.
    Sink(Stop),
}

/// Follows `options.masters` into `sink` until `shutdown` is cancelled; a batch being applied
/// is applied to its end first.
pub async fn follow<S: Sink>(options: &FollowOptions, sink: &mut S, shutdown: &CancellationToken) {
    let masters = &options.masters;
    if masters.is_empty() {
        return;
    }
    let mut backoff = Backoff::new(options.retry_min, options.retry_max);
    let mut link = LinkLog::default();
    // One per run: a stream opened again after a reconnection takes the same entry over.
    let session_id = report::new_session_id();
    let subscriber = options
        .identity
        .as_ref()
        .map(|identity| pb::SubscriberIdentity {
            node_name: identity.node_name.clone(),
            version: identity.version.clone(),
            session_id: session_id.clone(),
        });
    let mut current = 0;
    let mut wait = false;
    'run: loop {
        if wait {
            let delay = backoff.next_delay();
            tracing::debug!(?delay, "reconnecting after a delay");
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break 'run,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        wait = true;
        if sink.prepare().await.is_err() {
            continue;
        }
        let after_seq = sink.resume_seq();
        let mut subscribed = None;
        for attempt in 0..masters.len() {
            let index = (current + attempt) % masters.len();
            let master = &masters[index];
            let subscribing = subscribe(
                master,
                &options.client,
                after_seq,
                subscriber.clone(),
                options.connect_timeout,
            );
            let result = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break 'run,
                result = subscribing => result,
            };
            match result {
                Ok(stream) => {
                    current = index;
                    subscribed = Some(stream);
                    break;
                }
                Err(reason) => link.unreachable(master, &reason),
            }
        }
        let Some((channel, stream)) = subscribed else {
            link.all_unreachable(backoff.max());
            continue;
        };
        let master = &masters[current];
        let again = link.connected(master, after_seq);
        sink.connected(master, &channel, again).await;
        let checker = Checker::new(after_seq);
        let (durable, watched) = watch::channel(after_seq);
        // Reports run beside the stream, never holding it up, and end with it.
        let _reporting = subscriber.is_some().then(|| {
            AbortOnDrop(tokio::spawn(report::report(
                channel.clone(),
                options.client.clone(),
                session_id.clone(),
                watched,
                sink.downstream(),
            )))
        });
        let end = stream_into(
            sink,
            checker,
            stream,
            master,
            shutdown,
            &mut backoff,
            &durable,
        )
        .await;
        sink.disconnected().await;
        match end {
            End::Shutdown => break 'run,
            End::Lagged(reason) => {
                tracing::info!(
                    "fell behind master {master} ({reason}); resuming from seq {}",
                    sink.resume_seq()
                );
                wait = false;
            }
            End::Reset(reason) => {
                tracing::info!(
                    "master {master} reset its ledger ({reason}); resuming from seq {}",
                    sink.resume_seq()
                );
                wait = false;
            }
            End::Disconnected(reason) => {
                link.disconnected(master, &reason);
                // Move on to the next master; with one master this is the same address.
                current = (current + 1) % masters.len();
            }
            End::Protocol(reason) => {
                tracing::warn!("dropping the stream from master {master}: {reason}");
            }
            End::Sink(Stop::Now) => wait = false,
            End::Sink(Stop::Later) => {}
        }
    }
    tracing::debug!("stopped following");
}

/// A task aborted when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Connects to `master` and starts a subscription after `after_seq`, as `subscriber`.
async fn subscribe(
    master: &MasterAddr,
    options: &ClientOptions,
    after_seq: u64,
    subscriber: Option<pb::SubscriberIdentity>,
    timeout: Duration,
) -> Result<(Channel, Streaming<pb::StreamLedgerResponse>), String> {
    let channel = master.channel(options, timeout).await?;
    let mut client = options.client(channel.clone());
    let request = client.stream_ledger(pb::StreamLedgerRequest {
        after_seq,
        subscriber,
    });
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(response)) => Ok((channel, response.into_inner())),
        Ok(Err(status)) => Err(masters::describe_call_failure(&status, options)),
        Err(_) => Err(format!("no answer to the subscription within {timeout:?}")),
    }
}

/// Hands the stream to the sink until it ends.
async fn stream_into<S: Sink>(
    sink: &mut S,
    mut checker: Checker,
    mut stream: Streaming<pb::StreamLedgerResponse>,
    master: &MasterAddr,
    shutdown: &CancellationToken,
    backoff: &mut Backoff,
    durable: &watch::Sender<u64>,
) -> End {
    let mut caught_up_once = false;
    let mut tick = sink.tick_interval().map(|period| {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        tick
    });
    loop {
        let ticked = async {
            match &mut tick {
                Some(tick) => {
                    tick.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return End::Shutdown,
            message = stream.message() => message,
            _ = ticked => {
                let ticked = sink.tick().await;
                durable.send_if_modified(|seq| moved(seq, sink.resume_seq()));
                if let Err(stop) = ticked {
                    return End::Sink(stop);
                }
                continue;
            }
        };
        let mut batch = match first {
            Ok(Some(message)) => vec![message],
            Ok(None) => return End::Disconnected("the master ended the stream".into()),
            Err(status) => return ended(&status),
        };
        // Take whatever else has already arrived, without waiting, to apply it together.
        let mut bytes = message_bytes(&batch[0]);
        let mut end = None;
        while batch.len() < MAX_BATCH_EVENTS && bytes < MAX_BATCH_BYTES {
            match ready_now(stream.message()) {
                None => break,
                Some(Ok(Some(message))) => {
                    bytes += message_bytes(&message);
                    batch.push(message);
                }
                Some(Ok(None)) => {
                    end = Some(End::Disconnected("the master ended the stream".into()));
                    break;
                }
                Some(Err(status)) => {
                    end = Some(ended(&status));
                    break;
                }
            }
        }
        // What is valid before a protocol error is applied; the error then ends the stream.
        let mut events = Vec::with_capacity(batch.len());
        let mut broken = None;
        for message in batch {
            if let Err(e) = checker.check(message, &mut events) {
                broken = Some(e);
                break;
            }
        }
        let caught_up = events.iter().rev().find_map(|event| match event {
            Event::CaughtUp { seq } => Some(*seq),
            _ => None,
        });
        // The sink's write runs to its end even when a signal arrives meanwhile: shutdown is
        // only looked at between batches.
        let applied = sink.apply(events).await;
        // What the sink made durable, also before a failure midway.
        durable.send_if_modified(|seq| moved(seq, sink.resume_seq()));
        if let Err(stop) = applied {
            return End::Sink(stop);
        }
        if let Some(seq) = caught_up {
            if caught_up_once {
                tracing::debug!(seq, "caught up");
            } else {
                // Only a subscription that got this far counts as a success: one that a
                // master accepts and then fails keeps backing off.
                caught_up_once = true;
                backoff.reset();
                tracing::info!("caught up with master {master} at seq {seq}");
            }
        }
        if let Some(ProtocolError(reason)) = broken {
            return End::Protocol(reason);
        }
        if let Some(end) = end {
            return end;
        }
    }
}

/// Sets `seq` to `now`; whether it changed.
fn moved(seq: &mut u64, now: u64) -> bool {
    let changed = *seq != now;
    *seq = now;
    changed
}

/// The output of `future` if it is ready at once; `None` without waiting otherwise.
///
/// `tokio::time::timeout(Duration::ZERO, ..)` would wait for the timer's next 1 ms tick before
/// giving up, which delayed every applied batch by about a millisecond (strace: a 1 ms
/// `epoll_wait` between receiving a change and writing it).
fn ready_now<F: Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    // Nothing needs waking: a pending future is dropped, and the stream is polled again with
    // the task's own waker at the next `select!`. `Streaming::message` loses nothing when dropped.
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}

fn message_bytes(message: &pb::StreamLedgerResponse) -> usize {
    match &message.event {
        Some(Proto::Inserted(policy)) => policy.json.len(),
        _ => 0,
    }
}

/// What a failed stream means: the master's reason says whether to resume at once; any other
/// end (too many streams included) backs off and may try the next master.
fn ended(status: &tonic::Status) -> End {
    use ledger_proto::errors::{self, Reason};
    let reason = masters::describe_status(status);
    match errors::reason(status) {
        Some(Reason::SubscriberLagged | Reason::SnapshotStalled) => End::Lagged(reason),
        // A relay ends its streams so when its upstream replaced its copy with a snapshot.
        _ if status.code() == Code::Aborted => End::Reset(reason),
        _ => End::Disconnected(reason),
    }
}

/// Logs the link's changes of state once each.
#[derive(Default)]
struct LinkLog {
    /// Masters already reported unreachable since the last connection.
    reported: HashSet<String>,
    /// Whether "no master reachable" was said since the last connection.
    all_reported: bool,
    /// Whether the last connection has reached a stream (so the next one is a reconnect).
    connected_before: bool,
}

impl LinkLog {
    /// Logs the connection; returns whether it is a reconnection.
    fn connected(&mut self, master: &MasterAddr, after_seq: u64) -> bool {
        let again = self.connected_before;
        tracing::info!(
            "{}connected to master {master}; streaming the changes after seq {after_seq}",
            if again { "re" } else { "" }
        );
        self.reported.clear();
        self.all_reported = false;
        self.connected_before = true;
        again
    }

    fn disconnected(&mut self, master: &MasterAddr, reason: &str) {
        tracing::warn!("disconnected from master {master}: {reason}; keeping the copy as it is");
        // Its failures to come are the same outage: do not report them again.
        self.reported.insert(master.to_string());
    }

    fn unreachable(&mut self, master: &MasterAddr, reason: &str) {
        if self.reported.insert(master.to_string()) {
            tracing::warn!("cannot reach master {master}: {reason}");
        } else {
            tracing::debug!("cannot reach master {master}: {reason}");
        }
    }

    fn all_unreachable(&mut self, max_delay: Duration) {
        if !self.all_reported {
            self.all_reported = true;
            tracing::warn!(
                "no master is reachable; retrying with backoff (at most {max_delay:?} apart) and keeping the copy as it is"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(seq: u64, event: Proto) -> pb::StreamLedgerResponse {
        pb::StreamLedgerResponse {
            seq,
            event: Some(event),
        }
    }

    fn policy(seq: u64) -> pb::Policy {
        pb::Policy {
            id: format!("id-{seq}"),
            r#type: "operator".into(),
            json: format!(r#"{{"operator": {{"id": "id-{seq}"}}}}"#),
            seq,
        }
    }

    fn inserted(seq: u64) -> pb::StreamLedgerResponse {
        message(seq, Proto::Inserted(policy(seq)))
    }

    fn deleted(seq: u64) -> pb::StreamLedgerResponse {
        message(seq, Proto::DeletedId(format!("id-{seq}")))
    }

    fn reset(seq: u64, count: u64) -> pb::StreamLedgerResponse {
        message(
            seq,
            Proto::Reset(pb::Reset {
                snapshot_seq: seq,
                policy_count: count,
            }),
        )
    }

    fn caught_up(seq: u64) -> pb::StreamLedgerResponse {
        message(seq, Proto::CaughtUp(pb::CaughtUp {}))
    }

    /// The events of `messages`, or the first protocol error.
    fn check(
        checker: &mut Checker,
        messages: Vec<pb::StreamLedgerResponse>,
    ) -> Result<Vec<Event>, ProtocolError> {
        let mut events = Vec::new();
        for message in messages {
            checker.check(message, &mut events)?;
        }
        Ok(events)
    }

    #[test]
    fn a_snapshot_then_live_changes() {
        let mut checker = Checker::new(0);
        let events = check(
            &mut checker,
            vec![
                reset(4, 2),
                inserted(1),
                inserted(3),
                caught_up(4),
                inserted(5),
                deleted(6),
            ],
        )
        .unwrap();
        assert_eq!(
            events,
            vec![
                Event::Reset {
                    seq: 4,
                    policy_count: 2
                },
                Event::Snapshot(policy(1)),
                Event::Snapshot(policy(3)),
                Event::SnapshotEnd { seq: 4 },
                Event::CaughtUp { seq: 4 },
                Event::Inserted(policy(5)),
                Event::Deleted {
                    seq: 6,
                    id: "id-6".into()
                },
            ]
        );
        assert_eq!(checker.last(), 6);
    }

    #[test]
    fn a_snapshot_must_be_whole_and_end_at_its_seq() {
        let short = check(
            &mut Checker::new(0),
            vec![reset(9, 3), inserted(2), caught_up(9)],
        );
        assert!(short.unwrap_err().0.contains("announced 3"));
        let elsewhere = check(
            &mut Checker::new(0),
            vec![reset(9, 1), inserted(2), caught_up(8)],
        );
        assert!(elsewhere.unwrap_err().0.contains("ended at seq 8"));
        let delete = check(&mut Checker::new(0), vec![reset(9, 1), deleted(3)]);
        assert!(delete.unwrap_err().0.contains("inside a snapshot"));
        let later = check(&mut Checker::new(0), vec![reset(9, 1), inserted(10)]);
        assert!(later.is_err());
    }

    #[test]
    fn gaps_are_refused_and_changes_seen_again_skipped() {
        let mut checker = Checker::new(3);
        let events = check(&mut checker, vec![inserted(2), inserted(3), inserted(4)]).unwrap();
        assert_eq!(events, vec![Event::Inserted(policy(4))]);
        let gap = check(&mut checker, vec![inserted(6)]).unwrap_err();
        assert!(gap.0.contains("missing"), "{gap}");
        assert_eq!(checker.last(), 4);
        let early = check(&mut checker, vec![caught_up(5)]).unwrap_err();
        assert!(early.0.contains("caught up at seq 5"), "{early}");
        assert_eq!(
            check(&mut checker, vec![caught_up(4)]).unwrap(),
            vec![Event::CaughtUp { seq: 4 }]
        );
    }

    #[test]
    fn a_subscription_after_zero_starts_with_a_snapshot() {
        assert!(check(&mut Checker::new(0), vec![inserted(1)]).is_err());
        assert!(check(&mut Checker::new(0), vec![caught_up(0)]).is_err());
        let empty = check(&mut Checker::new(0), vec![reset(0, 0), caught_up(0)]).unwrap();
        assert_eq!(
            empty,
            vec![
                Event::Reset {
                    seq: 0,
                    policy_count: 0
                },
                Event::SnapshotEnd { seq: 0 },
                Event::CaughtUp { seq: 0 }
            ]
        );
        let bare = check(
            &mut Checker::new(0),
            vec![pb::StreamLedgerResponse {
                seq: 1,
                event: None,
            }],
        );
        assert!(bare.is_err());
    }
}
