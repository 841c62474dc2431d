//! Hub and spoke (issue 15, the runbook's pattern 3): spokes stream with the hub only; the
//! hub forwards every spoke's changes to the other spokes under their original origin,
//! so conflicts resolve the same everywhere and a change never comes back to its spoke.

use pg_test::{bdr, wait_until, Cluster, Node};

fn digest(n: &Node) -> String {
    bdr::table_digest(n, "t")
}

/// Wait until `t` is identical on every running node, with `rows` rows.
fn converged(c: &Cluster, rows: i64) {
    wait_until(
        &format!("t identical on every node with {rows} rows"),
        bdr::CATCHUP,
        || {
            let d: Vec<String> = c
                .nodes()
                .iter()
                .filter(|n| n.is_running())
                .map(digest)
                .collect();
            d.iter().all(|x| *x == d[0]) && d[0].starts_with(&format!("{rows}:"))
        },
    );
}

/// Wait until `n`'s apply from `peer` is paused (`want`) or not.
fn wait_paused(n: &Node, peer: &str, want: bool) {
    wait_until(
        &format!("{}'s apply from {peer} paused: {want}", n.name()),
        bdr::CATCHUP,
        || {
            n.query_scalar::<bool>(&format!(
                "SELECT coalesce(bool_and(state = 'paused'), false) \
                   FROM bdr.apply_workers() WHERE peer = '{peer}'"
            )) == want
        },
    );
}

fn hub_and_three_spokes() -> Cluster {
    hub_and_spokes("hubspoke", &["hub", "spoke1", "spoke2", "spoke3"])
}

/// A group of `names[0]` as the hub and the others as its spokes.
fn hub_and_spokes(name: &str, names: &[&str]) -> Cluster {
    let c = Cluster::builder()
        .name(name)
        .node_names(names)
        .nodes(names.len())
        .conf("bdr.apply_retry_max_delay", "'2s'")
        .start();
    for n in c.nodes() {
        n.execute("CREATE EXTENSION bdr; CREATE ROLE app LOGIN");
    }
    let hub = c.node(0);
    hub.execute(&format!("SELECT bdr.group_create('hub', '{}')", hub.dsn()));
    for s in &c.nodes()[1..] {
        s.execute(&format!(
            "SELECT bdr.group_join('{}', '{}', '{}', topology := 'spoke')",
            s.name(),
            s.dsn(),
            hub.dsn()
        ));
        s.execute("SELECT bdr.wait_for_join(120)");
    }
    c
}

