//! Receive stage: stream a peer's changes over a replication connection and feed them to
//! the apply stage, one frame at a time.
//!
//! The worker connects to the peer with `replication=database`, asks `IDENTIFY_SYSTEM`
//! where the peer's WAL is, starts streaming from its slot at this node's origin progress
//! (the end of the last remote commit applied here), answers keepalives and sends standby
//! status updates whose flush position only covers remote transactions whose local commit
//! is flushed ([`FlushTracker`]). It waits on its latch and the socket together, so SIGTERM
//! and config reloads act at once.
//!
//! It also keeps, in shared memory, what lag needs (`bdr_core::lag`): the peer's WAL
//! position as last heard, the commit time of a transaction that arrived and is not
//! applied yet, and the last time a live stream confirmed nothing was pending. While idle
//! it asks the walsender for a keepalive every second (a status update with the reply
//! flag), so "caught up" is confirmed, not assumed. A pause (`bdr.apply_pause`) still
//! reads up to the next transaction's BEGIN and keeps it aside, so a paused stream knows
//! the commit time of the oldest transaction it is holding back.
//!
//! A transaction whose commit time is in this node's future (the peer's clock runs ahead)
//! is held the same way until this node's clock passes it (`Stream::clock_wait`), so no
//! local row ever carries a version from the local future and a local write made after
//! applying a change is always later than it in last-update-wins (docs/conflicts.md,
//! *Clock skew*).
//!
//! A silent peer is detected as PostgreSQL's walreceiver does: nothing at all received
//! (data or keepalive) for `wal_receiver_timeout` while the stream is live raises
//! [`ApplyError::PeerSilent`], and the supervisor reconnects with backoff. A TCP
//! connection through a hung link or to a frozen host stays "open" for ever (our pings
//! only fill socket buffers), so without this the worker would wait, showing `streaming`,
//! until the link healed. Healthy idle streams answer our ping every second, so the
//! timeout only fires on silence; a connect to a silent host is bounded by the DSN's
//! `connect_timeout` (10 s by default, [`Conn::connect`]), during which SIGTERM still acts.
//!
//! With `bdr.stream_large_transactions` the peer may stream a large transaction before
//! its commit (protocol version 4); every frame's order is checked, and such a
//! transaction is applied as it arrives by a stream writer (`direct.rs`), or makes the
//! worker reconnect without streaming (`stream.rs`) when it cannot be.
//!
//! With `bdr.writers_per_peer` > 1 the frames go to writer processes instead of an
//! in-process [`Applier`] (`parallel.rs`); everything above stays here, and flush
//! feedback follows what the writers committed.
//!
//! The data path reads the clock once per round of the main loop (`Stream::now`), and
//! publishes committed transactions' progress to shared memory at most every few
//! milliseconds (`progress.rs`): per-message clock reads and per-commit locks of the
//! worker table were a measurable share of small transactions' apply cost.

pub mod direct;
mod hold;
pub mod parallel;
mod plans;
mod progress;
mod stream;

use parallel::Sink;
use progress::publish_progress;

use crate::apply::Applier;
use crate::catalog::nodes::Node;
use crate::error::{raise, ApplyError};
use crate::pg::libpq::{Conn, CopyData, PqBuf};
use crate::pg::{bgw, shmem, xact};
use bdr_core::names::origin_name;
use bdr_core::stream::{parse_server_message, status_update, ServerMessage};
use bdr_core::streaming::{Fallback, StreamCheck};
use bdr_core::wire::Message;
use bdr_core::{dsn, wire};
use std::time::{Duration, Instant};

thread_local! {
    /// Commit time of the transaction whose BEGIN arrived and is not applied yet (0:
    /// none). Published to shared memory only when it lasts (a long transaction, a pause)
    /// or fails (see [`publish_pending`]), not for every transaction.
    static PENDING: std::cell::Cell<(i64, Option<Instant>)> = const { std::cell::Cell::new((0, None)) };
    /// The most a BEGIN's commit time was ahead of our clock when it arrived, since
    /// progress was last published (see `shmem::Slot::peer_clock_ahead`).
    static CLOCK_AHEAD: std::cell::Cell<Option<i64>> = const { std::cell::Cell::new(None) };
}

