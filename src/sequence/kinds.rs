//! Sequence kinds: `bdr.alter_sequence_set_kind`, `bdr.sequence_kind` and
//! `bdr.default_sequence_kind` applied to the serial and identity columns of replicated
//! tables (by the CREATE TABLE event trigger, and at group create/join).
//!
//! Invariant: bad input is an ERROR with a hint before any change; a kind that needs a
//! node number is refused on a node without one.

use super::{raise, refresh_slot, seq_name, OrRaise, SequenceError};
use crate::catalog::nodes;
use crate::gucs::{DefaultSequenceKind, DEFAULT_SEQUENCE_KIND};
use crate::pg::libpq::quote_ident;
use crate::pg::sequence as pgseq;
use bdr_core::snowflake::{self, OFFSET_INCREMENT};
use pgrx::prelude::*;

/// The kinds a sequence can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Snowflake,
    Offset,
    Local,
}

impl Kind {
    fn parse(s: &str) -> Option<Kind> {
        match s {
            "snowflake" => Some(Kind::Snowflake),
            "offset" => Some(Kind::Offset),
            "local" => Some(Kind::Local),
            _ => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Snowflake => "snowflake",
            Kind::Offset => "offset",
            Kind::Local => "local",
        }
    }
}

const INT8OID: u32 = 20;

/// A column drawing from a sequence.
struct Column {
    table: String,
    table_oid: u32,
    name: String,
    ty: String,
    typid: u32,
    identity: bool,
    snowflake_default: bool,
}

impl Column {
    fn label(&self) -> String {
        let plain = self
            .name
            .starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if plain {
            format!("{}.{}", self.table, self.name)
        } else {
            format!("{}.{}", self.table, quote_ident(&self.name))
        }
    }
}

/// Columns that own `seq` (serial, identity) or whose DEFAULT calls it.
fn columns_of(seq: u32) -> Vec<Column> {
    let sql = format!(
        "WITH cols AS ( \
           SELECT d.refobjid AS relid, d.refobjsubid::int2 AS attnum FROM pg_depend d \
            WHERE d.classid = 'pg_class'::regclass AND d.objid = {seq} \
              AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') \
              AND d.refobjsubid > 0 \
           UNION \
           SELECT ad.adrelid, ad.adnum FROM pg_attrdef ad \
             JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid \
            WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = {seq}) \
         SELECT c.relid::regclass::text, c.relid::oid, a.attname::text, \
                format_type(a.atttypid, a.atttypmod), a.atttypid::oid, a.attidentity <> '', \
                EXISTS (SELECT 1 FROM pg_attrdef ad JOIN pg_depend d \
                          ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid \
                         WHERE ad.adrelid = c.relid AND ad.adnum = c.attnum \
                           AND d.refclassid = 'pg_proc'::regclass \
                           AND d.refobjid = 'bdr.snowflake_nextval(regclass)'::regprocedure) \
           FROM cols c JOIN pg_attribute a ON a.attrelid = c.relid AND a.attnum = c.attnum \
          WHERE NOT a.attisdropped ORDER BY 1, 3"
    );
    Spi::connect(|c| {
        let mut out = Vec::new();
        for r in c.select(&sql, None, &[])? {
            out.push(Column {
                table: r.get(1)?.unwrap_or_default(),
                table_oid: r.get::<pg_sys::Oid>(2)?.map(|o| o.to_u32()).unwrap_or(0),
                name: r.get(3)?.unwrap_or_default(),
                ty: r.get(4)?.unwrap_or_default(),
                typid: r.get::<pg_sys::Oid>(5)?.map(|o| o.to_u32()).unwrap_or(0),
                identity: r.get(6)?.unwrap_or(false),
                snowflake_default: r.get(7)?.unwrap_or(false),
            });
        }
        Ok(out)
    })
    .or_raise_as(SequenceError::spi)
}

struct SeqFacts {
    name: String,
    ty: String,
    increment: i64,
    max: i64,
    /// The last value handed out (0 if none).
    current: i64,
}

