//! The results: rows of (workload, metric) with one value per system, combined over
//! `BENCH_RUNS` runs and printed as two markdown tables — the comparison table (with
//! ratios) and the CPU-by-process table (rows whose workload starts with "cpu ").
//!
//! Combining runs: per row, the run with the median ratio vs native is shown (the ratio
//! columns are that run's); a row without a native value (bdr only, e.g. K > 1 CPU
//! rows) shows the run with the median bdr value. Rows are matched across runs by
//! (workload, metric), so a row missing from a run does not shift the others.

use std::process::Command;

pub struct Row {
    pub workload: String,
    pub metric: String,
    pub higher_is_better: bool,
    pub values: [Option<f64>; 3],
}

fn median_index(v: &[f64]) -> usize {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    idx[idx.len() / 2]
}

/// Ours / baseline `j` (1 native, 2 pglogical), > 1 means bdr is better.
fn ratio(r: &Row, j: usize) -> Option<f64> {
    match (r.values[0], r.values[j]) {
        (Some(o), Some(b)) if o > 0.0 && b > 0.0 => {
            Some(if r.higher_is_better { o / b } else { b / o })
        }
        _ => None,
    }
}

/// Pick each row's median run; also the per-run listing (ratios vs native, or bdr
/// values where there is no ratio).
fn combine(all_runs: &[Vec<Row>]) -> (Vec<Row>, String) {
    let mut keys: Vec<(String, String)> = Vec::new();
    for rows in all_runs {
        for r in rows {
            let k = (r.workload.clone(), r.metric.clone());
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
    }
    keys.sort_by(|x, y| x.0.cmp(&y.0));
    let mut per_run = String::new();
    let mut out = Vec::new();
    for (w, m) in keys {
        let found: Vec<&Row> = all_runs
            .iter()
            .filter_map(|rows| rows.iter().find(|r| r.workload == w && r.metric == m))
            .collect();
        let ratios: Vec<Option<f64>> = found.iter().map(|r| ratio(r, 1)).collect();
        let (pick, listed) = if ratios.iter().all(Option::is_some) {
            let v: Vec<f64> = ratios.iter().map(|x| x.unwrap()).collect();
            (median_index(&v), v)
        } else {
            let v: Vec<f64> = found.iter().map(|r| r.values[0].unwrap_or(0.0)).collect();
            (median_index(&v), v)
        };
        if all_runs.len() > 1 && !w.starts_with("cpu ") {
            let kind = if ratios.iter().all(Option::is_some) {
                "ratio vs native"
            } else {
                "bdr value"
            };
            per_run.push_str(&format!(
                "- {w} / {m} ({kind}): {}\n",
                listed
                    .iter()
                    .map(|x| format!("{x:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let r = found[pick];
        out.push(Row {
            workload: r.workload.clone(),
            metric: r.metric.clone(),
            higher_is_better: r.higher_is_better,
            values: r.values,
        });
    }
    (out, per_run)
}

fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
        / 1024.0;
    let pgver = String::from_utf8_lossy(
        &Command::new(pg_test::pg_bindir().join("postgres"))
            .arg("--version")
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default(),
    )
    .trim()
    .to_string();
    format!("Machine: {cores} cores, {mem:.0} GiB; {pgver}")
}

/// The whole report (markdown), from every run's rows and the runs' notes.
pub fn render(all_runs: &[Vec<Row>], notes: &[String], scale: f64) -> String {
    let runs = all_runs.len();
    let (rows, per_run) = combine(all_runs);
    let fmt = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
    let fmt_ratio = |r: &Row, j: usize| {
        ratio(r, j)
            .map(|x| format!("{x:.2}"))
            .unwrap_or_else(|| "-".into())
    };
    let mut out = format!(
        "{}; scale {scale}; {runs} run(s)\n\n\
         | workload | metric | bdr | native LR | ratio vs native | pglogical | ratio vs pglogical |\n\
         |---|---|---|---|---|---|---|\n",
        machine()
    );
    for r in rows.iter().filter(|r| !r.workload.starts_with("cpu ")) {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.workload,
            r.metric,
            fmt(r.values[0]),
            fmt(r.values[1]),
            fmt_ratio(r, 1),
            fmt(r.values[2]),
            fmt_ratio(r, 2),
        ));
    }
    out.push_str("\nratio > 1 means bdr is better (for times, latency, CPU and memory: lower is better, the ratio is baseline / bdr).\n");
    let cpu: Vec<&Row> = rows
        .iter()
        .filter(|r| r.workload.starts_with("cpu "))
        .collect();
    if !cpu.is_empty() {
        out.push_str(
            "\nCPU by process group (user + system, from /proc; A = writer, B = peer):\n\n\
             | workload | process group | bdr | native LR | pglogical |\n|---|---|---|---|---|\n",
        );
        let fmt2 = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
        for r in cpu {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                &r.workload[4..],
                r.metric,
                fmt2(r.values[0]),
                fmt2(r.values[1]),
                fmt2(r.values[2]),
            ));
        }
    }
    if runs > 1 {
        out.push_str(&format!(
            "\nPer-run values (the tables show, per row, the run with the median of these; {runs} runs):\n\n{per_run}"
        ));
    }
    if !notes.is_empty() {
        out.push_str("\nNotes:\n\n");
        let mut seen = Vec::new();
        for n in notes {
            if !seen.contains(n) {
                out.push_str(&format!("- {n}\n"));
                seen.push(n.clone());
            }
        }
    }
    out
}
