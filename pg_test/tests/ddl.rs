//! DDL replication (issue 13): a schema change made on one node reaches every node, in
//! order with the data, applied exactly once, and never stalls apply. Application writes
//! and most schema changes run as a plain role `app`.

use pg_test::bdr::{assert_same_everywhere, form_group, wait_for_catchup, CATCHUP};
use pg_test::{wait_until, Cluster, Node};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `n` nodes in a group, a plain role `app` on each that may create in schema public.
fn group(name: &str, n: usize) -> Cluster {
    let c = Cluster::builder().name(name).nodes(n).start();
    for node in c.nodes() {
        node.execute(
            "CREATE EXTENSION bdr;
             CREATE ROLE app LOGIN;
             GRANT CREATE ON SCHEMA public TO app;",
        );
    }
    form_group(&c);
    c
}

/// Table shape as text: columns with types, and index names.
fn shape(n: &Node, table: &str) -> String {
    n.query_scalar(&format!(
        "SELECT coalesce((SELECT string_agg(column_name || ' ' || data_type, ', ' ORDER BY ordinal_position)
                   FROM information_schema.columns WHERE table_schema = 'public' AND table_name = '{table}'), '')
         || ' | ' ||
         coalesce((SELECT string_agg(indexname, ', ' ORDER BY indexname) FROM pg_indexes
                   WHERE schemaname = 'public' AND tablename = '{table}'), '')"
    ))
}

fn assert_same_shape(c: &Cluster, table: &str) -> String {
    let s0 = shape(c.node(0), table);
    for n in &c.nodes()[1..] {
        assert_eq!(shape(n, table), s0, "{table} on {} vs node1", n.name());
    }
    s0
}

fn total_apply_errors(c: &Cluster) -> i64 {
    c.nodes()
        .iter()
        .map(|n| {
            n.query_scalar::<i64>("SELECT coalesce(sum(errors), 0)::int8 FROM bdr.apply_stats()")
        })
        .sum()
}

#[test]
fn create_table_replicates_and_rows_written_everywhere_right_after_arrive() {
    let c = group("ddl_create", 3);
    let (a, b, x) = (c.node(0), c.node(1), c.node(2));
    a.connect_as("app")
        .batch_execute(
            "CREATE TABLE customers (id bigint PRIMARY KEY, name text);
             CREATE TABLE orders (
                 id bigserial PRIMARY KEY,
                 customer bigint REFERENCES customers (id),
                 n int GENERATED ALWAYS AS IDENTITY,
                 note text);
             CREATE INDEX orders_customer ON orders (customer);
             INSERT INTO customers VALUES (1, 'one');",
        )
        .unwrap();
    // Right after, every node writes, with the keys the table gives (snowflake ids, set
    // up by the replicated CREATE TABLE on every node).
    for n in c.nodes() {
        let mut app = n.connect_as("app");
        wait_until(&format!("orders on {}", n.name()), CATCHUP, || {
            app.execute("SELECT 1 FROM orders LIMIT 0", &[]).is_ok()
        });
        for _ in 0..50 {
            app.execute("INSERT INTO orders (customer, note) VALUES (1, 'x')", &[])
                .unwrap();
        }
    }
    wait_for_catchup(&c);
    assert_same_everywhere(&c, "orders");
    assert_same_everywhere(&c, "customers");
    assert_eq!(b.query_scalar::<i64>("SELECT count(*) FROM orders"), 150);
    assert_same_shape(&c, "orders");
    // The table belongs to the role that created it, on every node.
    for n in [a, b, x] {
        assert_eq!(
            n.query_scalar::<String>(
                "SELECT tableowner::text FROM pg_tables WHERE tablename = 'orders'"
            ),
            "app"
        );
    }
    assert_eq!(total_apply_errors(&c), 0, "an apply worker errored");
    for n in [a, b, x] {
        assert_eq!(
            n.query_scalar::<i64>("SELECT count(*) FROM bdr.conflict_history"),
            0,
            "conflicts on {}",
            n.name()
        );
    }
}

/// Writers on every node insert into t continuously (retrying when a schema change holds
/// the table); returns the ids that committed.
fn start_writers(
    c: &Cluster,
    stop: &Arc<AtomicBool>,
    base: i64,
) -> Vec<std::thread::JoinHandle<Vec<i64>>> {
    c.nodes()
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mut app = n.connect_as("app");
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut done = Vec::new();
                let mut k = 0i64;
                while !stop.load(Ordering::SeqCst) {
                    let id = base + (i as i64 + 1) * 1_000_000 + k;
                    match app.execute("INSERT INTO t (id, v) VALUES ($1, 'w')", &[&id]) {
                        Ok(_) => {
                            done.push(id);
                            k += 1;
                        }
                        Err(e) => {
                            let text = pg_test::db_error_text(&e);
                            // Held for a schema change, or the table is gone: retry/stop.
                            if text.contains("does not exist") {
                                break;
                            }
                            assert!(text.contains("held for a schema change"), "{text}");
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
                done
            })
        })
        .collect()
}

