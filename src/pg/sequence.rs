//! The PostgreSQL side of snowflake sequences: privilege and kind checks on the hot path,
//! and the cold-path reads and writes of a sequence's persisted floor.
//!
//! Why here: these call `pg_sys` directly (no SPI, so `bdr.snowflake_nextval` stays cheap)
//! and switch the user id for a moment, which only code under `src/pg/` may do.
//!
//! Invariants:
//! - the caller's rights are checked exactly as `nextval` checks them (USAGE or UPDATE on
//!   the sequence) before anything is read or written;
//! - the floor is written with `setval` as the sequence's *owner* (a caller with USAGE
//!   only may take values, as with `nextval`, but has no right to `setval`); the user id
//!   is switched back even when `setval` raises an error;
//! - reading `bdr.nodes` for the node number runs as the bootstrap superuser, for a fixed
//!   query that takes no input from the caller.

use pgrx::{pg_sys, IntoDatum, PgRelation};

/// `nextval`'s checks before an id is drawn from sequence `relid`, under one guard (every
/// call of `bdr.snowflake_nextval` runs them): whether the current role has USAGE or
/// UPDATE on it (false: the caller refuses), and then, as `nextval` does, an ERROR in a
/// read-only transaction or on a hot standby.
pub fn may_draw(relid: pg_sys::Oid) -> bool {
    use crate::pg::unguarded::{guarded, raw, GetUserId};
    // SAFETY: a catalog lookup and a read of the transaction state inside a transaction;
    // a missing relation or a read-only transaction raises an ERROR, which the guard
    // turns into a Rust panic. The closure holds plain values only.
    unsafe {
        guarded(|| {
            let mode = (pg_sys::ACL_USAGE | pg_sys::ACL_UPDATE) as pg_sys::AclMode;
            let ok =
                raw::pg_class_aclcheck(relid, GetUserId(), mode) == pg_sys::AclResult::ACLCHECK_OK;
            if ok {
                raw::PreventCommandIfReadOnly(c"bdr.snowflake_nextval()".as_ptr());
            }
            ok
        })
    }
}

/// Whether `relid` is a sequence.
pub fn is_sequence(relid: pg_sys::Oid) -> bool {
    // SAFETY: a syscache lookup; returns 0 for a missing relation.
    unsafe { pg_sys::get_rel_relkind(relid) as u8 == pg_sys::RELKIND_SEQUENCE }
}

fn owner_of(relid: pg_sys::Oid) -> pg_sys::Oid {
    // SAFETY: opens an existing relation (checked by the caller's privilege check, which
    // raises for a missing one) under AccessShareLock; rd_rel is valid while it is open.
    unsafe {
        let rel = PgRelation::with_lock(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        (*rel.rd_rel).relowner
    }
}

/// Restores the user id and security context when dropped (also while unwinding from an
/// ERROR).
struct RestoreUser(pg_sys::Oid, i32);

impl Drop for RestoreUser {
    fn drop(&mut self) {
        // SAFETY: puts back the values read by `as_user`.
        unsafe { pg_sys::SetUserIdAndSecContext(self.0, self.1) }
    }
}

/// Run `f` as `role` (a local user-id change, like a SECURITY DEFINER function's).
pub fn as_user<R>(role: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let mut uid = pg_sys::Oid::INVALID;
    let mut sec = 0i32;
    // SAFETY: reads and sets the backend's current user id; restored by RestoreUser.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut uid, &mut sec);
        pg_sys::SetUserIdAndSecContext(role, sec | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
    }
    let _restore = RestoreUser(uid, sec);
    f()
}

/// Run `f` as the bootstrap superuser (fixed catalog reads of schema bdr).
pub fn as_superuser<R>(f: impl FnOnce() -> R) -> R {
    as_user(pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID), f)
}

/// The sequence's last value if it was ever called (`pg_sequence_last_value`), read as
/// its owner; `None` for a fresh sequence.
pub fn last_value(relid: pg_sys::Oid) -> Option<i64> {
    let owner = owner_of(relid);
    as_user(owner, || {
        // SAFETY: a direct call of a built-in with one non-null regclass argument.
        unsafe {
            pgrx::direct_function_call::<i64>(pg_sys::pg_sequence_last_value, &[relid.into_datum()])
        }
    })
}

/// `setval(relid, value)` as the sequence's owner: non-transactional and WAL-logged, so
/// the value is durable before any commit that follows it in the WAL.
pub fn set_value(relid: pg_sys::Oid, value: i64) {
    let owner = owner_of(relid);
    as_user(owner, || {
        // SAFETY: a direct call of a built-in with two non-null arguments.
        unsafe {
            pgrx::direct_function_call::<i64>(
                pg_sys::setval_oid,
                &[relid.into_datum(), value.into_datum()],
            );
        }
    });
}

/// Whether backend `pid` is alive (a slot it was persisting for can be taken over if not).
pub fn backend_alive(pid: i32) -> bool {
    // SAFETY: looks the pid up in the proc array under its lock; null if gone.
    unsafe { !pg_sys::BackendPidGetProc(pid).is_null() }
}

/// This backend's pid.
pub fn my_pid() -> i32 {
    // SAFETY: a plain read of a global set at backend start.
    unsafe { pg_sys::MyProcPid }
}

/// Sleep briefly (waiting for the next millisecond or another backend's floor write),
/// honouring cancel requests.
pub fn short_wait() {
    pgrx::check_for_interrupts!();
    // SAFETY: a plain sleep.
    unsafe { pg_sys::pg_usleep(50) }
}
