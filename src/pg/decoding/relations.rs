//! Decode stage, raw half: the plugin's per-stream relation cache (replicate or not,
//! columns, key, output functions) and the rendering of a tuple's values as text.
//!
//! Two renderings of a tuple: [`put_row`] writes the values straight into a frame being
//! built ([`wire::ChangeWriter`], the hot path of every INSERT, UPDATE and DELETE from
//! protocol version 2 on: no `String` or `Vec` per value or row, `heap_deform_tuple`
//! into arrays kept across changes); [`row_values`] builds [`Value`]s for the rest
//! (version 1's JSON frames, the `bdr.ddl_queue` and `bdr.heartbeat` rows turned into
//! messages).
//!
//! Invariants: an entry is dropped, and its metadata sent again, after a relcache
//! invalidation of its relation; an unchanged on-disk TOAST value is rendered as
//! [`Value::UnchangedToast`], never as a guess; both renderings give the same values.

use super::{cstring, raw, State, CACHE_CXT, INVALIDATED, INVALIDATED_ANY};
use crate::decode::{self, RelFacts};
use crate::error::{self, DecodeError};
use bdr_core::idmap::IdMap;
use bdr_core::wire::{self, ChangeWriter, Column, ReplicaIdentity, Value};
use pgrx::pg_sys;
use std::ffi::{c_int, CStr};

/// The per-stream relation cache.
pub(super) type RelMap = IdMap<pg_sys::Oid, RelEntry>;

/// `heap_deform_tuple`'s output arrays, kept across changes (sized to the widest
/// relation seen).
#[derive(Default)]
pub(super) struct Deformed {
    datums: Vec<pg_sys::Datum>,
    nulls: Vec<bool>,
}

/// One sent column of a relation.
pub(super) struct Col {
    /// Index into the relation's tuple descriptor.
    pub(super) attidx: usize,
    pub(super) varlena: bool,
    /// The type's output function, resolved once.
    pub(super) out: Box<pg_sys::FmgrInfo>,
}

/// bdr's own tables that the plugin turns into messages. Only bdr's code writes them, so
/// what they carry cannot be forged by a role that can call `pg_logical_emit_message`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Special {
    None,
    /// `bdr.ddl_queue`: an insert is sent as a `bdr.ddl` message (src/ddl.rs).
    DdlQueue,
    /// `bdr.heartbeat`: an insert or update is sent as a `bdr.sync` heartbeat carrying its
    /// `horizon` (src/workers/supervisor.rs).
    Heartbeat,
}

/// What the plugin caches about a relation for the duration of a stream.
pub(super) struct RelEntry {
    pub(super) replicate: bool,
    /// One of bdr's own tables whose writes travel as a message instead of rows.
    pub(super) special: Special,
    /// Whether `meta` has been sent in this stream.
    pub(super) sent: bool,
    pub(super) meta: wire::Relation,
    pub(super) cols: Vec<Col>,
    /// Indexes into `cols` of the replica identity key columns.
    pub(super) key: Vec<usize>,
}

/// The cache entry for `rel`, built on first use or after an invalidation.
///
/// # Safety
/// `rel` is an open relation; catalog access is allowed (we are inside decoding's
/// transaction).
pub(super) unsafe fn entry(st: &mut State, rel: pg_sys::Relation) -> &mut RelEntry {
    if INVALIDATED_ANY.replace(false) {
        INVALIDATED.with(|i| {
            let mut i = i.borrow_mut();
            if std::mem::take(&mut i.all) {
                st.rels.clear();
            }
            for relid in i.rels.drain(..) {
                st.rels.remove(&relid);
            }
        });
    }
    // SAFETY: forwarded from the caller.
    let relid = unsafe { (*rel).rd_id };
    // SAFETY: forwarded from the caller.
    st.rels
        .entry(relid)
        .or_insert_with(|| unsafe { build_entry(rel) })
}

/// A memory context that lives as long as the process, for cached `FmgrInfo`s.
fn cache_cxt() -> pg_sys::MemoryContext {
    CACHE_CXT.with(|c| {
        if c.get().is_null() {
            // SAFETY: TopMemoryContext is always valid in a backend.
            let cxt = unsafe {
                pg_sys::AllocSetContextCreateInternal(
                    pg_sys::TopMemoryContext,
                    c"bdr decode cache".as_ptr(),
                    pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
                    pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
                    pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
                )
            };
            c.set(cxt);
        }
        c.get()
    })
}

