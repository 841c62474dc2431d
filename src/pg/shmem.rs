//! Shared memory: one slot per bdr background worker, so SQL (`bdr.apply_workers()`,
//! later `bdr.node_status()`) can see every worker's state, positions and last error, and
//! so a supervisor is never started twice for a database; and the state of every
//! snowflake sequence in use (see the section at the end).
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
    /// Bumped whenever any tombstone is written on this server, so apply workers can cache
    /// "this table has no tombstones" until it changes instead of asking every transaction.
    pub tombstone_epoch: u64,
    /// Transactions that have written a tombstone and not yet ended. An apply worker that
    /// inserted a row where it saw no tombstone re-checks for one while this is non-zero
    /// (or the epoch moved): see `Applier::verify_no_new_tombstone`.
    pub tombstone_writers: u32,
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

/// The supervisor's last verdict on `bdr.minimum_nodes` for database `dboid`.
#[derive(Copy, Clone)]
pub struct Quorum {
    pub dboid: u32,
    pub required: u32,
    pub seen: u32,
    pub ok: bool,
    /// Voting members not reached, comma-separated.
    pub missing: [u8; ERROR_LEN],
    pub since: i64,
}

impl Quorum {
    const EMPTY: Quorum = Quorum {
        dboid: 0,
        required: 0,
        seen: 0,
        ok: true,
        missing: [0; ERROR_LEN],
        since: 0,
    };
    pub fn missing(&self) -> String {
        text(&self.missing)
    }
}

/// When a voting peer was last reached by this node's supervisor.
#[derive(Copy, Clone)]
pub struct Seen {
    pub dboid: u32,
    pub peer: [u8; NAME_LEN],
    pub at: i64,
}

/// Record that `peer` of `dboid` was reached at `at`.
pub fn set_seen(dboid: u32, peer: &str, at: i64) {
    let mut w = WORKERS.exclusive();
    let i = w
        .seen
        .iter()
        .position(|s| s.dboid == dboid && text(&s.peer) == peer)
        .or_else(|| w.seen.iter().position(|s| s.dboid == 0));
    if let Some(i) = i {
        let mut s = Seen {
            dboid,
            peer: [0; NAME_LEN],
            at,
        };
        put(&mut s.peer, peer);
        w.seen[i] = s;
    }
}

/// When `peer` of `dboid` was last reached (0: never).
pub fn seen_at(dboid: u32, peer: &str) -> i64 {
    WORKERS
        .share()
        .seen
        .iter()
        .find(|s| s.dboid == dboid && text(&s.peer) == peer)
        .map(|s| s.at)
        .unwrap_or(0)
}

/// Store the quorum verdict for `dboid`; `None` forgets it (no requirement).
pub fn set_quorum(dboid: u32, q: Option<(u32, u32, bool, &str, i64)>) {
    let mut w = WORKERS.exclusive();
    let i = w.quorum.iter().position(|x| x.dboid == dboid);
    match q {
        None => {
            if let Some(i) = i {
                w.quorum[i] = Quorum::EMPTY;
            }
        }
        Some((required, seen, ok, missing, now)) => {
            let Some(i) = i.or_else(|| w.quorum.iter().position(|x| x.dboid == 0)) else {
                return;
            };
            let changed = w.quorum[i].dboid != dboid || w.quorum[i].ok != ok;
            let mut x = w.quorum[i];
            x.dboid = dboid;
            x.required = required;
            x.seen = seen;
            x.ok = ok;
            put(&mut x.missing, missing);
            if changed {
                x.since = now;
            }
            w.quorum[i] = x;
        }
    }
}

/// The quorum verdict for `dboid`, if any.
pub fn quorum(dboid: u32) -> Option<Quorum> {
    WORKERS
        .share()
        .quorum
        .iter()
        .find(|x| x.dboid == dboid)
        .copied()
}