/// Make the pending transaction's commit time visible (the worker's error path calls
/// this before it exits, so lag keeps counting from it while the worker is down), after
/// the progress of the transactions committed before it.
#[cold]
pub fn publish_pending(slot: usize) {
    publish_progress(slot);
    let (t, _) = PENDING.with(|p| p.get());
    if t != 0 {
        shmem::update(slot, |s| s.pending_commit_time = t);
    }
}

#[cold]
fn lib_err(e: crate::pg::libpq::LibpqError) -> ! {
    raise(&ApplyError::Protocol(e.to_string()))
}

/// How often an idle stream asks the walsender to confirm its position.
const PING: Duration = Duration::from_secs(1);

/// One replication stream from a peer into the local apply stage.
struct Stream {
    conn: Conn,
    slot: usize,
    peer: std::rc::Rc<str>,
    sink: Sink,
    /// The raw bytes of the last frame read (parallel apply forwards them).
    raw: Vec<u8>,
    /// Highest peer position received (data or keepalive).
    received: u64,
    /// The write being read, while it has frames not yet returned by [`Stream::read`].
    batch: Option<Batch>,
    last_feedback: Instant,
    /// [`Stream::maybe_feedback`] looks again from then on.
    feedback_look: Instant,
    last_reported: (u64, u64),
    /// A transaction's first frame read while paused, applied first on resume.
    held: Option<Message>,
    /// The horizon of a heartbeat in the transaction being read (see
    /// [`Stream::note_heartbeat`]).
    heartbeat: Option<i64>,
    /// The peer's DSN, for the position probe while paused.
    peer_dsn: String,
    probe: Option<(Conn, Instant)>,
    /// Highest peer position heard.
    peer_lsn: u64,
    /// Publication to shared memory is next due then: of the peer's position
    /// ([`Stream::heard`], at most every 100 ms from the data path: one lock per frame
    /// would cost apply) and of committed transactions' progress
    /// ([`progress::PUBLISH_EVERY`]); both set by [`Stream::published`]. (The data path's
    /// throttles keep the instant they are next due, not the last one: a comparison
    /// instead of a clock subtraction per message.)
    publish_heard_at: Instant,
    publish_progress_at: Instant,
    /// A keepalive that finds everything applied is next published as `caught_up_time`
    /// then (at most every 100 ms: a walsender near the head of its WAL sends a keepalive
    /// per transaction, and two exclusive locks each were ~1% of the apply process; lag
    /// counts a confirmation as live for seconds).
    caught_up_at: Instant,
    /// When the peer last sent anything (data or keepalive).
    last_heard: Instant,
    /// Whether the peer's data comes fast enough to batch wake-ups
    /// ([`Stream::batch_wait`]).
    pacer: bdr_core::pace::Pacer,
    /// A batch wait is under way: the peer position received when it began.
    batch_from: Option<u64>,
    /// The time at the top of this round of the main loop: what the data path's
    /// throttles (publication, feedback) measure against, so a message costs no clock
    /// reads of its own (they were ~8% of the apply process on small transactions).
    now: Instant,
    /// This node's clock when the last BEGIN was read (taken once for both uses: the
    /// peer's clock lead and the future-commit check), until the main loop takes it.
    begin_clock: Option<i64>,
    /// Streamed transactions (`stream.rs`): how to reconnect, whether this connection
    /// streams, whether the setting asked for it, the frame-order check of this
    /// connection, the transactions that fell back, and the xid of the ordinary
    /// transaction being received.
    connect_args: stream::ConnectArgs,
    streaming: bool,
    want_streaming: bool,
    check: StreamCheck,
    fallback: Fallback,
    /// The streamed transaction whose pieces are being ignored: already applied whole
    /// here after a fallback, streamed again by the peer (`Fallback::applied_whole`).
    ignoring: Option<u32>,
    /// This connection gave streaming up for a fallback: ask again when it is over.
    restream: bool,
    cur_xid: Option<u32>,
    /// The stream writer applying a streamed transaction before its commit (`direct.rs`).
    direct: Option<direct::Direct>,
    dboid: u32,
}

