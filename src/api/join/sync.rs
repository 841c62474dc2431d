//! Steps 3 and 4 of a join: J's slot on every other member it streams with and the
//! source past each slot's point, then, with the source's apply paused, the source's
//! origin progress and J's slot on the source exporting the snapshot the copy reads.
//!
//! Invariant: the progress P_i is read while the source's apply is paused and before the
//! slot exists, so it is exactly what the snapshot contains (nothing missed, nothing
//! delivered twice).

use super::{on, Join};
use crate::api::group::lsn_of;
use crate::api::group_error::{fail, remote_err, GroupError};
use crate::catalog::nodes::NodeKind;
use crate::pg::libpq::{quote_ident, Conn};
use bdr_core::dsn;
use bdr_core::names::{origin_name, slot_name};
use std::time::{Duration, Instant};

/// Longest time a join holds its source's apply paused: the source's workers resume by
/// themselves after it, even if the joining backend died without undoing anything.
const JOIN_PAUSE_LIMIT_SECS: u64 = 60;

/// Run on the join source while its apply is paused: the time before which no change
/// that the joining node can still receive was committed (see `join_copy`): the least of
/// each active member's last commit the source applied and the source's clock, minus a
/// second for clock steps; `-infinity` when a member's last applied commit is not known.
const COPY_HORIZON_SQL: &str = "\
    SELECT CASE WHEN coalesce(bool_and(w.last_applied_commit_time IS NOT NULL), true) \
             THEN to_char((least(min(w.last_applied_commit_time), clock_timestamp()) \
                           - interval '1 second') AT TIME ZONE 'UTC', \
                          'YYYY-MM-DD HH24:MI:SS.US') || '+00' \
             ELSE '-infinity' END \
      FROM bdr.nodes n LEFT JOIN bdr.apply_workers() w ON w.peer = n.node_name \
     WHERE NOT n.is_local AND n.node_kind = 'active' AND n.node_state = 'active'";

/// What step 4 got from the source.
pub(super) struct SourceSnapshot {
    pub(super) consistent_point: u64,
    pub(super) snapshot: String,
    /// S's origin progress P_i per origin name.
    pub(super) progress: Vec<(String, u64)>,
    /// The copy's horizon (see [`copy`]).
    pub(super) horizon: String,
    /// The replication session that exported the snapshot: it must stay open for the copy.
    pub(super) repl: Conn,
}

