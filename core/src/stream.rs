//! The streaming-replication envelope around our frames, and flush-position bookkeeping.
//!
//! Inside `START_REPLICATION ... LOGICAL`, the walsender sends CopyData messages:
//! `w` (XLogData: start LSN, end LSN, send time, then one of our frames) and `k`
//! (keepalive: end LSN, send time, reply-requested flag). The receiver answers with `r`
//! (standby status update: written, flushed and applied LSNs, time, reply flag).
//!
//! [`FlushTracker`] decides the *flushed* position we report: a remote transaction counts as
//! flushed only once the local commit that applied it is flushed to disk here (apply commits
//! with `synchronous_commit = off`). Reporting more would let the sender's slot forget a
//! transaction we could still lose in a crash; reporting less only re-sends what the
//! replication origin already filters out.
//!
//! Invariants: the reported flush position never goes backwards, and never passes a remote
//! commit whose local commit LSN is beyond the local flush LSN. The tracker's memory is
//! bounded ([`FlushTracker::MAX_PENDING`] pairs): the flushed position is only asked for
//! with each status update (at most every 100 ms), and small transactions applied at
//! 100,000/s left tens of thousands of pairs pending, whose queue (capacity never given
//! back) was the largest single piece of the apply process's private memory. Past the
//! bound the newest pair absorbs the one before it, which can only report a position
//! later, never earlier.

use std::collections::VecDeque;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("empty CopyData message from the walsender")]
    Empty,
    #[error("short '{kind}' message from the walsender: {len} bytes")]
    Short { kind: char, len: usize },
    #[error("unexpected CopyData message kind {0:#04x} from the walsender")]
    UnknownKind(u8),
}

/// One CopyData message from the walsender.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerMessage<'a> {
    XLogData {
        start: u64,
        end: u64,
        send_time: i64,
        data: &'a [u8],
    },
    Keepalive {
        end: u64,
        send_time: i64,
        reply_requested: bool,
    },
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// Parse one CopyData payload.
pub fn parse_server_message(buf: &[u8]) -> Result<ServerMessage<'_>, StreamError> {
    let (&kind, rest) = buf.split_first().ok_or(StreamError::Empty)?;
    match kind {
        b'w' => {
            if rest.len() < 24 {
                return Err(StreamError::Short {
                    kind: 'w',
                    len: buf.len(),
                });
            }
            Ok(ServerMessage::XLogData {
                start: be_u64(&rest[0..]),
                end: be_u64(&rest[8..]),
                send_time: be_u64(&rest[16..]) as i64,
                data: &rest[24..],
            })
        }
        b'k' => {
            if rest.len() < 17 {
                return Err(StreamError::Short {
                    kind: 'k',
                    len: buf.len(),
                });
            }
            Ok(ServerMessage::Keepalive {
                end: be_u64(&rest[0..]),
                send_time: be_u64(&rest[8..]) as i64,
                reply_requested: rest[16] != 0,
            })
        }
        other => Err(StreamError::UnknownKind(other)),
    }
}

/// Build a standby status update (`r`).
pub fn status_update(write: u64, flush: u64, apply: u64, now: i64, reply: bool) -> [u8; 34] {
    let mut out = [0u8; 34];
    out[0] = b'r';
    out[1..9].copy_from_slice(&write.to_be_bytes());
    out[9..17].copy_from_slice(&flush.to_be_bytes());
    out[17..25].copy_from_slice(&apply.to_be_bytes());
    out[25..33].copy_from_slice(&now.to_be_bytes());
    out[33] = reply as u8;
    out
}

/// Maps remote commit positions to the local commits that applied them, to know which
/// remote position is safely flushed here.
#[derive(Debug, Default)]
pub struct FlushTracker {
    /// (remote end LSN, local commit end LSN), in apply order.
    pending: VecDeque<(u64, u64)>,
    /// Highest remote end LSN whose local commit is known flushed.
    flushed: u64,
    /// Highest remote end LSN applied (committed locally, maybe not flushed).
    applied: u64,
}

impl FlushTracker {
    /// Most (remote, local) pairs kept; see the module note.
    pub const MAX_PENDING: usize = 1024;

    /// Start from the replication origin's progress (already durable here).
    pub fn new(origin_progress: u64) -> Self {
        FlushTracker {
            pending: VecDeque::new(),
            flushed: origin_progress,
            applied: origin_progress,
        }
    }

    /// A remote transaction ending at `remote_end` was committed locally, its commit
    /// record ending at `local_end`.
    ///
    /// With [`FlushTracker::MAX_PENDING`] pairs pending, the last pair is replaced by
    /// (`remote_end`, the later of both local ends): its remote position then counts as
    /// flushed when this commit is, a little later than it could have, never earlier
    /// (local commits end in apply order; a skipped transaction's local end is 0).
    pub fn applied(&mut self, remote_end: u64, local_end: u64) {
        self.applied = self.applied.max(remote_end);
        if self.pending.len() >= Self::MAX_PENDING {
            if let Some(last) = self.pending.back_mut() {
                *last = (remote_end, last.1.max(local_end));
                return;
            }
        }
        self.pending.push_back((remote_end, local_end));
    }

