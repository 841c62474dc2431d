//! Write stage, raw half: executor-level insert, update, delete and row lookup on a local
//! table, the way PostgreSQL's own logical replication apply does it (`execReplication.c`).
//!
//! Why this way: going through `ExecSimpleRelation*` maintains indexes, checks constraints,
//! computes stored generated columns and queues triggers (only ENABLE REPLICA / ALWAYS
//! ones fire under `session_replication_role = replica`), with no SQL text parsed or
//! planned per row.
//!
//! Invariants: every function here runs inside a transaction with an active snapshot
//! ([`Target::begin_change`] checks both and raises an ERROR otherwise), between
//! [`Target::begin_change`] and [`Target::end_change`] (AFTER triggers fired, slots and
//! their buffer pins released); [`Target::end_transaction`] runs before the transaction
//! commits; a [`LocalRow`] borrows the target that found it and is written back only
//! through that target; a row of another width than the table's is an ERROR.
//!
//! Kept across transactions (issue 17): a [`Target`]'s executor state (EState,
//! ResultRelInfo with the IndexInfo of every index, prepared DEFAULT, CHECK and generated
//! column expressions, slots) lives in a memory context of its own under the apply
//! worker's cache context, so a change no longer builds and frees it. What belongs to a
//! transaction is taken again in each one: the table and index locks and relcache
//! references (`table_open` / `index_open` in the first change of a transaction, released
//! by [`Target::end_transaction`]), the command id, the AFTER-trigger query level. The
//! references are *not* held between transactions, as PostgreSQL's own apply does not
//! hold them (`logicalrep_rel_open` opens the table in each transaction): a relcache entry
//! still referenced when another session drops its table makes invalidation processing
//! raise "relation ... deleted while still in use", and DDL in the applying transaction
//! refuses a table this session holds open. So the target is only valid while no relcache
//! invalidation of its table or of one of its indexes has been seen since it was built:
//! the caller drops it on any such invalidation (`write::RelMap`, invariant 16 in
//! ARCHITECTURE.md), and [`Target::begin_change`] also refuses (returns false) when the
//! relcache hands back other entries than the ones the state was built on.
//!
//! Triggers that cannot fire: every replicated table has bdr's own `bdr_tombstone` AFTER
//! UPDATE OR DELETE row trigger (enabled ORIGIN: it records local deletes), and may have
//! user triggers enabled ORIGIN or DISABLED; none of them fires under
//! `session_replication_role = replica`, the apply workers' role. With the trigger
//! descriptor in place `ExecSimpleRelationUpdate`/`Delete` would still fetch the old row
//! again from the heap for the AFTER trigger (`GetTupleForTrigger`) and look at every
//! trigger before queueing nothing. So [`Target::begin_change`] hides the descriptor when
//! the session's role is replica and no trigger of the table is enabled ALWAYS or
//! REPLICA (`TriggerEnabled`'s rule, checked once per built target: `ALTER TABLE ...
//! ENABLE ALWAYS TRIGGER` and every trigger DDL invalidate the table's relcache entry,
//! which drops the target). Nothing that would have run is skipped: the role is read at
//! every change, and the executor's only other uses of the descriptor are transition
//! tables (no transition capture is passed by the `ExecSimpleRelation*` calls) and the
//! BEFORE-row checks, which find no trigger to run either way. Such a change queues no
//! AFTER trigger event, so it opens no AFTER-trigger query level either (the SPI
//! statements a change may run, tombstones and history rows, open their own).
//!
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
//! Beside it: [`keys`] (a table's key text, unique indexes, key changes), `unlocked`
//! (the common remote UPDATE's row found and written without a row lock first),
//! `pg::tables` (catalog facts of local tables) and `pg::owner` (acting as the owner).

pub mod keys;
mod unlocked;

use crate::pg::owner::as_user;
use crate::pg::tables::relation_name;
use bdr_core::idmap::IdMap;
use pgrx::pg_sys;
use pgrx::{PgBox, PgList};
use std::cell::{Cell, RefCell};
use std::ffi::CString;
use std::marker::PhantomData;

/// Put `row` into the virtual slot `slot` (one entry per attribute of its descriptor).
///
/// # Safety
/// `slot` is a virtual slot with at least `row.len()` attributes.
unsafe fn store_row(slot: *mut pg_sys::TupleTableSlot, row: &Row) {
    // SAFETY: the slot's value and null arrays have natts entries.
    // The store is two field writes, made unguarded (it cannot raise); the clear is
    // skipped for an empty slot (the usual case: `end_change` clears them all).
    unsafe {
        crate::pg::unguarded::clear_slot(slot);
        for (i, v) in row.iter().enumerate() {
            *(*slot).tts_values.add(i) = v.unwrap_or(pg_sys::Datum::from(0));
            *(*slot).tts_isnull.add(i) = v.is_none();
        }
        crate::pg::unguarded::ExecStoreVirtualTuple(slot);
    }
}

/// Slots reused change after change (an executor state that lives across transactions
/// must not grow a slot per change): those handed out during the current change are
/// counted, and may be handed out again once it ends.
#[derive(Default)]
struct SlotPool {
    slots: RefCell<Vec<*mut pg_sys::TupleTableSlot>>,
    used: Cell<usize>,
}

