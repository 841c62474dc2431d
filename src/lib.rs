//! bdr: multi-master logical replication for PostgreSQL, as one shared library.
//!
//! The library plays two roles:
//! - a **logical decoding output plugin** (`_PG_output_plugin_init`, see [`pg::decoding`]
//!   and [`decode`]) that turns a node's committed changes into framed messages
//!   ([`bdr_core::wire`]);
//! - an **extension** loaded through `shared_preload_libraries` ([`_PG_init`]) that
//!   registers its settings, checks the server is configured for replication and offers
//!   the SQL API in schema `bdr`.
//!
//! Invariants kept here: the library refuses to load outside `shared_preload_libraries`
//! (a late load could not register workers or settings safely), and nothing starts
//! replicating on a server whose `wal_level` or `track_commit_timestamp` cannot support it.
//!
//! Raw PostgreSQL calls live in [`pg`] only, behind safe functions: the compiler keeps it
//! so (`[lints.rust]` in Cargo.toml denies them crate-wide; `pg/mod.rs` alone allows them).

use pgrx::prelude::*;

// Named in `extension_sql_file!(... requires = [...])` below (used only when pgrx
// generates the schema, hence the allow).
#[allow(unused_imports)]
use api::group::group_create;
#[allow(unused_imports)]
use api::join::group_join;
#[allow(unused_imports)]
use api::lifecycle::promote;
#[allow(unused_imports)]
use api::monitor::{apply_lag, apply_stats, apply_stats_reset, peers_reached, quorum};
#[allow(unused_imports)]
use api::version;
#[allow(unused_imports)]
use api::workers::{apply_workers, conflict_counters};
#[allow(unused_imports)]
use ddl::replicate_ddl_command;

pub mod api;
pub mod apply;
pub mod catalog;
pub mod conflict;
pub mod ddl;
pub mod decode;
pub mod error;
pub mod gucs;
pub mod history;
pub mod pg;
pub mod quorum;
pub mod receive;
pub mod sequence;
pub mod sync_commit;
pub mod workers;
pub mod write;

::pgrx::pg_module_magic!(name, version);

// The catalog comes first (tables the functions refer to), the grants last.
pgrx::extension_sql_file!("../sql/catalog.sql", name = "catalog", bootstrap);
pgrx::extension_sql_file!(
    "../sql/monitoring.sql",
    name = "monitoring",
    requires = [
        "catalog",
        apply_workers,
        conflict_counters,
        group_create,
        group_join,
        promote,
        apply_lag,
        apply_stats,
        apply_stats_reset,
        quorum,
        peers_reached,
        version,
        replicate_ddl_command
    ]
);
pgrx::extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

/// Called by PostgreSQL when the library is loaded.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    if !pg::preload_in_progress() {
        error::raise(&error::ConfigError::NotPreloaded);
    }
    // A user-facing error is one line, a DETAIL and a HINT: never a Rust backtrace. pgrx
    // attaches one to an error's DETAIL whenever backtraces are enabled in the
    // environment (RUST_BACKTRACE=1 in the shell that started the server, say); this
    // turns library backtraces off for the postmaster and every process it forks.
    std::env::set_var("RUST_LIB_BACKTRACE", "0");
    gucs::init();
    pg::shmem::init();
    pg::utility::install(ddl::hooks());
    sync_commit::install();
    match error::check_server_config() {
        Ok(()) => workers::launcher::register(),
        // The server must still start (a DBA fixes the setting and restarts), but
        // nothing replicates: every replication entry point raises this same error.
        Err(e) => error::warn(&e),
    }
}

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'bdr'",
            "wal_level = logical",
            "track_commit_timestamp = on",
        ]
    }
}