#[test]
fn spokes_see_each_other_through_the_hub_converge_on_conflicts_and_survive_a_hub_crash() {
    let c = hub_and_three_spokes();
    let (hub, s1, s2, s3) = (c.node(0), c.node(1), c.node(2), c.node(3));

    // The links: a spoke streams with the hub only, the hub with every spoke.
    wait_until("the hub applies from 3 spokes", bdr::CATCHUP, || {
        hub.query_scalar::<i64>(
            "SELECT count(*) FROM bdr.apply_workers() WHERE state = 'streaming'",
        ) == 3
    });
    for s in [s1, s2, s3] {
        wait_until("a spoke applies from the hub only", bdr::CATCHUP, || {
            s.query_scalar::<String>(
                "SELECT coalesce(string_agg(peer || ':' || state, ','), '') FROM bdr.apply_workers()",
            ) == "hub:streaming"
        });
        assert_eq!(
            s.query_scalar::<String>(
                "SELECT string_agg(slot_name, ',') FROM pg_replication_slots WHERE slot_name LIKE 'bdr%'"
            ),
            format!(
                "bdr_{}_hub",
                s.query_scalar::<i64>(
                    "SELECT oid::bigint FROM pg_database WHERE datname = current_database()"
                )
            ),
            "{}: one slot, for the hub",
            s.name()
        );
    }

    // A table created on a spoke reaches the hub and, forwarded, the other spokes.
    s1.execute("CREATE TABLE t (id int PRIMARY KEY, v text, by_node text); GRANT ALL ON t TO app;");
    for n in [hub, s2, s3] {
        wait_until("t everywhere", bdr::CATCHUP, || {
            n.query_scalar::<bool>(
                "SELECT to_regclass('public.t') IS NOT NULL \
                 AND has_table_privilege('app', 'public.t', 'INSERT')",
            )
        });
    }

    // A row written on each spoke (as the application role) reaches every node.
    for (i, s) in [s1, s2, s3].iter().enumerate() {
        s.connect_as("app")
            .execute(
                "INSERT INTO t VALUES ($1, 'first', $2)",
                &[&(i as i32 + 1), &s.name()],
            )
            .unwrap();
    }
    hub.connect_as("app")
        .execute("INSERT INTO t VALUES (4, 'first', 'hub')", &[])
        .unwrap();
    converged(&c, 4);

    // Concurrent updates of one row on two spokes: the hub holds both (its apply from
    // them paused), spoke1 updates first, spoke2 later; then the hub resumes. Every node
    // ends with spoke2's value, and the hub records the conflict.
    hub.execute("SELECT bdr.apply_pause('spoke1'); SELECT bdr.apply_pause('spoke2')");
    wait_paused(hub, "spoke1", true);
    wait_paused(hub, "spoke2", true);
    s1.connect_as("app")
        .execute(
            "UPDATE t SET v = 'spoke1 wrote', by_node = 'spoke1' WHERE id = 3",
            &[],
        )
        .unwrap();
    s2.connect_as("app")
        .execute(
            "UPDATE t SET v = 'spoke2 wrote later', by_node = 'spoke2' WHERE id = 3",
            &[],
        )
        .unwrap();
    hub.execute("SELECT bdr.apply_resume('spoke2')");
    wait_until("the hub applied spoke2's update", bdr::CATCHUP, || {
        hub.query_scalar::<bool>("SELECT v = 'spoke2 wrote later' FROM t WHERE id = 3")
    });
    hub.execute("SELECT bdr.apply_resume('spoke1')");
    // The result is the same before and after the hub applies spoke1's older update:
    // wait for the conflict it records (the hub kept spoke2's newer row).
    wait_until(
        "the hub to record spoke1's update losing",
        bdr::CATCHUP,
        || {
            bdr::conflicts(hub)
                .iter()
                .any(|(_, r, rel)| r == "keep_local" && rel == "public.t")
        },
    );
    converged(&c, 4);
    for n in c.nodes() {
        assert_eq!(
            n.query_scalar::<String>("SELECT v FROM t WHERE id = 3"),
            "spoke2 wrote later",
            "{}",
            n.name()
        );
    }
    let remote: String = hub.query_scalar(
        "SELECT remote_node FROM bdr.conflict_history ORDER BY conflict_id DESC LIMIT 1",
    );
    assert_eq!(remote, "spoke1");

    // A spoke's own change never comes back to it: no conflict on a spoke about the rows
    // it inserted itself, and no origin for itself.
    for s in [s1, s2, s3] {
        assert_eq!(
            s.query_scalar::<i64>(&format!(
                "SELECT count(*) FROM bdr.conflict_history WHERE remote_node = '{}'",
                s.name()
            )),
            0
        );
        assert_eq!(
            s.query_scalar::<i64>(&format!(
                "SELECT count(*) FROM pg_replication_origin WHERE roname LIKE '%\\_{}'",
                s.name()
            )),
            0
        );
    }

    // A spoke shows the other spokes as reached through the hub, and its health check is
    // clean about them.
    assert_eq!(
        s1.query_scalar::<String>(
            "SELECT string_agg(node_name || '=' || apply_state, ',' ORDER BY node_name) \
             FROM bdr.node_status() WHERE NOT is_local"
        ),
        "hub=streaming,spoke2=via hub,spoke3=via hub"
    );
    wait_until("spoke1's health check is clean", bdr::CATCHUP, || {
        s1.query_scalar::<i64>(
            "SELECT count(*) FROM bdr.health_check() WHERE status <> 'OK' \
             AND check_name IN ('Node Count', 'Replication Lag', 'Slots', 'Peers Unreachable')",
        ) == 0
    });

    // The hub dies (SIGKILL) while the spokes write; it restarts; nothing is lost.
    hub.kill9();
    for (i, s) in [s1, s2, s3].iter().enumerate() {
        let mut app = s.connect_as("app");
        for k in 0..20 {
            let id = 100 + (i as i32) * 100 + k;
            app.execute(
                "INSERT INTO t VALUES ($1, 'hub down', $2)",
                &[&id, &s.name()],
            )
            .unwrap();
        }
    }
    hub.start();
    converged(&c, 4 + 60);
    assert_eq!(
        s3.query_scalar::<i64>("SELECT count(*) FROM t WHERE by_node = 'spoke1'"),
        21
    );
}

