//! `bdr-bench profile [system]` (`make bench-profile`), `profile-big [system]` and
//! `profile-writer [system]`: flat `perf` profiles of the processes a workload's time goes to, with the CPU every
//! server process of both nodes used meanwhile.
//!
//! - `profile`: B's apply process while it catches up on small INSERT transactions
//!   (workload 1's shape, apply held then released).
//! - `profile-update`: the same for small UPDATE transactions (workload 1b's shape:
//!   single-row UPDATEs of random rows of a pre-loaded table).
//! - `profile-big`: workload 0 — A's walsender (decoding after COMMIT + output plugin) and
//!   B's apply process, each in its own `perf record`, from the COMMIT of one big
//!   transaction on A until its rows are visible on B (apply not held).
//! - `profile-writer`: the writer backends of a lone node (see [`profile_writer`]).
//! - `profile-live`: B's apply process following A live under 4 writing clients
//!   (workload 4b's shape with one peer, see [`profile_live`]).
//! - `profile-decode`: the backend running workload 5's `pg_logical_slot_peek_binary_changes`,
//!   bdr's plugin and pgoutput over the same WAL, timed in alternating rounds first (see
//!   [`profile_decode`]).
//!
//! Reports go to `bench/results/profile-<system>.txt`, `profile-update-<system>.txt`,
//! `profile-big-<system>.txt`,
//! `profile-writer-<system>.txt` and `profile-decode-{bdr,pgoutput}.txt`.

use crate::procs;
use crate::{apply_pid, hold, pgbench_transactions, release, scale, setup, walsender_pid, System};
use pg_test::wait_until;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

