//! What a node is (`bdr.nodes.node_kind`) and where it stands (`node_state`), as types:
//! the catalog's text, parsed once where it is read, so no code compares bare strings.
//!
//! Invariant: [`NodeKind::as_str`] and [`NodeState::as_str`] are exactly the values the
//! catalog's CHECK constraints allow (`sql/catalog.sql`), and `parse` accepts only them.

use std::fmt;

/// `node_kind`: what a node does in the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeKind {
    /// Holds data, applies every member's changes and sends its own.
    Active,
    /// Holds data and receives, read-only for users until promoted; feeds nobody.
    Standby,
    /// Holds no data and has no slots or workers: it only votes for quorum.
    Witness,
}

/// `node_state`: where a node stands in its life in the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeState {
    /// Registered by a join in progress.
    Joining,
    /// A full member.
    Active,
    /// Joined as a standby (see [`NodeKind::Standby`]).
    Standby,
    /// Left the group; its row stays so its node number is never reused.
    Parted,
}

impl NodeKind {
    pub const ALL: [NodeKind; 3] = [NodeKind::Active, NodeKind::Standby, NodeKind::Witness];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeKind::Active => "active",
            NodeKind::Standby => "standby",
            NodeKind::Witness => "witness",
        }
    }

    pub fn parse(s: &str) -> Option<NodeKind> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl NodeState {
    pub const ALL: [NodeState; 4] = [
        NodeState::Joining,
        NodeState::Active,
        NodeState::Standby,
        NodeState::Parted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Joining => "joining",
            NodeState::Active => "active",
            NodeState::Standby => "standby",
            NodeState::Parted => "parted",
        }
    }

    pub fn parse(s: &str) -> Option<NodeState> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The state a node of `kind` has once it joined.
    pub fn joined(kind: NodeKind) -> NodeState {
        match kind {
            NodeKind::Standby => NodeState::Standby,
            _ => NodeState::Active,
        }
    }
}

impl fmt::Display for NodeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_forms_round_trip() {
        for k in NodeKind::ALL {
            assert_eq!(NodeKind::parse(k.as_str()), Some(k));
        }
        for s in NodeState::ALL {
            assert_eq!(NodeState::parse(&s.to_string()), Some(s));
        }
        assert_eq!(NodeKind::parse("Active"), None);
        assert_eq!(NodeState::parse("catching_up"), None);
        assert_eq!(NodeState::joined(NodeKind::Standby), NodeState::Standby);
        assert_eq!(NodeState::joined(NodeKind::Witness), NodeState::Active);
    }

    #[test]
    fn the_catalog_check_lists_exactly_these_values() {
        let sql = include_str!("../../sql/catalog.sql");
        let kinds: Vec<String> = NodeKind::ALL.iter().map(|k| format!("'{k}'")).collect();
        assert!(
            sql.contains(&format!("node_kind IN ({})", kinds.join(", "))),
            "node_kind CHECK"
        );
        let states: Vec<String> = NodeState::ALL.iter().map(|s| format!("'{s}'")).collect();
        assert!(
            sql.contains(&format!("node_state IN ({})", states.join(", "))),
            "node_state CHECK"
        );
    }
}
