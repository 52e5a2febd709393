//! The gRPC edge: translates `ledger.v1.LedgerService` calls into [`Ledger`] operations and
//! [`LedgerError`]s into statuses. No ledger logic lives here.

use std::pin::Pin;
use std::sync::Arc;

use ledger_proto::pb;
use ledger_proto::server::StreamLedgerFrame;
use ledger_proto::server::ledger_service_server::LedgerService;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::auth::{AuthError, Authorizer, Role, certificate_common_name};
use crate::error::LedgerError;
use crate::ledger::{Caller, Ledger, ListQuery};
use crate::limits::StreamLimiter;
use crate::log_limit::{self, LogLimit};
use crate::subscription::Event;
use ledger_storage::{Change, ChangeKind, Rejection, StoredPolicy};
use std::time::Duration;

/// The `LedgerService` of a master.
pub struct LedgerGrpc {
    ledger: Arc<Ledger>,
    access: Access,
}

/// Who may call, and how many streams may be open.
#[derive(Clone)]
pub struct Access {
    /// The configured callers; `None` lets anyone do anything.
    pub authorizer: Option<Arc<Authorizer>>,
    /// The stream limits.
    pub streams: StreamLimiter,
}

impl Default for Access {
    fn default() -> Self {
        Access {
            authorizer: None,
            streams: StreamLimiter::new(usize::MAX, usize::MAX),
        }
    }
}

impl LedgerGrpc {
    /// Serves `ledger` to anyone, without stream limits.
    pub fn new(ledger: Arc<Ledger>) -> Self {
        Self::with_access(ledger, Access::default())
    }

    /// Serves `ledger` to the callers `access` allows.
    pub fn with_access(ledger: Arc<Ledger>, access: Access) -> Self {
        LedgerGrpc { ledger, access }
    }

    /// The caller's name if it may do `action` (which needs `needed`); "anonymous" without auth.
    fn authorize<T>(
        &self,
        request: &Request<T>,
        needed: Role,
        action: &'static str,
    ) -> Result<String, Status> {
        let Some(authorizer) = &self.access.authorizer else {
            return Ok(client_host(request));
        };
        let certificate_cn = request
            .peer_certs()
            .and_then(|certs| certs.first().and_then(|c| certificate_common_name(c)));
        match authorizer.authorize(
            request.metadata(),
            certificate_cn.as_deref(),
            needed,
            action,
        ) {
            Ok(identity) => Ok(format!("{}@{}", identity.name, client_host(request))),
            Err(e) => {
                // Unauthenticated clients choose how often this happens.
                static REFUSALS: LogLimit = LogLimit::new(Duration::from_secs(10));
                if let Some(suppressed) = REFUSALS.admit() {
                    tracing::warn!(client = %client_host(request), action, "refused: {e}{}", log_limit::more(suppressed));
                }
                Err(LedgerError::from(e).into())
            }
        }
    }
}

/// The one place where ledger errors become gRPC statuses.
impl From<LedgerError> for Status {
    fn from(error: LedgerError) -> Status {
        let message = error.to_string();
        match error {
            LedgerError::InvalidPolicy(_) | LedgerError::InvalidArgument(_) => {
                Status::invalid_argument(message)
            }
            LedgerError::Rejected(Rejection::AlreadyExists(_)) => Status::already_exists(message),
            LedgerError::Rejected(Rejection::NotFound(_)) | LedgerError::NotFound(_) => {
                Status::not_found(message)
            }
            LedgerError::SubscriberLagged { .. }
            | LedgerError::TooManyStreams(_)
            | LedgerError::SnapshotStalled(_) => Status::resource_exhausted(message),
            LedgerError::Auth(AuthError::Unauthenticated(_)) => Status::unauthenticated(message),
            LedgerError::Auth(AuthError::PermissionDenied { .. }) => {
                Status::permission_denied(message)
            }
            LedgerError::ShuttingDown | LedgerError::NoCopyYet => Status::unavailable(message),
            LedgerError::CannotForward(_) => Status::permission_denied(message),
            // The subscriber resubscribes at once (a member does, on ABORTED).
            LedgerError::Reset => Status::aborted(message),
            // A relay passes its upstream's answer on unchanged.
            LedgerError::Upstream(status) => status,
            LedgerError::Storage(e) if e.is_disk_full() => Status::resource_exhausted(message),
            LedgerError::Storage(e) if e.is_unavailable() => Status::unavailable(message),
            LedgerError::Storage(e) => {
                tracing::error!(error = %e, "storage failure");
                Status::internal(message)
            }
        }
    }
}

