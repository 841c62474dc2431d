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
