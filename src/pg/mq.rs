//! Parallel apply, the raw half: the dynamic shared memory a receiver shares with its
//! writers (one `shm_mq` queue per writer, receiver -> writer, and a small header), the
//! futex words and heavyweight locks that order commits and dependency waits, and the
//! condition variable writers sleep on until a transaction has started.
//!
//! Why this way: a wait for an earlier transaction first sleeps on that transaction's
//! futex word (bumped by its commit, which wakes only its own waiters and makes no system
//! call when nobody sleeps): PostgreSQL's latches wake with a signal (`kill`, then
//! `signalfd` and `epoll` in the sleeper), and one signal per commit was a third of the
//! writers' CPU on small transactions. A wait that lasts [`QUICK_WAIT`] becomes a
//! PostgreSQL lock wait on a tag per transaction (an advisory-class `LOCKTAG` with `field4`
//! = [`LOCK_FIELD4`], a value no SQL advisory lock uses: those use 1 and 2), so the
//! deadlock detector sees a cycle between a writer waiting for an earlier transaction and
//! that transaction waiting for a row the later one wrote, and `pg_locks` shows who waits
//! for whom. The header only carries facts written once per transaction (started,
//! committed with its positions) in atomics, read by whoever needs them; nothing in it is
//! guarded by a lock of its own.
//!
//! Wake-ups are kept to what is needed: the receiver sends one queue message per small
//! transaction (one latch wake-up of a sleeping writer), and a writer's commit sets the
//! receiver's latch only from the transaction the receiver said it waits for
//! ([`Group::wake_receiver_at`]), or to ask for a synchronous-commit ack.
//!
//! Invariants: a writer holds its transaction's tag exclusively (a session lock) from just
//! after BEGIN until it has published the commit, so a waiter that gets the tag in share
//! mode and does not find the transaction committed knows it failed. `last_committed`
//! only grows, one by one, in origin commit order. The ring of per-transaction records is
//! larger than the number of transactions that can be in flight ([`MAX_IN_FLIGHT`]), so
//! a record is read before it can be reused.

use pgrx::pg_sys;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Most writers per peer (`bdr.writers_per_peer`).
pub const MAX_WRITERS: usize = 16;
/// Per-transaction records kept (more than can be in flight).
const RING: usize = 64;
/// Most transactions handed out and not committed at once (the receiver's bound; several
/// may wait in one writer's queue), well below [`RING`].
pub const MAX_IN_FLIGHT: u64 = (RING / 2) as u64;
/// Bytes of each writer's queue (a larger frame passes in pieces).
const QUEUE_SIZE: usize = 256 * 1024;
/// How long a wait for an earlier transaction sleeps on that transaction's futex word
/// before it becomes a lock wait on its tag (seen by the deadlock detector and in
/// `pg_locks`). Most waits (commit order) end well before. A latch wake-up is a signal
/// (`kill`, then `signalfd` and `epoll` in the sleeper): on small transactions those
/// signals were a third of the writers' CPU; a futex wake-up is one system call, and
/// none when nobody sleeps.
const QUICK_WAIT: Duration = Duration::from_millis(100);
/// Longest single futex sleep: interrupts (SIGTERM) are checked between two.
const SLICE: Duration = Duration::from_millis(10);

/// Sleep while `word` holds `expected`, until woken or `timeout` (a spurious return is
/// fine: the caller checks again).
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is an aligned u32 in a shared mapping (DSM), kept mapped for the
    // process's life; FUTEX_WAIT (not the private variant) because other processes wake
    // it; `ts` outlives the call. Errors (EAGAIN: the word moved, EINTR, ETIMEDOUT) all
    // mean "check again".
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

