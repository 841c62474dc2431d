//! `bdr.tombstones`: keys deleted recently, with the delete's version carried by the
//! tombstone row's own xmin (commit timestamp and origin of the deleting transaction).
//!
//! Written by the apply worker for remote deletes, and by the `bdr_tombstone` trigger for
//! local ones (ordinary triggers do not fire in the apply worker). Removed by the
//! supervisor once every peer has sent us transactions committed after them.

use crate::error::{ApplyError, OrRaise};
use bdr_core::replication::REPLICATED_TABLES_SQL;
use pgrx::prelude::*;

/// The xmin of the tombstone for (`relid`, `key`), if any, share-locked until the
/// transaction ends (so nobody replaces it while we act on it). A tombstone another
/// transaction is writing is waited for, not missed.
pub fn lookup(relid: pg_sys::Oid, key: &str) -> Option<pg_sys::TransactionId> {
    let table = crate::pg::tables::find_table("bdr", "tombstones")?;
    crate::pg::exec::lock_by_oid_and_text(table, relid, key)
}

/// Whether any tombstone exists for `relid`.
pub fn any(relid: pg_sys::Oid) -> bool {
    Spi::connect_mut(|c| {
        let rows = c.update(
            "SELECT 1 FROM bdr.tombstones WHERE relid = $1 LIMIT 1",
            Some(1),
            &[relid.into()],
        )?;
        Ok::<_, pgrx::spi::Error>(!rows.is_empty())
    })
    .or_raise_as(ApplyError::spi)
}

/// Create or refresh the tombstone (its version becomes the current transaction's).
pub fn upsert(relid: pg_sys::Oid, key: &str) {
    note_writer();
    Spi::run_with_args(
        "INSERT INTO bdr.tombstones (relid, key) VALUES ($1, $2) \
         ON CONFLICT (relid, key) DO UPDATE SET key = EXCLUDED.key",
        &[relid.into(), key.into()],
    )
    .or_raise_as(ApplyError::spi);
}

/// Create the tombstone only if there is none; false if one exists (another transaction
/// wrote it since we looked).
pub fn insert_new(relid: pg_sys::Oid, key: &str) -> bool {
    note_writer();
    Spi::connect_mut(|c| {
        let rows = c.update(
            "INSERT INTO bdr.tombstones (relid, key) VALUES ($1, $2) \
             ON CONFLICT (relid, key) DO NOTHING RETURNING 1",
            None,
            &[relid.into(), key.into()],
        )?;
        Ok::<_, pgrx::spi::Error>(!rows.is_empty())
    })
    .or_raise_as(ApplyError::spi)
}

/// Remove tombstones of deletes committed before `before` (PostgreSQL-epoch µs).
pub fn collect_garbage(before: i64) -> i64 {
    let secs = before as f64 / 1_000_000.0 + 946_684_800.0;
    Spi::connect_mut(|c| {
        c.update(
            "WITH gone AS (DELETE FROM bdr.tombstones \
               WHERE coalesce(pg_xact_commit_timestamp(xmin), '-infinity') < to_timestamp($1) \
               RETURNING 1) SELECT count(*) FROM gone",
            None,
            &[secs.into()],
        )?
        .first()
        .get_one::<i64>()
    })
    .or_raise_as(ApplyError::spi)
    .unwrap_or(0)
}

thread_local! {
    static WRITING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Count this transaction among the tombstone writers until it ends (once per
/// transaction): apply workers that inserted a row where they saw no tombstone re-check
/// while any writer is in flight, and the epoch moves at both ends so cached "this table
/// has no tombstones" answers are dropped.
fn note_writer() {
    if WRITING.get() {
        return;
    }
    WRITING.set(true);
    crate::pg::shmem::tombstone_writer_start();
    let end = || {
        crate::pg::shmem::tombstone_writer_end();
        WRITING.set(false);
    };
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, end);
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Abort, end);
}

/// Records a tombstone for the key a local DELETE (or key-changing UPDATE) removed.
#[pg_trigger]
fn tombstone_trigger<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, pgrx::trigger_support::PgTriggerError> {
    let relid = trigger.relation()?.oid();
    if let Some(k) = crate::pg::exec::keys::removed_key(trigger)? {
        upsert(relid, &k);
    }
    Ok(None)
}

/// Give every replicated table that lacks it the `bdr_tombstone` trigger; returns how many
/// were added.
#[pg_extern]
pub fn attach_tombstone_triggers() -> i32 {
    let tables: Vec<(String, String)> = Spi::connect(|c| {
        let mut v = Vec::new();
        for r in c.select(
            &format!(
                "SELECT * FROM ({REPLICATED_TABLES_SQL}) t(s, n) WHERE NOT EXISTS ( \
                   SELECT 1 FROM pg_trigger g WHERE g.tgname = 'bdr_tombstone' \
                     AND g.tgrelid = (quote_ident(t.s) || '.' || quote_ident(t.n))::regclass)"
            ),
            None,
            &[],
        )? {
            v.push((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<String>(2)?.unwrap_or_default(),
            ));
        }
        Ok::<_, pgrx::spi::Error>(v)
    })
    .or_raise_as(ApplyError::spi);
    for (s, n) in &tables {
        Spi::run(&format!(
            "CREATE TRIGGER bdr_tombstone AFTER DELETE OR UPDATE ON {}.{} \
             FOR EACH ROW EXECUTE FUNCTION bdr.tombstone_trigger()",
            crate::pg::libpq::quote_ident(s),
            crate::pg::libpq::quote_ident(n)
        ))
        .or_raise_as(ApplyError::spi);
    }
    tables.len() as i32
}
