//! Transactions, replication origins and WAL positions for the apply worker.
//!
//! Invariant: a remote transaction is applied in exactly one local transaction whose commit
//! carries the remote origin, LSN and commit timestamp (`replorigin_session_origin_*` set
//! before `CommitTransactionCommand`), so the origin's progress is durable exactly when the
//! applied rows are: after a crash, streaming resumes right after the last applied commit.

use crate::error::OrRaise;
use pgrx::pg_sys;
use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_int, CString};

/// Start a transaction with a snapshot, for catalog reads or applying a remote one.
pub fn begin() {
    // SAFETY: called outside any transaction (the apply loop's invariant); the clock read
    // cannot raise; three calls under one guard (the closure holds nothing).
    unsafe {
        use crate::pg::unguarded::{guarded, raw};
        // A transaction's start time (now(), pg_stat_activity.xact_start) is the
        // statement start time when it begins, which only a client backend's main loop
        // sets: without this every transaction of a bdr worker started at the time of its
        // first (now() in a replicated `ADD COLUMN ... DEFAULT now()`, a local-only
        // column's default, a heartbeat's sent_at: the worker's start, hours stale).
        crate::pg::unguarded::SetCurrentStatementStartTimestamp();
        crate::pg::unguarded::pgstat_report_activity(
            pg_sys::BackendState::STATE_RUNNING,
            std::ptr::null(),
        );
        guarded(|| {
            raw::StartTransactionCommand();
            raw::PushActiveSnapshot(raw::GetTransactionSnapshot());
        });
    }
}

