//! Write stage, raw half: executor-level insert, update, delete and row lookup on a local
//! table, the way PostgreSQL's own logical replication apply does it (`execReplication.c`).
//!
//! Why this way: going through `ExecSimpleRelation*` maintains indexes, checks constraints,
//! computes stored generated columns and queues triggers (only ENABLE REPLICA / ALWAYS
//! ones fire under `session_replication_role = replica`), with no SQL text parsed or
//! planned per row.
//!
//! Invariants: every function here runs inside a transaction with an active snapshot; a
//! [`Target`] is closed with [`Target::close`] (after-trigger queue flushed, executor state
//! freed) before the transaction commits. Everything that can run code a table's owner
//! wrote (triggers, CHECK and index expressions, type input functions of domains) runs as
//! that owner inside a security-restricted operation ([`as_user`]), as PostgreSQL 16+
//! native apply does: a table owner cannot make the apply worker act as a superuser.

use crate::pg::memcxt::MemCxt;
use pgrx::pg_sys;
use pgrx::{PgBox, PgList};
use std::ffi::{c_char, CStr, CString};
use std::marker::PhantomData;

/// Restores the user and security context saved by [`as_user`], also when an error
/// unwinds through it.
struct RestoreUser(pg_sys::Oid, i32);

impl Drop for RestoreUser {
    fn drop(&mut self) {
        // SAFETY: restores the values read by GetUserIdAndSecContext.
        unsafe { pg_sys::SetUserIdAndSecContext(self.0, self.1) };
    }
}

/// Run `f` as `role`, inside a security-restricted operation (no SET ROLE, no temp
/// objects, no session-level changes; see `SECURITY_RESTRICTED_OPERATION`).
pub fn as_user<R>(role: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    switch_user(
        role,
        pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION,
        f,
    )
}

/// Run `f` as `role` with `flags` added to the security context; both restored after,
/// also when an error unwinds through.
pub fn switch_user<R>(role: pg_sys::Oid, flags: u32, f: impl FnOnce() -> R) -> R {
    let (mut user, mut sec) = (pg_sys::InvalidOid, 0);
    // SAFETY: plain reads and writes of the backend's current user and context.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut sec);
        pg_sys::SetUserIdAndSecContext(role, sec | flags as i32);
    }
    let _restore = RestoreUser(user, sec);
    f()
}

/// The owner of `relid`, and whether that owner may insert, update and delete in it and
/// is exempt from its row-level security; `None` if the table is gone.
///
/// # Preconditions
/// Inside a transaction.
pub fn owner_rights(relid: pg_sys::Oid) -> Option<OwnerRights> {
    crate::pg::xact::require_transaction();
    // SAFETY: syscache lookups inside a transaction.
    unsafe {
        let owner = rel_owner(relid)?;
        let may = |mode: u32| {
            pg_sys::pg_class_aclcheck(relid, owner, mode as pg_sys::AclMode)
                == pg_sys::AclResult::ACLCHECK_OK
        };
        let rls = pg_sys::check_enable_rls(relid, owner, true)
            == pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32;
        let name = pg_sys::GetUserNameFromId(owner, true);
        Some(OwnerRights {
            owner,
            name: if name.is_null() {
                owner.to_u32().to_string()
            } else {
                CStr::from_ptr(name).to_string_lossy().into_owned()
            },
            insert: may(pg_sys::ACL_INSERT),
            update: may(pg_sys::ACL_UPDATE),
            delete: may(pg_sys::ACL_DELETE),
            truncate: may(pg_sys::ACL_TRUNCATE),
            row_security: rls,
        })
    }
}

/// See [`owner_rights`].
#[derive(Debug, Clone)]
pub struct OwnerRights {
    pub owner: pg_sys::Oid,
    pub name: String,
    pub insert: bool,
    pub update: bool,
    pub delete: bool,
    pub truncate: bool,
    /// Row-level security applies to the owner (FORCE ROW LEVEL SECURITY).
    pub row_security: bool,
}

/// # Safety
/// Inside a transaction.
unsafe fn rel_owner(relid: pg_sys::Oid) -> Option<pg_sys::Oid> {
    // SAFETY: a syscache lookup, released before returning.
    unsafe {
        let tup = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::RELOID as i32,
            pg_sys::Datum::from(relid),
        );
        if tup.is_null() {
            return None;
        }
        let form = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_class>(tup);
        let owner = (*form).relowner;
        pg_sys::ReleaseSysCache(tup);
        Some(owner)
    }
}

