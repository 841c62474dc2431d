//! Write stage, raw half: a remote UPDATE's (or DELETE's) row found and written without
//! locking it first (issue 17).
//!
//! Why: PostgreSQL's apply locks the row it finds before it updates it
//! (`RelationFindReplTupleByIndex` ends with `table_tuple_lock`, `LockTupleExclusive`), and
//! so did bdr, pglogical and BDR 1. The lock is a pass through `heap_lock_tuple` and a WAL
//! record of its own (`XLOG_HEAP_LOCK`, which then carries the page's full image after a
//! checkpoint), about 7,000 instructions of a single-row UPDATE's 90,000 (callgrind,
//! `bdr-bench count-update`). `heap_update` makes the same check itself: it waits for a
//! transaction writing the row and reports a row updated or deleted since the lookup
//! (`TM_Updated`, `TM_Deleted`). So for the common remote UPDATE the row is looked up
//! without a lock ([`Target::find_unlocked`]) and updated with the table's
//! `tuple_update`; when it reports the row changed since, nothing was written and the
//! conflict stage looks the row up and decides again ([`Target::update_unlocked`] returns
//! `false`). The lookup also builds its scan keys from what the target keeps (the
//! identity index's equality functions, found once per target) instead of four catalog
//! cache lookups per key column, and uses the index the target holds open.
//!
//! Used only where nothing else relies on the lock (the caller checks
//! [`Target::can_update_unlocked`] and more): no BEFORE UPDATE trigger fires (it would
//! fetch and lock the row itself, with EvalPlanQual), the identity index is the table's
//! only unique index and the change keeps its key (nothing else is looked up between the
//! lookup and the update), and the transaction is not a streamed one (whose waiting
//! changes keep the row they looked up locked until the commit). A remote DELETE sent
//! with its key likewise ([`Target::can_delete_unlocked`], [`Target::delete_unlocked`]:
//! `tuple_delete`, the same give-way).
//!
//! Invariants: the lookup is `RelationFindReplTupleByIndex`'s without its last step — a
//! dirty snapshot, and a row some transaction is writing is waited for and looked up
//! again — so the row found is the newest committed version, as there; the update writes
//! only that version (`heap_update` refuses any other), so a decision taken on it holds.

use super::{LocalRow, Row, Target};
use crate::pg::owner::as_user;
use crate::pg::unguarded::{guarded, raw};
use pgrx::pg_sys;

/// The identity index's scan keys as the target keeps them: where the index sits in the
/// result relation's index list, and per key column the table's attribute index, the
/// equality function and the collation.
pub(super) struct IdentityScan {
    index_pos: usize,
    keys: Vec<(usize, pg_sys::RegProcedure, pg_sys::Oid)>,
}

/// What a write through the table's `tuple_update` or `tuple_delete` came to.
pub(super) enum Written {
    /// The row was replaced (or a BEFORE trigger said "do nothing").
    Done,
    /// A key of the new row was already taken in an index `update_or_clash` checks.
    Clash,
    /// The row was updated or deleted by another transaction since the lookup
    /// (`TM_Updated`, `TM_Deleted`): nothing was written.
    Changed(pg_sys::TM_Result::Type),
    /// Anything else the table's access method reported (nothing was written).
    Failed(pg_sys::TM_Result::Type),
}

impl Written {
    /// What the table's `tuple_update` or `tuple_delete` returned, as a write's outcome.
    pub(super) fn of(res: pg_sys::TM_Result::Type) -> Written {
        use pg_sys::TM_Result as tm;
        if res == tm::TM_Ok {
            Written::Done
        } else if res == tm::TM_Updated || res == tm::TM_Deleted {
            Written::Changed(res)
        } else {
            Written::Failed(res)
        }
    }
}

