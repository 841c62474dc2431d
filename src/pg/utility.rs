//! The hooks DDL replication needs, raw half: a `ProcessUtility` hook that describes each
//! schema change for the policy (`bdr_core::ddl::decide`) and hands replicated ones to
//! [`crate::ddl`], and an `ExecutorStart` hook that refuses user writes to a table fenced
//! for a schema change from another node (`crate::ddl`'s drain).
//!
//! Invariants: only statements typed by a client (top level), or run through
//! `bdr.replicate_ddl_command`, are considered — never what a function, an event trigger,
//! `CREATE EXTENSION` or the apply worker runs; targets are resolved before the statement
//! runs (a DROP cannot be described afterwards); the text sent is exactly the one statement
//! (`stmt_location`/`stmt_len`), never the rest of a multi-statement string.

mod describe;

use bdr_core::ddl::{Plan, Shape};
use describe::{describe, per_node_after_drain, resolve, statement_text};
use pgrx::pg_sys;
use pgrx::PgList;
use std::cell::Cell;
use std::ffi::{c_char, CStr};

static mut PREV_UTILITY: pg_sys::ProcessUtility_hook_type = None;
static mut PREV_EXECUTOR_START: pg_sys::ExecutorStart_hook_type = None;

thread_local! {
    /// Nesting of utility statements run by this backend (a captured statement's own
    /// sub-statements are not captured again).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// `bdr.replicate_ddl_command` is running its command.
    static FORCE: Cell<bool> = const { Cell::new(false) };
    /// This process applies a peer's changes: it never captures or is fenced.
    static APPLYING: Cell<bool> = const { Cell::new(false) };
}

/// What the hooks ask of the policy modules above this one (`crate::ddl` and, through
/// it, `crate::quorum`), handed over at `_PG_init` so that this module imports neither.
pub struct Policy {
    /// What to do with a utility statement of this shape (`None`: run it here only);
    /// the text is read only when it replicates.
    pub plan: fn(&Shape, &dyn Fn() -> String) -> Option<Plan>,
    /// Before the statement runs (drain).
    pub before: fn(&Plan),
    /// Once drained, for a statement that fills existing rows with values each node
    /// computes for itself: refuse it if its table has rows.
    pub refuse_if_rows: fn(&Plan),
    /// After it ran (queue it for the peers).
    pub after: fn(&Plan),
    /// Before a user write to a table starts (fences, quorum).
    pub check_user_write: fn(pg_sys::Oid),
    /// Before `DROP EXTENSION bdr` runs here (refuse it while this node is a member).
    pub check_extension_drop: fn(),
    /// Whether `check_user_write` could refuse anything now. Called before every
    /// statement's executor starts, outside any guard: plain reads only, it must neither
    /// raise nor panic.
    pub may_refuse_user_writes: fn() -> bool,
}

static POLICY: std::sync::OnceLock<Policy> = std::sync::OnceLock::new();

fn policy() -> &'static Policy {
    POLICY.get().expect("utility::install ran in _PG_init")
}

/// Install both hooks, with the policy they call; called from `_PG_init`.
pub fn install(policy: Policy) {
    let _ = POLICY.set(policy);
    // SAFETY: _PG_init runs once per process before any query; the previous hooks are
    // kept and called.
    unsafe {
        PREV_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(utility_hook);
        PREV_EXECUTOR_START = pg_sys::ExecutorStart_hook;
        pg_sys::ExecutorStart_hook = Some(executor_start_hook);
    }
}

/// Mark this process as an apply worker.
pub fn set_applying() {
    APPLYING.with(|a| a.set(true));
}

pub fn applying() -> bool {
    APPLYING.with(|a| a.get())
}

/// Run `f` with capture forced for the statements it runs (`bdr.replicate_ddl_command`).
pub fn forced<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            FORCE.with(|x| x.set(self.0));
        }
    }
    let _reset = Reset(FORCE.with(|x| x.replace(true)));
    f()
}