fn facts(seq: u32) -> SeqFacts {
    let row = Spi::connect(|c| {
        let r = c
            .select(
                &format!(
                    "SELECT {seq}::oid::regclass::text, format_type(seqtypid, NULL), \
                            seqincrement, seqmax FROM pg_sequence WHERE seqrelid = {seq}"
                ),
                Some(1),
                &[],
            )?
            .first();
        Ok::<_, pgrx::spi::Error>((
            r.get::<String>(1)?.unwrap_or_default(),
            r.get::<String>(2)?.unwrap_or_default(),
            r.get::<i64>(3)?.unwrap_or(1),
            r.get::<i64>(4)?.unwrap_or(i64::MAX),
        ))
    })
    .or_raise_as(SequenceError::spi);
    let current = nodes::read_one::<i64>(&format!(
        "SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM {}",
        row.0
    ))
    .unwrap_or(0);
    SeqFacts {
        name: row.0,
        ty: row.1,
        increment: row.2,
        max: row.3,
        current,
    }
}

fn run(sql: &str) {
    Spi::run(sql).or_raise_as(SequenceError::spi);
}

/// The kind `seq` has now: `snowflake` if a column's DEFAULT calls
/// `bdr.snowflake_nextval` on it, `offset` if it steps by 1024, else `local`.
fn current_kind(cols: &[Column], f: &SeqFacts) -> Kind {
    if cols.iter().any(|c| c.snowflake_default) {
        Kind::Snowflake
    } else if f.increment == OFFSET_INCREMENT {
        Kind::Offset
    } else {
        Kind::Local
    }
}

/// The local node's number, read in this transaction (so a group_create or group_join in
/// progress sees its own row).
fn local_node_number() -> Option<u16> {
    nodes::read_one::<i32>("SELECT node_number FROM bdr.nodes WHERE is_local")
        .filter(|n| (0..=snowflake::MAX_NODE_NUMBER as i32).contains(n))
        .map(|n| n as u16)
}

thread_local! {
    /// [`set_kind`] is running: the ALTER TABLE ... SET DEFAULT it runs fires the event
    /// trigger, which must not give the sequence a kind of its own meanwhile (it would
    /// turn a sequence being made `local` back into `snowflake`).
    static SETTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Make `seq` of kind `kind` on this node. Checks everything before changing anything.
fn set_kind(seq: u32, kind: Kind, node: Option<u16>) {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            SETTING.with(|s| s.set(self.0));
        }
    }
    let _reset = Reset(SETTING.with(|s| s.replace(true)));
    let cols = columns_of(seq);
    let f = facts(seq);
    let oid_lit = format!("'{seq}'::regclass");
    match kind {
        Kind::Snowflake => {
            if let Some(c) = cols.iter().find(|c| c.identity) {
                raise(&SequenceError::Identity(c.label()));
            }
            if let Some(c) = cols.iter().find(|c| c.typid != INT8OID) {
                raise(&SequenceError::NotBigint {
                    column: c.label(),
                    ty: c.ty.clone(),
                });
            }
            if f.ty != "bigint" {
                raise(&SequenceError::SequenceNotBigint {
                    seq: f.name.clone(),
                    ty: f.ty.clone(),
                });
            }
            if node.is_none() {
                raise(&SequenceError::NoNodeNumber);
            }
            if f.increment != 1 {
                run(&format!("ALTER SEQUENCE {} INCREMENT BY 1", f.name));
            }
            for c in &cols {
                run(&format!(
                    "ALTER TABLE {} ALTER COLUMN {} SET DEFAULT bdr.snowflake_nextval({oid_lit})",
                    c.table,
                    quote_ident(&c.name)
                ));
            }
        }
        Kind::Offset => {
            let Some(node) = node else {
                raise(&SequenceError::NoNodeNumber)
            };
            let mut current = f.current;
            for c in &cols {
                let m = nodes::read_one::<i64>(&format!(
                    "SELECT max({})::bigint FROM {}",
                    quote_ident(&c.name),
                    c.table
                ))
                .unwrap_or(0);
                current = current.max(m);
            }
            let start = snowflake::offset_start(current, node)
                .filter(|s| *s <= f.max)
                .unwrap_or_else(|| {
                    raise(&SequenceError::OffsetExhausted {
                        seq: f.name.clone(),
                        current,
                        max: f.max,
                    })
                });
            // START too: TRUNCATE ... RESTART IDENTITY (replicated to every node) and
            // ALTER SEQUENCE ... RESTART go back to it, which must be this node's own
            // residue, not 1 (every node's sequence would hand out 1, 1025, ... again).
            run(&format!(
                "ALTER SEQUENCE {} INCREMENT BY {OFFSET_INCREMENT} START WITH {start} RESTART WITH {start}",
                f.name
            ));
            for c in cols.iter().filter(|c| c.snowflake_default) {
                run(&format!(
                    "ALTER TABLE {} ALTER COLUMN {} SET DEFAULT nextval({oid_lit})",
                    c.table,
                    quote_ident(&c.name)
                ));
            }
        }
        Kind::Local => {
            if f.increment != 1 {
                run(&format!("ALTER SEQUENCE {} INCREMENT BY 1", f.name));
            }
            for c in cols.iter().filter(|c| c.snowflake_default) {
                run(&format!(
                    "ALTER TABLE {} ALTER COLUMN {} SET DEFAULT nextval({oid_lit})",
                    c.table,
                    quote_ident(&c.name)
                ));
            }
        }
    }
    refresh_slot(pg_sys::Oid::from(seq));
}