/// What the mapping code needs to know about a local table's attributes.
#[derive(Debug, Clone)]
pub struct LocalAttr {
    pub name: String,
    pub dropped: bool,
    pub generated: bool,
    pub typid: pg_sys::Oid,
    pub typmod: i32,
}

/// A type's input function, resolved once.
pub struct InputFn {
    flinfo: Box<pg_sys::FmgrInfo>,
    typioparam: pg_sys::Oid,
    typmod: i32,
}

impl InputFn {
    /// # Preconditions
    /// Catalog access must be allowed (inside a transaction).
    pub fn new(typid: pg_sys::Oid, typmod: i32, cxt: &MemCxt) -> InputFn {
        crate::pg::xact::require_transaction();
        // SAFETY: forwarded; the FmgrInfo lives in a Box for as long as this value.
        unsafe {
            let mut func = pg_sys::InvalidOid;
            let mut typioparam = pg_sys::InvalidOid;
            pg_sys::getTypeInputInfo(typid, &mut func, &mut typioparam);
            let mut flinfo: Box<pg_sys::FmgrInfo> = Box::new(std::mem::zeroed());
            pg_sys::fmgr_info_cxt(func, &mut *flinfo, cxt.raw());
            InputFn {
                flinfo,
                typioparam,
                typmod,
            }
        }
    }

    /// Convert a text form into a datum in the current memory context.
    ///
    /// # Preconditions
    /// Inside a transaction; errors are raised as PostgreSQL errors.
    pub fn call(&self, text: &str) -> pg_sys::Datum {
        let c = CString::new(text)
            .unwrap_or_else(|_| crate::error::raise(&crate::error::ApplyError::NulInText));
        // SAFETY: flinfo was set up by fmgr_info_cxt; the string is NUL-terminated.
        unsafe {
            pg_sys::InputFunctionCall(
                &*self.flinfo as *const _ as *mut _,
                c.as_ptr() as *mut c_char,
                self.typioparam,
                self.typmod,
            )
        }
    }
}

/// Look up a table by schema and name; `None` if there is none.
///
/// # Preconditions
/// Inside a transaction.
pub fn find_table(schema: &str, name: &str) -> Option<pg_sys::Oid> {
    crate::pg::xact::require_transaction();
    let s = CString::new(schema).ok()?;
    let n = CString::new(name).ok()?;
    // SAFETY: catalog lookups with valid C strings.
    unsafe {
        let nsp = pg_sys::get_namespace_oid(s.as_ptr(), true);
        if nsp == pg_sys::InvalidOid {
            return None;
        }
        let rel = pg_sys::get_relname_relid(n.as_ptr(), nsp);
        (rel != pg_sys::InvalidOid).then_some(rel)
    }
}

/// The attributes of a table, in attribute order (index = attnum - 1).
///
/// # Preconditions
/// Inside a transaction; `relid` exists.
pub fn table_attrs(relid: pg_sys::Oid) -> Vec<LocalAttr> {
    crate::pg::xact::require_transaction();
    // SAFETY: the relation is opened and closed here; the descriptor is read while open.
    unsafe {
        let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as i32);
        let desc = (*rel).rd_att;
        let attrs = (0..(*desc).natts as usize)
            .map(|i| {
                let a = &*(*desc).attrs.as_ptr().add(i);
                LocalAttr {
                    name: CStr::from_ptr(a.attname.data.as_ptr())
                        .to_string_lossy()
                        .into_owned(),
                    dropped: a.attisdropped,
                    generated: a.attgenerated != 0,
                    typid: a.atttypid,
                    typmod: a.atttypmod,
                }
            })
            .collect();
        pg_sys::table_close(rel, pg_sys::NoLock as i32);
        attrs
    }
}

/// Put `row` into the virtual slot `slot` (one entry per attribute of its descriptor).
///
/// # Safety
/// `slot` is a virtual slot with at least `row.len()` attributes.
unsafe fn store_row(slot: *mut pg_sys::TupleTableSlot, row: &Row) {
    // SAFETY: the slot's value and null arrays have natts entries.
    unsafe {
        pg_sys::ExecClearTuple(slot);
        for (i, v) in row.iter().enumerate() {
            *(*slot).tts_values.add(i) = v.unwrap_or(pg_sys::Datum::from(0));
            *(*slot).tts_isnull.add(i) = v.is_none();
        }
        pg_sys::ExecStoreVirtualTuple(slot);
    }
}

