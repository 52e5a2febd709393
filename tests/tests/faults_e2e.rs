//! The fault suite: the real `master` and `member` binaries under load while something fails
//! under them. PostgreSQL is killed (SIGKILL of every one of its processes) and restarted; a
//! master is frozen with SIGSTOP for 30 s; a member is killed with SIGKILL while it receives a
//! snapshot, while it appends and while it rewrites its file.
//!
//! Each scenario prints one line of figures, `faults: <scenario>: ...` (shown with
//! `cargo test -p ledger-tests --test faults_e2e -- --nocapture`), and fails if one acknowledged
//! write is missing at the end: every insert `InsertPolicy` acknowledged must be in the master's
//! ledger and in every member's file (every delete acknowledged absent from both), and each
//! member's file must be the master's ledger byte for byte (md5 = `GetLedgerInfo.digest`),
//! read line by line with Python's `json.loads`.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ledger_member::paths::LedgerPaths;
use ledger_member::state::{FileMd5, SyncState};
use ledger_proto::errors::{self, Reason};
use ledger_testkit::client::{Client, all_policies, delete, info, insert_ok, insert_with_deadline};
use ledger_testkit::member::{python_ledger_ids, wait_converged};
use ledger_testkit::postgres::Cluster;
use ledger_testkit::tally_line as show;
use ledger_testkit::{Master, Member, PostgresServer, wait_until, within};
use tonic::Code;

/// Concurrent writers of the scenarios under load.
const WRITERS: usize = 8;
/// How long a member may take to converge once the writes stopped.
const CONVERGE_SECS: u64 = 90;

/// A policy of its own id (so that a call that failed can be looked up after), about `pad`
/// bytes longer than the bare policy.
fn policy(id: &str, pad: usize) -> String {
    let filler: String = (0..pad)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    format!(
        r#"{{"config": {{"id": "{id}", "name": "fault", "company": "Acme", "pad": "{filler}"}}}}"#
    )
}

/// Lets workers be held between two calls, so that the master's ledger stands still while a
/// member's file is compared with it.
#[derive(Default)]
struct Gate {
    held: AtomicBool,
    parked: AtomicUsize,
}

impl Gate {
    /// Called by a worker between two calls: waits while the gate is held.
    async fn pass(&self) {
        if !self.held.load(Ordering::SeqCst) {
            return;
        }
        self.parked.fetch_add(1, Ordering::SeqCst);
        while self.held.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.parked.fetch_sub(1, Ordering::SeqCst);
    }

    /// Holds the `workers` workers and waits until each is parked (its call in flight done).
    async fn hold(&self, workers: usize) {
        self.held.store(true, Ordering::SeqCst);
        wait_until(60, "the writers to park", || async {
            self.parked.load(Ordering::SeqCst) == workers
        })
        .await;
    }

    fn release(&self) {
        self.held.store(false, Ordering::SeqCst);
    }
}

/// A call that failed: its policy's id, the status code, the master's reason, the message.
type Failed = (String, Code, Option<Reason>, String);

/// What writers saw: the ids acknowledged (with when) and those of calls that failed.
#[derive(Default)]
struct Tally {
    acknowledged: Vec<(String, Instant)>,
    /// Calls answered with an error, or given up at their deadline: the id, code, the master's
    /// reason (none for a call the client gave up) and message.
    failed: Vec<Failed>,
}

impl Tally {
    fn ids(&self) -> Vec<String> {
        self.acknowledged.iter().map(|(id, _)| id.clone()).collect()
    }

    /// The calls that failed, by code (`Unavailable 12, DeadlineExceeded 3` once shown).
    fn failures(&self) -> BTreeMap<String, usize> {
        let mut by_code = BTreeMap::new();
        for (_, code, _, _) in &self.failed {
            *by_code.entry(code_name(*code)).or_insert(0) += 1;
        }
        by_code
    }

    fn count(&self, code: Code) -> usize {
        self.failed.iter().filter(|(_, c, _, _)| *c == code).count()
    }
}

fn code_name(code: Code) -> String {
    format!("{code:?}")
}

