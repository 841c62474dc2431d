//! Receive stage, parallel apply (`bdr.writers_per_peer` > 1): the receiver numbers each
//! remote transaction in the peer's commit order, hands it whole to a writer
//! (`src/workers/writer.rs`) over that writer's shared-memory queue, and tells the writer
//! which earlier transaction to wait for before a change that depends on it. A
//! transaction's frames and controls are batched and sent as one queue message at its
//! COMMIT, or whenever the batch passes [`BATCH_BYTES`] (a big transaction is never held
//! whole in memory): one message, and at most one wake-up of the writer, per small
//! transaction. A transaction goes to an idle writer (the one that committed last: warm
//! caches), else queues behind the busy writer with the fewest outstanding transactions
//! (at most [`DEPTH`] each, [`MAX_IN_FLIGHT`] in all), so a writer that commits finds
//! its next transaction already in its queue instead of sleeping until the receiver
//! notices.
//!
//! Why this way: the receiver keeps everything about the stream (pause, clock hold,
//! keepalives, feedback, lag); writers only apply. Dependencies are decided here from the
//! frames and the local catalog (`bdr_core::parallel::Deps`): a change waits for the last
//! earlier transaction that touched one of its keys (replica identity and every local
//! unique index, old and new tuple); DDL, TRUNCATE and tables with foreign keys (either
//! side), user triggers, expression unique indexes or no usable key are applied one
//! transaction at a time (the transaction waits for every earlier one and every later
//! one waits for it). A local table's plan is re-read after a relcache invalidation seen
//! at a BEGIN (checked at most every 500 ms).
//!
//! Invariants: flush feedback only covers transactions committed here (the last
//! committed transaction's (remote end, local end), commits being in order); the
//! receiver holds no origin session; only the transaction being received is partly
//! unsent (every earlier one was sent whole), so a writer never waits for a transaction
//! whose frames sit in the receiver; any writer's failure or exit stops the receiver with
//! an error, and whenever the receiver stops, its writers are stopped and waited for
//! before anything else restarts (`shutdown`), so no writer of an old group commits
//! behind a new one's back.

use crate::error::{raise, ApplyError};
use crate::pg::mq::{Aborter, Group, Sent, MAX_IN_FLIGHT};
use crate::pg::{relcache, shmem, xact};
use bdr_core::idmap::IdMap;
use bdr_core::parallel::{change_keys, Change, Ctl, Deps, TablePlan};
use bdr_core::stream::FlushTracker;
use bdr_core::wire::{self, Message};
use pgrx::bgworkers::{BackgroundWorkerStatus, DynamicBackgroundWorker};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A writer's batch is sent when it passes this many bytes (else at COMMIT).
const BATCH_BYTES: usize = 64 * 1024;
/// Most transactions handed to one writer and not committed yet.
const DEPTH: usize = 4;

thread_local! {
    /// This process's writers and group, for [`shutdown`] on any way out.
    static LIVE: RefCell<Option<(Aborter, Vec<DynamicBackgroundWorker>)>> = const { RefCell::new(None) };
}

/// Stop this process's writers (if any) and wait until they have exited: called on every
/// way out of the receiver, so a restarted group never runs beside an old writer.
pub fn shutdown() {
    let Some((aborter, writers)) = LIVE.with(|l| l.borrow_mut().take()) else {
        return;
    };
    aborter.set_abort();
    let stopping: Vec<_> = writers.into_iter().map(|w| w.terminate()).collect();
    for w in stopping {
        let _ = w.wait_for_shutdown();
    }
}

/// Where received transactions go: applied in this process (`bdr.writers_per_peer` =
/// 1), or handed to writers (parallel apply, `parallel.rs`).
pub(super) enum Sink {
    One(Box<crate::apply::Applier>),
    Many(Box<Dispatch>),
}

impl Sink {
    pub(super) fn tracker(&mut self) -> &mut bdr_core::stream::FlushTracker {
        match self {
            Sink::One(a) => &mut a.tracker,
            Sink::Many(d) => &mut d.tracker,
        }
    }

    /// Between a transaction's BEGIN and COMMIT (as received).
    pub(super) fn in_transaction(&self) -> bool {
        match self {
            Sink::One(a) => a.in_transaction(),
            Sink::Many(d) => d.receiving(),
        }
    }

