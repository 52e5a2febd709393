//! PostgreSQL failover (issue 18): a primary with a synchronous standby, two real `master`
//! processes on the one database through the libpq multi-host URL
//! `postgres://ledger@PRIMARY:P1,127.0.0.1:P2/DATABASE?target_session_attrs=read-write` and nothing
//! else (the URL an operator writes must be enough), a real `member` following both masters, and
//! writers inserting distinct policies through both masters. The primary goes away — killed,
//! frozen with SIGSTOP (a hung host), or cut off the network in a namespace of its own — and the
//! standby is promoted 2.5 s later.
//!
//! Each test asserts that nothing acknowledged is lost (every acknowledged id in both masters'
//! ledgers and in the member's file, once, at the seq it was acknowledged with), that no id is
//! acknowledged twice, that each master acknowledges writes sent after the promotion within
//! 10 s of it, and that the member converges to both masters' digest without a reset. It prints
//! one line of figures, `failover: <kind>: ...` (shown with
//! `cargo test -p ledger-tests --test failover_e2e -- --nocapture`).
//!
//! The tests run one at a time (their figures are timings on a shared machine). The cut-off
//! test runs its whole scenario in a child process with network and pid namespaces of its own
//! (`ledger_testkit::netns`), so the machine's network is never changed; it needs root, as CI
//! has, and fails (never skips) without it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ledger_proto::errors::{self, Reason};
use ledger_testkit::client::{Client, all_policies, info, insert_with_deadline};
use ledger_testkit::member::{python_ledger_ids, wait_converged};
use ledger_testkit::netns::{self, PeerHost};
use ledger_testkit::postgres::Cluster;
use ledger_testkit::tally_line as show;
use ledger_testkit::{Master, Member, within};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Writers, spread over the two masters (writer `w` writes through master `w % 2`).
const WRITERS: usize = 4;
/// The client's deadline for one `InsertPolicy` attempt (sent as `grpc-timeout`).
const CALL_DEADLINE: Duration = Duration::from_secs(3);
/// The pause before a failed attempt is sent again.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// Writes before the failure.
const WRITES_BEFORE: Duration = Duration::from_secs(2);
/// From the failure to the promotion.
const PROMOTE_AFTER: Duration = Duration::from_millis(2500);
/// Each master must acknowledge a write sent after the promotion within this of it.
const WRITES_BACK_WITHIN: Duration = Duration::from_secs(10);
/// How long the test waits for that before it fails (longer, to say how late it was).
const WAIT_WRITES_BACK: Duration = Duration::from_secs(15);
/// Writes once both masters are back.
const WRITES_AFTER: Duration = Duration::from_secs(2);
/// How long writers may take to settle the policy in hand once told to stop.
const SETTLE: Duration = Duration::from_secs(20);
/// How long the member and the masters may take to reach one digest after the writes.
const CONVERGE_SECS: u64 = 30;
/// The isolated run of the cut-off test is killed after this.
const ISOLATED_TIMEOUT: Duration = Duration::from_secs(120);

/// The tests' timings must not depend on each other: one at a time (a test that fails does not
/// poison it).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// SIGKILL of the postmaster and every backend (`Cluster::kill9`).
    Killed,
    /// SIGSTOP of the postmaster and every backend (`Cluster::freeze`): a hung host.
    Frozen,
    /// Every packet from the primary's network namespace to the test's dropped.
    CutOff,
}

impl Failure {
    fn name(self) -> &'static str {
        match self {
            Failure::Killed => "primary killed",
            Failure::Frozen => "primary frozen",
            Failure::CutOff => "primary cut off",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Failure::Killed => "kill",
            Failure::Frozen => "freeze",
            Failure::CutOff => "cut",
        }
    }
}

/// Scenario (a): the primary killed (SIGKILL of every one of its processes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_killed_then_standby_promoted() {
    let _turn = ONE_AT_A_TIME.lock().await;
    failover(Failure::Killed, None).await;
}

/// Scenario (b): the primary frozen (SIGSTOP of every one of its processes): connections to it
/// stay open and new ones complete their TCP handshake, but nothing answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_frozen_then_standby_promoted() {
    let _turn = ONE_AT_A_TIME.lock().await;
    failover(Failure::Frozen, None).await;
}

