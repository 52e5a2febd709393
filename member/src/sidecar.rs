//! What a member beside an EdgeLake node did for it: foreign lines found in the ledger file
//! (pushed to the master, or set aside) and the node's reloads. The daemon keeps it in
//! `blockchain.json.sidecar` (JSON, replaced at each change), where `member status` reads it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

/// The sidecar record of one daemon, shared by the parts that update it.
#[derive(Debug, Clone)]
pub struct Sidecar {
    path: PathBuf,
    record: Arc<Mutex<Record>>,
}

/// The counters and last events, as `member status` shows them.
#[derive(Debug, Default, Clone)]
struct Record {
    foreign_found: u64,
    foreign_pushed: u64,
    foreign_deleted: u64,
    foreign_set_aside: u64,
    last_foreign: Option<Value>,
    node: Option<String>,
    reloads_ok: u64,
    reloads_failed: u64,
    last_reload: Option<Value>,
}

/// How one foreign line was dealt with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForeignOutcome {
    /// A local policy, pushed to the master (or found there already).
    Pushed,
    /// A local delete (`deleted` policy), sent to the master.
    Deleted,
    /// Not a local policy, or refused by the master: moved to `.foreign`.
    SetAside,
}

impl Sidecar {
    /// The record of the daemon of the ledger file `ledger_file`, starting from what a previous
    /// run left (counters go on across restarts).
    pub fn open(ledger_file: &Path) -> Sidecar {
        let path = sidecar_path(ledger_file);
        let mut record = Record::default();
        if let Some(previous) = read(&path) {
            let count = |key: &str| previous["foreign"][key].as_u64().unwrap_or(0);
            record.foreign_found = count("found");
            record.foreign_pushed = count("pushed");
            record.foreign_deleted = count("deleted");
            record.foreign_set_aside = count("set_aside");
            record.last_foreign =
                Some(previous["foreign"]["last"].clone()).filter(|v| !v.is_null());
            let reloads = |key: &str| previous["node"][key].as_u64().unwrap_or(0);
            record.reloads_ok = reloads("reloads_ok");
            record.reloads_failed = reloads("reloads_failed");
            record.last_reload =
                Some(previous["node"]["last_reload"].clone()).filter(|v| !v.is_null());
        }
        Sidecar {
            path,
            record: Arc::new(Mutex::new(record)),
        }
    }

    /// The node this member tells about changes (`--node-rest` / `--node-tcp`), for the record.
    pub fn set_node(&self, node: &str) {
        self.update(|r| r.node = Some(node.to_string()));
    }

    /// A foreign line (`bytes` at `range` of the file) was dealt with as `outcome`.
    pub fn foreign_line(&self, outcome: ForeignOutcome, range: (u64, u64), detail: &str) {
        crate::metrics::foreign_line(outcome);
        self.update(|r| {
            r.foreign_found += 1;
            match outcome {
                ForeignOutcome::Pushed => r.foreign_pushed += 1,
                ForeignOutcome::Deleted => r.foreign_deleted += 1,
                ForeignOutcome::SetAside => r.foreign_set_aside += 1,
            }
            r.last_foreign = Some(json!({
                "at": now(),
                "bytes": format!("{}..{}", range.0, range.1),
                "outcome": match outcome {
                    ForeignOutcome::Pushed => "pushed",
                    ForeignOutcome::Deleted => "deleted",
                    ForeignOutcome::SetAside => "set_aside",
                },
                "detail": detail,
            }));
        });
    }

    /// A foreign line (at `range`) was set aside for `reason`; `.foreign` now holds `total`
    /// lines (the count is taken from it, so a crash cannot make the two disagree).
    pub fn foreign_set_aside(&self, range: (u64, u64), reason: &str, total: u64) {
        self.foreign_line(ForeignOutcome::SetAside, range, reason);
        self.update(|r| r.foreign_set_aside = total);
    }

    /// The node was asked to reload its metadata: `error` is `None` when it answered.
    pub fn reload_done(&self, error: Option<&str>) {
        self.update(|r| {
            match error {
                None => r.reloads_ok += 1,
                Some(_) => r.reloads_failed += 1,
            }
            r.last_reload = Some(json!({"at": now(), "ok": error.is_none(), "error": error}));
        });
    }

    fn update(&self, change: impl FnOnce(&mut Record)) {
        let text = {
            let mut record = self.record.lock().expect("sidecar record");
            change(&mut record);
            to_json(&record).to_string()
        };
        // Informational: a failed write is logged and the next change writes it again.
        let tmp = self.path.with_extension("sidecar.tmp");
        if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &self.path))
        {
            tracing::debug!("cannot write {}: {e}", self.path.display());
        }
    }
}

/// `blockchain.json.sidecar` beside `blockchain.json`.
pub fn sidecar_path(ledger_file: &Path) -> PathBuf {
    let mut name = ledger_file.as_os_str().to_owned();
    name.push(".sidecar");
    PathBuf::from(name)
}

/// What the daemon of `ledger_file` recorded, for `member status`; `None` when it never did.
pub fn read(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn to_json(r: &Record) -> Value {
    json!({
        "foreign": {
            "found": r.foreign_found,
            "pushed": r.foreign_pushed,
            "deleted": r.foreign_deleted,
            "set_aside": r.foreign_set_aside,
            "last": r.last_foreign,
        },
        "node": {
            "target": r.node,
            "reloads_ok": r.reloads_ok,
            "reloads_failed": r.reloads_failed,
            "last_reload": r.last_reload,
        },
    })
}

fn now() -> String {
    ledger_anylog::date::format_date(chrono::Utc::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = dir.path().join("blockchain.json");
        let sidecar = Sidecar::open(&ledger);
        sidecar.foreign_line(ForeignOutcome::Pushed, (10, 20), "id x");
        sidecar.foreign_line(ForeignOutcome::SetAside, (20, 25), "not JSON");
        sidecar.reload_done(Some("connection refused"));
        sidecar.reload_done(None);
        let again = Sidecar::open(&ledger);
        again.foreign_line(ForeignOutcome::Deleted, (0, 5), "id y");
        let shown = read(&sidecar_path(&ledger)).unwrap();
        assert_eq!(shown["foreign"]["found"], 3);
        assert_eq!(shown["foreign"]["pushed"], 1);
        assert_eq!(shown["foreign"]["deleted"], 1);
        assert_eq!(shown["foreign"]["set_aside"], 1);
        assert_eq!(shown["foreign"]["last"]["bytes"], "0..5");
        assert_eq!(shown["node"]["reloads_ok"], 1);
        assert_eq!(shown["node"]["reloads_failed"], 1);
        assert_eq!(shown["node"]["last_reload"]["ok"], true);
    }
}
