//! Apply scenarios on real postmasters: bad joins, apply errors, crashes, joins under
//! load, restarts and one very large transaction.

use pg_test::bdr::{
    assert_same_everywhere, conflicts, form_group, join, wait_for_catchup, CATCHUP,
};
use pg_test::{db_error_text, wait_until, Cluster, Node};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Two nodes in a group, each with table `t (id int PRIMARY KEY, v text)` and a plain role
/// `app` granted `privileges` on it.
fn pair_with_app(name: &str, privileges: &str) -> Cluster {
    let c = Cluster::builder().name(name).nodes(2).start();
    for n in c.nodes() {
        n.execute(&format!(
            "CREATE EXTENSION bdr; CREATE TABLE t (id int PRIMARY KEY, v text);
             CREATE ROLE app LOGIN; GRANT {privileges} ON t TO app;"
        ));
    }
    form_group(&c);
    c
}

/// Everything bdr created that a failed join must not leave behind, as a comparable string.
fn leftovers(n: &Node) -> String {
    n.query_scalar(
        "SELECT format('slots=%s origins=%s nodes=%s',
            (SELECT string_agg(slot_name, ',' ORDER BY slot_name) FROM pg_replication_slots),
            (SELECT string_agg(roname, ',' ORDER BY roname) FROM pg_replication_origin),
            (SELECT string_agg(node_name || ':' || node_state, ',' ORDER BY node_name) FROM bdr.nodes))",
    )
}

fn join_err(n: &Node, name: &str, dsn: &str, via: &str) -> String {
    let e = n
        .try_execute(&format!(
            "SELECT bdr.group_join(local_node_name := '{name}', node_external_dsn := '{dsn}', join_using_dsn := '{via}')"
        ))
        .expect_err("the join must fail");
    db_error_text(&e)
}

#[test]
fn invalid_joins_fail_clearly_and_leave_nothing() {
    let c = Cluster::builder().name("badjoin").nodes(3).start();
    for n in c.nodes() {
        n.execute("CREATE EXTENSION bdr; CREATE TABLE t (id int PRIMARY KEY, v text);");
    }
    let (a, b, x) = (c.node(0), c.node(1), c.node(2));
    a.execute(&format!("SELECT bdr.group_create('node1', '{}')", a.dsn()));
    let before: Vec<String> = c.nodes().iter().map(leftovers).collect();

    let e = join_err(b, "Bad-Name", &b.dsn(), &a.dsn());
    assert!(
        e.contains("invalid node name \"Bad-Name\"") && e.contains("HINT"),
        "{e}"
    );
    let e = join_err(b, "node2", "host=127.0.0.1 port", &a.dsn());
    assert!(e.contains("invalid connection string"), "{e}");
    let e = join_err(
        b,
        "node2",
        &b.dsn(),
        "host=127.0.0.1 port=1 dbname=x connect_timeout=2",
    );
    assert!(e.contains("could not connect to the join source"), "{e}");
    assert!(e.contains("HINT: Check join_using_dsn"), "{e}");
    let e = join_err(b, "node2", &a.dsn(), &a.dsn());
    assert!(
        e.contains("node_external_dsn does not reach this node"),
        "{e}"
    );
    let e = join_err(b, "node2", &b.dsn(), &b.dsn());
    assert!(
        e.contains("join_using_dsn points at this node itself"),
        "{e}"
    );
    let e = join_err(b, "node1", &b.dsn(), &a.dsn());
    assert!(
        e.contains("a node named \"node1\" is already a member"),
        "{e}"
    );
    // Rows in a local table.
    b.execute("INSERT INTO t VALUES (1, 'local')");
    let e = join_err(b, "node2", &b.dsn(), &a.dsn());
    assert!(
        e.contains("table public.t on this node already holds rows"),
        "{e}"
    );
    b.execute("DELETE FROM t");
    // An unreachable member: node3 joined, then stopped.
    join(x, a);
    // node1's worker for node3 creates its origin when it starts: wait for it, so the
    // picture below does not depend on how fast that start was.
    wait_until("node1's origin for node3", CATCHUP, || {
        a.query_scalar::<i64>(
            "SELECT count(*) FROM pg_replication_origin WHERE roname LIKE 'bdr\\_%\\_node3'",
        ) == 1
    });
    let before_x: Vec<String> = vec![leftovers(a)];
    x.stop();
    let e = join_err(b, "node2", &b.dsn(), &a.dsn());
    assert!(
        e.contains("cannot join: a member is unreachable: node3"),
        "{e}"
    );
    assert_eq!(vec![leftovers(a)], before_x, "nothing left on node1");
    x.start();
    // Nothing was left behind by any failed attempt on node1 or node2.
    assert_eq!(leftovers(b), before[1]);
    // Joining works after all, and a second join is a no-op with a notice.
    join(b, a);
    let joined = leftovers(b);
    b.execute(&format!(
        "SELECT bdr.group_join('node2', '{}', '{}')",
        b.dsn(),
        a.dsn()
    ));
    assert_eq!(leftovers(b), joined, "a repeated join changes nothing");
    let e = join_err(b, "node9", &b.dsn(), &a.dsn());
    assert!(e.contains("this node is already node \"node2\""), "{e}");
}

