//! The PostgreSQL functions of the output plugin's per-change path, declared without
//! pgrx's per-call guard, for use inside ONE guard per step ([`guarded`]).
//!
//! Why: pgrx wraps every `pg_sys` function in a guard (thread check, `sigsetjmp`, saving
//! and restoring the error stacks) so that an ERROR raised inside becomes a Rust panic
//! instead of a `longjmp` over Rust frames. A change cost one guard per column (the
//! type's output function) plus five (deform, memory context reset, prepare-write,
//! append, write): ~4% of a backend decoding through the SQL functions (docs/
//! benchmarks.md, "Decode path"). These functions CAN raise an ERROR (an output function
//! on a bad value, the walsender's write on a lost connection), unlike those in
//! `crate::pg::unguarded`; so they are called only inside [`guarded`], which catches it
//! exactly as pgrx's own guard does.
//!
//! Invariant: a closure given to [`guarded`] calls only these functions, pointer reads
//! and writes, and Rust code that cannot panic and owns nothing with a destructor (it
//! may push to a `Vec` it borrows): a `longjmp` out of it then skips no destructor.

use pgrx::pg_sys;
use std::ffi::{c_char, c_int};

#[allow(clashing_extern_declarations)]
extern "C-unwind" {
    /// heaptuple.c: fills `values`/`isnull` for the descriptor's `natts` attributes.
    pub fn heap_deform_tuple(
        tuple: pg_sys::HeapTuple,
        desc: pg_sys::TupleDesc,
        values: *mut pg_sys::Datum,
        isnull: *mut bool,
    );
    /// fmgr.c: calls a type's output function; the result is palloc'd.
    pub fn OutputFunctionCall(flinfo: *mut pg_sys::FmgrInfo, val: pg_sys::Datum) -> *mut c_char;
    /// mcxt.c.
    pub fn MemoryContextReset(context: pg_sys::MemoryContext);
    /// logical.c: starts a write through the walsender's or the SQL function's callback.
    pub fn OutputPluginPrepareWrite(ctx: *mut pg_sys::LogicalDecodingContext, last_write: bool);
    /// logical.c: finishes it (the walsender sends it, the SQL function stores a row).
    pub fn OutputPluginWrite(ctx: *mut pg_sys::LogicalDecodingContext, last_write: bool);
    /// stringinfo.c: room for `needed` more bytes.
    pub fn enlargeStringInfo(str_: pg_sys::StringInfo, needed: c_int);
}

/// Run `f` under one guard: an ERROR raised by a PostgreSQL function it calls becomes a
/// Rust panic here, as with pgrx's per-call guard.
///
/// # Safety
/// `f` keeps the module's invariant; main thread only (as every PostgreSQL call).
#[inline(always)]
pub unsafe fn guarded<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: forwarded from the caller (see the module's invariant).
    unsafe { crate::pg::unguarded::guarded(f) }
}

/// `appendBinaryStringInfo`, enlarging only when the buffer has no room (it nearly always
/// has: the walsender and the SQL functions reuse one `StringInfo`).
///
/// # Safety
/// Inside [`guarded`]; `si` is a valid StringInfo in a live memory context.
#[inline]
pub unsafe fn append(si: pg_sys::StringInfo, bytes: &[u8]) {
    // SAFETY: `data` has `maxlen` bytes, of which `len` + the NUL are used; the copy and
    // the terminator stay within `maxlen` after the enlarge.
    unsafe {
        let len = (*si).len as usize;
        if len + bytes.len() + 1 > (*si).maxlen as usize {
            enlargeStringInfo(si, bytes.len() as c_int);
        }
        let dst = (*si).data.add(len) as *mut u8;
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len());
        *dst.add(bytes.len()) = 0;
        (*si).len += bytes.len() as c_int;
    }
}
