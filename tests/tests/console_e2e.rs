//! The web console (issue 19) in a real browser: the real `master` binary serves it on
//! `--http-addr` over loopback, headless Chromium (Debian's, driven by playwright-core from
//! `tests/testkit/console.js`) loads it. What is checked is what the page shows: the counts of a
//! seeded ledger, the map's nodes and a policy's JSON, a new insert on the map and in the feed
//! within a second, the subscribers' lag, and the refusal without a token when auth is on.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ledger_testkit::auth::AuthFile;
use ledger_testkit::client::{delete_ok, insert_ok};
use ledger_testkit::console::{Browser, expected, http_get, network, seed};
use ledger_testkit::{Master, Member, wait_until};
use serde_json::Value;

fn http_addr(master: &Master) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], master.metrics_port()))
}

fn no_errors(browser: &mut Browser) {
    let errors = browser.errors();
    assert!(errors.is_empty(), "the page logged errors: {errors:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_counts_the_map_and_a_new_insert_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let mut master = Master::start(dir.path(), &["--http-addr", "127.0.0.1:0"]);
    let policies = network(60);
    seed(&master, &policies, 4).await;
    let (counts, nodes) = expected(&policies);
    let addr = http_addr(&master);
    // `/metrics` and `/health` are where they were.
    assert_eq!(http_get(addr, "/health", &[]).body, "OK");
    assert!(
        http_get(addr, "/metrics", &[])
            .body
            .contains("ledger_head_seq 60")
    );
    let info: Value = serde_json::from_str(&http_get(addr, "/api/info", &[]).body).unwrap();
    assert_eq!(info["head_seq"], 60);
    assert_eq!(info["health"]["database"], "up");

    let mut browser = Browser::start();
    let opened = browser.open(&format!("http://{addr}/"), 1600, 1000);
    assert_eq!(opened["status"], 200, "{opened}");
    no_errors(&mut browser);
    // The header and the counts as the page shows them.
    assert_eq!(
        browser.eval("document.getElementById('head-seq').textContent"),
        "60"
    );
    assert_eq!(
        browser.eval("document.getElementById('policy-count').textContent"),
        "60"
    );
    let (digest, _) = browser.wait(
        "document.getElementById('digest').textContent.length === 32 && document.getElementById('digest').textContent",
        Duration::from_secs(5),
    );
    assert_eq!(digest, info["digest"]);
    assert_eq!(
        browser.eval("document.getElementById('health-database').textContent"),
        "up"
    );
    assert_eq!(
        browser.eval("document.getElementById('health-writes').textContent"),
        "writing"
    );
    let shown: BTreeMap<String, u64> = serde_json::from_value(browser.eval(
        "Object.fromEntries([...document.querySelectorAll('#counts tr')].map(r => [r.dataset.type, Number(r.querySelector('.count').textContent)]))",
    ))
    .unwrap();
    assert_eq!(shown, counts);
    assert_eq!(browser.eval("window.__console.nodeCount()"), nodes);

    // Search by company, by ip and by name; a click on a node shows its policy.
    browser.fill("#search", "10.1.3.11");
    assert_eq!(browser.eval("window.__console.matches().length"), 1);
    browser.fill("#search", "Globex");
    // Globex's policies, and the `globex.readings_*` table of each Globex cluster (by name).
    let globex = policies.iter().filter(|p| p.contains("\"Globex\"")).count()
        + policies
            .iter()
            .filter(|p| p.starts_with(r#"{"cluster""#) && p.contains("\"Globex\""))
            .count();
    assert_eq!(browser.eval("window.__console.matches().length"), globex);
    browser.fill("#search", "operator-oslo-1-0");
    let key = browser.eval("window.__console.matches()[0]");
    let key = key.as_str().expect("a match");
    let panel = browser.click_node(key);
    assert!(
        panel.contains("\"operator-oslo-1-0\"") && panel.contains(key),
        "the policy panel shows {panel}"
    );

    // A new insert: on the map and in the feed within a second of the insert call.
    let mut client = master.client().await;
    let started = Instant::now();
    let inserted = insert_ok(
        &mut client,
        r#"{"operator": {"name": "operator-new", "company": "Newco", "ip": "10.9.9.9", "port": 32148}}"#,
    )
    .await;
    let (_, waited) = browser.wait(
        &format!(
            "window.__console.hasNode('{id}') && !!document.querySelector('#feed li[data-id=\"{id}\"]')",
            id = inserted.id
        ),
        Duration::from_secs(10),
    );
    let elapsed = started.elapsed();
    println!(
        "console: the insert was on the map and in the feed {} ms after the insert call ({waited} ms after its answer)",
        elapsed.as_millis()
    );
    assert!(elapsed < Duration::from_secs(1), "shown after {elapsed:?}");
    browser.wait(
        "document.getElementById('head-seq').textContent === '61'",
        Duration::from_secs(5),
    );
    // A delete leaves the map too.
    delete_ok(&mut client, &inserted.id).await;
    browser.wait(
        &format!("!window.__console.hasNode('{}')", inserted.id),
        Duration::from_secs(5),
    );
    no_errors(&mut browser);
    // SIGTERM with the page's event stream open: the stream ends, the master exits 0.
    let started = Instant::now();
    let status = master.terminate();
    assert!(status.success(), "{status}:\n{}", master.logs());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    browser.wait(
        "document.getElementById('feed-state').textContent !== 'live'",
        Duration::from_secs(5),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_reader_token_the_console_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let auth = AuthFile::new()
        .token("viewer", "reader", "r3ader-token")
        .token("ingest", "writer", "wr1ter-token")
        .write(&dir.path().join("auth.toml"));
    // The listener's address from the environment this time.
    let master = Master::start_with_env(
        dir.path(),
        &["--auth-file", &auth],
        &[("LEDGER_HTTP_ADDR", "127.0.0.1:0")],
    );
    let mut client = master.client().await;
    let mut request = tonic::Request::new(ledger_proto::pb::InsertPolicyRequest {
        policy_json:
            r#"{"operator": {"name": "op1", "company": "Acme", "ip": "10.0.0.5", "port": 32148}}"#
                .into(),
    });
    request
        .metadata_mut()
        .insert("authorization", "Bearer wr1ter-token".parse().unwrap());
    client.insert_policy(request).await.unwrap();
    let addr = http_addr(&master);
    for path in [
        "/",
        "/console.js",
        "/api/info",
        "/api/policies",
        "/api/subscribers",
        "/api/feed",
    ] {
        let refused = http_get(addr, path, &[]);
        assert_eq!(refused.status, 401, "{path}: {refused:?}");
        assert!(
            refused.body.contains("token is missing"),
            "{path}: {}",
            refused.body
        );
        let wrong = http_get(addr, path, &[("Authorization", "Bearer nope")]);
        assert_eq!(wrong.status, 401, "{path}");
        assert!(
            wrong.body.contains("unknown token"),
            "{path}: {}",
            wrong.body
        );
    }
    // The header, the cookie: either lets a reader in; writes stay impossible (GET only).
    let info = http_get(
        addr,
        "/api/info",
        &[("Authorization", "Bearer r3ader-token")],
    );
    assert_eq!(info.status, 200, "{info:?}");
    let cookie = http_get(
        addr,
        "/api/info",
        &[("Cookie", "ledger_token=r3ader-token")],
    );
    assert_eq!(cookie.status, 200, "{cookie:?}");
    // `/metrics` and `/health` answer as before.
    assert_eq!(http_get(addr, "/health", &[]).status, 200);
    assert_eq!(http_get(addr, "/metrics", &[]).status, 200);
    // `/?token=`: a cookie the page's script cannot read, and the token out of the address.
    let set = http_get(addr, "/?token=r3ader-token", &[]);
    assert_eq!(set.status, 303);
    assert_eq!(set.header("location"), Some("/"));
    let cookie = set.header("set-cookie").expect("a cookie");
    assert!(
        cookie.starts_with("ledger_token=r3ader-token;")
            && cookie.contains("HttpOnly")
            && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert_eq!(http_get(addr, "/?token=nope", &[]).status, 401);

    // In the browser: refused without the token, served once it is given.
    let mut browser = Browser::start();
    let refused = browser.open(&format!("http://{addr}/"), 1280, 800);
    assert_eq!(refused["status"], 401, "{refused}");
    assert!(
        refused["text"]
            .as_str()
            .unwrap()
            .contains("token is missing")
    );
    let opened = browser.open(&format!("http://{addr}/?token=r3ader-token"), 1280, 800);
    assert_eq!(opened["status"], 200, "{opened}");
    assert_eq!(opened["url"], format!("http://{addr}/"));
    assert_eq!(browser.eval("window.__console.nodeCount()"), 1);
    assert_eq!(
        browser.eval("document.getElementById('policy-count').textContent"),
        "1"
    );
    // Only the load without the token failed (its 401 is logged by the browser).
    let errors: Vec<String> = browser
        .errors()
        .into_iter()
        .filter(|e| !e.contains("status of 401"))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_member_shows_its_lag() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), &["--http-addr", "127.0.0.1:0"]);
    let mut client = master.client().await;
    insert_ok(&mut client, r#"{"config": {"n": 0}}"#).await;
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let fast = Member::start(&a, &[master.url()], &[]);
    let slow = Member::start(&b, &[master.url()], &[]);
    let mut browser = Browser::start();
    let addr = http_addr(&master);
    assert_eq!(
        browser.open(&format!("http://{addr}/"), 1600, 1000)["status"],
        200
    );
    browser.wait(
        "document.querySelectorAll('#subscribers tbody tr[data-lag]').length === 2",
        Duration::from_secs(10),
    );
    let stopped = std::process::Command::new("kill")
        .args(["-STOP", &slow.pid().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    // 60 policies of 256 KiB: 15 MiB, more than the loopback socket buffers hold, so the
    // stopped member is behind whether lag counts what it made durable or what was sent to it.
    let filler = "x".repeat(256 << 10);
    for n in 1..=60 {
        insert_ok(
            &mut client,
            &format!(r#"{{"config": {{"n": {n}, "filler": "{filler}"}}}}"#),
        )
        .await;
    }
    wait_until(30, "the fast member applied every change", || {
        let applied = ledger_testkit::member::applied_seq(&fast.file);
        async move { applied == Some(61) }
    })
    .await;
    // The stopped member's row, first (the most behind), shows it behind by what it missed.
    let (lag, _) = browser.wait(
        "(() => { const r = document.querySelector('#subscribers tbody tr[data-lag]'); return r && Number(r.dataset.lag) >= 20 && Number(r.dataset.lag); })()",
        Duration::from_secs(10),
    );
    assert!(lag.as_u64().unwrap() >= 20, "{lag}");
    // The fast member's lag is what it reported durable, at most a second ago (ReportProgress):
    // wait for the report that says it applied everything.
    browser.wait(
        "(() => { const r = document.querySelectorAll('#subscribers tbody tr[data-lag]'); return r.length === 2 && Number(r[1].dataset.lag) === 0; })()",
        Duration::from_secs(10),
    );
    let lags = browser.eval(
        "[...document.querySelectorAll('#subscribers tbody tr[data-lag]')].map(r => Number(r.dataset.lag))",
    );
    assert_eq!(lags.as_array().unwrap().len(), 2, "{lags}");
    assert_eq!(lags[1], 0, "{lags}");
    std::process::Command::new("kill")
        .args(["-CONT", &slow.pid().to_string()])
        .status()
        .unwrap();
    no_errors(&mut browser);
}

/// The map of a 200-policy network, as a PNG: at `LEDGER_CONSOLE_SCREENSHOT` when set
/// (`docs/console-map.png` is made so: see README, "Console"), else in a temporary directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_policy_network_on_the_map() {
    let dir = tempfile::tempdir().unwrap();
    // The listener's address from the config file this time.
    let config = dir.path().join("master.toml");
    std::fs::write(&config, "http-addr = \"127.0.0.1:0\"\n").unwrap();
    let master = Master::start(dir.path(), &["--config", config.to_str().unwrap()]);
    let policies = network(200);
    // The last few arrive while the page is open: they are in its feed.
    let (before, live) = policies.split_at(192);
    seed(&master, before, 4).await;
    let (_, nodes) = expected(&policies);
    // Subscribers: two members of this master, a relay, and a member below the relay.
    let subdirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let root = master.addr.to_string();
    let relay = Master::start_relay(
        subdirs[0].path(),
        std::slice::from_ref(&root),
        &["--node-name", "relay-lyon"],
    );
    let _members = [
        Member::start(
            subdirs[1].path(),
            std::slice::from_ref(&root),
            &["--node-name", "operator-oslo-1"],
        ),
        Member::start(
            subdirs[2].path(),
            std::slice::from_ref(&root),
            &["--node-name", "query-austin-0"],
        ),
        Member::start(
            subdirs[3].path(),
            &[relay.addr.to_string()],
            &["--node-name", "operator-lyon-0"],
        ),
    ];
    let mut browser = Browser::start();
    let addr = http_addr(&master);
    assert_eq!(
        browser.open(&format!("http://{addr}/"), 1920, 1200)["status"],
        200
    );
    seed(&master, live, 1).await;
    browser.wait(
        "document.querySelectorAll('#feed li').length === 8",
        Duration::from_secs(10),
    );
    // Every subscriber of the tree, each durable at the head (the relay's member via it).
    browser.wait(
        "(() => { const rows = [...document.querySelectorAll('#subscribers tbody tr[data-lag]')]; \
           return rows.length === 4 && rows.every(r => Number(r.dataset.lag) === 0) \
             && document.querySelector('#subscribers tbody').textContent.includes('relay-lyon'); })()",
        Duration::from_secs(20),
    );
    assert_eq!(browser.eval("window.__console.nodeCount()"), nodes);
    // The streams on the map: this master, its members and the relay, the relay's member below
    // the relay.
    let mut streams: Vec<String> =
        serde_json::from_value(browser.eval("window.__console.subscriberNodes()")).unwrap();
    streams.sort();
    assert_eq!(
        streams,
        [
            "sub:",
            "sub:operator-oslo-1",
            "sub:query-austin-0",
            "sub:relay-lyon",
            "sub:relay-lyon/operator-lyon-0"
        ],
    );
    assert_eq!(
        browser.eval("window.__console.neighbours('sub:relay-lyon/operator-lyon-0')"),
        serde_json::json!(["sub:relay-lyon"])
    );
    let mut below_root: Vec<String> =
        serde_json::from_value(browser.eval("window.__console.neighbours('sub:')")).unwrap();
    below_root.sort();
    assert_eq!(
        below_root,
        [
            "sub:operator-oslo-1",
            "sub:query-austin-0",
            "sub:relay-lyon"
        ]
    );
    // The header follows the feed (its info is read again a moment after each change).
    browser.wait(
        "document.getElementById('head-seq').textContent === '200'",
        Duration::from_secs(10),
    );
    browser.fill("#search", "Initech");
    // The whole map again (the search framed Initech's nodes), its matches still ringed.
    browser.eval("window.__console.render()");
    let cluster = browser.eval(
        "window.__console.matches().find(k => !k.includes('/') && k !== window.__console.matches()[0])",
    );
    let panel = browser.click_node(cluster.as_str().expect("an Initech node"));
    assert!(panel.contains("Initech"), "{panel}");
    let path = std::env::var_os("LEDGER_CONSOLE_SCREENSHOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| dir.path().join("console-map.png"));
    browser.screenshot(&path);
    let png = std::fs::read(&path).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    no_errors(&mut browser);
}

/// 10,000 policies: every node is drawn, and the map stays usable (a zoom, a search). How fast
/// it draws is measured by `ledger-bench --only-console`, not here (README, "Console").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_map_of_10000_policies_is_drawn_zoomed_and_searched() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), &["--http-addr", "127.0.0.1:0"]);
    let policies = network(10_000);
    seed(&master, &policies, 16).await;
    let (_, nodes) = expected(&policies);
    let mut browser = Browser::start();
    let addr = http_addr(&master);
    assert_eq!(
        browser.open(&format!("http://{addr}/"), 1600, 1000)["status"],
        200
    );
    assert_eq!(browser.eval("window.__console.nodeCount()"), nodes);
    // Zoomed in (wheel events on the canvas) until labels show.
    let scale = browser.eval(
        "(() => { const c = document.getElementById('map'); const r = c.getBoundingClientRect(); \
         for (let i = 0; i < 40 && window.__console.scale() < 0.8; i++) \
           c.dispatchEvent(new WheelEvent('wheel', {deltaY: -200, clientX: r.left + r.width / 2, clientY: r.top + r.height / 2, cancelable: true})); \
         return window.__console.scale(); })()",
    );
    assert!(scale.as_f64().unwrap() >= 0.8, "zoomed to {scale}");
    browser.fill("#search", "operator-kyoto-3");
    let matched = browser
        .eval("window.__console.matches().length")
        .as_u64()
        .unwrap();
    assert!(matched >= 2, "{matched} matches");
    no_errors(&mut browser);
}

/// `/api/feed` as a client other than the page sees it: server-sent events (a change with its
/// seq as the event's id; `Last-Event-ID` resumes after it), and a place among the gRPC edge's
/// streams (`--max-streams-per-client`), given back when the connection goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_is_server_sent_events_within_the_stream_limits() {
    use std::io::{BufRead, BufReader, Write};
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(
        dir.path(),
        &[
            "--http-addr",
            "127.0.0.1:0",
            "--max-streams-per-client",
            "1",
        ],
    );
    let mut client = master.client().await;
    let first = insert_ok(&mut client, r#"{"config": {"n": 1}}"#).await;
    let addr = http_addr(&master);
    let open_feed = |headers: &str| {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(
            stream,
            "GET /api/feed HTTP/1.1\r\nHost: {addr}\r\n{headers}\r\n"
        )
        .unwrap();
        BufReader::new(stream)
    };
    // Reads lines until one contains `needle`: every line read so far.
    let read_until = |feed: &mut BufReader<std::net::TcpStream>, needle: &str| {
        let mut seen = String::new();
        while !seen.contains(needle) {
            let mut line = String::new();
            assert!(
                feed.read_line(&mut line).unwrap() > 0,
                "the feed ended before {needle:?}:\n{seen}"
            );
            seen.push_str(&line);
        }
        seen
    };
    let mut feed = open_feed("");
    let head = read_until(&mut feed, ": ledger feed after seq 1");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    // A second feed from the same address is over the limit, while the first is open.
    let refused = http_get(addr, "/api/feed", &[]);
    assert_eq!(refused.status, 429, "{refused:?}");
    let second = insert_ok(&mut client, r#"{"config": {"n": 2}}"#).await;
    let events = read_until(&mut feed, &second.id);
    assert!(
        events.contains("id: 2\nevent: change\ndata: {\"seq\":2,\"op\":\"insert\""),
        "{events}"
    );
    drop(feed);
    // The place is given back; a browser reconnecting after seq 1 gets seq 2 again.
    wait_until(10, "the first feed's place is free", || async {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        write!(
            stream,
            "GET /api/feed HTTP/1.1\r\nHost: {addr}\r\nLast-Event-ID: 1\r\n\r\n"
        )
        .unwrap();
        let mut feed = BufReader::new(stream);
        let mut status = String::new();
        feed.read_line(&mut status).unwrap();
        if !status.starts_with("HTTP/1.1 200") {
            return false;
        }
        let events = read_until(&mut feed, "event: change");
        assert!(events.contains(": ledger feed after seq 1"), "{events}");
        let data = read_until(&mut feed, "\n\n");
        assert!(
            data.contains(&second.id) && !data.contains(&first.id),
            "{data}"
        );
        true
    })
    .await;
}