/// `seq` as a sequence's OID; an OID that names no relation (`0::regclass`, a dropped
/// one) or another kind of relation is refused with a hint. (The functions take the OID,
/// not an opened relation: opening one that does not exist is an internal error.)
fn check_sequence(oid: pg_sys::Oid) -> u32 {
    if !pgseq::is_sequence(oid) {
        raise(&SequenceError::NotSequence(seq_name(oid)));
    }
    oid.to_u32()
}

/// Give sequence `seq` kind `kind` ('snowflake', 'offset' or 'local') on this node,
/// switching the DEFAULT of the columns that draw from it. Run it on every node (DDL
/// does not replicate).
#[pg_extern(sql = "
CREATE FUNCTION alter_sequence_set_kind(seq regclass, kind text) RETURNS void
    STRICT LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
")]
fn alter_sequence_set_kind(seq: pg_sys::Oid, kind: &str) {
    let Some(k) = Kind::parse(kind) else {
        raise(&SequenceError::BadKind(kind.into()))
    };
    let oid = check_sequence(seq);
    set_kind(oid, k, local_node_number());
}

/// The kind sequence `seq` has on this node.
#[pg_extern(sql = "
CREATE FUNCTION sequence_kind(seq regclass) RETURNS text
    STRICT LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
")]
fn sequence_kind(seq: pg_sys::Oid) -> &'static str {
    let oid = check_sequence(seq);
    let cols = columns_of(oid);
    current_kind(&cols, &facts(oid)).name()
}

/// Replicated tables of this database (permanent, user schemas, not an extension's).
const TABLES_SQL: &str = "\
    SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'p' \
       AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'bdr') \
       AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%' \
       AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
                       AND d.objid = c.oid AND d.deptype = 'e')";

/// Give the serial and identity columns of `table` (every replicated table when `None`)
/// the kind `bdr.default_sequence_kind` asks for. A sequence that is already `offset` is
/// made `offset` again for this node (a schema copied from another node carries that
/// node's start value); `snowflake` ones are left alone. Nothing happens on a node that
/// has no node number (not a member).
pub fn apply_default_kinds(table: Option<u32>) {
    let Some(node) = local_node_number() else {
        return;
    };
    // A single table too must be one that replicates (not an extension's, say, created
    // by CREATE EXTENSION on a member).
    let sql = match table {
        Some(t) => format!("{TABLES_SQL} AND c.oid = {t}"),
        None => TABLES_SQL.to_string(),
    };
    for t in oids(&sql) {
        // Owned by a column (serial, identity, OWNED BY), or called by a column's
        // default (`DEFAULT nextval('s')` of a sequence of its own).
        let seqs = oids(&format!(
            "SELECT objid FROM ( \
               SELECT d.objid, d.refobjsubid AS attnum FROM pg_depend d \
                WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass \
                  AND d.refobjid = {t} AND d.refobjsubid > 0 AND d.deptype IN ('a', 'i') \
               UNION \
               SELECT d.refobjid, ad.adnum FROM pg_attrdef ad \
                 JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid \
                WHERE ad.adrelid = {t} AND d.refclassid = 'pg_class'::regclass) q \
              JOIN pg_class s ON s.oid = q.objid \
             WHERE s.relkind = 'S' GROUP BY objid ORDER BY min(attnum)"
        ));
        for seq in seqs {
            default_kind(seq, t, node, false);
        }
    }
}