/// One XLogData write from the peer: one frame, or several (protocol version 3).
struct Batch {
    /// The write's start position (the sender's position when it wrote).
    start: u64,
    buf: PqBuf,
    /// Offset in `buf` of the next frame.
    pos: usize,
}

impl Batch {
    /// Decode the next frame; a bad one stops the stream with the write's position.
    fn next(&mut self, peer: &str) -> Message {
        match wire::decode_frame_prefix(&self.buf[self.pos..]) {
            Ok((msg, _, used)) => {
                self.pos += used;
                msg
            }
            Err(e) => raise(&ApplyError::Protocol(format!(
                "bad frame from node \"{peer}\" at {}: {e}",
                wire::format_lsn(self.start)
            ))),
        }
    }
}

impl Stream {
    /// The peer told us (stream, probe or `IDENTIFY_SYSTEM`) its WAL is at least at
    /// `peer_lsn`: note it and the time.
    fn heard(&mut self, peer_lsn: u64, publish_now: bool) {
        self.peer_lsn = self.peer_lsn.max(peer_lsn);
        if publish_now || self.now > self.publish_heard_at {
            let lsn = self.peer_lsn;
            shmem::update(self.slot, |s| {
                s.peer_lsn = s.peer_lsn.max(lsn);
                s.last_contact_time = xact::now();
            });
            self.published();
        }
    }

    /// Progress was published to shared memory now: the next publication is due 100 ms
    /// from now for the peer's position, [`progress::PUBLISH_EVERY`] for the rest.
    fn published(&mut self) {
        self.publish_heard_at = self.now + Duration::from_millis(100);
        self.publish_progress_at = self.now + progress::PUBLISH_EVERY;
    }

    /// Read one message without blocking. Data frames are returned; keepalives are
    /// handled here. `None`: nothing more to read now. A write of several frames
    /// (a protocol version 3 batch) is kept whole and its frames decoded one per call,
    /// so at most one decoded message exists at a time.
    fn read(&mut self) -> Option<(u64, Message)> {
        if let Some(b) = &mut self.batch {
            let start = b.start;
            let from = b.pos;
            let msg = b.next(&self.peer);
            if matches!(self.sink, Sink::Many(_))
                || self.streaming && (msg.is_stream() || matches!(msg, Message::Relation(_)))
            {
                // Parallel apply forwards each frame's own bytes to a writer, and so
                // does a streamed transaction's apply to the stream writer (its pieces,
                // and the relations it may need).
                self.raw.clear();
                self.raw.extend_from_slice(&b.buf[from..b.pos]);
            }
            if b.pos == b.buf.len() {
                self.batch = None;
            }
            return Some(self.returned(start, msg));
        }
        match self.conn.get_copy_data(true).unwrap_or_else(|e| lib_err(e)) {
            CopyData::Data(buf) => {
                self.last_heard = self.now;
                let m = parse_server_message(&buf)
                    .unwrap_or_else(|e| raise(&ApplyError::Protocol(e.to_string())));
                match m {
                    ServerMessage::XLogData { start, data, .. } => {
                        let pos = buf.len() - data.len();
                        self.received = self.received.max(start);
                        self.heard(start, false);
                        self.batch = Some(Batch { start, buf, pos });
                        self.read()
                    }
                    ServerMessage::Keepalive {
                        end,
                        reply_requested,
                        ..
                    } => {
                        self.received = self.received.max(end);
                        // Throttled as data is: a walsender near the head of its WAL
                        // sends one per transaction. A reply request is published now.
                        self.heard(end, reply_requested);
                        if !self.sink.busy() && self.held.is_none() {
                            self.sink.tracker().idle_at(end);
                            // Caught up with the peer's WAL as known (its position at
                            // connect included), not only with what the walsender has
                            // sent so far: while a backlog streams in, the worker is idle
                            // between transactions and keepalives carry the sent
                            // position, which would read as "no lag" throughout.
                            if self.sink.tracker().applied_position() >= self.peer_lsn
                                && self.now > self.caught_up_at
                            {
                                shmem::update(self.slot, |s| s.caught_up_time = xact::now());
                                self.caught_up_at = self.now + Duration::from_millis(100);
                            }
                        }
                        if reply_requested {
                            self.last_feedback = Instant::now() - Duration::from_secs(10);
                            self.feedback_look = self.now;
                        }
                        self.read()
                    }
                }
            }
            CopyData::WouldBlock => None,
            CopyData::Done => raise(&ApplyError::Protocol(format!(
                "node \"{}\" ended the replication stream",
                self.peer
            ))),
        }
    }