/// Take a new snapshot for the rest of the transaction (parallel apply: after waiting
/// for an earlier transaction to commit, its changes must be visible to the next one).
pub fn refresh_snapshot() {
    require_transaction();
    // SAFETY: inside a transaction started by `begin`, which pushed the active snapshot
    // replaced here (read committed: GetTransactionSnapshot takes a new one).
    unsafe {
        pg_sys::PopActiveSnapshot();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
}

/// Start a subtransaction of the current transaction (a stream writer: the peer's
/// subtransaction whose changes may be rolled back alone). Resources taken from now on
/// belong to it; the memory context stays the caller's (as PL/pgSQL does), so nothing
/// the caller keeps is freed by a rollback of the subtransaction.
pub fn begin_subtransaction() {
    require_transaction();
    // SAFETY: inside a transaction (checked).
    in_callers_context(|| unsafe { pg_sys::BeginInternalSubTransaction(std::ptr::null()) });
}

/// Run `f`, a subtransaction start or end (which switches the memory context to the
/// subtransaction's or its parent's), and switch back to the caller's context after it.
fn in_callers_context(f: impl FnOnce()) {
    // SAFETY: a plain read of the current memory context, which outlives `f`: the
    // caller's context is never a subtransaction's (every start and end goes through
    // here), so no subtransaction end frees it.
    let cxt = unsafe { pg_sys::CurrentMemoryContext };
    f();
    // SAFETY: `cxt` is still valid (see above).
    unsafe { pg_sys::MemoryContextSwitchTo(cxt) };
}

/// Roll back the innermost subtransaction (see [`begin_subtransaction`]). Snapshots
/// pushed inside it are popped with it: if none is left active, a new one is taken for
/// the rest of the transaction.
///
/// # Preconditions
/// Inside a subtransaction started by [`begin_subtransaction`], with no relation
/// reference or slot of it still held by the caller.
pub fn rollback_subtransaction() {
    // SAFETY: see the preconditions.
    in_callers_context(|| unsafe { pg_sys::RollbackAndReleaseCurrentSubTransaction() });
    // SAFETY: inside the transaction; a plain read of the snapshot stack, then a new
    // snapshot for the rest of it when none is active.
    unsafe {
        if !crate::pg::unguarded::ActiveSnapshotSet() {
            pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        }
    }
}

/// Merge the innermost subtransaction into its parent (its changes, locks and active
/// snapshot stay; they commit or roll back with the parent).
///
/// # Preconditions
/// As for [`rollback_subtransaction`].
pub fn release_subtransaction() {
    // SAFETY: see the preconditions.
    in_callers_context(|| unsafe { pg_sys::ReleaseCurrentSubTransaction() });
}

/// Raise an internal error unless a transaction is open: what the safe functions of
/// `pg/` that read catalogs or write tables check first.
pub fn require_transaction() {
    // SAFETY: a plain read of the transaction state (cannot raise).
    if !unsafe { crate::pg::unguarded::IsTransactionState() } {
        crate::error::internal("catalog access outside a transaction");
    }
}

/// Make the changes made so far in this transaction visible to the next command.
pub fn command_counter_increment() {
    require_transaction();
    // SAFETY: inside a transaction.
    unsafe { pg_sys::CommandCounterIncrement() };
}

/// Give the current transaction an xid (so its commit record is written even if it
/// wrote nothing).
pub fn assign_xid() {
    require_transaction();
    // SAFETY: inside a transaction.
    unsafe { pg_sys::GetCurrentTransactionId() };
}

thread_local! {
    /// The open transaction holds a row that met an existing key (see
    /// `Target::insert_or_clash`): only [`abort`] may end it.
    static MUST_ROLL_BACK: Cell<bool> = const { Cell::new(false) };
}

/// The open transaction wrote a row that may duplicate a key (see
/// `Target::insert_or_clash`): until [`abort`], every commit here raises instead.
pub fn must_roll_back() {
    MUST_ROLL_BACK.set(true);
}

/// Refuse to commit a transaction that [`must_roll_back`].
fn check_may_commit() {
    if MUST_ROLL_BACK.get() {
        pgrx::error!(
            "bdr: internal error: commit of a transaction holding a clashing insert; it is rolled back and applied again"
        );
    }
}

/// Commit a plain (not replicated-from-anywhere) transaction.
pub fn commit() {
    check_may_commit();
    // SAFETY: a transaction started by `begin` is open; three calls under one guard (the
    // statistics after the commit, outside any transaction).
    unsafe {
        use crate::pg::unguarded::{guarded, raw};
        guarded(|| {
            raw::PopActiveSnapshot();
            raw::CommitTransactionCommand();
            raw::pgstat_report_stat(false);
        });
        ended();
    }
}

/// After a transaction of this worker ended: `pg_stat_activity` shows it idle.
fn ended() {
    // SAFETY: writes this backend's own status entry; cannot raise.
    unsafe {
        crate::pg::unguarded::pgstat_report_activity(
            pg_sys::BackendState::STATE_IDLE,
            std::ptr::null(),
        )
    };
}

/// While a worker waits outside any transaction: hand statistics still pending (the last
/// commits' within a second of an earlier report) to shared memory.
///
/// The statistics of what a worker did (`pg_stat_user_tables`' row counts, which
/// autovacuum and autoanalyze go by, `pg_stat_database`, `pg_stat_wal`) are handed over
/// after each commit ([`commit`], [`commit_remote`]) and here, at most once a second
/// (`pgstat_report_stat` without force); only a client backend's main loop does that by
/// itself: until session 26 every row a bdr worker applied stayed out of them until the
/// worker exited, so tables written mostly by replication were never vacuumed or
/// analyzed by autovacuum on the nodes that applied them.
pub fn report_stats_when_idle() {
    // SAFETY: the block state is a global of this process; pgstat_report_stat is called
    // outside any transaction (its precondition), under a guard (it may raise: memory).
    unsafe {
        use crate::pg::unguarded::{guarded, raw, IsTransactionOrTransactionBlock};
        if !IsTransactionOrTransactionBlock() {
            guarded(|| {
                raw::pgstat_report_stat(false);
            });
        }
    }
}

/// Commit the transaction that applied a remote one; returns the local commit record's
/// end LSN (for flush tracking).
pub fn commit_remote(remote_end_lsn: u64, remote_commit_time: i64) -> u64 {
    check_may_commit();
    // SAFETY: a transaction started by `begin` is open and this session has an origin;
    // the two calls under one guard (the closure holds plain values only).
    unsafe {
        use crate::pg::unguarded::{guarded, raw};
        guarded(|| {
            raw::PopActiveSnapshot();
            pg_sys::replorigin_session_origin_lsn = remote_end_lsn;
            pg_sys::replorigin_session_origin_timestamp = remote_commit_time;
            raw::CommitTransactionCommand();
            raw::pgstat_report_stat(false);
        });
        pg_sys::replorigin_session_origin_lsn = 0;
        pg_sys::replorigin_session_origin_timestamp = 0;
        ended();
        pg_sys::XactLastCommitEnd
    }
}

/// Make this session apply under the replication origin `name` (created if missing);
/// returns the origin's progress: the end LSN of the last remote commit applied here.
/// `None` (and nothing created) if `wanted`, asked first in the same transaction, says
/// the origin is not wanted any more (its node was parted meanwhile).
pub fn setup_origin(name: &str, wanted: impl FnOnce() -> bool) -> Option<u64> {
    if_wanted(wanted, || {
        let id = origin_id(name, true).expect("created");
        // SAFETY: inside a transaction; the origin is acquired for the life of the process.
        unsafe {
            pg_sys::replorigin_session_setup(id);
            pg_sys::replorigin_session_origin = id;
            // Flushed (`true`): the in-memory progress may cover asynchronous local commits
            // not yet on disk, and this value is reported upstream as flushed.
            pg_sys::replorigin_session_get_progress(true)
        }
    })
}

/// In one transaction: `None` if `wanted()` says no, else `Some(f())`.
fn if_wanted<T>(wanted: impl FnOnce() -> bool, f: impl FnOnce() -> T) -> Option<T> {
    begin();
    let r = wanted().then(f);
    commit();
    r
}

/// The id of replication origin `name`, created if `create` and missing (`None` if
/// missing and not created). Inside a transaction.
fn origin_id(name: &str, create: bool) -> Option<pg_sys::RepOriginId> {
    let c = CString::new(name).expect("origin name without NUL");
    // SAFETY: inside a transaction (catalog access).
    unsafe {
        let id = pg_sys::replorigin_by_name(c.as_ptr(), true);
        if id != pg_sys::InvalidRepOriginId as pg_sys::RepOriginId {
            Some(id)
        } else if create {
            Some(pg_sys::replorigin_create(c.as_ptr()))
        } else {
            None
        }
    }
}

/// Apply under replication origin `name` (created if missing) from now on: a spoke
/// commits each forwarded transaction under its original node's origin, so the rows
/// carry that node's identity and that origin's progress says what arrived from it.
/// Inside a transaction, before anything is written.
pub fn switch_origin(name: &str) {
    let id = origin_id(name, true).expect("created");
    // SAFETY: this session set up an origin at start (setup_origin); resetting it and
    // setting up another is what PostgreSQL's own apply worker does between streams.
    unsafe {
        pg_sys::replorigin_session_reset();
        pg_sys::replorigin_session_setup(id);
        pg_sys::replorigin_session_origin = id;
    }
}

/// Parallel apply (a writer): stamp this process's changes with replication origin
/// `name` (created if missing) without setting up its session — any number of processes
/// may do that at once; only the commit needs the session ([`commit_remote_turn`]).
/// Inside a transaction.
pub fn set_origin(name: &str) {
    let id = origin_id(name, true).expect("created");
    // SAFETY: a plain write of this process's global; no session is set up here.
    unsafe { pg_sys::replorigin_session_origin = id };
}

/// Parallel apply (a writer): stop stamping changes with an origin (before a transaction
/// of its own, e.g. recording an apply error).
pub fn clear_origin() {
    // SAFETY: a plain write of this process's global.
    unsafe { pg_sys::replorigin_session_origin = pg_sys::InvalidRepOriginId as _ };
}

/// Parallel apply (a writer whose turn it is to commit): set up the session of the
/// origin the transaction was applied under, commit with the remote LSN and timestamp,
/// and reset the session at once so the next writer can set it up. Returns the local
/// commit record's end LSN. Only one writer of a group runs this at a time (commit
/// order), and the receiver holds no session, so the setup cannot find it taken by
/// another process of the group.
pub fn commit_remote_turn(remote_end_lsn: u64, remote_commit_time: i64) -> u64 {
    // SAFETY: a transaction started by `begin` is open; `replorigin_session_origin` was
    // set by `set_origin`; the session is reset right after the commit (an error before
    // that ends the process, whose exit releases the origin).
    let id = unsafe { pg_sys::replorigin_session_origin };
    if id == pg_sys::InvalidRepOriginId as pg_sys::RepOriginId {
        pgrx::error!("bdr: internal error: parallel apply commit without an origin");
    }
    // SAFETY: see above; `id` is a valid origin this group's writers take in turn.
    unsafe { pg_sys::replorigin_session_setup(id) };
    let end = commit_remote(remote_end_lsn, remote_commit_time);
    // SAFETY: the session set up above; the global keeps stamping this origin.
    unsafe {
        pg_sys::replorigin_session_reset();
        pg_sys::replorigin_session_origin = id;
    }
    end
}

/// A receiver hands its origin's session to its stream writer for one commit
/// (`receive/direct.rs`): release it (PostgreSQL 15 lets one process hold an origin's
/// session at a time). The origin stays the one this session's changes are stamped
/// with; nothing may commit here until [`retake_origin_session`].
pub fn release_origin_session() {
    // SAFETY: this process set the session up (`setup_origin`); outside a transaction.
    unsafe { pg_sys::replorigin_session_reset() };
}

/// Take the origin's session back after [`release_origin_session`] (the stream writer
/// released it after its commit, or exited, which releases it too). Returns the origin's
/// progress as now in memory (it covers the stream writer's commit, if it happened).
pub fn retake_origin_session() -> u64 {
    // SAFETY: `replorigin_session_origin` still names the origin set up by
    // `setup_origin`; the stream writer resets its session right after its commit and an
    // exited process holds none.
    unsafe {
        pg_sys::replorigin_session_setup(pg_sys::replorigin_session_origin);
        pg_sys::replorigin_session_get_progress(false)
    }
}

/// The current end of this server's WAL (a local commit made by another process of
/// ours is at or before it).
pub fn insert_lsn() -> u64 {
    // SAFETY: a plain read under WAL insertion locks, valid in any backend.
    unsafe { pg_sys::GetXLogInsertRecPtr() }
}

/// Flushed progress of replication origin `name` (created if missing), without setting
/// up its session: where a parallel-apply receiver starts streaming.
/// `None` (and nothing created) if `wanted` says no, as for [`setup_origin`].
pub fn origin_flushed_progress(name: &str, wanted: impl FnOnce() -> bool) -> Option<u64> {
    if_wanted(wanted, || {
        let id = origin_id(name, true).expect("created");
        // SAFETY: a valid origin id; `true`: only what is flushed here.
        unsafe { pg_sys::replorigin_get_progress(id, true) }
    })
}

/// Progress of replication origin `name` (0 if it does not exist): the remote end LSN of
/// the last transaction committed under it. Inside a transaction.
pub fn origin_progress(name: &str) -> u64 {
    match origin_id(name, false) {
        // SAFETY: a valid origin id; `false`: the in-memory value, which includes
        // asynchronous commits not flushed yet (they are in this server's WAL).
        Some(id) => unsafe { pg_sys::replorigin_get_progress(id, false) },
        None => 0,
    }
}

/// Flush this node's WAL up to the end of the last commit this process wrote (an apply
/// worker commits with `synchronous_commit = off`; a synchronous commit on the origin
/// waits for this).
pub fn flush_last_commit() {
    // SAFETY: XactLastCommitEnd is this backend's own; XLogFlush of a position already
    // written is allowed outside a critical section.
    unsafe {
        let end = pg_sys::XactLastCommitEnd;
        if end != 0 {
            pg_sys::XLogFlush(end);
        }
    }
}

/// WAL flushed to disk on this node.
pub fn flush_lsn() -> u64 {
    // SAFETY: plain read of shared WAL state (cannot raise).
    unsafe { crate::pg::unguarded::GetFlushRecPtr(std::ptr::null_mut()) }
}

/// Current time, PostgreSQL epoch microseconds.
pub fn now() -> i64 {
    // SAFETY: no preconditions; cannot raise (a clock read), so it goes unguarded: the
    // receiver reads the clock several times per transaction.
    unsafe { crate::pg::unguarded::GetCurrentTimestamp() }
}

/// This session's `deadlock_timeout`, in milliseconds.
pub fn deadlock_timeout_ms() -> i32 {
    // SAFETY: a plain read of the GUC's variable.
    unsafe { pg_sys::DeadlockTimeout }
}

/// Set a GUC for this session with superuser rights.
pub fn set_config(name: &str, value: &str) {
    set_option(name, value, pg_sys::GucSource::PGC_S_OVERRIDE);
}

/// Set a GUC for this session as `SET` would (source `session`): unlike [`set_config`]'s,
/// a later `set_config(name, value, true)` in a transaction may change it for that
/// transaction (a replicated statement's own settings, `crate::ddl::apply`).
pub fn set_session_config(name: &str, value: &str) {
    set_option(name, value, pg_sys::GucSource::PGC_S_SESSION);
}

fn set_option(name: &str, value: &str, source: pg_sys::GucSource::Type) {
    let n = CString::new(name).unwrap();
    let v = CString::new(value).unwrap();
    // SAFETY: valid C strings; SetConfigOption raises an ERROR on a bad value.
    unsafe {
        pg_sys::SetConfigOption(
            n.as_ptr(),
            v.as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            source,
        );
    }
}

/// The current value of GUC `name` as text (`None` if there is no such setting).
pub fn get_config(name: &str) -> Option<String> {
    let n = CString::new(name).ok()?;
    // SAFETY: a valid C string; `missing_ok` returns NULL for an unknown name; the value
    // is copied at once (it points into the GUC's storage).
    unsafe {
        let v = pg_sys::GetConfigOption(n.as_ptr(), true, false);
        (!v.is_null()).then(|| std::ffi::CStr::from_ptr(v).to_string_lossy().into_owned())
    }
}

extern "C-unwind" {
    // Variadic, not in pgrx's bindings; exported by the postgres binary.
    fn errcontext_msg(fmt: *const c_char, ...) -> c_int;
}

/// What the apply worker is doing, kept as parts and only rendered when an error report
/// needs it (rendering it for every message cost several percent of apply time).
#[derive(Clone)]
pub struct ApplyContext {
    pub action: &'static str,
    pub relation: Option<std::rc::Rc<str>>,
    pub peer: std::rc::Rc<str>,
    pub xid: u32,
    pub lsn: u64,
    /// The replicated statement being run (DDL).
    pub statement: Option<std::rc::Rc<str>>,
}

impl std::fmt::Display for ApplyContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bdr apply: {}", self.action)?;
        if let Some(r) = &self.relation {
            write!(f, " on relation {r}")?;
        }
        if let Some(s) = &self.statement {
            write!(f, " \"{s}\"")?;
        }
        write!(
            f,
            " from node \"{}\" in remote transaction {}",
            self.peer, self.xid
        )?;
        if self.lsn == 0 {
            // A streamed transaction, applied before the peer committed it.
            write!(f, " (streamed, not committed yet)")
        } else {
            write!(
                f,
                " committed at LSN {}",
                bdr_core::wire::format_lsn(self.lsn)
            )
        }
    }
}

