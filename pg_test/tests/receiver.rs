//! A receiver that trusts nothing (issue 12): a table owner's code runs as that owner in
//! apply, never as a superuser; a table changed locally under a running stream is never a
//! crash; a peer cannot make apply write into anything but an ordinary replicated table.
//! Every scenario also checks, through the harness, that no backend crashed (the server
//! logs are scanned for "terminated by signal 11/6" when the cluster is dropped) and that
//! the postmaster is the same process afterwards.

use pg_test::bdr::{assert_same_everywhere, form_group, wait_for_catchup, CATCHUP};
use pg_test::{wait_until, Cluster, Node};
use postgres::Client;
use std::time::{Duration, Instant};

/// Two nodes; on each a plain role `app` that owns table `t`.
fn pair_owned_by_app(name: &str) -> Cluster {
    let c = Cluster::builder().name(name).nodes(2).start();
    for n in c.nodes() {
        n.execute(
            "CREATE EXTENSION bdr;
             CREATE ROLE app LOGIN;
             GRANT CREATE ON SCHEMA public TO app;
             CREATE TABLE t (id int PRIMARY KEY, v text);
             ALTER TABLE t OWNER TO app;",
        );
    }
    form_group(&c);
    c
}

fn worker_error(n: &Node, peer: &str) -> Option<String> {
    n.connect()
        .query_one(
            "SELECT last_error FROM bdr.apply_workers() WHERE peer = $1",
            &[&peer],
        )
        .ok()
        .and_then(|r| r.get(0))
}

#[test]
fn a_table_owners_replica_trigger_runs_as_the_owner_not_as_superuser() {
    let c = pair_owned_by_app("owner_trigger");
    let (a, b) = (c.node(0), c.node(1));
    // On node2, the owner of t adds a trigger that fires in apply (ENABLE REPLICA) and
    // tries to make itself a superuser.
    b.connect_as("app")
        .batch_execute(
            "SET bdr.ddl_replication = off;
             CREATE FUNCTION escalate() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 ALTER ROLE app SUPERUSER;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER escalate BEFORE INSERT ON t
                 FOR EACH ROW EXECUTE FUNCTION escalate();
             ALTER TABLE t ENABLE REPLICA TRIGGER escalate;",
        )
        .unwrap();
    a.connect_as("app")
        .execute("INSERT INTO t VALUES (1, 'from node1')", &[])
        .unwrap();
    // Apply on node2 fails in the trigger (as app, ALTER ROLE is refused) and retries.
    wait_until("node2's apply of t to fail in the trigger", CATCHUP, || {
        worker_error(b, "node1").is_some_and(|e| e.contains("must be superuser"))
    });
    let su: bool = b.query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = 'app'");
    assert!(!su, "the table owner became a superuser through apply");
    assert_eq!(b.query_scalar::<i64>("SELECT count(*) FROM t"), 0);
    // The owner removes the trigger: the row arrives, nothing was skipped.
    b.connect_as("app")
        .batch_execute("SET bdr.ddl_replication = off; DROP TRIGGER escalate ON t")
        .unwrap();
    wait_for_catchup(&c);
    assert_same_everywhere(&c, "t");
    assert!(!b.query_scalar::<bool>("SELECT rolsuper FROM pg_roles WHERE rolname = 'app'"));
}

#[test]
fn apply_refuses_a_table_its_owner_may_not_write() {
    let c = pair_owned_by_app("owner_rights");
    let (a, b) = (c.node(0), c.node(1));
    // The owner of t on node2 revokes its own INSERT right.
    b.connect_as("app")
        .batch_execute("SET bdr.ddl_replication = off; REVOKE INSERT ON t FROM app")
        .unwrap();
    a.connect_as("app")
        .execute("INSERT INTO t VALUES (1, 'x')", &[])
        .unwrap();
    wait_until(
        "apply to be refused for the owner's missing right",
        CATCHUP,
        || worker_error(b, "node1").is_some_and(|e| e.contains("may not insert")),
    );
    assert_eq!(b.query_scalar::<i64>("SELECT count(*) FROM t"), 0);
    b.connect_as("app")
        .batch_execute("SET bdr.ddl_replication = off; GRANT INSERT ON t TO app")
        .unwrap();
    wait_for_catchup(&c);
    assert_same_everywhere(&c, "t");
}

