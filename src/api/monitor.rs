//! Monitoring functions over the shared-memory worker table: per-peer lag as the
//! receiving node can know it (`bdr.apply_lag()`, behind `bdr.node_status()`), apply
//! counters (`bdr.apply_stats()`) and their reset.
//!
//! Everything here reads shared memory only (no catalog, no network), so it answers at
//! once even while a peer is unreachable, and it shows no row data: a `bdr_monitor` role
//! may call all of it (see `sql/monitoring.sql`). Lag rules live in `bdr_core::lag`.

use crate::catalog::nodes;
use crate::pg::{shmem, xact};
use bdr_core::lag::{self, Facts};
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;

/// A stream that confirmed it had everything within this long is live (the worker asks
/// for a confirmation every second while idle).
pub const FRESH_US: i64 = 10_000_000;

pub fn ts(t: i64) -> Option<TimestampWithTimeZone> {
    (t != 0)
        .then(|| TimestampWithTimeZone::try_from(t).ok())
        .flatten()
}

fn apply_slots() -> Vec<shmem::Slot> {
    shmem::apply_slots(nodes::my_database_oid())
}

/// Lag per peer this node applies from, computed from what its apply worker last knew
/// (`bdr_core::lag`): bytes and microseconds (NULL when unknown) and whether the time is
/// an upper bound because the peer has not confirmed within the last 10 seconds; and how
/// far the peer's commit timestamps ran ahead of this node's clock (the most seen on
/// arrival in the last 10 minutes; negative when behind; NULL before any).
#[pg_extern]
#[allow(clippy::type_complexity)]
pub fn apply_lag() -> TableIterator<
    'static,
    (
        name!(peer, String),
        name!(lag_bytes, Option<i64>),
        name!(lag_us, Option<i64>),
        name!(lag_is_bound, bool),
        name!(peer_lsn, Option<String>),
        name!(pending_commit_time, Option<TimestampWithTimeZone>),
        name!(caught_up_time, Option<TimestampWithTimeZone>),
        name!(last_contact_time, Option<TimestampWithTimeZone>),
        name!(last_applied_commit_time, Option<TimestampWithTimeZone>),
        name!(peer_clock_ahead_us, Option<i64>),
    ),