#[test]
fn apply_error_is_logged_retried_and_resumes_without_loss() {
    let c = Cluster::builder().name("applyerr").nodes(2).start();
    for n in c.nodes() {
        n.execute("CREATE EXTENSION bdr; CREATE TABLE t (id int PRIMARY KEY, v text);");
    }
    form_group(&c);
    let (a, b) = (c.node(0), c.node(1));
    // A column exists on node1 only (added there alone): its rows cannot be applied on
    // node2.
    a.execute("SET bdr.ddl_replication = off; ALTER TABLE t ADD COLUMN extra int");
    a.execute("INSERT INTO t VALUES (1, 'one', 10); INSERT INTO t VALUES (2, 'two', 20);");
    wait_until("the apply error to be visible on node2", CATCHUP, || {
        b.query_scalar::<bool>(
            "SELECT coalesce(bool_or(last_error LIKE '%has no column \"extra\"%'), false) FROM bdr.apply_workers()",
        )
    });
    retried_until_fixed(
        &c,
        "ERROR:  table \"public\".\"t\" has no column \"extra\" on this node",
        "SET bdr.ddl_replication = off; ALTER TABLE t ADD COLUMN extra int",
    );
}

/// Node2 of `c` fails to apply node1's two-row INSERT into `t` with `error`: the error is
/// logged with the change's context, retried (the error count grows) with nothing
/// applied meanwhile; once the DBA runs `fix` on node2, replication resumes with nothing
/// lost, and each failed attempt is in the history as an apply_error, nothing else is.
fn retried_until_fixed(c: &Cluster, error: &str, fix: &str) {
    let b = c.node(1);
    wait_until(
        "the error logged with its context on node2",
        CATCHUP,
        || {
            let log = b.log();
            log.contains(error)
            && log.contains(
                "CONTEXT:  bdr apply: INSERT on relation public.t from node \"node1\" in remote transaction",
            )
        },
    );
    wait_until("a retry", CATCHUP, || {
        b.query_scalar::<i64>("SELECT max(error_count) FROM bdr.apply_workers()") >= 2
    });
    assert_eq!(b.query_scalar::<i64>("SELECT count(*) FROM t"), 0);
    b.execute(fix);
    wait_for_catchup(c);
    assert_eq!(assert_same_everywhere(c, "t").split(':').next(), Some("2"));
    let history = conflicts(b);
    assert!(!history.is_empty());
    assert!(
        history
            .iter()
            .all(|h| (h.0.as_str(), h.1.as_str(), h.2.as_str())
                == ("apply_error", "retry", "public.t")),
        "{history:?}"
    );
}

