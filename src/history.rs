//! History stage: one `bdr.conflict_history` row per conflict, written by SPI in the
//! transaction that applied the remote change (so it exists exactly when the resolution
//! took effect).

use bdr_core::conflict::{Conflict, Resolution};
use bdr_core::wire::{self, Value};
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

/// A change that could not be applied: the error as raised, and what was being applied.
pub struct ApplyFailure<'a> {
    /// "schema.name" of the table the change was for.
    pub relation: &'a str,
    pub message: &'a str,
    pub sqlstate: pgrx::PgSqlErrorCode,
    pub detail: Option<&'a str>,
    pub hint: Option<&'a str>,
    /// The CONTEXT line: action, relation, remote transaction and LSN.
    pub context: &'a str,
}

impl ApplyFailure<'_> {
    /// The history row's `detail`: message, SQLSTATE, the error's own detail and hint,
    /// then the context.
    fn text(&self) -> String {
        let mut t = format!(
            "{} [SQLSTATE {}]",
            self.message,
            sqlstate_text(self.sqlstate)
        );
        if let Some(d) = self.detail {
            t.push_str(&format!(" DETAIL: {d}"));
        }
        if let Some(h) = self.hint {
            t.push_str(&format!(" HINT: {h}"));
        }
        t.push_str(&format!(" ({})", self.context));
        t
    }
}

/// The five-character SQLSTATE of an error code.
fn sqlstate_text(code: pgrx::PgSqlErrorCode) -> String {
    let mut n = code as i32;
    (0..5)
        .map(|_| {
            let c = (((n & 0x3f) as u8) + b'0') as char;
            n >>= 6;
            c
        })
        .collect()
}

/// Record that applying a change from `remote_node` failed (the worker stops and retries
/// it), in a transaction of its own: the failed one is rolled back.
pub fn record_apply_error(local_node: &str, remote_node: &str, failed: &ApplyFailure<'_>) {
    if !crate::gucs::LOG_CONFLICTS_TO_TABLE.get() {
        return;
    }
    Spi::run_with_args(
        "INSERT INTO bdr.conflict_history (local_node, remote_node, relation, conflict_type, \
           conflict_resolution, detail) VALUES ($1, $2, $3, 'apply_error', 'retry', $4)",
        &[
            local_node.into(),
            remote_node.into(),
            failed.relation.into(),
            failed.text().into(),
        ],
    )
    .unwrap_or_else(|err| crate::error::raise(&crate::error::ApplyError::Spi(err.to_string())));
}

/// A peer's row as a JSON object of column name to text (the `remote_tuple` column).
pub fn row_json(rel: &wire::Relation, values: &[Value]) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (c, v) in rel.columns.iter().zip(values) {
        m.insert(
            c.name.clone(),
            match v {
                Value::Null => serde_json::Value::Null,
                Value::UnchangedToast => serde_json::Value::String("(unchanged toast)".into()),
                Value::Text(t) => serde_json::Value::String(t.clone()),
            },
        );
    }
    serde_json::Value::Object(m)
}