    /// Note what a message about to be returned by [`Stream::read`] tells: a BEGIN's
    /// commit time (pending, and how far ahead of our clock it is).
    fn returned(&mut self, start: u64, msg: Message) -> (u64, Message) {
        self.check_order(start, &msg);
        if let Message::Begin(b) = &msg {
            // The peer has committed it: its WAL is at least there.
            self.peer_lsn = self.peer_lsn.max(b.final_lsn);
            let t = b.commit_time;
            PENDING.with(|p| p.set((t, Some(self.now))));
            let clock = xact::now();
            self.begin_clock = Some(clock);
            let ahead = t - clock;
            CLOCK_AHEAD.with(|c| c.set(Some(c.get().map_or(ahead, |a| a.max(ahead)))));
        }
        (start, msg)
    }

    /// A heartbeat's horizon counts once its transaction is applied here
    /// ([`progress::heartbeat_received`]): noted at its message, queued at its COMMIT.
    fn note_heartbeat(&mut self, msg: &Message) {
        match msg {
            Message::Message(m) => {
                if let Some(h) = wire::heartbeat_horizon(&m.prefix, &m.content) {
                    self.heartbeat = Some(h);
                }
            }
            Message::Commit(c) => {
                if let Some(h) = self.heartbeat.take() {
                    progress::heartbeat_received(c.end_lsn, h);
                }
            }
            _ => {}
        }
    }

    /// Wait for the socket (or `timeout`); true on SIGTERM.
    #[inline(never)]
    fn wait(&mut self, timeout: Duration) -> bool {
        if bgw::wait(Some(self.conn.socket()), timeout) {
            return true;
        }
        self.conn.consume_input().unwrap_or_else(|e| lib_err(e));
        false
    }

    /// Send a standby status update; `ping` asks the walsender for a keepalive back.
    #[inline(never)]
    fn feedback(&mut self, ping: bool) {
        let flushed = self.sink.tracker().flushed(xact::flush_lsn());
        let applied = self.sink.tracker().applied_position();
        let upd = status_update(self.received, flushed, applied, xact::now(), ping);
        self.conn.put_copy_data(&upd).unwrap_or_else(|e| lib_err(e));
        self.conn.flush().unwrap_or_else(|e| lib_err(e));
        self.last_feedback = Instant::now();
        self.last_reported = (flushed, applied);
        let received = self.received;
        shmem::update(self.slot, |s| {
            s.received_lsn = received;
            s.flushed_lsn = flushed;
            s.applied_lsn = applied;
        });
    }

    /// Feedback at most every 100 ms when there is news, and a ping every second while
    /// idle (at least every 10 s mid-transaction).
    fn maybe_feedback(&mut self) {
        // Every threshold below is 100 ms or more: look at most once a millisecond (this
        // runs for every message, and each look is a few clock subtractions).
        if self.now < self.feedback_look {
            return;
        }
        self.feedback_look = self.now + Duration::from_millis(1);
        // A transaction applying for more than 100 ms: show its commit time.
        let (t, since) = PENDING.with(|p| p.get());
        if t != 0
            && since
                .is_some_and(|s| self.now.saturating_duration_since(s) > Duration::from_millis(100))
        {
            publish_pending(self.slot);
            PENDING.with(|p| p.set((t, None)));
        }
        let idle = !self.sink.busy();
        let elapsed = self.now.saturating_duration_since(self.last_feedback);
        // Nothing is sent within 100 ms of the last feedback: spare the flush position
        // read (a spinlock) on every message.
        if elapsed <= Duration::from_millis(100) || !idle && elapsed <= Duration::from_secs(10) {
            return;
        }
        let flushed = self.sink.tracker().flushed(xact::flush_lsn());
        let news = (flushed, self.sink.tracker().applied_position()) != self.last_reported;
        if news && elapsed > Duration::from_millis(100) || elapsed > PING {
            self.feedback(idle && self.held.is_none());
        }
    }