/// A local table opened for writing, with its executor state.
pub struct Target {
    rel: pg_sys::Relation,
    estate: *mut pg_sys::EState,
    rri: *mut pg_sys::ResultRelInfo,
    /// Replica identity index (primary key or chosen index), or InvalidOid.
    pub identity_index: pg_sys::Oid,
    pub natts: usize,
    /// The table's owner: what runs its code runs as this role.
    owner: pg_sys::Oid,
}

/// Values for every attribute of the table (index = attnum - 1); `None` is NULL.
pub type Row = Vec<Option<pg_sys::Datum>>;

impl Target {
    /// # Preconditions
    /// Inside a transaction with an active snapshot.
    pub fn open(relid: pg_sys::Oid) -> Target {
        crate::pg::xact::require_transaction();
        // SAFETY: a plain read of the snapshot stack.
        if !unsafe { pg_sys::ActiveSnapshotSet() } {
            pgrx::error!("bdr: internal error: table write without an active snapshot");
        }
        // SAFETY: standard executor setup, as execReplication's callers do it.
        unsafe {
            let rel = pg_sys::table_open(relid, pg_sys::RowExclusiveLock as i32);
            let estate = pg_sys::CreateExecutorState();
            let mut rte =
                PgBox::<pg_sys::RangeTblEntry>::alloc_node(pg_sys::NodeTag::T_RangeTblEntry);
            rte.rtekind = pg_sys::RTEKind::RTE_RELATION;
            rte.relid = relid;
            rte.relkind = (*(*rel).rd_rel).relkind;
            rte.rellockmode = pg_sys::AccessShareLock as i32;
            let mut list = PgList::<pg_sys::RangeTblEntry>::new();
            list.push(rte.into_pg());
            pg_sys::ExecInitRangeTable(estate, list.into_pg());
            let rri = PgBox::<pg_sys::ResultRelInfo>::alloc_node(pg_sys::NodeTag::T_ResultRelInfo)
                .into_pg();
            pg_sys::InitResultRelInfo(rri, rel, 1, std::ptr::null_mut(), 0);
            (*estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
            pg_sys::AfterTriggerBeginQuery();
            pg_sys::ExecOpenIndices(rri, false);
            Target {
                rel,
                estate,
                rri,
                identity_index: pg_sys::RelationGetReplicaIndex(rel),
                natts: (*(*rel).rd_att).natts as usize,
                owner: (*(*rel).rd_rel).relowner,
            }
        }
    }

    /// # Preconditions
    /// Once, before the transaction ends.
    pub fn close(self) {
        // SAFETY: reverses `open`; the relation stays locked until commit.
        unsafe {
            pg_sys::ExecCloseIndices(self.rri);
            // AFTER triggers fire here: as the owner.
            as_user(self.owner, || pg_sys::AfterTriggerEndQuery(self.estate));
            pg_sys::ExecResetTupleTable((*self.estate).es_tupleTable, false);
            pg_sys::FreeExecutorState(self.estate);
            pg_sys::table_close(self.rel, pg_sys::NoLock as i32);
        }
    }

    /// # Safety
    /// See [`Target::open`]. A row of another width than the table's is refused with an
    /// ERROR (the table changed under a cached mapping), never stored.
    unsafe fn virtual_slot(&self, row: &Row) -> *mut pg_sys::TupleTableSlot {
        if row.len() != self.natts {
            crate::error::raise(&crate::error::ApplyError::ShapeChanged {
                table: relation_name(self.relid()),
                what: format!("{} columns now, {} in the row", self.natts, row.len()),
            });
        }
        // SAFETY: a virtual slot of the relation's descriptor, filled attribute by attribute.
        unsafe {
            let slot = pg_sys::ExecInitExtraTupleSlot(
                self.estate,
                (*self.rel).rd_att,
                &pg_sys::TTSOpsVirtual,
            );
            store_row(slot, row);
            slot
        }
    }

    /// Give the attributes `attrs` of a row to be inserted their DEFAULT (computed as the
    /// table's owner); attributes without one stay NULL.
    ///
    /// # Preconditions
    /// See [`Target::open`]; `row` has one entry per attribute.
    pub fn fill_defaults(&self, row: &mut Row, attrs: &[usize]) {
        if attrs.is_empty() {
            return;
        }
        // SAFETY: default expressions of this relation, evaluated in its executor state;
        // results live in the current (per-change) memory context.
        as_user(self.owner, || unsafe {
            let econtext = pg_sys::CreateExprContext(self.estate);
            for &i in attrs {
                let expr = pg_sys::build_column_default(self.rel, i as i32 + 1);
                if expr.is_null() {
                    continue;
                }
                let state = pg_sys::ExecPrepareExpr(expr as *mut pg_sys::Expr, self.estate);
                let mut isnull = false;
                let d = pg_sys::ExecEvalExpr(state, econtext, &mut isnull);
                row[i] = (!isnull).then_some(d);
            }
        })
    }

    /// Insert a row.
    ///
    /// # Preconditions
    /// See [`Target::open`].
    pub fn insert(&self, row: &Row) {
        // SAFETY: slot built for this relation.
        unsafe {
            let slot = self.virtual_slot(row);
            as_user(self.owner, || {
                pg_sys::ExecSimpleRelationInsert(self.rri, self.estate, slot)
            });
        }
    }

    /// Whether [`Target::try_insert`] can be used on this table: no BEFORE ROW INSERT
    /// triggers (they would run again if the attempt gives way) and no stored generated
    /// columns (computed by a function the bindings do not expose).
    pub fn can_try_insert(&self) -> bool {
        // SAFETY: the relation and its result-relation info are open.
        unsafe {
            let trig = (*self.rri).ri_TrigDesc;
            let constr = (*(*self.rel).rd_att).constr;
            (trig.is_null() || !(*trig).trig_insert_before_row)
                && (constr.is_null() || !(*constr).has_generated_stored)
        }
    }

    /// Insert `row` unless some unique index already holds one of its keys (a row live
    /// or being written by another transaction), in one pass: the row goes in as a
    /// speculative insertion (as INSERT ... ON CONFLICT does) and its index entries are
    /// checked as they are made; on a clash the insertion is undone, nothing else
    /// happened, and `false` tells the caller to take the careful path (look the row up,
    /// decide). This spares the lookup before every remote INSERT, which is nearly
    /// always of a new key.
    ///
    /// # Preconditions
    /// See [`Target::open`]; only when [`Target::can_try_insert`].
    pub fn try_insert(&self, row: &Row) -> bool {
        // SAFETY: the steps of ExecSimpleRelationInsert, with the speculative insertion
        // protocol of ExecInsert's ON CONFLICT branch around the heap and index writes.
        let slot = unsafe { self.virtual_slot(row) };
        as_user(self.owner, || unsafe {
            pg_sys::CheckCmdReplicaIdentity(self.rel, pg_sys::CmdType::CMD_INSERT);
            if !(*(*self.rel).rd_att).constr.is_null() {
                pg_sys::ExecConstraints(self.rri, slot, self.estate);
            }
            if (*(*self.rel).rd_rel).relispartition {
                pg_sys::ExecPartitionCheck(self.rri, slot, self.estate, true);
            }
            let xid = pg_sys::GetCurrentTransactionId();
            let token = pg_sys::SpeculativeInsertionLockAcquire(xid);
            pg_sys::table_tuple_insert_speculative(
                self.rel,
                slot,
                (*self.estate).es_output_cid,
                0,
                std::ptr::null_mut(),
                token,
            );
            let mut clash = false;
            let clashing = if (*self.rri).ri_NumIndices > 0 {
                pg_sys::ExecInsertIndexTuples(
                    self.rri,
                    slot,
                    self.estate,
                    false,
                    true,
                    &mut clash,
                    std::ptr::null_mut(),
                )
            } else {
                std::ptr::null_mut()
            };
            // Any index listed (a unique, deferrable or exclusion one) is a possible clash.
            let ok = !clash && clashing.is_null();
            pg_sys::table_tuple_complete_speculative(self.rel, slot, token, ok);
            pg_sys::SpeculativeInsertionLockRelease(xid);
            pg_sys::list_free(clashing);
            if ok {
                pg_sys::ExecARInsertTriggers(
                    self.estate,
                    self.rri,
                    slot,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                );
            }
            ok
        })
    }

    /// Find the local row matching `key` (identity columns set, others NULL) and lock it.
    /// Uses the replica identity index, or compares whole rows when there is none
    /// (REPLICA IDENTITY FULL).
    ///
    /// # Preconditions
    /// See [`Target::open`].
    pub fn find(&self, key: &Row) -> Option<LocalRow<'_>> {
        // SAFETY: both slots belong to this relation and this executor state.
        let search = unsafe { self.virtual_slot(key) };
        as_user(self.owner, || unsafe {
            let found = pg_sys::table_slot_create(self.rel, &mut (*self.estate).es_tupleTable);
            let ok = if self.identity_index != pg_sys::InvalidOid {
                pg_sys::RelationFindReplTupleByIndex(
                    self.rel,
                    self.identity_index,
                    pg_sys::LockTupleMode::LockTupleExclusive,
                    search,
                    found,
                )
            } else {
                pg_sys::RelationFindReplTupleSeq(
                    self.rel,
                    pg_sys::LockTupleMode::LockTupleExclusive,
                    search,
                    found,
                )
            };
            ok.then_some(LocalRow {
                slot: found,
                estate: self.estate,
                _target: PhantomData,
            })
        })
    }

