//! Applies the events of a `StreamLedger` subscription to the [`LedgerFile`], a batch at a
//! time, and checks that they come as the protocol promises.
//!
//! Live and replayed changes must follow one another (each seq one more than the last); a
//! batch of them is written with one commit (an append, or one rewrite when it deletes). A
//! `reset` starts a snapshot in a temporary file that replaces the ledger only at its
//! `caught_up`; a stream that breaks before leaves the ledger untouched.
//!
//! A relay also needs, for its mirror database, what the stream delivered with the seqs the
//! file does not keep: a replica made with [`Replica::recording`] lists it as [`Delivered`].

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use ledger_proto::pb;
use ledger_proto::pb::stream_ledger_response::Event;
use ledger_storage::{Change, ChangeKind, StoredPolicy};

use crate::ledger_file::{FileError, LedgerFile, Snapshot};
use crate::line::PolicyLine;

/// How often the progress of a long snapshot is logged.
const SNAPSHOT_REPORT_INTERVAL: Duration = Duration::from_secs(5);

/// Why a batch could not be applied in full. What came before the failing event is applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Writing the file failed: reopen it (start-up repair) before going on.
    #[error(transparent)]
    File(#[from] FileError),
    /// The stream broke its promises (a gap, a delete inside a snapshot, ...): subscribe again
    /// from the applied seq.
    #[error("unexpected event from the master: {0}")]
    Protocol(String),
    /// The master's change does not fit the file (an insert of a policy the file holds, a
    /// delete of one it lacks): the file is not the master's ledger, resync from seq 0.
    #[error("the ledger file disagrees with the master: {0}")]
    Diverged(String),
}

/// What a batch did, for the logs of the sync loop.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchReport {
    /// How many inserts and deletes were applied (snapshot policies excluded).
    pub changes: usize,
    /// A snapshot began: its seq and policy count.
    pub reset: Option<(u64, u64)>,
    /// A snapshot was installed: its seq and policy count.
    pub installed: Option<(u64, usize)>,
    /// The stream said it is caught up at this seq.
    pub caught_up: Option<u64>,
    /// The master's head seq, from a `progress` event.
    pub head: Option<u64>,
}

/// What the stream delivered that the file now holds, in stream order, with the master's seqs:
/// what a relay's mirror is fed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// A live or replayed change that fits the file. It is listed even when the file already
    /// held it (and skipped it): the mirror may be behind the file after a crash between the
    /// two writes, and catches up from these.
    Change(Change),
    /// A snapshot the file installed at `seq`.
    Snapshot {
        /// The seq the snapshot shows.
        seq: u64,
        /// Its policies in ledger order, each with the seq that inserted it.
        policies: Vec<StoredPolicy>,
    },
}

/// A snapshot being received.
struct Receiving {
    snapshot: Snapshot,
    seq: u64,
    expected: u64,
    started: Instant,
    reported: Instant,
    /// The snapshot's policies with their seqs, kept only when recording for a relay.
    policies: Option<Vec<StoredPolicy>>,
}

/// Changes of the current batch not yet written.
#[derive(Default)]
struct Pending {
    /// The seq of the last change taken in.
    seq: u64,
    /// Inserted policies in order; `None` once deleted again within the batch.
    inserted: Vec<Option<PolicyLine>>,
    /// Where each id of `inserted` is.
    positions: HashMap<String, usize>,
    /// Policies of the file to delete.
    deleted: HashSet<String>,
    /// How many changes were taken in.
    changes: usize,
}

/// The member's copy of the ledger, fed by a subscription.
pub struct Replica {
    file: LedgerFile,
    receiving: Option<Receiving>,
    /// What was delivered since the last [`Replica::take_delivered`]; `None` unless recording.
    delivered: Option<Vec<Delivered>>,
}

impl Replica {
    /// A replica writing to `file`.
    pub fn new(file: LedgerFile) -> Replica {
        Replica {
            file,
            receiving: None,
            delivered: None,
        }
    }

    /// A replica writing to `file` that also lists what it was delivered (for a relay's
    /// mirror; a snapshot is then held in memory until installed).
    pub fn recording(file: LedgerFile) -> Replica {
        Replica {
            delivered: Some(Vec::new()),
            ..Replica::new(file)
        }
    }

