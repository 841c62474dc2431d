//! Node lifecycle and monitoring, and the BDR runbook run as written: its SQL is read from
//! the runbook itself (`pg_test/fixtures/runbook_000.txt`, a copy of `seeds/000_*.txt`);
//! only the DSNs' host, port and database are replaced by the test nodes'.

use pg_test::bdr::{assert_same_everywhere, wait_for_catchup, CATCHUP};
use pg_test::{wait_until, Cluster, Node};
use std::path::PathBuf;

/// The runbook, from the repository's fixture (no file outside the repository is needed).
fn runbook() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/runbook_000.txt");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Where a checkout sits beside the shared material (`../shared/seeds` from the repository
/// root), the fixture must still be the seed it was copied from.
#[test]
fn runbook_fixture_equals_the_seed_when_present() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let seeds = root.join("../shared/seeds");
    if !seeds.is_dir() {
        println!(
            "note: {} does not exist; fixture not compared with the seed",
            seeds.display()
        );
        return;
    }
    let seed = std::fs::read_dir(&seeds)
        .unwrap_or_else(|e| panic!("{}: {e}", seeds.display()))
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("000_"))
        .unwrap_or_else(|| panic!("no 000_*.txt in {}", seeds.display()))
        .path();
    let seed_text = std::fs::read_to_string(&seed).unwrap();
    assert!(
        seed_text == runbook(),
        "pg_test/fixtures/runbook_000.txt differs from {}: copy the seed over the fixture \
         (and check the runbook tests still pass)",
        seed.display()
    );
    println!("fixture equals {}", seed.display());
}

/// The text of the runbook from `start` through the first `end` after it.
fn excerpt(book: &str, start: &str, end: &str) -> String {
    let a = book
        .find(start)
        .unwrap_or_else(|| panic!("runbook lacks {start:?}"));
    let b = a
        + book[a..]
            .find(end)
            .unwrap_or_else(|| panic!("runbook lacks {end:?}"))
        + end.len();
    book[a..b].to_string()
}

/// The runbook's DSN for `host` (as written), pointed at test node `n`.
fn localize(sql: &str, nodes: &[(&str, &Node)]) -> String {
    let mut s = sql.to_string();
    for (host, n) in nodes {
        s = s.replace(
            &format!("host={host} port=5432 dbname=mydb user=bdr_user"),
            &format!(
                "host=127.0.0.1 port={} dbname=bdrtest user=bdr_user",
                n.port()
            ),
        );
    }
    s
}

fn rows(n: &Node, sql: &str) -> Vec<Vec<Option<String>>> {
    n.connect()
        .simple_query(sql)
        .unwrap_or_else(|e| panic!("on {}: {sql}\n{}", n.name(), pg_test::db_error_text(&e)))
        .into_iter()
        .filter_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(String::from)).collect())
            }
            _ => None,
        })
        .collect()
}

/// The runbook's statements, localized for a 3-node cluster.
struct Runbook {
    book: String,
    create: String,
    join2: String,
    join3: String,
}

/// Three nodes with the runbook's `bdr_user` and an `accounts` table, grouped with the
/// runbook's own group-create and group-join statements (scenario 3, steps 3 and 4).
fn runbook_group(name: &str) -> (Cluster, Runbook) {
    let c = Cluster::builder().name(name).nodes(3).start();
    for n in c.nodes() {
        n.execute(
            "CREATE ROLE bdr_user SUPERUSER LOGIN; CREATE EXTENSION bdr;
             CREATE TABLE accounts (id int PRIMARY KEY, balance numeric);",
        );
    }
    let book = runbook();
    let hosts = [
        ("node1", c.node(0)),
        ("node2", c.node(1)),
        ("node3", c.node(2)),
    ];
    let join = excerpt(
        &book,
        "SELECT bdr.bdr_group_join(\n       local_node_name := 'node2'",
        ");",
    );
    let join3 = join
        .replace("'node2'", "'node3'")
        .replace("host=node2", "host=node3");
    let rb = Runbook {
        create: localize(
            &excerpt(&book, "SELECT bdr.bdr_group_create(", ");"),
            &hosts,
        ),
        join2: localize(&join, &hosts),
        join3: localize(&join3, &hosts),
        book,
    };
    c.node(0).execute(&rb.create);
    c.node(1).execute(&rb.join2);
    c.node(1).execute("SELECT bdr.wait_for_join(120)");
    c.node(2).execute(&rb.join3);
    c.node(2).execute("SELECT bdr.wait_for_join(120)");
    (c, rb)
}

