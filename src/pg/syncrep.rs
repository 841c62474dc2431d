//! Raw half of synchronous commit to peers (policy: [`crate::sync_commit`]).
//!
//! What it reads and writes of PostgreSQL:
//! - a transaction callback (`RegisterXactCallback`) that calls the policy at
//!   `XACT_EVENT_PRE_COMMIT` (the transaction can still write) and at
//!   `XACT_EVENT_COMMIT` (the commit record is written and flushed, the transaction is
//!   visible: nothing may raise an ERROR any more, exactly like PostgreSQL's own
//!   `SyncRepWaitForLSN`, which only warns when its wait is cancelled);
//! - the replication slots array in shared memory, for each bdr slot's
//!   `confirmed_flush`: the position the peer's apply worker reported as applied *and*
//!   flushed on the peer (the walsender stores it on every status update);
//! - `LogLogicalMessage`, to put a marker in the transaction that asks the peers' apply
//!   workers to flush and acknowledge it at once;
//! - the process latch and the cancel/terminate flags, for an interruptible wait.

use pgrx::pg_sys;
use std::ffi::{c_char, CStr};

extern "C-unwind" {
    // replication/message.h (not in pgrx's bindings).
    fn LogLogicalMessage(
        prefix: *const c_char,
        message: *const c_char,
        size: usize,
        transactional: bool,
    ) -> pg_sys::XLogRecPtr;
}

/// What the callback asks of the policy module.
pub struct Hooks {
    pub pre_commit: fn(),
    pub commit: fn(),
    pub abort: fn(),
}

static mut HOOKS: Option<Hooks> = None;

/// Register `hooks` for every transaction of this process; called from `_PG_init`.
pub fn install(hooks: Hooks) {
    // SAFETY: _PG_init runs once per process, before any transaction; the static is only
    // written here and read by the callback afterwards (one thread).
    unsafe {
        HOOKS = Some(hooks);
        pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut());
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn xact_callback(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    // SAFETY: see `install`.
    let hooks = unsafe { (*std::ptr::addr_of!(HOOKS)).as_ref() };
    let Some(h) = hooks else { return };
    match event {
        pg_sys::XactEvent::XACT_EVENT_PRE_COMMIT => (h.pre_commit)(),
        pg_sys::XactEvent::XACT_EVENT_COMMIT => (h.commit)(),
        pg_sys::XactEvent::XACT_EVENT_ABORT => (h.abort)(),
        _ => {}
    }
}

/// Whether the current transaction has an xid (it wrote something, so it commits a
/// record peers will receive).
pub fn has_xid() -> bool {
    // SAFETY: a plain read of the transaction state (declared without pgrx's guard: it
    // runs at every commit).
    unsafe { crate::pg::unguarded::GetTopTransactionIdIfAny() != pg_sys::InvalidTransactionId }
}

/// Whether this is an ordinary client backend (not a walsender, an apply worker or any
/// other background process).
pub fn is_client_backend() -> bool {
    // SAFETY: a plain read of a process-global set at start-up.
    unsafe { pg_sys::MyBackendType == pg_sys::BackendType::B_BACKEND && !pg_sys::am_walsender }
}

/// Write a transactional logical message `prefix` (empty content) into the current
/// transaction. The transaction must already have an xid.
pub fn emit_marker(prefix: &CStr) {
    // SAFETY: inside a transaction with an xid (the caller checks); the message is copied
    // into WAL.
    unsafe {
        LogLogicalMessage(prefix.as_ptr(), c"".as_ptr(), 0, true);
    }
}

/// End of the last commit record this backend wrote.
pub fn last_commit_end() -> u64 {
    // SAFETY: a plain read of a backend-local global.
    unsafe { pg_sys::XactLastCommitEnd }
}

/// `(slot name, confirmed_flush)` of every logical slot of database `dboid` whose name
/// starts with `prefix`.
pub fn slots(dboid: u32, prefix: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    // SAFETY: ReplicationSlotCtl is allocated at start-up for max_replication_slots
    // entries and never moves. The fields are read without the slot's spinlock: `in_use`
    // and the name change only when a slot is created or dropped (a racing reader at
    // worst counts a slot being dropped, which no longer confirms anything new), and
    // `confirmed_flush` is an aligned 8-byte value, read atomically on the platforms
    // PostgreSQL supports for this; it only grows while a slot exists.
    unsafe {
        let ctl = pg_sys::ReplicationSlotCtl;
        if ctl.is_null() {
            return out;
        }
        let base = std::ptr::addr_of!((*ctl).replication_slots) as *const pg_sys::ReplicationSlot;
        for i in 0..pg_sys::max_replication_slots.max(0) as usize {
            let s = base.add(i);
            if !std::ptr::read_volatile(std::ptr::addr_of!((*s).in_use)) {
                continue;
            }
            let data = std::ptr::addr_of!((*s).data);
            if (*data).database != pg_sys::Oid::from(dboid) {
                continue;
            }
            let name = CStr::from_ptr((*data).name.data.as_ptr())
                .to_string_lossy()
                .into_owned();
            if !name.starts_with(prefix) {
                continue;
            }
            let flush = std::ptr::read_volatile(std::ptr::addr_of!((*data).confirmed_flush));
            out.push((name, flush));
        }
    }
    out
}

/// Sleep on the process latch for up to `ms` milliseconds, after acting on a pending
/// cancel or terminate request like any statement (an ERROR, or the backend exits):
/// for waits that may still fail, unlike [`nap`].
pub fn nap_or_cancel(ms: i64) {
    pgrx::check_for_interrupts!();
    crate::pg::bgw::sleep_on_latch(ms);
    pgrx::check_for_interrupts!();
}

/// Why a wait stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    Cancel,
    Terminate,
}

/// Sleep on the process latch for up to `ms` milliseconds; reports a cancel or terminate
/// request instead of acting on it (the caller is past the point where an ERROR is
/// allowed). A cancel request is consumed; a terminate request stays pending, and the
/// backend exits at its next interrupt check.
pub fn nap(ms: i64) -> Option<Interrupt> {
    // SAFETY: MyLatch is this process's latch; WaitLatch with WL_EXIT_ON_PM_DEATH exits
    // the process if the postmaster dies, which is what every backend does.
    unsafe {
        if pg_sys::ProcDiePending != 0 {
            return Some(Interrupt::Terminate);
        }
        if pg_sys::QueryCancelPending != 0 {
            pg_sys::QueryCancelPending = 0;
            return Some(Interrupt::Cancel);
        }
        crate::pg::bgw::sleep_on_latch(ms);
    }
    None
}
