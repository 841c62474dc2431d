//! Shared memory: one slot per bdr background worker, so SQL (`bdr.apply_workers()`,
//! later `bdr.node_status()`) can see every worker's state, positions and last error, and
//! so a supervisor is never started twice for a database; and the state of every
//! snowflake sequence in use (`shmem/sequences.rs`); fences of replicated schema
//! changes (`shmem/fences.rs`) and the quorum verdict (`shmem/quorum.rs`) live in the
//! worker table too; the tombstone state ([`TOMBSTONES`]), read by every remote INSERT,
//! is one atomic word beside it.
//!
//! Invariant: a slot is claimed under the exclusive lock before its worker is registered,
//! and released by its owner; shared memory is rebuilt from scratch after a crash restart.

mod fences;
mod lock;
mod quorum;
mod sequences;

pub use fences::{
    fence_add, fence_clear, fence_keep, fence_origin, fenced_by, fences_active, Fence,
    FENCES_ACTIVE,
};
pub use quorum::{quorum, seen_at, set_quorum, set_seen, Quorum, Seen};
pub use sequences::{with_sequences, SeqSlot, Sequences, MAX_SEQUENCES, SEQUENCES};

use lock::ShmemLock;
use pgrx::prelude::*;

pub const MAX_WORKERS: usize = 64;
const NAME_LEN: usize = 64;
const ERROR_LEN: usize = 512;

#[derive(Copy, Clone, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Kind {
    Free = 0,
    Supervisor = 1,
    Apply = 2,
}

#[derive(Copy, Clone, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum State {
    Starting = 0,
    Connecting = 1,
    Streaming = 2,
    Erroring = 3,
    Stopped = 4,
    Paused = 5,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Connecting => "connecting",
            State::Streaming => "streaming",
            State::Erroring => "erroring",
            State::Stopped => "stopped",
            State::Paused => "paused",
        }
    }
}

#[derive(Copy, Clone)]
pub struct Slot {
    pub kind: Kind,
    pub dboid: u32,
    pub peer: [u8; NAME_LEN],
    pub pid: i32,
    pub state: State,
    pub pause_requested: bool,
    pub last_error: [u8; ERROR_LEN],
    pub last_error_time: i64,
    pub error_count: u32,
    pub received_lsn: u64,
    pub applied_lsn: u64,
    pub flushed_lsn: u64,
    pub last_applied_commit_time: i64,
    /// The peer's own tombstone horizon, from its last heartbeat applied here in commit
    /// order (0: none yet): how far it had applied every node it forwards from
    /// (`workers::supervisor`, hub and spoke).
    pub peer_horizon: i64,
    pub last_message_time: i64,
    pub started_at: i64,
    /// Conflicts resolved, per type (indexed like `Conflict::ALL`), since `stats.reset`.
    pub conflicts: [u64; 9],
    /// What the worker knows of the peer, for lag (see `bdr_core::lag`).
    pub peer_lsn: u64,
    pub pending_commit_time: i64,
    pub caught_up_time: i64,
    /// How far the peer's clock runs ahead of ours, as its commit timestamps show: the
    /// most, over the last 10 minutes, that a transaction's commit time exceeded our clock
    /// when its BEGIN arrived (µs; negative when behind, the normal case; a lower bound
    /// of the clock difference), and when that was seen. Unset until a transaction
    /// arrived (`peer_clock_seen` false).
    pub peer_clock_ahead: i64,
    pub peer_clock_ahead_time: i64,
    pub peer_clock_seen: bool,
    /// Last time anything (data or keepalive) arrived from the peer.
    pub last_contact_time: i64,
    pub stats: Stats,
    /// Logical messages from the peer that were not ours and were skipped.
    pub skipped_messages: u64,
    /// When a pause with a time limit (`bdr.apply_pause(peer, seconds)`, as a join asks
    /// for) ends by itself, PostgreSQL-epoch µs; 0: no limit.
    pub pause_deadline: i64,
}

