//! The test harness: starts the real `master` (and `member`) binaries, a throwaway PostgreSQL
//! server and a local Ethereum chain (ganache), and gives tests a client for them. Nothing here
//! is a mock.

#![warn(missing_docs)]

pub mod anylog;
pub mod auth;
pub mod client;
pub mod console;
pub mod ganache;
pub mod member;
pub mod metrics;
pub mod netns;
pub mod postgres;
pub mod process;
pub mod sql;
pub mod tls;
pub mod tmpfs;

use std::future::Future;
use std::time::Duration;

pub use ganache::Ganache;
pub use member::{Member, wait_until};
pub use postgres::PostgresServer;
pub use process::{Master, TempMaster, binary};

/// Awaits `future`, failing the test after `seconds`: network tests must stop by themselves.
pub async fn within<T>(seconds: u64, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(seconds), future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {seconds}s: {what}"),
    }
}

/// The md5 hex of the `blockchain.json` holding these policy lines: the ledger's one digest.
pub use ledger_anylog::digest::of_lines as ledger_digest;

/// `name count, name count, ...` of a tally (outcomes by status code, in the fault and failover
/// tests' summaries), or `none`.
pub fn tally_line(by_name: &std::collections::BTreeMap<String, usize>) -> String {
    if by_name.is_empty() {
        return "none".into();
    }
    by_name
        .iter()
        .map(|(name, n)| format!("{name} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
