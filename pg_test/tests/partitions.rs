//! Partitioned tables (declarative partitioning) made through DDL replication, the same on
//! every node: rows replicate into their partitions, a row an UPDATE moves to another
//! partition moves everywhere, a conflict is decided and recorded on the partition, a
//! partition created later replicates, and TRUNCATE of the parent empties every node.
//! The application writes as a plain role with ordinary grants on the parent.

use pg_test::bdr::{apply_errors, assert_same_everywhere, form_group, wait_for_catchup, CATCHUP};
use pg_test::{wait_until, Cluster, Node};

fn placement(n: &Node) -> Vec<String> {
    n.connect()
        .query(
            "SELECT tableoid::regclass::text || ' ' || ts || ' ' || v FROM m ORDER BY ts, v",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn app(n: &Node, sql: &str) {
    n.connect_as("app").batch_execute(sql).unwrap();
}

fn set_paused(c: &Cluster, paused: bool) {
    let f = if paused {
        "apply_pause"
    } else {
        "apply_resume"
    };
    for n in c.nodes() {
        n.execute(&format!("SELECT bdr.{f}()"));
    }
    if paused {
        for n in c.nodes() {
            wait_until(&format!("apply paused on {}", n.name()), CATCHUP, || {
                n.query_scalar::<bool>("SELECT bool_and(state = 'paused') FROM bdr.apply_workers()")
            });
        }
    }
}

#[test]
fn partitioned_tables_replicate_rows_moves_conflicts_and_new_partitions() {
    let c = Cluster::builder().name("partitions").nodes(2).start();
    for n in c.nodes() {
        n.execute("CREATE EXTENSION bdr; CREATE ROLE app LOGIN;");
    }
    form_group(&c);
    let (a, b) = (c.node(0), c.node(1));
    a.execute(
        "CREATE TABLE m (id bigserial, ts date NOT NULL, v text, PRIMARY KEY (id, ts))
           PARTITION BY RANGE (ts);
         CREATE TABLE m_2025 PARTITION OF m FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
         CREATE TABLE m_2026 PARTITION OF m FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
         GRANT SELECT, INSERT, UPDATE, DELETE ON m TO app;
         GRANT USAGE ON SEQUENCE m_id_seq TO app;",
    );
    wait_until("the partitions on node2", CATCHUP, || {
        b.query_scalar::<bool>("SELECT to_regclass('public.m_2026') IS NOT NULL")
    });

    // Rows from both nodes land in the same partitions everywhere (ids from each node's
    // own conflict-free sequence).
    app(
        a,
        "INSERT INTO m (ts, v) VALUES ('2025-05-01', 'a1'), ('2026-05-01', 'a2')",
    );
    app(b, "INSERT INTO m (ts, v) VALUES ('2025-06-01', 'b1')");
    wait_for_catchup(&c);
    assert_same_everywhere(&c, "m");
    assert_eq!(
        placement(b),
        vec![
            "m_2025 2025-05-01 a1",
            "m_2025 2025-06-01 b1",
            "m_2026 2026-05-01 a2"
        ]
    );

    // An UPDATE of the partition key moves the row to the other partition everywhere.
    app(
        a,
        "UPDATE m SET ts = '2026-07-01', v = 'a1 moved' WHERE v = 'a1'",
    );
    wait_for_catchup(&c);
    assert_same_everywhere(&c, "m");
    assert_eq!(
        placement(b),
        vec![
            "m_2025 2025-06-01 b1",
            "m_2026 2026-05-01 a2",
            "m_2026 2026-07-01 a1 moved"
        ]
    );

    // Concurrent updates of one row: the later one wins on both nodes, recorded against
    // the partition.
    set_paused(&c, true);
    app(a, "UPDATE m SET v = 'b1 from node1' WHERE v = 'b1'");
    app(b, "UPDATE m SET v = 'b1 from node2' WHERE v = 'b1'");
    set_paused(&c, false);
    wait_for_catchup(&c);
    assert_same_everywhere(&c, "m");
    assert_eq!(
        a.query_scalar::<String>("SELECT v FROM m WHERE ts = '2025-06-01'"),
        "b1 from node2"
    );
    assert_eq!(
        a.query_scalar::<String>(
            "SELECT conflict_type || ' ' || conflict_resolution || ' ' || relation \
               FROM bdr.conflict_history"
        ),
        "update_origin_differs apply_remote public.m_2025"
    );

    // A partition created later replicates its rows too.
    a.execute(
        "CREATE TABLE m_2027 PARTITION OF m FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')",
    );
    wait_until("m_2027 on node2", CATCHUP, || {
        b.query_scalar::<bool>("SELECT to_regclass('public.m_2027') IS NOT NULL")
    });
    app(b, "INSERT INTO m (ts, v) VALUES ('2027-02-01', 'b2')");
    wait_for_catchup(&c);
    assert_same_everywhere(&c, "m");
    assert_eq!(
        a.query_scalar::<String>("SELECT tableoid::regclass::text FROM m WHERE v = 'b2'"),
        "m_2027"
    );

    // TRUNCATE of the parent empties every partition on every node.
    a.execute("TRUNCATE m");
    wait_for_catchup(&c);
    assert_eq!(b.query_scalar::<i64>("SELECT count(*) FROM m"), 0);
    assert_eq!(apply_errors(&c), 0, "no apply error");
}
