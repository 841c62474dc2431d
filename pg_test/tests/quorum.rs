//! Split-brain prevention (issue 15): a witness node votes and holds no data;
//! `bdr.minimum_nodes` makes a node that cannot reach enough voting members refuse user
//! writes, while reads and apply keep working, and write again once it can.

use pg_test::{wait_until, Cluster, Node};
use std::time::{Duration, Instant};

fn count(n: &Node) -> i64 {
    n.query_scalar("SELECT count(*) FROM t")
}

#[test]
fn two_active_nodes_and_a_witness_fence_the_lone_survivor_and_lose_nothing() {
    let c = Cluster::builder()
        .name("quorum")
        .node_names(&["node1", "node2", "witness1"])
        .nodes(3)
        .conf("bdr.minimum_nodes", "2")
        .start();
    for n in c.nodes() {
        n.execute(
            "CREATE EXTENSION bdr; CREATE ROLE app LOGIN; GRANT CREATE ON SCHEMA public TO app;",
        );
    }
    let (a, b, w) = (c.node(0), c.node(1), c.node(2));
    a.execute(&format!("SELECT bdr.group_create('node1', '{}')", a.dsn()));
    pg_test::bdr::join(b, a);
    w.execute(&format!(
        "SELECT bdr.group_join('witness1', '{}', '{}', node_kind := 'witness')",
        w.dsn(),
        a.dsn()
    ));
    w.execute("SELECT bdr.wait_for_join(60)");
    // Alone, node1 refused user writes (1 of 2); with node2 and the witness it sees 3.
    // `voters_reached` is NULL until node1's supervisor has published its first count:
    // not yet there, keep waiting.
    wait_until("node1 allows writes", Duration::from_secs(60), || {
        a.query_scalar::<bool>(
            "SELECT coalesce(writes_allowed AND voters_reached = 3, false) FROM bdr.quorum()",
        )
    });
    a.connect_as("app")
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .unwrap();
    wait_until("t on node2", Duration::from_secs(60), || {
        b.query_scalar::<bool>("SELECT to_regclass('public.t') IS NOT NULL")
    });
    // The witness holds no data and applies nothing; it is shown, reachable, as a witness.
    assert!(!w.query_scalar::<bool>("SELECT to_regclass('public.t') IS NOT NULL"));
    assert_eq!(
        w.query_scalar::<i64>("SELECT count(*) FROM bdr.apply_workers()"),
        0
    );
    wait_until("node1 sees the witness", Duration::from_secs(60), || {
        a.query_scalar::<bool>(
            "SELECT coalesce(bool_and(reachable), false) FROM bdr.node_status() \
             WHERE node_kind = 'witness' AND apply_state = 'witness'",
        )
    });
    let mut app1 = a.connect_as("app");
    app1.execute("INSERT INTO t VALUES (1, 'before')", &[])
        .unwrap();
    b.connect_as("app")
        .execute("INSERT INTO t VALUES (2, 'before')", &[])
        .unwrap();
    wait_until("both rows on both nodes", Duration::from_secs(60), || {
        count(a) == 2 && count(b) == 2
    });

    // node2 and the witness go away: node1 reaches 1 of the 2 it needs.
    b.kill9();
    w.kill9();
    let lost = Instant::now();
    // Writes made before node1 notices (at most ~10 s) are accepted, and kept.
    let mut accepted = 0i64;
    let mut next = 100;
    wait_until("node1 to refuse writes", Duration::from_secs(60), || {
        next += 1;
        match app1.execute("INSERT INTO t VALUES ($1, 'during')", &[&next]) {
            Ok(_) => {
                accepted += 1;
                false
            }
            Err(e) => {
                let e = pg_test::db_error_text(&e);
                assert!(
                    e.contains("voting members") && e.contains("SQLSTATE 25006"),
                    "{e}"
                );
                true
            }
        }
    });
    println!(
        "writes refused {:?} after losing the majority",
        lost.elapsed()
    );
    assert!(lost.elapsed() < Duration::from_secs(30));
    let e = pg_test::db_error_text(
        &app1
            .execute("UPDATE t SET v = 'x' WHERE id = 1", &[])
            .expect_err("update refused"),
    );
    assert!(
        e.contains("node2") && e.contains("witness1") && e.contains("HINT"),
        "{e}"
    );
    // Reads keep working; the health check says why.
    assert_eq!(count(a), 2 + accepted);
    let q: String =
        a.query_scalar("SELECT status FROM bdr.health_check() WHERE check_name = 'Quorum'");
    assert_eq!(q, "CRITICAL");

    // One voter back is enough: writes resume, and nothing written before is lost.
    w.start();
    wait_until("node1 to write again", Duration::from_secs(60), || {
        app1.execute("INSERT INTO t VALUES (4, 'after')", &[])
            .is_ok()
    });
    b.start();
    let all = 3 + accepted;
    wait_until("node2 has every row again", Duration::from_secs(60), || {
        count(b) == all && count(a) == all
    });
    assert_eq!(
        pg_test::bdr::table_digest(a, "t"),
        pg_test::bdr::table_digest(b, "t")
    );
    // A witness is parted like any node.
    a.execute("SELECT bdr.part('witness1')");
    for n in [a, b] {
        wait_until("the witness parted", Duration::from_secs(60), || {
            n.query_scalar::<String>(
                "SELECT node_state FROM bdr.nodes WHERE node_name = 'witness1'",
            ) == "parted"
        });
    }
}
