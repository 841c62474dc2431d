//! Keys that cannot collide (DESIGN.md §7): `bdr.snowflake_nextval`, the sequence kinds
//! (`snowflake`, `offset`, `local`) and `bdr.default_sequence_kind`.
//!
//! Why: every node of a group inserts, and a plain sequence on node A hands out the same
//! values as on node B; under last-update-wins one customer's row would silently replace
//! another's. A `snowflake` id carries the node number (layout in `bdr_core::snowflake`);
//! an `offset` sequence (for integer and identity columns) steps by 1024 from
//! `node number + 1`, so each node has its own residue class.
//!
//! Hot path (`snowflake_nextval`): a privilege check (syscache), one exclusive LWLock
//! section over a small shared table, the clock; no SPI, no catalog write. Every
//! [`FLOOR_AHEAD_MS`](bdr_core::snowflake::FLOOR_AHEAD_MS)/2 of id time, one caller also
//! `setval`s the sequence to a floor a second ahead.
//!
//! Invariants:
//! - ids of one sequence on one node strictly increase, across restarts and clock steps
//!   back: an id is handed out only once the sequence holds a floor at least as large, and
//!   a slot (re)built after a restart or eviction starts above the sequence's value;
//! - a node number is needed to make ids: without one (not a member) it is an ERROR, never
//!   a guess;
//! - bad input to `alter_sequence_set_kind` is an ERROR with a hint before any change.

use crate::catalog::nodes;
use crate::error::{raise, OrRaise, PgError};
use crate::gucs::{DefaultSequenceKind, DEFAULT_SEQUENCE_KIND};
use crate::pg::libpq::quote_ident;
use crate::pg::sequence as pgseq;
use crate::pg::shmem;
use bdr_core::snowflake::{self, Persist, Step, OFFSET_INCREMENT};
use pgrx::prelude::*;
use pgrx::{PgRelation, PgSqlErrorCode};
use std::cell::Cell;

#[derive(Debug, thiserror::Error)]
pub enum SequenceError {
    #[error("\"{0}\" is not a sequence")]
    NotSequence(String),
    #[error("unknown sequence kind \"{0}\"")]
    BadKind(String),
    #[error("column {column} is {ty}: snowflake ids need a bigint column")]
    NotBigint { column: String, ty: String },
    #[error("sequence {seq} is of type {ty}: snowflake ids need a bigint sequence")]
    SequenceNotBigint { seq: String, ty: String },
    #[error("column {0} is an identity column: snowflake ids need a DEFAULT")]
    Identity(String),
    #[error("this node has no bdr node number")]
    NoNodeNumber,
    #[error("permission denied for sequence {0}")]
    PermissionDenied(String),
    #[error("sequence {seq} has no offset value left above {current} (its maximum is {max})")]
    OffsetExhausted { seq: String, current: i64, max: i64 },
    #[error("too many snowflake sequences are being persisted at once")]
    TableBusy,
    #[error("{0}")]
    Spi(String),
}

impl SequenceError {
    /// One of bdr's own queries failed (a bug).
    fn spi(e: pgrx::spi::Error) -> Self {
        SequenceError::Spi(e.to_string())
    }
}

impl PgError for SequenceError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        use SequenceError::*;
        match self {
            NotSequence(_) | Identity(_) => PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            BadKind(_) => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            NotBigint { .. } | SequenceNotBigint { .. } => {
                PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH
            }
            NoNodeNumber => PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            PermissionDenied(_) => PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            OffsetExhausted { .. } => PgSqlErrorCode::ERRCODE_SEQUENCE_GENERATOR_LIMIT_EXCEEDED,
            TableBusy => PgSqlErrorCode::ERRCODE_OUT_OF_MEMORY,
            Spi(_) => PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        }
    }
    fn hint(&self) -> Option<String> {
        use SequenceError::*;
        Some(match self {
            NotSequence(_) => "Pass the sequence behind the column, e.g. \
                 pg_get_serial_sequence('orders', 'id')::regclass."
                .into(),
            BadKind(_) => "The kind is 'snowflake' (bigint columns), 'offset' (integer or \
                 identity columns) or 'local' (plain PostgreSQL, not safe for writes on \
                 several nodes)."
                .into(),
            NotBigint { .. } => "Use kind 'offset' for integer columns, or change the \
                 column to bigint first (ALTER TABLE ... ALTER COLUMN ... TYPE bigint)."
                .into(),
            SequenceNotBigint { .. } => "ALTER SEQUENCE ... AS bigint first.".into(),
            Identity(_) => "Identity columns use kind 'offset' (the identity keeps its \
                 sequence, stepping by 1024); for snowflake ids, DROP IDENTITY and give the \
                 column a serial sequence first."
                .into(),
            NoNodeNumber => "Snowflake and offset sequences need this node's number: create \
                 or join a group first (bdr.group_create, bdr.group_join), or switch the \
                 sequence to plain PostgreSQL with bdr.alter_sequence_set_kind(seq, 'local')."
                .into(),
            PermissionDenied(s) => format!("GRANT USAGE ON SEQUENCE {s} TO the role."),
            OffsetExhausted { .. } => "Change the column and the sequence to bigint and use \
                 kind 'snowflake'."
                .into(),
            TableBusy => "Retry; if it persists, fewer sequences should be in use at once.".into(),
            Spi(_) => "This is a bug in bdr; please report it with the server log.".into(),
        })
    }
}

