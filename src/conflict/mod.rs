//! Conflict stage: what is there locally for a remote change's key, what to do about it,
//! and the record of the decision.
//!
//! The policy itself (last-update-wins on (commit timestamp, node id), and which conflict
//! each case is) lives in `bdr_core::conflict`: plain Rust, unit-tested without a server
//! over every arrival order. This module gathers its inputs — the local row's version from
//! its xmin (commit timestamp and origin), else the key's tombstone, else nothing — and
//! carries the decision out through the write stage ([`crate::write`]): apply → conflict →
//! write → pg, nothing calling back up.
//!
//! Invariants kept here:
//! - **Convergence**: a row's version is read from the row, a deleted key's from its
//!   tombstone; every node keeps the greatest version per key.
//! - **Two apply workers and one absent key** (write-then-verify, see
//!   [`Resolver::verify_no_new_tombstone`]): a worker that inserted a row where it saw no
//!   tombstone looks for a new tombstone, one that wrote a tombstone for an absent key
//!   looks for a new row; of two racing workers at least one sees the other and rolls back
//!   with SQLSTATE 40001.
//! - **No silent skip**: every conflict is counted and, with `bdr.log_conflicts_to_table`,
//!   written to `bdr.conflict_history` in the applying transaction.
//!
//! - **Streamed transactions** (a stream writer, before the remote commit time is known):
//!   a change that would need a decision writes nothing and reports itself deferred
//!   ([`Resolver::take_deferred`]); it is decided at the commit, after
//!   [`Resolver::end_streamed`], exactly as the whole-transaction path decides it.
//!
//! - **A key that appears after the lookup** (a local session or another worker inserts
//!   it between this change's lookup and its insertion, for an INSERT, or an UPDATE whose
//!   row must come back): the insertion is speculative where the table allows it, gives
//!   way, and the change looks again and decides again on what it then finds
//!   ([`Resolver::again_on_clash`]); never a duplicate-key apply error.
//!
//! - **A key an UPDATE moves to, or a UNIQUE value it takes** ([`Resolver::make_room`]):
//!   decided per key like an insertion meeting it — the newer row keeps the key, the older
//!   row goes — and a key-moving UPDATE that loses at its old key still writes its new
//!   one; never a duplicate-key apply error. The keys looked up are checked again as the
//!   row's index entries are written ([`Target::update_or_clash`]): one written by
//!   another process since is a race, rolled back and applied again
//!   ([`update_raced`]).
//!
//! - **New keys without a lookup**: a remote INSERT into a table without tombstones goes
//!   in directly, its unique indexes checking the key as they go; with
//!   [`Resolver::set_plain_inserts`] as an ordinary insertion (a clash leaves the row
//!   written and is reported by [`Resolver::take_clash`]: the caller rolls back and
//!   applies the transaction again), else as a speculative one that gives way on a
//!   clash; either way a clash then takes the careful path (look up, decide).
//!
//! Cost (issue 17): a key's canonical text ([`LazyKey`]) is rendered only for what needs
//! it — a tombstone lookup or write, a history row, or an UPDATE that carries its old row
//! (the only kind whose key can change: the sender sends the old row exactly when the
//! key changed, or always under REPLICA IDENTITY FULL). A plain UPDATE or INSERT of a
//! table without tombstones and without a conflict renders none.

pub use bdr_core::conflict::*;

mod record;

use crate::catalog::nodes::Node;
use crate::catalog::tombstones;
use crate::error::{raise, ApplyError};
use crate::pg::{shmem, xact};
use crate::write::{LazyKey, LocalRow, RelMap, Row, Target};
use bdr_core::idmap::IdMap;
use bdr_core::wire::{self, Value};
use pgrx::pg_sys;
use record::{Decided, Recorded};

/// Replace the found local row by the remote values (unsent and unchanged-TOAST columns
/// keep the local ones, from `base`); returns the row written.
fn replace_row(
    t: &Target,
    map: &RelMap,
    found: Option<&LocalRow>,
    new: &[Value],
    base: Option<&Row>,
) -> Row {
    let f = found.expect("update needs the row");
    let row = map.row(new, base).unwrap_or_else(|e| raise(&e));
    t.update(f, &row);
    row
}