impl SlotPool {
    /// The next free slot, made by `make` when every pooled one is in use.
    fn take(
        &self,
        make: impl FnOnce() -> *mut pg_sys::TupleTableSlot,
    ) -> *mut pg_sys::TupleTableSlot {
        let i = self.used.get();
        self.used.set(i + 1);
        let mut slots = self.slots.borrow_mut();
        if i == slots.len() {
            slots.push(make());
        }
        slots[i]
    }

    /// Every slot may be handed out again (the caller clears them).
    fn release(&self) {
        self.used.set(0);
    }
}

/// DEFAULT expressions of the table, prepared once (the executor state keeps them).
struct Defaults {
    econtext: *mut pg_sys::ExprContext,
    /// Per attribute index: its prepared DEFAULT, null when it has none.
    exprs: IdMap<usize, *mut pg_sys::ExprState>,
}

/// A local table opened for writing, with its executor state, kept from one change to the
/// next and across transactions (see "Kept across transactions" in the module note).
pub struct Target {
    relid: pg_sys::Oid,
    rel: pg_sys::Relation,
    estate: *mut pg_sys::EState,
    rri: *mut pg_sys::ResultRelInfo,
    /// The index relations `ExecOpenIndices` opened, in `ri_IndexRelationDescs` order.
    indexes: Vec<pg_sys::Oid>,
    /// The slots' tuple descriptor: a copy of the relation's (with its constraints and
    /// the values of columns added with a default), not reference-counted, so a slot
    /// kept across transactions holds no pin a transaction's resource owner would
    /// report as leaked and drop.
    desc: pg_sys::TupleDesc,
    /// The local transaction (`lxid`) whose references to the table and its indexes this
    /// target holds; `None` between transactions.
    held: Option<u32>,
    /// A change is in progress (`AfterTriggerBeginQuery` called, `end_change` owed).
    in_change: Cell<bool>,
    /// The change opened an AFTER-trigger query level (not when the table's triggers are
    /// hidden, see "Triggers that cannot fire" in the module note).
    trigger_query: Cell<bool>,
    virtual_slots: SlotPool,
    table_slots: SlotPool,
    defaults: RefCell<Option<Defaults>>,
    /// The table's triggers as `InitResultRelInfo` copied them (null: none), and whether
    /// any of them can fire under `session_replication_role = replica` (see
    /// [`Target::begin_change`], "Triggers that cannot fire").
    trigdesc: *mut pg_sys::TriggerDesc,
    trigger_fires_in_replica: bool,
    /// Unique indexes other than the identity index that can find a row, computed on
    /// first use (see [`Target::other_unique_indexes`]).
    unique_others: std::cell::OnceCell<Vec<(pg_sys::Oid, Vec<usize>)>>,
    /// The identity index's scan keys for the unlocked lookup, found on first use
    /// (`unlocked`).
    identity_scan: std::cell::OnceCell<Option<unlocked::IdentityScan>>,
    /// Replica identity index (primary key or chosen index), or InvalidOid.
    pub identity_index: pg_sys::Oid,
    pub natts: usize,
    /// The table's owner: what runs its code runs as this role.
    owner: pg_sys::Oid,
}

/// Whether any trigger of `trigdesc` (null: none) fires under `session_replication_role =
/// replica`: those enabled ALWAYS or REPLICA (trigger.c's `TriggerEnabled`).
///
/// # Safety
/// `trigdesc` is null or a valid trigger descriptor.
unsafe fn fires_in_replica(trigdesc: *const pg_sys::TriggerDesc) -> bool {
    if trigdesc.is_null() {
        return false;
    }
    // SAFETY: `numtriggers` entries in `triggers`.
    unsafe {
        (0..(*trigdesc).numtriggers as usize).any(|i| {
            let enabled = (*(*trigdesc).triggers.add(i)).tgenabled as u8;
            enabled == pg_sys::TRIGGER_FIRES_ALWAYS || enabled == pg_sys::TRIGGER_FIRES_ON_REPLICA
        })
    }
}

/// Values for every attribute of the table (index = attnum - 1); `None` is NULL.
/// The datums (NULL as `None`), one per attribute; inline up to 8 attributes (a
/// few are built per applied change: no allocation for the common narrow table).
pub type Row = smallvec::SmallVec<[Option<pg_sys::Datum>; 8]>;

/// This backend's local transaction id (tells one transaction from the next).
fn current_lxid() -> u32 {
    // SAFETY: MyProc is set for the life of a backend or background worker.
    unsafe { (*pg_sys::MyProc).lxid }
}

