//! The per-database supervisor: one apply worker per peer, restarted with backoff.

use crate::catalog::nodes;
use crate::pg::{bgw, shmem, xact};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerStatus, DynamicBackgroundWorker};
use pgrx::prelude::*;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a supervisor waits for a local node to appear before giving up (e.g. right
/// after `group_create` started it, before that transaction committed).
const IDLE_GRACE: Duration = Duration::from_secs(30);

struct Worker {
    handle: Option<DynamicBackgroundWorker>,
    slot: usize,
    failures: u32,
    started: Instant,
    next_start: Instant,
}

const GC_INTERVAL: Duration = Duration::from_secs(10);

/// Drop tombstones no change can still need: a delete older than the last transaction we
/// applied from *every* peer. Each peer streams in commit order, so anything it committed
/// before that point has already arrived here; anything later is newer than the tombstone
/// and would win against it anyway.
fn collect_tombstones(dboid: u32, peers: usize) {
    let times: Vec<i64> = shmem::all()
        .into_iter()
        .filter(|s| s.kind == shmem::Kind::Apply && s.dboid == dboid)
        .map(|s| s.last_applied_commit_time)
        .collect();
    if times.len() < peers || times.contains(&0) {
        return;
    }
    let Some(before) = times.into_iter().min() else {
        return;
    };
    xact::begin();
    let n = crate::catalog::tombstones::collect_garbage(before);
    xact::commit();
    if n > 0 {
        pgrx::debug1!("bdr: removed {n} tombstones");
    }
}

/// Delay before restart number `failures` (1, 2, 4, ... 30 s).
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs((1u64 << failures.min(5).saturating_sub(1)).min(30))
}

/// Peers this node applies from: every other node that is a member (not parting/parted).
fn peers(all: &[nodes::Node]) -> Vec<nodes::Node> {
    all.iter()
        .filter(|n| !n.is_local && matches!(n.state.as_str(), "active" | "standby" | "catching_up"))
        .filter(|n| n.kind == "active")
        .cloned()
        .collect()
}

/// The apply workers of one supervisor, by peer name.
/// (A mutex only to be shared with the error path; a supervisor has one thread.)
type Workers = Mutex<HashMap<String, Worker>>;

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn bdr_supervisor_main(arg: pg_sys::Datum) {
    let dboid = bgw::connect_to_arg_database(arg);
    let from_launcher = BackgroundWorker::get_extra() == crate::workers::launcher::FROM_LAUNCHER;
    let me = shmem::find(shmem::Kind::Supervisor, dboid, "");
    if let Some(i) = me {
        shmem::update(i, |s| {
            s.pid = std::process::id() as i32;
            s.state = shmem::State::Streaming;
        });
        // However this process ends (an ERROR ends a background worker; a FATAL skips
        // every destructor), its slot must not stay claimed: the launcher could never
        // start a supervisor for this database again.
        bgw::release_slot_at_exit(i);
    }
    let workers: Workers = Mutex::new(HashMap::new());
    PgTryBuilder::new(|| supervise(dboid, from_launcher, &workers))
        .catch_others(|e| {
            // Stop our apply workers with us: the next supervisor starts its own.
            stop_all(&workers);
            e.rethrow()
        })
        .execute();
    stop_all(&workers);
    if let Some(i) = me {
        shmem::release(i);
    }
}

/// The map, also after a panic poisoned the mutex (the error path only drains it).
fn lock(workers: &Workers) -> MutexGuard<'_, HashMap<String, Worker>> {
    workers.lock().unwrap_or_else(|e| e.into_inner())
}

fn stop_all(workers: &Workers) {
    for (_, w) in lock(workers).drain() {
        if let Some(h) = w.handle {
            let _ = h.terminate().wait_for_shutdown();
        }
        shmem::release(w.slot);
    }
}

fn supervise(dboid: u32, from_launcher: bool, workers: &Workers) {
    let started = Instant::now();
    let mut last_gc = Instant::now();
    let mut no_slot_warned = false;
    loop {
        xact::begin();
        let has_extension = nodes::extension_exists();
        let all = if has_extension {
            nodes::all()
        } else {
            Vec::new()
        };
        xact::commit();
        if !has_extension && from_launcher {
            // The launcher's round: nothing to do here, leave the database at once.
            break;
        }
        let mut workers = lock(workers);
        let has_local = all.iter().any(|n| n.is_local && n.state != "parted");
        if !has_local && (all.is_empty() && started.elapsed() > IDLE_GRACE || !workers.is_empty()) {
            break;
        }
        let wanted = peers(&all);
        // Stop workers for nodes that left.
        let gone: Vec<String> = workers
            .keys()
            .filter(|k| !wanted.iter().any(|n| &n.name == *k))
            .cloned()
            .collect();
        for name in gone {
            let w = workers.remove(&name).expect("listed");
            if let Some(h) = w.handle {
                let _ = h.terminate().wait_for_shutdown();
            }
            shmem::release(w.slot);
        }
        for peer in &wanted {
            if !workers.contains_key(&peer.name) {
                let Some(slot) = shmem::find(shmem::Kind::Apply, dboid, &peer.name)
                    .or_else(|| shmem::claim(shmem::Kind::Apply, dboid, &peer.name, xact::now()))
                else {
                    // Every slot is taken: say so once, and try again next round.
                    if !std::mem::replace(&mut no_slot_warned, true) {
                        crate::error::warn(&crate::error::WorkerError::NoSlot {
                            peer: peer.name.clone(),
                            max: shmem::MAX_WORKERS,
                        });
                    }
                    continue;
                };
                workers.insert(
                    peer.name.clone(),
                    Worker {
                        handle: None,
                        slot,
                        failures: 0,
                        started: Instant::now(),
                        next_start: Instant::now(),
                    },
                );
            }
            let w = workers.get_mut(&peer.name).expect("inserted");
            let running = matches!(
                w.handle.as_ref().map(|h| h.pid()),
                Some(Ok(_)) | Some(Err(BackgroundWorkerStatus::NotYetStarted))
            );
            if running {
                continue;
            }
            if w.handle.take().is_some() {
                // It stopped: count the failure (a long healthy run resets the count).
                w.failures = if w.started.elapsed() > Duration::from_secs(60) {
                    1
                } else {
                    w.failures + 1
                };
                w.next_start = Instant::now() + backoff(w.failures);
                shmem::update(w.slot, |s| {
                    s.state = shmem::State::Erroring;
                    s.pid = 0;
                });
            }
            if Instant::now() >= w.next_start {
                w.handle = bgw::start_worker(
                    &format!("bdr apply {} from {}", dboid, peer.name),
                    "bdr_apply_main",
                    dboid,
                    &peer.name,
                );
                w.started = Instant::now();
            }
        }
        if last_gc.elapsed() > GC_INTERVAL {
            collect_tombstones(dboid, wanted.len());
            last_gc = Instant::now();
        }
        drop(workers);
        if bgw::wait(None, Duration::from_millis(500)) {
            break;
        }
    }
}
