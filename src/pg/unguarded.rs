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
//! Several calls that may raise, made one after another on the hot path (start and
//! commit a transaction, open a table and its indexes, clear an executor's slots), go
//! under one guard instead of one each ([`guarded`] with the [`raw`] declarations):
//! `bdr-bench count-update` counted ~41 guarded calls per single-row UPDATE (now ~12), ~100
//! instructions each, together about as much as bdr's apply used beyond native's.
//!
//! Every [`guarded`] call goes through one copy of pgrx's guard ([`guard_dyn`]), and the
//! apply path's other calls that may raise (a row's lookup, update and delete, a type's
//! input function, commit timestamps, LWLocks, the table lock, a context reset) are made
//! through it too: pgrx's guard is generic, so each guarded function had its own copy of
//! it, and the apply path touched a dozen copies once per transaction, each a miss of the
//! instruction cache (issue 17: the apply's CPU time above native's at fewer instructions
//! is mostly such misses in bdr's own code).
//!
//! Invariants: the plain declarations are only functions whose PostgreSQL 15 source
//! cannot `ereport`/`elog` (each note says what the function does). A function that may
//! raise is called through `pg_sys` (its own guard) or, from [`raw`], only inside
//! [`guarded`], whose closure holds no value with a destructor and cannot panic: an
//! ERROR longjmps over its frame to the guard, which turns it into a Rust panic as
//! `pg_sys` does.

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
    /// miscinit.c: returns a global (an `Assert` that it is set).
    pub fn GetUserId() -> Oid;
    /// xact.c: returns the top transaction's xid from a global.
    pub fn GetTopTransactionIdIfAny() -> pg_sys::TransactionId;
    /// timestamp.c: `gettimeofday` and arithmetic.
    pub fn GetCurrentTimestamp() -> pg_sys::TimestampTz;
    /// xact.c: `stmtStartTimestamp = GetCurrentTimestamp()` (a clock read; an `Assert`
    /// against parallel workers).
    pub fn SetCurrentStatementStartTimestamp();
    /// xact.c: reads the transaction state's block state.
    pub fn IsTransactionOrTransactionBlock() -> bool;
    /// backend_status.c: writes this backend's own status entry in shared memory (under
    /// its change count, no lock) and reads the clock; with no command string nothing is
    /// copied or allocated.
    pub fn pgstat_report_activity(
        state: pg_sys::BackendState::Type,
        cmd_str: *const std::ffi::c_char,
    );
    /// xlog.c: reads the flush position under a spinlock (a stuck spinlock PANICs, which
    /// aborts the process: no `longjmp`).
    pub fn GetFlushRecPtr(insert_tli: *mut pg_sys::TimeLineID) -> pg_sys::XLogRecPtr;
    /// execTuples.c: sets the slot's flags and `tts_nvalid` (the rest are `Assert`s).
    pub fn ExecStoreVirtualTuple(slot: *mut pg_sys::TupleTableSlot) -> *mut pg_sys::TupleTableSlot;
}

/// Functions that may raise an ERROR, declared plain: call them only inside [`guarded`].
pub mod raw {
    use pgrx::pg_sys::{self, Oid};
    use std::ffi::c_int;

