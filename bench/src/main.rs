//! `make bench`: replication throughput, latency, writer overhead and decode cost of bdr,
//! side by side with native logical replication and pglogical, on this machine, in this run.
//!
//! Every system gets its own fresh nodes from the pg_test harness (same settings, one-way
//! A -> B replication of the same tables); bdr's group is bidirectional but only A writes.
//! Apply throughput is measured by holding apply on B (bdr.apply_pause / ALTER SUBSCRIPTION
//! DISABLE / pglogical.alter_subscription_disable), committing the workload on A, then
//! timing from release until B has every row. Ratios are ours / baseline with >1 meaning bdr
//! is better (for latency and memory, baseline / ours).
//!
//! `BENCH_SCALE` (default 1.0) scales the row counts; the table also goes to
//! `bench/results/latest.md`. `BENCH_ONLY=small` runs only workloads 1, 2 and 1b (2 fills
//! the table 1b updates); `BENCH_SYSTEMS=bdr,native` picks the systems; `BENCH_RUNS=3`
//! repeats the whole run and reports each ratio's median (and every run's ratio) — on a
//! shared machine, compare ratios from the same run, not absolute numbers.
//!
//! `bdr-bench keys` (`make bench-keys`): ids per second from `bdr.snowflake_nextval` vs
//! plain `nextval` on one node, in one session and in two at once.

use pg_test::{wait_until, Cluster, Node};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum System {
    Bdr,
    Native,
    Pglogical,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Bdr => "bdr",
            System::Native => "native",
            System::Pglogical => "pglogical",
        }
    }
}

const TABLES: &str = "
    CREATE TABLE small (id bigserial PRIMARY KEY, v int);
    CREATE TABLE big (id int8 PRIMARY KEY, v text);
    CREATE TABLE probe (id bigserial PRIMARY KEY, sent_at timestamptz, recv_at timestamptz);";