#[test]
fn runbook_sql_runs_as_written() {
    let (c, rb) = runbook_group("runbook");
    let (n1, n2, n3) = (c.node(0), c.node(1), c.node(2));
    let book = &rb.book;
    let hosts = [("active_node", n1), ("recovered_node", n3)];
    n1.execute("INSERT INTO accounts VALUES (1, 100)");
    n3.execute("INSERT INTO accounts VALUES (3, 300)");
    wait_for_catchup(&c);
    assert_same_everywhere(&c, "accounts");

    // Status queries as written.
    let nodes = rows(n1, "SELECT * FROM bdr.bdr_nodes;");
    assert_eq!(nodes.len(), 3);
    let detection = excerpt(
        book,
        "SELECT \n    node_name,\n    node_status,",
        "FROM bdr.bdr_nodes;",
    );
    let health: Vec<_> = rows(n2, &detection);
    assert_eq!(health.len(), 3);
    assert!(
        health
            .iter()
            .all(|r| r[1].as_deref() == Some("active") && r[2].as_deref() == Some("OK")),
        "{health:?}"
    );
    rows(n1, "SELECT pg_last_xact_replay_timestamp();");
    let status = rows(n1, "SELECT * FROM bdr.bdr_node_status();");
    assert_eq!(status.len(), 3, "{status:?}");

    // The health-check function, exactly as written, then run.
    let func = excerpt(
        book,
        "CREATE OR REPLACE FUNCTION bdr_health_check()",
        "$$ LANGUAGE plpgsql;",
    );
    n1.execute(&func);
    let checks = rows(n1, "SELECT * FROM bdr_health_check();");
    assert_eq!(checks.len(), 3, "{checks:?}");
    for r in &checks {
        assert_eq!(r[1].as_deref(), Some("OK"), "{checks:?}");
    }
    assert_eq!(checks[0][2].as_deref(), Some("3 nodes active"));

    // Scenario 1: a node fails; the others show it inactive and keep replicating; it
    // comes back, the rejoin call is a no-op, and it catches up.
    n3.kill9();
    wait_until("node3 shown inactive on node1", CATCHUP, || {
        rows(
            n1,
            "SELECT node_status FROM bdr.bdr_nodes WHERE node_name = 'node3'",
        )[0][0]
            .as_deref()
            == Some("inactive")
    });
    let checks = rows(n1, "SELECT * FROM bdr_health_check();");
    assert_eq!(checks[0][2].as_deref(), Some("2 nodes active"));
    n2.execute("INSERT INTO accounts VALUES (2, 200)");
    wait_until("node1 has node2's row while node3 is down", CATCHUP, || {
        n1.query_scalar::<i64>("SELECT count(*) FROM accounts") == 3
    });
    n3.start();
    let rejoin = excerpt(
        book,
        "SELECT bdr.bdr_group_join(\n    local_node_name := 'recovered_node'",
        ");",
    );
    let rejoin = rejoin.replace("'recovered_node'", "'node3'");
    n3.execute(&localize(&rejoin, &hosts));
    wait_for_catchup(&c);
    assert_same_everywhere(&c, "accounts");
    wait_until("node3 active again", CATCHUP, || {
        rows(
            n2,
            "SELECT node_status FROM bdr.bdr_nodes WHERE node_name = 'node3'",
        )[0][0]
            .as_deref()
            == Some("active")
    });

    // Our own names: node_status and health_check.
    let st = rows(
        n1,
        "SELECT node_name, reachable, apply_state, replication_lag_time FROM bdr.node_status()",
    );
    assert_eq!(st.len(), 3);
    let hc = rows(n1, "SELECT check_name, status FROM bdr.health_check()");
    assert_eq!(hc.len(), 8, "{hc:?}");
    assert!(hc.iter().all(|r| r[1].as_deref() == Some("OK")), "{hc:?}");
    // The conflict history compat view has conflict_time.
    rows(n1, "SELECT conflict_time FROM bdr.bdr_conflict_history");
}