/// Another apply worker wrote `key` of `t`'s table at the same time: roll back and
/// apply the transaction again (see [`Resolver::verify_no_new_tombstone`]).
fn raced(t: &Target, key: String) -> ! {
    let table = crate::write::relation_name(t.relid());
    raise(&ApplyError::ConcurrentKey { table, key })
}

/// An UPDATE's row met a key that another process wrote after this change looked it
/// up ([`Target::update_or_clash`]: the row stays written, so the transaction must
/// be rolled back): a race, rolled back with SQLSTATE 40001 and applied again after
/// the worker's pause, its lookups then finding that row (or waiting for its writer
/// to end) and deciding between the two rows as usual; never an apply error. (An
/// UPDATE is never in a transaction kept whole, `bdr_core::kept`, so it cannot take
/// the immediate re-apply an ordinary insertion's clash takes.)
#[cold]
fn update_raced(t: &Target, row: &Row) -> ! {
    let key = LazyKey::new(t, row).get().unwrap_or_default();
    raced(t, key)
}

/// The remote transaction a change belongs to, as its history rows name it.
#[derive(Clone, Default)]
struct RemoteTxn {
    commit_time: i64,
    lsn: u64,
    xid: u32,
    /// The node it came from when the hub forwarded it (name, id); else the peer.
    forwarded: Option<(std::rc::Rc<str>, i64)>,
}

/// What a remote UPDATE found about the unique keys of the row it writes
/// ([`Resolver::make_room`]).
enum Room {
    /// No other row holds them (any older holder was deleted): write the row, checking
    /// the unique indexes it was looked up in (none: nothing was looked up) as it goes:
    /// another process may have written one of its keys since.
    Made(Vec<pg_sys::Oid>),
    /// A newer row holds one, or a newer change deleted the key it moves to: the updated
    /// row goes.
    Taken,
    /// A streamed transaction: decided at its commit.
    Deferred,
}

/// How many times one change looks its key up again after its insertion met a key that
/// appeared since the lookup, before the transaction is rolled back and applied again.
const CLASH_ATTEMPTS: u32 = 5;

/// How far transaction ids may move on this server before [`Resolver::version_of`]'s
/// cached entry is dropped: an xid number is reused only after 2^32 others.
const VERSION_CACHE_XIDS: u64 = 1 << 30;

/// Resolves one peer's changes against this node's rows, with what it caches between
/// changes (the node behind each origin, which tables have tombstones).
pub struct Resolver {
    /// The peer's and this node's names, as history rows name them.
    peer: std::rc::Rc<str>,
    local: String,
    peer_id: i64,
    local_id: i64,
    origin_nodes: IdMap<u16, i64>,
    /// The version of the last committed local transaction looked up (its xid), and the
    /// server's next full xid then: rows written by one transaction (a bulk load, a
    /// join's copy) share it. A committed transaction's commit timestamp and origin never
    /// change; the entry is used only while fewer than [`VERSION_CACHE_XIDS`] xids were
    /// assigned since, long before its xid number could be reused.
    last_version: Option<(pg_sys::TransactionId, Version, u64)>,
    /// Whether a table has tombstones, valid while no tombstone is written anywhere on
    /// this server (`tombstone_epoch` unchanged).
    has_tombstones: IdMap<pg_sys::Oid, bool>,
    tombstone_epoch: u64,
    /// The tombstone epoch when the current change looked for its key (see
    /// [`Resolver::verify_no_new_tombstone`]).
    decision_epoch: u64,
    /// The remote transaction being applied.
    txn: RemoteTxn,
    /// Conflicts resolved since last taken, per type (like `Conflict::ALL`).
    conflict_counts: [u64; 9],
    /// The transaction is applied before its commit (a stream writer): only changes that
    /// need no last-update-wins decision (`bdr_core::streaming::direct_apply`).
    streamed: bool,
    /// In a streamed transaction, the current change needed the commit time: nothing of
    /// it was written, and it waits for the commit (see [`Resolver::take_deferred`]).
    deferred: bool,
    /// New keys go in as ordinary insertions (`Target::insert_or_clash`): the caller can
    /// roll the transaction back and apply it again should one meet an existing key
    /// (see [`Resolver::set_plain_inserts`]).
    plain_inserts: bool,
    /// An ordinary insertion met an existing key: the transaction must be rolled back
    /// (see [`Resolver::take_clash`]).
    clashed: bool,
}

