//! Keys that cannot collide (issue 14), on real postmasters: a plain `bigserial`, `serial`
//! or identity column takes writes on every node at once with no error and no conflict;
//! node numbers are unique in the group; a node restarted with its clock set back never
//! issues an id again; bad input to `alter_sequence_set_kind` is refused with a hint.
//!
//! Application writes run as `app`, a plain role with ordinary grants (or owning the
//! tables it created).

use pg_test::bdr::{assert_same_everywhere, form_group, join, wait_for_catchup, CATCHUP};
use pg_test::{db_error_text, wait_until, Cluster, Node};
use postgres::{Client, NoTls};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// How long the writers run (the scenario's duration, not a wait for replication).
const WRITE_FOR: Duration = Duration::from_secs(20);
const WRITERS_PER_NODE: usize = 4;

const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// A session on `n`'s test database as role `app`.
fn app(n: &Node) -> Client {
    n.connect_as("app")
}

/// Run `sql` on `n` expecting an error; returns its full text (with DETAIL and HINT).
fn error_of(n: &Node, sql: &str) -> String {
    match n.try_execute(sql) {
        Ok(()) => panic!("on {}: {sql} succeeded, expected an error", n.name()),
        Err(e) => db_error_text(&e),
    }
}

/// WRITERS_PER_NODE threads per node, each an `app` session inserting one row per
/// statement (autocommit) into every table of `tables` (with `node` = the writer's node)
/// for WRITE_FOR. Returns (rows attempted per table, error texts): with no error, every
/// attempt inserted a row.
fn write_everywhere(c: &Cluster, tables: &[&str]) -> (u64, Vec<String>) {
    let handles: Vec<_> = c
        .nodes()
        .iter()
        .flat_map(|n| (0..WRITERS_PER_NODE).map(move |w| (n, w)))
        .map(|(n, w)| {
            let dsn = format!(
                "host=127.0.0.1 port={} dbname={} user=app",
                n.port(),
                n.dbname()
            );
            let name = n.name().to_string();
            let tables: Vec<String> = tables.iter().map(|t| t.to_string()).collect();
            std::thread::spawn(move || {
                let mut client = Client::connect(&dsn, NoTls).unwrap();
                let stmts: Vec<_> = tables
                    .iter()
                    .map(|t| {
                        client
                            .prepare(&format!("INSERT INTO {t} (node, writer) VALUES ($1, $2)"))
                            .unwrap()
                    })
                    .collect();
                let start = Instant::now();
                let (mut rows, mut errors) = (0u64, Vec::new());
                while start.elapsed() < WRITE_FOR {
                    for s in &stmts {
                        match client.execute(s, &[&name, &(w as i32)]) {
                            Ok(_) => {}
                            Err(e) => errors.push(format!("{name}/{w}: {}", db_error_text(&e))),
                        }
                    }
                    rows += 1;
                }
                (rows, errors)
            })
        })
        .collect();
    let mut total = 0;
    let mut errors = Vec::new();
    for h in handles {
        let (r, e) = h.join().expect("writer thread");
        total += r;
        errors.extend(e);
    }
    (total, errors)
}

/// Every node has every row, the same rows, and no conflict was recorded or counted.
fn assert_all_rows_no_conflicts(c: &Cluster, table: &str, rows: u64) {
    let digest = assert_same_everywhere(c, table);
    assert!(
        digest.starts_with(&format!("{rows}:")),
        "{table}: {digest}, expected {rows} rows"
    );
    for n in c.nodes() {
        let history: i64 = n.query_scalar("SELECT count(*) FROM bdr.conflict_history");
        let counted: i64 =
            n.query_scalar("SELECT coalesce(sum(count), 0)::bigint FROM bdr.conflict_counters()");
        assert_eq!(
            (history, counted),
            (0, 0),
            "{}: conflicts recorded/counted; conflict_history: {:?}",
            n.name(),
            pg_test::bdr::conflicts(n)
        );
    }
}

