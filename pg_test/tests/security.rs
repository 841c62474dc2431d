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
    n.connect_as("app")
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
    // Tombstones kept, so that the count below cannot move (a heartbeat round right
    // after the catch-up could collect them).
    let c = Cluster::builder()
        .name("plainrole")
        .nodes(3)
        .conf("bdr.tombstone_min_age", "1h")
        .start();
    create_app_role(&c);
    form_group(&c);
    // The application's own table, created by the application's role on one node (the
    // schema change replicates), and a temporary table of its own on every node.
    app_exec(c.node(0), "CREATE TABLE t (id int PRIMARY KEY, v text)");
    wait_for_catchup(&c);
    for n in c.nodes() {
        app_exec(
            n,
            "CREATE TEMP TABLE scratch (x int); INSERT INTO scratch VALUES (1);",
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
    // The other nodes write too, as app (once node1's rows have reached them).
    wait_for_catchup(&c);
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
    app_exec(c.node(0), "CREATE TABLE t (id int PRIMARY KEY)");
    wait_for_catchup(&c);
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

#[test]
fn a_database_without_bdr_can_be_dropped() {
    let c = Cluster::builder().name("dropdb").nodes(1).start();
    let n = c.node(0);
    for round in 0..3 {
        n.execute("CREATE DATABASE scratch");
        // Long enough for the launcher to have visited the new database (every 10 s).
        std::thread::sleep(std::time::Duration::from_secs(12));
        n.try_execute("DROP DATABASE scratch").unwrap_or_else(|e| {
            let who: String = n.query_scalar(
                "SELECT coalesce(string_agg(backend_type, ', '), 'nobody') FROM pg_stat_activity \
                 WHERE datname = 'scratch'",
            );
            panic!("round {round}: {} (connected: {who})", db_error_text(&e))
        });
    }
}

/// Pid of the supervisor of `n`'s test database, if one runs.
fn supervisor_pid(n: &Node) -> Option<i32> {
    n.query_scalar(
        "SELECT max(pid) FROM pg_stat_activity WHERE backend_type LIKE 'bdr supervisor %' \
         AND datname = current_database()",
    )
}

#[test]
fn a_supervisor_that_failed_is_started_again() {
    let c = Cluster::builder().name("supfail").nodes(2).start();
    form_group(&c);
    c.node(0).execute("CREATE TABLE t (id int PRIMARY KEY)");
    wait_for_catchup(&c);
    let (a, b) = (c.node(0), c.node(1));
    // Make node1's next supervisor fail on a lock it cannot get at once: a short
    // lock_timeout for new sessions of the database, then a supervisor that starts with it.
    a.execute(&format!(
        "ALTER DATABASE {} SET lock_timeout = '200ms'",
        a.dbname()
    ));
    let first = supervisor_pid(a).expect("a supervisor runs");
    a.execute(&format!("SELECT pg_terminate_backend({first})"));
    wait_until("a new supervisor on node1", CATCHUP, || {
        supervisor_pid(a).is_some_and(|p| p != first)
    });
    let second = supervisor_pid(a).unwrap();
    // The supervisor reads bdr.nodes every half second: hold it locked until it failed.
    let mut locker = a.connect();
    locker
        .batch_execute("BEGIN; LOCK TABLE bdr.nodes IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    a.wait_for_log("canceling statement due to lock timeout", CATCHUP);
    wait_until("the failed supervisor to exit", CATCHUP, || {
        supervisor_pid(a) != Some(second)
    });
    locker.batch_execute("ROLLBACK").unwrap();
    a.execute(&format!("ALTER DATABASE {} RESET lock_timeout", a.dbname()));
    // It comes back, and does its job: a stopped apply worker is started again.
    wait_until("node1's supervisor to be started again", CATCHUP, || {
        supervisor_pid(a).is_some_and(|p| p != second)
    });
    a.execute("SELECT pg_terminate_backend(pid) FROM bdr.apply_workers() WHERE pid <> 0");
    b.execute("INSERT INTO t VALUES (1)");
    wait_until("node1 to apply node2's row", CATCHUP, || rows_in_t(a) == 1);
    wait_until("node1's apply worker streaming", CATCHUP, || {
        workers(a).starts_with("node2:streaming:")
    });
}

/// Run `sql` on database `db` of `n`.
fn exec_db(n: &Node, db: &str, sql: &str) {
    n.connect_db(db)
        .batch_execute(sql)
        .unwrap_or_else(|e| panic!("on {} db {db}: {sql}\n{}", n.name(), db_error_text(&e)));
}

fn scalar_db<T: for<'a> postgres::types::FromSql<'a>>(n: &Node, db: &str, sql: &str) -> T {
    n.connect_db(db)
        .query_one(sql, &[])
        .unwrap_or_else(|e| panic!("on {} db {db}: {sql}\n{}", n.name(), db_error_text(&e)))
        .get(0)
}

/// Slots and origins of database `db` on `n`, as a comparable string.
fn replication_objects(n: &Node, db: &str) -> String {
    scalar_db(
        n,
        db,
        "SELECT format('slots=%s origins=%s', \
           (SELECT string_agg(slot_name, ',' ORDER BY slot_name) FROM pg_replication_slots \
             WHERE database = current_database()), \
           (SELECT string_agg(roname, ',' ORDER BY roname) FROM pg_replication_origin \
             WHERE roname LIKE 'bdr\\_' || (SELECT oid FROM pg_database \
               WHERE datname = current_database()) || '\\_%'))",
    )
}

#[test]
fn parting_a_node_leaves_other_databases_alone() {
    let c = Cluster::builder().name("partdb").nodes(2).start();
    form_group(&c);
    let (a, b) = (c.node(0), c.node(1));
    // A second database on the same servers with a bdr group of its own.
    for n in c.nodes() {
        n.execute("CREATE DATABASE other");
        exec_db(
            n,
            "other",
            "CREATE EXTENSION bdr; CREATE TABLE t (id int PRIMARY KEY)",
        );
    }
    exec_db(
        a,
        "other",
        &format!("SELECT bdr.group_create('node1', '{}')", a.dsn_for("other")),
    );
    exec_db(
        b,
        "other",
        &format!(
            "SELECT bdr.group_join('node2', '{}', '{}')",
            b.dsn_for("other"),
            a.dsn_for("other")
        ),
    );
    exec_db(b, "other", "SELECT bdr.wait_for_join(120)");
    exec_db(a, "other", "INSERT INTO t VALUES (1)");
    wait_until("the other database to replicate", CATCHUP, || {
        scalar_db::<i64>(b, "other", "SELECT count(*) FROM t") == 1
    });
    // Both workers of the other database are up (each creates its origin as it starts).
    for n in c.nodes() {
        wait_until("the other database's workers streaming", CATCHUP, || {
            scalar_db::<bool>(
                n,
                "other",
                "SELECT coalesce(bool_and(state = 'streaming'), false) FROM bdr.apply_workers()",
            )
        });
    }
    let before: Vec<String> = c
        .nodes()
        .iter()
        .map(|n| replication_objects(n, "other"))
        .collect();
    let started = std::time::Instant::now();
    a.execute("SELECT bdr.part('node2')");
    let took = started.elapsed();
    // The other database's group kept everything and never noticed.
    let after: Vec<String> = c
        .nodes()
        .iter()
        .map(|n| replication_objects(n, "other"))
        .collect();
    assert_eq!(after, before, "slots and origins of database other");
    for n in c.nodes() {
        let w: String = scalar_db(
            n,
            "other",
            "SELECT string_agg(peer || ':' || state || ':' || error_count, ',') FROM bdr.apply_workers()",
        );
        assert!(w.ends_with(":streaming:0"), "{}: {w}", n.name());
    }
    exec_db(a, "other", "INSERT INTO t VALUES (2)");
    exec_db(b, "other", "INSERT INTO t VALUES (3)");
    for n in c.nodes() {
        wait_until(
            &format!("{} to have rows 1-3 in other", n.name()),
            CATCHUP,
            || scalar_db::<i64>(n, "other", "SELECT count(*) FROM t") == 3,
        );
    }
    // And the parted node of the first database holds nothing there any more.
    assert_eq!(replication_objects(b, b.dbname()), "slots= origins=");
    assert!(
        took < std::time::Duration::from_secs(20),
        "bdr.part took {took:?}"
    );
}

/// Every process command line on this machine that contains `needle`.
fn command_lines_with(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(b) = std::fs::read(e.path().join("cmdline")) {
            let s = String::from_utf8_lossy(&b).replace('\0', " ");
            if s.contains(needle) {
                out.push(s);
            }
        }
    }
    out
}

#[test]
fn a_join_keeps_secrets_off_command_lines_and_values_intact() {
    // Peers that still read backslashes in string literals as escapes.
    let c = Cluster::builder()
        .name("secrets")
        .nodes(2)
        .conf("standard_conforming_strings", "off")
        .start();
    let (a, b) = (c.node(0), c.node(1));
    for n in c.nodes() {
        n.execute("CREATE EXTENSION bdr");
    }
    // node2 has no table: the join copies the schema with pg_dump and psql.
    a.execute("CREATE TABLE t (id int PRIMARY KEY, v text)");
    // Passwords (ignored by trust authentication, but passed along like real ones) with a
    // quote and a backslash, and an sslpassword.
    let a_dsn = format!(
        "{} password='pw1\\\\x\\'Secret' sslpassword=SslSecret",
        a.dsn()
    );
    let b_dsn = format!("{} password='pw2\\\\y\\'Secret'", b.dsn());
    a.connect()
        .execute("SELECT bdr.group_create('node1', $1)", &[&a_dsn])
        .unwrap_or_else(|e| panic!("{}", db_error_text(&e)));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                seen.extend(command_lines_with("Secret"));
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            seen
        })
    };
    let joined = b
        .connect()
        .execute("SELECT bdr.group_join('node2', $1, $2)", &[&b_dsn, &a_dsn]);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = watcher.join().unwrap();
    joined.unwrap_or_else(|e| panic!("the join failed: {}", db_error_text(&e)));
    b.execute("SELECT bdr.wait_for_join(120)");
    assert!(seen.is_empty(), "secrets on command lines: {seen:?}");
    // The members store the DSNs exactly as given.
    let stored: String = a.query_scalar("SELECT node_dsn FROM bdr.nodes WHERE node_name = 'node2'");
    assert_eq!(stored, b_dsn);
    // The schema was copied and rows flow.
    a.execute("INSERT INTO t VALUES (1, 'one')");
    wait_until("node2 to receive node1's row", CATCHUP, || {
        rows_in_t(b) == 1
    });
    // No service file is left behind.
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("bdr_client_"))
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Slots on `n` (any database) whose name ends with `_<node>`.
fn slots_for(n: &Node, node: &str) -> i64 {
    count(
        n,
        &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'bdr%\\_{node}'"),
    )
}

