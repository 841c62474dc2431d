//! The monitoring integration a DBA wires in: `contrib/postgres_exporter/bdr.yaml` (queries
//! for postgres_exporter) and `contrib/prometheus/bdr-alerts.yml` (alerting rules).
//!
//! - Every exporter query runs on a live 2-node group as a role granted only `bdr_monitor`,
//!   returns rows, and has every column its `metrics` name, with a numeric type for
//!   gauges and counters and a text type for labels; on a healthy group the values say so.
//! - Every metric an alert uses is one the exporter produces (with the labels it matches
//!   on), and docs/prometheus.md describes every metric and every alert.

use pg_test::bdr::{form_group, wait_for_catchup, CATCHUP};
use pg_test::postgres::types::Type;
use pg_test::postgres::{Client, NoTls, SimpleQueryMessage};
use pg_test::{wait_until, Cluster, Node};
use serde_yaml::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

fn repo_file(rel: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[derive(Debug)]
struct Metric {
    column: String,
    usage: String,
}

#[derive(Debug)]
struct Query {
    namespace: String,
    sql: String,
    metrics: Vec<Metric>,
}

impl Query {
    fn labels(&self) -> BTreeSet<&str> {
        self.metrics
            .iter()
            .filter(|m| m.usage == "LABEL")
            .map(|m| m.column.as_str())
            .collect()
    }
    /// Prometheus metric names: `<namespace>_<column>` for each gauge and counter.
    fn metric_names(&self) -> Vec<String> {
        self.metrics
            .iter()
            .filter(|m| m.usage != "LABEL")
            .map(|m| format!("{}_{}", self.namespace, m.column))
            .collect()
    }
}

/// contrib/postgres_exporter/bdr.yaml, checked for the shape postgres_exporter reads.
fn exporter_queries() -> Vec<Query> {
    let doc: Value = serde_yaml::from_str(&repo_file("contrib/postgres_exporter/bdr.yaml"))
        .expect("bdr.yaml is YAML");
    let map = doc.as_mapping().expect("bdr.yaml: a mapping of namespaces");
    assert!(!map.is_empty(), "bdr.yaml defines no query");
    let mut out = Vec::new();
    for (k, v) in map {
        let ns = k.as_str().expect("namespace is a string").to_string();
        assert!(ns.starts_with("bdr_"), "{ns}: namespaces start with bdr_");
        let sql = v["query"]
            .as_str()
            .unwrap_or_else(|| panic!("{ns}: no query"))
            .to_string();
        let list = v["metrics"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{ns}: metrics is not a list"));
        let mut metrics = Vec::new();
        for m in list {
            let m = m.as_mapping().expect("metric entry is a mapping");
            assert_eq!(m.len(), 1, "{ns}: one column per metric entry: {m:?}");
            let (col, spec) = m.iter().next().unwrap();
            let column = col.as_str().expect("column name").to_string();
            let usage = spec["usage"]
                .as_str()
                .unwrap_or_else(|| panic!("{ns}.{column}: no usage"))
                .to_string();
            assert!(
                ["LABEL", "GAUGE", "COUNTER"].contains(&usage.as_str()),
                "{ns}.{column}: usage {usage}"
            );
            let desc = spec["description"].as_str().unwrap_or("");
            assert!(!desc.trim().is_empty(), "{ns}.{column}: no description");
            metrics.push(Metric { column, usage });
        }
        let q = Query {
            namespace: ns,
            sql,
            metrics,
        };
        assert!(!q.metric_names().is_empty(), "{}: only labels", q.namespace);
        out.push(q);
    }
    out
}

/// `name{label="x", other!~"y"}` in a PromQL expression: each `bdr_*` metric with the
/// label names it matches on.
fn promql_selectors(expr: &str) -> Vec<(String, Vec<String>)> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(off) = expr[i..].find("bdr_") {
        let start = i + off;
        let boundary =
            start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        i = end;
        if !boundary {
            continue;
        }
        let mut labels = Vec::new();
        if b.get(end) == Some(&b'{') {
            let close = expr[end..].find('}').expect("unclosed {") + end;
            for m in expr[end + 1..close].split(',') {
                let name: String = m
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    labels.push(name);
                }
            }
            i = close;
        }
        out.push((expr[start..end].to_string(), labels));
    }
    out
}

