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
pub use crate::checker::{Checker, ProtocolError};
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
