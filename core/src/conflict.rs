//! Conflict policy: last-update-wins on (commit timestamp, node id), with tombstones.
//!
//! Pure Rust, tested without a server. The apply stage looks at what it finds locally for
//! the key of a remote change — nothing, a *tombstone* (the key was deleted, and when), or a
//! row with its last writer's version — and [`decide`] says what to do and whether that is
//! a conflict worth recording.
//!
//! Why it converges: every row (and every deleted key) carries the version of the change
//! that produced it, and every node keeps, for each key, the change with the greatest
//! version, whatever order changes arrive in. Versions are ordered by commit timestamp,
//! then node id, a total order: every node picks the same winner. A delete is remembered as
//! a tombstone so that an older change arriving later cannot resurrect the row, while a
//! newer UPDATE of a deleted row wins and brings it back everywhere.
//!
//! Invariants (tested below): the outcome depends only on the versions, not on arrival
//! order; a re-delivered change (same version) is a no-op and not a conflict; a change from
//! the node that wrote the local row last is not a conflict.

use std::cmp::Ordering;

/// Who wrote a row (or deleted a key) last, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Version {
    /// Commit timestamp, PostgreSQL-epoch microseconds.
    pub commit_time: i64,
    /// `bdr.nodes.node_id` of the node where the change was made.
    pub node_id: i64,
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.commit_time, self.node_id).cmp(&(other.commit_time, other.node_id))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// What the apply stage found locally for the key of a remote change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    /// No row and no tombstone.
    Missing,
    /// No row; the key was deleted by the change with this version.
    Deleted(Version),
    /// A row. `version` is its last writer (None when unknown: written before commit
    /// timestamps were tracked, or too old — treated as older than anything);
    /// `same_transaction` when the row was written by the remote transaction being applied.
    Row {
        version: Option<Version>,
        same_transaction: bool,
    },
}

/// The kind of remote change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Insert,
    Update,
    Delete,
}

/// Every kind of conflict, with its name in `bdr.conflict_history.conflict_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Conflict {
    /// INSERT of a key that has a row, written by another change.
    InsertExists,
    /// INSERT of a key deleted by a newer change.
    InsertDeleted,
    /// UPDATE of a row whose last writer is another node.
    UpdateOriginDiffers,
    /// UPDATE of a key that has no row and no tombstone.
    UpdateMissing,
    /// UPDATE of a key that was deleted.
    UpdateDeleted,
    /// DELETE of a row whose last writer is another node.
    DeleteOriginDiffers,
    /// DELETE of a key that has no row.
    DeleteMissing,
    /// The remote row collides with a different local row on a secondary unique index.
    UniqueKey,
    /// The change could not be applied at all (the worker stops and retries).
    ApplyError,
}

/// What was done about a conflict (`bdr.conflict_history.conflict_resolution`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resolution {
    ApplyRemote,
    KeepLocal,
    Skip,
}

impl Conflict {
    pub const ALL: [Conflict; 9] = [
        Conflict::InsertExists,
        Conflict::InsertDeleted,
        Conflict::UpdateOriginDiffers,
        Conflict::UpdateMissing,
        Conflict::UpdateDeleted,
        Conflict::DeleteOriginDiffers,
        Conflict::DeleteMissing,
        Conflict::UniqueKey,
        Conflict::ApplyError,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Conflict::InsertExists => "insert_exists",
            Conflict::InsertDeleted => "insert_deleted",
            Conflict::UpdateOriginDiffers => "update_origin_differs",
            Conflict::UpdateMissing => "update_missing",
            Conflict::UpdateDeleted => "update_deleted",
            Conflict::DeleteOriginDiffers => "delete_origin_differs",
            Conflict::DeleteMissing => "delete_missing",
            Conflict::UniqueKey => "unique_key",
            Conflict::ApplyError => "apply_error",
        }
    }
}

impl Resolution {
    pub fn name(self) -> &'static str {
        match self {
            Resolution::ApplyRemote => "apply_remote",
            Resolution::KeepLocal => "keep_local",
            Resolution::Skip => "skip",
        }
    }
}

/// What to do with the remote change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Insert the remote row (needs every column).
    Insert,
    /// Overwrite the local row with the remote values.
    Update,
    /// Delete the local row.
    Delete,
    /// Leave the table as it is.
    Nothing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    /// Remember the key as deleted by the remote change (creates or raises the tombstone).
    pub tombstone: bool,
    /// The conflict to record, with its resolution.
    pub conflict: Option<(Conflict, Resolution)>,
}

fn plain(action: Action) -> Decision {
    Decision {
        action,
        tombstone: action == Action::Delete,
        conflict: None,
    }
}

fn conflict(c: Conflict, remote_wins: bool, win: Action) -> Decision {
    Decision {
        action: if remote_wins { win } else { Action::Nothing },
        tombstone: remote_wins && win == Action::Delete,
        conflict: Some((
            c,
            if remote_wins {
                Resolution::ApplyRemote
            } else {
                Resolution::KeepLocal
            },
        )),
    }
}