#[test]
fn alter_table_on_each_node_while_all_write_ends_identical_and_loses_nothing() {
    let c = group("ddl_alter", 3);
    let pids: Vec<_> = c.nodes().iter().map(|n| n.postmaster_pid()).collect();
    c.node(0)
        .connect_as("app")
        .batch_execute("CREATE TABLE t (id bigint PRIMARY KEY, v text)")
        .unwrap();
    wait_for_catchup(&c);
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(&c, &stop, 0);
    let steps: [(usize, &str); 5] = [
        (0, "ALTER TABLE t ADD COLUMN c2 int DEFAULT 5"),
        (1, "ALTER TABLE t ALTER COLUMN v TYPE varchar(200)"),
        (2, "ALTER TABLE t RENAME COLUMN c2 TO c3"),
        (0, "CREATE INDEX t_v ON t (v)"),
        (1, "ALTER TABLE t DROP COLUMN c3"),
    ];
    for (on, ddl) in steps {
        std::thread::sleep(Duration::from_millis(300));
        c.node(on)
            .connect_as("app")
            .batch_execute(ddl)
            .unwrap_or_else(|e| panic!("{ddl} on node{}: {}", on + 1, pg_test::db_error_text(&e)));
        wait_for_catchup(&c);
        assert_same_shape(&c, "t");
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let committed: Vec<i64> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    wait_for_catchup(&c);
    assert_same_everywhere(&c, "t");
    let shape = assert_same_shape(&c, "t");
    assert!(
        shape.starts_with("id bigint, v character varying"),
        "{shape}"
    );
    assert!(shape.contains("t_v"), "{shape}");
    for n in c.nodes() {
        assert_eq!(
            n.query_scalar::<i64>("SELECT count(*) FROM t"),
            committed.len() as i64,
            "rows on {}",
            n.name()
        );
    }
    assert!(
        committed.len() > 30,
        "writers made {} rows",
        committed.len()
    );
    // Finally DROP TABLE from node3 while everyone writes.
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(&c, &stop, 10_000_000);
    std::thread::sleep(Duration::from_millis(300));
    c.node(2)
        .connect_as("app")
        .batch_execute("DROP TABLE t")
        .unwrap();
    wait_for_catchup(&c);
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    for n in c.nodes() {
        assert!(!n.query_scalar::<bool>("SELECT to_regclass('public.t') IS NOT NULL"));
    }
    let now: Vec<_> = c.nodes().iter().map(|n| n.postmaster_pid()).collect();
    assert_eq!(now, pids, "a postmaster restarted");
}

#[test]
fn bdr_replicate_ddl_command_works_as_in_bdr1() {
    let c = group("ddl_bdr1", 2);
    c.node(0).execute(
        "SELECT bdr.bdr_replicate_ddl_command('CREATE TABLE public.replicated (id int PRIMARY KEY)')",
    );
    wait_for_catchup(&c);
    // Also with automatic capture off in the session.
    c.node(1).execute(
        "SET bdr.ddl_replication = off;
         SELECT bdr.replicate_ddl_command('ALTER TABLE public.replicated ADD COLUMN v text');",
    );
    wait_for_catchup(&c);
    assert_same_shape(&c, "replicated");
    assert!(shape(c.node(0), "replicated").contains("v text"));
}

#[test]
fn a_ddl_failing_on_a_peer_is_an_apply_error_retried_never_skipped() {
    let c = group("ddl_fail", 2);
    let (a, b) = (c.node(0), c.node(1));
    // A name that exists only on node2.
    b.execute("SET bdr.ddl_replication = off; CREATE TABLE clash (x int);");
    a.execute(
        "CREATE TABLE clash (id int PRIMARY KEY, v text); INSERT INTO clash VALUES (1, 'a');",
    );
    wait_until("node2's apply of the DDL to fail", CATCHUP, || {
        b.query_scalar::<Option<String>>(
            "SELECT last_error FROM bdr.apply_workers() WHERE peer = 'node1'",
        )
        .is_some_and(|e| e.contains("already exists"))
    });
    // The server log names the statement.
    b.wait_for_log("CREATE TABLE clash", CATCHUP);
    let errors: i64 = b.query_scalar("SELECT errors FROM bdr.apply_stats() WHERE peer = 'node1'");
    wait_until("a retry", CATCHUP, || {
        b.query_scalar::<i64>("SELECT errors FROM bdr.apply_stats() WHERE peer = 'node1'") > errors
    });
    b.execute("SET bdr.ddl_replication = off; DROP TABLE clash;");
    wait_for_catchup(&c);
    assert_same_everywhere(&c, "clash");
    assert_same_shape(&c, "clash");
}

#[test]
fn a_receiver_killed_while_applying_a_ddl_transaction_applies_it_once() {
    let c = group("ddl_kill", 2);
    let (a, b) = (c.node(0), c.node(1));
    b.execute("SELECT bdr.apply_pause('node1')");
    a.execute(
        "BEGIN;
         CREATE TABLE big (id int PRIMARY KEY, v text);
         INSERT INTO big SELECT g, repeat('x', 100) FROM generate_series(1, 300000) g;
         ALTER TABLE big ADD COLUMN w int;
         COMMIT;",
    );
    b.execute("SELECT bdr.apply_resume('node1')");
    // Mid-transaction: the worker has the BEGIN and has not committed.
    wait_until("node2 applying the big transaction", CATCHUP, || {
        b.query_scalar::<bool>(
            "SELECT pending_commit_time IS NOT NULL FROM bdr.apply_lag() WHERE peer = 'node1'",
        )
    });
    b.kill9();
    b.start();
    wait_for_catchup(&c);
    assert_eq!(b.query_scalar::<i64>("SELECT count(*) FROM big"), 300000);
    assert_same_shape(&c, "big");
    assert_same_everywhere(&c, "big");
}

#[test]
fn with_a_member_down_a_drained_ddl_fails_in_time_naming_it_and_create_table_works() {
    let c = group("ddl_down", 3);
    let (a, x) = (c.node(0), c.node(2));
    a.execute("CREATE TABLE t (id int PRIMARY KEY)");
    wait_for_catchup(&c);
    x.stop();
    let started = std::time::Instant::now();
    let e = a
        .connect()
        .batch_execute("SET bdr.ddl_lock_timeout = '3s'; ALTER TABLE t ADD COLUMN v int DEFAULT 1")
        .expect_err("a drained DDL with a member down");
    let text = pg_test::db_error_text(&e);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    assert!(text.contains("node3"), "{text}");
    assert!(text.contains("HINT"), "{text}");
    // Nothing changed, and creating a new table works.
    assert!(!shape(a, "t").contains(" v "));
    a.execute("CREATE TABLE t2 (id int PRIMARY KEY)");
    x.start();
    wait_for_catchup(&c);
    assert_same_shape(&c, "t2");
    assert_same_shape(&c, "t");
}

#[test]
fn temp_tables_replicate_nothing_and_break_nothing() {
    let c = group("ddl_temp", 2);
    let (a, b) = (c.node(0), c.node(1));
    let before: i64 = a.query_scalar("SELECT count(*) FROM bdr.ddl_queue");
    a.connect_as("app")
        .batch_execute(
            "CREATE TEMP TABLE tt (id int PRIMARY KEY);
             INSERT INTO tt VALUES (1);
             ALTER TABLE tt ADD COLUMN v text;
             DROP TABLE tt;
             CREATE UNLOGGED TABLE ut (id int);
             DROP TABLE ut;",
        )
        .unwrap();
    assert_eq!(
        a.query_scalar::<i64>("SELECT count(*) FROM bdr.ddl_queue"),
        before
    );
    a.execute("CREATE TABLE after_temp (id int PRIMARY KEY)");
    wait_for_catchup(&c);
    assert_same_shape(&c, "after_temp");
    assert_eq!(total_apply_errors(&c), 0);
    assert!(b.query_scalar::<bool>("SELECT to_regclass('public.ut') IS NULL"));
}

#[test]
fn statements_that_cannot_replicate_safely_are_refused_with_a_hint() {
    let c = group("ddl_refuse", 2);
    let a = c.node(0);
    a.execute("CREATE TABLE t (id int PRIMARY KEY, v text)");
    for q in [
        "CREATE INDEX CONCURRENTLY t_v ON t (v)",
        "CREATE TABLE copy AS SELECT * FROM t",
    ] {
        let e = a.connect().batch_execute(q).expect_err(q);
        let text = pg_test::db_error_text(&e);
        assert!(text.contains("HINT"), "{q}: {text}");
    }
    // Per node, with capture off, it works.
    let mut one = a.connect();
    one.batch_execute("SET bdr.ddl_replication = off").unwrap();
    one.batch_execute("CREATE INDEX CONCURRENTLY t_v ON t (v)")
        .unwrap();
    assert!(shape(a, "t").contains("t_v"));
    assert!(!shape(c.node(1), "t").contains("t_v"));
}

/// A migration's usual order: CREATE TABLE, then at once (its own transaction, before the
/// CREATE has reached the peers) a drained ALTER TABLE of it. The members are asked to
/// fence it again until the table has arrived there. Until session 28 the ALTER failed
/// ("its fence lapsed or was lifted": the member had nothing to fence when asked, and the
/// table by the time the fence was to be kept). A table that exists on the origin only
/// makes the drained change fail in time, naming the member that lacks it.
#[test]
fn an_alter_right_after_its_create_table_waits_for_the_table_to_arrive() {
    let c = group("ddl_create_alter", 3);
    let (a, b) = (c.node(0), c.node(1));
    let mut app = a.connect_as("app");
    for i in 0..5 {
        app.batch_execute(&format!(
            "CREATE TABLE q{i} (id bigint PRIMARY KEY, v text)"
        ))
        .unwrap();
        app.batch_execute(&format!(
            "ALTER TABLE q{i} ADD COLUMN w int NOT NULL DEFAULT 0;
             INSERT INTO q{i} VALUES (1, 'one');"
        ))
        .unwrap_or_else(|e| panic!("ALTER TABLE q{i}: {}", pg_test::db_error_text(&e)));
    }
    wait_for_catchup(&c);
    for i in 0..5 {
        assert!(assert_same_shape(&c, &format!("q{i}")).contains("w integer"));
        assert_same_everywhere(&c, &format!("q{i}"));
    }
    // On node1 only: a drained change of it cannot fence it on the others.
    app.batch_execute(
        "SET bdr.ddl_replication = off;
         CREATE TABLE only_here (id int PRIMARY KEY);
         SET bdr.ddl_replication = on;",
    )
    .unwrap();
    let e = app
        .batch_execute(
            "SET bdr.ddl_lock_timeout = '2s'; ALTER TABLE only_here ADD COLUMN v int DEFAULT 1",
        )
        .expect_err("a table only node1 has");
    let text = pg_test::db_error_text(&e);
    assert!(
        text.contains(
            "node2 (it has no table \"public\".\"only_here\" to hold: it does not exist there)"
        ) && text.contains("(SQLSTATE 55P03)"),
        "{text}"
    );
    // Nothing is left fenced: node2 writes its tables.
    b.connect_as("app")
        .batch_execute("INSERT INTO q0 VALUES (2, 'two')")
        .unwrap();
    assert_eq!(total_apply_errors(&c), 0);
}

/// A schema change that would fill a table's existing rows with values each node
/// computes for itself (a column added with `DEFAULT now()`, `random()`, a serial or an
/// identity column, a type change `USING` such an expression) is refused while the table
/// has rows: replicated as it is, the nodes' rows would silently differ. Refused, it
/// changes nothing and leaves the table writable; on an empty table, or with an
/// immutable default or USING, it replicates; and the hint's recipe converges.
#[test]
fn a_change_whose_values_each_node_would_compute_is_refused_while_the_table_has_rows() {
    let c = group("ddl_per_node", 2);
    let (a, b) = (c.node(0), c.node(1));
    let mut app = a.connect_as("app");
    app.batch_execute(
        "CREATE TABLE mig (id bigint PRIMARY KEY, n int, v text);
         INSERT INTO mig SELECT g, g, 'r' || g FROM generate_series(1, 20) g;
         CREATE TABLE fresh (id bigint PRIMARY KEY);",
    )
    .unwrap();
    wait_for_catchup(&c);
    let before = assert_same_shape(&c, "mig");
    for (q, says) in [
        (
            "ALTER TABLE mig ADD COLUMN created_at timestamptz NOT NULL DEFAULT now()",
            "column \"created_at\" is added to \"public\".\"mig\" with a default that is not immutable",
        ),
        (
            "ALTER TABLE mig ADD COLUMN r float8 DEFAULT random()",
            "column \"r\" is added",
        ),
        (
            "ALTER TABLE mig ADD COLUMN at timestamptz, ADD COLUMN u uuid DEFAULT gen_random_uuid()",
            "column \"u\" is added",
        ),
        (
            "ALTER TABLE mig ADD COLUMN d date DEFAULT CURRENT_DATE",
            "column \"d\" is added",
        ),
        (
            "ALTER TABLE mig ADD COLUMN seen timestamptz DEFAULT 'now'",
            "column \"seen\" is added to \"public\".\"mig\" with a default literal read from the clock",
        ),
        (
            "ALTER TABLE mig ADD COLUMN day date NOT NULL DEFAULT 'today'::date",
            "column \"day\" is added",
        ),
        (
            "ALTER TABLE mig ADD COLUMN seq bigserial",
            "serial column \"seq\" is added",
        ),
        (
            "ALTER TABLE mig ADD COLUMN num int GENERATED ALWAYS AS IDENTITY",
            "identity column \"num\" is added",
        ),
        (
            "ALTER TABLE mig ALTER COLUMN v TYPE text USING v || clock_timestamp()",
            "column \"v\" of \"public\".\"mig\" changes type USING an expression that is not immutable",
        ),
    ] {
        let e = app.batch_execute(q).expect_err(q);
        let text = pg_test::db_error_text(&e);
        assert!(
            text.contains(says)
                && text.contains("the nodes' rows would differ")
                && text.contains("(SQLSTATE 0A000)")
                && text.contains("HINT: ")
                && text.contains("UPDATE"),
            "{q}: {text}"
        );
    }
    // ADD COLUMN IF NOT EXISTS of a column that is there computes nothing: it runs.
    app.batch_execute(
        "ALTER TABLE mig ADD COLUMN IF NOT EXISTS v text DEFAULT clock_timestamp()::text",
    )
    .unwrap();
    // Refused, nothing changed, and the table takes writes on both nodes at once.
    assert_eq!(assert_same_shape(&c, "mig"), before);
    app.batch_execute("INSERT INTO mig VALUES (21, 21, 'after')")
        .unwrap();
    b.connect_as("app")
        .batch_execute("INSERT INTO mig VALUES (22, 22, 'after on node2')")
        .unwrap();
    // Immutable defaults and USING replicate as before, and so do fixed date/time literals
    // and 'now' as text.
    app.batch_execute(
        "ALTER TABLE mig ADD COLUMN since timestamptz DEFAULT '2024-01-01 00:00',
                         ADD COLUMN word text DEFAULT 'now';
         ALTER TABLE mig ADD COLUMN flag int NOT NULL DEFAULT 0;
         ALTER TABLE mig ALTER COLUMN n TYPE bigint USING n::bigint * 2;",
    )
    .unwrap();
    // On a table without rows nothing is computed per node: it replicates.
    app.batch_execute("ALTER TABLE fresh ADD COLUMN created_at timestamptz DEFAULT now()")
        .unwrap();
    app.batch_execute("INSERT INTO fresh (id) VALUES (1)")
        .unwrap();
    // The hint's recipe: the values are computed once, on the origin, and travel as rows.
    app.batch_execute(
        "ALTER TABLE mig ADD COLUMN created_at timestamptz;
         ALTER TABLE mig ALTER COLUMN created_at SET DEFAULT now();
         UPDATE mig SET created_at = DEFAULT WHERE created_at IS NULL;",
    )
    .unwrap();
    wait_for_catchup(&c);
    assert!(assert_same_shape(&c, "mig").contains("created_at timestamp with time zone"));
    assert_eq!(
        b.query_scalar::<i64>(
            "SELECT count(*) FROM mig WHERE created_at IS NOT NULL AND flag = 0 AND n = id * 2"
        ),
        22
    );
    assert_same_everywhere(&c, "mig");
    assert_same_everywhere(&c, "fresh");
    assert_eq!(total_apply_errors(&c), 0);
}

/// While a schema change drains the other nodes' writes to its table, a user write to
/// that table on its node is refused with a clear error (the executor hook's fence), and
/// the table takes writes again once the change is done.
#[test]
fn a_write_to_a_table_held_for_a_schema_change_is_refused_until_it_is_done() {
    let c = group("ddl_fenced", 2);
    let (a, b) = (c.node(0), c.node(1));
    a.connect_as("app")
        .batch_execute("CREATE TABLE t (id bigint PRIMARY KEY, v text)")
        .unwrap();
    wait_for_catchup(&c);
    // node2 holds the table: the drain waits there, with t fenced on node1 meanwhile.
    let mut hold = b.connect();
    hold.batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let mut ddl = a.connect_as("app");
    let alter = std::thread::spawn(move || {
        ddl.batch_execute("ALTER TABLE t ADD COLUMN c int DEFAULT 7")
            .map_err(|e| pg_test::db_error_text(&e))
    });
    let mut app = a.connect_as("app");
    let mut id = 0i64;
    let mut refused = String::new();
    wait_until("a write on node1 refused by the fence", CATCHUP, || {
        id += 1;
        match app.execute("INSERT INTO t (id, v) VALUES ($1, 'w')", &[&id]) {
            Ok(_) => false,
            Err(e) => {
                refused = pg_test::db_error_text(&e);
                true
            }
        }
    });
    assert!(
        refused.contains("is held for a schema change from node \"node1\""),
        "{refused}"
    );
    assert!(!alter.is_finished(), "the schema change waits for node2");
    hold.batch_execute("ROLLBACK").unwrap();
    alter
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("ALTER TABLE: {e}"));
    app.execute("INSERT INTO t (id, v) VALUES (-1, 'after')", &[])
        .unwrap();
    wait_for_catchup(&c);
    assert_same_shape(&c, "t");
    assert_same_everywhere(&c, "t");
    assert_eq!(
        b.query_scalar::<i32>("SELECT c FROM t WHERE id = -1"),
        7,
        "the write after the change reached node2"
    );
}

