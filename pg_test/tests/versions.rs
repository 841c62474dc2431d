//! Row versions under what real machines do to them (issue 18): `VACUUM FREEZE` of rows and
//! tombstones while nodes update the same keys, and a node whose clock runs ahead. Every
//! node must pick the same winner for every conflict and end identical.

use pg_test::bdr::{
    assert_same_everywhere, form_group, wait_for_catchup, wait_for_catchup_within, CATCHUP,
};
use pg_test::{wait_until, Cluster, Node};
use std::sync::atomic::{AtomicBool, Ordering};

/// Every row of `kv` as "id=v", in key order.
fn rows(n: &Node) -> String {
    n.query_scalar("SELECT coalesce(string_agg(id || '=' || v, ',' ORDER BY id), '') FROM kv")
}

/// Whether the row of `kv` with key `id` is frozen on `n` (HEAP_XMIN_FROZEN, read from the
/// page with pageinspect).
fn frozen(n: &Node, table: &str, key_col: &str, key: &str) -> bool {
    n.query_scalar(&format!(
        "SELECT (h.t_infomask & 768) = 768 FROM {table} r, \
           heap_page_items(get_raw_page('{table}', ((r.ctid::text::point)[0])::int)) h \
          WHERE r.{key_col} = {key} AND h.lp = ((r.ctid::text::point)[1])::int"
    ))
}