impl Resolver {
    /// Resolves changes from the peer named `peer` (its node id `peer_id`) here, on `local`.
    pub fn new(peer: std::rc::Rc<str>, peer_id: i64, local: &Node) -> Resolver {
        Resolver {
            peer,
            local: local.name.clone(),
            peer_id,
            local_id: local.id,
            origin_nodes: IdMap::default(),
            last_version: None,
            has_tombstones: IdMap::default(),
            tombstone_epoch: u64::MAX,
            decision_epoch: 0,
            txn: RemoteTxn::default(),
            conflict_counts: [0; 9],
            streamed: false,
            deferred: false,
            plain_inserts: false,
            clashed: false,
        }
    }

    /// A remote transaction starts: its changes are decided against its version (its
    /// commit time and the node it came from: the peer, or for a transaction the hub
    /// forwarded, its original node).
    pub fn begin(&mut self, b: &wire::Begin, forwarded: Option<(std::rc::Rc<str>, i64)>) {
        self.txn = RemoteTxn {
            commit_time: b.commit_time,
            lsn: b.final_lsn,
            xid: b.xid,
            forwarded,
        };
        self.streamed = false;
        self.deferred = false;
        self.plain_inserts = false;
    }

    /// Whether new keys of this transaction may go in as ordinary insertions (off at each
    /// `begin`). Only a caller that can roll the whole transaction back and apply it
    /// again turns it on: an insertion that meets an existing key leaves its row written
    /// and is reported by [`Resolver::take_clash`]; nothing else may then happen in the
    /// transaction but its rollback.
    pub fn set_plain_inserts(&mut self, on: bool) {
        self.plain_inserts = on;
    }

    /// Whether the last change met an existing key with an ordinary insertion (see
    /// [`Resolver::set_plain_inserts`]); cleared by the call.
    pub fn take_clash(&mut self) -> bool {
        std::mem::take(&mut self.clashed)
    }

    /// A streamed transaction starts, applied before its commit (its commit time is not
    /// known): a change that would need it is not written but deferred
    /// ([`Resolver::take_deferred`]).
    pub fn begin_streamed(&mut self, xid: u32) {
        self.txn = RemoteTxn {
            commit_time: i64::MAX,
            lsn: 0,
            xid,
            forwarded: None,
        };
        self.streamed = true;
        self.deferred = false;
        self.plain_inserts = false;
    }

    /// The streamed transaction committed on the peer at `commit_time` (commit record at
    /// `lsn`): the changes that waited for it are decided from now on as those of any
    /// transaction.
    pub fn end_streamed(&mut self, commit_time: i64, lsn: u64) {
        self.txn.commit_time = commit_time;
        self.txn.lsn = lsn;
        self.streamed = false;
        self.deferred = false;
    }

    /// Whether the last change needed the commit time and was not written (in a streamed
    /// transaction); cleared by the call.
    pub fn take_deferred(&mut self) -> bool {
        std::mem::take(&mut self.deferred)
    }

    /// In a streamed transaction, whether a change that found `local` may be written now
    /// (`false`: it needs a last-update-wins decision, so it is deferred, nothing written).
    fn check_streamed(&mut self, change: Change, local: Local) -> bool {
        if !self.streamed || bdr_core::streaming::direct_apply(change, local, self.peer_id) {
            return true;
        }
        self.deferred = true;
        false
    }

    /// Conflicts resolved since the last call, per type (like `Conflict::ALL`).
    pub fn take_counts(&mut self) -> [u64; 9] {
        std::mem::take(&mut self.conflict_counts)
    }

    /// The conflict counts as they are, to be put back by [`Resolver::restore_counts`]
    /// when the changes counted since are rolled back.
    pub fn counts(&self) -> [u64; 9] {
        self.conflict_counts
    }

    /// Put back counts taken by [`Resolver::counts`].
    pub fn restore_counts(&mut self, counts: [u64; 9]) {
        self.conflict_counts = counts;
    }

    /// The remote transaction's version.
    fn remote_version(&self) -> Version {
        if self.streamed {
            return bdr_core::streaming::streamed_version(self.peer_id);
        }
        Version {
            commit_time: self.txn.commit_time,
            node_id: self.txn.forwarded.as_ref().map_or(self.peer_id, |f| f.1),
        }
    }