    /// Run `f` with an initialised EvalPlanQual state (what ExecSimpleRelationUpdate and
    /// ...Delete need for concurrent-update rechecks), ended afterwards.
    ///
    /// # Safety
    /// See [`Target::open`].
    unsafe fn with_epq(&self, f: impl FnOnce(*mut pg_sys::EPQState)) {
        // SAFETY: the EPQ state lives on this stack frame for the duration of `f`.
        unsafe {
            let mut epq: pg_sys::EPQState = std::mem::zeroed();
            pg_sys::EvalPlanQualInit(
                &mut epq,
                self.estate,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                -1,
            );
            f(&mut epq);
            pg_sys::EvalPlanQualEnd(&mut epq);
        }
    }

    /// Refuse a row another target found (its slot belongs to another executor state).
    fn own(&self, old: &LocalRow) {
        if old.estate != self.estate {
            pgrx::error!("bdr: internal error: a row written through another table's target");
        }
    }

    /// Replace `old` by `row`.
    ///
    /// # Preconditions
    /// `old` was returned by [`Target::find`] on this target.
    pub fn update(&self, old: &LocalRow, row: &Row) {
        self.own(old);
        // SAFETY: as in find.
        unsafe {
            let slot = self.virtual_slot(row);
            as_user(self.owner, || {
                self.with_epq(|epq| {
                    pg_sys::ExecSimpleRelationUpdate(self.rri, self.estate, epq, old.slot, slot)
                })
            });
        }
    }

