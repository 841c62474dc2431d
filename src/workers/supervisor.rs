//! The per-database supervisor: one apply worker per peer, restarted with backoff.

use crate::catalog::nodes::{self, NodeKind, NodeState};
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
/// and would win against it anyway. A peer that writes nothing sends [`heartbeat`]s while
/// it matters.
///
/// A hub's stream to its spoke also carries the other spokes' transactions, forwarded
/// later, in the order the hub applied them: one older than the hub's last transaction
/// may still come. From the hub, the horizon is therefore also at most the horizon of its
/// last heartbeat applied here (`Slot::peer_horizon`: how far the hub had applied every
/// node it streams from; none yet: nothing is collected).
///
/// Returns how many were removed, and the horizon (0: not known), which this node's own
/// heartbeats carry.
fn collect_tombstones(dboid: u32, peers: &[nodes::Node], hub: Option<&str>) -> (i64, i64) {
    let slots = shmem::apply_slots(dboid);
    let mut before = i64::MAX;
    for p in peers {
        let Some(s) = slots.iter().find(|s| s.peer() == p.name) else {
            return (0, 0);
        };
        before = before.min(s.last_applied_commit_time);
        if hub == Some(p.name.as_str()) {
            before = before.min(s.peer_horizon);
        }
    }
    if before <= 0 || before == i64::MAX {
        return (0, 0);
    }
    // Kept at least bdr.tombstone_min_age; the horizon the heartbeats carry is the
    // peers' (what a spoke may collect), not this node's choice to keep more.
    let min_age_us = i64::from(crate::gucs::TOMBSTONE_MIN_AGE_MS.get()) * 1000;
    let collect_before = before.min(xact::now() - min_age_us);
    xact::begin();
    let n = crate::catalog::tombstones::collect_garbage(collect_before);
    xact::commit();
    if n > 0 {
        pgrx::debug1!("bdr: removed {n} tombstones");
    }
    (n, before)
}

/// Commit a transaction that every peer streams and applies as progress (a write of
/// `bdr.heartbeat`, which the output plugin sends as a `bdr.sync` heartbeat message: only
/// bdr's code can write that table, so no role can forge the horizon), so that a node
/// that writes nothing still tells its peers it has nothing older to send: their
/// tombstone collection waits for a transaction from every peer committed after the
/// delete ([`collect_tombstones`]), and without this an idle member held every tombstone
/// of the group for as long as it stayed idle.
///
/// Sent only when a peer may be waiting for it, so that an idle group writes no WAL:
/// while this node has tombstones (a delete replicates to every member, so its peers
/// have the same ones, and this node applied it before its heartbeat: its commit time is
/// later), when this round's collection removed some (one more after the last), and when
/// a peer's apply worker (re)connected since the last one (a restarted peer knows no
/// commit time of ours until one arrives). It carries this node's tombstone `horizon`
/// (see [`collect_tombstones`]: what a hub's spokes need). `newest_reader` is what it
/// remembers between rounds: the newest start time of a walsender of a bdr slot of this
/// database when it last sent one.
fn heartbeat(newest_reader: &mut Option<String>, removed: i64, horizon: i64) {
    xact::begin();
    let found = Spi::get_two::<bool, String>(
        "SELECT EXISTS (SELECT FROM bdr.tombstones), \
                (SELECT max(a.backend_start)::text FROM pg_catalog.pg_replication_slots s \
                   JOIN pg_catalog.pg_stat_activity a ON a.pid = s.active_pid \
                  WHERE s.plugin = 'bdr' AND s.database = current_database())",
    );
    xact::commit();
    let Ok((pending, newest)) = found else {
        return;
    };
    let reconnected = newest.is_some() && newest != *newest_reader;
    let wanted = pending.unwrap_or(false) || removed > 0 || reconnected;
    if wanted
        && try_sql(
            "INSERT INTO bdr.heartbeat (horizon) VALUES ($1::bigint) \
             ON CONFLICT (only_row) DO UPDATE SET horizon = excluded.horizon, sent_at = now()",
            &[&horizon.to_string()],
        )
    {
        *newest_reader = newest;
    }
}

/// Say so once (at the supervisor's start, that is after a restart with a new library)
/// when this database's bdr SQL, with a node of a group, is not the library's version:
/// a rolling upgrade's node that still needs `ALTER EXTENSION bdr UPDATE` keeps
/// replicating, but what needs the newer catalog fails until then (docs/runbook.md,
/// "Rolling upgrades").
fn warn_if_sql_differs() {
    let library = env!("CARGO_PKG_VERSION");
    let found = Spi::get_two::<String, String>(
        "SELECT extversion::text, current_database()::text FROM pg_catalog.pg_extension \
          WHERE extname = 'bdr'",
    );
    if let Ok((Some(sql), Some(database))) = found {
        if sql != library {
            crate::error::warn(&crate::error::WorkerError::SqlVersionDiffers {
                database,
                sql,
                library,
            });
        }
    }
}