#[test]
fn alerts_use_only_exported_metrics_and_docs_name_them_all() {
    let queries = exporter_queries();
    // metric name -> the labels its series carry
    let mut exported: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for q in &queries {
        for name in q.metric_names() {
            let labels = q.labels().into_iter().map(String::from).collect();
            assert!(
                exported.insert(name.clone(), labels).is_none(),
                "{name} defined twice"
            );
        }
    }

    let rules: Value = serde_yaml::from_str(&repo_file("contrib/prometheus/bdr-alerts.yml"))
        .expect("bdr-alerts.yml is YAML");
    let mut alerts = Vec::new();
    let mut used = BTreeSet::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("alert name").to_string();
            let expr = rule["expr"].as_str().expect("expr");
            let sev = rule["labels"]["severity"].as_str().unwrap_or("");
            assert!(
                ["warning", "critical"].contains(&sev),
                "{name}: severity {sev:?}"
            );
            assert!(
                rule["annotations"]["summary"].as_str().is_some(),
                "{name}: no summary"
            );
            let sels = promql_selectors(expr);
            assert!(!sels.is_empty(), "{name}: uses no bdr metric: {expr}");
            for (metric, labels) in sels {
                let have = exported.get(&metric).unwrap_or_else(|| {
                    panic!("{name}: {metric} is not produced by bdr.yaml (have: {exported:?})")
                });
                for l in labels {
                    assert!(have.contains(&l), "{name}: {metric} has no label {l}");
                }
                used.insert(metric);
            }
            alerts.push(name);
        }
    }
    assert!(alerts.len() >= 8, "{alerts:?}");

    let doc = repo_file("docs/prometheus.md");
    for m in exported.keys() {
        assert!(
            doc.contains(m.as_str()),
            "docs/prometheus.md does not describe {m}"
        );
    }
    for a in &alerts {
        assert!(
            doc.contains(a.as_str()),
            "docs/prometheus.md does not describe alert {a}"
        );
    }
    println!(
        "{} metrics from {} queries; {} alerts using {} of them",
        exported.len(),
        queries.len(),
        alerts.len(),
        used.len()
    );
}

/// Column names and types, and the rows as text, of one query.
struct Answer {
    columns: Vec<(String, Type)>,
    rows: Vec<BTreeMap<String, Option<String>>>,
}

fn run(client: &mut Client, sql: &str) -> Result<Answer, String> {
    let stmt = client
        .prepare(sql)
        .map_err(|e| pg_test::db_error_text(&e))?;
    let columns = stmt
        .columns()
        .iter()
        .map(|c| (c.name().to_string(), c.type_().clone()))
        .collect();
    let rows = client
        .simple_query(sql)
        .map_err(|e| pg_test::db_error_text(&e))?
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_string(), r.get(i).map(String::from)))
                    .collect(),
            ),
            _ => None,
        })
        .collect();
    Ok(Answer { columns, rows })
}

const MONITOR_ROLE: &str = "bdr_exporter_probe";