/// Wake every process sleeping on `word`.
fn futex_wake(word: &AtomicU32) {
    // SAFETY: as in `futex_wait`; FUTEX_WAKE only reads the address as a key.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}
/// `LOCKTAG.locktag_field4` of bdr's transaction tags (`pg_locks.objsubid`).
pub const LOCK_FIELD4: u16 = 0x4244;

#[repr(C)]
struct Done {
    seq: AtomicU64,
    remote_end: AtomicU64,
    local_end: AtomicU64,
    commit_time: AtomicI64,
}

#[repr(C)]
struct Header {
    nwriters: usize,
    /// The receiver's latch (`PGPROC.procLatch`, in the main shared memory).
    receiver_latch: AtomicUsize,
    /// Set by anyone who fails or leaves: nobody commits any more, waiters raise.
    abort: AtomicBool,
    /// A writer committed a synchronous-commit transaction: send feedback now.
    ack: AtomicBool,
    /// The receiver waits for the commit of this transaction (room for more work, a
    /// drain): that commit and later ones set its latch. `u64::MAX` while it does not
    /// wait: commits do not wake it (it polls while work is in flight).
    wake_receiver_at: AtomicU64,
    last_committed: AtomicU64,
    cv: pg_sys::ConditionVariable,
    /// Per transaction (`seq % RING`): a futex word bumped by its commit alone (and by
    /// an abort), so a wait for it wakes only its own waiters.
    commit_word: [AtomicU32; RING],
    /// Per transaction: how many processes sleep on its `commit_word` (no wake-up
    /// system call when none does).
    sleepers: [AtomicU32; RING],
    started: [AtomicU64; RING],
    done: [Done; RING],
}

const fn header_size() -> usize {
    (std::mem::size_of::<Header>() + 63) & !63
}

/// One receiver's shared memory with its writers, as the receiver (every queue, as
/// sender) or a writer (its own queue, as receiver) sees it.
pub struct Group {
    hdr: *mut Header,
    handle: u32,
    dboid: u32,
    queues: Vec<*mut pg_sys::shm_mq_handle>,
    /// A writer's transaction tag held now (session lock).
    held: Option<u64>,
}

/// Result of a non-blocking send.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    Done,
    WouldBlock,
    Detached,
}

/// Why a wait for an earlier transaction ended without it committing.
#[derive(Debug, PartialEq, Eq)]
pub enum WaitFailed {
    /// The group is stopping (the receiver or another writer failed or left).
    Aborted,
    /// The transaction's writer let go of it without committing.
    NotCommitted,
}

/// What an error path needs to stop the group (see [`Group::set_abort`]).
#[derive(Clone, Copy)]
pub struct Aborter(*mut Header);

impl Aborter {
    /// Whether the group is stopping already.
    pub fn aborted(&self) -> bool {
        header_ref(self.0).abort.load(Ordering::Acquire)
    }

    pub fn set_abort(&self) {
        let hdr = header_ref(self.0);
        hdr.abort.store(true, Ordering::Release);
        // SAFETY: the condition variable was initialised with the header.
        unsafe { pg_sys::ConditionVariableBroadcast(&raw mut (*self.0).cv) };
        for word in &hdr.commit_word {
            word.fetch_add(1, Ordering::SeqCst);
            futex_wake(word);
        }
        let latch = hdr.receiver_latch.load(Ordering::Acquire);
        if latch != 0 {
            // SAFETY: as in `Group::wake_receiver`.
            unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
        }
    }
}

fn header_ref<'a>(hdr: *mut Header) -> &'a Header {
    // SAFETY: the header lives in a segment this process keeps mapped for its life
    // (`dsm_pin_mapping`), initialised by the receiver before any writer attaches.
    unsafe { &*hdr }
}

impl Group {
    /// Receiver: create the segment with `n` queues (this process as their sender).
    pub fn create(n: usize) -> Group {
        let n = n.clamp(1, MAX_WRITERS);
        let size = header_size() + n * QUEUE_SIZE;
        // SAFETY: a fresh segment of `size` bytes; the header is written in place before
        // anyone else knows the handle; each queue gets its own QUEUE_SIZE bytes.
        unsafe {
            let seg = pg_sys::dsm_create(size, 0);
            pg_sys::dsm_pin_mapping(seg);
            let base = pg_sys::dsm_segment_address(seg) as *mut u8;
            std::ptr::write_bytes(base, 0, header_size());
            let hdr = base as *mut Header;
            (*hdr).wake_receiver_at = AtomicU64::new(u64::MAX);
            (*hdr).nwriters = n;
            (*hdr)
                .receiver_latch
                .store(pg_sys::MyLatch as usize, Ordering::Release);
            pg_sys::ConditionVariableInit(&raw mut (*hdr).cv);
            let mut queues = Vec::with_capacity(n);
            for w in 0..n {
                let mq = pg_sys::shm_mq_create(
                    base.add(header_size() + w * QUEUE_SIZE).cast(),
                    QUEUE_SIZE,
                );
                pg_sys::shm_mq_set_sender(mq, pg_sys::MyProc);
                queues.push(pg_sys::shm_mq_attach(mq, seg, std::ptr::null_mut()));
            }
            Group {
                hdr,
                handle: pg_sys::dsm_segment_handle(seg),
                dboid: pg_sys::MyDatabaseId.to_u32(),
                queues,
                held: None,
            }
        }
    }

