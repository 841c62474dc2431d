//! Background workers: the launcher (one per server), a supervisor per database that has a
//! bdr node, and an apply worker per peer.
//!
//! ```text
//! launcher ──starts──> supervisor(db) ──starts/restarts with backoff──> apply(db, peer)
//!                                                      (bdr.writers_per_peer > 1) ──starts──> writer × K
//!                                                      (a streamed transaction) ──starts──> stream writer
//! ```
//!
//! With parallel apply the apply worker starts its writers itself (they are its
//! children: it is told when one exits) and stops them on every way out.
//!
//! The launcher only lists databases (it connects to none) and makes sure each has a
//! supervisor; a supervisor finding no bdr node in its database exits. Supervisors follow
//! `bdr.nodes` every second: a worker per peer, stopped when the peer leaves, restarted with
//! exponential backoff (1 s doubling to 30 s) when it fails.

pub mod apply;
pub mod launcher;
pub mod stream_writer;
pub mod supervisor;
pub mod writer;

/// The settings of every process that applies a peer's changes (apply worker, parallel
/// writer, stream writer):
/// - replicated rows fire only ENABLE REPLICA / ALWAYS triggers (`session_replication_role
///   = replica`);
/// - commits are asynchronous (durability comes from flush feedback, not from waiting for
///   each commit);
/// - `deadlock_timeout` is a fifth of the server's (at most 200 ms): in a deadlock between
///   applied changes and local transactions, the process that checks first is the one
///   PostgreSQL rolls back, so it is the apply side (which retries, or falls back for a
///   streamed transaction) rather than the application's transaction;
/// - column values, which travel as text, are read in the form the peer sends them
///   (`bdr_core::dsn::PEER_TEXT_SETTINGS`), whatever this server's own `DateStyle`,
///   `IntervalStyle`, `xmloption` or `lc_monetary` say. Set as a session's `SET` would, so
///   a replicated statement can run under its origin's values for its own duration.
pub(crate) fn applying_settings() {
    use crate::pg::xact::{set_config, set_session_config};
    for (name, value) in [
        ("DateStyle", "ISO"),
        ("IntervalStyle", "postgres"),
        ("xmloption", "content"),
        ("lc_monetary", "C"),
    ] {
        set_session_config(name, value);
    }
    set_config("session_replication_role", "replica");
    set_config("synchronous_commit", "off");
    let server = crate::pg::xact::deadlock_timeout_ms();
    set_config(
        "deadlock_timeout",
        &format!("{}ms", (server / 5).clamp(1, 200)),
    );
}

/// A stream writer checks for deadlocks before every other applying process (half their
/// `deadlock_timeout`, at most 100 ms): in a cycle between the streamed transaction and
/// an ordinary applied one (the receiver's, or a parallel writer's), PostgreSQL then
/// rolls back the streamed one, which falls back to the whole-transaction path, rather
/// than the ordinary one, whose failure would restart the peer's apply.
pub(crate) fn stream_writer_settings() {
    let server = crate::pg::xact::deadlock_timeout_ms();
    crate::pg::xact::set_config(
        "deadlock_timeout",
        &format!("{}ms", (server / 10).clamp(1, 100)),
    );
}