/// Apply counters since `reset` (`bdr.apply_stats()`, `bdr.apply_stats_reset()`).
#[derive(Copy, Clone, Default, Debug, PartialEq, Eq)]
pub struct Stats {
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
    pub truncates: u64,
    pub commits: u64,
    pub ddl: u64,
    pub errors: u64,
    pub connects: u64,
    /// Transactions the peer began to stream before their commit, those applied
    /// streamed, and those that fell back to whole-transaction apply (`src/receive/stream.rs`).
    pub streamed: u64,
    pub stream_commits: u64,
    pub stream_fallbacks: u64,
    /// Transactions rolled back and applied again because a new row met an existing key
    /// (`bdr_core::kept`).
    pub reapplied: u64,
    pub reset: i64,
    /// Commits and time at the start of the apply-rate window.
    pub rate_commits: u64,
    pub rate_time: i64,
}

impl Stats {
    const ZERO: Stats = Stats {
        inserts: 0,
        updates: 0,
        deletes: 0,
        truncates: 0,
        commits: 0,
        ddl: 0,
        errors: 0,
        connects: 0,
        streamed: 0,
        stream_commits: 0,
        stream_fallbacks: 0,
        reapplied: 0,
        reset: 0,
        rate_commits: 0,
        rate_time: 0,
    };

    /// Add what one worker counted since it last published.
    pub fn add(&mut self, d: &Stats) {
        self.inserts += d.inserts;
        self.updates += d.updates;
        self.deletes += d.deletes;
        self.truncates += d.truncates;
        self.commits += d.commits;
        self.ddl += d.ddl;
        self.reapplied += d.reapplied;
    }
}

impl Slot {
    const EMPTY: Slot = Slot {
        kind: Kind::Free,
        dboid: 0,
        peer: [0; NAME_LEN],
        pid: 0,
        state: State::Stopped,
        pause_requested: false,
        last_error: [0; ERROR_LEN],
        last_error_time: 0,
        error_count: 0,
        received_lsn: 0,
        applied_lsn: 0,
        flushed_lsn: 0,
        last_applied_commit_time: 0,
        peer_horizon: 0,
        last_message_time: 0,
        started_at: 0,
        conflicts: [0; 9],
        peer_lsn: 0,
        pending_commit_time: 0,
        caught_up_time: 0,
        peer_clock_ahead: 0,
        peer_clock_ahead_time: 0,
        peer_clock_seen: false,
        last_contact_time: 0,
        stats: Stats::ZERO,
        skipped_messages: 0,
        pause_deadline: 0,
    };

    pub fn peer(&self) -> String {
        text(&self.peer)
    }
    pub fn last_error(&self) -> Option<String> {
        let s = text(&self.last_error);
        (!s.is_empty()).then_some(s)
    }
    pub fn set_error(&mut self, msg: &str, at: i64) {
        put(&mut self.last_error, msg);
        self.last_error_time = at;
        self.error_count += 1;
        self.stats.errors += 1;
    }

    /// Zero the counters (conflicts included), starting a new window at `now`.
    pub fn reset_stats(&mut self, now: i64) {
        self.stats = Stats::ZERO;
        self.stats.reset = now;
        self.stats.rate_time = now;
        self.conflicts = [0; 9];
        self.skipped_messages = 0;
    }
}