> {
    let now = xact::now();
    let rows: Vec<_> = apply_slots()
        .into_iter()
        .map(|s| {
            let f = Facts {
                applied_lsn: s.applied_lsn,
                peer_lsn: s.peer_lsn,
                pending_commit_time: s.pending_commit_time,
                last_applied_commit_time: s.last_applied_commit_time,
                caught_up_time: s.caught_up_time,
            };
            let l = lag::lag(&f, now, FRESH_US);
            (
                s.peer(),
                l.bytes.map(|b| b.min(i64::MAX as u64) as i64),
                l.time,
                l.bound,
                (s.peer_lsn != 0).then(|| bdr_core::wire::format_lsn(s.peer_lsn)),
                ts(s.pending_commit_time),
                ts(s.caught_up_time),
                ts(s.last_contact_time),
                ts(s.last_applied_commit_time),
                s.peer_clock_seen.then_some(s.peer_clock_ahead),
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// Apply counters per peer since the worker slot was created or last reset: changes,
/// commits, conflicts, errors, reconnects, skipped messages, the apply rate (commits
/// per second over the last one to two minutes), and streamed transactions (begun,
/// applied streamed, fallen back), and transactions applied again because a new row
/// met an existing key.
#[pg_extern]
#[allow(clippy::type_complexity)]
pub fn apply_stats() -> TableIterator<
    'static,
    (
        name!(peer, String),
        name!(inserts, i64),
        name!(updates, i64),
        name!(deletes, i64),
        name!(truncates, i64),
        name!(commits, i64),
        name!(ddl, i64),
        name!(conflicts, i64),
        name!(errors, i64),
        name!(reconnects, i64),
        name!(skipped_messages, i64),
        name!(apply_rate, f64),
        name!(last_applied_commit_time, Option<TimestampWithTimeZone>),
        name!(stats_reset, Option<TimestampWithTimeZone>),
        name!(streamed, i64),
        name!(stream_commits, i64),
        name!(stream_fallbacks, i64),
        name!(reapplied, i64),
    ),
> {
    let now = xact::now();
    let n = |v: u64| v.min(i64::MAX as u64) as i64;
    let rows: Vec<_> = apply_slots()
        .into_iter()
        .map(|s| {
            let st = s.stats;
            let secs = (now - st.rate_time) as f64 / 1e6;
            let rate = if st.rate_time != 0 && secs > 0.0 {
                st.commits.saturating_sub(st.rate_commits) as f64 / secs
            } else {
                0.0
            };
            (
                s.peer(),
                n(st.inserts),
                n(st.updates),
                n(st.deletes),
                n(st.truncates),
                n(st.commits),
                n(st.ddl),
                n(s.conflicts.iter().sum()),
                n(st.errors),
                n(st.connects.saturating_sub(1)),
                n(s.skipped_messages),
                rate,
                ts(s.last_applied_commit_time),
                ts(st.reset),
                n(st.streamed),
                n(st.stream_commits),
                n(st.stream_fallbacks),
                n(st.reapplied),
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// Zero the apply counters (and conflict counters) of `peer`, or of every peer when
/// NULL; returns how many were reset.
#[pg_extern]
pub fn apply_stats_reset(peer: default!(Option<&str>, "NULL")) -> i32 {
    let dboid = nodes::my_database_oid();
    let now = xact::now();
    let mut count = 0;
    for (i, s) in shmem::all_indexed() {
        if s.kind == shmem::Kind::Apply && s.dboid == dboid && peer.is_none_or(|p| s.peer() == p) {
            shmem::update(i, |s| {
                // A reset does not forget that the worker is connected.
                let connected = s.stats.connects.min(1);
                s.reset_stats(now);
                s.stats.connects = connected;
            });
            count += 1;
        }
    }
    count
}

/// Split-brain prevention state of this node (`bdr.minimum_nodes`): how many voting
/// members it requires and reaches, whether user writes are allowed, who is missing.
#[pg_extern]
#[allow(clippy::type_complexity)]
pub fn quorum() -> TableIterator<
    'static,
    (
        name!(minimum_nodes, i32),
        name!(voters_reached, Option<i32>),
        name!(writes_allowed, bool),
        name!(missing, Option<String>),
        name!(since, Option<TimestampWithTimeZone>),
    ),
> {
    let min = crate::gucs::MINIMUM_NODES.get();
    let q = shmem::quorum(nodes::my_database_oid()).filter(|_| min > 0);
    let row = match q {
        Some(q) => (
            min,
            Some(q.seen as i32),
            q.ok,
            Some(q.missing()).filter(|m| !m.is_empty()),
            ts(q.since),
        ),
        None => (min, None, true, None, None),
    };
    TableIterator::new(vec![row])
}

/// When this node's supervisor last reached each voting peer it probes (witnesses always;
/// every voting member while `bdr.minimum_nodes` is set).
#[pg_extern]
pub fn peers_reached() -> TableIterator<
    'static,
    (
        name!(peer, String),
        name!(last_reached, Option<TimestampWithTimeZone>),
    ),
> {
    let dboid = nodes::my_database_oid();
    let rows: Vec<_> = pgrx::Spi::connect(|c| {
        c.select(
            "SELECT node_name FROM bdr.nodes WHERE NOT is_local",
            None,
            &[],
        )
        .map(|t| {
            t.filter_map(|r| r.get::<String>(1).ok().flatten())
                .collect::<Vec<_>>()
        })
    })
    .unwrap_or_default()
    .into_iter()
    .map(|p| {
        let at = shmem::seen_at(dboid, &p);
        (p, ts(at))
    })
    .collect();
    TableIterator::new(rows)
}