#[test]
fn down_node_shows_unreachable_with_growing_retained_wal_then_catches_up() {
    let c = Cluster::builder()
        .name("downback")
        .nodes(3)
        .conf("bdr.slot_wal_warning_mb", "1")
        .start();
    for n in c.nodes() {
        n.execute("CREATE EXTENSION bdr; CREATE TABLE t (id int PRIMARY KEY, v text);");
    }
    pg_test::bdr::form_group(&c);
    let (a, b, x) = (c.node(0), c.node(1), c.node(2));
    x.kill9();
    wait_until("node3 unreachable on node1", CATCHUP, || {
        !a.query_scalar::<bool>("SELECT reachable FROM bdr.node_status() WHERE node_name = 'node3'")
    });
    let before: i64 = a.query_scalar(
        "SELECT retained_wal_bytes::int8 FROM bdr.node_status() WHERE node_name = 'node3'",
    );
    // Load while it is down: the others keep replicating.
    a.execute("INSERT INTO t SELECT g, repeat('x', 500) FROM generate_series(1, 5000) g");
    b.execute("INSERT INTO t SELECT g, 'b' FROM generate_series(5001, 6000) g");
    wait_until("node2 has everything", CATCHUP, || {
        b.query_scalar::<i64>("SELECT count(*) FROM t") == 6000
    });
    let after: i64 = a.query_scalar(
        "SELECT retained_wal_bytes::int8 FROM bdr.node_status() WHERE node_name = 'node3'",
    );
    assert!(
        after > before + 1024 * 1024,
        "retained WAL grew: {before} -> {after}"
    );
    let warning: Option<String> =
        a.query_scalar("SELECT warning FROM bdr.node_status() WHERE node_name = 'node3'");
    assert!(
        warning.as_deref().unwrap_or("").contains("retains"),
        "{warning:?}"
    );
    let hc: String =
        a.query_scalar("SELECT status FROM bdr.health_check() WHERE check_name = 'Slots'");
    assert_eq!(hc, "WARNING");
    x.start();
    wait_for_catchup(&c);
    assert!(assert_same_everywhere(&c, "t").starts_with("6000:"));
}

fn count(n: &Node, sql: &str) -> i64 {
    n.query_scalar(sql)
}

/// Three nodes in a group, each with an empty table `t (id int PRIMARY KEY, v text)`.
fn three_nodes_with_t() -> Cluster {
    let c = Cluster::start(3);
    for n in c.nodes() {
        n.execute("CREATE EXTENSION bdr; CREATE TABLE t (id int PRIMARY KEY, v text);");
    }
    pg_test::bdr::form_group(&c);
    c
}

fn assert_still_member(n: &Node) {
    assert_eq!(
        count(
            n,
            "SELECT count(*) FROM bdr.nodes WHERE is_local AND node_state = 'active'"
        ),
        1,
        "{} is still a member",
        n.name()
    );
}