thread_local! {
    static CONTEXT: RefCell<Option<ApplyContext>> = const { RefCell::new(None) };
}

static mut CONTEXT_CALLBACK: pg_sys::ErrorContextCallback = pg_sys::ErrorContextCallback {
    previous: std::ptr::null_mut(),
    callback: None,
    arg: std::ptr::null_mut(),
};

unsafe extern "C-unwind" fn context_callback(_arg: *mut std::ffi::c_void) {
    let text = context().and_then(|t| CString::new(t).ok());
    if let Some(s) = text {
        // SAFETY: called by errfinish while building an error report.
        unsafe {
            errcontext_msg(c"%s".as_ptr(), s.as_ptr());
        }
    }
}

/// Install the apply worker's error-context callback (once per process): every ERROR
/// raised while applying gets a `CONTEXT:` line with what [`set_context`] last said.
pub fn install_error_context() {
    // SAFETY: the callback struct is a static that outlives every error; the worker never
    // pops it (it exits on error).
    unsafe {
        let cb = &raw mut CONTEXT_CALLBACK;
        (*cb).callback = Some(context_callback);
        (*cb).previous = pg_sys::error_context_stack;
        pg_sys::error_context_stack = cb;
    }
}

/// What the worker was doing (see [`set_context`]), if anything.
pub fn current_context() -> Option<ApplyContext> {
    CONTEXT.with(|c| c.borrow().clone())
}

