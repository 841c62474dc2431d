//! Conflict policy: the closed set of conflict types and how each is resolved.
//!
//! Pure Rust, tested without a server. The apply stage classifies what it found (the row
//! already exists, or is missing) and asks here what to do.
//!
//! Today's policy is the one the apply stage needs for exactly-once delivery without
//! concurrent writers on the same rows: an INSERT whose row exists is applied as an UPDATE
//! (so a re-delivered transaction converges), and an UPDATE or DELETE whose row is missing
//! is skipped — and recorded. Last-update-wins on (commit timestamp, node) with tombstones
//! for deletes replaces this (see the conflicts issue); until then concurrent writers to the
//! same row on two nodes can diverge (docs/limitations.md).

/// Every kind of conflict, with its name in `bdr.conflict_history.conflict_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Conflict {
    InsertExists,
    UpdateMissing,
    DeleteMissing,
}

/// What was done about a conflict (`bdr.conflict_history.conflict_resolution`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resolution {
    ApplyRemote,
    KeepLocal,
    Skip,
}

impl Conflict {
    pub const ALL: [Conflict; 3] = [
        Conflict::InsertExists,
        Conflict::UpdateMissing,
        Conflict::DeleteMissing,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Conflict::InsertExists => "insert_exists",
            Conflict::UpdateMissing => "update_missing",
            Conflict::DeleteMissing => "delete_missing",
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

/// How a conflict is resolved.
pub fn resolve(c: Conflict) -> Resolution {
    match c {
        Conflict::InsertExists => Resolution::ApplyRemote,
        Conflict::UpdateMissing | Conflict::DeleteMissing => Resolution::Skip,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn redelivered_insert_converges_and_missing_rows_are_skipped() {
        assert_eq!(resolve(Conflict::InsertExists), Resolution::ApplyRemote);
        assert_eq!(resolve(Conflict::UpdateMissing), Resolution::Skip);
        assert_eq!(resolve(Conflict::DeleteMissing), Resolution::Skip);
    }
}
