//! Replication lag as the receiving node can truthfully know it, whatever its apply
//! worker is doing (streaming, paused, erroring, reconnecting, or cut off from the peer).
//!
//! The apply worker records facts in shared memory as it learns them; [`lag`] turns them
//! into the two numbers `bdr.node_status()` shows:
//!
//! - **time**: now − the commit time (on the peer) of the oldest transaction the peer has
//!   committed and this node has not applied.
//!   - When a transaction's BEGIN has arrived and it is not applied yet (being applied,
//!     failing, or held by a pause) its commit time is known exactly: `pending_commit_time`.
//!   - Otherwise the oldest unapplied commit is younger than the last one applied (a peer
//!     streams in commit order) and younger than the last moment a live stream confirmed
//!     that nothing was pending (`caught_up_time`). The lag is therefore at most
//!     now − the later of the two, which is what is shown: an upper bound that grows while
//!     the peer cannot be heard, and is exact again as soon as it can.
//!   - A confirmation younger than `fresh` means the stream is live and nothing is
//!     pending: 0.
//!   - Never confirmed and nothing ever applied: unknown (`None`), never 0.
//! - **bytes**: the peer's WAL position for this node's stream (the latest of what the
//!   walsender reported in keepalives, what it sent, and `IDENTIFY_SYSTEM` at connect)
//!   minus what is applied here; `None` before the peer was ever heard.
//!
//! Invariants: lag never reads 0 unless a live stream confirmed it within `fresh`; while
//! something is known to be pending, the time grows with the wall clock.

/// What the apply worker last knew. Times are microseconds on one clock (PostgreSQL
/// epoch), 0 meaning "never"; LSNs are 0 when unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Facts {
    pub applied_lsn: u64,
    /// The peer's WAL position for this stream, as last heard.
    pub peer_lsn: u64,
    /// Commit time of a transaction whose BEGIN arrived and which is not applied yet.
    pub pending_commit_time: i64,
    /// Commit time of the last transaction applied.
    pub last_applied_commit_time: i64,
    /// Last time a live stream showed everything the peer had sent was applied.
    pub caught_up_time: i64,
}

/// Lag as shown to users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lag {
    pub bytes: Option<u64>,
    /// Microseconds.
    pub time: Option<i64>,
    /// Whether `time` is an upper bound from the last known position (the peer has not
    /// confirmed recently), rather than measured.
    pub bound: bool,
}

/// Compute the lag at `now`; a confirmation younger than `fresh` (µs) counts as live.
pub fn lag(f: &Facts, now: i64, fresh: i64) -> Lag {
    let bytes = (f.peer_lsn != 0).then(|| f.peer_lsn.saturating_sub(f.applied_lsn));
    if f.pending_commit_time != 0 {
        return Lag {
            bytes,
            time: Some((now - f.pending_commit_time).max(0)),
            bound: false,
        };
    }
    if f.caught_up_time != 0 && now - f.caught_up_time <= fresh {
        return Lag {
            bytes,
            time: Some(0),
            bound: false,
        };
    }
    let known = f.caught_up_time.max(f.last_applied_commit_time);
    Lag {
        bytes,
        time: (known != 0).then(|| (now - known).max(0)),
        bound: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    #[test]
    fn live_and_caught_up_is_zero() {
        let f = Facts {
            applied_lsn: 100,
            peer_lsn: 100,
            caught_up_time: 1000 * S,
            last_applied_commit_time: 10 * S,
            ..Facts::default()
        };
        let l = lag(&f, 1005 * S, 10 * S);
        assert_eq!(l.time, Some(0));
        assert_eq!(l.bytes, Some(0));
        assert!(!l.bound);
    }

    #[test]
    fn a_pending_transaction_ages_with_the_clock() {
        // Paused, or failing on a missing table: the BEGIN arrived at 1000 s.
        let f = Facts {
            applied_lsn: 100,
            peer_lsn: 5000,
            pending_commit_time: 1000 * S,
            caught_up_time: 1001 * S,
            ..Facts::default()
        };
        assert_eq!(lag(&f, 1070 * S, 10 * S).time, Some(70 * S));
        assert_eq!(lag(&f, 1070 * S, 10 * S).bytes, Some(4900));
        assert_eq!(lag(&f, 1100 * S, 10 * S).time, Some(100 * S));
    }

    #[test]
    fn silence_grows_from_the_last_confirmation() {
        // Cut off at 1000 s, caught up then: after 70 s the lag is at most 70 s.
        let f = Facts {
            applied_lsn: 100,
            peer_lsn: 100,
            caught_up_time: 1000 * S,
            last_applied_commit_time: 900 * S,
            ..Facts::default()
        };
        let l = lag(&f, 1070 * S, 10 * S);
        assert_eq!(l.time, Some(70 * S));
        assert!(l.bound);
    }

    #[test]
    fn under_load_the_last_applied_commit_bounds_it() {
        // Between two transactions of a busy stream: the last one committed 5 ms ago on
        // the peer, the last idle confirmation is old.
        let f = Facts {
            applied_lsn: 100,
            peer_lsn: 200,
            caught_up_time: 900 * S,
            last_applied_commit_time: 1000 * S - 5_000,
            ..Facts::default()
        };
        assert_eq!(lag(&f, 1000 * S, 10 * S).time, Some(5_000));
    }

    #[test]
    fn never_heard_is_unknown_not_zero() {
        let l = lag(&Facts::default(), 1000 * S, 10 * S);
        assert_eq!(l.time, None);
        assert_eq!(l.bytes, None);
    }

    #[test]
    fn applied_past_the_known_peer_position_is_zero_bytes() {
        let f = Facts {
            applied_lsn: 300,
            peer_lsn: 200,
            ..Facts::default()
        };
        assert_eq!(lag(&f, 0, 0).bytes, Some(0));
    }

    #[test]
    fn clock_skew_never_makes_it_negative() {
        // The peer's clock runs ahead: its commit times are in our future.
        let f = Facts {
            pending_commit_time: 2000 * S,
            ..Facts::default()
        };
        assert_eq!(lag(&f, 1000 * S, 10 * S).time, Some(0));
    }
}