    #[allow(clashing_extern_declarations)]
    extern "C-unwind" {
        pub fn StartTransactionCommand();
        pub fn pg_class_aclcheck(
            table_oid: Oid,
            roleid: Oid,
            mode: pg_sys::AclMode,
        ) -> pg_sys::AclResult::Type;
        pub fn PreventCommandIfReadOnly(cmdname: *const std::ffi::c_char);
        pub fn CommitTransactionCommand();
        pub fn pgstat_report_stat(force: bool) -> std::ffi::c_long;
        pub fn GetTransactionSnapshot() -> pg_sys::Snapshot;
        pub fn PushActiveSnapshot(snapshot: pg_sys::Snapshot);
        pub fn PopActiveSnapshot();
        pub fn table_open(relation_id: Oid, lockmode: c_int) -> pg_sys::Relation;
        pub fn table_close(relation: pg_sys::Relation, lockmode: c_int);
        pub fn index_open(relation_id: Oid, lockmode: c_int) -> pg_sys::Relation;
        pub fn index_close(relation: pg_sys::Relation, lockmode: c_int);
        pub fn CheckCmdReplicaIdentity(rel: pg_sys::Relation, cmd: pg_sys::CmdType::Type);
        pub fn ExecConstraints(
            rri: *mut pg_sys::ResultRelInfo,
            slot: *mut pg_sys::TupleTableSlot,
            estate: *mut pg_sys::EState,
        );
        pub fn ExecPartitionCheck(
            rri: *mut pg_sys::ResultRelInfo,
            slot: *mut pg_sys::TupleTableSlot,
            estate: *mut pg_sys::EState,
            emit_error: bool,
        ) -> bool;
        pub fn GetCurrentTransactionId() -> pg_sys::TransactionId;
        pub fn SpeculativeInsertionLockAcquire(xid: pg_sys::TransactionId) -> u32;
        pub fn SpeculativeInsertionLockRelease(xid: pg_sys::TransactionId);
        pub fn ExecInsertIndexTuples(
            rri: *mut pg_sys::ResultRelInfo,
            slot: *mut pg_sys::TupleTableSlot,
            estate: *mut pg_sys::EState,
            update: bool,
            no_dup_err: bool,
            spec_conflict: *mut bool,
            arbiter_indexes: *mut pg_sys::List,
        ) -> *mut pg_sys::List;
        pub fn list_free(list: *mut pg_sys::List);
        pub fn RelationFindReplTupleByIndex(
            rel: pg_sys::Relation,
            index: Oid,
            mode: pg_sys::LockTupleMode::Type,
            search: *mut pg_sys::TupleTableSlot,
            out: *mut pg_sys::TupleTableSlot,
        ) -> bool;
        pub fn RelationFindReplTupleSeq(
            rel: pg_sys::Relation,
            mode: pg_sys::LockTupleMode::Type,
            search: *mut pg_sys::TupleTableSlot,
            out: *mut pg_sys::TupleTableSlot,
        ) -> bool;
        pub fn slot_getsomeattrs_int(slot: *mut pg_sys::TupleTableSlot, attnum: c_int);
        pub fn ExecSimpleRelationUpdate(
            rri: *mut pg_sys::ResultRelInfo,
            estate: *mut pg_sys::EState,
            epq: *mut pg_sys::EPQState,
            search: *mut pg_sys::TupleTableSlot,
            slot: *mut pg_sys::TupleTableSlot,
        );
        pub fn ExecSimpleRelationDelete(
            rri: *mut pg_sys::ResultRelInfo,
            estate: *mut pg_sys::EState,
            epq: *mut pg_sys::EPQState,
            search: *mut pg_sys::TupleTableSlot,
        );
        pub fn TransactionIdGetCommitTsData(
            xid: pg_sys::TransactionId,
            ts: *mut pg_sys::TimestampTz,
            origin: *mut pg_sys::RepOriginId,
        ) -> bool;
        pub fn LWLockAcquire(lock: *mut pg_sys::LWLock, mode: pg_sys::LWLockMode::Type) -> bool;
        pub fn LWLockRelease(lock: *mut pg_sys::LWLock);
        pub fn LockRelationOid(relid: Oid, mode: c_int);
        pub fn MemoryContextReset(cxt: pg_sys::MemoryContext);
        /// datum.c (not in pgrx's bindings): binary equality, no detoasting.
        pub fn datumIsEqual(
            value1: pg_sys::Datum,
            value2: pg_sys::Datum,
            typ_by_val: bool,
            typ_len: c_int,
        ) -> bool;
        pub fn InputFunctionCall(
            flinfo: *mut pg_sys::FmgrInfo,
            text: *mut std::ffi::c_char,
            typioparam: Oid,
            typmod: c_int,
        ) -> pg_sys::Datum;
        pub fn ExecARInsertTriggers(
            estate: *mut pg_sys::EState,
            rri: *mut pg_sys::ResultRelInfo,
            slot: *mut pg_sys::TupleTableSlot,
            recheck_indexes: *mut pg_sys::List,
            transition_capture: *mut pg_sys::TransitionCaptureState,
        );
        pub fn ExecBRUpdateTriggers(
            estate: *mut pg_sys::EState,
            epq: *mut pg_sys::EPQState,
            rri: *mut pg_sys::ResultRelInfo,
            tupleid: pg_sys::ItemPointer,
            fdw_trigtuple: pg_sys::HeapTuple,
            slot: *mut pg_sys::TupleTableSlot,
            tmfdp: *mut pg_sys::TM_FailureData,
        ) -> bool;
        pub fn ExecComputeStoredGenerated(
            rri: *mut pg_sys::ResultRelInfo,
            estate: *mut pg_sys::EState,
            slot: *mut pg_sys::TupleTableSlot,
            cmdtype: pg_sys::CmdType::Type,
        );
        pub fn simple_table_tuple_update(
            rel: pg_sys::Relation,
            otid: pg_sys::ItemPointer,
            slot: *mut pg_sys::TupleTableSlot,
            snapshot: pg_sys::Snapshot,
            update_indexes: *mut bool,
        );
        #[allow(clippy::too_many_arguments)]
        pub fn ExecARUpdateTriggers(
            estate: *mut pg_sys::EState,
            rri: *mut pg_sys::ResultRelInfo,
            src_partinfo: *mut pg_sys::ResultRelInfo,
            dst_partinfo: *mut pg_sys::ResultRelInfo,
            tupleid: pg_sys::ItemPointer,
            fdw_trigtuple: pg_sys::HeapTuple,
            slot: *mut pg_sys::TupleTableSlot,
            recheck_indexes: *mut pg_sys::List,
            transition_capture: *mut pg_sys::TransitionCaptureState,
            is_crosspart_update: bool,
        );
        pub fn lappend_oid(list: *mut pg_sys::List, datum: Oid) -> *mut pg_sys::List;
        pub fn ExecARDeleteTriggers(
            estate: *mut pg_sys::EState,
            rri: *mut pg_sys::ResultRelInfo,
            tupleid: pg_sys::ItemPointer,
            fdw_trigtuple: pg_sys::HeapTuple,
            transition_capture: *mut pg_sys::TransitionCaptureState,
            is_crosspart_update: bool,
        );
        pub fn ScanKeyInit(
            entry: pg_sys::ScanKey,
            attribute_number: pg_sys::AttrNumber,
            strategy: pg_sys::StrategyNumber,
            procedure: pg_sys::RegProcedure,
            argument: pg_sys::Datum,
        );
        pub fn index_beginscan(
            heap: pg_sys::Relation,
            index: pg_sys::Relation,
            snapshot: pg_sys::Snapshot,
            nkeys: c_int,
            norderbys: c_int,
        ) -> pg_sys::IndexScanDesc;
        pub fn index_rescan(
            scan: pg_sys::IndexScanDesc,
            keys: pg_sys::ScanKey,
            nkeys: c_int,
            orderbys: pg_sys::ScanKey,
            norderbys: c_int,
        );
        pub fn index_getnext_slot(
            scan: pg_sys::IndexScanDesc,
            direction: pg_sys::ScanDirection::Type,
            slot: *mut pg_sys::TupleTableSlot,
        ) -> bool;
        pub fn index_endscan(scan: pg_sys::IndexScanDesc);
        pub fn XactLockTableWait(
            xid: pg_sys::TransactionId,
            rel: pg_sys::Relation,
            ctid: pg_sys::ItemPointer,
            oper: pg_sys::XLTW_Oper::Type,
        );
    }
}

