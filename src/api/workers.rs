//! Apply workers as SQL sees them: `bdr.apply_workers()`, `bdr.apply_pause()` /
//! `bdr.apply_resume()` and `bdr.conflict_counters()`, all read from or written to the
//! shared-memory worker table (`pg::shmem`).
//!
//! Invariant: a pause is not persistent (a restart resumes) and, with a timeout, ends by
//! itself, so a join that dies cannot leave its source paused for good.

use crate::api::group_error::GroupError;
use crate::catalog::nodes;
use crate::error::raise;
use crate::pg::shmem;
use bdr_core::wire;
use pgrx::prelude::*;

/// One row per apply worker of this database: the peer it streams from, its state, its
/// positions (remote LSNs) and its last error.
#[pg_extern]
#[allow(clippy::type_complexity)]
pub fn apply_workers() -> TableIterator<
    'static,
    (
        name!(peer, String),
        name!(pid, i32),
        name!(state, String),
        name!(received_lsn, String),
        name!(applied_lsn, String),
        name!(flushed_lsn, String),
        name!(last_error, Option<String>),
        name!(last_error_time, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(error_count, i64),
        name!(
            last_applied_commit_time,
            Option<pgrx::datum::TimestampWithTimeZone>
        ),
        name!(started_at, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(skipped_messages, i64),
    ),
> {
    use crate::api::monitor::ts;
    let rows: Vec<_> = shmem::apply_slots(nodes::my_database_oid())
        .into_iter()
        .map(|s| {
            (
                s.peer(),
                s.pid,
                s.state.name().to_string(),
                wire::format_lsn(s.received_lsn),
                wire::format_lsn(s.applied_lsn),
                wire::format_lsn(s.flushed_lsn),
                s.last_error(),
                ts(s.last_error_time),
                s.error_count as i64,
                ts(s.last_applied_commit_time),
                ts(s.started_at),
                s.skipped_messages as i64,
            )
        })
        .collect();
    TableIterator::new(rows)
}

fn set_pause(peer: Option<&str>, pause: bool, limit_secs: Option<i32>) -> i32 {
    let dboid = nodes::my_database_oid();
    if let Some(p) = peer {
        if nodes::by_name(p).is_none_or(|n| n.is_local) {
            raise(&GroupError::UnknownPeer(p.into()));
        }
    }
    if peer.is_none() {
        shmem::set_pause_all(dboid, pause);
    }
    let mut n = 0;
    for (i, s) in shmem::all_indexed() {
        if s.kind == shmem::Kind::Apply && s.dboid == dboid && peer.is_none_or(|p| s.peer() == p) {
            let deadline = match limit_secs {
                Some(secs) if pause => crate::pg::xact::now() + i64::from(secs.max(1)) * 1_000_000,
                _ => 0,
            };
            shmem::update(i, |s| {
                s.pause_requested = pause;
                s.pause_deadline = deadline;
            });
            // Taken up now, not at the worker's next look (a paused worker waits up to
            // 200 ms at a time).
            crate::pg::bgw::wake(s.pid);
            n += 1;
        }
    }
    n
}

/// Hold applying changes from `peer` (all peers when NULL) at the next transaction
/// boundary; changes queue up on the peers. Returns how many workers were asked. Not
/// persistent: a server restart resumes. With `timeout_seconds`, the workers resume by
/// themselves (with a WARNING) once that time has passed: what a join asks for, so that a
/// join that dies cannot leave its source paused.
#[pg_extern]
fn apply_pause(
    peer: default!(Option<&str>, "NULL"),
    timeout_seconds: default!(Option<i32>, "NULL"),
) -> i32 {
    set_pause(peer, true, timeout_seconds)
}

/// Resume applying from `peer` (all peers when NULL).
#[pg_extern]
fn apply_resume(peer: default!(Option<&str>, "NULL")) -> i32 {
    set_pause(peer, false, None)
}

/// Conflicts resolved on this node since the server started, per peer and type (kept
/// whether or not `bdr.log_conflicts_to_table` is on).
#[pg_extern]
pub fn conflict_counters() -> TableIterator<
    'static,
    (
        name!(peer, String),
        name!(conflict_type, String),
        name!(count, i64),
    ),
> {
    let mut rows = Vec::new();
    for s in shmem::apply_slots(nodes::my_database_oid()) {
        for (c, n) in crate::conflict::Conflict::ALL.iter().zip(s.conflicts) {
            if n > 0 {
                rows.push((s.peer(), c.name().to_string(), n as i64));
            }
        }
    }
    TableIterator::new(rows)
}
