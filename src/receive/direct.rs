//! Streamed transactions applied before their commit: the receiver's side of the stream
//! writer (`src/workers/stream_writer.rs`).
//!
//! The first piece of a streamed transaction starts a stream writer (unless one is
//! running: a writer idle for 30 s is let go — its queue segment is unmapped, which ends
//! its wait, and it exits without a signal) and every frame of the transaction is
//! forwarded to it as it arrives; ordinary transactions received between the pieces are
//! applied as usual, here (`bdr.writers_per_peer` = 1) or by the parallel writers
//! (`parallel.rs`). At STREAM COMMIT the receiver waits until every earlier transaction
//! has committed (itself, or its parallel writers: it drains them), waits for the commit
//! time if it lies in this node's future, hands its origin's session over if it holds it
//! (PostgreSQL 15 allows one process per origin session; with parallel apply nobody holds
//! it between commits), tells the writer to commit, waits for it, takes the session back
//! and records (remote end, local end) for flush feedback. Nothing received after the
//! STREAM COMMIT is applied before it has committed, so commits stay in the peer's order.
//!
//! A subtransaction rolled back on the peer is forwarded like any frame: the writer rolls
//! back its changes and the transaction goes on (see the writer's module note).
//!
//! A change that needs a last-update-wins decision (so the commit time) is not a
//! fallback: the writer keeps it, and every later change of the transaction, until
//! STREAM COMMIT (up to `bdr.stream_writer_wait_memory`; see the writer's module note).
//!
//! Fallback (`Stream::fall_back_direct`): DDL/TRUNCATE/a message in the stream, more
//! waiting changes than `bdr.stream_writer_wait_memory`, a second streamed transaction
//! while one is open, a writer that failed, or the deadlock guard below: the writer is stopped (its transaction rolls back with it, so its locks go),
//! and the receiver reconnects without streaming from what it applied; the peer then
//! sends the transaction whole at its COMMIT (`stream.rs`).
//!
//! Deadlock guard: while the writer holds an open transaction, an ordinary transaction
//! applied here may wait for one of its row locks (a key the streamed transaction wrote,
//! e.g. through a unique index that exists only here), and the writer waits for the
//! next piece, which the blocked receiver will never read: a cycle no lock manager sees.
//! So while a streamed transaction is open, the receiver's own transactions run with
//! `lock_timeout` (`GUARD_TIMEOUT`); a lock timeout then rolls the ordinary transaction
//! back, stops the writer and falls back (the ordinary transaction is sent again after
//! the reconnect, and no longer waits). With parallel apply the blocked one is a writer
//! and the receiver waits for it (a full queue, the in-flight limit, the drain before a
//! STREAM COMMIT): a receiver that has waited for its writers for [`GUARD_AFTER`] looks
//! in the lock manager (`pg_blocking_pids`) whether the stream writer blocks one of them
//! ([`stop_if_blocking`]), and if so stops it, and falls back at its next frame. A cycle
//! made only of locks (the stream writer waits for a writer's row, which waits for its
//! commit turn behind one blocked by the stream writer) is PostgreSQL's deadlock
//! detector's: the stream writer checks first, so it is the one rolled back.
//!
//! Invariants: at most one streamed transaction is open in the writer; the receiver
//! commits nothing while its origin session is handed over; on every way out of the
//! receiver the writer is stopped and waited for ([`shutdown`]), so none outlives it.

use super::Stream;
use crate::pg::mq::{Aborter, Group, Sent};
use crate::pg::{shmem, xact};
use bdr_core::parallel::Ctl;
use bdr_core::wire::{self, Message};
use pgrx::bgworkers::{BackgroundWorkerStatus, DynamicBackgroundWorker};
use std::cell::RefCell;
use std::time::Duration;

/// `lock_timeout` of the receiver's own transactions while a streamed one is open.
const GUARD_TIMEOUT: &str = "1s";

/// With parallel apply: how long the receiver waits for its writers before it looks
/// whether the stream writer blocks one of them (then every [`GUARD_EVERY`]).
pub(super) const GUARD_AFTER: Duration = Duration::from_secs(1);
pub(super) const GUARD_EVERY: Duration = Duration::from_millis(250);

/// How long a stream writer being let go may take to leave on its own before SIGTERM.
const LET_GO: Duration = Duration::from_secs(2);

/// A stream writer with no streamed transaction for this long exits (its
/// `max_worker_processes` slot and its memory go back); the next streamed transaction
/// starts a new one.
const IDLE_WRITER: Duration = Duration::from_secs(30);

