//! `make bench`: replication throughput, latency, writer overhead and decode cost of bdr,
//! side by side with native logical replication and pglogical, on this machine, in this run.
//!
//! Every system gets its own fresh nodes from the pg_test harness (same settings, one-way
//! A -> B replication of the same tables); bdr's group is bidirectional but only A writes.
//! Apply throughput is measured by holding apply on B (bdr.apply_pause / ALTER SUBSCRIPTION
//! DISABLE / pglogical.alter_subscription_disable), committing the workload on A, then
//! timing from release until B has every row. Workload 0 does not hold apply: it times one
//! big transaction from its COMMIT returning on A until it is visible on B (what a user
//! waits for). Ratios are ours / baseline with >1 meaning bdr is better (for times,
//! latency, CPU and memory, baseline / ours). Where the CPU goes is measured per server
//! process from `/proc` ([`procs`]) and printed as a second table.
//!
//! Environment: `BENCH_SCALE` (default 1.0) scales row counts and durations;
//! `BENCH_ONLY` (comma-separated) picks workloads: `big` (0), `small` (1, 2, 1b: 2 fills
//! the table 1b updates), `latency` (3), `writer` (4, 4b), `decode` (5), `sustained` (a),
//! `k` (b: workload 1 with `bdr.writers_per_peer` = 1, 2, 4); default all.
//! `BENCH_NATIVE_STREAMING=on` creates native subscriptions with `streaming = on`.
//! `BENCH_BDR_STREAMING=on|off` sets `bdr.stream_large_transactions` on the bdr nodes.
//! `BENCH_SYSTEMS=bdr,native` picks the systems, the first named running first;
//! `BENCH_RUNS=3` repeats the whole run and reports each row's median ([`report`]); every
//! other run takes the systems in the opposite order (drift during a run then favours no
//! system). `BENCH_UPDATE_ROUNDS=n` repeats workload 1b n times per run and keeps the round
//! with the median apply CPU. `BENCH_FREEZE_RETURN=1` stops B's walsenders over bdr's timed catch-ups (an
//! experiment: B's apply without a bidirectional group's return path beside it). On a
//! shared machine compare ratios from the same run, not absolute numbers. The table also
//! goes to `bench/results/latest.md`.
//!
//! Subcommands: `keys` ([`keys`]), `profile [system]`, `profile-update [system]`,
//! `profile-big [system]` and
//! `profile-writer [system]`, `profile-live [system]` ([`profile`]);
//! `count-insert [system]`, `count-update [system]`: instructions per applied transaction
//! under callgrind, and `count-writer [system]`: per transaction of a writer's backend
//! ([`count`]).

mod count;
mod keys;
mod procs;
mod profile;
mod report;
mod sustained;

use pg_test::{wait_until, Cluster, Node};
pub(crate) use report::Row;
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum System {
    Bdr,
    Native,
    Pglogical,
}

impl System {
    pub(crate) fn name(self) -> &'static str {
        match self {
            System::Bdr => "bdr",
            System::Native => "native",
            System::Pglogical => "pglogical",
        }
    }
}

pub(crate) const TABLES: &str = "
    CREATE TABLE small (id bigserial PRIMARY KEY, v int);
    CREATE TABLE big (id int8 PRIMARY KEY, v text);
    CREATE TABLE big0 (id int8 PRIMARY KEY, v text);
    CREATE TABLE probe (id bigserial PRIMARY KEY, sent_at timestamptz, recv_at timestamptz);
    CREATE TABLE marker (id int PRIMARY KEY, sent_at timestamptz, recv_at timestamptz);";

/// The bdr GUC that sets the number of parallel apply writers per peer (workload (b)).
const WRITERS_GUC: &str = "bdr.writers_per_peer";

/// Start A and B (and C for the writer-overhead run) wired up for `sys`.
pub(crate) fn setup(sys: System, nodes: usize) -> Cluster {
    setup_with(sys, nodes, &Setup::default())
}

/// What a cluster needs besides the defaults.
#[derive(Default)]
pub(crate) struct Setup {
    /// Extra postgresql.conf lines for the bdr nodes only (e.g. `bdr.writers_per_peer`).
    pub bdr_conf: Vec<(String, String)>,
    /// pgbench's tables at this scale, with a primary key on `pgbench_history`.
    pub pgbench_scale: Option<u32>,
}