    /// Apply one message, then publish progress once a transaction is complete. True on
    /// SIGTERM (met while reconnecting for a streamed transaction).
    fn apply(&mut self, msg: Message) -> bool {
        if msg.is_stream() {
            return self.streamed_frame(&msg);
        }
        if matches!(msg, Message::Relation(_)) && self.direct_relation() {
            return true;
        }
        if skip_foreign_message(self.slot, &self.peer, &msg, self.sink.in_transaction()) {
            return false;
        }
        self.note_heartbeat(&msg);
        let committed = match &msg {
            Message::Commit(_) => self.cur_xid.take(),
            _ => None,
        };
        let applier = match &mut self.sink {
            Sink::One(a) => a,
            Sink::Many(d) => {
                d.handle(&msg, &self.raw);
                if let Some(x) = committed {
                    self.fallback.committed(x);
                    return self.maybe_restream();
                }
                return false;
            }
        };
        if self.direct.as_ref().is_some_and(|d| d.xid.is_some()) {
            // The deadlock guard (`direct.rs`): a lock timeout while a streamed
            // transaction is open in the stream writer means falling back.
            let a = std::panic::AssertUnwindSafe(&mut **applier);
            let fired = pgrx::PgTryBuilder::new(move || {
                let a = a;
                a.0.handle(msg);
                false
            })
            .catch_when(pgrx::PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE, |_| true)
            .execute();
            if fired {
                return self.guard_fired();
            }
        } else {
            applier.handle(msg);
        }
        let Sink::One(applier) = &mut self.sink else {
            unreachable!("checked above")
        };
        if applier.in_transaction() {
            return false;
        }
        let (received, applied, t) = (
            self.received,
            applier.tracker.applied_position(),
            applier.last_commit_time,
        );
        let ack_now = std::mem::take(&mut applier.ack_now);
        let (counts, conflicts) = applier.take_counts();
        if ack_now {
            // The origin waits for this commit (bdr.synchronous_commit_peers): make it
            // durable now rather than at the WAL writer's next round, and say so.
            xact::flush_last_commit();
            self.feedback(false);
            // Its peer waits on this process: no batch wait until such waits stop.
            self.pacer.reset();
            self.batch_from = None;
        }
        PENDING.with(|p| p.set((0, None)));
        progress::note_commit(&counts, conflicts, received, applied, t, self.peer_lsn);
        if ack_now || self.now >= self.publish_progress_at {
            self.published();
            publish_progress(self.slot);
        }
        if let Some(x) = committed {
            self.fallback.committed(x);
            return self.maybe_restream();
        }
        false
    }

    /// Nothing heard from the peer for `wal_receiver_timeout`: give up this connection.
    #[cold]
    fn check_silence(&self) {
        if let Some(limit) = bgw::wal_receiver_timeout() {
            let silent = self.last_heard.elapsed();
            if silent > limit {
                raise(&ApplyError::PeerSilent {
                    peer: self.peer.to_string(),
                    silent_ms: silent.as_millis() as u64,
                    limit_ms: limit.as_millis() as u64,
                });
            }
        }
    }
}

