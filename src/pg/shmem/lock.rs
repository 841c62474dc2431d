//! A struct in shared memory under one named LWLock, built in place: [`ShmemLock`].
//!
//! Why not pgrx's `PgLwLock` + `pg_shmem_init!`: its startup hook builds the initial value
//! on the stack and moves it into shared memory by value. For the worker table (~70 KiB)
//! and the sequence table that touched about 170 KiB of the postmaster's stack at
//! startup, and every server process forked from it inherits those pages as private
//! memory: each backend, walsender and worker of a node with bdr loaded showed 204 kB of
//! resident stack against 36 kB without bdr (apply process measured with `bdr-bench mem`).
//! Here the shared memory is zeroed and then filled in place by the table's own `init`,
//! so nothing the size of a table is ever on a stack.
//!
//! Invariants: [`ShmemLock::request`] runs in the `shmem_request_hook` and
//! [`ShmemLock::startup`] in the `shmem_startup_hook` (postmaster, and again in each
//! process under EXEC_BACKEND, where the struct is found and left alone); the guards of
//! [`ShmemLock::share`] and [`ShmemLock::exclusive`] hold the LWLock for their life, and
//! leave it to the abort's release-all while an `elog(ERROR)` unwinds (as pgrx's do);
//! [`ShmemLock::peek`], the one read without the lock, reads a single plain field.

use pgrx::pg_sys;
use std::ffi::CStr;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicPtr, Ordering};

#[repr(C)]
struct Shared<T> {
    lock: *mut pg_sys::LWLock,
    data: T,
}

/// `T` in shared memory under an LWLock named `name` (see the module note).
pub struct ShmemLock<T> {
    name: &'static CStr,
    shared: AtomicPtr<Shared<T>>,
}

impl<T> ShmemLock<T> {
    /// # Safety
    /// `name` is unique among shared-memory structs and LWLock tranches; `T` is plain old
    /// data without pointers, valid when all its bytes are zero, and the same in every
    /// process (it is shared).
    pub const unsafe fn new(name: &'static CStr) -> Self {
        ShmemLock {
            name,
            shared: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    /// Ask for the space and the lock (from the `shmem_request_hook`).
    ///
    /// # Safety
    /// Only in the `shmem_request_hook`.
    pub unsafe fn request(&self) {
        // SAFETY: called while shared memory is being sized, as the hook allows.
        unsafe {
            pg_sys::RequestAddinShmemSpace(std::mem::size_of::<Shared<T>>());
            pg_sys::RequestNamedLWLockTranche(self.name.as_ptr(), 1);
        }
    }

    /// Find or create the struct (from the `shmem_startup_hook`): created zeroed, then
    /// `init` fills what is not zero in place.
    ///
    /// # Safety
    /// Only in the `shmem_startup_hook`, after [`ShmemLock::request`] ran in the
    /// request hook; `init` writes only through the pointer it is given.
    pub unsafe fn startup(&self, init: unsafe fn(*mut T)) {
        // SAFETY: the add-in shmem init lock serialises creation, as PostgreSQL's own
        // modules do; the struct is `size_of::<Shared<T>>()` bytes, MAXALIGN'ed (checked).
        unsafe {
            let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
            pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
            let mut found = false;
            let size = std::mem::size_of::<Shared<T>>();
            let p =
                pg_sys::ShmemInitStruct(self.name.as_ptr(), size, &mut found).cast::<Shared<T>>();
            assert!(p.is_aligned(), "shared memory is not aligned");
            if !found {
                std::ptr::write_bytes(p.cast::<u8>(), 0, size);
                (&raw mut (*p).lock)
                    .write(&raw mut (*pg_sys::GetNamedLWLockTranche(self.name.as_ptr())).lock);
                init(&raw mut (*p).data);
            }
            self.shared.store(p, Ordering::Relaxed);
            pg_sys::LWLockRelease(init_lock);
        }
    }

    /// The struct in shared memory (set once at startup; it lives as long as the process).
    fn raw(&self) -> *mut Shared<T> {
        let p = self.shared.load(Ordering::Relaxed);
        assert!(!p.is_null(), "bdr: shared memory is not initialised");
        p
    }

    /// Read one plain field without the lock: `field` picks it from the struct. What a
    /// process reads on its hot path (the apply loop's pause flag at every transaction
    /// boundary), where a shared lock each time cost ~1% of the apply process.
    ///
    /// # Safety
    /// The field is a `bool` or an aligned integer (written whole by any writer, so the
    /// read sees the old or the new value), and the caller is content with the value as
    /// of just before a concurrent write (the writer, holding the lock, wakes the reader
    /// afterwards if it must act on it).
    pub unsafe fn peek<F: Copy>(&self, field: impl FnOnce(*const T) -> *const F) -> F {
        let p = self.raw();
        // SAFETY: see the contract; a volatile read, as PostgreSQL's C code reads such
        // flags of shared structs without their lock.
        unsafe { std::ptr::read_volatile(field(&raw const (*p).data)) }
    }

    /// A shared lock, with `&T`.
    pub fn share(&self) -> ShareGuard<'_, T> {
        let p = self.raw();
        // SAFETY: `p` is the struct in shared memory with a valid LWLock; under the
        // shared lock nobody writes `data`.
        unsafe {
            let lock = (*p).lock;
            acquire(lock, pg_sys::LWLockMode::LW_SHARED);
            ShareGuard {
                data: &(*p).data,
                lock,
            }
        }
    }

    /// An exclusive lock, with `&mut T`.
    pub fn exclusive(&self) -> ExclusiveGuard<'_, T> {
        let p = self.raw();
        // SAFETY: as in `share`; the exclusive lock makes this the only access to `data`
        // until the guard drops.
        unsafe {
            let lock = (*p).lock;
            acquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
            ExclusiveGuard {
                data: &mut (*p).data,
                lock,
            }
        }
    }
}

/// Release `lock`, unless an `elog(ERROR)` is unwinding (it reset the interrupt holdoff
/// count, and the abort releases every LWLock).
fn release(lock: *mut pg_sys::LWLock) {
    // SAFETY: the lock is valid and held by this process; the static is only read from
    // the process's one thread.
    unsafe {
        if pg_sys::InterruptHoldoffCount > 0 {
            crate::pg::unguarded::guarded(|| crate::pg::unguarded::raw::LWLockRelease(lock));
        }
    }
}

/// Acquire `lock` in `mode` (through the guard the apply path's calls share).
///
/// # Safety
/// `lock` is a valid LWLock.
unsafe fn acquire(lock: *mut pg_sys::LWLock, mode: pg_sys::LWLockMode::Type) {
    // SAFETY: forwarded; the closure holds two plain values.
    unsafe {
        crate::pg::unguarded::guarded(|| crate::pg::unguarded::raw::LWLockAcquire(lock, mode));
    }
}

pub struct ShareGuard<'a, T> {
    data: &'a T,
    lock: *mut pg_sys::LWLock,
}

impl<T> Deref for ShareGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.data
    }
}

impl<T> Drop for ShareGuard<'_, T> {
    fn drop(&mut self) {
        release(self.lock);
    }
}

pub struct ExclusiveGuard<'a, T> {
    data: &'a mut T,
    lock: *mut pg_sys::LWLock,
}

impl<T> Deref for ExclusiveGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.data
    }
}

impl<T> DerefMut for ExclusiveGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.data
    }
}

impl<T> Drop for ExclusiveGuard<'_, T> {
    fn drop(&mut self) {
        release(self.lock);
    }
}
