//! (4) Catch-up: a fresh member on a big ledger, the time until its file is complete and its
//! peak memory.

use std::path::Path;
use std::time::{Duration, Instant};

use ledger_testkit::Member;
use ledger_testkit::process::proc_status_kib;

use crate::workload::{start_member, state_seq};

pub(crate) struct CatchUp {
    pub(crate) seconds: f64,
    pub(crate) peak_rss_kib: u64,
}

/// A fresh member on the master's ledger: seconds until its state records the head (the file
/// complete and fsynced), and its VmHWM.
pub(crate) async fn catch_up(
    addr: &str,
    dir: &Path,
    head_seq: u64,
    extra: &[&str],
) -> (CatchUp, Member) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let start = Instant::now();
    let member = start_member(dir, addr, extra);
    let deadline = start + Duration::from_secs(600);
    let mut peak = 0;
    loop {
        if state_seq(dir).is_some_and(|s| s >= head_seq) {
            break;
        }
        peak = peak.max(proc_status_kib(member.pid(), "VmHWM:"));
        assert!(
            Instant::now() < deadline,
            "catch-up did not finish:\n{}",
            member.logs()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    peak = peak.max(proc_status_kib(member.pid(), "VmHWM:"));
    (
        CatchUp {
            seconds,
            peak_rss_kib: peak,
        },
        member,
    )
}
