//! Receive stage: stream a peer's changes over a replication connection and feed them to
//! the apply stage, one frame at a time.
//!
//! The worker connects to the peer with `replication=database`, starts streaming from its
//! slot at this node's origin progress (the end of the last remote commit applied here),
//! answers keepalives and sends standby status updates whose flush position only covers
//! remote transactions whose local commit is flushed ([`FlushTracker`]). It waits on its
//! latch and the socket together, so SIGTERM and config reloads act at once.

use crate::apply::Applier;
use crate::error::{raise, ApplyError};
use crate::pg::libpq::{quote_ident, quote_literal, Conn, CopyData};
use crate::pg::{bgw, shmem, xact};
use bdr_core::stream::{parse_server_message, status_update, ServerMessage};
use bdr_core::{dsn, wire};
use std::time::{Duration, Instant};

/// Name of the slot on a provider (database `provider_dboid`) that feeds `subscriber`.
pub fn slot_name(provider_dboid: u32, subscriber: &str) -> String {
    format!("bdr_{provider_dboid}_{subscriber}")
}

/// Name of the replication origin on a subscriber (database `local_dboid`) for changes
/// coming from `provider`.
pub fn origin_name(local_dboid: u32, provider: &str) -> String {
    format!("bdr_{local_dboid}_{provider}")
}

fn lib_err(e: crate::pg::libpq::LibpqError) -> ! {
    raise(&ApplyError::Protocol(e.to_string()))
}