/// The current error context text (what the worker was doing), if any.
pub fn context() -> Option<String> {
    CONTEXT.with(|c| c.borrow().as_ref().map(|s| s.to_string()))
}

/// Roll back whatever transaction an error interrupted (the apply worker's error path).
pub fn abort() {
    MUST_ROLL_BACK.set(false);
    // SAFETY: valid in any transaction state, also after an error has been caught; rolls
    // back every open subtransaction level too (a stream writer's), not only the
    // innermost one as AbortCurrentTransaction would.
    unsafe { pg_sys::AbortOutOfAnyTransaction() }
    ended();
}

/// What the worker is doing now, for error reports (`None` clears it).
pub fn set_context(what: Option<ApplyContext>) {
    CONTEXT.with(|c| *c.borrow_mut() = what);
}

/// Run `sql` through SPI (a statement not worth executor plumbing, e.g. TRUNCATE).
pub fn run_sql(sql: &str) {
    pgrx::Spi::run(sql)
        .unwrap_or_else(|e| crate::error::raise(&crate::error::ApplyError::Spi(e.to_string())));
}

/// Whether process `pid` holds a lock that one of `waiters` (process ids) waits for,
/// as the lock manager says (`pg_blocking_pids`). In a transaction of its own unless one
/// is open.
pub fn blocks_any(pid: i32, waiters: &[i32]) -> bool {
    // SAFETY: a plain read of the transaction state (cannot raise).
    let own = !unsafe { crate::pg::unguarded::IsTransactionState() };
    if own {
        begin();
    }
    let r = pgrx::Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT FROM pg_catalog.unnest($1::pg_catalog.int4[]) AS w(pid) \
          WHERE $2 = ANY (pg_catalog.pg_blocking_pids(w.pid)))",
        &[waiters.to_vec().into(), pid.into()],
    )
    .or_raise_as(crate::error::ApplyError::spi)
    .unwrap_or(false);
    if own {
        commit();
    }
    r
}