impl Target {
    /// The identity index's scan keys, found on first use (`None`: no identity index, or
    /// one this lookup does not handle; the locking lookup then serves).
    fn identity_scan(&self) -> Option<&IdentityScan> {
        self.identity_scan
            .get_or_init(|| {
                let pos = self
                    .indexes
                    .iter()
                    .position(|&o| o == self.identity_index)?;
                // SAFETY: the index is open (this target's, in `ri_IndexRelationDescs`
                // order); its relcache entry holds one opfamily, input type and collation
                // per key column; the catalog lookups may raise (pgrx's guards).
                unsafe {
                    let idx = *(*self.rri).ri_IndexRelationDescs.add(pos);
                    let form = &*(*idx).rd_index;
                    let nkeys = form.indnkeyatts as usize;
                    let mut keys = Vec::with_capacity(nkeys);
                    for k in 0..nkeys {
                        let attno = *form.indkey.values.as_ptr().add(k);
                        if attno <= 0 {
                            return None;
                        }
                        let (family, input) =
                            (*(*idx).rd_opfamily.add(k), *(*idx).rd_opcintype.add(k));
                        let op = pg_sys::get_opfamily_member(
                            family,
                            input,
                            input,
                            pg_sys::BTEqualStrategyNumber as i16,
                        );
                        if op == pg_sys::InvalidOid {
                            return None;
                        }
                        let collation = *(*idx).rd_indcollation.add(k);
                        keys.push((attno as usize - 1, pg_sys::get_opcode(op), collation));
                    }
                    Some(IdentityScan {
                        index_pos: pos,
                        keys,
                    })
                }
            })
            .as_ref()
    }

    /// Whether a remote DELETE of this table can take [`Target::find_unlocked`] and
    /// [`Target::delete_unlocked`]: an identity index this lookup handles and no BEFORE
    /// DELETE row trigger that fires in this change (the change must not be streamed:
    /// the caller's part).
    ///
    /// # Preconditions
    /// See [`Target::begin_change`].
    pub fn can_delete_unlocked(&self) -> bool {
        !self.fires(|t| t.trig_delete_before_row) && self.identity_scan().is_some()
    }

    /// Whether a remote UPDATE of this table can take [`Target::find_unlocked`] and
    /// [`Target::update_unlocked`] as far as the table goes: an identity index this
    /// lookup handles, no other unique index, no BEFORE UPDATE row trigger that fires in
    /// this change. (The change itself must keep its key, and not be streamed: the
    /// caller's part.)
    ///
    /// # Preconditions
    /// See [`Target::begin_change`].
    pub fn can_update_unlocked(&self) -> bool {
        !self.fires(|t| t.trig_update_before_row)
            && self.other_unique_indexes().is_empty()
            && self.identity_scan().is_some()
    }

