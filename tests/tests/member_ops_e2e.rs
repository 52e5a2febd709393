//! The member as operators run it, against the real `master` and `member` binaries over
//! loopback: TLS, mTLS and bearer tokens on the client side (daemon and commands), Prometheus
//! metrics, JSON logs, the TOML config file, and `member get --format table`. Certificates are
//! made at test time (`ledger_testkit::tls`).

use std::path::Path;

use ledger_proto::pb::GetLedgerInfoRequest;
use ledger_proto::pb::ledger_service_client::LedgerServiceClient;
use ledger_testkit::auth::AuthFile;
use ledger_testkit::member::{CommandOutput, member_command};
use ledger_testkit::metrics::{sample, scrape_async};
use ledger_testkit::tls::{CertFiles, TestPki};
use ledger_testkit::{Master, Member, wait_until, within};
use tonic::transport::Channel;

const READER: &str = "reader-token-31b7";
const WRITER: &str = "writer-token-c04d";
const ADMIN: &str = "admin-token-e98a";

/// Tokens of each role, and certificate subjects: `member-reader` reads, `relay-writer` (a
/// relay forwarding writes with its certificate) writes, `ops-admin` administers.
fn auth_file(dir: &Path) -> String {
    AuthFile::new()
        .token("dashboard", "reader", READER)
        .token("ingest", "writer", WRITER)
        .token("operator", "admin", ADMIN)
        .subject("member-reader", "reader")
        .subject("relay-writer", "writer")
        .subject("ops-admin", "admin")
        .write(&dir.join("auth.toml"))
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// A master speaking only TLS, verifying client certificates when given (tokens otherwise),
/// with roles from the auth file.
fn tls_master(dir: &Path, pki: &TestPki) -> Master {
    let server = pki.server();
    Master::start(
        dir,
        &[
            "--tls-cert",
            &path(&server.cert),
            "--tls-key",
            &path(&server.key),
            "--tls-client-ca",
            &path(&pki.ca),
            "--tls-client-optional",
            "--auth-file",
            &auth_file(dir),
        ],
    )
}

/// The test's own view of a TLS server at `addr`, as the admin certificate.
async fn admin_client(
    addr: &str,
    pki: &TestPki,
    admin: &CertFiles,
) -> LedgerServiceClient<Channel> {
    LedgerServiceClient::new(ledger_testkit::tls::channel(addr, &pki.ca, Some(admin)).await)
}

async fn digest(client: &mut LedgerServiceClient<Channel>) -> (u64, String) {
    let info = within(
        30,
        "GetLedgerInfo",
        client.get_ledger_info(GetLedgerInfoRequest {}),
    )
    .await
    .unwrap()
    .into_inner();
    (info.head_seq, info.digest)
}

/// Waits until the member's file is the ledger the server at `client` holds now.
async fn converges(member: &Member, client: &mut LedgerServiceClient<Channel>) {
    let (_, wanted) = digest(client).await;
    wait_until(
        60,
        "the member's file to equal the master's digest",
        || async { member.file_md5().as_deref() == Some(wanted.as_str()) },
    )
    .await;
}

fn operator(n: usize) -> String {
    format!(
        r#"{{"operator": {{"name": "op{n}", "company": "Acme", "ip": "10.0.0.{n}", "port": {}}}}}"#,
        32148 + n
    )
}

fn assert_fails(output: &CommandOutput, code: i32, needle: &str) {
    assert_eq!(output.code, Some(code), "{output:?}");
    assert!(
        output.stderr.to_lowercase().contains(needle),
        "stderr should say {needle:?}: {output:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_a_reader_member_converges_and_commands_obey_roles() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let master = tls_master(dir.path(), &pki);
    let addr = master.addr.to_string();
    let ca = path(&pki.ca);
    let admin = pki.client("ops-admin");
    let reader = pki.client("member-reader");
    let mut view = admin_client(&addr, &pki, &admin).await;

    // A writer token inserts; the answer is the completed policy.
    for n in 1..=3 {
        let out = member_command(
            &[
                "insert",
                "--master",
                &addr,
                "--tls-ca",
                &ca,
                "--token",
                WRITER,
                "--policy",
                &operator(n),
            ],
            None,
        )
        .await;
        assert_eq!(out.code, Some(0), "{out:?}");
        assert!(out.stdout.contains(r#""ledger": "global""#), "{out:?}");
    }

    // The daemon over mTLS with a reader certificate (and the reader token, never logged).
    let member_dir = tempfile::tempdir().unwrap();
    let member = Member::start(
        member_dir.path(),
        std::slice::from_ref(&addr),
        &[
            "--tls-ca",
            &ca,
            "--tls-cert",
            &path(&reader.cert),
            "--tls-key",
            &path(&reader.key),
            "--token",
            READER,
            "--retry-min",
            "50ms",
        ],
    );
    converges(&member, &mut view).await;

    // A reader may not write; no token and a wrong one are unauthenticated; nothing changes.
    let insert_as = |token: Option<&'static str>| {
        let addr = addr.clone();
        let ca = ca.clone();
        async move {
            let mut args = vec![
                "insert".to_string(),
                "--master".into(),
                addr,
                "--tls-ca".into(),
                ca,
                "--policy".into(),
                operator(9),
            ];
            if let Some(token) = token {
                args.extend(["--token".into(), token.into()]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            member_command(&args, None).await
        }
    };
    assert_fails(&insert_as(Some(READER)).await, 1, "permission denied");
    assert_fails(&insert_as(None).await, 1, "unauthenticated");
    assert_fails(&insert_as(Some("not-a-token")).await, 1, "unauthenticated");
    assert_eq!(digest(&mut view).await.0, 3, "refused writes wrote nothing");

    // Deleting needs the admin role.
    let id = member_command(
        &[
            "get",
            "operator",
            "--where",
            "name=op2",
            "--ledger-file",
            &path(&member.file),
        ],
        None,
    )
    .await;
    let policies: serde_json::Value = serde_json::from_str(&id.stdout).unwrap();
    let id = policies[0]["operator"]["id"].as_str().unwrap().to_string();
    let delete_as = |token: &'static str| {
        let (addr, ca, id) = (addr.clone(), ca.clone(), id.clone());
        async move {
            member_command(
                &[
                    "delete", "--master", &addr, "--tls-ca", &ca, "--token", token, "--id", &id,
                ],
                None,
            )
            .await
        }
    };
    assert_fails(&delete_as(WRITER).await, 1, "permission denied");
    let out = delete_as(ADMIN).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    converges(&member, &mut view).await;

    // `status` over mTLS with the reader certificate: in sync.
    let out = member_command(
        &[
            "status",
            "--master",
            &addr,
            "--ledger-file",
            &path(&member.file),
            "--tls-ca",
            &ca,
            "--tls-cert",
            &path(&reader.cert),
            "--tls-key",
            &path(&reader.key),
        ],
        None,
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let status: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(status["in_sync"], true, "{status}");

    // The name checked is the address's host unless --tls-domain overrides it.
    let out = member_command(
        &[
            "status",
            "--master",
            &addr,
            "--tls-ca",
            &ca,
            "--tls-domain",
            "not-the-server.example",
            "--token",
            READER,
        ],
        None,
    )
    .await;
    assert_fails(&out, 3, "cannot reach a master");
    let out = member_command(
        &[
            "status",
            "--master",
            &addr,
            "--tls-ca",
            &ca,
            "--tls-domain",
            "localhost",
            "--token",
            READER,
            "--ledger-file",
            &path(&member.file),
        ],
        None,
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");

    assert!(
        !member.logs().contains(READER),
        "the token must never be logged:\n{}",
        member.logs()
    );
    assert!(!master.logs().contains(WRITER) && !master.logs().contains(READER));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_ca_a_member_cannot_connect_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let master = tls_master(dir.path(), &pki);
    let addr = master.addr.to_string();

    // Plaintext to a TLS port.
    let out = member_command(&["status", "--master", &addr, "--token", READER], None).await;
    assert_fails(&out, 3, "cannot reach a master");
    assert!(out.stderr.contains("give --tls-ca"), "{out:?}");

    // TLS, but trusting another CA: the master's certificate is not accepted.
    let other_dir = tempfile::tempdir().unwrap();
    let other = TestPki::new(other_dir.path());
    let out = member_command(
        &[
            "status",
            "--master",
            &addr,
            "--tls-ca",
            &path(&other.ca),
            "--token",
            READER,
        ],
        None,
    )
    .await;
    assert_fails(&out, 3, "cannot reach a master");
    assert!(
        out.stderr.to_lowercase().contains("certificate"),
        "the reason names the certificate: {out:?}"
    );

    // https:// without a CA is a usage error before any connection.
    let out = member_command(&["status", "--master", &format!("https://{addr}")], None).await;
    assert_fails(&out, 3, "--tls-ca");

    // The daemon keeps retrying and says it cannot reach the master.
    let member_dir = tempfile::tempdir().unwrap();
    let member = Member::start(
        member_dir.path(),
        std::slice::from_ref(&addr),
        &["--tls-ca", &path(&other.ca), "--retry-min", "50ms"],
    );
    member.wait_for_log(30, "cannot reach master").await;
    assert!(member.file_md5().is_none(), "nothing was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_stream_the_file_and_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let mut master = Master::start(dir.path(), &["--progress-interval", "200ms"]);
    let mut client = master.client().await;
    for n in 1..=3 {
        ledger_testkit::client::insert(&mut client, &operator(n))
            .await
            .unwrap();
    }
    let member_dir = tempfile::tempdir().unwrap();
    // Port 0: the kernel picks a free port, which the member logs.
    let member = Member::start(
        member_dir.path(),
        &[master.addr.to_string()],
        &[
            "--metrics-addr",
            "127.0.0.1:0",
            "--retry-min",
            "50ms",
            "--retry-max",
            "200ms",
        ],
    );
    member.wait_for_log(60, "caught up").await;
    let port = member.metrics_port().await;
    let expect = |scraped: &str, series: &str, value: f64| {
        assert_eq!(
            sample(scraped, series),
            Some(value),
            "{series} in:\n{scraped}"
        );
    };
    let scraped = scrape_async(port).await;
    expect(&scraped, "ledger_member_applied_seq", 3.0);
    expect(&scraped, "ledger_member_head_seq", 3.0);
    expect(&scraped, "ledger_member_lag", 0.0);
    expect(&scraped, "ledger_member_connected", 1.0);
    let writes = sample(&scraped, "ledger_member_file_write_duration_seconds_count")
        .expect("the file write histogram");
    assert!(writes >= 1.0, "{scraped}");

    // A live insert moves the applied seq and is one more timed write.
    ledger_testkit::client::insert(&mut client, &operator(4))
        .await
        .unwrap();
    wait_until(30, "applied seq 4 in the metrics", || async {
        sample(&scrape_async(port).await, "ledger_member_applied_seq") == Some(4.0)
    })
    .await;
    let scraped = scrape_async(port).await;
    assert!(
        sample(&scraped, "ledger_member_file_write_duration_seconds_count").unwrap() > writes,
        "{scraped}"
    );

    // The master goes away: disconnected; it comes back: one reconnect.
    master.kill9();
    wait_until(30, "connected 0 in the metrics", || async {
        sample(&scrape_async(port).await, "ledger_member_connected") == Some(0.0)
    })
    .await;
    master.restart();
    wait_until(60, "a reconnect in the metrics", || async {
        let scraped = scrape_async(port).await;
        sample(&scraped, "ledger_member_connected") == Some(1.0)
            && sample(&scraped, "ledger_member_reconnects_total") == Some(1.0)
    })
    .await;

    // `get --format table`: a header and aligned columns, read from the member's file.
    let out = member_command(
        &[
            "get",
            "operator",
            "--format",
            "table",
            "--ledger-file",
            &path(&member.file),
        ],
        None,
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{}", out.stdout);
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(header, ["type", "id", "name", "company", "ip", "port"]);
    let column = lines[0].find("name").unwrap();
    for (n, line) in lines[1..].iter().enumerate() {
        assert!(
            line[column..].starts_with(&format!("op{} ", n + 1)),
            "aligned:\n{}",
            out.stdout
        );
        assert!(line.starts_with("operator "), "{line}");
        assert!(line.ends_with(&(32149 + n).to_string()), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_and_a_config_file_that_flags_and_environment_override() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), &[]);
    let mut client = master.client().await;
    ledger_testkit::client::insert(&mut client, &operator(1))
        .await
        .unwrap();

    // The file asks for JSON logs, metrics and an error-only filter; the harness sets
    // LEDGER_LOG=info in the environment, which wins, and --retry-min on the command line wins
    // over the file's value (a bad duration there would stop the member).
    let config = dir.path().join("member.toml");
    std::fs::write(
        &config,
        "log-format = \"json\"\nlog-level = \"error\"\nmetrics-addr = \"127.0.0.1:0\"\n\
         retry-min = \"not a duration\"\n",
    )
    .unwrap();
    let member_dir = tempfile::tempdir().unwrap();
    let member = Member::start(
        member_dir.path(),
        &[master.addr.to_string()],
        &["--config", &path(&config), "--retry-min", "50ms"],
    );
    member.wait_for_log(60, "caught up").await;
    let logs = member.logs();
    for line in logs.lines().filter(|line| !line.trim().is_empty()) {
        let entry: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            entry["level"].is_string() && entry["fields"]["message"].is_string(),
            "{line}"
        );
    }
    assert!(
        logs.lines()
            .any(|line| line.contains("\"INFO\"") && line.contains("caught up")),
        "LEDGER_LOG=info won over the file's error level:\n{logs}"
    );
    // The JSON line carries the address too; port 0 in the file, so it is read from there.
    let port = member.metrics_port().await;
    assert_eq!(
        sample(&scrape_async(port).await, "ledger_member_applied_seq"),
        Some(1.0),
        "the file's metrics-addr is used"
    );

    // An unknown setting, or an unreadable file, stops the member with the reason.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "no-such-flag = 1\n").unwrap();
    let out = member_command(&["get", "--config", &path(&bad)], None).await;
    assert_fails(&out, 2, "unknown setting");
    let out = member_command(
        &["get", "--config", &path(&dir.path().join("missing.toml"))],
        None,
    )
    .await;
    assert_fails(&out, 2, "cannot read the config file");
}

/// A policy whose name carries terminal sequences (clear the screen, move the cursor) and line
/// breaks cannot forge rows on the operator's terminal: `member get --format table` shows them
/// escaped (issue 15, point 9).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_shows_hostile_names_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blockchain.json");
    std::fs::write(
        &file,
        "{\"operator\": {\"name\": \"x\\u001b[2J\\u001b[1;1Hoperator  forged\\nop2\", \"id\": \"a1\"}}\n",
    )
    .unwrap();
    let out = member_command(
        &["get", "--format", "table", "--ledger-file", &path(&file)],
        None,
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        !out.stdout.chars().any(|c| c.is_control() && c != '\n'),
        "{:?}",
        out.stdout
    );
    assert_eq!(out.stdout.lines().count(), 2, "{}", out.stdout);
    assert!(
        out.stdout
            .contains(r"x\u{1b}[2J\u{1b}[1;1Hoperator  forged\nop2"),
        "{}",
        out.stdout
    );
}