/// Decide what a remote change with version `remote` does, given what is found locally.
pub fn decide(change: Change, local: Local, remote: Version) -> Decision {
    let newer = |v: Option<Version>| v.is_none_or(|v| remote > v);
    match (change, local) {
        // Nothing here: inserts go in; a DELETE is remembered so an older change arriving
        // later cannot bring the row back; an UPDATE of a row we never saw (its INSERT is
        // still on its way from a third node, or long deleted) becomes the row.
        (Change::Insert, Local::Missing) => plain(Action::Insert),
        (Change::Update, Local::Missing) => conflict(Conflict::UpdateMissing, true, Action::Insert),
        (Change::Delete, Local::Missing) => Decision {
            action: Action::Nothing,
            tombstone: true,
            conflict: Some((Conflict::DeleteMissing, Resolution::Skip)),
        },

        // Deleted here: the later of the delete and the change wins.
        (Change::Insert, Local::Deleted(t)) => {
            if remote > t {
                plain(Action::Insert)
            } else {
                conflict(Conflict::InsertDeleted, false, Action::Insert)
            }
        }
        (Change::Update, Local::Deleted(t)) => {
            conflict(Conflict::UpdateDeleted, remote > t, Action::Insert)
        }
        (Change::Delete, Local::Deleted(t)) => Decision {
            action: Action::Nothing,
            tombstone: remote > t,
            conflict: Some((Conflict::DeleteMissing, Resolution::Skip)),
        },

        // Written earlier in the same remote transaction: just apply.
        (
            c,
            Local::Row {
                same_transaction: true,
                ..
            },
        ) => plain(match c {
            Change::Insert | Change::Update => Action::Update,
            Change::Delete => Action::Delete,
        }),

        // A row with a known or unknown last writer.
        (c, Local::Row { version, .. }) => {
            if version == Some(remote) {
                // The very same change, delivered again: already applied.
                return plain(Action::Nothing);
            }
            let same_node = version.is_some_and(|v| v.node_id == remote.node_id);
            match c {
                Change::Insert => conflict(Conflict::InsertExists, newer(version), Action::Update),
                Change::Update if same_node => plain(if newer(version) {
                    Action::Update
                } else {
                    Action::Nothing
                }),
                Change::Update => conflict(
                    Conflict::UpdateOriginDiffers,
                    newer(version),
                    Action::Update,
                ),
                Change::Delete if same_node => plain(if newer(version) {
                    Action::Delete
                } else {
                    Action::Nothing
                }),
                Change::Delete => conflict(
                    Conflict::DeleteOriginDiffers,
                    newer(version),
                    Action::Delete,
                ),
            }
        }
    }
}