/// [`setup`] with `opts`.
pub(crate) fn setup_with(sys: System, nodes: usize, opts: &Setup) -> Cluster {
    let mut b = Cluster::builder()
        .name(&format!("bench-{}", sys.name()))
        .nodes(nodes)
        .conf("shared_buffers", "'256MB'")
        .conf("max_wal_size", "'4GB'")
        .conf("checkpoint_timeout", "'30min'")
        .conf("logical_decoding_work_mem", "'64MB'");
    b = match sys {
        System::Bdr => {
            // BENCH_BDR_STREAMING=on|off: bdr.stream_large_transactions (else its default).
            let b = match std::env::var("BENCH_BDR_STREAMING").as_deref() {
                Ok(v @ ("on" | "off")) => b.conf("bdr.stream_large_transactions", v),
                _ => b,
            };
            opts.bdr_conf.iter().fold(b, |b, (k, v)| b.conf(k, v))
        }
        System::Native => b.preload_bdr(false),
        System::Pglogical => {
            let b = b
                .preload_bdr(false)
                .conf("shared_preload_libraries", "'pglogical'");
            if pg_test::has_output_plugin_libraries() {
                b.conf(
                    "output_plugin_libraries",
                    "'pgoutput, test_decoding, bdr, pglogical_output'",
                )
            } else {
                b
            }
        }
    };
    let c = b.start();
    for n in c.nodes() {
        n.execute(TABLES);
        // The receiving side stamps arrival (fires in every apply worker: ENABLE ALWAYS).
        n.execute(
            "CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN NEW.recv_at := clock_timestamp(); RETURN NEW; END $$;
             CREATE TRIGGER stamp BEFORE INSERT ON probe FOR EACH ROW EXECUTE FUNCTION stamp();
             ALTER TABLE probe ENABLE ALWAYS TRIGGER stamp;
             CREATE TRIGGER stamp BEFORE INSERT ON marker FOR EACH ROW EXECUTE FUNCTION stamp();
             ALTER TABLE marker ENABLE ALWAYS TRIGGER stamp;",
        );
    }
    if let Some(s) = opts.pgbench_scale {
        for (i, n) in c.nodes().iter().enumerate() {
            // bdr's join copies A's rows to B; the baselines subscribe without a copy.
            let data = i == 0 || sys != System::Bdr;
            pgbench_init(n, s, data);
        }
    }
    let a = c.node(0);
    match sys {
        System::Bdr => {
            for n in c.nodes() {
                n.execute("CREATE EXTENSION bdr");
            }
            a.execute(&format!("SELECT bdr.group_create('node1', '{}')", a.dsn()));
            for n in &c.nodes()[1..] {
                pg_test::bdr::join(n, a);
            }
        }
        System::Native => {
            a.execute("CREATE PUBLICATION p FOR ALL TABLES");
            // BENCH_NATIVE_STREAMING=on: the subscription streams large in-progress
            // transactions (PostgreSQL 14+: spooled on B, applied at COMMIT).
            let streaming = match std::env::var("BENCH_NATIVE_STREAMING").as_deref() {
                Ok("on") => ", streaming = on",
                _ => "",
            };
            for (i, n) in c.nodes()[1..].iter().enumerate() {
                n.execute(&format!(
                    "CREATE SUBSCRIPTION s{i} CONNECTION '{}' PUBLICATION p WITH (copy_data = false{streaming})",
                    a.dsn()
                ));
            }
        }
        System::Pglogical => {
            for n in c.nodes() {
                n.execute(&format!(
                    "CREATE EXTENSION pglogical; SELECT pglogical.create_node(node_name := '{}', dsn := '{}')",
                    n.name(),
                    n.dsn()
                ));
            }
            a.execute(
                "SELECT pglogical.replication_set_add_all_tables('default', ARRAY['public'])",
            );
            for (i, n) in c.nodes()[1..].iter().enumerate() {
                n.execute(&format!(
                    "SELECT pglogical.create_subscription(subscription_name := 's{i}', \
                     provider_dsn := '{}', synchronize_data := false)",
                    a.dsn()
                ));
                wait_until(
                    "pglogical subscription replicating",
                    Duration::from_secs(120),
                    || {
                        n.query_scalar::<String>(
                            "SELECT status FROM pglogical.show_subscription_status()",
                        ) == "replicating"
                    },
                );
            }
        }
    }
    // Replication works before measuring anything.
    a.execute("INSERT INTO small (v) VALUES (0)");
    for n in &c.nodes()[1..] {
        wait_until("setup replicates", Duration::from_secs(120), || {
            n.query_scalar::<i64>("SELECT count(*) FROM small") == 1
        });
    }
    a.execute("TRUNCATE small");
    for n in &c.nodes()[1..] {
        wait_until("truncate replicates", Duration::from_secs(120), || {
            n.query_scalar::<i64>("SELECT count(*) FROM small") == 0
        });
    }
    c
}
/// pgbench's tables at `scale` on `n` (rows only if `data`), plus a primary key column on
/// `pgbench_history` (bdr needs a key on every replicated table; all systems get it).
fn pgbench_init(n: &Node, scale: u32, data: bool) {
    let steps = if data { "dtgp" } else { "dtp" };
    let out = pgbench_cmd(n)
        .args(["-i", "-q", "-I", steps, "-s", &scale.to_string()])
        .arg(n.dbname())
        .output()
        .expect("pgbench -i");
    assert!(
        out.status.success(),
        "pgbench -i failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    n.execute("ALTER TABLE pgbench_history ADD COLUMN hid bigserial PRIMARY KEY");
}

/// PID of A's walsender (the one streaming to B; A has no other in a 2-node setup).
pub(crate) fn walsender_pid(a: &Node) -> Option<i32> {
    a.connect()
        .query_opt("SELECT pid FROM pg_stat_replication LIMIT 1", &[])
        .ok()
        .flatten()
        .map(|r| r.get(0))
}

/// PIDs of every walsender of `n`.
fn walsender_pids(n: &Node) -> Vec<i32> {
    n.connect()
        .query("SELECT pid FROM pg_stat_replication", &[])
        .map(|rows| rows.iter().map(|r| r.get(0)).collect())
        .unwrap_or_default()
}

/// `kill -<sig>` each of `pids` (as root, the servers' processes are postgres's).
fn signal_all(pids: &[i32], sig: &str) {
    for p in pids {
        let _ = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(p.to_string())
            .status();
    }
}

pub(crate) fn hold(sys: System, b: &Node) {
    match sys {
        System::Bdr => {
            b.execute("SELECT bdr.apply_pause()");
            wait_until("bdr apply paused", Duration::from_secs(60), || {
                b.query_scalar::<bool>("SELECT bool_and(state = 'paused') FROM bdr.apply_workers()")
            });
        }
        System::Native => {
            b.execute("ALTER SUBSCRIPTION s0 DISABLE");
            wait_until("native apply stopped", Duration::from_secs(60), || {
                b.query_scalar::<i64>(
                    "SELECT count(*) FROM pg_stat_subscription WHERE pid IS NOT NULL",
                ) == 0
            });
        }
        System::Pglogical => {
            b.execute("SELECT pglogical.alter_subscription_disable('s0', true)");
        }
    }
}

pub(crate) fn release(sys: System, b: &Node) {
    match sys {
        System::Bdr => b.execute("SELECT bdr.apply_resume()"),
        System::Native => b.execute("ALTER SUBSCRIPTION s0 ENABLE"),
        System::Pglogical => b.execute("SELECT pglogical.alter_subscription_enable('s0', true)"),
    }
}

/// PID of B's apply process for `sys`.
pub(crate) fn apply_pid(sys: System, b: &Node) -> Option<i32> {
    let sql = match sys {
        System::Bdr => "SELECT pid FROM bdr.apply_workers() WHERE pid > 0 LIMIT 1",
        System::Native => "SELECT pid FROM pg_stat_subscription WHERE pid IS NOT NULL LIMIT 1",
        System::Pglogical => {
            "SELECT pid FROM pg_stat_activity WHERE backend_type LIKE 'pglogical apply%' LIMIT 1"
        }
    };
    b.connect()
        .query_opt(sql, &[])
        .ok()
        .flatten()
        .map(|r| r.get(0))
}

/// What [`timed_apply`] measured.
struct Applied {
    secs: f64,
    /// Peak private memory of the apply process, kB.
    peak_kb: i64,
    /// Peak private memory of the apply process and its stream writer together (bdr
    /// with `bdr.stream_large_transactions`: the stream writer applies a streamed
    /// transaction, the apply process only receives it), kB.
    peak_with_writer_kb: i64,
    /// CPU seconds the apply process used meanwhile.
    cpu_secs: f64,
    /// Of which user-space (its own work, without the kernel's).
    user_secs: f64,
    /// Times the apply process was preempted meanwhile (see `procs::Usage`).
    preempted: u64,
    /// CPU seconds every server process of A and B used meanwhile, by role.
    roles: Vec<(String, f64)>,
}

/// Two more rows for a small-transaction workload `w` of `txns` transactions: the apply
/// process's user-space CPU per transaction (its own work: the system part also holds the
/// cost of being preempted and of interrupts, which moves with the machine's other load),
/// and how often it was preempted per 1,000 transactions.
fn put_user_and_preempted(rows: &mut Vec<Row>, sys: System, w: &str, ap: &Applied, txns: i64) {
    let per_txn = ap.user_secs * 1e6 / txns as f64;
    put(rows, sys, w, "apply user CPU µs/txn", false, per_txn);
    let per_1000 = ap.preempted as f64 * 1000.0 / txns as f64;
    put(rows, sys, w, "apply preempted /1000 txns", false, per_1000);
}

/// Release apply and time until `table` on B has `rows` rows; also the apply process's
/// peak private memory and the CPU it used.
fn timed_apply(sys: System, a: &Node, b: &Node, table: &str, rows: i64) -> Applied {
    // bdr's worker stays up while paused; the baselines' start on release (from 0).
    let before = apply_pid(sys, b).and_then(|p| Some((p, procs::usage(p)?)));
    // BENCH_FREEZE_RETURN=1 (an experiment, not a configuration anyone runs): B's
    // walsenders (a bdr group's return path, which decodes every record B's apply writes
    // only to drop it) are stopped with SIGSTOP over the catch-up, so that B's apply has
    // the machine to itself as a one-way subscriber's does.
    let frozen: Vec<i32> =
        if sys == System::Bdr && std::env::var("BENCH_FREEZE_RETURN").is_ok_and(|v| v == "1") {
            walsender_pids(b)
        } else {
            Vec::new()
        };
    signal_all(&frozen, "STOP");
    let procs_before = procs::snapshot(&[a, b]);
    let t0 = Instant::now();
    release(sys, b);
    let mut peak = 0;
    let mut peak_with_writer = 0;
    let mut last: Option<(i32, procs::Usage)> = None;
    let mut client = b.connect();
    let sql = format!("SELECT count(*) FROM {table}");
    wait_until(
        &format!("{} to apply {rows} rows", sys.name()),
        Duration::from_secs(1800),
        || {
            if let Some(pid) = apply_pid(sys, b) {
                let kb = pg_test::rss_anon_kb(pid);
                peak = peak.max(kb);
                let writers: i64 = match sys {
                    System::Bdr => client
                        .query_one(
                            "SELECT coalesce(array_agg(pid), '{}') FROM pg_stat_activity \
                             WHERE backend_type LIKE 'bdr stream writer%'",
                            &[],
                        )
                        .map(|r| r.get::<_, Vec<i32>>(0))
                        .unwrap_or_default()
                        .into_iter()
                        .map(pg_test::rss_anon_kb)
                        .sum(),
                    _ => 0,
                };
                peak_with_writer = peak_with_writer.max(kb + writers);
                if let Some(u) = procs::usage(pid) {
                    last = Some((pid, u));
                }
            }
            client
                .query_one(&sql, &[])
                .map(|r| r.get::<_, i64>(0))
                .unwrap_or(0)
                >= rows
        },
    );
    let secs = t0.elapsed().as_secs_f64();
    let roles = procs::by_role(&procs_before, &procs::snapshot(&[a, b]));
    signal_all(&frozen, "CONT");
    let used = match (before, last) {
        (Some((p0, u0)), Some((p1, u1))) if p0 == p1 => procs::Usage {
            user: u1.user.saturating_sub(u0.user),
            system: u1.system.saturating_sub(u0.system),
            preempted: u1.preempted.saturating_sub(u0.preempted),
        },
        (_, Some((p1, _))) => procs::usage(p1).unwrap_or_default(),
        _ => procs::Usage::default(),
    };
    Applied {
        secs,
        peak_kb: peak,
        peak_with_writer_kb: peak_with_writer,
        cpu_secs: (used.user + used.system) as f64 / 100.0,
        user_secs: used.user as f64 / 100.0,
        preempted: used.preempted,
        roles,
    }
}
/// Run pgbench on `n` with `args` and `script` (SQL, or `builtin:<name>` for `-b <name>`);
/// returns its output.
pub(crate) fn pgbench(n: &Node, args: &[&str], script: &str) -> String {
    let dir = std::env::temp_dir().join(format!("bdr-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("script.sql");
    std::fs::write(&file, script).unwrap();
    let out = pgbench_cmd(n)
        .arg("-n")
        .args(args)
        .args(match script.strip_prefix("builtin:") {
            Some(name) => ["-b".to_string(), name.to_string()],
            None => ["-f".to_string(), file.display().to_string()],
        })
        .arg(n.dbname())
        .output()
        .expect("pgbench");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "pgbench failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// `total` transactions of `script` on `n`, spread over `clients` pgbench clients.
pub(crate) fn pgbench_transactions(n: &Node, clients: i64, total: i64, script: &str) -> String {
    pgbench(
        n,
        &[
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-t",
            &(total / clients).to_string(),
        ],
        script,
    )
}

pub(crate) fn tps(pgbench_output: &str) -> f64 {
    pgbench_output
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
/// Record `v` for `sys` in the row (`workload`, `metric`), creating the row if needed.
pub(crate) fn put(
    rows: &mut Vec<Row>,
    sys: System,
    workload: &str,
    metric: &str,
    hib: bool,
    v: f64,
) {
    let idx = sys as usize;
    if let Some(r) = rows
        .iter_mut()
        .find(|r| r.workload == workload && r.metric == metric)
    {
        r.values[idx] = Some(v);
    } else {
        let mut values = [None; 3];
        values[idx] = Some(v);
        rows.push(Row {
            workload: workload.into(),
            metric: metric.into(),
            higher_is_better: hib,
            values,
        });
    }
}

/// One "cpu ..." row per process role, CPU per transaction in µs (or total seconds when
/// `per` is 0).
fn put_roles(rows: &mut Vec<Row>, sys: System, workload: &str, roles: &[(String, f64)], per: i64) {
    for (role, secs) in roles.iter().filter(|(_, s)| *s > 0.0) {
        let v = if per > 0 {
            secs * 1e6 / per as f64
        } else {
            *secs
        };
        put(rows, sys, &format!("cpu {workload}"), role, false, v);
    }
}

/// A count from the environment (`var` unset or not a number: `None`).
pub(crate) fn env_count(var: &str) -> Option<usize> {
    std::env::var(var).ok()?.parse().ok()
}

pub(crate) fn scale() -> f64 {
    std::env::var("BENCH_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0)
}

/// Whether workload group `name` runs (`BENCH_ONLY`, comma-separated; default all).
fn enabled(name: &str) -> bool {
    match std::env::var("BENCH_ONLY") {
        Ok(v) if !v.trim().is_empty() => v.split(',').any(|x| x.trim() == name),
        _ => true,
    }
}

/// The systems to run (`BENCH_SYSTEMS`, comma-separated, in the order given: the first
/// runs first in odd-numbered runs; default all three, bdr first).
fn systems() -> Vec<System> {
    let all = [System::Bdr, System::Native, System::Pglogical];
    match std::env::var("BENCH_SYSTEMS") {
        Ok(v) => v
            .split(',')
            .filter_map(|x| all.into_iter().find(|s| s.name() == x.trim()))
            .fold(Vec::new(), |mut out, s| {
                if !out.contains(&s) {
                    out.push(s);
                }
                out
            }),
        Err(_) => all.to_vec(),
    }
}

/// Workload 0: one big transaction committed on A with apply running; seconds from the
/// COMMIT returning on A until the rows are visible on B, and the CPU of every process
/// meanwhile (and during the INSERT, before the COMMIT).
fn big_to_visible(sys: System, a: &Node, b: &Node, n: i64, rows: &mut Vec<Row>) {
    const W: &str = "0. one big txn, COMMIT -> visible on B";
    let s0 = procs::snapshot(&[a, b]);
    let mut ca = a.connect();
    let t_insert = Instant::now();
    ca.batch_execute(&format!(
        "BEGIN; INSERT INTO big0 SELECT g, 'row ' || g FROM generate_series(1, {n}) g"
    ))
    .unwrap();
    let insert_secs = t_insert.elapsed().as_secs_f64();
    let s1 = procs::snapshot(&[a, b]);
    let t_commit = Instant::now();
    // The marker is stamped right after the COMMIT returned, in the same session; B's
    // trigger stamps its arrival, which (apply in commit order) follows the big one's.
    ca.batch_execute("COMMIT").unwrap();
    let commit_secs = t_commit.elapsed().as_secs_f64();
    ca.batch_execute("INSERT INTO marker (id, sent_at) VALUES (1, clock_timestamp())")
        .unwrap();
    wait_for_marker(b);
    let s2 = procs::snapshot(&[a, b]);
    let secs: f64 = b.query_scalar(
        "SELECT extract(epoch FROM recv_at - sent_at)::float8 FROM marker WHERE id = 1",
    );
    let got: i64 = b.query_scalar("SELECT count(*) FROM big0");
    assert_eq!(
        got,
        n,
        "{}: B has {got} of the big transaction's {n} rows",
        sys.name()
    );
    put(rows, sys, W, "seconds (lower is better)", false, secs);
    put(rows, sys, W, "COMMIT on A, seconds", false, commit_secs);
    let during = procs::by_role(&s0, &s1);
    let after = procs::by_role(&s1, &s2);
    eprintln!(
        "   big txn: INSERT {insert_secs:.1}s, COMMIT {commit_secs:.2}s, COMMIT -> visible {secs:.2}s; CPU after COMMIT: {}",
        after
            .iter()
            .filter(|(_, s)| *s > 0.0)
            .map(|(r, s)| format!("{r} {s:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    put_roles(
        rows,
        sys,
        "0. big txn: COMMIT -> visible (CPU s)",
        &after,
        0,
    );
    put_roles(
        rows,
        sys,
        "0. big txn: during the INSERT, before COMMIT (CPU s)",
        &during,
        0,
    );
}

/// Workload 1's measurement: `n` single-row INSERT transactions committed by 4 clients
/// with apply held, then timed from release. Returns (committed, what was measured).
fn small_txns(sys: System, a: &Node, b: &Node, n: i64) -> (i64, Applied) {
    hold(sys, b);
    let before: i64 = a.query_scalar("SELECT count(*) FROM small");
    pgbench_transactions(a, 4, n, "INSERT INTO small (v) VALUES (1);\n");
    let total: i64 = a.query_scalar("SELECT count(*) FROM small");
    let ap = timed_apply(sys, a, b, "small", total);
    (total - before, ap)
}

fn run_system(sys: System, rows: &mut Vec<Row>) {
    let small_n = (200_000.0 * scale()) as i64;
    let big_n = (1_000_000.0 * scale()) as i64;
    let secs = (20.0 * scale().max(0.25)) as u64;
    if enabled("big") || enabled("small") || enabled("latency") {
        eprintln!("== {}: 2 nodes", sys.name());
        let c = setup(sys, 2);
        let (a, b) = (c.node(0), c.node(1));

        // 0. One big transaction, apply running.
        if enabled("big") {
            big_to_visible(sys, a, b, big_n, rows);
        }

        if enabled("small") {
            // 1. Small transactions.
            let (committed, ap) = small_txns(sys, a, b, small_n);
            let w = "1. small txns (single-row INSERT)";
            put(
                rows,
                sys,
                w,
                "rows/s applied",
                true,
                committed as f64 / ap.secs,
            );
            put(
                rows,
                sys,
                w,
                "apply CPU µs/txn",
                false,
                ap.cpu_secs * 1e6 / committed as f64,
            );
            put_user_and_preempted(rows, sys, w, &ap, committed);
            put_roles(
                rows,
                sys,
                "1. small INSERT txns (CPU µs/txn)",
                &ap.roles,
                committed,
            );
            eprintln!(
                "   small: {committed} rows in {:.2}s, apply CPU {:.2}s (user {:.2}s), preempted {}",
                ap.secs, ap.cpu_secs, ap.user_secs, ap.preempted
            );

            // 2. One big transaction, apply held.
            hold(sys, b);
            a.execute(&format!(
                "INSERT INTO big SELECT g, 'row ' || g FROM generate_series(1, {big_n}) g"
            ));
            let ap = timed_apply(sys, a, b, "big", big_n);
            let w = "2. one big txn (INSERT), apply held then released";
            put(rows, sys, w, "rows/s applied", true, big_n as f64 / ap.secs);
            put(
                rows,
                sys,
                w,
                "apply peak private MB",
                false,
                ap.peak_kb as f64 / 1024.0,
            );
            put(
                rows,
                sys,
                w,
                "apply + stream writer peak private MB",
                false,
                ap.peak_with_writer_kb as f64 / 1024.0,
            );
            eprintln!(
                "   big: {big_n} rows in {:.1}s, peak {} kB (with the stream writer {} kB)",
                ap.secs, ap.peak_kb, ap.peak_with_writer_kb
            );

            // 1b. Small transactions updating random rows of the (now 1M-row) big table.
            // Apply is in commit order, so a marker row committed last tells when B has
            // them all.
            // BENCH_UPDATE_ROUNDS=n: n rounds in a row, reported by the round with the
            // median apply CPU (each round's figures go to stderr): one catch-up's apply
            // CPU moves ±20% from run to run on this machine.
            let upd_n = (100_000.0 * scale()) as i64;
            let clients = 4;
            let mut rounds: Vec<Applied> = (0..env_count("BENCH_UPDATE_ROUNDS").unwrap_or(1).max(1))
                .map(|_| {
                    hold(sys, b);
                    pgbench_transactions(
                        a,
                        clients,
                        upd_n,
                        &format!(
                            "\\set id random(1, {big_n})\nUPDATE big SET v = 'updated' WHERE id = :id;\n"
                        ),
                    );
                    a.execute("INSERT INTO small (v) VALUES (-1)");
                    let total: i64 = a.query_scalar("SELECT count(*) FROM small");
                    let ap = timed_apply(sys, a, b, "small", total);
                    eprintln!(
                        "   update round: apply CPU {:.2}s (user {:.2}s), preempted {}",
                        ap.cpu_secs, ap.user_secs, ap.preempted
                    );
                    ap
                })
                .collect();
            rounds.sort_by(|x, y| x.cpu_secs.total_cmp(&y.cpu_secs));
            let ap = rounds.swap_remove(rounds.len() / 2);
            let updates = (upd_n / clients) * clients;
            let w = "1b. small txns (UPDATE random rows of 1M)";
            put(
                rows,
                sys,
                w,
                "rows/s applied",
                true,
                updates as f64 / ap.secs,
            );
            put(
                rows,
                sys,
                w,
                "apply CPU µs/txn",
                false,
                ap.cpu_secs * 1e6 / updates as f64,
            );
            put_user_and_preempted(rows, sys, w, &ap, updates);
            eprintln!(
                "   updates: {updates} in {:.2}s, apply CPU {:.2}s (user {:.2}s), preempted {}",
                ap.secs, ap.cpu_secs, ap.user_secs, ap.preempted
            );
        }

        // 3. Latency at a steady rate.
        if enabled("latency") {
            pgbench(
                a,
                &["-c", "2", "-j", "2", "-R", "500", "-T", &secs.to_string()],
                "INSERT INTO probe (sent_at) VALUES (clock_timestamp());\n",
            );
            let sent: i64 = a.query_scalar("SELECT count(*) FROM probe");
            wait_until("probes arrive", Duration::from_secs(300), || {
                b.query_scalar::<i64>("SELECT count(*) FROM probe") == sent
            });
            let r = b
                .connect()
                .query_one(
                    "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), \
                            percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) \
                       FROM (SELECT extract(epoch FROM recv_at - sent_at) * 1000 AS ms FROM probe) x",
                    &[],
                )
                .unwrap();
            let (p50, p99): (f64, f64) = (r.get(0), r.get(1));
            put(rows, sys, "3. latency at 500 TPS", "p50 ms", false, p50);
            put(rows, sys, "3. latency at 500 TPS", "p99 ms", false, p99);
            eprintln!("   latency: p50 {p50:.2} ms, p99 {p99:.2} ms over {sent} commits");
        }
    }

    // 4. Writer overhead with two peers attached: the INSERT + UPDATE script with 2
    // clients, and (4b) single-row INSERTs from 4 clients as fast as they can.
    if enabled("writer") {
        // BENCH_WRITER_PEERS=n: n peers instead of 2 (1: no mesh of walsenders on the
        // peers, which a bidirectional group runs and a one-way subscription does not).
        let peers = writer_peers();
        eprintln!("== {}: {} nodes (writer overhead)", sys.name(), 1 + peers);
        let c = setup(sys, 1 + peers);
        let a = c.node(0);
        let nodes: Vec<&Node> = (0..=peers).map(|i| c.node(i)).collect();
        let t = pgbench(
            a,
            &["-c", "2", "-j", "2", "-T", &secs.to_string()],
            WRITER_SCRIPT,
        );
        put(
            rows,
            sys,
            &format!("4. writer TPS, {peers} peer{}", plural(peers)),
            "TPS on the writer",
            true,
            tps(&t),
        );
        // BENCH_PIN=1: A's server processes on CPU 0, the peers on CPU 1, pgbench on the
        // CPU(s) `BENCH_PIN_CLIENT` names (`both`: 4b twice, pgbench first beside the
        // peers, then beside the writer).
        let pinned = procs::pin_asked();
        let clients = if pinned {
            procs::client_cpus()
        } else {
            vec![String::new()]
        };
        for client in &clients {
            writer_4b(sys, rows, &nodes, pinned.then_some(client.as_str()), secs);
        }
    }

    // (a) Sustained load.
    if enabled("sustained") {
        sustained::sustained(sys, rows);
    }
}

/// Workload (b): workload 1 for bdr with `bdr.writers_per_peer` = K, each K on fresh
/// nodes (the GUC is read at server start). Without the GUC (a build before parallel
/// apply), K = 1 runs and K > 1 is skipped with a note. The native column holds native's
/// workload 1 figure of the same run (if it ran), so the ratio is against one native
/// apply worker.
fn k_scaling(rows: &mut Vec<Row>, notes: &mut Vec<String>) {
    let n = (200_000.0 * scale()) as i64;
    let native_rate = rows
        .iter()
        .find(|r| r.workload.starts_with("1. small txns") && r.metric == "rows/s applied")
        .and_then(|r| r.values[1]);
    for k in [1, 2, 4] {
        eprintln!("== bdr: 2 nodes, {WRITERS_GUC} = {k}");
        let c = setup_with(
            System::Bdr,
            2,
            &Setup {
                bdr_conf: vec![(WRITERS_GUC.into(), k.to_string())],
                ..Setup::default()
            },
        );
        let (a, b) = (c.node(0), c.node(1));
        let present: i64 = b.query_scalar(&format!(
            "SELECT count(*) FROM pg_settings WHERE name = '{WRITERS_GUC}'"
        ));
        if present == 0 {
            let note = format!(
                "workload b: GUC missing: this bdr build has no {WRITERS_GUC}; K = 1 only (the default single apply process), K = 2 and 4 skipped"
            );
            eprintln!("   {note}");
            notes.push(note);
            if k > 1 {
                break;
            }
        }
        let (committed, ap) = small_txns(System::Bdr, a, b, n);
        let w = "b. small INSERT txns, K apply writers";
        let rate = committed as f64 / ap.secs;
        let metric = format!("rows/s applied, K={k}");
        put(rows, System::Bdr, w, &metric, true, rate);
        if let Some(v) = native_rate {
            put(rows, System::Native, w, &metric, true, v);
        }
        put_roles(
            rows,
            System::Bdr,
            &format!("b. small INSERT txns, K={k} (CPU µs/txn)"),
            &ap.roles,
            committed,
        );
        eprintln!(
            "   K={k}: {committed} rows in {:.2}s ({rate:.0} rows/s)",
            ap.secs
        );
    }
}

const WRITER_SCRIPT: &str =
    "INSERT INTO small (v) VALUES (1);\nUPDATE small SET v = v + 1 WHERE id = (SELECT max(id) FROM small);\n";

/// Workload 4b on `nodes` (the writer first): 4 clients committing single-row INSERTs on
/// the writer as fast as they can. `client`: with `BENCH_PIN=1`, the CPU pgbench runs on
/// (A's server on CPU 0, the peers on CPU 1).
fn writer_4b(sys: System, rows: &mut Vec<Row>, nodes: &[&Node], client: Option<&str>, secs: u64) {
    let a = nodes[0];
    let peers = nodes.len() - 1;
    let n0: i64 = a.query_scalar("SELECT count(*) FROM small");
    procs::settle(nodes);
    let wal0: Vec<String> = nodes
        .iter()
        .map(|n| n.query_scalar("SELECT pg_current_wal_lsn()::text"))
        .collect();
    if let Some(cpu) = client {
        procs::pin(a, "0");
        for p in &nodes[1..] {
            procs::pin(p, "1");
        }
        procs::pin_self(cpu);
        if let Some(n) = procs::peers_nice() {
            for p in &nodes[1..] {
                procs::renice(p, n);
            }
        }
    }
    let s0 = procs::snapshot(nodes);
    let t = pgbench(
        a,
        &["-c", "4", "-j", "2", "-T", &secs.to_string()],
        "INSERT INTO small (v) VALUES (1);\n",
    );
    procs::settle(nodes);
    let s1 = procs::snapshot(nodes);
    if client.is_some() {
        procs::pin_self("0,1");
        for n in nodes {
            procs::pin(n, "0,1");
        }
        if procs::peers_nice().is_some() {
            for p in &nodes[1..] {
                procs::renice(p, 0);
            }
        }
    }
    let roles = procs::by_role(&s0, &s1);
    if std::env::var("BENCH_PROCS").is_ok_and(|v| v == "1") {
        eprintln!(
            "   4b, CPU by process ({}):\n{}",
            sys.name(),
            procs::by_process(&s0, &s1)
        );
    }
    let place = writer_4b_place(client);
    let w = format!(
        "4b. writer TPS, {peers} peer{}{place} (4 clients, single-row INSERT)",
        plural(peers)
    );
    put(rows, sys, &w, "TPS on the writer", true, tps(&t));
    let n = a.query_scalar::<i64>("SELECT count(*) FROM small") - n0;
    // WAL written per writer transaction on each node (on B and C: what applying it
    // wrote, which their WAL writers flush and their walsenders read).
    for (i, start) in wal0.iter().enumerate() {
        let bytes: f64 = nodes[i].query_scalar(&format!(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{start}')::float8"
        ));
        put(
            rows,
            sys,
            &w,
            &format!("WAL bytes per txn on {}", (b'A' + i as u8) as char),
            false,
            bytes / n.max(1) as f64,
        );
    }
    put_roles(
        rows,
        sys,
        &format!(
            "4b. writer, 4 clients INSERT, {peers} peer{}{place} (CPU µs/txn)",
            plural(peers)
        ),
        &roles,
        n,
    );
    eprintln!("   writer: {:.0} TPS{place}", tps(&t));
}

/// How workload 4b's processes were placed (`BENCH_PIN`, `BENCH_PIN_CLIENT`,
/// `BENCH_PEERS_NICE`), for its rows' names; empty when not pinned.
fn writer_4b_place(client: Option<&str>) -> String {
    let Some(cpu) = client else {
        return String::new();
    };
    let mut p = ", writer node on its own CPU".to_string();
    if cpu == "0" {
        p.push_str(", pgbench beside it");
    }
    if let Some(n) = procs::peers_nice() {
        p.push_str(&format!(", peers at nice {n}"));
    }
    p
}

/// Workloads 4 and 4b's number of peers: `BENCH_WRITER_PEERS` (default 2).
fn writer_peers() -> usize {
    env_count("BENCH_WRITER_PEERS")
        .filter(|&n| n >= 1)
        .unwrap_or(2)
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Writer TPS with no replication at all (the baseline of workloads 4 and 4b), and with
/// bdr in a one-node group (bdr's own writer-side cost: ids, triggers, hooks, commit
/// callbacks, without peers competing for the cores).
///
/// `bdr_first`: the one-node group runs before the plain node (every other run, so that
/// drift of the disk's flush latency within a run favours neither).
fn writer_alone(secs: u64, rows: &mut Vec<Row>, bdr_first: bool) {
    let with_bdr = systems().contains(&System::Bdr);
    let bdr = (bdr_first && with_bdr).then(|| bdr_alone(secs, rows));
    let plain = plain_alone(secs, rows);
    let bdr = bdr.or_else(|| with_bdr.then(|| bdr_alone(secs, rows)));
    rows.push(Row {
        workload: "4b. writer TPS, no replication (4 clients, single-row INSERT)".into(),
        metric: "TPS on the writer".into(),
        higher_is_better: true,
        values: [Some(plain), Some(plain), Some(plain)],
    });
    let Some(t) = bdr else {
        return;
    };
    // The native column is the plain node's figure: the ratio is bdr's own writer cost.
    rows.push(Row {
        workload: "4b. writer TPS, bdr one-node group, no peers (4 clients, single-row INSERT)"
            .into(),
        metric: "TPS on the writer (native column: no bdr)".into(),
        higher_is_better: true,
        values: [Some(t), Some(plain), None],
    });
    eprintln!("   writer alone: {plain:.0} TPS without bdr, {t:.0} TPS in a one-node bdr group");
}

const ALONE_INSERT: &str = "INSERT INTO small (v) VALUES (1);\n";

/// Workloads 4 and 4b on a node without bdr; returns 4b's TPS.
fn plain_alone(secs: u64, rows: &mut Vec<Row>) -> f64 {
    let c = Cluster::builder()
        .name("bench-alone")
        .nodes(1)
        .preload_bdr(false)
        .start();
    let a = c.node(0);
    a.execute(TABLES);
    let t = tps(&pgbench(
        a,
        &["-c", "2", "-j", "2", "-T", &secs.to_string()],
        WRITER_SCRIPT,
    ));
    rows.push(Row {
        workload: "4. writer TPS, no replication".into(),
        metric: "TPS on the writer".into(),
        higher_is_better: true,
        values: [Some(t), Some(t), Some(t)],
    });
    let n0: i64 = a.query_scalar("SELECT count(*) FROM small");
    procs::settle(&[a]);
    let s0 = procs::snapshot(&[a]);
    let t = tps(&pgbench(
        a,
        &["-c", "4", "-j", "2", "-T", &secs.to_string()],
        ALONE_INSERT,
    ));
    let n = a.query_scalar::<i64>("SELECT count(*) FROM small") - n0;
    procs::settle(&[a]);
    let roles = procs::by_role(&s0, &procs::snapshot(&[a]));
    put_roles(
        rows,
        System::Native,
        "4b. writer alone, 4 clients INSERT (CPU µs/txn)",
        &roles,
        n,
    );
    t
}

/// Workload 4b on a one-node bdr group; returns its TPS.
fn bdr_alone(secs: u64, rows: &mut Vec<Row>) -> f64 {
    let c = Cluster::builder().name("bench-alone-bdr").nodes(1).start();
    let a = c.node(0);
    a.execute(TABLES);
    a.execute("CREATE EXTENSION bdr");
    a.execute(&format!("SELECT bdr.group_create('node1', '{}')", a.dsn()));
    // The same history as the plain node's before 4b (workload 4's script first): 4b
    // then inserts into a table that already has pages and an index, on both nodes.
    // Until session 20 the group's 4b ran on a fresh, empty table against the plain
    // node's warmed one.
    let t = tps(&pgbench(
        a,
        &["-c", "2", "-j", "2", "-T", &secs.to_string()],
        WRITER_SCRIPT,
    ));
    eprintln!("   writer alone, workload 4's script: {t:.0} TPS in a one-node bdr group");
    let n0: i64 = a.query_scalar("SELECT count(*) FROM small");
    procs::settle(&[a]);
    let s0 = procs::snapshot(&[a]);
    let t = tps(&pgbench(
        a,
        &["-c", "4", "-j", "2", "-T", &secs.to_string()],
        ALONE_INSERT,
    ));
    let n: i64 = a.query_scalar::<i64>("SELECT count(*) FROM small") - n0;
    procs::settle(&[a]);
    let roles = procs::by_role(&s0, &procs::snapshot(&[a]));
    put_roles(
        rows,
        System::Bdr,
        "4b. writer alone, 4 clients INSERT (CPU µs/txn)",
        &roles,
        n,
    );
    t
}

/// WAL decoded per second by the bdr plugin and by pgoutput, over the same WAL.
/// The SQL statements workload 5 times: the whole WAL peeked through each plugin.
pub(crate) const PEEK_BDR: &str =
    "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('s_bdr', NULL, NULL)";
pub(crate) const PEEK_PGOUTPUT: &str =
    "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('s_pgoutput', NULL, NULL, \
     'proto_version', '1', 'publication_names', 'p')";

/// Workload 5's node: one slot per plugin, then the WAL both decode (a big INSERT and an
/// UPDATE of a quarter of it). Returns the cluster and the WAL's size in MB.
pub(crate) fn decode_setup() -> (Cluster, f64) {
    let n = (500_000.0 * scale()) as i64;
    let c = Cluster::builder().name("bench-decode").nodes(1).start();
    let a = c.node(0);
    a.execute(TABLES);
    a.execute("CREATE EXTENSION bdr; CREATE PUBLICATION p FOR ALL TABLES;");
    a.execute("SELECT pg_create_logical_replication_slot('s_bdr', 'bdr')");
    a.execute("SELECT pg_create_logical_replication_slot('s_pgoutput', 'pgoutput')");
    let start: String = a.query_scalar("SELECT pg_current_wal_lsn()::text");
    a.execute(&format!(
        "INSERT INTO big SELECT g, 'row ' || g FROM generate_series(1, {n}) g"
    ));
    a.execute("UPDATE big SET v = v || '!' WHERE id % 4 = 0");
    let wal: f64 = a.query_scalar(&format!(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{start}')::float8"
    ));
    (c, wal / 1024.0 / 1024.0)
}

fn decode_cost(rows: &mut Vec<Row>) {
    let (c, mb) = decode_setup();
    let a = c.node(0);
    let time = |sql: &str| {
        let t0 = Instant::now();
        a.execute(sql);
        t0.elapsed().as_secs_f64()
    };
    let ours = time(PEEK_BDR);
    let base = time(PEEK_PGOUTPUT);
    eprintln!("== decode: {mb:.0} MB of WAL: bdr {ours:.2}s, pgoutput {base:.2}s");
    rows.push(Row {
        workload: "5. decode (plugin vs pgoutput)".into(),
        metric: "MB of WAL decoded/s".into(),
        higher_is_better: true,
        values: [Some(mb / ours), Some(mb / base), None],
    });
}

/// `mem [system]`: workload 0 (unless `BENCH_ONLY` leaves `big` out), 1 and 2 only, printing the apply process's peak
/// private memory (RssAnon), for finding where the apply process's memory goes. With
/// `BENCH_MEM_WAIT=<file>` it prints the apply PID and waits until `<file>.0` exists before
/// workload 1, and until `<file>` exists with apply held and the big transaction committed
/// (to attach a tool such as heaptrack, or to read `/proc`).
fn apply_memory(sys: System) {
    let small_n = (200_000.0 * scale()) as i64;
    let big_n = (1_000_000.0 * scale()) as i64;
    let c = setup(sys, 2);
    let (a, b) = (c.node(0), c.node(1));
    let wait = |file: &str| {
        eprintln!("   apply pid {:?}: waiting for {file}", apply_pid(sys, b));
        wait_until("the go-ahead file", Duration::from_secs(3600), || {
            std::path::Path::new(file).exists()
        });
    };
    if let Ok(file) = std::env::var("BENCH_MEM_WAIT") {
        wait(&format!("{file}.0"));
    }
    if enabled("big") {
        // As in the full run, workload 0 goes first (apply running through a big one).
        big_to_visible(sys, a, b, big_n, &mut Vec::new());
        eprintln!(
            "   after workload 0: {} kB",
            pg_test::rss_anon_kb(apply_pid(sys, b).unwrap_or(0))
        );
    }
    let (_, ap) = small_txns(sys, a, b, small_n);
    eprintln!("   small: peak {} kB", ap.peak_kb);
    hold(sys, b);
    a.execute(&format!(
        "INSERT INTO big SELECT g, 'row ' || g FROM generate_series(1, {big_n}) g"
    ));
    if let Ok(file) = std::env::var("BENCH_MEM_WAIT") {
        wait(&file);
    }
    let ap = timed_apply(sys, a, b, "big", big_n);
    println!(
        "{}: big: {big_n} rows in {:.1}s, peak {} kB",
        sys.name(),
        ap.secs,
        ap.peak_kb
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let sys_arg = || match args.get(2).map(String::as_str) {
        None | Some("bdr") => System::Bdr,
        Some("native") => System::Native,
        Some("pglogical") => System::Pglogical,
        Some(other) => panic!("unknown system {other}: bdr, native or pglogical"),
    };
    match args.get(1).map(String::as_str) {
        Some("keys") => return keys::keys_bench(),
        Some("profile") => return profile::profile(sys_arg()),
        Some("profile-update") => return profile::profile_update(sys_arg()),
        Some("profile-big") => return profile::profile_big(sys_arg()),
        Some("profile-writer") => return profile::profile_writer(sys_arg()),
        Some("profile-live") => return profile::profile_live(sys_arg()),
        Some("profile-decode") => return profile::profile_decode(),
        Some("count-update") => return count::count(sys_arg(), count::Shape::Update),
        Some("count-insert") => return count::count(sys_arg(), count::Shape::Insert),
        Some("count-writer") => return count::count_writer(sys_arg()),
        Some("mem") => return apply_memory(sys_arg()),
        _ => {}
    }
    let runs = env_count("BENCH_RUNS").unwrap_or(1).max(1);
    let mut all_runs: Vec<Vec<Row>> = Vec::new();
    let mut notes = Vec::new();
    for run in 0..runs {
        if runs > 1 {
            eprintln!("==== run {} of {runs}", run + 1);
        }
        let mut rows = Vec::new();
        // Every other run takes the systems in the opposite order, so that whatever drifts
        // during a run (the disk's flush latency, page cache, other load) does not always
        // favour the same system.
        let mut order = systems();
        if run % 2 == 1 {
            order.reverse();
        }
        for sys in order {
            run_system(sys, &mut rows);
        }
        if enabled("k") && systems().contains(&System::Bdr) {
            k_scaling(&mut rows, &mut notes);
        }
        if enabled("writer") {
            writer_alone((20.0 * scale().max(0.25)) as u64, &mut rows, run % 2 == 1);
        }
        if enabled("decode") {
            decode_cost(&mut rows);
        }
        all_runs.push(rows);
    }
    let out = report::render(&all_runs, &notes, scale());
    println!("{out}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("latest.md"), &out).unwrap();
    eprintln!("written to {}", dir.join("latest.md").display());
}

/// A pgbench command connected to `n` as postgres.
fn pgbench_cmd(n: &Node) -> Command {
    let mut c = Command::new(pg_test::pg_bindir().join("pgbench"));
    c.args([
        "-h",
        "127.0.0.1",
        "-p",
        &n.port().to_string(),
        "-U",
        "postgres",
    ]);
    c
}

/// Wait (bounded) until workload 0's marker row, committed right after the big
/// transaction, is visible on `b`.
pub(crate) fn wait_for_marker(b: &Node) {
    let mut cb = b.connect();
    wait_until("big txn visible on B", Duration::from_secs(1800), || {
        cb.query_opt("SELECT 1 FROM marker WHERE id = 1", &[])
            .ok()
            .flatten()
            .is_some()
    });
}
