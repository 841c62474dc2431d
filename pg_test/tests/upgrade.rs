//! Upgrades of the extension's SQL (`ALTER EXTENSION bdr UPDATE`) under a newer library:
//! what a DBA runs node by node in a rolling upgrade (docs/runbook.md).
//!
//! The previous release's complete SQL is `pg_test/fixtures/bdr--0.1.0.sql` (installed by
//! `make install-debug`, never shipped). A catalog change without an upgrade script in
//! `sql/` makes the first test fail: the updated catalog then differs from a fresh one.

use pg_test::bdr::{assert_same_everywhere, join, tombstones, wait_for_catchup, CATCHUP};
use pg_test::{wait_until, Cluster, Node};
use std::time::Duration;

/// The release before this one, as the fixture holds it.
const PREVIOUS: &str = "0.1.0";

/// Every object of the extension and how it is defined, one line each, sorted: relations
/// (kind, ACL, comment), columns (type, NOT NULL, default), constraints, indexes, views,
/// functions (definition, ACL), triggers, event triggers, the schema's ACL, and the list
/// of the extension's members.
const DESCRIBE: &str = "
SELECT string_agg(d, E'\\n' ORDER BY d) FROM (
  SELECT format('rel %s %s acl=%s comment=%s', c.relname, c.relkind, c.relacl,
                obj_description(c.oid, 'pg_class')) AS d
    FROM pg_class c WHERE c.relnamespace = 'bdr'::regnamespace
  UNION ALL
  SELECT format('col %s.%s %s notnull=%s default=%s acl=%s', c.relname, a.attname,
                format_type(a.atttypid, a.atttypmod), a.attnotnull,
                pg_get_expr(ad.adbin, ad.adrelid), a.attacl)
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
    LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
   WHERE c.relnamespace = 'bdr'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
  UNION ALL
  SELECT format('con %s.%s %s', c.relname, k.conname, pg_get_constraintdef(k.oid))
    FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
   WHERE c.relnamespace = 'bdr'::regnamespace
  UNION ALL
  SELECT format('idx %s', pg_get_indexdef(i.indexrelid))
    FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
   WHERE c.relnamespace = 'bdr'::regnamespace
  UNION ALL
  SELECT format('view %s %s', c.relname, pg_get_viewdef(c.oid))
    FROM pg_class c WHERE c.relnamespace = 'bdr'::regnamespace AND c.relkind IN ('v', 'm')
  UNION ALL
  SELECT format('fn %s kind=%s acl=%s %s', p.oid::regprocedure, p.prokind, p.proacl,
                CASE WHEN p.prokind IN ('f', 'p', 'w') THEN pg_get_functiondef(p.oid) END)
    FROM pg_proc p WHERE p.pronamespace = 'bdr'::regnamespace
  UNION ALL
  SELECT format('trg %s', pg_get_triggerdef(t.oid))
    FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
   WHERE c.relnamespace = 'bdr'::regnamespace AND NOT t.tgisinternal
  UNION ALL
  SELECT format('evt %s %s %s %s', e.evtname, e.evtevent, e.evtfoid::regproc, e.evttags)
    FROM pg_event_trigger e
  UNION ALL
  SELECT format('schema acl=%s', n.nspacl) FROM pg_namespace n WHERE n.nspname = 'bdr'
  UNION ALL
  SELECT format('member %s', pg_describe_object(d.classid, d.objid, d.objsubid))
    FROM pg_depend d JOIN pg_extension x ON x.oid = d.refobjid
   WHERE x.extname = 'bdr' AND d.deptype = 'e'
) s";

fn extversion(n: &Node, db: &str) -> String {
    let mut c = n.connect_db(db);
    c.query_one(
        "SELECT extversion FROM pg_extension WHERE extname = 'bdr'",
        &[],
    )
    .unwrap()
    .get(0)
}

fn default_version(n: &Node) -> String {
    n.query_scalar("SELECT default_version FROM pg_available_extensions WHERE name = 'bdr'")
}

/// The previous release's SQL must be installed (the fixture): say how to get it.
fn require_previous(n: &Node) {
    let there: bool = n.query_scalar(&format!(
        "SELECT EXISTS (SELECT FROM pg_available_extension_versions \
          WHERE name = 'bdr' AND version = '{PREVIOUS}')"
    ));
    assert!(
        there,
        "bdr {PREVIOUS}'s SQL is not installed: run `make install-debug` (it installs \
         pg_test/fixtures/bdr--{PREVIOUS}.sql)"
    );
}