/// Commit timestamp and replication origin of a committed transaction, if known
/// (`track_commit_timestamp` was on and the data was not truncated).
pub fn commit_ts(xid: pg_sys::TransactionId) -> Option<(i64, u16)> {
    let mut ts: pg_sys::TimestampTz = 0;
    let mut origin: pg_sys::RepOriginId = 0;
    // SAFETY: plain lookups; out-parameters are valid.
    let (tsp, originp) = (&mut ts as *mut _, &mut origin as *mut _);
    let found = unsafe {
        u32::from(xid) >= pg_sys::FirstNormalTransactionId.into()
            && crate::pg::unguarded::guarded(|| {
                crate::pg::unguarded::raw::TransactionIdGetCommitTsData(xid, tsp, originp)
            })
    };
    (found && ts != 0).then_some((ts, origin))
}

/// The next transaction id to be assigned, with its epoch (64 bits: it never wraps),
/// read without `XidGenLock`: possibly a moment old, which is all a caller measuring how
/// far transaction ids have moved needs.
pub fn next_full_xid_approx() -> u64 {
    // SAFETY: `ShmemVariableCache` points into shared memory, set up before any backend or
    // worker runs; an aligned 64-bit read is not torn on the 64-bit platforms pgrx builds
    // for, and a stale value only makes the measured distance smaller.
    unsafe { std::ptr::read_volatile(&(*pg_sys::ShmemVariableCache).nextXid.value) }
}

/// Whether `xid` is (part of) the current transaction.
pub fn is_current_xact(xid: pg_sys::TransactionId) -> bool {
    // SAFETY: plain lookup (cannot raise).
    unsafe { crate::pg::unguarded::TransactionIdIsCurrentTransactionId(xid) }
}

/// The name of a replication origin.
pub fn origin_name(id: u16) -> Option<String> {
    let mut name: *mut c_char = std::ptr::null_mut();
    // SAFETY: lookup with missing_ok; the name is palloc'd.
    unsafe {
        if pg_sys::replorigin_by_oid(id, true, &mut name) && !name.is_null() {
            Some(
                std::ffi::CStr::from_ptr(name)
                    .to_string_lossy()
                    .into_owned(),
            )
        } else {
            None
        }
    }
}
