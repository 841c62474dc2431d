//! Streamed transactions (protocol version 4): the receiver's pure rules.
//!
//! A sender asked for it (`bdr.stream_large_transactions`) sends a transaction that
//! outgrows `logical_decoding_work_mem` before it commits, in pieces: `STREAM START(xid)`,
//! changes tagged with their (sub)xid, `STREAM STOP`, more pieces later (ordinary
//! transactions are sent between them), and finally `STREAM COMMIT(xid)` or
//! `STREAM ABORT(xid, subxid)`.
//!
//! - [`StreamCheck`] checks the order of those frames on one connection. A frame out of
//!   order (STOP without START, a change for a transaction that is not the one being
//!   streamed, COMMIT of a transaction never started, an untagged change inside a
//!   piece...) is a protocol violation: the receiver stops with an ERROR naming the peer
//!   and the position, it never guesses.
//! - [`Fallback`] remembers the transactions the receiver refused to take streamed: it
//!   reconnects without streaming, the sender then decodes them whole at their COMMIT,
//!   and streaming is asked for again once they have been applied that way (or after
//!   [`Fallback::RETRY_AFTER`], for one that was rolled back on the sender and so never
//!   arrives). After [`Fallback::STREAK`] fallbacks in a row (no streamed transaction
//!   committed streamed in between) it waits longer before asking again (from
//!   [`Fallback::QUIET_MIN`], doubling per further fallback, at most
//!   [`Fallback::QUIET_MAX`]): each fallback costs the sender a second decoding of the
//!   transaction, and a workload whose big transactions keep meeting rows other nodes
//!   wrote would pay it every time.
//!
//! Invariants: nothing here touches PostgreSQL; a [`StreamCheck`] lives exactly as long
//! as one replication connection (xids and first-segment flags are per connection).

use crate::conflict::{Change, Local, Version};
use crate::wire::Message;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// The frame order of one replication connection.
#[derive(Debug, Default)]
pub struct StreamCheck {
    /// Between an ordinary BEGIN and its COMMIT.
    in_txn: bool,
    /// The transaction whose piece is being received (between START and STOP).
    current: Option<u32>,
    /// Transactions with a piece received and no COMMIT or ABORT yet.
    open: BTreeSet<u32>,
}

impl StreamCheck {
    /// Check that `m` may come now, and note what it changes; `Err` says why not.
    pub fn check(&mut self, m: &Message) -> Result<(), String> {
        let in_piece = |what: &str, cur: Option<u32>| match cur {
            Some(x) => Err(format!(
                "{what} inside a piece of streamed transaction {x} (no STREAM STOP before it)"
            )),
            None => Ok(()),
        };
        match m {
            Message::Begin(_) => {
                in_piece("a BEGIN", self.current)?;
                self.in_txn = true;
            }
            Message::Commit(_) => {
                in_piece("a COMMIT", self.current)?;
                self.in_txn = false;
            }
            Message::Insert(_)
            | Message::Update(_)
            | Message::Delete(_)
            | Message::Truncate(_)
            | Message::Message(_) => {
                if let Some(x) = self.current {
                    return Err(format!(
                        "a {} without its transaction id inside a piece of streamed transaction {x}",
                        m.kind_name()
                    ));
                }
            }
            Message::Relation(_) => {}
            Message::StreamStart(s) => {
                in_piece("a STREAM START", self.current)?;
                if self.in_txn {
                    return Err(format!(
                        "STREAM START of transaction {} inside an ordinary transaction",
                        s.xid
                    ));
                }
                let known = self.open.contains(&s.xid);
                if s.first_segment && known {
                    return Err(format!(
                        "STREAM START says transaction {} starts, but it was already streamed",
                        s.xid
                    ));
                }
                if !s.first_segment && !known {
                    return Err(format!(
                        "STREAM START continues transaction {}, which was never started",
                        s.xid
                    ));
                }
                self.open.insert(s.xid);
                self.current = Some(s.xid);
            }
            Message::StreamStop => {
                if self.current.take().is_none() {
                    return Err("STREAM STOP without STREAM START".into());
                }
            }
            Message::StreamChange(c) => match self.current {
                Some(x) if x == c.xid => {}
                Some(x) => {
                    return Err(format!(
                        "a change of transaction {} inside a piece of transaction {x}",
                        c.xid
                    ))
                }
                None => {
                    return Err(format!(
                        "a change of streamed transaction {} outside STREAM START/STOP",
                        c.xid
                    ))
                }
            },
            Message::StreamAbort(a) => {
                in_piece("a STREAM ABORT", self.current)?;
                if !self.open.contains(&a.xid) {
                    return Err(format!(
                        "STREAM ABORT of transaction {}, which was never streamed",
                        a.xid
                    ));
                }
                if a.subxid == a.xid {
                    self.open.remove(&a.xid);
                }
            }
            Message::StreamCommit(c) => {
                in_piece("a STREAM COMMIT", self.current)?;
                if self.in_txn {
                    return Err(format!(
                        "STREAM COMMIT of transaction {} inside an ordinary transaction",
                        c.xid
                    ));
                }
                if !self.open.remove(&c.xid) {
                    return Err(format!(
                        "STREAM COMMIT of transaction {}, which was never streamed",
                        c.xid
                    ));
                }
            }
        }
        Ok(())
    }