/// A login role whose only privilege is membership in bdr_monitor, like the exporter's.
fn monitor_client(n: &Node) -> Client {
    n.execute(&format!(
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{MONITOR_ROLE}') THEN
             CREATE ROLE {MONITOR_ROLE} LOGIN;
           END IF;
         END $$;
         GRANT bdr_monitor TO {MONITOR_ROLE};"
    ));
    let dsn = format!(
        "host=127.0.0.1 port={} dbname={} user={MONITOR_ROLE}",
        n.port(),
        n.dbname()
    );
    let mut c = Client::connect(&dsn, NoTls)
        .unwrap_or_else(|e| panic!("{dsn}: {}", pg_test::db_error_text(&e)));
    let row = c
        .query_one(
            "SELECT r.rolsuper, r.rolreplication, r.rolbypassrls,
                    (SELECT array_agg(g.rolname::text ORDER BY g.rolname)
                       FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
                      WHERE m.member = r.oid)
               FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .unwrap();
    assert!(!row.get::<_, bool>(0) && !row.get::<_, bool>(1) && !row.get::<_, bool>(2));
    assert_eq!(
        row.get::<_, Option<Vec<String>>>(3),
        Some(vec!["bdr_monitor".to_string()]),
        "the probe role is a member of bdr_monitor only"
    );
    c
}

fn num(v: &Option<String>) -> f64 {
    v.as_deref()
        .map(|s| {
            s.parse::<f64>()
                .unwrap_or_else(|_| panic!("not a number: {s}"))
        })
        .unwrap_or(f64::NAN)
}

#[test]
fn every_exporter_query_runs_as_bdr_monitor_on_a_live_group() {
    let queries = exporter_queries();
    let c = Cluster::builder().name("exporter").nodes(2).start();
    for n in c.nodes() {
        n.execute("CREATE EXTENSION bdr");
    }
    c.node(0)
        .execute("CREATE TABLE t (id int PRIMARY KEY, v text)");
    form_group(&c);
    c.node(0).execute("INSERT INTO t VALUES (1, 'from node1')");
    c.node(1).execute("INSERT INTO t VALUES (2, 'from node2')");
    wait_for_catchup(&c);

    let numeric = [
        Type::INT2,
        Type::INT4,
        Type::INT8,
        Type::FLOAT4,
        Type::FLOAT8,
        Type::NUMERIC,
    ];
    let text = [Type::TEXT, Type::VARCHAR, Type::NAME, Type::BPCHAR];
    for n in c.nodes() {
        let mut client = monitor_client(n);
        let peer = c.nodes().iter().find(|p| p.name() != n.name()).unwrap();
        // Reachability is seen within a few seconds of the group forming.
        wait_until(
            &format!("{}: both nodes reachable", n.name()),
            CATCHUP,
            || {
                let a = run(&mut client, "SELECT reachable FROM bdr.node_status()").unwrap();
                a.rows.len() == 2
                    && a.rows
                        .iter()
                        .all(|r| r["reachable"].as_deref() == Some("t"))
            },
        );
        for q in &queries {
            let a = run(&mut client, &q.sql).unwrap_or_else(|e| {
                panic!(
                    "{} on {} as {MONITOR_ROLE}: {e}\n{}",
                    q.namespace,
                    n.name(),
                    q.sql
                )
            });
            assert!(
                !a.rows.is_empty(),
                "{} on {}: no rows",
                q.namespace,
                n.name()
            );
            for m in &q.metrics {
                let (_, ty) = a
                    .columns
                    .iter()
                    .find(|(name, _)| *name == m.column)
                    .unwrap_or_else(|| {
                        panic!(
                            "{}: no column {} in the result (columns: {:?})",
                            q.namespace,
                            m.column,
                            a.columns.iter().map(|c| &c.0).collect::<Vec<_>>()
                        )
                    });
                let ok = if m.usage == "LABEL" {
                    text.contains(ty)
                } else {
                    numeric.contains(ty)
                };
                assert!(
                    ok,
                    "{}.{}: {} column of type {ty}",
                    q.namespace, m.column, m.usage
                );
            }
            println!("{} on {}: {} rows", q.namespace, n.name(), a.rows.len());

            // On a healthy group the numbers say so.
            match q.namespace.as_str() {
                "bdr_node" => {
                    assert_eq!(a.rows.len(), 2, "{:?}", a.rows);
                    for r in &a.rows {
                        assert_eq!(num(&r["reachable"]), 1.0, "{r:?}");
                    }
                }
                "bdr_node_apply" => {
                    for node in c.nodes() {
                        let current: Vec<_> = a
                            .rows
                            .iter()
                            .filter(|r| {
                                r["node_name"].as_deref() == Some(node.name())
                                    && num(&r["state"]) == 1.0
                            })
                            .collect();
                        assert_eq!(current.len(), 1, "{}: {current:?}", node.name());
                        let want = if node.name() == n.name() {
                            "local"
                        } else {
                            "streaming"
                        };
                        assert_eq!(current[0]["apply_state"].as_deref(), Some(want));
                    }
                }
                "bdr_apply" => {
                    let r = a
                        .rows
                        .iter()
                        .find(|r| r["peer"].as_deref() == Some(peer.name()))
                        .unwrap_or_else(|| panic!("no apply stats for {}", peer.name()));
                    assert!(num(&r["inserts_total"]) >= 1.0, "{r:?}");
                    assert!(num(&r["commits_total"]) >= 1.0, "{r:?}");
                    assert_eq!(num(&r["errors_total"]), 0.0, "{r:?}");
                }
                "bdr_health" => {
                    for r in &a.rows {
                        assert_ne!(num(&r["status"]), 2.0, "CRITICAL on a healthy group: {r:?}");
                    }
                }
                "bdr_conflicts" => {
                    assert!(
                        a.rows
                            .iter()
                            .all(|r| r["peer"].as_deref() == Some(peer.name())),
                        "{:?}",
                        a.rows
                    );
                    assert!(
                        a.rows.iter().all(|r| num(&r["total"]) == 0.0),
                        "{:?}",
                        a.rows
                    );
                }
                _ => {}
            }
        }
    }
}
