//! Memory contexts for code outside `pg/`: a context that lives for the process, and a
//! guard that runs code in it and frees what that code allocated.
//!
//! Why: the apply worker converts and writes every change in a context of its own, reset
//! after the change, so a transaction of any size is applied in bounded memory; the
//! switching and resetting are raw calls, kept here behind a guard.
//!
//! Invariant: while a [`Scope`] lives, palloc'd memory (datums of a change, executor
//! state) goes to its context; when it drops, the previous context is current again and
//! everything allocated in the scope is freed — except while an error unwinds through it:
//! then the context is left as it is (the transaction's abort may still reach executor
//! state allocated there; the next scope's reset frees it).

use pgrx::pg_sys;
use std::ffi::CStr;

/// A memory context, child of `TopMemoryContext`, alive for the rest of the process.
pub struct MemCxt(pg_sys::MemoryContext);

impl MemCxt {
    pub fn new(name: &'static CStr) -> MemCxt {
        // SAFETY: a child of TopMemoryContext with a static name; never deleted.
        MemCxt(unsafe {
            pg_sys::AllocSetContextCreateInternal(
                pg_sys::TopMemoryContext,
                name.as_ptr(),
                pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
            )
        })
    }

    /// The raw context, for code in `pg/` that allocates long-lived state in it.
    pub(crate) fn raw(&self) -> pg_sys::MemoryContext {
        self.0
    }

    /// Make this context current until the returned guard drops; the drop frees what
    /// was allocated meanwhile (see the module note).
    pub fn scope(&self) -> Scope<'_> {
        // SAFETY: the context is valid for the process.
        let previous = unsafe { pg_sys::MemoryContextSwitchTo(self.0) };
        Scope {
            cxt: self,
            previous,
        }
    }
}

/// See [`MemCxt::scope`].
pub struct Scope<'a> {
    cxt: &'a MemCxt,
    previous: pg_sys::MemoryContext,
}

impl Drop for Scope<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        // SAFETY: `previous` was current when the scope began and outlives it (the
        // transaction or a longer-lived context); nothing allocated in the scope is used
        // after it (the writes it made are closed before the scope ends).
        unsafe {
            pg_sys::MemoryContextSwitchTo(self.previous);
            crate::pg::unguarded::reset_context(self.cxt.0);
        }
    }
}