struct Depth;
impl Depth {
    fn enter() -> Depth {
        DEPTH.with(|d| d.set(d.get() + 1));
        Depth
    }
}
impl Drop for Depth {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

#[allow(clippy::too_many_arguments)]
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn utility_hook(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: pstmt and query_string are valid for the call (PostgreSQL's contract); the
    // parse tree is only read.
    unsafe {
        let top = context == pg_sys::ProcessUtilityContext::PROCESS_UTILITY_TOPLEVEL;
        let forced = FORCE.with(|f| f.get());
        let considered = (top || forced)
            && DEPTH.with(|d| d.get()) == 0
            && !applying()
            && !pg_sys::creating_extension
            && (crate::gucs::DDL_REPLICATION.get() || forced)
            && pg_sys::IsTransactionState();
        check_fenced_utility((*pstmt).utilityStmt);
        if drops_bdr((*pstmt).utilityStmt) {
            (policy().check_extension_drop)();
        }
        let plan = if considered {
            let shape = describe((*pstmt).utilityStmt);
            (policy().plan)(&shape, &|| statement_text(pstmt, query_string))
        } else {
            None
        };
        if let Some(p) = &plan {
            (policy().before)(p);
            if p.if_rows.is_some() && per_node_after_drain((*pstmt).utilityStmt) {
                (policy().refuse_if_rows)(p);
            }
        }
        {
            let _depth = Depth::enter();
            match PREV_UTILITY {
                Some(prev) => prev(
                    pstmt,
                    query_string,
                    read_only_tree,
                    context,
                    params,
                    query_env,
                    dest,
                    qc,
                ),
                None => pg_sys::standard_ProcessUtility(
                    pstmt,
                    query_string,
                    read_only_tree,
                    context,
                    params,
                    query_env,
                    dest,
                    qc,
                ),
            }
        }
        if let Some(p) = plan {
            (policy().after)(&p);
        }
    }
}

/// Every statement's executor starts here. Without pgrx's guard: the common case (no
/// fence set, no quorum required, so nothing to refuse) costs two plain reads, and the
/// executor then starts as without bdr. Only when something may be refused are the
/// statement's targets checked, under a guard ([`check_result_relations`]). The previous
/// hook or `standard_ExecutorStart` is the last call: this frame holds nothing, so an
/// ERROR raised there passes over it as over a C hook's.
unsafe extern "C-unwind" fn executor_start_hook(qd: *mut pg_sys::QueryDesc, eflags: i32) {
    // Nothing here can panic in a running server (the shared state it reads exists once
    // the library is preloaded), and should it all the same, no unwinding reaches C: the
    // guarded check runs instead. Apply workers are let through there.
    let check =
        std::panic::catch_unwind(|| POLICY.get().is_some_and(|p| (p.may_refuse_user_writes)()))
            .unwrap_or(true);
    // SAFETY: the query descriptor is valid for the call (forwarded as received).
    unsafe {
        if check {
            check_result_relations(qd);
        }
        match PREV_EXECUTOR_START {
            Some(prev) => prev(qd, eflags),
            None => crate::pg::unguarded::tail::standard_ExecutorStart(qd, eflags),
        }
    }
}

/// Refuse the statement if one of the tables it writes is refused user writes now (never
/// in an apply worker).
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_result_relations(qd: *mut pg_sys::QueryDesc) {
    if applying() {
        return;
    }
    // SAFETY: the query descriptor is valid for the call; its plan's range table and
    // result relation list are read only.
    unsafe {
        let ps = (*qd).plannedstmt;
        if ps.is_null() || (*ps).resultRelations.is_null() {
            return;
        }
        let rtable = PgList::<pg_sys::RangeTblEntry>::from_pg((*ps).rtable);
        let results = PgList::<std::ffi::c_void>::from_pg((*ps).resultRelations);
        for rti in results.iter_int() {
            if let Some(rte) = rtable.get_ptr((rti - 1) as usize) {
                check_user_write((*rte).relid);
            }
        }
    }
}

/// Whether `stmt` is a `DROP EXTENSION` naming bdr (in whatever context it runs).
///
/// # Safety
/// `stmt` is null or a valid parse tree node.
unsafe fn drops_bdr(stmt: *mut pg_sys::Node) -> bool {
    // SAFETY: the node tag says which struct it is; a DropStmt of extensions lists its
    // names as String nodes.
    unsafe {
        if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_DropStmt {
            return false;
        }
        let d = stmt as *mut pg_sys::DropStmt;
        if (*d).removeType != pg_sys::ObjectType::OBJECT_EXTENSION {
            return false;
        }
        PgList::<pg_sys::Node>::from_pg((*d).objects)
            .iter_ptr()
            .any(|n| {
                !n.is_null()
                    && (*n).type_ == pg_sys::NodeTag::T_String
                    && !(*(n as *mut pg_sys::String)).sval.is_null()
                    && CStr::from_ptr((*(n as *mut pg_sys::String)).sval).to_bytes() == b"bdr"
            })
    }
}

/// COPY FROM and TRUNCATE write without the executor's start: check their targets.
///
/// # Safety
/// `stmt` is a valid parse tree node.
unsafe fn check_fenced_utility(stmt: *mut pg_sys::Node) {
    if applying() || stmt.is_null() {
        return;
    }
    // SAFETY: the node tag says which struct it is.
    unsafe {
        match (*stmt).type_ {
            pg_sys::NodeTag::T_CopyStmt => {
                let c = stmt as *mut pg_sys::CopyStmt;
                if (*c).is_from && !(*c).relation.is_null() {
                    if let Some(relid) = resolve((*c).relation) {
                        check_user_write(relid);
                    }
                }
            }
            pg_sys::NodeTag::T_TruncateStmt => {
                let t = stmt as *mut pg_sys::TruncateStmt;
                for rv in PgList::<pg_sys::RangeVar>::from_pg((*t).relations).iter_ptr() {
                    if let Some(relid) = resolve(rv) {
                        check_user_write(relid);
                    }
                }
            }
            _ => {}
        }
    }
}

/// A user write to `relid` is about to start: the policy refuses it or not.
fn check_user_write(relid: pg_sys::Oid) {
    (policy().check_user_write)(relid)
}

/// Name of the current role (`current_user`).
pub fn current_role_name() -> String {
    // SAFETY: the current user id always has a name while the backend runs.
    unsafe {
        let n = pg_sys::GetUserNameFromId(pg_sys::GetUserId(), false);
        CStr::from_ptr(n).to_string_lossy().into_owned()
    }
}

/// The role named `name` here, if it exists.
pub fn role_oid(name: &str) -> Option<pg_sys::Oid> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a catalog lookup with missing_ok.
    let oid = unsafe { pg_sys::get_role_oid(c.as_ptr(), true) };
    (oid != pg_sys::InvalidOid).then_some(oid)
}

/// This backend's process id.
pub fn my_pid() -> i32 {
    // SAFETY: set once at backend start.
    unsafe { pg_sys::MyProcPid }
}

/// Where WAL insertion is now: every transaction committed before this call ends below.
pub fn insert_lsn() -> u64 {
    // SAFETY: a read of shared WAL state.
    unsafe { pg_sys::GetXLogInsertRecPtr() }
}

/// `LOCKTAG.locktag_field4` of the lock [`try_drain_lock`] takes (`pg_locks.objsubid`):
/// advisory-class like SQL's advisory locks, but SQL's use only 1 and 2 there (and
/// parallel apply's tags, `crate::pg::mq`, another value), so no role can take or hold it
/// with `pg_advisory_lock`.
pub const DRAIN_LOCK_FIELD4: u16 = 0x4444;

/// Try to take this database's drain lock for the rest of the transaction: `true` if
/// taken (or already held by this transaction), `false` if another transaction holds it.
///
/// # Preconditions
/// Inside a transaction.
pub fn try_drain_lock() -> bool {
    crate::pg::xact::require_transaction();
    let tag = pg_sys::LOCKTAG {
        // SAFETY: set once at backend start.
        locktag_field1: unsafe { pg_sys::MyDatabaseId }.into(),
        locktag_field2: 0x0062_6472, // "bdr"
        locktag_field3: 0x0064_646c, // "ddl"
        locktag_field4: DRAIN_LOCK_FIELD4,
        locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
        locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
    };
    // SAFETY: a valid tag; a transaction lock (released by commit or abort), not waited
    // for (`dontWait`), so it returns at once.
    let got = unsafe { pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as i32, false, true) };
    got != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
}

