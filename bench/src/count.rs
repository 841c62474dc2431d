//! `bdr-bench count-update [system]` and `count-insert [system]`: the instructions B's
//! apply process executes per applied transaction, counted by valgrind's callgrind.
//!
//! Why: CPU time per transaction moves by ±5–10% between runs on this shared 2-core
//! machine, so a change worth 2% in the apply path cannot be seen with `perf` or
//! `/proc` times. An instruction count is the same from run to run to well under 1%.
//! It is a proxy, not the criterion: it leaves out the kernel (system calls) and the
//! cost of cache misses, which the timed workloads in `make bench` still measure.
//!
//! How: the pair is set up as for workload 1 (`count-insert`) or 1b (`count-update`),
//! then B is restarted with its postgres run under `valgrind --tool=callgrind
//! --dump-before=ProcessConfigFile`, so that every server process writes its counts and
//! starts again from zero whenever it reloads its configuration. With B's apply process
//! caught up and idle, `pg_reload_conf()` on B starts the count; A commits the
//! transactions; once B has the last one, a second `pg_reload_conf()` ends it. The
//! apply process's dump between the two reloads holds exactly the catch-up (plus a few
//! idle wake-ups). The report goes to `bench/results/count-<shape>-<system>.txt` with
//! `callgrind_annotate`'s self and inclusive listings.

use crate::profile::{publish, random_updates, update_setup};
use crate::{apply_pid, pgbench_transactions, scale, setup, System};
use pg_test::{wait_until, Node};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// What the counted transactions are.
#[derive(Clone, Copy)]
pub enum Shape {
    /// Single-row INSERTs into `small` (workload 1).
    Insert,
    /// Single-row UPDATEs of random rows of `big` (workload 1b).
    Update,
}

/// `bdr-bench count-insert|count-update [system]`.
pub fn count(sys: System, shape: Shape) {
    // Under callgrind the apply process runs ~50 times slower: a tenth of the profile's
    // transactions still gives a count per transaction that does not move.
    let n = (10_000.0 * scale()) as i64;
    let (c, rows) = match shape {
        Shape::Update => update_setup(sys),
        Shape::Insert => (setup(sys, 2), 0),
    };
    let (a, b) = (c.node(0), c.node(1));
    let dir = restart_under_callgrind(sys, b);
    // B's apply process is up and caught up once a row committed on A now is on B.
    let marker = |label: &str| {
        a.execute("INSERT INTO small (v) VALUES (-2)");
        let want: i64 = a.query_scalar("SELECT count(*) FROM small");
        wait_until(label, Duration::from_secs(600), || {
            b.query_scalar::<i64>("SELECT count(*) FROM small") >= want
        });
    };
    marker("B's apply process, under valgrind, caught up");
    let pid = apply_pid(sys, b).expect("B's apply process");
    let first = reload_and_dump(b, &dir, pid, 0);
    // Workload 1's regime by default: the transactions are committed while B's apply
    // waits on a lock of the table, then applied as a backlog (the peer's walsender
    // reads WAL that is all there). `BENCH_COUNT_LIVE=1`: B follows A as A commits (a
    // walsender at the head of its WAL sends a keepalive per transaction).
    let live = std::env::var("BENCH_COUNT_LIVE").is_ok_and(|v| v == "1");
    let table = match shape {
        Shape::Update => "big",
        Shape::Insert => "small",
    };
    let mut lock = b.connect();
    if !live {
        lock.batch_execute(&format!("BEGIN; LOCK TABLE {table} IN SHARE MODE"))
            .unwrap();
    }
    let txns = match shape {
        Shape::Update => random_updates(a, n, rows),
        Shape::Insert => {
            pgbench_transactions(a, 4, n, "INSERT INTO small (v) VALUES (1);\n");
            (n / 4) * 4
        }
    };
    if !live {
        lock.batch_execute("COMMIT").unwrap();
    }
    drop(lock);
    marker("the catch-up under valgrind");
    assert_eq!(
        apply_pid(sys, b),
        Some(pid),
        "B's apply process restarted during the count"
    );
    let dump = reload_and_dump(b, &dir, pid, first);
    let text = std::fs::read_to_string(dump_path(&dir, pid, dump)).unwrap();
    let total = totals(&text);
    let per = total as f64 / txns as f64;
    let all_events = events(&text)
        .iter()
        .map(|(name, n)| format!("{name} {:.0}", *n as f64 / txns as f64))
        .collect::<Vec<_>>()
        .join(", ");
    // callgrind_annotate's percentages are of the dump's `summary:`, which after a
    // `--dump-before` counts only part of the dump; every figure here is recomputed from
    // `totals:`. The frames that were on the stack when the count began are listed with
    // the whole count even as self cost: in the self listing they are left out.
    let annotate = |inclusive: bool, lines: usize| {
        let out = Command::new("callgrind_annotate")
            .args([
                "--threshold=100",
                &format!("--inclusive={}", if inclusive { "yes" } else { "no" }),
            ])
            .arg(dump_path(&dir, pid, dump))
            .output()
            .expect("callgrind_annotate (install valgrind)");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip_while(|l| !l.contains("file:function"))
            .skip(2)
            .filter_map(|l| {
                let (count, rest) = l.trim_start().split_once(' ')?;
                let count: u64 = count.replace(',', "").parse().ok()?;
                // After the last event's "(share)" (one per event with the cache model).
                let name = rest.rsplit_once(")  ").map_or(rest, |(_, n)| n);
                let name = name.split_once(':').map_or(name, |(_, f)| f);
                (inclusive || (count as f64) < 0.99 * total as f64).then(|| {
                    format!(
                        "{:>9.0} {:>6.2}%  {name}",
                        count as f64 / txns as f64,
                        100.0 * count as f64 / total as f64
                    )
                })
            })
            .take(lines)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let what = match shape {
        Shape::Update => format!("{txns} single-row UPDATE transactions (random rows of {rows})"),
        Shape::Insert => format!("{txns} single-row INSERT transactions"),
    };
    let cycles = estimated_cycles(&events(&text)).map_or(String::new(), |c| {
        format!(
            "\nestimated cycles per transaction (callgrind's model: Ir + 10 x (L1 misses + \
             mispredicted branches) + 100 x LL misses): {:.0}",
            c as f64 / txns as f64
        )
    });
    let out = format!(
        "{} apply process, {what}, {}, counted by callgrind (user-space instructions; \
         the kernel is not counted):\n\n{per:.0} instructions per transaction ({total} in all, plus \
         two marker INSERTs)\nevery event per transaction: {all_events}{cycles}\n\nself, by function (instructions per transaction, share of \
         all):\n\n{}\n\ninclusive (callees included):\n\n{}\n",
        sys.name(),
        if live {
            "applied live (BENCH_COUNT_LIVE=1)"
        } else {
            "applied as a backlog"
        },
        annotate(false, 45),
        annotate(true, 70)
    );
    let name = match shape {
        Shape::Update => "update",
        Shape::Insert => "insert",
    };
    let live = if live { "-live" } else { "" };
    publish(&format!("count-{name}{live}-{}.txt", sys.name()), &out);
}

/// Restart `node` with its postgres run under callgrind (see the module note); returns
/// the directory the dumps go to (`cg.<pid>.<n>`).
fn restart_under_callgrind(sys: System, node: &Node) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bdr-callgrind-{}", sys.name()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let wrapper = dir.join("postgres");
    let real = pg_test::sys::pg_bindir().join("postgres");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec valgrind --tool=callgrind --quiet {}\
             --dump-before=ProcessConfigFile --callgrind-out-file={}/cg.%p {} \"$@\"\n",
            if cache_sim() {
                "--cache-sim=yes --branch-sim=yes "
            } else {
                ""
            },
            dir.display(),
            real.display()
        ),
    )
    .unwrap();
    let chown = |p: &Path| {
        if pg_test::sys::is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(p)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown postgres {}", p.display());
        }
    };
    let ok = Command::new("chmod")
        .arg("755")
        .arg(&wrapper)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "chmod {}", wrapper.display());
    chown(&dir);
    node.stop();
    node.start_with_postgres(&wrapper);
    dir
}