impl Target {
    /// Open table `relid` (locked for writing) and build its executor state in a context
    /// of its own under `cxt`, which must outlive the target; the target holds the
    /// table's and its indexes' references for the current transaction.
    ///
    /// # Preconditions
    /// Inside a transaction.
    pub fn build(relid: pg_sys::Oid, cxt: &crate::pg::memcxt::MemCxt) -> Target {
        crate::pg::xact::require_transaction();
        // SAFETY: standard executor setup, as execReplication's callers do it, with every
        // allocation in the executor state's own context (it outlives the transaction).
        unsafe {
            let rel = pg_sys::table_open(relid, pg_sys::RowExclusiveLock as i32);
            let outer = pg_sys::MemoryContextSwitchTo(cxt.raw());
            let estate = pg_sys::CreateExecutorState();
            pg_sys::MemoryContextSwitchTo((*estate).es_query_cxt);
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
            // AFTER triggers find their relation here instead of opening it again.
            (*estate).es_opened_result_relations =
                pg_sys::lappend((*estate).es_opened_result_relations, rri.cast());
            pg_sys::ExecOpenIndices(rri, false);
            let desc = pg_sys::CreateTupleDescCopyConstr((*rel).rd_att);
            // The slots triggers use, made here with that descriptor before the executor
            // makes them (pinned) on first use.
            let ops = pg_sys::table_slot_callbacks(rel);
            (*rri).ri_TrigOldSlot = pg_sys::ExecInitExtraTupleSlot(estate, desc, ops);
            (*rri).ri_TrigNewSlot = pg_sys::ExecInitExtraTupleSlot(estate, desc, ops);
            pg_sys::MemoryContextSwitchTo(outer);
            let indexes = (0..(*rri).ri_NumIndices as usize)
                .map(|i| (**(*rri).ri_IndexRelationDescs.add(i)).rd_id)
                .collect();
            let trigdesc = (*rri).ri_TrigDesc;
            Target {
                relid,
                rel,
                estate,
                rri,
                indexes,
                desc,
                trigdesc,
                trigger_fires_in_replica: fires_in_replica(trigdesc),
                held: Some(current_lxid()),
                in_change: Cell::new(false),
                trigger_query: Cell::new(false),
                virtual_slots: SlotPool::default(),
                table_slots: SlotPool::default(),
                defaults: RefCell::new(None),
                unique_others: std::cell::OnceCell::new(),
                identity_scan: std::cell::OnceCell::new(),
                identity_index: pg_sys::RelationGetReplicaIndex(rel),
                natts: (*(*rel).rd_att).natts as usize,
                owner: (*(*rel).rd_rel).relowner,
            }
        }
    }

    /// The index relations this target writes (an invalidation of any of them, as of the
    /// table, makes the target stale).
    pub fn indexes(&self) -> &[pg_sys::Oid] {
        &self.indexes
    }

    /// Start a change: in a new transaction, lock and re-open the table and its indexes
    /// (the references of the last one were released at its end); then set what belongs
    /// to this transaction and change (command id, the AFTER-trigger query level).
    /// `false`: the relcache gave other entries than the ones this state was built on
    /// (the table or an index was rebuilt): drop this target and build a new one.
    ///
    /// # Preconditions
    /// Inside a transaction with an active snapshot, the table's invalidations taken and
    /// found not to concern this target; [`Target::end_change`] before the next call.
    pub fn begin_change(&mut self) -> bool {
        crate::pg::xact::require_transaction();
        // SAFETY: a plain read of the snapshot stack (cannot raise).
        if !unsafe { crate::pg::unguarded::ActiveSnapshotSet() } {
            crate::error::internal("table write without an active snapshot");
        }
        let lxid = current_lxid();
        if self.held != Some(lxid) {
            self.held = None;
            // SAFETY: references taken under the transaction's resource owner; each is
            // released again before returning false, or at the transaction's end. The
            // table and its indexes are opened under one guard (the closure holds only
            // plain values); a mismatch is undone after it.
            unsafe {
                use crate::pg::unguarded::{guarded, raw};
                let (relid, want_rel, rri) = (self.relid, self.rel, self.rri);
                let indexes = self.indexes.as_slice();
                let lock = pg_sys::RowExclusiveLock as i32;
                let (rel, opened, wrong) = guarded(|| {
                    let rel = raw::table_open(relid, lock);
                    if rel != want_rel {
                        return (rel, 0, std::ptr::null_mut());
                    }
                    for (i, &oid) in indexes.iter().enumerate() {
                        let idx = raw::index_open(oid, lock);
                        if idx != *(*rri).ri_IndexRelationDescs.add(i) {
                            return (rel, i, idx);
                        }
                    }
                    (rel, indexes.len(), std::ptr::null_mut())
                });
                if rel != self.rel || !wrong.is_null() {
                    if !wrong.is_null() {
                        pg_sys::index_close(wrong, pg_sys::NoLock as i32);
                    }
                    for k in 0..opened {
                        pg_sys::index_close(
                            *(*self.rri).ri_IndexRelationDescs.add(k),
                            pg_sys::NoLock as i32,
                        );
                    }
                    pg_sys::table_close(rel, pg_sys::NoLock as i32);
                    return false;
                }
            }
            self.held = Some(lxid);
        }
        // SAFETY: the executor state is this target's; one query level per change. The
        // trigger descriptor is the one built with it, or none when none of its triggers
        // can fire in this session (see "Triggers that cannot fire" in the module note).
        unsafe {
            let replica =
                pg_sys::SessionReplicationRole == pg_sys::SESSION_REPLICATION_ROLE_REPLICA as i32;
            let hidden = replica && !self.trigger_fires_in_replica;
            (*self.rri).ri_TrigDesc = if hidden {
                std::ptr::null_mut()
            } else {
                self.trigdesc
            };
            (*self.estate).es_output_cid = crate::pg::unguarded::GetCurrentCommandId(true);
            // Without a trigger descriptor the writes queue no AFTER trigger event (SPI
            // statements a change runs queue theirs at their own query level).
            if !hidden {
                crate::pg::unguarded::AfterTriggerBeginQuery();
            }
            self.trigger_query.set(!hidden);
        }
        self.in_change.set(true);
        true
    }

