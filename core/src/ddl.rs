//! DDL replication policy: which schema changes travel to the other nodes, which need the
//! other nodes' writes to the affected tables drained first, and which are refused.
//!
//! The `ProcessUtility` hook (src/pg/utility.rs) describes a statement as a [`Shape`] —
//! what kind of statement, and for each table it changes whether that table replicates —
//! and [`decide`] answers. A replicated statement travels as a [`DdlCommand`] inside the
//! transaction that ran it (a row of `bdr.ddl_queue`, decoded into a `bdr.ddl` message),
//! so every peer runs it at that commit's position: after the origin's earlier changes,
//! before its later ones, exactly once, under the same replication origin.
//!
//! Why a drain: a change to an existing table's shape (ALTER, DROP, RENAME) races the
//! other nodes' in-flight writes to that table. Their old-shaped rows would reach nodes
//! that already run the new shape (a dropped column, a renamed one, a dropped table) and
//! stop apply there for good. So before such a statement runs, writes to those tables are
//! fenced on every member and every member applies every other member's changes up to
//! that point; the fence on a member lifts when it applies the statement. A new object, or
//! a nullable column without a default, cannot be hit by an old-shaped row: no drain.

use serde::{Deserialize, Serialize};

/// Prefix of the logical message a replicated DDL travels as (synthesized by the output
/// plugin from a `bdr.ddl_queue` row: no role can emit one with `pg_logical_emit_message`).
pub const DDL_PREFIX: &str = "bdr.ddl";

/// A replicated statement as it travels: the text of one statement, the schemas it was
/// resolved against, and the role that ran it (the peer runs it as that role).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DdlCommand {
    pub role: String,
    pub search_path: String,
    pub command: String,
}

/// A table a statement changes, as the origin sees it before running it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// `"schema"."name"`, quoted.
    pub name: String,
    /// An ordinary permanent user table (the replication rule): its changes replicate.
    pub replicates: bool,
}

/// What a statement is, for the decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    /// A database-wide or cluster-wide statement, or one that is not DDL: never replicated.
    NotReplicated,
    /// Creates an object no row can refer to yet (a table, view, function, type, index,
    /// sequence, schema...); `permanent` false for temporary and unlogged relations.
    Create { permanent: bool },
    /// `CREATE TABLE ... AS` / `SELECT INTO`.
    CreateTableAs { permanent: bool },
    /// Changes existing tables (ALTER TABLE, DROP TABLE, RENAME ...); `safe` when no
    /// old-shaped row can be hit by the change (e.g. adding a nullable column without a
    /// default, a comment, a grant).
    Change { tables: Vec<Table>, safe: bool },
    /// Changes other existing objects (views, functions, types, sequences...).
    Other,
    /// `CREATE/DROP INDEX CONCURRENTLY`, `REINDEX CONCURRENTLY`: cannot run in a
    /// transaction, so cannot travel in one.
    Concurrently,
}

/// What to do with a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Run it here only.
    Local,
    /// Run it and replicate it; drain writes to these tables first (empty: no drain).
    Replicate { drain: Vec<String> },
    /// Refuse with an error and this hint.
    Refuse {
        why: &'static str,
        hint: &'static str,
    },
}

const PER_NODE_HINT: &str = "Run it on each node with SET bdr.ddl_replication = off.";

/// Decide what happens to a statement of shape `s`.
pub fn decide(s: &Shape) -> Decision {
    match s {
        Shape::NotReplicated => Decision::Local,
        Shape::Create { permanent: false } | Shape::CreateTableAs { permanent: false } => {
            Decision::Local
        }
        Shape::Create { permanent: true } | Shape::Other => {
            Decision::Replicate { drain: Vec::new() }
        }
        Shape::CreateTableAs { permanent: true } => Decision::Refuse {
            why: "CREATE TABLE ... AS and SELECT INTO cannot be replicated: the peers would \
                  compute the rows from their own data, and the rows would also arrive as \
                  changes",
            hint: "Create the table with CREATE TABLE, then fill it with INSERT ... SELECT; \
                   both replicate.",
        },
        Shape::Concurrently => Decision::Refuse {
            why: "a CONCURRENTLY statement cannot be replicated: it cannot run inside the \
                  transaction that carries it to the other nodes",
            hint: PER_NODE_HINT,
        },
        Shape::Change { tables, safe } => {
            let (rep, local): (Vec<&Table>, Vec<&Table>) =
                tables.iter().partition(|t| t.replicates);
            if rep.is_empty() {
                return Decision::Local;
            }
            if !local.is_empty() {
                return Decision::Refuse {
                    why: "the statement changes replicated tables and tables that do not \
                          replicate (temporary, unlogged, of an extension or of bdr) together",
                    hint: "Change them in separate statements.",
                };
            }
            Decision::Replicate {
                drain: if *safe {
                    Vec::new()
                } else {
                    rep.into_iter().map(|t| t.name.clone()).collect()
                },
            }
        }
    }
}

/// A statement to replicate: the command as queued, and the tables to drain first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub command: DdlCommand,
    /// Tables to drain first.
    pub drain: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(name: &str, replicates: bool) -> Table {
        Table {
            name: name.into(),
            replicates,
        }
    }

    #[test]
    fn new_objects_replicate_without_a_drain() {
        assert_eq!(
            decide(&Shape::Create { permanent: true }),
            Decision::Replicate { drain: vec![] }
        );
        assert_eq!(decide(&Shape::Other), Decision::Replicate { drain: vec![] });
    }

    #[test]
    fn temporary_and_unlogged_objects_stay_local() {
        assert_eq!(decide(&Shape::Create { permanent: false }), Decision::Local);
        assert_eq!(
            decide(&Shape::CreateTableAs { permanent: false }),
            Decision::Local
        );
        assert_eq!(
            decide(&Shape::Change {
                tables: vec![table("pg_temp_3.t", false)],
                safe: false
            }),
            Decision::Local
        );
    }

    #[test]
    fn changing_a_replicated_table_drains_it_unless_safe() {
        let t = vec![table("public.t", true), table("public.u", true)];
        assert_eq!(
            decide(&Shape::Change {
                tables: t.clone(),
                safe: false
            }),
            Decision::Replicate {
                drain: vec!["public.t".into(), "public.u".into()]
            }
        );
        assert_eq!(
            decide(&Shape::Change {
                tables: t,
                safe: true
            }),
            Decision::Replicate { drain: vec![] }
        );
    }

    #[test]
    fn unsafe_statements_are_refused_with_a_hint() {
        for s in [
            Shape::Concurrently,
            Shape::CreateTableAs { permanent: true },
            Shape::Change {
                tables: vec![table("public.t", true), table("pg_temp_3.x", false)],
                safe: false,
            },
        ] {
            match decide(&s) {
                Decision::Refuse { hint, .. } => assert!(!hint.is_empty()),
                d => panic!("{s:?}: {d:?}"),
            }
        }
    }

    #[test]
    fn the_command_round_trips_as_json() {
        let c = DdlCommand {
            role: "app".into(),
            search_path: "\"my schema\", public".into(),
            command: "ALTER TABLE t ADD COLUMN \"é\" text DEFAULT 'x''y'".into(),
        };
        let j = serde_json::to_vec(&c).unwrap();
        assert_eq!(serde_json::from_slice::<DdlCommand>(&j).unwrap(), c);
    }
}
