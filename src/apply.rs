//! Apply stage: one local transaction per remote transaction, one message at a time.
//!
//! The receive loop hands every decoded frame to [`Applier::handle`]. BEGIN starts a local
//! transaction; RELATION (re)binds a peer relation to a local table; INSERT/UPDATE/DELETE
//! locate the local row by replica identity and write through the executor
//! ([`crate::pg::exec`]); COMMIT commits under the peer's replication origin with the
//! remote commit LSN and timestamp, and records (remote end LSN, local commit LSN) for
//! flush feedback.
//!
//! Conflicts found on the way (a row that already exists, or is missing) are written to
//! `bdr.conflict_history` in the same transaction; how each is resolved is decided in
//! [`crate::conflict`].
//!
//! Invariants: memory used per change is released after the change (per-change memory
//! context), so a transaction of any size is applied in bounded memory; a transaction that
//! applied nothing still commits a record carrying the origin progress.

use crate::catalog::tombstones;
use crate::conflict::{
    self, decide, Action, Change, Conflict, Decision, Local, Resolution, Version,
};
use crate::error::{raise, ApplyError};
use crate::pg::exec::{LocalRow, Row, Target};
use crate::pg::{relcache, shmem, xact};
use crate::write::RelMap;
use bdr_core::stream::FlushTracker;
use bdr_core::wire::{self, Message, Value};
use pgrx::pg_sys;
use std::collections::HashMap;

/// What a history row says about the local side.
struct Recorded {
    local_version: Option<Version>,
    local_row: Option<String>,
    key: Option<String>,
}

/// A row's canonical key text, rendered only if something needs it (a tombstone lookup or
/// write, a history row): most inserts need none.
struct LazyKey<'a> {
    t: &'a Target,
    row: &'a Row,
    text: Option<Option<String>>,
}

impl<'a> LazyKey<'a> {
    fn new(t: &'a Target, row: &'a Row) -> Self {
        LazyKey { t, row, text: None }
    }

    fn get(&mut self) -> Option<String> {
        let (t, row) = (self.t, self.row);
        // SAFETY: the target is open and `row` holds its datums (per-change context).
        self.text
            .get_or_insert_with(|| unsafe { t.key_text(row) })
            .clone()
    }
}

struct Bound {
    remote: wire::Relation,
    /// "schema.name", for error contexts.
    name: std::rc::Rc<str>,
    map: Option<RelMap>,
}

pub struct Applier {
    /// The peer's name (shared with every error context).
    pub peer: std::rc::Rc<str>,
    pub local: String,
    peer_id: i64,
    local_id: i64,
    origin_nodes: HashMap<u16, i64>,
    /// Whether a table has tombstones, valid while no tombstone is written anywhere on
    /// this server (`tombstone_epoch` unchanged).
    has_tombstones: HashMap<pg_sys::Oid, bool>,
    tombstone_epoch: u64,
    /// The tombstone epoch when the current change looked for its key (see
    /// [`Applier::verify_no_new_tombstone`]).
    decision_epoch: u64,
    rels: HashMap<u32, Bound>,
    /// A change was applied since the last CommandCounterIncrement.
    pending_cci: bool,
    begin: Option<wire::Begin>,
    changes: u64,
    pub tracker: FlushTracker,
    change_cxt: pg_sys::MemoryContext,
    cache_cxt: pg_sys::MemoryContext,
    pub last_commit_time: i64,
    /// Conflicts resolved since last published, per type (like `Conflict::ALL`).
    conflict_counts: [u64; 9],
    /// Changes and commits applied since last published (see [`Applier::take_counts`]).
    counts: shmem::Stats,
    /// The current transaction ran a replicated schema change.
    ddl_applied: bool,
}

fn memory_context(name: &'static std::ffi::CStr) -> pg_sys::MemoryContext {
    // SAFETY: a child of TopMemoryContext, alive for the process.
    unsafe {
        pg_sys::AllocSetContextCreateInternal(
            pg_sys::TopMemoryContext,
            name.as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        )
    }
}