    /// The node id behind a replication origin (0 = this node).
    fn node_of_origin(&mut self, origin: u16) -> Option<i64> {
        if origin == 0 {
            return Some(self.local_id);
        }
        if let Some(id) = self.origin_nodes.get(&origin) {
            return Some(*id);
        }
        let name = xact::origin_name(origin)?;
        let (_, node) = bdr_core::names::parse(&name)?;
        let id = crate::catalog::nodes::by_name(node)?.id;
        self.origin_nodes.insert(origin, id);
        Some(id)
    }

    /// The version of committed transaction `xid` (its commit timestamp and node).
    fn version_of(&mut self, xid: pg_sys::TransactionId) -> Option<Version> {
        let now = xact::next_full_xid_approx();
        if let Some((cached, v, at)) = self.last_version {
            if cached == xid && now.wrapping_sub(at) < VERSION_CACHE_XIDS {
                return Some(v);
            }
        }
        let (ts, origin) = xact::commit_ts(xid)?;
        let v = Version {
            commit_time: ts,
            node_id: self.node_of_origin(origin)?,
        };
        self.last_version = Some((xid, v, now));
        Some(v)
    }

    /// Whether table `relid` may have tombstones. Most tables have none at all: ask again
    /// only when one was written anywhere. Notes the epoch this decision is based on.
    fn may_have_tombstones(&mut self, relid: pg_sys::Oid) -> bool {
        let (epoch, _) = shmem::tombstone_state();
        self.decision_epoch = epoch;
        if epoch != self.tombstone_epoch {
            self.has_tombstones.clear();
            self.tombstone_epoch = epoch;
        }
        *self
            .has_tombstones
            .entry(relid)
            .or_insert_with(|| tombstones::any(relid))
    }

    /// What is there locally for a key: the row found, else a tombstone, else nothing.
    fn local_state(&mut self, t: &Target, found: Option<&LocalRow>, key: &mut LazyKey) -> Local {
        if let Some(r) = found {
            let xmin = r.xmin();
            if xact::is_current_xact(xmin) {
                return Local::Row {
                    version: None,
                    same_transaction: true,
                };
            }
            return Local::Row {
                version: self.version_of(xmin),
                same_transaction: false,
            };
        }
        let relid = t.relid();
        if !self.may_have_tombstones(relid) {
            return Local::Missing;
        }
        match key.get().and_then(|k| tombstones::lookup(relid, &k)) {
            // A tombstone too old to know its time is older than anything.
            Some(xid) => Local::Deleted(self.version_of(xid).unwrap_or(Version {
                commit_time: i64::MIN,
                node_id: 0,
            })),
            None => Local::Missing,
        }
    }

    /// Insert `row` (see [`Resolver::insert_resolving_unique`]), then check that no other
    /// worker wrote the key's tombstone meanwhile. As that function: `Ok(false)` when
    /// deferred, `Err` (the key's text) when a key appeared since the lookup.
    fn insert_checked(
        &mut self,
        t: &Target,
        map: &RelMap,
        row: &Row,
        new: &[Value],
        local: Local,
        key: &mut LazyKey,
    ) -> Result<bool, String> {
        if !self.insert_resolving_unique(t, map, row, new, key)? {
            return Ok(false);
        }
        self.verify_no_new_tombstone(t, local, key);
        Ok(true)
    }

    /// Insert `row`, first resolving collisions on other unique indexes: a colliding
    /// local row that is older than the remote change is deleted (and remembered as
    /// deleted); a newer one keeps its place and the remote row is not inserted.
    ///
    /// The row goes in as a speculative insertion where the table allows one
    /// ([`Target::try_insert`]): a key that appeared since the lookup (a local session's
    /// or another worker's insert, committed or in flight) makes it give way, nothing
    /// written, and `Err` (the key's text) sends the caller back to the lookup. Should a
    /// colliding row already have been deleted for it, the transaction is applied again
    /// instead (SQLSTATE 40001), deciding on committed data.
    ///
    /// Inside the applying transaction, with `t` open. `Ok(false)` (nothing written) when a
    /// collision needs a decision in a streamed transaction: the insert is deferred.
    fn insert_resolving_unique(
        &mut self,
        t: &Target,
        map: &RelMap,
        row: &Row,
        new: &[Value],
        key: &mut LazyKey,
    ) -> Result<bool, String> {
        let mut deleted = false;
        for (index, _cols) in t.other_unique_indexes() {
            let Some(other) = t.find_by_index(*index, row) else {
                continue;
            };
            if self.streamed {
                self.deferred = true;
                return Ok(false);
            }
            if !self.displace(t, map, &other, new, true) {
                return Ok(true);
            }
            deleted = true;
        }
        if !t.can_try_insert() {
            t.insert(row);
        } else if !t.try_insert(row) {
            let k = key.get().unwrap_or_default();
            if deleted {
                raced(t, k);
            }
            return Err(k);
        }
        Ok(true)
    }