    /// Anything received and not committed yet.
    pub(super) fn busy(&self) -> bool {
        match self {
            Sink::One(a) => a.in_transaction(),
            Sink::Many(d) => d.busy(),
        }
    }
}

impl super::Stream {
    /// Parallel apply: take in what the writers committed (positions, last commit time),
    /// and answer a synchronous commit at once.
    pub(super) fn poll_writers(&mut self) {
        if matches!(self.sink, Sink::Many(_)) {
            self.poll_many();
        }
    }

    /// [`Stream::poll_writers`] with parallel apply on; out of line, as the one-writer
    /// receive loop never runs it.
    #[inline(never)]
    fn poll_many(&mut self) {
        let Sink::Many(d) = &mut self.sink else {
            return;
        };
        let (any, ack) = d.poll(self.now);
        if any {
            let (applied, t, busy) = (d.tracker.applied_position(), d.last_commit_time, d.busy());
            if !busy {
                super::PENDING.with(|p| p.set((0, None)));
            }
            super::progress::note_commit(
                &shmem::Stats::default(),
                [0; 9],
                self.received,
                applied,
                t,
                self.peer_lsn,
            );
            if ack || self.now >= self.publish_progress_at {
                self.published();
                super::progress::publish_progress(self.slot);
            }
        }
        if ack {
            self.feedback(false);
        }
    }

    /// A stop was asked for while waiting for a writer.
    pub(super) fn stopping(&self) -> bool {
        matches!(&self.sink, Sink::Many(d) if d.stopping)
    }
}

struct Rel {
    remote: wire::Relation,
    plan: Option<(TablePlan, pgrx::pg_sys::Oid)>,
}

/// The receiver's side of parallel apply.
pub struct Dispatch {
    group: Group,
    nwriters: usize,
    /// Transactions handed to each writer and not seen committed, oldest first.
    outstanding: Vec<VecDeque<u64>>,
    /// Transaction each writer was last given.
    last_given: Vec<u64>,
    /// Each writer's batch not sent yet.
    out: Vec<Vec<u8>>,
    /// Last transaction number given out.
    next_seq: u64,
    /// The writer and number of the transaction being received.
    current: Option<(usize, u64)>,
    /// Highest transaction the current one already waits for.
    waited: u64,
    deps: Deps,
    rels: IdMap<u32, Rel>,
    pub tracker: FlushTracker,
    seen_committed: u64,
    pub last_commit_time: i64,
    slot: usize,
    peer: std::rc::Rc<str>,
    last_check: Instant,
    last_inval_check: Instant,
    /// SIGTERM arrived while waiting for a writer: the main loop stops.
    pub stopping: bool,
    /// Size of the dependency map at which it is pruned next.
    prune_at: usize,
    /// When the stream deadlock guard looked last (`direct::stop_if_blocking`).
    last_guard: Instant,
    /// Since when nothing handed out has committed (now while nothing is in flight).
    stalled_since: Instant,
}

impl Dispatch {
    /// Create the shared memory and start `k` writers; with fewer background worker slots
    /// free, as many as could be started (at least one: none is an error), with a warning.
    pub fn start(k: usize, slot: usize, dboid: u32, peer: &str, progress: u64) -> Dispatch {
        let group = Group::create(k);
        let mut writers = Vec::new();
        for w in 0..k {
            let extra = crate::workers::writer::extra(group.handle(), w, slot, peer);
            match crate::pg::bgw::start_child_worker(
                &format!("bdr writer {dboid} {peer} {w}"),
                "bdr_writer_main",
                dboid,
                &extra,
            ) {
                Some(h) => writers.push(h),
                None if w > 0 => {
                    // The queues of the writers not started stay unused: nothing is ever
                    // handed to a writer at or past `nwriters`.
                    pgrx::warning!(
                        "bdr: parallel apply from node \"{peer}\" runs {w} of \
                         bdr.writers_per_peer = {k} writers: no background worker slot is \
                         free for more (raise max_worker_processes; the apply worker starts \
                         the rest when it restarts)"
                    );
                    break;
                }
                None => {
                    LIVE.with(|l| *l.borrow_mut() = Some((group.aborter(), writers)));
                    raise(&ApplyError::ParallelStopped {
                        peer: peer.into(),
                        why: format!(
                            "could not start writer {w} of {k} (raise max_worker_processes)"
                        ),
                    })
                }
            }
        }
        let k = writers.len();
        LIVE.with(|l| *l.borrow_mut() = Some((group.aborter(), writers)));
        Dispatch {
            group,
            nwriters: k,
            outstanding: vec![VecDeque::new(); k],
            last_given: vec![0; k],
            out: vec![Vec::new(); k],
            next_seq: 0,
            current: None,
            waited: 0,
            deps: Deps::default(),
            rels: IdMap::default(),
            tracker: FlushTracker::new(progress),
            seen_committed: 0,
            last_commit_time: 0,
            slot,
            peer: peer.into(),
            last_check: Instant::now(),
            last_inval_check: Instant::now(),
            stopping: false,
            prune_at: 4096,
            last_guard: Instant::now(),
            stalled_since: Instant::now(),
        }
    }

