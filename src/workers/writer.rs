//! A parallel-apply writer: applies the remote transactions its receiver (the apply
//! worker of one peer, `src/receive/parallel.rs`) hands it over a shared-memory queue,
//! one at a time, with the same [`Applier`] as the one-process path. Each queue message
//! is a batch of controls and frames (a whole small transaction, or a piece of a big
//! one); several transactions may wait in the queue, taken in order.
//!
//! Why this way: the receiver numbers transactions in the peer's commit order and decides
//! dependencies; the writer only obeys. After a transaction's BEGIN it holds the
//! transaction's lock tag (`pg::mq::Group::start`); a `Wait(d)` control makes it wait for
//! transaction `d` to commit before the next frame; before its own COMMIT it waits for the
//! transaction just before it, so commits happen strictly in origin order and each commits
//! with the origin's session set up only for its commit (`xact::commit_remote_turn`).
//!
//! Invariants: a writer never commits while the group is stopping (abort flag) and never
//! before the previous transaction committed; it leaves as soon as its receiver does (the
//! queue detaches) or the group fails (any wait raises), rolling back what it holds. Its
//! changes and conflicts are added to the receiver's shared-memory slot as it commits.

use crate::apply::{Applier, Link};
use crate::catalog::nodes::{self, Node};
use crate::error::{raise, ApplyError};
use crate::pg::mq::{Group, WaitFailed};
use crate::pg::{bgw, shmem, xact};
use bdr_core::parallel::Ctl;
use bdr_core::wire::{self, Message};
use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;

crate::pg::bgw::worker_entry!(bdr_writer_main => main);

/// What a writer's `bgw_extra` says: "<segment handle> <writer index> <slot> <peer>".
pub fn extra(handle: u32, w: usize, slot: usize, peer: &str) -> String {
    format!("{handle} {w} {slot} {peer}")
}

/// Set up an applying session for a process that applies `peer_name`'s changes beside its
/// receiver (a parallel apply writer, a stream writer): [`super::applying_settings`], the
/// error context, relcache watch and the applying flag. The local node and the peer, or
/// None if either is gone.
pub(super) fn session(peer_name: &str) -> Option<(Node, Node)> {
    super::applying_settings();
    xact::begin();
    let (local, peer) = (nodes::local(), nodes::by_name(peer_name));
    xact::commit();
    let (Some(local), Some(peer)) = (local, peer) else {
        return None;
    };
    xact::install_error_context();
    crate::pg::relcache::watch();
    crate::pg::utility::set_applying();
    Some((local, peer))
}

/// The writer's body, started by its receiver at `bdr_writer_main`.
pub fn main(arg: pg_sys::Datum) {
    let dboid = bgw::connect_writer_to_arg_database(arg);
    let extra = BackgroundWorker::get_extra().to_string();
    let mut parts = extra.splitn(4, ' ');
    let (Some(handle), Some(w), Some(slot), Some(peer_name)) = (
        parts.next().and_then(|v| v.parse::<u32>().ok()),
        parts.next().and_then(|v| v.parse::<usize>().ok()),
        parts.next().and_then(|v| v.parse::<usize>().ok()),
        parts.next(),
    ) else {
        pgrx::warning!("bdr: parallel apply writer started with a bad argument \"{extra}\"");
        return;
    };
    let Some(group) = Group::attach(handle, w) else {
        pgrx::log!("bdr: parallel apply writer for \"{peer_name}\": its receiver is gone");
        return;
    };
    let Some((local, peer)) = session(peer_name) else {
        return;
    };
    let aborter = group.aborter();
    let (local_ref, peer_ref) = (&local, &peer);
    let group_cell = std::panic::AssertUnwindSafe(group);
    PgTryBuilder::new(move || {
        let mut g = group_cell;
        run(&mut g.0, slot, dboid, local_ref, peer_ref)
    })
    .catch_others(|e| {
        // The group stops: nobody commits after a failed transaction. Only the first
        // failure is the cause: the others (waits that found the group stopping) do not
        // overwrite the error the worker's slot shows.
        let first = !aborter.aborted();
        aborter.set_abort();
        if first {
            super::apply::record_failure(slot, &local.name, &peer.name, &e);
        } else {
            xact::abort();
            xact::clear_origin();
        }
        e.rethrow()
    })
    .execute();
}