/// Writers inserting new policies without pause until stopped, each on its own connection.
struct Load {
    stop: Arc<AtomicBool>,
    gate: Arc<Gate>,
    acks: Arc<Mutex<Vec<Instant>>>,
    tasks: Vec<tokio::task::JoinHandle<Tally>>,
}

impl Load {
    /// Starts one writer per client; each call has `deadline`. A failed call is counted, not
    /// retried (the next call inserts the next policy), after a pause of 20 ms.
    fn start(clients: Vec<Client>, tag: &str, deadline: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(Gate::default());
        let acks = Arc::new(Mutex::new(Vec::new()));
        let tasks = clients
            .into_iter()
            .enumerate()
            .map(|(writer, mut client)| {
                let (stop, gate, acks) = (stop.clone(), gate.clone(), acks.clone());
                let tag = tag.to_string();
                tokio::spawn(async move {
                    let mut tally = Tally::default();
                    for n in 0.. {
                        gate.pass().await;
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let id = format!("{tag}-w{writer}-{n}");
                        match insert_with_deadline(&mut client, &policy(&id, 100), deadline).await {
                            Ok(stored) => {
                                assert_eq!(stored.id, id, "the master keeps the id sent");
                                let now = Instant::now();
                                acks.lock().unwrap().push(now);
                                tally.acknowledged.push((id, now));
                            }
                            Err(status) => {
                                tally.failed.push((
                                    id,
                                    status.code(),
                                    errors::reason(&status),
                                    status.message().to_string(),
                                ));
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                    tally
                })
            })
            .collect();
        Load {
            stop,
            gate,
            acks,
            tasks,
        }
    }

    /// The first acknowledgement received after `since`.
    fn first_ack_after(&self, since: Instant) -> Option<Instant> {
        self.acks
            .lock()
            .unwrap()
            .iter()
            .copied()
            .filter(|&at| at > since)
            .min()
    }

    /// Goes on for at least `seconds` after `since`, and until an insert was acknowledged
    /// after `since` (failing after 90 s without one).
    async fn continue_after(&self, since: Instant, seconds: u64) {
        wait_until(90, "an insert acknowledged again", || async {
            self.first_ack_after(since).is_some()
        })
        .await;
        let until = since + Duration::from_secs(seconds);
        tokio::time::sleep_until(until.into()).await;
    }

    async fn stop(self) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        self.gate.release();
        let mut all = Tally::default();
        for task in self.tasks {
            let tally = within(120, "a writer to stop", task)
                .await
                .expect("a writer task");
            all.acknowledged.extend(tally.acknowledged);
            all.failed.extend(tally.failed);
        }
        all
    }
}

/// `count` clients of `master`, each on a connection of its own.
async fn clients(master: &Master, count: usize) -> Vec<Client> {
    let mut clients = Vec::new();
    for _ in 0..count {
        clients.push(master.client().await);
    }
    clients
}

/// Inserts the policies `ids` (`pad` bytes longer than bare ones) with `concurrency` clients;
/// each must be acknowledged.
async fn fill(master: &Master, ids: Vec<String>, pad: usize, concurrency: usize) {
    let ids = Arc::new(ids);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for mut client in clients(master, concurrency).await {
        let (ids, next) = (ids.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let at = next.fetch_add(1, Ordering::SeqCst);
                let Some(id) = ids.get(at) else { break };
                insert_ok(&mut client, &policy(id, pad)).await;
            }
        }));
    }
    for task in tasks {
        within(600, "filling the ledger", task).await.unwrap();
    }
}

/// How the end state compares with what was acknowledged.
struct Outcome {
    /// Acknowledged writes undone: inserts missing from the master or from a member's file,
    /// deletes whose policy is still in one of them; by id, with where.
    lost: BTreeMap<String, Vec<String>>,
    /// Failed calls whose policy was stored all the same (an outcome the client could not
    /// know): their code, reason and message.
    stored_though_failed: Vec<(Code, Option<Reason>, String)>,
    /// Policies in the master's ledger.
    policies: usize,
}

