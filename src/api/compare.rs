//! `bdr.compare_table(relation)`: is a table the same on every node? For the DBA after a
//! partition heals, a node comes back, or a conflict surprised them: one call that says
//! which nodes hold the same rows as this one, without copying any row between nodes.
//!
//! How: every data node (this one, and each member that is not parted and holds data,
//! reached with the DSN in `bdr.nodes`) counts the table's rows and sums a 64-bit hash of
//! each row's text form, over the columns this node's table has, in this node's order.
//! Equal counts and sums mean the same multiset of rows (up to a hash collision); the sum
//! is independent of row order, so no sort and no memory beyond one row. The text forms
//! are made with this session's `TimeZone`, `DateStyle`, `IntervalStyle`,
//! `extra_float_digits` and `bytea_output` on every node, so a timestamp reads the same
//! everywhere.
//!
//! Invariants: it changes nothing anywhere (read-only statements); a node it cannot
//! reach or whose table differs in shape is a row with `error` set, never an ERROR for
//! the whole call; the caller needs SELECT on the table here (the peers are read through
//! the group's own connection strings, so the check is made here, before any). Rows
//! written meanwhile make nodes differ for a moment: the result is a snapshot per node,
//! not across nodes (docs/sql.md).

use crate::catalog::nodes::{self, NodeKind, NodeState};
use crate::error::{raise, OrRaise, PgError};
use crate::pg::libpq::Conn;
use bdr_core::dsn;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("permission denied for table {0}")]
    NoSelect(String),
    #[error("\"{0}\" is not a table")]
    NotTable(String),
    #[error("this node is not a member of a bdr group")]
    NotMember,
    #[error("{0}")]
    Spi(String),
}

impl CompareError {
    fn spi(e: pgrx::spi::Error) -> CompareError {
        CompareError::Spi(e.to_string())
    }
}

impl PgError for CompareError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            CompareError::NoSelect(_) => PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            CompareError::NotTable(_) => PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            CompareError::NotMember => PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            CompareError::Spi(_) => PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            CompareError::NoSelect(t) => Some(format!(
                "The comparison reads every row of {t} on every node: GRANT SELECT on it to the role."
            )),
            CompareError::NotTable(_) => {
                Some("Pass an ordinary table (a partitioned table: each partition).".into())
            }
            CompareError::NotMember => {
                Some("bdr.group_create or bdr.group_join makes it one.".into())
            }
            CompareError::Spi(_) => None,
        }
    }
}

/// The session settings that shape a value's text form, copied to every node.
const TEXT_SETTINGS: [&str; 5] = [
    "TimeZone",
    "DateStyle",
    "IntervalStyle",
    "extra_float_digits",
    "bytea_output",
];

/// One node's answer: (row count, sum of row hashes), both as text.
type Answer = Result<(String, String), String>;

/// Compare `relation` on this node with every other data node of the group: one row per
/// node (this one first), with its row count and row-hash sum and whether both equal
/// this node's; `error` says why a node has no figures (unreachable, no such table or
/// column, no privilege there).
#[pg_extern(sql = "
CREATE FUNCTION bdr.compare_table(relation regclass)
    RETURNS TABLE (node_name text, is_local boolean, row_count bigint, row_hash text,
                   matches_local boolean, error text)
    LANGUAGE c VOLATILE STRICT PARALLEL UNSAFE
    AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
COMMENT ON FUNCTION bdr.compare_table(regclass) IS
    'Row count and order-independent row-hash sum of a table on every data node, compared with this node';
")]
#[allow(clippy::type_complexity)]
fn compare_table(
    relation: pg_sys::Oid,
) -> TableIterator<
    'static,
    (
        name!(node_name, String),
        name!(is_local, bool),
        name!(row_count, Option<i64>),
        name!(row_hash, Option<String>),
        name!(matches_local, Option<bool>),
        name!(error, Option<String>),
    ),
