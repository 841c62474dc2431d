//! Streamed transactions on the receiving side (protocol version 4), and the replication
//! connection they are negotiated on.
//!
//! With `bdr.stream_large_transactions` on, the apply worker asks a peer that speaks
//! version 4 for `streaming 'on'` (never on a forwarding stream: a transaction's origin is
//! only known at its commit). The peer then sends a transaction that outgrows its
//! `logical_decoding_work_mem` in pieces before it commits.
//!
//! What happens to a streamed transaction: its pieces go to the stream writer as they
//! arrive and it commits at STREAM COMMIT (`direct.rs`), beside the receiver's own apply
//! or its parallel writers. When that cannot be done (DDL or TRUNCATE in the stream, a
//! second open streamed transaction, too much waiting for the commit, the deadlock guard,
//! a failed writer), it
//! **falls back**: the receiver notes the xid (`bdr_core::streaming::Fallback`), logs why,
//! counts it (`bdr.apply_stats()`: `streamed`, `stream_fallbacks`) and reconnects
//! without streaming from what it has applied. The walsender then decodes the
//! transaction whole at its COMMIT and the ordinary path applies it. Streaming is asked
//! for again at a reconnect once the fallen-back transactions have been applied (their
//! COMMIT seen), or after `Fallback::RETRY_AFTER` for one rolled back on the peer.
//!
//! Why a fallback is safe: what the stream writer applied of the transaction is rolled
//! back with it before the reconnect, so nothing of it can be visible or half-applied;
//! the reconnect happens between transactions, from the flush
//! tracker's applied position, which never passes an unapplied commit; the peer's slot
//! keeps the in-progress transaction's WAL (its `restart_lsn` is held back by every
//! transaction still in progress, streamed or not), and a walsender only skips
//! transactions whose commit lies before the start position.
//!
//! Invariant: every frame read is checked by [`StreamCheck`] first; a stream frame out of
//! order is an ERROR naming the peer and the position, never a guess.

use super::{lib_err, Stream};
use crate::error::{raise, ApplyError};
use crate::pg::libpq::{quote_ident, quote_literal, Conn};
use crate::pg::shmem;
use bdr_core::names::slot_name;
use bdr_core::streaming::StreamCheck;
use bdr_core::wire::{self, Message};
use std::time::{Duration, Instant};

/// How to (re)connect to the peer.
pub(super) struct ConnectArgs {
    pub repl_dsn: String,
    pub local: String,
    pub peer: String,
    pub forwarded: bool,
}

/// A new replication connection, streaming from `from`: the connection, the peer's WAL
/// position at connect, the slot name, and whether the peer streams large transactions.
pub(super) fn connect(
    a: &ConnectArgs,
    from: u64,
    want_streaming: bool,
) -> (Conn, u64, String, bool) {
    let (mut conn, peer_lsn, slot, streaming) = open(a, want_streaming);
    start(&mut conn, a, &slot, from, streaming, false);
    (conn, peer_lsn, slot, streaming)
}