fn policy_message(policy: &StoredPolicy) -> pb::Policy {
    pb::Policy {
        id: policy.id.clone(),
        r#type: policy.policy_type.clone(),
        json: policy.json.clone(),
        seq: policy.seq,
    }
}

/// A change goes out as the encoding it shares with every other subscriber that sends it (made
/// by the first one), so a change is copied and encoded once, not once per subscriber. The other
/// events are this stream's own.
fn event_frame(event: Event) -> StreamLedgerFrame {
    use pb::stream_ledger_response::Event as Proto;
    let (seq, event) = match event {
        Event::Change(change) => {
            return StreamLedgerFrame::Encoded(
                change.encoded(|change| StreamLedgerFrame::encode(&change_message(change))),
            );
        }
        Event::Reset {
            snapshot_seq,
            policy_count,
        } => (
            snapshot_seq,
            Proto::Reset(pb::Reset {
                snapshot_seq,
                policy_count,
            }),
        ),
        Event::Snapshot(policy) => (policy.seq, Proto::Inserted(policy_message(&policy))),
        Event::CaughtUp { seq } => (seq, Proto::CaughtUp(pb::CaughtUp {})),
        Event::Progress { head_seq } => (head_seq, Proto::Progress(pb::Progress { head_seq })),
    };
    StreamLedgerFrame::Message(pb::StreamLedgerResponse {
        seq,
        event: Some(event),
    })
}

fn change_message(change: &Change) -> pb::StreamLedgerResponse {
    use pb::stream_ledger_response::Event as Proto;
    pb::StreamLedgerResponse {
        seq: change.seq,
        event: Some(match &change.kind {
            ChangeKind::Inserted(policy) => Proto::Inserted(policy_message(policy)),
            ChangeKind::Deleted { id } => Proto::DeletedId(id.clone()),
        }),
    }
}

/// The client's deadline from the `grpc-timeout` header (`100m`, `5S`, ...), if any.
fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The writer of `request`, known here as `host`: with the credentials it sent, which a relay
/// forwards upstream.
fn caller<T>(request: &Request<T>, host: String) -> Caller {
    let mut authorization = request.metadata().get("authorization").cloned();
    if let Some(value) = &mut authorization {
        // Keeps the secret out of h2/hyper debug logs when a relay sends it on.
        value.set_sensitive(true);
    }
    Caller {
        host,
        authorization,
        certificate: request.peer_certs().is_some_and(|certs| !certs.is_empty()),
    }
}

fn client_host<T>(request: &Request<T>) -> String {
    request
        .remote_addr()
        .map(|addr| addr.ip().to_string())
        .unwrap_or_else(|| "unknown".to_string())
}

type EventStream = Pin<Box<dyn Stream<Item = Result<StreamLedgerFrame, Status>> + Send>>;

#[tonic::async_trait]
impl LedgerService for LedgerGrpc {
    async fn insert_policy(
        &self,
        request: Request<pb::InsertPolicyRequest>,
    ) -> Result<Response<pb::InsertPolicyResponse>, Status> {
        let host = self.authorize(&request, Role::Writer, "insert policies")?;
        let caller = caller(&request, host);
        let policy = self
            .ledger
            .insert(&request.get_ref().policy_json, &caller)
            .await?;
        Ok(Response::new(pb::InsertPolicyResponse {
            policy: Some(policy_message(&policy)),
        }))
    }