    /// Apply a change with `attempt`, again while its insertion meets a key that appeared
    /// after its lookup (`Err`: the key's text; nothing of the attempt was written or
    /// recorded). A key that keeps appearing and going away (more than
    /// [`CLASH_ATTEMPTS`] times) rolls the transaction back, to be applied again.
    fn again_on_clash(
        &mut self,
        t: &Target,
        mut attempt: impl FnMut(&mut Self) -> Result<(), String>,
    ) {
        let mut key = String::new();
        for _ in 0..CLASH_ATTEMPTS {
            match attempt(self) {
                Ok(()) => return,
                Err(k) => key = k,
            }
        }
        raced(t, key)
    }

    pub fn insert(&mut self, map: &RelMap, new: &[Value]) {
        let t = map.target();
        let mut row = map.row(new, None).unwrap_or_else(|e| raise(&e));
        t.fill_defaults(&mut row, map.local_only());
        let keyed = map.remote.columns.iter().any(|c| c.key);
        // The common case, a new key in a table without tombstones: insert directly,
        // unless a unique index already holds the key (then decide as below).
        if keyed && t.can_try_insert() && !self.may_have_tombstones(t.relid()) {
            let inserted = if self.plain_inserts {
                if !t.insert_or_clash(&row) {
                    // The row is written: nothing more until the rollback.
                    self.clashed = true;
                    return;
                }
                true
            } else {
                t.try_insert(&row)
            };
            if inserted {
                let mut key = LazyKey::new(t, &row);
                self.verify_no_new_tombstone(t, Local::Missing, &mut key);
                return;
            }
        }
        self.again_on_clash(t, |r| r.insert_carefully(map, &row, new, keyed));
    }

    /// A remote INSERT the careful way: look the key up, decide, carry the decision out.
    /// `Err` (the key's text): the insertion met a key that appeared since the lookup.
    fn insert_carefully(
        &mut self,
        map: &RelMap,
        row: &Row,
        new: &[Value],
        keyed: bool,
    ) -> Result<(), String> {
        let t = map.target();
        let found = if keyed {
            let key = map.search_row_new(new).unwrap_or_else(|e| raise(&e));
            t.find(&key)
        } else {
            None
        };
        let mut key = LazyKey::new(t, row);
        let local = self.local_state(t, found.as_ref(), &mut key);
        if !self.check_streamed(Change::Insert, local) {
            return Ok(());
        }
        let d = decide(Change::Insert, local, self.remote_version());
        let base = found.as_ref().map(|f| f.values());
        match d.action {
            Action::Insert => {
                if !self.insert_checked(t, map, row, new, local, &mut key)? {
                    return Ok(());
                }
            }
            Action::Update => {
                replace_row(t, map, found.as_ref(), new, base.as_ref());
            }
            Action::Delete | Action::Nothing => {}
        }
        self.record_decision(t, map, &mut key, Decided::of(&d, new, local, base.as_ref()));
        Ok(())
    }

    pub fn update(&mut self, map: &RelMap, old: Option<&wire::OldRow>, new: &[Value]) {
        self.again_on_clash(map.target(), |r| r.update_once(map, old, new));
    }