/// Scenario (c): the primary cut off the network: it runs in a network namespace of its own,
/// joined to the test's by a veth pair, and a blackhole route drops every packet it sends to the
/// test's side (no RST, no ICMP error). The scenario runs in a child process with namespaces of
/// its own (`netns::run_isolated`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_cut_off_then_standby_promoted() {
    if !netns::is_isolated() {
        let _turn = ONE_AT_A_TIME.lock().await;
        tokio::task::block_in_place(|| {
            netns::run_isolated("primary_cut_off_then_standby_promoted", ISOLATED_TIMEOUT)
        });
        return;
    }
    let peer = tokio::task::block_in_place(PeerHost::create);
    failover(Failure::CutOff, Some(&peer)).await;
}

/// A policy of its own id, so that an attempt whose outcome is unknown can be sent again.
fn policy(id: &str) -> String {
    format!(r#"{{"config": {{"id": "{id}", "name": "failover", "company": "Acme"}}}}"#)
}

/// An insert acknowledged: the id and seq the master answered, which master, when the
/// acknowledged attempt was sent and when its answer came.
struct Ack {
    id: String,
    seq: u64,
    master: usize,
    sent: Instant,
    acked: Instant,
}

/// The record, even after a panic elsewhere (the test's own, with its figures).
fn lock(record: &Mutex<Record>) -> std::sync::MutexGuard<'_, Record> {
    record.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the writers saw.
#[derive(Default)]
struct Record {
    acks: Vec<Ack>,
    /// Policies refused `ALREADY_EXISTS` on an attempt after a failed one: committed by an
    /// earlier attempt whose answer was lost.
    committed_earlier: Vec<String>,
    /// Attempts that failed and were sent again.
    failures: Vec<Failed>,
    /// Policies still without a definite answer when the writers were told to give up.
    abandoned: Vec<String>,
    /// Answers that cannot be right: `ALREADY_EXISTS` on a first attempt (every policy is new),
    /// a definite refusal, a policy stored under another id.
    wrong: Vec<String>,
}

/// An attempt that failed (and was sent again): through which master, its code and the master's
/// reason (none when the status did not come from the master: the client's deadline, a broken
/// connection), when its answer came.
struct Failed {
    master: usize,
    code: Code,
    reason: Option<Reason>,
    at: Instant,
}

/// Failed attempts counted by code and reason: `Unavailable/DatabaseUnavailable 12, ...`.
fn by_code<'a>(failures: impl Iterator<Item = &'a Failed>) -> BTreeMap<String, usize> {
    let mut by_code = BTreeMap::new();
    for failed in failures {
        let key = match failed.reason {
            Some(reason) => format!("{:?}/{reason:?}", failed.code),
            None => format!("{:?}", failed.code),
        };
        *by_code.entry(key).or_insert(0) += 1;
    }
    by_code
}

impl Record {
    fn unavailable(&self) -> usize {
        self.failures
            .iter()
            .filter(|f| f.code == Code::Unavailable)
            .count()
    }

    /// The first acknowledgement by `master` of an attempt answered after `since`, and the first
    /// of an attempt sent after `since`.
    fn back_after(&self, master: usize, since: Instant) -> (Option<Instant>, Option<Instant>) {
        let mine = || self.acks.iter().filter(move |a| a.master == master);
        (
            mine().map(|a| a.acked).filter(|&at| at > since).min(),
            mine().filter(|a| a.sent > since).map(|a| a.acked).min(),
        )
    }
}

/// Codes that say for sure what became of an insert (besides OK and ALREADY_EXISTS): the
/// request itself was refused, nothing was written. Anything else (UNAVAILABLE, the client's
/// deadline, a broken connection, a database error) may hide a commit: the attempt is sent
/// again until the answer is OK or ALREADY_EXISTS.
fn definite_refusal(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Unimplemented
    )
}

/// Writers inserting new policies until stopped; each sends a policy again until it gets a
/// definite answer.
struct Writers {
    record: Arc<Mutex<Record>>,
    stop: Arc<AtomicBool>,
    give_up: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    fn start(clients: Vec<(usize, Client)>, tag: &str) -> Writers {
        let record = Arc::new(Mutex::new(Record::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let give_up = Arc::new(AtomicBool::new(false));
        let tasks = clients
            .into_iter()
            .enumerate()
            .map(|(writer, (master, client))| {
                let (record, stop, give_up) = (record.clone(), stop.clone(), give_up.clone());
                let tag = format!("{tag}-w{writer}");
                tokio::spawn(write(client, master, tag, record, stop, give_up))
            })
            .collect();
        Writers {
            record,
            stop,
            give_up,
            tasks,
        }
    }

    /// Stops the writers: each settles the policy in hand (up to [`SETTLE`], after which it is
    /// abandoned) and ends.
    async fn stop(self) -> Record {
        self.stop.store(true, Ordering::SeqCst);
        let give_up = self.give_up.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(SETTLE).await;
            give_up.store(true, Ordering::SeqCst);
        });
        for task in self.tasks {
            within(SETTLE.as_secs() + 30, "a writer to stop", task)
                .await
                .expect("a writer task");
        }
        timer.abort();
        std::mem::take(&mut *lock(&self.record))
    }
}

