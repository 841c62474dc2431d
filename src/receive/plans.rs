//! Receive stage, parallel apply: how the changes of one peer relation are ordered
//! (`bdr_core::parallel::TablePlan`), read from the local table's catalog — its foreign
//! keys (either side), triggers that fire in apply, and unique indexes.
//!
//! Why this way: one catalog query per relation (per RELATION frame, and again after a
//! relcache invalidation), so the receiver's per-change work stays pure hashing.
//! Invariant: anything that makes a table's change order matter beyond its keys, or a
//! key whose values the stream may not carry, makes the plan serial.

use crate::error::{raise, ApplyError};
use crate::pg::xact;
use bdr_core::parallel::TablePlan;
use bdr_core::wire;

/// A peer relation's plan from the local table's catalog (serial when the table is not
/// here, or anything makes its changes' order matter beyond their keys).
pub(super) fn read_plan(r: &wire::Relation) -> (TablePlan, pgrx::pg_sys::Oid) {
    const SQL: &str = "SELECT c.oid::int8, \
        EXISTS (SELECT 1 FROM pg_catalog.pg_constraint f WHERE f.contype = 'f' \
                AND (f.conrelid = c.oid OR f.confrelid = c.oid)) \
        OR EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t WHERE t.tgrelid = c.oid \
                AND NOT t.tgisinternal AND t.tgenabled IN ('A', 'R')) \
        OR EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid \
                AND i.indisunique AND i.indexprs IS NOT NULL), \
        COALESCE((SELECT pg_catalog.json_agg((SELECT pg_catalog.json_agg(a.attname::text ORDER BY k.ord) \
                FROM pg_catalog.unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord) \
                JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum \
                WHERE k.ord <= i.indnkeyatts)) \
            FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisunique \
            AND i.indexprs IS NULL), '[]'::json)::text \
        FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
        WHERE n.nspname = $1 AND c.relname = $2";
    xact::begin();
    let row = pgrx::Spi::connect(|client| {
        let t = client.select(
            SQL,
            Some(1),
            &[r.schema.as_str().into(), r.name.as_str().into()],
        )?;
        let mut out = None;
        for row in t {
            out = Some((
                row.get::<i64>(1)?.unwrap_or(0),
                row.get::<bool>(2)?.unwrap_or(true),
                row.get::<String>(3)?.unwrap_or_default(),
            ));
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .unwrap_or_else(|e| raise(&ApplyError::spi(e)));
    xact::commit();
    let Some((oid, serial, uniques)) = row else {
        return (TablePlan::Serial, pgrx::pg_sys::Oid::INVALID);
    };
    let relid = pgrx::pg_sys::Oid::from(oid as u32);
    let identity = r.key_columns();
    let usable_identity = matches!(
        r.replica_identity,
        wire::ReplicaIdentity::Default | wire::ReplicaIdentity::Index
    ) && !identity.is_empty();
    let uniques: Vec<Vec<String>> = serde_json::from_str(&uniques).unwrap_or_default();
    if serial || (!usable_identity && uniques.is_empty()) {
        return (TablePlan::Serial, relid);
    }
    let mut keys = vec![identity];
    for cols in uniques {
        let pos: Option<Vec<usize>> = cols
            .iter()
            .map(|c| r.columns.iter().position(|rc| &rc.name == c))
            .collect();
        match pos {
            // A unique column the peer does not send: its values are unknown.
            None => return (TablePlan::Serial, relid),
            Some(p) if !keys.contains(&p) => keys.push(p),
            Some(_) => {}
        }
    }
    if !usable_identity {
        // REPLICA IDENTITY FULL with unique indexes here: the old tuple is complete, the
        // "identity" is the whole row.
        keys[0] = (0..r.columns.len()).collect();
    }
    let identity_only = keys.len() == 1;
    (
        TablePlan::Keyed {
            keys,
            identity_only,
        },
        relid,
    )
}