#[test]
fn a_join_killed_half_way_leaves_nothing_behind() {
    let c = Cluster::builder().name("deadjoin").nodes(3).start();
    for n in c.nodes() {
        n.execute("CREATE EXTENSION bdr; CREATE TABLE t (id int PRIMARY KEY)");
    }
    let (a, b, j) = (c.node(0), c.node(1), c.node(2));
    a.execute(&format!("SELECT bdr.group_create('node1', '{}')", a.dsn()));
    pg_test::bdr::join(b, a);
    // Hold node1's apply from node2: the join of node3 through node1 then waits (step 3)
    // with node3 registered everywhere and its slot created on node2.
    a.execute("SELECT bdr.apply_pause('node2')");
    let join = {
        let (dsn, jdsn, adsn) = (j.dsn(), j.dsn(), a.dsn());
        std::thread::spawn(move || {
            Client::connect(&dsn, NoTls)
                .unwrap()
                .execute("SELECT bdr.group_join('node3', $1, $2)", &[&jdsn, &adsn])
        })
    };
    wait_until("node3's slot on node2", CATCHUP, || {
        slots_for(b, "node3") == 1
    });
    // The joining backend dies without a chance to undo anything (FATAL).
    j.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%group_join(%' \
         AND pid <> pg_backend_pid()",
    );
    // The client sees the FATAL or, if the socket closes first, a closed connection;
    // node3's log says which backend was terminated.
    let e = join.join().unwrap().expect_err("the join was terminated");
    let text = db_error_text(&e);
    assert!(
        text.contains("terminating connection") || text.contains("connection closed"),
        "{text}"
    );
    j.wait_for_log(
        "terminating connection due to administrator command",
        CATCHUP,
    );
    a.execute("SELECT bdr.apply_resume('node2')");
    // Within a bounded time the members hold nothing for the dead joiner.
    for n in [a, b] {
        wait_until(
            &format!("{} to drop what the dead join of node3 left", n.name()),
            std::time::Duration::from_secs(120),
            || {
                slots_for(n, "node3") == 0
                    && count(
                        n,
                        "SELECT count(*) FROM bdr.nodes WHERE node_name = 'node3'",
                    ) == 0
            },
        );
        assert_eq!(
            workers(n)
                .split(',')
                .filter(|w| !w.contains(":streaming:"))
                .count(),
            0,
            "{}",
            workers(n)
        );
    }
    // A new join of node3 works, and nothing it needs is removed while it runs.
    pg_test::bdr::join(j, a);
    b.execute("INSERT INTO t VALUES (1)");
    wait_until("node3 to receive node2's row", CATCHUP, || {
        rows_in_t(j) == 1
    });
    wait_for_catchup(&c);
    assert_same_everywhere(&c, "t");
}

