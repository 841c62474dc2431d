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
use std::collections::BTreeMap;

/// Prefix of the logical message a replicated DDL travels as (synthesized by the output
/// plugin from a `bdr.ddl_queue` row: no role can emit one with `pg_logical_emit_message`).
pub const DDL_PREFIX: &str = "bdr.ddl";

/// A replicated statement as it travels: the text of one statement, the schemas it was
/// resolved against, the role that ran it (the peer runs it as that role), and the
/// origin session's [`STATEMENT_SETTINGS`] (the peer runs it under them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DdlCommand {
    pub role: String,
    pub search_path: String,
    pub command: String,
    /// Setting name -> the origin session's value. Absent from a statement of a release
    /// before 0.2.0's (the peer then runs it under its own values, as those releases did);
    /// a receiver of such a release ignores it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub settings: BTreeMap<String, String>,
}

/// The session settings that decide what a statement's text means once it is stored in
/// the catalog, so a peer must run it under the origin session's values: a literal's
/// reading (`'2024-01-02'::date` under `DateStyle` DMY, `'2024-01-01 00:00'::timestamptz`
/// under `TimeZone`, `'1 2:03'::interval` under `IntervalStyle`, backslashes under
/// `standard_conforming_strings` and `backslash_quote`, `NULL` in an array literal, `x =
/// NULL`, an XML literal), what a constant folded at that moment reads as text
/// (`extra_float_digits`, `bytea_output`), the access method of a new table, and whether a
/// function body is checked (`check_function_bodies = off`, as every `pg_dump` restore
/// runs, lets a body name a table created later; checked on the peer, that statement
/// fails there and holds the origin's stream until it is fixed by hand).
pub const STATEMENT_SETTINGS: [&str; 12] = [
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "standard_conforming_strings",
    "backslash_quote",
    "array_nulls",
    "transform_null_equals",
    "xmloption",
    "extra_float_digits",
    "bytea_output",
    "default_table_access_method",
    "check_function_bodies",
];

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
    /// default, a comment, a grant); `per_node` when it fills the existing rows with
    /// values each node computes for itself.
    Change {
        tables: Vec<Table>,
        safe: bool,
        per_node: Option<PerNodeValues>,
    },
    /// Changes other existing objects (views, functions, types, sequences...).
    Other,
    /// `CREATE/DROP INDEX CONCURRENTLY`, `REINDEX CONCURRENTLY`: cannot run in a
    /// transaction, so cannot travel in one.
    Concurrently,
    /// `ALTER SEQUENCE` of a permanent sequence that sets where it counts from or by
    /// how much (RESTART, START, INCREMENT, MINVALUE, MAXVALUE): every node's sequence
    /// hands out values of its own (docs/sequences.md), which the same values everywhere
    /// would make collide.
    SequenceValues,
}

/// A subcommand that fills a table's existing rows with values each node computes for
/// itself when it runs the statement: replicated as it is, the nodes' rows would differ
/// (silently: nothing on the way notices). Harmless on a table without rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PerNodeValues {
    /// `ADD COLUMN` with a default that is not immutable (`now()`, `random()`,
    /// `gen_random_uuid()`, `nextval()`...).
    Default { column: String },
    /// `ADD COLUMN` of a date/time type with a default literal PostgreSQL reads from the
    /// clock as the statement runs (`DEFAULT 'now'`, `'today'::date`): see [`reads_clock`].
    ClockLiteral { column: String },
    /// `ADD COLUMN` of type `serial`, `bigserial` or `smallserial`.
    Serial { column: String },
    /// `ADD COLUMN ... GENERATED ... AS IDENTITY`.
    Identity { column: String },
    /// `ALTER COLUMN ... TYPE ... USING` an expression that is not immutable.
    Using { column: String },
}

/// Whether a date/time literal is one PostgreSQL reads from the clock (`now`, `today`,
/// `tomorrow`, `yesterday`, alone or with a time: `'today 08:00'`): a default written so
/// is a constant fixed as the statement runs, which each node runs at its own moment.
pub fn reads_clock(literal: &str) -> bool {
    literal
        .split(|c: char| c.is_whitespace() || c == ',')
        .any(|w| {
            ["now", "today", "tomorrow", "yesterday"]
                .iter()
                .any(|k| w.eq_ignore_ascii_case(k))
        })
}

/// Why a statement is refused, and what to do instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub why: String,
    pub hint: &'static str,
}

const FILL_BY_UPDATE_HINT: &str = "Add the column without a default, give it its default for \
     new rows with ALTER TABLE ... ALTER COLUMN ... SET DEFAULT, then fill the existing rows \
     with UPDATE ... SET column = DEFAULT: the UPDATE replicates as row changes, the same \
     values on every node.";
const NUMBER_BY_UPDATE_HINT: &str = "Add it as a plain bigint column, number the existing \
     rows with UPDATE (it replicates as row changes, the same values on every node), then \
     give it its default or identity (ALTER COLUMN ... SET DEFAULT nextval(...), or SET NOT \
     NULL and ADD GENERATED BY DEFAULT AS IDENTITY) starting past the numbers used.";