fn text(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn put(dst: &mut [u8], s: &str) {
    dst.fill(0);
    let mut n = s.len().min(dst.len() - 1);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
}

#[derive(Copy, Clone)]
pub struct Workers {
    pub slots: [Slot; MAX_WORKERS],
    /// Databases where `bdr.apply_pause()` (all peers) is in force: a worker slot
    /// created there later starts paused too.
    pub paused_dbs: [u32; 16],
    /// Tables whose user writes are held back for a replicated schema change (see
    /// `crate::ddl`).
    pub fences: [Fence; MAX_FENCES],
    /// Per database: whether this node sees enough voting members (`bdr.minimum_nodes`).
    pub quorum: [Quorum; 16],
    /// Per database and voting peer: when the supervisor last reached it.
    pub seen: [Seen; MAX_WORKERS],
}

pub const MAX_FENCES: usize = 32;

impl Default for Workers {
    fn default() -> Self {
        Workers {
            slots: [Slot::EMPTY; MAX_WORKERS],
            paused_dbs: [0; 16],
            fences: [Fence::EMPTY; MAX_FENCES],
            quorum: [Quorum::EMPTY; 16],
            seen: [Seen {
                dboid: 0,
                peer: [0; NAME_LEN],
                at: 0,
            }; MAX_WORKERS],
        }
    }
}

/// Record that every apply worker of `dboid` is (or no longer is) to be paused, including
/// those started later.
pub fn set_pause_all(dboid: u32, pause: bool) {
    let mut w = WORKERS.exclusive();
    if let Some(p) = w.paused_dbs.iter_mut().find(|d| **d == dboid) {
        if !pause {
            *p = 0;
        }
    } else if pause {
        if let Some(p) = w.paused_dbs.iter_mut().find(|d| **d == 0) {
            *p = dboid;
        }
    }
}

/// The tombstone state of this server in one atomic word, read by every remote INSERT
/// twice (before and after its write) without taking the worker table's lock: the high
/// 40 bits are the epoch, bumped whenever a transaction starts or ends writing tombstones
/// (so apply workers can cache "this table has no tombstones" until it changes instead
/// of asking every transaction); the low 24 bits count the transactions that have written
/// a tombstone and not yet ended. An apply worker that inserted a row where it saw no
/// tombstone re-checks for one while that count is non-zero or the epoch moved (see
/// `conflict::Resolver::verify_no_new_tombstone`). Every access is sequentially
/// consistent, as the lock was.
pub static TOMBSTONES: pgrx::PgAtomic<std::sync::atomic::AtomicU64> =
    // SAFETY: the name is unique to this extension.
    unsafe { pgrx::PgAtomic::new(c"bdr_tombstone_state") };

const WRITER_BITS: u32 = 24;
const WRITER_MASK: u64 = (1 << WRITER_BITS) - 1;

/// Apply `f` to (epoch, writers) atomically.
fn tombstone_update(f: impl Fn(u64, u64) -> (u64, u64)) {
    use std::sync::atomic::Ordering::SeqCst;
    let _ = TOMBSTONES.get().fetch_update(SeqCst, SeqCst, |v| {
        let (epoch, writers) = f(v >> WRITER_BITS, v & WRITER_MASK);
        Some((epoch << WRITER_BITS) | writers.min(WRITER_MASK))
    });
}

/// A transaction starts writing tombstones (called before its first tombstone write).
pub fn tombstone_writer_start() {
    tombstone_update(|epoch, writers| (epoch + 1, writers + 1));
}

/// A transaction that wrote tombstones ended (commit or abort): its tombstones are now
/// visible, or gone.
pub fn tombstone_writer_end() {
    tombstone_update(|epoch, writers| (epoch + 1, writers.saturating_sub(1)));
}

/// (epoch, transactions writing tombstones right now).
pub fn tombstone_state() -> (u64, u32) {
    let v = TOMBSTONES.get().load(std::sync::atomic::Ordering::SeqCst);
    (v >> WRITER_BITS, (v & WRITER_MASK) as u32)
}

/// Whether apply from slot `i` should pause: one field read without the lock (the apply
/// loop asks at every transaction boundary). `bdr.apply_pause` sets it under the lock and
/// then wakes the worker, so a request is seen at the next boundary.
pub fn pause_requested(i: usize) -> bool {
    // SAFETY: a bool, written whole under the lock; a value from just before a
    // concurrent request only delays the pause to the next boundary.
    unsafe { WORKERS.peek(|w| &raw const (*w).slots[i].pause_requested) }
}

// SAFETY: the name is unique to this extension; plain old data with no pointers, valid
// zeroed (`Kind::Free` and `State::Starting` are 0); every access goes through the LWLock
// but `pause_requested`'s read (`ShmemLock::peek`).
pub static WORKERS: ShmemLock<Workers> = unsafe { ShmemLock::new(c"bdr_workers") };

impl Workers {
    /// Make a zeroed table equal to `Workers::default()`, in place (see `shmem/lock.rs`).
    ///
    /// # Safety
    /// `w` points to a zeroed `Workers` no one else uses yet.
    unsafe fn init(w: *mut Workers) {
        // SAFETY: element writes inside the struct `w` points to.
        unsafe {
            let slots = (&raw mut (*w).slots).cast::<Slot>();
            for i in 0..MAX_WORKERS {
                slots.add(i).write(Slot::EMPTY);
            }
            let fences = (&raw mut (*w).fences).cast::<Fence>();
            for i in 0..MAX_FENCES {
                fences.add(i).write(Fence::EMPTY);
            }
            let quorum = (&raw mut (*w).quorum).cast::<Quorum>();
            for i in 0..16 {
                quorum.add(i).write(Quorum::EMPTY);
            }
        }
    }
}

static mut PREV_SHMEM_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_SHMEM_STARTUP: pg_sys::shmem_startup_hook_type = None;

#[pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    // SAFETY: the hook chain, in the request hook.
    unsafe {
        if let Some(prev) = PREV_SHMEM_REQUEST {
            prev();
        }
        WORKERS.request();
        SEQUENCES.request();
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    // SAFETY: the hook chain, in the startup hook, after our request hook ran.
    unsafe {
        if let Some(prev) = PREV_SHMEM_STARTUP {
            prev();
        }
        WORKERS.startup(Workers::init);
        SEQUENCES.startup(Sequences::init);
    }
}

/// Register the shared memory; called from `_PG_init`. The two tables are built in place
/// (`shmem/lock.rs`: pgrx's `pg_shmem_init!` builds them on the postmaster's stack, whose
/// pages every server process inherits); the two atomic words go through pgrx.
pub fn init() {
    // SAFETY: `_PG_init` of a preloaded library, in the postmaster: the hooks are chained.
    unsafe {
        PREV_SHMEM_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(shmem_request);
        PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup);
    }
    pgrx::pg_shmem_init!(FENCES_ACTIVE);
    pgrx::pg_shmem_init!(TOMBSTONES);
}

