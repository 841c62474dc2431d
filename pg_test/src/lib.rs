//! Multi-node test harness: real PostgreSQL postmasters on 127.0.0.1, created with
//! `initdb` and run with `pg_ctl`, by default with the bdr extension preloaded.
//!
//! Why this way: replication is about processes, WAL, crashes and commit order. Mocks
//! would test our assumptions instead of PostgreSQL's behaviour, so every multi-node test
//! runs real servers, kills them for real (`SIGKILL` of the postmaster) and waits with
//! bounded polls.
//!
//! Layout: [`cluster`] (builder, default configuration, clean-up), [`node`] (one server:
//! lifecycle, SQL helpers, log), [`wait`] (bounded polls), [`sys`] (binaries, OS user,
//! ports, processes), [`bdr`] (group formation and catch-up helpers for scenarios),
//! [`proxy`] (a fault-injecting TCP proxy between nodes: cut, hang, delay, throttle) and
//! [`fake_peer`] (a scripted peer that sends a node's apply worker arbitrary stream bytes).
//!
//! Invariants:
//! - Every wait is bounded ([`wait_until`]); a timeout fails the test with what was awaited.
//! - A cluster's scratch directory is removed when its test passes and kept (with each
//!   node's log tail printed) when it fails, or always with `BDR_TEST_KEEP=1`.
//! - Servers never run as root: as root, the harness runs them as the `postgres` OS user.
//!
//! Environment: `PG_CONFIG` (default `/usr/lib/postgresql/15/bin/pg_config`),
//! `BDR_TEST_DIR` (default `/tmp/bdr_pgtest`), `BDR_TEST_KEEP=1`.

pub mod bdr;
pub mod cluster;
pub mod fake_peer;
pub mod node;
pub mod proxy;
pub mod rng;
pub mod sys;
pub mod wait;

pub use postgres;

pub use cluster::{Cluster, ClusterBuilder, DEFAULT_DB, DEFAULT_TEST_DIR, FAKETIME_LIB};
pub use node::{db_error_text, Node, CONNECT_TIMEOUT};
pub use proxy::{Fault, Proxy};
pub use rng::Rng;
pub use sys::{
    claim_port, free_port, has_output_plugin_libraries, is_root, is_zombie, pg_bindir, pg_command,
    pg_config, port_is_free, rss_anon_kb,
};
pub use wait::{try_wait_until, wait_until, POLL_INTERVAL};