/// `bdr-bench count-writer [bdr|native]`: the instructions a writer's backend executes
/// per single-row INSERT transaction (workload 4b's statement, one pgbench client) on a
/// lone node: a one-node bdr group (bdr's writer-side cost: ids, hooks, commit callbacks)
/// or a node without bdr (`native`).
///
/// `BENCH_COUNT_PEERS=n`: the writer has `n` peers attached instead (workload 4b's
/// set-up: a bdr group of 1 + n nodes, or native subscriptions on n nodes), which follow
/// it live while it is counted; what a peer adds to the writer's own sessions.
pub fn count_writer(sys: System) {
    let n = (20_000.0 * scale()) as i64;
    let (c, peers) = crate::profile::writer_cluster(
        sys,
        "BENCH_COUNT_PEERS",
        &format!("count-writer-{}", sys.name()),
    );
    let a = c.node(0);
    let dir = restart_under_callgrind(sys, a);
    // A forked backend's counts start with what its postmaster had counted (callgrind's
    // counters are copied at fork): two runs of different lengths, each in a new
    // backend, and their difference is the transactions' own.
    let short = backend_events(a, &dir, n / 4);
    let long = backend_events(a, &dir, n);
    let per_txn = |f: fn(&[(String, u64)]) -> Option<u64>| {
        Some((f(&long)? as f64 - f(&short)? as f64) / (n - n / 4) as f64)
    };
    let ir = |e: &[(String, u64)]| e.first().map(|(_, v)| *v);
    let per = per_txn(ir).expect("instructions");
    let cycles = per_txn(estimated_cycles).map_or(String::new(), |c| {
        format!(
            "; estimated cycles per transaction (callgrind's model, BENCH_COUNT_CACHE=1): {c:.0}"
        )
    });
    let out = format!(
        "{} writer backend, single-row INSERT transactions (one client, {}), counted by \
         callgrind: {per:.0} instructions per transaction (runs of {} and {n} transactions, \
         each in a new backend: {} and {} instructions){cycles}\n",
        sys.name(),
        match (sys == System::Bdr, peers) {
            (true, 0) => "a one-node bdr group".to_string(),
            (false, 0) => "a node without bdr".to_string(),
            (true, p) => format!("a bdr group with {p} peer(s) following"),
            (false, p) => format!("native logical replication to {p} subscriber(s)"),
        },
        n / 4,
        ir(&short).unwrap_or(0),
        ir(&long).unwrap_or(0),
    );
    let file = match peers {
        0 => format!("count-writer-{}.txt", sys.name()),
        p => format!("count-writer-{}-{p}peers.txt", sys.name()),
    };
    publish(&file, &out);
}