> {
    let (qualified, cols) = describe(relation);
    // The group's catalog is bdr's (not readable by PUBLIC): read as bdr, after the
    // caller's own SELECT privilege on the table was checked.
    let (me, members) = crate::pg::utility::as_superuser(|| (nodes::local(), nodes::all()));
    let Some(me) = me else {
        raise(&CompareError::NotMember);
    };
    let sql = format!(
        "SELECT count(*)::text, \
                coalesce(sum(hashtextextended(ROW({cols})::text, 0)::numeric), 0)::text \
           FROM ONLY {qualified}"
    );
    let settings: Vec<(&str, String)> = TEXT_SETTINGS
        .iter()
        .map(|s| {
            let v = Spi::get_one_with_args::<String>("SELECT current_setting($1)", &[(*s).into()])
                .or_raise_as(CompareError::spi)
                .unwrap_or_default();
            (*s, v)
        })
        .collect();
    let local: Answer = Spi::connect(|c| {
        let row = c.select(&sql, Some(1), &[])?.first();
        Ok::<_, pgrx::spi::Error>((
            row.get::<String>(1)?.unwrap_or_default(),
            row.get::<String>(2)?.unwrap_or_default(),
        ))
    })
    .map_err(|e| e.to_string());
    let mut out = vec![(me.name.clone(), true, local.clone())];
    for n in members {
        if n.is_local || n.kind == NodeKind::Witness || n.state == NodeState::Parted {
            continue;
        }
        out.push((n.name.clone(), false, remote(&n.dsn, &settings, &sql)));
    }
    let rows: Vec<_> = out
        .into_iter()
        .map(|(name, is_local, answer)| match answer {
            Ok((count, hash)) => {
                let matches = local
                    .as_ref()
                    .ok()
                    .map(|l| *l == (count.clone(), hash.clone()));
                (
                    name,
                    is_local,
                    count.parse().ok(),
                    Some(hash),
                    matches,
                    None,
                )
            }
            Err(e) => (name, is_local, None, None, None, Some(e)),
        })
        .collect();
    TableIterator::new(rows)
}

/// The table's schema-qualified, quoted name and its column list, after checking that it
/// is an ordinary table the caller may read.
fn describe(relation: pg_sys::Oid) -> (String, String) {
    let facts = Spi::connect(|c| {
        let t = c.select(
            "SELECT format('%I.%I', n.nspname, c.relname), c.relkind::text, \
                        has_table_privilege(c.oid, 'SELECT'), \
                        (SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) \
                           FROM pg_attribute \
                          WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped) \
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                  WHERE c.oid = $1",
            Some(1),
            &[relation.into()],
        )?;
        if t.is_empty() {
            // No such relation (an OID that names nothing, e.g. 0::regclass).
            return Ok::<_, pgrx::spi::Error>((None, None, None, None));
        }
        let r = t.first();
        Ok((
            r.get::<String>(1)?,
            r.get::<String>(2)?,
            r.get::<bool>(3)?,
            r.get::<String>(4)?,
        ))
    })
    .or_raise_as(CompareError::spi);
    let (Some(name), Some(kind), Some(may_read), cols) = facts else {
        raise(&CompareError::NotTable(relation.to_u32().to_string()));
    };
    if kind != "r" {
        raise(&CompareError::NotTable(name));
    }
    if !may_read {
        raise(&CompareError::NoSelect(name));
    }
    (name, cols.unwrap_or_default())
}

/// Ask one peer, in a read-only transaction with this session's text settings.
fn remote(node_dsn: &str, settings: &[(&str, String)], sql: &str) -> Answer {
    let d = dsn::with_default(node_dsn, "connect_timeout", "10");
    let mut c = Conn::connect(&d, "bdr_compare_table").map_err(|e| e.to_string())?;
    c.exec("BEGIN READ ONLY").map_err(|e| e.to_string())?;
    for (k, v) in settings {
        c.exec_params("SELECT set_config($1, $2, true)", &[k, v])
            .map_err(|e| e.to_string())?;
    }
    let rows = c.exec(sql).map_err(|e| e.to_string())?;
    let _ = c.exec("COMMIT");
    match rows.into_iter().next() {
        Some(r) if r.len() == 2 => Ok((
            r[0].clone().unwrap_or_default(),
            r[1].clone().unwrap_or_default(),
        )),
        _ => Err("no answer".into()),
    }
}