#[test]
fn parting_a_stopped_node_leaves_no_slot_and_the_rest_replicate_on() {
    let c = three_nodes_with_t();
    let (a, b, x) = (c.node(0), c.node(1), c.node(2));
    // A member with peers may not drop the extension: it would stop applying while they
    // still stream from it, and their slots for it would hold WAL for ever.
    let e = pg_test::db_error_text(&b.try_execute("DROP EXTENSION bdr CASCADE").unwrap_err());
    assert!(
        e.contains("cannot drop extension bdr: this node is \"node2\", a member of a bdr group")
            && e.contains("SELECT bdr.part('node2')"),
        "{e}"
    );
    x.stop();
    a.execute("SELECT bdr.part('node3')");
    for n in [a, b] {
        assert_eq!(
            count(
                n,
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE '%\\_node3'"
            ),
            0,
            "slot for node3 left on {}",
            n.name()
        );
        assert_eq!(
            count(
                n,
                "SELECT count(*) FROM pg_replication_origin WHERE roname LIKE '%\\_node3'"
            ),
            0,
            "origin for node3 left on {}",
            n.name()
        );
        let state: String =
            n.query_scalar("SELECT node_state FROM bdr.nodes WHERE node_name = 'node3'");
        assert_eq!(state, "parted");
    }
    wait_until("no apply worker for node3", CATCHUP, || {
        count(
            a,
            "SELECT count(*) FROM bdr.apply_workers() WHERE peer = 'node3'",
        ) == 0
    });
    b.execute("INSERT INTO t VALUES (1, 'after part')");
    wait_until("node1 has node2's row", CATCHUP, || {
        count(a, "SELECT count(*) FROM t") == 1
    });
    let e = a.try_execute("SELECT bdr.part('node1')").unwrap_err();
    assert!(pg_test::db_error_text(&e).contains("cannot part itself"));

    // node3 comes back: it learns from its peers that it was parted, leaves the group
    // here too, drops what it held for them, and lets go of its database. Until session
    // 27 its apply workers failed on the missing slot every few seconds for ever.
    x.start();
    wait_until("node3 parted on node3 itself", CATCHUP, || {
        count(
            x,
            "SELECT count(*) FROM bdr.nodes WHERE is_local AND node_state = 'parted'",
        ) == 1
    });
    assert!(
        x.log()
            .contains("node \"node3\" was parted from the group while it was away: node \"node"),
        "node3 says why it stopped"
    );
    wait_until(
        "no bdr slot, origin or worker left in node3's database",
        CATCHUP,
        || {
            count(
                x,
                "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'bdr\\_%') \
                      + (SELECT count(*) FROM pg_replication_origin WHERE roname LIKE 'bdr\\_%') \
                      + (SELECT count(*) FROM pg_stat_activity \
                          WHERE backend_type LIKE 'bdr%' AND datname = current_database())",
            ) == 0
        },
    );
    // It is a plain database now: a write there stays there. It may not join with rows,
    // nor under its old name, and joins under a new one once emptied (here: its database
    // dropped and created again).
    x.execute("INSERT INTO t VALUES (100, 'written on node3 after it was parted')");
    let join_as = |name: &str| {
        x.try_execute(&format!(
            "SELECT bdr.group_join('{name}', '{}', '{}')",
            x.dsn(),
            a.dsn()
        ))
    };
    let e = pg_test::db_error_text(&join_as("node3b").unwrap_err());
    assert!(
        e.contains("table public.t on this node already holds rows"),
        "{e}"
    );
    // Parted, it may drop the extension.
    x.execute("DROP EXTENSION bdr CASCADE");
    let mut admin = x.connect_db("postgres");
    for sql in ["DROP DATABASE", "CREATE DATABASE"] {
        admin
            .batch_execute(&format!("{sql} {}", x.dbname()))
            .unwrap_or_else(|e| panic!("{sql} on the parted node: {}", pg_test::db_error_text(&e)));
    }
    x.execute("CREATE EXTENSION bdr");
    let e = pg_test::db_error_text(&join_as("node3").unwrap_err());
    assert!(
        e.contains(
            "a node named \"node3\" was a member of the group and is listed there as parted"
        ),
        "{e}"
    );
    join_as("node3b").unwrap();
    x.execute("SELECT bdr.wait_for_join(120)");
    a.execute("INSERT INTO t VALUES (2, 'after the rejoin')");
    wait_until("node3b has node1's new row", CATCHUP, || {
        count(x, "SELECT count(*) FROM t") == 2
    });
    assert_eq!(
        count(a, "SELECT count(*) FROM t WHERE id = 100"),
        0,
        "what the parted node wrote stayed there"
    );
}

