//! Synchronous commit for critical data (issue 15): with `bdr.synchronous_commit_peers`,
//! a COMMIT that returned is on the peer even when the origin dies right after; with the
//! peer down the COMMIT waits up to `bdr.synchronous_commit_timeout` and says so.

use pg_test::{bdr, wait_until, Cluster, Node};
use std::time::{Duration, Instant};

fn two_nodes(name: &str) -> Cluster {
    // The peer's apply worker reconnects within a second of the origin coming back.
    let c = Cluster::builder()
        .name(name)
        .nodes(2)
        .conf("bdr.apply_retry_max_delay", "'1s'")
        .start();
    // Roles are per server, not replicated: the application role exists everywhere first.
    for n in c.nodes() {
        n.execute("CREATE ROLE app LOGIN");
    }
    bdr::form_group(&c);
    c.node(0).execute(
        "GRANT CREATE ON SCHEMA public TO app; GRANT USAGE ON SCHEMA bdr TO app; \
         CREATE TABLE t (id int PRIMARY KEY, v text); GRANT ALL ON t TO app;",
    );
    wait_until("t and app on node2", bdr::CATCHUP, || {
        c.node(1).query_scalar::<bool>(
            "SELECT to_regclass('public.t') IS NOT NULL \
             AND has_table_privilege('app', 'public.t', 'INSERT')",
        )
    });
    c
}

fn has_row(n: &Node, id: i32) -> bool {
    n.query_scalar(&format!("SELECT count(*) = 1 FROM t WHERE id = {id}"))
}