/// Stream from `peer` until SIGTERM. Errors are raised (the worker exits, is restarted).
pub fn run(slot: usize, dboid: u32, local_node: &Node, peer_node: &Node) {
    let (local, peer, peer_dsn) = (&local_node.name, &peer_node.name, &peer_node.dsn);
    // Parallel apply: the writers set up the origin's session, each for its commit only.
    let writers = crate::gucs::WRITERS_PER_PEER.get().clamp(1, 16) as usize;
    // The peer's row is share-locked while its origin is made: a `bdr.part` marking it
    // parted either waits for this (and then drops the origin once this worker is
    // stopped) or went first (and then nothing is created here).
    let wanted = || crate::catalog::nodes::lock_if_not_parted(peer);
    let progress = if writers > 1 {
        xact::origin_flushed_progress(&origin_name(dboid, peer), wanted)
    } else {
        xact::setup_origin(&origin_name(dboid, peer), wanted)
    };
    let Some(progress) = progress else {
        pgrx::log!("bdr: node \"{peer}\" was parted; its apply worker exits");
        return;
    };
    let link = crate::apply::Link {
        // A spoke asks its hub for every node's changes (forwarding).
        forwarded: local_node.hub.as_deref() == Some(peer.as_str()),
        // A hub passes its spokes' schema changes on to the other spokes.
        requeue_ddl: peer_node.hub.as_deref() == Some(local.as_str()),
    };
    let sink = if writers > 1 {
        Sink::Many(Box::new(parallel::Dispatch::start(
            writers, slot, dboid, peer, progress,
        )))
    } else {
        let mut applier = Applier::new(peer_node, local_node, progress);
        applier.set_link(dboid, link);
        Sink::One(Box::new(applier))
    };
    shmem::update(slot, |s| {
        s.state = shmem::State::Connecting;
        s.applied_lsn = progress;
        s.flushed_lsn = progress;
        s.stats.connects += 1;
    });
    let connect_args = stream::ConnectArgs {
        repl_dsn: dsn::with_default(peer_dsn, "replication", "database"),
        local: local.to_string(),
        peer: peer.to_string(),
        forwarded: link.forwarded,
    };
    // A streamed transaction goes to the stream writer, beside the receiver's own apply
    // or its parallel writers (`direct.rs`).
    let want_streaming = crate::gucs::STREAM_LARGE_TRANSACTIONS.get();
    let (conn, peer_lsn, slot_name, streaming) =
        stream::connect(&connect_args, progress, want_streaming);
    shmem::update(slot, |s| s.state = shmem::State::Streaming);
    pgrx::log!(
        "bdr: apply worker for node \"{peer}\" streaming from slot {slot_name} at {}{}",
        wire::format_lsn(progress),
        if streaming {
            " (large transactions streamed)"
        } else {
            ""
        }
    );

    let mut st = Stream {
        conn,
        slot,
        peer: peer.as_str().into(),
        sink,
        raw: Vec::new(),
        received: progress,
        batch: None,
        last_feedback: Instant::now() - Duration::from_secs(10),
        feedback_look: Instant::now(),
        pacer: bdr_core::pace::Pacer::default(),
        batch_from: None,
        last_reported: (0, 0),
        held: None,
        heartbeat: None,
        peer_dsn: peer_dsn.to_string(),
        probe: None,
        peer_lsn: 0,
        publish_heard_at: Instant::now(),
        publish_progress_at: Instant::now(),
        caught_up_at: Instant::now(),
        last_heard: Instant::now(),
        now: Instant::now(),
        begin_clock: None,
        connect_args,
        streaming,
        want_streaming,
        check: StreamCheck::default(),
        fallback: Fallback::default(),
        ignoring: None,
        restream: false,
        cur_xid: None,
        direct: None,
        dboid,
    };
    st.heard(peer_lsn, true);
    st.serve();
}

impl Stream {
    /// The receive loop: until SIGTERM or a stop asked for. Its own function, apart from
    /// the connection's set-up in [`run`], so that the code it runs for every message
    /// lies together (issue 17: instruction-cache misses).
    #[inline(never)]
    fn serve(&mut self) {
        let st = self;
        let slot = st.slot;
        loop {
            st.now = Instant::now();
            // Pause takes effect between transactions; the connection stays open.
            st.poll_writers();
            if st.stopping() || st.after_parallel_guard() {
                st.log_stop();
                return;
            }
            if !st.sink.in_transaction() && shmem::pause_requested(slot) {
                // Parallel apply: what was handed out commits before the pause holds.
                if let Sink::Many(d) = &mut st.sink {
                    if d.drain() {
                        return;
                    }
                    st.poll_writers();
                }
                if st.paused() {
                    return;
                }
            }
            let next = match st.held.take() {
                Some(m) => Some(m),
                None => st.read().map(|(_, m)| m),
            };
            match next {
                // A transaction committed in this node's future (the peer's clock runs
                // ahead): held until this node's clock passes its commit time, so that every
                // local write made after it is applied here is also later in
                // last-update-wins (see `clock_wait`).
                Some(wire::Message::Begin(b))
                    if !st.sink.in_transaction()
                        && b.commit_time > st.begin_clock.take().unwrap_or_else(xact::now) =>
                {
                    let until = b.commit_time;
                    st.held = Some(wire::Message::Begin(b));
                    if st.clock_wait(until) {
                        st.log_stop();
                        return;
                    }
                }
                Some(msg) => {
                    if st.apply(msg) || pgrx::bgworkers::BackgroundWorker::sigterm_received() {
                        st.log_stop();
                        return;
                    }
                }
                None => {
                    // Nothing more to read now: what was applied is shown before waiting.
                    publish_progress(slot);
                    match st.batch_wait() {
                        Some(true) => {
                            st.log_stop();
                            return;
                        }
                        Some(false) => continue,
                        None => {}
                    }
                    let waited = Instant::now();
                    // Parallel apply: writers' commits do not wake this process (a signal per
                    // transaction); it looks again within 10 ms while work is in flight.
                    let poll = if matches!(st.sink, Sink::Many(_)) && st.sink.busy() {
                        Duration::from_millis(10)
                    } else {
                        Duration::from_millis(250)
                    };
                    if st.wait(poll) {
                        st.log_stop();
                        return;
                    }
                    st.now = Instant::now();
                    st.pacer
                        .arrived(st.now - waited, crate::gucs::stream_batch_wait());
                    st.check_silence();
                    st.retire_idle_writer();
                    if st.maybe_restream() {
                        st.log_stop();
                        return;
                    }
                }
            }
            st.maybe_feedback();
        }
    }

