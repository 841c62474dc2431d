//! Foundation scenarios: the harness itself, crash/restart, and the extension's loading
//! errors (no preload, wrong wal_level, commit timestamps off).

use pg_test::{db_error_text, try_wait_until, wait_until, Cluster};
use std::time::Duration;

#[test]
fn three_nodes_kill9_and_restart() {
    let c = Cluster::builder().name("kill9").nodes(3).start();
    for n in c.nodes() {
        n.execute("CREATE EXTENSION bdr");
    }
    let n2 = c.node(1);
    n2.execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (42);");
    n2.kill9();
    assert!(!n2.is_running());
    assert!(
        postgres::Client::connect(&n2.dsn(), postgres::NoTls).is_err(),
        "a killed node must refuse connections"
    );
    // The other nodes are unaffected.
    assert_eq!(c.node(0).query_scalar::<i32>("SELECT 1"), 1);
    n2.start();
    assert!(n2.is_running());
    assert_eq!(
        n2.query_scalar::<i32>("SELECT id FROM t"),
        42,
        "committed row survives crash recovery"
    );
    assert!(n2.log().contains("database system was interrupted"));
}

#[test]
fn wait_until_times_out() {
    let r = try_wait_until(
        "something that never happens",
        Duration::from_millis(200),
        || false,
    );
    let e = r.unwrap_err();
    assert!(e.contains("something that never happens"), "{e}");
    let caught = std::panic::catch_unwind(|| {
        wait_until("never", Duration::from_millis(100), || false);
    });
    assert!(caught.is_err(), "wait_until must panic on timeout");
}

#[test]
fn try_start_reports_failure() {
    let c = Cluster::builder().name("badconf").nodes(1).start();
    let n = c.node(0);
    n.stop();
    n.set_conf("shared_buffers", "'nonsense'");
    let e = n.try_start().unwrap_err();
    assert!(e.contains("shared_buffers"), "{e}");
}

#[test]
fn create_extension_without_preload_fails_with_hint() {
    let c = Cluster::builder()
        .name("nopreload")
        .nodes(1)
        .preload_bdr(false)
        .start();
    let err = c.node(0).try_execute("CREATE EXTENSION bdr").unwrap_err();
    let text = db_error_text(&err);
    assert!(
        text.contains("bdr must be loaded via shared_preload_libraries"),
        "{text}"
    );
    assert!(
        text.contains("HINT: Add bdr to shared_preload_libraries"),
        "{text}"
    );
    // Nothing was created.
    let n: i64 = c
        .node(0)
        .query_scalar("SELECT count(*) FROM pg_extension WHERE extname = 'bdr'");
    assert_eq!(n, 0);
}

#[test]
fn wrong_wal_level_is_reported_with_hint() {
    let c = Cluster::builder()
        .name("walrep")
        .nodes(1)
        .conf("wal_level", "replica")
        .conf("max_wal_senders", "10")
        .start();
    let n = c.node(0);
    let log = n.log();
    assert!(
        log.contains("WARNING:  bdr requires wal_level = logical (it is \"replica\")"),
        "{log}"
    );
    assert!(
        log.contains("HINT:  Set wal_level = logical in postgresql.conf and restart PostgreSQL."),
        "{log}"
    );
    // Replication entry points refuse with the same message.
    n.execute("CREATE EXTENSION bdr");
    let err = n
        .try_execute("SELECT bdr.check_replication_config()")
        .unwrap_err();
    let text = db_error_text(&err);
    assert!(text.contains("bdr requires wal_level = logical"), "{text}");
    assert!(text.contains("HINT: Set wal_level = logical"), "{text}");
}

#[test]
fn commit_timestamps_off_is_reported_with_hint() {
    let c = Cluster::builder()
        .name("nocommitts")
        .nodes(1)
        .conf("track_commit_timestamp", "off")
        .start();
    let n = c.node(0);
    assert!(n.log().contains("bdr requires track_commit_timestamp = on"));
    n.execute("CREATE EXTENSION bdr");
    let err = n
        .try_execute("SELECT bdr.check_replication_config()")
        .unwrap_err();
    let text = db_error_text(&err);
    assert!(
        text.contains("bdr requires track_commit_timestamp = on"),
        "{text}"
    );
    assert!(
        text.contains("HINT: Set track_commit_timestamp = on"),
        "{text}"
    );
    // A correctly configured node passes the check.
    let ok = Cluster::builder().name("committs-ok").nodes(1).start();
    ok.node(0)
        .execute("CREATE EXTENSION bdr; SELECT bdr.check_replication_config();");
}

/// Docs are part of the feature: every `bdr.*` setting is described in docs/settings.md,
/// every function of schema `bdr` in docs/sql.md (internal ones in its "Internal
/// functions" section), and every table or view of schema `bdr` somewhere in docs/.
#[test]
fn every_bdr_setting_function_and_relation_is_documented() {
    let c = Cluster::builder().name("docs").nodes(1).start();
    let n = c.node(0);
    n.execute("CREATE EXTENSION bdr");
    let docs = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let read = |f: &str| std::fs::read_to_string(docs.join(f)).unwrap();
    let all: String = std::fs::read_dir(&docs)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default())
        .collect();
    let (settings, sql) = (read("settings.md"), read("sql.md"));
    let names = |q: &str| -> Vec<String> {
        n.connect()
            .query(q, &[])
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect()
    };
    let mut missing = Vec::new();
    for g in names("SELECT name FROM pg_settings WHERE name LIKE 'bdr.%'") {
        if !settings.contains(&format!("`{g}`")) {
            missing.push(format!("setting {g} (docs/settings.md)"));
        }
    }
    for f in
        names("SELECT DISTINCT proname::text FROM pg_proc WHERE pronamespace = 'bdr'::regnamespace")
    {
        if !sql.contains(&format!("bdr.{f}(")) {
            missing.push(format!("function bdr.{f} (docs/sql.md)"));
        }
    }
    for r in names(
        "SELECT relname::text FROM pg_class WHERE relnamespace = 'bdr'::regnamespace \
         AND relkind IN ('r', 'v', 'p')",
    ) {
        if !all.contains(&format!("bdr.{r}")) {
            missing.push(format!("relation bdr.{r} (docs/)"));
        }
    }
    assert!(missing.is_empty(), "undocumented: {missing:#?}");
}
