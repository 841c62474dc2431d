//! Shared memory: one slot per bdr background worker, so SQL (`bdr.apply_workers()`,
//! later `bdr.node_status()`) can see every worker's state, positions and last error, and
//! so a supervisor is never started twice for a database.
//!
//! Invariant: a slot is claimed under the exclusive lock before its worker is registered,
//! and released by its owner; shared memory is rebuilt from scratch after a crash restart.

use pgrx::lwlock::PgLwLock;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;

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
    pub last_message_time: i64,
    pub started_at: i64,
    /// Conflicts resolved, per type (indexed like `Conflict::ALL`).
    pub conflicts: [u64; 9],
    /// Logical messages from the peer that are not bdr's own, skipped by the receiver.
    pub skipped_messages: u64,
    /// When a pause with a time limit (`bdr.apply_pause(peer, seconds)`, as a join asks
    /// for) ends by itself, PostgreSQL-epoch µs; 0: no limit.
    pub pause_deadline: i64,
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
        last_message_time: 0,
        started_at: 0,
        conflicts: [0; 9],
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
    /// Bumped whenever any tombstone is written on this server, so apply workers can cache
    /// "this table has no tombstones" until it changes instead of asking every transaction.
    pub tombstone_epoch: u64,
    /// Transactions that have written a tombstone and not yet ended. An apply worker that
    /// inserted a row where it saw no tombstone re-checks for one while this is non-zero
    /// (or the epoch moved): see `Applier::verify_no_new_tombstone`.
    pub tombstone_writers: u32,
}

impl Default for Workers {
    fn default() -> Self {
        Workers {
            slots: [Slot::EMPTY; MAX_WORKERS],
            tombstone_epoch: 0,
            tombstone_writers: 0,
        }
    }
}

/// A transaction starts writing tombstones (called before its first tombstone write).
pub fn tombstone_writer_start() {
    let mut w = WORKERS.exclusive();
    w.tombstone_epoch += 1;
    w.tombstone_writers += 1;
}

/// A transaction that wrote tombstones ended (commit or abort): its tombstones are now
/// visible, or gone.
pub fn tombstone_writer_end() {
    let mut w = WORKERS.exclusive();
    w.tombstone_epoch += 1;
    w.tombstone_writers = w.tombstone_writers.saturating_sub(1);
}

/// (epoch, transactions writing tombstones right now).
pub fn tombstone_state() -> (u64, u32) {
    let w = WORKERS.share();
    (w.tombstone_epoch, w.tombstone_writers)
}

/// Whether apply from slot `i` should pause (a cheap read of one field).
pub fn pause_requested(i: usize) -> bool {
    WORKERS.share().slots[i].pause_requested
}

// SAFETY: plain old data with no pointers; every access goes through the LWLock.
unsafe impl PGRXSharedMemory for Workers {}

// SAFETY: the name is unique to this extension.
pub static WORKERS: PgLwLock<Workers> = unsafe { PgLwLock::new(c"bdr_workers") };

/// Register the shared memory; called from `_PG_init`.
pub fn init() {
    pgrx::pg_shmem_init!(WORKERS);
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
    let mut s = Slot::EMPTY;
    s.kind = kind;
    s.dboid = dboid;
    put(&mut s.peer, peer);
    s.state = State::Starting;
    s.started_at = now;
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
