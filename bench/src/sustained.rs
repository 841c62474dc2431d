//! Workload (a), sustained load: the highest pgbench rate on A at which B's lag stays
//! under 1 s for a whole window (60 s at `BENCH_SCALE=1`), for a single-row INSERT script
//! and pgbench's built-in TPC-B-like script.
//!
//! Lag is measured with probes, not the walsender's `replay_lag`: a sampler session on A
//! inserts a `probe` row every 100 ms stamped with `clock_timestamp()` (just before its
//! commit); an ENABLE ALWAYS trigger on B stamps arrival. Apply is in commit order in all
//! three systems, so a probe waits behind whatever backlog the load built; the window
//! passes when every probe arrived and the largest arrival − stamp is under 1 s.
//!
//! Search: an unthrottled run gives the writer's maximum M (with B applying meanwhile);
//! then probes at 100%, 85%, 70%, 55%, 40% of M (`pgbench -R`), highest first; the first
//! that passes is reported, with the TPS pgbench actually achieved. B catches up fully
//! (bounded wait) before each run.
//!
//! Invariants: the same tables, pgbench scale and clients for all three systems;
//! `pgbench_history` gets a primary key column (`hid`) everywhere, since bdr needs one.

use crate::{pgbench, put, scale, setup_with, tps, Row, Setup, System};
use pg_test::{wait_until, Node};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// pgbench scale of the TPC-B-like tables (and the number of clients).
const PGBENCH_SCALE: u32 = 4;
const CLIENTS: &str = "4";
/// Highest lag a passing window may show, seconds.
const MAX_LAG: f64 = 1.0;

/// Wait until B has every probe A committed so far (bounded).
fn caught_up(a: &Node, b: &Node) {
    a.execute("INSERT INTO probe (sent_at) VALUES (clock_timestamp())");
    let sent: i64 = a.query_scalar("SELECT count(*) FROM probe");
    wait_until("B catches up", Duration::from_secs(900), || {
        b.query_scalar::<i64>("SELECT count(*) FROM probe") >= sent
    });
}

/// What one throttled window showed.
struct Window {
    tps: f64,
    max_lag: f64,
    p99_lag: f64,
    probes: i64,
}

/// `pgbench -R rate` for `secs` with the probe sampler running; then B's lag of the
/// window's probes.
fn window(a: &Node, b: &Node, script: &str, rate: f64, secs: u64) -> Window {
    let start: String = a.query_scalar("SELECT clock_timestamp()::text");
    let stop = AtomicBool::new(false);
    let mut sampler = a.connect();
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                sampler
                    .batch_execute("INSERT INTO probe (sent_at) VALUES (clock_timestamp())")
                    .expect("probe insert");
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let out = pgbench(
            a,
            &[
                "-c",
                CLIENTS,
                "-j",
                "2",
                "-R",
                &format!("{rate:.0}"),
                "-T",
                &secs.to_string(),
            ],
            script,
        );
        stop.store(true, Ordering::Relaxed);
        out
    });
    let filter = format!("sent_at >= '{start}'");
    let sent: i64 = a.query_scalar(&format!("SELECT count(*) FROM probe WHERE {filter}"));
    wait_until("window's probes arrive", Duration::from_secs(900), || {
        b.query_scalar::<i64>(&format!("SELECT count(*) FROM probe WHERE {filter}")) >= sent
    });
    let r = b
        .connect()
        .query_one(
            &format!(
                "SELECT coalesce(max(s), 0), coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY s), 0) \
                   FROM (SELECT extract(epoch FROM recv_at - sent_at)::float8 AS s FROM probe \
                          WHERE {filter}) x"
            ),
            &[],
        )
        .unwrap();
    Window {
        tps: tps(&out),
        max_lag: r.get(0),
        p99_lag: r.get(1),
        probes: sent,
    }
}

/// Workload (a) for `sys`: two scripts, each searched as described above.
pub fn sustained(sys: System, rows: &mut Vec<Row>) {
    let secs = ((60.0 * scale()) as u64).max(5);
    let max_secs = ((15.0 * scale()) as u64).max(5);
    eprintln!(
        "== {}: sustained load ({secs} s windows, pgbench scale {PGBENCH_SCALE})",
        sys.name()
    );
    let c = setup_with(
        sys,
        2,
        &Setup {
            pgbench_scale: Some(PGBENCH_SCALE),
            ..Setup::default()
        },
    );
    let (a, b) = (c.node(0), c.node(1));
    for (name, script) in [
        ("single-row INSERT", "INSERT INTO small (v) VALUES (1);\n"),
        ("TPC-B-like", "builtin:tpcb-like"),
    ] {
        let workload = format!("a. sustained, {name}");
        let m = tps(&pgbench(
            a,
            &["-c", CLIENTS, "-j", "2", "-T", &max_secs.to_string()],
            script,
        ));
        caught_up(a, b);
        eprintln!("   {name}: unthrottled {m:.0} TPS");
        put(
            rows,
            sys,
            &workload,
            "writer max TPS (unthrottled)",
            true,
            m,
        );
        let mut best = None;
        for frac in [1.0, 0.85, 0.7, 0.55, 0.4] {
            let w = window(a, b, script, m * frac, secs);
            let pass = w.max_lag < MAX_LAG;
            eprintln!(
                "   {name}: -R {:.0} ({:.0}% of max): {:.0} TPS, lag max {:.3} s, p99 {:.3} s over {} probes: {}",
                m * frac,
                frac * 100.0,
                w.tps,
                w.max_lag,
                w.p99_lag,
                w.probes,
                if pass { "pass" } else { "fail" }
            );
            caught_up(a, b);
            if pass {
                best = Some((w.tps, frac));
                break;
            }
        }
        // None passed: 0, so the table shows it rather than hiding the row.
        let (t, frac) = best.unwrap_or((0.0, 0.0));
        put(rows, sys, &workload, "highest TPS with lag < 1 s", true, t);
        put(
            rows,
            sys,
            &workload,
            "that rate as % of writer max",
            true,
            frac * 100.0,
        );
    }
}
