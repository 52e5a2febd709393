//! Every kind of refusal of the real `master` binary over loopback gRPC carries its reason
//! (`google.rpc.ErrorInfo`, domain `ledger.v1`, `ledger/v1/errors.proto`) and its metadata,
//! read the way any Rust client reads them: `ledger_proto::errors`, never the message.
//!
//! The refusals that need a failure to provoke are checked where that failure is made:
//! SUBSCRIBER_LAGGED, SHUTTING_DOWN and DEADLINE_EXCEEDED in `master_e2e`, DATABASE_UNAVAILABLE
//! in `scale_e2e`, DISK_FULL in `faults_host_e2e`, WRITE_OUTCOME_UNKNOWN in `faults_e2e`; the
//! mapping of every error in `ledger-server`'s unit tests.

use std::time::Duration;

use ledger_proto::errors::{self, Reason, key};
use ledger_proto::pb::stream_ledger_response::Event;
use ledger_proto::pb::{
    Condition, DeletePolicyRequest, GetLedgerInfoRequest, GetPolicyRequest, InsertPolicyRequest,
    ListPoliciesRequest, StreamLedgerRequest, StreamLedgerResponse,
};
use ledger_testkit::auth::AuthFile;
use ledger_testkit::client::{Client, assert_refused, delete, get, info, insert, stream};
use ledger_testkit::{Master, TempMaster, within};
use tonic::{Request, Status, Streaming};

fn start(args: &[&str]) -> TempMaster {
    TempMaster::start(args)
}