#[test]
fn a_spoke_joins_only_through_the_hub_and_a_mesh_node_cannot_join_a_hub_and_spoke_group() {
    let c = Cluster::builder()
        .name("hubspoke_refuse")
        .node_names(&["hub", "spoke1", "other"])
        .nodes(3)
        .start();
    for n in c.nodes() {
        n.execute("CREATE EXTENSION bdr");
    }
    let (hub, s1, other) = (c.node(0), c.node(1), c.node(2));
    hub.execute(&format!("SELECT bdr.group_create('hub', '{}')", hub.dsn()));
    let bad = s1
        .try_execute(&format!(
            "SELECT bdr.group_join('spoke1', '{}', '{}', topology := 'star')",
            s1.dsn(),
            hub.dsn()
        ))
        .unwrap_err();
    let e = pg_test::db_error_text(&bad);
    assert!(e.contains("topology \"star\"") && e.contains("HINT"), "{e}");
    s1.execute(&format!(
        "SELECT bdr.group_join('spoke1', '{}', '{}', topology := 'spoke')",
        s1.dsn(),
        hub.dsn()
    ));
    s1.execute("SELECT bdr.wait_for_join(120)");
    // A mesh node joining a hub-and-spoke group would not see the spokes' changes.
    let e = pg_test::db_error_text(
        &other
            .try_execute(&format!(
                "SELECT bdr.group_join('other', '{}', '{}')",
                other.dsn(),
                hub.dsn()
            ))
            .unwrap_err(),
    );
    assert!(
        e.contains("hub and spokes") && e.contains("topology := 'spoke'"),
        "{e}"
    );
    // Nor may a spoke hang off another spoke.
    let e = pg_test::db_error_text(
        &other
            .try_execute(&format!(
                "SELECT bdr.group_join('other', '{}', '{}', topology := 'spoke')",
                other.dsn(),
                s1.dsn()
            ))
            .unwrap_err(),
    );
    assert!(e.contains("cannot be a hub"), "{e}");
    // Refused joins changed nothing.
    assert_eq!(hub.query_scalar::<i64>("SELECT count(*) FROM bdr.nodes"), 2);
}

/// Tombstones `t` has on `n`.
fn tombstones(n: &Node) -> i64 {
    bdr::tombstones(n, "t")
}

