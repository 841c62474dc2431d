//! The harness itself, without the bdr extension: default configuration, lifecycle
//! (stop, start, restart, immediate stop, SIGKILL and crash recovery), ports, clean-up and
//! failure evidence, and the `bdr-cluster` tool. These pass whatever state the extension
//! is in, so a harness regression is told apart from an extension one.

use pg_test::{free_port, is_root, wait_until, Cluster, Node};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

fn show(n: &Node, setting: &str) -> String {
    n.query_scalar(&format!("SELECT current_setting('{setting}')"))
}

#[test]
fn defaults_and_lifecycle() {
    let c = Cluster::builder()
        .name("harness")
        .nodes(2)
        .preload_bdr(false)
        .conf("work_mem", "'5MB'")
        .start();
    let dir = c.dir().to_path_buf();
    assert!(dir.exists());
    let (a, b) = (c.node(0), c.node(1));
    assert_eq!((a.name(), b.name()), ("node1", "node2"));
    assert_ne!(a.port(), b.port());
    for n in c.nodes() {
        assert_eq!(show(n, "wal_level"), "logical");
        assert_eq!(show(n, "track_commit_timestamp"), "on");
        assert_eq!(show(n, "fsync"), "on");
        assert_eq!(show(n, "synchronous_commit"), "on");
        assert_eq!(show(n, "max_replication_slots"), "20");
        assert_eq!(show(n, "max_wal_senders"), "20");
        assert_eq!(show(n, "max_worker_processes"), "32");
        assert_eq!(show(n, "listen_addresses"), "127.0.0.1");
        assert_eq!(show(n, "port"), n.port().to_string());
        assert_eq!(show(n, "shared_preload_libraries"), "");
        assert_eq!(
            show(n, "work_mem"),
            "5MB",
            "builder conf overrides defaults"
        );
        let sock = show(n, "unix_socket_directories");
        assert!(sock.len() < 100, "{sock}");
        if pg_test::has_output_plugin_libraries() {
            assert_eq!(
                show(n, "output_plugin_libraries"),
                "pgoutput, test_decoding, bdr"
            );
        }
        assert_eq!(
            n.query_scalar::<String>("SELECT current_database()"),
            "bdrtest"
        );
        assert!(n.log_path().starts_with(&dir) && n.log_path().exists());
        assert!(n.psql_cmd().contains(&format!("port={}", n.port())));
        assert!(n.is_running());
        // Servers never run as root.
        let pid = n.postmaster_pid().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        if is_root() {
            assert!(uid.split_whitespace().nth(2) != Some("0"), "{uid}");
        }
    }

    // set_conf + reload.
    a.set_conf("work_mem", "'7MB'");
    a.reload();
    wait_until("work_mem to be reloaded", Duration::from_secs(10), || {
        show(a, "work_mem") == "7MB"
    });

    // Clean stop and start: no recovery.
    a.execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1);");
    a.stop();
    assert!(!a.is_running());
    assert!(postgres::Client::connect(&a.dsn(), postgres::NoTls).is_err());
    a.start();
    assert_eq!(a.query_scalar::<i64>("SELECT count(*) FROM t"), 1);
    a.restart();
    assert!(a.is_running());

    // Immediate stop: the next start recovers.
    a.execute("INSERT INTO t VALUES (2)");
    a.stop_immediate();
    assert!(!a.is_running());
    a.start();
    assert_eq!(a.query_scalar::<i64>("SELECT count(*) FROM t"), 2);
    assert!(a.log().contains("database system was interrupted"));

    // try_execute returns the error; db_error_text renders it.
    let e = a.try_execute("SELECT 1/0").unwrap_err();
    let text = pg_test::db_error_text(&e);
    assert!(
        text.starts_with("ERROR: division by zero (SQLSTATE 22012)"),
        "{text}"
    );

    drop(c);
    if std::env::var("BDR_TEST_KEEP").as_deref() != Ok("1") {
        assert!(
            !dir.exists(),
            "{} removed after a passing test",
            dir.display()
        );
    }
}

#[test]
fn kill9_crash_recovery() {
    let c = Cluster::builder()
        .name("kill9-nobdr")
        .nodes(3)
        .preload_bdr(false)
        .start();
    let n2 = c.node(1);
    n2.execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (42);");
    let pid = n2.postmaster_pid().unwrap();
    n2.kill9();
    wait_until("node2 to be down", Duration::from_secs(10), || {
        !n2.is_running()
    });
    assert!(postgres::Client::connect(&n2.dsn(), postgres::NoTls).is_err());
    assert!(
        n2.datadir().join("postmaster.pid").exists(),
        "a crash leaves postmaster.pid behind"
    );
    // The others are unaffected.
    assert_eq!(c.node(0).query_scalar::<i32>("SELECT 1"), 1);
    assert_eq!(c.node(2).query_scalar::<i32>("SELECT 1"), 1);
    n2.start();
    assert!(n2.is_running());
    assert_ne!(n2.postmaster_pid(), Some(pid));
    assert_eq!(n2.query_scalar::<i32>("SELECT id FROM t"), 42);
    let log = n2.log();
    assert!(log.contains("database system was interrupted"), "{log}");
    assert!(log.contains("redo starts"), "{log}");
}

