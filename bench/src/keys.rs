//! `bdr-bench keys` (`make bench-keys`): ids per second from `bdr.snowflake_nextval` vs
//! plain `nextval` on one node, in one session and in two at once.
//!
//! Why in one statement per session: the id generator's own cost is what is measured, not
//! the round trips; best of 3 runs because the machine is shared.

use crate::scale;
use pg_test::{Cluster, Node};
use std::time::Instant;

/// Ids per second of `expr` (`nextval('s')` or `bdr.snowflake_nextval('s')`) drawn by
/// `sessions` sessions at once, each `n` ids in one statement; best of 3 runs.
fn ids_per_sec(node: &Node, expr: &str, n: i64, sessions: usize) -> f64 {
    let sql = format!("SELECT count({expr}) FROM generate_series(1, {n})");
    let mut best = f64::MAX;
    for _ in 0..3 {
        let mut clients: Vec<_> = (0..sessions).map(|_| node.connect()).collect();
        let start = Instant::now();
        std::thread::scope(|s| {
            for c in clients.iter_mut() {
                let sql = &sql;
                s.spawn(move || {
                    let got: i64 = c.query_one(sql.as_str(), &[]).unwrap().get(0);
                    assert_eq!(got, n);
                });
            }
        });
        best = best.min(start.elapsed().as_secs_f64());
    }
    (n as f64 * sessions as f64) / best
}

/// `bdr-bench keys`: snowflake ids vs nextval on one node.
pub fn keys_bench() {
    let c = Cluster::builder()
        .name("bench-keys")
        .nodes(1)
        .conf("shared_buffers", "'256MB'")
        .start();
    let a = c.node(0);
    a.execute("CREATE EXTENSION bdr; CREATE SEQUENCE s; CREATE SEQUENCE l;");
    a.execute(&format!("SELECT bdr.group_create('node1', '{}')", a.dsn()));
    let n = (1_000_000.0 * scale()) as i64;
    // Warm up (first call builds the shared slot and persists a floor).
    a.execute("SELECT count(bdr.snowflake_nextval('s')) FROM generate_series(1, 1000)");
    let mut out = format!(
        "Machine: {} cores; {n} ids per session, best of 3\n\n\
         | sessions | nextval ids/s | snowflake_nextval ids/s | ratio snowflake / nextval |\n\
         |---|---|---|---|\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    for sessions in [1, 2] {
        let plain = ids_per_sec(a, "nextval('l')", n, sessions);
        let snow = ids_per_sec(a, "bdr.snowflake_nextval('s')", n, sessions);
        out.push_str(&format!(
            "| {sessions} | {plain:.0} | {snow:.0} | {:.2} |\n",
            snow / plain
        ));
    }
    // Every id handed out is distinct and they increase: nothing was reissued.
    let dup: i64 = a.query_scalar(
        "SELECT count(*) - count(DISTINCT v) FROM \
           (SELECT bdr.snowflake_nextval('s') AS v FROM generate_series(1, 100000)) x",
    );
    assert_eq!(dup, 0);
    println!("{out}");
}