/// Functions that may raise an ERROR, declared plain for one use: the last call of a hook
/// function that has no guard and holds nothing in its frame (no value with a
/// destructor, nothing after the call), so that an ERROR passes over that frame as over
/// a C hook's, and the hook costs what a C hook costs (see `utility::executor_start_hook`).
pub mod tail {
    use pgrx::pg_sys;
    use std::ffi::c_int;

    #[allow(clashing_extern_declarations)]
    extern "C-unwind" {
        pub fn standard_ExecutorStart(query_desc: *mut pg_sys::QueryDesc, eflags: c_int);
    }
}

/// Run `f`, a few calls of [`raw`] functions, under one pgrx guard: an ERROR raised in it
/// becomes a Rust panic, as it does from a `pg_sys` call.
///
/// # Safety
/// `f` only makes raw calls on plain values: no value with a destructor lives in its
/// frame and nothing in it panics (an ERROR longjmps over it). Main thread only.
///
/// Every caller shares one copy of the guard's code ([`guard_dyn`]): pgrx's guard is
/// generic, so each guarded function had its own (~100 bytes of `sigsetjmp` set-up and
/// error-stack bookkeeping each), and the apply path, touching a dozen of them once per
/// transaction, missed the instruction cache on every one.
pub unsafe fn guarded<T>(f: impl FnOnce() -> T) -> T {
    let mut f = Some(f);
    let mut out = None;
    // SAFETY: forwarded to the caller: the closure's frame holds two references and `f`
    // (plain values), `out` is written only after `f` returned.
    unsafe {
        guard_dyn(&mut || {
            if let Some(f) = f.take() {
                out = Some(f());
            }
        });
    }
    match out {
        Some(v) => v,
        // `guard_dyn` returns only after calling its closure (an ERROR unwinds instead).
        None => unreachable!("the guarded closure ran"),
    }
}