/// Stream from `peer` until SIGTERM. Errors are raised (the worker exits, is restarted).
pub fn run(slot: usize, dboid: u32, local: (&str, i64), peer: (&str, i64), peer_dsn: &str) {
    let (local, peer, ids) = (local.0, peer.0, (local.1, peer.1));
    let progress = xact::setup_origin(&origin_name(dboid, peer));
    let mut applier = Applier::new((peer, ids.1), (local, ids.0), progress);
    shmem::update(slot, |s| {
        s.state = shmem::State::Connecting;
        s.applied_lsn = progress;
        s.flushed_lsn = progress;
    });
    let repl_dsn = dsn::with_default(peer_dsn, "replication", "database");
    let mut conn = Conn::connect(&repl_dsn, &format!("bdr_apply_{local}_from_{peer}"))
        .unwrap_or_else(|e| lib_err(e));
    let provider_dboid = conn
        .query_value("SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database()")
        .unwrap_or_else(|e| lib_err(e))
        .unwrap_or_default();
    let slot_name = slot_name(provider_dboid.parse().unwrap_or(0), local);
    conn.start_copy(&format!(
        "START_REPLICATION SLOT {} LOGICAL {} (\"min_proto_version\" {}, \"max_proto_version\" {})",
        quote_ident(&slot_name),
        wire::format_lsn(progress),
        quote_literal(&wire::PROTOCOL_VERSION_MIN.to_string()),
        quote_literal(&wire::PROTOCOL_VERSION_MAX.to_string()),
    ))
    .unwrap_or_else(|e| lib_err(e));
    shmem::update(slot, |s| s.state = shmem::State::Streaming);
    pgrx::log!(
        "bdr: apply worker for node \"{peer}\" streaming from slot {slot_name} at {}",
        wire::format_lsn(progress)
    );

    let mut received = progress;
    let mut last_feedback = Instant::now() - Duration::from_secs(10);
    let mut last_reported = (0u64, 0u64);
    loop {
        // Pause (bdr.apply_pause) takes effect between transactions; the connection stays
        // open and keeps answering, so the walsender does not time out.
        if !applier.in_transaction() && shmem::pause_requested(slot) {
            shmem::update(slot, |s| s.state = shmem::State::Paused);
            while shmem::pause_requested(slot) && !pause_expired(slot, peer) {
                if bgw::wait(None, Duration::from_millis(200)) {
                    return;
                }
                if last_feedback.elapsed() > Duration::from_secs(5) {
                    let flushed = applier.tracker.flushed(xact::flush_lsn());
                    let applied = applier.tracker.applied_position();
                    let upd = status_update(received, flushed, applied, xact::now(), false);
                    conn.put_copy_data(&upd).unwrap_or_else(|e| lib_err(e));
                    conn.flush().unwrap_or_else(|e| lib_err(e));
                    last_feedback = Instant::now();
                }
            }
            shmem::update(slot, |s| s.state = shmem::State::Streaming);
        }
        match conn.get_copy_data(true).unwrap_or_else(|e| lib_err(e)) {
            CopyData::Data(buf) => {
                let m = parse_server_message(&buf)
                    .unwrap_or_else(|e| raise(&ApplyError::Protocol(e.to_string())));
                match m {
                    ServerMessage::XLogData { start, data, .. } => {
                        received = received.max(start);
                        let msg = wire::decode_frame(data).unwrap_or_else(|e| {
                            raise(&ApplyError::Protocol(format!(
                                "bad frame from node \"{peer}\" at {}: {e}",
                                wire::format_lsn(start)
                            )))
                        });
                        if skip_foreign_message(slot, peer, &msg, applier.in_transaction()) {
                            continue;
                        }
                        applier.handle(msg);
                        if pgrx::bgworkers::BackgroundWorker::sigterm_received() {
                            pgrx::log!("bdr: apply worker for node \"{peer}\" stopping on request");
                            return;
                        }
                        if !applier.in_transaction() {
                            let (applied, t) =
                                (applier.tracker.applied_position(), applier.last_commit_time);
                            let counts = applier.conflict_counts;
                            shmem::update(slot, |s| {
                                for (total, new) in s.conflicts.iter_mut().zip(counts) {
                                    *total = (*total).max(new);
                                }
                                s.received_lsn = received;
                                s.applied_lsn = applied;
                                s.last_applied_commit_time = t;
                                s.last_message_time = xact::now();
                            });
                        }
                    }
                    ServerMessage::Keepalive {
                        end,
                        reply_requested,
                        ..
                    } => {
                        received = received.max(end);
                        if !applier.in_transaction() {
                            applier.tracker.idle_at(end);
                        }
                        if reply_requested {
                            last_feedback = Instant::now() - Duration::from_secs(10);
                        }
                    }
                }
            }
            CopyData::WouldBlock => {
                if bgw::wait(Some(conn.socket()), Duration::from_millis(1000)) {
                    pgrx::log!("bdr: apply worker for node \"{peer}\" stopping on request");
                    return;
                }
                conn.consume_input().unwrap_or_else(|e| lib_err(e));
            }
            CopyData::Done => raise(&ApplyError::Protocol(format!(
                "node \"{peer}\" ended the replication stream"
            ))),
        }
        // Feedback at most every 100 ms when there is news, at least every 10 s.
        if !applier.in_transaction() || last_feedback.elapsed() > Duration::from_secs(10) {
            let flushed = applier.tracker.flushed(xact::flush_lsn());
            let applied = applier.tracker.applied_position();
            let news = (flushed, applied) != last_reported;
            let due = last_feedback.elapsed()
                > if news {
                    Duration::from_millis(100)
                } else {
                    Duration::from_secs(10)
                };
            if due {
                let upd = status_update(received, flushed, applied, xact::now(), false);
                conn.put_copy_data(&upd).unwrap_or_else(|e| lib_err(e));
                conn.flush().unwrap_or_else(|e| lib_err(e));
                last_feedback = Instant::now();
                last_reported = (flushed, applied);
                shmem::update(slot, |s| {
                    s.received_lsn = received;
                    s.flushed_lsn = flushed;
                    s.applied_lsn = applied;
                });
            }
        }
    }
}

/// A logical message that is not bdr's own (any role on the peer can emit one, and an
/// older peer may forward it) is skipped and counted, never applied nor a reason to stop.
fn skip_foreign_message(slot: usize, peer: &str, msg: &wire::Message, in_txn: bool) -> bool {
    let wire::Message::Message(m) = msg else {
        return false;
    };
    if in_txn && wire::is_our_message(&m.prefix, m.transactional) {
        return false;
    }
    shmem::update(slot, |s| s.skipped_messages += 1);
    pgrx::debug1!(
        "bdr: skipped a logical message with prefix \"{}\" from node \"{peer}\"",
        m.prefix
    );
    true
}

/// A pause with a time limit (a join's) that has run out is lifted, with a WARNING: a join
/// that died cannot leave this worker paused for ever.
fn pause_expired(slot: usize, peer: &str) -> bool {
    let s = shmem::get(slot);
    if s.pause_deadline == 0 || xact::now() < s.pause_deadline {
        return false;
    }
    shmem::update(slot, |s| {
        s.pause_requested = false;
        s.pause_deadline = 0;
    });
    crate::error::warn(&crate::error::WorkerError::PauseExpired { peer: peer.into() });
    true
}