/// Connect and identify, without starting to stream: the connection, the peer's WAL
/// position, the slot name, and whether streaming will be asked for.
fn open(a: &ConnectArgs, want_streaming: bool) -> (Conn, u64, String, bool) {
    let mut conn = Conn::connect(
        &a.repl_dsn,
        &format!("bdr_apply_{}_from_{}", a.local, a.peer),
    )
    .unwrap_or_else(|e| lib_err(e));
    // Where the peer's WAL is now: what lag in bytes is measured against until the
    // stream reports more.
    let identify = conn.exec("IDENTIFY_SYSTEM").unwrap_or_else(|e| lib_err(e));
    let peer_lsn = identify
        .first()
        .and_then(|r| r.get(2).cloned().flatten())
        .and_then(|v| wire::parse_lsn(&v))
        .unwrap_or(0);
    let provider_dboid = conn
        .query_value("SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database()")
        .unwrap_or_else(|e| lib_err(e))
        .unwrap_or_default();
    let slot = slot_name(provider_dboid.parse().unwrap_or(0), &a.local);
    let streaming = want_streaming && !a.forwarded && peer_streams(&mut conn);
    if streaming {
        // The walsender streams a transaction once its reorder buffer outgrows
        // logical_decoding_work_mem (64MB by default): only what comes after that can be
        // applied before the COMMIT. Its session setting is lowered to at most
        // STREAM_WORK_MEM_KB so that pieces flow while the transaction runs.
        conn.exec(&format!(
            "SELECT pg_catalog.set_config('logical_decoding_work_mem', \
             least(setting::int, {STREAM_WORK_MEM_KB})::text || 'kB', false) \
             FROM pg_catalog.pg_settings WHERE name = 'logical_decoding_work_mem'"
        ))
        .unwrap_or_else(|e| lib_err(e));
    }
    (conn, peer_lsn, slot, streaming)
}

/// The most a peer's walsender buffers of a transaction before streaming it, when
/// streaming is asked for (its `logical_decoding_work_mem`, in kB, lowered to this).
const STREAM_WORK_MEM_KB: u32 = 4096;

/// `START_REPLICATION` on `conn`. With `retry`, a slot still held by the walsender of the
/// connection just closed is waited for (it exits once it notices; at most 30 s). True
/// on SIGTERM.
fn start(
    conn: &mut Conn,
    a: &ConnectArgs,
    slot: &str,
    from: u64,
    streaming: bool,
    retry: bool,
) -> bool {
    let cmd = format!(
        "START_REPLICATION SLOT {} LOGICAL {} (\"min_proto_version\" {}, \"max_proto_version\" {}{}{})",
        quote_ident(slot),
        wire::format_lsn(from),
        quote_literal(&wire::PROTOCOL_VERSION_MIN.to_string()),
        quote_literal(&wire::PROTOCOL_VERSION_MAX.to_string()),
        if a.forwarded {
            ", \"forward_origins\" 'all'"
        } else {
            ""
        },
        if streaming { ", \"streaming\" 'on'" } else { "" },
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match conn.start_copy(&cmd) {
            Ok(()) => return false,
            // 55006: the slot is held by another walsender.
            Err(e) if retry && Instant::now() < deadline && e.has_sqlstate("55006") => {
                if crate::pg::bgw::wait(None, Duration::from_millis(20)) {
                    return true;
                }
            }
            Err(e) => {
                // 42704: no such slot (the message may be in the peer's language).
                if e.has_sqlstate("42704") {
                    leave_if_parted_while_away(conn, a, slot);
                }
                lib_err(e)
            }
        }
    }
}

/// The peer has no slot for this node. If its catalog says this node is parted (a
/// `bdr.part` run while this node was down, which could not tell it), this node leaves
/// the group here too, as `bdr.part` would have made it do: every node is marked parted,
/// so its workers stop and the slots and origins they used are dropped, and it says so.
/// If it lists this node as an active member, the slot was dropped by hand: an error
/// saying what that means (retried, as every apply error). Otherwise (the peer cannot be
/// asked, or lists this node as joining) the error stands as it came. A peer that is
/// parted itself lists every node parted and is not believed about this node; if it
/// lists *itself* parted, it left while this node was away ([`forget_peer_if_it_left`]).
fn leave_if_parted_while_away(conn: &mut Conn, a: &ConnectArgs, slot: &str) {
    // Only a peer that is itself a member knows: a parted node lists every node parted.
    let state = conn.query_value(&format!(
        "SELECT node_state FROM bdr.nodes WHERE node_name = {} \
            AND EXISTS (SELECT FROM bdr.nodes WHERE is_local AND node_state <> 'parted')",
        quote_literal(&a.local)
    ));
    if let Ok(None) = state {
        forget_peer_if_it_left(conn, a, slot);
    }
    match state {
        Ok(Some(s)) if s == "parted" => {}
        // Joining: its slots may still be on their way.
        Ok(Some(state)) if state == "active" => raise(&ApplyError::SlotGone {
            peer: a.peer.clone(),
            local: a.local.clone(),
            slot: slot.to_string(),
            state,
        }),
        _ => return,
    }
    crate::pg::xact::begin();
    crate::catalog::nodes::mark_all_parted();
    crate::pg::xact::commit();
    raise(&ApplyError::PartedWhileAway {
        peer: a.peer.clone(),
        local: a.local.clone(),
        slot: slot.to_string(),
    })
}