/// Write rows through `c` as fast as one session can for `d`; returns the next id.
fn write_for(mut c: Client, d: Duration, from: i32) -> i32 {
    let start = Instant::now();
    let mut i = from;
    while start.elapsed() < d {
        c.execute("INSERT INTO t VALUES ($1, $2)", &[&i, &format!("row {i}")])
            .unwrap();
        i += 1;
    }
    i
}

#[test]
fn altering_the_receivers_table_under_a_running_stream_never_crashes() {
    let c = pair_owned_by_app("receiver_alter");
    let (a, b) = (c.node(0), c.node(1));
    let pid = b.postmaster_pid();
    let mut next = 1;
    // Each change on node2 while node1 writes to the table.
    for ddl in [
        // The crash seen before: a new text column filled with Datum 0.
        "ALTER TABLE t ADD COLUMN note text DEFAULT 'd'",
        "ALTER TABLE t ADD COLUMN n int DEFAULT 7",
        "ALTER TABLE t ALTER COLUMN v TYPE varchar(100)",
        "ALTER TABLE t DROP COLUMN note",
        "ALTER TABLE t ALTER COLUMN n TYPE bigint",
        "CREATE INDEX t_v ON t (v)",
        "ALTER TABLE t DROP COLUMN n",
    ] {
        let writer = {
            let client = a.connect_as("app");
            let from = next;
            std::thread::spawn(move || write_for(client, Duration::from_secs(2), from))
        };
        std::thread::sleep(Duration::from_millis(500));
        // On node2 only: a local change under a running stream.
        b.connect_as("app")
            .batch_execute(&format!("SET bdr.ddl_replication = off; {ddl}"))
            .unwrap();
        next = writer.join().unwrap();
        wait_for_catchup(&c);
        assert_eq!(
            b.postmaster_pid(),
            pid,
            "node2's postmaster restarted after {ddl}"
        );
        assert_eq!(
            b.query_scalar::<i64>("SELECT count(*) FROM t"),
            a.query_scalar::<i64>("SELECT count(*) FROM t"),
            "rows lost after {ddl}"
        );
    }
    // A column node1 sends and node2 dropped: an apply error, retried, never skipped.
    b.connect_as("app")
        .batch_execute("SET bdr.ddl_replication = off; ALTER TABLE t DROP COLUMN v")
        .unwrap();
    a.connect_as("app")
        .execute("INSERT INTO t VALUES (-1, 'after drop')", &[])
        .unwrap();
    wait_until("apply error for the dropped column", CATCHUP, || {
        worker_error(b, "node1").is_some_and(|e| e.contains("has no column \"v\""))
    });
    b.connect_as("app")
        .batch_execute("SET bdr.ddl_replication = off; ALTER TABLE t ADD COLUMN v text")
        .unwrap();
    wait_for_catchup(&c);
    assert_eq!(
        b.query_scalar::<String>("SELECT v FROM t WHERE id = -1"),
        "after drop"
    );
    assert_eq!(b.postmaster_pid(), pid);
}

