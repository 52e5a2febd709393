//! The contract client (`ledger-chain`) against a real chain: ganache from the npm registry,
//! started by the testkit, with `PolicyLedger` deployed from the committed artifact. No mocks.

mod chain {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use ledger_chain::{At, ChainClient, ChainError, ChainPolicy, RpcStats, TxHash};
    use ledger_testkit::ganache::{CHAIN_ID, Ganache, GanacheOptions, test_options};
    use ledger_testkit::within;

    const RECEIPT: Duration = Duration::from_secs(20);

    fn policy(id: &str) -> String {
        format!(
            r#"{{"operator": {{"name": "{id}", "id": "{id}", "ip": "10.0.0.5", "port": 32148}}}}"#
        )
    }

    /// Inserts `id` and waits for its successful receipt.
    async fn insert(client: &ChainClient, id: &str) -> ledger_chain::Receipt {
        let tx = within(30, "insert", client.insert(id, &policy(id)))
            .await
            .unwrap_or_else(|e| panic!("insert {id}: {e}"));
        mined(client, tx, id).await
    }

    async fn delete(client: &ChainClient, id: &str) -> ledger_chain::Receipt {
        let tx = within(30, "delete", client.delete(id))
            .await
            .unwrap_or_else(|e| panic!("delete {id}: {e}"));
        mined(client, tx, id).await
    }

    async fn mined(client: &ChainClient, tx: TxHash, id: &str) -> ledger_chain::Receipt {
        within(30, "receipt", client.wait_receipt(tx, RECEIPT))
            .await
            .unwrap_or_else(|e| panic!("receipt of {id}: {e}"))
            .check(id)
            .unwrap_or_else(|e| panic!("{id}: {e}"))
    }

