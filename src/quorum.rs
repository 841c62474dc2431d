//! Split-brain prevention by a minimum node count (`bdr.minimum_nodes`): a node that cannot
//! reach enough voting members refuses new user writes until it can again.
//!
//! Voting members are the active and witness nodes of the group (standbys do not vote);
//! this node counts itself. The supervisor (`workers::supervisor`) probes every voting
//! peer every 2 s with a fresh connection, all peers at once (bounded by a 2 s
//! `connect_timeout` unless the peer's DSN sets one, so hung peers count as unreachable
//! after that one wait, not as a hang each); a peer also counts as reached while its apply
//! stream delivered something in the last 6 s. The verdict lives in shared memory, and
//! the write paths (`ExecutorStart` for INSERT/UPDATE/DELETE/MERGE, and COPY FROM,
//! TRUNCATE and replicated DDL) check it: one shared-memory read per write statement.
//!
//! Invariants: reads and apply workers are never refused (a fenced minority still
//! receives what the majority writes, and converges when the partition heals); with
//! `bdr.minimum_nodes = 0` (the default) nothing is checked at all.

use crate::catalog::nodes::{self, NodeKind, NodeState};
use crate::error::{raise, QuorumError};
use crate::pg::{libpq, shmem, utility, xact};
use bdr_core::dsn;

/// How long a reached peer counts as reachable (µs).
pub const SEEN_WINDOW_US: i64 = 6_000_000;

/// Whether `n` votes.
pub fn votes(n: &nodes::Node) -> bool {
    n.state == NodeState::Active && matches!(n.kind, NodeKind::Active | NodeKind::Witness)
}

/// Probe every voting peer (the supervisor, every 2 s) and store the verdict.
pub fn evaluate(dboid: u32, all: &[nodes::Node]) {
    let now = xact::now();
    let required = crate::gucs::MINIMUM_NODES.get().max(0) as u32;
    // Witnesses are probed always (nothing else tells whether one is up); the other
    // voters only when a minimum is set.
    let probed: Vec<&nodes::Node> = all
        .iter()
        .filter(|n| !n.is_local && votes(n) && (required > 0 || n.kind == NodeKind::Witness))
        .collect();
    let dsns: Vec<String> = probed
        .iter()
        .map(|n| dsn::with_default(&n.dsn, "connect_timeout", "2"))
        .collect();
    // All at once: unreachable peers cost one connect_timeout together, not one each.
    for (n, c) in probed
        .iter()
        .zip(libpq::connect_many(&dsns, "bdr_quorum_probe"))
    {
        // A connection made is the server's answer (it sent ReadyForQuery).
        if c.is_ok() {
            shmem::set_seen(dboid, &n.name, xact::now());
        }
    }
    if required == 0 {
        shmem::set_quorum(dboid, None);
        return;
    }
    let streams: Vec<(String, i64)> = shmem::apply_slots(dboid)
        .into_iter()
        .map(|s| (s.peer(), s.last_contact_time))
        .collect();
    let reached = |n: &nodes::Node| {
        let probe = shmem::seen_at(dboid, &n.name);
        let stream = streams
            .iter()
            .find(|(p, _)| *p == n.name)
            .map(|(_, t)| *t)
            .unwrap_or(0);
        now - probe.max(stream) <= SEEN_WINDOW_US
    };
    let me_votes = all.iter().any(|n| n.is_local && votes(n));
    let mut seen = u32::from(me_votes);
    let mut missing = Vec::new();
    for n in all.iter().filter(|n| !n.is_local && votes(n)) {
        if reached(n) {
            seen += 1;
        } else {
            missing.push(n.name.clone());
        }
    }
    shmem::set_quorum(
        dboid,
        Some((required, seen, seen >= required, &missing.join(", "), now)),
    );
}

/// Whether this database requires a quorum for user writes (`bdr.minimum_nodes`), one
/// setting's read.
pub fn required() -> bool {
    crate::gucs::MINIMUM_NODES.get() > 0
}

/// Why a user write must be refused now: this node does not see `bdr.minimum_nodes`
/// voting members (never for an apply worker; nothing is read while the minimum is 0).
pub fn refusal() -> Option<QuorumError> {
    if !required() || utility::applying() {
        return None;
    }
    shmem::quorum(nodes::my_database_oid())
        .filter(|q| !q.ok)
        .map(|q| QuorumError::NotEnough {
            seen: q.seen,
            required: q.required,
            missing: q.missing(),
        })
}

/// Refuse a user write when this node does not see `bdr.minimum_nodes` voting members.
pub fn refuse_writes_without_quorum() {
    if let Some(e) = refusal() {
        raise(&e);
    }
}