#[test]
fn the_previous_release_updated_is_exactly_a_fresh_install() {
    let c = Cluster::builder().name("upgrade_catalog").nodes(1).start();
    let n = c.node(0);
    require_previous(n);
    let current = default_version(n);
    assert_ne!(
        current, PREVIOUS,
        "the release being built is the previous one"
    );
    n.execute("CREATE DATABASE fresh");
    n.execute("CREATE DATABASE updated");
    n.connect_db("fresh")
        .batch_execute("CREATE EXTENSION bdr")
        .unwrap();
    let mut old = n.connect_db("updated");
    old.batch_execute(&format!("CREATE EXTENSION bdr VERSION '{PREVIOUS}'"))
        .unwrap();
    let before: String = old.query_one(DESCRIBE, &[]).unwrap().get(0);
    old.batch_execute("ALTER EXTENSION bdr UPDATE").unwrap();
    assert_eq!(extversion(n, "updated"), current);
    assert_eq!(extversion(n, "fresh"), current);

    let fresh: String = n
        .connect_db("fresh")
        .query_one(DESCRIBE, &[])
        .unwrap()
        .get(0);
    let updated: String = old.query_one(DESCRIBE, &[]).unwrap().get(0);
    let only = |a: &str, b: &str| -> Vec<String> {
        let b: std::collections::HashSet<&str> = b.lines().collect();
        a.lines()
            .filter(|l| !b.contains(l))
            .map(str::to_owned)
            .collect()
    };
    assert!(
        fresh == updated,
        "{PREVIOUS} updated to {current} differs from a fresh {current}: a catalog change \
         needs its upgrade script in sql/ (bdr--{PREVIOUS}--{current}.sql)\n\
         only in a fresh install:\n  {}\nonly in the updated one:\n  {}",
        only(&fresh, &updated).join("\n  "),
        only(&updated, &fresh).join("\n  ")
    );
    // The check can fail: the previous release's catalog is not this one's.
    assert_ne!(
        before, fresh,
        "{PREVIOUS} and {current} have the same catalog"
    );

    // health_check() says when the SQL is not the library's (from 0.2.0 on; shown here by
    // marking a fresh install as the previous version).
    let check = |db: &str| -> (String, String) {
        let r = n
            .connect_db(db)
            .query_one(
                "SELECT status, details FROM bdr.health_check() \
                  WHERE check_name = 'Extension Version'",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(
        check("updated"),
        ("OK".into(), format!("SQL and library {current}"))
    );
    n.connect_db("fresh")
        .batch_execute(&format!(
            "UPDATE pg_extension SET extversion = '{PREVIOUS}' WHERE extname = 'bdr'"
        ))
        .unwrap();
    assert_eq!(
        check("fresh"),
        (
            "WARNING".into(),
            format!(
                "SQL {PREVIOUS}, library {current}: run ALTER EXTENSION bdr UPDATE on this node"
            )
        )
    );
}

/// A rolling upgrade: both nodes run the new library on the previous release's SQL, then
/// each runs `ALTER EXTENSION bdr UPDATE` in turn. Replication never stops; a node not
/// yet updated cannot send heartbeats and says so in its log; once both are, the
/// tombstones every node holds are collected.
#[test]
fn a_group_updated_node_by_node_keeps_replicating() {
    let c = Cluster::builder().name("upgrade_rolling").nodes(2).start();
    let (a, b) = (c.node(0), c.node(1));
    require_previous(a);
    for n in c.nodes() {
        n.execute("CREATE ROLE app LOGIN");
        n.execute(&format!("CREATE EXTENSION bdr VERSION '{PREVIOUS}'"));
    }
    a.execute(&format!(
        "SELECT bdr.group_create(local_node_name := '{}', node_external_dsn := '{}')",
        a.name(),
        a.dsn()
    ));
    join(b, a);
    a.execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text); GRANT ALL ON t TO app; \
         GRANT USAGE ON SCHEMA bdr TO app;",
    );
    wait_until("t on node2", CATCHUP, || {
        b.query_scalar::<bool>(
            "SELECT to_regclass('public.t') IS NOT NULL \
             AND has_table_privilege('app', 'public.t', 'INSERT')",
        )
    });
    let app = |n: &Node, sql: &str| n.connect_as("app").batch_execute(sql).unwrap();
    app(
        a,
        "INSERT INTO t SELECT g, 'a' FROM generate_series(1, 10) g",
    );
    app(
        b,
        "INSERT INTO t SELECT g, 'b' FROM generate_series(11, 20) g",
    );
    // node2's rows must be on node1 before node1 deletes one of them: a DELETE that finds
    // no row leaves no tombstone (the count below would read 2, as in CI on a955328).
    wait_for_catchup(&c);
    app(a, "DELETE FROM t WHERE id IN (1, 2, 11)");
    wait_for_catchup(&c);
    assert_same_everywhere(&c, "t");
    for n in c.nodes() {
        assert_eq!(tombstones(n, "t"), 3, "tombstones on {}", n.name());
    }
    // The library says its SQL is older, once at the supervisor's start, with the fix.
    let current = default_version(a);
    a.wait_for_log(
        &format!(
            "bdr: the extension's SQL in database \"{}\" is version {PREVIOUS}, its library {current}",
            a.dbname()
        ),
        Duration::from_secs(60),
    );
    assert!(
        a.log()
            .contains("HINT:  Run ALTER EXTENSION bdr UPDATE in that database"),
        "the warning's hint"
    );
    // The previous SQL has no bdr.heartbeat: the new library says so rather than fail
    // unseen (tombstones are pending, so a heartbeat is due every round).
    a.wait_for_log(
        "bdr: supervisor: relation \"bdr.heartbeat\" does not exist",
        Duration::from_secs(60),
    );

    // A key sequence as the previous release left it: `offset`, counting from 1.
    a.execute(
        "CREATE TABLE r (id int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, v text); \
         GRANT ALL ON r TO app;",
    );
    wait_until("r on node2", CATCHUP, || {
        b.query_scalar::<bool>(
            "SELECT to_regclass('public.r') IS NOT NULL \
             AND has_table_privilege('app', 'public.r', 'INSERT')",
        )
    });
    for n in c.nodes() {
        app(n, "INSERT INTO r (v) VALUES ('x')");
        n.execute("SET bdr.ddl_replication = off; ALTER SEQUENCE r_id_seq START WITH 1");
    }

    // node1 first; node2 still on the previous SQL, both writing.
    a.execute("ALTER EXTENSION bdr UPDATE");
    app(
        a,
        "UPDATE t SET v = 'a2' WHERE id = 3; INSERT INTO t VALUES (21, 'a')",
    );
    app(
        b,
        "UPDATE t SET v = 'b2' WHERE id = 12; DELETE FROM t WHERE id = 13",
    );
    wait_for_catchup(&c);
    assert_same_everywhere(&c, "t");
    // A drained schema change from the updated node: node2's SQL has no
    // bdr.ddl_fence_keep yet, which the origin accepts (the fence lapses by itself).
    a.execute("ALTER TABLE t ADD COLUMN w int NOT NULL DEFAULT 0");
    wait_until("the new column on node2", CATCHUP, || {
        b.query_scalar::<i64>(
            "SELECT count(*) FROM information_schema.columns \
              WHERE table_name = 't' AND column_name = 'w'",
        ) == 1
    });
    // A drained schema change that fails once drained (t has rows): its rollback lifts
    // node2's fence at once with the one-argument bdr.ddl_unfence that node2's SQL has.
    let mut ddl = a.connect();
    let failed = ddl
        .batch_execute("ALTER TABLE t ADD COLUMN x int NOT NULL")
        .map_err(|e| pg_test::db_error_text(&e))
        .expect_err("a NOT NULL column without a default on a table with rows");
    assert!(failed.contains("contains null values"), "{failed}");
    ddl.batch_execute("SELECT 1").unwrap(); // the rollback, unfence included, is over
    app(b, "UPDATE t SET v = 'b3' WHERE id = 12");

    b.execute("ALTER EXTENSION bdr UPDATE");
    app(b, "INSERT INTO t VALUES (22, 'b')");
    wait_for_catchup(&c);
    assert_same_everywhere(&c, "t");
    for n in c.nodes() {
        assert_eq!(extversion(n, n.dbname()), current, "on {}", n.name());
        assert_eq!(
            n.query_scalar::<i64>("SELECT count(*) FROM t"),
            18,
            "rows on {}",
            n.name()
        );
    }
    // Each node's key sequence starts again from its own first value: a replicated
    // TRUNCATE ... RESTART IDENTITY leaves the nodes' keys apart.
    let mut firsts = Vec::new();
    for n in c.nodes() {
        let (start, last): (i64, i64) = {
            let row = n
                .connect()
                .query_one(
                    "SELECT q.seqstart, s.last_value FROM pg_sequence q, r_id_seq s \
                      WHERE q.seqrelid = 'r_id_seq'::regclass",
                    &[],
                )
                .unwrap();
            (row.get(0), row.get(1))
        };
        assert_eq!(
            start,
            (last - 1) % 1024 + 1,
            "START of r_id_seq on {}",
            n.name()
        );
        firsts.push(start);
    }
    assert_ne!(firsts[0], firsts[1], "the nodes' first values");
    a.execute("TRUNCATE r RESTART IDENTITY");
    wait_for_catchup(&c);
    for n in c.nodes() {
        app(n, "INSERT INTO r (v) VALUES ('after')");
    }
    wait_for_catchup(&c);
    assert_same_everywhere(&c, "r");
    assert_eq!(a.query_scalar::<i64>("SELECT count(DISTINCT id) FROM r"), 2);

    // Both send heartbeats now: with nobody writing, every tombstone goes.
    for n in c.nodes() {
        wait_until(
            &format!("{}'s tombstones collected after the upgrade", n.name()),
            Duration::from_secs(120),
            || tombstones(n, "t") == 0,
        );
    }
    for n in c.nodes() {
        let errors: i64 = n.query_scalar(
            "SELECT count(*) FROM bdr.conflict_history WHERE conflict_type = 'apply_error'",
        );
        assert_eq!(errors, 0, "apply errors on {} during the upgrade", n.name());
    }
}
