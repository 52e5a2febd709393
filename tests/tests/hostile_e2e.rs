//! Hostile input against the real `master` binary over loopback TCP: every refusal has a clear
//! status, nothing is half-written, another client's open stream sees nothing and keeps
//! working, and the server keeps serving.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ledger_proto::errors::{Reason, key};
use ledger_proto::pb::stream_ledger_response::Event;
use ledger_proto::pb::{
    Condition, GetLedgerInfoResponse, GetPolicyRequest, InsertPolicyRequest, InsertPolicyResponse,
    ListPoliciesRequest, Policy, StreamLedgerRequest, StreamLedgerResponse,
};
use ledger_testkit::client::{
    Client, assert_refused, get, info, insert, next, next_change, stream, until_caught_up,
};
use ledger_testkit::{Master, TempMaster, ledger_digest, within};
use prost::Message;
use serde_json::{Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Code, Status, Streaming};

fn start(args: &[&str]) -> TempMaster {
    TempMaster::start(args)
}

fn operator(n: usize) -> String {
    format!(
        r#"{{"operator": {{"name": "op{n}", "company": "Acme", "ip": "10.0.0.{}", "port": {}}}}}"#,
        n % 250,
        32148 + n
    )
}

/// Another client, on its own connection, with a stream opened and read to `caught_up` before
/// the hostile input: it must see no change from it, and keep working.
struct Watcher {
    stream: Streaming<StreamLedgerResponse>,
    before: GetLedgerInfoResponse,
    probes: usize,
}

impl Watcher {
    async fn open(master: &Master) -> Watcher {
        let mut client = master.client().await;
        let mut stream = stream(&mut client, 0).await;
        let (_, seq) = until_caught_up(&mut stream).await;
        let before = info(&mut client).await;
        assert_eq!(seq, before.head_seq, "caught_up at the head");
        Watcher {
            stream,
            before,
            probes: 0,
        }
    }

    /// The ledger is as before the case (head, count, digest), on a new connection; then a good
    /// policy inserted now is the very next change on the watcher's stream.
    async fn assert_unchanged(&mut self, master: &Master, case: &str) {
        let mut client = within(30, "connecting after a hostile case", master.client()).await;
        let now = info(&mut client).await;
        assert_eq!(
            (now.head_seq, now.policy_count, &now.digest),
            (
                self.before.head_seq,
                self.before.policy_count,
                &self.before.digest
            ),
            "{case}: the ledger changed"
        );
        self.probes += 1;
        let json = format!(
            r#"{{"probe": {{"n": {}, "after": {}}}}}"#,
            self.probes,
            serde_json::to_string(case).unwrap()
        );
        let probe = insert(&mut client, &json)
            .await
            .unwrap_or_else(|e| panic!("{case}: a good insert afterwards failed: {e}"));
        assert_eq!(
            probe.seq,
            self.before.head_seq + 1,
            "{case}: the probe's seq"
        );
        let change = next_change(&mut self.stream).await;
        assert_eq!(
            change.event,
            Some(Event::Inserted(probe.clone())),
            "{case}: the other client's stream got something else before the probe"
        );
        assert_eq!(change.seq, probe.seq);
        self.before = info(&mut client).await;
        assert_eq!(self.before.head_seq, probe.seq);
    }

    /// Takes legitimate changes: they are the next changes on the stream, in order.
    async fn accept(&mut self, master: &Master, inserted: &[Policy]) {
        for policy in inserted {
            let change = next_change(&mut self.stream).await;
            assert_eq!(change.event, Some(Event::Inserted(policy.clone())));
            assert_eq!(change.seq, policy.seq);
        }
        self.before = info(&mut master.client().await).await;
    }
}

/// Inserts `text`, which must be refused for `reason` with `metadata` (among the rest).
async fn refused(
    client: &mut Client,
    case: &str,
    text: &str,
    reason: Reason,
    metadata: &[(&str, &str)],
) {
    match insert(client, text).await {
        Ok(policy) => panic!("{case}: accepted as {policy:?}"),
        Err(status) => assert_refused(&status, reason, metadata),
    }
}

/// Seeds a few good policies so that the ledger and its digest are not trivial.
async fn seed(master: &Master, count: usize) -> Vec<Policy> {
    let mut client = master.client().await;
    let mut policies = Vec::new();
    for n in 0..count {
        policies.push(insert(&mut client, &operator(n)).await.unwrap());
    }
    policies
}

/// The reason a refusal must have and metadata it must carry.
type Expected<'a> = (Reason, Vec<(&'static str, &'a str)>);