/// Conflict resolutions on `n` that contradict the recorded versions: last-update-wins
/// means `apply_remote` exactly when the remote commit time is later (ties: never seen on
/// one machine's clock). Also counts conflicts whose local version was unknown (NULL),
/// which is what a frozen row read as "frozen" would show.
fn wrong_winners(n: &Node) -> Vec<String> {
    n.connect()
        .query(
            "SELECT conflict_type || ' ' || conflict_resolution || ' ' || coalesce(key::text, '') \
                    || ' local ' || coalesce(local_commit_time::text, 'NULL') \
                    || ' remote ' || remote_commit_time::text \
               FROM bdr.conflict_history \
              WHERE conflict_type IN ('insert_exists', 'update_origin_differs', \
                                      'delete_origin_differs', 'update_deleted') \
                AND (local_commit_time IS NULL \
                     OR (conflict_resolution = 'apply_remote') \
                        <> (remote_commit_time > local_commit_time))",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[test]
fn vacuum_freeze_keeps_versions_comparable() {
    let c = Cluster::builder().name("freeze").nodes(3).start();
    for n in c.nodes() {
        n.execute("CREATE EXTENSION bdr");
    }
    form_group(&c);
    let (a, b) = (c.node(0), c.node(1));
    a.execute(
        "CREATE TABLE kv (id int PRIMARY KEY, v text NOT NULL);
         INSERT INTO kv SELECT g, 'orig' FROM generate_series(1, 200) g;",
    );
    wait_for_catchup(&c);
    for n in c.nodes() {
        n.execute("SET bdr.ddl_replication = off; CREATE EXTENSION pageinspect");
    }

    // 1. Deterministic: node2's older changes reach node1 only after node1's newer update
    // and delete of the same keys are frozen (row and tombstone).
    a.execute("SELECT bdr.apply_pause('node2')");
    wait_until("node1's apply from node2 paused", CATCHUP, || {
        a.query_scalar::<bool>(
            "SELECT state = 'paused' FROM bdr.apply_workers() WHERE peer = 'node2'",
        )
    });
    b.execute("UPDATE kv SET v = 'node2 old' WHERE id = 1");
    b.execute("UPDATE kv SET v = 'node2 old' WHERE id = 2");
    a.execute("UPDATE kv SET v = 'node1 new' WHERE id = 1");
    a.execute("DELETE FROM kv WHERE id = 2");
    wait_for_catchup_from(&c, a);
    for n in c.nodes() {
        n.execute("VACUUM (FREEZE) kv");
        n.execute("VACUUM (FREEZE) bdr.tombstones");
    }
    assert!(frozen(a, "kv", "id", "1"), "node1's row 1 is not frozen");
    assert!(
        frozen(
            a,
            "bdr.tombstones",
            "key",
            "(SELECT key FROM bdr.tombstones LIMIT 1)"
        ),
        "node1's tombstone is not frozen"
    );
    a.execute("SELECT bdr.apply_resume('node2')");
    wait_for_catchup(&c);
    for n in c.nodes() {
        let r = rows(n);
        assert!(
            r.starts_with("1=node1 new,3=orig"),
            "{}: {}",
            n.name(),
            &r[..40.min(r.len())]
        );
    }
    assert_same_everywhere(&c, "kv");
    let on_a: Vec<String> = a
        .connect()
        .query(
            "SELECT conflict_type || '/' || conflict_resolution FROM bdr.conflict_history \
              WHERE remote_node = 'node2' ORDER BY conflict_id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        on_a,
        vec![
            "update_origin_differs/keep_local",
            "update_deleted/keep_local"
        ]
    );

    // 2. A conflict workload on all three nodes (same keys, updates, deletes and
    // re-inserts) while every node freezes every table in a loop.
    let stop = AtomicBool::new(false);
    let stop = &stop;
    std::thread::scope(|scope| {
        for (i, n) in c.nodes().iter().enumerate() {
            scope.spawn(move || conflicting_writer(n, i, stop));
            scope.spawn(move || {
                let mut cl = n.connect();
                while !stop.load(Ordering::SeqCst) {
                    cl.batch_execute("VACUUM (FREEZE)").unwrap();
                }
            });
        }
        wait_until("conflicts on every node", CATCHUP, || {
            c.nodes()
                .iter()
                .all(|n| n.query_scalar::<i64>("SELECT count(*) FROM bdr.conflict_history") > 40)
        });
        std::thread::sleep(std::time::Duration::from_secs(5)); // the workload's length
        stop.store(true, Ordering::SeqCst);
    });
    wait_for_catchup(&c);
    assert_same_everywhere(&c, "kv");
    for n in c.nodes() {
        assert_eq!(wrong_winners(n), Vec::<String>::new(), "on {}", n.name());
    }
}

/// Wait until every other node has applied what `from` has written.
fn wait_for_catchup_from(c: &Cluster, from: &Node) {
    wait_for_catchup_from_within(c, from, CATCHUP)
}

fn wait_for_catchup_from_within(c: &Cluster, from: &Node, limit: std::time::Duration) {
    let lsn: String = from.query_scalar("SELECT pg_current_wal_flush_lsn()::text");
    for n in c.nodes().iter().filter(|n| n.name() != from.name()) {
        let sql = format!(
            "SELECT coalesce((SELECT applied_lsn::pg_lsn >= '{lsn}'::pg_lsn \
             FROM bdr.apply_workers() WHERE peer = '{}'), false)",
            from.name()
        );
        wait_until(
            &format!("{} to apply {}", n.name(), from.name()),
            limit,
            || n.query_scalar::<bool>(&sql),
        );
    }
}

/// `node_status()` warning for `peer` as seen on `n` (None: no warning).
fn warning(n: &Node, peer: &str) -> Option<String> {
    n.connect()
        .query_one(
            "SELECT warning FROM bdr.node_status() WHERE node_name = $1",
            &[&peer],
        )
        .unwrap()
        .get(0)
}

/// node3's changes reach the others once their clocks pass node3's commit times: a minute
/// later, plus the usual catch-up time.
const SKEW_CATCHUP: std::time::Duration = std::time::Duration::from_secs(150);

#[test]
fn a_node_whose_clock_runs_ahead_wins_by_its_timestamps_and_is_warned_about() {
    // node3's postmaster runs one minute ahead (libfaketime).
    let c = Cluster::builder()
        .name("skew")
        .nodes(3)
        .clock_offset(2, "+1m")
        .start();
    let (a, b, x) = (c.node(0), c.node(1), c.node(2));
    let ahead: f64 = x.query_scalar::<f64>("SELECT extract(epoch FROM clock_timestamp())::float8")
        - a.query_scalar::<f64>("SELECT extract(epoch FROM clock_timestamp())::float8");
    assert!((55.0..65.0).contains(&ahead), "node3 runs {ahead} s ahead");
    form_group(&c);
    a.execute(
        "CREATE TABLE kv (id int PRIMARY KEY, v text NOT NULL);
         INSERT INTO kv SELECT g, 'orig' FROM generate_series(1, 50) g;",
    );
    wait_for_catchup_within(&c, SKEW_CATCHUP);

    // 1. One after the other: node3 writes, node1 sees it, then node1 writes the same row
    // (and deletes another node3 wrote, and re-inserts a key node3 deleted). node1's
    // writes come later in real time but carry earlier timestamps than node3's.
    x.execute("UPDATE kv SET v = 'node3 first' WHERE id = 1");
    x.execute("UPDATE kv SET v = 'node3 first' WHERE id = 2");
    x.execute("DELETE FROM kv WHERE id = 3");
    wait_for_catchup_from_within(&c, x, SKEW_CATCHUP);
    a.execute("UPDATE kv SET v = 'node1 after' WHERE id = 1");
    a.execute("DELETE FROM kv WHERE id = 2");
    a.execute("INSERT INTO kv VALUES (3, 'node1 after')");
    wait_for_catchup_within(&c, SKEW_CATCHUP);
    let got: Vec<String> = c
        .nodes()
        .iter()
        .map(|n| {
            format!(
                "{}: {}",
                n.name(),
                n.query_scalar::<String>(
                    "SELECT coalesce(string_agg(id || '=' || v, ',' ORDER BY id), '') \
                       FROM kv WHERE id <= 3"
                )
            )
        })
        .collect();
    for g in &got[1..] {
        assert_eq!(
            g.split_once(": ").unwrap().1,
            got[0].split_once(": ").unwrap().1,
            "nodes differ: {got:?}"
        );
    }

    // 2. All three update, delete and re-insert the same keys at once.
    let stop = AtomicBool::new(false);
    let stop = &stop;
    std::thread::scope(|scope| {
        for (i, n) in c.nodes().iter().enumerate() {
            scope.spawn(move || conflicting_writer(n, i, stop));
        }
        wait_until("conflicts on node1 and node2", CATCHUP, || {
            [a, b]
                .iter()
                .all(|n| n.query_scalar::<i64>("SELECT count(*) FROM bdr.conflict_history") > 20)
        });
        std::thread::sleep(std::time::Duration::from_secs(3)); // the workload's length
        stop.store(true, Ordering::SeqCst);
    });
    wait_for_catchup_within(&c, SKEW_CATCHUP);
    assert_same_everywhere(&c, "kv");
    for n in c.nodes() {
        assert_eq!(wrong_winners(n), Vec::<String>::new(), "on {}", n.name());
    }
    // node3 won every conflict against the others on node1 and node2.
    for n in [a, b] {
        let lost: i64 = n.query_scalar(
            "SELECT count(*) FROM bdr.conflict_history WHERE remote_node = 'node3' \
              AND conflict_resolution = 'keep_local' AND conflict_type <> 'delete_missing'",
        );
        assert_eq!(lost, 0, "node3 lost conflicts on {}", n.name());
    }

    // 3. node1 and node2 warn about node3's clock, and about nobody else's; node3 warns
    // about nobody (the others' timestamps are in its past).
    for n in [a, b] {
        let w = warning(n, "node3").unwrap_or_default();
        assert!(
            w.contains("clock of node3 runs at least"),
            "on {}: {w}",
            n.name()
        );
    }
    for (n, peer) in [(a, "node2"), (b, "node1"), (x, "node1"), (x, "node2")] {
        let w = warning(n, peer);
        assert!(
            !w.as_deref().unwrap_or("").contains("clock"),
            "on {} about {peer}: {w:?}",
            n.name()
        );
    }
}

#[test]
fn a_node_whose_clock_is_behind_joins_without_losing_its_later_writes() {
    // node2's postmaster runs 20 s behind: the rows it copies were written in its future.
    let c = Cluster::builder()
        .name("skewjoin")
        .nodes(2)
        .clock_offset(1, "-20")
        .start();
    let (a, j) = (c.node(0), c.node(1));
    let behind: f64 = a.query_scalar::<f64>("SELECT extract(epoch FROM clock_timestamp())::float8")
        - j.query_scalar::<f64>("SELECT extract(epoch FROM clock_timestamp())::float8");
    assert!(
        (17.0..23.0).contains(&behind),
        "node2 runs {behind} s behind"
    );
    for n in c.nodes() {
        n.execute("CREATE EXTENSION bdr");
    }
    a.execute(&format!(
        "SELECT bdr.group_create(local_node_name := 'node1', node_external_dsn := '{}')",
        a.dsn()
    ));
    a.execute(
        "CREATE TABLE kv (id int PRIMARY KEY, v text NOT NULL);
         INSERT INTO kv SELECT g, 'orig' FROM generate_series(1, 10) g;
         UPDATE kv SET v = 'node1 before the join' WHERE id = 1;",
    );
    let t = std::time::Instant::now();
    pg_test::bdr::join(j, a);
    let took = t.elapsed();
    // The join waited for node2's clock to pass the newest copied version.
    assert!(took.as_secs_f64() > 10.0, "the join took {took:?}");
    // node2's write right after the join is later than the row it overwrites, everywhere.
    j.execute("UPDATE kv SET v = 'node2 after the join' WHERE id = 1");
    wait_for_catchup(&c);
    assert_same_everywhere(&c, "kv");
    assert_eq!(
        a.query_scalar::<String>("SELECT v FROM kv WHERE id = 1"),
        "node2 after the join"
    );
}

/// Node `n` (the `i`-th) updates, deletes and re-inserts the same 50 keys of `kv` as the
/// other writers until `stop`.
fn conflicting_writer(n: &Node, i: usize, stop: &AtomicBool) {
    let mut cl = n.connect();
    let mut k = 0u64;
    while !stop.load(Ordering::SeqCst) {
        k += 1;
        let id = (k * 7 + i as u64 * 13) % 50 + 1;
        let sql = match k % 5 {
            0 => format!("DELETE FROM kv WHERE id = {id}"),
            1 => format!(
                "INSERT INTO kv VALUES ({id}, '{} {k}') \
                 ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v",
                n.name()
            ),
            _ => format!("UPDATE kv SET v = '{} {k}' WHERE id = {id}", n.name()),
        };
        cl.batch_execute(&sql).unwrap();
    }
}