thread_local! {
    /// This process's stream writer and its group, for [`shutdown`] on any way out.
    static LIVE: RefCell<Option<(Aborter, DynamicBackgroundWorker)>> = const { RefCell::new(None) };
}

/// Stop this process's stream writer (if any) and wait until it has exited (its open
/// transaction is rolled back by its exit). Called on the receiver's error and exit
/// paths (`workers/apply.rs`), where the `Stream` is gone; the receiver itself lets its
/// writer go with `Stream::discard_direct`.
pub fn shutdown() {
    let Some((aborter, w)) = LIVE.with(|l| l.borrow_mut().take()) else {
        return;
    };
    aborter.set_abort();
    let _ = w.terminate().wait_for_shutdown();
}

thread_local! {
    /// The stream writer was stopped by the parallel deadlock guard: the fallback that
    /// follows says so.
    static GUARD_FIRED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// A streamed transaction is open in the stream writer (what the parallel deadlock
    /// guard looks after).
    static OPEN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a streamed transaction is open in the stream writer.
pub(super) fn stream_open() -> bool {
    OPEN.with(|o| o.get())
}

/// Why the stream writer is gone: stopped by the parallel deadlock guard, or on its own.
fn stopped_why() -> Gone {
    if GUARD_FIRED.with(|g| g.get()) {
        Gone::Guard
    } else {
        Gone::Stopped
    }
}

/// Parallel apply's deadlock guard (see the module note): if the stream writer holds a
/// lock that one of `writers` (process ids) waits for, stop it and wait until it has
/// exited (its transaction rolls back, its locks go); the receiver falls back at the
/// streamed transaction's next frame.
pub(super) fn stop_if_blocking(writers: &[i32]) {
    if !stream_open() {
        return;
    }
    let Some(pid) = LIVE.with(|l| l.borrow().as_ref().and_then(|(_, w)| w.pid().ok())) else {
        return;
    };
    if writers.is_empty() || !xact::blocks_any(pid, writers) {
        return;
    }
    GUARD_FIRED.with(|g| g.set(true));
    shutdown();
}

fn writer_alive() -> bool {
    LIVE.with(|l| {
        l.borrow().as_ref().is_some_and(|(a, w)| {
            !a.aborted() && !matches!(w.pid(), Err(BackgroundWorkerStatus::Stopped))
        })
    })
}

/// The receiver's handle on its stream writer.
pub(super) struct Direct {
    group: Group,
    /// The streamed transaction open in the writer.
    pub xid: Option<u32>,
    /// Since when the writer holds no transaction.
    idle_since: std::time::Instant,
    seq: u64,
    buf: Vec<u8>,
}

/// Why a send or a wait did not go through.
pub(super) enum Failed {
    /// No stream writer to take the transaction.
    Writer(Gone),
    /// SIGTERM.
    Stopping,
}

/// Why no stream writer is there to take a transaction.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Gone {
    /// It failed or left (its own log line says why).
    Stopped,
    /// The parallel deadlock guard stopped it.
    Guard,
    /// None could be started.
    NoSlot,
}

impl Gone {
    /// Why the transaction falls back, for the fallback's log line.
    fn why(self) -> &'static str {
        match self {
            Gone::Stopped => "the stream writer stopped",
            Gone::Guard => "a parallel writer waited for a row lock of the streamed transaction",
            Gone::NoSlot => {
                "no background worker slot was free for a stream writer \
                 (max_worker_processes counts one per peer streaming to this node)"
            }
        }
    }
}

impl Direct {
    /// Start a stream writer; `None` if no background worker slot is free (its queue
    /// segment is then given back at once). The caller let the previous writer go first
    /// (`Stream::discard_direct`).
    fn start(slot: usize, dboid: u32, peer: &str) -> Option<Direct> {
        let group = Group::create(1);
        let extra = crate::workers::stream_writer::extra(group.handle(), slot, peer);
        let Some(w) = crate::pg::bgw::start_child_worker(
            &format!("bdr stream writer {dboid} {peer}"),
            "bdr_stream_writer_main",
            dboid,
            &extra,
        ) else {
            group.close();
            return None;
        };
        LIVE.with(|l| *l.borrow_mut() = Some((group.aborter(), w)));
        Some(Direct {
            group,
            xid: None,
            idle_since: std::time::Instant::now(),
            seq: 0,
            buf: Vec::new(),
        })
    }

