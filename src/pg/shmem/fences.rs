//! Shared memory, fences: tables whose user writes are held back for a replicated schema
//! change (see `crate::ddl`), in the worker table under its lock, with an atomic count so
//! that every query spares the lock while no fence is set.

use super::{put, text, Workers, NAME_LEN, WORKERS};

/// Writes to table `relid` of database `dboid` are refused (except by `exempt_pid`, the
/// backend running the schema change) until the schema change from `origin` is applied
/// here, or until `deadline`.
#[derive(Copy, Clone)]
pub struct Fence {
    pub dboid: u32,
    pub relid: u32,
    pub origin: [u8; NAME_LEN],
    pub exempt_pid: i32,
    pub deadline: i64,
}

impl Fence {
    pub(super) const EMPTY: Fence = Fence {
        dboid: 0,
        relid: 0,
        origin: [0; NAME_LEN],
        exempt_pid: 0,
        deadline: 0,
    };
}

/// How many fences are set on this server: one atomic read spares every query the lock
/// while none is.
pub static FENCES_ACTIVE: pgrx::PgAtomic<std::sync::atomic::AtomicU32> =
    // SAFETY: the name is unique to this extension.
    unsafe { pgrx::PgAtomic::new(c"bdr_fences_active") };

/// Whether any fence is set on this server (one atomic read).
pub fn fences_active() -> bool {
    FENCES_ACTIVE
        .get()
        .load(std::sync::atomic::Ordering::SeqCst)
        != 0
}

fn count_fences(w: &Workers) {
    let n = w.fences.iter().filter(|f| f.dboid != 0).count() as u32;
    FENCES_ACTIVE
        .get()
        .store(n, std::sync::atomic::Ordering::SeqCst);
}

/// Fence table `relid` of `dboid` for a schema change from `origin`; false when the
/// fence table is full.
pub fn fence_add(dboid: u32, relid: u32, origin: &str, exempt_pid: i32, deadline: i64) -> bool {
    let mut w = WORKERS.exclusive();
    let now_free = w.fences.iter().position(|f| {
        f.dboid == 0 || (f.dboid == dboid && f.relid == relid && text(&f.origin) == origin)
    });
    let Some(i) = now_free else { return false };
    let mut f = Fence::EMPTY;
    f.dboid = dboid;
    f.relid = relid;
    put(&mut f.origin, origin);
    f.exempt_pid = exempt_pid;
    f.deadline = deadline;
    w.fences[i] = f;
    count_fences(&w);
    true
}

/// Extend the fence on table `relid` of `dboid` from `origin` to `deadline`, if it is
/// still set at `now` (not lifted, not lapsed); false otherwise.
pub fn fence_keep(dboid: u32, relid: u32, origin: &str, now: i64, deadline: i64) -> bool {
    let mut w = WORKERS.exclusive();
    let Some(f) = w.fences.iter_mut().find(|f| {
        f.dboid == dboid && f.relid == relid && text(&f.origin) == origin && f.deadline > now
    }) else {
        return false;
    };
    f.deadline = f.deadline.max(deadline);
    true
}

/// Lift the fences matching `pred`; returns how many.
pub fn fence_clear(pred: impl Fn(&Fence) -> bool) -> usize {
    if !fences_active() {
        return 0;
    }
    let mut w = WORKERS.exclusive();
    let mut n = 0;
    for f in w.fences.iter_mut() {
        if f.dboid != 0 && pred(f) {
            *f = Fence::EMPTY;
            n += 1;
        }
    }
    count_fences(&w);
    n
}

/// The node whose schema change set fence `f`.
pub fn fence_origin(f: &Fence) -> String {
    text(&f.origin)
}

/// The origin of a fence on `relid` of `dboid` that applies to backend `pid` at `now`.
pub fn fenced_by(dboid: u32, relid: u32, pid: i32, now: i64) -> Option<String> {
    if !fences_active() {
        return None;
    }
    let w = WORKERS.share();
    w.fences
        .iter()
        .find(|f| f.dboid == dboid && f.relid == relid && f.exempt_pid != pid && f.deadline > now)
        .map(|f| text(&f.origin))
}