/// How long a node may stay `joining` here with no session of its join connected before
/// the janitor takes the join for dead (its backend ended without undoing anything).
const DEAD_JOIN_GRACE: Duration = Duration::from_secs(20);

/// Run `sql` in a transaction of its own; false (and rolled back) if it fails.
/// A failure is logged as a WARNING with the error and the statement's first line: the
/// supervisor's housekeeping (heartbeats, dropping what a parted node left) must not fail
/// unseen, round after round.
fn try_sql(sql: &str, args: &[&str]) -> bool {
    PgTryBuilder::new(|| {
        xact::begin();
        let args: Vec<pgrx::datum::DatumWithOid> = args.iter().map(|a| (*a).into()).collect();
        let ok = Spi::run_with_args(sql, &args);
        xact::commit();
        if let Err(e) = &ok {
            housekeeping_failed(sql, &e.to_string());
        }
        ok.is_ok()
    })
    .catch_others(|e| {
        xact::abort();
        housekeeping_failed(sql, crate::error::caught_report(&e).message());
        false
    })
    .execute()
}

#[cold]
fn housekeeping_failed(sql: &str, msg: &str) {
    let what = sql.lines().next().unwrap_or(sql).trim();
    pgrx::warning!("bdr: supervisor: {msg} (while running: {what})");
}

/// First column of every row of a read-only query.
fn strings(sql: &str, args: &[&str]) -> Vec<String> {
    xact::begin();
    let args: Vec<pgrx::datum::DatumWithOid> = args.iter().map(|a| (*a).into()).collect();
    let out = Spi::connect(|c| {
        let mut v = Vec::new();
        for r in c.select(sql, None, &args)? {
            v.extend(r.get::<String>(1)?);
        }
        Ok::<_, pgrx::spi::Error>(v)
    })
    .unwrap_or_default();
    xact::commit();
    out
}

/// Drop slot and origin `name` (terminating a walsender still using the slot: the slot is
/// dropped on a later round).
fn drop_slot_and_origin(name: &str) {
    try_sql(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
          WHERE slot_name = $1 AND active_pid IS NOT NULL",
        &[name],
    );
    try_sql(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
          WHERE slot_name = $1 AND active_pid IS NULL",
        &[name],
    );
    try_sql(
        "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname = $1",
        &[name],
    );
}

/// Whether a `bdr.group_join` is running in this database (its sessions' application
/// names start with `bdr_join`).
fn join_running_here() -> bool {
    !strings(
        "SELECT application_name FROM pg_stat_activity \
          WHERE datname = current_database() AND application_name LIKE 'bdr\\_join%' LIMIT 1",
        &[],
    )
    .is_empty()
}

/// Remove what nobody will use again, which would otherwise hold WAL for ever: the slots
/// and origins of this database (named `bdr_<dboid>_<node>`) for a node that is not in
/// `bdr.nodes` or is parted, and everything of a join that died — a node still `joining`
/// here while no session of its join (`application_name` `bdr_join:<node>`, held open for
/// the whole join) has been connected for [`DEAD_JOIN_GRACE`]: its slot, its origin and
/// its catalog row, as the join's own undo would have done.
fn janitor(dboid: u32, all: &[nodes::Node], dead_joins: &mut HashMap<String, Instant>) {
    let live: Vec<String> = strings(
        "SELECT DISTINCT substr(application_name, 10) FROM pg_stat_activity \
          WHERE application_name LIKE 'bdr\\_join:%'",
        &[],
    );
    let joining: Vec<&str> = all
        .iter()
        .filter(|n| !n.is_local && n.state == NodeState::Joining)
        .map(|n| n.name.as_str())
        .collect();
    dead_joins.retain(|name, _| joining.contains(&name.as_str()));
    for name in joining {
        if live.iter().any(|l| l == name) {
            dead_joins.remove(name);
            continue;
        }
        let since = *dead_joins
            .entry(name.to_string())
            .or_insert_with(Instant::now);
        if since.elapsed() < DEAD_JOIN_GRACE {
            continue;
        }
        pgrx::warning!(
            "bdr: the join of node \"{name}\" ended without finishing; removing what it left here"
        );
        drop_slot_and_origin(&bdr_core::names::slot_name(dboid, name));
        if try_sql(
            "DELETE FROM bdr.nodes WHERE node_name = $1 AND node_state = 'joining'",
            &[name],
        ) {
            dead_joins.remove(name);
        }
    }
    let prefix = bdr_core::names::slot_name(dboid, "");
    let pattern = format!("{}%", prefix.replace('_', "\\_"));
    let named = strings(
        "SELECT slot_name::text FROM pg_replication_slots \
          WHERE database = current_database() AND slot_name LIKE $1 \
         UNION SELECT roname FROM pg_replication_origin WHERE roname LIKE $1",
        &[&pattern],
    );
    for name in named {
        let node = &name[prefix.len()..];
        let known = all
            .iter()
            .any(|n| n.name == node && n.state != NodeState::Parted);
        if !known {
            pgrx::log!("bdr: dropping {name}, left for node \"{node}\" which is not a member");
            drop_slot_and_origin(&name);
        }
    }
}

