//! Printing results: a Markdown table of several setups side by side, and
//! JSON of the same.

use std::fmt::Write;

use crate::result::BenchResult;

/// Column headers of [`markdown_table`].
const HEADERS: &[&str] = &[
    "setup",
    "job",
    "IOPS",
    "MiB/s",
    "avg µs",
    "p50 µs",
    "p99 µs",
    "p99.9 µs",
    "max µs",
    "read IOPS",
    "write IOPS",
    "errors",
    "bench CPU µs/IO",
    "engine CPU µs/IO",
];

/// A Markdown table with one row per result (setup) and one column per
/// metric. The engine CPU column shows the watched process, when there was
/// one; verify mismatches are added to the errors column as `+N bad`.
pub fn markdown_table(results: &[BenchResult]) -> String {
    let rows: Vec<Vec<String>> = results.iter().map(row).collect();
    let mut widths: Vec<usize> = HEADERS.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = (usize, String)>| {
        out.push('|');
        for (i, c) in cells {
            let pad = widths[i].saturating_sub(c.chars().count());
            // Numbers right-aligned, labels left-aligned.
            if i < 2 {
                let _ = write!(out, " {c}{} |", " ".repeat(pad));
            } else {
                let _ = write!(out, " {}{c} |", " ".repeat(pad));
            }
        }
        out.push('\n');
    };
    line(
        &mut out,
        &mut HEADERS.iter().map(|h| h.to_string()).enumerate(),
    );
    out.push('|');
    for (i, w) in widths.iter().enumerate() {
        let dashes = "-".repeat((*w).max(3));
        if i < 2 {
            let _ = write!(out, " {dashes} |");
        } else {
            let _ = write!(out, " {}: |", &dashes[1..]);
        }
    }
    out.push('\n');
    for r in rows {
        line(&mut out, &mut r.into_iter().enumerate());
    }
    out
}

fn row(r: &BenchResult) -> Vec<String> {
    let us = |v: f64| format!("{v:.1}");
    let mut errors = r.errors.to_string();
    if let Some(v) = &r.verify {
        if v.mismatches > 0 {
            let _ = write!(errors, " +{} bad", v.mismatches);
        }
    }
    vec![
        r.name.clone(),
        r.spec.describe(),
        format!("{:.0}", r.total.iops),
        format!("{:.1}", r.total.mib_per_sec),
        us(r.total.latency.mean_us),
        us(r.total.latency.p50_us),
        us(r.total.latency.p99_us),
        us(r.total.latency.p99_9_us),
        us(r.total.latency.max_us),
        format!("{:.0}", r.read.iops),
        format!("{:.0}", r.write.iops),
        errors,
        format!("{:.2}", r.cpu.job_threads_us_per_io),
        r.cpu
            .watched_us_per_io
            .map_or_else(|| String::from("-"), |v| format!("{v:.2}")),
    ]
}

/// Reduces repeated runs to one per setup: for every name (in order of first
/// appearance) the run with the median total IOPS (the lower middle one for
/// an even count). On a noisy machine, alternate the setups' runs and
/// compare medians rather than single runs.
pub fn median_runs(results: &[BenchResult]) -> Vec<BenchResult> {
    let mut names: Vec<&str> = Vec::new();
    for r in results {
        if !names.contains(&r.name.as_str()) {
            names.push(&r.name);
        }
    }
    names
        .into_iter()
        .filter_map(|name| {
            let mut runs: Vec<&BenchResult> = results.iter().filter(|r| r.name == name).collect();
            runs.sort_by(|a, b| a.total.iops.total_cmp(&b.total.iops));
            runs.get((runs.len() - 1) / 2).map(|r| (*r).clone())
        })
        .collect()
}

/// The results as pretty-printed JSON (an array, in order).
pub fn to_json(results: &[BenchResult]) -> Result<String, serde_json::Error> {
    serde_json::to_string_pretty(results)
}

/// Reads results back from [`to_json`]'s output.
pub fn from_json(text: &str) -> Result<Vec<BenchResult>, serde_json::Error> {
    serde_json::from_str(text)
}
