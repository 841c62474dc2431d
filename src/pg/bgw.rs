//! Background-worker plumbing: waiting on latch and socket, listing databases without a
//! database connection, starting dynamic workers.

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, DynamicBackgroundWorker};
use pgrx::pg_guard;
use pgrx::pg_sys;
use pgrx::IntoDatum;
use std::ffi::CStr;
use std::time::Duration;

thread_local! {
    /// The wait set (latch, postmaster death, socket) of the socket waited on last, kept
    /// across waits: `WaitLatchOrSocket` builds and frees an epoll set at every call
    /// (`epoll_create`, three `epoll_ctl`, `close`), ~15% of the CPU of an apply process
    /// following a live peer (one wait per transaction). Any connection opened or closed
    /// in this process drops it ([`forget_socket_waits`]): a socket number can then stand
    /// for another socket, which the kept set would not watch.
    static SOCKET_SET: std::cell::Cell<(i32, *mut pg_sys::WaitEventSet)> =
        const { std::cell::Cell::new((-1, std::ptr::null_mut())) };
}

/// Drop the kept wait set (see `SOCKET_SET`): called whenever a libpq connection of this
/// process is opened or closed.
pub fn forget_socket_waits() {
    let (_, set) = SOCKET_SET.with(|s| s.replace((-1, std::ptr::null_mut())));
    if !set.is_null() {
        // SAFETY: the set was created by `socket_set` in TopMemoryContext and is no longer
        // referenced (taken out of the cell above).
        unsafe { pg_sys::FreeWaitEventSet(set) };
    }
}

/// The kept wait set for `fd`, built on first use.
///
/// # Safety
/// `fd` is the socket of a live connection of this process; MyLatch is set up.
unsafe fn socket_set(fd: i32) -> *mut pg_sys::WaitEventSet {
    let (kept, set) = SOCKET_SET.with(|s| s.get());
    if kept == fd && !set.is_null() {
        return set;
    }
    forget_socket_waits();
    // SAFETY: forwarded from the caller; the set lives in TopMemoryContext until freed
    // by `forget_socket_waits` (or the process exits).
    unsafe {
        let set = wait_set(pg_sys::TopMemoryContext, &[(fd, false)]);
        SOCKET_SET.with(|s| s.set((fd, set)));
        set
    }
}