/// Compares the end state with what was acknowledged: the master's ledger (`ListPolicies`) must
/// hold every acknowledged insert and no acknowledged delete, and each member's file must be the
/// master's ledger byte for byte (and as Python's `json.loads` reads it, the same ids).
async fn outcome(
    client: &mut Client,
    members: &[&Member],
    inserted: &[String],
    deleted: &[String],
    failed: &[Failed],
) -> Outcome {
    let ledger = all_policies(client).await;
    let digest = info(client).await.digest;
    let in_master: HashSet<&str> = ledger.iter().map(|p| p.id.as_str()).collect();
    let expected: String = ledger.iter().map(|p| format!("{}\n", p.json)).collect();
    let mut lost: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut check = |holder: &str, ids: &HashSet<&str>| {
        for id in inserted.iter().filter(|id| !ids.contains(id.as_str())) {
            let missing = format!("inserted, not in {holder}");
            lost.entry(id.clone()).or_default().push(missing);
        }
        for id in deleted.iter().filter(|id| ids.contains(id.as_str())) {
            let present = format!("deleted, still in {holder}");
            lost.entry(id.clone()).or_default().push(present);
        }
    };
    check("the master", &in_master);
    for member in members {
        let file_ids = python_ledger_ids(&member.file).await;
        check(
            &member.file.display().to_string(),
            &file_ids.iter().map(String::as_str).collect(),
        );
        let bytes = member.file_bytes();
        assert!(
            bytes == expected.as_bytes(),
            "{} is not the master's ledger ({} bytes, the ledger {})",
            member.file.display(),
            bytes.len(),
            expected.len()
        );
        assert_eq!(member.file_md5(), Some(digest.clone()));
    }
    let stored_though_failed = failed
        .iter()
        .filter(|(id, _, _, _)| in_master.contains(id.as_str()))
        .map(|(_, code, reason, message)| (*code, *reason, message.clone()))
        .collect();
    Outcome {
        lost,
        stored_though_failed,
        policies: ledger.len(),
    }
}

fn secs(duration: Duration) -> String {
    format!("{:.2} s", duration.as_secs_f64())
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// Scenario 1: PostgreSQL killed (SIGKILL of the postmaster and of every backend) under load
/// from 8 writers and restarted 2 s later on the same data directory and port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_and_restarted_under_load() {
    // A private server (fsync on, as in production): the shared one serves other tests.
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(true))
        .await
        .unwrap();
    let database = cluster.server().create_database();
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), &["--database-url", &database]);
    let member_dir = tempfile::tempdir().unwrap();
    let member = Member::start(member_dir.path(), &[master.addr.to_string()], &[]);
    member.wait_for_log(30, "caught up with master").await;
    let snapshots_before = count(&member.run_logs(), "sends a snapshot");
    let mut client = master.client().await;

    let load = Load::start(
        clients(&master, WRITERS).await,
        "pg",
        Duration::from_secs(10),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed_at = Instant::now();
    let processes = tokio::task::block_in_place(|| cluster.kill9());
    let dead_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restarting_at = Instant::now();
    tokio::task::block_in_place(|| cluster.restart());
    let restarted_at = Instant::now();
    load.continue_after(restarted_at, 2).await;
    let accepted_again = load.first_ack_after(restarted_at).unwrap() - restarted_at;
    let last_before_kill = load
        .acks
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|&at| at <= killed_at)
        .max();
    let tally = load.stop().await;
    let stopped_at = Instant::now();

    wait_converged(&client, &member.file, CONVERGE_SECS).await;
    let converged = stopped_at.elapsed();
    let outcome = outcome(&mut client, &[&member], &tally.ids(), &[], &tally.failed).await;
    let logs = master.logs();
    let resets = count(&member.run_logs(), "sends a snapshot") - snapshots_before;
    println!(
        "faults: postgres-kill: {} acknowledged, {} lost, {} refused ({}), {} of them stored all \
         the same; {processes} PostgreSQL processes SIGKILLed (all gone {} later), restarted 2 s \
         after (recovery and start {}, down {} in all); writes accepted again {} after the \
         restart ({} without an acknowledgement); member: reset: {}, converged {} after the \
         writers stopped ({} policies)",
        tally.acknowledged.len(),
        outcome.lost.len(),
        tally.failed.len(),
        show(&tally.failures()),
        outcome.stored_though_failed.len(),
        secs(dead_at - killed_at),
        secs(restarted_at - restarting_at),
        secs(restarted_at - killed_at),
        secs(accepted_again),
        secs(load_gap(last_before_kill, &tally, restarted_at)),
        if resets == 0 { "no" } else { "yes" },
        secs(converged),
        outcome.policies,
    );
    assert!(outcome.lost.is_empty(), "lost: {:?}", outcome.lost);
    // A refused write that was stored all the same was cut off with PostgreSQL mid-commit: the
    // answer must not have let the client believe that nothing was written.
    for (code, reason, message) in &outcome.stored_though_failed {
        assert_eq!(
            *reason,
            Some(Reason::WriteOutcomeUnknown),
            "refused ({code:?}: {message}), yet stored"
        );
    }
    assert!(
        last_before_kill.is_some(),
        "inserts were acknowledged before the kill"
    );
    assert!(
        tally.count(Code::Unavailable) > 0,
        "the outage was seen by the writers: {:?}",
        tally.failures()
    );
    // An outage is UNAVAILABLE (retry elsewhere or later), nothing else.
    assert_eq!(
        tally.failures().keys().collect::<Vec<_>>(),
        [&code_name(Code::Unavailable)],
        "{}",
        show(&tally.failures())
    );
    assert!(logs.contains("the database does not answer"), "{logs}");
    assert!(logs.contains("the database answers again"), "{logs}");
    assert_eq!(
        resets, 0,
        "the member resumed from its seq, without a snapshot"
    );
}