/// Delay before restart number `failures` (1, 2, 4, ... 30 s), at most
/// `bdr.apply_retry_max_delay`.
pub fn backoff(failures: u32) -> Duration {
    let max = Duration::from_millis(crate::gucs::APPLY_RETRY_MAX_DELAY_MS.get().max(100) as u64);
    Duration::from_secs((1u64 << failures.min(5).saturating_sub(1)).min(30)).min(max)
}

/// Peers this node applies from: every other data node it streams with
/// ([`nodes::Node::links`]: all of them in a mesh; the hub for a spoke; the spokes for
/// the hub) that is a member (not parting/parted).
fn peers(all: &[nodes::Node]) -> Vec<nodes::Node> {
    let Some(me) = all.iter().find(|n| n.is_local) else {
        return Vec::new();
    };
    me.links(all)
        .filter(|n| matches!(n.state, NodeState::Active | NodeState::Standby))
        .cloned()
        .collect()
}

/// The apply workers of one supervisor, by peer name.
/// (A mutex only to be shared with the error path; a supervisor has one thread.)
type Workers = Mutex<HashMap<String, Worker>>;

crate::pg::bgw::worker_entry!(bdr_supervisor_main => main);

/// The worker's body, started by PostgreSQL at `bdr_supervisor_main`.
pub fn main(arg: pg_sys::Datum) {
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
    let mut newest_reader: Option<String> = None;
    let mut no_slot_warned = false;
    let mut dead_joins: HashMap<String, Instant> = HashMap::new();
    let mut last_probe = Instant::now() - Duration::from_secs(10);
    let mut version_checked = false;
    loop {
        xact::begin();
        let has_extension = nodes::extension_exists();
        let all = if has_extension {
            nodes::all()
        } else {
            Vec::new()
        };
        if !version_checked && all.iter().any(|n| n.is_local) {
            version_checked = true;
            warn_if_sql_differs();
        }
        xact::commit();
        if !has_extension && from_launcher {
            // The launcher's round: nothing to do here, leave the database at once.
            break;
        }
        if all
            .iter()
            .any(|n| n.is_local && n.state == NodeState::Parted)
        {
            // This node was parted (by `bdr.part` on another member, or found parted on
            // coming back): stop its workers, drop what they used (nothing will read
            // those slots again, and they would hold WAL for ever), and leave the
            // database, so that nothing of bdr stays connected to it (DROP DATABASE). Not
            // while a join runs here (the node joining a group again, under a new name):
            // what it creates is named like what is dropped, and its catalog rows are
            // not committed yet.
            stop_all(workers);
            if !join_running_here() {
                janitor(dboid, &all, &mut dead_joins);
            }
            break;
        }
        let mut workers = lock(workers);
        let has_local = all
            .iter()
            .any(|n| n.is_local && n.state != NodeState::Parted);
        if !has_local && (all.is_empty() && started.elapsed() > IDLE_GRACE || !workers.is_empty()) {
            break;
        }
        // A witness holds no data: it applies from nobody.
        let witness = all
            .iter()
            .any(|n| n.is_local && n.kind == NodeKind::Witness);
        let wanted = if witness { Vec::new() } else { peers(&all) };
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
        if has_local && last_probe.elapsed() > Duration::from_secs(2) {
            crate::quorum::evaluate(dboid, &all);
            last_probe = Instant::now();
        }
        if last_gc.elapsed() > GC_INTERVAL {
            let me = all.iter().find(|n| n.is_local);
            let hub = me.and_then(|n| n.hub.as_deref());
            let (removed, horizon) = collect_tombstones(dboid, &wanted, hub);
            // Only a data node others apply from sends heartbeats.
            if me.is_some_and(|n| n.kind == NodeKind::Active && n.state == NodeState::Active) {
                heartbeat(&mut newest_reader, removed, horizon);
            }
            if has_local {
                janitor(dboid, &all, &mut dead_joins);
            }
            last_gc = Instant::now();
        }
        drop(workers);
        if bgw::wait(None, Duration::from_millis(500)) {
            break;
        }
    }
}
