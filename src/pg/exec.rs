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
//! freed) before the transaction commits.

use pgrx::pg_sys;
use pgrx::{PgBox, PgList};
use std::ffi::{c_char, CStr, CString};

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
    /// # Safety
    /// Catalog access must be allowed (inside a transaction).
    pub unsafe fn new(typid: pg_sys::Oid, typmod: i32, cxt: pg_sys::MemoryContext) -> InputFn {
        // SAFETY: forwarded; the FmgrInfo lives in a Box for as long as this value.
        unsafe {
            let mut func = pg_sys::InvalidOid;
            let mut typioparam = pg_sys::InvalidOid;
            pg_sys::getTypeInputInfo(typid, &mut func, &mut typioparam);
            let mut flinfo: Box<pg_sys::FmgrInfo> = Box::new(std::mem::zeroed());
            pg_sys::fmgr_info_cxt(func, &mut *flinfo, cxt);
            InputFn {
                flinfo,
                typioparam,
                typmod,
            }
        }
    }

    /// Convert a text form into a datum in the current memory context.
    ///
    /// # Safety
    /// Inside a transaction; errors are raised as PostgreSQL errors.
    pub unsafe fn call(&self, text: &str) -> pg_sys::Datum {
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
/// # Safety
/// Inside a transaction.
pub unsafe fn find_table(schema: &str, name: &str) -> Option<pg_sys::Oid> {
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
/// # Safety
/// Inside a transaction; `relid` exists.
pub unsafe fn table_attrs(relid: pg_sys::Oid) -> Vec<LocalAttr> {
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

/// A local table opened for writing, with its executor state.
pub struct Target {
    rel: pg_sys::Relation,
    estate: *mut pg_sys::EState,
    rri: *mut pg_sys::ResultRelInfo,
    /// Replica identity index (primary key or chosen index), or InvalidOid.
    pub identity_index: pg_sys::Oid,
    pub natts: usize,
}

/// Values for every attribute of the table (index = attnum - 1); `None` is NULL.
pub type Row = Vec<Option<pg_sys::Datum>>;

impl Target {
    /// # Safety
    /// Inside a transaction with an active snapshot.
    pub unsafe fn open(relid: pg_sys::Oid) -> Target {
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
            }
        }
    }

    /// # Safety
    /// Once, before the transaction ends.
    pub unsafe fn close(self) {
        // SAFETY: reverses `open`; the relation stays locked until commit.
        unsafe {
            pg_sys::ExecCloseIndices(self.rri);
            pg_sys::AfterTriggerEndQuery(self.estate);
            pg_sys::ExecResetTupleTable((*self.estate).es_tupleTable, false);
            pg_sys::FreeExecutorState(self.estate);
            pg_sys::table_close(self.rel, pg_sys::NoLock as i32);
        }
    }

    /// # Safety
    /// `row.len() == natts`.
    unsafe fn virtual_slot(&self, row: &Row) -> *mut pg_sys::TupleTableSlot {
        // SAFETY: a virtual slot of the relation's descriptor, filled attribute by attribute.
        unsafe {
            let slot = pg_sys::ExecInitExtraTupleSlot(
                self.estate,
                (*self.rel).rd_att,
                &pg_sys::TTSOpsVirtual,
            );
            pg_sys::ExecClearTuple(slot);
            for (i, v) in row.iter().enumerate() {
                *(*slot).tts_values.add(i) = v.unwrap_or(pg_sys::Datum::from(0));
                *(*slot).tts_isnull.add(i) = v.is_none();
            }
            pg_sys::ExecStoreVirtualTuple(slot);
            slot
        }
    }

    /// Insert a row.
    ///
    /// # Safety
    /// See [`Target::open`].
    pub unsafe fn insert(&self, row: &Row) {
        // SAFETY: slot built for this relation.
        unsafe {
            let slot = self.virtual_slot(row);
            pg_sys::ExecSimpleRelationInsert(self.rri, self.estate, slot);
        }
    }

    /// Find the local row matching `key` (identity columns set, others NULL) and lock it.
    /// Uses the replica identity index, or compares whole rows when there is none
    /// (REPLICA IDENTITY FULL).
    ///
    /// # Safety
    /// See [`Target::open`].
    pub unsafe fn find(&self, key: &Row) -> Option<LocalRow> {
        // SAFETY: both slots belong to this relation and this executor state.
        unsafe {
            let search = self.virtual_slot(key);
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
            ok.then_some(LocalRow { slot: found })
        }
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

    /// Replace `old` by `row`.
    ///
    /// # Safety
    /// `old` was returned by [`Target::find`] on this target.
    pub unsafe fn update(&self, old: &LocalRow, row: &Row) {
        // SAFETY: as in find.
        unsafe {
            let slot = self.virtual_slot(row);
            self.with_epq(|epq| {
                pg_sys::ExecSimpleRelationUpdate(self.rri, self.estate, epq, old.slot, slot)
            });
        }
    }

    /// Delete `old`.
    ///
    /// # Safety
    /// `old` was returned by [`Target::find`] on this target.
    pub unsafe fn delete(&self, old: &LocalRow) {
        // SAFETY: as in update.
        unsafe {
            self.with_epq(|epq| {
                pg_sys::ExecSimpleRelationDelete(self.rri, self.estate, epq, old.slot)
            });
        }
    }
}

/// A locked local row found by [`Target::find`].
pub struct LocalRow {
    slot: *mut pg_sys::TupleTableSlot,
}

impl LocalRow {
    /// Every attribute's datum (NULL as None), valid until the target is closed.
    ///
    /// # Safety
    /// The target that found this row is still open.
    pub unsafe fn values(&self) -> Row {
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