#[test]
fn standby_receives_refuses_writes_then_promotes_without_loss() {
    let c = Cluster::start(3);
    for n in c.nodes() {
        n.execute("CREATE EXTENSION bdr");
    }
    let (a, b, s) = (c.node(0), c.node(1), c.node(2));
    a.execute("CREATE TABLE t (id int PRIMARY KEY, v text)");
    a.execute(&format!("SELECT bdr.group_create('node1', '{}')", a.dsn()));
    pg_test::bdr::join(b, a);
    s.execute(&format!(
        "SELECT bdr.bdr_group_join(local_node_name := 'node3', node_external_dsn := '{}', \
         join_using_dsn := '{}', node_kind := 'standby')",
        s.dsn(),
        a.dsn()
    ));
    s.execute("SELECT bdr.wait_for_join(120)");
    a.execute("INSERT INTO t VALUES (1, 'from node1')");
    b.execute("INSERT INTO t VALUES (2, 'from node2')");
    wait_until("the standby has every change", CATCHUP, || {
        count(s, "SELECT count(*) FROM t") == 2
    });
    // It refuses user writes, clearly.
    let e = s
        .try_execute("INSERT INTO t VALUES (3, 'on the standby')")
        .unwrap_err();
    let text = pg_test::db_error_text(&e);
    assert!(
        text.contains("node \"node3\" is a bdr standby: it does not accept writes"),
        "{text}"
    );
    assert!(text.contains("HINT: Write on an active node"), "{text}");
    // It sends nothing: no member applies from it.
    assert_eq!(
        count(
            a,
            "SELECT count(*) FROM bdr.apply_workers() WHERE peer = 'node3'"
        ),
        0
    );
    // Promotion: writable, and its writes reach every member; writes keep flowing in.
    a.execute("INSERT INTO t VALUES (4, 'during')");
    s.execute("SELECT bdr.bdr_node_promote('node3')");
    s.execute("INSERT INTO t VALUES (3, 'on node3 after promote')");
    b.execute("INSERT INTO t VALUES (5, 'from node2 after')");
    wait_for_catchup(&c);
    assert!(assert_same_everywhere(&c, "t").starts_with("5:"));
    let kinds: String = a.query_scalar(
        "SELECT string_agg(node_name || '=' || node_kind || '/' || node_state, ',' ORDER BY node_name) FROM bdr.nodes",
    );
    assert_eq!(
        kinds,
        "node1=active/active,node2=active/active,node3=active/active"
    );
    for n in c.nodes() {
        assert_eq!(
            count(n, "SELECT count(*) FROM bdr.conflict_history"),
            0,
            "on {}",
            n.name()
        );
    }
}

#[test]
fn complete_cluster_failure_rebuild_per_runbook_ends_identical() {
    let (c, rb) = runbook_group("fullfail");
    let (n1, n2, n3) = (c.node(0), c.node(1), c.node(2));
    // Writes, some still in flight when everything fails at once.
    n1.execute("INSERT INTO accounts SELECT g, g FROM generate_series(1, 500) g");
    n2.execute("INSERT INTO accounts SELECT g, g FROM generate_series(501, 1000) g");
    for n in c.nodes() {
        n.kill9();
    }
    // Recovery steps 1-4: the most recent node first, then recreate and join.
    n1.start();
    n1.query_scalar::<Option<String>>("SELECT pg_last_xact_replay_timestamp()::text");
    n1.execute(&rb.create);
    n2.start();
    n3.start();
    n2.execute(&rb.join2);
    n3.execute(&rb.join3);
    wait_for_catchup(&c);
    assert!(assert_same_everywhere(&c, "accounts").starts_with("1000:"));
    // No stale slot or origin: exactly one slot and one origin per peer on every node.
    for n in c.nodes() {
        assert_eq!(
            count(n, "SELECT count(*) FROM pg_replication_slots"),
            2,
            "{}",
            n.name()
        );
        assert_eq!(
            count(n, "SELECT count(*) FROM pg_replication_origin"),
            2,
            "{}",
            n.name()
        );
    }
}