/// A new wait set in `cxt` watching MyLatch (position 0), the postmaster's death (1) and
/// each of `sockets` (from position 2): readable, or with `writable` writable.
///
/// # Safety
/// MyLatch is set up; each socket belongs to a connection of this process, and none is
/// given twice (epoll would refuse it with an ERROR).
unsafe fn wait_set(
    cxt: pg_sys::MemoryContext,
    sockets: &[(i32, bool)],
) -> *mut pg_sys::WaitEventSet {
    // SAFETY: forwarded from the caller.
    unsafe {
        let set = pg_sys::CreateWaitEventSet(cxt, (sockets.len() + 2) as i32);
        pg_sys::AddWaitEventToSet(
            set,
            pg_sys::WL_LATCH_SET,
            pg_sys::PGINVALID_SOCKET,
            pg_sys::MyLatch,
            std::ptr::null_mut(),
        );
        pg_sys::AddWaitEventToSet(
            set,
            pg_sys::WL_EXIT_ON_PM_DEATH,
            pg_sys::PGINVALID_SOCKET,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
        for &(fd, writable) in sockets {
            let event = if writable {
                pg_sys::WL_SOCKET_WRITEABLE
            } else {
                pg_sys::WL_SOCKET_READABLE
            };
            pg_sys::AddWaitEventToSet(set, event, fd, std::ptr::null_mut(), std::ptr::null_mut());
        }
        set
    }
}

/// Sleep until this process's latch is set or `ms` milliseconds pass (exits if the
/// postmaster died), then reset the latch.
pub fn sleep_on_latch(ms: i64) {
    // SAFETY: MyLatch is this process's latch, set up for every backend and worker.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            ms,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
}

/// Whether `socket` has data to read right now (a `poll` that does not wait).
pub fn readable_now(socket: i32) -> bool {
    if socket < 0 {
        return false;
    }
    let mut fds = libc::pollfd {
        fd: socket,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a zero timeout; the socket belongs to a live connection
    // of this process.
    let n = unsafe { libc::poll(&mut fds, 1, 0) };
    n > 0 && fds.revents & libc::POLLIN != 0
}

/// Whether this process is a background worker (not a client's backend): only there
/// do pgrx's SIGHUP and SIGTERM flags exist (asked anywhere else, pgrx raises an ERROR).
pub fn in_background_worker() -> bool {
    // SAFETY: a plain read of a process global.
    unsafe { pg_sys::MyBackendType == pg_sys::BackendType::B_BG_WORKER }
}

/// Wait until the latch is set, `socket` (if any) is readable, or `timeout` passes.
/// Exits the process if the postmaster died. Returns true if SIGTERM was received (a
/// background worker; in a backend a cancel or termination raises its ERROR or FATAL).
pub fn wait(socket: Option<i32>, timeout: Duration) -> bool {
    let ms = timeout.as_millis().min(i64::MAX as u128) as i64;
    match socket {
        // SAFETY: the socket belongs to a live connection of this process; the set
        // watches MyLatch, which this process owns.
        Some(fd) if fd >= 0 => unsafe {
            let set = socket_set(fd);
            let mut ev = pg_sys::WaitEvent::default();
            pg_sys::WaitEventSetWait(set, ms, &mut ev, 1, pg_sys::PG_WAIT_EXTENSION);
            pg_sys::ResetLatch(pg_sys::MyLatch);
        },
        _ => sleep_on_latch(ms),
    }
    after_wait()
}

/// Wait until one of `sockets` is ready (each `(socket, writable)`: readable, or with
/// `writable` writable), the latch is set, or `timeout` passes, with a wait set of its
/// own (connections being made may change sockets). Returns which sockets are ready, and
/// whether SIGTERM was received (as [`wait`]). The sockets must be distinct.
pub fn wait_sockets(sockets: &[(i32, bool)], timeout: Duration) -> (Vec<bool>, bool) {
    let ms = timeout.as_millis().min(i64::MAX as u128) as std::ffi::c_long;
    let mut ready = vec![false; sockets.len()];
    // The latch and the postmaster's death come first (see `wait_set`).
    const FIRST_SOCKET: usize = 2;
    let io = pg_sys::WL_SOCKET_READABLE | pg_sys::WL_SOCKET_WRITEABLE;
    // SAFETY: MyLatch is this process's latch; each socket belongs to a connection of
    // this process being made or used, none twice (the caller's promise). The set is
    // freed before anything here can raise.
    unsafe {
        let set = wait_set(pg_sys::CurrentMemoryContext, sockets);
        let mut events: Vec<pg_sys::WaitEvent> = (0..sockets.len() + 2)
            .map(|_| pg_sys::WaitEvent::default())
            .collect();
        let n = pg_sys::WaitEventSetWait(
            set,
            ms,
            events.as_mut_ptr(),
            events.len() as i32,
            pg_sys::PG_WAIT_EXTENSION,
        );
        for e in &events[..n.max(0) as usize] {
            let pos = e.pos as usize;
            if e.events & io != 0 && pos >= FIRST_SOCKET {
                ready[pos - FIRST_SOCKET] = true;
            }
        }
        pg_sys::FreeWaitEventSet(set);
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    (ready, after_wait())
}

/// After a wait: [`serve_signals`], and in a background worker outside a transaction the
/// statistics still pending; true if SIGTERM was received.
fn after_wait() -> bool {
    let stop = serve_signals();
    if in_background_worker() {
        crate::pg::xact::report_stats_when_idle();
    }
    stop
}

/// Serve interrupts (a backend's cancel or termination raises here), and in a background
/// worker a reload asked for; true if SIGTERM was received. Every wait does this after
/// it; a loop that goes on without waiting (a backlog's reads) calls it itself.
pub fn serve_signals() -> bool {
    pgrx::check_for_interrupts!();
    // A backend's signals arrive as interrupts, served above.
    if !in_background_worker() {
        return false;
    }
    reload_if_asked();
    BackgroundWorker::sigterm_received()
}

/// Set the latch of backend `pid`, if it still runs: a worker waiting on its latch (a
/// paused apply worker, for instance) looks at its shared state at once instead of at its
/// next timeout. A pid reused meanwhile only costs that backend a spurious wake-up, which
/// every latch wait tolerates.
pub fn wake(pid: i32) {
    if pid <= 0 {
        return;
    }
    // SAFETY: BackendPidGetProc looks the pid up under ProcArrayLock; a PGPROC and its
    // latch live in shared memory for the server's life, and setting another backend's
    // process latch is what PostgreSQL itself does to wake it.
    unsafe {
        let proc = pg_sys::BackendPidGetProc(pid);
        if !proc.is_null() {
            pg_sys::SetLatch(&mut (*proc).procLatch);
        }
    }
}

/// Re-read the configuration file if SIGHUP arrived since the last look (a process that
/// waits elsewhere than in [`wait`], e.g. a parallel-apply writer on its queue).
pub fn reload_if_asked() {
    if BackgroundWorker::sighup_received() {
        // SAFETY: re-reading the configuration file is what SIGHUP asks for.
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
    }
}

/// PostgreSQL's `wal_receiver_timeout` as it is now (a reload changes it); `None` when 0
/// (disabled).
pub fn wal_receiver_timeout() -> Option<Duration> {
    // SAFETY: a GUC variable of this process, only written by this process's own
    // configuration processing (same thread).
    let ms = unsafe { pg_sys::wal_receiver_timeout };
    (ms > 0).then(|| Duration::from_millis(ms as u64))
}

/// Databases that accept connections and are not templates: (oid, name).
pub fn list_databases() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    crate::pg::xact::begin();
    // SAFETY: a catalog scan of the shared pg_database, inside a transaction.
    unsafe {
        let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, pg_sys::AccessShareLock as i32);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        loop {
            let tup = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tup.is_null() {
                break;
            }
            let data = (*tup).t_data;
            let form = (data as *const u8).add((*data).t_hoff as usize)
                as *const pg_sys::FormData_pg_database;
            if (*form).datallowconn && !(*form).datistemplate {
                let name = CStr::from_ptr((*form).datname.data.as_ptr())
                    .to_string_lossy()
                    .into_owned();
                out.push(((*form).oid.to_u32(), name));
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as i32);
    }
    crate::pg::xact::commit();
    out
}

/// Start a dynamic background worker running `function` of this library.
pub fn start_worker(
    name: &str,
    function: &str,
    dboid: u32,
    extra: &str,
) -> Option<DynamicBackgroundWorker> {
    launch(name, function, dboid, extra, 0)
}

/// Start a dynamic background worker whose exit this process is told about (its latch
/// is set), so it can notice at once that the worker is gone.
pub fn start_child_worker(
    name: &str,
    function: &str,
    dboid: u32,
    extra: &str,
) -> Option<DynamicBackgroundWorker> {
    // SAFETY: a plain read of this process's pid.
    launch(name, function, dboid, extra, unsafe { pg_sys::MyProcPid })
}

fn launch(
    name: &str,
    function: &str,
    dboid: u32,
    extra: &str,
    notify_pid: i32,
) -> Option<DynamicBackgroundWorker> {
    BackgroundWorkerBuilder::new(name)
        .set_type(name)
        .set_library("bdr")
        .set_function(function)
        .set_argument(pg_sys::Oid::from(dboid).into_datum())
        .set_extra(extra)
        .enable_spi_access()
        .set_restart_time(None)
        .set_notify_pid(notify_pid)
        .load_dynamic()
        .ok()
}

/// Start-up of a per-database worker: signal handlers, then a connection to the database
/// whose OID is the worker's argument. Returns that OID.
pub fn connect_to_arg_database(arg: pg_sys::Datum) -> u32 {
    use pgrx::bgworkers::SignalWakeFlags;
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let dboid = pg_sys::Oid::from(arg.value() as u32);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(dboid), None);
    dboid.to_u32()
}

extern "C-unwind" {
    /// PostgreSQL's SIGTERM handler for backends (`tcop/postgres.c`): sets ProcDiePending,
    /// acted on at the next CHECK_FOR_INTERRUPTS.
    #[link_name = "die"]
    fn pg_die(signo: std::ffi::c_int);
}

/// Start-up of a parallel-apply writer: like [`connect_to_arg_database`], except that
/// SIGTERM uses PostgreSQL's own backend handler, so a writer asked to stop leaves at
/// once even while it waits for a lock, a condition variable or its queue (all of which
/// process interrupts). Returns the database OID.
pub fn connect_writer_to_arg_database(arg: pg_sys::Datum) -> u32 {
    use pgrx::bgworkers::SignalWakeFlags;
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP);
    // SAFETY: installs the postgres binary's own handler for a signal of this process.
    unsafe {
        pg_sys::pqsignal(pg_sys::SIGTERM as i32, Some(pg_die));
    }
    let dboid = pg_sys::Oid::from(arg.value() as u32);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(dboid), None);
    dboid.to_u32()
}