fn results_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Start `perf record` (call graphs) on `pid`, writing to `data`.
fn perf_record(pid: i32, data: &Path) -> Child {
    Command::new("perf")
        .args(["record", "-F", "2000", "--call-graph", "dwarf,16384", "-o"])
        .arg(data)
        .args(["-p", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("perf (install linux-perf)")
}

/// With `BENCH_TRACE=strace`, the catch-up profiles count the apply process's system calls
/// (`strace -c`) instead of sampling it with `perf`: what it asks of the kernel per
/// transaction, which the user-space profile and callgrind do not show.
fn tracing_syscalls() -> bool {
    std::env::var("BENCH_TRACE").is_ok_and(|v| v == "strace")
}

/// Start `perf record` on `pid`, or `strace -c` with `BENCH_TRACE=strace`.
fn trace_start(pid: i32, data: &Path) -> Child {
    if !tracing_syscalls() {
        return perf_record(pid, data);
    }
    Command::new("strace")
        .args(["-c", "-U", "name,calls,total-time", "-o"])
        .arg(data)
        .args(["-p", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("strace")
}

/// The report of [`trace_start`]'s tracer, `txns` transactions applied meanwhile.
fn trace_report(data: &Path, txns: i64) -> String {
    if !tracing_syscalls() {
        return format!(
            "perf record -F 2000 of the apply process, {}",
            perf_report(data)
        );
    }
    let text = std::fs::read_to_string(data).unwrap_or_default();
    let per_txn = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let calls: f64 = f.get(1)?.parse().ok()?;
            Some(format!("{:>10.3}  {}", calls / txns as f64, f.first()?))
        })
        .collect::<Vec<_>>()
        .join("\n");
    format!("strace -c of the apply process, system calls per transaction:\n{per_txn}\n\n{text}")
}

fn perf_stop(mut perf: Child) {
    let _ = Command::new("kill")
        .args(["-INT", &perf.id().to_string()])
        .status();
    perf.wait().unwrap();
}

/// Self time by symbol, then inclusive time of the stages (children included).
fn perf_report(data: &Path) -> String {
    let report = |args: &[&str], keep: &dyn Fn(&str) -> bool, max: usize| {
        let out = Command::new("perf")
            .args(["report", "--stdio", "-g", "none", "-i"])
            .arg(data)
            .args(args)
            .output()
            .expect("perf report");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty() && keep(l))
            .take(max)
            .map(|l| {
                // perf pads the symbol column to the widest name: collapse the padding.
                l.split("   ")
                    .map(str::trim)
                    .filter(|x| !x.is_empty())
                    .collect::<Vec<_>>()
                    .join("  ")
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let text = report(
        &[
            "--no-children",
            "--sort",
            "dso,symbol",
            "--percent-limit",
            "0.7",
        ],
        &|_| true,
        50,
    );
    let stages = report(
        &["--children", "--sort", "symbol", "--percent-limit", "1.5"],
        &|l| {
            ![
                "inlined",
                "closure",
                "cee_scape",
                "call_from_c",
                "pg_guard",
                "catch_unwind",
            ]
            .iter()
            .any(|x| l.contains(x))
                && !l.contains("0x0000")
        },
        60,
    );
    format!("self time by symbol:\n\n{text}\n\ninclusive time (children included):\n\n{stages}\n")
}

/// `bdr-bench profile`: B's apply process during workload 1's catch-up.
pub fn profile(sys: System) {
    let n = (100_000.0 * scale()) as i64;
    let c = setup(sys, 2);
    let (a, b) = (c.node(0), c.node(1));
    hold(sys, b);
    pgbench_transactions(a, 4, n, "INSERT INTO small (v) VALUES (1);\n");
    let committed: i64 = a.query_scalar("SELECT count(*) FROM small");
    let what = format!("{committed} single-row INSERT transactions");
    let name = format!("profile-{}.txt", sys.name());
    profile_catch_up(sys, a, b, (committed, committed), &what, &name);
}

/// `bdr-bench profile-update`: B's apply process during workload 1b's catch-up: single-row
/// UPDATEs of random rows of a pre-loaded table (`big`, 1M rows at scale 1, loaded and
/// replicated before the apply is held), then one marker INSERT into `small` committed
/// last (apply is in commit order, so its arrival means every update is applied).
pub fn profile_update(sys: System) {
    let n = (100_000.0 * scale()) as i64;
    let (c, rows) = update_setup(sys);
    let (a, b) = (c.node(0), c.node(1));
    hold(sys, b);
    let updates = random_updates(a, n, rows);
    let total: i64 = a.query_scalar("SELECT count(*) FROM small");
    let what = format!("{updates} single-row UPDATE transactions (random rows of {rows})");
    let name = format!("profile-update-{}.txt", sys.name());
    profile_catch_up(sys, a, b, (total, updates), &what, &name);
}

/// A pair for workload 1b's shape: `big` loaded on A (1M rows at scale 1), replicated,
/// then vacuumed and analyzed on B (as after autovacuum), so both systems start from the
/// same state. Returns the cluster and the row count.
pub(crate) fn update_setup(sys: System) -> (pg_test::Cluster, i64) {
    let rows = (1_000_000.0 * scale()) as i64;
    let c = setup(sys, 2);
    let (a, b) = (c.node(0), c.node(1));
    a.execute(&format!(
        "INSERT INTO big SELECT g, 'row ' || g FROM generate_series(1, {rows}) g"
    ));
    wait_until("the table loaded on B", Duration::from_secs(1800), || {
        b.query_scalar::<i64>("SELECT count(*) FROM big") >= rows
    });
    // Both systems start from the same state: table and indexes freshly vacuumed and
    // analyzed on B, as they would be after autovacuum.
    b.execute("VACUUM ANALYZE big");
    let layout: String = b.query_scalar(
        "SELECT format('table %s pages, index %s pages, %s rows/page', \
                pg_relation_size('big') / 8192, pg_indexes_size('big') / 8192, \
                round(reltuples / greatest(relpages, 1))) FROM pg_class WHERE relname = 'big'",
    );
    eprintln!("   B's table before the updates: {layout}");
    (c, rows)
}

/// Commit about `n` single-row UPDATE transactions of random rows of `big` (1..=`rows`) on
/// `a` with 4 clients, then one marker INSERT into `small` (apply is in commit order: its
/// arrival means every update is applied). The random ids are the same from run to run
/// and system to system (a fixed seed). Returns the number of updates.
pub(crate) fn random_updates(a: &pg_test::Node, n: i64, rows: i64) -> i64 {
    crate::pgbench(
        a,
        &[
            "-c",
            "4",
            "-j",
            "2",
            "-t",
            &(n / 4).to_string(),
            "--random-seed=1",
        ],
        &format!("\\set id random(1, {rows})\nUPDATE big SET v = 'updated' WHERE id = :id;\n"),
    );
    a.execute("INSERT INTO small (v) VALUES (-1)");
    (n / 4) * 4
}

/// Release B's held apply, `perf record` its apply process until `small` has `committed`
/// rows on B (`txns` transactions to apply), and publish the report as `name`.
fn profile_catch_up(
    sys: System,
    a: &pg_test::Node,
    b: &pg_test::Node,
    (committed, txns): (i64, i64),
    what: &str,
    name: &str,
) {
    // The bdr worker stays up while paused: perf is attached before the release (it
    // needs a moment to attach; the paused worker applies nothing meanwhile), so the
    // profile covers the whole catch-up. The baselines' workers start on release (after
    // the launcher's delay, before which they apply nothing either).
    let pid_before = apply_pid(sys, b);
    let data = std::env::temp_dir().join(format!("bdr-apply-{}.perf", sys.name()));
    let early = pid_before.map(|pid| {
        let perf = trace_start(pid, &data);
        std::thread::sleep(Duration::from_millis(500));
        perf
    });
    let cpu_before = procs::snapshot(&[a, b]);
    let t0 = Instant::now();
    release(sys, b);
    let perf = early.unwrap_or_else(|| {
        let mut pid = None;
        wait_until("apply process", Duration::from_secs(60), || {
            pid = apply_pid(sys, b);
            pid.is_some()
        });
        trace_start(pid.unwrap(), &data)
    });
    pin_if_asked(sys, b);
    wait_until("catch-up", Duration::from_secs(1800), || {
        b.query_scalar::<i64>("SELECT count(*) FROM small") >= committed
    });
    let secs = t0.elapsed().as_secs_f64();
    let cpu_table = procs::by_process(&cpu_before, &procs::snapshot(&[a, b]));
    perf_stop(perf);
    let out = format!(
        "{} apply process, {what} in {secs:.1}s \
         ({:.0} transactions/s)\n\nCPU used during the catch-up, by process (both nodes):\n{cpu_table}\n{}",
        sys.name(),
        txns as f64 / secs,
        trace_report(&data, txns)
    );
    publish(name, &out);
}

/// A diagnostic: with `BENCH_PIN_CPU=<n>`, B's apply process and B's WAL writer are
/// pinned to CPU n for the catch-up, so that the WAL writer's wake-up at an asynchronous
/// commit never has to reach another (possibly idle) CPU.
fn pin_if_asked(sys: System, b: &pg_test::Node) {
    let Ok(cpu) = std::env::var("BENCH_PIN_CPU") else {
        return;
    };
    let walwriter: i32 =
        b.query_scalar("SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'");
    let pids = [apply_pid(sys, b).expect("B's apply process"), walwriter];
    for pid in pids {
        let ok = std::process::Command::new("taskset")
            .args(["-pc", &cpu, &pid.to_string()])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(ok, "taskset -pc {cpu} {pid} failed");
    }
    eprintln!("   pinned B's apply process and WAL writer ({pids:?}) to CPU {cpu}");
}

/// `bdr-bench profile-big`: A's walsender and B's apply process from the COMMIT of one
/// big transaction on A until it is visible on B (workload 0).
pub fn profile_big(sys: System) {
    let n = (1_000_000.0 * scale()) as i64;
    let c = setup(sys, 2);
    let (a, b) = (c.node(0), c.node(1));
    let sender = walsender_pid(a).expect("A's walsender");
    let applier = apply_pid(sys, b).expect("B's apply process");
    let mut ca = a.connect();
    ca.batch_execute(&format!(
        "BEGIN; INSERT INTO big0 SELECT g, 'row ' || g FROM generate_series(1, {n}) g"
    ))
    .unwrap();
    let d_send = std::env::temp_dir().join(format!("bdr-big-walsender-{}.perf", sys.name()));
    let d_apply = std::env::temp_dir().join(format!("bdr-big-apply-{}.perf", sys.name()));
    let p1 = perf_record(sender, &d_send);
    let p2 = perf_record(applier, &d_apply);
    // perf needs a moment to attach; nothing is being decoded or applied yet.
    std::thread::sleep(Duration::from_millis(500));
    let cpu_before = procs::snapshot(&[a, b]);
    let t0 = Instant::now();
    ca.batch_execute("COMMIT; INSERT INTO marker (id, sent_at) VALUES (1, clock_timestamp())")
        .unwrap();
    crate::wait_for_marker(b);
    let secs = t0.elapsed().as_secs_f64();
    let cpu_table = procs::by_process(&cpu_before, &procs::snapshot(&[a, b]));
    perf_stop(p1);
    perf_stop(p2);
    let out = format!(
        "{}: one {n}-row INSERT transaction, COMMIT on A -> visible on B in {secs:.1}s\n\n\
         CPU used meanwhile, by process (both nodes):\n{cpu_table}\n\
         == A's walsender (pid {sender}), perf record -F 2000, {}\n\
         == B's apply process (pid {applier}), perf record -F 2000, {}",
        sys.name(),
        perf_report(&d_send),
        perf_report(&d_apply)
    );
    publish(&format!("profile-big-{}.txt", sys.name()), &out);
}

/// The writer of the writer-side profiles and counts: with `n` peers when the environment
/// variable `peers_var` says so (workload 4b's set-up: a bdr group of 1 + n nodes, or
/// native subscriptions on n nodes), else a lone node (a one-node bdr group, or plain
/// PostgreSQL for `native`). The writer is node 0. Returns the cluster and n.
pub(crate) fn writer_cluster(
    sys: System,
    peers_var: &str,
    name: &str,
) -> (pg_test::Cluster, usize) {
    let peers = crate::env_count(peers_var).unwrap_or(0);
    if peers > 0 {
        return (setup(sys, 1 + peers), peers);
    }
    let c = pg_test::Cluster::builder()
        .name(name)
        .nodes(1)
        .preload_bdr(sys == System::Bdr)
        .start();
    let a = c.node(0);
    a.execute(crate::TABLES);
    if sys == System::Bdr {
        a.execute("CREATE EXTENSION bdr");
        a.execute(&format!("SELECT bdr.group_create('node1', '{}')", a.dsn()));
    }
    (c, 0)
}

/// `bdr-bench profile-writer [bdr|native]`: the writer backends of one node with no peers
/// (a one-node bdr group, or plain PostgreSQL for `native`) while 4 pgbench clients commit
/// single-row INSERTs as fast as they can (workload 4b's shape): what bdr adds to a
/// writer's own path (ids, triggers, hooks, commit callbacks).
///
/// `BENCH_PEERS=2`: the same with two peers attached (workload 4b itself), to see what the
/// writer's backends pay for them.
pub fn profile_writer(sys: System) {
    let secs = ((20.0 * scale()) as u64).max(5);
    let (c, peers) = writer_cluster(sys, "BENCH_PEERS", "bench-prof-writer");
    let a = c.node(0);
    let before: i64 = a.query_scalar("SELECT count(*) FROM small");
    let out = std::thread::scope(|s| {
        let bench = s.spawn(|| {
            crate::pgbench(
                a,
                &["-c", "4", "-j", "2", "-T", &secs.to_string()],
                "INSERT INTO small (v) VALUES (1);\n",
            )
        });
        let mut pids: Vec<i32> = Vec::new();
        wait_until("pgbench's sessions", Duration::from_secs(60), || {
            pids = a
                .connect()
                .query(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgbench'",
                    &[],
                )
                .map(|r| r.iter().map(|r| r.get(0)).collect())
                .unwrap_or_default();
            pids.len() == 4
        });
        let data = std::env::temp_dir().join(format!("bdr-writer-{}.perf", sys.name()));
        let list: Vec<String> = pids.iter().map(|p| p.to_string()).collect();
        let perf = Command::new("perf")
            .args(["record", "-F", "1000", "--call-graph", "dwarf,16384", "-o"])
            .arg(&data)
            .args(["-p", &list.join(",")])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("perf (install linux-perf)");
        let text = bench.join().unwrap();
        perf_stop(perf);
        (text, data)
    });
    let after: i64 = a.query_scalar("SELECT count(*) FROM small");
    let report = format!(
        "{}: 4 pgbench clients, single-row INSERT, {secs} s, {peers} peers: {:.0} TPS ({} rows)\n\n\
         perf record -F 1000 of the 4 writer backends, {}",
        sys.name(),
        crate::tps(&out.0),
        after - before,
        perf_report(&out.1)
    );
    let peers_tag = if peers > 0 {
        format!("-{peers}peers")
    } else {
        String::new()
    };
    publish(
        &format!("profile-writer{peers_tag}-{}.txt", sys.name()),
        &report,
    );
}

/// `bdr-bench profile-live`: B's apply process while it follows A live (apply not held):
/// 4 pgbench clients commit single-row INSERTs on A for a while, as in workload 4b, and
/// B applies each transaction as it arrives (one wake-up per transaction or few, unlike
/// a backlog's catch-up).
pub fn profile_live(sys: System) {
    let secs = ((20.0 * scale()) as u64).max(5);
    let c = setup(sys, 2);
    let (a, b) = (c.node(0), c.node(1));
    let mut pid = None;
    wait_until("apply process", Duration::from_secs(60), || {
        pid = apply_pid(sys, b);
        pid.is_some()
    });
    let before: i64 = a.query_scalar("SELECT count(*) FROM small");
    let data = std::env::temp_dir().join(format!("bdr-live-{}.perf", sys.name()));
    let cpu_before = procs::snapshot(&[a, b]);
    let perf = trace_start(pid.unwrap(), &data);
    let out = crate::pgbench(
        a,
        &["-c", "4", "-j", "2", "-T", &secs.to_string()],
        "INSERT INTO small (v) VALUES (1);\n",
    );
    let committed: i64 = a.query_scalar("SELECT count(*) FROM small");
    wait_until("B caught up", Duration::from_secs(600), || {
        b.query_scalar::<i64>("SELECT count(*) FROM small") >= committed
    });
    perf_stop(perf);
    let cpu_table = procs::by_process(&cpu_before, &procs::snapshot(&[a, b]));
    let report = format!(
        "{} apply process following A live: 4 pgbench clients, single-row INSERT, {secs} s, \
         {:.0} TPS on A ({} transactions)\n\nCPU used meanwhile, by process (both nodes):\n\
         {cpu_table}\nB's {}",
        sys.name(),
        crate::tps(&out),
        committed - before,
        trace_report(&data, committed - before)
    );
    publish(&format!("profile-live-{}.txt", sys.name()), &report);
}

/// `bdr-bench profile-decode`: workload 5's WAL (a big INSERT and an UPDATE of a quarter of
/// it), peeked through the bdr plugin and pgoutput from one backend. First
/// `BENCH_DECODE_ROUNDS` (default 5) alternating rounds of both, after one warm-up peek
/// each: every peek's MB/s by wall time and by the backend's CPU time, and each plugin's
/// median (one peek is a fraction of a second at scale 0.5, so a single one, as workload
/// 5 takes, moves a lot on a shared machine; the CPU time much less). Then the walsender
/// path: 3 rounds per peek round of `pg_recvlogical` reading a copy of each slot, the
/// walsender's CPU counted as the postmaster's exited children's. Then `perf record` of
/// the backend over 3 peeks of each plugin.
pub fn profile_decode() {
    let rounds = crate::env_count("BENCH_DECODE_ROUNDS").unwrap_or(5).max(1);
    let (c, mb) = crate::decode_setup();
    let a = c.node(0);
    // Nothing else may start and end processes while the walsender rounds count the
    // CPU of the postmaster's exited children.
    a.execute("ALTER SYSTEM SET autovacuum = off");
    a.execute("SELECT pg_reload_conf()");
    let end: String = a.query_scalar("SELECT pg_current_wal_lsn()::text");
    let mut cl = a.connect();
    let pid: i32 = cl.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    // The backend's CPU time so far, ns (`/proc/<pid>/schedstat`: time on a CPU).
    let cpu_ns = || -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .expect("/proc/<pid>/schedstat")
    };
    // (wall seconds, CPU seconds) of one peek.
    let mut peek = |sql: &str| {
        let (t0, c0) = (Instant::now(), cpu_ns());
        cl.batch_execute(sql).unwrap();
        (t0.elapsed().as_secs_f64(), (cpu_ns() - c0) as f64 / 1e9)
    };
    peek(crate::PEEK_BDR);
    peek(crate::PEEK_PGOUTPUT);
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        ours.push(peek(crate::PEEK_BDR));
        base.push(peek(crate::PEEK_PGOUTPUT));
    }
    // MB/s per round (by wall time, by CPU time), and the median of each.
    let rates = |v: &[(f64, f64)], cpu: bool| -> (String, f64) {
        let mut r: Vec<f64> = v
            .iter()
            .map(|&(w, c)| mb / if cpu { c } else { w })
            .collect();
        let list = r
            .iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ");
        r.sort_by(|a, b| a.partial_cmp(b).unwrap());
        (list, r[r.len() / 2])
    };
    let mut timing = format!(
        "{mb:.0} MB of WAL, {rounds} alternating rounds after a warm-up peek each \
         (MB of WAL per second of wall time, and per second of the backend's CPU time)\n"
    );
    for cpu in [false, true] {
        let (lo, mo) = rates(&ours, cpu);
        let (lb, mbase) = rates(&base, cpu);
        let what = if cpu { "CPU" } else { "wall" };
        timing += &format!(
            "{what:>4}: bdr {lo}; median {mo:.0}\n      pgoutput {lb}; median {mbase:.0}\n      \
             ratio of medians (bdr / pgoutput): {:.2}\n",
            mo / mbase
        );
    }
    // The walsender path: pg_recvlogical reads a copy of each plugin's slot up to the same
    // end (to /dev/null; it consumes the copy); the walsender's CPU is the postmaster's
    // exited children's CPU (ticks of 10 ms: 3 rounds per peek round) over the run.
    let postmaster = a.postmaster_pid().expect("postmaster pid");
    let children_ticks = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{postmaster}/stat")).unwrap();
        let f: Vec<u64> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        // After the state letter: ppid .. utime stime cutime cstime (fields 14-17).
        f[12] + f[13]
    };
    // A session of its own for the polls (a new connection would be a process exiting).
    let mut cw = a.connect();
    let mut recv = |slot: &str, opts: &[&str]| -> (f64, f64) {
        cw.batch_execute(&format!(
            "SELECT pg_copy_logical_replication_slot('{slot}', 'ws')"
        ))
        .unwrap();
        let (t0, c0) = (Instant::now(), children_ticks());
        let mut cmd = Command::new(pg_test::pg_bindir().join("pg_recvlogical"));
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &a.port().to_string(),
            "-U",
            "postgres",
        ])
        .args([
            "-d",
            a.dbname(),
            "-S",
            "ws",
            "--start",
            "--no-loop",
            "-f",
            "/dev/null",
        ])
        .args(["-E", &end]);
        for o in opts {
            cmd.args(["-o", o]);
        }
        let st = cmd.status().expect("pg_recvlogical");
        assert!(st.success(), "pg_recvlogical {slot}: {st}");
        // The walsender exits right after its client; wait until it is gone, and give
        // the postmaster a moment to reap it.
        wait_until("walsender gone", Duration::from_secs(30), || {
            let n: i64 = cw
                .query_one("SELECT count(*) FROM pg_stat_replication", &[])
                .unwrap()
                .get(0);
            n == 0
        });
        std::thread::sleep(Duration::from_millis(100));
        let ticks = children_ticks() - c0;
        cw.batch_execute("SELECT pg_drop_replication_slot('ws')")
            .unwrap();
        (t0.elapsed().as_secs_f64(), ticks as f64 / 100.0)
    };
    let (mut ws_ours, mut ws_base) = (Vec::new(), Vec::new());
    for _ in 0..rounds * 3 {
        ws_ours.push(recv("s_bdr", &[]));
        ws_base.push(recv(
            "s_pgoutput",
            &["proto_version=1", "publication_names=p"],
        ));
    }
    let total = |v: &[(f64, f64)]| v.iter().map(|x| x.1).sum::<f64>();
    let (co, cb) = (total(&ws_ours), total(&ws_base));
    timing += &format!(
        "walsender (pg_recvlogical to /dev/null, {} rounds): CPU-s in all: bdr {co:.2}, \
         pgoutput {cb:.2}; MB per CPU-s: bdr {:.0}, pgoutput {:.0}, ratio {:.2}\n",
        rounds * 3,
        mb * (rounds * 3) as f64 / co,
        mb * (rounds * 3) as f64 / cb,
        cb / co
    );
    eprint!("{timing}");
    for (name, sql) in [("bdr", crate::PEEK_BDR), ("pgoutput", crate::PEEK_PGOUTPUT)] {
        let data = std::env::temp_dir().join(format!("bdr-decode-{name}.perf"));
        let perf = perf_record(pid, &data);
        // perf needs a moment to attach; the backend is idle meanwhile.
        std::thread::sleep(Duration::from_millis(500));
        for _ in 0..3 {
            peek(sql);
        }
        perf_stop(perf);
        let out = format!(
            "{name}: 3 x pg_logical_slot_peek_binary_changes over {mb:.0} MB of WAL \
             (backend pid {pid})\n\n{timing}\nperf record -F 2000 of the backend, {}",
            perf_report(&data)
        );
        publish(&format!("profile-decode-{name}.txt"), &out);
    }
}

/// Print a profile report and write it to `bench/results/<name>`.
pub(crate) fn publish(name: &str, report: &str) {
    println!("{report}");
    let file = results_dir().join(name);
    std::fs::write(&file, report).unwrap();
    eprintln!("written to {}", file.display());
}
