//! Write stage, raw half: executor-level insert, update, delete and row lookup on a local
//! table, the way PostgreSQL's own logical replication apply does it (`execReplication.c`).
//!
//! Why this way: going through `ExecSimpleRelation*` maintains indexes, checks constraints,
//! computes stored generated columns and queues triggers (only ENABLE REPLICA / ALWAYS
//! ones fire under `session_replication_role = replica`), with no SQL text parsed or
//! planned per row.
//!
//! Invariants: every function here runs inside a transaction with an active snapshot
//! ([`Target::open`] checks both and raises an ERROR otherwise); a [`Target`] is closed with
//! [`Target::close`] (after-trigger queue flushed, executor state freed) before the
//! transaction commits; a [`LocalRow`] borrows the target that found it and is written
//! back only through that target; a row of another width than the table's is an ERROR.
//! Everything that can run code a table's owner wrote (triggers, CHECK and index
//! expressions, type input functions of domains) runs as that owner inside a
//! security-restricted operation ([`crate::pg::owner::as_user`]), as PostgreSQL 16+ native
//! apply does: a table owner cannot make the apply worker act as a superuser.
//!
//! Why the write functions are safe to call: what can be checked is checked (above); what
//! cannot is the datums a [`Row`] holds, so by convention only this module's own functions
//! make them (`tables::InputFn::call`, [`LocalRow::values`], [`Target::fill_defaults`]),
//! in the current (per-change) memory context, and code outside `pg/` only passes them on.
//!
//! Beside it: [`keys`] (a table's key text, unique indexes, key changes),
//! `pg::tables` (catalog facts of local tables) and `pg::owner` (acting as the owner).

pub mod keys;

use crate::pg::owner::as_user;
use crate::pg::tables::relation_name;
use pgrx::pg_sys;
use pgrx::{PgBox, PgList};
use std::ffi::CString;
use std::marker::PhantomData;

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

impl Target {
    pub fn relid(&self) -> pg_sys::Oid {
        // SAFETY: the relation is open while the target lives.
        unsafe { (*self.rel).rd_id }
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