#[test]
fn a_peer_cannot_make_apply_write_into_a_partitioned_table_or_a_view() {
    let c = Cluster::builder().name("receiver_relkind").nodes(2).start();
    for n in c.nodes() {
        n.execute("CREATE EXTENSION bdr");
    }
    form_group(&c);
    let (a, b) = (c.node(0), c.node(1));
    let pid = b.postmaster_pid();
    // Same names, different kinds: node1 has plain tables, node2 a partitioned table
    // and a view.
    a.execute(
        "SET bdr.ddl_replication = off;
         CREATE TABLE pt (id int PRIMARY KEY, v text);
         CREATE TABLE vv (id int PRIMARY KEY, v text);",
    );
    b.execute(
        "SET bdr.ddl_replication = off;
         CREATE TABLE pt (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
         CREATE TABLE pt_1 PARTITION OF pt FOR VALUES FROM (0) TO (1000);
         CREATE TABLE vv_base (id int PRIMARY KEY, v text);
         CREATE VIEW vv AS SELECT * FROM vv_base;",
    );
    a.execute("INSERT INTO pt VALUES (1, 'x')");
    wait_until("apply refusing the partitioned table", CATCHUP, || {
        worker_error(b, "node1").is_some_and(|e| e.contains("not an ordinary table"))
    });
    // The worker keeps retrying; nothing crashed, nothing was written.
    let errors_before: i64 =
        b.query_scalar("SELECT errors FROM bdr.apply_stats() WHERE peer = 'node1'");
    wait_until("a retry", CATCHUP, || {
        b.query_scalar::<i64>("SELECT errors FROM bdr.apply_stats() WHERE peer = 'node1'")
            > errors_before
    });
    assert_eq!(b.postmaster_pid(), pid);
    assert_eq!(b.query_scalar::<i64>("SELECT count(*) FROM pt"), 0);
    // The DBA fixes node2's schema: apply resumes with the row.
    b.execute("SET bdr.ddl_replication = off; DROP TABLE pt; CREATE TABLE pt (id int PRIMARY KEY, v text);");
    wait_for_catchup(&c);
    assert_same_everywhere(&c, "pt");
    // The same for a view.
    a.execute("INSERT INTO vv VALUES (1, 'y')");
    wait_until("apply refusing the view", CATCHUP, || {
        worker_error(b, "node1")
            .is_some_and(|e| e.contains("\"vv\"") && e.contains("not an ordinary table"))
    });
    assert_eq!(b.query_scalar::<i64>("SELECT count(*) FROM vv_base"), 0);
    b.execute("SET bdr.ddl_replication = off; DROP VIEW vv; CREATE TABLE vv (id int PRIMARY KEY, v text);");
    wait_for_catchup(&c);
    assert_same_everywhere(&c, "vv");
    assert_eq!(b.postmaster_pid(), pid);
}

#[test]
fn truncate_applies_as_the_owner_and_never_cascades_into_local_tables() {
    let c = pair_owned_by_app("receiver_truncate");
    let (a, b) = (c.node(0), c.node(1));
    a.connect_as("app")
        .batch_execute("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 5) g")
        .unwrap();
    wait_for_catchup(&c);
    // A table only node2 has (unlogged: it does not replicate) refers to t: the peer's
    // TRUNCATE ... CASCADE must not empty it.
    b.execute(
        "CREATE UNLOGGED TABLE local_ref (id int PRIMARY KEY, t_id int REFERENCES t);
         INSERT INTO local_ref VALUES (1, 1);",
    );
    a.connect_as("app")
        .batch_execute("TRUNCATE t CASCADE")
        .unwrap();
    wait_until(
        "apply of the TRUNCATE to fail on the local reference",
        CATCHUP,
        || worker_error(b, "node1").is_some_and(|e| e.contains("foreign key")),
    );
    assert_eq!(b.query_scalar::<i64>("SELECT count(*) FROM local_ref"), 1);
    b.execute("SET bdr.ddl_replication = off; DROP TABLE local_ref");
    wait_for_catchup(&c);
    assert_eq!(b.query_scalar::<i64>("SELECT count(*) FROM t"), 0);
    assert_same_everywhere(&c, "t");
}

/// Run `sql` on `n` as `app`, on that node only (DDL replication off).
fn local_only(n: &Node, sql: &str) {
    n.connect_as("app")
        .batch_execute(&format!("SET bdr.ddl_replication = off; {sql}"))
        .unwrap();
}

/// Whether an index scan and a sequential scan of `t` on `n` agree on the rows matching
/// `cond` (an index the apply worker failed to maintain would miss rows).
fn index_agrees(n: &Node, cond: &str) -> (i64, i64) {
    let mut cl = n.connect();
    let count = |cl: &mut Client, seq: bool| -> i64 {
        cl.batch_execute(&format!(
            "SET enable_seqscan = {seq}; SET enable_indexscan = {}; SET enable_bitmapscan = {};",
            !seq, !seq
        ))
        .unwrap();
        cl.query_one(&format!("SELECT count(*) FROM t WHERE {cond}"), &[])
            .unwrap()
            .get(0)
    };
    (count(&mut cl, false), count(&mut cl, true))
}

fn apply_errors(n: &Node) -> i64 {
    n.query_scalar("SELECT coalesce(sum(errors), 0)::int8 FROM bdr.apply_stats()")
}

/// Issue 17: the apply worker keeps each table's executor state (indexes, defaults,
/// constraints) from one remote transaction to the next. Every local schema change made
/// between two of them must be seen by the next one: a new column's default, a new unique
/// index (a collision on it is a conflict, not a duplicate), a dropped index or column, a
/// table dropped and created again under the same name.
#[test]
fn the_kept_table_state_follows_local_schema_changes_between_transactions() {
    let c = pair_owned_by_app("kept_state");
    let (a, b) = (c.node(0), c.node(1));
    let pid = b.postmaster_pid();
    let mut app = a.connect_as("app");
    let mut ins = |id: i32, v: &str| {
        app.execute("INSERT INTO t VALUES ($1, $2)", &[&id, &v])
            .unwrap();
        wait_for_catchup(&c);
    };
    ins(1, "one");
    ins(2, "two");
    // A column with a default, on node2 only: the next remote row gets it.
    local_only(b, "ALTER TABLE t ADD COLUMN note text DEFAULT 'here'");
    ins(3, "three");
    assert_eq!(
        b.query_scalar::<String>("SELECT note FROM t WHERE id = 3"),
        "here"
    );
    // A unique index on node2 only: a remote row colliding on it is a unique_key
    // conflict (the newer row wins), never a duplicate or an error.
    local_only(b, "CREATE UNIQUE INDEX t_v ON t (v)");
    ins(4, "one");
    assert_eq!(
        b.query_scalar::<i64>("SELECT count(*) FROM t WHERE v = 'one'"),
        1
    );
    assert_eq!(b.query_scalar::<i32>("SELECT id FROM t WHERE v = 'one'"), 4);
    assert!(
        pg_test::bdr::conflicts(b)
            .iter()
            .any(|(kind, _, _)| kind == "unique_key"),
        "no unique_key conflict on node2: {:?}",
        pg_test::bdr::conflicts(b)
    );
    assert_eq!(index_agrees(b, "v = 'one'"), (1, 1));
    // The index and the column dropped: rows go in without them.
    local_only(b, "DROP INDEX t_v; ALTER TABLE t DROP COLUMN note");
    ins(5, "one");
    assert_eq!(
        b.query_scalar::<i64>("SELECT count(*) FROM t WHERE v = 'one'"),
        2
    );
    // A plain index added: maintained by the next remote rows.
    local_only(b, "CREATE INDEX t_v2 ON t (v)");
    ins(6, "six");
    ins(7, "six");
    assert_eq!(index_agrees(b, "v = 'six'"), (2, 2));
    // The table dropped and created again with its columns in another order.
    local_only(
        b,
        "DROP TABLE t; CREATE TABLE t (v text, extra int DEFAULT 42, id int PRIMARY KEY)",
    );
    ins(8, "eight");
    assert_eq!(
        b.query_scalar::<String>("SELECT v || ' ' || extra || ' ' || id FROM t"),
        "eight 42 8"
    );
    assert_eq!(apply_errors(b), 0, "node2's apply worker errored");
    assert_eq!(b.postmaster_pid(), pid);
}

/// Issue 17, mid-stream: changes queued while node2's apply is paused (the worker and its
/// kept table state stay up), node2's table changed meanwhile; on resume every change is
/// applied against the table as it is now.
#[test]
fn the_kept_table_state_follows_schema_changes_made_while_changes_are_queued() {
    let c = pair_owned_by_app("kept_state_queued");
    let (a, b) = (c.node(0), c.node(1));
    let mut app = a.connect_as("app");
    for i in 1..=20 {
        app.execute(
            "INSERT INTO t VALUES ($1::int, 'before ' || $1::int)",
            &[&i],
        )
        .unwrap();
    }
    wait_for_catchup(&c);
    b.execute("SELECT bdr.apply_pause()");
    wait_until("apply paused on node2", CATCHUP, || {
        b.query_scalar::<bool>("SELECT bool_and(state = 'paused') FROM bdr.apply_workers()")
    });
    // Queued on node1: single-row transactions, one of many rows, updates and deletes.
    for i in 21..=60 {
        app.execute(
            "INSERT INTO t VALUES ($1::int, 'queued ' || $1::int)",
            &[&i],
        )
        .unwrap();
    }
    app.batch_execute(
        "INSERT INTO t SELECT g, 'batch ' || g FROM generate_series(61, 160) g;
         UPDATE t SET v = 'updated ' || id WHERE id % 7 = 0;
         DELETE FROM t WHERE id % 10 = 0;",
    )
    .unwrap();
    local_only(
        b,
        "ALTER TABLE t ADD COLUMN note text DEFAULT 'd';
         CREATE UNIQUE INDEX t_v ON t (v);
         CREATE INDEX t_note ON t (note);",
    );
    b.execute("SELECT bdr.apply_resume()");
    wait_for_catchup(&c);
    assert_eq!(
        b.query_scalar::<i64>("SELECT count(*) FROM t"),
        a.query_scalar::<i64>("SELECT count(*) FROM t")
    );
    assert_eq!(
        b.query_scalar::<String>("SELECT string_agg(id || v, ',' ORDER BY id) FROM t"),
        a.query_scalar::<String>("SELECT string_agg(id || v, ',' ORDER BY id) FROM t")
    );
    // Rows inserted after the change got the default, and both new indexes hold them.
    assert_eq!(
        b.query_scalar::<i64>("SELECT count(*) FROM t WHERE id > 20 AND note IS DISTINCT FROM 'd'"),
        0
    );
    let n: i64 = b.query_scalar("SELECT count(*) FROM t WHERE note = 'd'");
    assert!(n > 100, "only {n} rows with the default");
    assert_eq!(index_agrees(b, "note = 'd'"), (n, n));
    assert_eq!(index_agrees(b, "v = 'updated 14'"), (1, 1));
    assert_eq!(apply_errors(b), 0, "node2's apply worker errored");
}

/// Rows 1..=`rows` of `t` inserted on node1 (as `app`) and row 1 updated, each applied on
/// node2, which so keeps `t`'s executor state; then a runner of more such statements,
/// each waited for on every node.
fn kept_state_on_node2(c: &Cluster, rows: i32) -> impl FnMut(&str) + '_ {
    let mut app = c.node(0).connect_as("app");
    let mut run = move |sql: &str| {
        app.batch_execute(sql).unwrap();
        wait_for_catchup(c);
    };
    run(&format!(
        "INSERT INTO t SELECT g, 'v' FROM generate_series(1, {rows}) g"
    ));
    run("UPDATE t SET v = 'w' WHERE id = 1");
    run
}