#[test]
fn a_pause_with_a_time_limit_ends_by_itself() {
    let c = Cluster::builder().name("pauselimit").nodes(2).start();
    form_group(&c);
    c.node(0).execute("CREATE TABLE t (id int PRIMARY KEY)");
    wait_for_catchup(&c);
    let (a, b) = (c.node(0), c.node(1));
    a.execute("SELECT bdr.apply_pause(NULL, 3)");
    wait_until("node1's apply to pause", CATCHUP, || {
        workers(a).starts_with("node2:paused:")
    });
    b.execute("INSERT INTO t VALUES (1)");
    wait_until(
        "node1 to resume by itself and apply node2's row",
        CATCHUP,
        || rows_in_t(a) == 1,
    );
    a.wait_for_log("was paused for longer than", CATCHUP);
    // A pause without a limit stays.
    a.execute("SELECT bdr.apply_pause()");
    wait_until("node1's apply to pause", CATCHUP, || {
        workers(a).starts_with("node2:paused:")
    });
    b.execute("INSERT INTO t VALUES (2)");
    std::thread::sleep(std::time::Duration::from_secs(5));
    assert_eq!(rows_in_t(a), 1, "an unlimited pause holds");
    a.execute("SELECT bdr.apply_resume()");
    wait_until("node1 to apply after resume", CATCHUP, || rows_in_t(a) == 2);
}

