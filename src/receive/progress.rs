//! Receive stage, progress publication: what committed transactions changed (counters,
//! conflicts, positions, last commit time, the peer's clock lead) accumulates in the
//! process and goes to the worker's shared-memory slot at most every [`PUBLISH_EVERY`],
//! and at once when the stream runs dry, pauses, waits for its clock, acknowledges a
//! synchronous commit or fails — one exclusive lock of the worker table per commit cost
//! small transactions several percent of the apply process's time.
//!
//! Invariant: nothing accumulated is lost while the worker lives: the error path
//! (`publish_pending`) publishes it before the pending transaction's commit time.

use super::CLOCK_AHEAD;
use crate::pg::{shmem, xact};
use std::time::Duration;

/// What this process has not published yet. One thread-local for both parts: every
/// commit reaches it once (`note_commit`), and a second one per commit was a second
/// `__tls_get_addr` call on the apply path for heartbeats that come every 10 s.
struct Unpublished {
    /// Progress of committed transactions not yet published to shared memory.
    progress: Option<Progress>,
    /// Heartbeats received and not yet committed here: (their transaction's end LSN, the
    /// horizon they carry), in stream order.
    heartbeats: std::collections::VecDeque<(u64, i64)>,
}

thread_local! {
    static UNPUBLISHED: std::cell::RefCell<Unpublished> = const {
        std::cell::RefCell::new(Unpublished {
            progress: None,
            heartbeats: std::collections::VecDeque::new(),
        })
    };
}

/// The transaction ending at `end_lsn` carries a heartbeat with `horizon`: it counts
/// (`shmem::Slot::peer_horizon`) once everything up to it is applied here, in commit
/// order, with one writer or several.
pub(super) fn heartbeat_received(end_lsn: u64, horizon: i64) {
    UNPUBLISHED.with(|u| u.borrow_mut().heartbeats.push_back((end_lsn, horizon)));
}

/// How often at most the progress of committed transactions is published to shared
/// memory while transactions keep coming (one exclusive lock of the shared slot per
/// commit cost small transactions several percent of the apply process's time). A stream
/// that runs dry, pauses, waits for its clock or fails publishes at once.
pub(super) const PUBLISH_EVERY: Duration = Duration::from_millis(5);

/// What committed transactions changed since progress was last published.
struct Progress {
    counts: shmem::Stats,
    conflicts: [u64; 9],
    received: u64,
    applied: u64,
    /// Last applied commit time (0: none).
    commit_time: i64,
    peer_lsn: u64,
    /// The greatest horizon of the peer's heartbeats applied (0: none).
    horizon: i64,
}

/// Publish the progress of committed transactions not published yet (see
/// [`PUBLISH_EVERY`]).
pub(super) fn publish_progress(slot: usize) {
    let Some(p) = UNPUBLISHED.with(|u| u.borrow_mut().progress.take()) else {
        return;
    };
    let now = xact::now();
    shmem::update(slot, |s| {
        s.peer_lsn = s.peer_lsn.max(p.peer_lsn);
        s.last_contact_time = now;
        for (total, new) in s.conflicts.iter_mut().zip(p.conflicts) {
            *total += new;
        }
        s.stats.add(&p.counts);
        // The apply-rate window restarts every minute.
        if now - s.stats.rate_time > 60_000_000 {
            s.stats.rate_commits = s.stats.commits;
            s.stats.rate_time = now;
        }
        s.received_lsn = p.received;
        s.applied_lsn = p.applied;
        s.pending_commit_time = 0;
        s.peer_lsn = s.peer_lsn.max(p.applied);
        if p.commit_time != 0 {
            s.last_applied_commit_time = p.commit_time;
        }
        s.peer_horizon = s.peer_horizon.max(p.horizon);
        // The most ahead seen in the last 10 minutes: while this node holds the
        // peer's transactions for its clock (`clock_wait`), the ones queued behind
        // arrive late and look less ahead than they are.
        if let Some(ahead) = CLOCK_AHEAD.with(|c| c.take()) {
            if !s.peer_clock_seen
                || ahead >= s.peer_clock_ahead
                || now - s.peer_clock_ahead_time > 600_000_000
            {
                s.peer_clock_ahead = ahead;
                s.peer_clock_ahead_time = now;
            }
            s.peer_clock_seen = true;
        }
        s.last_message_time = now;
    });
}

/// A transaction committed: add what it changed to the progress not yet published.
pub(super) fn note_commit(
    counts: &shmem::Stats,
    conflicts: [u64; 9],
    received: u64,
    applied: u64,
    commit_time: i64,
    peer_lsn: u64,
) {
    UNPUBLISHED.with(|u| {
        let u = &mut *u.borrow_mut();
        let p = u.progress.get_or_insert_with(|| Progress {
            counts: shmem::Stats::default(),
            conflicts: [0; 9],
            received: 0,
            applied: 0,
            commit_time: 0,
            peer_lsn: 0,
            horizon: 0,
        });
        p.counts.add(counts);
        for (total, new) in p.conflicts.iter_mut().zip(conflicts) {
            *total += new;
        }
        p.received = received;
        p.applied = applied;
        if commit_time != 0 {
            p.commit_time = commit_time;
        }
        p.peer_lsn = p.peer_lsn.max(peer_lsn);
        // The heartbeats applied up to `applied`, taken: the greatest horizon counts.
        while let Some(&(lsn, horizon)) = u.heartbeats.front() {
            if lsn > applied {
                break;
            }
            u.heartbeats.pop_front();
            p.horizon = p.horizon.max(horizon);
        }
    });
}