    /// A remote UPDATE: look the key up, decide, carry the decision out. `Err` (the key's
    /// text): the row had to come back (`update_missing`, or a deleted row the update
    /// wins over) and its insertion met a key that appeared since the lookup; or the row
    /// was found without a lock and another transaction changed it before the update.
    ///
    /// The common UPDATE — its key kept (no old row sent), a table whose only unique
    /// index is its identity, no BEFORE UPDATE trigger that fires, not a streamed
    /// transaction — finds and writes its row without locking it first
    /// (`pg::exec::unlocked`: the lock was a WAL record per UPDATE). The decision is
    /// taken on the newest committed version, and the write refuses any other: a row
    /// changed in between is looked up and decided again.
    fn update_once(
        &mut self,
        map: &RelMap,
        old: Option<&wire::OldRow>,
        new: &[Value],
    ) -> Result<(), String> {
        let t = map.target();
        let key_row = match old {
            Some(o) => map.search_row_old(o, "update"),
            None => map.search_row_new(new),
        }
        .unwrap_or_else(|e| raise(&e));
        let unlocked = old.is_none() && !self.streamed && t.can_update_unlocked();
        let found = if unlocked {
            t.find_unlocked(&key_row)
        } else {
            t.find(&key_row)
        };
        let mut key = LazyKey::new(t, &key_row);
        let local = self.local_state(t, found.as_ref(), &mut key);
        if !self.check_streamed(Change::Update, local) {
            return Ok(());
        }
        let mut d = decide(Change::Update, local, self.remote_version());
        let base = found.as_ref().map(|f| f.values());
        match d.action {
            Action::Update => {
                let f = found.as_ref().expect("update needs the row");
                let row = map.row(new, base.as_ref()).unwrap_or_else(|e| raise(&e));
                // Only a change that carries its old row can change the key (the sender
                // sends the old key exactly when it changed, or every old row under
                // REPLICA IDENTITY FULL), so without one no key text is rendered.
                let moved_from = old.and_then(|_| key.left_by(&row));
                // Most UPDATEs keep the key, and most tables have no other unique index:
                // nothing to look up then.
                let moves = moved_from.is_some();
                let room = if moves || !t.other_unique_indexes().is_empty() {
                    self.make_room(t, map, f, &row, new, moves, base.as_ref())
                } else {
                    Room::Made(Vec::new())
                };
                match room {
                    Room::Made(checked) => {
                        if unlocked {
                            if !t.update_unlocked(f, &row) {
                                // Changed since the lookup: nothing written, look again.
                                return Err(key.get().unwrap_or_default());
                            }
                        } else if checked.is_empty() {
                            t.update(f, &row);
                        } else if !t.update_or_clash(f, &row, &checked) {
                            // Another process wrote a key it takes after the lookup: the
                            // transaction goes back, and looks again (see `update_raced`).
                            update_raced(t, &row);
                        }
                        // A key change removes the old key: remember it as deleted.
                        if let Some(k) = moved_from {
                            self.tombstone(t.relid(), &k);
                        }
                    }
                    Room::Taken => {
                        // On its origin the newer holder of the key displaced this row.
                        t.delete(f);
                        if let Some(k) = key.get() {
                            self.tombstone(t.relid(), &k);
                        }
                    }
                    Room::Deferred => return Ok(()),
                }
            }
            Action::Insert => {
                if new.contains(&Value::UnchangedToast) {
                    // The row must come back but the sender did not send every column.
                    d.action = Action::Nothing;
                    d.conflict = d.conflict.map(|(c, _)| (c, Resolution::Skip));
                } else {
                    let mut row = map.row(new, None).unwrap_or_else(|e| raise(&e));
                    t.fill_defaults(&mut row, map.local_only());
                    if old.is_some() && key.left_by(&row).is_some() {
                        // It comes back under the key it moved to, which a local row may
                        // hold: decided as a remote INSERT of that key. The old key is
                        // deleted by this change: remembered with its version, so that an
                        // older write of it arriving later loses. Nothing held it when we
                        // looked: another worker may have inserted it since, which the
                        // tombstone's write checks for (the transaction is then applied
                        // again, and this change then moves that row).
                        self.insert_carefully(map, &row, new, true)?;
                        self.tombstone_absent_key(t, local, &mut key);
                    } else if !self.insert_checked(t, map, &row, new, local, &mut key)? {
                        return Ok(());
                    }
                }
            }
            Action::Nothing if old.is_some() && !new.contains(&Value::UnchangedToast) => {
                // The old key keeps its newer local state. Should the change move the
                // row to another key, that key is written as on the change's origin:
                // decided as a remote INSERT of it (last-update-wins per key). Local-only
                // columns get their DEFAULTs only then (a default may have effects).
                if key.get().is_some() {
                    let mut row = map.row(new, None).unwrap_or_else(|e| raise(&e));
                    if key.left_by(&row).is_some() {
                        t.fill_defaults(&mut row, map.local_only());
                        self.insert_carefully(map, &row, new, true)?;
                    }
                }
            }
            Action::Delete | Action::Nothing => {}
        }
        self.record_decision(t, map, &mut key, Decided::of(&d, new, local, base.as_ref()));
        Ok(())
    }