/// Another apply worker wrote `key` of `t`'s table at the same time: roll back and
/// apply the transaction again (see [`Applier::verify_no_new_tombstone`]).
fn raced(t: &Target, key: String) -> ! {
    // SAFETY: the target's relation is open.
    let table = unsafe { crate::pg::exec::relation_name(t.relid()) };
    raise(&ApplyError::ConcurrentKey { table, key })
}

fn row_json(rel: &wire::Relation, values: &[Value]) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (c, v) in rel.columns.iter().zip(values) {
        m.insert(
            c.name.clone(),
            match v {
                Value::Null => serde_json::Value::Null,
                Value::UnchangedToast => serde_json::Value::String("(unchanged toast)".into()),
                Value::Text(t) => serde_json::Value::String(t.clone()),
            },
        );
    }
    serde_json::Value::Object(m)
}

impl Applier {
    pub fn new(peer: (&str, i64), local: (&str, i64), origin_progress: u64) -> Applier {
        Applier {
            peer: peer.0.into(),
            local: local.0.into(),
            peer_id: peer.1,
            local_id: local.1,
            origin_nodes: HashMap::new(),
            has_tombstones: HashMap::new(),
            tombstone_epoch: u64::MAX,
            decision_epoch: 0,
            rels: HashMap::new(),
            pending_cci: false,
            begin: None,
            changes: 0,
            tracker: FlushTracker::new(origin_progress),
            change_cxt: memory_context(c"bdr apply change"),
            cache_cxt: memory_context(c"bdr apply cache"),
            last_commit_time: 0,
            conflict_counts: [0; 9],
            counts: shmem::Stats::default(),
            ddl_applied: false,
        }
    }

    pub fn in_transaction(&self) -> bool {
        self.begin.is_some()
    }

    /// What was applied and which conflicts were resolved since the last call, to be
    /// added to the shared-memory counters.
    pub fn take_counts(&mut self) -> (shmem::Stats, [u64; 9]) {
        (
            std::mem::take(&mut self.counts),
            std::mem::take(&mut self.conflict_counts),
        )
    }

    fn context(&self, action: &'static str, relation: Option<std::rc::Rc<str>>) {
        let b = self.begin.as_ref();
        xact::set_context(Some(xact::ApplyContext {
            action,
            relation,
            peer: self.peer.clone(),
            xid: b.map(|b| b.xid).unwrap_or(0),
            lsn: b.map(|b| b.final_lsn).unwrap_or(0),
            statement: None,
        }));
    }

    /// Run a replicated schema change (see [`crate::ddl`]) in the applying transaction.
    fn ddl(&mut self, content: &[u8]) {
        self.require_transaction("DDL");
        let cmd: bdr_core::ddl::DdlCommand = serde_json::from_slice(content)
            .unwrap_or_else(|e| raise(&crate::error::DdlError::BadMessage(e.to_string())));
        let b = self.begin.as_ref();
        xact::set_context(Some(xact::ApplyContext {
            action: "DDL",
            relation: None,
            peer: self.peer.clone(),
            xid: b.map(|b| b.xid).unwrap_or(0),
            lsn: b.map(|b| b.final_lsn).unwrap_or(0),
            statement: Some(cmd.command.chars().take(500).collect::<String>().into()),
        }));
        self.see_previous_change();
        crate::ddl::apply(&cmd);
        self.pending_cci = true;
        self.changes += 1;
        self.counts.ddl += 1;
        self.ddl_applied = true;
    }