/// Issue 17, small UPDATE: the apply worker hides a table's triggers from the executor
/// when none of them can fire under `session_replication_role = replica` (bdr's own
/// `bdr_tombstone` trigger is enabled ORIGIN). A trigger enabled ALWAYS or REPLICA later,
/// between two remote transactions on a table whose executor state is kept, must fire on
/// the next remote UPDATE and DELETE; enabled ORIGIN again, it must not.
#[test]
fn an_always_trigger_enabled_on_a_kept_table_fires_on_remote_updates_and_deletes() {
    let c = pair_owned_by_app("kept_triggers");
    let b = c.node(1);
    // The kept state is built with no trigger that fires in apply.
    let mut run = kept_state_on_node2(&c, 4);
    local_only(
        b,
        "CREATE UNLOGGED TABLE seen (op text, id int);
         CREATE FUNCTION note() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO seen VALUES (TG_OP, OLD.id);
             RETURN NULL;
         END $$;
         CREATE TRIGGER note AFTER UPDATE OR DELETE ON t
             FOR EACH ROW EXECUTE FUNCTION note();",
    );
    // Enabled ORIGIN (the default): never in apply.
    run("UPDATE t SET v = 'x' WHERE id = 2");
    assert_eq!(b.query_scalar::<i64>("SELECT count(*) FROM seen"), 0);
    local_only(b, "ALTER TABLE t ENABLE ALWAYS TRIGGER note");
    run("UPDATE t SET v = 'y' WHERE id = 3");
    run("DELETE FROM t WHERE id = 4");
    assert_eq!(
        b.query_scalar::<String>(
            "SELECT coalesce(string_agg(op || id, ',' ORDER BY id), '') FROM seen"
        ),
        "UPDATE3,DELETE4"
    );
    local_only(b, "ALTER TABLE t ENABLE TRIGGER note");
    run("UPDATE t SET v = 'z' WHERE id = 1");
    assert_eq!(b.query_scalar::<i64>("SELECT count(*) FROM seen"), 2);
    assert_same_everywhere(&c, "t");
    assert_eq!(apply_errors(b), 0, "node2's apply worker errored");
}