async fn write(
    mut client: Client,
    master: usize,
    tag: String,
    record: Arc<Mutex<Record>>,
    stop: Arc<AtomicBool>,
    give_up: Arc<AtomicBool>,
) {
    for n in 0.. {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let id = format!("{tag}-{n}");
        let json = policy(&id);
        let mut failed_before = false;
        loop {
            if give_up.load(Ordering::SeqCst) {
                lock(&record).abandoned.push(id);
                return;
            }
            let sent = Instant::now();
            let answer = insert_with_deadline(&mut client, &json, CALL_DEADLINE).await;
            // Whether the policy is settled.
            let settled = {
                let mut record = lock(&record);
                match answer {
                    Ok(stored) => {
                        if stored.id != id {
                            record
                                .wrong
                                .push(format!("{id} acknowledged as {}", stored.id));
                        }
                        record.acks.push(Ack {
                            id: id.clone(),
                            seq: stored.seq,
                            master,
                            sent,
                            acked: Instant::now(),
                        });
                        true
                    }
                    Err(status) if errors::reason(&status) == Some(Reason::PolicyExists) => {
                        if failed_before {
                            record.committed_earlier.push(id.clone());
                        } else {
                            record.wrong.push(format!(
                                "{id}: ALREADY_EXISTS on its first attempt: {status:?}"
                            ));
                        }
                        true
                    }
                    Err(status) if definite_refusal(status.code()) => {
                        record.wrong.push(format!("{id}: refused: {status:?}"));
                        true
                    }
                    Err(status) => {
                        failed_before = true;
                        record.failures.push(Failed {
                            master,
                            code: status.code(),
                            reason: errors::reason(&status),
                            at: Instant::now(),
                        });
                        false
                    }
                }
            };
            if settled {
                break;
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
}

/// The `grpc.health.v1` status of a master's `ledger.v1.LedgerService` (`NOT_SERVING` while
/// its database does not answer), or why there is none, within 3 s.
async fn health_now(master: &Master) -> String {
    let check = async {
        let channel = tonic::transport::Channel::from_shared(master.url())
            .unwrap()
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let answer = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: "ledger.v1.LedgerService".into(),
            })
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(
            ServingStatus::try_from(answer.into_inner().status)
                .map_or("unknown".into(), |s| s.as_str_name().to_string()),
        )
    };
    match tokio::time::timeout(Duration::from_secs(3), check).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => "no answer within 3 s".into(),
    }
}

fn secs(duration: Duration) -> String {
    format!("{:.2} s", duration.as_secs_f64())
}

/// One line of figures about what the writers saw so far.
fn writes_line(record: &Record) -> String {
    let per_master: Vec<String> = (0..2)
        .map(|m| {
            format!(
                "m{} {}",
                m + 1,
                record.acks.iter().filter(|a| a.master == m).count()
            )
        })
        .collect();
    format!(
        "{} acknowledged ({}), {} committed by an earlier attempt, {} retries ({}; {} \
         UNAVAILABLE), {} abandoned",
        record.acks.len(),
        per_master.join(", "),
        record.committed_earlier.len(),
        record.failures.len(),
        show(&by_code(record.failures.iter())),
        record.unavailable(),
        record.abandoned.len(),
    )
}

/// The number of times a member's log says a master sent it a snapshot (a reset of its file).
fn snapshots(member: &Member) -> usize {
    member
        .run_logs()
        .matches("the master sends a snapshot")
        .count()
}