const CONVERT_BY_UPDATE_HINT: &str = "Add a column of the new type, fill it with UPDATE ... \
     SET new_column = expression (it replicates as row changes, the same values on every \
     node), then drop the old column and rename the new one.";

impl PerNodeValues {
    /// The refusal of this subcommand on `table`, which has rows.
    pub fn refusal(&self, table: &str) -> Refusal {
        let (what, hint) = match self {
            PerNodeValues::Default { column } => (
                format!(
                    "column \"{column}\" is added to {table} with a default that is not \
                     immutable (such as now(), random() or nextval())"
                ),
                FILL_BY_UPDATE_HINT,
            ),
            PerNodeValues::ClockLiteral { column } => (
                format!(
                    "column \"{column}\" is added to {table} with a default literal read from \
                     the clock as the statement runs (such as 'now' or 'today')"
                ),
                FILL_BY_UPDATE_HINT,
            ),
            PerNodeValues::Serial { column } => (
                format!("serial column \"{column}\" is added to {table}"),
                NUMBER_BY_UPDATE_HINT,
            ),
            PerNodeValues::Identity { column } => (
                format!("identity column \"{column}\" is added to {table}"),
                NUMBER_BY_UPDATE_HINT,
            ),
            PerNodeValues::Using { column } => (
                format!(
                    "column \"{column}\" of {table} changes type USING an expression that is \
                     not immutable"
                ),
                CONVERT_BY_UPDATE_HINT,
            ),
        };
        Refusal {
            why: format!(
                "cannot replicate this schema change: {what}, and the table has rows: each \
                 node would compute their values itself, and the nodes' rows would differ"
            ),
            hint,
        }
    }
}

/// What to do with a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Run it here only.
    Local,
    /// Run it and replicate it; drain writes to these tables first (empty: no drain).
    /// With `if_rows`, refuse it once drained if the table has rows.
    Replicate {
        drain: Vec<String>,
        if_rows: Option<Refusal>,
    },
    /// Refuse with an error and this hint.
    Refuse(Refusal),
}

const PER_NODE_HINT: &str = "Run it on each node with SET bdr.ddl_replication = off.";