    /// A transaction is being received (between its BEGIN and COMMIT).
    pub fn receiving(&self) -> bool {
        self.current.is_some()
    }

    /// Anything received and not committed yet.
    pub fn busy(&self) -> bool {
        self.current.is_some() || self.group.last_committed() < self.next_seq
    }

    /// Take in what writers committed since the last call: true if anything did; the
    /// second value is a writer's request to acknowledge a synchronous commit now.
    #[inline(never)]
    pub fn poll(&mut self, now: Instant) -> (bool, bool) {
        if self.group.aborted()
            || now.saturating_duration_since(self.last_check) >= Duration::from_millis(100)
        {
            self.check_writers(true);
        }
        // The request first: the commit it is about is then published already.
        let ack = self.group.take_ack();
        let lc = self.group.last_committed();
        let mut any = false;
        if lc > self.seen_committed {
            if let Some((remote, local, t)) = self.group.committed(lc) {
                self.tracker.applied(remote, local);
                if t != 0 {
                    self.last_commit_time = t;
                }
            }
            self.seen_committed = lc;
            self.stalled_since = now;
            any = true;
            // Forget what committed transactions touched, when the map has doubled
            // since the last time (not on every commit: pruning walks the whole map).
            if self.deps.len() > self.prune_at {
                self.deps.prune(lc);
                self.prune_at = (self.deps.len() * 2).max(4096);
            }
        }
        if !any {
            if self.group.last_committed() >= self.next_seq {
                self.stalled_since = now;
            } else if super::direct::stream_open() {
                // Writers busy without a commit: one may wait for the stream writer.
                self.stream_guard(self.stalled_since);
            }
        }
        (any, ack)
    }

    /// Wait until everything received has committed (before a pause). True on SIGTERM.
    #[inline(never)]
    pub fn drain(&mut self) -> bool {
        self.group.wake_receiver_at(Some(self.next_seq));
        let since = Instant::now();
        while self.busy() && !self.stopping {
            self.check_writers(true);
            self.stream_guard(since);
            if Group::sleep(Duration::from_millis(10)) {
                self.stopping = true;
            }
        }
        self.group.wake_receiver_at(None);
        self.stopping
    }

    /// The receiver has waited for its writers since `since`: after
    /// `direct::GUARD_AFTER`, stop a stream writer that blocks one of them (the deadlock
    /// guard of `direct.rs`), looking at most every `direct::GUARD_EVERY`.
    fn stream_guard(&mut self, since: Instant) {
        let now = Instant::now();
        if now.saturating_duration_since(since) < super::direct::GUARD_AFTER
            || now.saturating_duration_since(self.last_guard) < super::direct::GUARD_EVERY
        {
            return;
        }
        self.last_guard = now;
        let pids: Vec<i32> = LIVE.with(|l| {
            l.borrow()
                .as_ref()
                .map(|(_, ws)| ws.iter().filter_map(|w| w.pid().ok()).collect())
                .unwrap_or_default()
        });
        super::direct::stop_if_blocking(&pids);
    }

