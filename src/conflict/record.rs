//! The conflict stage's record: each decision that was a conflict is counted and, with
//! `bdr.log_conflicts_to_table`, written to `bdr.conflict_history` in the applying
//! transaction (with both versions, the key and both rows).

use super::Resolver;
use crate::write::{LazyKey, RelMap, Row, Target};
use bdr_core::conflict::{Conflict, Decision, Local, Resolution, Version};
use bdr_core::wire::Value;

/// What a history row says about the local side.
pub(super) struct Recorded {
    pub(super) local_version: Option<Version>,
    pub(super) local_row: Option<String>,
    pub(super) key: Option<String>,
}

/// A decision to carry out and record (see [`Resolver::record_decision`]).
pub(super) struct Decided<'a> {
    decision: &'a Decision,
    /// The remote values (new row, or the old key of a DELETE).
    remote: &'a [Value],
    local: Local,
    /// The local row the decision was made against, if any.
    base: Option<&'a Row>,
}

impl<'a> Decided<'a> {
    pub(super) fn of(
        decision: &'a Decision,
        remote: &'a [Value],
        local: Local,
        base: Option<&'a Row>,
    ) -> Self {
        Decided {
            decision,
            remote,
            local,
            base,
        }
    }
}

impl Resolver {
    /// Write the tombstone and the conflict history row a decision asks for.
    ///
    /// `base` holds `t`'s datums.
    pub(super) fn record_decision(
        &mut self,
        t: &Target,
        map: &RelMap,
        key: &mut LazyKey,
        what: Decided,
    ) {
        let Decided {
            decision: d,
            remote,
            local,
            base,
        } = what;
        if d.tombstone {
            match local {
                Local::Missing | Local::Deleted(_) => self.tombstone_absent_key(t, local, key),
                Local::Row { .. } => {
                    // The row is locked: nobody else decides about this key meanwhile.
                    if let Some(k) = key.get() {
                        self.tombstone(t.relid(), &k);
                    }
                }
            }
        }
        if let Some((c, r)) = d.conflict {
            let local_version = match local {
                Local::Row { version, .. } => version,
                Local::Deleted(v) => Some(v),
                Local::Missing => None,
            };
            let local_row = base.map(|b| t.row_json(b));
            self.record(
                map,
                c,
                r,
                remote,
                Recorded {
                    local_version,
                    local_row,
                    key: key.get(),
                },
            );
        }
    }

    pub(super) fn record(
        &mut self,
        map: &RelMap,
        c: Conflict,
        r: Resolution,
        values: &[Value],
        info: Recorded,
    ) {
        if let Some(i) = Conflict::ALL.iter().position(|x| *x == c) {
            self.conflict_counts[i] += 1;
        }
        if !crate::gucs::LOG_CONFLICTS_TO_TABLE.get() {
            return;
        }
        crate::history::record(&crate::history::Entry {
            local_node: &self.local,
            remote_node: self.txn.forwarded.as_ref().map_or(&self.peer, |f| &f.0),
            relation: &map.name(),
            conflict: c,
            resolution: r,
            local_commit_time: info
                .local_version
                .map(|v| v.commit_time)
                .filter(|t| *t != i64::MIN),
            remote_commit_time: self.txn.commit_time,
            remote_lsn: self.txn.lsn,
            remote_xid: self.txn.xid,
            key: info.key,
            local_tuple: info.local_row,
            remote_tuple: crate::history::row_json(&map.remote, values),
        });
    }
}
