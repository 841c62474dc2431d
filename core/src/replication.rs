//! What replicates: the one rule both ends apply. The output plugin sends changes only
//! of relations that pass it, and the receiver applies changes only to local relations
//! that pass it, so a peer can never name a view, a partitioned table, an extension's
//! table, a system catalog or bdr's own catalog as the target of a change.

/// What is known of a relation when deciding whether it replicates.
pub struct RelFacts<'a> {
    /// An ordinary table (relkind `r`; a partition is one too).
    pub plain_table: bool,
    pub permanent: bool,
    pub schema: &'a str,
    pub owned_by_extension: bool,
}

/// Why a relation does not replicate, or `None` if it does. The one rule for both ends:
/// the plugin sends changes only of such relations, and the receiver applies changes only
/// to such relations (so a peer cannot name a view, a partitioned table, the bdr catalog
/// or a system table as its target).
pub fn why_not_replicated(f: &RelFacts<'_>) -> Option<&'static str> {
    if !f.plain_table {
        Some("it is not an ordinary table (a view, a partitioned table, a foreign table, ...)")
    } else if !f.permanent {
        Some("it is an unlogged or temporary table")
    } else if f.owned_by_extension {
        Some("it belongs to an extension")
    } else if f.schema == "pg_catalog"
        || f.schema == "information_schema"
        || f.schema.starts_with("pg_toast")
        || f.schema.starts_with("pg_temp")
    {
        Some("it is a system table")
    } else if f.schema == "bdr" {
        Some("it is part of bdr's own catalog")
    } else {
        None
    }
}

/// Whether changes to a relation are sent to peers (and accepted from them).
pub fn replicates(f: &RelFacts<'_>) -> bool {
    why_not_replicated(f).is_none()
}

/// [`why_not_replicated`] as SQL: the (schema, name) of this database's tables that
/// replicate, for the code that lists them (join, standby triggers, tombstone triggers).
/// Kept beside the rule; the test below checks it names every excluded schema.
pub const REPLICATED_TABLES_SQL: &str = "\
    SELECT n.nspname::text, c.relname::text FROM pg_class c \
      JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind = 'r' AND c.relpersistence = 'p' \
       AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'bdr') \
       AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%' \
       AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
                       AND d.objid = c.oid AND d.deptype = 'e') \
     ORDER BY 1, 2";

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(schema: &str) -> RelFacts<'_> {
        RelFacts {
            plain_table: true,
            permanent: true,
            schema,
            owned_by_extension: false,
        }
    }

    #[test]
    fn ordinary_tables_replicate() {
        assert!(replicates(&facts("public")));
        assert!(replicates(&facts("app_schema")));
    }

    #[test]
    fn the_sql_form_excludes_what_the_rule_excludes() {
        for part in [
            "relkind = 'r'",
            "relpersistence = 'p'",
            "'pg_catalog', 'information_schema', 'bdr'",
            "NOT LIKE 'pg_toast%'",
            "NOT LIKE 'pg_temp%'",
            "deptype = 'e'",
        ] {
            assert!(REPLICATED_TABLES_SQL.contains(part), "{part}");
        }
    }

    #[test]
    fn everything_else_does_not() {
        for s in [
            "pg_catalog",
            "information_schema",
            "pg_toast",
            "pg_temp_3",
            "bdr",
        ] {
            assert!(why_not_replicated(&facts(s)).is_some(), "{s}");
        }
        let mut f = facts("public");
        f.plain_table = false;
        assert!(why_not_replicated(&f)
            .unwrap()
            .contains("not an ordinary table"));
        let mut f = facts("public");
        f.permanent = false;
        assert!(!replicates(&f));
        let mut f = facts("public");
        f.owned_by_extension = true;
        assert!(!replicates(&f));
    }
}
