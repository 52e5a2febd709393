//! Who subscribes: the registry of the master's open `StreamLedger` streams, with what each was
//! sent, what its subscriber reported durable, and (from a relay) the subscribers below it.
//!
//! Each stream registers when it opens and leaves when it ends (its [`SubscriberGuard`] drops).
//! What a stream sends is counted with atomics in its own entry (no lock per message);
//! `ReportProgress` ([`Subscribers::report`]) sets the durable seq and the downstream list; the
//! one lock, on the map of entries, is taken to open or close a stream, to find a report's
//! session, and to list. [`Subscribers::list`] flattens the tree: every stream, then the
//! subscribers each relay among them reported, with `via` naming the relays between.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

use crate::error::LedgerError;
use crate::metrics;

/// The most `downstream` entries one report may carry.
pub const MAX_DOWNSTREAM: usize = 10_000;

/// The most `downstream` entries the registry keeps for all its streams together: what bounds
/// its memory, whoever reports (a report past it is refused and changes nothing).
pub const MAX_DOWNSTREAM_TOTAL: usize = 100_000;

/// The longest node name, version, peer, identity or via a subscriber may send, in bytes.
pub const MAX_TEXT_BYTES: usize = 256;

/// The longest session id, in bytes.
pub const MAX_SESSION_BYTES: usize = 64;

/// How a subscriber names itself when it subscribes (`StreamLedgerRequest.subscriber`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SubscriberIdentity {
    /// Its node name (a member's or a relay's `--node-name`).
    pub node_name: String,
    /// Its software and version.
    pub version: String,
    /// The random id of its run, which its reports carry.
    pub session_id: String,
}

impl SubscriberIdentity {
    /// Refuses strings longer than the limits ([`LedgerError::FieldTooLong`]).
    pub fn check(&self) -> Result<(), LedgerError> {
        check_len("subscriber.node_name", &self.node_name, MAX_TEXT_BYTES)?;
        check_len("subscriber.version", &self.version, MAX_TEXT_BYTES)?;
        check_len("subscriber.session_id", &self.session_id, MAX_SESSION_BYTES)
    }
}

/// One subscriber as this master sees it: a stream of its own, or one a relay reported below it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SubscriberInfo {
    /// The node name it subscribed with (empty if none).
    pub node_name: String,
    /// Its software and version (empty if none).
    pub version: String,
    /// Its address as its master saw it, `IP:PORT`.
    pub peer: String,
    /// The auth file's name of its credentials; empty without an auth file.
    pub identity: String,
    /// When its stream opened, in milliseconds since the Unix epoch.
    pub since_unix_ms: i64,
    /// The seq of the last event its stream was sent.
    pub sent_seq: u64,
    /// The last seq it reported durable (until it reports: the seq it subscribed after).
    pub durable_seq: u64,
    /// This master's head minus `durable_seq` (0 when it is ahead).
    pub lag: u64,
    /// The bytes of the events its stream was sent.
    pub bytes_sent: u64,
    /// The relays between this master and it, nearest first, joined by `/`; empty if direct.
    pub via: String,
}

impl SubscriberInfo {
    /// Refuses strings longer than the limits, naming the field as `downstream.FIELD`.
    fn check_downstream(&self) -> Result<(), LedgerError> {
        for (field, text) in [
            ("downstream.node_name", &self.node_name),
            ("downstream.version", &self.version),
            ("downstream.peer", &self.peer),
            ("downstream.identity", &self.identity),
        ] {
            check_len(field, text, MAX_TEXT_BYTES)?;
        }
        // A chain of relays: each adds a name and a `/`.
        check_len("downstream.via", &self.via, 4 * MAX_TEXT_BYTES)
    }
}

/// The subscribers of a master at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SubscriberList {
    /// The master's head seq, which `lag` counts from.
    pub head_seq: u64,
    /// Every stream, then every subscriber reported below the relays among them.
    pub subscribers: Vec<SubscriberInfo>,
}