/// Decide what happens to a statement of shape `s`.
pub fn decide(s: &Shape) -> Decision {
    match s {
        Shape::NotReplicated => Decision::Local,
        Shape::Create { permanent: false } | Shape::CreateTableAs { permanent: false } => {
            Decision::Local
        }
        Shape::Create { permanent: true } | Shape::Other => Decision::Replicate {
            drain: Vec::new(),
            if_rows: None,
        },
        Shape::CreateTableAs { permanent: true } => Decision::Refuse(Refusal {
            why: "CREATE TABLE ... AS and SELECT INTO cannot be replicated: the peers would \
                  compute the rows from their own data, and the rows would also arrive as \
                  changes"
                .into(),
            hint: "Create the table with CREATE TABLE, then fill it with INSERT ... SELECT; \
                   both replicate.",
        }),
        Shape::SequenceValues => Decision::Refuse(Refusal {
            why: "cannot replicate ALTER SEQUENCE ... RESTART, START, INCREMENT, MINVALUE or \
                  MAXVALUE: every node's sequence hands out values of its own, and the same \
                  settings on every node would make them collide"
                .into(),
            hint: "To move a serial or identity sequence past the values its column holds, \
                   run SELECT bdr.alter_sequence_set_kind('seq', 'offset') (or 'snowflake') \
                   on each node. To change one node's sequence only, run the statement there \
                   with SET bdr.ddl_replication = off.",
        }),
        Shape::Concurrently => Decision::Refuse(Refusal {
            why: "a CONCURRENTLY statement cannot be replicated: it cannot run inside the \
                  transaction that carries it to the other nodes"
                .into(),
            hint: PER_NODE_HINT,
        }),
        Shape::Change {
            tables,
            safe,
            per_node,
        } => {
            let (rep, local): (Vec<&Table>, Vec<&Table>) =
                tables.iter().partition(|t| t.replicates);
            if rep.is_empty() {
                return Decision::Local;
            }
            if !local.is_empty() {
                return Decision::Refuse(Refusal {
                    why: "the statement changes replicated tables and tables that do not \
                          replicate (temporary, unlogged, of an extension or of bdr) together"
                        .into(),
                    hint: "Change them in separate statements.",
                });
            }
            // Whether the table has rows is known only once the drain has brought every
            // member's writes here (and fenced new ones), so the check runs after it.
            let if_rows = per_node.as_ref().map(|p| p.refusal(&rep[0].name));
            Decision::Replicate {
                drain: if *safe && if_rows.is_none() {
                    Vec::new()
                } else {
                    rep.into_iter().map(|t| t.name.clone()).collect()
                },
                if_rows,
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
    /// Refuse it once drained if the (first) drained table has rows.
    pub if_rows: Option<Refusal>,
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
            Decision::Replicate {
                drain: vec![],
                if_rows: None
            }
        );
        assert_eq!(
            decide(&Shape::Other),
            Decision::Replicate {
                drain: vec![],
                if_rows: None
            }
        );
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
                safe: false,
                per_node: None
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
                safe: false,
                per_node: None
            }),
            Decision::Replicate {
                drain: vec!["public.t".into(), "public.u".into()],
                if_rows: None
            }
        );
        assert_eq!(
            decide(&Shape::Change {
                tables: t,
                safe: true,
                per_node: None
            }),
            Decision::Replicate {
                drain: vec![],
                if_rows: None
            }
        );
    }

    #[test]
    fn unsafe_statements_are_refused_with_a_hint() {
        for s in [
            Shape::Concurrently,
            Shape::SequenceValues,
            Shape::CreateTableAs { permanent: true },
            Shape::Change {
                tables: vec![table("public.t", true), table("pg_temp_3.x", false)],
                safe: false,
                per_node: None,
            },
        ] {
            match decide(&s) {
                Decision::Refuse(r) => assert!(!r.hint.is_empty() && !r.why.is_empty()),
                d => panic!("{s:?}: {d:?}"),
            }
        }
    }

    #[test]
    fn values_each_node_computes_are_drained_then_refused_if_the_table_has_rows() {
        for (p, says) in [
            (
                PerNodeValues::Default {
                    column: "created_at".into(),
                },
                "column \"created_at\" is added to public.t with a default that is not immutable",
            ),
            (
                PerNodeValues::ClockLiteral { column: "d".into() },
                "column \"d\" is added to public.t with a default literal read from the clock",
            ),
            (
                PerNodeValues::Serial { column: "n".into() },
                "serial column \"n\" is added to public.t",
            ),
            (
                PerNodeValues::Identity { column: "n".into() },
                "identity column \"n\" is added to public.t",
            ),
            (
                PerNodeValues::Using { column: "c".into() },
                "column \"c\" of public.t changes type USING an expression",
            ),
        ] {
            // Even a change that needs no drain of its own is drained: emptiness is known
            // only once every member's writes are here.
            for safe in [false, true] {
                match decide(&Shape::Change {
                    tables: vec![table("public.t", true)],
                    safe,
                    per_node: Some(p.clone()),
                }) {
                    Decision::Replicate {
                        drain,
                        if_rows: Some(r),
                    } => {
                        assert_eq!(drain, vec!["public.t".to_string()]);
                        assert!(r.why.contains(says), "{}", r.why);
                        assert!(r.why.contains("the nodes' rows would differ"), "{}", r.why);
                        assert!(r.hint.contains("UPDATE"), "{}", r.hint);
                    }
                    d => panic!("{p:?}: {d:?}"),
                }
            }
        }
        // A table that does not replicate changes here only, whatever it computes.
        assert_eq!(
            decide(&Shape::Change {
                tables: vec![table("pg_temp_3.t", false)],
                safe: false,
                per_node: Some(PerNodeValues::Default { column: "c".into() }),
            }),
            Decision::Local
        );
    }

    #[test]
    fn literals_read_from_the_clock_are_told_from_fixed_ones() {
        for l in [
            "now",
            " NOW ",
            "today",
            "Tomorrow",
            "yesterday",
            "today 08:00",
            "2024-01-01,now",
        ] {
            assert!(reads_clock(l), "{l}");
        }
        for l in [
            "2024-01-01",
            "epoch",
            "infinity",
            "-infinity",
            "allballs",
            "nowhere",
            "",
            "snow",
        ] {
            assert!(!reads_clock(l), "{l}");
        }
    }

    #[test]
    fn the_command_round_trips_as_json() {
        let c = DdlCommand {
            role: "app".into(),
            search_path: "\"my schema\", public".into(),
            command: "ALTER TABLE t ADD COLUMN \"é\" text DEFAULT 'x''y'".into(),
            settings: [("DateStyle", "SQL, DMY"), ("TimeZone", "America/New_York")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let j = serde_json::to_vec(&c).unwrap();
        assert_eq!(serde_json::from_slice::<DdlCommand>(&j).unwrap(), c);
    }

    #[test]
    fn a_command_without_settings_reads_as_before_and_is_written_as_before() {
        // What a node of release 0.1.0 sends, and what it reads: no `settings` key.
        let old = br#"{"role":"app","search_path":"public","command":"CREATE TABLE t ()"}"#;
        let c = serde_json::from_slice::<DdlCommand>(old).unwrap();
        assert!(c.settings.is_empty());
        assert_eq!(serde_json::to_vec(&c).unwrap(), old.to_vec());
        // A receiver that knows no `settings` reads a new command (serde ignores the key).
        #[derive(Deserialize)]
        struct Old {
            command: String,
        }
        let mut c = c;
        c.settings.insert("TimeZone".into(), "UTC".into());
        let j = serde_json::to_vec(&c).unwrap();
        assert_eq!(
            serde_json::from_slice::<Old>(&j).unwrap().command,
            "CREATE TABLE t ()"
        );
    }
}
