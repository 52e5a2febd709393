//! Calls to a running master (or relay) through the generated client, each bounded in time.

use ledger_proto::errors::{self, Reason};
use ledger_proto::pb::ledger_service_client::LedgerServiceClient;
use ledger_proto::pb::stream_ledger_response::Event;
use ledger_proto::pb::{
    DeletePolicyRequest, GetLedgerInfoRequest, GetLedgerInfoResponse, GetPolicyRequest,
    InsertPolicyRequest, Policy, StreamLedgerRequest, StreamLedgerResponse,
};
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use crate::within;

/// Asserts that `status` is the master's refusal for `reason`: the reason's code, the reason in
/// its `ErrorInfo`, and each `(key, value)` of `metadata` there. Tests branch on this, never on
/// the message, which is for people.
#[track_caller]
pub fn assert_refused(status: &Status, reason: Reason, metadata: &[(&str, &str)]) {
    assert_eq!(
        (status.code(), errors::reason(status)),
        (reason.code(), Some(reason)),
        "{status:?}"
    );
    for (key, value) in metadata {
        assert_eq!(
            errors::metadata(status, key).as_deref(),
            Some(*value),
            "metadata {key} of {status:?}"
        );
    }
}

/// The generated client over a tonic channel.
pub type Client = LedgerServiceClient<Channel>;

/// A client of the master at `addr` (HOST:PORT) for long runs: connected within 10 s, each call
/// bounded by `call_timeout` (`None` for long streams), answers of up to 64 MiB.
pub async fn connect(addr: &str, call_timeout: Option<std::time::Duration>) -> Client {
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(std::time::Duration::from_secs(10));
    if let Some(timeout) = call_timeout {
        endpoint = endpoint.timeout(timeout);
    }
    let channel = endpoint
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connecting to master at {addr}: {e}"));
    LedgerServiceClient::new(channel).max_decoding_message_size(64 << 20)
}

/// `InsertPolicy`: the stored policy or the status.
pub async fn insert(client: &mut Client, json: &str) -> Result<Policy, Status> {
    within(30, "InsertPolicy", async {
        client
            .insert_policy(InsertPolicyRequest {
                policy_json: json.to_string(),
            })
            .await
            .map(|r| r.into_inner().policy.expect("a policy"))
    })
    .await
}

/// `InsertPolicy` by a client with a deadline: the deadline is sent (`grpc-timeout`) and the
/// call is given up after it, answered `DEADLINE_EXCEEDED` whatever the server does (tonic's
/// own `CANCELLED: Timeout expired` included).
pub async fn insert_with_deadline(
    client: &mut Client,
    json: &str,
    deadline: std::time::Duration,
) -> Result<Policy, Status> {
    let mut request = tonic::Request::new(InsertPolicyRequest {
        policy_json: json.to_string(),
    });
    request.set_timeout(deadline);
    let started = std::time::Instant::now();
    let given_up = || Status::deadline_exceeded(format!("no answer within {deadline:?}"));
    match tokio::time::timeout(deadline, client.insert_policy(request)).await {
        Ok(Ok(answer)) => Ok(answer.into_inner().policy.expect("a policy")),
        Ok(Err(status))
            if status.code() == tonic::Code::Cancelled && started.elapsed() >= deadline =>
        {
            Err(given_up())
        }
        Ok(Err(status)) => Err(status),
        Err(_) => Err(given_up()),
    }
}

/// `InsertPolicy`, which must succeed: the stored policy.
pub async fn insert_ok(client: &mut Client, json: &str) -> Policy {
    insert(client, json)
        .await
        .unwrap_or_else(|e| panic!("inserting {json}: {e}"))
}

/// `DeletePolicy`, which must succeed: the seq of the delete.
pub async fn delete_ok(client: &mut Client, id: &str) -> u64 {
    delete(client, id)
        .await
        .unwrap_or_else(|e| panic!("deleting {id}: {e}"))
}

/// `GetPolicy`: the stored policy or the status.
pub async fn get(client: &mut Client, id: &str) -> Result<Policy, Status> {
    within(
        30,
        "GetPolicy",
        client.get_policy(GetPolicyRequest { id: id.to_string() }),
    )
    .await
    .map(|r| r.into_inner().policy.expect("a policy"))
}

/// `DeletePolicy`: the seq of the delete or the status.
pub async fn delete(client: &mut Client, id: &str) -> Result<u64, Status> {
    within(30, "DeletePolicy", async {
        client
            .delete_policy(DeletePolicyRequest { id: id.to_string() })
            .await
            .map(|r| r.into_inner().seq)
    })
    .await
}

/// `GetLedgerInfo`, which must succeed.
pub async fn info(client: &mut Client) -> GetLedgerInfoResponse {
    within(
        30,
        "GetLedgerInfo",
        client.get_ledger_info(GetLedgerInfoRequest {}),
    )
    .await
    .unwrap()
    .into_inner()
}

/// Opens `StreamLedger` after `after_seq`.
pub async fn stream(client: &mut Client, after_seq: u64) -> Streaming<StreamLedgerResponse> {
    within(
        30,
        "StreamLedger",
        client.stream_ledger(StreamLedgerRequest {
            after_seq,
            subscriber: None,
        }),
    )
    .await
    .unwrap()
    .into_inner()
}

/// The next event of a stream, or the status that ended it.
pub async fn next(
    stream: &mut Streaming<StreamLedgerResponse>,
) -> Result<StreamLedgerResponse, Status> {
    within(30, "the next stream event", stream.message())
        .await
        .map(|m| m.expect("the stream does not end by itself"))
}

/// Reads up to `caught_up`; returns the events before it (progress left out) and its seq.
pub async fn until_caught_up(
    stream: &mut Streaming<StreamLedgerResponse>,
) -> (Vec<StreamLedgerResponse>, u64) {
    let mut events = Vec::new();
    loop {
        let event = next(stream).await.unwrap();
        match event.event {
            Some(Event::CaughtUp(_)) => return (events, event.seq),
            Some(Event::Progress(_)) => {}
            _ => events.push(event),
        }
    }
}

/// The next insert or delete of a stream; progress and caught_up are skipped.
pub async fn next_change(stream: &mut Streaming<StreamLedgerResponse>) -> StreamLedgerResponse {
    loop {
        let event = next(stream).await.unwrap();
        if matches!(
            event.event,
            Some(Event::Inserted(_)) | Some(Event::DeletedId(_))
        ) {
            return event;
        }
    }
}

/// Every policy of the ledger, in ledger order (every page of `ListPolicies`).
pub async fn all_policies(client: &mut Client) -> Vec<Policy> {
    let mut policies = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = within(
            30,
            "ListPolicies",
            client.list_policies(ledger_proto::pb::ListPoliciesRequest {
                page_token,
                ..Default::default()
            }),
        )
        .await
        .expect("listing policies")
        .into_inner();
        policies.extend(page.policies);
        if page.next_page_token.is_empty() {
            return policies;
        }
        page_token = page.next_page_token;
    }
}