/// The longest time without an acknowledgement around the outage: from the last one before
/// the kill to the first one after the restart.
fn load_gap(last_before_kill: Option<Instant>, tally: &Tally, restarted_at: Instant) -> Duration {
    let first_after = tally
        .acknowledged
        .iter()
        .map(|(_, at)| *at)
        .filter(|&at| at > restarted_at)
        .min();
    match (last_before_kill, first_after) {
        (Some(before), Some(after)) => after - before,
        _ => Duration::ZERO,
    }
}

/// Scenario 2: a master frozen with SIGSTOP for 30 s under load, on SQLite and on PostgreSQL
/// side by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_frozen_for_30_seconds_under_load() {
    let database = PostgresServer::get().create_database();
    let sqlite = tokio::spawn(frozen_master("sqlite", vec![]));
    let postgres = tokio::spawn(frozen_master(
        "postgres",
        vec!["--database-url".into(), database],
    ));
    let (sqlite, postgres) = tokio::join!(sqlite, postgres);
    sqlite.expect("the SQLite master's scenario");
    postgres.expect("the PostgreSQL master's scenario");
}

async fn frozen_master(backend: &'static str, args: Vec<String>) {
    const FROZEN: Duration = Duration::from_secs(30);
    let dir = tempfile::tempdir().unwrap();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let master = Master::start(dir.path(), &args);
    let member_dir = tempfile::tempdir().unwrap();
    let member = Member::start(member_dir.path(), &[master.addr.to_string()], &[]);
    member.wait_for_log(30, "caught up with master").await;
    let mut client = master.client().await;

    let load = Load::start(
        clients(&master, WRITERS).await,
        &format!("stop-{backend}"),
        Duration::from_secs(2),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let snapshots_before = count(&member.run_logs(), "sends a snapshot");
    master.pause();
    let (paused_at, paused_clock) = (Instant::now(), chrono::Utc::now());
    tokio::time::sleep(FROZEN).await;
    master.resume();
    let (resumed_at, resumed_clock) = (Instant::now(), chrono::Utc::now());
    load.continue_after(resumed_at, 2).await;
    let first_ack = load.first_ack_after(resumed_at).unwrap() - resumed_at;
    let acked_while_frozen = load
        .acks
        .lock()
        .unwrap()
        .iter()
        .filter(|&&at| at > paused_at + Duration::from_millis(100) && at < resumed_at)
        .count();
    let tally = load.stop().await;
    let stopped_at = Instant::now();

    wait_converged(&client, &member.file, CONVERGE_SECS).await;
    let converged = stopped_at.elapsed();
    let outcome = outcome(&mut client, &[&member], &tally.ids(), &[], &tally.failed).await;
    let logs = member.run_logs();
    let resets = count(&logs, "sends a snapshot") - snapshots_before;
    // When the member saw the link go, and come back, from its log's timestamps.
    let logged_at = |needle: &str, after: chrono::DateTime<chrono::Utc>| {
        logs.lines()
            .filter(|line| line.contains(needle))
            .filter_map(|line| line.split_whitespace().next())
            .filter_map(|at| chrono::DateTime::parse_from_rfc3339(at).ok())
            .map(|at| at.with_timezone(&chrono::Utc))
            .find(|&at| at >= after)
            .map(|at| format!("{:.1} s", (at - after).as_seconds_f64()))
            .unwrap_or_else(|| "never".into())
    };
    println!(
        "faults: sigstop ({backend}): {} acknowledged, {} lost, {} timed out at their 2 s deadline \
         ({} of them stored all the same, once the master went on), {} failed otherwise; first \
         insert acknowledged {} after SIGCONT; member: disconnected {} into the freeze, \
         reconnected {} after SIGCONT, reset: {}, converged {} after the writers stopped ({} \
         policies)",
        tally.acknowledged.len(),
        outcome.lost.len(),
        tally.count(Code::DeadlineExceeded),
        outcome.stored_though_failed.len(),
        tally.failed.len() - tally.count(Code::DeadlineExceeded),
        secs(first_ack),
        logged_at("disconnected from master", paused_clock),
        logged_at("reconnected to master", resumed_clock),
        if resets == 0 { "no" } else { "yes" },
        secs(converged),
        outcome.policies,
    );
    assert!(outcome.lost.is_empty(), "lost: {:?}", outcome.lost);
    assert_eq!(
        acked_while_frozen, 0,
        "a frozen master acknowledges nothing"
    );
    assert!(
        tally.count(Code::DeadlineExceeded) > 0,
        "the writers' calls timed out while the master was frozen"
    );
    assert_eq!(
        tally.failed.len(),
        tally.count(Code::DeadlineExceeded),
        "a frozen master makes calls time out, nothing else: {}",
        show(&tally.failures())
    );
    assert_eq!(
        resets, 0,
        "the member resumed from its seq, without a snapshot:\n{logs}"
    );
}

/// The length of the `.tmp` file a snapshot or a rewrite is written to (0 when there is none).
fn tmp_len(paths: &LedgerPaths) -> u64 {
    std::fs::metadata(&paths.tmp).map_or(0, |m| m.len())
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1e6)
}

