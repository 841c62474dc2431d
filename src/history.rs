//! History stage: one `bdr.conflict_history` row per conflict, written by SPI in the
//! transaction that applied the remote change (so it exists exactly when the resolution
//! took effect).

use crate::conflict::{Conflict, Resolution};
use pgrx::prelude::*;

pub struct Entry<'a> {
    pub local_node: &'a str,
    pub remote_node: &'a str,
    pub relation: &'a str,
    pub conflict: Conflict,
    pub resolution: Resolution,
    /// PostgreSQL-epoch microseconds.
    pub local_commit_time: Option<i64>,
    pub remote_commit_time: i64,
    pub remote_lsn: u64,
    pub remote_xid: u32,
    pub key: Option<String>,
    pub local_tuple: Option<String>,
    pub remote_tuple: serde_json::Value,
}

fn to_unix(t: i64) -> f64 {
    t as f64 / 1_000_000.0 + 946_684_800.0
}

pub fn record(e: &Entry<'_>) {
    Spi::run_with_args(
        "INSERT INTO bdr.conflict_history (local_node, remote_node, relation, conflict_type, \
           conflict_resolution, remote_commit_time, remote_lsn, remote_xid, remote_tuple, \
           local_commit_time, key, local_tuple) \
         VALUES ($1, $2, $3, $4, $5, to_timestamp($6), $7::text::pg_lsn, $8::text::xid, $9::jsonb, \
           to_timestamp($10), $11::jsonb, $12::jsonb)",
        &[
            e.local_node.into(),
            e.remote_node.into(),
            e.relation.into(),
            e.conflict.name().into(),
            e.resolution.name().into(),
            to_unix(e.remote_commit_time).into(),
            bdr_core::wire::format_lsn(e.remote_lsn).into(),
            e.remote_xid.to_string().into(),
            e.remote_tuple.to_string().into(),
            e.local_commit_time.map(to_unix).into(),
            e.key.clone().into(),
            e.local_tuple.clone().into(),
        ],
    )
    .unwrap_or_else(|err| crate::error::raise(&crate::error::ApplyError::Spi(err.to_string())));
}

/// Record that applying a change from `remote_node` failed (the worker stops and retries
/// it), in a transaction of its own: the failed one is rolled back. `context` says what was
/// being applied (relation, action, remote transaction and LSN).
pub fn record_apply_error(local_node: &str, remote_node: &str, message: &str, context: &str) {
    if !crate::gucs::LOG_CONFLICTS_TO_TABLE.get() {
        return;
    }
    let relation = context
        .split(" on relation ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap_or("");
    Spi::run_with_args(
        "INSERT INTO bdr.conflict_history (local_node, remote_node, relation, conflict_type, \
           conflict_resolution, detail) VALUES ($1, $2, $3, 'apply_error', 'retry', $4)",
        &[
            local_node.into(),
            remote_node.into(),
            relation.into(),
            format!("{message} ({context})").into(),
        ],
    )
    .unwrap_or_else(|err| crate::error::raise(&crate::error::ApplyError::Spi(err.to_string())));
}