fn operator(n: usize) -> String {
    format!(r#"{{"operator": {{"name": "op{n}", "company": "Acme"}}}}"#)
}

/// A unary call of `path` with a request of any message type (to send what the generated
/// client cannot): the answer decoded as `Answer`, or the status.
async fn call_raw<Ask, Answer>(
    master: &Master,
    path: &'static str,
    ask: Ask,
) -> Result<Answer, Status>
where
    Ask: prost::Message + Send + Sync + 'static,
    Answer: prost::Message + Default + Send + Sync + 'static,
{
    let channel = tonic::transport::Channel::from_shared(master.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    within(30, path, async {
        grpc.ready().await.expect("the channel is ready");
        let codec: tonic_prost::ProstCodec<Ask, Answer> = tonic_prost::ProstCodec::default();
        grpc.unary(
            Request::new(ask),
            http::uri::PathAndQuery::from_static(path),
            codec,
        )
        .await
        .map(tonic::Response::into_inner)
    })
    .await
}

/// A message whose field 1 is bytes: as `InsertPolicyRequest.policy_json` or
/// `HealthCheckRequest.service`, it can carry text that is not UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawStringField {
    #[prost(bytes = "vec", tag = "1")]
    value: Vec<u8>,
}

/// The refusals of what a request asks: the policy text, ids, list arguments, the request's
/// encoding and size. Nothing of them changes the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_refused_request_says_why() {
    let fx = start(&[
        "--max-policy-bytes",
        "2000",
        "--max-policy-depth",
        "4",
        "--max-message-bytes",
        "65536",
    ]);
    let master = &fx.master;
    let mut client = master.client().await;
    let first = insert(&mut client, &operator(1)).await.unwrap();
    let before = info(&mut client).await;

    let refused = insert(&mut client, "{\"operator\":\n {\"name\": }}")
        .await
        .unwrap_err();
    assert_refused(
        &refused,
        Reason::PolicyInvalid,
        &[
            (key::PROBLEM, "INVALID_JSON"),
            (key::LINE, "2"),
            (key::COLUMN, "11"),
        ],
    );
    let refused = insert(&mut client, r#"{"a": {}, "b": {}}"#)
        .await
        .unwrap_err();
    assert_refused(
        &refused,
        Reason::PolicyInvalid,
        &[(key::PROBLEM, "WRONG_STRUCTURE")],
    );
    // Only INVALID_JSON says where.
    assert_eq!(errors::metadata(&refused, key::LINE), None);

    let refused = insert(&mut client, &operator(1)).await.unwrap_err();
    assert_refused(
        &refused,
        Reason::PolicyExists,
        &[(key::POLICY_ID, &first.id)],
    );

    let refused = get(&mut client, "no-such-id").await.unwrap_err();
    assert_refused(
        &refused,
        Reason::PolicyNotFound,
        &[(key::POLICY_ID, "no-such-id")],
    );
    let refused = delete(&mut client, "no-such-id").await.unwrap_err();
    assert_refused(
        &refused,
        Reason::PolicyNotFound,
        &[(key::POLICY_ID, "no-such-id")],
    );
    let refused = get(&mut client, "").await.unwrap_err();
    assert_refused(&refused, Reason::PolicyIdEmpty, &[]);

    let large = format!(r#"{{"operator": {{"name": "{}"}}}}"#, "x".repeat(3000));
    let refused = insert(&mut client, &large).await.unwrap_err();
    assert_refused(
        &refused,
        Reason::PolicyTooLarge,
        &[
            (key::SIZE_BYTES, &large.len().to_string()),
            (key::LIMIT_BYTES, "2000"),
        ],
    );
    let refused = insert(&mut client, r#"{"operator": {"a": [[[1]]]}}"#)
        .await
        .unwrap_err();
    assert_refused(&refused, Reason::PolicyTooDeep, &[(key::LIMIT_DEPTH, "4")]);

    let list = |conditions: Vec<Condition>, page_token: &str| ListPoliciesRequest {
        conditions,
        page_token: page_token.to_string(),
        ..Default::default()
    };
    let condition = |key: &str, value: &str| Condition {
        key: key.to_string(),
        value: value.to_string(),
    };
    let refused = within(
        30,
        "ListPolicies",
        client.list_policies(list(vec![condition("a", "b"); 65], "")),
    )
    .await
    .unwrap_err();
    assert_refused(
        &refused,
        Reason::TooManyConditions,
        &[(key::COUNT, "65"), (key::LIMIT, "64")],
    );
    let refused = within(
        30,
        "ListPolicies",
        client.list_policies(list(vec![condition(&"k".repeat(1025), "v")], "")),
    )
    .await
    .unwrap_err();
    assert_refused(
        &refused,
        Reason::ConditionTooLong,
        &[(key::LIMIT_BYTES, "1024")],
    );
    let refused = within(
        30,
        "ListPolicies",
        client.list_policies(list(vec![], "not-a-token")),
    )
    .await
    .unwrap_err();
    assert_refused(&refused, Reason::PageTokenInvalid, &[]);

    // Protobuf that does not decode: LedgerService's codec says so itself; for health (and
    // reflection), generated by tonic-health, the master's layer does.
    let refused = call_raw::<_, ledger_proto::pb::InsertPolicyResponse>(
        master,
        "/ledger.v1.LedgerService/InsertPolicy",
        RawStringField {
            value: b"{\"operator\": {\"name\": \"\xff\"}}".to_vec(),
        },
    )
    .await
    .unwrap_err();
    assert_refused(&refused, Reason::RequestUndecodable, &[]);
    let refused = call_raw::<_, tonic_health::pb::HealthCheckResponse>(
        master,
        "/grpc.health.v1.Health/Check",
        RawStringField {
            value: b"\xc0\xaf".to_vec(),
        },
    )
    .await
    .unwrap_err();
    assert_refused(&refused, Reason::RequestUndecodable, &[]);

    // Over --max-message-bytes: refused by tonic before it is read, with the master's reason.
    let huge = format!(r#"{{"operator": {{"name": "{}"}}}}"#, "x".repeat(70_000));
    let refused = insert(&mut client, &huge).await.unwrap_err();
    assert_refused(
        &refused,
        Reason::MessageTooLarge,
        &[(key::LIMIT_BYTES, "65536")],
    );

    assert_eq!(
        info(&mut client).await,
        before,
        "a refusal changed the ledger"
    );
}

const READER: &str = "reader-token-errors";
const WRITER: &str = "writer-token-errors";

/// `request` with `authorization: VALUE` if given.
fn with_authorization<T>(request: T, value: Option<&str>) -> Request<T> {
    let mut request = Request::new(request);
    if let Some(value) = value {
        request
            .metadata_mut()
            .insert("authorization", value.parse().unwrap());
    }
    request
}

/// The refusals of who calls, with an auth file: no credentials, credentials that are not a
/// bearer token, an unknown token, a known caller whose role is too low.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_refused_caller_is_told_why() {
    let dir = tempfile::tempdir().unwrap();
    let auth = AuthFile::new()
        .token("dashboard", "reader", READER)
        .token("ingest", "writer", WRITER)
        .write(&dir.path().join("auth.toml"));
    let master = Master::start(dir.path(), &["--auth-file", &auth]);
    let mut client = master.client().await;
    let reader = format!("Bearer {READER}");
    let writer = format!("Bearer {WRITER}");
    /// Metadata a refusal must carry.
    type Metadata = &'static [(&'static str, &'static str)];
    let cases: [(Option<&str>, Reason, Metadata); 3] = [
        (None, Reason::CredentialsMissing, &[]),
        (
            Some("Basic cmVhZGVyOnNlY3JldA=="),
            Reason::CredentialsMalformed,
            &[],
        ),
        (
            Some("Bearer not-a-token"),
            Reason::CredentialsUnknown,
            &[(key::CREDENTIAL, "token")],
        ),
    ];
    for (authorization, reason, metadata) in cases {
        let refused = within(
            30,
            "GetLedgerInfo",
            client.get_ledger_info(with_authorization(GetLedgerInfoRequest {}, authorization)),
        )
        .await
        .unwrap_err();
        assert_refused(&refused, reason, metadata);
        let refused = within(
            30,
            "StreamLedger",
            client.stream_ledger(with_authorization(
                StreamLedgerRequest {
                    after_seq: 0,
                    subscriber: None,
                },
                authorization,
            )),
        )
        .await
        .unwrap_err();
        assert_refused(&refused, reason, metadata);
    }
    let refused = within(
        30,
        "InsertPolicy",
        client.insert_policy(with_authorization(
            InsertPolicyRequest {
                policy_json: operator(1),
            },
            Some(&reader),
        )),
    )
    .await
    .unwrap_err();
    assert_refused(
        &refused,
        Reason::RoleInsufficient,
        &[(key::ROLE, "reader"), (key::REQUIRED_ROLE, "writer")],
    );
    let refused = within(
        30,
        "DeletePolicy",
        client.delete_policy(with_authorization(
            DeletePolicyRequest { id: "x".into() },
            Some(&writer),
        )),
    )
    .await
    .unwrap_err();
    assert_refused(
        &refused,
        Reason::RoleInsufficient,
        &[(key::ROLE, "writer"), (key::REQUIRED_ROLE, "admin")],
    );
    // A known caller whose role allows the call gets past the check: its read is answered.
    let answered = within(
        30,
        "GetPolicy",
        client.get_policy(with_authorization(
            GetPolicyRequest { id: "x".into() },
            Some(&reader),
        )),
    )
    .await
    .unwrap_err();
    assert_refused(&answered, Reason::PolicyNotFound, &[(key::POLICY_ID, "x")]);
}

/// Opens `StreamLedger` and reads it to `caught_up`; the stream stays open.
async fn open_stream(client: &mut Client) -> Streaming<StreamLedgerResponse> {
    let mut events = stream(client, 0).await;
    ledger_testkit::client::until_caught_up(&mut events).await;
    events
}

/// Streams past a limit: the client's (`--max-streams-per-client`) and the server's
/// (`--max-streams`), each named with its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_a_limit_are_refused_with_the_limit() {
    let fx = start(&["--max-streams-per-client", "2"]);
    let mut client = fx.master.client().await;
    let _open = [
        open_stream(&mut client).await,
        open_stream(&mut client).await,
    ];
    let refused = within(
        30,
        "StreamLedger",
        client.stream_ledger(StreamLedgerRequest {
            after_seq: 0,
            subscriber: None,
        }),
    )
    .await
    .unwrap_err();
    assert_refused(
        &refused,
        Reason::TooManyStreams,
        &[(key::SCOPE, "client"), (key::LIMIT, "2")],
    );

    let fx = start(&["--max-streams", "1"]);
    let mut client = fx.master.client().await;
    let _open = open_stream(&mut client).await;
    let refused = within(
        30,
        "StreamLedger",
        client.stream_ledger(StreamLedgerRequest {
            after_seq: 0,
            subscriber: None,
        }),
    )
    .await
    .unwrap_err();
    assert_refused(
        &refused,
        Reason::TooManyStreams,
        &[(key::SCOPE, "server"), (key::LIMIT, "1")],
    );
}

/// A snapshot whose client reads none of it for `--snapshot-stall-timeout` ends with
/// SNAPSHOT_STALLED, after what the client had already received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_snapshot_ends_with_its_reason() {
    const POLICIES: usize = 60;
    let fx = start(&["--snapshot-stall-timeout", "2s"]);
    let master = &fx.master;
    let mut client = master.client().await;
    // About 6 MB of ledger in pages of about 1 MiB (the first of 16 policies): far more than the
    // windows and buffers between the snapshot's reader and a client that reads nothing, so
    // the reader waits on the client.
    for n in 0..POLICIES {
        let policy = format!(
            r#"{{"operator": {{"name": "op{n}", "pad": "{}"}}}}"#,
            "x".repeat(100_000)
        );
        insert(&mut client, &policy).await.unwrap();
    }
    // Small HTTP/2 windows: the client takes 64 KiB until it reads.
    let channel = tonic::transport::Endpoint::from_shared(master.url())
        .unwrap()
        .initial_stream_window_size(Some(65_535))
        .initial_connection_window_size(Some(65_535))
        .connect()
        .await
        .unwrap();
    let mut slow = ledger_proto::pb::ledger_service_client::LedgerServiceClient::new(channel);
    let mut events = within(
        30,
        "StreamLedger",
        slow.stream_ledger(StreamLedgerRequest {
            after_seq: 0,
            subscriber: None,
        }),
    )
    .await
    .unwrap()
    .into_inner();
    within(60, "the stall to be noticed", async {
        while !master
            .logs()
            .contains("ended a snapshot whose client read nothing")
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let mut inserted = 0;
    let refused = within(60, "the rest of the stream", async {
        loop {
            match events.message().await {
                Ok(Some(event)) => {
                    if matches!(event.event, Some(Event::Inserted(_))) {
                        inserted += 1;
                    }
                }
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await;
    assert!(inserted < POLICIES, "the whole snapshot was sent");
    assert_refused(
        &refused,
        Reason::SnapshotStalled,
        &[(key::STALL_TIMEOUT_MS, "2000")],
    );
}