    /// Transactions streamed in part and not finished yet.
    pub fn open(&self) -> impl Iterator<Item = u32> + '_ {
        self.open.iter().copied()
    }
}

/// Whether a peer whose `bdr.version()` says `version` (`bdr 0.1.0 (protocol 1..4)`)
/// can stream: the highest protocol version it names is at least
/// [`STREAM_FROM_VERSION`](crate::wire::STREAM_FROM_VERSION).
pub fn version_streams(version: &str) -> bool {
    version
        .rsplit_once("..")
        .and_then(|(_, max)| max.trim().trim_end_matches(')').trim().parse::<u8>().ok())
        .is_some_and(|max| max >= crate::wire::STREAM_FROM_VERSION)
}

/// Transactions the receiver refused to take streamed (see the module note).
#[derive(Debug, Default)]
pub struct Fallback {
    xids: BTreeSet<u32>,
    /// Fallen-back transactions that then arrived whole and committed here, newest last
    /// (at most [`Self::APPLIED_KEPT`]): PostgreSQL 15's walsender, restarted past such a
    /// transaction's commit, may stream it once more (it re-reads its changes from the
    /// slot's restart point) and then sends a STREAM ABORT for it instead of a commit.
    /// Those pieces are ignored ([`Fallback::applied_whole`]).
    applied: std::collections::VecDeque<u32>,
    since: Option<Instant>,
    /// Fallbacks since a streamed transaction last committed streamed.
    streak: u32,
    /// After [`Self::STREAK`] fallbacks in a row: not before this.
    quiet_until: Option<Instant>,
}

impl Fallback {
    /// A fallen-back transaction that never arrives whole (rolled back on the sender)
    /// keeps streaming off this long at most.
    pub const RETRY_AFTER: Duration = Duration::from_secs(60);
    /// Fallbacks in a row after which streaming waits [`Self::QUIET_MIN`] or more.
    pub const STREAK: u32 = 3;
    pub const QUIET_MIN: Duration = Duration::from_secs(60);
    pub const QUIET_MAX: Duration = Duration::from_secs(30 * 60);

    /// Transaction `xid` (top level) will be taken whole, not streamed.
    pub fn fall_back(&mut self, xid: u32, now: Instant) {
        self.xids.insert(xid);
        self.since.get_or_insert(now);
        self.streak = self.streak.saturating_add(1);
        if self.streak >= Self::STREAK {
            let doublings = (self.streak - Self::STREAK).min(16);
            let quiet = Self::QUIET_MIN
                .saturating_mul(1 << doublings)
                .min(Self::QUIET_MAX);
            self.quiet_until = Some(now + quiet);
        }
    }

    /// How long streaming stays off after the fallback just noted, beyond the fallen-back
    /// transactions' arrival (for the log), and how many fell back in a row.
    pub fn quiet_for(&self, now: Instant) -> Option<(Duration, u32)> {
        self.quiet_until
            .map(|t| (t.saturating_duration_since(now), self.streak))
    }

