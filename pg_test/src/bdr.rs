//! bdr-specific helpers for scenarios: form a group, wait for replication to catch up,
//! compare tables across nodes.

use crate::{db_error_text, try_wait_until, Cluster, ClusterBuilder, Node, Proxy};
use std::time::Duration;

/// How long a scenario waits for replication before failing.
pub const CATCHUP: Duration = Duration::from_secs(60);

/// CREATE EXTENSION on every node, group_create on the first, group_join of the others
/// (each through the first), waiting for each join to complete.
pub fn form_group(c: &Cluster) {
    form_group_with(c, Node::dsn);
}

/// The scenario most apply tests start from: a login role `app` on every node, the group
/// formed, and a table `t (id int PRIMARY KEY, v text)` created on the first node (DDL
/// replication takes it everywhere) with every right on it granted to `app`; returns once
/// `t` exists on every node.
pub fn form_group_with_app_table(c: &Cluster) {
    for n in c.nodes() {
        n.execute("CREATE ROLE app LOGIN");
    }
    form_group(c);
    c.node(0).execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text); GRANT ALL ON t TO app; \
         GRANT USAGE ON SCHEMA bdr TO app;",
    );
    for n in c.nodes() {
        crate::wait_until(&format!("t on {}", n.name()), CATCHUP, || {
            n.query_scalar::<bool>("SELECT to_regclass('public.t') IS NOT NULL")
        });
    }
}

/// [`form_group`] with each node's DSN given by `dsn` (e.g. [`Node::service_dsn`]).
pub fn form_group_with(c: &Cluster, dsn: fn(&Node) -> String) {
    for n in c.nodes() {
        n.execute("CREATE EXTENSION IF NOT EXISTS bdr");
    }
    let first = c.node(0);
    first.execute(&format!(
        "SELECT bdr.group_create(local_node_name := '{}', node_external_dsn := '{}')",
        first.name(),
        dsn(first)
    ));
    for n in &c.nodes()[1..] {
        join_with(n, first, dsn);
    }
}

/// group_join `n` through `via`, then wait_for_join.
pub fn join(n: &Node, via: &Node) {
    join_with(n, via, Node::dsn);
}

/// [`join`] with DSNs given by `dsn`.
pub fn join_with(n: &Node, via: &Node, dsn: fn(&Node) -> String) {
    n.execute(&format!(
        "SELECT bdr.group_join(local_node_name := '{}', node_external_dsn := '{}', join_using_dsn := '{}')",
        n.name(),
        dsn(n),
        dsn(via)
    ));
    n.execute("SELECT bdr.wait_for_join(120)");
}

