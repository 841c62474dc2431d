//! Joins under conflicting writes (issue 18): a member's change that is in flight to the
//! join source when the source's snapshot is taken, and older than the source's own
//! version of the row (or than its delete of the row), must lose on the joining node as it
//! loses on the source. Deterministic: the join is held at a known step and the source's
//! apply from that member is paused, so the in-flight changes are certain.

use pg_test::bdr::{wait_for_catchup, CATCHUP};
use pg_test::{wait_until, Cluster, Node};

/// Every row of `hot` as "id=v", in key order.
fn rows(n: &Node) -> String {
    n.query_scalar("SELECT coalesce(string_agg(id || '=' || v, ',' ORDER BY id), '') FROM hot")
}

/// Conflicts recorded on `n` for changes from `peer` (type/resolution), by key, then in
/// arrival order (parallel apply may record the conflicts of transactions on different
/// keys in either order).
fn conflicts_from(n: &Node, peer: &str) -> Vec<String> {
    n.connect()
        .query(
            "SELECT conflict_type || '/' || conflict_resolution || ' ' || coalesce(key::text, '') \
             FROM bdr.conflict_history WHERE remote_node = $1 ORDER BY key::text, conflict_id",
            &[&peer],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Wait until `n` has applied everything `peer` has written so far.
fn wait_applied(n: &Node, peer: &Node) {
    let lsn: String = peer.query_scalar("SELECT pg_current_wal_flush_lsn()::text");
    let sql = format!(
        "SELECT coalesce((SELECT applied_lsn::pg_lsn >= '{lsn}'::pg_lsn \
         FROM bdr.apply_workers() WHERE peer = '{}'), false)",
        peer.name()
    );
    wait_until(
        &format!("{} to apply {} up to {lsn}", n.name(), peer.name()),
        CATCHUP,
        || n.query_scalar::<bool>(&sql),
    );
}

#[test]
fn join_under_conflicting_writes_converges() {
    let c = Cluster::builder().name("joinconf").nodes(4).start();
    let (s, m, m2, j) = (c.node(0), c.node(1), c.node(2), c.node(3));
    // A group of three (node1 = join source S, node2 = member M, node3 = member M2);
    // node4 (J) joins later through S.
    for n in c.nodes() {
        n.execute("CREATE EXTENSION bdr");
    }
    s.execute(&format!(
        "SELECT bdr.group_create(local_node_name := 'node1', node_external_dsn := '{}')",
        s.dsn()
    ));
    for n in [m, m2] {
        pg_test::bdr::join(n, s);
    }
    s.execute(
        "CREATE TABLE hot (id int PRIMARY KEY, v text NOT NULL);
         INSERT INTO hot SELECT g, 'orig' FROM generate_series(1, 8) g;
         CREATE TABLE gen (id int PRIMARY KEY, a int, b int GENERATED ALWAYS AS (a * 2) STORED);
         INSERT INTO gen (id, a) SELECT g, g FROM generate_series(1, 5) g;",
    );
    // (wait_for_catchup would wait for node4 too, which is no member yet.)
    let catch_up = || {
        for (a, b) in [(m, s), (m2, s), (s, m), (m2, m), (s, m2), (m, m2)] {
            wait_applied(a, b);
        }
    };
    catch_up();
    // Rows last written by node2 and node3 (copied under node4's origins for them).
    m.execute("INSERT INTO hot VALUES (10, 'from node2')");
    m2.execute("INSERT INTO hot VALUES (11, 'from node3')");
    catch_up();

    // Hold the join just after J's slot and sync message on M: an open transaction with an
    // xid on M2 makes the creation of J's slot there wait.
    let mut blocker = m2.connect();
    blocker
        .batch_execute("BEGIN; SELECT txid_current();")
        .unwrap();
    std::thread::scope(|scope| {
        let joiner = scope.spawn(|| pg_test::bdr::join(j, s));
        wait_until("the join to wait for its slot on node3", CATCHUP, || {
            m2.query_scalar::<bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity \
                  WHERE application_name = 'bdr_join:node4' AND state = 'active' \
                    AND query LIKE '%pg_create_logical_replication_slot%')",
            )
        });
        // J's slot on M exists and M's sync message is committed: once S has applied it,
        // pause S's apply from M. Everything M commits from now on is in flight to S when
        // S's snapshot is taken, and reaches J through J's own slot on M.
        wait_applied(s, m);
        s.execute("SELECT bdr.apply_pause('node2')");
        wait_until("node1's apply from node2 paused", CATCHUP, || {
            s.query_scalar::<bool>(
                "SELECT state = 'paused' FROM bdr.apply_workers() WHERE peer = 'node2'",
            )
        });
        // S writes id 5 first (M's later update of it wins everywhere), then M writes, then
        // S writes newer versions of M's keys (S wins them everywhere).
        s.execute("UPDATE hot SET v = 'node1 old' WHERE id = 5");
        for sql in [
            "UPDATE hot SET v = 'node2 old' WHERE id = 1",
            "UPDATE hot SET v = 'node2 old' WHERE id = 2",
            "DELETE FROM hot WHERE id = 3",
            "INSERT INTO hot VALUES (9, 'node2 old')",
            "UPDATE hot SET v = 'node2 new' WHERE id = 5",
        ] {
            m.execute(sql);
        }
        for sql in [
            "UPDATE hot SET v = 'node1 new' WHERE id = 1",
            "DELETE FROM hot WHERE id = 2",
            "UPDATE hot SET v = 'node1 new' WHERE id = 3",
            "INSERT INTO hot VALUES (9, 'node1 new')",
        ] {
            s.execute(sql);
        }
        // Let the join go on: S's snapshot holds S's new versions, not M's changes.
        blocker.batch_execute("COMMIT").unwrap();
        joiner.join().unwrap();
    });
    s.execute("SELECT bdr.apply_resume('node2')");
    wait_for_catchup(&c);
    let expected = "1=node1 new,3=node1 new,4=orig,5=node2 new,6=orig,7=orig,8=orig,9=node1 new,\
                    10=from node2,11=from node3";
    let got: Vec<(String, String)> = c
        .nodes()
        .iter()
        .map(|n| (n.name().to_string(), rows(n)))
        .collect();
    let report = got
        .iter()
        .map(|(n, r)| format!("  {n}: {r}"))
        .collect::<Vec<_>>()
        .join("\n");
    for (n, r) in &got {
        assert_eq!(r, expected, "{n} differs; every node:\n{report}");
    }
    // The copy carried S's rows with their versions, and S's tombstone of id 2.
    let log = j.log();
    let line = log
        .lines()
        .find(|l| l.contains("join of \"node4\" copied"))
        .unwrap_or_else(|| panic!("no copy line in node4's log"));
    assert!(line.contains("copied 15 rows and 1 tombstones"), "{line}");
    eprintln!("{line}");
    // A generated column is computed on J, not copied.
    assert_eq!(
        pg_test::bdr::assert_same_everywhere(&c, "gen"),
        pg_test::bdr::table_digest(s, "gen")
    );
    assert_eq!(j.query_scalar::<i64>("SELECT sum(b)::int8 FROM gen"), 30);
    // J resolved M's in-flight changes as S did: same conflicts, same winners.
    assert_eq!(conflicts_from(j, "node2"), conflicts_from(s, "node2"));
    assert_eq!(
        conflicts_from(s, "node2").len(),
        5,
        "{:?}",
        conflicts_from(s, "node2")
    );
}