async fn failover(kind: Failure, peer: Option<&PeerHost>) {
    let began = Instant::now();
    // A primary and its synchronous standby, throwaway clusters of their own.
    let (primary, standby) = tokio::task::block_in_place(|| {
        let primary = match peer {
            Some(peer) => Cluster::start_primary_in(peer, false),
            None => Cluster::start_primary(false),
        };
        let standby = Cluster::start_standby_of(&primary);
        primary.wait_sync_standby(Duration::from_secs(30));
        (primary, standby)
    });
    let database = primary.server().create_database();
    let name = database.rsplit('/').next().unwrap();
    // The URL as an operator writes it: both hosts, read-write sessions, nothing else.
    let url = format!(
        "postgres://ledger@{},{}/{name}?target_session_attrs=read-write",
        primary.host_port(),
        standby.host_port()
    );
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let masters: Vec<Master> = dirs
        .iter()
        .map(|dir| Master::start(dir.path(), &["--database-url", &url]))
        .collect();
    let member_dir = tempfile::tempdir().unwrap();
    let addresses: Vec<String> = masters.iter().map(|m| m.addr.to_string()).collect();
    let member = Member::start(member_dir.path(), &addresses, &["--retry-max", "500ms"]);
    member.wait_for_log(30, "caught up with master").await;
    let snapshots_before = snapshots(&member);
    let mut clients = Vec::new();
    for master in &masters {
        clients.push(master.client().await);
    }
    let ready = began.elapsed();

    let mut writer_clients = Vec::new();
    for writer in 0..WRITERS {
        writer_clients.push((writer % 2, masters[writer % 2].client().await));
    }
    let writers = Writers::start(writer_clients, kind.tag());
    tokio::time::sleep(WRITES_BEFORE).await;

    let failed_at = Instant::now();
    let what = tokio::task::block_in_place(|| match kind {
        Failure::Killed => format!("{} processes SIGKILLed", primary.kill9()),
        Failure::Frozen => format!("{} processes SIGSTOPped", primary.freeze()),
        Failure::CutOff => {
            peer.expect("a peer host").cut_off();
            format!(
                "packets from {} to {} dropped",
                primary.host(),
                peer.unwrap().local_ip()
            )
        }
    });
    let injected = failed_at.elapsed();
    tokio::time::sleep_until((failed_at + PROMOTE_AFTER).into()).await;
    let promoting_at = Instant::now();
    tokio::task::block_in_place(|| standby.promote());
    let promoted_at = Instant::now();

    // Each master must take writes again: wait for an acknowledgement of a write sent after
    // the promotion, by each.
    let back = {
        let record = writers.record.clone();
        let deadline = promoted_at + WAIT_WRITES_BACK;
        loop {
            let back: Vec<_> = (0..2)
                .map(|m| lock(&record).back_after(m, promoted_at))
                .collect();
            if back.iter().all(|(_, sent_after)| sent_after.is_some()) || Instant::now() > deadline
            {
                break back;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let timeline = format!(
        "{what} in {}, standby promoted {} after (pg_ctl promote took {})",
        secs(injected),
        secs(promoting_at - failed_at),
        secs(promoted_at - promoting_at)
    );
    let since_promotion =
        |at: Option<Instant>| at.map_or("never".to_string(), |at| secs(at - promoted_at));
    let back_line: Vec<String> = back
        .iter()
        .enumerate()
        .map(|(m, (first, sent_after))| {
            format!(
                "m{} first ack {} after the promotion, of a write sent after it {}",
                m + 1,
                since_promotion(*first),
                since_promotion(*sent_after)
            )
        })
        .collect();
    let back_line = back_line.join("; ");
    if back.iter().any(|(_, sent_after)| sent_after.is_none()) {
        // The masters did not come back: say how they stand, then fail (the masters' and the
        // member's logs follow, printed as they are dropped).
        let mut state = Vec::new();
        for (m, master) in masters.iter().enumerate() {
            let health = health_now(master).await;
            let record = lock(&writers.record);
            let last_ack = record
                .acks
                .iter()
                .filter(|a| a.master == m)
                .map(|a| a.acked)
                .max();
            let since = by_code(
                record
                    .failures
                    .iter()
                    .filter(|f| f.master == m && f.at > promoted_at),
            );
            state.push(format!(
                "m{}: last ack {}, attempts failed since the promotion: {}, health {health}",
                m + 1,
                last_ack.map_or("never".into(), |at| if at < failed_at {
                    format!("{} before the failure", secs(failed_at - at))
                } else {
                    format!("{} after the failure", secs(at - failed_at))
                }),
                show(&since),
            ));
        }
        println!(
            "failover: {}: WRITES NOT BACK: {}; {timeline}; {back_line}",
            kind.name(),
            writes_line(&lock(&writers.record))
        );
        panic!(
            "{}: a master acknowledged no write sent after the promotion within {} of it \
             ({back_line}): {}",
            kind.name(),
            secs(WAIT_WRITES_BACK),
            state.join("; ")
        );
    }
    // Both back: a little more writing, then stop.
    tokio::time::sleep(WRITES_AFTER).await;
    let record = writers.stop().await;
    let stopped_at = Instant::now();

    // The member follows one master at a time: its file must reach each master's ledger.
    for client in &clients {
        wait_converged(client, &member.file, CONVERGE_SECS).await;
    }
    let converged = stopped_at.elapsed();
    let resets = snapshots(&member) - snapshots_before;
    let file_md5 = member.file_md5().expect("the member's file");
    let mut digests = Vec::new();
    let mut ledgers = Vec::new();
    for client in &mut clients {
        let head = info(client).await;
        digests.push((head.head_seq, head.digest));
        ledgers.push(all_policies(client).await);
    }
    let file_ids = python_ledger_ids(&member.file).await;
    let health: Vec<String> = {
        let mut all = Vec::new();
        for master in &masters {
            all.push(health_now(master).await);
        }
        all
    };

    println!(
        "failover: {}: {}; {timeline}; {back_line}; member: {} reset(s), converged {} after the \
         writers stopped; ledger {} policies at seq {}; masters' health at the end: {}; set-up \
         {}, whole test {}",
        kind.name(),
        writes_line(&record),
        resets,
        secs(converged),
        ledgers[0].len(),
        digests[0].0,
        health.join(", "),
        secs(ready),
        secs(began.elapsed()),
    );

    assert!(record.wrong.is_empty(), "wrong answers: {:?}", record.wrong);
    // No id acknowledged twice, no seq given to two acknowledgements.
    let mut acks_by_id: HashMap<&str, usize> = HashMap::new();
    let mut ids_by_seq: HashMap<u64, &str> = HashMap::new();
    for ack in &record.acks {
        *acks_by_id.entry(&ack.id).or_insert(0) += 1;
        if let Some(other) = ids_by_seq.insert(ack.seq, &ack.id) {
            panic!(
                "seq {} acknowledged for {other} and for {}",
                ack.seq, ack.id
            );
        }
    }
    let twice: Vec<_> = acks_by_id.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "ids acknowledged more than once: {twice:?}"
    );
    // Every acknowledged id in each master's ledger and in the member's file, exactly once; in
    // the masters' ledgers at the seq it was acknowledged with. So is every id known committed
    // by an earlier attempt.
    for (m, ledger) in ledgers.iter().enumerate() {
        let mut seqs: HashMap<&str, Vec<u64>> = HashMap::new();
        for policy in ledger {
            seqs.entry(&policy.id).or_default().push(policy.seq);
        }
        for ack in &record.acks {
            assert_eq!(
                seqs.get(ack.id.as_str()),
                Some(&vec![ack.seq]),
                "{} (acknowledged by m{} at seq {}) in m{}'s ledger",
                ack.id,
                ack.master + 1,
                ack.seq,
                m + 1
            );
        }
        for id in &record.committed_earlier {
            assert_eq!(
                seqs.get(id.as_str()).map(Vec::len),
                Some(1),
                "{id} (committed by an earlier attempt) in m{}'s ledger",
                m + 1
            );
        }
    }
    let mut in_file: HashMap<&str, usize> = HashMap::new();
    for id in &file_ids {
        *in_file.entry(id).or_insert(0) += 1;
    }
    for id in record
        .acks
        .iter()
        .map(|a| &a.id)
        .chain(&record.committed_earlier)
    {
        assert_eq!(
            in_file.get(id.as_str()),
            Some(&1),
            "{id} in the member's file"
        );
    }
    // Writes back within the limit, on each master.
    for (m, (_, sent_after)) in back.iter().enumerate() {
        let after = sent_after.expect("checked above") - promoted_at;
        assert!(
            after <= WRITES_BACK_WITHIN,
            "{}: m{} acknowledged a write sent after the promotion only {} after it (limit {}): \
             {back_line}",
            kind.name(),
            m + 1,
            secs(after),
            secs(WRITES_BACK_WITHIN)
        );
    }
    // The member converged to both masters without a reset, and both masters hold one ledger:
    // the member's file.
    assert_eq!(
        resets,
        0,
        "the member resumed from its seq, without a snapshot:\n{}",
        member.run_logs()
    );
    assert_eq!(digests[0], digests[1], "both masters hold the same ledger");
    assert_eq!(
        digests[0].1, file_md5,
        "the member's file is the masters' ledger"
    );
    assert!(
        record.acks.iter().any(|a| a.acked < failed_at),
        "writes were acknowledged before the failure"
    );
    // Keep the clusters (the frozen or cut-off primary too) until the end.
    drop((primary, standby));
}