    /// Before a remote UPDATE that won over its row (`found`) writes `row`: the other
    /// local rows holding one of `row`'s unique keys — the identity key it moves to
    /// (`moves`), and every other unique index whose columns it changes.
    ///
    /// The same rule as an insertion's ([`Resolver::insert_resolving_unique`]), so that
    /// every node keeps the same row whichever order the two changes arrive in: the newer
    /// of the two rows keeps the key. An older holder is deleted (`unique_key`,
    /// `apply_remote`); a newer one makes the update lose its row (`unique_key`,
    /// `keep_local`: [`Room::Taken`], the caller deletes `found`), as its origin did when
    /// the newer row arrived there. The identity key it moves to may also have been
    /// deleted by a newer change (`update_deleted`, `keep_local`: [`Room::Taken`]).
    ///
    /// Called only for an UPDATE that moves its key or of a table with another unique
    /// index; there only the indexes whose columns the UPDATE changes are looked up.
    #[allow(clippy::too_many_arguments)]
    #[cold]
    fn make_room(
        &mut self,
        t: &Target,
        map: &RelMap,
        found: &LocalRow,
        row: &Row,
        new: &[Value],
        moves: bool,
        base: Option<&Row>,
    ) -> Room {
        let remote = self.remote_version();
        let relid = t.relid();
        let mut checked = Vec::new();
        if moves {
            if t.identity_index != pg_sys::InvalidOid {
                checked.push(t.identity_index);
            }
            let search = map.search_row_new(new).unwrap_or_else(|e| raise(&e));
            if let Some(other) = t.find(&search) {
                if self.streamed {
                    self.deferred = true;
                    return Room::Deferred;
                }
                // The key stays in use (this row moves in): no tombstone.
                if !self.displace(t, map, &other, new, false) {
                    return Room::Taken;
                }
            } else if self.may_have_tombstones(relid) {
                let mut to = LazyKey::new(t, row);
                let deleted = to.get().and_then(|k| {
                    let xid = tombstones::lookup(relid, &k)?;
                    Some((k, xid))
                });
                if let Some((k, xid)) = deleted {
                    let v = self.version_of(xid).unwrap_or(Version {
                        commit_time: i64::MIN,
                        node_id: 0,
                    });
                    if v > remote {
                        if self.streamed {
                            self.deferred = true;
                            return Room::Deferred;
                        }
                        let info = Recorded {
                            local_version: Some(v),
                            local_row: None,
                            key: Some(k),
                        };
                        self.record(
                            map,
                            Conflict::UpdateDeleted,
                            Resolution::KeepLocal,
                            new,
                            info,
                        );
                        return Room::Taken;
                    }
                }
            }
        }
        for (index, cols) in t.other_unique_indexes() {
            // Unchanged columns hold this row's own key.
            if base.is_some_and(|b| t.same_values(row, b, cols)) {
                continue;
            }
            checked.push(*index);
            let Some(other) = t.find_by_index(*index, row) else {
                continue;
            };
            if other.same_tuple(found) {
                continue;
            }
            if self.streamed {
                self.deferred = true;
                return Room::Deferred;
            }
            if !self.displace(t, map, &other, new, true) {
                return Room::Taken;
            }
        }
        Room::Made(checked)
    }

    /// The local row `other` holds a unique key the remote row (values `new`) needs: the
    /// newer of the two keeps it. When the remote change is newer, `other` is deleted
    /// (its own key remembered as deleted if `tombstone`); either way `unique_key` is
    /// recorded. Returns whether the remote row won.
    fn displace(
        &mut self,
        t: &Target,
        map: &RelMap,
        other: &LocalRow,
        new: &[Value],
        tombstone: bool,
    ) -> bool {
        let local = self.version_of(other.xmin());
        let wins = unique_key_remote_wins(local, self.remote_version());
        let values = other.values();
        let info = Recorded {
            local_version: local,
            local_row: Some(t.row_json(&values)),
            key: t.key_text(&values),
        };
        if wins {
            if let (true, Some(k)) = (tombstone, &info.key) {
                self.tombstone(t.relid(), k);
            }
            t.delete(other);
        }
        let res = if wins {
            Resolution::ApplyRemote
        } else {
            Resolution::KeepLocal
        };
        self.record(map, Conflict::UniqueKey, res, new, info);
        wins
    }