/// # Safety
/// `rel` is an open relation and catalog lookups are allowed.
unsafe fn build_entry(rel: pg_sys::Relation) -> RelEntry {
    // SAFETY: rd_rel and rd_att are valid for an open relation; the attribute array
    // has `natts` entries.
    unsafe {
        let relid = (*rel).rd_id;
        let form = &*(*rel).rd_rel;
        let schema = cstring(pg_sys::get_namespace_name(form.relnamespace));
        let name = cstring(form.relname.data.as_ptr());
        let in_ext = pg_sys::getExtensionOfObject(pg_sys::RelationRelationId, relid);
        let replicate = decode::replicates(&RelFacts {
            plain_table: form.relkind as u8 == pg_sys::RELKIND_RELATION,
            permanent: form.relpersistence as u8 == pg_sys::RELPERSISTENCE_PERMANENT,
            schema: &schema,
            owned_by_extension: in_ext != pg_sys::InvalidOid,
        });
        let replica_identity = match form.relreplident as u8 {
            pg_sys::REPLICA_IDENTITY_FULL => ReplicaIdentity::Full,
            pg_sys::REPLICA_IDENTITY_INDEX => ReplicaIdentity::Index,
            pg_sys::REPLICA_IDENTITY_NOTHING => ReplicaIdentity::Nothing,
            _ => ReplicaIdentity::Default,
        };
        let keyattrs = pg_sys::RelationGetIndexAttrBitmap(
            rel,
            pg_sys::IndexAttrBitmapKind::INDEX_ATTR_BITMAP_IDENTITY_KEY,
        );
        let desc = (*rel).rd_att;
        let mut columns = Vec::new();
        let mut cols = Vec::new();
        let mut key = Vec::new();
        for i in 0..(*desc).natts as usize {
            let att = &*(*desc).attrs.as_ptr().add(i);
            if att.attisdropped || att.attgenerated != 0 {
                continue;
            }
            let is_key = replica_identity != ReplicaIdentity::Full
                && pg_sys::bms_is_member(
                    att.attnum as c_int - pg_sys::FirstLowInvalidHeapAttributeNumber,
                    keyattrs,
                );
            if is_key {
                key.push(cols.len());
            }
            columns.push(Column {
                name: cstring(att.attname.data.as_ptr()),
                type_name: cstring(pg_sys::format_type_with_typemod(
                    att.atttypid,
                    att.atttypmod,
                )),
                key: is_key,
            });
            let mut foid = pg_sys::InvalidOid;
            let mut isvarlena = false;
            pg_sys::getTypeOutputInfo(att.atttypid, &mut foid, &mut isvarlena);
            let mut out: Box<pg_sys::FmgrInfo> = Box::new(std::mem::zeroed());
            pg_sys::fmgr_info_cxt(foid, &mut *out, cache_cxt());
            cols.push(Col {
                attidx: i,
                varlena: att.attlen == -1,
                out,
            });
        }
        RelEntry {
            replicate,
            special: match (schema.as_str(), name.as_str()) {
                ("bdr", "ddl_queue") => Special::DdlQueue,
                ("bdr", "heartbeat") => Special::Heartbeat,
                _ => Special::None,
            },
            sent: false,
            meta: wire::Relation {
                id: relid.to_u32(),
                schema,
                name,
                replica_identity,
                columns,
            },
            cols,
            key,
        }
    }
}

/// Whether a datum is a pointer to an on-disk TOASTed value (`VARATT_IS_EXTERNAL_ONDISK`):
/// the value was not changed by this UPDATE, so WAL does not carry it.
///
/// # Safety
/// `d` is a non-null varlena datum.
unsafe fn is_external_ondisk(d: pg_sys::Datum) -> bool {
    let p = d.cast_mut_ptr::<u8>();
    // SAFETY: every varlena has at least a one-byte header; an external one has a tag byte.
    unsafe {
        #[cfg(target_endian = "little")]
        let external = *p == 0x01;
        #[cfg(target_endian = "big")]
        let external = *p == 0x80;
        external && *p.add(1) == pg_sys::vartag_external::VARTAG_ONDISK as u8
    }
}