/// A deferred constraint trigger enabled for replicated changes on the receiving node
/// cannot fire in bdr's apply (it runs each change as the table's owner in a
/// security-restricted operation, where PostgreSQL refuses deferred triggers): an apply
/// error like any other, raised inside the one guard the speculative insertion runs
/// under (`pg::unguarded::guarded`): logged with the remote node and position, the
/// transaction rolled back, retried until the DBA removes the trigger, nothing lost, the
/// server up. The writes come from a plain role.
#[test]
fn a_deferred_trigger_on_the_receiver_is_an_apply_error_until_removed() {
    let c = pair_with_app("deferredtrg", "SELECT, INSERT");
    let (a, b) = (c.node(0), c.node(1));
    b.execute(
        "SET bdr.ddl_replication = off;
         CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql
             AS $$ BEGIN RAISE EXCEPTION 'refused at commit'; END $$;
         CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON t
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse();
         ALTER TABLE t ENABLE ALWAYS TRIGGER refuse_at_commit;",
    );
    let mut app = a.connect_as("app");
    app.batch_execute("INSERT INTO t VALUES (1, 'one'); INSERT INTO t VALUES (2, 'two');")
        .unwrap();
    retried_until_fixed(
        &c,
        "ERROR:  cannot fire deferred trigger within security-restricted operation",
        "SET bdr.ddl_replication = off; DROP TRIGGER refuse_at_commit ON t",
    );
}

/// Numbered single-row transactions from `n` until `stop` is set; returns how many.
fn writer(
    n: &Node,
    table: &str,
    start: i64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<i64> {
    let dsn = n.dsn();
    let table = table.to_string();
    std::thread::spawn(move || {
        let mut i = start;
        while !stop.load(Ordering::SeqCst) {
            // The node may be down for a while (crash scenarios): keep trying.
            let Ok(mut cl) = postgres::Client::connect(&dsn, postgres::NoTls) else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            while !stop.load(Ordering::SeqCst) {
                match cl.execute(&format!("INSERT INTO {table} VALUES ($1)"), &[&i]) {
                    Ok(_) => i += 1,
                    // The server crashed after committing row i but before acknowledging
                    // it: the row is there, go on with the next one.
                    Err(e) if e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) => {
                        i += 1
                    }
                    Err(_) => break,
                }
            }
        }
        i - start
    })
}

#[test]
fn join_under_load_misses_nothing() {
    for round in 0..3 {
        let c = Cluster::builder()
            .name(&format!("loadjoin{round}"))
            .nodes(3)
            .start();
        c.node(0)
            .execute("CREATE EXTENSION bdr; CREATE TABLE seq (id int8 PRIMARY KEY)");
        c.node(1)
            .execute("CREATE EXTENSION bdr; CREATE TABLE seq (id int8 PRIMARY KEY)");
        c.node(2).execute("CREATE EXTENSION bdr");
        let (a, b, j) = (c.node(0), c.node(1), c.node(2));
        a.execute(&format!("SELECT bdr.group_create('node1', '{}')", a.dsn()));
        join(b, a);
        let stop = Arc::new(AtomicBool::new(false));
        let wa = writer(a, "seq", 1_000_000, stop.clone());
        let wb = writer(b, "seq", 2_000_000, stop.clone());
        wait_until("some load", CATCHUP, || {
            a.query_scalar::<i64>("SELECT count(*) FROM seq") > 200
        });
        // Round 0 joins through node1, round 1 through node2 (the busy third node is the
        // other writer), round 2 through node1 again.
        let via = if round == 1 { b } else { a };
        join(j, via);
        let at_join: i64 = a.query_scalar("SELECT count(*) FROM seq");
        wait_until("more load after the join", CATCHUP, || {
            a.query_scalar::<i64>("SELECT count(*) FROM seq") > at_join + 300
        });
        stop.store(true, Ordering::SeqCst);
        let (na, nb) = (wa.join().unwrap(), wb.join().unwrap());
        wait_for_catchup(&c);
        let d = assert_same_everywhere(&c, "seq");
        assert_eq!(
            d.split(':').next().unwrap(),
            (na + nb).to_string(),
            "round {round}"
        );
        for n in c.nodes() {
            assert_eq!(
                conflicts(n),
                vec![],
                "round {round}: conflicts on {}",
                n.name()
            );
        }
    }
}