    pub fn delete(&mut self, map: &RelMap, old: &wire::OldRow) {
        self.again_on_clash(map.target(), |r| r.delete_once(map, old));
    }

    /// A remote DELETE: look the key up, decide, carry the decision out. As an UPDATE
    /// ([`Resolver::update_once`]), one sent with its key only (the table has an identity
    /// index), of a table without a BEFORE DELETE trigger that fires, outside a streamed
    /// transaction, finds and deletes its row without locking it first; `Err` (the key's
    /// text): another transaction changed the row in between, nothing was deleted.
    fn delete_once(&mut self, map: &RelMap, old: &wire::OldRow) -> Result<(), String> {
        let t = map.target();
        let key_row = map
            .search_row_old(old, "delete")
            .unwrap_or_else(|e| raise(&e));
        let unlocked =
            matches!(old, wire::OldRow::Key(_)) && !self.streamed && t.can_delete_unlocked();
        let found = if unlocked {
            t.find_unlocked(&key_row)
        } else {
            t.find(&key_row)
        };
        let mut key = LazyKey::new(t, &key_row);
        let local = self.local_state(t, found.as_ref(), &mut key);
        if !self.check_streamed(Change::Delete, local) {
            return Ok(());
        }
        let d = decide(Change::Delete, local, self.remote_version());
        let base = found.as_ref().map(|f| f.values());
        if d.action == Action::Delete {
            let f = found.as_ref().expect("delete needs the row");
            if !unlocked {
                t.delete(f);
            } else if !t.delete_unlocked(f) {
                // Changed since the lookup: nothing deleted, look again.
                return Err(key.get().unwrap_or_default());
            }
        }
        let values = match old {
            wire::OldRow::Key(k) | wire::OldRow::Full(k) => k.clone(),
        };
        self.record_decision(
            t,
            map,
            &mut key,
            Decided::of(&d, &values, local, base.as_ref()),
        );
        Ok(())
    }

    fn tombstone(&mut self, relid: pg_sys::Oid, key: &str) {
        tombstones::upsert(relid, key);
        self.has_tombstones.insert(relid, true);
    }

    /// Two apply workers (changes from two peers) can decide about the same absent key at
    /// once; nothing locks a row that is not there. Each writer therefore checks, after
    /// its write, that the other kind of write did not appear meanwhile: one that inserted
    /// a row looks for a new tombstone, one that wrote a tombstone looks for a new row.
    /// Both lookups see uncommitted writes and wait for their transactions, and each
    /// write precedes its own check, so of two racing workers at least one sees the
    /// other's write; it rolls back and applies the transaction again (SQLSTATE 40001),
    /// deciding then on committed state.
    ///
    /// The re-check after a row insert is skipped when no transaction anywhere was
    /// writing tombstones meanwhile (nothing in flight and the epoch unchanged since this
    /// change looked), which is the common case.
    fn verify_no_new_tombstone(&mut self, t: &Target, local: Local, key: &mut LazyKey) {
        if matches!(local, Local::Deleted(_)) {
            // The tombstone we decided on is share-locked: nobody can replace it.
            return;
        }
        let (epoch, writers) = shmem::tombstone_state();
        if writers == 0 && epoch == self.decision_epoch {
            return;
        }
        if let Some(k) = key.get() {
            if tombstones::lookup(t.relid(), &k).is_some() {
                raced(t, k);
            }
        }
    }

    /// Write the tombstone for an absent key (see [`Resolver::verify_no_new_tombstone`]):
    /// only if none appeared since we looked, then check no row appeared either.
    ///
    /// `key` holds a search row for `t`.
    fn tombstone_absent_key(&mut self, t: &Target, local: Local, key: &mut LazyKey) {
        let Some(k) = key.get() else { return };
        let relid = t.relid();
        let fresh = match local {
            // Share-locked by us since the lookup: refresh it.
            Local::Deleted(_) => {
                tombstones::upsert(relid, &k);
                true
            }
            _ => tombstones::insert_new(relid, &k),
        };
        self.has_tombstones.insert(relid, true);
        if !fresh || t.find(key.row).is_some() {
            raced(t, k);
        }
    }
}
