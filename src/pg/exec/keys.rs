//! Keys of a local table: the canonical key text tombstones are keyed by (the same on the
//! apply side and in the `bdr_tombstone` trigger), whether an UPDATE changed the key, and
//! the unique indexes other than the replica identity a remote row may collide on.
//!
//! Invariant: the key text is a JSON array of the key columns' type output text (NULL as
//! null), computed by [`Target::key_text`] and by the trigger from the same function, so
//! a tombstone written by either side is found by the other.

use super::{LocalRow, Row, Target};
use crate::pg::owner::as_user;
use pgrx::pg_sys;
use pgrx::PgList;
use std::ffi::CStr;
use std::marker::PhantomData;

/// Render datums as the canonical key text: a JSON array of the type output functions'
/// text (NULL as null). Tombstones are keyed by it, on the apply side and in the trigger.
///
/// # Safety
/// Inside a transaction; `desc` describes `values`.
unsafe fn key_text_of(
    desc: pg_sys::TupleDesc,
    attidx: &[usize],
    values: &[Option<pg_sys::Datum>],
) -> String {
    let mut parts = Vec::with_capacity(attidx.len());
    for &i in attidx {
        // SAFETY: i < natts; output functions return palloc'd C strings.
        unsafe {
            let a = &*(*desc).attrs.as_ptr().add(i);
            parts.push(match values[i] {
                None => serde_json::Value::Null,
                Some(d) => {
                    let mut foid = pg_sys::InvalidOid;
                    let mut varlena = false;
                    pg_sys::getTypeOutputInfo(a.atttypid, &mut foid, &mut varlena);
                    let s = pg_sys::OidOutputFunctionCall(foid, d);
                    serde_json::Value::String(CStr::from_ptr(s).to_string_lossy().into_owned())
                }
            });
        }
    }
    serde_json::Value::Array(parts).to_string()
}

/// Attribute indexes (0-based) of a relation's replica identity key.
///
/// # Safety
/// `rel` is open.
unsafe fn identity_attrs(rel: pg_sys::Relation) -> Vec<usize> {
    // SAFETY: the bitmap is palloc'd and only read here.
    unsafe {
        let bms = pg_sys::RelationGetIndexAttrBitmap(
            rel,
            pg_sys::IndexAttrBitmapKind::INDEX_ATTR_BITMAP_IDENTITY_KEY,
        );
        (0..(*(*rel).rd_att).natts as usize)
            .filter(|&i| {
                pg_sys::bms_is_member(
                    i as i32 + 1 - pg_sys::FirstLowInvalidHeapAttributeNumber,
                    bms,
                )
            })
            .collect()
    }
}

impl Target {
    /// `row` as a JSON object of column name to text form (for conflict history).
    ///
    /// # Preconditions
    /// See [`Target::begin_change`].
    pub fn row_json(&self, row: &Row) -> String {
        // SAFETY: the descriptor matches `row`.
        unsafe {
            let desc = (*self.rel).rd_att;
            let attrs: Vec<usize> = (0..row.len())
                .filter(|&i| !(*(*desc).attrs.as_ptr().add(i)).attisdropped)
                .collect();
            let values: Vec<serde_json::Value> =
                serde_json::from_str(&key_text_of(desc, &attrs, row)).unwrap_or_default();
            let mut m = serde_json::Map::new();
            for (i, v) in attrs.iter().zip(values) {
                let a = &*(*desc).attrs.as_ptr().add(*i);
                m.insert(
                    CStr::from_ptr(a.attname.data.as_ptr())
                        .to_string_lossy()
                        .into_owned(),
                    v,
                );
            }
            serde_json::Value::Object(m).to_string()
        }
    }

    /// The canonical key text of `row` (identity columns), or None without an identity.
    ///
    /// # Preconditions
    /// See [`Target::begin_change`].
    pub fn key_text(&self, row: &Row) -> Option<String> {
        // SAFETY: forwarded.
        unsafe {
            let attrs = identity_attrs(self.rel);
            (!attrs.is_empty()).then(|| key_text_of((*self.rel).rd_att, &attrs, row))
        }
    }

    /// Unique indexes other than the replica identity index, usable to find a row
    /// (plain columns, no predicate): (index oid, its attribute indexes). Read once per
    /// target: a change to the table's indexes invalidates its relcache entry, and the
    /// target is built again.
    ///
    /// # Preconditions
    /// See [`Target::begin_change`].
    pub fn other_unique_indexes(&self) -> &[(pg_sys::Oid, Vec<usize>)] {
        self.unique_others
            .get_or_init(|| self.read_unique_indexes())
    }

    /// Whether `a` and `b` hold the same binary values in attributes `cols` (equal
    /// binaries are equal values; unequal ones may still be equal, e.g. `1.0` and `1.00`).
    ///
    /// # Preconditions
    /// See [`Target::begin_change`]; both rows have one entry per attribute.
    pub fn same_values(&self, a: &Row, b: &Row, cols: &[usize]) -> bool {
        cols.iter().all(|&i| match (a[i], b[i]) {
            (None, None) => true,
            // SAFETY: the descriptor has natts attributes; both datums are of attribute
            // i's type (rows of this table); the closure holds plain values.
            (Some(x), Some(y)) => unsafe {
                let att = &*(*self.desc).attrs.as_ptr().add(i);
                let (byval, len) = (att.attbyval, att.attlen.into());
                crate::pg::unguarded::guarded(|| {
                    crate::pg::unguarded::raw::datumIsEqual(x, y, byval, len)
                })
            },
            _ => false,
        })
    }