/// Directory of the running postgres binary (pg_dump and psql live beside it).
pub fn pg_bindir() -> std::path::PathBuf {
    // SAFETY: my_exec_path is a NUL-terminated path set at process start, never changed.
    let exe = unsafe { CStr::from_ptr((&raw const pg_sys::my_exec_path).cast()) }
        .to_string_lossy()
        .into_owned();
    std::path::Path::new(&exe)
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default()
}

/// Release shared-memory slot `i` when this process exits, if it still holds it (its pid
/// is ours), whatever the way out: an ERROR ends a background worker without returning
/// from its main function, a FATAL without running any destructor.
pub fn release_slot_at_exit(i: usize) {
    #[pg_guard]
    unsafe extern "C-unwind" fn release(_code: std::ffi::c_int, arg: pg_sys::Datum) {
        let i = arg.value();
        // SAFETY: MyProcPid is set at process start. No LWLock of a failed operation may
        // still be held while we take ours (PostgreSQL's own exit path does the same).
        let me = unsafe {
            pg_sys::LWLockReleaseAll();
            pg_sys::MyProcPid
        };
        if crate::pg::shmem::get(i).pid == me {
            crate::pg::shmem::release(i);
        }
    }
    // SAFETY: registers a callback run by proc_exit, before shared memory is detached.
    unsafe { pg_sys::before_shmem_exit(Some(release), pg_sys::Datum::from(i)) };
}

/// Define the entry point PostgreSQL starts a background worker at, by symbol name:
/// `worker_entry!(bdr_apply_main => main)` exports `bdr_apply_main`, which runs `main`
/// (a safe `fn(pg_sys::Datum)`) under `pg_guard`. Exporting an unmangled symbol is an
/// unsafe attribute; this macro is where the crate allows it, so the workers' modules
/// define their entry points without any raw construct of their own.
macro_rules! worker_entry {
    ($symbol:ident => $body:path) => {
        #[allow(unsafe_code)]
        #[pgrx::pg_guard]
        #[no_mangle]
        pub extern "C-unwind" fn $symbol(arg: pgrx::pg_sys::Datum) {
            $body(arg)
        }
    };
}
pub(crate) use worker_entry;