/// Start A and B (and C for the writer-overhead run) wired up for `sys`.
fn setup(sys: System, nodes: usize) -> Cluster {
    let mut b = Cluster::builder()
        .name(&format!("bench-{}", sys.name()))
        .nodes(nodes)
        .conf("shared_buffers", "'256MB'")
        .conf("max_wal_size", "'4GB'")
        .conf("checkpoint_timeout", "'30min'")
        .conf("logical_decoding_work_mem", "'64MB'");
    b = match sys {
        System::Bdr => b,
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
             ALTER TABLE probe ENABLE ALWAYS TRIGGER stamp;",
        );
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
            for (i, n) in c.nodes()[1..].iter().enumerate() {
                n.execute(&format!(
                    "CREATE SUBSCRIPTION s{i} CONNECTION '{}' PUBLICATION p WITH (copy_data = false)",
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

fn hold(sys: System, b: &Node) {
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

fn release(sys: System, b: &Node) {
    match sys {
        System::Bdr => b.execute("SELECT bdr.apply_resume()"),
        System::Native => b.execute("ALTER SUBSCRIPTION s0 ENABLE"),
        System::Pglogical => b.execute("SELECT pglogical.alter_subscription_enable('s0', true)"),
    }
}

/// PID of B's apply process for `sys`.
fn apply_pid(sys: System, b: &Node) -> Option<i32> {
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

/// CPU clock ticks (user + system, 1/100 s) process `pid` used so far.
fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// What [`timed_apply`] measured.
struct Applied {
    secs: f64,
    /// Peak private memory of the apply process, kB.
    peak_kb: i64,
    /// CPU seconds the apply process used meanwhile.
    cpu_secs: f64,
}

/// Release apply and time until `table` on B has `rows` rows; also the apply process's
/// peak private memory and the CPU it used.
fn timed_apply(sys: System, b: &Node, table: &str, rows: i64) -> Applied {
    // bdr's worker stays up while paused; the baselines' start on release (from 0).
    let before = apply_pid(sys, b).and_then(|p| Some((p, cpu_ticks(p)?)));
    let t0 = Instant::now();
    release(sys, b);
    let mut peak = 0;
    let mut last: Option<(i32, u64)> = None;
    let mut client = b.connect();
    let sql = format!("SELECT count(*) FROM {table}");
    wait_until(
        &format!("{} to apply {rows} rows", sys.name()),
        Duration::from_secs(1800),
        || {
            if let Some(pid) = apply_pid(sys, b) {
                peak = peak.max(pg_test::rss_anon_kb(pid));
                if let Some(t) = cpu_ticks(pid) {
                    last = Some((pid, t));
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
    let cpu = match (before, last) {
        (Some((p0, t0)), Some((p1, t1))) if p0 == p1 => t1.saturating_sub(t0),
        (_, Some((p1, _))) => cpu_ticks(p1).unwrap_or(0),
        _ => 0,
    };
    Applied {
        secs,
        peak_kb: peak,
        cpu_secs: cpu as f64 / 100.0,
    }
}

fn pgbench(n: &Node, args: &[&str], script: &str) -> String {
    let dir = std::env::temp_dir().join(format!("bdr-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("script.sql");
    std::fs::write(&file, script).unwrap();
    let out = Command::new(pg_test::pg_bindir().join("pgbench"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &n.port().to_string(),
            "-U",
            "postgres",
            "-n",
        ])
        .args(args)
        .arg("-f")
        .arg(&file)
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
fn pgbench_transactions(n: &Node, clients: i64, total: i64, script: &str) -> String {
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

fn tps(pgbench_output: &str) -> f64 {
    pgbench_output
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

struct Row {
    workload: String,
    metric: String,
    higher_is_better: bool,
    values: [Option<f64>; 3],
}

fn scale() -> f64 {
    std::env::var("BENCH_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0)
}

/// `BENCH_ONLY=small`: workloads 1, 2 and 1b only.
fn only_small() -> bool {
    std::env::var("BENCH_ONLY").is_ok_and(|v| v == "small")
}

/// The systems to run (`BENCH_SYSTEMS`, comma-separated; default all three).
fn systems() -> Vec<System> {
    let all = [System::Bdr, System::Native, System::Pglogical];
    match std::env::var("BENCH_SYSTEMS") {
        Ok(v) => all
            .into_iter()
            .filter(|s| v.split(',').any(|x| x.trim() == s.name()))
            .collect(),
        Err(_) => all.to_vec(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn run_system(sys: System, rows: &mut Vec<Row>) {
    let idx = sys as usize;
    let mut put = |workload: &str, metric: &str, hib: bool, v: f64| {
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
    };
    let small_n = (200_000.0 * scale()) as i64;
    let big_n = (1_000_000.0 * scale()) as i64;
    eprintln!("== {}: 2 nodes", sys.name());
    let c = setup(sys, 2);
    let (a, b) = (c.node(0), c.node(1));

    // 1. Small transactions.
    hold(sys, b);
    let clients = 4;
    pgbench_transactions(a, clients, small_n, "INSERT INTO small (v) VALUES (1);\n");
    let committed: i64 = a.query_scalar("SELECT count(*) FROM small");
    let ap = timed_apply(sys, b, "small", committed);
    let secs = ap.secs;
    put(
        "1. small txns (single-row INSERT)",
        "rows/s applied",
        true,
        committed as f64 / secs,
    );
    put(
        "1. small txns (single-row INSERT)",
        "apply CPU µs/txn",
        false,
        ap.cpu_secs * 1e6 / committed as f64,
    );
    eprintln!(
        "   small: {committed} rows in {secs:.2}s, apply CPU {:.2}s",
        ap.cpu_secs
    );

    // 2. One big transaction.
    hold(sys, b);
    a.execute(&format!(
        "INSERT INTO big SELECT g, 'row ' || g FROM generate_series(1, {big_n}) g"
    ));
    let Applied {
        secs,
        peak_kb: peak,
        ..
    } = timed_apply(sys, b, "big", big_n);
    put(
        "2. one big txn (INSERT)",
        "rows/s applied",
        true,
        big_n as f64 / secs,
    );
    put(
        "2. one big txn (INSERT)",
        "apply peak private MB",
        false,
        peak as f64 / 1024.0,
    );
    eprintln!("   big: {big_n} rows in {secs:.1}s, peak {peak} kB");

    // 1b. Small transactions updating random rows of the (now 1M-row) big table. Apply
    // is in commit order, so a marker row committed last tells when B has them all.
    hold(sys, b);
    let upd_n = (100_000.0 * scale()) as i64;
    pgbench_transactions(
        a,
        clients,
        upd_n,
        &format!("\\set id random(1, {big_n})\nUPDATE big SET v = 'updated' WHERE id = :id;\n"),
    );
    a.execute("INSERT INTO small (v) VALUES (-1)");
    let ap = timed_apply(sys, b, "small", committed + 1);
    let secs = ap.secs;
    let updates = (upd_n / clients) * clients;
    put(
        "1b. small txns (UPDATE random rows of 1M)",
        "rows/s applied",
        true,
        updates as f64 / secs,
    );
    put(
        "1b. small txns (UPDATE random rows of 1M)",
        "apply CPU µs/txn",
        false,
        ap.cpu_secs * 1e6 / updates as f64,
    );
    eprintln!(
        "   updates: {updates} in {secs:.2}s, apply CPU {:.2}s",
        ap.cpu_secs
    );
    if only_small() {
        return;
    }

    // 3. Latency at a steady rate.
    let secs = (20.0 * scale().max(0.25)) as u64;
    pgbench(
        a,
        &["-c", "2", "-j", "2", "-R", "500", "-T", &secs.to_string()],
        "INSERT INTO probe (sent_at) VALUES (clock_timestamp());\n",
    );
    let sent: i64 = a.query_scalar("SELECT count(*) FROM probe");
    wait_until("probes arrive", Duration::from_secs(300), || {
        b.query_scalar::<i64>("SELECT count(*) FROM probe") == sent
    });
    let (p50, p99): (f64, f64) = {
        let r = b
            .connect()
            .query_one(
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), \
                        percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) \
                   FROM (SELECT extract(epoch FROM recv_at - sent_at) * 1000 AS ms FROM probe) x",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    put("3. latency at 500 TPS", "p50 ms", false, p50);
    put("3. latency at 500 TPS", "p99 ms", false, p99);
    eprintln!("   latency: p50 {p50:.2} ms, p99 {p99:.2} ms over {sent} commits");
    drop(c);

    // 4. Writer overhead with two peers attached.
    eprintln!("== {}: 3 nodes (writer overhead)", sys.name());
    let c = setup(sys, 3);
    let a = c.node(0);
    let t = pgbench(
        a,
        &["-c", "2", "-j", "2", "-T", &secs.to_string()],
        "INSERT INTO small (v) VALUES (1);\nUPDATE small SET v = v + 1 WHERE id = (SELECT max(id) FROM small);\n",
    );
    put("4. writer TPS, 2 peers", "TPS on the writer", true, tps(&t));
    drop(c);
}

/// Writer TPS with no replication at all (the baseline of workload 4).
fn writer_alone(secs: u64) -> f64 {
    let c = Cluster::builder()
        .name("bench-alone")
        .nodes(1)
        .preload_bdr(false)
        .start();
    c.node(0).execute(TABLES);
    tps(&pgbench(
        c.node(0),
        &["-c", "2", "-j", "2", "-T", &secs.to_string()],
        "INSERT INTO small (v) VALUES (1);\nUPDATE small SET v = v + 1 WHERE id = (SELECT max(id) FROM small);\n",
    ))
}

/// WAL decoded per second by the bdr plugin and by pgoutput, over the same WAL.
fn decode_cost(rows: &mut Vec<Row>) {
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
    let time = |sql: &str| {
        let t0 = Instant::now();
        a.execute(sql);
        t0.elapsed().as_secs_f64()
    };
    let ours =
        time("SELECT count(*) FROM pg_logical_slot_peek_binary_changes('s_bdr', NULL, NULL)");
    let base = time(
        "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('s_pgoutput', NULL, NULL, \
         'proto_version', '1', 'publication_names', 'p')",
    );
    let mb = wal / 1024.0 / 1024.0;
    eprintln!("== decode: {mb:.0} MB of WAL: bdr {ours:.1}s, pgoutput {base:.1}s");
    rows.push(Row {
        workload: "5. decode (plugin vs pgoutput)".into(),
        metric: "MB of WAL decoded/s".into(),
        higher_is_better: true,
        values: [Some(mb / ours), Some(mb / base), None],
    });
}

/// CPU time (clock ticks, user + system) of every child process of the nodes'
/// postmasters, by pid, with its process title.
fn cpu_by_process(nodes: &[&Node]) -> std::collections::HashMap<i32, (String, u64)> {
    let parents: Vec<(i32, &str)> = nodes
        .iter()
        .filter_map(|n| Some((n.postmaster_pid()?, n.name())))
        .collect();
    let mut out = std::collections::HashMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command: state ppid ... utime(14) stime(15).
        let Some(rest) = stat.rsplit_once(')').map(|x| x.1) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ppid: i32 = f.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        let Some(&(_, node)) = parents.iter().find(|(p, _)| *p == ppid) else {
            continue;
        };
        let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let title = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .replace('\0', " ")
            .trim()
            .to_string();
        out.insert(pid, (format!("{node}: {title}"), ticks));
    }
    out
}

/// `bdr-bench profile [bdr|native|pglogical]`: record a flat `perf` profile of B's apply
/// process while it catches up on small transactions (the workload where bdr trails), and
/// write the top symbols to `bench/results/profile-<system>.txt`.
fn profile(sys: System) {
    let n = (100_000.0 * scale()) as i64;
    let c = setup(sys, 2);
    let (a, b) = (c.node(0), c.node(1));
    hold(sys, b);
    pgbench_transactions(a, 4, n, "INSERT INTO small (v) VALUES (1);\n");
    let committed: i64 = a.query_scalar("SELECT count(*) FROM small");
    // The bdr worker stays up while paused; the baselines' workers start on release.
    let pid_before = apply_pid(sys, b);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    std::fs::create_dir_all(&dir).unwrap();
    let data = std::env::temp_dir().join(format!("bdr-apply-{}.perf", sys.name()));
    let cpu_before = cpu_by_process(&[a, b]);
    let t0 = Instant::now();
    release(sys, b);
    let pid = pid_before.unwrap_or_else(|| {
        let mut pid = None;
        wait_until("apply process", Duration::from_secs(60), || {
            pid = apply_pid(sys, b);
            pid.is_some()
        });
        pid.unwrap()
    });
    let mut perf = Command::new("perf")
        .args(["record", "-F", "2000", "--call-graph", "dwarf,16384", "-o"])
        .arg(&data)
        .args(["-p", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("perf (install linux-perf)");
    wait_until("catch-up", Duration::from_secs(1800), || {
        b.query_scalar::<i64>("SELECT count(*) FROM small") >= committed
    });
    let secs = t0.elapsed().as_secs_f64();
    let cpu_after = cpu_by_process(&[a, b]);
    let mut used: Vec<(f64, String)> = cpu_after
        .iter()
        .map(|(pid, (title, t))| {
            let before = cpu_before.get(pid).map(|x| x.1).unwrap_or(0);
            // Clock ticks are 1/100 s on Linux.
            ((t - before) as f64 / 100.0, title.clone())
        })
        .filter(|(s, _)| *s > 0.0)
        .collect();
    used.sort_by(|x, y| y.0.total_cmp(&x.0));
    let cpu_table: String = used
        .iter()
        .map(|(s, t)| format!("  {s:5.2} s  {t}\n"))
        .collect();
    let _ = Command::new("kill")
        .args(["-INT", &perf.id().to_string()])
        .status();
    perf.wait().unwrap();
    let report = |args: &[&str], keep: &dyn Fn(&str) -> bool, max: usize| {
        let out = Command::new("perf")
            .args(["report", "--stdio", "-g", "none", "-i"])
            .arg(&data)
            .args(args)
            .output()
            .expect("perf report");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty() && keep(l))
            .take(max)
            .map(|l| l.trim_end().to_string())
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
    // Inclusive time of the apply loop's own stages and the PostgreSQL calls they make.
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
    let out = format!(
        "{} apply process, {committed} single-row INSERT transactions in {secs:.1}s \
         ({:.0} rows/s)\n\nCPU used during the catch-up, by process (both nodes):\n{cpu_table}\n\
         perf record -F 2000 of the apply process, self time by symbol:\n\n{text}\n\n\
         inclusive time (children included):\n\n{stages}\n",
        sys.name(),
        committed as f64 / secs
    );
    println!("{out}");
    let file = dir.join(format!("profile-{}.txt", sys.name()));
    std::fs::write(&file, out).unwrap();
    eprintln!("written to {}", file.display());
}

/// Ids per second of `expr` (`nextval('s')` or `bdr.snowflake_nextval('s')`) drawn by
/// `sessions` sessions at once, each `n` ids in one statement; best of 3 runs.
fn ids_per_sec(node: &Node, expr: &str, n: i64, sessions: usize) -> f64 {
    let sql = format!("SELECT count({expr}) FROM generate_series(1, {n})");
    let mut best = f64::MAX;
    for _ in 0..3 {
        let mut clients: Vec<_> = (0..sessions).map(|_| node.connect()).collect();
        let start = Instant::now();
        std::thread::scope(|s| {
            for c in clients.iter_mut() {
                let sql = &sql;
                s.spawn(move || {
                    let got: i64 = c.query_one(sql.as_str(), &[]).unwrap().get(0);
                    assert_eq!(got, n);
                });
            }
        });
        best = best.min(start.elapsed().as_secs_f64());
    }
    (n as f64 * sessions as f64) / best
}

/// `bdr-bench keys`: snowflake ids vs nextval on one node.
fn keys_bench() {
    let c = Cluster::builder()
        .name("bench-keys")
        .nodes(1)
        .conf("shared_buffers", "'256MB'")
        .start();
    let a = c.node(0);
    a.execute("CREATE EXTENSION bdr; CREATE SEQUENCE s; CREATE SEQUENCE l;");
    a.execute(&format!("SELECT bdr.group_create('node1', '{}')", a.dsn()));
    let n = (1_000_000.0 * scale()) as i64;
    // Warm up (first call builds the shared slot and persists a floor).
    a.execute("SELECT count(bdr.snowflake_nextval('s')) FROM generate_series(1, 1000)");
    let mut out = format!(
        "Machine: {} cores; {n} ids per session, best of 3\n\n\
         | sessions | nextval ids/s | snowflake_nextval ids/s | ratio snowflake / nextval |\n\
         |---|---|---|---|\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    for sessions in [1, 2] {
        let plain = ids_per_sec(a, "nextval('l')", n, sessions);
        let snow = ids_per_sec(a, "bdr.snowflake_nextval('s')", n, sessions);
        out.push_str(&format!(
            "| {sessions} | {plain:.0} | {snow:.0} | {:.2} |\n",
            snow / plain
        ));
    }
    // Every id handed out is distinct and they increase: nothing was reissued.
    let dup: i64 = a.query_scalar(
        "SELECT count(*) - count(DISTINCT v) FROM \
           (SELECT bdr.snowflake_nextval('s') AS v FROM generate_series(1, 100000)) x",
    );
    assert_eq!(dup, 0);
    println!("{out}");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("keys") {
        keys_bench();
        return;
    }
    if args.get(1).map(String::as_str) == Some("profile") {
        let sys = match args.get(2).map(String::as_str) {
            None | Some("bdr") => System::Bdr,
            Some("native") => System::Native,
            Some("pglogical") => System::Pglogical,
            Some(other) => panic!("unknown system {other}: bdr, native or pglogical"),
        };
        profile(sys);
        return;
    }
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let mut all_runs: Vec<Vec<Row>> = Vec::new();
    for run in 0..runs {
        if runs > 1 {
            eprintln!("==== run {} of {runs}", run + 1);
        }
        let mut rows = Vec::new();
        for sys in systems() {
            run_system(sys, &mut rows);
        }
        if !only_small() {
            let secs = (20.0 * scale().max(0.25)) as u64;
            let alone = writer_alone(secs);
            rows.push(Row {
                workload: "4. writer TPS, no replication".into(),
                metric: "TPS on the writer".into(),
                higher_is_better: true,
                values: [Some(alone), Some(alone), Some(alone)],
            });
            decode_cost(&mut rows);
        }
        rows.sort_by(|x, y| x.workload.cmp(&y.workload));
        all_runs.push(rows);
    }
    // Each run's ratio per row (ours / baseline, as in the table), for the median.
    let run_ratio = |r: &Row, j: usize| match (r.values[0], r.values[j]) {
        (Some(o), Some(b)) if o > 0.0 && b > 0.0 => {
            Some(if r.higher_is_better { o / b } else { b / o })
        }
        _ => None,
    };
    let mut per_run = String::new();
    if runs > 1 {
        per_run.push_str(&format!(
            "\nPer-run ratios vs native (median of {runs} in the table's ratio columns, values are the median run's):\n\n"
        ));
        for (i, r) in all_runs[0].iter().enumerate() {
            let ratios: Vec<String> = all_runs
                .iter()
                .map(|rows| {
                    run_ratio(&rows[i], 1)
                        .map(|x| format!("{x:.2}"))
                        .unwrap_or_else(|| "-".into())
                })
                .collect();
            per_run.push_str(&format!(
                "- {} / {}: {}\n",
                r.workload,
                r.metric,
                ratios.join(", ")
            ));
        }
    }
    // The table shows the run with the median ratio vs native for each row.
    let rows: Vec<Row> = (0..all_runs[0].len())
        .map(|i| {
            let ratios: Vec<f64> = all_runs
                .iter()
                .map(|rows| run_ratio(&rows[i], 1).unwrap_or(0.0))
                .collect();
            let m = median(ratios.clone());
            let pick = ratios.iter().position(|x| *x == m).unwrap_or(0);
            let r = &all_runs[pick][i];
            Row {
                workload: r.workload.clone(),
                metric: r.metric.clone(),
                higher_is_better: r.higher_is_better,
                values: r.values,
            }
        })
        .collect();

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
    let fmt = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
    let ratio = |r: &Row, base: Option<f64>| match (r.values[0], base) {
        (Some(o), Some(b)) if o > 0.0 && b > 0.0 => {
            format!("{:.2}", if r.higher_is_better { o / b } else { b / o })
        }
        _ => "-".into(),
    };
    let mut out = format!(
        "Machine: {cores} cores, {mem:.0} GiB; {pgver}; scale {}; {runs} run(s)\n\n\
         | workload | metric | bdr | native LR | ratio vs native | pglogical | ratio vs pglogical |\n\
         |---|---|---|---|---|---|---|\n",
        scale()
    );
    for r in &rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.workload,
            r.metric,
            fmt(r.values[0]),
            fmt(r.values[1]),
            ratio(r, r.values[1]),
            fmt(r.values[2]),
            ratio(r, r.values[2]),
        ));
    }
    out.push_str(&per_run);
    out.push_str("\nratio > 1 means bdr is better (for latency and memory: lower is better, the ratio is baseline / bdr).\n");
    println!("{out}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("latest.md"), &out).unwrap();
    eprintln!("written to {}", dir.join("latest.md").display());
}