fn crash_scenario(kill_index: usize, name: &str) {
    let c = Cluster::builder().name(name).nodes(3).start();
    for n in c.nodes() {
        n.execute("CREATE EXTENSION bdr; CREATE TABLE seq (id int8 PRIMARY KEY);");
    }
    form_group(&c);
    let stop = Arc::new(AtomicBool::new(false));
    // node1 writes a stream of numbered transactions; node2 and node3 receive it.
    let w = writer(c.node(0), "seq", 1, stop.clone());
    let victim = c.node(kill_index);
    wait_until("some rows on the victim", CATCHUP, || {
        victim.query_scalar::<i64>("SELECT count(*) FROM seq") > 300
    });
    victim.kill9();
    std::thread::sleep(Duration::from_millis(300)); // let the writer run into the crash
    victim.start();
    wait_until("more rows after the restart", CATCHUP, || {
        c.node(0).query_scalar::<i64>("SELECT count(*) FROM seq") > 1500
    });
    stop.store(true, Ordering::SeqCst);
    let written = w.join().unwrap();
    wait_for_catchup(&c);
    let d = assert_same_everywhere(&c, "seq");
    // Every committed transaction exactly once: the count is the number of commits the
    // writer saw succeed (a commit lost in the crash of node1 was never acknowledged), and
    // ids are 1..n without gaps on every node.
    let n: i64 = c.node(1).query_scalar("SELECT count(*) FROM seq");
    assert!(
        n >= written - 1 && n <= written + 1,
        "{d}: {n} rows, writer saw {written}"
    );
    assert_eq!(
        c.node(2)
            .query_scalar::<i64>("SELECT max(id) - min(id) + 1 FROM seq"),
        n
    );
    for node in c.nodes() {
        assert_eq!(
            conflicts(node),
            vec![],
            "duplicate apply on {}",
            node.name()
        );
    }
}

#[test]
fn crash_of_a_receiving_node_loses_and_duplicates_nothing() {
    crash_scenario(1, "crashrecv");
}

#[test]
fn crash_of_the_sending_node_loses_and_duplicates_nothing() {
    crash_scenario(0, "crashsend");
}

#[test]
fn stop_and_start_all_nodes_resumes() {
    let c = Cluster::builder().name("restartall").nodes(3).start();
    for n in c.nodes() {
        n.execute("CREATE EXTENSION bdr; CREATE TABLE t (id int PRIMARY KEY, v text);");
    }
    form_group(&c);
    c.node(0)
        .execute("INSERT INTO t SELECT g, 'before' FROM generate_series(1, 100) g");
    wait_for_catchup(&c);
    for n in c.nodes() {
        n.stop();
    }
    for n in c.nodes() {
        n.start();
    }
    c.node(1)
        .execute("INSERT INTO t SELECT g, 'after' FROM generate_series(101, 200) g");
    c.node(2)
        .execute("UPDATE t SET v = 'updated' WHERE id <= 10");
    wait_for_catchup(&c);
    assert!(assert_same_everywhere(&c, "t").starts_with("200:"));
    assert_eq!(
        c.node(0)
            .query_scalar::<i64>("SELECT count(*) FROM t WHERE v = 'updated'"),
        10
    );
}

/// Private memory (kB) of the apply worker streaming from `peer` on `n`.
fn apply_worker_anon_kb(n: &Node, peer: &str) -> i64 {
    let pid: i32 = n.query_scalar(&format!(
        "SELECT pid FROM bdr.apply_workers() WHERE peer = '{peer}'"
    ));
    pg_test::rss_anon_kb(pid)
}

/// Wait until `table` on `n` has `rows` rows, sampling the apply worker's private memory;
/// returns the peak seen.
fn apply_and_sample(n: &Node, table: &str, rows: i64) -> i64 {
    let mut peak = 0;
    wait_until(
        &format!("{rows} rows in {table} on {}", n.name()),
        Duration::from_secs(900),
        || {
            peak = peak.max(apply_worker_anon_kb(n, "node1"));
            n.query_scalar::<i64>(&format!("SELECT count(*) FROM {table}")) == rows
        },
    );
    peak
}