/// Timing of the join's copy (run by hand: `cargo test -p pg_test --test join_conflicts
/// -- --ignored --nocapture`): 100k rows written by one transaction, and 100k rows each
/// written by its own transaction.
#[test]
#[ignore]
fn join_copy_timing() {
    let c = Cluster::builder().name("jointime").nodes(3).start();
    let (s, m, j) = (c.node(0), c.node(1), c.node(2));
    for n in c.nodes() {
        n.execute("CREATE EXTENSION bdr");
    }
    s.execute(&format!(
        "SELECT bdr.group_create(local_node_name := 'node1', node_external_dsn := '{}')",
        s.dsn()
    ));
    pg_test::bdr::join(m, s);
    s.execute(
        "CREATE TABLE one_version (id int PRIMARY KEY, v text NOT NULL);
         CREATE TABLE many_versions (id int PRIMARY KEY, v text NOT NULL);
         INSERT INTO one_version SELECT g, md5(g::text) FROM generate_series(1, 100000) g;
         CREATE PROCEDURE fill() LANGUAGE plpgsql AS $$
         BEGIN
           FOR i IN 1..100000 LOOP
             INSERT INTO many_versions VALUES (i, md5(i::text));
             COMMIT;
           END LOOP;
         END $$;",
    );
    let mut fill = s.connect();
    fill.batch_execute("SET synchronous_commit = off").unwrap();
    fill.batch_execute("CALL fill()").unwrap();
    wait_applied(m, s);
    let t = std::time::Instant::now();
    pg_test::bdr::join(j, s);
    let took = t.elapsed();
    let log = j.log();
    let line = log
        .lines()
        .find(|l| l.contains("copied"))
        .unwrap_or("(no copy line: the build before versioned copies)");
    eprintln!("join of 200k rows (100k x 1 version, 100k x 100k versions): {took:.2?}\n{line}");
    for t in ["one_version", "many_versions"] {
        assert_eq!(
            pg_test::bdr::table_digest(j, t),
            pg_test::bdr::table_digest(s, t)
        );
    }
}

