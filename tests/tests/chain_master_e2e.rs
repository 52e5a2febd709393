//! A master whose ledger is a contract on a real chain (issue 17): ganache from the npm registry,
//! `PolicyLedger` deployed from the committed artifact, the real `master` and `member`
//! binaries. Policies written on the contract the way EdgeLake nodes write them reach every
//! member's file; writes through the master become transactions; reorgs and restarts are the
//! next poll's diff.

use std::path::Path;
use std::time::Duration;

use ledger_chain::ChainClient;
use ledger_proto::errors::{Reason, reason};
use ledger_proto::pb;
use ledger_testkit::client::{Client, insert};
use ledger_testkit::ganache::Ganache;
use ledger_testkit::member::wait_converged;
use ledger_testkit::{Master, Member, wait_until, within};

const RECEIPT: Duration = Duration::from_secs(20);

/// A policy completed as a node completes it, and its id.
fn completed(name: &str) -> (String, String) {
    let text = format!(r#"{{"operator": {{"name": "{name}", "ip": "10.0.0.5", "port": 32148}}}}"#);
    let policy = ledger_anylog::policy::complete(&text, chrono::Utc::now()).unwrap();
    (policy.id, policy.json)
}

/// Writes `insert(id, json)` on the contract directly, as an EdgeLake node does.
async fn insert_on_chain(client: &ChainClient, id: &str, json: &str) -> u64 {
    let tx = within(30, "insert", client.insert(id, json))
        .await
        .unwrap_or_else(|e| panic!("insert {id}: {e}"));
    within(30, "receipt", client.wait_receipt(tx, RECEIPT))
        .await
        .unwrap()
        .check(id)
        .unwrap()
        .block
}

async fn delete_on_chain(client: &ChainClient, id: &str) {
    let tx = within(30, "delete", client.delete(id)).await.unwrap();
    within(30, "receipt", client.wait_receipt(tx, RECEIPT))
        .await
        .unwrap()
        .check(id)
        .unwrap();
}

async fn update_on_chain(client: &ChainClient, id: &str, json: &str) {
    let tx = within(30, "update", client.update(id, json)).await.unwrap();
    within(30, "receipt", client.wait_receipt(tx, RECEIPT))
        .await
        .unwrap()
        .check(id)
        .unwrap();
}

/// A master following `ganache`'s contract at `contract`, writing with account 1's key.
fn chain_master(dir: &Path, ganache: &Ganache, contract: &str, args: &[&str]) -> Master {
    let key = dir.join("ethereum.key");
    ganache.accounts()[1].write_key_file(&key);
    let url = ganache.url();
    let key = key.to_string_lossy().into_owned();
    let mut all = vec![
        "--ethereum-rpc",
        url.as_str(),
        "--ethereum-contract",
        contract,
        "--ethereum-key-file",
        key.as_str(),
        "--ethereum-poll",
        "100ms",
    ];
    all.extend_from_slice(args);
    Master::start(dir, &all)
}

/// The ids in a member's file, in file order.
fn file_ids(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let (_, body) = ledger_anylog::policy::parse_stored(line).unwrap();
            body["id"].as_str().unwrap().to_string()
        })
        .collect()
}

async fn file_holds(member: &Member, id: &str, present: bool, what: &str) {
    let file = member.file.clone();
    let id = id.to_string();
    wait_until(30, what, || {
        let holds = file_ids(&file).contains(&id) == present;
        async move { holds }
    })
    .await;
}