    /// Apply one message. Errors are raised as PostgreSQL errors (the worker exits and is
    /// restarted; the transaction is rolled back and will be streamed again).
    pub fn handle(&mut self, msg: Message) {
        match msg {
            Message::Begin(b) => {
                if self.begin.is_some() {
                    raise(&ApplyError::Protocol("BEGIN inside a transaction".into()));
                }
                self.begin = Some(b);
                self.changes = 0;
                self.pending_cci = false;
                self.ddl_applied = false;
                self.context("begin", None);
                xact::begin();
            }
            Message::Relation(r) => {
                self.rels.insert(
                    r.id,
                    Bound {
                        name: r.qualified_name().into(),
                        remote: r,
                        map: None,
                    },
                );
            }
            Message::Insert(m) => self.change("INSERT", m.relation, |a, map| a.insert(map, &m.new)),
            Message::Update(m) => self.change("UPDATE", m.relation, |a, map| {
                a.update(map, m.old.as_ref(), &m.new)
            }),
            Message::Delete(m) => self.change("DELETE", m.relation, |a, map| a.delete(map, &m.old)),
            Message::Truncate(t) => self.truncate(&t),
            Message::Message(m) if m.prefix == bdr_core::ddl::DDL_PREFIX => self.ddl(&m.content),
            Message::Message(_) => {
                // Our own other logical messages (join synchronisation) need nothing
                // applied; the surrounding transaction still commits to record progress.
                self.require_transaction("MESSAGE");
            }
            Message::Commit(c) => self.commit(&c),
        }
    }

    fn require_transaction(&self, what: &str) {
        if self.begin.is_none() {
            raise(&ApplyError::Protocol(format!(
                "{what} outside a transaction"
            )));
        }
    }

    /// Make the previous change of this transaction visible to the next one (an INSERT
    /// then an UPDATE of the same row in one remote transaction). Done lazily, so a
    /// transaction of one change pays nothing for it.
    fn see_previous_change(&mut self) {
        if std::mem::take(&mut self.pending_cci) {
            // SAFETY: inside the applying transaction.
            unsafe { pg_sys::CommandCounterIncrement() };
        }
    }

    fn change(&mut self, action: &'static str, relation: u32, f: impl FnOnce(&mut Self, &RelMap)) {
        self.require_transaction(action);
        let name = match self.rels.get(&relation) {
            Some(b) => b.name.clone(),
            None => raise(&ApplyError::UnknownRelation(relation)),
        };
        self.context(action, Some(name));
        self.see_previous_change();
        // Lock the table before trusting its cached mapping: taking the lock processes
        // any change of its definition committed meanwhile, which drops the mapping.
        if let Some(relid) = self.rels[&relation].map.as_ref().map(|m| m.relid) {
            // SAFETY: inside the applying transaction.
            let inv = unsafe { relcache::lock_and_take(relid) };
            self.forget_mappings(&inv, None);
        }
        let cache = self.cache_cxt;
        let bound = self.rels.get_mut(&relation).expect("checked above");
        if bound.map.is_none() {
            // SAFETY: inside the applying transaction.
            let map = unsafe { RelMap::build(&bound.remote, cache) };
            bound.map = Some(map.unwrap_or_else(|e| raise(&e)));
            // Invalidations seen while building describe the table as just read.
            let inv = relcache::take_invalidated();
            self.forget_mappings(&inv, Some(relation));
        }
        let kind = match action {
            "INSERT" => "insert",
            "UPDATE" => "update",
            _ => "delete",
        };
        let bound = self.rels.get_mut(&relation).expect("checked above");
        let map = bound.map.as_ref().expect("built above");
        map.check_may(kind).unwrap_or_else(|e| raise(&e));
        // Move the map out while the closure borrows self mutably.
        let map = bound.map.take().expect("built above");
        // SAFETY: the per-change context is reset only after the target is closed.
        let old = unsafe { pg_sys::MemoryContextSwitchTo(self.change_cxt) };
        f(self, &map);
        unsafe {
            pg_sys::MemoryContextSwitchTo(old);
            pg_sys::MemoryContextReset(self.change_cxt);
        }
        self.pending_cci = true;
        self.rels.get_mut(&relation).expect("still bound").map = Some(map);
        self.changes += 1;
        match kind {
            "insert" => self.counts.inserts += 1,
            "update" => self.counts.updates += 1,
            _ => self.counts.deletes += 1,
        }
    }

    /// Drop the cached mapping of every table whose definition changed (all of them on a
    /// full reset), except peer relation `keep`.
    fn forget_mappings(&mut self, inv: &relcache::Invalidated, keep: Option<u32>) {
        if !inv.all && inv.relids.is_empty() {
            return;
        }
        for (id, b) in self.rels.iter_mut() {
            if Some(*id) == keep {
                continue;
            }
            if b.map
                .as_ref()
                .is_some_and(|m| inv.all || inv.relids.contains(&m.relid))
            {
                b.map = None;
            }
        }
    }

