//! Faults: several masters on a PostgreSQL server that takes only TLS connections.
//!
//! Each master `LISTEN`s on a connection of its own for the other masters' commits; that
//! connection must take TLS exactly as libpq (diesel's connections) does, or it never connects
//! and the other masters' commits stop arriving. And when it cannot listen at all, the fallback
//! read must still deliver every commit within `--notify-fallback`.
//!
//! Every master here is the real binary; the server is a real PostgreSQL started by the harness
//! (`PostgresServer::tls_only`: `hostssl` lines only, plaintext rejected, a test CA).

use std::time::{Duration, Instant};

use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use ledger_proto::pb::stream_ledger_response::Event;
use ledger_server::follower::connect::{LISTEN_APPLICATION_NAME, ListenTarget};
use ledger_testkit::client::{Client, insert_ok, next, stream, until_caught_up};
use ledger_testkit::metrics::{sample, scrape_async};
use ledger_testkit::postgres::{CERT_USER, TlsPostgres};
use ledger_testkit::{Master, PostgresServer, wait_until, within};
use tokio::time::timeout;
use tonic::Streaming;

/// The database name at the end of a URL.
fn database_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap()
}

/// Whether a connection made as libpq makes it (diesel) succeeds, and then whether it uses TLS.
async fn libpq(url: &str) -> Result<bool, String> {
    #[derive(QueryableByName)]
    struct Ssl {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        ssl: bool,
    }
    let url = url.to_string();
    tokio::task::spawn_blocking(move || {
        let mut connection = PgConnection::establish(&url).map_err(|e| e.to_string())?;
        diesel::sql_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .get_result::<Ssl>(&mut connection)
            .map(|row| row.ssl)
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap()
}

/// The same for the master's listening connection.
async fn listener(url: &str) -> Result<bool, String> {
    let timeouts = url
        .parse::<ledger_storage::DatabaseUrl>()?
        .pg_timeouts()
        .ok_or("not a PostgreSQL URL")?;
    let target = ListenTarget::parse(url, timeouts).map_err(|e| e.to_string())?;
    let listening = within(30, "the listening connection", target.connect())
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(listening.connection);
    let ssl = listening
        .client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map(|row| row.get::<_, bool>(0))
        .map_err(|e| e.to_string());
    drop(listening.client);
    driver.abort();
    ssl
}

/// Every way a URL can ask for TLS gives the listening connection the outcome libpq gives
/// diesel: connects or not, and with TLS or not. Each case also states the outcome it must
/// have, so that both being wrong the same way fails too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listening_connection_takes_tls_as_libpq_does() {
    let pg = PostgresServer::tls_only();
    let db = pg.server.create_database();
    let name = database_name(&db);
    let (port, password) = (pg.port, pg.password());
    let ca = pg.ca.display();
    let other = pg.other_ca.display();
    let at = |host: &str, query: &str| {
        format!("postgres://ledger:{password}@{host}:{port}/{name}?{query}")
    };
    let local = |query: &str| at("127.0.0.1", query);
    let dir = tempfile::tempdir().unwrap();
    let open_key = dir.path().join("open.key");
    std::fs::copy(&pg.client.key, &open_key).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&open_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cert_user = |query: &str| {
        format!(
            "postgres://{CERT_USER}@127.0.0.1:{port}/{name}?sslmode=verify-full&sslrootcert={ca}&{query}"
        )
    };
    let (cert, key) = (pg.client.cert.display(), pg.client.key.display());
    let missing = dir.path().join("missing.pem");
    let missing = missing.display();
    // (URL, Some(TLS) if it must connect, None if it must not)
    let cases: Vec<(String, Option<bool>)> = vec![
        // The server rejects plaintext.
        (local("sslmode=disable"), None),
        // Plaintext refused, then TLS.
        (local("sslmode=allow"), Some(true)),
        (local("sslmode=prefer"), Some(true)),
        // libpq's default is prefer.
        (local(""), Some(true)),
        (local("sslmode=require"), Some(true)),
        // A root certificate makes require check the chain (verify-ca).
        (local(&format!("sslmode=require&sslrootcert={other}")), None),
        (
            local(&format!("sslmode=require&sslrootcert={ca}")),
            Some(true),
        ),
        // And so for prefer, which then falls back to plaintext, rejected.
        (local(&format!("sslmode=prefer&sslrootcert={other}")), None),
        (
            local(&format!("sslmode=verify-ca&sslrootcert={ca}")),
            Some(true),
        ),
        (
            local(&format!("sslmode=verify-ca&sslrootcert={other}")),
            None,
        ),
        (
            local(&format!("sslmode=verify-ca&sslrootcert={missing}")),
            None,
        ),
        (
            local(&format!("sslmode=verify-full&sslrootcert={ca}")),
            Some(true),
        ),
        (
            local(&format!("sslmode=verify-full&sslrootcert={other}")),
            None,
        ),
        (
            at(
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            Some(true),
        ),
        // The certificate does not name the host: only verify-full minds.
        (
            at(
                "wrong.example",
                &format!("hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={ca}"),
            ),
            None,
        ),
        (
            at(
                "wrong.example",
                &format!("hostaddr=127.0.0.1&sslmode=verify-ca&sslrootcert={ca}"),
            ),
            Some(true),
        ),
        // Several hosts, the first one down; the session attributes asked for.
        (
            format!(
                "postgres://ledger:{password}@127.0.0.1:1,127.0.0.1:{port}/{name}?\
                 sslmode=verify-full&sslrootcert={ca}&target_session_attrs=read-write"
            ),
            Some(true),
        ),
        // SCRAM with channel binding, which only TLS has.
        (local("sslmode=require&channel_binding=require"), Some(true)),
        (local("sslmode=disable&channel_binding=require"), None),
        (
            local(&format!(
                "sslmode=verify-full&sslrootcert={ca}&ssl_min_protocol_version=TLSv1.3"
            )),
            Some(true),
        ),
        // A client certificate instead of a password.
        (
            cert_user(&format!("sslcert={cert}&sslkey={key}")),
            Some(true),
        ),
        (cert_user(""), None),
        (
            cert_user(&format!("sslcert={cert}&sslkey={}", open_key.display())),
            None,
        ),
    ];
    let mut failures = Vec::new();
    for (url, expected) in &cases {
        let libpq = libpq(url).await;
        let ours = listener(url).await;
        let shown = url.replace(password, "***");
        let outcome = |r: &Result<bool, String>| r.as_ref().ok().copied();
        if outcome(&libpq) != *expected || outcome(&ours) != *expected {
            failures.push(format!(
                "{shown}\n  expected {expected:?}\n  libpq    {libpq:?}\n  listener {ours:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "the listening connection and libpq differ, or are not what the case says:\n{}",
        failures.join("\n")
    );
}

/// Two masters on one database; B's metrics endpoint is read for its listening state.
struct TwoMasters {
    a: Master,
    b: Master,
    b_metrics: u16,
    _dirs: [tempfile::TempDir; 2],
}

fn two_masters(url: &str, fallback: &str) -> TwoMasters {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let args = [
        "--database-url",
        url,
        "--notify-fallback",
        fallback,
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    let a = Master::start(dirs[0].path(), &args);
    let b = Master::start(dirs[1].path(), &args);
    let b_metrics = b.metrics_port();
    TwoMasters {
        a,
        b,
        b_metrics,
        _dirs: dirs,
    }
}

/// A sample of B's metrics (0 when absent).
async fn b_sample(masters: &TwoMasters, series: &str) -> f64 {
    sample(&scrape_async(masters.b_metrics).await, series).unwrap_or(0.0)
}

async fn wait_listening(masters: &TwoMasters, listening: bool) {
    let want = if listening { 1.0 } else { 0.0 };
    wait_until(
        30,
        &format!("B's ledger_follower_listening to be {want}"),
        || async { b_sample(masters, "ledger_follower_listening").await == want },
    )
    .await;
    // Health says the same, as its own service; the master serves either way.
    use tonic_health::pb::health_check_response::ServingStatus;
    let listen = if listening {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    assert_eq!(
        masters.b.health("ledger.v1.LedgerService/listen").await,
        listen
    );
    assert_eq!(masters.b.health("").await, ServingStatus::Serving);
}

/// How `count` inserts acknowledged by A reached the stream of a subscriber of B.
struct Propagation {
    acknowledged: usize,
    lost: usize,
    /// From the insert sent to A to the change read on B's stream, for each change seen: B's
    /// subscriber often has it before A's client has the answer.
    delays: Vec<Duration>,
}

impl Propagation {
    fn p50(&self) -> Duration {
        let mut sorted = self.delays.clone();
        sorted.sort();
        sorted.get(sorted.len() / 2).copied().unwrap_or_default()
    }

    fn max(&self) -> Duration {
        self.delays.iter().copied().max().unwrap_or_default()
    }

    fn figures(&self, case: &str) {
        println!(
            "faults: pg-tls two masters, {case}: {} acknowledged, {} lost, propagation p50 {:.1} \
             ms, max {:.1} ms",
            self.acknowledged,
            self.lost,
            self.p50().as_secs_f64() * 1e3,
            self.max().as_secs_f64() * 1e3
        );
    }
}

/// Inserts `count` policies through A, one at a time, each after a random pause of less than
/// `jitter` (so that inserts do not fall in step with a periodic read), and waits up to `limit`
/// for each to reach `b_stream` (a caught-up subscription of B); one that does not is lost.
async fn propagate(
    a: &mut Client,
    b_stream: &mut Streaming<ledger_proto::pb::StreamLedgerResponse>,
    case: &str,
    count: usize,
    limit: Duration,
    jitter: Duration,
) -> Propagation {
    let mut result = Propagation {
        acknowledged: 0,
        lost: 0,
        delays: Vec::new(),
    };
    for n in 0..count {
        if !jitter.is_zero() {
            tokio::time::sleep(jitter.mul_f64(fastrand::f64())).await;
        }
        let json = format!(r#"{{"config": {{"case": "{case}", "n": {n}}}}}"#);
        let sent = Instant::now();
        let id = insert_ok(a, &json).await.id;
        result.acknowledged += 1;
        let seen = timeout(limit, async {
            loop {
                let event = next(b_stream).await.expect("B's stream goes on");
                if matches!(&event.event, Some(Event::Inserted(p)) if p.id == id) {
                    return;
                }
            }
        })
        .await;
        match seen {
            Ok(()) => result.delays.push(sent.elapsed()),
            Err(_) => result.lost += 1,
        }
    }
    result
}

/// Two masters on the TLS-only server with `query` in their URL, the fallback read an hour
/// away: every insert through A reaches B's subscriber within 2 s, by notification only.
async fn two_masters_listen_over_tls(query: &str, case: &str) {
    let pg = PostgresServer::tls_only();
    let url = format!("{}?{query}", pg.server.create_database());
    let masters = two_masters(&url, "1h");
    wait_listening(&masters, true).await;
    assert!(
        masters
            .b
            .logs()
            .contains("listening for the other masters' commits tls=true"),
        "B listens, over TLS:\n{}",
        masters.b.logs()
    );
    let mut a = masters.a.client().await;
    let mut b = masters.b.client().await;
    let mut b_stream = stream(&mut b, 0).await;
    until_caught_up(&mut b_stream).await;
    let propagation = propagate(
        &mut a,
        &mut b_stream,
        case,
        50,
        Duration::from_secs(2),
        Duration::ZERO,
    )
    .await;
    propagation.figures(case);
    assert_eq!(propagation.lost, 0, "acknowledged by A, never seen on B");
    assert!(propagation.max() < Duration::from_secs(2));
    assert_eq!(
        b_sample(&masters, "ledger_follower_listen_failures_total").await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_masters_listen_to_each_other_with_sslmode_require() {
    two_masters_listen_over_tls("sslmode=require", "sslmode=require").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_masters_listen_to_each_other_with_sslmode_verify_full() {
    let ca = PostgresServer::tls_only().ca.display().to_string();
    two_masters_listen_over_tls(
        &format!("sslmode=verify-full&sslrootcert={ca}"),
        "sslmode=verify-full",
    )
    .await;
}

/// The listening connections are cut and the database takes no new connection (the pooled ones
/// go on serving): B cannot listen, says so once, and still gets every commit of A by the
/// fallback read, within the fallback's interval; it listens again once it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_that_cannot_listen_gets_every_commit_by_the_fallback_read() {
    let pg: &TlsPostgres = PostgresServer::tls_only();
    let db = pg.server.create_database();
    let name = database_name(&db).to_string();
    let fallback = Duration::from_secs(1);
    let masters = two_masters(&format!("{db}?sslmode=require"), "1s");
    wait_listening(&masters, true).await;
    let mut a = masters.a.client().await;
    let mut b = masters.b.client().await;
    let mut b_stream = stream(&mut b, 0).await;
    until_caught_up(&mut b_stream).await;
    // Both ways work first, and both masters' pools hold connections.
    let warm = propagate(
        &mut a,
        &mut b_stream,
        "warm",
        3,
        Duration::from_secs(2),
        Duration::ZERO,
    )
    .await;
    assert_eq!(warm.lost, 0);

    pg.server.admin(&format!(
        "ALTER DATABASE {name} ALLOW_CONNECTIONS false; \
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = '{name}' AND application_name = '{LISTEN_APPLICATION_NAME}'"
    ));
    wait_listening(&masters, false).await;
    // A reconnection was refused too: B is retrying, not merely between two connections.
    wait_until(30, "B to fail to reconnect", || async {
        b_sample(&masters, "ledger_follower_listen_failures_total").await >= 2.0
    })
    .await;
    let margin = Duration::from_secs(2);
    let propagation = propagate(
        &mut a,
        &mut b_stream,
        "no-listen",
        8,
        fallback + margin,
        fallback,
    )
    .await;
    propagation.figures("LISTEN refused, fallback 1 s");
    assert_eq!(propagation.lost, 0, "acknowledged by A, never seen on B");
    assert!(propagation.max() < fallback + margin);
    // Delivered by the fallback read: B never listened meanwhile.
    assert_eq!(b_sample(&masters, "ledger_follower_listening").await, 0.0);
    assert!(b_sample(&masters, "ledger_follower_listen_failures_total").await >= 3.0);
    // The loss is logged once, not each failed retry.
    let logs = masters.b.logs();
    assert_eq!(
        logs.matches("lost the connection that listens").count(),
        1,
        "{logs}"
    );
    assert_eq!(logs.matches("cannot listen for").count(), 0, "{logs}");

    pg.server
        .admin(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"));
    wait_listening(&masters, true).await;
    let logs = masters.b.logs();
    assert_eq!(logs.matches("listening again").count(), 1, "{logs}");
    let again = propagate(
        &mut a,
        &mut b_stream,
        "again",
        3,
        Duration::from_secs(2),
        Duration::ZERO,
    )
    .await;
    assert_eq!(again.lost, 0);
}