/// The grants of docs/security.md ("Running with a non-superuser replication role").
const REPLICATION_ROLE_SQL: &str = "
CREATE ROLE bdr_user LOGIN REPLICATION;
GRANT USAGE ON SCHEMA bdr TO bdr_user;
GRANT SELECT, INSERT, UPDATE, DELETE ON bdr.nodes TO bdr_user;
GRANT SELECT, INSERT, DELETE ON bdr.tombstones TO bdr_user;
GRANT EXECUTE ON FUNCTION bdr.apply_pause(text, integer), bdr.apply_resume(text),
                          bdr.apply_workers() TO bdr_user;
GRANT SELECT ON pg_replication_origin_status TO bdr_user;
GRANT EXECUTE ON FUNCTION pg_show_replication_origin_status() TO bdr_user;
GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text), pg_replication_origin_drop(text),
                          pg_replication_origin_session_setup(text),
                          pg_replication_origin_session_reset(),
                          pg_replication_origin_xact_setup(pg_lsn, timestamptz),
                          pg_replication_origin_advance(text, pg_lsn) TO bdr_user;
GRANT SET ON PARAMETER session_replication_role TO bdr_user;
GRANT CREATE ON SCHEMA public TO bdr_user;
";

#[test]
fn a_non_superuser_replication_role_forms_and_parts_a_group() {
    let c = Cluster::builder().name("replrole").nodes(3).start();
    for n in c.nodes() {
        n.execute("CREATE EXTENSION bdr");
        n.execute(REPLICATION_ROLE_SQL);
    }
    let (a, b, x) = (c.node(0), c.node(1), c.node(2));
    // The schema exists everywhere (replaying pg_dump's output needs more than this role:
    // it comments on the extension), readable and, for the join's copy, writable by it.
    for n in c.nodes() {
        n.execute(
            "CREATE TABLE t (id int PRIMARY KEY); GRANT SELECT, INSERT, TRUNCATE ON t TO bdr_user;",
        );
    }
    a.execute("INSERT INTO t VALUES (1)");
    let dsn = |n: &Node| format!("{} user=bdr_user", n.dsn());
    a.connect()
        .execute("SELECT bdr.group_create('node1', $1)", &[&dsn(a)])
        .unwrap_or_else(|e| panic!("group_create: {}", db_error_text(&e)));
    for n in [b, x] {
        n.connect()
            .execute(
                "SELECT bdr.group_join($1, $2, $3)",
                &[&n.name(), &dsn(n), &dsn(a)],
            )
            .unwrap_or_else(|e| panic!("group_join of {}: {}", n.name(), db_error_text(&e)));
        n.execute("SELECT bdr.wait_for_join(120)");
    }
    a.execute("INSERT INTO t VALUES (2)");
    b.execute("INSERT INTO t VALUES (3)");
    x.execute("INSERT INTO t VALUES (4)");
    wait_for_catchup(&c);
    assert!(assert_same_everywhere(&c, "t").starts_with("4:"));
    // Parting node3 works through the role too, and leaves nothing for it.
    a.execute("SELECT bdr.part('node3')");
    for n in [a, b] {
        assert_eq!(slots_for(n, "node3"), 0, "{}", n.name());
    }
    b.execute("INSERT INTO t VALUES (5)");
    wait_until(
        "node1 to receive node2's row after the part",
        CATCHUP,
        || rows_in_t(a) == 5,
    );
}