/// What a stream registers with when it opens.
#[derive(Debug, Clone, Default)]
pub struct NewSubscriber {
    /// How it named itself, if it did.
    pub identity: Option<SubscriberIdentity>,
    /// Its address, `IP:PORT`.
    pub peer: String,
    /// The auth file's name of its credentials; empty without an auth file.
    pub authenticated: String,
    /// The seq it subscribed after: durable on its side.
    pub after_seq: u64,
}

/// One open stream.
#[derive(Debug)]
struct Entry {
    /// Unique among the streams of this registry: a stream that reopens a session replaces the
    /// entry, and the old stream's guard then removes nothing.
    stream: u64,
    node_name: String,
    version: String,
    peer: String,
    identity: String,
    since_unix_ms: i64,
    sent_seq: AtomicU64,
    durable_seq: AtomicU64,
    bytes_sent: AtomicU64,
    /// What it reported below it (a relay), as its own list showed them.
    downstream: Mutex<Arc<Vec<SubscriberInfo>>>,
}

/// The registry of a master's subscribers; clones share it.
#[derive(Debug, Clone)]
pub struct Subscribers {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    head: watch::Receiver<u64>,
    /// By session id (a stream without one: by a key of its own).
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    next_stream: AtomicU64,
    /// The `downstream` entries kept for every stream, under the lock of `entries`.
    downstream_total: AtomicUsize,
}

/// A stream's place in the registry: counts what it sends, and leaves the registry when dropped.
#[derive(Debug)]
pub struct SubscriberGuard {
    inner: Arc<Inner>,
    key: String,
    entry: Arc<Entry>,
}

impl SubscriberGuard {
    /// The stream sent an event of `seq` (its seq field) in `bytes` bytes.
    pub fn sent(&self, seq: u64, bytes: usize) {
        self.entry.sent_seq.store(seq, Ordering::Relaxed);
        self.entry
            .bytes_sent
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        let mut entries = self.inner.lock();
        if entries
            .get(&self.key)
            .is_some_and(|entry| entry.stream == self.entry.stream)
        {
            entries.remove(&self.key);
        }
        // Whether listed or taken over, what it reported goes with it.
        let below = self.entry.take_downstream();
        self.inner
            .downstream_total
            .fetch_sub(below, Ordering::Relaxed);
    }
}