/// Issue 17: the apply worker sets up an EvalPlanQual state for a remote UPDATE or DELETE
/// only when the table has a BEFORE ROW trigger for it (the executor uses it for nothing
/// else). Such a trigger enabled ALWAYS on a kept table must fire, may change the new
/// row, and may skip a delete, exactly as for a local statement.
#[test]
fn before_row_triggers_enabled_always_fire_on_remote_updates_and_deletes() {
    let c = pair_owned_by_app("before_triggers");
    let (a, b) = (c.node(0), c.node(1));
    // The kept state is built with no trigger.
    let mut run = kept_state_on_node2(&c, 3);
    local_only(
        b,
        "CREATE UNLOGGED TABLE seen (op text, id int);
         CREATE FUNCTION mark() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO seen VALUES (TG_OP, OLD.id);
             IF TG_OP = 'DELETE' THEN
                 RETURN CASE WHEN OLD.id = 3 THEN NULL ELSE OLD END;
             END IF;
             NEW.v := NEW.v || ' (marked)';
             RETURN NEW;
         END $$;
         CREATE TRIGGER mark BEFORE UPDATE OR DELETE ON t
             FOR EACH ROW EXECUTE FUNCTION mark();
         ALTER TABLE t ENABLE ALWAYS TRIGGER mark;",
    );
    run("UPDATE t SET v = 'x' WHERE id = 2");
    run("DELETE FROM t WHERE id = 1");
    run("DELETE FROM t WHERE id = 3");
    assert_eq!(
        b.query_scalar::<String>("SELECT string_agg(op || id, ',' ORDER BY id) FROM seen"),
        "DELETE1,UPDATE2,DELETE3"
    );
    assert_eq!(
        b.query_scalar::<String>("SELECT string_agg(id || '=' || v, ',' ORDER BY id) FROM t"),
        "2=x (marked),3=v",
        "the trigger's new row was written and its skipped delete kept the row"
    );
    assert_eq!(
        a.query_scalar::<String>("SELECT string_agg(id || '=' || v, ',' ORDER BY id) FROM t"),
        "2=x"
    );
    assert_eq!(apply_errors(b), 0, "node2's apply worker errored");
}