// ---------------------------------------------------------------------------------------
// snowflake_nextval

thread_local! {
    /// The shared slot this backend last used, tried first (checked under the lock).
    static HINT: Cell<Option<(u32, usize)>> = const { Cell::new(None) };
}

fn now_ms() -> u64 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    snowflake::ms_since_epoch(unix)
}

/// This database's node number, read from `bdr.nodes` and cached in shared memory (the
/// hot path reads the cache under the lock it takes anyway).
fn load_node_number(dboid: u32) -> u16 {
    let n = pgseq::as_superuser(|| {
        nodes::read_one::<i32>("SELECT node_number FROM bdr.nodes WHERE is_local")
    });
    match n {
        Some(n) if (0..=snowflake::MAX_NODE_NUMBER as i32).contains(&n) => {
            shmem::with_sequences(|t| t.set_node_number(dboid, Some(n as u16)));
            n as u16
        }
        _ => raise(&SequenceError::NoNodeNumber),
    }
}

/// Forget the cached node number of this database when the current transaction commits
/// (it created or joined a group).
pub fn forget_node_number_at_commit() {
    let dboid = nodes::my_database_oid();
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, move || {
        shmem::with_sequences(|t| t.set_node_number(dboid, None))
    });
}

/// After a kind change: the shared slot of `relid`, if any, counts only the sequence's
/// current value as persisted (it may have been restarted, or moved past the old floor by
/// plain `nextval`), and its generator stays above both (see `Sequences::refresh`).
fn refresh_slot(relid: pg_sys::Oid) {
    let dboid = nodes::my_database_oid();
    let floor = pgseq::last_value(relid).unwrap_or(0);
    shmem::with_sequences(|t| t.refresh(dboid, relid.to_u32(), floor));
}

enum Outcome {
    NoNodeNumber,
    NoSlot,
    Wait,
    Issue(i64, Option<i64>),
    PersistFirst(usize, i64),
    Busy(usize, i32),
}

/// Clears a slot's "persisting" mark when dropped, recording the new floor if it was
/// written (also while unwinding from an ERROR in `setval`).
struct Persisting {
    slot: usize,
    dboid: u32,
    relid: u32,
    written: Option<i64>,
}

impl Drop for Persisting {
    fn drop(&mut self) {
        let me = pgseq::my_pid();
        shmem::with_sequences(|t| {
            let s = &mut t.slots[self.slot];
            if s.dboid == self.dboid && s.relid == self.relid && s.persisting == me {
                if let Some(f) = self.written {
                    s.persisted = s.persisted.max(f);
                }
                s.persisting = 0;
            }
        });
    }
}

fn persist(slot: usize, dboid: u32, relid: pg_sys::Oid, floor: i64) {
    let mut guard = Persisting {
        slot,
        dboid,
        relid: relid.to_u32(),
        written: None,
    };
    pgseq::set_value(relid, floor);
    guard.written = Some(floor);
}

/// The next snowflake id of sequence `seq` on this node (see the module note).
#[pg_extern(sql = "
CREATE FUNCTION bdr.snowflake_nextval(seq regclass) RETURNS bigint
    LANGUAGE c VOLATILE STRICT PARALLEL UNSAFE
    AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
COMMENT ON FUNCTION bdr.snowflake_nextval(regclass) IS
    'Next conflict-free id: ms since 2024-01-01 | node number | counter';