    /// Delete `old`.
    ///
    /// # Preconditions
    /// `old` was returned by [`Target::find`] on this target.
    pub fn delete(&self, old: &LocalRow) {
        self.own(old);
        // SAFETY: as in update.
        unsafe {
            as_user(self.owner, || {
                self.with_epq(|epq| {
                    pg_sys::ExecSimpleRelationDelete(self.rri, self.estate, epq, old.slot)
                })
            });
        }
    }
}

/// A locked local row found by [`Target::find`], valid while the target that found it
/// is open (the borrow keeps it so).
pub struct LocalRow<'t> {
    slot: *mut pg_sys::TupleTableSlot,
    /// The executor state of the target that found it (null: found by
    /// [`lock_by_identity`]): a row is written back only through its own target.
    estate: *mut pg_sys::EState,
    _target: PhantomData<&'t Target>,
}

impl LocalRow<'_> {
    /// Every attribute's datum (NULL as None), valid until the target is closed.
    ///
    /// # Preconditions
    /// The target that found this row is still open.
    pub fn values(&self) -> Row {
        // SAFETY: slot_getallattrs fills tts_values/tts_isnull for natts attributes.
        unsafe {
            pg_sys::slot_getallattrs(self.slot);
            let n = (*(*self.slot).tts_tupleDescriptor).natts as usize;
            (0..n)
                .map(|i| {
                    (!*(*self.slot).tts_isnull.add(i)).then(|| *(*self.slot).tts_values.add(i))
                })
                .collect()
        }
    }
}

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
    pub fn relid(&self) -> pg_sys::Oid {
        // SAFETY: the relation is open while the target lives.
        unsafe { (*self.rel).rd_id }
    }

    /// `row` as a JSON object of column name to text form (for conflict history).
    ///
    /// # Preconditions
    /// See [`Target::open`].
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
    /// See [`Target::open`].
    pub fn key_text(&self, row: &Row) -> Option<String> {
        // SAFETY: forwarded.
        unsafe {
            let attrs = identity_attrs(self.rel);
            (!attrs.is_empty()).then(|| key_text_of((*self.rel).rd_att, &attrs, row))
        }
    }

    /// Unique indexes other than the replica identity index, usable to find a row
    /// (plain columns, no predicate): (index oid, its attribute indexes).
    ///
    /// # Preconditions
    /// See [`Target::open`].
    pub fn other_unique_indexes(&self) -> Vec<(pg_sys::Oid, Vec<usize>)> {
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
    /// See [`Target::open`].
    pub fn find_by_index(&self, index: pg_sys::Oid, row: &Row) -> Option<LocalRow<'_>> {
        // SAFETY: as in find.
        let search = unsafe { self.virtual_slot(row) };
        as_user(self.owner, || unsafe {
            let found = pg_sys::table_slot_create(self.rel, &mut (*self.estate).es_tupleTable);
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
                _target: PhantomData,
            })
        })
    }
}

