//! Statistics of the measures: percentiles, medians over runs, latency distributions.

use serde_json::{Value, json};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(crate) fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[derive(Clone, Copy, Default)]
pub(crate) struct Dist {
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    pub(crate) n: usize,
}

pub(crate) fn dist(mut ms: Vec<f64>) -> Dist {
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Dist {
        p50: percentile(&ms, 50.0),
        p99: percentile(&ms, 99.0),
        max: ms.last().copied().unwrap_or(f64::NAN),
        n: ms.len(),
    }
}

pub(crate) fn median_dist(runs: &[Dist]) -> Dist {
    Dist {
        p50: median(&runs.iter().map(|d| d.p50).collect::<Vec<_>>()),
        p99: median(&runs.iter().map(|d| d.p99).collect::<Vec<_>>()),
        max: median(&runs.iter().map(|d| d.max).collect::<Vec<_>>()),
        n: runs.iter().map(|d| d.n).sum(),
    }
}

pub(crate) fn dist_json(d: &Dist) -> Value {
    json!({"p50_ms": d.p50, "p99_ms": d.p99, "max_ms": d.max, "samples": d.n})
}