/// The whole runbook played in order on one group (issue 15's defect): create, join, a
/// standby join, split-brain detection, a node failure, the rejoin of a rebuilt node while
/// the standby is a member, promotion, health check. Before the fix the rejoin timed out
/// after 120 s waiting for the join source to apply the standby's changes (a standby sends
/// nothing).
#[test]
fn the_runbook_played_in_order_on_one_group() {
    let c = Cluster::builder()
        .name("runbook_in_order")
        .nodes(4)
        .node_names(&["node1", "node2", "standby1", "recovered"])
        .start();
    for n in c.nodes() {
        n.execute(
            "CREATE ROLE bdr_user SUPERUSER LOGIN; CREATE EXTENSION bdr;
             CREATE TABLE accounts (id int PRIMARY KEY, balance numeric);",
        );
    }
    let (n1, n2, s1, r) = (c.node(0), c.node(1), c.node(2), c.node(3));
    let book = runbook();
    let hosts = [
        ("node1", n1),
        ("node2", n2),
        ("standby1", s1),
        ("active_node", n1),
        ("recovered_node", r),
    ];
    // Group create and join, as written.
    n1.execute(&localize(
        &excerpt(&book, "SELECT bdr.bdr_group_create(", ");"),
        &hosts,
    ));
    n2.execute(&localize(
        &excerpt(
            &book,
            "SELECT bdr.bdr_group_join(\n       local_node_name := 'node2'",
            ");",
        ),
        &hosts,
    ));
    n2.execute("SELECT bdr.wait_for_join(120)");
    // The standby, as written.
    let standby = excerpt(
        &book,
        "SELECT bdr.bdr_group_join(\n    local_node_name := 'standby1'",
        ");",
    );
    s1.execute(&localize(&standby, &hosts));
    s1.execute("SELECT bdr.wait_for_join(120)");
    n1.execute("INSERT INTO accounts VALUES (1, 100)");
    n2.execute("INSERT INTO accounts VALUES (2, 200)");
    wait_until("the standby has both rows", CATCHUP, || {
        s1.query_scalar::<i64>("SELECT count(*) FROM accounts") == 2
    });
    // Split-brain detection, as written.
    let detection = excerpt(
        &book,
        "SELECT \n    node_name,\n    node_status,",
        "FROM bdr.bdr_nodes;",
    );
    assert_eq!(rows(n1, &detection).len(), 3);
    // Scenario 1: node2 fails; the others keep going.
    n2.kill9();
    wait_until("node2 shown inactive on node1", CATCHUP, || {
        rows(
            n1,
            "SELECT node_status FROM bdr.bdr_nodes WHERE node_name = 'node2'",
        )[0][0]
            .as_deref()
            == Some("inactive")
    });
    n2.start();
    // A rebuilt node joins, as written, through the active node, while a standby is a
    // member.
    let rejoin = excerpt(
        &book,
        "SELECT bdr.bdr_group_join(\n    local_node_name := 'recovered_node'",
        ");",
    );
    let started = std::time::Instant::now();
    r.execute(&localize(&rejoin, &hosts));
    r.execute("SELECT bdr.wait_for_join(120)");
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    r.execute("INSERT INTO accounts VALUES (4, 400)");
    wait_until("every node has every row", CATCHUP, || {
        c.nodes()
            .iter()
            .all(|n| n.query_scalar::<i64>("SELECT count(*) FROM accounts") == 3)
    });
    // Promote the standby, as written; it then writes and its write arrives everywhere.
    s1.execute(&excerpt(&book, "SELECT bdr.bdr_node_promote(", ");"));
    wait_until("the promoted standby accepts writes", CATCHUP, || {
        s1.try_execute("INSERT INTO accounts VALUES (3, 300)")
            .is_ok()
    });
    wait_until("the promoted node's row everywhere", CATCHUP, || {
        c.nodes()
            .iter()
            .all(|n| n.query_scalar::<i64>("SELECT count(*) FROM accounts") == 4)
    });
    assert_same_everywhere(&c, "accounts");
    // The health check, as written, says OK everywhere.
    let func = excerpt(
        &book,
        "CREATE OR REPLACE FUNCTION bdr_health_check()",
        "$$ LANGUAGE plpgsql;",
    );
    n1.execute(&func);
    wait_until("the runbook's health check all OK", CATCHUP, || {
        rows(n1, "SELECT * FROM bdr_health_check();")
            .iter()
            .all(|r| r[1].as_deref() == Some("OK"))
    });
    assert_eq!(
        rows(n1, "SELECT * FROM bdr_health_check();")[0][2].as_deref(),
        Some("4 nodes active")
    );
}