/// For a remote row colliding on a secondary unique index with a different local row
/// (`local`): true if the remote row wins (the local one is deleted to make room).
pub fn unique_key_remote_wins(local: Option<Version>, remote: Version) -> bool {
    local.is_none_or(|v| remote > v)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: i64 = 1;
    const B: i64 = 2;
    fn v(t: i64, n: i64) -> Version {
        Version {
            commit_time: t,
            node_id: n,
        }
    }
    fn row(ver: Option<Version>) -> Local {
        Local::Row {
            version: ver,
            same_transaction: false,
        }
    }

    #[test]
    fn names_are_unique_and_snake_case() {
        let names: Vec<&str> = Conflict::ALL.iter().map(|c| c.name()).collect();
        let mut dedup = names.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), names.len());
        assert!(names
            .iter()
            .all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
    }

    #[test]
    fn version_order_is_time_then_node() {
        assert!(v(2, A) > v(1, B));
        assert!(v(1, B) > v(1, A), "ties go to the higher node id");
        assert_eq!(v(1, A).cmp(&v(1, A)), Ordering::Equal);
    }

    #[test]
    fn no_conflict_without_a_competing_writer() {
        assert_eq!(
            decide(Change::Insert, Local::Missing, v(5, A)),
            plain(Action::Insert)
        );
        let same_txn = Local::Row {
            version: None,
            same_transaction: true,
        };
        assert_eq!(
            decide(Change::Update, same_txn, v(5, A)),
            plain(Action::Update)
        );
        assert_eq!(
            decide(Change::Delete, same_txn, v(5, A)),
            plain(Action::Delete)
        );
        // The last writer is the node the change comes from.
        assert_eq!(
            decide(Change::Update, row(Some(v(4, A))), v(5, A)),
            plain(Action::Update)
        );
        let d = decide(Change::Delete, row(Some(v(4, A))), v(5, A));
        assert_eq!(
            (d.action, d.tombstone, d.conflict),
            (Action::Delete, true, None)
        );
    }

    #[test]
    fn redelivered_change_is_a_silent_no_op() {
        for c in [Change::Insert, Change::Update, Change::Delete] {
            assert_eq!(
                decide(c, row(Some(v(5, B))), v(5, B)),
                plain(Action::Nothing),
                "{c:?}"
            );
        }
    }

    #[test]
    fn every_conflict_type_and_both_winners() {
        let cases = [
            (
                Change::Insert,
                row(Some(v(4, B))),
                Conflict::InsertExists,
                Action::Update,
            ),
            (
                Change::Update,
                row(Some(v(4, B))),
                Conflict::UpdateOriginDiffers,
                Action::Update,
            ),
            (
                Change::Delete,
                row(Some(v(4, B))),
                Conflict::DeleteOriginDiffers,
                Action::Delete,
            ),
            (
                Change::Update,
                Local::Deleted(v(4, B)),
                Conflict::UpdateDeleted,
                Action::Insert,
            ),
        ];
        for (c, local, kind, win) in cases {
            let d = decide(c, local, v(5, A));
            assert_eq!(d.action, win, "{c:?} newer remote");
            assert_eq!(d.conflict, Some((kind, Resolution::ApplyRemote)));
            let d = decide(c, local, v(3, A));
            assert_eq!(d.action, Action::Nothing, "{c:?} older remote");
            assert_eq!(d.conflict, Some((kind, Resolution::KeepLocal)));
            assert!(!d.tombstone);
            // Tie on time: the higher node id wins (B > A).
            let d = decide(c, local, v(4, A));
            assert_eq!(d.conflict, Some((kind, Resolution::KeepLocal)), "{c:?} tie");
        }
        let d = decide(Change::Update, Local::Missing, v(5, A));
        assert_eq!(
            d.conflict,
            Some((Conflict::UpdateMissing, Resolution::ApplyRemote))
        );
        assert_eq!(d.action, Action::Insert);
        let d = decide(Change::Delete, Local::Missing, v(5, A));
        assert_eq!(
            d.conflict,
            Some((Conflict::DeleteMissing, Resolution::Skip))
        );
        assert!(d.tombstone);
        let d = decide(Change::Insert, Local::Deleted(v(6, B)), v(5, A));
        assert_eq!(
            d.conflict,
            Some((Conflict::InsertDeleted, Resolution::KeepLocal))
        );
        assert_eq!(
            decide(Change::Insert, Local::Deleted(v(4, B)), v(5, A)),
            plain(Action::Insert)
        );
    }

    #[test]
    fn unknown_local_version_loses() {
        for c in [Change::Insert, Change::Update, Change::Delete] {
            let d = decide(c, row(None), v(1, A));
            assert_eq!(d.conflict.unwrap().1, Resolution::ApplyRemote, "{c:?}");
        }
        assert!(unique_key_remote_wins(None, v(1, A)));
        assert!(!unique_key_remote_wins(Some(v(2, A)), v(1, B)));
    }

    /// The state of one key on one node: a row with a value and version, or a tombstone.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Cell {
        Empty,
        Row(i64, Version),
        Tomb(Version),
    }

    fn apply(cell: Cell, change: Change, value: i64, ver: Version) -> Cell {
        let local = match cell {
            Cell::Empty => Local::Missing,
            Cell::Tomb(t) => Local::Deleted(t),
            Cell::Row(_, rv) => row(Some(rv)),
        };
        let d = decide(change, local, ver);
        let mut next = match d.action {
            Action::Insert | Action::Update => Cell::Row(value, ver),
            Action::Delete => Cell::Tomb(ver),
            Action::Nothing => cell,
        };
        if d.tombstone {
            if let Cell::Empty | Cell::Tomb(_) = next {
                let t = match next {
                    Cell::Tomb(t) if t > ver => t,
                    _ => ver,
                };
                next = Cell::Tomb(t);
            }
        }
        next
    }

    /// Every permutation of a set of concurrent changes to one key ends in the same state.
    #[test]
    fn outcome_does_not_depend_on_arrival_order() {
        let changes = [
            (Change::Insert, 1, v(10, A)),
            (Change::Update, 2, v(20, B)),
            (Change::Delete, 0, v(15, A)),
            (Change::Update, 3, v(12, 3)),
            (Change::Delete, 0, v(25, B)),
            (Change::Insert, 4, v(30, 3)),
        ];
        // Every subset of the changes, in every order.
        for mask in 1u32..(1 << changes.len()) {
            let set: Vec<_> = (0..changes.len())
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| changes[i])
                .collect();
            let mut outcomes = std::collections::HashSet::new();
            let mut perm: Vec<usize> = (0..set.len()).collect();
            permutations(&mut perm, 0, &mut |p| {
                let mut cell = Cell::Empty;
                for &i in p {
                    let (c, val, ver) = set[i];
                    cell = apply(cell, c, val, ver);
                }
                // A tombstone and no row are the same table contents.
                outcomes.insert(match cell {
                    Cell::Row(val, _) => Some(val),
                    _ => None,
                });
            });
            assert_eq!(outcomes.len(), 1, "changes {set:?} diverge: {outcomes:?}");
        }
    }

    fn permutations(p: &mut Vec<usize>, k: usize, f: &mut impl FnMut(&[usize])) {
        if k == p.len() {
            f(p);
            return;
        }
        for i in k..p.len() {
            p.swap(k, i);
            permutations(p, k + 1, f);
            p.swap(k, i);
        }
    }
}