    async fn ids(client: &ChainClient, at: impl Into<At>) -> Vec<String> {
        within(30, "policy_ids", client.policy_ids(at))
            .await
            .expect("policy_ids")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deploy_insert_and_read_back_at_pinned_blocks() {
        let ganache = Ganache::start();
        let client = ganache.deploy(0).await;
        let info = client.check().await.expect("check");
        assert_eq!(info.chain_id, CHAIN_ID);
        assert!(
            info.is_policy_ledger,
            "the code at the address is the artifact's"
        );
        assert_eq!(info.sender, Some(ganache.accounts()[0].address));

        let first = insert(&client, "a").await;
        insert(&client, "b").await;
        insert(&client, "c").await;
        let head = client.head().await.unwrap();
        assert!(head.number >= first.block + 2);
        assert_eq!(client.block(head.number).await.unwrap(), head);

        assert_eq!(ids(&client, head).await, ["a", "b", "c"]);
        assert_eq!(
            client.policies(&[2, 0], head).await.unwrap(),
            [policy("c"), policy("a")]
        );
        assert_eq!(client.transaction_count(head).await.unwrap(), 3);
        let counts = client.counts(head).await.unwrap();
        assert_eq!((counts.transaction_count, counts.num_policies), (3, 3));
        assert_eq!(
            client.all_policies(At::Latest).await.unwrap(),
            ["a", "b", "c"].map(|id| ChainPolicy {
                id: id.into(),
                json: policy(id)
            })
        );
        assert_eq!(client.get_policy("b", head).await.unwrap(), policy("b"));
        assert_eq!(
            client.policy_owner("b", head).await.unwrap(),
            Some(ganache.accounts()[0].address)
        );
        assert_eq!(client.policy_owner("zz", head).await.unwrap(), None);

        // The block of the first insert still shows one policy: reads are pinned.
        let then = client.block(first.block).await.unwrap();
        assert_eq!(then.hash, first.block_hash);
        assert_eq!(ids(&client, then).await, ["a"]);
        assert_eq!(client.transaction_count(then).await.unwrap(), 1);
        assert_eq!(client.num_policies(first.block - 1).await.unwrap(), 0);

        // A read of a policy past the end reverts.
        assert!(matches!(
            client.policies(&[3], head).await,
            Err(ChainError::Reverted { .. })
        ));
    }

    /// Reads of many policies go in batches (the tests' batch size is 8), pinned to a block
    /// checked in each batch: the counter shows exactly what it cost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_are_batched_and_counted() {
        let ganache = Ganache::start();
        let client = ganache.deploy(0).await;
        let ids_in: Vec<String> = (0..20).map(|i| format!("p{i:02}")).collect();
        // Sent concurrently (nonces in order), mined one by one.
        let bodies: Vec<String> = ids_in.iter().map(|id| policy(id)).collect();
        let sent = futures_util::future::join_all(
            ids_in
                .iter()
                .zip(&bodies)
                .map(|(id, body)| client.insert(id, body)),
        )
        .await;
        for (id, tx) in ids_in.iter().zip(sent) {
            mined(&client, tx.unwrap(), id).await;
        }
        let head = client.head().await.unwrap();

        let before = client.stats();
        let mut stored = ids(&client, head).await;
        // In the order the sends took the nonce lock, not the order they were started in.
        stored.sort();
        assert_eq!(stored, ids_in);
        // num_policies: one request of 2 calls (the block check and the call); the 20 ids: 3
        // batches of 8, 8 and 4 calls, each with its block check.
        assert_eq!(
            client.stats().since(before),
            RpcStats {
                http_requests: 4,
                calls: 2 + 20 + 3
            }
        );

        let before = client.stats();
        let all = client.all_policies(head).await.unwrap();
        assert_eq!(all.len(), 20);
        assert!(all.iter().all(|p| p.json == policy(&p.id)));
        assert_eq!(client.stats().since(before).http_requests, 1 + 3 + 3);

        // An idle poll: the head, then both counters in one request.
        let before = client.stats();
        client.counts(client.head().await.unwrap()).await.unwrap();
        assert_eq!(
            client.stats().since(before),
            RpcStats {
                http_requests: 2,
                calls: 4
            }
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delete_moves_the_last_policy_into_the_hole() {
        let ganache = Ganache::start();
        let client = ganache.deploy(0).await;
        for id in ["a", "b", "c", "d"] {
            insert(&client, id).await;
        }
        delete(&client, "b").await;
        let head = client.head().await.unwrap();
        assert_eq!(ids(&client, head).await, ["a", "d", "c"]);
        assert_eq!(
            client.policies(&[0, 1, 2], head).await.unwrap(),
            [policy("a"), policy("d"), policy("c")]
        );
        assert_eq!(client.transaction_count(head).await.unwrap(), 5);
        // The moved policy is found at its new place.
        assert_eq!(client.get_policy("d", head).await.unwrap(), policy("d"));

        // Deleting the last one moves nothing; deleting the only one empties the arrays.
        delete(&client, "c").await;
        assert_eq!(ids(&client, At::Latest).await, ["a", "d"]);
        delete(&client, "a").await;
        delete(&client, "d").await;
        assert!(ids(&client, At::Latest).await.is_empty());
        assert_eq!(client.transaction_count(At::Latest).await.unwrap(), 8);
        // A deleted id may be inserted again.
        insert(&client, "a").await;
        assert_eq!(ids(&client, At::Latest).await, ["a"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refusals_are_typed_errors() {
        let ganache = Ganache::start();
        let owner = ganache.deploy(0).await;
        let other = ganache.client(owner.contract(), Some(1));
        insert(&owner, "a").await;

        // Refused at the estimate: nothing is sent, no nonce is used.
        let nonce_before = nonce_of(&ganache, &owner).await;
        match owner.insert("a", &policy("a")).await {
            Err(ChainError::AlreadyExists { id }) => assert_eq!(id, "a"),
            other => panic!("duplicate insert: {other:?}"),
        }
        match owner.delete("missing").await {
            Err(ChainError::NotFound { id }) => assert_eq!(id, "missing"),
            other => panic!("delete of a missing id: {other:?}"),
        }
        match other.update("a", &policy("x")).await {
            Err(ChainError::NotOwner { id }) => assert_eq!(id, "a"),
            other => panic!("update by another account: {other:?}"),
        }
        match other.update("missing", "{}").await {
            Err(ChainError::NotFound { .. }) => {}
            other => panic!("update of a missing id: {other:?}"),
        }
        match owner.get_policy("missing", At::Latest).await {
            Err(ChainError::NotFound { id }) => assert_eq!(id, "missing"),
            other => panic!("getPolicy of a missing id: {other:?}"),
        }
        assert_eq!(nonce_of(&ganache, &owner).await, nonce_before);
        assert_eq!(owner.transaction_count(At::Latest).await.unwrap(), 1);

        // The owner may update; the policy keeps its place; the count moves.
        insert(&owner, "b").await;
        let tx = owner
            .update("a", r#"{"operator": {"name": "a2"}}"#)
            .await
            .unwrap();
        mined(&owner, tx, "a").await;
        let head = owner.head().await.unwrap();
        assert_eq!(ids(&owner, head).await, ["a", "b"]);
        assert_eq!(
            owner.policies(&[0], head).await.unwrap(),
            [r#"{"operator": {"name": "a2"}}"#]
        );
        assert_eq!(owner.transaction_count(head).await.unwrap(), 3);

        // Anyone may delete (as with EdgeLake's contract).
        let tx = other.delete("b").await.unwrap();
        mined(&other, tx, "b").await;
        assert_eq!(ids(&owner, At::Latest).await, ["a"]);
    }

    /// Two writers insert the same id into the same block: both estimates pass, the second
    /// transaction is mined and fails; its receipt's reason, found by replaying it, is the
    /// contract's, and maps to AlreadyExists.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revert_in_a_block_maps_to_its_reason() {
        let ganache = Ganache::start_with(GanacheOptions {
            block_time: 1.0,
            ..GanacheOptions::default()
        });
        let first = ganache.deploy(0).await;
        let second = ganache.client(first.contract(), Some(1));
        let a = first.insert("x", &policy("x")).await.unwrap();
        let b = second.insert("x", &policy("x")).await.unwrap();
        let a = first.wait_receipt(a, RECEIPT).await.unwrap();
        let b = second.wait_receipt(b, RECEIPT).await.unwrap();
        assert_eq!(a.block, b.block, "both in one block");
        assert!(a.success);
        assert!(!b.success);
        assert_eq!(b.revert_reason.as_deref(), Some("policy exists"));
        match b.check("x") {
            Err(ChainError::AlreadyExists { id }) => assert_eq!(id, "x"),
            other => panic!("{other:?}"),
        }
        assert_eq!(ids(&first, At::Latest).await, ["x"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_inserts_from_one_client_get_distinct_nonces() {
        let ganache = Ganache::start();
        let client = ganache.deploy(0).await;
        let first_nonce = nonce_of(&ganache, &client).await;
        let wanted: Vec<String> = (0..12).map(|i| format!("n{i}")).collect();
        // Clones share the nonce: twelve tasks on the runtime's threads, at once.
        let tasks: Vec<_> = wanted
            .iter()
            .map(|id| {
                let client = client.clone();
                let id = id.clone();
                tokio::spawn(async move { client.insert(&id, &policy(&id)).await })
            })
            .collect();
        let mut nonces = BTreeSet::new();
        for (id, task) in wanted.iter().zip(tasks) {
            let tx = task
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("insert {id}: {e}"));
            mined(&client, tx, id).await;
            let sent = ganache
                .rpc("eth_getTransactionByHash", serde_json::json!([tx]))
                .await;
            nonces.insert(
                u64::from_str_radix(sent["nonce"].as_str().unwrap().trim_start_matches("0x"), 16)
                    .unwrap(),
            );
        }
        assert_eq!(
            nonces,
            (first_nonce..first_nonce + 12).collect::<BTreeSet<_>>()
        );
        let stored: BTreeSet<String> = ids(&client, At::Latest).await.into_iter().collect();
        assert_eq!(stored, wanted.into_iter().collect());
    }

    /// evm_snapshot / evm_revert / evm_mine: the block a read was pinned to is replaced by
    /// another of the same number; the pinned read fails instead of mixing the two.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reorg_changes_what_a_pinned_read_sees() {
        let ganache = Ganache::start();
        let client = ganache.deploy(0).await;
        insert(&client, "a").await;
        let snapshot = ganache.snapshot().await;
        let gone = insert(&client, "b").await;
        let pinned = client.block(gone.block).await.unwrap();
        assert_eq!(ids(&client, pinned).await, ["a", "b"]);

        ganache.revert(&snapshot).await;
        assert_eq!(client.head().await.unwrap().number, gone.block - 1);
        // The other branch: another policy at the same height, and one more block on top.
        let other = insert(&client, "c").await;
        assert_eq!(other.block, gone.block);
        ganache.mine(1).await;
        let replaced = client.block(gone.block).await.unwrap();
        assert_ne!(replaced.hash, pinned.hash);

        for result in [
            client.policy_ids(pinned).await.map(|_| ()),
            client.counts(pinned).await.map(|_| ()),
            client.transaction_count(pinned).await.map(|_| ()),
        ] {
            match result {
                Err(ChainError::UnknownBlock { block }) => {
                    assert!(block.contains(&pinned.hash.to_string()), "{block}")
                }
                other => panic!("a read pinned to a replaced block: {other:?}"),
            }
        }
        // By number, the same height now shows the other branch.
        assert_eq!(ids(&client, gone.block).await, ["a", "c"]);
        assert_eq!(ids(&client, replaced).await, ["a", "c"]);
        assert_eq!(client.transaction_count(replaced).await.unwrap(), 2);
    }

    /// ganache stopped: every call is Unreachable (transient) and nothing hangs; restarted on
    /// the same port with its database, the contract and its policies are back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_node_and_its_return() {
        let mut ganache = Ganache::start();
        let client = ganache.deploy(0).await;
        let tx = client.insert("a", &policy("a")).await.unwrap();
        mined(&client, tx, "a").await;
        ganache.stop();

        let unreachable = |what: &str, result: Result<(), ChainError>| match result {
            Err(e @ ChainError::Unreachable { .. }) => {
                assert!(e.is_transient());
                assert!(e.to_string().contains("127.0.0.1"), "{e}");
            }
            other => panic!("{what} with ganache down: {other:?}"),
        };
        within(30, "calls to a stopped node", async {
            unreachable("head", client.head().await.map(|_| ()));
            unreachable(
                "policy_ids",
                client.policy_ids(At::Latest).await.map(|_| ()),
            );
            unreachable("counts", client.counts(5).await.map(|_| ()));
            unreachable("insert", client.insert("b", "{}").await.map(|_| ()));
            unreachable("delete", client.delete("a").await.map(|_| ()));
        })
        .await;
        match client.wait_receipt(tx, Duration::from_millis(300)).await {
            Err(ChainError::Timeout { tx: timed_out, .. }) => assert_eq!(timed_out, tx),
            other => panic!("wait_receipt with ganache down: {other:?}"),
        }

        ganache.restart();
        assert_eq!(ids(&client, At::Latest).await, ["a"]);
        // The nonce was never spent on the refused writes: the next insert goes through.
        insert(&client, "b").await;
        assert_eq!(ids(&client, At::Latest).await, ["a", "b"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn misconfigurations_are_named() {
        let ganache = Ganache::start();
        let client = ganache.deploy(0).await;
        let reader = ganache.client(client.contract(), None);
        assert_eq!(ids(&reader, At::Latest).await, Vec::<String>::new());
        assert!(matches!(
            reader.insert("a", "{}").await,
            Err(ChainError::NoKey)
        ));

        let wrong_chain = ChainClient::connect_with(
            &ganache.url(),
            client.contract(),
            Some(ganache.signer(0)),
            Some(CHAIN_ID + 1),
            test_options(),
        )
        .unwrap();
        assert!(matches!(
            wrong_chain.check().await,
            Err(ChainError::WrongChain { expected, actual }) if expected == CHAIN_ID + 1 && actual == CHAIN_ID
        ));

        // An account's address holds no code.
        let nowhere = ganache.client(ganache.accounts()[5].address, None);
        assert!(matches!(
            nowhere.check().await,
            Err(ChainError::NoContract { .. })
        ));
        assert!(matches!(
            nowhere.policy_ids(At::Latest).await,
            Err(ChainError::NoContract { .. })
        ));
        assert!(matches!(
            client.block(1_000_000).await,
            Err(ChainError::UnknownBlock { .. })
        ));
    }

    /// The text is stored once: an insert costs about 710 gas per byte of JSON (EdgeLake's
    /// contract, which stores it twice, about 1,400), and a delete moves only the last policy's
    /// id into the hole, never its text, so deleting a small policy stays cheap when the last
    /// one is large. The figures a master's policy size cap is set from.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gas_per_byte_and_cheap_deletes() {
        let ganache = Ganache::start();
        let client = ganache.deploy(0).await;
        let text = |size: usize| format!(r#"{{"x": "{}"}}"#, "a".repeat(size - 9));
        let mut gas = Vec::new();
        for (id, size) in [("small", 1_024), ("large", 16_384)] {
            let tx = client.insert(id, &text(size)).await.unwrap();
            gas.push(mined(&client, tx, id).await.gas_used);
        }
        let per_byte = (gas[1] - gas[0]) / (16_384 - 1_024);
        assert!(
            (650..=760).contains(&per_byte),
            "{per_byte} gas per byte ({gas:?})"
        );
        assert!(gas[1] < 12_500_000, "a 16 KB insert took {} gas", gas[1]);

        // "small" is first, "large" last: the delete clears the 1 KB text (~180,000 gas) and
        // moves "large"'s id; moving its 16 KB text would cost over 11 M.
        let deleted = delete(&client, "small").await;
        assert!(deleted.gas_used < 300_000, "{} gas", deleted.gas_used);
        assert_eq!(ids(&client, At::Latest).await, ["large"]);
        assert_eq!(
            client.policies(&[0], At::Latest).await.unwrap(),
            [text(16_384)]
        );
    }

    /// What the lossy endpoint does with the first `eth_sendRawTransaction` request.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Loss {
        /// Passes it on, then closes the caller's connection instead of answering: the
        /// transaction reached the node, the answer was lost.
        Answer,
        /// Closes the caller's connection without passing it on: it never reached the node.
        Request,
    }

    /// An HTTP endpoint in front of ganache that passes every JSON-RPC request on (one request
    /// per connection), but loses the first send as `loss` says. Returns its URL.
    async fn lossy_endpoint(upstream: String, loss: Loss) -> String {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let upstream = upstream.trim_start_matches("http://").to_string();
        let lost = Arc::new(AtomicBool::new(false));
        tokio::spawn(async move {
            while let Ok((mut caller, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let lost = lost.clone();
                tokio::spawn(async move {
                    // One whole request: the headers, then Content-Length bytes of body.
                    let complete = |request: &[u8]| {
                        let text = String::from_utf8_lossy(request);
                        let (head, body) = text.split_once("\r\n\r\n")?;
                        let length: usize = head.lines().find_map(|line| {
                            let (name, value) = line.split_once(':')?;
                            if name.eq_ignore_ascii_case("content-length") {
                                value.trim().parse().ok()
                            } else {
                                None
                            }
                        })?;
                        (body.len() >= length).then_some(())
                    };
                    let mut request = Vec::new();
                    let mut chunk = [0u8; 8192];
                    while complete(&request).is_none() {
                        match caller.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&request).into_owned();
                    let lose = text.contains("eth_sendRawTransaction")
                        && !lost.swap(true, Ordering::SeqCst);
                    if lose && loss == Loss::Request {
                        return;
                    }
                    // One request per upstream connection: its answer ends when it closes.
                    let text = text.replacen("\r\n", "\r\nConnection: close\r\n", 1);
                    let mut node = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                    node.write_all(text.as_bytes()).await.unwrap();
                    let mut answer = Vec::new();
                    node.read_to_end(&mut answer).await.unwrap();
                    if !lose {
                        let _ = caller.write_all(&answer).await;
                    }
                });
            }
        });
        url
    }

    /// A send whose answer is lost is `SendOutcomeUnknown` with the transaction's hash. The
    /// client's next send takes the following nonce when the node has the transaction (no two
    /// transactions on one nonce), and the same nonce when the node never got it (no gap, which
    /// would leave every later transaction pending for ever).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_send_whose_outcome_is_unknown_leaves_neither_a_gap_nor_a_clash() {
        let ganache = Ganache::start();
        let deployed = ganache.deploy(0).await;
        let direct = ganache.client(deployed.contract(), Some(1));
        for (loss, name) in [
            (Loss::Answer, "answer-lost"),
            (Loss::Request, "request-lost"),
        ] {
            let url = lossy_endpoint(ganache.url(), loss).await;
            let lossy = ChainClient::connect_with(
                &url,
                deployed.contract(),
                Some(ganache.signer(1)),
                Some(CHAIN_ID),
                test_options(),
            )
            .unwrap();
            let before = nonce_of(&ganache, &direct).await;
            let tx = match within(30, "a lost send", lossy.insert(name, &policy(name))).await {
                Err(ChainError::SendOutcomeUnknown { tx, .. }) => tx,
                other => panic!("{loss:?}: expected SendOutcomeUnknown, got {other:?}"),
            };
            let sent = if loss == Loss::Answer {
                // It reached the node: mined under the hash it was reported with.
                mined(&direct, tx, name).await;
                1
            } else {
                assert_eq!(
                    nonce_of(&ganache, &direct).await,
                    before,
                    "never reached the node"
                );
                0
            };
            let after = format!("{name}-after");
            let tx = within(30, "the next send", lossy.insert(&after, &policy(&after)))
                .await
                .unwrap_or_else(|e| panic!("{loss:?}: the next send: {e}"));
            assert!(mined(&lossy, tx, &after).await.success);
            assert_eq!(nonce_of(&ganache, &direct).await, before + sent + 1);
        }
        let held = ids(&direct, At::Latest).await;
        assert_eq!(
            held,
            ["answer-lost", "answer-lost-after", "request-lost-after"],
            "each once"
        );
    }

    /// The sender's next nonce as the node counts it.
    async fn nonce_of(ganache: &Ganache, client: &ChainClient) -> u64 {
        let count = ganache
            .rpc(
                "eth_getTransactionCount",
                serde_json::json!([client.sender().unwrap(), "pending"]),
            )
            .await;
        u64::from_str_radix(count.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
    }
}