/// `POLICY_INVALID` for `problem`.
fn invalid(problem: &'static str) -> Expected<'static> {
    (Reason::PolicyInvalid, vec![(key::PROBLEM, problem)])
}

/// `POLICY_INVALID` for invalid JSON, on `line` if given.
fn invalid_json(line: Option<&'static str>) -> Expected<'static> {
    let (reason, mut metadata) = invalid("INVALID_JSON");
    metadata.extend(line.map(|line| (key::LINE, line)));
    (reason, metadata)
}

/// `POLICY_TOO_DEEP` at the default limit.
fn too_deep() -> Expected<'static> {
    (Reason::PolicyTooDeep, vec![(key::LIMIT_DEPTH, "64")])
}

/// `POLICY_TOO_LARGE` for a policy of `size` bytes.
fn too_large(size: &str) -> Expected<'_> {
    (Reason::PolicyTooLarge, vec![(key::SIZE_BYTES, size)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_policies_are_refused_and_change_nothing() {
    let fixture = start(&[]);
    let master = &fixture.master;
    seed(master, 3).await;
    let mut watcher = Watcher::open(master).await;
    let mut client = master.client().await;

    let deep = format!(
        r#"{{"operator": {{"a": {}{}}}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let deep_objects = format!(
        r#"{{"operator": {}1{}}}"#,
        r#"{"a": "#.repeat(100_000),
        "}".repeat(100_000)
    );
    let unclosed = format!(r#"{{"operator": {}"#, "[".repeat(100_000));
    let long_int = format!(r#"{{"operator": {{"n": {}}}}}"#, "9".repeat(5_000));
    let long_negative = format!(r#"{{"operator": {{"n": -{}}}}}"#, "1".repeat(5_000));
    let over_policy_limit = format!(r#"{{"operator": {{"name": "{}"}}}}"#, "x".repeat(2 << 20));
    let over_policy_limit_len = over_policy_limit.len().to_string();
    let cases: Vec<(&str, &str, Expected)> = vec![
        (
            "invalid JSON",
            r#"{"operator": {"name": "op1",}}"#,
            invalid_json(Some("1")),
        ),
        (
            "invalid JSON on line 3",
            "{\n\"operator\": {\n\"name\": op1}}",
            invalid_json(Some("3")),
        ),
        (
            "unterminated",
            r#"{"operator": {"name": "op1"#,
            invalid_json(None),
        ),
        ("empty text", "", invalid_json(None)),
        ("whitespace only", " \n\t ", invalid_json(None)),
        (
            "trailing garbage",
            r#"{"operator": {"name": "op1"}} x"#,
            invalid_json(None),
        ),
        (
            "two documents",
            r#"{"operator": {}} {"operator": {}}"#,
            invalid_json(None),
        ),
        (
            "single quotes",
            r#"{'operator': {'name': 'op1'}}"#,
            invalid_json(None),
        ),
        (
            "a raw NUL in a string",
            "{\"operator\": {\"name\": \"a\u{0}b\"}}",
            invalid_json(None),
        ),
        (
            "a raw control character in a string",
            "{\"operator\": {\"name\": \"a\u{1f}b\"}}",
            invalid_json(None),
        ),
        ("NaN", r#"{"operator": {"n": NaN}}"#, invalid_json(None)),
        (
            "Infinity",
            r#"{"operator": {"n": Infinity}}"#,
            invalid_json(None),
        ),
        (
            "an array",
            r#"[{"operator": {"name": "op1"}}]"#,
            invalid("WRONG_STRUCTURE"),
        ),
        ("an empty array", "[]", invalid("WRONG_STRUCTURE")),
        ("a number", "42", invalid("WRONG_STRUCTURE")),
        ("a string", r#""operator""#, invalid("WRONG_STRUCTURE")),
        ("null", "null", invalid("WRONG_STRUCTURE")),
        ("true", "true", invalid("WRONG_STRUCTURE")),
        ("an empty object", "{}", invalid("WRONG_STRUCTURE")),
        (
            "two root keys",
            r#"{"operator": {"name": "a"}, "table": {"name": "b"}}"#,
            invalid("WRONG_STRUCTURE"),
        ),
        (
            "a body that is an array",
            r#"{"operator": [1, 2]}"#,
            invalid("BODY_NOT_OBJECT"),
        ),
        (
            "a body that is a string",
            r#"{"operator": "op1"}"#,
            invalid("BODY_NOT_OBJECT"),
        ),
        (
            "a body that is null",
            r#"{"operator": null}"#,
            invalid("BODY_NOT_OBJECT"),
        ),
        (
            "a body that is a number",
            r#"{"operator": 5}"#,
            invalid("BODY_NOT_OBJECT"),
        ),
        (
            "an empty type",
            r#"{"": {"name": "op1"}}"#,
            invalid("EMPTY_TYPE"),
        ),
        (
            "a number id",
            r#"{"operator": {"id": 5, "name": "op1"}}"#,
            invalid("INVALID_ID"),
        ),
        (
            "an empty id",
            r#"{"operator": {"id": "", "name": "op1"}}"#,
            invalid("INVALID_ID"),
        ),
        (
            "1e400",
            r#"{"operator": {"n": 1e400}}"#,
            invalid("NUMBER_OUT_OF_RANGE"),
        ),
        (
            "-1e400",
            r#"{"operator": {"n": -1e400}}"#,
            invalid("NUMBER_OUT_OF_RANGE"),
        ),
        (
            "1.5E+999 in an array",
            r#"{"operator": {"n": [1, 1.5E+999]}}"#,
            invalid("NUMBER_OUT_OF_RANGE"),
        ),
        (
            "a 5,000-digit integer",
            &long_int,
            invalid("INTEGER_TOO_LONG"),
        ),
        (
            "a 5,000-digit negative integer",
            &long_negative,
            invalid("INTEGER_TOO_LONG"),
        ),
        ("arrays nested 100,000 deep", &deep, too_deep()),
        ("objects nested 100,000 deep", &deep_objects, too_deep()),
        ("100,000 unclosed brackets", &unclosed, too_deep()),
        (
            "a 2 MiB policy",
            &over_policy_limit,
            too_large(&over_policy_limit_len),
        ),
    ];
    for (case, text, (reason, metadata)) in cases {
        refused(&mut client, case, text, reason, &metadata).await;
        watcher.assert_unchanged(master, case).await;
    }
    // The size refusal names the limit too.
    refused(
        &mut client,
        "a 2 MiB policy",
        &over_policy_limit,
        Reason::PolicyTooLarge,
        &[(key::LIMIT_BYTES, "1048576")],
    )
    .await;
    watcher.assert_unchanged(master, "a 2 MiB policy").await;
    // Just inside the limits is accepted: the limits are where they say.
    let nested_ok = format!(
        r#"{{"operator": {{"a": {}{}}}}}"#,
        "[".repeat(62),
        "]".repeat(62)
    );
    let accepted = insert(&mut client, &nested_ok).await.unwrap();
    watcher.accept(master, &[accepted]).await;
    refused(
        &mut client,
        "nested 65 deep",
        &format!(
            r#"{{"operator": {{"a": {}{}}}}}"#,
            "[".repeat(63),
            "]".repeat(63)
        ),
        Reason::PolicyTooDeep,
        &[(key::LIMIT_DEPTH, "64")],
    )
    .await;
    watcher.assert_unchanged(master, "nested 65 deep").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_policy_is_refused_and_changes_nothing() {
    let fixture = start(&[]);
    let master = &fixture.master;
    seed(master, 3).await;
    let mut watcher = Watcher::open(master).await;
    let huge = format!(
        r#"{{"operator": {{"name": "{}"}}}}"#,
        "a".repeat(100_000_000)
    );
    let mut client = master.client().await;
    let started = Instant::now();
    let status = within(
        120,
        "InsertPolicy of 100 MB",
        client.insert_policy(InsertPolicyRequest { policy_json: huge }),
    )
    .await
    .expect_err("a 100 MB policy is refused");
    eprintln!(
        "100 MB policy: {:?} {:?} after {:?}",
        status.code(),
        status.message(),
        started.elapsed()
    );
    // tonic refuses a message over --max-message-bytes (4 MiB) before reading it; the master
    // gives its refusal the reason and the limit.
    assert_refused(
        &status,
        Reason::MessageTooLarge,
        &[(key::LIMIT_BYTES, "4194304")],
    );
    watcher.assert_unchanged(master, "a 100 MB policy").await;
    // The same client (connection) still works.
    insert(&mut client, &operator(100)).await.unwrap();
}

/// Keys and values that trip naive SQL, JSON or C string handling.
const NASTY: [&str; 12] = [
    "'; DROP TABLE ledger; --",
    "\" OR \"1\"=\"1",
    "' OR '1'='1",
    "Robert'); DELETE FROM ledger_changes WHERE ('1'='1",
    "back\\slash \\\" \\u0000 \\n \\\\",
    "nul\u{0}inside\u{0}",
    "controls \u{1}\u{7}\u{8}\t\n\u{b}\u{c}\r\u{1b}\u{1f}\u{7f}\u{80}\u{9f}",
    "non-BMP \u{1F600} \u{1D11E} \u{10348} \u{10FFFF} \u{E000}",
    "percent % underscore _ $1 ? :name @p0 %s {0}",
    "bidi \u{202e} zero-width \u{200b} bom \u{feff} seps \u{2028}\u{2029}",
    "quote \" apostrophe ' backtick ` semicolon ;",
    "",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nasty_keys_and_values_are_stored_and_returned_exactly() {
    let fixture = start(&[]);
    let master = &fixture.master;
    seed(master, 2).await;
    let mut watcher = Watcher::open(master).await;
    let mut client = master.client().await;

    // (type, body) pairs: every nasty string as a key and as a value, nested too, and as the
    // policy type.
    let mut policies: Vec<(String, Map<String, Value>)> = Vec::new();
    let mut body = Map::new();
    for (n, key) in NASTY.iter().enumerate() {
        let value = NASTY[(n + 1) % NASTY.len()];
        body.insert(format!("k{n} {key}"), Value::String(value.to_string()));
    }
    body.insert(
        "nested".into(),
        serde_json::json!({ "list": NASTY, "obj": { NASTY[0]: NASTY[5], NASTY[7]: [NASTY[6]] } }),
    );
    policies.push(("operator".into(), body));
    for (n, text) in NASTY.iter().enumerate().filter(|(_, t)| !t.is_empty()) {
        let mut body = Map::new();
        body.insert(text.to_string(), Value::String(text.to_string()));
        body.insert("name".into(), Value::String(format!("nasty{n}")));
        policies.push((format!("t{n} {text}"), body));
    }

    let mut stored = Vec::new();
    for (policy_type, body) in &policies {
        let mut root = Map::new();
        root.insert(policy_type.clone(), Value::Object(body.clone()));
        let text = serde_json::to_string(&Value::Object(root)).unwrap();
        let policy = insert(&mut client, &text)
            .await
            .unwrap_or_else(|e| panic!("inserting {text:?}: {e}"));
        assert_eq!(&policy.r#type, policy_type);
        check_round_trip(&policy, policy_type, body);
        stored.push(policy);
    }
    // Escapes written by hand: a surrogate pair, \u0000, \/ and the short escapes.
    let by_hand = r#"{"operator": {"emoji": "\ud83d\ude00", "nul": "a\u0000b", "slash": "\/", "short": "\b\f\n\r\t\"\\", "\u0027k": "\u00e9"}}"#;
    let policy = insert(&mut client, by_hand).await.unwrap();
    let expected: Value = serde_json::from_str(by_hand).unwrap();
    check_round_trip(
        &policy,
        "operator",
        expected["operator"].as_object().unwrap(),
    );
    assert_eq!(
        serde_json::from_str::<Value>(&policy.json).unwrap()["operator"]["emoji"],
        "\u{1F600}"
    );
    stored.push(policy);
    watcher.accept(master, &stored).await;

    // GetPolicy returns the same json.
    for policy in &stored {
        let got = get(&mut client, &policy.id).await.unwrap();
        assert_eq!(&got, policy);
    }
    // A stream from 0 gives the same json; the digest is that of these lines.
    let mut fresh = stream(&mut master.client().await, 0).await;
    let (events, _) = until_caught_up(&mut fresh).await;
    let snapshot: Vec<Policy> = events
        .into_iter()
        .filter_map(|e| match e.event {
            Some(Event::Inserted(p)) => Some(p),
            _ => None,
        })
        .collect();
    for policy in &stored {
        assert!(
            snapshot.contains(policy),
            "the stream from 0 has {policy:?}"
        );
    }
    let ledger_info = info(&mut client).await;
    assert_eq!(
        ledger_digest(snapshot.iter().map(|p| p.json.as_str())),
        ledger_info.digest
    );

    // Filters with nasty types, keys and values find exactly the one policy.
    for (policy, (policy_type, body)) in stored.iter().zip(&policies).skip(1) {
        let (key, value) = body.iter().next().unwrap();
        let page = within(
            30,
            "ListPolicies",
            client.list_policies(ListPoliciesRequest {
                r#type: policy_type.clone(),
                conditions: vec![Condition {
                    key: key.clone(),
                    value: value.as_str().unwrap().to_string(),
                }],
                ..Default::default()
            }),
        )
        .await
        .unwrap()
        .into_inner();
        assert_eq!(page.policies, vec![policy.clone()], "filter on {key:?}");
    }
    // An injection-looking value matches nothing it should not.
    let page = within(
        30,
        "ListPolicies",
        client.list_policies(ListPoliciesRequest {
            r#type: "operator".into(),
            conditions: vec![Condition {
                key: "name".into(),
                value: "' OR '1'='1".into(),
            }],
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert!(page.policies.is_empty(), "{:?}", page.policies);
    watcher
        .assert_unchanged(master, "after nasty strings")
        .await;
}

/// The stored line parses back to the same type and the same keys and values.
fn check_round_trip(policy: &Policy, policy_type: &str, body: &Map<String, Value>) {
    let parsed: Value = serde_json::from_str(&policy.json)
        .unwrap_or_else(|e| panic!("the stored json {:?} does not parse: {e}", policy.json));
    let root = parsed.as_object().unwrap();
    assert_eq!(root.len(), 1);
    let stored_body = root
        .get(policy_type)
        .unwrap_or_else(|| panic!("type {policy_type:?} missing in {:?}", policy.json))
        .as_object()
        .unwrap();
    for (key, value) in body {
        assert_eq!(
            stored_body.get(key),
            Some(value),
            "key {key:?} in {:?}",
            policy.json
        );
    }
    assert_eq!(stored_body["id"], policy.id.as_str());
}

/// `InsertPolicyRequest` with `policy_json` as raw bytes, so that invalid UTF-8 can be sent.
#[derive(Clone, PartialEq, prost::Message)]
struct RawInsertPolicyRequest {
    #[prost(bytes = "vec", tag = "1")]
    policy_json: Vec<u8>,
}

async fn insert_raw(master: &Master, bytes: &[u8]) -> Result<InsertPolicyResponse, Status> {
    let channel = within(
        30,
        "connecting",
        tonic::transport::Channel::from_shared(master.url())
            .unwrap()
            .connect(),
    )
    .await
    .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    within(30, "InsertPolicy (raw)", async {
        grpc.ready().await.expect("the channel is ready");
        let codec: tonic_prost::ProstCodec<RawInsertPolicyRequest, InsertPolicyResponse> =
            tonic_prost::ProstCodec::default();
        grpc.unary(
            tonic::Request::new(RawInsertPolicyRequest {
                policy_json: bytes.to_vec(),
            }),
            http::uri::PathAndQuery::from_static("/ledger.v1.LedgerService/InsertPolicy"),
            codec,
        )
        .await
        .map(tonic::Response::into_inner)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_is_refused_with_invalid_argument() {
    let fixture = start(&[]);
    let master = &fixture.master;
    seed(master, 2).await;
    let mut watcher = Watcher::open(master).await;
    // The raw path works: valid UTF-8 sent as bytes is an ordinary insert.
    let good = insert_raw(master, r#"{"operator": {"name": "raw é 😀"}}"#.as_bytes())
        .await
        .unwrap()
        .policy
        .unwrap();
    watcher.accept(master, &[good]).await;
    let cases: [(&str, &[u8]); 5] = [
        (
            "0xff 0xfe in a value",
            b"{\"operator\": {\"name\": \"\xff\xfe\"}}",
        ),
        (
            "an overlong '/'",
            b"{\"operator\": {\"name\": \"\xc0\xaf\"}}",
        ),
        (
            "an encoded surrogate",
            b"{\"operator\": {\"name\": \"\xed\xa0\x80\"}}",
        ),
        (
            "a truncated sequence in a key",
            b"{\"operator\": {\"\xe2\x82\": 1}}",
        ),
        (
            "a truncated sequence at the end",
            b"{\"operator\": {}}\xf0\x9f\x98",
        ),
    ];
    let mut wrong = Vec::new();
    for (case, bytes) in cases {
        let status = insert_raw(master, bytes).await.expect_err(case);
        if (status.code(), ledger_proto::errors::reason(&status))
            != (Code::InvalidArgument, Some(Reason::RequestUndecodable))
        {
            wrong.push(format!(
                "{case}: {:?} {:?}",
                status.code(),
                status.message()
            ));
        }
        watcher.assert_unchanged(master, case).await;
    }
    assert!(
        wrong.is_empty(),
        "invalid UTF-8 must be INVALID_ARGUMENT REQUEST_UNDECODABLE:\n{}",
        wrong.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_colliding_client_id_is_already_exists_and_changes_nothing() {
    let fixture = start(&[]);
    let master = &fixture.master;
    seed(master, 2).await;
    let mut watcher = Watcher::open(master).await;
    let mut client = master.client().await;
    let first = insert(
        &mut client,
        r#"{"operator": {"id": "my-id", "name": "first"}}"#,
    )
    .await
    .unwrap();
    assert_eq!(first.id, "my-id");
    let computed = insert(&mut client, &operator(50)).await.unwrap();
    watcher
        .accept(master, &[first.clone(), computed.clone()])
        .await;

    let cases = [
        (
            "the same client id, another body",
            r#"{"operator": {"id": "my-id", "name": "second"}}"#.to_string(),
        ),
        (
            "the same client id, another type",
            r#"{"table": {"id": "my-id", "name": "t"}}"#.to_string(),
        ),
        (
            "the identical policy again",
            r#"{"operator": {"id": "my-id", "name": "first"}}"#.to_string(),
        ),
        ("a computed id again", operator(50)),
        (
            "a client id equal to a computed one",
            format!(r#"{{"cluster": {{"id": "{}", "name": "c"}}}}"#, computed.id),
        ),
    ];
    for (case, text) in &cases {
        refused(&mut client, case, text, Reason::PolicyExists, &[]).await;
        watcher.assert_unchanged(master, case).await;
    }
    for policy in [&first, &computed] {
        let got = client
            .get_policy(GetPolicyRequest {
                id: policy.id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .policy
            .unwrap();
        assert_eq!(&got, policy, "the first policy with the id is kept");
    }
}

/// Opens `StreamLedger`; the refusal may come as the call's status or as the stream's first.
async fn try_stream(
    client: &mut Client,
    after_seq: u64,
) -> Result<(Streaming<StreamLedgerResponse>, u64), Status> {
    let mut stream = within(
        30,
        "StreamLedger",
        client.stream_ledger(StreamLedgerRequest {
            after_seq,
            subscriber: None,
        }),
    )
    .await?
    .into_inner();
    loop {
        let event = within(30, "the next stream event", stream.message())
            .await?
            .expect("the stream does not end by itself");
        if let Some(Event::CaughtUp(_)) = event.event {
            return Ok((stream, event.seq));
        }
    }
}

/// Opens `per_connection` streams on each of `connections` connections, concurrently, each
/// read to caught_up; a refused open is retried until `deadline`.
async fn open_many(
    master: &Master,
    connections: usize,
    per_connection: usize,
    after_seq: u64,
    deadline: Instant,
) -> Vec<Streaming<StreamLedgerResponse>> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let mut client = master.client().await;
        tasks.spawn(async move {
            let mut streams = Vec::new();
            while streams.len() < per_connection {
                match try_stream(&mut client, after_seq).await {
                    Ok((stream, _)) => streams.push(stream),
                    Err(status)
                        if ledger_proto::errors::reason(&status)
                            == Some(Reason::TooManyStreams)
                            && Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(status) => panic!("opening a stream: {status:?}"),
                }
            }
            streams
        });
    }
    let mut all = Vec::new();
    while let Some(streams) = tasks.join_next().await {
        all.extend(streams.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_streams_opened_and_dropped() {
    const CONNECTIONS: usize = 20;
    const PER_CONNECTION: usize = 100;
    const STREAMS: usize = CONNECTIONS * PER_CONNECTION;
    // Room for one batch (and the watcher), not two: dropped streams must free their places.
    let fixture = start(&["--max-streams-per-client", "2100"]);
    let master = &fixture.master;
    seed(master, 5).await;
    let mut watcher = Watcher::open(master).await;
    let started = Instant::now();

    // 2,000 streams from 0 (snapshots), all open at once; a change reaches every one.
    let mut streams = within(
        180,
        "opening 2,000 streams",
        open_many(master, CONNECTIONS, PER_CONNECTION, 0, Instant::now()),
    )
    .await;
    assert_eq!(streams.len(), STREAMS);
    watcher.assert_unchanged(master, "2,000 streams open").await;
    let probe = watcher.before.head_seq;
    within(120, "the probe on 2,000 streams", async {
        for stream in &mut streams {
            let change = next_change(stream).await;
            assert_eq!(change.seq, probe);
        }
    })
    .await;
    drop(streams);
    eprintln!(
        "2,000 streams opened, fed and dropped in {:?}",
        started.elapsed()
    );
    watcher
        .assert_unchanged(master, "2,000 streams dropped")
        .await;

    // Again, now dropped right after the call, without reading anything.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONNECTIONS {
        let mut client = master.client().await;
        tasks.spawn(async move {
            let mut streams = Vec::new();
            while streams.len() < PER_CONNECTION {
                match client
                    .stream_ledger(StreamLedgerRequest {
                        after_seq: 0,
                        subscriber: None,
                    })
                    .await
                {
                    Ok(stream) => streams.push(stream.into_inner()),
                    Err(status)
                        if ledger_proto::errors::reason(&status)
                            == Some(Reason::TooManyStreams)
                            && Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(status) => panic!("opening a stream: {status:?}"),
                }
            }
            streams.len()
        });
    }
    within(180, "opening 2,000 unread streams", async {
        let mut opened = 0;
        while let Some(count) = tasks.join_next().await {
            opened += count.unwrap();
        }
        assert_eq!(opened, STREAMS);
    })
    .await;
    watcher
        .assert_unchanged(master, "2,000 unread streams dropped")
        .await;

    // The places are freed: 2,000 more fit under the limit of 2,100.
    let head = watcher.before.head_seq;
    let again = within(
        180,
        "2,000 streams once the others are dropped",
        open_many(
            master,
            CONNECTIONS,
            PER_CONNECTION,
            head,
            Instant::now() + Duration::from_secs(60),
        ),
    )
    .await;
    assert_eq!(again.len(), STREAMS);
    drop(again);
    watcher
        .assert_unchanged(master, "the last 2,000 dropped")
        .await;
    eprintln!("thousands of streams: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_client_stream_limit_refuses_then_admits_again() {
    let fixture = start(&["--max-streams-per-client", "10"]);
    let master = &fixture.master;
    seed(master, 2).await;
    // The watcher's stream is one of the ten (every client here is 127.0.0.1).
    let mut watcher = Watcher::open(master).await;
    let mut client = master.client().await;
    let mut open = Vec::new();
    for _ in 0..9 {
        open.push(try_stream(&mut client, 0).await.unwrap().0);
    }
    for (case, mut other) in [
        ("the 11th stream", client.clone()),
        ("the 11th on another connection", master.client().await),
    ] {
        let status = try_stream(&mut other, 0)
            .await
            .err()
            .unwrap_or_else(|| panic!("{case} is refused"));
        assert_refused(
            &status,
            Reason::TooManyStreams,
            &[(key::SCOPE, "client"), (key::LIMIT, "10")],
        );
    }
    watcher.assert_unchanged(master, "streams refused").await;
    // The open streams still get changes.
    let probe = watcher.before.head_seq;
    for stream in &mut open {
        assert_eq!(next_change(stream).await.seq, probe);
    }
    // Closing three admits three new ones (once the server saw them go), not a fourth.
    open.truncate(6);
    let deadline = Instant::now() + Duration::from_secs(10);
    for _ in 0..3 {
        let stream = loop {
            match try_stream(&mut client, 0).await {
                Ok((stream, _)) => break stream,
                Err(status)
                    if ledger_proto::errors::reason(&status) == Some(Reason::TooManyStreams) =>
                {
                    assert!(
                        Instant::now() < deadline,
                        "closed streams still count after 10s: {status:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => panic!("{status:?}"),
            }
        };
        open.push(stream);
    }
    let Err(status) = try_stream(&mut client, 0).await else {
        panic!("an 11th stream is refused again");
    };
    assert_refused(
        &status,
        Reason::TooManyStreams,
        &[(key::SCOPE, "client"), (key::LIMIT, "10")],
    );
    watcher
        .assert_unchanged(master, "streams re-admitted")
        .await;
}

/// Inserts `count` policies from `tasks` concurrent tasks on one connection, while the watcher
/// reads them off its stream; returns them in seq order.
async fn insert_many(
    master: &Master,
    watcher: &mut Watcher,
    count: usize,
    tasks: usize,
) -> Vec<Policy> {
    let client = master.client().await;
    let mut set = tokio::task::JoinSet::new();
    for task in 0..tasks {
        let mut client = client.clone();
        set.spawn(async move {
            let mut policies = Vec::new();
            for n in (task..count).step_by(tasks) {
                // 8 KiB each: 16 MB in all, more than the HTTP/2 windows and socket buffers of
                // a stream that is not read can hold.
                let json = format!(
                    r#"{{"operator": {{"name": "op{n}", "padding": "{}"}}}}"#,
                    "p".repeat(8192)
                );
                policies.push(insert(&mut client, &json).await.unwrap());
            }
            policies
        });
    }
    let mut seen = Vec::new();
    for n in 0..count as u64 {
        let change = next_change(&mut watcher.stream).await;
        assert_eq!(change.seq, watcher.before.head_seq + 1 + n);
        match change.event {
            Some(Event::Inserted(policy)) => seen.push(policy),
            other => panic!("an insert: {other:?}"),
        }
    }
    let mut all = Vec::new();
    while let Some(policies) = set.join_next().await {
        all.extend(policies.unwrap());
    }
    all.sort_by_key(|p| p.seq);
    assert_eq!(all, seen, "the watcher got exactly the inserts");
    watcher.before = info(&mut master.client().await).await;
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_never_reads_does_not_block_inserts() {
    stream_read_late(&[]).await;
}

/// As above, with the ring's byte budget (1 MB) far below the 16 MB inserted: the changes the
/// feed let go are read from the database, in order, none skipped (issue 15, point 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_reader_past_the_byte_budget_gets_every_change_from_the_database() {
    stream_read_late(&["--subscriber-buffer-bytes", "1000000"]).await;
}

/// A stream opened and not read while 2,000 8 KiB policies are inserted: the inserts are not
/// held up, and the stream, read at last, has every change in order.
async fn stream_read_late(args: &[&str]) {
    const INSERTS: usize = 2000;
    let fixture = start(args);
    let master = &fixture.master;
    seed(master, 3).await;
    let mut watcher = Watcher::open(master).await;
    // Its own connection; opened, never read while the others insert.
    let mut stalled_client = master.client().await;
    let mut stalled = stream(&mut stalled_client, 0).await;
    let started = Instant::now();
    let inserted = within(
        180,
        "2,000 inserts beside a stalled stream",
        insert_many(master, &mut watcher, INSERTS, 8),
    )
    .await;
    eprintln!(
        "{INSERTS} inserts beside a stalled stream: {:?}",
        started.elapsed()
    );
    assert_eq!(inserted.len(), INSERTS);
    watcher.assert_unchanged(master, "a stalled stream").await;
    // Read at last, it has everything, in order (2,000 is within --subscriber-buffer).
    let (snapshot, caught_up) = until_caught_up(&mut stalled).await;
    let mut count = snapshot
        .iter()
        .filter(|e| matches!(e.event, Some(Event::Inserted(_))))
        .count() as u64;
    let mut seq = caught_up;
    within(60, "the stalled stream's backlog", async {
        while seq < watcher.before.head_seq {
            let change = next_change(&mut stalled).await;
            assert_eq!(change.seq, seq + 1);
            seq = change.seq;
            count += 1;
        }
    })
    .await;
    assert_eq!(count, watcher.before.policy_count, "every policy, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_past_the_subscriber_buffer_is_ended_not_waited_for() {
    const INSERTS: usize = 2000;
    let fixture = start(&["--subscriber-buffer", "100"]);
    let master = &fixture.master;
    seed(master, 3).await;
    let mut watcher = Watcher::open(master).await;
    let mut stalled_client = master.client().await;
    let mut stalled = stream(&mut stalled_client, 0).await;
    let inserted = within(
        180,
        "2,000 inserts beside a stalled stream",
        insert_many(master, &mut watcher, INSERTS, 8),
    )
    .await;
    assert_eq!(inserted.len(), INSERTS);
    watcher.assert_unchanged(master, "a stalled stream").await;
    // What was already sent may be read; then the stream ends with RESOURCE_EXHAUSTED.
    let status = within(60, "the stalled stream to end", async {
        loop {
            match next(&mut stalled).await {
                Ok(_) => {}
                Err(status) => return status,
            }
        }
    })
    .await;
    assert_refused(&status, Reason::SubscriberLagged, &[]);
}

/// The gRPC frame of an `InsertPolicy` request for `json`: flag, length, message.
fn grpc_frame(json: &str) -> Vec<u8> {
    let message = InsertPolicyRequest {
        policy_json: json.to_string(),
    }
    .encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend((message.len() as u32).to_be_bytes());
    frame.extend(message);
    frame
}

/// Sends an `InsertPolicy` with only `bytes` of its body over a raw HTTP/2 connection, waits
/// `linger` for them to be on the wire, then drops the connection.
async fn cut_insert(master: &Master, body: &[u8], end_stream: bool, linger: Duration) {
    let tcp = tokio::net::TcpStream::connect(master.addr).await.unwrap();
    let (client, connection) = within(30, "the HTTP/2 handshake", h2::client::handshake(tcp))
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let mut client = within(30, "HTTP/2 ready", client.ready()).await.unwrap();
    let request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{}/ledger.v1.LedgerService/InsertPolicy",
            master.addr
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut send) = client.send_request(request, false).unwrap();
    send.send_data(Bytes::copy_from_slice(body), end_stream)
        .unwrap();
    tokio::time::sleep(linger).await;
    connection.abort();
    let _ = connection.await;
    drop((response, send, client));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_in_the_middle_of_an_insert() {
    let fixture = start(&[]);
    let master = &fixture.master;
    seed(master, 3).await;
    let mut watcher = Watcher::open(master).await;
    let mut client = master.client().await;

    // Half of the message, then the connection is gone: nothing is stored.
    let json = r#"{"operator": {"name": "cut", "company": "Acme", "note": "half a message"}}"#;
    let frame = grpc_frame(json);
    for (case, bytes) in [
        ("half of the message", &frame[..frame.len() / 2]),
        ("the prefix only", &frame[..5]),
        ("half of the prefix", &frame[..2]),
        ("all but the last byte", &frame[..frame.len() - 1]),
    ] {
        cut_insert(master, bytes, false, Duration::from_millis(300)).await;
        watcher.assert_unchanged(master, case).await;
    }
    // The complete identical insert afterwards succeeds: nothing of it was there.
    let whole = insert(&mut client, json).await.unwrap();
    watcher.accept(master, &[whole]).await;

    // The whole message, the connection dropped before the answer: the insert is there
    // entirely or not at all, once.
    let json = r#"{"operator": {"name": "cut2", "company": "Acme", "note": "whole message"}}"#;
    cut_insert(master, &grpc_frame(json), true, Duration::from_millis(0)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = insert(&mut client, json).await;
    let change = next_change(&mut watcher.stream).await;
    let Some(Event::Inserted(stored)) = change.event else {
        panic!("an insert: {change:?}")
    };
    match again {
        Ok(policy) => assert_eq!(stored, policy),
        Err(status) => {
            assert_refused(
                &status,
                Reason::PolicyExists,
                &[(key::POLICY_ID, &stored.id)],
            );
            assert!(stored.json.contains("\"cut2\""), "{stored:?}");
        }
    }
    assert_eq!(change.seq, watcher.before.head_seq + 1);
    let got = client
        .get_policy(GetPolicyRequest {
            id: stored.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap();
    assert_eq!(got, stored);
    watcher.before = info(&mut client).await;
    assert_eq!(watcher.before.head_seq, stored.seq, "stored once");
    watcher.assert_unchanged(master, "a whole insert cut").await;
}

/// Writes `bytes` to the master's port and waits (bounded) for the server to close it.
async fn garbage(master: &Master, case: &str, bytes: &[u8]) {
    let mut tcp = tokio::net::TcpStream::connect(master.addr).await.unwrap();
    // The server may close before everything is written: a write error is fine.
    let _ = within(30, case, tcp.write_all(bytes)).await;
    let mut buf = vec![0u8; 64 * 1024];
    within(
        30,
        &format!("the server to close the connection: {case}"),
        async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_instead_of_http2_is_closed_and_the_server_keeps_serving() {
    let fixture = start(&[]);
    let master = &fixture.master;
    seed(master, 3).await;
    let mut watcher = Watcher::open(master).await;
    let mut noise = Vec::with_capacity(1 << 20);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while noise.len() < 1 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        noise.extend_from_slice(&x.to_le_bytes());
    }
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut preface_then_noise = preface.to_vec();
    preface_then_noise.extend_from_slice(&noise[..4096]);
    let mut bad_frame = preface.to_vec();
    // A SETTINGS frame of length 0xffffff with a stream id: a protocol error.
    bad_frame.extend_from_slice(&[0xff, 0xff, 0xff, 0x04, 0x00, 0x00, 0x00, 0x00, 0x01]);
    let cases: [(&str, &[u8]); 6] = [
        ("1 MiB of random bytes", &noise),
        ("an HTTP/1.1 request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        (
            "a TLS ClientHello",
            &[
                0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
            ],
        ),
        ("the preface, then noise", &preface_then_noise),
        ("the preface, then a bad frame", &bad_frame),
        ("zero bytes", &[0u8; 4096]),
    ];
    for (case, bytes) in cases {
        garbage(master, case, bytes).await;
        watcher.assert_unchanged(master, case).await;
    }
    // Many at once.
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..50 {
        let addr = master.addr;
        let bytes = noise[n * 1000..n * 1000 + 20_000].to_vec();
        tasks.spawn(async move {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let _ = tcp.write_all(&bytes).await;
            let mut buf = vec![0u8; 4096];
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
    }
    within(60, "50 garbage connections closed", async {
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
    })
    .await;
    watcher
        .assert_unchanged(master, "50 garbage connections")
        .await;
}

/// One HTTP/2 frame: 9-byte header (length, type, flags, stream id), then `payload`.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame.extend(payload);
    frame
}

/// The HEADERS of a `StreamLedger` call (HPACK, static-table names, no Huffman), without
/// END_STREAM: the call stays open, waiting for its request.
fn stream_ledger_headers() -> Vec<u8> {
    let literal = |name_index: u8, value: &str| {
        let mut field = vec![name_index, value.len() as u8];
        field.extend(value.as_bytes());
        field
    };
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
    block.extend(literal(0x04, "/ledger.v1.LedgerService/StreamLedger")); // :path
    block.extend([0x0f, 0x10, 16]); // content-type (static index 31)
    block.extend(b"application/grpc");
    block.extend([0x00, 2]);
    block.extend(b"te");
    block.push(8);
    block.extend(b"trailers");
    block
}

/// The "MadeYouReset" attack (CVE-2025-8671): a client makes the server reset streams, here
/// with a WINDOW_UPDATE that overflows each stream's window (a stream error the server answers
/// with RST_STREAM). Past
/// `--max-local-reset-streams` the master ends the connection with GOAWAY; below it, it does
/// not. The SETTINGS it sends advertise `--max-concurrent-streams` (issue 15, point 4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provoked_resets_end_the_connection_and_streams_are_capped() {
    let fx = start(&[
        "--max-local-reset-streams",
        "20",
        "--max-concurrent-streams",
        "100",
    ]);
    let provoke = |resets: u32| {
        let addr = fx.master.addr;
        async move {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut out = ledger_anylog::wire::HTTP2_PREFACE.to_vec();
            out.extend(h2_frame(0x4, 0, 0, &[])); // SETTINGS
            for n in 0..resets {
                let stream = 1 + 2 * n;
                out.extend(h2_frame(0x1, 0x4, stream, &stream_ledger_headers()));
                // A window beyond 2^31 - 1: a stream error the server answers with RST_STREAM.
                out.extend(h2_frame(0x8, 0, stream, &[0x7f, 0xff, 0xff, 0xff]));
            }
            tcp.write_all(&out).await.unwrap();
            // Read the server's frames until GOAWAY, the end of the connection, or 3 s.
            let (mut goaway, mut rst, mut max_streams) = (false, 0, None);
            let mut buffer = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(3);
            let mut chunk = [0u8; 16384];
            while !goaway {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, tcp.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => buffer.extend(&chunk[..n]),
                    _ => break,
                }
                while buffer.len() >= 9 {
                    let len = u32::from_be_bytes([0, buffer[0], buffer[1], buffer[2]]) as usize;
                    if buffer.len() < 9 + len {
                        break;
                    }
                    let (kind, payload) = (buffer[3], buffer[9..9 + len].to_vec());
                    match kind {
                        0x3 => rst += 1,
                        0x7 => goaway = true,
                        0x4 => {
                            for setting in payload.chunks(6) {
                                if setting[..2] == [0, 3] {
                                    max_streams =
                                        Some(u32::from_be_bytes(setting[2..6].try_into().unwrap()));
                                }
                            }
                        }
                        _ => {}
                    }
                    buffer.drain(..9 + len);
                }
            }
            (goaway, rst, max_streams)
        }
    };
    let (goaway, rst, max_streams) = provoke(10).await;
    assert_eq!(max_streams, Some(100));
    assert!(!goaway, "10 resets ended the connection");
    assert_eq!(rst, 10, "the server reset each provoked stream");
    let (goaway, _, _) = provoke(60).await;
    assert!(
        goaway,
        "60 provoked resets on one connection drew no GOAWAY"
    );
    // The master goes on serving.
    let mut client = fx.master.client().await;
    insert(&mut client, &operator(1)).await.unwrap();
}

/// `grpc.health.v1` `Watch` streams count against `--max-streams` like `StreamLedger` ones: a
/// client cannot hold thousands of them open (issue 15, point 4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_watch_streams_count_against_the_stream_limit() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let fx = start(&["--max-streams", "5", "--max-streams-per-client", "5"]);
    let channel = tonic::transport::Endpoint::from_shared(fx.master.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let watch = |mut health: HealthClient<tonic::transport::Channel>| async move {
        within(
            30,
            "Health/Watch",
            health.watch(HealthCheckRequest {
                service: String::new(),
            }),
        )
        .await
    };
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut stream = watch(health.clone()).await.unwrap().into_inner();
        // Each answers with the current status first.
        within(30, "the first status", stream.message())
            .await
            .unwrap();
        held.push(stream);
    }
    let refused = watch(health.clone()).await.unwrap_err();
    assert_refused(
        &refused,
        Reason::TooManyStreams,
        &[(key::SCOPE, "server"), (key::LIMIT, "5")],
    );
    // A ledger stream has no place either; a check (unary) is served.
    let mut client = fx.master.client().await;
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
        &[(key::SCOPE, "server"), (key::LIMIT, "5")],
    );
    within(
        30,
        "Health/Check",
        health.check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .unwrap();
    // A closed watch frees its place.
    drop(held.pop());
    let mut freed = false;
    for _ in 0..100 {
        if watch(health.clone()).await.is_ok() {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(freed, "a closed Watch did not free its place");
}

/// `ListPolicies` conditions are capped in number and length, so 200,000 of them are refused
/// at once instead of burning the runtime; and one call reads at most 10,000 rows, answering
/// with a token to go on, so even allowed conditions cannot make one call unbounded (issue 15,
/// point 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_conditions_are_capped_and_one_call_reads_a_bounded_number_of_rows() {
    use ledger_proto::pb::Condition;
    let fx = start(&[]);
    let mut client = fx.master.client().await;
    let condition = |key: &str, value: &str| Condition {
        key: key.to_string(),
        value: value.to_string(),
    };
    let list = |conditions: Vec<Condition>, page_token: String| ListPoliciesRequest {
        r#type: String::new(),
        conditions,
        page_size: 0,
        page_token,
    };
    let many = vec![condition("company", "Acme"); 200_000];
    let refused = within(
        30,
        "ListPolicies",
        client.list_policies(list(many, String::new())),
    )
    .await
    .unwrap_err();
    assert_refused(
        &refused,
        Reason::TooManyConditions,
        &[(key::COUNT, "200000"), (key::LIMIT, "64")],
    );
    let refused = within(
        30,
        "ListPolicies",
        client.list_policies(list(vec![condition(&"k".repeat(1025), "v")], String::new())),
    )
    .await
    .unwrap_err();
    assert_refused(
        &refused,
        Reason::ConditionTooLong,
        &[(key::LIMIT_BYTES, "1024")],
    );
    within(
        30,
        "ListPolicies",
        client.list_policies(list(vec![condition("company", "Acme"); 64], String::new())),
    )
    .await
    .unwrap();

    // 10,050 policies, one of them at the end matching: the first call stops at 10,000 rows
    // with nothing found and a token; the next finds it.
    let mut writers = Vec::new();
    for w in 0..16 {
        let mut client = client.clone();
        writers.push(tokio::spawn(async move {
            for n in (w..10_049).step_by(16) {
                insert(&mut client, &operator(n)).await.unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    insert(
        &mut client,
        r#"{"operator": {"name": "last", "company": "Needle"}}"#,
    )
    .await
    .unwrap();
    let needle = || vec![condition("company", "Needle")];
    let first = within(
        30,
        "ListPolicies",
        client.list_policies(list(needle(), String::new())),
    )
    .await
    .unwrap()
    .into_inner();
    assert!(first.policies.is_empty(), "{} found", first.policies.len());
    assert!(
        !first.next_page_token.is_empty(),
        "the budget gave no token"
    );
    let second = within(
        30,
        "ListPolicies",
        client.list_policies(list(needle(), first.next_page_token)),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(second.policies.len(), 1);
    assert!(second.policies[0].json.contains("Needle"));
    assert!(second.next_page_token.is_empty());
}

/// Seeds `count` policies from 16 concurrent clients.
async fn seed_concurrently(master: &Master, count: usize) {
    let client = master.client().await;
    let mut set = tokio::task::JoinSet::new();
    for task in 0..16 {
        let mut client = client.clone();
        set.spawn(async move {
            for n in (task..count).step_by(16) {
                insert(&mut client, &operator(n)).await.unwrap();
            }
        });
    }
    while let Some(done) = set.join_next().await {
        done.unwrap();
    }
}

/// One connection from 127.0.0.2 (another client address: all of 127/8 is loopback) that
/// advertises a stream window of 0 and opens `streams` `StreamLedger(after_seq = 0)` calls: the
/// master can send their headers but no data, so each snapshot stalls at once. The connection
/// answers the master's SETTINGS and PINGs, as a live client does, for as long as it is held.
async fn stalled_snapshots(master: &Master, streams: u32) -> tokio::task::JoinHandle<()> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let tcp = socket.connect(master.addr).await.unwrap();
    let (mut read, mut write) = tcp.into_split();
    let mut out = ledger_anylog::wire::HTTP2_PREFACE.to_vec();
    out.extend(h2_frame(0x4, 0, 0, &[0, 4, 0, 0, 0, 0])); // SETTINGS_INITIAL_WINDOW_SIZE = 0
    let request = StreamLedgerRequest {
        after_seq: 0,
        subscriber: None,
    }
    .encode_to_vec();
    let mut body = vec![0u8];
    body.extend((request.len() as u32).to_be_bytes());
    body.extend(request);
    for n in 0..streams {
        let stream = 1 + 2 * n;
        out.extend(h2_frame(0x1, 0x4, stream, &stream_ledger_headers()));
        out.extend(h2_frame(0x0, 0x1, stream, &body));
    }
    write.write_all(&out).await.unwrap();
    tokio::spawn(async move {
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 16384];
        loop {
            match read.read(&mut chunk).await {
                Ok(n) if n > 0 => buffer.extend(&chunk[..n]),
                _ => return,
            }
            while buffer.len() >= 9 {
                let len = u32::from_be_bytes([0, buffer[0], buffer[1], buffer[2]]) as usize;
                if buffer.len() < 9 + len {
                    break;
                }
                let (kind, flags) = (buffer[3], buffer[4]);
                let answer = match kind {
                    0x4 if flags & 1 == 0 => Some(h2_frame(0x4, 1, 0, &[])),
                    0x6 if flags & 1 == 0 => Some(h2_frame(0x6, 1, 0, &buffer[9..9 + len])),
                    _ => None,
                };
                if let Some(answer) = answer
                    && write.write_all(&answer).await.is_err()
                {
                    return;
                }
                buffer.drain(..9 + len);
            }
        }
    })
}

/// Twenty snapshots whose client reads nothing, on a 20,000-policy ledger, do not take the
/// master down: each held a pooled connection and a thread, the health check waited behind
/// them, and the master went NOT_SERVING, ending every stream (issue 15, point 1). Now
/// snapshots take turns (at most 2 per client), the health check has a connection of its own,
/// and a snapshot whose client reads nothing is ended after `--snapshot-stall-timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_snapshots_do_not_take_the_master_down() {
    use tonic_health::pb::health_check_response::ServingStatus;
    const POLICIES: usize = 20_000;
    let fx = start(&["--snapshot-stall-timeout", "3s"]);
    let master = &fx.master;
    within(
        120,
        "seeding 20,000 policies",
        seed_concurrently(master, POLICIES),
    )
    .await;
    let mut watcher = Watcher::open(master).await;
    let attack = stalled_snapshots(master, 20).await;
    // Before the fix the master was NOT_SERVING about 1 s after the attack began.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut client = master.client().await;
    for round in 0..4 {
        let started = Instant::now();
        let policy = insert(&mut client, &operator(POLICIES + round))
            .await
            .unwrap();
        let change = within(5, "the watcher's change", next_change(&mut watcher.stream)).await;
        let elapsed = started.elapsed();
        assert_eq!(change.seq, policy.seq);
        assert!(
            elapsed < Duration::from_secs(1),
            "round {round}: the insert reached a subscriber after {elapsed:?}"
        );
        for service in ["", "ledger.v1.LedgerService"] {
            let status = master.health(service).await;
            assert_eq!(status, ServingStatus::Serving, "round {round}, {service:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // A client at another address gets a whole snapshot meanwhile.
    let mut fresh_client = master.client().await;
    let mut fresh = stream(&mut fresh_client, 0).await;
    let (snapshot, _) = within(
        30,
        "a snapshot beside the stalled ones",
        until_caught_up(&mut fresh),
    )
    .await;
    let policies = snapshot
        .iter()
        .filter(|e| matches!(e.event, Some(Event::Inserted(_))))
        .count();
    assert_eq!(policies, POLICIES + 4);
    // Past the stall timeout, the stalled readers are ended and their connections freed.
    within(30, "the stalled snapshots to be ended", async {
        while !master
            .logs()
            .contains("ended a snapshot whose client read nothing")
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    attack.abort();
}

/// Reflection's `ServerReflectionInfo` calls are streams: they count against the stream limits
/// like `StreamLedger` and `Health/Watch` ones, and free their place when they end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_streams_count_against_the_stream_limit() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    let fx = start(&["--max-streams", "3", "--max-streams-per-client", "3"]);
    let channel = tonic::transport::Endpoint::from_shared(fx.master.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let reflection = ServerReflectionClient::new(channel);
    // Each call's requests stay open (a channel never closed), so the stream stays open.
    let open = |mut reflection: ServerReflectionClient<tonic::transport::Channel>| async move {
        let (requests, receiver) = tokio::sync::mpsc::channel(1);
        requests
            .send(ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            })
            .await
            .unwrap();
        let answer = within(
            30,
            "ServerReflectionInfo",
            reflection
                .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(receiver)),
        )
        .await;
        (answer, requests)
    };
    let mut held = Vec::new();
    for _ in 0..3 {
        let (answer, requests) = open(reflection.clone()).await;
        let mut answers = answer.unwrap().into_inner();
        within(30, "the list of services", answers.message())
            .await
            .unwrap()
            .expect("an answer");
        held.push((answers, requests));
    }
    let (refused, _) = open(reflection.clone()).await;
    let refused = refused.unwrap_err();
    assert_refused(
        &refused,
        Reason::TooManyStreams,
        &[(key::SCOPE, "server"), (key::LIMIT, "3")],
    );
    let mut client = fx.master.client().await;
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
        &[(key::SCOPE, "server"), (key::LIMIT, "3")],
    );
    // An ended call frees its place.
    drop(held.pop());
    let mut freed = false;
    for _ in 0..100 {
        if open(reflection.clone()).await.0.is_ok() {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(freed, "an ended reflection call did not free its place");
}