#[test]
fn a_million_row_transaction_replicates_in_bounded_memory() {
    let c = Cluster::builder()
        .name("bigtx")
        .nodes(2)
        .conf("logical_decoding_work_mem", "'64MB'")
        .start();
    for n in c.nodes() {
        n.execute("CREATE EXTENSION bdr; CREATE TABLE big (id int8 PRIMARY KEY, v text);");
    }
    form_group(&c);
    let (a, b) = (c.node(0), c.node(1));
    a.execute("INSERT INTO big SELECT g, 'row ' || g FROM generate_series(1, 100000) g");
    let peak_100k = apply_and_sample(b, "big", 100_000);
    a.execute("INSERT INTO big SELECT g, 'row ' || g FROM generate_series(100001, 1100000) g");
    let peak_1m = apply_and_sample(b, "big", 1_100_000);
    println!(
        "apply worker peak private memory (RssAnon, sampled): {peak_100k} kB while applying a \
         100,000-row transaction, {peak_1m} kB while applying a 1,000,000-row transaction"
    );
    wait_for_catchup(&c);
    assert_same_everywhere(&c, "big");
    // Ten times the rows must not take anywhere near ten times the memory.
    assert!(peak_100k > 0 && peak_1m > 0, "could not sample the worker");
    assert!(
        peak_1m < peak_100k * 2 + 8 * 1024,
        "peak grew from {peak_100k} kB to {peak_1m} kB"
    );
}

/// Two nodes with `bdr.stream_batch_wait` at 100 ms and a table `seq` the plain role
/// `app` may write.
fn batch_wait_group(name: &str) -> Cluster {
    let c = Cluster::builder()
        .name(name)
        .nodes(2)
        .conf("bdr.stream_batch_wait", "'100ms'")
        .start();
    pg_test::bdr::form_group_with_app_table(&c);
    c.node(0)
        .execute("CREATE TABLE seq (id int8 PRIMARY KEY); GRANT ALL ON seq TO app");
    wait_for_catchup(&c);
    c
}

/// The processes of the stream from node1 to node2: node2's apply worker, node1's
/// walsender.
fn stream_pids(c: &Cluster) -> (i32, i32) {
    let apply = c
        .node(1)
        .query_scalar("SELECT pid FROM bdr.apply_workers() WHERE peer = 'node1'");
    let sender = c
        .node(0)
        .query_scalar("SELECT active_pid FROM pg_replication_slots WHERE slot_name LIKE '%node2'");
    (apply, sender)
}

/// A process's voluntary context switches (its sleeps) so far, from `/proc`.
fn sleeps(pid: i32) -> i64 {
    pg_test::sys::voluntary_switches(pid).expect("voluntary_ctxt_switches of a live process")
}

