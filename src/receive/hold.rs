//! What holds a stream back without closing it: a pause (`bdr.apply_pause`), during which
//! the stream keeps answering and reads ahead only to the next transaction's BEGIN (so lag
//! knows the commit time it holds back, and the peer's position is probed over an
//! ordinary connection), and a transaction stamped in this node's future, held until the
//! local clock passes it (see the module note of `crate::receive`).

use super::{publish_pending, publish_progress, Stream, PING};
use crate::pg::libpq::Conn;
use crate::pg::{bgw, shmem, xact};
use bdr_core::{dsn, wire};
use std::time::{Duration, Instant};

impl Stream {
    /// Paused (bdr.apply_pause): apply nothing, keep the connection answered, and read
    /// ahead only to the next transaction's first frame, so its commit time is known.
    /// True on SIGTERM.
    #[cold]
    pub(super) fn paused(&mut self) -> bool {
        publish_progress(self.slot);
        shmem::update(self.slot, |s| s.state = shmem::State::Paused);
        while shmem::pause_requested(self.slot) && !pause_expired(self.slot, &self.peer) {
            self.now = Instant::now();
            if self.held.is_none() {
                if let Some((_, msg)) = self.read() {
                    self.held = Some(msg);
                    publish_pending(self.slot);
                    continue;
                }
            }
            if self.held.is_none() {
                if self.wait(Duration::from_millis(200)) {
                    return true;
                }
            } else if bgw::wait(None, Duration::from_millis(200)) {
                return true;
            }
            if self.last_feedback.elapsed() > PING {
                self.feedback(self.held.is_none());
            }
            if self.held.is_some() {
                self.probe_position();
            }
        }
        self.probe = None;
        // A stream holding a transaction back reads nothing: silence while paused is ours.
        self.last_heard = Instant::now();
        shmem::update(self.slot, |s| s.state = shmem::State::Streaming);
        false
    }

    /// The held BEGIN commits at `until`, in this node's future: wait (at most a second
    /// per call; the main loop calls again, so a pause or SIGTERM is seen) with the
    /// stream answered. Without this wait, a row applied with a future version and then
    /// updated locally would keep the local value here (a local write is not compared)
    /// while every other node keeps the peer's newer-stamped one: divergence for good.
    /// With it, a peer whose clock runs ahead is applied that much later (its changes
    /// still win by their timestamps). True on SIGTERM.
    #[cold]
    pub(super) fn clock_wait(&mut self, until: i64) -> bool {
        publish_pending(self.slot);
        let left = (until - xact::now()).clamp(0, 1_000_000);
        if left > 0
            && bgw::wait(
                None,
                Duration::from_micros(left as u64).max(Duration::from_millis(1)),
            )
        {
            return true;
        }
        if self.last_feedback.elapsed() > PING {
            self.feedback(false);
        }
        false
    }

    /// While a paused stream holds a transaction back it reads nothing more, so ask the
    /// peer over an ordinary connection where its WAL is (every 5 s), for lag in bytes.
    /// Best effort: a failure only leaves the last known position.
    #[cold]
    fn probe_position(&mut self) {
        if self
            .probe
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() < Duration::from_secs(5))
        {
            return;
        }
        let mut conn = match self.probe.take() {
            Some((c, _)) => c,
            None => {
                let dsn = dsn::with_default(&self.peer_dsn, "connect_timeout", "5");
                match Conn::connect(&dsn, "bdr_position_probe") {
                    Ok(c) => c,
                    Err(_) => {
                        self.probe = None;
                        return;
                    }
                }
            }
        };
        if let Ok(Some(v)) = conn.query_value("SELECT pg_catalog.pg_current_wal_lsn()::text") {
            if let Some(lsn) = wire::parse_lsn(&v) {
                self.heard(lsn, true);
            }
        }
        self.probe = Some((conn, Instant::now()));
    }
}

/// A pause with a time limit (a join's) that has run out is lifted, with a WARNING: a join
/// that died cannot leave this worker paused for ever.
#[cold]
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