    /// End a change: fire its AFTER triggers (as the owner), release the slots it used
    /// (and their buffer pins) and the per-row expression memory.
    ///
    /// # Preconditions
    /// After [`Target::begin_change`], in the same transaction.
    pub fn end_change(&self) {
        if !self.in_change.replace(false) {
            return;
        }
        // SAFETY: reverses begin_change's query level; the slots and expression contexts
        // belong to this executor state.
        unsafe {
            if self.trigger_query.replace(false) {
                as_user(self.owner, || pg_sys::AfterTriggerEndQuery(self.estate));
                self.close_trigger_relations();
            }
            self.virtual_slots.release();
            self.table_slots.release();
            // Every slot of the state, the executor's own too (BEFORE UPDATE triggers
            // fetch the old row into `ri_TrigOldSlot`): no buffer pin outlives the change.
            crate::pg::unguarded::clear_slots((*self.estate).es_tupleTable);
            let per_tuple = (*self.estate).es_per_tuple_exprcontext;
            if !per_tuple.is_null() {
                crate::pg::unguarded::reset_context((*per_tuple).ecxt_per_tuple_memory);
            }
            if let Some(d) = self.defaults.borrow().as_ref() {
                crate::pg::unguarded::reset_context((*d.econtext).ecxt_per_tuple_memory);
            }
        }
    }

    /// Close relations AFTER triggers opened for themselves (none expected: the target's
    /// own relation is found in `es_opened_result_relations`), so no reference outlives
    /// the transaction.
    ///
    /// # Safety
    /// Inside the transaction that opened them.
    unsafe fn close_trigger_relations(&self) {
        // SAFETY: a list of ResultRelInfo whose relations were opened with NoLock.
        unsafe {
            let list = (*self.estate).es_trig_target_relations;
            if list.is_null() {
                return;
            }
            for r in PgList::<pg_sys::ResultRelInfo>::from_pg(list).iter_ptr() {
                pg_sys::table_close((*r).ri_RelationDesc, pg_sys::NoLock as i32);
            }
            (*self.estate).es_trig_target_relations = std::ptr::null_mut();
        }
    }

    /// The transaction ends: release the references to the table and its indexes (the
    /// locks stay until the end, as with any table). Call before it commits.
    pub fn end_transaction(&mut self) {
        self.end_change();
        if self.held.take() != Some(current_lxid()) {
            return;
        }
        // SAFETY: the references this transaction took (build or begin_change), given
        // back under one guard (the closure holds only plain values).
        unsafe {
            use crate::pg::unguarded::{guarded, raw};
            let (rel, rri, n) = (self.rel, self.rri, self.indexes.len());
            guarded(|| {
                for i in 0..n {
                    raw::index_close(*(*rri).ri_IndexRelationDescs.add(i), pg_sys::NoLock as i32);
                }
                raw::table_close(rel, pg_sys::NoLock as i32);
            });
        }
    }

    /// # Safety
    /// See [`Target::begin_change`]. A row of another width than the table's is refused
    /// with an ERROR (the table changed under a cached mapping), never stored.
    unsafe fn virtual_slot(&self, row: &Row) -> *mut pg_sys::TupleTableSlot {
        if row.len() != self.natts {
            crate::error::raise(&crate::error::ApplyError::ShapeChanged {
                table: relation_name(self.relid()),
                what: format!("{} columns now, {} in the row", self.natts, row.len()),
            });
        }
        // SAFETY: a virtual slot of the relation's descriptor, made in the executor
        // state's context, filled attribute by attribute.
        unsafe {
            let slot = self.virtual_slots.take(|| {
                self.in_query_cxt(|| {
                    pg_sys::ExecInitExtraTupleSlot(self.estate, self.desc, &pg_sys::TTSOpsVirtual)
                })
            });
            store_row(slot, row);
            slot
        }
    }

    /// A slot for a row of the table found by an index scan.
    ///
    /// # Safety
    /// See [`Target::begin_change`].
    unsafe fn table_slot(&self) -> *mut pg_sys::TupleTableSlot {
        self.table_slots.take(|| {
            // SAFETY: made in the executor state's context, listed in its tuple table.
            self.in_query_cxt(|| unsafe {
                pg_sys::ExecInitExtraTupleSlot(
                    self.estate,
                    self.desc,
                    pg_sys::table_slot_callbacks(self.rel),
                )
            })
        })
    }

    /// Run `f` with the executor state's (long-lived) context current.
    fn in_query_cxt<R>(&self, f: impl FnOnce() -> R) -> R {
        // SAFETY: the context lives as long as the executor state.
        let outer = unsafe { pg_sys::MemoryContextSwitchTo((*self.estate).es_query_cxt) };
        let r = f();
        // SAFETY: restores the caller's context.
        unsafe { pg_sys::MemoryContextSwitchTo(outer) };
        r
    }