    /// The sender says everything up to `remote_end` has been sent and we have applied all
    /// of it that concerned us (nothing in progress): positions with nothing to apply count
    /// as applied once every pending local commit is flushed.
    pub fn idle_at(&mut self, remote_end: u64) {
        self.applied = self.applied.max(remote_end);
    }

    /// Given the local flush LSN, the remote position we may report as flushed.
    pub fn flushed(&mut self, local_flush: u64) -> u64 {
        while let Some(&(remote, local)) = self.pending.front() {
            if local > local_flush {
                break;
            }
            self.flushed = self.flushed.max(remote);
            self.pending.pop_front();
        }
        if self.pending.is_empty() {
            self.flushed = self.flushed.max(self.applied);
        }
        self.flushed
    }

    pub fn applied_position(&self) -> u64 {
        self.applied
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_xlogdata_and_keepalive() {
        let mut w = vec![b'w'];
        w.extend_from_slice(&10u64.to_be_bytes());
        w.extend_from_slice(&20u64.to_be_bytes());
        w.extend_from_slice(&30i64.to_be_bytes());
        w.extend_from_slice(b"frame");
        assert_eq!(
            parse_server_message(&w).unwrap(),
            ServerMessage::XLogData {
                start: 10,
                end: 20,
                send_time: 30,
                data: b"frame"
            }
        );
        let mut k = vec![b'k'];
        k.extend_from_slice(&99u64.to_be_bytes());
        k.extend_from_slice(&5i64.to_be_bytes());
        k.push(1);
        assert_eq!(
            parse_server_message(&k).unwrap(),
            ServerMessage::Keepalive {
                end: 99,
                send_time: 5,
                reply_requested: true
            }
        );
        assert_eq!(parse_server_message(&[]), Err(StreamError::Empty));
        assert!(matches!(
            parse_server_message(&k[..10]),
            Err(StreamError::Short { kind: 'k', .. })
        ));
        assert_eq!(
            parse_server_message(b"x"),
            Err(StreamError::UnknownKind(b'x'))
        );
    }

    #[test]
    fn status_update_layout() {
        let r = status_update(1, 2, 3, 4, true);
        assert_eq!(r[0], b'r');
        assert_eq!(be_u64(&r[1..]), 1);
        assert_eq!(be_u64(&r[9..]), 2);
        assert_eq!(be_u64(&r[17..]), 3);
        assert_eq!(be_u64(&r[25..]), 4);
        assert_eq!(r[33], 1);
    }

    #[test]
    fn flush_waits_for_local_flush() {
        let mut t = FlushTracker::new(100);
        assert_eq!(t.flushed(0), 100);
        t.applied(200, 5000);
        t.applied(300, 6000);
        assert_eq!(t.flushed(4999), 100, "nothing flushed locally yet");
        assert_eq!(t.flushed(5000), 200);
        assert_eq!(t.flushed(5500), 200);
        // A keepalive past the last commit does not advance past an unflushed commit.
        t.idle_at(400);
        assert_eq!(t.flushed(5999), 200);
        assert_eq!(t.flushed(6000), 400, "all flushed: idle position counts");
        assert_eq!(t.flushed(0), 400, "never goes backwards");
    }

    #[test]
    fn pending_pairs_are_bounded_and_never_report_early() {
        let mut t = FlushTracker::new(0);
        let n = FlushTracker::MAX_PENDING as u64 * 3;
        // Remote ends 10, 20, ...; local ends 1000, 1010, ...; every 7th was skipped (0).
        let local = |i: u64| {
            if i.is_multiple_of(7) {
                0
            } else {
                1000 + i * 10
            }
        };
        for i in 1..=n {
            t.applied(i * 10, local(i));
        }
        assert!(t.pending.len() <= FlushTracker::MAX_PENDING);
        assert!(t.pending.capacity() < 2 * FlushTracker::MAX_PENDING);
        // Exact while under the bound.
        assert_eq!(t.flushed(1000 + 10), 10);
        assert_eq!(t.flushed(1000 + 500 * 10), 500 * 10);
        // Past it: never a remote position whose local commit is not flushed...
        let last_exact = FlushTracker::MAX_PENDING as u64 - 1;
        assert_eq!(t.flushed(local(last_exact)), last_exact * 10);
        assert_eq!(
            t.flushed(local(n) - 1),
            last_exact * 10,
            "the merged pair waits"
        );
        // ...and everything once the last commit is.
        assert_eq!(t.flushed(local(n)), n * 10);
        assert!(t.pending.is_empty());
        // Below the bound again, exact again.
        t.applied(n * 10 + 10, 90_000);
        t.applied(n * 10 + 20, 90_010);
        assert_eq!(t.flushed(90_000), n * 10 + 10);
    }

    #[test]
    fn idle_with_nothing_pending_advances() {
        let mut t = FlushTracker::new(0);
        t.idle_at(50);
        assert_eq!(t.flushed(0), 50);
        assert_eq!(t.applied_position(), 50);
    }
}
