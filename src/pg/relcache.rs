//! What the apply worker caches about local tables, kept honest: a relcache callback
//! records every table whose definition changed (ALTER TABLE, DROP, a new index, ...), and
//! the apply stage drops its mapping of such a table before its next change
//! ([`take_invalidated`]), then rebuilds it from the catalog. Also the receiver's half of
//! the "what replicates" rule ([`why_not_target`]): the facts of a local table, judged by
//! the same function the output plugin uses.
//!
//! Invariants: the callback only records (it runs inside invalidation processing, where
//! no catalog access is allowed); a change to a table is applied only after its lock is
//! taken, which processes pending invalidations, and after the recorded ones are taken.

use crate::decode::{self, RelFacts};
use pgrx::pg_sys;
use std::cell::RefCell;
use std::ffi::CStr;

/// Tables invalidated since the last [`take_invalidated`]; `all` for a full reset.
#[derive(Default, Debug)]
pub struct Invalidated {
    pub all: bool,
    pub relids: Vec<pg_sys::Oid>,
}

thread_local! {
    static INVALIDATED: RefCell<Invalidated> = RefCell::new(Invalidated::default());
}

#[pgrx::pg_guard]
extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    INVALIDATED.with(|i| {
        let mut i = i.borrow_mut();
        if relid == pg_sys::InvalidOid {
            i.all = true;
            i.relids.clear();
        } else if !i.all && !i.relids.contains(&relid) {
            i.relids.push(relid);
        }
    });
}

/// Start recording relcache invalidations in this process (once, at worker start).
pub fn watch() {
    // SAFETY: registers a static function; callbacks live for the process.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(
            Some(on_relcache_invalidation),
            pg_sys::Datum::from(0),
        )
    };
}

/// Lock `relid` for writing (processing any pending invalidation of it), then return
/// (and forget) every invalidation recorded so far.
///
/// # Preconditions
/// Inside a transaction.
pub fn lock_and_take(relid: pg_sys::Oid) -> Invalidated {
    crate::pg::xact::require_transaction();
    // SAFETY: forwarded; a lock held until the end of the transaction, as table_open's.
    unsafe {
        crate::pg::unguarded::guarded(|| {
            crate::pg::unguarded::raw::LockRelationOid(relid, pg_sys::RowExclusiveLock as i32)
        })
    };
    take_invalidated()
}

/// Every invalidation recorded so far, forgotten.
pub fn take_invalidated() -> Invalidated {
    INVALIDATED.with(|i| std::mem::take(&mut *i.borrow_mut()))
}

/// Why local relation `relid` may not receive replicated changes, or `None`.
///
/// # Preconditions
/// Inside a transaction.
pub fn why_not_target(relid: pg_sys::Oid) -> Option<&'static str> {
    // SAFETY: forwarded.
    unsafe { judge(relid, true) }
}

/// Why a relation of any kind (an index, a sequence, a view as much as a table) lives
/// where nothing replicates — temporary, unlogged, in a system or bdr schema, of an
/// extension — or `None`. What DDL capture asks of the objects a statement names.
///
/// # Preconditions
/// Inside a transaction.
pub fn why_local(relid: pg_sys::Oid) -> Option<&'static str> {
    // SAFETY: forwarded.
    unsafe { judge(relid, false) }
}

/// The replication rule on `relid`'s facts; `kind_matters`: it must be an ordinary table.
///
/// # Safety
/// Inside a transaction.
unsafe fn judge(relid: pg_sys::Oid, kind_matters: bool) -> Option<&'static str> {
    crate::pg::xact::require_transaction();
    // SAFETY: syscache lookups inside a transaction; NULL results are handled.
    unsafe {
        let nsp = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relid));
        if nsp.is_null() {
            return Some("it no longer exists");
        }
        let schema = CStr::from_ptr(nsp).to_string_lossy();
        let in_ext = pg_sys::getExtensionOfObject(pg_sys::RelationRelationId, relid);
        decode::why_not_replicated(&RelFacts {
            plain_table: !kind_matters
                || pg_sys::get_rel_relkind(relid) as u8 == pg_sys::RELKIND_RELATION,
            permanent: pg_sys::get_rel_persistence(relid) as u8 == pg_sys::RELPERSISTENCE_PERMANENT,
            schema: &schema,
            owned_by_extension: in_ext != pg_sys::InvalidOid,
        })
    }
}

/// `"schema"."name"` of `relid`, quoted for SQL.
///
/// # Preconditions
/// Inside a transaction; `relid` exists.
pub fn quoted_name(relid: pg_sys::Oid) -> String {
    crate::pg::xact::require_transaction();
    // SAFETY: syscache lookups; NULL results become "?" (the statement then fails).
    unsafe {
        let part = |p: *mut std::ffi::c_char| {
            if p.is_null() {
                "?".to_string()
            } else {
                crate::pg::libpq::quote_ident(&CStr::from_ptr(p).to_string_lossy())
            }
        };
        format!(
            "{}.{}",
            part(pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relid))),
            part(pg_sys::get_rel_name(relid))
        )
    }
}

/// Whether relation `relid` was created by the current transaction (or one of its
/// subtransactions still open): nobody else can have seen it yet.
///
/// # Preconditions
/// Inside a transaction.
pub fn created_in_this_transaction(relid: pg_sys::Oid) -> bool {
    crate::pg::xact::require_transaction();
    // SAFETY: a relcache reference taken and released here; a relation that does not
    // exist gives NULL.
    unsafe {
        let rel = pg_sys::RelationIdGetRelation(relid);
        if rel.is_null() {
            return false;
        }
        // InvalidSubTransactionId is 0.
        let created = (*rel).rd_createSubid != 0;
        pg_sys::RelationClose(rel);
        created
    }
}