    /// Stop with an error if the group failed: a writer exited or raised the abort flag.
    fn check_writers(&mut self, force: bool) {
        if !force && self.last_check.elapsed() < Duration::from_millis(100) && !self.group.aborted()
        {
            return;
        }
        self.last_check = Instant::now();
        let dead = LIVE.with(|l| {
            l.borrow().as_ref().and_then(|(_, ws)| {
                ws.iter()
                    .position(|w| matches!(w.pid(), Err(BackgroundWorkerStatus::Stopped)))
            })
        });
        if dead.is_none() && !self.group.aborted() {
            return;
        }
        // Give the failed writer a moment to record its error in the slot.
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until
            && !LIVE.with(|l| {
                l.borrow().as_ref().is_some_and(|(_, ws)| {
                    ws.iter()
                        .any(|w| matches!(w.pid(), Err(BackgroundWorkerStatus::Stopped)))
                })
            })
        {
            Group::sleep(Duration::from_millis(10));
        }
        let error = shmem::get(self.slot).last_error().unwrap_or_default();
        raise(&ApplyError::ParallelStopped {
            peer: self.peer.to_string(),
            why: match dead {
                Some(w) => format!("writer {w} exited: {error}"),
                None => format!("a writer failed: {error}"),
            },
        })
    }

    /// Add one control or frame to writer `w`'s batch; the batch is sent when it is
    /// big (else by the caller, at COMMIT).
    fn send(&mut self, w: usize, ctl: Ctl<'_>) {
        if self.stopping {
            return;
        }
        ctl.push_to_batch(&mut self.out[w]);
        if self.out[w].len() >= BATCH_BYTES {
            self.flush(w);
        }
    }

    /// Send writer `w`'s batch as one queue message, waiting while its queue is full.
    fn flush(&mut self, w: usize) {
        if self.stopping || self.out[w].is_empty() {
            return;
        }
        let buf = std::mem::take(&mut self.out[w]);
        let mut waiting = false;
        let since = Instant::now();
        loop {
            match self.group.send(w, &buf) {
                Sent::Done => break,
                Sent::Detached => {
                    self.check_writers(true);
                    raise(&ApplyError::ParallelStopped {
                        peer: self.peer.to_string(),
                        why: format!("writer {w} left its queue"),
                    })
                }
                Sent::WouldBlock => {
                    if !waiting {
                        // Room comes from the writer reading (its queue sets our latch),
                        // or its failure: any commit.
                        waiting = true;
                        self.group
                            .wake_receiver_at(Some(self.group.last_committed() + 1));
                    }
                    self.check_writers(false);
                    self.stream_guard(since);
                    if Group::sleep(Duration::from_millis(10)) {
                        self.stopping = true;
                        break;
                    }
                }
            }
        }
        if waiting {
            self.group.wake_receiver_at(None);
        }
        // Keep the allocation for the next batch.
        let mut buf = buf;
        buf.clear();
        self.out[w] = buf;
    }

    /// The writer for the next transaction, waiting for one if need be: an idle writer
    /// (the one given a transaction last: it committed most recently, its caches are
    /// warm), else the one with the fewest outstanding transactions (the earliest to be
    /// free on ties), if it has fewer than [`DEPTH`] and fewer than [`MAX_IN_FLIGHT`] are
    /// in flight.
    fn pick_writer(&mut self) -> Option<usize> {
        let mut waiting = false;
        let since = Instant::now();
        let picked = loop {
            let lc = self.group.last_committed();
            for q in &mut self.outstanding {
                while q.front().is_some_and(|&s| s <= lc) {
                    q.pop_front();
                }
            }
            if self.next_seq - lc < MAX_IN_FLIGHT {
                let w = (0..self.nwriters)
                    .min_by_key(|&w| {
                        let q = &self.outstanding[w];
                        match q.back() {
                            None => (0, u64::MAX - self.last_given[w]),
                            Some(&last) => (q.len(), last),
                        }
                    })
                    .unwrap_or(0);
                if self.outstanding[w].len() < DEPTH {
                    break Some(w);
                }
            }
            if !waiting {
                // Woken when half of what is in flight has committed (not by every
                // commit: a signal each), then hand out several at once. Set before the
                // next look at what committed (see `Group::wake_receiver_at`).
                waiting = true;
                let in_flight = self.next_seq - lc;
                self.group
                    .wake_receiver_at(Some(lc + in_flight.div_ceil(2).max(1)));
                continue;
            }
            self.check_writers(false);
            self.stream_guard(since);
            if Group::sleep(Duration::from_millis(10)) {
                self.stopping = true;
                break None;
            }
        };
        if waiting {
            self.group.wake_receiver_at(None);
        }
        picked
    }

    /// The current transaction must wait for transaction `dep` (0: none).
    fn wait_for(&mut self, dep: u64) {
        let Some((w, _)) = self.current else {
            return;
        };
        if dep > self.waited && dep > self.group.last_committed() {
            self.waited = dep;
            self.send(w, Ctl::Wait { seq: dep });
        }
    }