    /// The writer holds no transaction any more (committed or rolled back).
    fn end_transaction(&mut self) {
        OPEN.with(|o| o.set(false));
        self.xid = None;
        self.idle_since = std::time::Instant::now();
    }

    fn send(&mut self, ctl: Ctl<'_>) -> Result<(), Failed> {
        let mut buf = std::mem::take(&mut self.buf);
        ctl.encode_into(&mut buf);
        let r = loop {
            match self.group.send(0, &buf) {
                Sent::Done => break Ok(()),
                Sent::Detached => break Err(Failed::Writer(stopped_why())),
                Sent::WouldBlock => {
                    if !writer_alive() {
                        break Err(Failed::Writer(stopped_why()));
                    }
                    if Group::sleep(Duration::from_millis(10)) {
                        break Err(Failed::Stopping);
                    }
                }
            }
        };
        self.buf = buf;
        r
    }

    /// Wait until the writer has published the end of the current transaction:
    /// (remote end, local end) of its commit ((0, 0) after a rollback).
    fn wait_done(&mut self) -> Result<(u64, u64), Failed> {
        loop {
            if self.group.last_committed() >= self.seq {
                return self
                    .group
                    .committed(self.seq)
                    .map(|(r, l, _)| (r, l))
                    .ok_or(Failed::Writer(stopped_why()));
            }
            if !writer_alive() {
                return Err(Failed::Writer(stopped_why()));
            }
            if Group::sleep(Duration::from_millis(10)) {
                return Err(Failed::Stopping);
            }
        }
    }
}