    async fn delete_policy(
        &self,
        request: Request<pb::DeletePolicyRequest>,
    ) -> Result<Response<pb::DeletePolicyResponse>, Status> {
        let host = self.authorize(&request, Role::Admin, "delete policies")?;
        let caller = caller(&request, host);
        let seq = self.ledger.delete(&request.get_ref().id, &caller).await?;
        Ok(Response::new(pb::DeletePolicyResponse { seq }))
    }

    async fn get_policy(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::GetPolicyResponse>, Status> {
        self.authorize(&request, Role::Reader, "read policies")?;
        let policy = self.ledger.get(&request.get_ref().id).await?;
        Ok(Response::new(pb::GetPolicyResponse {
            policy: Some(policy_message(&policy)),
        }))
    }

    async fn list_policies(
        &self,
        request: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        self.authorize(&request, Role::Reader, "list policies")?;
        let request = request.into_inner();
        let page = self
            .ledger
            .list(ListQuery {
                policy_type: Some(request.r#type).filter(|t| !t.is_empty()),
                conditions: request
                    .conditions
                    .into_iter()
                    .map(|c| (c.key, c.value))
                    .collect(),
                page_size: request.page_size as usize,
                page_token: request.page_token,
            })
            .await?;
        Ok(Response::new(pb::ListPoliciesResponse {
            policies: page.policies.iter().map(policy_message).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn get_ledger_info(
        &self,
        request: Request<pb::GetLedgerInfoRequest>,
    ) -> Result<Response<pb::GetLedgerInfoResponse>, Status> {
        self.authorize(&request, Role::Reader, "read the ledger info")?;
        let info = self.ledger.info().await?;
        Ok(Response::new(pb::GetLedgerInfoResponse {
            head_seq: info.head_seq,
            policy_count: info.policy_count,
            digest: info.digest,
            oldest_replayable_seq: info.oldest_replayable_seq,
        }))
    }

    type StreamLedgerStream = EventStream;

    async fn stream_ledger(
        &self,
        request: Request<pb::StreamLedgerRequest>,
    ) -> Result<Response<Self::StreamLedgerStream>, Status> {
        let who = self.authorize(&request, Role::Reader, "stream the ledger")?;
        let permit = self
            .access
            .streams
            .admit(request.remote_addr().map(|addr| addr.ip()))?;
        let after_seq = request.get_ref().after_seq;
        tracing::debug!(after_seq, client = %who, "subscriber joined");
        let client = request.remote_addr().map(|addr| addr.ip());
        let events = self.ledger.subscribe(after_seq, client).map(move |event| {
            // The permit lives as long as the stream.
            let _open = &permit;
            event.map(event_frame).map_err(Status::from)
        });
        // tonic bounds a call's answer by the client's deadline, but a stream's answer is sent
        // at once: end the stream itself when the deadline passes.
        match grpc_timeout(request.metadata()) {
            Some(timeout) => {
                let bounded = async_stream::stream! {
                    let deadline = tokio::time::sleep(timeout);
                    tokio::pin!(deadline);
                    tokio::pin!(events);
                    loop {
                        tokio::select! {
                            event = events.next() => match event {
                                Some(event) => yield event,
                                None => return,
                            },
                            _ = &mut deadline => {
                                yield Err(Status::deadline_exceeded(format!(
                                    "the client's deadline of {timeout:?} passed"
                                )));
                                return;
                            }
                        }
                    }
                };
                Ok(Response::new(Box::pin(bounded)))
            }
            None => Ok(Response::new(Box::pin(events))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ledger_proto::pb::stream_ledger_response::Event as Proto;
    use prost::Message;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::feed::{ChangeFeed, SharedChange};
    use crate::ledger::WritePath;
    use crate::subscription::SubscriptionContext;
    use ledger_storage::{DatabaseUrl, DieselStorage, Storage};

    fn policy(seq: u64) -> StoredPolicy {
        StoredPolicy {
            id: format!("id-{seq}"),
            policy_type: "operator".into(),
            json: format!(r#"{{"operator": {{"name": "op{seq}", "id": "id-{seq}"}}}}"#),
            seq,
        }
    }

    fn encoded(frame: StreamLedgerFrame) -> prost::bytes::Bytes {
        match frame {
            StreamLedgerFrame::Encoded(bytes) => bytes,
            StreamLedgerFrame::Message(message) => panic!("not shared: {message:?}"),
        }
    }

    #[test]
    fn a_shared_change_is_what_prost_encodes() {
        let inserted = Change {
            seq: 7,
            kind: ChangeKind::Inserted(policy(7)),
        };
        let expected = pb::StreamLedgerResponse {
            seq: 7,
            event: Some(Proto::Inserted(pb::Policy {
                id: "id-7".into(),
                r#type: "operator".into(),
                json: policy(7).json,
                seq: 7,
            })),
        };
        let deleted = Change {
            seq: 8,
            kind: ChangeKind::Deleted { id: "id-7".into() },
        };
        let expected_deleted = pb::StreamLedgerResponse {
            seq: 8,
            event: Some(Proto::DeletedId("id-7".into())),
        };
        for (change, expected) in [(inserted, expected), (deleted, expected_deleted)] {
            let frame = event_frame(Event::Change(Arc::new(SharedChange::new(change))));
            // What tonic writes into the frame, through the frame's `prost::Message`.
            assert_eq!(frame.encode_to_vec(), expected.encode_to_vec());
            assert_eq!(encoded(frame), expected.encode_to_vec());
        }
    }

    /// The frames the streams of several subscribers send for one live change hold the very
    /// same bytes: one encoding, not one per subscriber.
    #[tokio::test]
    async fn subscribers_send_one_shared_encoding() {
        let dir = tempfile::tempdir().unwrap();
        let url: DatabaseUrl = format!("sqlite://{}", dir.path().join("ledger.db").display())
            .parse()
            .unwrap();
        let storage: Arc<dyn Storage> = Arc::new(DieselStorage::open(&url, 4).unwrap());
        let feed = ChangeFeed::new(0, 16, crate::feed::DEFAULT_KEPT_BYTES);
        // Only streams are opened: the write path (a relay's, never connected) is never used.
        let upstream = crate::upstream::Upstream::new(crate::upstream::UpstreamOptions {
            follow: ledger_client::follow::FollowOptions {
                masters: Vec::new(),
                client: Default::default(),
                connect_timeout: Duration::from_secs(1),
                retry_min: Duration::from_secs(1),
                retry_max: Duration::from_secs(1),
            },
            write_as_self: false,
            change_retention: None,
        });
        let ledger = Ledger::new(
            WritePath::Upstream(upstream.forwarder()),
            SubscriptionContext {
                storage: storage.clone(),
                feed: feed.clone(),
                progress_interval: Duration::from_secs(60),
                shutdown: CancellationToken::new(),
                snapshots: Default::default(),
            },
        );
        let service = LedgerGrpc::new(Arc::new(ledger));
        let mut streams = Vec::new();
        for _ in 0..3 {
            let request = Request::new(pb::StreamLedgerRequest { after_seq: 0 });
            let mut stream = service.stream_ledger(request).await.unwrap().into_inner();
            // An empty ledger: a reset, then caught up; the subscriber is live from here.
            for _ in 0..2 {
                let frame = stream.next().await.unwrap().unwrap();
                assert!(matches!(frame, StreamLedgerFrame::Message(_)), "{frame:?}");
            }
            streams.push(stream);
        }
        let change = Change {
            seq: 1,
            kind: ChangeKind::Inserted(policy(1)),
        };
        let expected = StreamLedgerFrame::encode(&change_message(&change));
        feed.publish_committed(&*storage, [change]).unwrap();
        let mut sent = Vec::new();
        for stream in &mut streams {
            let frame = stream.next().await.unwrap().unwrap();
            sent.push(encoded(frame));
        }
        for bytes in &sent {
            assert_eq!(bytes, &expected);
            assert_eq!(
                bytes.as_ptr(),
                sent[0].as_ptr(),
                "each subscriber encoded its own"
            );
        }
    }
}
