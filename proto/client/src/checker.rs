//! The checks one `StreamLedger` subscription's messages must pass (each change the next seq, a
//! snapshot complete and ending at its seq, `caught_up` where the changes end), turning them
//! into the [`Event`]s [`crate::follow::follow`] hands its sink.

use ledger_proto::pb;
use ledger_proto::pb::stream_ledger_response::Event as Proto;

use crate::follow::Event;

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