/// Wait (under the session's `lock_timeout`) until no transaction holds a write lock on
/// `relid`, then keep a SHARE lock on it until the end of this transaction.
///
/// # Preconditions
/// Inside a transaction.
pub fn wait_for_writers(relid: pg_sys::Oid) {
    crate::pg::xact::require_transaction();
    // SAFETY: forwarded.
    unsafe { pg_sys::LockRelationOid(relid, pg_sys::ShareLock as i32) };
}

/// Run `f` as the bootstrap superuser (for bdr's own catalog writes on behalf of any
/// role: the DDL queue).
pub fn as_superuser<R>(f: impl FnOnce() -> R) -> R {
    crate::pg::owner::switch_user(
        pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID),
        pg_sys::SECURITY_LOCAL_USERID_CHANGE,
        f,
    )
}

/// Run `f` as role `role` (a replicated DDL runs as the role that ran it on its origin).
pub fn as_role<R>(role: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    crate::pg::owner::switch_user(role, pg_sys::SECURITY_LOCAL_USERID_CHANGE, f)
}

/// Something to run when the current transaction ends (`true`: it committed).
type AtEnd = Box<dyn FnOnce(bool)>;

/// Call `f(committed)` once, when the current transaction ends. Nothing `f` does may
/// raise an error (it runs inside commit or abort processing).
pub fn at_transaction_end(f: Box<dyn FnOnce(bool)>) {
    if !REGISTERED.with(|r| r.replace(true)) {
        // SAFETY: a static function, registered once for the life of the process (never
        // unregistered: PostgreSQL 15 walks the list without guarding against removal).
        unsafe { pg_sys::RegisterXactCallback(Some(xact_end), std::ptr::null_mut()) };
    }
    AT_END.with(|v| v.borrow_mut().push(f));
}

thread_local! {
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
    static AT_END: std::cell::RefCell<Vec<AtEnd>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn xact_end(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    let committed = match event {
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT => {
            true
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT => false,
        _ => return,
    };
    let fs: Vec<_> = AT_END.with(|v| std::mem::take(&mut *v.borrow_mut()));
    for f in fs {
        f(committed);
    }
}