    /// A streamed transaction committed streamed: the streak is over.
    pub fn streamed_ok(&mut self) {
        self.streak = 0;
        self.quiet_until = None;
    }

    /// How many applied fallen-back transactions are remembered.
    pub const APPLIED_KEPT: usize = 32;

    /// Transaction `xid` arrived whole and committed here.
    pub fn committed(&mut self, xid: u32) {
        if self.xids.remove(&xid) {
            if self.xids.is_empty() {
                self.since = None;
            }
            if self.applied.len() == Self::APPLIED_KEPT {
                self.applied.pop_front();
            }
            self.applied.push_back(xid);
        }
    }

    /// Whether `xid` fell back and was then applied whole here: streamed again, it is
    /// already applied and must not be applied twice.
    pub fn applied_whole(&self, xid: u32) -> bool {
        self.applied.contains(&xid)
    }

    /// The peer ended the repeated stream of `xid` (see [`Fallback::applied_whole`]).
    pub fn forget_applied(&mut self, xid: u32) {
        self.applied.retain(|x| *x != xid);
    }

    /// Whether transactions fell back and are not applied yet.
    pub fn pending(&self) -> bool {
        !self.xids.is_empty()
    }

    /// Whether the next connection may ask for streaming.
    pub fn may_stream(&self, now: Instant) -> bool {
        self.since
            .is_none_or(|s| now.saturating_duration_since(s) >= Self::RETRY_AFTER)
            && self.quiet_until.is_none_or(|t| now >= t)
    }

    /// Forget the fallen-back transactions (streaming asked for again); the streak is
    /// kept until a streamed transaction commits streamed.
    pub fn clear(&mut self) {
        self.xids.clear();
        self.since = None;
    }
}

/// Whether a change of a streamed transaction may be applied before its commit (by the
/// stream writer, whose commit time is not known yet), given what is there locally for
/// its key; `peer_id` is the node the transaction comes from.
///
/// Only what needs no last-update-wins decision is applied: an INSERT of a key with no
/// row and no tombstone; an UPDATE or DELETE of a row this transaction wrote, or whose
/// last writer is the same peer (its changes reach us in its commit order, and this one
/// commits after every one already applied here). Anything else (a row of another node
/// or of this one, a row of unknown origin, a tombstone, a missing row, an INSERT
/// meeting a row) would need the commit time: `false` makes the stream writer keep that
/// change and every later one for the commit, when it decides with it.
pub fn direct_apply(change: Change, local: Local, peer_id: i64) -> bool {
    match (change, local) {
        (Change::Insert, Local::Missing) => true,
        (Change::Insert, _) => false,
        (
            _,
            Local::Row {
                same_transaction: true,
                ..
            },
        ) => true,
        (
            _,
            Local::Row {
                version: Some(v), ..
            },
        ) => v.node_id == peer_id,
        _ => false,
    }
}