    /// Give the attributes `attrs` of a row to be inserted their DEFAULT (computed as the
    /// table's owner); attributes without one stay NULL.
    ///
    /// # Preconditions
    /// See [`Target::begin_change`]; `row` has one entry per attribute.
    pub fn fill_defaults(&self, row: &mut Row, attrs: &[usize]) {
        if attrs.is_empty() {
            return;
        }
        let mut defaults = self.defaults.borrow_mut();
        // SAFETY: default expressions of this relation, built and prepared once in its
        // executor state's context, evaluated in its expression context; results live in
        // the current (per-change) memory context.
        let d = defaults.get_or_insert_with(|| Defaults {
            econtext: unsafe { pg_sys::CreateExprContext(self.estate) },
            exprs: IdMap::default(),
        });
        as_user(self.owner, || unsafe {
            for &i in attrs {
                let state = *d.exprs.entry(i).or_insert_with(|| {
                    self.in_query_cxt(|| {
                        let expr = pg_sys::build_column_default(self.rel, i as i32 + 1);
                        if expr.is_null() {
                            std::ptr::null_mut()
                        } else {
                            pg_sys::ExecPrepareExpr(expr as *mut pg_sys::Expr, self.estate)
                        }
                    })
                });
                if state.is_null() {
                    continue;
                }
                let mut isnull = false;
                let v = pg_sys::ExecEvalExpr(state, d.econtext, &mut isnull);
                row[i] = (!isnull).then_some(v);
            }
        })
    }

    /// Insert a row.
    ///
    /// # Preconditions
    /// See [`Target::begin_change`].
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
        // SAFETY: the relation is open.
        let constr = unsafe { (*(*self.rel).rd_att).constr };
        !self.fires(|t| t.trig_insert_before_row)
            // SAFETY: as above; constr is null or the relation's constraint description.
            && (constr.is_null() || !unsafe { (*constr).has_generated_stored })
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
    /// See [`Target::begin_change`]; only when [`Target::can_try_insert`].
    pub fn try_insert(&self, row: &Row) -> bool {
        self.insert_checking_keys(row, true)
    }

    /// Insert `row` as an ordinary insertion whose index entries are checked as they are
    /// made, as [`Target::try_insert`] does, without the speculative insertion's token
    /// lock and confirmation (a lock-table entry taken and released and a second WAL
    /// record per row: ~4,300 instructions of a one-row transaction's ~39,600). `false`:
    /// some unique index already held one of its keys, and **the row and its index
    /// entries stay written**: the transaction must be rolled back (and applied again,
    /// the careful way). Until it is, `xact::must_roll_back` makes every
    /// commit here raise instead, so a duplicate key can never be
    /// committed. A rolled-back row leaves nothing for logical decoding, so no consumer
    /// of this node's changes sees it.
    ///
    /// # Preconditions
    /// See [`Target::begin_change`]; only when [`Target::can_try_insert`].
    pub fn insert_or_clash(&self, row: &Row) -> bool {
        let ok = self.insert_checking_keys(row, false);
        if !ok {
            crate::pg::xact::must_roll_back();
        }
        ok
    }

    /// The steps of ExecSimpleRelationInsert with the index entries checked as they are
    /// made (`noDupErr`, as ExecInsert's ON CONFLICT branch does); the row is a
    /// speculative insertion, undone on a clash, when `speculative`.
    fn insert_checking_keys(&self, row: &Row, speculative: bool) -> bool {
        // SAFETY: the caller's preconditions (see `begin_change`).
        let slot = unsafe { self.virtual_slot(row) };
        // SAFETY: a plain read of the relation's table access method.
        let (insert, insert_speculative, complete) = unsafe {
            let am = (*self.rel).rd_tableam;
            (
                (*am).tuple_insert,
                (*am).tuple_insert_speculative,
                (*am).tuple_complete_speculative,
            )
        };
        let (Some(insert), Some(insert_speculative), Some(complete)) =
            (insert, insert_speculative, complete)
        else {
            pgrx::error!(
                "bdr: table {} uses a table access method without speculative insertion",
                relation_name(self.relid)
            );
        };
        let (rel, rri, estate) = (self.rel, self.rri, self.estate);
        // SAFETY: the steps of ExecSimpleRelationInsert, with the speculative insertion
        // protocol of ExecInsert's ON CONFLICT branch around the heap and index writes
        // when `speculative`.
        as_user(self.owner, || unsafe {
            use crate::pg::unguarded::{guarded, raw};
            // Every step under one guard (they were ten guarded calls per applied INSERT);
            // the closure holds only plain values.
            guarded(|| {
                raw::CheckCmdReplicaIdentity(rel, pg_sys::CmdType::CMD_INSERT);
                if !(*(*rel).rd_att).constr.is_null() {
                    raw::ExecConstraints(rri, slot, estate);
                }
                if (*(*rel).rd_rel).relispartition {
                    raw::ExecPartitionCheck(rri, slot, estate, true);
                }
                let cid = (*estate).es_output_cid;
                // table_tuple_insert(_speculative), inline functions: the AM's callbacks.
                let (xid, token) = if speculative {
                    let xid = raw::GetCurrentTransactionId();
                    let token = raw::SpeculativeInsertionLockAcquire(xid);
                    insert_speculative(rel, slot, cid, 0, std::ptr::null_mut(), token);
                    (xid, token)
                } else {
                    insert(rel, slot, cid, 0, std::ptr::null_mut());
                    (pg_sys::TransactionId::from(0u32), 0)
                };
                let mut clash = false;
                let clashing = if (*rri).ri_NumIndices > 0 {
                    raw::ExecInsertIndexTuples(
                        rri,
                        slot,
                        estate,
                        false,
                        true,
                        &mut clash,
                        std::ptr::null_mut(),
                    )
                } else {
                    std::ptr::null_mut()
                };
                // Any index listed (a unique, deferrable or exclusion one) is a possible
                // clash.
                let ok = !clash && clashing.is_null();
                if speculative {
                    // table_tuple_complete_speculative, likewise.
                    complete(rel, slot, token, ok);
                    raw::SpeculativeInsertionLockRelease(xid);
                }
                raw::list_free(clashing);
                if ok {
                    raw::ExecARInsertTriggers(
                        estate,
                        rri,
                        slot,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                    );
                }
                ok
            })
        })
    }