/// Start a cluster whose nodes reach each other only through a [`Proxy`]: the builder gets
/// [`ClusterBuilder::service_files`], and each node's service file sends `service=nodeJ`
/// to the proxy's port for the link to node J. Form the group with
/// `form_group_with(&c, Node::service_dsn)`; node DSNs stored by bdr then name services.
pub fn proxied(builder: ClusterBuilder) -> (Cluster, Proxy) {
    use std::os::unix::fs::PermissionsExt;
    let c = builder.service_files().start();
    let ports: Vec<u16> = c.nodes().iter().map(|n| n.port()).collect();
    let proxy = Proxy::new(&ports);
    let names: Vec<&str> = c.nodes().iter().map(|n| n.name()).collect();
    for (i, n) in c.nodes().iter().enumerate() {
        let path = n.service_file_path();
        std::fs::write(&path, proxy.service_file(i, &names))
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    (c, proxy)
}

/// Wait until every node has applied from every other node everything that node had
/// flushed when this was called (bounded by [`CATCHUP`]).
pub fn wait_for_catchup(c: &Cluster) {
    wait_for_catchup_within(c, CATCHUP)
}

/// [`wait_for_catchup`] with another limit (e.g. a peer whose clock runs ahead is applied
/// only once the receiver's clock passes its commit times).
pub fn wait_for_catchup_within(c: &Cluster, limit: Duration) {
    let nodes: Vec<&Node> = c.nodes().iter().filter(|n| n.is_running()).collect();
    let targets: Vec<(String, String)> = nodes
        .iter()
        .map(|n| {
            (
                n.name().to_string(),
                n.query_scalar::<String>("SELECT pg_current_wal_flush_lsn()::text"),
            )
        })
        .collect();
    for n in &nodes {
        for (peer, lsn) in &targets {
            if peer == n.name() {
                continue;
            }
            let sql = format!(
                "SELECT coalesce((SELECT applied_lsn::pg_lsn >= '{lsn}'::pg_lsn \
                 FROM bdr.apply_workers() WHERE peer = '{peer}'), false)"
            );
            let mut client = n.connect();
            try_wait_until(
                &format!("{} to apply {peer} up to {lsn}", n.name()),
                limit,
                || {
                    client
                        .query_one(&sql, &[])
                        .map(|r| r.get::<_, bool>(0))
                        .unwrap_or(false)
                },
            )
            .unwrap_or_else(|e| {
                let workers = n
                    .connect()
                    .query(
                        "SELECT peer, state, applied_lsn, last_error FROM bdr.apply_workers()",
                        &[],
                    )
                    .map(|rows| {
                        rows.iter()
                            .map(|r| {
                                format!(
                                    "{} {} {} {:?}",
                                    r.get::<_, String>(0),
                                    r.get::<_, String>(1),
                                    r.get::<_, String>(2),
                                    r.get::<_, Option<String>>(3)
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .unwrap_or_else(|e| db_error_text(&e));
                panic!("{e}\napply workers on {}:\n{workers}", n.name())
            });
        }
    }
}

/// An ordered digest of a table's rows (md5 of every row's text form, in key order).
pub fn table_digest(n: &Node, table: &str) -> String {
    n.query_scalar(&format!(
        "SELECT count(*)::text || ':' || coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {table} t"
    ))
}

/// Apply errors since the servers started, summed over every node's workers
/// (`bdr.apply_workers().error_count`).
pub fn apply_errors(c: &Cluster) -> i64 {
    c.nodes()
        .iter()
        .map(|n| {
            n.query_scalar::<i64>(
                "SELECT coalesce(sum(error_count), 0)::int8 FROM bdr.apply_workers()",
            )
        })
        .sum()
}

/// Assert `table` is identical on every running node; returns the digest.
pub fn assert_same_everywhere(c: &Cluster, table: &str) -> String {
    let digests: Vec<(String, String)> = c
        .nodes()
        .iter()
        .filter(|n| n.is_running())
        .map(|n| (n.name().to_string(), table_digest(n, table)))
        .collect();
    for d in &digests[1..] {
        assert_eq!(
            d.1, digests[0].1,
            "{table} differs: {} has {}, {} has {}",
            d.0, d.1, digests[0].0, digests[0].1
        );
    }
    digests[0].1.clone()
}

/// How many tombstones `table` has on `n`.
pub fn tombstones(n: &Node, table: &str) -> i64 {
    n.query_scalar(&format!(
        "SELECT count(*) FROM bdr.tombstones WHERE relid = '{table}'::regclass"
    ))
}

/// Rows of bdr.conflict_history on `n` as (type, resolution, relation).
pub fn conflicts(n: &Node) -> Vec<(String, String, String)> {
    n.connect()
        .query(
            "SELECT conflict_type, conflict_resolution, relation FROM bdr.conflict_history ORDER BY conflict_id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Pause every apply worker of `n` (`bdr.apply_pause()`) and wait until there is one and
/// each says it is paused: a worker between its pause check and its next read could still
/// apply what arrives in that moment (right after a group forms, a worker may not be
/// registered yet; the pause holds it too once it starts).
pub fn pause_apply(n: &Node) {
    n.execute("SELECT bdr.apply_pause()");
    crate::wait_until(&format!("apply paused on {}", n.name()), CATCHUP, || {
        n.query_scalar::<bool>(
            "SELECT count(*) > 0 AND bool_and(state = 'paused') FROM bdr.apply_workers()",
        )
    });
}
