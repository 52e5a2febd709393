//! The markdown table of `--against etcd`: each measure's median per system, Ledger's ratio to
//! etcd per backend, the target of that ratio and whether this run met it.

use super::Results;
use super::systems::Kind;
use crate::stats::median;

/// The target of a Ledger/etcd ratio.
#[derive(Clone, Copy)]
enum Target {
    /// ratio ≥ x.
    AtLeast(f64),
    /// ratio ≤ x.
    AtMost(f64),
    /// ratio < x (strictly ahead).
    Below(f64),
}

impl Target {
    /// Whether `ratio` meets it (never for a ratio that was not measured).
    fn met(self, ratio: f64) -> bool {
        match self {
            Target::AtLeast(x) => ratio >= x,
            Target::AtMost(x) => ratio <= x,
            Target::Below(x) => ratio < x,
        }
    }

    /// `≥ 1.5×`, `≤ 1×`, `< 1×`.
    fn text(self) -> String {
        match self {
            Target::AtLeast(x) => format!("≥ {x}×"),
            Target::AtMost(x) => format!("≤ {x}×"),
            Target::Below(x) => format!("< {x}×"),
        }
    }
}

/// One row: its name, how to get a system's value of each round, the targets of the ratio for
/// SQLite and PostgreSQL (`None`: no target; whether bigger or smaller is better is in the
/// target: ≥ for writes/s, ≤ or < for the rest) and the decimals of a cell.
struct Row {
    name: &'static str,
    value: fn(&Results) -> Vec<f64>,
    sqlite: Option<Target>,
    pg: Option<Target>,
    digits: usize,
    /// A breakdown after a Ledger-PG cell (master and PostgreSQL apart), if any.
    detail: Option<fn(&Results) -> String>,
}

/// The rows, in the order of the brief (issue 16, point 1).
fn rows() -> Vec<Row> {
    use Target::*;
    let row = |name, value, sqlite, pg, digits| Row {
        name,
        value,
        sqlite,
        pg,
        digits,
        detail: None,
    };
    vec![
        row(
            "writes/s, 1 client",
            |r| r.writes_1.iter().map(|o| o.per_second()).collect(),
            Some(AtLeast(1.5)),
            Some(AtLeast(1.0)),
            0,
        ),
        row(
            "writes/s, 16 clients, one connection",
            |r| r.writes_16.clone(),
            Some(AtLeast(1.2)),
            None,
            0,
        ),
        row(
            "writes/s, 64 clients, one connection",
            |r| r.writes_64.clone(),
            Some(AtLeast(1.2)),
            Some(AtLeast(1.2)),
            0,
        ),
        Row {
            detail: Some(|r| {
                let master = median(
                    &r.writes_1
                        .iter()
                        .map(|o| o.kib_per_write().1)
                        .collect::<Vec<_>>(),
                );
                let pg = median(
                    &r.writes_1
                        .iter()
                        .filter_map(|o| o.kib_per_write().2)
                        .collect::<Vec<_>>(),
                );
                format!(" (master {master:.2} + PG {pg:.2})")
            }),
            ..row(
                "KiB written to disk per write, 1 client (write_bytes)",
                |r| r.writes_1.iter().map(|o| o.kib_per_write().0).collect(),
                Some(AtMost(2.0)),
                Some(AtMost(2.0)),
                2,
            )
        },
        row(
            "KiB the whole disk wrote per write, 1 client (all processes: cross-check)",
            |r| {
                r.writes_1
                    .iter()
                    .map(|o| o.device_kib_per_write())
                    .collect()
            },
            None,
            None,
            2,
        ),
        Row {
            detail: Some(|r| {
                let master = median(
                    &r.writes_1
                        .iter()
                        .map(|o| o.cpu_us_per_write().1)
                        .collect::<Vec<_>>(),
                );
                let pg = median(
                    &r.writes_1
                        .iter()
                        .filter_map(|o| o.cpu_us_per_write().2)
                        .collect::<Vec<_>>(),
                );
                format!(" (master {master:.0} + PG {pg:.0})")
            }),
            ..row(
                "server CPU µs per write, 1 client",
                |r| r.writes_1.iter().map(|o| o.cpu_us_per_write().0).collect(),
                None,
                None,
                0,
            )
        },
        row(
            "time to open 1,000 streams, one connection each (s)",
            |r| r.fanout.iter().map(|f| f.open_seconds).collect(),
            Some(AtMost(1.0)),
            Some(AtMost(1.0)),
            3,
        ),
        row(
            "propagation after the send, 10 subscribers, p50 ms",
            |r| r.propagation.iter().map(|p| p.from_send.p50).collect(),
            Some(AtMost(1.0)),
            Some(AtMost(1.0)),
            2,
        ),
        row(
            "propagation after the send, 10 subscribers, p99 ms",
            |r| r.propagation.iter().map(|p| p.from_send.p99).collect(),
            Some(AtMost(1.0)),
            Some(AtMost(1.0)),
            2,
        ),
        row(
            "server RSS KiB per idle subscriber",
            |r| r.fanout.iter().map(|f| f.kib_per_stream()).collect(),
            Some(Below(1.0)),
            Some(Below(1.0)),
            1,
        ),
        row(
            "fresh client reads every entry (s)",
            |r| r.fresh_read.clone(),
            Some(Below(1.0)),
            Some(Below(1.0)),
            3,
        ),
    ]
}