/// Run `n` single-row INSERT transactions from one pgbench client on `a` (under
/// callgrind) and return every event its backend counted, from fork to exit (the sum of
/// its dumps).
fn backend_events(a: &Node, dir: &Path, n: i64) -> Vec<(String, u64)> {
    let before = dump_names(dir);
    crate::pgbench(
        a,
        &["-c", "1", "-t", &n.to_string()],
        "INSERT INTO small (v) VALUES (1);\n",
    );
    // The backend writes its last dump when it exits, a moment after pgbench: wait for
    // the largest new process's dumps to stop changing.
    let mut last = 0;
    let mut found = Vec::new();
    wait_until(
        "the backend's callgrind dump",
        Duration::from_secs(120),
        || {
            std::thread::sleep(Duration::from_millis(500));
            let mut by_pid: std::collections::HashMap<String, Vec<(String, u64)>> =
                Default::default();
            for name in dump_names(dir).difference(&before) {
                let Ok(text) = std::fs::read_to_string(dir.join(name)) else {
                    continue;
                };
                if !text.lines().any(|l| l.starts_with("totals:")) {
                    continue;
                }
                let pid = name.split('.').nth(1).unwrap_or("").to_string();
                let sum = by_pid.entry(pid).or_default();
                for (i, (event, v)) in events(&text).into_iter().enumerate() {
                    match sum.get_mut(i) {
                        Some(e) => e.1 += v,
                        None => sum.push((event, v)),
                    }
                }
            }
            let biggest = by_pid
                .into_values()
                .max_by_key(|e| e.first().map_or(0, |(_, v)| *v))
                .unwrap_or_default();
            let total = biggest.first().map_or(0, |(_, v)| *v);
            let settled = total > 0 && total == last;
            last = total;
            found = biggest;
            settled
        },
    );
    found
}

fn dump_names(dir: &Path) -> std::collections::HashSet<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("cg."))
        .collect()
}

fn dump_path(dir: &Path, pid: i32, k: u32) -> PathBuf {
    dir.join(format!("cg.{pid}.{k}"))
}

/// Ask B to reload its configuration and wait until process `pid` has written the dump
/// after `last` (callgrind numbers them 1, 2, ...); returns its number.
fn reload_and_dump(b: &Node, dir: &Path, pid: i32, last: u32) -> u32 {
    // A dump from an earlier reload (the server's own, at start) is the first one counted.
    let mut k = last;
    while dump_path(dir, pid, k + 1).exists() {
        k += 1;
    }
    b.execute("SELECT pg_reload_conf()");
    let next = k + 1;
    wait_until(
        "the apply process's callgrind dump",
        Duration::from_secs(120),
        || {
            std::fs::read_to_string(dump_path(dir, pid, next))
                .is_ok_and(|t| t.lines().any(|l| l.starts_with("totals:")))
        },
    );
    next
}

/// `BENCH_COUNT_CACHE=1`: callgrind also simulates the caches and branch predictors
/// (its model of them, not this machine's): misses and mispredictions per transaction.
fn cache_sim() -> bool {
    std::env::var("BENCH_COUNT_CACHE").is_ok_and(|v| v == "1")
}

/// The instructions of a callgrind dump's `totals:` line (its first event).
fn totals(text: &str) -> u64 {
    events(text)[0].1
}

/// The cycle estimate of KCachegrind and `callgrind_annotate` (Ir + 10 per first-level
/// miss and mispredicted branch + 100 per last-level miss), from a cache-model count's
/// events; `None` without the cache model (`BENCH_COUNT_CACHE=1`).
fn estimated_cycles(events: &[(String, u64)]) -> Option<u64> {
    let get = |name: &str| events.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
    let l1 = ["I1mr", "D1mr", "D1mw", "Bcm", "Bim"]
        .iter()
        .map(|n| get(n))
        .sum::<Option<u64>>()?;
    let ll = ["ILmr", "DLmr", "DLmw"]
        .iter()
        .map(|n| get(n))
        .sum::<Option<u64>>()?;
    Some(get("Ir")? + 10 * l1 + 100 * ll)
}

/// Every event of a callgrind dump (`events:` names, `totals:` counts).
fn events(text: &str) -> Vec<(String, u64)> {
    let line = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("a {prefix} line in the callgrind dump"))
    };
    line("events:")
        .split_whitespace()
        .zip(line("totals:").split_whitespace())
        .map(|(name, n)| (name.to_string(), n.parse().expect("a count")))
        .collect()
}
