//! The launcher: a static background worker that gives every database a supervisor.
//!
//! It connects to no database, so it cannot see which have bdr: every 10 s it starts a
//! supervisor for each database that has none running, and a supervisor it started leaves
//! at once where the extension is absent. A supervisor that failed releases its slot when
//! its process exits, so the next round starts it again.

use crate::pg::{bgw, shmem, xact};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use std::time::Duration;

/// Register the launcher; called from `_PG_init`.
pub fn register() {
    BackgroundWorkerBuilder::new("bdr launcher")
        .set_type("bdr launcher")
        .set_library("bdr")
        .set_function("bdr_launcher_main")
        .enable_shmem_access(None)
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

/// The `extra` of a supervisor started by the launcher's round of every database: it
/// leaves at once when its database does not have the extension (so that `DROP DATABASE`
/// and `CREATE DATABASE ... TEMPLATE` of databases without bdr never find it there).
pub const FROM_LAUNCHER: &str = "launcher";

/// Make sure database `dboid` has a supervisor (asked for by bdr's own functions, e.g.
/// `group_create`, `group_join`); true if one was started now.
pub fn ensure_supervisor(dboid: u32) -> bool {
    start_supervisor(dboid, "")
}

fn start_supervisor(dboid: u32, extra: &str) -> bool {
    let Some(slot) = shmem::claim(shmem::Kind::Supervisor, dboid, "", xact::now()) else {
        return false;
    };
    let started = bgw::start_worker(
        &format!("bdr supervisor {dboid}"),
        "bdr_supervisor_main",
        dboid,
        extra,
    );
    if started.is_none() {
        shmem::release(slot);
        pgrx::warning!(
            "bdr: could not start a supervisor for database {dboid}: no background worker slot free"
        );
    }
    started.is_some()
}

crate::pg::bgw::worker_entry!(bdr_launcher_main => main);

/// The worker's body, started by PostgreSQL at `bdr_launcher_main`.
pub fn main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(None, None);
    if crate::error::check_server_config().is_err() {
        // _PG_init already logged why; nothing to launch.
        return;
    }
    loop {
        for (dboid, _name) in bgw::list_databases() {
            start_supervisor(dboid, FROM_LAUNCHER);
        }
        if bgw::wait(None, Duration::from_secs(10)) {
            return;
        }
    }
}
