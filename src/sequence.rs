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
use crate::pg::sequence as pgseq;
use crate::pg::shmem;
use bdr_core::snowflake::{self, Persist, Step};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use std::cell::Cell;

mod kinds;

pub use kinds::{apply_default_kinds, Kind};

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
    if !pgseq::may_draw(seq) {
        raise(&SequenceError::PermissionDenied(seq_name(seq)));
    }
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
