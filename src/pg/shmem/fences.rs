//! Shared memory, fences: tables whose user writes are held back for a replicated schema
//! change (see `crate::ddl`), in the worker table under its lock, with an atomic count so
//! that every query spares the lock while no fence is set.

use super::{put, text, Workers, NAME_LEN, WORKERS};

/// Writes to table `relid` of database `dboid` are refused (except by `exempt_pid`, the
/// backend running the schema change) until the schema change from `origin` that set it
/// is applied here, or until `deadline`.
#[derive(Copy, Clone)]
pub struct Fence {
    pub dboid: u32,
    pub relid: u32,
    pub origin: [u8; NAME_LEN],
    /// The origin's WAL insert position when its drain began: it names the schema change
    /// (with `origin`), and only a change from `origin` committed past it lifts the fence
    /// on arrival; an earlier one, arriving late, does not. 0: any change from `origin`
    /// (a fence asked for by a node of the previous release).
    pub since: u64,
    pub exempt_pid: i32,
    pub deadline: i64,
}

impl Fence {
    pub(super) const EMPTY: Fence = Fence {
        dboid: 0,
        relid: 0,
        origin: [0; NAME_LEN],
        since: 0,
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

/// Whether fence `f` is the one of the schema change (`origin`, `since`) on `relid` of
/// `dboid`.
fn is(f: &Fence, dboid: u32, relid: u32, origin: &str, since: u64) -> bool {
    f.dboid == dboid && f.relid == relid && f.since == since && text(&f.origin) == origin
}

/// Fence table `relid` of `dboid` for the schema change (`origin`, `since`); false when
/// the fence table is full. The same change asking again replaces its fence; another
/// change's fence on the table stays beside it.
pub fn fence_add(
    dboid: u32,
    relid: u32,
    origin: &str,
    since: u64,
    exempt_pid: i32,
    deadline: i64,
) -> bool {
    let mut w = WORKERS.exclusive();
    let slot = w
        .fences
        .iter()
        .position(|f| is(f, dboid, relid, origin, since))
        .or_else(|| w.fences.iter().position(|f| f.dboid == 0));
    let Some(i) = slot else { return false };
    let mut f = Fence::EMPTY;
    f.dboid = dboid;
    f.relid = relid;
    put(&mut f.origin, origin);
    f.since = since;
    f.exempt_pid = exempt_pid;
    f.deadline = deadline;
    w.fences[i] = f;
    count_fences(&w);
    true
}

/// Extend the fence on table `relid` of `dboid` of the schema change (`origin`, `since`)
/// to `deadline`, if it is still set at `now` (not lifted, not lapsed); false otherwise.
pub fn fence_keep(
    dboid: u32,
    relid: u32,
    origin: &str,
    since: u64,
    now: i64,
    deadline: i64,
) -> bool {
    let mut w = WORKERS.exclusive();
    let Some(f) = w
        .fences
        .iter_mut()
        .find(|f| is(f, dboid, relid, origin, since) && f.deadline > now)
    else {
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