/// `bdr.stream_batch_wait`: both ends of a busy stream batch their wake-ups instead of
/// waking for each transaction, and lose nothing. Two sessions of the plain role `app`
/// commit single-row transactions on node1 as fast as they can; with the setting at
/// 100 ms, node1's walsender towards node2 and node2's apply worker each sleep far fewer
/// times than there are transactions (without the batching the apply worker slept once
/// per transaction on this machine, 4,087 times for 4,063), and every row arrives. After
/// the load a single transaction still arrives (both are back to waking on arrival).
#[test]
fn a_busy_stream_is_applied_in_batches() {
    let c = batch_wait_group("batchwait");
    let (a, b) = (c.node(0), c.node(1));
    let (pid, sender) = stream_pids(&c);
    let commits =
        || -> i64 { b.query_scalar("SELECT commits FROM bdr.apply_stats() WHERE peer = 'node1'") };
    let (sleeps0, sent0, commits0) = (sleeps(pid), sleeps(sender), commits());
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2i64)
        .map(|w| {
            let (mut cl, stop) = (a.connect_as("app"), stop.clone());
            std::thread::spawn(move || {
                let mut i = w * 1_000_000;
                while !stop.load(Ordering::SeqCst) {
                    cl.execute("INSERT INTO seq VALUES ($1)", &[&i]).unwrap();
                    i += 1;
                }
                i - w * 1_000_000
            })
        })
        .collect();
    wait_until("4,000 transactions applied on node2", CATCHUP, || {
        commits() - commits0 >= 4_000
    });
    stop.store(true, Ordering::SeqCst);
    let written: i64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    wait_for_catchup(&c);
    let (slept, applied) = (sleeps(pid) - sleeps0, commits() - commits0);
    let sender_slept = sleeps(sender) - sent0;
    eprintln!(
        "{applied} transactions: node2's apply worker slept {slept} times, node1's walsender {sender_slept}"
    );
    assert_eq!(
        b.query_scalar::<i64>("SELECT count(*) FROM seq"),
        written,
        "every row on node2"
    );
    assert!(
        slept * 5 < applied,
        "the apply worker batched its wake-ups: {slept} sleeps for {applied} transactions"
    );
    assert!(
        sender_slept * 5 < applied,
        "the walsender batched its wake-ups: {sender_slept} sleeps for {applied} transactions"
    );
    a.execute("INSERT INTO seq VALUES (-1)");
    wait_until("a lone transaction after the load", CATCHUP, || {
        b.query_scalar::<i64>("SELECT count(*) FROM seq WHERE id = -1") == 1
    });
}

/// A backlog is sent and read as fast as it can be: the waits of `bdr.stream_batch_wait`
/// are for a stream that keeps up with its origin, never for one with data waiting.
/// node2's apply is paused while the plain role `app` commits 10,000 single-row
/// transactions on node1, then resumed with the setting at 100 ms. Before session 19 the
/// apply worker waited after each read of its connection's buffer with more in its
/// socket, and node1's walsender, once within a page of WAL of the end, slept after each
/// commit it sent: the last page's transactions came one per 100 ms (42 to 55 sleeps of
/// each process, 3.7 to 4.7 s for this backlog). Now each sleep is followed by
/// everything that arrived meanwhile (the apply worker: 2 to 12 sleeps; the walsender, over
/// the backlog's last tenth where those sleeps were: 0 to 2).
#[test]
fn a_backlog_is_read_without_batch_waits() {
    let c = batch_wait_group("backlogwait");
    let (a, b) = (c.node(0), c.node(1));
    b.execute("SELECT bdr.apply_pause()");
    wait_until("node2's apply paused", CATCHUP, || {
        b.query_scalar::<bool>("SELECT bool_and(state = 'paused') FROM bdr.apply_workers()")
    });
    let mut app = a.connect_as("app");
    for i in 0..10_000i64 {
        app.execute("INSERT INTO seq VALUES ($1)", &[&i]).unwrap();
    }
    let (pid, sender) = stream_pids(&c);
    let (sleeps0, sent0) = (sleeps(pid), sleeps(sender));
    b.execute("SELECT bdr.apply_resume()");
    // The walsender's sleeps are counted over the backlog's last tenth: before that it
    // also sleeps whenever the socket to node2 is full (flow control: as often as the
    // kernel's buffers say, 2 to 27 times over the whole backlog in CI), while the batch
    // wait's sleeps, where it used to sleep after each commit, are at the end.
    wait_until("most of the backlog applied on node2", CATCHUP, || {
        b.query_scalar::<i64>("SELECT count(*) FROM seq") >= 9_000
    });
    let tail0 = sleeps(sender);
    wait_until("the backlog applied on node2", CATCHUP, || {
        b.query_scalar::<i64>("SELECT count(*) FROM seq") == 10_000
    });
    let (slept, sender_slept) = (sleeps(pid) - sleeps0, sleeps(sender) - tail0);
    eprintln!(
        "a backlog of 10,000: node2's apply worker slept {slept} times, node1's walsender \
         {} (over the last tenth: {sender_slept})",
        sleeps(sender) - sent0
    );
    assert!(
        slept < 20 && sender_slept < 20,
        "the stream waited with data to send or read: the apply worker slept {slept} \
         times, the walsender {sender_slept} over the backlog's last tenth"
    );
}