impl LocalRow<'_> {
    /// The xid that wrote this row version.
    ///
    /// # Preconditions
    /// The target that found this row is still open.
    pub fn xmin(&self) -> pg_sys::TransactionId {
        let mut isnull = false;
        // SAFETY: a heap tuple slot has the xmin system attribute.
        let d = unsafe {
            pg_sys::slot_getsysattr(
                self.slot,
                pg_sys::MinTransactionIdAttributeNumber,
                &mut isnull,
            )
        };
        pg_sys::TransactionId::from(d.value() as u32)
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

/// Find the row of table `relid` whose replica identity (primary key) columns equal
/// `key`'s, share-lock it and return its xmin. Uses a dirty snapshot that sees rows other
/// transactions are writing and waits for those transactions to end (like [`Target::find`]),
/// so a row being written concurrently is either waited for or not there yet.
///
/// # Preconditions
/// Inside a transaction with an active snapshot; `key` has one entry per attribute.
pub fn lock_by_identity(relid: pg_sys::Oid, key: &Row) -> Option<pg_sys::TransactionId> {
    crate::pg::xact::require_transaction();
    // SAFETY: the relation is open for the whole lookup; both slots are dropped before
    // it is closed; the lock stays until the transaction ends.
    unsafe {
        let rel = pg_sys::table_open(relid, pg_sys::RowExclusiveLock as i32);
        if key.len() != (*(*rel).rd_att).natts as usize {
            pg_sys::table_close(rel, pg_sys::NoLock as i32);
            pgrx::error!("bdr: internal error: a search row of another width than its table");
        }
        let index = pg_sys::RelationGetReplicaIndex(rel);
        let search = pg_sys::MakeSingleTupleTableSlot((*rel).rd_att, &pg_sys::TTSOpsVirtual);
        store_row(search, key);
        let found = pg_sys::table_slot_create(rel, std::ptr::null_mut());
        let xmin = pg_sys::RelationFindReplTupleByIndex(
            rel,
            index,
            pg_sys::LockTupleMode::LockTupleShare,
            search,
            found,
        )
        .then(|| {
            LocalRow {
                slot: found,
                estate: std::ptr::null_mut(),
                _target: PhantomData,
            }
            .xmin()
        });
        pg_sys::ExecDropSingleTupleTableSlot(found);
        pg_sys::ExecDropSingleTupleTableSlot(search);
        pg_sys::table_close(rel, pg_sys::NoLock as i32);
        xmin
    }
}

/// [`lock_by_identity`] on a table whose identity key is (an oid column, a text column),
/// as `bdr.tombstones`' (relid, key).
pub fn lock_by_oid_and_text(
    relid: pg_sys::Oid,
    oid: pg_sys::Oid,
    text: &str,
) -> Option<pg_sys::TransactionId> {
    crate::pg::xact::require_transaction();
    let t = CString::new(text).ok()?;
    // SAFETY: inside a transaction; the text datum is palloc'd in the current memory
    // context and only read during the lookup.
    let text_datum = unsafe { pg_sys::Datum::from(pg_sys::cstring_to_text(t.as_ptr())) };
    lock_by_identity(
        relid,
        &vec![Some(pg_sys::Datum::from(oid)), Some(text_datum)],
    )
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

/// "schema.name" of a relation, for messages.
///
/// # Preconditions
/// Inside a transaction.
pub fn relation_name(relid: pg_sys::Oid) -> String {
    crate::pg::xact::require_transaction();
    // SAFETY: catalog lookups; NULL results (a dropped relation) are handled.
    unsafe {
        let name = pg_sys::get_rel_name(relid);
        let nsp = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relid));
        let s = |p: *mut c_char| {
            if p.is_null() {
                "?".to_string()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        format!("{}.{}", s(nsp), s(name))
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