/// A spoke keeps a tombstone until the hub has applied every other spoke past it, not only
/// until a newer transaction of the hub's arrives. The hub forwards the other spokes'
/// transactions in the order it applies them: here it holds both spokes' changes, spoke2
/// updates a row, spoke1 deletes it later, the hub commits something newer of its own,
/// then applies spoke2's UPDATE (the delete has not reached it: the UPDATE wins there) and
/// forwards it to spoke1 after its own newer transaction. Until session 21 spoke1 had
/// collected its tombstone on that newer transaction, so the forwarded UPDATE found no
/// row and no tombstone and brought the row back on spoke1 alone (`update_missing`),
/// while the delete then removed it on the hub and spoke2. The hub's heartbeats carry how
/// far it has applied every spoke; once past, the tombstones go everywhere.
#[test]
fn a_spoke_keeps_a_tombstone_until_the_hub_has_every_spoke_past_it() {
    let c = hub_and_spokes("hubtomb", &["hub", "spoke1", "spoke2"]);
    let (hub, s1, s2) = (c.node(0), c.node(1), c.node(2));
    s1.execute("CREATE TABLE t (id int PRIMARY KEY, v text, by_node text); GRANT ALL ON t TO app;");
    for n in [hub, s2] {
        wait_until("t everywhere", bdr::CATCHUP, || {
            n.query_scalar::<bool>(
                "SELECT to_regclass('public.t') IS NOT NULL \
                 AND has_table_privilege('app', 'public.t', 'INSERT')",
            )
        });
    }
    let app = |n: &Node, sql: &str| n.connect_as("app").batch_execute(sql).unwrap();
    app(hub, "INSERT INTO t VALUES (1, 'first', 'hub')");
    converged(&c, 1);

    hub.execute("SELECT bdr.apply_pause('spoke1'); SELECT bdr.apply_pause('spoke2')");
    wait_paused(hub, "spoke1", true);
    wait_paused(hub, "spoke2", true);
    app(
        s2,
        "UPDATE t SET v = 'spoke2, older', by_node = 'spoke2' WHERE id = 1",
    );
    app(s1, "DELETE FROM t WHERE id = 1");
    app(hub, "INSERT INTO t VALUES (2, 'hub, newer', 'hub')");
    // A plain role on the hub forges a heartbeat whose horizon is far in the future
    // (`pg_logical_emit_message` is granted to PUBLIC): the hub must not send it on.
    app(
        hub,
        "SELECT pg_logical_emit_message(true, 'bdr.sync', 'heartbeat 9000000000000000')",
    );
    // Nor can it write the table the real ones come from.
    let denied = hub
        .connect_as("app")
        .batch_execute("UPDATE bdr.heartbeat SET horizon = 9000000000000000")
        .unwrap_err();
    assert!(
        format!("{denied:?}").contains("permission denied"),
        "a plain role wrote bdr.heartbeat: {denied:?}"
    );
    app(
        hub,
        "INSERT INTO t VALUES (3, 'hub, after the forged heartbeat', 'hub')",
    );
    wait_until("spoke1 has the hub's newer rows", bdr::CATCHUP, || {
        s1.query_scalar::<i64>("SELECT count(*) FROM t WHERE id IN (2, 3)") == 2
    });
    // Three of spoke1's collection rounds (every 10 s): the tombstone must stay.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(35);
    while std::time::Instant::now() < until {
        assert_eq!(
            tombstones(s1),
            1,
            "spoke1 collected its tombstone while spoke2's older UPDATE was still held up"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }

    // The hub applies spoke2's UPDATE (it has not seen the delete) and forwards it.
    hub.execute("SELECT bdr.apply_resume('spoke2')");
    wait_paused(hub, "spoke2", false);
    wait_until("the hub applied spoke2's UPDATE", bdr::CATCHUP, || {
        hub.query_scalar::<i64>("SELECT count(*) FROM t WHERE id = 1 AND by_node = 'spoke2'") == 1
    });
    let hub_lsn: String = hub.query_scalar("SELECT pg_current_wal_flush_lsn()::text");
    wait_until(
        "spoke1 applied the hub's stream past it",
        bdr::CATCHUP,
        || {
            s1.query_scalar::<bool>(&format!(
                "SELECT coalesce((SELECT applied_lsn::pg_lsn >= '{hub_lsn}'::pg_lsn \
               FROM bdr.apply_workers() WHERE peer = 'hub'), false)"
            ))
        },
    );
    hub.execute("SELECT bdr.apply_resume('spoke1')");
    wait_paused(hub, "spoke1", false);
    converged(&c, 2);
    for n in c.nodes() {
        assert_eq!(
            n.query_scalar::<i64>("SELECT count(*) FROM t WHERE id = 1"),
            0,
            "the older UPDATE must not bring the deleted row back on {}",
            n.name()
        );
    }
    // Past it everywhere now: the hub's heartbeats let the spokes collect too.
    for n in c.nodes() {
        wait_until(
            &format!("{}'s tombstones collected", n.name()),
            std::time::Duration::from_secs(120),
            || tombstones(n) == 0,
        );
    }
}