/// Odd values of each argument type the `bdr.*` functions take.
fn odd_values(ty: &str) -> &'static [&'static str] {
    match ty {
        "text" => &[
            "''",
            "'x'",
            "repeat('x', 70000)",
            "'\"; DROP TABLE t; --'",
            "E'\\\\'",
            "'dbname=postgres host=/nonexistent'",
            "'host=127.0.0.1 port=1'",
            "'0/0'",
            "'zz/zz'",
            "'snowflake'",
            "'-1'",
        ],
        "integer" => &["(-1)", "0", "2147483647", "(-2147483647)"],
        "interval" => &["'-1 day'", "'0'", "'1000000 years'"],
        "regclass" => &["0", "'pg_class'", "'bdr.nodes'", "'t'", "'t_id_seq'"],
        "oid" => &["0", "4294967295", "1"],
        "text[]" => &[
            "'{}'",
            "'{NULL}'",
            "'{pg_class}'",
            "'{bdr.nodes}'",
            "array_fill('x'::text, ARRAY[3000])",
        ],
        "pg_lsn" => &["'0/0'", "'FFFFFFFF/FFFFFFFF'"],
        _ => &["NULL"],
    }
}

/// A harmless value of each argument type, for the arguments not under test.
fn plain_value(ty: &str) -> &'static str {
    match ty {
        "text" => "'x'",
        "integer" => "1",
        "interval" => "'1 day'",
        "regclass" => "'pg_class'",
        "oid" => "0",
        "text[]" => "'{}'",
        "pg_lsn" => "'0/0'",
        _ => "NULL",
    }
}

/// Every call of every `bdr.*` function (not the trigger functions) with all arguments
/// NULL, and with each argument in turn given each odd value of its type.
fn odd_calls(n: &Node) -> Vec<String> {
    let mut calls = Vec::new();
    let mut c = n.connect();
    let funcs = c
        .query(
            "SELECT proname::text, \
                    coalesce(array_agg(format_type(t, NULL) ORDER BY i) \
                               FILTER (WHERE t IS NOT NULL), '{}') \
               FROM pg_proc p LEFT JOIN LATERAL unnest(p.proargtypes::oid[]) \
                                       WITH ORDINALITY AS a(t, i) ON true \
              WHERE pronamespace = 'bdr'::regnamespace \
                AND prorettype NOT IN ('trigger'::regtype, 'event_trigger'::regtype) \
              GROUP BY p.oid, proname",
            &[],
        )
        .unwrap();
    assert!(funcs.len() > 30, "bdr's functions: {}", funcs.len());
    for f in funcs {
        let name: String = f.get(0);
        let types: Vec<String> = f.get(1);
        let call = |args: &[String]| format!("SELECT bdr.{name}({})", args.join(", "));
        let nulls: Vec<String> = types.iter().map(|t| format!("NULL::{t}")).collect();
        calls.push(call(&nulls));
        for (i, t) in types.iter().enumerate() {
            for v in odd_values(t) {
                let mut args: Vec<String> = types
                    .iter()
                    .map(|t| format!("{}::{t}", plain_value(t)))
                    .collect();
                args[i] = format!("{v}::{t}");
                calls.push(call(&args));
            }
        }
    }
    calls
}