    /// Find the local row whose identity key equals `key`'s, without locking it (see the
    /// module note). A row another transaction is writing is waited for, then looked up
    /// again.
    ///
    /// # Preconditions
    /// See [`Target::begin_change`]; only after [`Target::can_update_unlocked`] or
    /// [`Target::can_delete_unlocked`].
    pub fn find_unlocked(&self, key: &Row) -> Option<LocalRow<'_>> {
        let Some(scan) = self.identity_scan() else {
            crate::error::internal("an unlocked lookup without its scan keys");
        };
        if key.len() != self.natts {
            crate::error::internal("a search row of another width than its table");
        }
        // Not zeroed (that was a 2.5 kB memset per lookup): ScanKeyInit sets every field
        // of the entries used, and the scan reads no other.
        let mut skeys = [const { std::mem::MaybeUninit::<pg_sys::ScanKeyData>::uninit() };
            pg_sys::INDEX_MAX_KEYS as usize];
        let nkeys = scan.keys.len();
        // SAFETY: the found slot is this target's; the index is open in this transaction
        // (begin_change); the scan keys and the snapshot live on this frame for the whole
        // scan; the guarded closure holds only pointers and plain values.
        let found = unsafe { self.table_slot() };
        let (rel, idx) = (self.rel, unsafe {
            *(*self.rri).ri_IndexRelationDescs.add(scan.index_pos)
        });
        let skeys = skeys.as_mut_ptr().cast::<pg_sys::ScanKeyData>();
        let xmin = as_user(self.owner, || unsafe {
            guarded(|| {
                for (k, &(att, proc_, collation)) in scan.keys.iter().enumerate() {
                    let entry = skeys.add(k);
                    let value = key[att];
                    raw::ScanKeyInit(
                        entry,
                        (k + 1) as pg_sys::AttrNumber,
                        pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                        proc_,
                        value.unwrap_or(pg_sys::Datum::from(0usize)),
                    );
                    (*entry).sk_collation = collation;
                    if value.is_none() {
                        (*entry).sk_flags |= pg_sys::SK_ISNULL as i32;
                    }
                }
                let mut snap: pg_sys::SnapshotData = std::mem::zeroed();
                snap.snapshot_type = pg_sys::SnapshotType::SNAPSHOT_DIRTY;
                let sd = raw::index_beginscan(rel, idx, &mut snap, nkeys as i32, 0);
                let found_it = loop {
                    raw::index_rescan(sd, skeys, nkeys as i32, std::ptr::null_mut(), 0);
                    if !raw::index_getnext_slot(
                        sd,
                        pg_sys::ScanDirection::ForwardScanDirection,
                        found,
                    ) {
                        break false;
                    }
                    // Written by a transaction in progress: wait for it, look again.
                    let wait = if snap.xmin != pg_sys::InvalidTransactionId {
                        snap.xmin
                    } else {
                        snap.xmax
                    };
                    if wait == pg_sys::InvalidTransactionId {
                        break true;
                    }
                    raw::XactLockTableWait(
                        wait,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        pg_sys::XLTW_Oper::XLTW_None,
                    );
                };
                raw::index_endscan(sd);
                if !found_it {
                    return None;
                }
                Some(super::read_found(found))
            })
        })?;
        Some(self.found_row(found, xmin))
    }

    /// Replace `old`, found by [`Target::find_unlocked`], by `row`. `false`: another
    /// transaction updated or deleted it since the lookup, and nothing was written: look
    /// it up and decide again.
    ///
    /// # Preconditions
    /// `old` was returned by [`Target::find_unlocked`] on this target in this change.
    pub fn update_unlocked(&self, old: &LocalRow, row: &Row) -> bool {
        self.own(old);
        // SAFETY: as in update_or_clash (no EvalPlanQual state: no BEFORE UPDATE trigger
        // fires, can_update_unlocked).
        let written = unsafe {
            let slot = self.virtual_slot(row);
            as_user(self.owner, || {
                self.write_update(std::ptr::null_mut(), old.slot, slot, None)
            })
        };
        self.written_unless_changed(written, false)
    }

    /// `true`: written; `false`: the row changed since the lookup (nothing written). Any
    /// other outcome raises as `simple_table_tuple_update` (`delete`: `..._delete`) does.
    fn written_unless_changed(&self, written: Written, delete: bool) -> bool {
        match written {
            Written::Done => true,
            Written::Changed(_) => false,
            other => self.update_failed(other, delete),
        }
    }

    /// Delete `old`, found by [`Target::find_unlocked`]: the steps of
    /// `ExecSimpleRelationDelete` (PostgreSQL 15) without BEFORE triggers (none fires,
    /// [`Target::can_delete_unlocked`]), with the table's `tuple_delete` called directly.
    /// `false`: another transaction updated or deleted the row since the lookup, and
    /// nothing was deleted: look it up and decide again.
    ///
    /// # Preconditions
    /// `old` was returned by [`Target::find_unlocked`] on this target in this change.
    pub fn delete_unlocked(&self, old: &LocalRow) -> bool {
        self.own(old);
        let (rel, rri, estate, slot) = (self.rel, self.rri, self.estate, old.slot);
        // SAFETY: see begin_change; the row was found by this target in this change. The
        // closure holds only pointers and plain values.
        let written = as_user(self.owner, || unsafe {
            guarded(|| {
                let tid = &mut (*slot).tts_tid as pg_sys::ItemPointer;
                raw::CheckCmdReplicaIdentity(rel, pg_sys::CmdType::CMD_DELETE);
                let Some(delete) = (*(*rel).rd_tableam).tuple_delete else {
                    return Written::Failed(u32::MAX);
                };
                let mut tmfd: pg_sys::TM_FailureData = std::mem::zeroed();
                // As simple_table_tuple_delete: wait for a transaction writing the row.
                let res = delete(
                    rel,
                    tid,
                    crate::pg::unguarded::GetCurrentCommandId(true),
                    (*estate).es_snapshot,
                    std::ptr::null_mut(),
                    true,
                    &mut tmfd,
                    false,
                );
                if let w @ (Written::Changed(_) | Written::Failed(_)) = Written::of(res) {
                    return w;
                }
                raw::ExecARDeleteTriggers(
                    estate,
                    rri,
                    tid,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    false,
                );
                Written::Done
            })
        });
        self.written_unless_changed(written, true)
    }
}