/// `x` with `digits` decimals, `-` when not measured.
fn cell(x: f64, digits: usize) -> String {
    if x.is_finite() {
        format!("{x:.digits$}")
    } else {
        "-".into()
    }
}

/// The targets of a row, in one cell: one text when both backends share it.
fn target_text(sqlite: Option<Target>, pg: Option<Target>) -> String {
    let text = |t: Option<Target>| t.map_or("-".to_string(), Target::text);
    let (s, p) = (text(sqlite), text(pg));
    if s == p {
        format!("{s} (both)")
    } else {
        format!("SQLite {s}, PG {p}")
    }
}

/// The medians of a row per system, SQLite, PG, etcd.
fn medians(row: &Row, results: &[Results; 3]) -> [f64; 3] {
    [0, 1, 2].map(|i| median(&(row.value)(&results[i])))
}

/// A row's Ledger/etcd ratios (of the medians) and whether each met its target.
pub(crate) struct Verdict {
    /// The row's name.
    pub(crate) measure: &'static str,
    /// Ledger-SQLite / etcd.
    pub(crate) sqlite: f64,
    /// Ledger-PG / etcd.
    pub(crate) postgres: f64,
    /// Whether SQLite met its target (`None`: no target).
    pub(crate) sqlite_met: Option<bool>,
    /// Whether PG met its target (`None`: no target).
    pub(crate) postgres_met: Option<bool>,
}

/// The verdict of every row, for the JSON report.
pub(crate) fn verdicts(results: &[Results; 3]) -> Vec<Verdict> {
    rows()
        .iter()
        .map(|row| {
            let m = medians(row, results);
            let (sqlite, postgres) = (m[0] / m[2], m[1] / m[2]);
            Verdict {
                measure: row.name,
                sqlite,
                postgres,
                sqlite_met: row.sqlite.map(|t| t.met(sqlite)),
                postgres_met: row.pg.map(|t| t.met(postgres)),
            }
        })
        .collect()
}

/// The table. `entries` is the size of the fresh read (100,000, or 20,000 with `--quick`).
pub(crate) fn table(results: &[Results; 3], entries: u64) -> String {
    let mut t = format!(
        "| measure | {} | {} | {} | SQLite / etcd | PG / etcd | target (Ledger / etcd) | met (SQLite / PG) |\n\
         |---|---|---|---|---|---|---|---|\n",
        Kind::ALL[0].label(),
        Kind::ALL[1].label(),
        Kind::ALL[2].label()
    );
    let yes_no = |m: Option<bool>| match m {
        Some(true) => "yes",
        Some(false) => "no",
        None => "-",
    };
    for row in rows() {
        let m = medians(&row, results);
        let (rs, rp) = (m[0] / m[2], m[1] / m[2]);
        let name = if row.name.starts_with("fresh client") {
            format!("fresh client reads {entries} entries (s)")
        } else {
            row.name.to_string()
        };
        let pg_detail = match row.detail {
            Some(detail) if !results[1].writes_1.is_empty() => detail(&results[1]),
            _ => String::new(),
        };
        t += &format!(
            "| {name} | {} | {}{pg_detail} | {} | {} | {} | {} | {} / {} |\n",
            cell(m[0], row.digits),
            cell(m[1], row.digits),
            cell(m[2], row.digits),
            cell(rs, 2),
            cell(rp, 2),
            target_text(row.sqlite, row.pg),
            yes_no(row.sqlite.map(|x| x.met(rs))),
            yes_no(row.pg.map(|x| x.met(rp))),
        );
    }
    t
}