    /// Find the local row matching `key` (identity columns set, others NULL) and lock it.
    /// Uses the replica identity index, or compares whole rows when there is none
    /// (REPLICA IDENTITY FULL).
    ///
    /// # Preconditions
    /// See [`Target::begin_change`].
    pub fn find(&self, key: &Row) -> Option<LocalRow<'_>> {
        // SAFETY: both slots belong to this relation and this executor state.
        let search = unsafe { self.virtual_slot(key) };
        let found = unsafe { self.table_slot() };
        let (rel, index) = (self.rel, self.identity_index);
        // SAFETY: the lookup, then (found) the row's attributes and xmin read into the
        // slot, under one guard: every caller reads both. The closure holds pointers
        // and plain values only.
        let xmin = as_user(self.owner, || unsafe {
            use crate::pg::unguarded::{guarded, raw};
            guarded(|| {
                let mode = pg_sys::LockTupleMode::LockTupleExclusive;
                let ok = if index != pg_sys::InvalidOid {
                    raw::RelationFindReplTupleByIndex(rel, index, mode, search, found)
                } else {
                    raw::RelationFindReplTupleSeq(rel, mode, search, found)
                };
                if !ok {
                    return None;
                }
                Some(read_found(found))
            })
        })?;
        Some(self.found_row(found, xmin))
    }

    /// The row a lookup of this target found in `found` (see [`read_found`]).
    fn found_row(
        &self,
        found: *mut pg_sys::TupleTableSlot,
        xmin: pg_sys::TransactionId,
    ) -> LocalRow<'_> {
        LocalRow {
            slot: found,
            estate: self.estate,
            xmin,
            _target: PhantomData,
        }
    }

    /// Whether the trigger descriptor this change runs with (none while the table's
    /// triggers are hidden, see `begin_change`) has the triggers `which` picks (e.g.
    /// `trig_update_before_row`).
    fn fires(&self, which: impl FnOnce(&pg_sys::TriggerDesc) -> bool) -> bool {
        // SAFETY: the result relation info and its trigger description (if any) live as
        // long as the target.
        unsafe {
            let trig = (*self.rri).ri_TrigDesc;
            !trig.is_null() && which(&*trig)
        }
    }

    /// Run `f` with an initialised EvalPlanQual state, ended afterwards, when the table
    /// has BEFORE ROW triggers for the operation (`before_row` of its trigger
    /// description): ExecSimpleRelationUpdate and ...Delete use it only to run those.
    /// Without such triggers `f` gets a null pointer (most tables: the set-up and
    /// tear-down are skipped for every change).
    ///
    /// # Safety
    /// See [`Target::begin_change`].
    unsafe fn with_epq(
        &self,
        before_row: impl FnOnce(&pg_sys::TriggerDesc) -> bool,
        f: impl FnOnce(*mut pg_sys::EPQState),
    ) {
        if !self.fires(before_row) {
            f(std::ptr::null_mut());
            return;
        }
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
            crate::error::internal("a row written through another table's target");
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
                self.with_epq(
                    |t| t.trig_update_before_row,
                    |epq| {
                        let (rri, estate, old) = (self.rri, self.estate, old.slot);
                        crate::pg::unguarded::guarded(|| {
                            crate::pg::unguarded::raw::ExecSimpleRelationUpdate(
                                rri, estate, epq, old, slot,
                            )
                        })
                    },
                )
            });
        }
    }

    /// Replace `old` by `row` as [`Target::update`] does, with the new entries of the
    /// unique indexes `checked` (those the caller looked `row`'s keys up in) checked as
    /// they are made, as [`Target::insert_or_clash`] does. `false`: one of them already
    /// held the key (a row another process wrote after the lookup, committed or not), and
    /// **the row and its index entries stay written**: the transaction must be rolled
    /// back, and `xact::must_roll_back` makes every commit here raise until it is.
    /// A duplicate in any other unique index raises, as in [`Target::update`].
    ///
    /// # Preconditions
    /// `old` was returned by [`Target::find`] on this target; `checked` are indexes of
    /// this table.
    pub fn update_or_clash(&self, old: &LocalRow, row: &Row, checked: &[pg_sys::Oid]) -> bool {
        self.own(old);
        let mut written = unlocked::Written::Done;
        // SAFETY: as in find (see write_update).
        unsafe {
            let slot = self.virtual_slot(row);
            let out = &mut written;
            as_user(self.owner, || {
                self.with_epq(
                    |t| t.trig_update_before_row,
                    |epq| *out = self.write_update(epq, old.slot, slot, Some(checked)),
                )
            });
        }
        match written {
            unlocked::Written::Done => true,
            unlocked::Written::Clash => {
                crate::pg::xact::must_roll_back();
                false
            }
            other => self.update_failed(other, false),
        }
    }

    /// The steps of `ExecSimpleRelationUpdate` (PostgreSQL 15) replacing the row in
    /// `old` by `slot`'s, with the table's `tuple_update` called directly, so that a row
    /// changed since the lookup comes back as [`unlocked::Written::Changed`] (nothing
    /// written) instead of an ERROR; with `checked`, the new entries of those unique
    /// indexes are checked as they are made, as `ExecInsert`'s ON CONFLICT branch does
    /// (`noDupErr`, arbiter indexes), and a taken key comes back as
    /// [`unlocked::Written::Clash`] with **the row and its index entries written**.
    ///
    /// # Safety
    /// See [`Target::begin_change`]; `old` holds a row this target found in this change,
    /// `slot` the new row; `epq` is null or the EvalPlanQual state of [`Target::with_epq`].
    /// Runs as the table's owner (the caller's `as_user`).
    unsafe fn write_update(
        &self,
        epq: *mut pg_sys::EPQState,
        old: *mut pg_sys::TupleTableSlot,
        slot: *mut pg_sys::TupleTableSlot,
        checked: Option<&[pg_sys::Oid]>,
    ) -> unlocked::Written {
        use crate::pg::unguarded::{guarded, raw};
        use unlocked::Written;
        let (rel, rri, estate) = (self.rel, self.rri, self.estate);
        // SAFETY: see the preconditions. The closure holds only pointers, plain values
        // and a slice; the arbiter list is built in the current context.
        unsafe {
            guarded(|| {
                let tid = &mut (*old).tts_tid as pg_sys::ItemPointer;
                raw::CheckCmdReplicaIdentity(rel, pg_sys::CmdType::CMD_UPDATE);
                let trig = (*rri).ri_TrigDesc;
                if !trig.is_null()
                    && (*trig).trig_update_before_row
                    && !raw::ExecBRUpdateTriggers(
                        estate,
                        epq,
                        rri,
                        tid,
                        std::ptr::null_mut(),
                        slot,
                        std::ptr::null_mut(),
                    )
                {
                    // A trigger said "do nothing".
                    return Written::Done;
                }
                let constr = (*(*rel).rd_att).constr;
                if !constr.is_null() && (*constr).has_generated_stored {
                    raw::ExecComputeStoredGenerated(rri, estate, slot, pg_sys::CmdType::CMD_UPDATE);
                }
                if !constr.is_null() {
                    raw::ExecConstraints(rri, slot, estate);
                }
                if (*(*rel).rd_rel).relispartition {
                    raw::ExecPartitionCheck(rri, slot, estate, true);
                }
                let Some(update) = (*(*rel).rd_tableam).tuple_update else {
                    return Written::Failed(u32::MAX);
                };
                let mut update_indexes = false;
                let mut tmfd: pg_sys::TM_FailureData = std::mem::zeroed();
                let mut lockmode: pg_sys::LockTupleMode::Type = 0;
                // As simple_table_tuple_update: wait for a transaction writing the row.
                let res = update(
                    rel,
                    tid,
                    slot,
                    crate::pg::unguarded::GetCurrentCommandId(true),
                    (*estate).es_snapshot,
                    std::ptr::null_mut(),
                    true,
                    &mut tmfd,
                    &mut lockmode,
                    &mut update_indexes,
                );
                if let w @ (Written::Changed(_) | Written::Failed(_)) = Written::of(res) {
                    return w;
                }
                let mut recheck = std::ptr::null_mut();
                let mut clash = false;
                if (*rri).ri_NumIndices > 0 && update_indexes {
                    let mut arbiters = std::ptr::null_mut();
                    for index in checked.unwrap_or_default() {
                        arbiters = raw::lappend_oid(arbiters, *index);
                    }
                    // Without arbiters, as ExecSimpleRelationUpdate: a duplicate raises.
                    let no_dup_err = !arbiters.is_null();
                    let spec = if no_dup_err {
                        &mut clash as *mut bool
                    } else {
                        std::ptr::null_mut()
                    };
                    recheck = raw::ExecInsertIndexTuples(
                        rri, slot, estate, true, no_dup_err, spec, arbiters,
                    );
                    raw::list_free(arbiters);
                }
                if !clash {
                    raw::ExecARUpdateTriggers(
                        estate,
                        rri,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        tid,
                        std::ptr::null_mut(),
                        slot,
                        recheck,
                        std::ptr::null_mut(),
                        false,
                    );
                }
                raw::list_free(recheck);
                if clash {
                    Written::Clash
                } else {
                    Written::Done
                }
            })
        }
    }

    /// What `simple_table_tuple_update` (`delete`: `..._delete`) raises for what the
    /// table's `tuple_update` (`tuple_delete`) reported (see [`Target::write_update`]).
    #[cold]
    fn update_failed(&self, w: unlocked::Written, delete: bool) -> ! {
        use pg_sys::TM_Result as tm;
        let (done, call) = if delete {
            ("deleted", "delete")
        } else {
            ("updated", "update")
        };
        match w {
            unlocked::Written::Changed(r) if r == tm::TM_Updated => {
                pgrx::error!("tuple concurrently updated")
            }
            unlocked::Written::Changed(_) => pgrx::error!("tuple concurrently deleted"),
            unlocked::Written::Failed(r) if r == tm::TM_SelfModified => {
                pgrx::error!("tuple already {done} by self")
            }
            unlocked::Written::Failed(r) => {
                pgrx::error!("unrecognized table_tuple_{call} status: {r}")
            }
            _ => crate::error::internal("an update reported as failed that did not fail"),
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
                self.with_epq(
                    |t| t.trig_delete_before_row,
                    |epq| {
                        let (rri, estate, old) = (self.rri, self.estate, old.slot);
                        crate::pg::unguarded::guarded(|| {
                            crate::pg::unguarded::raw::ExecSimpleRelationDelete(
                                rri, estate, epq, old,
                            )
                        })
                    },
                )
            });
        }
    }
}

