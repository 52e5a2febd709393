//! The report: the table of the results (markdown), from their JSON.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;

use serde_json::Value;

/// Runs a stage alone (`--only-…`): `stage` on a 2-worker runtime, its JSON printed and, with
/// `--json FILE`, written there.
pub fn run_alone(json_out: Option<&Path>, stage: impl Future<Output = Value>) {
    let runtime = crate::workload::runtime();
    let result = runtime.block_on(stage);
    let text = serde_json::to_string_pretty(&result).unwrap();
    println!("{text}");
    if let Some(path) = json_out {
        std::fs::write(path, text).expect("writing the JSON");
    }
}

fn get(v: &Value, path: &str) -> f64 {
    let mut cur = v;
    for part in path.split('.') {
        cur = match part.parse::<usize>() {
            Ok(i) => &cur[i],
            Err(_) => &cur[part],
        };
    }
    cur.as_f64().unwrap_or(f64::NAN)
}

/// A number of the results at `path`, with `digits` decimals; `-` when it was not measured.
fn number(v: &Value, path: &str, digits: usize) -> String {
    let x = get(v, path);
    if x.is_nan() {
        "-".to_string()
    } else {
        format!("{x:.digits$}")
    }
}

/// A latency distribution at `path`: p50 / p99 / max in ms.
fn dist3(v: &Value, path: &str) -> String {
    format!(
        "{} / {} / {}",
        number(v, &format!("{path}.p50_ms"), 2),
        number(v, &format!("{path}.p99_ms"), 2),
        number(v, &format!("{path}.max_ms"), 1)
    )
}

/// KiB at `path`, shown in MiB.
fn mib(v: &Value, path: &str) -> String {
    let kib = get(v, path);
    if kib.is_nan() {
        "-".to_string()
    } else {
        format!("{:.0}", kib / 1024.0)
    }
}

/// Two cells of a result as `a / b`.
fn pair(v: &Value, a: &str, b: &str, digits: usize) -> String {
    format!("{} / {}", number(v, a, digits), number(v, b, digits))
}

pub(crate) fn table(results: &HashMap<String, Value>, quick: bool) -> String {
    let e = Value::Null;
    let s = results.get("sqlite").unwrap_or(&e);
    let p = results.get("postgres").unwrap_or(&e);
    let mut t = String::new();
    t += "| measure | SQLite | PostgreSQL | target (SQLite / PostgreSQL) |\n|---|---|---|---|\n";
    // One row: the same cell of each backend's results.
    let mut row = |name: &str, target: &str, cell: &dyn Fn(&Value) -> String| {
        t += &format!("| {name} | {} | {} | {target} |\n", cell(s), cell(p));
    };
    row(
        "(1) inserts/s, 1 client, durable",
        // Throughput is judged as a ratio to etcd in one run (`--against etcd`), not against a
        // figure of another hour.
        "ratio to etcd: --against etcd",
        &|v| number(v, "insert_throughput.one_client_per_s", 0),
    );
    row(
        "(1) inserts/s, 64 clients, durable",
        "ratio to etcd: --against etcd",
        &|v| number(v, "insert_throughput.clients_64_per_s", 0),
    );
    for m in ["1", "10"] {
        let target = if m == "10" { "p50 < 2, p99 < 10" } else { "-" };
        let at = format!("propagation_200_per_s.members_{m}");
        row(
            &format!("(2) propagation at 200/s, {m} member(s): ms after the ack, p50 / p99 / max"),
            target,
            &|v| dist3(v, &format!("{at}.from_ack")),
        );
        row(
            "(2) same, ms after the insert was sent, p50 / p99 / max",
            "-",
            &|v| dist3(v, &format!("{at}.from_send")),
        );
        row(
            "(2) same, share durable in the member before the ack arrived",
            "-",
            &|v| number(v, &format!("{at}.share_durable_before_ack"), 3),
        );
    }
    row(
        "(3) 1,000 subscribers: delivery ms after the ack, p50 / p99 / max",
        "p99 < 50",
        &|v| dist3(v, "fan_out.delivery_from_ack"),
    );
    row("(3) same, ms after the insert was sent", "-", &|v| {
        dist3(v, "fan_out.delivery_from_send")
    });
    row("(3) master KiB per idle subscriber", "< 32", &|v| {
        number(v, "fan_out.master_kib_per_idle_subscriber", 1)
    });
    row("(4) catch-up 100,000 policies, s", "< 1.5", &|v| {
        number(v, "catch_up.0.seconds", 2)
    });
    row("(4) member peak RSS (100,000), MiB", "-", &|v| {
        mib(v, "catch_up.0.peak_rss_kib")
    });
    if !quick {
        row("(4) catch-up 1,000,000 policies, s", "< 15", &|v| {
            number(v, "catch_up.1.seconds", 2)
        });
        row("(4) member peak RSS (1,000,000), MiB", "< 512", &|v| {
            mib(v, "catch_up.1.peak_rss_kib")
        });
    }
    row(
        "(5) member file write per insert, ms: 100 / 100,000 policies",
        "-",
        &|v| {
            pair(
                v,
                "apply_cost.file_100.write_ms",
                "apply_cost.file_100000.write_ms",
                3,
            )
        },
    );
    row(
        "(5) apply cost ratio 100,000 / 100 (file write)",
        "< 1.5",
        &|v| number(v, "apply_cost.ratio_write", 2),
    );
    row(
        "(5) apply cost ratio 100,000 / 100 (ack-to-durable p50)",
        "< 1.5",
        &|v| number(v, "apply_cost.ratio_from_ack_p50", 2),
    );
    // Not the member's cost alone: it includes the master's commit, on a database that has just
    // taken 100,000 inserts.
    row(
        "(5) ratio 100,000 / 100, send-to-durable p50 (includes the master's commit)",
        "-",
        &|v| number(v, "apply_cost.ratio_propagation_p50", 2),
    );
    row(
        "(6) bytes to a member per new policy: stream message (+gRPC/HTTP2 framing)",
        "-",
        &|v| {
            format!(
                "{} ({})",
                number(v, "bytes_per_policy.stream_message_bytes", 0),
                number(v, "bytes_per_policy.stream_message_plus_framing_bytes", 0)
            )
        },
    );
    let model = "bytes_per_policy.model_anylog_30s_full_copy";
    row(
        "(6) MODEL AnyLog 30 s full copy, 100,000-policy ledger: bytes per member per new policy at 200/s",
        "-",
        &|v| {
            number(
                v,
                &format!("{model}.bytes_per_member_per_new_policy_at_200_per_s"),
                0,
            )
        },
    );
    row(
        "(6) MODEL AnyLog 30 s full copy: bytes per member every 30 s",
        "-",
        &|v| number(v, &format!("{model}.bytes_per_member_per_30s"), 0),
    );
    row(
        "(7) EdgeLake nodes (AnyLog protocol): pushes/s stored, 1 / 16 connections",
        "-",
        &|v| {
            pair(
                v,
                "anylog_pushes.one_connection_per_s",
                "anylog_pushes.connections_16_per_s",
                0,
            )
        },
    );
    row(
        "(7) get_blockchain of 100,000 policies to a node, s: first (read) / cached",
        "-",
        &|v| {
            pair(
                v,
                "anylog_get_blockchain_100000.first_seconds",
                "anylog_get_blockchain_100000.cached_seconds",
                2,
            )
        },
    );
    t
}