async fn info(client: &mut Client) -> pb::GetLedgerInfoResponse {
    client
        .get_ledger_info(pb::GetLedgerInfoRequest {})
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contract_written_the_edgelake_way_reaches_members_and_writes_become_transactions() {
    let ganache = Ganache::start();
    let node = ganache.deploy(0).await;
    let contract = format!("{:#x}", node.contract());
    // A ledger on chain before the master exists: it arrives as the first snapshot.
    let mut before = Vec::new();
    for name in ["op1", "op2", "op3"] {
        let (id, json) = completed(name);
        insert_on_chain(&node, &id, &json).await;
        before.push((id, json));
    }
    // One policy that is not valid on chain: skipped, never blocking the rest.
    insert_on_chain(
        &node,
        "not-its-id",
        r#"{"operator": {"name": "x", "id": "other"}}"#,
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    let master = chain_master(dir.path(), &ganache, &contract, &[]);
    let member_dir = tempfile::tempdir().unwrap();
    let member = Member::start(member_dir.path(), &[master.addr.to_string()], &[]);
    let mut client = master.client().await;
    for (id, _) in &before {
        file_holds(&member, id, true, "the chain's ledger in the member's file").await;
    }
    wait_converged(&client, &member.file, 30).await;
    let ids = file_ids(&member.file);
    assert_eq!(ids.len(), 3, "{ids:?}");
    for (id, _) in &before {
        assert!(ids.contains(id), "{id} in {ids:?}");
    }
    // The file's lines are the contract's texts (json.dumps), byte for byte.
    let text = std::fs::read_to_string(&member.file).unwrap();
    for (_, json) in &before {
        assert!(text.contains(&format!("{json}\n")), "{json}");
    }
    master
        .wait_for_log(10, "a policy on the contract is skipped")
        .await;

    // A node writes directly on the contract: insert, update, delete.
    let (new_id, new_json) = completed("op4");
    insert_on_chain(&node, &new_id, &new_json).await;
    file_holds(
        &member,
        &new_id,
        true,
        "a direct insert in the member's file",
    )
    .await;
    let updated = new_json.replace("10.0.0.5", "10.0.0.6");
    update_on_chain(&node, &new_id, &updated).await;
    let file = member.file.clone();
    wait_until(30, "the update in the member's file", || {
        let updated = std::fs::read_to_string(&file)
            .unwrap_or_default()
            .contains(&updated);
        async move { updated }
    })
    .await;
    delete_on_chain(&node, &before[0].0).await;
    file_holds(
        &member,
        &before[0].0,
        false,
        "a direct delete in the member's file",
    )
    .await;

    // A write through the master is a transaction from its key, answered with the local seq.
    let policy = within(
        60,
        "an insert through the master",
        insert(
            &mut client,
            r#"{"operator": {"name": "via-master", "ip": "10.0.0.9", "port": 1}}"#,
        ),
    )
    .await
    .expect("inserted through the chain");
    assert!(policy.seq > 0);
    let on_chain = node.get_policy(&policy.id, ledger_chain::At::Latest).await;
    assert_eq!(on_chain.unwrap(), policy.json);
    assert_eq!(
        node.policy_owner(&policy.id, ledger_chain::At::Latest)
            .await
            .unwrap(),
        Some(ganache.accounts()[1].address)
    );
    file_holds(
        &member,
        &policy.id,
        true,
        "the master's write in the member's file",
    )
    .await;
    // A duplicate is refused by the contract.
    let duplicate = insert(
        &mut client,
        r#"{"operator": {"name": "via-master", "ip": "10.0.0.9", "port": 1}}"#,
    )
    .await;
    // The same text completes to the same id only with the same date: send the stored line.
    let duplicate = match duplicate {
        Err(status) => status,
        Ok(_) => insert(&mut client, &policy.json).await.unwrap_err(),
    };
    assert_eq!(
        reason(&duplicate),
        Some(Reason::PolicyExists),
        "{duplicate:?}"
    );

    // A delete through the master.
    let deleted = client
        .delete_policy(pb::DeletePolicyRequest {
            id: policy.id.clone(),
        })
        .await
        .expect("deleted through the chain")
        .into_inner();
    assert!(deleted.seq > policy.seq);
    file_holds(
        &member,
        &policy.id,
        false,
        "the master's delete in the member's file",
    )
    .await;

    wait_converged(&client, &member.file, 30).await;
    let info = info(&mut client).await;
    let chain = info.chain.expect("GetLedgerInfo.chain on a chain master");
    let head = node.head().await.unwrap();
    assert_eq!(chain.block_number, head.number);
    assert_eq!(chain.block_hash, format!("{:#x}", head.hash));
    assert_eq!(chain.lag_blocks, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reorg_is_the_next_diff_and_confirmations_hold_writes_back() {
    let ganache = Ganache::start();
    let node = ganache.deploy(0).await;
    let contract = format!("{:#x}", node.contract());
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    // K = 0 follows the head; K = 2 stays two blocks behind.
    let head_master = chain_master(dirs[0].path(), &ganache, &contract, &[]);
    let safe_master = chain_master(
        dirs[1].path(),
        &ganache,
        &contract,
        &["--ethereum-confirmations", "2"],
    );
    let head_member = Member::start(dirs[2].path(), &[head_master.addr.to_string()], &[]);
    let safe_member = Member::start(dirs[3].path(), &[safe_master.addr.to_string()], &[]);
    let (kept, kept_json) = completed("kept");
    insert_on_chain(&node, &kept, &kept_json).await;
    ganache.mine(2).await;
    file_holds(&head_member, &kept, true, "K=0: a mined policy").await;
    file_holds(&safe_member, &kept, true, "K=2: a policy 2 blocks deep").await;

    // A policy whose transaction a reorg takes away.
    let snapshot = ganache.snapshot().await;
    let (gone, gone_json) = completed("gone");
    insert_on_chain(&node, &gone, &gone_json).await;
    file_holds(
        &head_member,
        &gone,
        true,
        "K=0: the policy before the reorg",
    )
    .await;
    ganache.mine(1).await;
    // The reorg comes while the K=0 master is frozen, and the new branch holds one more
    // transaction and one more id than the lost one: read from where the master stands, that
    // looks like one append, which it is not (the held block is gone, so every id is read).
    head_master.pause();
    ganache.revert(&snapshot).await;
    let mut replacing = Vec::new();
    for name in ["replacing-1", "replacing-2"] {
        let (id, json) = completed(name);
        insert_on_chain(&node, &id, &json).await;
        replacing.push(id);
    }
    ganache.mine(3).await;
    head_master.resume();
    file_holds(
        &head_member,
        &gone,
        false,
        "K=0: the policy deleted by the reorg",
    )
    .await;
    for id in &replacing {
        file_holds(&head_member, id, true, "K=0: the new branch's policies").await;
        file_holds(&safe_member, id, true, "K=2: the new branch's policies").await;
    }
    // K = 2 never had it: it was one block deep when the reorg came.
    assert!(!file_ids(&safe_member.file).contains(&gone));
    assert!(file_ids(&safe_member.file).contains(&kept));
    let mut head_client = head_master.client().await;
    let mut safe_client = safe_master.client().await;
    wait_converged(&head_client, &head_member.file, 30).await;
    wait_converged(&safe_client, &safe_member.file, 30).await;
    assert_eq!(
        info(&mut head_client).await.digest,
        info(&mut safe_client).await.digest
    );
    assert_eq!(
        info(&mut safe_client).await.chain.unwrap().lag_blocks,
        2,
        "K=2 follows two blocks below the head"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_of_the_chain_and_of_the_master_resume_without_duplicates() {
    let mut ganache = Ganache::start();
    let node = ganache.deploy(0).await;
    let contract = format!("{:#x}", node.contract());
    let dir = tempfile::tempdir().unwrap();
    let member_dir = tempfile::tempdir().unwrap();
    let mut master = chain_master(dir.path(), &ganache, &contract, &[]);
    let member = Member::start(member_dir.path(), &[master.addr.to_string()], &[]);
    let (a, a_json) = completed("a");
    insert_on_chain(&node, &a, &a_json).await;
    file_holds(&member, &a, true, "before the restarts").await;

    // The chain's node goes away: reads and streams go on, writes are UNAVAILABLE.
    ganache.stop();
    let mut client = master.client().await;
    let refused = insert(&mut client, r#"{"operator": {"name": "while-down"}}"#)
        .await
        .unwrap_err();
    assert_eq!(
        reason(&refused),
        Some(Reason::ChainUnavailable),
        "{refused:?}"
    );
    let not_serving = || async {
        master.health("ledger.v1.LedgerService/chain").await
            == tonic_health::pb::health_check_response::ServingStatus::NotServing
    };
    wait_until(10, "the chain's health NOT_SERVING", not_serving).await;
    assert!(
        client
            .get_policy(pb::GetPolicyRequest { id: a.clone() })
            .await
            .is_ok(),
        "reads go on from the local copy"
    );
    ganache.restart();
    let node = ganache.client(node.contract(), Some(0));
    let (b, b_json) = completed("b");
    insert_on_chain(&node, &b, &b_json).await;
    file_holds(&member, &b, true, "after the chain's restart").await;

    // The master is killed and restarts: it resumes from its stored block (or diffs again what
    // it applied after it), nothing applied twice.
    master.kill9();
    master.restart();
    let (c, c_json) = completed("c");
    insert_on_chain(&node, &c, &c_json).await;
    file_holds(&member, &c, true, "after the master's restart").await;
    let ids = file_ids(&member.file);
    assert_eq!(ids, [a, b, c], "each once, in order");
    let mut client = master.client().await;
    wait_converged(&client, &member.file, 30).await;
    assert_eq!(
        info(&mut client).await.head_seq,
        3,
        "no change applied twice"
    );
}

/// A write the master refuses says precisely why, and leaves nothing half-done on the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_pending_writes_say_why_and_nothing_is_lost() {
    let ganache = Ganache::start();
    let node = ganache.deploy(0).await;
    let contract = format!("{:#x}", node.contract());
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let count = || async {
        node.counts(ledger_chain::At::Latest)
            .await
            .unwrap()
            .transaction_count
    };

    // Without a key: FAILED_PRECONDITION naming the missing flag; nothing is sent.
    let url = ganache.url();
    let keyless = Master::start(
        dirs[0].path(),
        &[
            "--ethereum-rpc",
            &url,
            "--ethereum-contract",
            &contract,
            "--ethereum-poll",
            "100ms",
        ],
    );
    let mut client = keyless.client().await;
    let refused = insert(&mut client, r#"{"operator": {"name": "no-key"}}"#)
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert_eq!(reason(&refused), Some(Reason::ChainKeyMissing));
    assert!(
        refused.message().contains("--ethereum-key-file"),
        "{refused:?}"
    );
    let refused = client
        .delete_policy(pb::DeletePolicyRequest { id: "any".into() })
        .await
        .unwrap_err();
    assert_eq!(
        reason(&refused),
        Some(Reason::ChainKeyMissing),
        "{refused:?}"
    );
    assert_eq!(count().await, 0, "nothing sent without a key");

    // With a key, a cap of 200 bytes and a 2 s write timeout.
    let master = chain_master(
        dirs[1].path(),
        &ganache,
        &contract,
        &[
            "--ethereum-max-policy-bytes",
            "200",
            "--ethereum-write-timeout",
            "2s",
        ],
    );
    let member = Member::start(dirs[2].path(), &[master.addr.to_string()], &[]);
    let mut client = master.client().await;
    let large = format!(r#"{{"operator": {{"name": "{}"}}}}"#, "x".repeat(300));
    let refused = insert(&mut client, &large).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert_eq!(reason(&refused), Some(Reason::PolicyTooLarge));
    assert_eq!(
        ledger_proto::errors::metadata(&refused, "limit_bytes").as_deref(),
        Some("200")
    );
    let unknown = client
        .delete_policy(pb::DeletePolicyRequest {
            id: "no-such-policy".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    assert_eq!(reason(&unknown), Some(Reason::PolicyNotFound));
    assert_eq!(count().await, 0, "refused writes sent nothing");

    // Nothing is mined: the write times out UNAVAILABLE with its transaction's hash, and is
    // applied once the chain mines it.
    ganache.rpc("miner_stop", serde_json::json!([])).await;
    let pending = within(
        30,
        "an insert while nothing is mined",
        insert(&mut client, r#"{"operator": {"name": "pending"}}"#),
    )
    .await
    .unwrap_err();
    assert_eq!(pending.code(), tonic::Code::Unavailable, "{pending:?}");
    assert_eq!(reason(&pending), Some(Reason::ChainPending));
    let tx = ledger_proto::errors::metadata(&pending, "tx_hash").expect("the transaction's hash");
    ganache.rpc("miner_start", serde_json::json!([])).await;
    let tx: ledger_chain::B256 = tx.parse().expect("a transaction hash");
    let receipt = within(30, "the receipt", node.wait_receipt(tx, RECEIPT))
        .await
        .unwrap();
    assert!(receipt.success);
    wait_until(30, "the pending insert in the member's file", || {
        let text = std::fs::read_to_string(&member.file).unwrap_or_default();
        async move { text.contains(r#""name": "pending""#) }
    })
    .await;
    assert_eq!(count().await, 1, "one transaction, sent once");
}