/// A member's fence belongs to one schema change: an earlier change from the same node,
/// arriving late, does not lift it (until session 26 any schema change from the origin
/// lifted all of that origin's fences, so a later change's table was writable on the
/// member in its old shape while that change was still on its way).
#[test]
fn a_fence_is_lifted_by_its_own_schema_change_not_by_an_earlier_one() {
    let c = group("ddl_fence_own", 2);
    let (a, b) = (c.node(0), c.node(1));
    a.connect_as("app")
        .batch_execute(
            "CREATE TABLE t1 (id bigint PRIMARY KEY, v text);
             CREATE TABLE t2 (id bigint PRIMARY KEY, v text);
             CREATE TABLE t3 (id bigint PRIMARY KEY, v text);",
        )
        .unwrap();
    wait_for_catchup(&c);
    // node2 receives nothing from node1 for now: what follows waits in node1's stream,
    // while node2 holds writes to t1 and to t2 for the two changes (both drains pass:
    // node1 has applied node2's changes).
    pg_test::bdr::pause_apply(b);
    let mut ddl = a.connect_as("app");
    ddl.batch_execute("ALTER TABLE t1 ADD COLUMN c int DEFAULT 1")
        .unwrap();
    ddl.batch_execute("INSERT INTO t3 (id, v) VALUES (1, 'from node1')")
        .unwrap();
    ddl.batch_execute("ALTER TABLE t2 ADD COLUMN c int DEFAULT 2")
        .unwrap();
    // On node2, the row node1 inserted into t3 waits for this transaction, and with it
    // t2's change, behind it in the stream.
    let mut hold = b.connect();
    hold.batch_execute("BEGIN; INSERT INTO t3 (id, v) VALUES (1, 'held on node2')")
        .unwrap();
    b.execute("SELECT bdr.apply_resume()");
    wait_until("t1's change applied on node2", CATCHUP, || {
        shape(b, "t1").starts_with("id bigint, v text, c integer")
    });
    assert!(
        !shape(b, "t2").contains(" c "),
        "t2's change waits behind t3's row"
    );
    let mut app = b.connect_as("app");
    let refused = app
        .execute("INSERT INTO t2 (id, v) VALUES (1, 'old shape')", &[])
        .map_err(|e| pg_test::db_error_text(&e))
        .expect_err("t2 is still held on node2 for its own change");
    assert!(
        refused.contains("is held for a schema change from node \"node1\""),
        "{refused}"
    );
    app.execute("INSERT INTO t1 (id, v) VALUES (1, 'new shape')", &[])
        .expect("t1's change arrived: t1 is writable");
    hold.batch_execute("ROLLBACK").unwrap();
    wait_until(
        "t2 writable on node2 once its change arrived",
        CATCHUP,
        || {
            app.execute("INSERT INTO t2 (id, v) VALUES (2, 'new shape')", &[])
                .is_ok()
        },
    );
    wait_for_catchup(&c);
    assert_same_shape(&c, "t1");
    assert_same_shape(&c, "t2");
    assert_same_everywhere(&c, "t1");
    assert_same_everywhere(&c, "t2");
    assert_eq!(
        a.query_scalar::<i32>("SELECT c FROM t2 WHERE id = 2"),
        2,
        "the write after the change reached node1 with the new column's default"
    );
}

