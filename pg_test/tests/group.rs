//! Group formation and apply (issue: apply workers and group formation). Real postmasters.

use pg_test::bdr::{assert_same_everywhere, conflicts, form_group, wait_for_catchup};
use pg_test::Cluster;

const ALLTYPES: &str = "
    CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
    CREATE TABLE alltypes (
        id int8 PRIMARY KEY, c_i2 int2, c_i4 int4, c_num numeric, c_f8 float8,
        c_text text, c_vc varchar(20), c_bool bool, c_ts timestamptz, c_date date,
        c_iv interval, c_uuid uuid, c_jsonb jsonb, c_bytea bytea, c_ia int[], c_ta text[],
        c_mood mood, c_big text);";

fn insert_row(id: i64) -> String {
    format!(
        "INSERT INTO alltypes VALUES ({id}, -32768, 2147483647, 12345678901234567890.000000001, 3.5e-300,
           'it''s ünïcødé', 'short', true, '2026-11-22 10:11:12.123456+00', '1999-12-31',
           '1 year 2 mons 3 days 04:05:06.7', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
           '{{\"a\": [1, {{\"b\": null}}]}}', '\\x00ff10', '{{1,NULL,3}}', '{{\"x y\",NULL,\"\"}}', 'happy',
           (SELECT string_agg(md5(i::text || '{id}'), '') FROM generate_series(1, 32768) i));
         INSERT INTO alltypes (id, c_text) VALUES ({}, '');",
        id + 1
    )
}

#[test]
fn three_nodes_replicate_every_type_and_never_loop() {
    let c = Cluster::builder().name("group3").nodes(3).start();
    // The schema exists on the first node only: joins copy it.
    c.node(0).execute(ALLTYPES);
    form_group(&c);
    // Writes on every node, disjoint keys.
    for (i, n) in c.nodes().iter().enumerate() {
        let base = (i as i64 + 1) * 100;
        n.execute(&insert_row(base));
        n.execute(&format!(
            "UPDATE alltypes SET c_text = 'changed on {}' WHERE id = {base}",
            n.name()
        ));
        n.execute(&format!(
            "UPDATE alltypes SET id = {} WHERE id = {}",
            base + 50,
            base + 1
        ));
        n.execute(&insert_row(base + 10));
        n.execute(&format!("DELETE FROM alltypes WHERE id = {}", base + 11));
    }
    // One remote transaction that changes the same row several times.
    c.node(1).execute(
        "BEGIN;
         INSERT INTO alltypes (id, c_text) VALUES (900, 'a');
         UPDATE alltypes SET c_text = 'b' WHERE id = 900;
         UPDATE alltypes SET id = 901 WHERE id = 900;
         INSERT INTO alltypes (id, c_text) VALUES (902, 'gone');
         DELETE FROM alltypes WHERE id = 902;
         COMMIT;",
    );
    wait_for_catchup(&c);
    let digest = assert_same_everywhere(&c, "alltypes");
    assert!(digest.starts_with("10:"), "3 nodes x 3 rows + 1: {digest}");
    for n in c.nodes() {
        let t: String = n.query_scalar("SELECT c_text FROM alltypes WHERE id = 901");
        assert_eq!(t, "b", "on {}", n.name());
    }
    // The TOASTed column survived the update that did not touch it, everywhere.
    for n in c.nodes() {
        let len: i32 = n.query_scalar("SELECT length(c_big) FROM alltypes WHERE id = 200");
        assert_eq!(len, 32768 * 32, "on {}", n.name());
        let t: String = n.query_scalar("SELECT c_text FROM alltypes WHERE id = 300");
        assert_eq!(t, "changed on node3");
    }
    // TRUNCATE replicates too.
    // (The table is created on one node: DDL replicates.)
    c.node(1)
        .execute("CREATE TABLE t_trunc (id int PRIMARY KEY)");
    wait_for_catchup(&c);
    c.node(2)
        .execute("INSERT INTO t_trunc SELECT generate_series(1, 10)");
    wait_for_catchup(&c);
    assert_same_everywhere(&c, "t_trunc");
    c.node(1).execute("TRUNCATE t_trunc");
    wait_for_catchup(&c);
    for n in c.nodes() {
        assert_eq!(
            n.query_scalar::<i64>("SELECT count(*) FROM t_trunc"),
            0,
            "{}",
            n.name()
        );
    }
    // Applied exactly once, never back to its origin: no conflict anywhere.
    for n in c.nodes() {
        assert_eq!(conflicts(n), vec![], "conflicts on {}", n.name());
    }
}

#[test]
fn tables_without_primary_key_refuse_updates_or_replicate_with_full_identity() {
    let c = Cluster::builder().name("nopk").nodes(2).start();
    for n in c.nodes() {
        n.execute(
            "CREATE EXTENSION bdr;
             CREATE TABLE log (at int, msg text);
             CREATE TABLE full_t (a int, b text);
             ALTER TABLE full_t REPLICA IDENTITY FULL;",
        );
    }
    form_group(&c);
    let (a, b) = (c.node(0), c.node(1));
    // INSERT-only use works.
    a.execute("INSERT INTO log VALUES (1, 'x'), (2, 'y')");
    // UPDATE/DELETE are refused at the writing node, with the reason and a hint.
    let e = a
        .try_execute("UPDATE log SET msg = 'z' WHERE at = 1")
        .unwrap_err();
    let text = pg_test::db_error_text(&e);
    assert!(text.contains("does not have a replica identity"), "{text}");
    assert!(text.contains("HINT"), "{text}");
    let e = b.try_execute("DELETE FROM log").unwrap_err();
    assert!(pg_test::db_error_text(&e).contains("does not have a replica identity"));
    // With REPLICA IDENTITY FULL, updates and deletes replicate.
    a.execute("INSERT INTO full_t VALUES (1, 'one'), (2, 'two'), (3, 'three')");
    wait_for_catchup(&c);
    b.execute("UPDATE full_t SET b = 'uno' WHERE a = 1; DELETE FROM full_t WHERE a = 3;");
    wait_for_catchup(&c);
    assert!(assert_same_everywhere(&c, "full_t").starts_with("2:"));
    assert!(assert_same_everywhere(&c, "log").starts_with("2:"));
    assert_eq!(
        a.query_scalar::<String>("SELECT b FROM full_t WHERE a = 1"),
        "uno"
    );
    // node2 changed rows node1 wrote: recorded on node1 as origin-differs, and applied
    // (nothing discarded); nothing at all on node2.
    assert_eq!(
        conflicts(a),
        vec![
            (
                "update_origin_differs".to_string(),
                "apply_remote".to_string(),
                "public.full_t".to_string()
            ),
            (
                "delete_origin_differs".to_string(),
                "apply_remote".to_string(),
                "public.full_t".to_string()
            ),
        ]
    );
    assert_eq!(conflicts(b), vec![]);
}