/// A slot a member feeds from, dropped by hand on the peer while the member is active,
/// is named in the member's apply error with what it means (the generic "replication
/// slot does not exist" until session 27), and nothing else changes: the member is not
/// parted.
#[test]
fn a_slot_dropped_by_hand_is_named_in_the_apply_error() {
    let c = Cluster::start(2);
    pg_test::bdr::form_group(&c);
    let (a, b) = (c.node(0), c.node(1));
    wait_until("node1's slot for node2 dropped by hand", CATCHUP, || {
        a.try_execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
              WHERE slot_name LIKE 'bdr\\_%\\_node2' AND active_pid IS NOT NULL",
        )
        .unwrap();
        a.try_execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
              WHERE slot_name LIKE 'bdr\\_%\\_node2'",
        )
        .is_ok()
            && count(
                a,
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'bdr\\_%\\_node2'",
            ) == 0
    });
    wait_until(
        "node2's apply error names the missing slot",
        CATCHUP,
        || {
            b.query_scalar::<Option<String>>(
                "SELECT last_error FROM bdr.apply_workers() WHERE peer = 'node1'",
            )
            .is_some_and(|e| {
                e.contains("node \"node1\" has no slot bdr_")
                    && e.contains("for node \"node2\", which it lists as active")
            })
        },
    );
    assert!(b.log().contains("The slot was dropped by hand"), "the hint");
    assert_still_member(b);
}

/// node3 parted while node2 was down: node3 (reached) dropped its slots, node2 kept its
/// own view. When node2 comes back its apply from node3 finds no slot there, but node3,
/// parted itself, lists every node parted: node2 does not take that as its own parting
/// and goes on replicating with node1.
#[test]
fn a_parted_peer_is_forgotten_and_does_not_part_the_node_that_asks_it() {
    let c = three_nodes_with_t();
    let (a, b) = (c.node(0), c.node(1));
    b.stop();
    a.execute("SELECT bdr.part('node3')");
    b.start();
    // node3 says of itself that it left: node2 marks it parted too, and drops the slot
    // and origin it kept for node3, which would otherwise hold WAL for ever.
    wait_until(
        "node2's apply from node3 met the missing slot and says why it forgets node3",
        CATCHUP,
        || {
            b.log().contains("node \"node3\" has left the group")
                && b.log().contains("lists itself as parted")
        },
    );
    a.execute("INSERT INTO t VALUES (1, 'after node3 was parted')");
    wait_until("node2 has node1's row", CATCHUP, || {
        count(b, "SELECT count(*) FROM t") == 1
    });
    assert_still_member(b);
    assert!(!b
        .log()
        .contains("was parted from the group while it was away"));
    wait_until(
        "node2 dropped its slot and origin for node3",
        CATCHUP,
        || {
            count(
                b,
                "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'bdr\\_%\\_node3') \
                      + (SELECT count(*) FROM pg_replication_origin WHERE roname LIKE 'bdr\\_%\\_node3')",
            ) == 0
        },
    );
    assert_eq!(
        count(
            b,
            "SELECT count(*) FROM bdr.nodes WHERE node_name = 'node3' AND node_state = 'parted'"
        ),
        1
    );
    // Its apply worker from node3 is gone and does not come back.
    wait_until("no apply worker from node3 on node2", CATCHUP, || {
        count(
            b,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE '%from node3%'",
        ) == 0
    });
    // node2 and node1 still replicate both ways.
    b.execute("INSERT INTO t VALUES (2, 'from node2 after')");
    wait_until("node1 has node2's row", CATCHUP, || {
        count(a, "SELECT count(*) FROM t") == 2
    });
}