/// Render the columns of `tuple` (all of `e.cols`, or only those listed in `only`).
///
/// # Safety
/// `tuple` is a heap tuple shaped by `desc`, and the current memory context may be reset
/// after the values are copied out.
pub(super) unsafe fn row_values(
    e: &RelEntry,
    desc: pg_sys::TupleDesc,
    tuple: *mut pg_sys::HeapTupleData,
    only: Option<&[usize]>,
) -> Vec<Value> {
    // SAFETY: heap_deform_tuple fills natts datums/nulls; output functions return
    // NUL-terminated strings in the current (per-change) memory context.
    unsafe {
        let natts = (*desc).natts as usize;
        let mut datums = vec![pg_sys::Datum::from(0); natts];
        let mut nulls = vec![true; natts];
        pg_sys::heap_deform_tuple(tuple, desc, datums.as_mut_ptr(), nulls.as_mut_ptr());
        let render = |ci: usize| -> Value {
            let c = &e.cols[ci];
            // A column added after this tuple was written reads as NULL past its natts.
            if nulls[c.attidx] {
                return Value::Null;
            }
            let d = datums[c.attidx];
            if c.varlena && is_external_ondisk(d) {
                return Value::UnchangedToast;
            }
            let s = pg_sys::OutputFunctionCall(&*c.out as *const _ as *mut _, d);
            match CStr::from_ptr(s).to_str() {
                Ok(t) => Value::Text(t.to_owned()),
                Err(_) => error::raise(&not_utf8(e, ci)),
            }
        };
        match only {
            Some(idx) => idx.iter().map(|&ci| render(ci)).collect(),
            None => (0..e.cols.len()).map(render).collect(),
        }
    }
}

/// Write the values of `tuple` (all of `e.cols`, or only those listed in `only`) into
/// `w`'s open value list and close it. `Err(i)`: column `i`'s text is not UTF-8
/// (nothing more was written; the caller abandons the frame and raises).
///
/// # Safety
/// Inside [`raw::guarded`] (this calls unguarded functions, and neither panics nor owns
/// anything with a destructor); `tuple` is a heap tuple shaped by `desc`, which is the
/// descriptor `e` was built from; the output functions allocate in the current memory
/// context, which the caller resets after the change.
pub(super) unsafe fn put_row(
    w: &mut ChangeWriter,
    e: &RelEntry,
    desc: pg_sys::TupleDesc,
    tuple: *mut pg_sys::HeapTupleData,
    only: Option<&[usize]>,
    scratch: &mut Deformed,
) -> Result<(), usize> {
    // SAFETY: heap_deform_tuple fills natts datums/nulls; output functions return
    // NUL-terminated strings in the current (per-change) memory context.
    unsafe {
        let natts = (*desc).natts as usize;
        if scratch.datums.len() < natts {
            scratch.datums.resize(natts, pg_sys::Datum::from(0));
            scratch.nulls.resize(natts, true);
        }
        raw::heap_deform_tuple(
            tuple,
            desc,
            scratch.datums.as_mut_ptr(),
            scratch.nulls.as_mut_ptr(),
        );
        let nulls = &scratch.nulls[..natts];
        let datums = &scratch.datums[..natts];
        let mut put = |ci: usize| -> Result<(), usize> {
            // Indexes from the entry are in range (it was built from `desc`); `get`
            // keeps this free of panics all the same.
            let Some(c) = e.cols.get(ci) else {
                return Err(ci);
            };
            // A column added after this tuple was written reads as NULL past its natts.
            let (Some(false), Some(&d)) = (nulls.get(c.attidx).copied(), datums.get(c.attidx))
            else {
                w.null();
                return Ok(());
            };
            if c.varlena && is_external_ondisk(d) {
                w.unchanged_toast();
                return Ok(());
            }
            let s = raw::OutputFunctionCall(&*c.out as *const _ as *mut _, d);
            let t = std::str::from_utf8(CStr::from_ptr(s).to_bytes()).map_err(|_| ci)?;
            w.text(t);
            Ok(())
        };
        match only {
            Some(idx) => idx.iter().try_for_each(|&ci| put(ci))?,
            None => (0..e.cols.len()).try_for_each(&mut put)?,
        }
        w.end_values();
        Ok(())
    }
}

/// The error for a column whose text is not UTF-8.
pub(super) fn not_utf8(e: &RelEntry, ci: usize) -> DecodeError {
    DecodeError::NotUtf8 {
        relation: e.meta.qualified_name(),
        column: e
            .meta
            .columns
            .get(ci)
            .map_or_else(|| format!("#{ci}"), |c| c.name.clone()),
    }
}