/// Drained schema changes of one node run one at a time, each until its transaction
/// ends: so each change's fences are lifted by that change alone on every member (two
/// at once could lift each other's). A second one waits within `bdr.ddl_lock_timeout`,
/// then fails naming the backend it waited for.
#[test]
fn drained_schema_changes_of_one_node_run_one_at_a_time() {
    let c = group("ddl_one_drain", 2);
    let a = c.node(0);
    a.connect_as("app")
        .batch_execute(
            "CREATE TABLE t1 (id bigint PRIMARY KEY, v text);
             CREATE TABLE t2 (id bigint PRIMARY KEY, v text);",
        )
        .unwrap();
    wait_for_catchup(&c);
    let mut first = a.connect_as("app");
    let first_pid: i32 = first
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    first
        .batch_execute("BEGIN; ALTER TABLE t1 ADD COLUMN c int DEFAULT 1")
        .unwrap();
    let refused = a
        .connect_as("app")
        .batch_execute("SET bdr.ddl_lock_timeout = '1s'; ALTER TABLE t2 ADD COLUMN c int DEFAULT 2")
        .map_err(|e| pg_test::db_error_text(&e))
        .expect_err("the first change's transaction is still open");
    assert!(
        refused.contains(&format!(
            "another schema change on this node (backend {first_pid}) did not end within 1000 ms"
        )) && refused.contains("55P03"),
        "{refused}"
    );
    let mut second = a.connect_as("app");
    let waiting = std::thread::spawn(move || {
        second
            .batch_execute("ALTER TABLE t2 ADD COLUMN c int DEFAULT 2")
            .map_err(|e| pg_test::db_error_text(&e))
    });
    wait_until("the second change waiting", CATCHUP, || {
        a.query_scalar::<bool>(
            "SELECT EXISTS (SELECT FROM pg_stat_activity \
                             WHERE state = 'active' AND query LIKE 'ALTER TABLE t2%')",
        )
    });
    assert!(!waiting.is_finished(), "it waits for the first to end");
    first.batch_execute("COMMIT").unwrap();
    waiting
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the second change once the first ended: {e}"));
    wait_for_catchup(&c);
    assert!(assert_same_shape(&c, "t1").contains("c integer"));
    assert!(assert_same_shape(&c, "t2").contains("c integer"));

    // A plain role holding every SQL advisory lock the lock's keys could be spelled as
    // (the two-key form, and the one-key form of both halves) holds nothing off.
    let mut squatter = a.connect_as("app");
    squatter
        .batch_execute(
            "SELECT pg_advisory_lock(6448242, 6579308), pg_advisory_lock(6579308, 6448242), \
                    pg_advisory_lock((6448242::int8 << 32) | 6579308), \
                    pg_advisory_lock((6579308::int8 << 32) | 6448242)",
        )
        .unwrap();
    a.connect_as("app")
        .batch_execute("SET bdr.ddl_lock_timeout = '2s'; ALTER TABLE t1 ADD COLUMN d int")
        .unwrap_or_else(|e| {
            panic!(
                "a plain role's advisory locks held a schema change off: {}",
                pg_test::db_error_text(&e)
            )
        });
    drop(squatter);
    wait_for_catchup(&c);
    assert!(assert_same_shape(&c, "t1").contains("d integer"));
}