    /// The remote transaction's version.
    fn remote_version(&self) -> Version {
        Version {
            commit_time: self.begin.as_ref().map(|b| b.commit_time).unwrap_or(0),
            node_id: self.peer_id,
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

    fn version_of(&mut self, xid: pg_sys::TransactionId) -> Option<Version> {
        let (ts, origin) = xact::commit_ts(xid)?;
        Some(Version {
            commit_time: ts,
            node_id: self.node_of_origin(origin)?,
        })
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
            // SAFETY: the target is open.
            let xmin = unsafe { r.xmin() };
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

    /// Insert `row`, first resolving collisions on other unique indexes: a colliding
    /// local row that is older than the remote change is deleted (and remembered as
    /// deleted); a newer one keeps its place and the remote row is not inserted.
    ///
    /// # Safety
    /// Inside the applying transaction, with `t` open.
    unsafe fn insert_resolving_unique(
        &mut self,
        t: &Target,
        map: &RelMap,
        row: &Row,
        new: &[Value],
    ) {
        let remote = self.remote_version();
        // SAFETY: forwarded.
        unsafe {
            for (index, _cols) in t.other_unique_indexes() {
                let Some(other) = t.find_by_index(index, row) else {
                    continue;
                };
                let local = self.version_of(other.xmin());
                let wins = conflict::unique_key_remote_wins(local, remote);
                let base = other.values();
                let info = Recorded {
                    local_version: local,
                    local_row: Some(t.row_json(&base)),
                    key: t.key_text(&base),
                };
                if wins {
                    if let Some(k) = &info.key {
                        self.tombstone(t.relid(), k);
                    }
                    t.delete(&other);
                }
                let res = if wins {
                    Resolution::ApplyRemote
                } else {
                    Resolution::KeepLocal
                };
                self.record(map, Conflict::UniqueKey, res, new, info);
                if !wins {
                    return;
                }
            }
            t.insert(row);
        }
    }

    fn insert(&mut self, map: &RelMap, new: &[Value]) {
        // SAFETY: inside the applying transaction, in the per-change context.
        unsafe {
            let t = Target::open(map.relid);
            let mut row = map.row(new, None).unwrap_or_else(|e| raise(&e));
            t.fill_defaults(&mut row, map.local_only());
            let keyed = map.remote.columns.iter().any(|c| c.key);
            // The common case, a new key in a table without tombstones: insert directly,
            // unless a unique index already holds the key (then decide as below).
            if keyed
                && t.can_try_insert()
                && !self.may_have_tombstones(t.relid())
                && t.try_insert(&row)
            {
                let mut key = LazyKey::new(&t, &row);
                self.verify_no_new_tombstone(&t, Local::Missing, &mut key);
                t.close();
                return;
            }
            let found = if keyed {
                let key = map.search_row_new(new).unwrap_or_else(|e| raise(&e));
                t.find(&key)
            } else {
                None
            };
            let mut key = LazyKey::new(&t, &row);
            let local = self.local_state(&t, found.as_ref(), &mut key);
            let d = decide(Change::Insert, local, self.remote_version());
            let base = found.as_ref().map(|f| f.values());
            match d.action {
                Action::Insert => {
                    self.insert_resolving_unique(&t, map, &row, new);
                    self.verify_no_new_tombstone(&t, local, &mut key);
                }
                Action::Update => {
                    let f = found.as_ref().expect("update needs the row");
                    let row = map.row(new, base.as_ref()).unwrap_or_else(|e| raise(&e));
                    t.update(f, &row);
                }
                Action::Delete | Action::Nothing => {}
            }
            self.record_decision(&t, map, &d, new, local, base.as_ref(), &mut key);
            t.close();
        }
    }

    fn update(&mut self, map: &RelMap, old: Option<&wire::OldRow>, new: &[Value]) {
        // SAFETY: as in insert.
        unsafe {
            let t = Target::open(map.relid);
            let key_row = match old {
                Some(o) => map.search_row_old(o, "update"),
                None => map.search_row_new(new),
            }
            .unwrap_or_else(|e| raise(&e));
            let found = t.find(&key_row);
            let mut key = LazyKey::new(&t, &key_row);
            let local = self.local_state(&t, found.as_ref(), &mut key);
            let mut d = decide(Change::Update, local, self.remote_version());
            let base = found.as_ref().map(|f| f.values());
            match d.action {
                Action::Update => {
                    let f = found.as_ref().expect("update needs the row");
                    let row = map.row(new, base.as_ref()).unwrap_or_else(|e| raise(&e));
                    t.update(f, &row);
                    // A key change removes the old key: remember it as deleted.
                    if let (Some(_), Some(k)) = (old, key.get()) {
                        if t.key_text(&row).as_ref() != Some(&k) {
                            self.tombstone(t.relid(), &k);
                        }
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
                        self.insert_resolving_unique(&t, map, &row, new);
                        self.verify_no_new_tombstone(&t, local, &mut key);
                    }
                }
                Action::Delete | Action::Nothing => {}
            }
            self.record_decision(&t, map, &d, new, local, base.as_ref(), &mut key);
            t.close();
        }
    }

    fn delete(&mut self, map: &RelMap, old: &wire::OldRow) {
        // SAFETY: as in insert.
        unsafe {
            let t = Target::open(map.relid);
            let key_row = map
                .search_row_old(old, "delete")
                .unwrap_or_else(|e| raise(&e));
            let found = t.find(&key_row);
            let mut key = LazyKey::new(&t, &key_row);
            let local = self.local_state(&t, found.as_ref(), &mut key);
            let d = decide(Change::Delete, local, self.remote_version());
            let base = found.as_ref().map(|f| f.values());
            if d.action == Action::Delete {
                t.delete(found.as_ref().expect("delete needs the row"));
            }
            let values = match old {
                wire::OldRow::Key(k) | wire::OldRow::Full(k) => k.clone(),
            };
            self.record_decision(&t, map, &d, &values, local, base.as_ref(), &mut key);
            t.close();
        }
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

    /// Write the tombstone for an absent key (see [`Applier::verify_no_new_tombstone`]):
    /// only if none appeared since we looked, then check no row appeared either.
    ///
    /// # Safety
    /// `t` is open; `key` holds a search row for it.
    unsafe fn tombstone_absent_key(&mut self, t: &Target, local: Local, key: &mut LazyKey) {
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
        // SAFETY: forwarded.
        if !fresh || unsafe { t.find(key.row) }.is_some() {
            raced(t, k);
        }
    }

    /// Write the tombstone and the conflict history row a decision asks for.
    ///
    /// # Safety
    /// `t` is open; `base` holds its datums.
    #[allow(clippy::too_many_arguments)]
    unsafe fn record_decision(
        &mut self,
        t: &Target,
        map: &RelMap,
        d: &Decision,
        remote: &[Value],
        local: Local,
        base: Option<&Row>,
        key: &mut LazyKey,
    ) {
        if d.tombstone {
            match local {
                // SAFETY: forwarded.
                Local::Missing | Local::Deleted(_) => unsafe {
                    self.tombstone_absent_key(t, local, key)
                },
                Local::Row { .. } => {
                    // The row is locked: nobody else decides about this key meanwhile.
                    if let Some(k) = key.get() {
                        self.tombstone(t.relid(), &k);
                    }
                }
            }
        }
        if let Some((c, r)) = d.conflict {
            let local_version = match local {
                Local::Row { version, .. } => version,
                Local::Deleted(v) => Some(v),
                Local::Missing => None,
            };
            // SAFETY: forwarded.
            let local_row = base.map(|b| unsafe { t.row_json(b) });
            self.record(
                map,
                c,
                r,
                remote,
                Recorded {
                    local_version,
                    local_row,
                    key: key.get(),
                },
            );
        }
    }

    /// TRUNCATE the local tables of the named peer relations: each must be a table that
    /// replicates (checked like any change's target) and its owner may truncate it; the
    /// statement runs as that owner. The peer's CASCADE is not repeated (as native apply
    /// does not): the peer already listed every table its cascade emptied, and a local-only
    /// table that refers to one of them makes this an apply error rather than losing rows
    /// nobody replicated.
    fn truncate(&mut self, t: &wire::Truncate) {
        self.require_transaction("TRUNCATE");
        let names: Vec<std::rc::Rc<str>> = t
            .relations
            .iter()
            .map(|id| match self.rels.get(id) {
                Some(b) => b.name.clone(),
                None => raise(&ApplyError::UnknownRelation(*id)),
            })
            .collect();
        self.context("TRUNCATE", Some(names.join(", ").into()));
        self.see_previous_change();
        let cache = self.cache_cxt;
        let mut targets: Vec<(pg_sys::Oid, pg_sys::Oid)> = Vec::new();
        for id in &t.relations {
            let bound = self.rels.get_mut(id).expect("checked above");
            // Always from the catalog as it is now (no cached mapping trusted).
            // SAFETY: inside the applying transaction.
            let map = unsafe { RelMap::build(&bound.remote, cache) }.unwrap_or_else(|e| raise(&e));
            map.check_may("truncate").unwrap_or_else(|e| raise(&e));
            targets.push((map.relid, map.rights.owner));
            bound.map = None;
        }
        let restart = if t.restart_identity {
            " RESTART IDENTITY"
        } else {
            ""
        };
        let same_owner = targets.windows(2).all(|w| w[0].1 == w[1].1);
        let groups: Vec<&[(pg_sys::Oid, pg_sys::Oid)]> = if same_owner {
            vec![&targets[..]]
        } else {
            targets.chunks(1).collect()
        };
        for g in groups {
            // Names read from the local catalog by OID, never the peer's text.
            let list: Vec<String> = g
                .iter()
                // SAFETY: inside the applying transaction; the tables are known to exist.
                .map(|(relid, _)| unsafe { relcache::quoted_name(*relid) })
                .collect();
            let sql = format!("TRUNCATE ONLY {}{restart}", list.join(", "));
            crate::pg::exec::as_user(g[0].1, || xact::run_sql(&sql));
        }
        self.pending_cci = true;
        self.changes += 1;
        self.counts.truncates += 1;
    }

    fn record(
        &mut self,
        map: &RelMap,
        c: Conflict,
        r: Resolution,
        values: &[Value],
        info: Recorded,
    ) {
        if let Some(i) = Conflict::ALL.iter().position(|x| *x == c) {
            self.conflict_counts[i] += 1;
        }
        if !crate::gucs::LOG_CONFLICTS_TO_TABLE.get() {
            return;
        }
        let b = self.begin.as_ref().expect("inside a transaction");
        crate::history::record(&crate::history::Entry {
            local_node: &self.local,
            remote_node: &self.peer,
            relation: &map.name(),
            conflict: c,
            resolution: r,
            local_commit_time: info
                .local_version
                .map(|v| v.commit_time)
                .filter(|t| *t != i64::MIN),
            remote_commit_time: b.commit_time,
            remote_lsn: b.final_lsn,
            remote_xid: b.xid,
            key: info.key,
            local_tuple: info.local_row,
            remote_tuple: row_json(&map.remote, values),
        });
    }

    fn commit(&mut self, c: &wire::Commit) {
        self.require_transaction("COMMIT");
        self.context("commit", None);
        if self.changes == 0 {
            // Nothing written: take an xid so the commit record (and with it the origin
            // progress) is written all the same.
            // SAFETY: inside a transaction.
            unsafe {
                pg_sys::GetCurrentTransactionId();
            }
        }
        let local_end = xact::commit_remote(c.end_lsn, c.commit_time);
        self.tracker.applied(c.end_lsn, local_end);
        self.last_commit_time = c.commit_time;
        self.counts.commits += 1;
        self.begin = None;
        if std::mem::take(&mut self.ddl_applied) {
            crate::ddl::applied_from(&self.peer);
        }
        xact::set_context(None);
    }
}