/// Give sequence `seq`, just created by an ALTER TABLE for a serial or identity column of
/// a replicated table (`ADD COLUMN`, `ADD GENERATED ... AS IDENTITY`), or just made a
/// column's default (`ALTER COLUMN ... SET DEFAULT nextval(...)`), the kind
/// `bdr.default_sequence_kind` asks for. Only a sequence still `local` changes: the
/// kinds of the table's other sequences are left as they are.
pub fn apply_default_kind_to_new_sequence(seq: u32) {
    let Some(node) = local_node_number() else {
        return;
    };
    let replicates = |t: u32| !oids(&format!("{TABLES_SQL} AND c.oid = {t}")).is_empty();
    if let Some(c) = columns_of(seq)
        .into_iter()
        .find(|c| replicates(c.table_oid))
    {
        default_kind(seq, c.table_oid, node, true);
    }
}

/// The OIDs a query's first column lists.
fn oids(sql: &str) -> Vec<u32> {
    Spi::connect(|c| {
        c.select(sql, None, &[])?
            .map(|r| r.get::<pg_sys::Oid>(1).map(|o| o.map_or(0, |o| o.to_u32())))
            .collect::<Result<Vec<_>, _>>()
    })
    .or_raise_as(SequenceError::spi)
}

/// The default kind for sequence `seq` of table `t` on node number `node`; with
/// `only_local`, an `offset` sequence is left as it is.
fn default_kind(seq: u32, t: u32, node: u16, only_local: bool) {
    let want = DEFAULT_SEQUENCE_KIND.get();
    let cols = columns_of(seq);
    let f = facts(seq);
    match current_kind(&cols, &f) {
        Kind::Snowflake => {}
        Kind::Offset if only_local => {}
        Kind::Offset => set_kind(seq, Kind::Offset, Some(node)),
        Kind::Local if want == DefaultSequenceKind::Local => {}
        Kind::Local => {
            let owner = cols.iter().find(|c| c.table_oid == t);
            match owner {
                Some(c) if !c.identity && c.typid == INT8OID && f.ty == "bigint" => {
                    set_kind(seq, Kind::Snowflake, Some(node))
                }
                Some(c) => {
                    set_kind(seq, Kind::Offset, Some(node));
                    let why = if c.identity {
                        "an identity column"
                    } else {
                        "not bigint"
                    };
                    pgrx::notice!(
                        "column {} is {why} ({}): it gets an offset sequence \
                         (this node's values are {} + k * {OFFSET_INCREMENT}), \
                         not snowflake ids",
                        c.label(),
                        c.ty,
                        node as i64 + 1
                    );
                }
                None => {}
            }
        }
    }
}

/// Event-trigger helper: default sequence kinds for one new table, or for one sequence an
/// ALTER TABLE created (see [`apply_default_kinds`], [`apply_default_kind_to_new_sequence`]).
/// Not for direct use (EXECUTE is not granted).
#[pg_extern]
fn apply_default_sequence_kinds(rel: pg_sys::Oid) {
    if SETTING.with(|s| s.get()) {
        return;
    }
    let is_sequence = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_class WHERE oid = $1 AND relkind = 'S')",
        &[rel.into()],
    )
    .or_raise_as(SequenceError::spi)
    .unwrap_or(false);
    if is_sequence {
        apply_default_kind_to_new_sequence(rel.to_u32());
    } else {
        apply_default_kinds(Some(rel.to_u32()));
    }
}