thread_local! {
    /// The receiver's `lock_timeout` before the guard set it (while it is on).
    static SAVED_LOCK_TIMEOUT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The receiver's own transactions wait for locks at most [`GUARD_TIMEOUT`] while a
/// streamed transaction is open in the writer (see the module note); its own setting
/// comes back after.
pub(super) fn guard(on: bool) {
    SAVED_LOCK_TIMEOUT.with(|saved| {
        let mut saved = saved.borrow_mut();
        if on {
            if saved.is_none() {
                *saved = Some(xact::get_config("lock_timeout").unwrap_or_else(|| "0".into()));
                xact::set_config("lock_timeout", GUARD_TIMEOUT);
            }
        } else if let Some(v) = saved.take() {
            xact::set_config("lock_timeout", &v);
        }
    });
}

impl Stream {
    /// A stream frame (with its raw bytes in `self.raw`), applied early by the stream
    /// writer. True on SIGTERM.
    #[cold]
    pub(super) fn direct_frame(&mut self, msg: &Message) -> bool {
        let xid = match msg {
            Message::StreamStart(s) => s.xid,
            Message::StreamChange(c) => c.xid,
            Message::StreamAbort(a) => a.xid,
            Message::StreamCommit(c) => c.xid,
            _ => self.direct.as_ref().and_then(|d| d.xid).unwrap_or(0),
        };
        let open = self.direct.as_ref().and_then(|d| d.xid);
        if open.is_some_and(|x| x != xid) {
            return self.fall_back_direct(xid, "a second streamed transaction while one is open");
        }
        let r = match msg {
            Message::StreamStart(_) => self.direct_start(xid),
            Message::StreamChange(c)
                if !matches!(
                    *c.change,
                    Message::Insert(_) | Message::Update(_) | Message::Delete(_)
                ) =>
            {
                return self.fall_back_direct(
                    xid,
                    &format!("a {} inside the streamed transaction", c.change.kind_name()),
                );
            }
            // A subtransaction's rollback: the writer rolls it back and goes on.
            Message::StreamAbort(a) if a.subxid != a.xid => self.forward_raw(),
            Message::StreamAbort(_) => return self.direct_abort(),
            Message::StreamCommit(c) => return self.direct_commit(c),
            _ => self.forward_raw(),
        };
        match r {
            Ok(()) => false,
            Err(Failed::Stopping) => true,
            Err(Failed::Writer(gone)) => self.fall_back_direct(xid, gone.why()),
        }
    }

    /// A relation arrived: the writer may need it for the pieces to come.
    #[cold]
    pub(super) fn direct_relation(&mut self) -> bool {
        if self.direct.as_ref().is_none_or(|d| d.xid.is_none()) {
            return false;
        }
        match self.forward_raw() {
            Ok(()) => false,
            Err(Failed::Stopping) => true,
            Err(Failed::Writer(gone)) => {
                let xid = self.direct.as_ref().and_then(|d| d.xid).unwrap_or(0);
                self.fall_back_direct(xid, gone.why())
            }
        }
    }

    fn forward_raw(&mut self) -> Result<(), Failed> {
        let raw = std::mem::take(&mut self.raw);
        let r = match &mut self.direct {
            Some(d) => d.send(Ctl::Frame(&raw)),
            None => Err(Failed::Writer(Gone::Stopped)),
        };
        self.raw = raw;
        r
    }

    #[cold]
    fn direct_start(&mut self, xid: u32) -> Result<(), Failed> {
        // A writer that stopped while holding this transaction took its earlier pieces
        // with it: the transaction can only be had whole (fall back), never continued in
        // a new writer, which would commit its later pieces alone.
        if self.direct_open() && !writer_alive() {
            return Err(Failed::Writer(stopped_why()));
        }
        if self.direct.is_none() || !writer_alive() {
            self.discard_direct();
            self.direct = Direct::start(self.slot, self.dboid, &self.peer);
        }
        let Some(d) = &mut self.direct else {
            return Err(Failed::Writer(Gone::NoSlot));
        };
        if d.xid.is_none() {
            d.xid = Some(xid);
            OPEN.with(|o| o.set(true));
            d.seq += 1;
            let seq = d.seq;
            d.send(Ctl::Begin { seq })?;
            shmem::update(self.slot, |sl| sl.stats.streamed += 1);
            // The receiver's own transactions (one writer per peer); parallel writers
            // are looked after while the receiver waits for them (see the module note).
            if matches!(self.sink, super::Sink::One(_)) {
                guard(true);
            }
        }
        self.forward_raw()
    }

    /// STREAM ABORT of the whole transaction: the writer rolls it back.
    #[cold]
    fn direct_abort(&mut self) -> bool {
        let r = match &mut self.direct {
            Some(d) if d.xid.is_some() => {
                let raw = std::mem::take(&mut self.raw);
                let r = d
                    .send(Ctl::Frame(&raw))
                    .and_then(|_| d.wait_done().map(|_| ()));
                self.raw = raw;
                d.end_transaction();
                r
            }
            _ => Ok(()),
        };
        guard(false);
        match r {
            Ok(()) => false,
            Err(Failed::Stopping) => true,
            // Rolled back either way (the writer's exit rolls back).
            Err(Failed::Writer(_)) => {
                self.discard_direct();
                false
            }
        }
    }

    /// STREAM COMMIT: commit through the writer under the origin (see the module note).
    #[cold]
    fn direct_commit(&mut self, c: &wire::StreamCommit) -> bool {
        if self.direct.as_ref().is_none_or(|d| d.xid != Some(c.xid)) {
            // Every way a streamed transaction leaves the writer reconnects, so its
            // COMMIT cannot arrive on this connection.
            crate::error::raise(&crate::error::ApplyError::Protocol(format!(
                "STREAM COMMIT of transaction {} from node \"{}\", which the stream writer does not hold",
                c.xid, self.peer
            )));
        }
        // Parallel apply: every transaction received before this one committed before
        // it on the peer; they commit here first (the deadlock guard watches the wait).
        let parallel = matches!(self.sink, super::Sink::Many(_));
        if let super::Sink::Many(d) = &mut self.sink {
            if d.drain() {
                return true;
            }
            self.poll_writers();
        }
        // A commit time in this node's future: wait until it has passed (see
        // `clock_wait`), with the stream answered.
        while c.commit_time > xact::now() {
            if self.clock_wait(c.commit_time) {
                return true;
            }
        }
        if !parallel {
            xact::release_origin_session();
        }
        let d = self.direct.as_mut().expect("checked above");
        let raw = std::mem::take(&mut self.raw);
        let mut r = d.send(Ctl::Frame(&raw)).and_then(|_| d.wait_done());
        self.raw = raw;
        d.end_transaction();
        if r.is_err() {
            // The writer must be gone before the session is taken back (it may hold it).
            self.discard_direct();
        }
        let progress = if parallel {
            xact::begin();
            let p = xact::origin_progress(&bdr_core::names::origin_name(self.dboid, &self.peer));
            xact::commit();
            p
        } else {
            xact::retake_origin_session()
        };
        guard(false);
        if r.is_err() && progress >= c.end_lsn {
            // It committed, and stopped before it could say so.
            r = Ok((c.end_lsn, xact::insert_lsn()));
        }
        match r {
            Ok((remote, local)) => {
                self.fallback.streamed_ok();
                self.sink.tracker().applied(remote, local);
                super::PENDING.with(|p| p.set((0, None)));
                shmem::update(self.slot, |sl| sl.stats.stream_commits += 1);
                let applied = self.sink.tracker().applied_position();
                super::progress::note_commit(
                    &shmem::Stats::default(),
                    [0; 9],
                    self.received,
                    applied,
                    c.commit_time,
                    self.peer_lsn,
                );
                self.published();
                super::progress::publish_progress(self.slot);
                false
            }
            Err(Failed::Stopping) => true,
            Err(Failed::Writer(Gone::Guard)) => self.fall_back_direct(c.xid, Gone::Guard.why()),
            Err(Failed::Writer(_)) => {
                self.fall_back_direct(c.xid, "the stream writer failed at the commit")
            }
        }
    }

    /// Give up applying streamed transaction `xid` early (see the module note): stop
    /// the writer, then reconnect without streaming. True on SIGTERM.
    #[cold]
    pub(super) fn fall_back_direct(&mut self, xid: u32, why: &str) -> bool {
        let counted = self.direct.as_ref().is_some_and(|d| d.xid.is_some());
        self.discard_direct();
        guard(false);
        pgrx::log!(
            "bdr: apply worker for node \"{}\" falls back for streamed transaction {xid}: \
             {why}; reconnecting without streaming",
            self.peer
        );
        self.note_fallback(xid);
        shmem::update(self.slot, |sl| {
            if !counted {
                sl.stats.streamed += 1;
            }
            sl.stats.stream_fallbacks += 1;
        });
        self.reconnect(false)
    }

    /// The parallel deadlock guard stopped the stream writer (see the module note): fall
    /// back now if no ordinary transaction is being received (else its next frame or
    /// the streamed transaction's next frame does). True on SIGTERM.
    pub(super) fn after_parallel_guard(&mut self) -> bool {
        if !GUARD_FIRED.with(|g| g.get()) || self.sink.in_transaction() {
            return false;
        }
        match self.direct.as_ref().and_then(|d| d.xid) {
            Some(xid) => self.fall_back_direct(xid, Gone::Guard.why()),
            None => false,
        }
    }

    /// The deadlock guard fired in the receiver's own transaction (see the module note):
    /// roll it back and fall back. True on SIGTERM.
    #[cold]
    pub(super) fn guard_fired(&mut self) -> bool {
        if let super::Sink::One(a) = &mut self.sink {
            a.abandon_after_error();
        }
        let xid = self.direct.as_ref().and_then(|d| d.xid).unwrap_or(0);
        self.fall_back_direct(
            xid,
            "an ordinary transaction waited for a row lock of the streamed one",
        )
    }

    /// Stop the stream writer (if any), wait until it has exited (its transaction, if
    /// any, rolled back), and give its queue segment back: a receiver falling back many
    /// times must not pile up segments (each is one of the server's limited dynamic
    /// shared memory slots). Quietly when it can: unmapping the queue ends the writer's
    /// wait for its next message and it exits normally (no FATAL line in the log);
    /// SIGTERM only if it has not gone within [`LET_GO`] (e.g. it waits for a lock).
    pub(super) fn discard_direct(&mut self) {
        GUARD_FIRED.with(|g| g.set(false));
        OPEN.with(|o| o.set(false));
        let live = LIVE.with(|l| l.borrow_mut().take());
        if let Some((aborter, _)) = &live {
            // While the segment is still mapped: the writer stops at its next check.
            aborter.set_abort();
        }
        if let Some(d) = self.direct.take() {
            d.group.close();
        }
        let Some((_, w)) = live else {
            return;
        };
        let deadline = std::time::Instant::now() + LET_GO;
        loop {
            if matches!(w.pid(), Err(BackgroundWorkerStatus::Stopped)) {
                return;
            }
            if std::time::Instant::now() > deadline || Group::sleep(Duration::from_millis(5)) {
                let _ = w.terminate().wait_for_shutdown();
                return;
            }
        }
    }

    /// A stream writer idle for [`IDLE_WRITER`] is let go (called while the stream is
    /// idle).
    #[cold]
    pub(super) fn retire_idle_writer(&mut self) {
        if self
            .direct
            .as_ref()
            .is_some_and(|d| d.xid.is_none() && d.idle_since.elapsed() >= IDLE_WRITER)
        {
            self.discard_direct();
        }
    }

    /// Whether a streamed transaction is open in the writer (the guard is on).
    pub(super) fn direct_open(&self) -> bool {
        self.direct.as_ref().is_some_and(|d| d.xid.is_some())
    }
}