")]
fn snowflake_nextval(seq: pg_sys::Oid) -> i64 {
    if !pgseq::may_use(seq) {
        raise(&SequenceError::PermissionDenied(seq_name(seq)));
    }
    pgseq::prevent_if_read_only();
    let dboid = nodes::my_database_oid();
    let relid = seq.to_u32();
    let me = pgseq::my_pid();
    loop {
        let now = now_ms();
        let hint = HINT.with(|h| h.get()).filter(|(r, _)| *r == relid);
        let outcome = shmem::with_sequences(|t| {
            let Some(node) = t.node_number(dboid) else {
                return (Outcome::NoNodeNumber, None);
            };
            let Some(i) = t.find(dboid, relid, hint.map(|(_, i)| i)) else {
                return (Outcome::NoSlot, None);
            };
            t.tick += 1;
            let tick = t.tick;
            let s = &mut t.slots[i];
            s.last_used = tick;
            let out = match s.generator.next(now, node) {
                Step::Wait => Outcome::Wait,
                Step::Issue { id, next } => {
                    match snowflake::plan_persist(id, s.persisted, s.persisting != 0) {
                        Persist::Nothing => {
                            s.generator = next;
                            Outcome::Issue(id, None)
                        }
                        Persist::After(f) => {
                            s.generator = next;
                            s.persisting = me;
                            Outcome::Issue(id, Some(f))
                        }
                        Persist::Before(f) if s.persisting == 0 => {
                            s.persisting = me;
                            Outcome::PersistFirst(i, f)
                        }
                        Persist::Before(_) => Outcome::Busy(i, s.persisting),
                    }
                }
            };
            (out, Some(i))
        });
        if let (_, Some(i)) = outcome {
            HINT.with(|h| h.set(Some((relid, i))));
        }
        match outcome.0 {
            Outcome::Issue(id, None) => return id,
            Outcome::Issue(id, Some(f)) => {
                persist(outcome.1.expect("slot"), dboid, seq, f);
                return id;
            }
            Outcome::PersistFirst(i, f) => persist(i, dboid, seq, f),
            Outcome::Wait => pgseq::short_wait(),
            Outcome::Busy(i, pid) => {
                // This backend is not persisting (it is here), and a dead one never will
                // clear its mark: take it over. Otherwise wait for the floor.
                if pid == me || !pgseq::backend_alive(pid) {
                    shmem::with_sequences(|t| {
                        let s = &mut t.slots[i];
                        if s.dboid == dboid && s.relid == relid && s.persisting == pid {
                            s.persisting = 0;
                        }
                    });
                } else {
                    pgseq::short_wait();
                }
            }
            Outcome::NoNodeNumber => {
                load_node_number(dboid);
            }
            Outcome::NoSlot => {
                if !pgseq::is_sequence(seq) {
                    raise(&SequenceError::NotSequence(seq_name(seq)));
                }
                let floor = pgseq::last_value(seq).unwrap_or(0);
                if shmem::with_sequences(|t| t.insert(dboid, relid, floor)).is_none() {
                    raise(&SequenceError::TableBusy);
                }
            }
        }
    }
}

fn seq_name(seq: pg_sys::Oid) -> String {
    nodes::read_one::<String>(&format!("SELECT {}::oid::regclass::text", seq.to_u32()))
        .unwrap_or_else(|| seq.to_u32().to_string())
}

// ---------------------------------------------------------------------------------------
// Kinds

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

/// Make `seq` of kind `kind` on this node. Checks everything before changing anything.
fn set_kind(seq: u32, kind: Kind, node: Option<u16>) {
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
            run(&format!(
                "ALTER SEQUENCE {} INCREMENT BY {OFFSET_INCREMENT} RESTART WITH {start}",
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

fn check_sequence(seq: &PgRelation) -> u32 {
    let oid = seq.oid();
    if !pgseq::is_sequence(oid) {
        raise(&SequenceError::NotSequence(seq_name(oid)));
    }
    oid.to_u32()
}

/// Give sequence `seq` kind `kind` ('snowflake', 'offset' or 'local') on this node,
/// switching the DEFAULT of the columns that draw from it. Run it on every node (DDL
/// does not replicate).
#[pg_extern]
fn alter_sequence_set_kind(seq: PgRelation, kind: &str) {
    let Some(k) = Kind::parse(kind) else {
        raise(&SequenceError::BadKind(kind.into()))
    };
    let oid = check_sequence(&seq);
    set_kind(oid, k, local_node_number());
}

/// The kind sequence `seq` has on this node.
#[pg_extern]
fn sequence_kind(seq: PgRelation) -> &'static str {
    let oid = check_sequence(&seq);
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
    let tables: Vec<u32> = Spi::connect(|c| {
        c.select(&sql, None, &[])?
            .map(|r| r.get::<pg_sys::Oid>(1).map(|o| o.map_or(0, |o| o.to_u32())))
            .collect::<Result<Vec<_>, _>>()
    })
    .or_raise_as(SequenceError::spi);
    let want = DEFAULT_SEQUENCE_KIND.get();
    for t in tables {
        let seqs: Vec<u32> = Spi::connect(|c| {
            c.select(
                &format!(
                    "SELECT d.objid FROM pg_depend d JOIN pg_class s ON s.oid = d.objid \
                      WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass \
                        AND d.refobjid = {t} AND d.refobjsubid > 0 AND d.deptype IN ('a', 'i') \
                        AND s.relkind = 'S' ORDER BY d.refobjsubid"
                ),
                None,
                &[],
            )?
            .map(|r| r.get::<pg_sys::Oid>(1).map(|o| o.map_or(0, |o| o.to_u32())))
            .collect::<Result<Vec<_>, _>>()
        })
        .or_raise_as(SequenceError::spi);
        for seq in seqs {
            let cols = columns_of(seq);
            let f = facts(seq);
            match current_kind(&cols, &f) {
                Kind::Snowflake => {}
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
    }
}

/// Event-trigger helper: default sequence kinds for one new table (see
/// [`apply_default_kinds`]). Not for direct use (EXECUTE is not granted).
#[pg_extern]
fn apply_default_sequence_kinds(rel: pg_sys::Oid) {
    apply_default_kinds(Some(rel.to_u32()));
}
