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
    pub remote_commit_time: i64,
    pub remote_lsn: u64,
    pub remote_xid: u32,
    pub remote_tuple: serde_json::Value,
}

pub fn record(e: &Entry<'_>) {
    let ts = e.remote_commit_time as f64 / 1_000_000.0 + 946_684_800.0;
    Spi::run_with_args(
        "INSERT INTO bdr.conflict_history (local_node, remote_node, relation, conflict_type, \
           conflict_resolution, remote_commit_time, remote_lsn, remote_xid, remote_tuple) \
         VALUES ($1, $2, $3, $4, $5, to_timestamp($6), $7::text::pg_lsn, $8::text::xid, $9::jsonb)",
        &[
            e.local_node.into(),
            e.remote_node.into(),
            e.relation.into(),
            e.conflict.name().into(),
            e.resolution.name().into(),
            ts.into(),
            bdr_core::wire::format_lsn(e.remote_lsn).into(),
            e.remote_xid.to_string().into(),
            e.remote_tuple.to_string().into(),
        ],
    )
    .unwrap_or_else(|err| crate::error::raise(&crate::error::ApplyError::Spi(err.to_string())));
}
