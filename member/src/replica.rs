//! Applies the checked events of a `StreamLedger` subscription (see [`ledger_client::follow`],
//! which checks their order) to the [`LedgerFile`], a batch at a time.
//!
//! A batch of changes is written with one commit (an append, or one rewrite when it deletes).
//! A `reset` starts a snapshot in a temporary file that replaces the ledger only at its end; a
//! stream that breaks before leaves the ledger untouched. What the order cannot tell is checked
//! here against the file: a policy line that is not one, an insert of a policy the file holds,
//! a delete of one it lacks.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use ledger_client::follow::Event;
use ledger_proto::pb;

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
    /// The stream sent what cannot be a ledger (a line that is not a policy, an id twice in a
    /// snapshot, ...): subscribe again from the applied seq.
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

/// A snapshot being received.
struct Receiving {
    snapshot: Snapshot,
    expected: u64,
    started: Instant,
    reported: Instant,
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
}

impl Replica {
    /// A replica writing to `file`.
    pub fn new(file: LedgerFile) -> Replica {
        Replica {
            file,
            receiving: None,
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

    /// Applies a batch of checked events, writing the changes among them with as few commits
    /// as the events allow (one, unless a snapshot begins or ends inside the batch).
    pub fn apply(&mut self, events: Vec<Event>) -> Result<BatchReport, ApplyError> {
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
        event: Event,
        pending: &mut Pending,
        report: &mut BatchReport,
    ) -> Result<(), ApplyError> {
        match event {
            Event::Reset { seq, policy_count } => {
                self.flush(pending, report)?;
                self.abandon_snapshot();
                let now = Instant::now();
                self.receiving = Some(Receiving {
                    snapshot: self.file.begin_snapshot()?,
                    expected: policy_count,
                    started: now,
                    reported: now,
                });
                report.reset = Some((seq, policy_count));
            }
            Event::Snapshot(policy) => {
                let line = policy_line(policy)?;
                let Some(receiving) = &mut self.receiving else {
                    return Err(ApplyError::Protocol(format!(
                        "policy {:?} of a snapshot that did not begin",
                        line.id
                    )));
                };
                receiving.snapshot.push(line).map_err(|e| match e {
                    FileError::DuplicateInSnapshot(_) => ApplyError::Protocol(e.to_string()),
                    other => ApplyError::File(other),
                })?;
            }
            Event::SnapshotEnd { seq } => {
                let Some(receiving) = self.receiving.take() else {
                    return Err(ApplyError::Protocol(format!(
                        "the end of a snapshot at seq {seq} that did not begin"
                    )));
                };
                let count = receiving.snapshot.policy_count();
                self.file.install(receiving.snapshot, seq)?;
                tracing::info!(
                    "installed the snapshot: {count} policies at seq {seq} (received in {:.1?})",
                    receiving.started.elapsed()
                );
                report.installed = Some((seq, count));
                pending.seq = self.file.seq();
            }
            Event::Inserted(policy) => {
                let seq = policy.seq;
                let line = policy_line(policy)?;
                self.require_trusted(seq)?;
                pending.insert(line, seq, &self.file)?;
                pending.advance(seq);
            }
            Event::Deleted { seq, id } => {
                self.require_trusted(seq)?;
                pending.delete(id, seq, &self.file)?;
                pending.advance(seq);
            }
            Event::CaughtUp { seq } => {
                self.flush(pending, report)?;
                if self.file.awaiting_snapshot() {
                    return Err(ApplyError::Protocol(
                        "caught up without the snapshot the file waits for".into(),
                    ));
                }
                report.caught_up = Some(seq);
            }
            Event::Progress { head_seq } => {
                report.head = Some(head_seq);
            }
        }
        Ok(())
    }

    /// A change may go into the file only while it is trusted: one waiting for a snapshot
    /// takes nothing else.
    fn require_trusted(&self, seq: u64) -> Result<(), ApplyError> {
        if self.file.awaiting_snapshot() {
            return Err(ApplyError::Protocol(format!(
                "change {seq} arrived while the file waits for a snapshot"
            )));
        }
        Ok(())
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

/// The line of a policy the stream sent, checked: a valid policy line carrying its own id.
fn policy_line(policy: pb::Policy) -> Result<PolicyLine, ApplyError> {
    let id = policy.id;
    let line = PolicyLine::parse(policy.json)
        .map_err(|e| ApplyError::Protocol(format!("policy {id:?} is not a valid line: {e}")))?;
    if line.id != id {
        return Err(ApplyError::Protocol(format!(
            "policy {id:?} carries the id {:?}",
            line.id
        )));
    }
    Ok(line)
}

impl Pending {
    /// Takes the change `seq` in.
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
    use ledger_client::follow::Checker;
    use ledger_proto::pb::stream_ledger_response::Event as Proto;

    fn json(n: u32) -> String {
        format!(r#"{{"operator": {{"name": "op{n}", "id": "id-{n}", "ledger": "global"}}}}"#)
    }

    fn message(seq: u64, event: Proto) -> pb::StreamLedgerResponse {
        pb::StreamLedgerResponse {
            seq,
            event: Some(event),
        }
    }

    fn inserted(seq: u64, n: u32) -> pb::StreamLedgerResponse {
        message(
            seq,
            Proto::Inserted(pb::Policy {
                id: format!("id-{n}"),
                r#type: "operator".into(),
                json: json(n),
                seq,
            }),
        )
    }

    fn deleted(seq: u64, n: u32) -> pb::StreamLedgerResponse {
        message(seq, Proto::DeletedId(format!("id-{n}")))
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

    fn content(replica: &Replica) -> String {
        std::fs::read_to_string(&replica.file().paths().file).unwrap_or_default()
    }

    fn lines(ns: &[u32]) -> String {
        ns.iter().map(|&n| json(n) + "\n").collect()
    }

    /// A replica and the checker of its subscription, as the sync loop drives them.
    struct Subscribed {
        replica: Replica,
        checker: Checker,
    }

    impl Subscribed {
        fn new(dir: &tempfile::TempDir) -> Subscribed {
            let replica =
                Replica::new(LedgerFile::open(&dir.path().join("blockchain.json")).unwrap());
            let checker = Checker::new(replica.resume_seq());
            Subscribed { replica, checker }
        }

        /// Subscribes again after the replica's seq (the loop does after every error).
        fn resubscribe(&mut self) {
            self.replica.abandon_snapshot();
            self.checker = Checker::new(self.replica.resume_seq());
        }

        /// Checks `messages` and applies what is valid of them, as the sync loop does.
        fn apply(
            &mut self,
            messages: Vec<pb::StreamLedgerResponse>,
        ) -> Result<BatchReport, ApplyError> {
            let mut events = Vec::new();
            let mut broken = None;
            for message in messages {
                if let Err(e) = self.checker.check(message, &mut events) {
                    broken = Some(e);
                    break;
                }
            }
            let report = self.replica.apply(events)?;
            match broken {
                Some(e) => Err(ApplyError::Protocol(e.0)),
                None => Ok(report),
            }
        }
    }

    #[test]
    fn a_snapshot_then_live_changes_in_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut copy = Subscribed::new(&dir);
        let report = copy
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
        assert_eq!(copy.replica.resume_seq(), 8);
        assert_eq!(content(&copy.replica), lines(&[3, 5]));
    }

    #[test]
    fn a_broken_snapshot_leaves_the_file_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut copy = Subscribed::new(&dir);
        copy.apply(vec![reset(1, 1), inserted(1, 1), caught_up(1)])
            .unwrap();
        copy.resubscribe();
        copy.apply(vec![reset(9, 3), inserted(2, 2)]).unwrap();
        copy.resubscribe();
        assert_eq!(content(&copy.replica), lines(&[1]));
        assert_eq!(copy.replica.resume_seq(), 1);
        // A snapshot whose count is off is refused too.
        let error = copy
            .apply(vec![reset(9, 3), inserted(2, 2), caught_up(9)])
            .unwrap_err();
        assert!(matches!(error, ApplyError::Protocol(_)), "{error}");
        copy.resubscribe();
        assert_eq!(content(&copy.replica), lines(&[1]));
        // So is one holding an id twice, which the file finds.
        let error = copy
            .apply(vec![reset(9, 2), inserted(2, 2), inserted(3, 2)])
            .unwrap_err();
        assert!(matches!(error, ApplyError::Protocol(_)), "{error}");
        copy.resubscribe();
        assert_eq!(content(&copy.replica), lines(&[1]));
    }

    #[test]
    fn gaps_duplicates_and_divergence() {
        let dir = tempfile::tempdir().unwrap();
        let mut copy = Subscribed::new(&dir);
        copy.apply(vec![reset(0, 0), caught_up(0)]).unwrap();
        // The valid prefix of a batch is kept; a gap is a protocol error.
        let error = copy
            .apply(vec![inserted(1, 1), inserted(3, 3)])
            .unwrap_err();
        assert!(matches!(error, ApplyError::Protocol(_)), "{error}");
        assert_eq!(
            (copy.replica.resume_seq(), content(&copy.replica)),
            (1, lines(&[1]))
        );
        copy.resubscribe();
        // A change seen again is skipped.
        copy.apply(vec![inserted(1, 1), inserted(2, 2)]).unwrap();
        assert_eq!(content(&copy.replica), lines(&[1, 2]));
        // Deleting what the file lacks means the file is not the master's ledger.
        let error = copy.apply(vec![deleted(3, 9)]).unwrap_err();
        assert!(matches!(error, ApplyError::Diverged(_)), "{error}");
        copy.resubscribe();
        let error = copy.apply(vec![inserted(3, 2)]).unwrap_err();
        assert!(matches!(error, ApplyError::Diverged(_)), "{error}");
        copy.replica.await_snapshot("test");
        copy.resubscribe();
        assert_eq!(copy.replica.resume_seq(), 0);
        let error = copy.apply(vec![inserted(3, 3)]).unwrap_err();
        assert!(matches!(error, ApplyError::Protocol(_)), "{error}");
        // A line that is not a policy, or carries another id, is refused.
        let mut bad = inserted(1, 1);
        if let Some(Proto::Inserted(policy)) = &mut bad.event {
            policy.id = "id-2".into();
        }
        let error = copy.apply(vec![reset(1, 1), bad]).unwrap_err();
        assert!(matches!(error, ApplyError::Protocol(_)), "{error}");
    }

    #[test]
    fn a_policy_deleted_and_inserted_again_in_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut copy = Subscribed::new(&dir);
        copy.apply(vec![
            reset(2, 2),
            inserted(1, 1),
            inserted(2, 2),
            caught_up(2),
        ])
        .unwrap();
        copy.apply(vec![deleted(3, 1), inserted(4, 1), caught_up(4)])
            .unwrap();
        assert_eq!(content(&copy.replica), lines(&[2, 1]));
    }
}