    /// Everything received is applied and the socket holds nothing more: while the
    /// peer's transactions arrive faster than `bdr.stream_batch_wait` (socket waits in a
    /// row each ended that soon, and batch waits since keep finding data;
    /// [`bdr_core::pace`]), wait that long on the latch before reading again, so that one
    /// wake-up applies the transactions that arrived meanwhile instead of one each: a
    /// wake-up costs the kernel's switch and this process's code from cold caches.
    /// `None`: wait on the socket as usual; `Some(stop)`: waited (stop asked if true),
    /// read again. Not with parallel apply (its receiver polls its writers meanwhile), nor
    /// right after a transaction whose origin waits for it (`bdr.synchronous_commit_peers`:
    /// its sessions' next commits would wait longer).
    fn batch_wait(&mut self) -> Option<bool> {
        let wait = crate::gucs::stream_batch_wait();
        if let Some(from) = self.batch_from.take() {
            if self.received == from {
                // Nothing came: back to waiting on the socket, and counting afresh.
                self.pacer.reset();
                return None;
            }
        } else if !self.pacer.busy() {
            return None;
        }
        if wait.is_zero() || matches!(self.sink, Sink::Many(_)) {
            return None;
        }
        // libpq's buffer is empty, not necessarily the socket: while a backlog streams
        // in, the next batch is already there. Read it now.
        if bgw::readable_now(self.conn.socket()) {
            // No wait, so what a wait serves is served here while a backlog lasts:
            // interrupts (a barrier another backend waits for), a reload, a stop.
            if bgw::serve_signals() {
                return Some(true);
            }
            self.conn.consume_input().unwrap_or_else(|e| lib_err(e));
            return Some(false);
        }
        self.batch_from = Some(self.received);
        if bgw::wait(None, wait) {
            return Some(true);
        }
        self.conn.consume_input().unwrap_or_else(|e| lib_err(e));
        Some(false)
    }

    /// Say the loop ends on request.
    #[cold]
    fn log_stop(&self) {
        pgrx::log!(
            "bdr: apply worker for node \"{}\" stopping on request",
            self.peer
        );
    }
}

/// A logical message that is not bdr's own (any role on the peer can emit one, and an
/// older peer may forward it) is skipped and counted, never applied nor a reason to stop.
fn skip_foreign_message(slot: usize, peer: &str, msg: &wire::Message, in_txn: bool) -> bool {
    let wire::Message::Message(m) = msg else {
        return false;
    };
    let ours = wire::is_our_message(&m.prefix, m.transactional)
        || (m.transactional && m.prefix == bdr_core::ddl::DDL_PREFIX);
    if in_txn && ours {
        return false;
    }
    shmem::update(slot, |s| s.skipped_messages += 1);
    pgrx::debug1!(
        "bdr: skipped a logical message with prefix \"{}\" from node \"{peer}\"",
        m.prefix
    );
    true
}