impl Join {
    /// Step 3: J's slot on every other member it streams with, and S past it. A standby
    /// member sends nothing: J does not stream from it (no slot there) and S applies
    /// nothing from it (nothing to wait for).
    pub(super) fn sync_members(&mut self) {
        let j = self.me.name.clone();
        let mut sync_targets = Vec::new();
        for m in self.reached.iter_mut().filter(|m| {
            m.node.name != self.source.name
                && m.node.kind == NodeKind::Active
                && self.streams_with.contains(&m.node.name)
        }) {
            let slot = slot_name(m.dboid, &j);
            m.conn
                .exec_params(
                    "SELECT lsn FROM pg_create_logical_replication_slot($1, 'bdr')",
                    &[&slot],
                )
                .unwrap_or_else(|e| fail(remote_err(&m.node.name)(e)));
            self.undo.slots.push((m.node.dsn.clone(), slot));
            let sync = m
                .conn
                .query_value_params(
                    "SELECT pg_logical_emit_message(true, 'bdr.sync', $1::text)",
                    &[&format!("join {j}")],
                )
                .unwrap_or_else(|e| fail(remote_err(&m.node.name)(e)));
            sync_targets.push((m.node.name.clone(), lsn_of(sync)));
        }
        let (source, src_dboid) = (self.source.name.clone(), self.src_dboid);
        let src = self.source_session();
        let deadline = Instant::now() + Duration::from_secs(120);
        for (mi, target) in &sync_targets {
            let origin = origin_name(src_dboid, mi);
            loop {
                let p = src
                    .query_value_params(
                        "SELECT remote_lsn FROM pg_replication_origin_status WHERE external_id = $1",
                        &[&origin],
                    )
                    .unwrap_or_else(|e| fail(remote_err(&source)(e)));
                if lsn_of(p) > *target {
                    break;
                }
                if Instant::now() > deadline {
                    fail(GroupError::Timeout {
                        what: format!("node \"{source}\" to apply the changes of node \"{mi}\""),
                        secs: 120,
                    });
                }
                pgrx::check_for_interrupts!();
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// The session on the join source.
    fn source_session(&mut self) -> &mut Conn {
        let name = &self.source.name;
        &mut self
            .reached
            .iter_mut()
            .find(|m| m.node.name == *name)
            .expect("the source is a member")
            .conn
    }

    /// Step 4: P_i before the snapshot, then J's slot on S with the snapshot. S's apply is
    /// paused meanwhile, so P_i is exactly what the snapshot contains: no re-delivery.
    pub(super) fn snapshot_on_source(&mut self) -> SourceSnapshot {
        let source = self.source.clone();
        let src_slot = slot_name(self.src_dboid, &self.me.name);
        self.source_session()
            .exec(&format!(
                "SELECT bdr.apply_pause(NULL, {JOIN_PAUSE_LIMIT_SECS})"
            ))
            .unwrap_or_else(on(&source.name));
        self.undo.paused = Some(source.dsn.clone());
        let src = self.source_session();
        wait_paused(src, &source.name);
        let progress: Vec<(String, u64)> = src
            .exec("SELECT external_id, remote_lsn::text FROM pg_replication_origin_status")
            .unwrap_or_else(on(&source.name))
            .into_iter()
            .map(|r| (r[0].clone().unwrap_or_default(), lsn_of(r[1].clone())))
            .collect();
        // The copy's horizon (src/api/join/copy.rs): every change J can still receive is
        // newer.
        let horizon = src
            .query_value(COPY_HORIZON_SQL)
            .unwrap_or_else(on(&source.name))
            .unwrap_or_else(|| "-infinity".into());
        let mut repl = Conn::connect(
            &dsn::with_default(&source.dsn, "replication", "database"),
            "bdr_join_snapshot",
        )
        .unwrap_or_else(on(&source.name));
        let created = repl
            .exec(&format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL bdr EXPORT_SNAPSHOT",
                quote_ident(&src_slot)
            ))
            .unwrap_or_else(on(&source.name));
        self.undo.slots.push((source.dsn.clone(), src_slot));
        // The pause must have held until the slot existed (its time limit may have ended it).
        let src = self.source_session();
        let resumed = src
            .query_value("SELECT count(*) FROM bdr.apply_workers() WHERE state = 'streaming'")
            .unwrap_or_else(on(&source.name));
        if resumed.as_deref() != Some("0") {
            fail(GroupError::Timeout {
                what: format!(
                    "node \"{}\" to create the joining node's slot while its apply was paused",
                    source.name
                ),
                secs: JOIN_PAUSE_LIMIT_SECS,
            });
        }
        src.exec("SELECT bdr.apply_resume()")
            .unwrap_or_else(on(&source.name));
        self.undo.paused = None;
        SourceSnapshot {
            consistent_point: lsn_of(created[0][1].clone()),
            snapshot: created[0][2].clone().unwrap_or_default(),
            progress,
            horizon,
            repl,
        }
    }
}

/// Wait until the source's apply workers are all paused (none mid-transaction).
fn wait_paused(src: &mut Conn, source: &str) {
    let deadline = Instant::now() + Duration::from_secs(JOIN_PAUSE_LIMIT_SECS - 10);
    loop {
        let busy = src
            .query_value("SELECT count(*) FROM bdr.apply_workers() WHERE state = 'streaming'")
            .unwrap_or_else(|e| fail(remote_err(source)(e)));
        if busy.as_deref() == Some("0") {
            return;
        }
        if Instant::now() > deadline {
            fail(GroupError::Timeout {
                what: format!("node \"{source}\" to pause its apply workers"),
                secs: JOIN_PAUSE_LIMIT_SECS - 10,
            });
        }
        pgrx::check_for_interrupts!();
        std::thread::sleep(Duration::from_millis(20));
    }
}