/// The peer is parted itself: if it says so of itself (a `bdr.part` of it ran while this
/// node was down, so this node still lists it as a member), this node marks it parted
/// too: the supervisor then stops this worker and drops the slot and origin kept here
/// for it, which would otherwise hold WAL for ever.
fn forget_peer_if_it_left(conn: &mut Conn, a: &ConnectArgs, slot: &str) {
    let left = conn.query_value(&format!(
        "SELECT node_state FROM bdr.nodes WHERE is_local AND node_name = {}",
        quote_literal(&a.peer)
    ));
    if !matches!(left, Ok(Some(s)) if s == "parted") {
        return;
    }
    crate::pg::xact::begin();
    crate::catalog::nodes::mark_parted(&a.peer);
    crate::pg::xact::commit();
    raise(&ApplyError::PeerLeft {
        peer: a.peer.clone(),
        local: a.local.clone(),
        slot: slot.to_string(),
    })
}

/// Whether the peer's bdr speaks protocol version 4 (`bdr.version()` names its range); an
/// older peer would refuse the `streaming` option.
fn peer_streams(conn: &mut Conn) -> bool {
    let Ok(Some(v)) = conn.query_value("SELECT bdr.version()") else {
        return false;
    };
    bdr_core::streaming::version_streams(&v)
}

impl Stream {
    /// Check a frame's place in the stream (see the module note); `at` is its write's
    /// position, for the message.
    pub(super) fn check_order(&mut self, at: u64, msg: &Message) {
        let stream_frame = matches!(
            msg,
            Message::StreamStart(_)
                | Message::StreamStop
                | Message::StreamChange(_)
                | Message::StreamAbort(_)
                | Message::StreamCommit(_)
        );
        if stream_frame && !self.streaming {
            raise(&ApplyError::Protocol(format!(
                "{} frame from node \"{}\" at {}, but this connection did not ask for streaming",
                msg.kind_name(),
                self.peer,
                wire::format_lsn(at)
            )));
        }
        if let Err(why) = self.check.check(msg) {
            raise(&ApplyError::Protocol(format!(
                "stream frame out of order from node \"{}\" at {}: {why}",
                self.peer,
                wire::format_lsn(at)
            )));
        }
        if let Message::Begin(b) = msg {
            self.cur_xid = Some(b.xid);
        }
    }

    /// A stream frame reached the apply step: it goes to the stream writer
    /// (`direct.rs`). True on SIGTERM.
    #[cold]
    pub(super) fn streamed_frame(&mut self, msg: &Message) -> bool {
        if self.ignore_restreamed(msg) {
            return false;
        }
        self.direct_frame(msg)
    }