/// Every row of `v` and the schema the nodes gave it, as text read under one fixed set of
/// session settings (each node's own would print the same value differently).
fn canonical(n: &Node) -> String {
    let mut client = n.connect();
    client
        .batch_execute(
            "SET DateStyle = ISO; SET TimeZone = UTC; SET IntervalStyle = postgres; \
             SET extra_float_digits = 3; SET bytea_output = hex;",
        )
        .unwrap();
    let rows: String = client
        .query_one(
            "SELECT coalesce(string_agg(t::text, E'\\n' ORDER BY id), '') FROM v t",
            &[],
        )
        .unwrap()
        .get(0);
    let schema: String = client
        .query_one(
            "SELECT (SELECT string_agg(a.attname || ' ' || pg_get_expr(d.adbin, d.adrelid), '; ' ORDER BY a.attnum)
                       FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
                      WHERE d.adrelid = 'v'::regclass)
                    || ' | ' ||
                    (SELECT string_agg(pg_get_constraintdef(oid), '; ' ORDER BY conname)
                       FROM pg_constraint WHERE conrelid = 'v'::regclass AND contype = 'c')",
            &[],
        )
        .unwrap()
        .get(0);
    format!("{schema}\n{rows}")
}

#[test]
fn nodes_configured_with_other_date_styles_and_time_zones_keep_the_same_values_and_schema() {
    let c = Cluster::builder().name("ddl_settings").nodes(3).start();
    let (a, b, x) = (c.node(0), c.node(1), c.node(2));
    // Three servers configured three ways: what a value's text says, and how a statement's
    // literal reads, depend on these.
    for (key, value) in [
        ("datestyle", "'SQL, DMY'"),
        ("intervalstyle", "'sql_standard'"),
        ("extra_float_digits", "0"),
        ("timezone", "'America/New_York'"),
        ("bytea_output", "'escape'"),
    ] {
        a.set_conf(key, value);
    }
    for (key, value) in [
        ("datestyle", "'German, DMY'"),
        ("intervalstyle", "'iso_8601'"),
        ("extra_float_digits", "-3"),
        ("timezone", "'Asia/Kolkata'"),
    ] {
        b.set_conf(key, value);
    }
    for n in c.nodes() {
        n.reload();
        n.execute(
            "CREATE EXTENSION bdr; CREATE ROLE app LOGIN; GRANT CREATE ON SCHEMA public TO app;",
        );
    }
    a.execute(&format!(
        "SELECT bdr.group_create(local_node_name := 'node1', node_external_dsn := '{}')",
        a.dsn()
    ));
    pg_test::bdr::join(b, a);
    // node3 joins later (wait_for_catchup counts only running nodes).
    x.stop();

    // A table made on node1 under its own settings: '03/01/2024' is 3 January there, and
    // midnight is New York's.
    let mut app = a.connect_as("app");
    app.batch_execute(
        "CREATE TABLE v (id int PRIMARY KEY, d date, ts timestamp, tz timestamptz,
                         iv interval, f float8, r real, by bytea,
                         d2 date DEFAULT '03/01/2024',
                         tz2 timestamptz DEFAULT '2024-01-01 00:00',
                         CHECK (tz IS NULL OR tz > '02/01/2000 00:00'));
         INSERT INTO v (id, d, ts, tz, iv, f, r, by) VALUES
           (1, '2024-01-03', '2024-01-03 04:05:06.789', '2024-01-03 04:05:06.789+02',
            '1 year -2 mons +3 days -04:05:06', 1/3::float8, 0.1::real, '\\x00ff27'::bytea),
           (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
         -- As a pg_dump restore runs: a function body naming a table created after it.
         SET check_function_bodies = off;
         CREATE FUNCTION v_later() RETURNS bigint LANGUAGE sql AS 'SELECT count(*) FROM later_t';
         CREATE TABLE later_t (id int PRIMARY KEY);",
    )
    .unwrap();
    wait_until("v, v_later and later_t on node2", CATCHUP, || {
        b.query_scalar::<bool>("SELECT to_regclass('public.later_t') IS NOT NULL")
    });
    b.connect_as("app")
        .batch_execute(
            "INSERT INTO v (id, d, ts, tz, iv, f, r, by) VALUES
               (3, '2023-12-11', '2023-12-11 23:59:59', '2023-12-11 23:59:59-08',
                '-1 days +02:03:04', 2/3::float8, 1e-20::real, '\\xdeadbeef'::bytea),
               (4, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
             -- A change made under a session's own settings: '03/01/2024' is 1 March
             -- here, and noon is Auckland's.
             SET DateStyle = 'Postgres, MDY'; SET TimeZone = 'Pacific/Auckland';
             ALTER TABLE v ADD COLUMN d3 date DEFAULT '03/01/2024',
                           ADD COLUMN tz3 timestamptz DEFAULT '2024-06-01 12:00';",
        )
        .unwrap();
    wait_for_catchup(&c);
    for n in [a, b] {
        assert_eq!(
            n.query_scalar::<i64>("SELECT coalesce(sum(errors), 0)::int8 FROM bdr.apply_stats()"),
            0,
            "a change failed on {}",
            n.name()
        );
    }
    b.query_scalar::<i64>("SELECT v_later()");

    // The node that joins now copies node1's rows as node1 prints them.
    x.start();
    pg_test::bdr::join(x, a);
    x.connect_as("app")
        .batch_execute(
            "INSERT INTO v (id, d, tz, iv, f) VALUES
               (5, '2022-02-03', '2022-02-03 10:00+00', '3 mons -1 days', 0.1::float8 + 0.2);
             INSERT INTO v (id) VALUES (6);",
        )
        .unwrap();
    // The joined node's copy of the schema belongs to the same roles: the owner's next
    // change runs there as the owner (copied as the joining superuser's, it failed there
    // with "must be owner of table v" and held node1's stream).
    assert_eq!(
        x.query_scalar::<String>("SELECT tableowner::text FROM pg_tables WHERE tablename = 'v'"),
        "app"
    );
    app.batch_execute("ALTER TABLE v ADD COLUMN note text; UPDATE v SET note = 'n' WHERE id = 6;")
        .unwrap();
    wait_for_catchup(&c);
    assert_eq!(total_apply_errors(&c), 0);

    let want = canonical(a);
    for n in [b, x] {
        assert_eq!(canonical(n), want, "{} differs from node1", n.name());
    }
    // And it is what each statement meant where it ran.
    let mut s = x.connect();
    s.batch_execute(
        "SET DateStyle = ISO; SET TimeZone = UTC; SET IntervalStyle = postgres; \
         SET extra_float_digits = 3;",
    )
    .unwrap();
    let mut row = |id: i32| -> String {
        s.query_one(
            "SELECT concat_ws(' ', d, ts, tz, iv, f, r, encode(by, 'hex'), d2, tz2, d3, tz3) \
             FROM v WHERE id = $1",
            &[&id],
        )
        .unwrap()
        .get(0)
    };
    assert_eq!(
        row(1),
        "2024-01-03 2024-01-03 04:05:06.789 2024-01-03 02:05:06.789+00 \
         10 mons 3 days -04:05:06 0.3333333333333333 0.1 00ff27 \
         2024-01-03 2024-01-01 05:00:00+00 2024-03-01 2024-06-01 00:00:00+00"
    );
    assert_eq!(
        row(3),
        "2023-12-11 2023-12-11 23:59:59 2023-12-12 07:59:59+00 -1 days +02:03:04 \
         0.6666666666666666 1e-20 deadbeef 2024-01-03 2024-01-01 05:00:00+00 \
         2024-03-01 2024-06-01 00:00:00+00"
    );
    assert_eq!(
        row(5),
        "2022-02-03 2022-02-03 10:00:00+00 3 mons -1 days 0.30000000000000004 \
         2024-01-03 2024-01-01 05:00:00+00 2024-03-01 2024-06-01 00:00:00+00"
    );
    assert!(
        want.contains("(tz > '2000-01-02 05:00:00+00'::timestamp with time zone)"),
        "{want}"
    );
    for n in c.nodes() {
        assert_eq!(n.query_scalar::<i64>("SELECT v_later()"), 0, "{}", n.name());
    }
}
