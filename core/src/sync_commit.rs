//! Synchronous commit to peers: the pure rules (the wait itself is in the extension,
//! `src/sync_commit.rs`).
//!
//! A transaction committed with `bdr.synchronous_commit_peers = N` returns only once N
//! peers have it durably: each peer's apply worker reports, per replication slot, the
//! origin position up to which it has applied *and flushed* (the slot's
//! `confirmed_flush`). A peer has the transaction when that position reaches the end of
//! its commit record.
//!
//! Invariant: a peer counts only through its own slot's confirmation, never through a
//! guess (a slot that is behind, or a node without a slot, confirms nothing).

/// Slots of one database on the origin are named `bdr_<dboid>_<subscriber>`: the peer a
/// slot feeds, or `None` for a slot that is not bdr's.
pub fn peer_of_slot<'a>(slot: &'a str, prefix: &str) -> Option<&'a str> {
    slot.strip_prefix(prefix).filter(|s| !s.is_empty())
}

/// Where a wait stands: which peers confirmed `commit_end` and which did not yet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tally {
    pub confirmed: Vec<String>,
    pub missing: Vec<String>,
}

impl Tally {
    /// Count the peers whose slot (`(peer, confirmed_flush)`) passed `commit_end`.
    pub fn of(slots: &[(String, u64)], commit_end: u64) -> Tally {
        let mut t = Tally::default();
        for (peer, flush) in slots {
            if *flush >= commit_end {
                t.confirmed.push(peer.clone());
            } else {
                t.missing.push(peer.clone());
            }
        }
        t.confirmed.sort();
        t.missing.sort();
        t
    }

    /// Enough peers confirmed for `wanted`.
    pub fn enough(&self, wanted: usize) -> bool {
        self.confirmed.len() >= wanted
    }
}

/// How the last synchronous commit of a session ended (`bdr.last_synchronous_commit()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Outcome {
    /// The session did not ask for it, or the transaction wrote nothing.
    #[default]
    NotRequested,
    /// Enough peers confirmed.
    Confirmed,
    /// The timeout expired first: committed here, not confirmed on enough peers.
    TimedOut,
    /// The wait was cancelled (statement cancel) or the session terminated.
    Canceled,
    /// This node has fewer peers than wanted (not in a group, or a smaller group): no
    /// wait at all.
    TooFewPeers,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::NotRequested => "not_requested",
            Outcome::Confirmed => "confirmed",
            Outcome::TimedOut => "timed_out",
            Outcome::Canceled => "canceled",
            Outcome::TooFewPeers => "too_few_peers",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[(&str, u64)]) -> Vec<(String, u64)> {
        v.iter().map(|(n, l)| (n.to_string(), *l)).collect()
    }

    #[test]
    fn a_peer_counts_once_its_slot_reaches_the_commit_end() {
        let t = Tally::of(&s(&[("node3", 99), ("node2", 100), ("node4", 250)]), 100);
        assert_eq!(t.confirmed, vec!["node2", "node4"]);
        assert_eq!(t.missing, vec!["node3"]);
        assert!(t.enough(2));
        assert!(!t.enough(3));
    }

    #[test]
    fn no_slots_confirm_nothing() {
        let t = Tally::of(&[], 1);
        assert!(!t.enough(1));
        assert!(t.enough(0));
    }

    #[test]
    fn slot_names_map_to_peers() {
        assert_eq!(peer_of_slot("bdr_16384_node2", "bdr_16384_"), Some("node2"));
        assert_eq!(peer_of_slot("bdr_16385_node2", "bdr_16384_"), None);
        assert_eq!(peer_of_slot("bdr_16384_", "bdr_16384_"), None);
        assert_eq!(peer_of_slot("other", "bdr_16384_"), None);
    }
}