fn node_numbers(c: &Cluster) -> Vec<(String, i32)> {
    let rows = c
        .node(0)
        .connect()
        .query(
            "SELECT node_name, node_number FROM bdr.nodes ORDER BY node_name",
            &[],
        )
        .unwrap();
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

fn create_app_role(c: &Cluster) {
    for n in c.nodes() {
        n.execute("CREATE ROLE app LOGIN; GRANT CREATE ON SCHEMA public TO app;");
    }
}

/// Every writer inserts into `tables` for [`WRITE_FOR`]; then: no INSERT error, enough
/// rows, every row on every node and no conflict anywhere.
fn write_and_check(c: &Cluster, tables: &[&str], what: &str) {
    let (rows, errors) = write_everywhere(c, tables);
    println!("{what}: {rows} rows per table on 3 nodes by 12 writers in {WRITE_FOR:?}");
    assert!(
        errors.is_empty(),
        "{} INSERT errors: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(rows > 1000, "only {rows} rows written");
    wait_for_catchup(c);
    for t in tables {
        assert_all_rows_no_conflicts(c, t, rows);
    }
}

#[test]
fn bigserial_takes_writes_on_every_node_at_once() {
    let c = Cluster::builder().name("keys_bigserial").nodes(3).start();
    create_app_role(&c);
    // The normal way: the same CREATE TABLE on every node, before the group exists.
    for n in c.nodes() {
        n.execute(
            "CREATE EXTENSION bdr;
             CREATE TABLE orders (id bigserial PRIMARY KEY, node text NOT NULL,
                                  writer int NOT NULL, at timestamptz DEFAULT now());
             GRANT SELECT, INSERT ON orders TO app;
             GRANT USAGE ON SEQUENCE orders_id_seq TO app;",
        );
    }
    form_group(&c);
    let numbers = node_numbers(&c);
    assert_eq!(
        numbers,
        vec![
            ("node1".into(), 0),
            ("node2".into(), 1),
            ("node3".into(), 2)
        ]
    );
    for n in c.nodes() {
        let kind: String = n.query_scalar("SELECT bdr.sequence_kind('orders_id_seq')");
        assert_eq!(kind, "snowflake", "on {}", n.name());
    }
    write_and_check(&c, &["orders"], "bigserial");
    // Every id carries the number of the node that made it.
    for n in c.nodes() {
        let wrong: i64 = n.query_scalar(
            "SELECT count(*) FROM orders o JOIN bdr.nodes b ON b.node_name = o.node \
              WHERE (o.id >> 12) & 1023 <> b.node_number",
        );
        assert_eq!(wrong, 0, "ids with another node's number on {}", n.name());
    }
}

#[test]
fn serial_and_identity_take_writes_on_every_node_at_once() {
    let c = Cluster::builder().name("keys_int").nodes(3).start();
    create_app_role(&c);
    form_group(&c);
    // Created by the application's role on one node once the group exists: the CREATE
    // TABLE replicates, and the event trigger gives each node's copy an offset sequence
    // of its own as it is created there.
    app(c.node(0))
        .batch_execute(
            "CREATE TABLE items (id serial PRIMARY KEY, node text NOT NULL, writer int NOT NULL);
             CREATE TABLE events (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                                  node text NOT NULL, writer int NOT NULL);",
        )
        .unwrap_or_else(|e| panic!("node1: {}", db_error_text(&e)));
    pg_test::bdr::wait_for_catchup(&c);
    for n in c.nodes() {
        for seq in ["items_id_seq", "events_id_seq"] {
            let kind: String = n.query_scalar(&format!("SELECT bdr.sequence_kind('{seq}')"));
            assert_eq!(kind, "offset", "{seq} on {}", n.name());
        }
    }
    write_and_check(&c, &["items", "events"], "serial + identity");
    for n in c.nodes() {
        for t in ["items", "events"] {
            let wrong: i64 = n.query_scalar(&format!(
                "SELECT count(*) FROM {t} o JOIN bdr.nodes b ON b.node_name = o.node \
                  WHERE (o.id - 1) % 1024 <> b.node_number"
            ));
            assert_eq!(
                wrong,
                0,
                "{t}: ids outside their node's residue on {}",
                n.name()
            );
        }
    }
}

/// Keys added to existing tables by ALTER TABLE get a kind too: a `bigserial` column
/// added to an empty table (right after its CREATE TABLE, before that has reached the
/// peers), `ADD GENERATED ... AS IDENTITY` on a column that holds rows, and an identity
/// column added to an empty table. Until session 28 their sequences stayed `local` on
/// every node, each node handed out 1, 2, 3..., and rows written on two nodes collided.
#[test]
fn keys_added_by_alter_table_take_writes_on_every_node_at_once() {
    let c = Cluster::builder().name("keys_alter").nodes(3).start();
    create_app_role(&c);
    form_group(&c);
    app(c.node(0))
        .batch_execute(
            "CREATE TABLE a1 (k int PRIMARY KEY, node text NOT NULL);
             ALTER TABLE a1 ADD COLUMN id bigserial;
             CREATE TABLE a2 (id int PRIMARY KEY, node text NOT NULL);
             INSERT INTO a2 VALUES (1, 'node1'), (2, 'node1'), (3, 'node1');
             ALTER TABLE a2 ALTER COLUMN id ADD GENERATED BY DEFAULT AS IDENTITY;
             CREATE TABLE a3 (k int PRIMARY KEY, node text NOT NULL);
             ALTER TABLE a3 ADD COLUMN n int GENERATED ALWAYS AS IDENTITY;",
        )
        .unwrap_or_else(|e| panic!("node1: {}", db_error_text(&e)));
    // As pg_dump writes a bigserial table, restored on a member; and a sequence of its
    // own that a column's default calls.
    app(c.node(0))
        .batch_execute(
            "CREATE TABLE a4 (id bigint NOT NULL, node text NOT NULL);
             CREATE SEQUENCE a4_id_seq;
             ALTER SEQUENCE a4_id_seq OWNED BY a4.id;
             ALTER TABLE ONLY a4 ALTER COLUMN id SET DEFAULT nextval('a4_id_seq'::regclass);
             ALTER TABLE ONLY a4 ADD CONSTRAINT a4_pkey PRIMARY KEY (id);
             CREATE SEQUENCE shared_ids;
             CREATE TABLE a5 (id bigint PRIMARY KEY DEFAULT nextval('shared_ids'),
                              node text NOT NULL);",
        )
        .unwrap_or_else(|e| panic!("node1: {}", db_error_text(&e)));
    wait_for_catchup(&c);
    for n in c.nodes() {
        for (seq, want) in [
            ("a1_id_seq", "snowflake"),
            ("a2_id_seq", "offset"),
            ("a3_n_seq", "offset"),
            ("a4_id_seq", "snowflake"),
            ("shared_ids", "snowflake"),
        ] {
            let kind: String = n.query_scalar(&format!("SELECT bdr.sequence_kind('{seq}')"));
            assert_eq!(kind, want, "{seq} on {}", n.name());
        }
    }
    // Every node writes 100 rows into each, with the keys the sequences give.
    for (i, n) in c.nodes().iter().enumerate() {
        let base = (i + 1) * 1000;
        app(n)
            .batch_execute(&format!(
                "INSERT INTO a1 (k, node) SELECT {base} + g, '{0}' FROM generate_series(1, 100) g;
                 INSERT INTO a2 (node) SELECT '{0}' FROM generate_series(1, 100);
                 INSERT INTO a3 (k, node) SELECT {base} + g, '{0}' FROM generate_series(1, 100) g;
                 INSERT INTO a4 (node) SELECT '{0}' FROM generate_series(1, 100);
                 INSERT INTO a5 (node) SELECT '{0}' FROM generate_series(1, 100);",
                n.name()
            ))
            .unwrap_or_else(|e| panic!("{}: {}", n.name(), db_error_text(&e)));
    }
    wait_for_catchup(&c);
    for (t, key, rows) in [
        ("a1", "id", 300),
        ("a2", "id", 303),
        ("a3", "n", 300),
        ("a4", "id", 300),
        ("a5", "id", 300),
    ] {
        assert_all_rows_no_conflicts(&c, t, rows);
        let distinct: i64 = c
            .node(0)
            .query_scalar(&format!("SELECT count(DISTINCT {key}) FROM {t}"));
        assert_eq!(distinct, rows as i64, "{t}.{key} values are distinct");
    }
    // TRUNCATE ... RESTART IDENTITY, replicated, restarts every node's sequence at that
    // node's own start, not at 1: the keys written next still differ (until session 28
    // every node handed out 1 again and the second INSERT of key 1 failed or overwrote).
    app(c.node(1))
        .batch_execute("TRUNCATE a2, a3 RESTART IDENTITY")
        .unwrap();
    wait_for_catchup(&c);
    for (i, n) in c.nodes().iter().enumerate() {
        let base = (i + 1) * 1000;
        app(n)
            .batch_execute(&format!(
                "INSERT INTO a2 (node) SELECT '{0}' FROM generate_series(1, 20);
                 INSERT INTO a3 (k, node) SELECT {base} + g, '{0}' FROM generate_series(1, 20) g;",
                n.name()
            ))
            .unwrap_or_else(|e| panic!("{} after TRUNCATE: {}", n.name(), db_error_text(&e)));
    }
    wait_for_catchup(&c);
    assert_all_rows_no_conflicts(&c, "a2", 60);
    assert_all_rows_no_conflicts(&c, "a3", 60);
    // Where a sequence counts from is each node's own: replicating ALTER SEQUENCE ...
    // RESTART WITH would give every node the same values (until session 28 it did, and
    // the second node's INSERT failed on a duplicate key). Refused with a hint; other
    // options (OWNED BY, above) still replicate, and per node it runs.
    let e = app(c.node(0))
        .batch_execute("ALTER SEQUENCE a2_id_seq RESTART WITH 5000")
        .expect_err("ALTER SEQUENCE ... RESTART WITH replicated");
    let text = db_error_text(&e);
    assert!(
        text.contains("cannot replicate ALTER SEQUENCE ... RESTART")
            && text.contains("bdr.alter_sequence_set_kind")
            && text.contains("(SQLSTATE 0A000)"),
        "{text}"
    );
    app(c.node(0))
        .batch_execute(
            "SET bdr.ddl_replication = off;
             ALTER SEQUENCE a2_id_seq CACHE 1 INCREMENT BY 1024;
             SET bdr.ddl_replication = on;",
        )
        .unwrap();
    // A sequence made local by hand stays local (the kind change's own ALTER TABLE does
    // not give it a kind again).
    let a = c.node(0);
    a.execute("SELECT bdr.alter_sequence_set_kind('a1_id_seq', 'local')");
    let kind: String = a.query_scalar("SELECT bdr.sequence_kind('a1_id_seq')");
    assert_eq!(kind, "local");
}

/// Ids of `orders` on `n`, as a set.
fn ids(n: &Node) -> BTreeSet<i64> {
    n.connect()
        .query("SELECT id FROM orders", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Insert `k` rows on `n` as `app`, 1 to a statement for the first 200 and in batches of
/// 1000 after (thousands of ids in the same millisecond); returns their ids.
fn insert_ids(n: &Node, k: usize) -> BTreeSet<i64> {
    let mut client = app(n);
    let mut out = BTreeSet::new();
    for _ in 0..200.min(k) {
        let id: i64 = client
            .query_one("INSERT INTO orders (v) VALUES ('one') RETURNING id", &[])
            .unwrap()
            .get(0);
        out.insert(id);
    }
    let mut left = k.saturating_sub(200);
    while left > 0 {
        let b = left.min(1000) as i32;
        for r in client
            .query(
                "INSERT INTO orders (v) SELECT 'batch' FROM generate_series(1, $1) RETURNING id",
                &[&b],
            )
            .unwrap()
        {
            out.insert(r.get(0));
        }
        left -= b as usize;
    }
    out
}

fn clock_offset_secs(n: &Node) -> f64 {
    // The server's clock minus this process's clock.
    let server: f64 = n.query_scalar("SELECT extract(epoch FROM clock_timestamp())::float8");
    let here = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    server - here
}

#[test]
fn restart_with_the_clock_set_back_never_reissues_an_id() {
    assert!(
        std::path::Path::new(FAKETIME_LIB).exists(),
        "{FAKETIME_LIB} is missing (apt-get install faketime)"
    );
    let c = Cluster::builder().name("keys_clock").nodes(1).start();
    create_app_role(&c);
    let n = c.node(0);
    n.execute(
        "CREATE EXTENSION bdr;
         CREATE TABLE orders (id bigserial PRIMARY KEY, v text);
         GRANT SELECT, INSERT ON orders TO app;
         GRANT USAGE ON SEQUENCE orders_id_seq TO app;",
    );
    // Not a member yet: no node number, no ids (an ERROR with a hint, never a guess).
    let e = error_of(n, "SELECT bdr.snowflake_nextval('orders_id_seq')");
    assert!(
        e.contains("this node has no bdr node number") && e.contains("HINT"),
        "{e}"
    );
    form_group(&c);
    let mut before = insert_ids(n, 20_000);
    assert_eq!(before, ids(n));
    let faked = [("LD_PRELOAD", FAKETIME_LIB), ("FAKETIME", "-1h")];

    // 1. Clean stop, start one hour in the past.
    n.stop();
    n.start_with_env(&faked);
    let offset = clock_offset_secs(n);
    assert!(
        (-3700.0..-3500.0).contains(&offset),
        "the restarted server's clock is {offset} s off, expected about -3600"
    );
    let after = insert_ids(n, 20_000);
    let again: Vec<_> = after.intersection(&before).collect();
    assert!(
        again.is_empty(),
        "{} ids issued again, e.g. {:?}",
        again.len(),
        &again[..again.len().min(3)]
    );
    assert!(
        after.iter().min() > before.iter().max(),
        "ids went back after a restart with the clock set back"
    );
    before.extend(after);

    // 2. Crash (SIGKILL, no shutdown checkpoint), start two hours in the past.
    n.kill9();
    n.start_with_env(&[("LD_PRELOAD", FAKETIME_LIB), ("FAKETIME", "-2h")]);
    let after = insert_ids(n, 20_000);
    let again: Vec<_> = after.intersection(&before).collect();
    assert!(
        again.is_empty(),
        "{} ids issued again after a crash, e.g. {:?}",
        again.len(),
        &again[..again.len().min(3)]
    );
    assert!(after.iter().min() > before.iter().max());
    before.extend(after);
    assert_eq!(before, ids(n), "every id is in the table, once");

    // 3. Back to the real clock.
    n.stop();
    n.start();
    let after = insert_ids(n, 1000);
    assert!(after.iter().min() > before.iter().max());
}

#[test]
fn node_numbers_are_unique_and_bad_input_is_refused() {
    let c = Cluster::builder().name("keys_numbers").nodes(4).start();
    // node4 has no tables: its join copies the schema (with node1's kinds and start
    // values) and must make the sequences its own.
    c.node(3).execute("CREATE EXTENSION bdr");
    for n in &c.nodes()[..3] {
        n.execute(
            "CREATE EXTENSION bdr;
             CREATE TABLE orders (id bigserial PRIMARY KEY, v text);
             CREATE TABLE small (id serial PRIMARY KEY, v text);
             CREATE TABLE ident (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY);",
        );
    }
    let (a, b, d) = (c.node(0), c.node(1), c.node(3));
    // Out of range, at create.
    let e = error_of(
        a,
        &format!(
            "SELECT bdr.group_create('node1', '{}', node_number := 1024)",
            a.dsn()
        ),
    );
    assert!(
        e.contains("invalid node number 1024") && e.contains("HINT"),
        "{e}"
    );
    a.execute(&format!(
        "SELECT bdr.group_create('node1', '{}', node_number := 7)",
        a.dsn()
    ));
    // A number in use: refused, nothing left behind.
    let e = error_of(
        b,
        &format!(
            "SELECT bdr.group_join('node2', '{}', '{}', node_number := 7)",
            b.dsn(),
            a.dsn()
        ),
    );
    assert!(
        e.contains("node number 7 is taken by node \"node1\""),
        "{e}"
    );
    let rows: i64 = a.query_scalar("SELECT count(*) FROM bdr.nodes");
    assert_eq!(rows, 1);
    // Two joins at once: both get distinct numbers, or the second registration fails
    // clearly (the UNIQUE constraint) and leaves nothing behind.
    let results: Vec<(String, Result<(), String>)> = std::thread::scope(|s| {
        let hs: Vec<_> = [c.node(1), c.node(2)]
            .into_iter()
            .map(|n| {
                let via = a.dsn();
                s.spawn(move || {
                    let r = n
                        .try_execute(&format!(
                            "SELECT bdr.group_join('{}', '{}', '{via}')",
                            n.name(),
                            n.dsn()
                        ))
                        .map_err(|e| db_error_text(&e));
                    (n.name().to_string(), r)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    println!("concurrent joins: {results:?}");
    for (name, r) in &results {
        if let Err(e) = r {
            assert!(
                e.contains("node_number") || e.contains("node number"),
                "{name}'s join failed for another reason: {e}"
            );
            let left: i64 = a.query_scalar(&format!(
                "SELECT count(*) FROM bdr.nodes WHERE node_name = '{name}'"
            ));
            assert_eq!(left, 0, "{name}'s failed join left a row on node1");
        }
    }
    let numbers: Vec<i32> = a
        .connect()
        .query("SELECT node_number FROM bdr.nodes", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let distinct: BTreeSet<_> = numbers.iter().collect();
    assert_eq!(distinct.len(), numbers.len(), "numbers {numbers:?}");
    assert!(numbers.contains(&7));
    // A later join takes the smallest free number.
    a.execute("INSERT INTO small (v) VALUES ('before node4'); INSERT INTO ident DEFAULT VALUES;");
    join(d, a);
    let n4: i32 = a.query_scalar("SELECT node_number FROM bdr.nodes WHERE node_name = 'node4'");
    assert!(
        !numbers.contains(&n4) && n4 <= 2,
        "node4 got {n4}, others {numbers:?}"
    );
    // Its copied schema has its own kinds: snowflake ids with its number, offset
    // sequences in its residue above the copied rows.
    let kinds: String = d.query_scalar(
        "SELECT bdr.sequence_kind('orders_id_seq') || ',' || bdr.sequence_kind('small_id_seq') \
         || ',' || bdr.sequence_kind('ident_id_seq')",
    );
    assert_eq!(kinds, "snowflake,offset,offset");
    let mut cl = d.connect();
    let mut one = |sql: &str| -> i64 { cl.query_one(sql, &[]).unwrap().get(0) };
    let s4 = one("INSERT INTO small (v) VALUES ('n4') RETURNING id::bigint");
    let i4 = one("INSERT INTO ident DEFAULT VALUES RETURNING id");
    let o4 = one("INSERT INTO orders (v) VALUES ('n4') RETURNING id");
    let n4 = n4 as i64;
    assert_eq!((s4 - 1) % 1024, n4, "small id {s4} on node number {n4}");
    assert!(s4 > 1, "small id {s4} not above the copied row");
    assert_eq!((i4 - 1) % 1024, n4, "ident id {i4} on node number {n4}");
    assert_eq!((o4 >> 12) & 1023, n4, "orders id {o4} on node number {n4}");
    // (Not wait_for_catchup: joins run at the same time do not learn of each other, and a
    // failed one is no member; only node4 -> node1 matters here.)
    wait_until("node4's rows on node1", CATCHUP, || {
        a.query_scalar::<i64>(&format!("SELECT count(*) FROM orders WHERE id = {o4}")) == 1
    });
    let conflicts: i64 = a.query_scalar("SELECT count(*) FROM bdr.conflict_history");
    assert_eq!(conflicts, 0);

    // Bad input to alter_sequence_set_kind: a clear error, nothing changed.
    for (sql, want) in [
        (
            "SELECT bdr.alter_sequence_set_kind('orders', 'snowflake')",
            "\"orders\" is not a sequence",
        ),
        (
            "SELECT bdr.alter_sequence_set_kind('orders_id_seq', 'galloc')",
            "unknown sequence kind \"galloc\"",
        ),
        (
            "SELECT bdr.alter_sequence_set_kind('small_id_seq', 'snowflake')",
            "snowflake ids need a bigint column",
        ),
        (
            "SELECT bdr.alter_sequence_set_kind('ident_id_seq', 'snowflake')",
            "is an identity column",
        ),
        (
            "SELECT bdr.alter_sequence_set_kind('no_such_seq', 'local')",
            "does not exist",
        ),
    ] {
        let e = error_of(a, sql);
        assert!(e.contains(want), "{sql}: {e}");
        if !want.contains("does not exist") {
            assert!(e.contains("HINT"), "{sql}: no hint in {e}");
        }
    }
    let kinds: String = a.query_scalar(
        "SELECT bdr.sequence_kind('orders_id_seq') || ',' || bdr.sequence_kind('small_id_seq') \
         || ',' || bdr.sequence_kind('ident_id_seq')",
    );
    assert_eq!(kinds, "snowflake,offset,offset");
    // Switching kinds by hand, and back.
    a.execute("SELECT bdr.alter_sequence_set_kind('orders_id_seq', 'local')");
    let d1: String = a.query_scalar(
        "SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef WHERE adrelid = 'orders'::regclass",
    );
    assert_eq!(d1, "nextval('orders_id_seq'::regclass)");
    a.execute("SELECT bdr.alter_sequence_set_kind('orders_id_seq', 'offset')");
    let v: i64 = a.query_scalar("INSERT INTO orders (v) VALUES ('o') RETURNING id");
    assert_eq!((v - 1) % 1024, 7, "offset value {v} on node number 7");
    a.execute("SELECT bdr.alter_sequence_set_kind('orders_id_seq', 'snowflake')");
    let v2: i64 = a.query_scalar("INSERT INTO orders (v) VALUES ('s') RETURNING id");
    assert_eq!((v2 >> 12) & 1023, 7);
    assert!(v2 > v);
    // snowflake_nextval checks like nextval: the caller's USAGE, read-only transactions;
    // a sequence that cannot hold the floor fails clearly, every time (no stuck state).
    a.execute("CREATE ROLE nobody LOGIN; CREATE SEQUENCE tiny AS integer;");
    let mut as_nobody = Client::connect(
        &format!(
            "host=127.0.0.1 port={} dbname={} user=nobody",
            a.port(),
            a.dbname()
        ),
        NoTls,
    )
    .unwrap();
    a.execute("GRANT USAGE ON SCHEMA bdr TO nobody");
    let e = db_error_text(
        &as_nobody
            .batch_execute("SELECT bdr.snowflake_nextval('orders_id_seq')")
            .unwrap_err(),
    );
    assert!(
        e.contains("permission denied for sequence orders_id_seq") && e.contains("GRANT USAGE"),
        "{e}"
    );
    let e = error_of(
        a,
        "BEGIN READ ONLY; SELECT bdr.snowflake_nextval('orders_id_seq'); COMMIT;",
    );
    assert!(e.contains("read-only transaction"), "{e}");
    for _ in 0..2 {
        let e = error_of(a, "SELECT bdr.snowflake_nextval('tiny')");
        assert!(e.contains("out of bounds for sequence \"tiny\""), "{e}");
    }
    // Opting out: bdr.default_sequence_kind = local leaves new tables alone.
    a.execute(
        "SET bdr.default_sequence_kind = local; CREATE TABLE plain (id bigserial PRIMARY KEY);",
    );
    let k: String = a.query_scalar("SELECT bdr.sequence_kind('plain_id_seq')");
    assert_eq!(k, "local");
    let e = error_of(a, "SET bdr.default_sequence_kind = galloc");
    assert!(e.contains("invalid value"), "{e}");
}
