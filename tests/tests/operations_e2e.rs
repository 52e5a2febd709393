//! What operators rely on, against the real `master` binary: Prometheus metrics, JSON logs and
//! the TOML config file with flags and environment winning over it.

use ledger_testkit::Master;
use ledger_testkit::client::{insert, stream, until_caught_up};
use ledger_testkit::metrics::{sample, scrape_async};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_writes_subscribers_and_the_head() {
    let dir = tempfile::tempdir().unwrap();
    // Port 0: the kernel picks a free port, which the master logs.
    let master = Master::start(dir.path(), &["--metrics-addr", "127.0.0.1:0"]);
    let port = master.metrics_port();
    let mut client = master.client().await;
    for n in 0..3 {
        insert(&mut client, &format!(r#"{{"config": {{"n": {n}}}}}"#))
            .await
            .unwrap();
    }
    insert(&mut client, r#"{"config": {"n": 0}}"#)
        .await
        .unwrap_err();
    insert(&mut client, "not json").await.unwrap_err();
    let mut events = stream(&mut client, 0).await;
    until_caught_up(&mut events).await;

    let scraped = scrape_async(port).await;
    let expect = |series: &str, value: f64| {
        assert_eq!(
            sample(&scraped, series),
            Some(value),
            "{series} in:\n{scraped}"
        );
    };
    expect(r#"ledger_inserts_total{outcome="ok"}"#, 3.0);
    expect(r#"ledger_inserts_total{outcome="already_exists"}"#, 1.0);
    expect(r#"ledger_inserts_total{outcome="invalid"}"#, 1.0);
    expect("ledger_head_seq", 3.0);
    expect("ledger_policies", 3.0);
    expect("ledger_subscribers", 1.0);
    expect("ledger_database_up", 1.0);
    expect("ledger_insert_duration_seconds_count", 5.0);
    assert!(scraped.contains("ledger_insert_duration_seconds_bucket{le=\"0.001\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_settings_apply_and_flags_and_environment_win() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("master.toml");
    std::fs::write(
        &config,
        // The harness sets LEDGER_LOG=info: were the file's level to win, the master would not
        // log the `listening on` line the harness waits for.
        "database_url = \"sqlite://from-file.db\"\nlog-format = \"json\"\nregister = true\n\
         name = \"from-file\"\nlog-level = \"error\"\n",
    )
    .unwrap();
    let config = config.display().to_string();

    // The file: its database, its log format, its registration; the environment's log level.
    let master = Master::start(dir.path(), &["--config", &config]);
    assert!(dir.path().join("from-file.db").exists());
    let mut client = master.client().await;
    let masters = ledger_testkit::client::info(&mut client).await;
    assert_eq!(
        masters.policy_count, 1,
        "the file's register = true applied"
    );
    drop(master);
    let logs_are_json = |logs: &str| {
        logs.lines().all(|line| {
            serde_json::from_str::<serde_json::Value>(line).is_ok_and(|v| v["fields"].is_object())
        })
    };

    // A flag wins over the file.
    let master = Master::start(
        dir.path(),
        &[
            "--config",
            &config,
            "--database-url",
            "sqlite://from-flag.db",
            "--log-format",
            "text",
        ],
    );
    assert!(dir.path().join("from-flag.db").exists());
    assert!(!logs_are_json(&master.logs()));
    drop(master);

    let master = Master::start(dir.path(), &["--config", &config]);
    assert!(logs_are_json(&master.logs()), "{}", master.logs());
    drop(master);

    // An unknown setting is refused with its name.
    std::fs::write(dir.path().join("bad.toml"), "no_such_flag = 1\n").unwrap();
    let output = std::process::Command::new(ledger_testkit::binary("master"))
        .current_dir(dir.path())
        .args(["--config", "bad.toml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("unknown setting \"no_such_flag\""),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