/// Kills `member` once `.tmp` holds `at` bytes of a snapshot; fails if the snapshot was
/// being installed first (its state record no longer `before`). Returns the bytes `.tmp` held
/// after the kill.
fn kill_mid_snapshot(
    member: &mut Member,
    paths: &LedgerPaths,
    at: u64,
    before: Option<&SyncState>,
) -> u64 {
    // Installing records a pending marker, then renames `.tmp` over the file.
    let installed = |paths: &LedgerPaths| SyncState::load(paths).ok().flatten().as_ref() != before;
    let killed = tokio::task::block_in_place(|| {
        member.kill9_when(Duration::from_secs(120), || {
            tmp_len(paths) >= at || installed(paths)
        })
    });
    assert!(killed, "the snapshot reached {at} bytes within 120 s");
    assert!(
        !installed(paths),
        "killed mid-snapshot, before it was installed (at {at} bytes)"
    );
    tmp_len(paths)
}

/// Scenario 3a: a member killed while it receives a snapshot: a new member (no file yet), then
/// a member whose file a snapshot replaces (it fell behind the master's retained changes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_killed_while_it_receives_a_snapshot() {
    const FIRST: usize = 2_000;
    const PAD: usize = 2_500;
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), &["--change-retention", "1000"]);
    let mut client = master.client().await;
    let mut inserted: Vec<String> = (0..FIRST).map(|n| format!("snap-{n}")).collect();
    fill(&master, inserted.clone(), PAD, 16).await;
    let ledger_bytes = |ledger: &[ledger_proto::pb::Policy]| -> u64 {
        ledger.iter().map(|p| p.json.len() as u64 + 1).sum()
    };
    let size = ledger_bytes(&all_policies(&mut client).await);

    // A new member: killed at a quarter and at three quarters of its first snapshot.
    let member_dir = tempfile::tempdir().unwrap();
    let mut member = Member::start(member_dir.path(), &[master.addr.to_string()], &[]);
    let paths = LedgerPaths::new(&member.file);
    let mut kills = Vec::new();
    for quarter in [1, 3] {
        let left = kill_mid_snapshot(&mut member, &paths, size * quarter / 4, None);
        member.wait_for_log(10, "the master sends a snapshot").await;
        assert!(
            !paths.file.exists(),
            "no ledger file before the first snapshot"
        );
        kills.push(format!("{}/{} MB", megabytes(left), megabytes(size)));
        member.restart();
    }
    wait_converged(&client, &member.file, CONVERGE_SECS).await;
    let outcome_first = outcome(&mut client, &[&member], &inserted, &[], &[]).await;
    assert!(outcome_first.lost.is_empty(), "{:?}", outcome_first.lost);

    // The member stops; the ledger doubles, beyond the 1,000 changes the master keeps: its
    // restart gets a snapshot, which it is killed in three times. Each time, the file it had
    // is left as it was, with its record.
    member.kill9();
    let previous = member.file_bytes();
    let previous_state = SyncState::load(&paths).unwrap().expect("a state record");
    let more: Vec<String> = (FIRST..2 * FIRST).map(|n| format!("snap-{n}")).collect();
    fill(&master, more.clone(), PAD, 16).await;
    inserted.extend(more);
    let size = ledger_bytes(&all_policies(&mut client).await);
    member.restart();
    for tenth in [1, 5, 9] {
        let left = kill_mid_snapshot(
            &mut member,
            &paths,
            size * tenth / 10,
            Some(&previous_state),
        );
        member.wait_for_log(10, "the master sends a snapshot").await;
        assert!(
            member.file_bytes() == previous,
            "the file is untouched by a snapshot killed at {left} bytes"
        );
        assert_eq!(SyncState::load(&paths).unwrap(), Some(previous_state));
        kills.push(format!("{}/{} MB", megabytes(left), megabytes(size)));
        member.restart();
    }
    wait_converged(&client, &member.file, CONVERGE_SECS).await;
    let outcome = outcome(&mut client, &[&member], &inserted, &[], &[]).await;
    // The snapshot installed last kept the file it replaced.
    let old = std::fs::read(&paths.old).expect("blockchain.old");
    println!(
        "faults: member-kill snapshot: {} acknowledged, {} lost, {} kills mid-snapshot \
         (received at the kill: {}), the ledger file untouched by each, converged ({} policies)",
        inserted.len(),
        outcome.lost.len(),
        kills.len(),
        kills.join(", "),
        outcome.policies,
    );
    assert!(outcome.lost.is_empty(), "lost: {:?}", outcome.lost);
    assert!(
        old == previous,
        "blockchain.old is the file the snapshot replaced"
    );
}