fn last_sync(client: &mut postgres::Client) -> (String, i32, i32, f64) {
    let r = client
        .query_one(
            "SELECT status, peers_wanted, peers_confirmed, wait_ms FROM bdr.last_synchronous_commit()",
            &[],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

#[test]
fn a_confirmed_commit_survives_sigkill_of_its_origin_100_rounds() {
    let c = two_nodes("sync_kill");
    let (a, b) = (c.node(0), c.node(1));
    let rounds = 100;
    let mut missing = Vec::new();
    let start = Instant::now();
    for round in 0..rounds {
        let mut app = a.connect_as("app");
        app.batch_execute(
            "SET bdr.synchronous_commit_peers = 1; SET bdr.synchronous_commit_timeout = 0",
        )
        .unwrap();
        app.execute("INSERT INTO t VALUES ($1, 'critical')", &[&round])
            .unwrap();
        // The COMMIT returned: the origin dies at once (postmaster and every backend).
        a.kill9();
        if !has_row(b, round) {
            missing.push(round);
        }
        a.start();
    }
    println!(
        "{rounds} rounds of commit + SIGKILL of the origin in {:.1?}; missing on the peer: {missing:?}",
        start.elapsed()
    );
    assert!(missing.is_empty(), "rows missing on node2: {missing:?}");
    // The outcome is reported, and the group is whole afterwards.
    let mut app = a.connect_as("app");
    app.batch_execute("SET bdr.synchronous_commit_peers = 1")
        .unwrap();
    app.execute("INSERT INTO t VALUES (1000, 'last')", &[])
        .unwrap();
    let (status, wanted, confirmed, _) = last_sync(&mut app);
    assert_eq!((status.as_str(), wanted, confirmed), ("confirmed", 1, 1));
    assert!(has_row(b, 1000));
    bdr::wait_for_catchup(&c);
    bdr::assert_same_everywhere(&c, "t");
}

#[test]
fn with_the_peer_down_a_synchronous_commit_waits_for_the_timeout_and_says_so() {
    let c = two_nodes("sync_down");
    let (a, b) = (c.node(0), c.node(1));
    let mut app = a.connect_as("app");
    // Nothing asked, nothing waited.
    app.execute("INSERT INTO t VALUES (1, 'async')", &[])
        .unwrap();
    assert_eq!(last_sync(&mut app).0, "not_requested");
    // A transaction that writes nothing does not wait either (nor change the outcome).
    app.batch_execute("SET bdr.synchronous_commit_peers = 1")
        .unwrap();
    let t = Instant::now();
    app.batch_execute("SELECT count(*) FROM t").unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(last_sync(&mut app).0, "not_requested");
    // More peers than the group has: no wait, a WARNING, the outcome says why.
    app.batch_execute("SET bdr.synchronous_commit_peers = 2")
        .unwrap();
    let t = Instant::now();
    app.execute("INSERT INTO t VALUES (2, 'two peers')", &[])
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(last_sync(&mut app).0, "too_few_peers");
    wait_until("row 2 on node2", bdr::CATCHUP, || has_row(b, 2));

    b.kill9();
    app.batch_execute(
        "SET bdr.synchronous_commit_peers = 1; SET bdr.synchronous_commit_timeout = '2s'",
    )
    .unwrap();
    let t = Instant::now();
    app.execute("INSERT INTO t VALUES (3, 'peer down')", &[])
        .unwrap();
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(20),
        "{waited:?}"
    );
    let (status, wanted, confirmed, wait_ms) = last_sync(&mut app);
    assert_eq!((status.as_str(), wanted, confirmed), ("timed_out", 1, 0));
    assert!(wait_ms >= 2000.0, "{wait_ms}");
    // Committed here all the same, and the WARNING names the peer that did not confirm.
    assert!(has_row(a, 3));
    a.wait_for_log(
        "synchronous commit not confirmed after",
        Duration::from_secs(10),
    );
    assert!(
        a.log().contains("Not confirmed by: node2"),
        "{}",
        a.log_tail(20)
    );

    // A cancel ends a wait without a limit; the transaction stays committed.
    app.batch_execute("SET bdr.synchronous_commit_timeout = 0")
        .unwrap();
    let pid: i32 = app
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    let canceller = {
        let dsn = a.dsn();
        std::thread::spawn(move || {
            let mut admin = postgres::Client::connect(&dsn, postgres::NoTls).unwrap();
            wait_until("the commit to wait", Duration::from_secs(30), || {
                admin
                    .query_one(
                        "SELECT count(*) = 1 FROM pg_stat_activity WHERE pid = $1 \
                         AND wait_event_type = 'Extension'",
                        &[&pid],
                    )
                    .unwrap()
                    .get(0)
            });
            admin
                .execute("SELECT pg_cancel_backend($1)", &[&pid])
                .unwrap();
        })
    };
    app.execute("INSERT INTO t VALUES (4, 'cancelled wait')", &[])
        .unwrap();
    canceller.join().unwrap();
    assert_eq!(last_sync(&mut app).0, "canceled");
    assert!(has_row(a, 4));

    // The peer comes back: what was committed reaches it, and commits confirm again.
    b.start();
    app.batch_execute("SET bdr.synchronous_commit_timeout = '60s'")
        .unwrap();
    app.execute("INSERT INTO t VALUES (5, 'peer back')", &[])
        .unwrap();
    assert_eq!(last_sync(&mut app).0, "confirmed");
    for id in 1..=5 {
        assert!(has_row(b, id), "row {id} on node2");
    }
    bdr::assert_same_everywhere(&c, "t");
}

/// The SQLSTATE, message and hint of a failed statement.
fn failure(r: Result<impl Sized, postgres::Error>) -> (String, String, String) {
    let e = r.err().expect("the statement should have failed");
    let db = e.as_db_error().expect("a server error");
    (
        db.code().code().to_string(),
        db.message().to_string(),
        db.hint().unwrap_or_default().to_string(),
    )
}

#[test]
fn wait_slot_confirm_lsn_returns_once_the_peer_has_applied_and_not_before() {
    let c = two_nodes("sync_wait_slot");
    let (a, b) = (c.node(0), c.node(1));
    let mut app = a.connect_as("app");
    // A plain role may wait: after each commit, the row is on node2 the moment the wait
    // returns (no poll).
    for id in 1..=20 {
        app.execute("INSERT INTO t VALUES ($1, 'waited')", &[&id])
            .unwrap();
        app.batch_execute("SELECT bdr.wait_slot_confirm_lsn()")
            .unwrap();
        assert!(has_row(b, id), "row {id} not on node2 after the wait");
    }
    // While node2 applies nothing, the wait does not return: statement_timeout ends it
    // with the usual ERROR, and the session goes on.
    pg_test::bdr::pause_apply(b);
    app.execute("INSERT INTO t VALUES (100, 'paused')", &[])
        .unwrap();
    let target: String = app
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .unwrap()
        .get(0);
    app.batch_execute("SET statement_timeout = '2s'").unwrap();
    let t = Instant::now();
    let (code, msg, _) = failure(app.batch_execute("SELECT bdr.wait_slot_confirm_lsn()"));
    assert_eq!(code, "57014", "{msg}");
    assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(!has_row(b, 100), "applied while paused");
    // The slot by name and an explicit target: returns once node2 resumes.
    let slot: String = a.query_scalar(
        "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name LIKE 'bdr\\_%' \
          AND database = current_database()",
    );
    app.batch_execute("SET statement_timeout = '60s'").unwrap();
    let waiter = std::thread::spawn({
        let client = a.connect_as("app");
        let slot = slot.clone();
        let target = target.clone();
        move || {
            let mut w = client;
            let t = Instant::now();
            w.execute(
                "SELECT bdr.wait_slot_confirm_lsn($1, $2::text::pg_lsn)",
                &[&slot, &target],
            )
            .map(|_| t.elapsed())
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !waiter.is_finished(),
        "the wait returned while node2 was paused"
    );
    b.execute("SELECT bdr.apply_resume()");
    let waited = waiter.join().unwrap().unwrap();
    assert!(has_row(b, 100), "row 100 not on node2 after the wait");
    assert!(waited < Duration::from_secs(30), "{waited:?}");

    // Bad calls: an ERROR with a hint, nothing waited for.
    let (code, msg, hint) = failure(app.batch_execute(
        "BEGIN; INSERT INTO t VALUES (200, 'uncommitted'); SELECT bdr.wait_slot_confirm_lsn()",
    ));
    assert_eq!(code, "25001", "{msg}");
    assert!(hint.contains("COMMIT first"), "{hint}");
    app.batch_execute("ROLLBACK").unwrap();
    let (code, msg, hint) =
        failure(app.batch_execute("SELECT bdr.wait_slot_confirm_lsn('no_such_slot')"));
    assert_eq!(code, "42704", "{msg}");
    assert!(
        msg.contains("no_such_slot") && hint.contains("pg_replication_slots"),
        "{msg} / {hint}"
    );
    // Read-only work before it in the same transaction is fine.
    app.batch_execute("BEGIN; SELECT count(*) FROM t; SELECT bdr.wait_slot_confirm_lsn(); COMMIT")
        .unwrap();
    // In apply (a trigger node2's DBA enabled for replicated rows) it is an ERROR: the
    // apply worker stops with it and retries, it does not wait for its own peers.
    // (node2's own: not replicated.)
    b.execute(
        "SET bdr.ddl_replication = off; \
         CREATE FUNCTION waits() RETURNS trigger LANGUAGE plpgsql AS \
           $$BEGIN PERFORM bdr.wait_slot_confirm_lsn(); RETURN NEW; END$$; \
         CREATE TRIGGER waits BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION waits(); \
         ALTER TABLE t ENABLE ALWAYS TRIGGER waits;",
    );
    app.execute("INSERT INTO t VALUES (300, 'through the trigger')", &[])
        .unwrap();
    wait_until("the apply error on node2", bdr::CATCHUP, || {
        b.query_scalar::<bool>(
            "SELECT coalesce(bool_or(last_error LIKE '%waits only in client sessions%'), false) \
               FROM bdr.apply_workers()",
        )
    });
    assert!(!has_row(b, 300));
    b.execute("SET bdr.ddl_replication = off; DROP TRIGGER waits ON t");
    app.batch_execute("SELECT bdr.wait_slot_confirm_lsn()")
        .unwrap();
    assert!(
        has_row(b, 300),
        "row 300 not on node2 after the trigger was dropped"
    );
    for n in [a, b] {
        assert!(n.forbidden_log_lines().is_empty(), "{}", n.log_tail(30));
    }
}