pub const MAX_FENCES: usize = 32;

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
    const EMPTY: Fence = Fence {
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

/// Lift the fences matching `pred`; returns how many.
pub fn fence_clear(pred: impl Fn(&Fence) -> bool) -> usize {
    if FENCES_ACTIVE
        .get()
        .load(std::sync::atomic::Ordering::SeqCst)
        == 0
    {
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
    if FENCES_ACTIVE
        .get()
        .load(std::sync::atomic::Ordering::SeqCst)
        == 0
    {
        return None;
    }
    let w = WORKERS.share();
    w.fences
        .iter()
        .find(|f| f.dboid == dboid && f.relid == relid && f.exempt_pid != pid && f.deadline > now)
        .map(|f| text(&f.origin))
}

impl Default for Workers {
    fn default() -> Self {
        Workers {
            slots: [Slot::EMPTY; MAX_WORKERS],
            tombstone_epoch: 0,
            tombstone_writers: 0,
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
    pgrx::pg_shmem_init!(FENCES_ACTIVE);
    pgrx::pg_shmem_init!(SEQUENCES);
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

// ---------------------------------------------------------------------------------------
// Snowflake sequences (src/sequence.rs): one slot per sequence in use, under its own
// LWLock so id generation never waits for the worker table.
//
// Invariant: a slot's `persisted` is at most the value last written to its sequence by
// `setval` (it is raised only after `setval` returned), and every id handed out from the
// slot is at most `persisted`. So any slot that no backend is persisting for can be
// dropped at any time (LRU eviction when the table is full): it is rebuilt from the
// sequence's value, above every id it handed out.

/// How many sequences can be in use at once before the least recently used is evicted.
pub const MAX_SEQUENCES: usize = 512;
/// How many databases' node numbers are cached.
const MAX_DATABASES: usize = 64;

#[derive(Copy, Clone, Default)]
pub struct SeqSlot {
    /// 0: free.
    pub dboid: u32,
    pub relid: u32,
    pub generator: bdr_core::snowflake::Generator,
    /// The floor known to be in the sequence.
    pub persisted: i64,
    /// Pid of the backend writing a new floor (0: none).
    pub persisting: i32,
    pub last_used: u64,
}

#[derive(Copy, Clone)]
pub struct Sequences {
    pub slots: [SeqSlot; MAX_SEQUENCES],
    pub tick: u64,
    /// (database, node number + 1): 0 means unknown.
    pub node_numbers: [(u32, i32); MAX_DATABASES],
}

impl Default for Sequences {
    fn default() -> Self {
        Sequences {
            slots: [SeqSlot::default(); MAX_SEQUENCES],
            tick: 0,
            node_numbers: [(0, 0); MAX_DATABASES],
        }
    }
}

impl Sequences {
    /// Index of the slot of (`dboid`, `relid`), trying `hint` first.
    pub fn find(&self, dboid: u32, relid: u32, hint: Option<usize>) -> Option<usize> {
        if let Some(i) = hint.filter(|&i| i < MAX_SEQUENCES) {
            let s = &self.slots[i];
            if s.dboid == dboid && s.relid == relid {
                return Some(i);
            }
        }
        self.slots
            .iter()
            .position(|s| s.dboid == dboid && s.relid == relid)
    }

    /// A slot for (`dboid`, `relid`) starting above `floor`: an existing one if another
    /// backend made it meanwhile, else a free one, else the least recently used one that
    /// nobody is persisting for. `None` only if every slot is being persisted right now.
    pub fn insert(&mut self, dboid: u32, relid: u32, floor: i64) -> Option<usize> {
        if let Some(i) = self.find(dboid, relid, None) {
            return Some(i);
        }
        let i = self.slots.iter().position(|s| s.dboid == 0).or_else(|| {
            self.slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.persisting == 0)
                .min_by_key(|(_, s)| s.last_used)
                .map(|(i, _)| i)
        })?;
        self.tick += 1;
        self.slots[i] = SeqSlot {
            dboid,
            relid,
            generator: bdr_core::snowflake::Generator::after_floor(floor),
            persisted: floor.max(0),
            persisting: 0,
            last_used: self.tick,
        };
        Some(i)
    }

    /// The sequence's value changed under a slot (its kind was changed, so it may have been
    /// restarted or moved on by plain `nextval`): the generator stays above both what it
    /// handed out and `floor`, and only `floor` counts as persisted.
    pub fn refresh(&mut self, dboid: u32, relid: u32, floor: i64) {
        if let Some(i) = self.find(dboid, relid, None) {
            let s = &mut self.slots[i];
            s.generator = s
                .generator
                .later(bdr_core::snowflake::Generator::after_floor(floor));
            s.persisted = floor.max(0);
        }
    }

    pub fn node_number(&self, dboid: u32) -> Option<u16> {
        self.node_numbers
            .iter()
            .find(|(d, n)| *d == dboid && *n > 0)
            .map(|(_, n)| (*n - 1) as u16)
    }

    pub fn set_node_number(&mut self, dboid: u32, number: Option<u16>) {
        let v = number.map_or(0, |n| n as i32 + 1);
        if let Some(e) = self.node_numbers.iter_mut().find(|(d, _)| *d == dboid) {
            e.1 = v;
        } else if let Some(e) = self.node_numbers.iter_mut().find(|(d, _)| *d == 0) {
            *e = (dboid, v);
        }
    }
}

// SAFETY: plain old data with no pointers; every access goes through the LWLock.
unsafe impl PGRXSharedMemory for Sequences {}

// SAFETY: the name is unique to this extension.
pub static SEQUENCES: PgLwLock<Sequences> = unsafe { PgLwLock::new(c"bdr_sequences") };

/// Run `f` on the sequence table under the exclusive lock (keep it short: no I/O).
pub fn with_sequences<R>(f: impl FnOnce(&mut Sequences) -> R) -> R {
    f(&mut SEQUENCES.exclusive())
}