    /// Writer: attach to segment `handle` as the reader of queue `w`; `None` if the
    /// segment is gone (the receiver left) or has no such queue.
    pub fn attach(handle: u32, w: usize) -> Option<Group> {
        // SAFETY: dsm_attach returns NULL for a segment that no longer exists; the header
        // was initialised before the handle was handed out; queue `w` exists (checked).
        unsafe {
            let seg = pg_sys::dsm_attach(handle);
            if seg.is_null() {
                return None;
            }
            pg_sys::dsm_pin_mapping(seg);
            let base = pg_sys::dsm_segment_address(seg) as *mut u8;
            let hdr = base as *mut Header;
            if w >= (*hdr).nwriters {
                return None;
            }
            let mq = base.add(header_size() + w * QUEUE_SIZE) as *mut pg_sys::shm_mq;
            pg_sys::shm_mq_set_receiver(mq, pg_sys::MyProc);
            let q = pg_sys::shm_mq_attach(mq, seg, std::ptr::null_mut());
            Some(Group {
                hdr,
                handle,
                dboid: pg_sys::MyDatabaseId.to_u32(),
                queues: vec![q],
                held: None,
            })
        }
    }

    fn hdr(&self) -> &Header {
        header_ref(self.hdr)
    }

    /// Receiver: unmap the segment, once nothing in this process uses it any more (no
    /// [`Aborter`] of it is left). A writer still attached sees its queue detached (its
    /// `receive` returns `None` once the queue is empty); PostgreSQL destroys the segment
    /// when its last mapping goes. The queue handles (a few bytes of local
    /// memory each, allocated in whatever context was current at `create`) are left
    /// alone: freeing them could touch a context already reset.
    pub fn close(self) {
        // SAFETY: the segment is mapped in this process (pinned at `create`/`attach`);
        // `dsm_detach` runs the queues' detach callbacks (shared memory only), then
        // unmaps. Nothing in this process points into it after (the caller's contract).
        unsafe {
            let seg = pg_sys::dsm_find_mapping(self.handle);
            if !seg.is_null() {
                pg_sys::dsm_detach(seg);
            }
        }
    }

    /// The segment's handle (what a writer attaches with).
    pub fn handle(&self) -> u32 {
        self.handle
    }

    /// Receiver: send one message to writer `w` without blocking. After `WouldBlock`,
    /// call again with the same bytes (the queue keeps the partial send).
    pub fn send(&self, w: usize, bytes: &[u8]) -> Sent {
        // SAFETY: our own queue handle; `bytes` is valid for the call.
        let r = unsafe {
            pg_sys::shm_mq_send(
                self.queues[w],
                bytes.len(),
                bytes.as_ptr().cast(),
                true,
                true,
            )
        };
        match r {
            pg_sys::shm_mq_result::SHM_MQ_SUCCESS => Sent::Done,
            pg_sys::shm_mq_result::SHM_MQ_WOULD_BLOCK => Sent::WouldBlock,
            _ => Sent::Detached,
        }
    }

    /// Writer: the next message (blocking; interrupts are processed while waiting), or
    /// `None` once the receiver has detached and everything it sent was read. The slice
    /// is valid until the next call.
    pub fn receive(&self) -> Option<&[u8]> {
        let mut n: pg_sys::Size = 0;
        let mut data: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: our own queue handle; the returned buffer stays valid until the next
        // receive on this handle, which needs `&self` again (not while the slice lives
        // — the borrow checker holds `self` borrowed).
        unsafe {
            let r = pg_sys::shm_mq_receive(self.queues[0], &mut n, &mut data, false);
            if r != pg_sys::shm_mq_result::SHM_MQ_SUCCESS {
                return None;
            }
            Some(std::slice::from_raw_parts(data as *const u8, n))
        }
    }

