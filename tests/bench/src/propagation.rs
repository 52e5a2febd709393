//! (2) Propagation: from an insert to its line durable in 1 and in 10 members' files, at 200
//! inserts a second.

use std::path::{Path, PathBuf};

use ledger_testkit::Member;

use crate::stats::{Dist, dist};
use crate::watch::{arrival, wait_members, watch};
use crate::workload::{connect, head, paced_inserts, start_member};

pub(crate) struct Propagation {
    pub(crate) from_ack: Dist,
    pub(crate) from_send: Dist,
    pub(crate) ahead_of_ack: f64,
}

pub(crate) async fn propagation(
    addr: &str,
    root: &Path,
    members: usize,
    inserts: usize,
    runs: usize,
) -> Vec<Propagation> {
    let mut client = connect(addr).await;
    let dirs: Vec<PathBuf> = (0..members)
        .map(|k| {
            let d = root.join(format!("member-{members}-{k}"));
            std::fs::create_dir_all(&d).unwrap();
            d
        })
        .collect();
    let procs: Vec<Member> = dirs.iter().map(|d| start_member(d, addr, &[])).collect();
    let (h, _, _) = head(&mut client).await;
    assert!(
        wait_members(&dirs, h, 120).await,
        "members did not catch up:\n{}",
        procs[0].logs()
    );
    let mut results = Vec::new();
    for _ in 0..runs {
        let watcher = watch(dirs.clone());
        let sent = paced_inserts(&mut client, inserts, 200.0).await;
        let last = sent.last().unwrap().0;
        let ok = wait_members(&dirs, last, 60).await;
        let events = watcher.finish();
        assert!(ok, "members did not reach seq {last}");
        let (mut from_ack, mut from_send, mut ahead) = (Vec::new(), Vec::new(), 0usize);
        for ev in &events {
            for (seq, ack, sent_at) in &sent {
                let t = arrival(ev, *seq).expect("arrival recorded");
                if t < *ack {
                    ahead += 1;
                }
                from_ack.push(t.saturating_duration_since(*ack).as_secs_f64() * 1e3);
                from_send.push(t.saturating_duration_since(*sent_at).as_secs_f64() * 1e3);
            }
        }
        let n = from_ack.len();
        results.push(Propagation {
            from_ack: dist(from_ack),
            from_send: dist(from_send),
            ahead_of_ack: ahead as f64 / n as f64,
        });
    }
    drop(procs);
    results
}