    fn read_unique_indexes(&self) -> Vec<(pg_sys::Oid, Vec<usize>)> {
        let mut out = Vec::new();
        // SAFETY: the index list is a palloc'd OID list; each index is opened and closed.
        unsafe {
            let list = pg_sys::RelationGetIndexList(self.rel);
            for oid in PgList::<std::ffi::c_void>::from_pg(list).iter_oid() {
                if oid == self.identity_index {
                    continue;
                }
                let idx = pg_sys::index_open(oid, pg_sys::AccessShareLock as i32);
                let form = &*(*idx).rd_index;
                let usable = form.indisunique
                    && form.indimmediate
                    && (*idx).rd_indexprs.is_null()
                    && pg_sys::heap_attisnull(
                        (*idx).rd_indextuple,
                        pg_sys::Anum_pg_index_indpred as i32,
                        std::ptr::null_mut(),
                    );
                let natts = form.indnkeyatts as usize;
                let keys: Vec<usize> = (0..natts)
                    .map(|k| *form.indkey.values.as_ptr().add(k) as usize)
                    .collect();
                pg_sys::index_close(idx, pg_sys::AccessShareLock as i32);
                if usable && keys.iter().all(|&a| a > 0) {
                    out.push((oid, keys.into_iter().map(|a| a - 1).collect()));
                }
            }
        }
        out
    }

    /// Find (and lock) the row whose values in `index`'s columns equal `row`'s.
    ///
    /// # Preconditions
    /// See [`Target::begin_change`].
    pub fn find_by_index(&self, index: pg_sys::Oid, row: &Row) -> Option<LocalRow<'_>> {
        // SAFETY: as in find.
        let search = unsafe { self.virtual_slot(row) };
        let found = unsafe { self.table_slot() };
        as_user(self.owner, || unsafe {
            pg_sys::RelationFindReplTupleByIndex(
                self.rel,
                index,
                pg_sys::LockTupleMode::LockTupleExclusive,
                search,
                found,
            )
            .then_some(LocalRow {
                slot: found,
                estate: self.estate,
                xmin: pg_sys::InvalidTransactionId,
                _target: PhantomData,
            })
        })
    }
}

/// Every attribute of a heap tuple (NULL as None).
///
/// # Safety
/// `desc` describes `tuple`.
unsafe fn deform(desc: pg_sys::TupleDesc, tuple: *mut pg_sys::HeapTupleData) -> Row {
    // SAFETY: forwarded; the arrays have natts entries.
    unsafe {
        let n = (*desc).natts as usize;
        let mut datums = vec![pg_sys::Datum::from(0); n];
        let mut nulls = vec![true; n];
        pg_sys::heap_deform_tuple(tuple, desc, datums.as_mut_ptr(), nulls.as_mut_ptr());
        (0..n).map(|i| (!nulls[i]).then_some(datums[i])).collect()
    }
}

/// The canonical key text of a heap tuple of `rel` (for the tombstone trigger).
///
/// # Safety
/// `rel` is open and `tuple` is one of its tuples.
unsafe fn tuple_key_text(
    rel: pg_sys::Relation,
    tuple: *mut pg_sys::HeapTupleData,
) -> Option<String> {
    // SAFETY: deform the tuple with the relation's descriptor.
    unsafe {
        let attrs = identity_attrs(rel);
        if attrs.is_empty() {
            return None;
        }
        let desc = (*rel).rd_att;
        Some(key_text_of(desc, &attrs, &deform(desc, tuple)))
    }
}

/// The canonical key text a row trigger's DELETE, or key-changing UPDATE, removed from
/// its table; `None` when the UPDATE kept the key or the table has no identity.
pub fn removed_key(
    trigger: &pgrx::PgTrigger<'_>,
) -> Result<Option<String>, pgrx::trigger_support::PgTriggerError> {
    let rel = trigger.relation()?;
    // SAFETY: the trigger's relation is open and its tuples belong to it.
    unsafe {
        let old = trigger.old().map(|t| t.into_pg());
        let new = trigger.new().map(|t| t.into_pg());
        let Some(old) = old else { return Ok(None) };
        // Most UPDATEs keep the key: compare binary datums before rendering any text.
        if let Some(n) = new {
            if !identity_changed(rel.as_ptr(), old, n) {
                return Ok(None);
            }
        }
        let old_key = tuple_key_text(rel.as_ptr(), old);
        let new_key = new.and_then(|n| tuple_key_text(rel.as_ptr(), n));
        Ok(old_key.filter(|k| new_key.as_deref() != Some(k.as_str())))
    }
}

extern "C-unwind" {
    // utils/datum.h, exported by the postgres binary; not in pgrx's bindings.
    fn datumIsEqual(
        value1: pg_sys::Datum,
        value2: pg_sys::Datum,
        typ_by_val: bool,
        typ_len: std::ffi::c_int,
    ) -> bool;
}

/// Whether an UPDATE from `old` to `new` changed the replica identity key (compared as
/// binary datums; no output functions run). False when the table has no identity.
///
/// # Safety
/// `rel` is open and both tuples are its tuples.
unsafe fn identity_changed(
    rel: pg_sys::Relation,
    old: *mut pg_sys::HeapTupleData,
    new: *mut pg_sys::HeapTupleData,
) -> bool {
    // SAFETY: both tuples are deformed with the relation's descriptor; datumIsEqual reads
    // datums of the attribute's own type.
    unsafe {
        let attrs = identity_attrs(rel);
        if attrs.is_empty() {
            return false;
        }
        let desc = (*rel).rd_att;
        let (o, n) = (deform(desc, old), deform(desc, new));
        attrs.iter().any(|&i| {
            let a = &*(*desc).attrs.as_ptr().add(i);
            match (o[i], n[i]) {
                (None, None) => false,
                (Some(x), Some(y)) => !datumIsEqual(x, y, a.attbyval, a.attlen as std::ffi::c_int),
                _ => true,
            }
        })
    }
}
