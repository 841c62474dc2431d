//! Parallel apply (issue 17, `bdr.writers_per_peer` = 4): independent transactions are
//! applied at once by several writers while a transaction that touches a key an earlier
//! one touched waits for it; commits stay in the origin's order through kills of the
//! receiver, of a writer and of the sending walsender; a writer's error stops the group,
//! and everything converges in order once the cause is removed.
//!
//! Other suites run with parallel apply too: `BDR_TEST_CONF='bdr.writers_per_peer=4'`
//! (docs/testing.md), e.g. conflicts.rs with `BDR_SOAK_SEEDS=100`.

use pg_test::bdr::{
    assert_same_everywhere, conflicts, form_group, form_group_with_app_table, wait_for_catchup,
    CATCHUP,
};
use pg_test::sys::kill9_pid as kill9;
use pg_test::{wait_until, Cluster, Node, Rng};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const K: usize = 4;

/// `n` nodes with 4 writers per peer, an application role and table `t`, created on
/// node1 after the group formed and replicated.
fn group(name: &str, n: usize) -> Cluster {
    // BDR_PARALLEL_K overrides the writers (e.g. 1, to compare a scenario without).
    let k = std::env::var("BDR_PARALLEL_K")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(K);
    let c = Cluster::builder()
        .name(name)
        .nodes(n)
        .writers_per_peer(k)
        .conf("bdr.apply_retry_max_delay", "'1s'")
        .start();
    form_group_with_app_table(&c);
    c
}

fn value(n: &Node, id: i32) -> Option<String> {
    n.connect()
        .query_opt("SELECT v FROM t WHERE id = $1", &[&id])
        .unwrap()
        .map(|r| r.get(0))
}

fn writers(n: &Node) -> i64 {
    n.query_scalar("SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'bdr writer%'")
}

/// Writers' waits for an earlier transaction (commit order or a dependency): lock waits
/// on bdr's transaction tags.
const TAG_WAITS: &str = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
     AND objsubid = 16964 AND NOT granted";

#[test]
fn independent_transactions_overlap_dependent_ones_apply_in_order() {
    let c = group("par_overlap", 2);
    let (a, b) = (c.node(0), c.node(1));
    assert_eq!(writers(b), K as i64, "node2 runs {K} writers for node1");
    a.execute("INSERT INTO t VALUES (1, 'start')");
    wait_for_catchup(&c);

    // Hold row 1 on node2, so the writer applying T1 (an update of it) is stuck.
    let mut hold = b.connect();
    hold.batch_execute("BEGIN; SELECT * FROM t WHERE id = 1 FOR UPDATE")
        .unwrap();
    let mut app = a.connect_as("app");
    app.batch_execute("UPDATE t SET v = 'x1' WHERE id = 1")
        .unwrap(); // T1
    app.batch_execute("INSERT INTO t VALUES (10, 'first')")
        .unwrap(); // T2
    app.batch_execute("INSERT INTO t VALUES (11, 'other')")
        .unwrap(); // T3, independent
    app.batch_execute("UPDATE t SET v = 'second' WHERE id = 10")
        .unwrap(); // T4, after T2

    // T2 and T3 are applied (in progress, each in its own writer) and wait for their
    // turn to commit; T4 waits for T2 before its change (no xid yet).
    wait_until(
        "T2 and T3 applied at once, waiting to commit",
        CATCHUP,
        || {
            b.query_scalar::<i64>(
                "SELECT count(*) FROM pg_stat_activity \
             WHERE backend_type LIKE 'bdr writer%' AND backend_xid IS NOT NULL",
            ) >= 2
                && b.query_scalar::<i64>(TAG_WAITS) >= 3
        },
    );
    let waiting_without_xid: i64 = b.query_scalar(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity s USING (pid) \
         WHERE l.locktype = 'advisory' AND l.objsubid = 16964 AND NOT l.granted \
         AND s.backend_xid IS NULL AND s.backend_type LIKE 'bdr writer%'",
    );
    assert!(
        waiting_without_xid >= 1,
        "T4 waits for T2 before applying anything"
    );
    // Nothing committed out of order behind the stuck T1.
    assert_eq!(value(b, 10), None);
    assert_eq!(value(b, 11), None);
    assert_eq!(value(b, 1).as_deref(), Some("start"));

    hold.batch_execute("COMMIT").unwrap();
    wait_for_catchup(&c);
    assert_eq!(value(b, 1).as_deref(), Some("x1"));
    assert_eq!(value(b, 10).as_deref(), Some("second"));
    assert_eq!(value(b, 11).as_deref(), Some("other"));
    assert_same_everywhere(&c, "t");
    // T4 never ran before T2 committed: an update of an absent row would be a conflict.
    assert_eq!(conflicts(b), vec![], "no conflict on node2");
}