    pub fn last_committed(&self) -> u64 {
        self.hdr().last_committed.load(Ordering::SeqCst)
    }

    /// Receiver: it is about to wait until transaction `seq` has committed (`None`: it
    /// no longer waits); the commits from `seq` on set its latch. Set before checking
    /// what it waits for (the writer stores its commit, then reads this: one of the two
    /// sees the other).
    pub fn wake_receiver_at(&self, seq: Option<u64>) {
        self.hdr()
            .wake_receiver_at
            .store(seq.unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    /// (remote end LSN, local commit end LSN, remote commit time) of committed
    /// transaction `seq`, if its record is still in the ring.
    pub fn committed(&self, seq: u64) -> Option<(u64, u64, i64)> {
        let d = &self.hdr().done[seq as usize % RING];
        if d.seq.load(Ordering::Acquire) != seq {
            return None;
        }
        let r = (
            d.remote_end.load(Ordering::Relaxed),
            d.local_end.load(Ordering::Relaxed),
            d.commit_time.load(Ordering::Relaxed),
        );
        (d.seq.load(Ordering::Acquire) == seq).then_some(r)
    }

    /// Stop the group: nobody commits any more, every waiter raises.
    pub fn set_abort(&self) {
        self.aborter().set_abort();
    }

    pub fn aborter(&self) -> Aborter {
        Aborter(self.hdr)
    }

    pub fn aborted(&self) -> bool {
        self.hdr().abort.load(Ordering::Acquire)
    }

    /// Writer: a synchronous-commit transaction committed (and was flushed).
    pub fn request_ack(&self) {
        self.hdr().ack.store(true, Ordering::Release);
        self.wake_receiver();
    }

    /// Receiver: whether a writer asked for feedback now (cleared).
    pub fn take_ack(&self) -> bool {
        self.hdr().ack.swap(false, Ordering::AcqRel)
    }

    fn wake_receiver(&self) {
        let latch = self.hdr().receiver_latch.load(Ordering::Acquire);
        if latch != 0 {
            // SAFETY: the receiver's PGPROC latch, in the main shared memory (mapped at
            // the same address in every backend); setting a latch of a process that has
            // exited is harmless.
            unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
        }
    }

    fn tag(&self, seq: u64) -> pg_sys::LOCKTAG {
        pg_sys::LOCKTAG {
            locktag_field1: self.dboid,
            locktag_field2: self.handle,
            locktag_field3: seq as u32,
            locktag_field4: LOCK_FIELD4,
            locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
            locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
        }
    }

    /// Writer: transaction `seq` has begun here; hold its tag until it is published
    /// committed (or this process exits).
    pub fn start(&mut self, seq: u64) {
        let tag = self.tag(seq);
        // SAFETY: a valid lock tag; a session lock, released in `committed_here` or by
        // the process's exit (advisory-class locks are released at backend exit).
        unsafe {
            pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as i32, true, false);
        }
        self.held = Some(seq);
        self.hdr().started[seq as usize % RING].store(seq, Ordering::Release);
        // SAFETY: the condition variable was initialised with the header.
        unsafe { pg_sys::ConditionVariableBroadcast(&raw mut (*self.hdr).cv) };
    }

    /// Writer: wait until transaction `seq` has committed (0: nothing to wait for).
    /// First a sleep of at most [`QUICK_WAIT`] on its own futex word; then a
    /// wait for its tag, a lock wait (seen by the deadlock detector and in `pg_locks`),
    /// before which a short sleep until its writer has begun it.
    pub fn wait_for(&self, seq: u64) -> Result<(), WaitFailed> {
        if seq == 0 || self.last_committed() >= seq {
            return Ok(());
        }
        let hdr = self.hdr();
        // First a sleep on the transaction's own futex word (one sleep, one wake-up by
        // its commit, no signal); past QUICK_WAIT, the lock wait below.
        let slot = seq as usize % RING;
        let (word, sleepers) = (&hdr.commit_word[slot], &hdr.sleepers[slot]);
        let until = std::time::Instant::now() + QUICK_WAIT;
        loop {
            if hdr.abort.load(Ordering::SeqCst) {
                return Err(WaitFailed::Aborted);
            }
            if self.last_committed() >= seq {
                return Ok(());
            }
            if std::time::Instant::now() >= until {
                break;
            }
            // The commit stores `last_committed`, bumps the word, then reads `sleepers`;
            // this reads the word, counts itself, then reads `last_committed` (all
            // SeqCst): either it sees the commit, or the word moved (the futex returns at
            // once), or the commit sees a sleeper and wakes it.
            let seen = word.load(Ordering::SeqCst);
            sleepers.fetch_add(1, Ordering::SeqCst);
            if self.last_committed() < seq && !hdr.abort.load(Ordering::SeqCst) {
                futex_wait(word, seen, SLICE);
            }
            sleepers.fetch_sub(1, Ordering::SeqCst);
            // SIGTERM (the backend `die` handler) and other interrupts, every slice.
            pgrx::check_for_interrupts!();
        }
        let cv = &raw const hdr.cv as *mut pg_sys::ConditionVariable;
        let result = loop {
            if hdr.abort.load(Ordering::Acquire) {
                break Err(WaitFailed::Aborted);
            }
            if self.last_committed() >= seq
                || hdr.started[seq as usize % RING].load(Ordering::Acquire) >= seq
            {
                break Ok(());
            }
            // SAFETY: an initialised condition variable; the sleep processes interrupts.
            unsafe {
                pg_sys::ConditionVariableTimedSleep(cv, 100, pg_sys::PG_WAIT_EXTENSION);
            }
        };
        // SAFETY: no condition-variable sleep is prepared any more after this.
        unsafe { pg_sys::ConditionVariableCancelSleep() };
        result?;
        if self.last_committed() < seq {
            let tag = self.tag(seq);
            // SAFETY: a valid lock tag; taken and released at once (session lock).
            unsafe {
                pg_sys::LockAcquire(&tag, pg_sys::ShareLock as i32, true, false);
                pg_sys::LockRelease(&tag, pg_sys::ShareLock as i32, true);
            }
        }
        if self.last_committed() >= seq {
            Ok(())
        } else if self.aborted() {
            Err(WaitFailed::Aborted)
        } else {
            Err(WaitFailed::NotCommitted)
        }
    }

    /// Writer: transaction `seq` committed here (or was skipped): publish it, let go of
    /// its tag and wake whoever waits.
    pub fn committed_here(&mut self, seq: u64, remote_end: u64, local_end: u64, time: i64) {
        let hdr = self.hdr();
        let d = &hdr.done[seq as usize % RING];
        d.seq.store(0, Ordering::Release);
        d.remote_end.store(remote_end, Ordering::Relaxed);
        d.local_end.store(local_end, Ordering::Relaxed);
        d.commit_time.store(time, Ordering::Relaxed);
        d.seq.store(seq, Ordering::Release);
        hdr.last_committed.store(seq, Ordering::SeqCst);
        let slot = seq as usize % RING;
        hdr.commit_word[slot].fetch_add(1, Ordering::SeqCst);
        if hdr.sleepers[slot].load(Ordering::SeqCst) > 0 {
            futex_wake(&hdr.commit_word[slot]);
        }
        if let Some(held) = self.held.take() {
            let tag = self.tag(held);
            // SAFETY: the session lock taken in `start`.
            unsafe {
                pg_sys::LockRelease(&tag, pg_sys::ExclusiveLock as i32, true);
            }
        }
        // SAFETY: the condition variable was initialised with the header.
        unsafe { pg_sys::ConditionVariableBroadcast(&raw mut (*self.hdr).cv) };
        // The receiver only needs this commit at once if it waits for it;
        // otherwise it takes the commit in at its next round (it polls every 10 ms while
        // work is in flight). A wake-up per commit (a signal, and a context switch when it
        // sleeps on its socket) was one `kill` per transaction, for nothing.
        if seq >= self.hdr().wake_receiver_at.load(Ordering::SeqCst) {
            self.wake_receiver();
        }
    }

    /// Wait on this process's latch (set by a writer's commit or by queue progress) for
    /// at most `timeout`. True on SIGTERM.
    pub fn sleep(timeout: Duration) -> bool {
        crate::pg::bgw::wait(None, timeout)
    }
}