#[test]
fn failed_test_keeps_directory_and_stops_nodes() {
    let (tx, rx) = std::sync::mpsc::channel();
    let r = std::thread::spawn(move || {
        let c = Cluster::builder()
            .name("kept")
            .nodes(1)
            .preload_bdr(false)
            .start();
        let pid = c.node(0).postmaster_pid().unwrap();
        tx.send((c.dir().to_path_buf(), pid)).unwrap();
        panic!("deliberate failure to test the harness's clean-up");
    })
    .join();
    assert!(r.is_err());
    let (dir, pid): (PathBuf, i32) = rx.recv().unwrap();
    assert!(
        dir.join("node1/server.log").exists(),
        "kept {}",
        dir.display()
    );
    wait_until("the node to be stopped", Duration::from_secs(10), || {
        pg_test::is_zombie(pid)
    });
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn port_taken_at_start_is_retried_and_base_port_falls_back() {
    // Something else listens on the port the node is configured with: its first start
    // fails with "could not bind" and the harness retries on another port.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = taken.local_addr().unwrap().port();
    let c = Cluster::builder()
        .name("portrace")
        .nodes(1)
        .preload_bdr(false)
        .conf("port", &p.to_string())
        .start();
    assert_ne!(c.node(0).port(), p);
    assert_eq!(show(c.node(0), "port"), c.node(0).port().to_string());
    assert!(c.node(0).log().contains("could not bind"));

    // A taken base port is skipped.
    let p2 = free_port();
    let _hold = TcpListener::bind(("127.0.0.1", p2)).unwrap();
    let c2 = Cluster::builder()
        .name("baseport")
        .nodes(1)
        .preload_bdr(false)
        .base_port(p2)
        .start();
    assert_ne!(c2.node(0).port(), p2);
    assert_eq!(c2.node(0).query_scalar::<i32>("SELECT 1"), 1);
}

#[test]
fn parallel_clusters_do_not_collide() {
    let handles: Vec<_> = (0..3)
        .map(|i| {
            std::thread::spawn(move || {
                let c = Cluster::builder()
                    .name(&format!("par{i}"))
                    .nodes(1)
                    .preload_bdr(false)
                    .start();
                let port = c.node(0).port();
                assert_eq!(show(c.node(0), "port"), port.to_string());
                (port, c.dir().to_path_buf())
            })
        })
        .collect();
    let mut results: Vec<(u16, PathBuf)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    results.sort();
    results.dedup_by(|a, b| a.0 == b.0 || a.1 == b.1);
    assert_eq!(results.len(), 3, "distinct ports and directories");
}

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bdr-cluster"))
        .args(args)
        .output()
        .expect("run bdr-cluster")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn bdr_cluster_tool() {
    let dir = std::env::temp_dir().join(format!("bdr-cli-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let base = free_port();
    let out = cli(&[
        "start",
        "--dir",
        d,
        "--nodes",
        "2",
        "--no-preload",
        "--base-port",
        &base.to_string(),
    ]);
    let text = stdout(&out);
    let cleanup = || {
        cli(&["stop", "--dir", d]);
        let _ = std::fs::remove_dir_all(&dir);
    };
    if !out.status.success() {
        cleanup();
        panic!(
            "start failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let result = std::panic::catch_unwind(|| {
        assert!(text.contains("node1") && text.contains("node2"), "{text}");
        assert!(
            text.contains("psql \"host=127.0.0.1 port=") && text.contains("dbname=bdrdemo"),
            "{text}"
        );
        let state = std::fs::read_to_string(dir.join("nodes.txt")).unwrap();
        assert_eq!(state.lines().count(), 2, "{state}");

        let st = stdout(&cli(&["status", "--dir", d]));
        assert_eq!(st.matches("running (pid").count(), 2, "{st}");

        let o = cli(&[
            "sql",
            "--dir",
            d,
            "--node",
            "node2",
            "SELECT 1 AS one, 'x'::text AS longer_name, NULL AS n, current_database() AS db",
        ]);
        assert!(o.status.success());
        let t = stdout(&o);
        assert!(t.contains("one | longer_name | n | db"), "{t}");
        assert!(t.contains("bdrdemo"), "{t}");
        assert!(t.contains("(1 row)"), "{t}");

        let o = cli(&["sql", "--dir", d, "--node", "node1", "SELECT 1/0"]);
        assert_eq!(o.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&o.stderr).contains("division by zero"));

        // Starting again while it runs is refused.
        let o = cli(&["start", "--dir", d, "--nodes", "2", "--no-preload"]);
        assert_eq!(o.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&o.stderr).contains("still running"));

        let o = cli(&["stop", "--dir", d]);
        assert!(o.status.success());
        assert_eq!(stdout(&o).matches("stopped").count(), 2, "{}", stdout(&o));
        let st = stdout(&cli(&["status", "--dir", d]));
        assert_eq!(st.matches("stopped").count(), 2, "{st}");

        let o = cli(&["sql", "--dir", d, "--node", "node1", "SELECT 1"]);
        assert_eq!(o.status.code(), Some(1));
    });
    cleanup();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
