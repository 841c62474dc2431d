//! A stream writer: applies a transaction streamed by the peer (protocol version 4) while
//! it is still running there, so that at its STREAM COMMIT only the commit remains.
//!
//! Why this way: the receiver (the apply worker of one peer) must keep applying the
//! ordinary transactions that arrive between the streamed pieces (itself, or through its
//! parallel writers with `bdr.writers_per_peer` > 1), each committed in order, while the
//! streamed one stays open; one process holds one transaction, so the streamed one lives
//! here. It checks for deadlocks first (`super::stream_writer_settings`), so a cycle
//! with an ordinary applied transaction rolls the streamed one back (a fallback). The
//! receiver starts this worker at the first streamed piece (`src/receive/direct.rs`) and
//! feeds it over a shared-memory queue (the parallel-apply group of `src/pg/mq.rs`, with
//! one queue): `Begin(seq)` then the raw frames `S` (piece start), `R` (relations), `X` (changes), `E` (piece stop), `A`
//! of a subtransaction (roll it back), and `c` (commit) or `A` of the transaction (roll
//! back).
//!
//! The peer's subtransactions: the first change of each starts a local subtransaction
//! (`Applier::enter_subtransaction`), so that a `ROLLBACK TO SAVEPOINT` on the peer (an
//! `A` frame naming the subtransaction) rolls back here exactly what it rolled back there;
//! at the commit they are merged into the transaction. Table references never cross a
//! subtransaction boundary (they are given back before each, the locks stay).
//!
//! The changes are applied by an [`Applier`] in streamed mode until one needs the commit
//! time (a last-update-wins decision, `bdr_core::streaming::direct_apply`): that one and
//! every later change are kept in order ([`Waiting`], at most `bdr.stream_writer_wait_memory`) and
//! applied at the `c` with the commit time (`Applier::commit_streamed`), which is what
//! the whole-transaction path does with them. Any error here ends the worker (its
//! transaction rolls back with it) after setting the group's abort flag; the receiver
//! sees it and falls back to the whole-transaction path.
//!
//! Invariants: the transaction commits only on the receiver's `c`, under the peer's
//! origin with the origin's session set up for that commit only (the receiver released
//! it first, or, with parallel apply, every earlier transaction's writer has committed
//! and none holds it: `xact::commit_remote_turn`), and is published with (remote end,
//! local end) through `Group::committed_here`; nothing of it is visible before. The worker leaves
//! when its receiver does (the queue detaches), rolling back what it holds.

use crate::apply::{Applier, Link};
use crate::catalog::nodes;
use crate::error::{raise, ApplyError};
use crate::pg::mq::Group;
use crate::pg::{bgw, shmem, xact};
use bdr_core::parallel::Ctl;
use bdr_core::wire::{self, Message};
use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;

crate::pg::bgw::worker_entry!(bdr_stream_writer_main => main);

/// What a stream writer's `bgw_extra` says: "<segment handle> <slot> <peer>".
pub fn extra(handle: u32, slot: usize, peer: &str) -> String {
    format!("{handle} {slot} {peer}")
}

/// The worker's body, started by its receiver at `bdr_stream_writer_main`.
pub fn main(arg: pg_sys::Datum) {
    let dboid = bgw::connect_writer_to_arg_database(arg);
    let extra = BackgroundWorker::get_extra().to_string();
    let mut parts = extra.splitn(3, ' ');
    let (Some(handle), Some(slot), Some(peer_name)) = (
        parts.next().and_then(|v| v.parse::<u32>().ok()),
        parts.next().and_then(|v| v.parse::<usize>().ok()),
        parts.next(),
    ) else {
        pgrx::warning!("bdr: stream writer started with a bad argument \"{extra}\"");
        return;
    };
    let Some(group) = Group::attach(handle, 0) else {
        pgrx::log!("bdr: stream writer for \"{peer_name}\": its receiver is gone");
        return;
    };
    let Some((local, peer)) = super::writer::session(peer_name) else {
        group.set_abort();
        return;
    };
    super::stream_writer_settings();
    let aborter = group.aborter();
    let (local_ref, peer_ref) = (&local, &peer);
    let group_cell = std::panic::AssertUnwindSafe(group);
    PgTryBuilder::new(move || {
        let mut g = group_cell;
        run(&mut g.0, slot, dboid, local_ref, peer_ref)
    })
    .catch_others(|e| {
        // Whatever went wrong, the receiver falls back: say why in the log (not in the
        // apply worker's slot: this is not an apply failure), roll back, and leave.
        let msg = crate::error::caught_report(&e).message().to_string();
        pgrx::log!(
            "bdr: stream writer for node \"{}\" gives up its transaction: {msg}",
            peer.name
        );
        xact::abort();
        xact::clear_origin();
        aborter.set_abort();
    })
    .execute();
}

/// The changes of the streamed transaction that wait for its commit (the first one that
/// needed a last-update-wins decision and every one after it), in order, with the
/// subtransaction each belongs to and its frame's size.
#[derive(Default)]
struct Waiting {
    changes: Vec<(u32, Message, usize)>,
    /// The sum of the kept frames' sizes (what `bdr.stream_writer_wait_memory` bounds).
    bytes: usize,
}