    /// Hand one message (decoded, and its raw frame) to the writers.
    #[inline(never)]
    pub fn handle(&mut self, msg: &Message, raw: &[u8]) {
        if self.stopping {
            return;
        }
        match msg {
            Message::Begin(_) => {
                if self.current.is_some() {
                    raise(&ApplyError::Protocol("BEGIN inside a transaction".into()));
                }
                self.refresh_plans();
                let Some(w) = self.pick_writer() else {
                    return;
                };
                self.next_seq += 1;
                let seq = self.next_seq;
                self.outstanding[w].push_back(seq);
                self.last_given[w] = seq;
                self.current = Some((w, seq));
                self.waited = 0;
                self.send(w, Ctl::Begin { seq });
                self.send(w, Ctl::Frame(raw));
                let barrier = self.deps.begin(seq);
                self.wait_for(barrier);
            }
            Message::Relation(r) => {
                self.rels.insert(
                    r.id,
                    Rel {
                        remote: r.clone(),
                        plan: None,
                    },
                );
                // Every writer may apply changes of it later.
                for w in 0..self.nwriters {
                    self.send(w, Ctl::Frame(raw));
                }
            }
            Message::Insert(m) => self.change(m.relation, Change::Insert(&m.new), raw),
            Message::Update(m) => {
                self.change(m.relation, Change::Update(m.old.as_ref(), &m.new), raw)
            }
            Message::Delete(m) => self.change(m.relation, Change::Delete(&m.old), raw),
            Message::Truncate(_) => self.serial(raw),
            Message::Message(m) if m.prefix == bdr_core::ddl::DDL_PREFIX => self.serial(raw),
            Message::Message(_) => self.forward(raw),
            Message::Commit(_) => {
                self.forward(raw);
                if let Some((w, _)) = self.current.take() {
                    self.flush(w);
                }
            }
            // The receiver handles streamed transactions (src/receive/stream.rs).
            m => raise(&ApplyError::Protocol(format!(
                "{} frame handed to the writers",
                m.kind_name()
            ))),
        }
    }

    fn forward(&mut self, raw: &[u8]) {
        match self.current {
            Some((w, _)) => self.send(w, Ctl::Frame(raw)),
            None => raise(&ApplyError::Protocol(
                "a change outside a transaction".into(),
            )),
        }
    }

    /// Something that must run alone: after every earlier transaction, before every
    /// later one.
    fn serial(&mut self, raw: &[u8]) {
        if let Some((_, seq)) = self.current {
            let dep = self.deps.serial(seq);
            self.wait_for(dep);
        }
        self.forward(raw);
    }

    fn change(&mut self, relation: u32, change: Change<'_>, raw: &[u8]) {
        let Some((_, seq)) = self.current else {
            return self.forward(raw);
        };
        let plan = self.plan(relation);
        let dep = match plan {
            Some(TablePlan::Keyed {
                keys,
                identity_only,
            }) => {
                let hashes = change_keys(relation, &keys, identity_only, change);
                self.deps.change(seq, relation, hashes.as_deref())
            }
            _ => self.deps.serial(seq),
        };
        self.wait_for(dep);
        self.forward(raw);
    }

    /// How changes of peer relation `relation` are ordered (read from the local catalog
    /// once, until an invalidation); `None` for a relation never described.
    fn plan(&mut self, relation: u32) -> Option<TablePlan> {
        let rel = self.rels.get_mut(&relation)?;
        if rel.plan.is_none() {
            rel.plan = Some(super::plans::read_plan(&rel.remote));
        }
        rel.plan.as_ref().map(|(p, _)| p.clone())
    }

    /// Drop the plans of local tables whose definition changed (seen when a transaction
    /// starts, at most every 500 ms).
    fn refresh_plans(&mut self) {
        if self.last_inval_check.elapsed() < Duration::from_millis(500) {
            return;
        }
        self.last_inval_check = Instant::now();
        xact::begin();
        let inv = relcache::take_invalidated();
        xact::commit();
        if !inv.all && inv.relids.is_empty() {
            return;
        }
        for r in self.rels.values_mut() {
            if r.plan
                .as_ref()
                .is_some_and(|(_, relid)| inv.all || inv.relids.contains(relid))
            {
                r.plan = None;
            }
        }
    }
}
