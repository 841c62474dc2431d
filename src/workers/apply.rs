//! The apply worker: streams one peer's changes into this database.

use crate::catalog::nodes;
use crate::pg::{bgw, shmem, xact};
use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

crate::pg::bgw::worker_entry!(bdr_apply_main => main);

/// The worker's body, started by PostgreSQL at `bdr_apply_main`.
pub fn main(arg: pg_sys::Datum) {
    let dboid = bgw::connect_to_arg_database(arg);
    let peer_name = BackgroundWorker::get_extra().to_string();
    let Some(slot) = shmem::find(shmem::Kind::Apply, dboid, &peer_name) else {
        pgrx::warning!("bdr: apply worker for \"{peer_name}\" has no slot; exiting");
        return;
    };
    shmem::update(slot, |s| {
        s.pid = std::process::id() as i32;
        s.state = shmem::State::Starting;
        s.started_at = xact::now();
    });
    super::applying_settings();
    xact::begin();
    let (local, peer) = (nodes::local(), nodes::by_name(&peer_name));
    xact::commit();
    let (Some(local), Some(peer)) = (local, peer) else {
        pgrx::log!("bdr: node \"{peer_name}\" or the local node is gone; apply worker exits");
        return;
    };
    xact::install_error_context();
    crate::pg::relcache::watch();
    crate::pg::utility::set_applying();
    PgTryBuilder::new(|| crate::receive::run(slot, dboid, &local, &peer))
        .catch_others(|e| {
            record_failure(slot, &local.name, &peer.name, &e);
            // Parallel apply: no writer of this group may outlive it.
            crate::receive::parallel::shutdown();
            crate::receive::direct::shutdown();
            e.rethrow()
        })
        .execute();
    crate::receive::parallel::shutdown();
    crate::receive::direct::shutdown();
    shmem::update(slot, |s| s.state = shmem::State::Stopped);
}

/// The error path of an apply worker or a parallel-apply writer: show the error in the
/// worker's shared-memory slot, roll back, and record a failed change as an
/// `apply_error` in `bdr.conflict_history` (best effort, in a transaction of its own).
pub fn record_failure(slot: usize, local: &str, peer: &str, e: &CaughtError) {
    let report = crate::error::caught_report(e);
    let (msg, code) = (report.message().to_string(), report.sql_error_code());
    shmem::update(slot, |s| {
        s.state = shmem::State::Erroring;
        s.set_error(&msg, xact::now());
    });
    crate::receive::publish_pending(slot);
    // Record it as an apply_error conflict, in a transaction of its own (the failed one
    // is rolled back first). Best effort: the error is re-raised and logged either way.
    let context = xact::current_context();
    xact::abort();
    // A parallel-apply writer stamps changes with the origin without holding its
    // session; a commit under it now would need the session.
    xact::clear_origin();
    // Only a change that could not be applied is an apply_error; a lost connection or
    // a protocol problem (SQLSTATE class 08) is not about any row, and a serialization
    // failure or deadlock between two apply workers is a race that the retry resolves
    // (logged, not a conflict).
    let not_about_a_row = matches!(
        code,
        PgSqlErrorCode::ERRCODE_PROTOCOL_VIOLATION
            | PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE
            | PgSqlErrorCode::ERRCODE_CONNECTION_EXCEPTION
            | PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE
            | PgSqlErrorCode::ERRCODE_T_R_DEADLOCK_DETECTED
    );
    // A change to a row: the context names its relation.
    let relation = context.as_ref().and_then(|c| c.relation.clone());
    if let (false, Some(relation)) = (not_about_a_row, relation) {
        let failed = crate::history::ApplyFailure {
            relation: &relation,
            message: &msg,
            sqlstate: code,
            detail: report.detail(),
            hint: report.hint(),
            context: &context.as_ref().map(|c| c.to_string()).unwrap_or_default(),
        };
        PgTryBuilder::new(|| {
            xact::begin();
            crate::history::record_apply_error(local, peer, &failed);
            xact::commit();
        })
        .catch_others(|_| {
            pgrx::log!("bdr: could not record the apply error in bdr.conflict_history");
            xact::abort();
        })
        .execute();
    }
}