/// The one instance of pgrx's guard behind [`guarded`].
///
/// # Safety
/// As [`guarded`].
#[inline(never)]
unsafe fn guard_dyn(f: &mut dyn FnMut()) {
    // SAFETY: forwarded to the caller.
    unsafe { pg_sys::ffi::pg_guard_ffi_boundary(f) }
}

/// The pointers of PostgreSQL list `list` (NIL: none), read in place.
///
/// # Safety
/// `list` is NIL or a valid pointer list, unchanged while the result is used.
pub unsafe fn list_ptrs<T>(list: *mut pg_sys::List) -> impl Iterator<Item = *mut T> {
    // SAFETY: a valid list has `length` cells from `elements`.
    let (cells, n) = unsafe {
        if list.is_null() {
            (std::ptr::null_mut(), 0)
        } else {
            ((*list).elements, (*list).length as usize)
        }
    };
    // SAFETY: i < n cells (see above).
    (0..n).map(move |i| unsafe { (*cells.add(i)).ptr_value as *mut T })
}

/// Clear every slot of list `slots` that is not empty, under one guard (a clear releases
/// a buffer pin or frees a copied tuple).
///
/// # Safety
/// `slots` is NIL or a list of valid slots of the current transaction.
pub unsafe fn clear_slots(slots: *mut pg_sys::List) {
    let empty = pg_sys::TTS_FLAG_EMPTY as u16;
    // SAFETY: reads of each slot's flags; the clear is ExecClearTuple's own call through
    // the slot's callbacks (ExecClearTuple is an inline function). The closure holds only
    // raw pointers and the list iterator (plain values).
    unsafe {
        if list_ptrs::<pg_sys::TupleTableSlot>(slots).all(|s| (*s).tts_flags & empty != 0) {
            return;
        }
        guarded(|| {
            for slot in list_ptrs::<pg_sys::TupleTableSlot>(slots) {
                if (*slot).tts_flags & empty == 0 {
                    if let Some(clear) = (*(*slot).tts_ops).clear {
                        clear(slot);
                    }
                }
            }
        });
    }
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
            guarded(|| raw::MemoryContextReset(cxt));
        }
    }
}