/// Run every odd call on `n` as `role`; return what is wrong (a lost session, an internal
/// error, an error without a hint from bdr's own code).
fn odd_call_problems(n: &Node, role: &str, calls: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut c = n.connect_as(role);
    c.batch_execute("SET statement_timeout = '10s'").unwrap();
    for sql in calls {
        match c.batch_execute(sql) {
            Ok(()) => {}
            Err(e) => {
                let Some(db) = e.as_db_error() else {
                    problems.push(format!("{sql}: the session was lost: {e}"));
                    c = n.connect_as(role);
                    c.batch_execute("SET statement_timeout = '10s'").unwrap();
                    continue;
                };
                let code = db.code().code();
                // XX000: an internal error (a pgrx panic, an SPI misuse); 57014: a call
                // that outlived the statement timeout.
                let internal = code == "XX000" || code == "57014";
                let bdr_without_hint = db.message().starts_with("bdr") && db.hint().is_none();
                if internal || bdr_without_hint {
                    problems.push(format!("{sql}: {}", db_error_text(&e)));
                }
            }
        }
    }
    problems
}

/// Nothing a DBA or an application types at a `bdr.*` function crashes the server or
/// leaks an internal error: every function, called with NULLs and odd values of each
/// argument (empty, huge, quoted, out of range, OID 0, arrays with NULL or thousands of
/// elements), on a member and on a database that is in no group, answers with a result
/// or a clear error (a hint where the error is bdr's own); a plain role gets
/// "permission denied" for every one of them.
#[test]
fn every_bdr_function_answers_odd_arguments_with_a_clear_error() {
    let c = Cluster::builder().name("sec_odd_args").nodes(3).start();
    create_app_role(&c);
    for n in c.nodes() {
        n.execute("CREATE EXTENSION bdr");
    }
    let (member, outsider) = (c.node(0), c.node(2));
    member.execute(&format!(
        "SELECT bdr.group_create('node1', '{}')",
        member.dsn()
    ));
    pg_test::bdr::join(c.node(1), member);
    member.execute("CREATE TABLE t (id bigserial PRIMARY KEY, v text)");
    outsider.execute("CREATE TABLE t (id bigserial PRIMARY KEY, v text)");
    let started: Vec<String> = c
        .nodes()
        .iter()
        .map(|n| n.query_scalar::<String>("SELECT pg_postmaster_start_time()::text"))
        .collect();

    let calls = odd_calls(member);
    assert!(calls.len() > 300, "{} calls", calls.len());
    let mut problems = odd_call_problems(member, "postgres", &calls);
    problems.extend(odd_call_problems(outsider, "postgres", &calls));

    // A plain role: refused at the schema (no USAGE on bdr), whatever the arguments.
    let mut app = member.connect_as("app");
    for sql in calls.iter().step_by(7) {
        let e = app
            .batch_execute(sql)
            .expect_err("a plain role may call no bdr function");
        let text = db_error_text(&e);
        if !text.contains("42501") {
            problems.push(format!("as app: {sql}: {text}"));
        }
    }
    assert!(
        problems.is_empty(),
        "{} calls went wrong:\n{}",
        problems.len(),
        problems.join("\n")
    );

    for (n, before) in c.nodes().iter().zip(&started) {
        assert_eq!(
            &n.query_scalar::<String>("SELECT pg_postmaster_start_time()::text"),
            before,
            "{} restarted",
            n.name()
        );
        assert!(
            !n.log().contains("was terminated by signal"),
            "{}: a process crashed",
            n.name()
        );
        assert!(n.forbidden_log_lines().is_empty(), "{}", n.name());
    }
    // The group still replicates.
    member.execute("INSERT INTO t (v) VALUES ('after')");
    wait_until("the row on node2", CATCHUP, || {
        c.node(1)
            .query_scalar::<i64>("SELECT count(*) FROM t WHERE v = 'after'")
            == 1
    });
}