impl Entry {
    /// Drops what it reported below it; returns how many entries that was.
    fn take_downstream(&self) -> usize {
        let mut downstream = self
            .downstream
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut *downstream).len()
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Entry>>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Subscribers {
    /// An empty registry whose lags count from the head `head` watches.
    pub fn new(head: watch::Receiver<u64>) -> Subscribers {
        Subscribers {
            inner: Arc::new(Inner {
                head,
                entries: Mutex::new(HashMap::new()),
                next_stream: AtomicU64::new(1),
                downstream_total: AtomicUsize::new(0),
            }),
        }
    }

    /// The head seq lags count from.
    pub fn head(&self) -> u64 {
        *self.inner.head.borrow()
    }

    /// How many streams are registered.
    pub fn len(&self) -> usize {
        self.inner.lock().len()
    }

    /// Whether no stream is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers a stream that opens; it stays listed until the guard drops. A stream of a
    /// session already listed (its subscriber reconnected before the master saw the old stream
    /// end) takes the session over.
    pub fn register(&self, new: NewSubscriber) -> SubscriberGuard {
        let stream = self.inner.next_stream.fetch_add(1, Ordering::Relaxed);
        let identity = new.identity.unwrap_or_default();
        let key = if identity.session_id.is_empty() {
            // Not a session id a subscriber can send: those are at most 64 bytes of text.
            format!("\0stream-{stream}")
        } else {
            identity.session_id
        };
        let since_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let entry = Arc::new(Entry {
            stream,
            node_name: identity.node_name,
            version: identity.version,
            peer: new.peer,
            identity: new.authenticated,
            since_unix_ms,
            sent_seq: AtomicU64::new(0),
            durable_seq: AtomicU64::new(new.after_seq),
            bytes_sent: AtomicU64::new(0),
            downstream: Mutex::new(Arc::new(Vec::new())),
        });
        self.inner.lock().insert(key.clone(), entry.clone());
        SubscriberGuard {
            inner: self.inner.clone(),
            key,
            entry,
        }
    }

    /// The subscriber of `session_id` made `durable_seq` durable, and (a relay) serves
    /// `downstream`. Returns the head seq. Refuses an unknown session, too many downstream
    /// entries and strings over the limits; observes the subscriber's lag in the metrics.
    pub fn report(
        &self,
        session_id: &str,
        durable_seq: u64,
        downstream: Vec<SubscriberInfo>,
    ) -> Result<u64, LedgerError> {
        check_len("session_id", session_id, MAX_SESSION_BYTES)?;
        if downstream.len() > MAX_DOWNSTREAM {
            return Err(LedgerError::TooManySubscribers {
                count: downstream.len(),
                limit: MAX_DOWNSTREAM,
            });
        }
        for info in &downstream {
            info.check_downstream()?;
        }
        let entries = self.inner.lock();
        let entry = (!session_id.is_empty())
            .then(|| entries.get(session_id))
            .flatten()
            .ok_or_else(|| LedgerError::SessionUnknown(session_id.to_string()))?;
        // Under the registry's lock: the total and the entries' lists move together.
        let mut kept = entry
            .downstream
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let total = self.inner.downstream_total.load(Ordering::Relaxed) - kept.len();
        if total + downstream.len() > MAX_DOWNSTREAM_TOTAL {
            return Err(LedgerError::TooManySubscribers {
                count: total + downstream.len(),
                limit: MAX_DOWNSTREAM_TOTAL,
            });
        }
        self.inner
            .downstream_total
            .store(total + downstream.len(), Ordering::Relaxed);
        *kept = Arc::new(downstream);
        entry.durable_seq.store(durable_seq, Ordering::Relaxed);
        drop(kept);
        drop(entries);
        let head = self.head();
        metrics::subscriber_lag(head.saturating_sub(durable_seq));
        Ok(head)
    }

    /// Every subscriber: each stream, then those reported below each relay, with `via`.
    pub fn list(&self) -> SubscriberList {
        let entries: Vec<Arc<Entry>> = self.inner.lock().values().cloned().collect();
        let head_seq = self.head();
        let mut subscribers = Vec::with_capacity(entries.len());
        let mut below = Vec::new();
        for entry in &entries {
            let durable_seq = entry.durable_seq.load(Ordering::Relaxed);
            subscribers.push(SubscriberInfo {
                node_name: entry.node_name.clone(),
                version: entry.version.clone(),
                peer: entry.peer.clone(),
                identity: entry.identity.clone(),
                since_unix_ms: entry.since_unix_ms,
                sent_seq: entry.sent_seq.load(Ordering::Relaxed),
                durable_seq,
                lag: head_seq.saturating_sub(durable_seq),
                bytes_sent: entry.bytes_sent.load(Ordering::Relaxed),
                via: String::new(),
            });
            let downstream = entry
                .downstream
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            if !downstream.is_empty() {
                below.push((entry.node_name.as_str(), downstream));
            }
        }
        for (relay, downstream) in below {
            for info in downstream.iter() {
                let via = if info.via.is_empty() {
                    relay.to_string()
                } else {
                    format!("{relay}/{}", info.via)
                };
                subscribers.push(SubscriberInfo {
                    via,
                    lag: head_seq.saturating_sub(info.durable_seq),
                    ..info.clone()
                });
            }
        }
        SubscriberList {
            head_seq,
            subscribers,
        }
    }
}

fn check_len(field: &str, text: &str, limit: usize) -> Result<(), LedgerError> {
    if text.len() > limit {
        return Err(LedgerError::FieldTooLong {
            field: field.to_string(),
            limit,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscriber(name: &str, session: &str, after_seq: u64) -> NewSubscriber {
        NewSubscriber {
            identity: Some(SubscriberIdentity {
                node_name: name.into(),
                version: "member 0.1.0".into(),
                session_id: session.into(),
            }),
            peer: "127.0.0.1:5000".into(),
            authenticated: String::new(),
            after_seq,
        }
    }

    fn find<'a>(list: &'a SubscriberList, name: &str) -> &'a SubscriberInfo {
        list.subscribers
            .iter()
            .find(|s| s.node_name == name)
            .unwrap_or_else(|| panic!("{name} not listed in {list:?}"))
    }

    #[test]
    fn streams_are_listed_while_open_with_what_they_sent_and_made_durable() {
        let (head, watched) = watch::channel(10);
        let subscribers = Subscribers::new(watched);
        let a = subscribers.register(subscriber("a", "s-a", 4));
        let anonymous = subscribers.register(NewSubscriber::default());
        a.sent(7, 100);
        a.sent(8, 50);
        let list = subscribers.list();
        assert_eq!(list.head_seq, 10);
        assert_eq!(list.subscribers.len(), 2);
        let listed = find(&list, "a");
        assert_eq!(
            (
                listed.sent_seq,
                listed.bytes_sent,
                listed.durable_seq,
                listed.lag
            ),
            (8, 150, 4, 6)
        );
        assert_eq!(listed.version, "member 0.1.0");
        assert!(listed.since_unix_ms > 0);
        assert_eq!(subscribers.report("s-a", 8, Vec::new()).unwrap(), 10);
        head.send_replace(12);
        let listed = find(&subscribers.list(), "a").clone();
        assert_eq!((listed.durable_seq, listed.lag), (8, 4));
        // Ahead of the head (a relay a moment behind its upstream): no lag, not a wrap.
        subscribers.report("s-a", 20, Vec::new()).unwrap();
        assert_eq!(find(&subscribers.list(), "a").lag, 0);
        drop(anonymous);
        assert_eq!(subscribers.len(), 1);
        drop(a);
        assert!(subscribers.is_empty());
        assert!(matches!(
            subscribers.report("s-a", 9, Vec::new()),
            Err(LedgerError::SessionUnknown(session)) if session == "s-a"
        ));
        // A stream without a session cannot be reported for, even by an empty id.
        let _anonymous = subscribers.register(NewSubscriber::default());
        assert!(matches!(
            subscribers.report("", 9, Vec::new()),
            Err(LedgerError::SessionUnknown(_))
        ));
    }

    #[test]
    fn a_reconnected_session_takes_the_entry_over() {
        let subscribers = Subscribers::new(watch::channel(5).1);
        let old = subscribers.register(subscriber("a", "s", 1));
        let new = subscribers.register(subscriber("a", "s", 3));
        assert_eq!(subscribers.len(), 1);
        // The old stream ends after the new one opened: the new one stays.
        drop(old);
        assert_eq!(find(&subscribers.list(), "a").durable_seq, 3);
        subscribers.report("s", 5, Vec::new()).unwrap();
        drop(new);
        assert!(subscribers.is_empty());
    }

    #[test]
    fn relays_report_the_subscribers_below_them() {
        let subscribers = Subscribers::new(watch::channel(100).1);
        let _relay = subscribers.register(subscriber("relay-a", "r", 90));
        let below = vec![
            SubscriberInfo {
                node_name: "m1".into(),
                durable_seq: 95,
                lag: 0,
                ..Default::default()
            },
            SubscriberInfo {
                node_name: "m2".into(),
                durable_seq: 40,
                via: "relay-b".into(),
                ..Default::default()
            },
        ];
        subscribers.report("r", 99, below).unwrap();
        let list = subscribers.list();
        assert_eq!(list.subscribers.len(), 3);
        assert_eq!(find(&list, "relay-a").via, "");
        let m1 = find(&list, "m1");
        // The lag counts from this master's head.
        assert_eq!((m1.via.as_str(), m1.lag), ("relay-a", 5));
        let m2 = find(&list, "m2");
        assert_eq!((m2.via.as_str(), m2.lag), ("relay-a/relay-b", 60));
        // A report replaces what was below.
        subscribers.report("r", 100, Vec::new()).unwrap();
        assert_eq!(subscribers.list().subscribers.len(), 1);
    }

    #[test]
    fn hostile_reports_are_refused_precisely() {
        let subscribers = Subscribers::new(watch::channel(1).1);
        let _relay = subscribers.register(subscriber("relay", "r", 0));
        let many = vec![SubscriberInfo::default(); MAX_DOWNSTREAM + 1];
        assert!(matches!(
            subscribers.report("r", 1, many),
            Err(LedgerError::TooManySubscribers { count, limit }) if count == MAX_DOWNSTREAM + 1 && limit == MAX_DOWNSTREAM
        ));
        let long = vec![SubscriberInfo {
            peer: "x".repeat(MAX_TEXT_BYTES + 1),
            ..Default::default()
        }];
        assert!(matches!(
            subscribers.report("r", 1, long),
            Err(LedgerError::FieldTooLong { field, limit }) if field == "downstream.peer" && limit == MAX_TEXT_BYTES
        ));
        assert!(matches!(
            subscribers.report(&"s".repeat(65), 1, Vec::new()),
            Err(LedgerError::FieldTooLong { field, .. }) if field == "session_id"
        ));
        let identity = SubscriberIdentity {
            node_name: "n".repeat(MAX_TEXT_BYTES + 1),
            ..Default::default()
        };
        assert!(matches!(
            identity.check(),
            Err(LedgerError::FieldTooLong { field, .. }) if field == "subscriber.node_name"
        ));
        // Nothing of a refused report was kept.
        assert_eq!(subscribers.list().subscribers.len(), 1);
        assert_eq!(subscribers.list().subscribers[0].durable_seq, 0);
    }

    #[test]
    fn what_all_relays_report_below_them_is_bounded() {
        let subscribers = Subscribers::new(watch::channel(1).1);
        let full = || vec![SubscriberInfo::default(); MAX_DOWNSTREAM];
        let mut relays: Vec<SubscriberGuard> = (0..=MAX_DOWNSTREAM_TOTAL / MAX_DOWNSTREAM)
            .map(|i| subscribers.register(subscriber(&format!("relay-{i}"), &format!("r{i}"), 0)))
            .collect();
        for i in 0..MAX_DOWNSTREAM_TOTAL / MAX_DOWNSTREAM {
            subscribers.report(&format!("r{i}"), 1, full()).unwrap();
            // Reporting again replaces: it does not count twice.
            subscribers.report(&format!("r{i}"), 1, full()).unwrap();
        }
        let last = format!("r{}", MAX_DOWNSTREAM_TOTAL / MAX_DOWNSTREAM);
        assert!(matches!(
            subscribers.report(&last, 1, full()),
            Err(LedgerError::TooManySubscribers { count, limit })
                if count == MAX_DOWNSTREAM_TOTAL + MAX_DOWNSTREAM && limit == MAX_DOWNSTREAM_TOTAL
        ));
        // A relay that goes frees its share.
        drop(relays.remove(0));
        subscribers.report(&last, 1, full()).unwrap();
    }

    #[test]
    fn ten_thousand_streams_are_listed_each_once() {
        // How fast: `ledger-bench --only-subscribers` (real streams), not a timed test.
        let subscribers = Subscribers::new(watch::channel(1_000).1);
        let guards: Vec<SubscriberGuard> = (0..10_000)
            .map(|i| subscribers.register(subscriber(&format!("node-{i}"), &format!("s{i}"), i)))
            .collect();
        for guard in &guards {
            guard.sent(999, 10);
        }
        let list = subscribers.list();
        assert_eq!(list.subscribers.len(), 10_000);
        let names: std::collections::HashSet<&str> = list
            .subscribers
            .iter()
            .map(|s| s.node_name.as_str())
            .collect();
        assert_eq!(names.len(), 10_000);
        assert!(list.subscribers.iter().all(|s| s.sent_seq == 999));
        drop(guards);
        assert!(subscribers.is_empty());
    }
}