    /// What was delivered since the last call, in stream order (empty unless recording).
    /// Changes past the file's seq may be listed when a batch failed midway: the caller keeps
    /// only those up to [`Replica::resume_seq`].
    pub fn take_delivered(&mut self) -> Vec<Delivered> {
        self.delivered
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    fn deliver(&mut self, delivered: Delivered) {
        if let Some(list) = &mut self.delivered {
            list.push(delivered);
        }
    }

    /// The ledger file.
    pub fn file(&self) -> &LedgerFile {
        &self.file
    }

    /// Looks for bytes someone else wrote into the file and journals them (see
    /// [`LedgerFile::take_foreign`]); not while a snapshot is being received, whose
    /// installation looks at the file it replaces anyway.
    pub fn take_foreign(&mut self) -> Result<bool, crate::ledger_file::FileError> {
        if self.receiving.is_some() {
            return Ok(false);
        }
        self.file.take_foreign()
    }

    /// The seq to subscribe after: the applied seq, or 0 when the file waits for a snapshot.
    pub fn resume_seq(&self) -> u64 {
        self.file.seq()
    }

    /// Distrusts the file: the next subscription asks for a snapshot.
    pub fn await_snapshot(&mut self, reason: &str) {
        self.abandon_snapshot();
        self.file.await_snapshot(reason);
    }

    /// Drops a snapshot being received (the stream ended): the file stays as it was.
    pub fn abandon_snapshot(&mut self) {
        if let Some(receiving) = self.receiving.take() {
            tracing::info!(
                received = receiving.snapshot.policy_count(),
                expected = receiving.expected,
                "the snapshot was cut short; the ledger file is unchanged"
            );
            self.file.abandon(receiving.snapshot);
        }
    }

    /// Applies a batch of events, writing the changes among them with as few commits as the
    /// events allow (one, unless a snapshot begins or ends inside the batch).
    pub fn apply(
        &mut self,
        events: Vec<pb::StreamLedgerResponse>,
    ) -> Result<BatchReport, ApplyError> {
        let mut report = BatchReport::default();
        let mut pending = Pending {
            seq: self.file.seq(),
            ..Pending::default()
        };
        for event in events {
            if let Err(e) = self.apply_one(event, &mut pending, &mut report) {
                if !matches!(e, ApplyError::File(_)) {
                    // Keep what was valid before the failing event; a write error instead
                    // means the file must be reopened first.
                    self.flush(&mut pending, &mut report)?;
                }
                return Err(e);
            }
        }
        self.flush(&mut pending, &mut report)?;
        if let Some(receiving) = &mut self.receiving
            && receiving.reported.elapsed() >= SNAPSHOT_REPORT_INTERVAL
        {
            receiving.reported = Instant::now();
            let received = receiving.snapshot.policy_count();
            tracing::info!(
                "receiving the snapshot: {received} of {} policies ({}%)",
                receiving.expected,
                (received as u64 * 100)
                    .checked_div(receiving.expected)
                    .unwrap_or(100)
            );
        }
        Ok(report)
    }

    fn apply_one(
        &mut self,
        event: pb::StreamLedgerResponse,
        pending: &mut Pending,
        report: &mut BatchReport,
    ) -> Result<(), ApplyError> {
        let seq = event.seq;
        let Some(event) = event.event else {
            return Err(ApplyError::Protocol(format!("event {seq} is empty")));
        };
        match event {
            Event::Reset(reset) => {
                self.flush(pending, report)?;
                self.abandon_snapshot();
                tracing::info!(
                    "the master sends a snapshot: {} policies at seq {}",
                    reset.policy_count,
                    reset.snapshot_seq
                );
                let now = Instant::now();
                self.receiving = Some(Receiving {
                    snapshot: self.file.begin_snapshot()?,
                    seq: reset.snapshot_seq,
                    expected: reset.policy_count,
                    started: now,
                    reported: now,
                    policies: self.delivered.as_ref().map(|_| Vec::new()),
                });
                report.reset = Some((reset.snapshot_seq, reset.policy_count));
            }
            Event::Inserted(policy) => {
                let id = policy.id;
                let policy_type = policy.r#type;
                let line = PolicyLine::parse(policy.json).map_err(|e| {
                    ApplyError::Protocol(format!("policy {id:?} is not a valid line: {e}"))
                })?;
                if line.id != id {
                    return Err(ApplyError::Protocol(format!(
                        "policy {id:?} carries the id {:?}",
                        line.id
                    )));
                }
                let stored = |line: &PolicyLine| StoredPolicy {
                    id: line.id.clone(),
                    policy_type,
                    json: line.text.clone(),
                    seq,
                };
                if let Some(receiving) = &mut self.receiving {
                    let policy = receiving.policies.as_ref().map(|_| stored(&line));
                    receiving.snapshot.push(line).map_err(|e| match e {
                        FileError::DuplicateInSnapshot(_) => ApplyError::Protocol(e.to_string()),
                        other => ApplyError::File(other),
                    })?;
                    if let (Some(policies), Some(policy)) = (&mut receiving.policies, policy) {
                        policies.push(policy);
                    }
                } else {
                    let next = self.is_next(seq, pending)?;
                    let change = self.delivered.as_ref().map(|_| Change {
                        seq,
                        kind: ChangeKind::Inserted(stored(&line)),
                    });
                    if next {
                        pending.insert(line, seq, &self.file)?;
                        pending.advance(seq);
                    }
                    if let Some(change) = change {
                        self.deliver(Delivered::Change(change));
                    }
                }
            }
            Event::DeletedId(id) => {
                if self.receiving.is_some() {
                    return Err(ApplyError::Protocol(format!(
                        "a delete (seq {seq}) inside a snapshot"
                    )));
                }
                let change = self.delivered.as_ref().map(|_| Change {
                    seq,
                    kind: ChangeKind::Deleted { id: id.clone() },
                });
                if self.is_next(seq, pending)? {
                    pending.delete(id, seq, &self.file)?;
                    pending.advance(seq);
                }
                if let Some(change) = change {
                    self.deliver(Delivered::Change(change));
                }
            }
            Event::CaughtUp(_) => {
                if let Some(receiving) = self.receiving.take() {
                    let count = receiving.snapshot.policy_count();
                    let problem = if seq != receiving.seq {
                        Some(format!(
                            "the snapshot at seq {} ended at seq {seq}",
                            receiving.seq
                        ))
                    } else if count as u64 != receiving.expected {
                        Some(format!(
                            "the snapshot announced {} policies and sent {count}",
                            receiving.expected
                        ))
                    } else {
                        None
                    };
                    if let Some(problem) = problem {
                        self.file.abandon(receiving.snapshot);
                        return Err(ApplyError::Protocol(problem));
                    }
                    self.file.install(receiving.snapshot, seq)?;
                    if let Some(policies) = receiving.policies {
                        self.deliver(Delivered::Snapshot { seq, policies });
                    }
                    tracing::info!(
                        "installed the snapshot: {count} policies at seq {seq} (received in {:.1?})",
                        receiving.started.elapsed()
                    );
                    report.installed = Some((seq, count));
                    pending.seq = self.file.seq();
                } else {
                    self.flush(pending, report)?;
                    if self.file.awaiting_snapshot() {
                        return Err(ApplyError::Protocol(
                            "caught up without the snapshot the file waits for".into(),
                        ));
                    }
                    if seq != self.file.seq() {
                        return Err(ApplyError::Protocol(format!(
                            "caught up at seq {seq}, but the changes applied end at seq {}",
                            self.file.seq()
                        )));
                    }
                }
                report.caught_up = Some(seq);
            }
            Event::Progress(progress) => {
                report.head = Some(progress.head_seq.max(seq));
            }
        }
        Ok(())
    }

    /// Whether the change `seq` is the next one; `false` for one already applied (skipped).
    fn is_next(&self, seq: u64, pending: &Pending) -> Result<bool, ApplyError> {
        if self.file.awaiting_snapshot() {
            return Err(ApplyError::Protocol(format!(
                "change {seq} arrived while the file waits for a snapshot"
            )));
        }
        if seq <= pending.seq {
            tracing::debug!(
                seq,
                applied = pending.seq,
                "skipping a change already applied"
            );
            return Ok(false);
        }
        if seq != pending.seq + 1 {
            return Err(ApplyError::Protocol(format!(
                "change {seq} follows change {}: the changes between are missing",
                pending.seq
            )));
        }
        Ok(true)
    }

    /// Writes the pending changes with one commit.
    fn flush(&mut self, pending: &mut Pending, report: &mut BatchReport) -> Result<(), ApplyError> {
        if pending.seq != self.file.seq() {
            let inserted: Vec<PolicyLine> = pending.inserted.drain(..).flatten().collect();
            self.file.commit(pending.seq, &pending.deleted, &inserted)?;
            report.changes += pending.changes;
        }
        *pending = Pending {
            seq: self.file.seq(),
            ..Pending::default()
        };
        Ok(())
    }
}

impl Pending {
    /// Takes the change `seq` in, once it fits.
    fn advance(&mut self, seq: u64) {
        self.seq = seq;
        self.changes += 1;
    }

