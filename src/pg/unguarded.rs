//! A few PostgreSQL functions called on the apply hot path without pgrx's per-call guard.
//!
//! Why: pgrx wraps every `pg_sys` function in a guard (thread check, `sigsetjmp`, saving
//! and restoring the error stacks) so that an ERROR raised inside becomes a Rust panic
//! instead of a `longjmp` over Rust frames; the last profile put the guards at ~3% of the
//! apply process (issue 17, docs/benchmarks.md). A function that cannot raise an ERROR
//! does not need one: these are declared here a second time, plain, and the role switch
//! every write runs under (`owner::as_user`, several per change), the transaction and
//! snapshot checks, the command id and the AFTER-trigger query level use them. Two more
//! guarded calls per slot and context are skipped when there is nothing to do
//! ([`clear_slot`], [`reset_context`]).
//!
//! Invariant: only functions whose PostgreSQL 15 source cannot `ereport`/`elog` (each
//! note says what the function does); anything that may raise goes through `pg_sys`.

use pgrx::pg_sys::{self, Oid};
use std::ffi::c_int;

#[allow(clashing_extern_declarations)]
extern "C" {
    /// miscinit.c: two assignments from globals.
    pub fn GetUserIdAndSecContext(userid: *mut Oid, sec_context: *mut c_int);
    /// miscinit.c: two assignments to globals.
    pub fn SetUserIdAndSecContext(userid: Oid, sec_context: c_int);
    /// snapmgr.c: `return ActiveSnapshot != NULL`.
    pub fn ActiveSnapshotSet() -> bool;
    /// xact.c: `return CurrentTransactionState->state == TRANS_INPROGRESS`.
    pub fn IsTransactionState() -> bool;
    /// trigger.c: `afterTriggers.query_depth++`.
    pub fn AfterTriggerBeginQuery();
    /// xact.c: sets a flag (an `Assert` against parallel workers), returns a global.
    pub fn GetCurrentCommandId(used: bool) -> pg_sys::CommandId;
    /// xact.c: compares with the transaction stack's xids (a binary search).
    pub fn TransactionIdIsCurrentTransactionId(xid: pg_sys::TransactionId) -> bool;
}

/// Clear `slot` unless it is empty already (the clear is a call through the slot's
/// callbacks, guarded by pgrx; most slots are empty at the end of a change).
///
/// # Safety
/// `slot` is a valid slot, inside the transaction it was filled in.
pub unsafe fn clear_slot(slot: *mut pg_sys::TupleTableSlot) {
    // SAFETY: a read of the slot's flags, then the ordinary clear.
    unsafe {
        if (*slot).tts_flags & pg_sys::TTS_FLAG_EMPTY as u16 == 0 {
            pg_sys::ExecClearTuple(slot);
        }
    }
}

/// Reset memory context `cxt` unless nothing was allocated in it since its last reset.
///
/// # Safety
/// Nothing allocated in `cxt` is used afterwards.
pub unsafe fn reset_context(cxt: pg_sys::MemoryContext) {
    // SAFETY: a read of the context's flag, then the ordinary reset.
    unsafe {
        if !(*cxt).isReset {
            pg_sys::MemoryContextReset(cxt);
        }
    }
}