    /// Whether `msg` belongs to a transaction streamed again after it fell back and was
    /// applied whole here (PostgreSQL 15's walsender, restarted past its commit, re-reads
    /// it from the slot's restart point, streams it, and ends it with a STREAM ABORT, not
    /// a commit). Its pieces are dropped: it is applied already. A STREAM COMMIT of it
    /// would be a second copy of what was applied, and is refused with an error (the
    /// worker retries; nothing is applied twice).
    #[cold]
    fn ignore_restreamed(&mut self, msg: &Message) -> bool {
        match msg {
            Message::StreamStart(s) => {
                let again = self.fallback.applied_whole(s.xid);
                if again && s.first_segment {
                    pgrx::log!(
                        "bdr: apply worker for node \"{}\" ignores streamed transaction {}: \
                         it was applied whole here after its fallback",
                        self.peer,
                        s.xid
                    );
                }
                self.ignoring = again.then_some(s.xid);
                again
            }
            Message::StreamStop => self.ignoring.is_some(),
            Message::StreamChange(c) => self.ignoring == Some(c.xid),
            Message::StreamAbort(a) if self.fallback.applied_whole(a.xid) => {
                if a.subxid == a.xid {
                    self.fallback.forget_applied(a.xid);
                    self.ignoring = None;
                }
                true
            }
            Message::StreamCommit(c) if self.fallback.applied_whole(c.xid) => {
                raise(&ApplyError::Protocol(format!(
                    "STREAM COMMIT from node \"{}\" of transaction {}, which was applied whole \
                     here already",
                    self.peer, c.xid
                )))
            }
            _ => false,
        }
    }

    /// Streamed transaction `xid` falls back: streaming is asked for again once it
    /// arrived whole, later after several fallbacks in a row (logged).
    #[cold]
    pub(super) fn note_fallback(&mut self, xid: u32) {
        self.fallback.fall_back(xid, self.now);
        self.restream = true;
        if let Some((quiet, streak)) = self.fallback.quiet_for(self.now) {
            pgrx::log!(
                "bdr: apply worker for node \"{}\": {streak} streamed transactions in a row \
                 fell back; streaming is asked for again in {} s at the earliest",
                self.peer,
                quiet.as_secs()
            );
        }
    }

    /// A transaction committed (or the stream is idle): ask for streaming again once
    /// nothing fallen back is outstanding. True on SIGTERM.
    pub(super) fn maybe_restream(&mut self) -> bool {
        self.restream && self.restream_now()
    }

    /// As [`Stream::maybe_restream`], once a fallback asked for it.
    #[cold]
    fn restream_now(&mut self) -> bool {
        if self.streaming
            || !self.want_streaming
            || self.sink.in_transaction()
            || self.held.is_some()
            || !self.fallback.may_stream(Instant::now())
        {
            return false;
        }
        if self.fallback.pending() {
            pgrx::log!(
                "bdr: apply worker for node \"{}\" asks for streaming again (a fallen-back \
                 transaction never arrived: rolled back on the peer)",
                self.peer
            );
        }
        self.fallback.clear();
        self.restream = false;
        self.reconnect(true)
    }

    /// Close the connection between transactions and open a new one from what was
    /// applied. True on SIGTERM (while parallel writers drain).
    #[cold]
    pub(super) fn reconnect(&mut self, want_streaming: bool) -> bool {
        // A streamed transaction open in the stream writer is rolled back: the new
        // connection sends it again, from its start or whole.
        if self.direct_open() {
            self.discard_direct();
            super::direct::guard(false);
        }
        if let super::Sink::Many(d) = &mut self.sink {
            if d.drain() {
                return true;
            }
        }
        self.poll_writers();
        let from = self.sink.tracker().applied_position();
        let (conn, peer_lsn, slot, streaming) = open(&self.connect_args, want_streaming);
        // Closing the old connection ends its walsender, which then frees the slot.
        drop(std::mem::replace(&mut self.conn, conn));
        if start(
            &mut self.conn,
            &self.connect_args,
            &slot,
            from,
            streaming,
            true,
        ) {
            return true;
        }
        self.streaming = streaming;
        self.batch = None;
        self.check = StreamCheck::default();
        self.cur_xid = None;
        self.last_heard = Instant::now();
        self.heard(peer_lsn, true);
        shmem::update(self.slot, |s| s.stats.connects += 1);
        pgrx::log!(
            "bdr: apply worker for node \"{}\" reconnected at {}{}",
            self.peer,
            wire::format_lsn(from),
            if streaming { " with streaming" } else { "" }
        );
        false
    }
}