/// Claim a slot for (`kind`, `dboid`, `peer`) unless one is in use; returns its index, or
/// `None` when already claimed (or no slot is free: see the WARNING).
pub fn claim(kind: Kind, dboid: u32, peer: &str, now: i64) -> Option<usize> {
    let mut w = WORKERS.exclusive();
    if w.slots
        .iter()
        .any(|s| s.kind == kind && s.dboid == dboid && s.peer() == peer)
    {
        return None;
    }
    let i = w.slots.iter().position(|s| s.kind == Kind::Free)?;
    let paused = w.paused_dbs.contains(&dboid);
    let mut s = Slot::EMPTY;
    s.pause_requested = paused && kind == Kind::Apply;
    s.kind = kind;
    s.dboid = dboid;
    put(&mut s.peer, peer);
    s.state = State::Starting;
    s.started_at = now;
    s.reset_stats(now);
    w.slots[i] = s;
    Some(i)
}

/// Index of the slot for (`kind`, `dboid`, `peer`).
pub fn find(kind: Kind, dboid: u32, peer: &str) -> Option<usize> {
    let w = WORKERS.share();
    w.slots
        .iter()
        .position(|s| s.kind == kind && s.dboid == dboid && s.peer() == peer)
}

pub fn release(i: usize) {
    WORKERS.exclusive().slots[i] = Slot::EMPTY;
}

/// Change slot `i` under the exclusive lock.
pub fn update(i: usize, f: impl FnOnce(&mut Slot)) {
    f(&mut WORKERS.exclusive().slots[i]);
}

/// A copy of slot `i`.
pub fn get(i: usize) -> Slot {
    WORKERS.share().slots[i]
}

/// Copies of every slot in use.
pub fn all() -> Vec<Slot> {
    WORKERS
        .share()
        .slots
        .iter()
        .filter(|s| s.kind != Kind::Free)
        .copied()
        .collect()
}

/// Copies of the apply workers' slots of database `dboid`.
pub fn apply_slots(dboid: u32) -> Vec<Slot> {
    WORKERS
        .share()
        .slots
        .iter()
        .filter(|s| s.kind == Kind::Apply && s.dboid == dboid)
        .copied()
        .collect()
}

/// Every slot in use with its index.
pub fn all_indexed() -> Vec<(usize, Slot)> {
    WORKERS
        .share()
        .slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.kind != Kind::Free)
        .map(|(i, s)| (i, *s))
        .collect()
}