impl Waiting {
    /// Keep a change for the commit. How much may wait (the frames' size as received) is
    /// `bdr.stream_writer_wait_memory`; beyond it the transaction falls back (it is then
    /// sent whole at its commit).
    fn push(&mut self, subxid: u32, m: Message, frame_len: usize, peer: &str) {
        self.bytes += frame_len;
        let max_kb = crate::gucs::STREAM_WRITER_WAIT_MEMORY_KB.get().max(64) as usize;
        if self.bytes > max_kb * 1024 {
            raise(&ApplyError::StreamFallback {
                peer: peer.to_string(),
                why: format!(
                    "more than bdr.stream_writer_wait_memory ({max_kb} kB) of its changes \
                     would wait for the commit"
                ),
            });
        }
        self.changes.push((subxid, m, frame_len));
    }

    /// The peer rolled back subtransaction `subxid`, none of whose changes was applied:
    /// drop its first waiting change and everything after it (on the peer, everything
    /// after it belonged to it or to its children until it ended). What they took no
    /// longer counts towards the limit.
    fn roll_back(&mut self, subxid: u32) {
        if let Some(at) = self.changes.iter().position(|(x, _, _)| *x == subxid) {
            let dropped: usize = self.changes[at..].iter().map(|(_, _, n)| n).sum();
            self.bytes -= dropped;
            self.changes.truncate(at);
        }
    }

    /// Every waiting change, in order; nothing waits afterwards.
    fn take(&mut self) -> Vec<Message> {
        std::mem::take(self)
            .changes
            .into_iter()
            .map(|(_, m, _)| m)
            .collect()
    }
}

fn run(group: &mut Group, slot: usize, dboid: u32, local: &nodes::Node, peer: &nodes::Node) {
    let link = Link {
        forwarded: false,
        requeue_ddl: peer.hub.as_deref() == Some(local.name.as_str()),
    };
    let mut applier = Applier::new(peer, local, 0);
    applier.set_link(dboid, link);
    // Changes are stamped with the peer's origin; its session is set up for the commit.
    applier.set_parallel();
    let mut seq = 0u64;
    let mut waiting = Waiting::default();
    loop {
        let (msg, frame_len) = {
            let Some(buf) = group.receive() else {
                break;
            };
            match Ctl::decode(buf) {
                Some(Ctl::Begin { seq: s }) => {
                    bgw::reload_if_asked();
                    seq = s;
                    waiting = Waiting::default();
                    continue;
                }
                Some(Ctl::Frame(f)) => (
                    wire::decode_frame(f).unwrap_or_else(|e| {
                        raise(&ApplyError::Protocol(format!(
                            "bad frame from the receiver: {e}"
                        )))
                    }),
                    f.len(),
                ),
                _ => raise(&ApplyError::Protocol(
                    "bad control message from the receiver".into(),
                )),
            }
        };
        match msg {
            Message::Relation(_) => applier.handle(msg),
            Message::StreamStart(s) => {
                if applier.in_transaction() {
                    // Ordinary transactions committed since the last piece: see them.
                    xact::refresh_snapshot();
                } else {
                    applier.begin_streamed(s.xid);
                }
            }
            Message::StreamStop => {}
            Message::StreamChange(c) => match *c.change {
                m @ (Message::Insert(_) | Message::Update(_) | Message::Delete(_)) => {
                    if let Some(m) = applier.apply_streamed_change(c.xid, c.subxid, m) {
                        waiting.push(c.subxid, m, frame_len, &peer.name);
                    }
                }
                m => raise(&ApplyError::StreamFallback {
                    peer: peer.name.clone(),
                    why: format!("a {} inside the stream", m.kind_name()),
                }),
            },
            Message::StreamCommit(c) => {
                applier.commit_streamed(&c, waiting.take());
                let (remote_end, local_end) = applier.last_done;
                let (counts, conflicts) = applier.take_counts();
                shmem::update(slot, |s| {
                    s.stats.add(&counts);
                    for (total, new) in s.conflicts.iter_mut().zip(conflicts) {
                        *total += new;
                    }
                });
                group.committed_here(seq, remote_end, local_end, c.commit_time);
            }
            // A subtransaction rolled back on the peer: its changes (and those after it)
            // are rolled back here; the transaction goes on.
            Message::StreamAbort(a) if a.subxid != a.xid => {
                if applier.in_transaction() {
                    if applier.rollback_subtransaction(a.subxid) {
                        // Its first change was applied, so every waiting one came after.
                        waiting = Waiting::default();
                    } else {
                        waiting.roll_back(a.subxid);
                    }
                }
            }
            Message::StreamAbort(_) => {
                waiting = Waiting::default();
                if applier.in_transaction() {
                    applier.abandon();
                }
                group.committed_here(seq, 0, 0, 0);
            }
            m => raise(&ApplyError::Protocol(format!(
                "{} frame sent to a stream writer",
                m.kind_name()
            ))),
        }
    }
    // The receiver left: what is in progress is rolled back, never committed.
    if applier.in_transaction() {
        xact::abort();
    }
}