/// A locked local row found by [`Target::find`], valid while the target that found it
/// is open (the borrow keeps it so).
pub struct LocalRow<'t> {
    slot: *mut pg_sys::TupleTableSlot,
    /// The xid that wrote it, when read with the lookup (0: read on demand).
    xmin: pg_sys::TransactionId,
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
        // SAFETY: slot_getallattrs (here its out-of-line part, when not done with the
        // lookup) fills tts_values/tts_isnull for natts attributes.
        unsafe {
            let slot = self.slot;
            let natts = (*(*slot).tts_tupleDescriptor).natts;
            if i32::from((*slot).tts_nvalid) < natts {
                crate::pg::unguarded::guarded(|| {
                    crate::pg::unguarded::raw::slot_getsomeattrs_int(slot, natts)
                });
            }
            let n = natts as usize;
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
        self.relid
    }
}

impl Drop for Target {
    /// Release what the current transaction holds (if any) and free the executor state.
    /// Nothing while an error unwinds: the transaction's abort releases the references
    /// and the worker exits.
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        // SAFETY: outside a transaction nothing is held (released at its end or by its
        // abort); the slots were cleared when their change ended.
        unsafe {
            if pg_sys::IsTransactionState() {
                self.end_transaction();
            }
            pg_sys::ExecResetTupleTable((*self.estate).es_tupleTable, false);
            pg_sys::FreeExecutorState(self.estate);
        }
    }
}