    fn insert(&mut self, line: PolicyLine, seq: u64, file: &LedgerFile) -> Result<(), ApplyError> {
        let in_file = file.contains(&line.id) && !self.deleted.contains(&line.id);
        if in_file || self.positions.contains_key(&line.id) {
            return Err(ApplyError::Diverged(format!(
                "policy {:?} inserted at seq {seq} is already in the file",
                line.id
            )));
        }
        self.positions.insert(line.id.clone(), self.inserted.len());
        self.inserted.push(Some(line));
        Ok(())
    }

    fn delete(&mut self, id: String, seq: u64, file: &LedgerFile) -> Result<(), ApplyError> {
        if let Some(position) = self.positions.remove(&id) {
            self.inserted[position] = None;
        } else if file.contains(&id) && !self.deleted.contains(&id) {
            self.deleted.insert(id);
        } else {
            return Err(ApplyError::Diverged(format!(
                "policy {id:?} deleted at seq {seq} is not in the file"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(n: u32) -> String {
        format!(r#"{{"operator": {{"name": "op{n}", "id": "id-{n}", "ledger": "global"}}}}"#)
    }

    fn event(seq: u64, event: Event) -> pb::StreamLedgerResponse {
        pb::StreamLedgerResponse {
            seq,
            event: Some(event),
        }
    }

    fn inserted(seq: u64, n: u32) -> pb::StreamLedgerResponse {
        event(
            seq,
            Event::Inserted(pb::Policy {
                id: format!("id-{n}"),
                r#type: "operator".into(),
                json: json(n),
                seq,
            }),
        )
    }

    fn deleted(seq: u64, n: u32) -> pb::StreamLedgerResponse {
        event(seq, Event::DeletedId(format!("id-{n}")))
    }

    fn reset(seq: u64, count: u64) -> pb::StreamLedgerResponse {
        event(
            seq,
            Event::Reset(pb::Reset {
                snapshot_seq: seq,
                policy_count: count,
            }),
        )
    }

    fn caught_up(seq: u64) -> pb::StreamLedgerResponse {
        event(seq, Event::CaughtUp(pb::CaughtUp {}))
    }

    fn content(replica: &Replica) -> String {
        std::fs::read_to_string(&replica.file().paths().file).unwrap_or_default()
    }

    fn lines(ns: &[u32]) -> String {
        ns.iter().map(|&n| json(n) + "\n").collect()
    }

    fn replica(dir: &tempfile::TempDir) -> Replica {
        Replica::new(LedgerFile::open(&dir.path().join("blockchain.json")).unwrap())
    }

    #[test]
    fn a_snapshot_then_live_changes_in_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut replica = replica(&dir);
        let report = replica
            .apply(vec![
                reset(4, 2),
                inserted(1, 1),
                inserted(3, 3),
                caught_up(4),
                inserted(5, 5),
                deleted(6, 1),
                inserted(7, 7),
                deleted(8, 7),
            ])
            .unwrap();
        assert_eq!(report.installed, Some((4, 2)));
        assert_eq!(report.changes, 4);
        assert_eq!(replica.resume_seq(), 8);
        assert_eq!(content(&replica), lines(&[3, 5]));
    }

    #[test]
    fn a_broken_snapshot_leaves_the_file_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut replica = replica(&dir);
        replica
            .apply(vec![reset(1, 1), inserted(1, 1), caught_up(1)])
            .unwrap();
        replica.apply(vec![reset(9, 3), inserted(2, 2)]).unwrap();
        replica.abandon_snapshot();
        assert_eq!(content(&replica), lines(&[1]));
        assert_eq!(replica.resume_seq(), 1);
        // A snapshot whose count is off is refused too.
        let error = replica
            .apply(vec![reset(9, 3), inserted(2, 2), caught_up(9)])
            .unwrap_err();
        assert!(matches!(error, ApplyError::Protocol(_)), "{error}");
        assert_eq!(content(&replica), lines(&[1]));
    }

    #[test]
    fn gaps_duplicates_and_divergence() {
        let dir = tempfile::tempdir().unwrap();
        let mut replica = replica(&dir);
        replica.apply(vec![reset(0, 0), caught_up(0)]).unwrap();
        // The valid prefix of a batch is kept; a gap is a protocol error.
        let error = replica
            .apply(vec![inserted(1, 1), inserted(3, 3)])
            .unwrap_err();
        assert!(matches!(error, ApplyError::Protocol(_)), "{error}");
        assert_eq!((replica.resume_seq(), content(&replica)), (1, lines(&[1])));
        // A change seen again is skipped.
        replica.apply(vec![inserted(1, 1), inserted(2, 2)]).unwrap();
        assert_eq!(content(&replica), lines(&[1, 2]));
        // Deleting what the file lacks means the file is not the master's ledger.
        let error = replica.apply(vec![deleted(3, 9)]).unwrap_err();
        assert!(matches!(error, ApplyError::Diverged(_)), "{error}");
        let error = replica.apply(vec![inserted(3, 2)]).unwrap_err();
        assert!(matches!(error, ApplyError::Diverged(_)), "{error}");
        replica.await_snapshot("test");
        assert_eq!(replica.resume_seq(), 0);
        let error = replica.apply(vec![inserted(3, 3)]).unwrap_err();
        assert!(matches!(error, ApplyError::Protocol(_)), "{error}");
    }

    #[test]
    fn a_recording_replica_lists_what_the_file_holds_with_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let mut replica =
            Replica::recording(LedgerFile::open(&dir.path().join("blockchain.json")).unwrap());
        replica
            .apply(vec![
                reset(3, 2),
                inserted(1, 1),
                inserted(3, 3),
                caught_up(3),
            ])
            .unwrap();
        let policy = |seq: u64, n: u32| StoredPolicy {
            id: format!("id-{n}"),
            policy_type: "operator".into(),
            json: json(n),
            seq,
        };
        assert_eq!(
            replica.take_delivered(),
            vec![Delivered::Snapshot {
                seq: 3,
                policies: vec![policy(1, 1), policy(3, 3)],
            }]
        );
        // A change the file already holds is listed too (the mirror may lack it); a gap ends
        // the list at the last change that fits.
        let error = replica
            .apply(vec![
                inserted(3, 3),
                inserted(4, 4),
                deleted(5, 1),
                inserted(7, 7),
            ])
            .unwrap_err();
        assert!(matches!(error, ApplyError::Protocol(_)), "{error}");
        let change = |seq, kind| Delivered::Change(Change { seq, kind });
        assert_eq!(
            replica.take_delivered(),
            vec![
                change(3, ChangeKind::Inserted(policy(3, 3))),
                change(4, ChangeKind::Inserted(policy(4, 4))),
                change(5, ChangeKind::Deleted { id: "id-1".into() }),
            ]
        );
        assert_eq!(replica.resume_seq(), 5);
        assert!(replica.take_delivered().is_empty());
        // A replica that does not record lists nothing.
        let other = tempfile::tempdir().unwrap();
        let mut plain = super::tests::replica(&other);
        plain.apply(vec![reset(0, 0), caught_up(0)]).unwrap();
        assert!(plain.take_delivered().is_empty());
    }

    #[test]
    fn a_policy_deleted_and_inserted_again_in_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut replica = replica(&dir);
        replica
            .apply(vec![
                reset(2, 2),
                inserted(1, 1),
                inserted(2, 2),
                caught_up(2),
            ])
            .unwrap();
        replica
            .apply(vec![deleted(3, 1), inserted(4, 1), caught_up(4)])
            .unwrap();
        assert_eq!(content(&replica), lines(&[2, 1]));
    }
}