/// The copy commits as it goes (one transaction per version): a join that fails half-way
/// through it must still leave the joining node empty, so that it can be run again.
#[test]
fn a_join_that_fails_during_its_copy_leaves_nothing_and_can_be_run_again() {
    let c = Cluster::builder().name("joinfail").nodes(2).start();
    let (s, j) = (c.node(0), c.node(1));
    for n in c.nodes() {
        n.execute("CREATE EXTENSION bdr");
    }
    s.execute(&format!(
        "SELECT bdr.group_create(local_node_name := 'node1', node_external_dsn := '{}')",
        s.dsn()
    ));
    s.execute(
        "CREATE TABLE a (id int PRIMARY KEY);
         INSERT INTO a SELECT generate_series(1, 100);
         CREATE TABLE b (id int PRIMARY KEY);
         INSERT INTO b SELECT generate_series(1, 10);
         DELETE FROM b WHERE id = 10;",
    );
    // node2's b refuses one of the rows: the copy of a (first) commits, b's fails.
    j.execute(
        "CREATE TABLE a (id int PRIMARY KEY);
         CREATE TABLE b (id int PRIMARY KEY CONSTRAINT no_seven CHECK (id <> 7));",
    );
    let e = j
        .try_execute(&format!(
            "SELECT bdr.group_join(local_node_name := 'node2', node_external_dsn := '{}', \
             join_using_dsn := '{}')",
            j.dsn(),
            s.dsn()
        ))
        .expect_err("the copy of b must fail");
    let text = pg_test::db_error_text(&e);
    assert!(text.contains("no_seven"), "{text}");
    let left: String = j.query_scalar(
        "SELECT format('a=%s b=%s tombstones=%s origins=%s slots=%s', \
           (SELECT count(*) FROM a), (SELECT count(*) FROM b), \
           (SELECT count(*) FROM bdr.tombstones), \
           (SELECT count(*) FROM pg_replication_origin), \
           (SELECT count(*) FROM pg_replication_slots))",
    );
    assert_eq!(left, "a=0 b=0 tombstones=0 origins=0 slots=0");
    j.execute("ALTER TABLE b DROP CONSTRAINT no_seven");
    pg_test::bdr::join(j, s);
    wait_for_catchup(&c);
    for t in ["a", "b"] {
        pg_test::bdr::assert_same_everywhere(&c, t);
    }
    // The tombstone of b's id 10 came with the copy. Read from the join's own report: the
    // tombstone itself may already be collected (node1's heartbeats reach node2 once it
    // streams, and a round of node2's supervisor then drops it).
    let log = j.log();
    let line = log
        .lines()
        .rfind(|l| l.contains("join of \"node2\" copied"))
        .unwrap_or_else(|| panic!("no copy line in node2's log"));
    assert!(line.contains("copied 109 rows and 1 tombstones"), "{line}");
}