/// The version the conflict rules see for a streamed change applied early: its commit
/// time is unknown and later than everything already applied from the peer.
pub fn streamed_version(peer_id: i64) -> Version {
    Version {
        commit_time: i64::MAX,
        node_id: peer_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conflict::{decide, Action};
    use crate::wire::*;

    fn start(xid: u32, first: bool) -> Message {
        Message::StreamStart(StreamStart {
            xid,
            first_segment: first,
        })
    }
    fn change(xid: u32, subxid: u32) -> Message {
        Message::StreamChange(StreamChange {
            xid,
            subxid,
            change: Box::new(Message::Insert(Insert {
                relation: 1,
                new: vec![Value::text("1")],
            })),
        })
    }
    fn commit(xid: u32) -> Message {
        Message::StreamCommit(StreamCommit {
            xid,
            commit_lsn: 1,
            end_lsn: 2,
            commit_time: 3,
            origin: None,
        })
    }
    fn abort(xid: u32, subxid: u32) -> Message {
        Message::StreamAbort(StreamAbort { xid, subxid })
    }
    fn begin() -> Message {
        Message::Begin(Begin {
            xid: 9,
            final_lsn: 1,
            commit_time: 1,
            origin: None,
        })
    }
    fn plain_commit() -> Message {
        Message::Commit(Commit {
            commit_lsn: 1,
            end_lsn: 2,
            commit_time: 3,
        })
    }
    fn run(ms: &[Message]) -> Result<(), String> {
        let mut c = StreamCheck::default();
        for m in ms {
            c.check(m)?;
        }
        Ok(())
    }

    #[test]
    fn interleaved_pieces_and_transactions_are_accepted() {
        run(&[
            start(5, true),
            change(5, 5),
            change(5, 6),
            Message::StreamStop,
            begin(),
            plain_commit(),
            start(7, true),
            change(7, 7),
            Message::StreamStop,
            start(5, false),
            change(5, 5),
            Message::StreamStop,
            abort(5, 6),
            commit(7),
            commit(5),
        ])
        .unwrap();
    }

    #[test]
    fn out_of_order_frames_are_refused() {
        assert!(run(&[Message::StreamStop])
            .unwrap_err()
            .contains("without STREAM START"));
        assert!(run(&[change(5, 5)]).unwrap_err().contains("outside"));
        assert!(run(&[start(5, true), change(6, 6)])
            .unwrap_err()
            .contains("inside a piece of transaction 5"));
        assert!(run(&[commit(5)]).unwrap_err().contains("never streamed"));
        assert!(run(&[abort(5, 5)]).unwrap_err().contains("never streamed"));
        assert!(run(&[start(5, false)])
            .unwrap_err()
            .contains("never started"));
        assert!(run(&[start(5, true), Message::StreamStop, start(5, true)])
            .unwrap_err()
            .contains("already streamed"));
        assert!(run(&[start(5, true), start(6, true)]).is_err());
        assert!(run(&[start(5, true), begin()]).is_err());
        assert!(run(&[begin(), start(5, true)]).is_err());
        assert!(run(&[start(5, true), Message::StreamStop, begin(), commit(5)]).is_err());
        assert!(
            run(&[start(5, true), commit(5)]).is_err(),
            "COMMIT before STOP"
        );
        let insert = Message::Insert(Insert {
            relation: 1,
            new: vec![],
        });
        assert!(run(&[start(5, true), insert])
            .unwrap_err()
            .contains("without its transaction id"));
        // A top-level abort ends it; a subtransaction's does not.
        assert!(run(&[start(5, true), Message::StreamStop, abort(5, 5), commit(5)]).is_err());
        run(&[start(5, true), Message::StreamStop, abort(5, 8), commit(5)]).unwrap();
    }

    #[test]
    fn peers_that_stream_are_recognised_by_their_version() {
        assert!(version_streams("bdr 0.1.0 (protocol 1..4)"));
        assert!(version_streams("bdr 2.0.0 (protocol 2..9)"));
        assert!(!version_streams("bdr 0.1.0 (protocol 1..3)"));
        assert!(!version_streams("bdr 0.1.0"));
        assert!(!version_streams(""));
        assert!(!version_streams("bdr (protocol 1..x)"));
    }

    #[test]
    fn fallback_ends_when_the_transactions_arrive_or_after_a_while() {
        let t0 = Instant::now();
        let mut f = Fallback::default();
        assert!(f.may_stream(t0));
        f.fall_back(5, t0);
        f.fall_back(7, t0 + Duration::from_secs(1));
        assert!(f.pending());
        assert!(!f.may_stream(t0 + Duration::from_secs(2)));
        f.committed(5);
        assert!(!f.may_stream(t0 + Duration::from_secs(2)));
        f.committed(99);
        f.committed(7);
        assert!(f.may_stream(t0 + Duration::from_secs(2)));
        f.fall_back(8, t0);
        // The third in a row: a quiet minute beyond the RETRY_AFTER bound.
        assert_eq!(f.quiet_for(t0), Some((Fallback::QUIET_MIN, 3)));
        f.clear();
        assert!(!f.pending());
    }

    #[test]
    fn fallbacks_in_a_row_back_off_until_one_commits_streamed() {
        let t0 = Instant::now();
        let mut f = Fallback::default();
        let mut t = t0;
        for xid in 1..Fallback::STREAK {
            f.fall_back(xid, t);
            f.committed(xid);
            assert!(f.may_stream(t), "no back-off before the streak");
            assert_eq!(f.quiet_for(t), None);
            t += Duration::from_secs(1);
        }
        f.fall_back(10, t);
        f.committed(10);
        assert!(!f.may_stream(t), "the streak reached: quiet");
        assert!(!f.may_stream(t + Fallback::QUIET_MIN - Duration::from_secs(1)));
        assert!(f.may_stream(t + Fallback::QUIET_MIN));
        // Each further fallback doubles the wait, up to QUIET_MAX.
        t += Fallback::QUIET_MIN;
        f.fall_back(11, t);
        f.committed(11);
        assert_eq!(f.quiet_for(t), Some((2 * Fallback::QUIET_MIN, 4)));
        for xid in 12..40 {
            f.fall_back(xid, t);
        }
        assert_eq!(f.quiet_for(t).map(|q| q.0), Some(Fallback::QUIET_MAX));
        // clear() (streaming asked again) keeps the streak; a streamed commit ends it.
        f.clear();
        assert!(!f.may_stream(t));
        f.streamed_ok();
        assert!(f.may_stream(t));
        f.fall_back(50, t);
        f.committed(50);
        assert!(f.may_stream(t), "a new streak starts from zero");
    }

    #[test]
    fn fallen_back_transactions_applied_whole_are_remembered() {
        let t = Instant::now();
        let mut f = Fallback::default();
        f.fall_back(7, t);
        assert!(!f.applied_whole(7), "not applied yet");
        f.committed(8);
        assert!(!f.applied_whole(8), "never fell back");
        f.committed(7);
        assert!(f.applied_whole(7));
        f.clear();
        assert!(f.applied_whole(7), "kept when streaming is asked for again");
        f.forget_applied(7);
        assert!(!f.applied_whole(7));
        for xid in 100..100 + Fallback::APPLIED_KEPT as u32 + 1 {
            f.fall_back(xid, t);
            f.committed(xid);
        }
        assert!(!f.applied_whole(100), "the oldest forgotten");
        assert!(f.applied_whole(101) && f.applied_whole(100 + Fallback::APPLIED_KEPT as u32));
    }

    #[test]
    fn direct_apply_only_without_a_decision() {
        let peer = 2;
        let row = |node: i64, same| Local::Row {
            version: Some(Version {
                commit_time: 5,
                node_id: node,
            }),
            same_transaction: same,
        };
        let tomb = Local::Deleted(Version {
            commit_time: 5,
            node_id: peer,
        });
        let unknown = Local::Row {
            version: None,
            same_transaction: false,
        };
        assert!(direct_apply(Change::Insert, Local::Missing, peer));
        for c in [Change::Insert, Change::Update, Change::Delete] {
            assert!(!direct_apply(c, tomb, peer), "{c:?} on a tombstone");
            assert!(
                !direct_apply(c, row(1, false), peer),
                "{c:?} on another node's row"
            );
            assert!(
                !direct_apply(c, unknown, peer),
                "{c:?} on a row of unknown origin"
            );
        }
        assert!(!direct_apply(Change::Update, Local::Missing, peer));
        assert!(!direct_apply(Change::Delete, Local::Missing, peer));
        assert!(!direct_apply(Change::Insert, row(peer, false), peer));
        for c in [Change::Update, Change::Delete] {
            assert!(direct_apply(c, row(peer, false), peer));
            assert!(direct_apply(c, row(1, true), peer));
        }
        // What is applied early is what the whole-transaction path would do, without a
        // conflict, whatever the real commit time turns out to be.
        for (c, l) in [
            (Change::Insert, Local::Missing),
            (Change::Update, row(peer, false)),
            (Change::Delete, row(peer, false)),
            (Change::Update, row(1, true)),
        ] {
            let d = decide(c, l, streamed_version(peer));
            assert!(d.conflict.is_none() && d.action != Action::Nothing, "{c:?}");
            let later = decide(
                c,
                l,
                Version {
                    commit_time: 6,
                    node_id: peer,
                },
            );
            assert_eq!(d, later, "{c:?}");
        }
    }
}