/// Scenario 3b: a member killed again and again while it appends a burst of inserts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_killed_while_it_appends() {
    const KILLS: usize = 6;
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), &[]);
    let member_dir = tempfile::tempdir().unwrap();
    let mut member = Member::start(member_dir.path(), &[master.addr.to_string()], &[]);
    let paths = LedgerPaths::new(&member.file);
    member.wait_for_log(30, "caught up with master").await;
    let client = master.client().await;
    let writers = 4;
    let load = Load::start(
        clients(&master, writers).await,
        "live",
        Duration::from_secs(30),
    );
    // Past seq 0 first: a member whose record says seq 0 is a new one, which gets a snapshot.
    wait_until(60, "the member to apply the first inserts", || async {
        ledger_testkit::member::applied_seq(&member.file).is_some_and(|seq| seq >= 100)
    })
    .await;
    let mut mid_append = 0;
    let mut unrecorded = Vec::new();
    for kill in 0..KILLS {
        if kill % 2 == 0 {
            // Between an append and its record: the file is longer than recorded.
            let killed = tokio::task::block_in_place(|| {
                member.kill9_when(Duration::from_secs(30), || {
                    let recorded = SyncState::load(&paths).ok().flatten().map(|s| s.len);
                    let len = std::fs::metadata(&paths.file).map(|m| m.len()).ok();
                    matches!((recorded, len), (Some(r), Some(l)) if l > r)
                })
            });
            assert!(killed, "an append within 30 s");
        } else {
            tokio::time::sleep(Duration::from_millis(fastrand::u64(50..400))).await;
            member.kill9();
        }
        // What the kill left: the recorded part is whole lines of valid policies with the
        // recorded md5; past it, at most an append cut short that the restart repairs.
        let state = SyncState::load(&paths).unwrap().expect("a state record");
        let bytes = member.file_bytes();
        assert!(bytes.len() as u64 >= state.len);
        let recorded = &bytes[..state.len as usize];
        assert_eq!(FileMd5::of(recorded), state.md5);
        for line in std::str::from_utf8(recorded).unwrap().lines() {
            ledger_anylog::policy::parse_stored(line).expect("a recorded line is a policy");
        }
        let tail = bytes.len() as u64 - state.len;
        if tail > 0 {
            mid_append += 1;
            unrecorded.push(tail);
        }
        member.restart();
        // The restarted member: with the writers held, its file must become the master's
        // ledger, whole.
        load.gate.hold(writers).await;
        wait_converged(&client, &member.file, CONVERGE_SECS).await;
        let now = outcome(&mut client.clone(), &[&member], &[], &[], &[]).await;
        assert!(now.lost.is_empty());
        load.gate.release();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let tally = load.stop().await;
    let mut client = client;
    wait_converged(&client, &member.file, CONVERGE_SECS).await;
    let outcome = outcome(&mut client, &[&member], &tally.ids(), &[], &tally.failed).await;
    let logs = member.logs();
    let snapshots = count(&logs, "sends a snapshot");
    let resumed = count(&logs, "resuming from seq");
    println!(
        "faults: member-kill live: {} acknowledged, {} lost, {} failed ({}); {KILLS} kills, {} \
         between an append and its record (unrecorded bytes: {:?}), each restart resumed from \
         its seq ({resumed} resumes, {} snapshots after the first sync), converged ({} policies)",
        tally.acknowledged.len(),
        outcome.lost.len(),
        tally.failed.len(),
        show(&tally.failures()),
        mid_append,
        unrecorded,
        snapshots.saturating_sub(1),
        outcome.policies,
    );
    assert!(outcome.lost.is_empty(), "lost: {:?}", outcome.lost);
    assert!(tally.failed.is_empty(), "{}", show(&tally.failures()));
    assert!(
        mid_append > 0,
        "a kill landed between an append and its record"
    );
    assert_eq!(
        resumed, KILLS,
        "every restart resumed from its seq:\n{logs}"
    );
    assert!(snapshots <= 1, "no snapshot after a restart:\n{logs}");
}