impl LocalRow<'_> {
    /// The xid that wrote this row version.
    ///
    /// # Preconditions
    /// The target that found this row is still open.
    pub fn xmin(&self) -> pg_sys::TransactionId {
        if self.xmin != pg_sys::InvalidTransactionId {
            return self.xmin;
        }
        let slot = self.slot;
        // SAFETY: see read_xmin; the closure holds a pointer only.
        unsafe { crate::pg::unguarded::guarded(|| read_xmin(slot)) }
    }

    /// Whether `other` is this very row version (the same tuple id): a lookup by another
    /// unique index can find the row a change is about.
    ///
    /// # Preconditions
    /// The targets that found both rows are still open.
    pub fn same_tuple(&self, other: &LocalRow) -> bool {
        // SAFETY: both slots hold a row (found by a lookup), whose tuple id is set.
        unsafe {
            let (a, b) = (&(*self.slot).tts_tid, &(*other.slot).tts_tid);
            a.ip_blkid.bi_hi == b.ip_blkid.bi_hi
                && a.ip_blkid.bi_lo == b.ip_blkid.bi_lo
                && a.ip_posid == b.ip_posid
        }
    }
}

/// Every attribute of the row a lookup found in `found` read into the slot, and its xmin
/// (every caller of a lookup reads both: one guard for all of it).
///
/// # Safety
/// Inside a guard; `found` is a table slot holding the row found.
unsafe fn read_found(found: *mut pg_sys::TupleTableSlot) -> pg_sys::TransactionId {
    use crate::pg::unguarded::raw;
    // SAFETY: see the preconditions; slot_getsomeattrs_int fills natts attributes.
    unsafe {
        let natts = (*(*found).tts_tupleDescriptor).natts;
        if i32::from((*found).tts_nvalid) < natts {
            raw::slot_getsomeattrs_int(found, natts);
        }
        read_xmin(found)
    }
}

/// The xmin of the row in `slot` (slot_getsysattr, an inline function: the slot's own
/// callback).
///
/// # Safety
/// Inside a guard; `slot` is a heap tuple slot holding a row (which has the xmin system
/// attribute).
unsafe fn read_xmin(slot: *mut pg_sys::TupleTableSlot) -> pg_sys::TransactionId {
    // SAFETY: see the preconditions.
    unsafe {
        let mut isnull = false;
        let d = match (*(*slot).tts_ops).getsysattr {
            Some(get) => get(slot, pg_sys::MinTransactionIdAttributeNumber, &mut isnull),
            None => pg_sys::Datum::from(0usize),
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
                xmin: pg_sys::InvalidTransactionId,
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
        &smallvec::smallvec![Some(pg_sys::Datum::from(oid)), Some(text_datum)],
    )
}