/// Random multi-statement transactions from every node at once (no pause: the writers
/// really race), over few keys so that dependencies and conflicts are frequent.
#[test]
fn randomized_transactions_converge_with_parallel_apply() {
    let c = group("par_random", 3);
    let seeds: u64 = std::env::var("BDR_PARALLEL_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    for seed in 1..=seeds {
        let threads: Vec<_> = (0..3)
            .map(|i| {
                let dsn = c.node(i).dsn();
                std::thread::spawn(move || {
                    let mut rng = Rng::seeded(seed * 3 + i as u64);
                    let mut cl = postgres::Client::connect(&dsn, postgres::NoTls).unwrap();
                    for txn in 0..30 {
                        let mut sql = String::from("BEGIN;");
                        for _ in 0..=rng.below(3) {
                            let id = rng.below(40) + 1;
                            let val = format!("s{seed}n{i}t{txn}");
                            let to = rng.below(40) + 1;
                            sql.push_str(&match rng.below(5) {
                                0 | 1 => format!(
                                    "INSERT INTO t VALUES ({id}, '{val}') \
                                     ON CONFLICT (id) DO UPDATE SET v = excluded.v;"
                                ),
                                2 => format!("UPDATE t SET v = '{val}' WHERE id = {id};"),
                                // Moves a row to another key (when free here).
                                3 => format!(
                                    "UPDATE t SET id = {to}, v = '{val}' WHERE id = {id} \
                                     AND NOT EXISTS (SELECT FROM t WHERE id = {to});"
                                ),
                                _ => format!("DELETE FROM t WHERE id = {id};"),
                            });
                        }
                        sql.push_str("COMMIT;");
                        // A user transaction may deadlock with an apply writer on the same
                        // rows (as with one apply worker), or its key move meet a key an
                        // apply writer inserted after its check: it is rolled back and the
                        // workload goes on.
                        if let Err(e) = cl.batch_execute(&sql) {
                            assert!(
                                [
                                    Some(&postgres::error::SqlState::T_R_DEADLOCK_DETECTED),
                                    Some(&postgres::error::SqlState::UNIQUE_VIOLATION)
                                ]
                                .contains(&e.code()),
                                "{e}"
                            );
                            cl.batch_execute("ROLLBACK").unwrap();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        wait_for_catchup(&c);
        let digest = assert_same_everywhere(&c, "t");
        eprintln!("seed {seed}: converged ({digest})");
    }
    let retries: i64 = c
        .nodes()
        .iter()
        .map(|n| {
            n.query_scalar::<i64>(
                "SELECT coalesce(sum(error_count), 0)::int8 FROM bdr.apply_workers()",
            )
        })
        .sum();
    eprintln!("{seeds} seeds converged; apply retries on all nodes: {retries}");
}

/// Multi-row transactions from node1 until `stop`; returns the number of transactions
/// acknowledged (each inserts ids `5*i .. 5*i+4`).
fn load(n: &Node, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<i64> {
    let dsn = n.dsn();
    std::thread::spawn(move || {
        let mut i: i64 = 0;
        while !stop.load(Ordering::SeqCst) {
            let Ok(mut cl) = postgres::Client::connect(&dsn, postgres::NoTls) else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            while !stop.load(Ordering::SeqCst) {
                match cl.execute(
                    "INSERT INTO t SELECT g, 'x' FROM generate_series($1::int, $1::int + 4) g",
                    &[&((i * 5) as i32)],
                ) {
                    Ok(_) => i += 1,
                    // The server crashed after committing batch i but before
                    // acknowledging it: the rows are there, go on with the next one.
                    Err(e) if e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) => {
                        i += 1
                    }
                    Err(_) => break,
                }
            }
        }
        i
    })
}

fn pid_of(n: &Node, sql: &str) -> Option<i32> {
    n.connect()
        .query_opt(sql, &[])
        .ok()
        .flatten()
        .and_then(|r| r.get::<_, Option<i32>>(0))
}

/// Wait until node `n` is back up with its writers running (after a crash restart).
fn wait_writers(n: &Node) {
    wait_until(&format!("writers running on {}", n.name()), CATCHUP, || {
        n.connect()
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'bdr writer%'",
                &[],
            )
            .map(|r| r.get::<_, i64>(0) == K as i64)
            .unwrap_or(false)
    });
}

fn grows(b: &Node, what: &str) {
    let before: i64 = b
        .connect()
        .query_one("SELECT count(*) FROM t", &[])
        .map(|r| r.get(0))
        .unwrap_or(0);
    wait_until(what, CATCHUP, || {
        b.connect()
            .query_one("SELECT count(*) FROM t", &[])
            .map(|r| r.get::<_, i64>(0) > before + 50)
            .unwrap_or(false)
    });
}

#[test]
fn kills_of_receiver_writer_and_walsender_lose_and_duplicate_nothing() {
    let c = group("par_kill", 2);
    let (a, b) = (c.node(0), c.node(1));
    let stop = Arc::new(AtomicBool::new(false));
    let w = load(a, stop.clone());
    grows(b, "rows arrive on node2");

    // 1. The receiver (apply worker) on node2: the postmaster restarts node2's processes.
    let pid = pid_of(
        b,
        "SELECT pid FROM bdr.apply_workers() WHERE peer = 'node1'",
    )
    .expect("apply worker pid");
    kill9(pid);
    wait_writers(b);
    grows(b, "rows arrive after the receiver's kill");

    // 2. One writer on node2, mid-stream.
    let pid = pid_of(
        b,
        "SELECT pid FROM pg_stat_activity WHERE backend_type LIKE 'bdr writer%' \
         ORDER BY backend_xid IS NULL, pid LIMIT 1",
    )
    .expect("writer pid");
    kill9(pid);
    wait_writers(b);
    grows(b, "rows arrive after a writer's kill");

    // 3. node1's walsender streaming to node2.
    let pid = pid_of(
        a,
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name LIKE 'bdr_%' AND active",
    )
    .expect("walsender pid");
    kill9(pid);
    wait_writers(a);
    grows(b, "rows arrive after the walsender's kill");

    stop.store(true, Ordering::SeqCst);
    let txns = w.join().unwrap();
    wait_for_catchup(&c);
    let d = assert_same_everywhere(&c, "t");
    let (rows, distinct): (i64, i64) = {
        let r = b
            .connect()
            .query_one("SELECT count(*), count(DISTINCT id) FROM t", &[])
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(rows, distinct, "{d}: no duplicates");
    // Every acknowledged transaction (5 rows each) is there; one more may have committed
    // without its acknowledgement reaching the client.
    assert!(
        rows >= txns * 5 && rows <= txns * 5 + 5,
        "{d}: {rows} rows for {txns} acknowledged transactions"
    );
    assert_eq!(conflicts(b), vec![], "nothing applied twice on node2");
}

#[test]
fn a_writer_error_stops_the_group_and_it_resumes_in_order() {
    let c = group("par_error", 2);
    let (a, b) = (c.node(0), c.node(1));
    // A local-only rule on node2 that transaction N breaks.
    b.execute(
        "SET bdr.ddl_replication = off; \
         ALTER TABLE t ADD CONSTRAINT no_poison CHECK (v <> 'poison')",
    );
    let mut app = a.connect_as("app");
    app.batch_execute("INSERT INTO t VALUES (30, 'a')").unwrap(); // N-1
    app.batch_execute("INSERT INTO t VALUES (31, 'poison')")
        .unwrap(); // N
    app.batch_execute("INSERT INTO t VALUES (32, 'b')").unwrap(); // N+1
    app.batch_execute("UPDATE t SET v = 'a2' WHERE id = 30")
        .unwrap(); // N+2
    wait_until("the apply error recorded on node2", CATCHUP, || {
        b.query_scalar::<i64>(
            "SELECT count(*) FROM bdr.conflict_history WHERE conflict_type = 'apply_error'",
        ) >= 1
    });
    // Logged with node, relation, action and LSN.
    b.wait_for_log("no_poison", Duration::from_secs(10));
    let log = b.log();
    assert!(
        log.contains("bdr apply: INSERT on relation public.t from node \"node1\"")
            && log.contains("committed at LSN"),
        "the error's context names the change:\n{}",
        b.log_tail(40)
    );
    // Nothing after N committed while N cannot be applied.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(value(b, 31), None);
    assert_eq!(value(b, 32), None);
    assert_ne!(value(b, 30).as_deref(), Some("a2"));

    b.execute("SET bdr.ddl_replication = off; ALTER TABLE t DROP CONSTRAINT no_poison");
    wait_for_catchup(&c);
    assert_eq!(value(b, 30).as_deref(), Some("a2"));
    assert_eq!(value(b, 31).as_deref(), Some("poison"));
    assert_eq!(value(b, 32).as_deref(), Some("b"));
    assert_same_everywhere(&c, "t");
}

/// Measurement, run by hand (`cargo test -p pg_test --test parallel -- --ignored
/// --nocapture`): time for node2 to apply a backlog of `BDR_PARALLEL_TXNS` (default
/// 5000) single-row transactions from node1, with 1 writer (in-process) and with 4.
#[test]
#[ignore]
fn parallel_apply_timing() {
    let txns: i32 = std::env::var("BDR_PARALLEL_TXNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    for k in [1, 4, 1, 4] {
        let c = Cluster::builder()
            .name(&format!("par_timing{k}"))
            .nodes(2)
            .writers_per_peer(k)
            .start();
        for n in c.nodes() {
            n.execute("CREATE EXTENSION bdr; CREATE TABLE t (id int PRIMARY KEY, v text)");
        }
        form_group(&c);
        let (a, b) = (c.node(0), c.node(1));
        b.execute("SELECT bdr.apply_pause()");
        wait_until("paused", CATCHUP, || {
            b.query_scalar::<bool>("SELECT bool_and(state = 'paused') FROM bdr.apply_workers()")
        });
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let dsn = a.dsn();
                std::thread::spawn(move || {
                    let mut cl = postgres::Client::connect(&dsn, postgres::NoTls).unwrap();
                    let mut id = i;
                    while id < txns {
                        cl.execute("INSERT INTO t VALUES ($1, 'x')", &[&id])
                            .unwrap();
                        id += 4;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(
            b.query_scalar::<i64>("SELECT count(*) FROM t"),
            0,
            "nothing applied while paused"
        );
        let start = std::time::Instant::now();
        b.execute("SELECT bdr.apply_resume()");
        wait_until("backlog applied", Duration::from_secs(600), || {
            b.query_scalar::<i64>("SELECT count(*) FROM t") == txns as i64
        });
        println!(
            "writers_per_peer = {k}: {txns} single-row transactions applied in {:.2} s",
            start.elapsed().as_secs_f64()
        );
    }
}

/// More writers asked for than there are background worker slots: the apply worker runs
/// with the writers it could start (saying so in a WARNING), and replication goes on;
/// until session 27 it stopped with "could not start writer" and retried for ever.
#[test]
fn more_writers_than_worker_slots_apply_with_the_writers_there_are() {
    // 7 slots: PostgreSQL's logical replication launcher, bdr's launcher, the supervisor,
    // the apply worker and its stream writer leave 2 for writers (of the 8 asked for).
    let c = Cluster::builder()
        .name("par_few_slots")
        .nodes(2)
        .writers_per_peer(8)
        .conf("max_worker_processes", "7")
        .conf("bdr.apply_retry_max_delay", "'1s'")
        .start();
    form_group_with_app_table(&c);
    let (a, b) = (c.node(0), c.node(1));
    let mut app = a.connect_as("app");
    for i in 0..200 {
        app.execute("INSERT INTO t VALUES ($1, 'x')", &[&i])
            .unwrap();
    }
    wait_for_catchup(&c);
    assert_eq!(
        b.query_scalar::<i64>("SELECT count(*) FROM t"),
        200,
        "every row on node2"
    );
    let running = writers(b);
    assert!(
        (1..8).contains(&running),
        "node2 runs some writers, not all 8: {running}"
    );
    assert!(
        b.log().contains(&format!(
            "parallel apply from node \"node1\" runs {running} of bdr.writers_per_peer = 8 writers"
        )),
        "the shortfall is logged"
    );
    assert_eq!(
        b.query_scalar::<i64>(
            "SELECT count(*) FROM bdr.apply_workers() WHERE last_error IS NOT NULL"
        ),
        0,
        "no apply error"
    );
    assert_same_everywhere(&c, "t");
}