/// Where in a rewrite a kill landed, from what it left on disk.
fn rewrite_phase(paths: &LedgerPaths) -> &'static str {
    let pending = SyncState::load(paths)
        .ok()
        .flatten()
        .and_then(|state| state.pending)
        .is_some();
    match (paths.tmp.exists(), pending) {
        (true, false) => "writing .tmp",
        (true, true) => "marker recorded, before the rename",
        (false, true) => "renamed, before the final record",
        (false, false) => "between rewrites",
    }
}

/// Scenario 3c: a member killed while it rewrites its file: a burst of deletes (each with an
/// insert, so the ledger keeps its size), every delete making the member rewrite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_killed_while_it_rewrites() {
    const START: usize = 3_000;
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), &[]);
    let mut client = master.client().await;
    let first: Vec<String> = (0..START).map(|n| format!("rw-{n}")).collect();
    fill(&master, first.clone(), 900, 16).await;
    let member_dir = tempfile::tempdir().unwrap();
    let mut member = Member::start(member_dir.path(), &[master.addr.to_string()], &[]);
    let paths = LedgerPaths::new(&member.file);
    wait_converged(&client, &member.file, CONVERGE_SECS).await;

    // One worker: insert a new policy, delete the oldest, again and again.
    let gate = Arc::new(Gate::default());
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (gate, stop, mut client) = (gate.clone(), stop.clone(), master.client().await);
        tokio::spawn(async move {
            let mut live: std::collections::VecDeque<String> = first.into();
            let (mut inserted, mut deleted) = (Vec::new(), Vec::new());
            for n in START.. {
                gate.pass().await;
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let id = format!("rw-{n}");
                insert_ok(&mut client, &policy(&id, 900)).await;
                inserted.push(id.clone());
                live.push_back(id);
                let oldest = live.pop_front().unwrap();
                delete(&mut client, &oldest)
                    .await
                    .unwrap_or_else(|e| panic!("deleting {oldest}: {e}"));
                deleted.push(oldest);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (inserted, deleted)
        })
    };

    // Each kind of moment twice: writing .tmp, between the marker and the rename, between the
    // rename and the final record, and any moment.
    let mut phases: BTreeMap<&str, usize> = BTreeMap::new();
    let mut missed = 0;
    let pending = |paths: &LedgerPaths| {
        SyncState::load(paths)
            .ok()
            .flatten()
            .is_some_and(|s| s.pending.is_some())
    };
    for kill in 0..8 {
        match kill % 4 {
            3 => {
                tokio::time::sleep(Duration::from_millis(fastrand::u64(50..400))).await;
                member.kill9();
            }
            aim => {
                let killed = tokio::task::block_in_place(|| {
                    member.kill9_when(Duration::from_secs(5), || match aim {
                        0 => paths.tmp.exists() && !pending(&paths),
                        1 => paths.tmp.exists() && pending(&paths),
                        _ => pending(&paths) && !paths.tmp.exists(),
                    })
                });
                if !killed {
                    missed += 1;
                    member.kill9();
                }
            }
        }
        *phases.entry(rewrite_phase(&paths)).or_insert(0) += 1;
        member.restart();
        gate.hold(1).await;
        wait_converged(&client, &member.file, CONVERGE_SECS).await;
        let now = outcome(&mut client, &[&member], &[], &[], &[]).await;
        assert!(now.lost.is_empty());
        gate.release();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::SeqCst);
    gate.release();
    let (inserted, deleted) = within(60, "the churn to stop", churn).await.unwrap();
    wait_converged(&client, &member.file, CONVERGE_SECS).await;
    let mut acknowledged = inserted.clone();
    acknowledged.extend(
        (0..START)
            .map(|n| format!("rw-{n}"))
            .filter(|id| !deleted.contains(id)),
    );
    let outcome = outcome(&mut client, &[&member], &acknowledged, &deleted, &[]).await;
    let logs = member.logs();
    let in_rewrite: usize = phases
        .iter()
        .filter(|(phase, _)| **phase != "between rewrites")
        .map(|(_, n)| n)
        .sum();
    println!(
        "faults: member-kill rewrite: {} acknowledged ({} inserts, {} deletes), {} lost; 8 \
         kills: {} ({missed} aimed kills missed their moment), {} rewrites finished and {} \
         records completed at restart, converged ({} policies)",
        inserted.len() + deleted.len(),
        inserted.len(),
        deleted.len(),
        outcome.lost.len(),
        phases
            .iter()
            .map(|(phase, n)| format!("{n} {phase}"))
            .collect::<Vec<_>>()
            .join(", "),
        count(&logs, "finished the rewrite"),
        count(&logs, "completed the record of an interrupted rewrite"),
        outcome.policies,
    );
    assert!(outcome.lost.is_empty(), "lost: {:?}", outcome.lost);
    assert!(
        in_rewrite >= 4 && phases.contains_key("writing .tmp"),
        "most kills landed in a rewrite, some while it wrote .tmp: {phases:?}"
    );
}
