//! Least privilege and a receiver that trusts nothing (issue 12), on real postmasters:
//! plain roles work on replicated tables, logical messages from anyone cannot stop
//! replication, workers come back and leave other databases alone, parting touches only
//! its own database, and a join killed half-way leaves nothing behind.
//!
//! Application writes run as `app`, a role with no privilege beyond CREATE on schema
//! public and what it owns: what a real application has.

use pg_test::bdr::{assert_same_everywhere, form_group, wait_for_catchup, CATCHUP};
use pg_test::{db_error_text, wait_until, Cluster, Node};
use postgres::{Client, NoTls};

/// `CREATE ROLE app LOGIN` with CREATE on schema public, on every node (roles do not
/// replicate).
fn create_app_role(c: &Cluster) {
    for n in c.nodes() {
        n.execute("CREATE ROLE app LOGIN; GRANT CREATE ON SCHEMA public TO app;");
    }
}

/// A session on `n`'s test database as role `app`.
fn app(n: &Node) -> Client {
    let dsn = format!(
        "host=127.0.0.1 port={} dbname={} user=app",
        n.port(),
        n.dbname()
    );
    Client::connect(&dsn, NoTls).unwrap_or_else(|e| panic!("connect as app to {}: {e}", n.name()))
}

/// Run `sql` as `app` on `n`; panics with the server's error.
fn app_exec(n: &Node, sql: &str) {
    app(n)
        .batch_execute(sql)
        .unwrap_or_else(|e| panic!("as app on {}: {sql}\n{}", n.name(), db_error_text(&e)));
}

fn count(n: &Node, sql: &str) -> i64 {
    n.query_scalar::<i64>(sql)
}

#[test]
fn plain_role_creates_writes_and_deletes_and_it_replicates() {
    let c = Cluster::builder().name("plainrole").nodes(3).start();
    create_app_role(&c);
    form_group(&c);
    // The application's own tables, created by the application's role on every node
    // (schema changes do not travel), and a temporary table of its own.
    for n in c.nodes() {
        app_exec(
            n,
            "CREATE TABLE t (id int PRIMARY KEY, v text); \
             CREATE TEMP TABLE scratch (x int); INSERT INTO scratch VALUES (1);",
        );
        assert_eq!(
            count(
                n,
                "SELECT count(*) FROM pg_trigger WHERE tgname = 'bdr_tombstone' \
                 AND tgrelid = 'public.t'::regclass"
            ),
            1,
            "{}: the app's new table gets the tombstone trigger",
            n.name()
        );
    }
    let a = c.node(0);
    app_exec(
        a,
        "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 5) g; \
         UPDATE t SET id = 10 WHERE id = 1; \
         UPDATE t SET v = 'changed' WHERE id = 3; \
         DELETE FROM t WHERE id = 2;",
    );
    // The other nodes write too, as app.
    app_exec(c.node(1), "DELETE FROM t WHERE id = 4");
    wait_for_catchup(&c);
    let digest = assert_same_everywhere(&c, "t");
    assert!(digest.starts_with("3:"), "{digest}");
    for n in c.nodes() {
        let rows: String =
            n.query_scalar("SELECT string_agg(id || '=' || v, ',' ORDER BY id) FROM t");
        assert_eq!(rows, "3=changed,5=v5,10=v1", "on {}", n.name());
        // Deleted keys (1 by the key change, 2 and 4 by DELETE) are remembered everywhere.
        assert_eq!(
            count(
                n,
                "SELECT count(*) FROM bdr.tombstones WHERE relid = 't'::regclass"
            ),
            3,
            "tombstones on {}",
            n.name()
        );
    }
    // Still nothing in schema bdr for PUBLIC.
    let e = app(a)
        .batch_execute("SELECT * FROM bdr.tombstones")
        .expect_err("app cannot read bdr's catalog");
    assert!(
        db_error_text(&e).contains("permission denied"),
        "{}",
        db_error_text(&e)
    );
}

/// `SELECT count(*) FROM t` on `n`.
fn rows_in_t(n: &Node) -> i64 {
    count(n, "SELECT count(*) FROM t")
}

/// The apply workers of `n` as "peer:state:errors", sorted.
fn workers(n: &Node) -> String {
    n.query_scalar(
        "SELECT coalesce(string_agg(peer || ':' || state || ':' || error_count, ',' ORDER BY peer), '') \
         FROM bdr.apply_workers()",
    )
}

#[test]
fn logical_messages_from_any_role_do_not_stop_replication() {
    let c = Cluster::builder().name("messages").nodes(2).start();
    create_app_role(&c);
    form_group(&c);
    for n in c.nodes() {
        app_exec(n, "CREATE TABLE t (id int PRIMARY KEY)");
    }
    let (a, b) = (c.node(0), c.node(1));
    app_exec(a, "INSERT INTO t VALUES (1)");
    wait_for_catchup(&c);
    // pg_logical_emit_message is granted to PUBLIC: any role can put messages with any
    // prefix in the WAL, transactional or not, of any size.
    app_exec(
        a,
        "SELECT pg_logical_emit_message(false, 'bdr.x', ''); \
         SELECT pg_logical_emit_message(true, 'bdr.x', ''); \
         SELECT pg_logical_emit_message(false, 'bdr', 'x'); \
         SELECT pg_logical_emit_message(false, 'bdr.sync', 'x'); \
         BEGIN; INSERT INTO t VALUES (2); \
           SELECT pg_logical_emit_message(true, 'bdr.sync', repeat('x', 2 * 1024 * 1024)); \
         COMMIT;",
    );
    app_exec(a, "INSERT INTO t VALUES (3)");
    wait_until(
        "node2 to receive the rows written after the messages",
        CATCHUP,
        || rows_in_t(b) == 3,
    );
    // The oversized message was not sent, and the walsender said so.
    a.wait_for_log(
        "logical message with prefix \"bdr.sync\" of 2097152 bytes was not sent",
        CATCHUP,
    );
    // Still streaming, no error, also after the apply worker restarts (it re-reads the
    // stream from its last flushed position).
    assert_eq!(workers(b), "node1:streaming:0");
    b.execute("SELECT pg_terminate_backend(pid) FROM bdr.apply_workers()");
    app_exec(a, "INSERT INTO t VALUES (4)");
    wait_until(
        "node2 to receive a row after its apply worker restarted",
        CATCHUP,
        || rows_in_t(b) == 4,
    );
    wait_until("node2's apply worker to stream again", CATCHUP, || {
        workers(b) == "node1:streaming:0"
    });
    wait_for_catchup(&c);
    assert_same_everywhere(&c, "t");
}