/// What the apply evaluates on the receiving node reads the time of the applying
/// transaction: a local-only column's `DEFAULT now()`. Until session 26 a bdr worker's
/// transactions all started, for PostgreSQL, when the worker connected (nothing set the
/// statement start time a transaction takes its own from): it read the apply worker's
/// start, however long ago, and `pg_stat_activity.xact_start` was as stale. (A
/// replicated `ADD COLUMN ... DEFAULT now()` read it too; since session 28 that is
/// refused on a table with rows, `ddl.rs`.)
#[test]
fn the_apply_reads_its_own_transactions_time_not_its_workers_start() {
    let c = pair_with_app("applynow", "SELECT, INSERT, UPDATE, DELETE");
    let (a, b) = (c.node(0), c.node(1));
    b.execute(
        "SET bdr.ddl_replication = off; ALTER TABLE t ADD COLUMN seen timestamptz DEFAULT now()",
    );
    let app = |sql: &str| a.connect_as("app").batch_execute(sql).unwrap();
    // Later than the apply worker's start on node2 (it began before the group formed).
    let before: String = b.query_scalar("SELECT now()::text");
    app("INSERT INTO t VALUES (1, 'one')");
    wait_for_catchup(&c);
    let seen: String = b.query_scalar("SELECT seen::text FROM t WHERE id = 1");
    assert!(
        b.query_scalar::<bool>(&format!(
            "SELECT seen >= '{before}'::timestamptz FROM t WHERE id = 1"
        )),
        "the local-only column's default on node2 is the apply's time: {seen} is before {before}"
    );
    assert!(
        b.query_scalar::<bool>(&format!(
            "SELECT bool_and(xact_start IS NULL OR xact_start >= '{before}'::timestamptz) \
               FROM pg_stat_activity WHERE backend_type LIKE 'bdr apply%'"
        )),
        "an apply worker's transaction start in pg_stat_activity is not its connection time"
    );
}

/// What a node applied counts in its statistics views: `pg_stat_user_tables` (whose row
/// counts autovacuum and autoanalyze go by) for the user's table and bdr's tombstones,
/// and `pg_stat_activity` shows the workers' state. Until session 26 a bdr worker never
/// handed its statistics to shared memory while it ran (only a client backend's main
/// loop does that by itself): on every node that applied them, replicated writes stayed
/// out of the counts, and such tables were never vacuumed or analyzed by autovacuum.
#[test]
fn applied_rows_count_in_the_statistics_autovacuum_reads() {
    let c = pair_with_app("applystats", "SELECT, INSERT, UPDATE, DELETE");
    let (a, b) = (c.node(0), c.node(1));
    a.connect_as("app")
        .batch_execute(
            "INSERT INTO t SELECT g, 'v' FROM generate_series(1, 200) g;
             UPDATE t SET v = 'w' WHERE id <= 150;
             DELETE FROM t WHERE id <= 20;",
        )
        .unwrap();
    wait_for_catchup(&c);
    let counts = |n: &Node, rel: &str| -> String {
        n.query_scalar(&format!(
            "SELECT format('%s/%s/%s', n_tup_ins, n_tup_upd, n_tup_del) \
               FROM pg_stat_user_tables WHERE relid = '{rel}'::regclass"
        ))
    };
    wait_until(
        "node2's statistics to count the applied rows",
        CATCHUP,
        || counts(b, "t") == "200/150/20",
    );
    assert_eq!(counts(a, "t"), "200/150/20", "node1's own writes");
    wait_until(
        "node2's statistics to count the tombstones it wrote",
        CATCHUP,
        || {
            b.query_scalar::<i64>(
            "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relid = 'bdr.tombstones'::regclass",
        ) >= 20
        },
    );
    assert!(
        b.query_scalar::<bool>(
            "SELECT count(*) = 1 AND bool_and(state IN ('idle', 'active')) FROM pg_stat_activity \
              WHERE backend_type LIKE 'bdr apply%'"
        ),
        "the apply worker's state is shown"
    );
}