/// One step read from the queue.
enum Step {
    Begin(u64),
    Wait(u64),
    Msg(Message),
}

fn wait(group: &Group, seq: u64, peer: &str) {
    match group.wait_for(seq) {
        Ok(()) => {}
        Err(WaitFailed::Aborted) => raise(&ApplyError::ParallelStopped {
            peer: peer.into(),
            why: "the group is stopping".into(),
        }),
        Err(WaitFailed::NotCommitted) => raise(&ApplyError::ParallelStopped {
            peer: peer.into(),
            why: format!("transaction {seq} of the stream did not commit"),
        }),
    }
}

fn run(group: &mut Group, slot: usize, dboid: u32, local: &nodes::Node, peer: &nodes::Node) {
    let link = Link {
        forwarded: local.hub.as_deref() == Some(peer.name.as_str()),
        requeue_ddl: peer.hub.as_deref() == Some(local.name.as_str()),
    };
    let mut applier = Applier::new(peer, local, 0);
    applier.set_link(dboid, link);
    applier.set_parallel();
    let mut seq = 0u64;
    // One queue message is a batch of controls and frames (a whole small transaction),
    // copied out of the queue so the group can be used while its steps run.
    let mut batch = Vec::new();
    while let Some(buf) = group.receive() {
        batch.clear();
        batch.extend_from_slice(buf);
        for ctl in bdr_core::parallel::batch(&batch) {
            let step = match ctl {
                Some(Ctl::Begin { seq }) => Step::Begin(seq),
                Some(Ctl::Wait { seq }) => Step::Wait(seq),
                Some(Ctl::Frame(f)) => Step::Msg(wire::decode_frame(f).unwrap_or_else(|e| {
                    raise(&ApplyError::Protocol(format!(
                        "bad frame from the receiver: {e}"
                    )))
                })),
                None => raise(&ApplyError::Protocol(
                    "bad control message from the receiver".into(),
                )),
            };
            step_one(group, &mut applier, &mut seq, slot, peer, step);
        }
    }
    // The receiver left: what is in progress is rolled back, never committed.
    if applier.in_transaction() {
        xact::abort();
    }
}

/// Run one step of the receiver's batch.
fn step_one(
    group: &mut Group,
    applier: &mut Applier,
    seq: &mut u64,
    slot: usize,
    peer: &nodes::Node,
    step: Step,
) {
    match step {
        Step::Begin(s) => {
            // Settings (e.g. bdr.log_conflicts_to_table) change between transactions.
            bgw::reload_if_asked();
            *seq = s
        }
        Step::Wait(d) => {
            wait(group, d, &peer.name);
            // What `d` wrote must be visible to the changes that waited for it.
            xact::refresh_snapshot();
        }
        Step::Msg(m @ Message::Begin(_)) => {
            applier.handle(m);
            group.start(*seq);
        }
        Step::Msg(m @ Message::Commit(_)) => {
            // Commit order: the transaction before this one first.
            wait(group, *seq - 1, &peer.name);
            if group.aborted() {
                raise(&ApplyError::ParallelStopped {
                    peer: peer.name.clone(),
                    why: "the group is stopping".into(),
                });
            }
            applier.handle(m);
            let (remote_end, local_end) = applier.last_done;
            let ack = std::mem::take(&mut applier.ack_now);
            if ack {
                // The origin waits for this commit: durable now, and say so.
                xact::flush_last_commit();
            }
            let (counts, conflicts) = applier.take_counts();
            shmem::update(slot, |s| {
                s.stats.add(&counts);
                for (total, new) in s.conflicts.iter_mut().zip(conflicts) {
                    *total += new;
                }
            });
            group.committed_here(*seq, remote_end, local_end, applier.last_commit_time);
            if ack {
                group.request_ack();
            }
        }
        Step::Msg(m) => applier.handle(m),
    }
}
