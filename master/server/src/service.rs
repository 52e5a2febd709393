//! The gRPC edge: translates `ledger.v1.LedgerService` calls into [`Ledger`] operations, and
//! answers [`LedgerError`]s with their statuses (`crate::status`). No ledger logic lives here.

use std::pin::Pin;
use std::sync::Arc;

use ledger_proto::pb;
use ledger_proto::server::StreamLedgerFrame;
use ledger_proto::server::ledger_service_server::LedgerService;
use prost::Message as _;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::auth::{Authorizer, Role, certificate_common_name};
use crate::error::LedgerError;
use crate::ledger::{Caller, Ledger, ListQuery};
use crate::limits::StreamLimiter;
use crate::log_limit::{self, LogLimit};
use crate::subscribers::{NewSubscriber, SubscriberIdentity, SubscriberInfo};
use crate::subscription::Event;
use ledger_storage::{Change, ChangeKind, StoredPolicy};
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
        Ok(match self.authenticate(request, needed, action)? {
            Some(name) => format!("{name}@{}", client_host(request)),
            None => client_host(request),
        })
    }

    /// The auth file's name of the caller if it may do `action` (which needs `needed`); `None`
    /// without an auth file.
    fn authenticate<T>(
        &self,
        request: &Request<T>,
        needed: Role,
        action: &'static str,
    ) -> Result<Option<String>, Status> {
        let Some(authorizer) = &self.access.authorizer else {
            return Ok(None);
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
            Ok(identity) => Ok(Some(identity.name)),
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

/// The seq field of the message `event` becomes.
fn event_seq(event: &Event) -> u64 {
    match event {
        Event::Change(change) => change.seq,
        Event::Reset { snapshot_seq, .. } => *snapshot_seq,
        Event::Snapshot(policy) => policy.seq,
        Event::CaughtUp { seq } => *seq,
        Event::Progress { head_seq } => *head_seq,
    }
}

fn subscriber_identity(identity: pb::SubscriberIdentity) -> SubscriberIdentity {
    SubscriberIdentity {
        node_name: identity.node_name,
        version: identity.version,
        session_id: identity.session_id,
    }
}

fn subscriber_info(status: pb::SubscriberStatus) -> SubscriberInfo {
    SubscriberInfo {
        node_name: status.node_name,
        version: status.version,
        peer: status.peer,
        identity: status.identity,
        since_unix_ms: status.since_unix_ms,
        sent_seq: status.sent_seq,
        durable_seq: status.durable_seq,
        lag: status.lag,
        bytes_sent: status.bytes_sent,
        via: status.via,
    }
}

/// A subscriber as `ListSubscribers` (and a relay's report upstream) sends it.
pub fn subscriber_status(info: SubscriberInfo) -> pb::SubscriberStatus {
    pb::SubscriberStatus {
        node_name: info.node_name,
        version: info.version,
        peer: info.peer,
        identity: info.identity,
        since_unix_ms: info.since_unix_ms,
        sent_seq: info.sent_seq,
        durable_seq: info.durable_seq,
        lag: info.lag,
        bytes_sent: info.bytes_sent,
        via: info.via,
    }
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
            chain: info.chain.map(|(position, lag_blocks)| pb::ChainPosition {
                block_number: position.block_number,
                block_hash: position.block_hash,
                transaction_count: position.transaction_count,
                lag_blocks,
            }),
        }))
    }

    async fn report_progress(
        &self,
        request: Request<pb::ReportProgressRequest>,
    ) -> Result<Response<pb::ReportProgressResponse>, Status> {
        self.authorize(&request, Role::Reader, "report progress")?;
        let request = request.into_inner();
        let downstream = request
            .downstream
            .into_iter()
            .map(subscriber_info)
            .collect();
        let head_seq = self.ledger.subscribers().report(
            &request.session_id,
            request.durable_seq,
            downstream,
        )?;
        Ok(Response::new(pb::ReportProgressResponse { head_seq }))
    }

    async fn list_subscribers(
        &self,
        request: Request<pb::ListSubscribersRequest>,
    ) -> Result<Response<pb::ListSubscribersResponse>, Status> {
        self.authorize(&request, Role::Reader, "list subscribers")?;
        let list = self.ledger.subscribers().list();
        Ok(Response::new(pb::ListSubscribersResponse {
            head_seq: list.head_seq,
            subscribers: list
                .subscribers
                .into_iter()
                .map(subscriber_status)
                .collect(),
        }))
    }

    type StreamLedgerStream = EventStream;

    async fn stream_ledger(
        &self,
        request: Request<pb::StreamLedgerRequest>,
    ) -> Result<Response<Self::StreamLedgerStream>, Status> {
        let name = self.authenticate(&request, Role::Reader, "stream the ledger")?;
        let identity = request
            .get_ref()
            .subscriber
            .clone()
            .map(subscriber_identity);
        if let Some(identity) = &identity {
            identity.check()?;
        }
        let permit = self
            .access
            .streams
            .admit(request.remote_addr().map(|addr| addr.ip()))?;
        let after_seq = request.get_ref().after_seq;
        let who = match &name {
            Some(name) => format!("{name}@{}", client_host(&request)),
            None => client_host(&request),
        };
        tracing::debug!(after_seq, client = %who, node = ?identity.as_ref().map(|i| &i.node_name), "subscriber joined");
        // Listed from before the answer: a report right after it finds the session.
        let listed = self.ledger.subscribers().register(NewSubscriber {
            identity,
            peer: request
                .remote_addr()
                .map(|addr| addr.to_string())
                .unwrap_or_default(),
            authenticated: name.unwrap_or_default(),
            after_seq,
        });
        let client = request.remote_addr().map(|addr| addr.ip());
        let events = self.ledger.subscribe(after_seq, client).map(move |event| {
            // The permit and the listing live as long as the stream.
            let _open = &permit;
            let event = event.map_err(Status::from)?;
            let seq = event_seq(&event);
            let frame = event_frame(event);
            listed.sent(seq, frame.encoded_len());
            Ok(frame)
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
                                yield Err(LedgerError::DeadlineExceeded(timeout).into());
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

    /// A relay's ledger (never connected: only streams are opened) on a fresh SQLite file in
    /// `dir`, with its storage and feed.
    fn stream_only_ledger(dir: &std::path::Path) -> (Ledger, Arc<dyn Storage>, ChangeFeed) {
        let url: DatabaseUrl = format!("sqlite://{}", dir.join("ledger.db").display())
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
                identity: None,
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
        (ledger, storage, feed)
    }

    /// The frames the streams of several subscribers send for one live change hold the very
    /// same bytes: one encoding, not one per subscriber.
    #[tokio::test]
    async fn subscribers_send_one_shared_encoding() {
        let dir = tempfile::tempdir().unwrap();
        let (ledger, storage, feed) = stream_only_ledger(dir.path());
        let service = LedgerGrpc::new(Arc::new(ledger));
        let mut streams = Vec::new();
        for _ in 0..3 {
            let request = Request::new(pb::StreamLedgerRequest {
                after_seq: 0,
                subscriber: None,
            });
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

    /// A stream that names itself is listed while it is open, with what it was sent; its
    /// reports set its durable seq; it goes when it ends.
    #[tokio::test]
    async fn streams_are_listed_with_what_they_were_sent() {
        let dir = tempfile::tempdir().unwrap();
        let (ledger, storage, feed) = stream_only_ledger(dir.path());
        let service = LedgerGrpc::new(Arc::new(ledger));
        let request = Request::new(pb::StreamLedgerRequest {
            after_seq: 0,
            subscriber: Some(pb::SubscriberIdentity {
                node_name: "m1".into(),
                version: "member 9".into(),
                session_id: "s1".into(),
            }),
        });
        let mut stream = service.stream_ledger(request).await.unwrap().into_inner();
        let mut bytes = 0;
        for _ in 0..2 {
            bytes += stream.next().await.unwrap().unwrap().encoded_len();
        }
        let change = Change {
            seq: 1,
            kind: ChangeKind::Inserted(policy(1)),
        };
        feed.publish_committed(&*storage, [change]).unwrap();
        bytes += stream.next().await.unwrap().unwrap().encoded_len();
        async fn listed(service: &LedgerGrpc) -> pb::ListSubscribersResponse {
            let request = Request::new(pb::ListSubscribersRequest {});
            service
                .list_subscribers(request)
                .await
                .unwrap()
                .into_inner()
        }
        let list = listed(&service).await;
        assert_eq!(list.head_seq, 1);
        let [m1] = &list.subscribers[..] else {
            panic!("{list:?}")
        };
        assert_eq!(
            (m1.node_name.as_str(), m1.version.as_str(), m1.sent_seq),
            ("m1", "member 9", 1)
        );
        assert_eq!(m1.bytes_sent, bytes as u64);
        assert_eq!((m1.durable_seq, m1.lag), (0, 1));
        let report = Request::new(pb::ReportProgressRequest {
            session_id: "s1".into(),
            durable_seq: 1,
            downstream: Vec::new(),
        });
        let answer = service.report_progress(report).await.unwrap().into_inner();
        assert_eq!(answer.head_seq, 1);
        let m1 = &listed(&service).await.subscribers[0];
        assert_eq!((m1.durable_seq, m1.lag), (1, 0));
        drop(stream);
        assert!(listed(&service).await.subscribers.is_empty());
    }
}
