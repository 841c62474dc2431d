//! Apply stage: one local transaction per remote transaction, one message at a time.
//!
//! The receive loop hands every decoded frame to [`Applier::handle`]. BEGIN starts a local
//! transaction; RELATION (re)binds a peer relation to a local table ([`RelMap`], the write
//! stage's mapping); INSERT/UPDATE/DELETE are handed, with their table's mapping, to the
//! conflict stage ([`crate::conflict::Resolver`]), which finds the local row, decides and
//! writes through the write stage; COMMIT commits under the peer's replication origin with
//! the remote commit LSN and timestamp, and records (remote end LSN, local commit LSN) for
//! flush feedback. This module keeps the dispatch and the transaction framing only:
//! apply → conflict → write → pg, nothing calling back up.
//!
//! Invariants: memory used per change is released after the change (per-change memory
//! context), so a transaction of any size is applied in bounded memory; a transaction that
//! applied nothing still commits a record carrying the origin progress.
//!
//! A transaction's messages are kept until its commit while they are all INSERTs
//! (`bdr_core::kept`: at most 100 and 256 kB), and while they all are its new keys go in
//! as ordinary insertions. One that meets an existing key leaves its row written: the transaction is
//! rolled back at once and applied again from the kept messages, the careful way
//! ([`Applier::apply_again`]); a commit before that rollback raises
//! (`xact::must_roll_back`), so such a row is never committed.

use crate::catalog::nodes::Node;
use crate::conflict::Resolver;
use crate::error::{raise, ApplyError};
use crate::pg::memcxt::MemCxt;
use crate::pg::{relcache, shmem, xact};
use crate::write::RelMap;
use bdr_core::idmap::IdMap;
use bdr_core::kept::{Kept, Step};
use bdr_core::stream::FlushTracker;
use bdr_core::wire::{self, Message};
use pgrx::pg_sys;
use std::collections::HashMap;

struct Bound {
    remote: wire::Relation,
    /// "schema.name", for error contexts.
    name: std::rc::Rc<str>,
    map: Option<RelMap>,
}

/// How this node streams from a peer (hub and spoke; both false in a full mesh).
#[derive(Debug, Clone, Copy, Default)]
pub struct Link {
    /// Ask the peer (our hub) to forward every node's changes, each under its original
    /// origin (`forward_origins 'all'`).
    pub forwarded: bool,
    /// The peer is our spoke: its schema changes are queued again here so that they
    /// travel on to the other spokes.
    pub requeue_ddl: bool,
}

pub struct Applier {
    /// The peer's name (shared with every error context).
    pub peer: std::rc::Rc<str>,
    /// The conflict stage, with its caches.
    resolver: Resolver,
    rels: IdMap<u32, Bound>,
    /// A change was applied since the last CommandCounterIncrement.
    pending_cci: bool,
    begin: Option<wire::Begin>,
    changes: u64,
    pub tracker: FlushTracker,
    /// Memory of one change, freed after it (bounded memory for any transaction).
    change_cxt: MemCxt,
    /// Input functions of the cached mappings, kept for the process.
    cache_cxt: MemCxt,
    pub last_commit_time: i64,
    /// Changes and commits applied since last published (see [`Applier::take_counts`]).
    counts: shmem::Stats,
    /// The current transaction ran a replicated schema change.
    ddl_applied: bool,
    /// The current transaction is a synchronous commit on its origin: flush and
    /// acknowledge it as soon as it is committed here (see `crate::sync_commit`).
    pub ack_now: bool,
    /// Hub and spoke (see [`Applier::set_link`]).
    link: Link,
    dboid: u32,
    /// The replication origin this session commits under now: the peer's, or (for a
    /// transaction the hub forwarded) the original node's.
    origin_now: String,
    /// The current transaction was forwarded by the hub: its original node and id.
    forwarded: Option<(std::rc::Rc<str>, i64)>,
    /// The current transaction is not applied (already applied, or our own coming back).
    skipping: bool,
    /// This node's name (a forwarded transaction of its own is never applied).
    local: String,
    /// The peer's replication origin here.
    peer_origin: String,
    /// Node ids of forwarded transactions' nodes, by name.
    node_ids: HashMap<String, i64>,
    /// Peer relations whose table the current transaction opened (released at commit).
    touched: Vec<u32>,
    /// A parallel-apply writer: changes are stamped with the origin without holding its
    /// session, which is set up only for the commit (`xact::commit_remote_turn`).
    parallel: bool,
    /// (remote end LSN, local commit end LSN) of the last transaction finished (local 0:
    /// nothing committed, it was skipped).
    pub last_done: (u64, u64),
    /// A stream writer: the local subtransactions opened for the streamed transaction's
    /// subtransactions, innermost last: the peer's subxid, and the counts when it began
    /// (see [`Applier::enter_subtransaction`]).
    subxacts: Vec<(u32, shmem::Stats)>,
    /// A stream writer: a change of the streamed transaction needed its commit time (a
    /// last-update-wins decision), so it and every later change wait for the commit
    /// ([`Applier::apply_streamed_change`]).
    waits_for_commit: bool,
    /// The current transaction's messages while it is small (see `bdr_core::kept`): its
    /// new keys go in as ordinary insertions, and one that meets an existing key rolls
    /// the transaction back and applies it again ([`Applier::apply_again`]).
    kept: Kept,
    /// The counts (changes, conflicts) at the current transaction's BEGIN.
    counts_at_begin: (shmem::Stats, [u64; 9]),
}

impl Applier {
    pub fn new(peer: &Node, local: &Node, origin_progress: u64) -> Applier {
        let peer_name: std::rc::Rc<str> = peer.name.as_str().into();
        Applier {
            resolver: Resolver::new(peer_name.clone(), peer.id, local),
            peer: peer_name,
            rels: IdMap::default(),
            pending_cci: false,
            begin: None,
            changes: 0,
            tracker: FlushTracker::new(origin_progress),
            change_cxt: MemCxt::new(c"bdr apply change"),
            cache_cxt: MemCxt::new(c"bdr apply cache"),
            last_commit_time: 0,
            counts: shmem::Stats::default(),
            ddl_applied: false,
            ack_now: false,
            link: Link::default(),
            dboid: 0,
            origin_now: String::new(),
            forwarded: None,
            skipping: false,
            local: local.name.clone(),
            peer_origin: String::new(),
            node_ids: HashMap::new(),
            touched: Vec::new(),
            parallel: false,
            last_done: (0, 0),
            subxacts: Vec::new(),
            waits_for_commit: false,
            kept: Kept::default(),
            counts_at_begin: Default::default(),
        }
    }

    /// How this stream is linked (hub and spoke), and this database, whose peer origin
    /// the session was set up with.
    pub fn set_link(&mut self, dboid: u32, link: Link) {
        self.link = link;
        self.dboid = dboid;
        self.peer_origin = bdr_core::names::origin_name(dboid, &self.peer);
        self.origin_now = self.peer_origin.clone();
    }

    /// Apply as a parallel-apply writer (see the `parallel` field); stamps changes with
    /// the peer's origin from now on.
    pub fn set_parallel(&mut self) {
        self.parallel = true;
        xact::begin();
        xact::set_origin(&self.peer_origin);
        xact::commit();
    }

    #[cold]
    fn use_origin(&mut self, name: &str) {
        if self.parallel {
            xact::set_origin(name);
        } else {
            xact::switch_origin(name);
        }
    }

    /// The node whose change is being applied: the peer, or the node a forwarded
    /// transaction came from.
    fn origin_node(&self) -> &str {
        self.forwarded.as_ref().map(|f| &*f.0).unwrap_or(&self.peer)
    }

    /// At BEGIN: under which origin to commit, and whether to apply at all. A transaction
    /// the hub forwarded carries its original node's origin name and LSN: it is applied
    /// under that node's origin (so its rows keep that node's identity for later
    /// conflicts) unless that origin's progress shows it arrived already (the hub sends it
    /// again after a restart), and never if it is this node's own change.
    fn route_origin(&mut self) {
        self.forwarded = None;
        self.skipping = false;
        // A peer that forwards without being asked is applied as its own change.
        let forwarded = self
            .begin
            .as_ref()
            .and_then(|b| b.origin.as_ref())
            .filter(|_| self.link.forwarded)
            .cloned();
        let Some(o) = forwarded else {
            // The common case: the peer's own transaction, under the peer's origin.
            if self.origin_now != self.peer_origin {
                let name = self.peer_origin.clone();
                self.use_origin(&name);
                self.origin_now = name;
            }
            return;
        };
        let Some((_, node)) = bdr_core::names::parse(&o.name).filter(|(_, n)| !n.is_empty()) else {
            raise(&ApplyError::Protocol(format!(
                "forwarded transaction with a foreign replication origin \"{}\"",
                o.name
            )))
        };
        if node == self.local {
            self.skipping = true;
            return;
        }
        let id = match self.node_ids.get(node) {
            Some(id) => *id,
            None => {
                let Some(n) = crate::catalog::nodes::by_name(node) else {
                    raise(&ApplyError::Protocol(format!(
                        "forwarded transaction from node \"{node}\", which this node does not know"
                    )))
                };
                self.node_ids.insert(node.to_string(), n.id);
                n.id
            }
        };
        let name = bdr_core::names::origin_name(self.dboid, node);
        if xact::origin_progress(&name) >= o.lsn {
            self.skipping = true;
            return;
        }
        self.forwarded = Some((node.into(), id));
        if name != self.origin_now {
            self.use_origin(&name);
            self.origin_now = name;
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
            self.resolver.take_counts(),
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
    #[cold]
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
        self.release_tables();
        crate::ddl::apply(&cmd);
        if self.link.requeue_ddl {
            // Hub and spoke: queued here too, it travels on in this transaction to the
            // other spokes (under the original node's origin; never back to it).
            crate::ddl::requeue(&cmd);
        }
        self.pending_cci = true;
        self.changes += 1;
        self.counts.ddl += 1;
        self.ddl_applied = true;
    }

    /// Apply one message. Errors are raised as PostgreSQL errors (the worker exits and is
    /// restarted; the transaction is rolled back and will be streamed again).
    pub fn handle(&mut self, msg: Message) {
        if self.skipping
            && !matches!(
                msg,
                Message::Begin(_) | Message::Relation(_) | Message::Commit(_)
            )
        {
            return;
        }
        let keep = match self.kept.step(&msg) {
            Step::Keep => true,
            Step::Pass => false,
            Step::Stop => {
                self.stop_keeping();
                false
            }
        };
        match msg {
            Message::Begin(b) => {
                if self.begin.is_some() {
                    raise(&ApplyError::Protocol("BEGIN inside a transaction".into()));
                }
                self.begin = Some(b);
                self.start_transaction("begin");
                let b = self.begin.as_ref().expect("set above");
                self.resolver.begin(b, self.forwarded.clone());
                if !self.skipping {
                    self.kept.begin();
                    self.resolver.set_plain_inserts(true);
                    self.counts_at_begin = (self.counts, self.resolver.counts());
                }
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
            m @ (Message::Insert(_) | Message::Update(_) | Message::Delete(_)) => {
                self.row_change(&m);
                if keep {
                    self.kept.push(m);
                }
                if self.resolver.take_clash() {
                    // Nothing else happens in this transaction but its rollback.
                    self.apply_again();
                }
            }
            Message::Truncate(t) => self.truncate(&t),
            Message::Message(m) if m.prefix == bdr_core::ddl::DDL_PREFIX => self.ddl(&m.content),
            Message::Message(m) if m.prefix == bdr_core::wire::SYNC_COMMIT_PREFIX => {
                self.require_transaction("MESSAGE");
                self.ack_now = true;
            }
            Message::Message(_) => {
                // Our own other logical messages (join synchronisation) need nothing
                // applied; the surrounding transaction still commits to record progress.
                self.require_transaction("MESSAGE");
            }
            Message::Commit(c) => self.commit(&c),
            // The receiver handles streamed transactions (src/receive/stream.rs).
            m @ (Message::StreamStart(_)
            | Message::StreamStop
            | Message::StreamChange(_)
            | Message::StreamAbort(_)
            | Message::StreamCommit(_)) => raise(&ApplyError::Protocol(format!(
                "{} frame in the whole-transaction apply path",
                m.kind_name()
            ))),
        }
    }

    /// The current transaction can no longer be kept whole: its remaining new keys take
    /// the careful path (a speculative insertion).
    #[cold]
    fn stop_keeping(&mut self) {
        self.kept.stop();
        self.resolver.set_plain_inserts(false);
    }

    /// An ordinary insertion met an existing key (see `Resolver::set_plain_inserts`):
    /// roll the local transaction back (the row it wrote with it) and apply the kept
    /// messages again from the BEGIN, every new key now the careful way, which finds the
    /// local row and decides. The changes and conflicts counted since the BEGIN are
    /// rolled back too, and a synchronous commit's request is kept.
    #[cold]
    fn apply_again(&mut self) {
        if !self.kept.complete() {
            pgrx::error!(
                "bdr: internal error: an insertion clashed in a transaction not kept whole"
            );
        }
        let begin = self
            .begin
            .clone()
            .expect("a clash happens inside a transaction");
        let messages = self.kept.take();
        let ack_now = self.ack_now;
        self.abandon();
        let (counts, conflicts) = self.counts_at_begin;
        self.counts = counts;
        self.resolver.restore_counts(conflicts);
        self.counts.reapplied += 1;
        self.handle(Message::Begin(begin));
        self.stop_keeping();
        self.ack_now = ack_now;
        for m in messages {
            self.handle(m);
        }
    }

    /// A stream writer: the first piece of streamed transaction `xid` starts a local
    /// transaction, applied before the remote commit (see `Resolver::begin_streamed`).
    #[cold]
    pub fn begin_streamed(&mut self, xid: u32) {
        if self.begin.is_some() {
            raise(&ApplyError::Protocol(
                "STREAM START inside a transaction".into(),
            ));
        }
        self.begin = Some(wire::Begin {
            xid,
            final_lsn: 0,
            commit_time: 0,
            origin: None,
        });
        self.start_transaction("stream start");
        self.resolver.begin_streamed(xid);
        self.waits_for_commit = false;
    }

    /// A stream writer: apply a change (INSERT, UPDATE or DELETE) of the streamed
    /// transaction now, or hand it back when it must wait for the commit: it needs a
    /// last-update-wins decision, which needs the commit time, or an earlier change of the
    /// transaction did. From the first such change on, every later one waits too, so the
    /// transaction is applied as a prefix now and the rest, in order, at the commit
    /// ([`Applier::commit_streamed`]): the same as the whole-transaction path, which
    /// applies the prefix (no decision in it) and then the rest.
    ///
    /// `subxid` is the peer's subtransaction the change belongs to (`xid` for the top
    /// level): see [`Applier::enter_subtransaction`].
    #[cold]
    pub fn apply_streamed_change(
        &mut self,
        xid: u32,
        subxid: u32,
        msg: Message,
    ) -> Option<Message> {
        if self.waits_for_commit {
            return Some(msg);
        }
        if !matches!(
            msg,
            Message::Insert(_) | Message::Update(_) | Message::Delete(_)
        ) {
            raise(&ApplyError::Protocol(format!(
                "{} as a change of a streamed transaction",
                msg.kind_name()
            )));
        }
        if subxid != xid {
            self.enter_subtransaction(subxid);
        }
        self.row_change(&msg);
        self.waits_for_commit.then_some(msg)
    }

    /// Apply an INSERT, UPDATE or DELETE (any other message is ignored: callers pass only
    /// those).
    fn row_change(&mut self, msg: &Message) {
        match msg {
            Message::Insert(m) => self.change("INSERT", m.relation, |r, map| r.insert(map, &m.new)),
            Message::Update(m) => self.change("UPDATE", m.relation, |r, map| {
                r.update(map, m.old.as_ref(), &m.new)
            }),
            Message::Delete(m) => self.change("DELETE", m.relation, |r, map| r.delete(map, &m.old)),
            _ => {}
        }
    }

    /// A stream writer: the next change belongs to the peer's subtransaction `subxid` of
    /// the streamed transaction. The first change of a subtransaction starts a local one,
    /// so that a rollback of it on the peer (STREAM ABORT of `subxid`) rolls back here
    /// exactly the changes made since (those of `subxid` and of anything after it: on
    /// the peer, everything after a savepoint belongs to it or to its children until it
    /// ends, and once released into its parent it can no longer be rolled back alone).
    /// A later change of the top level or of a released subtransaction goes into the
    /// innermost local one, which then can only end with the whole transaction.
    #[cold]
    fn enter_subtransaction(&mut self, subxid: u32) {
        self.require_transaction("a subtransaction's change");
        if self.subxacts.iter().any(|(x, _)| *x == subxid) {
            return;
        }
        self.end_table_references();
        xact::begin_subtransaction();
        self.subxacts.push((subxid, self.counts));
    }

    /// A stream writer: the peer rolled back its subtransaction `subxid`: roll back the
    /// local subtransaction opened at its first change, with every one opened since, and
    /// forget their counts; `true` then. `false` (nothing done) for a subtransaction none
    /// of whose changes was applied here (it had none, they were never streamed, or they
    /// wait for the commit).
    #[cold]
    pub fn rollback_subtransaction(&mut self, subxid: u32) -> bool {
        self.require_transaction("STREAM ABORT of a subtransaction");
        let Some(at) = self.subxacts.iter().position(|(x, _)| *x == subxid) else {
            return false;
        };
        self.end_table_references();
        while self.subxacts.len() > at {
            let (_, counts) = self.subxacts.pop().expect("longer than at");
            xact::rollback_subtransaction();
            self.counts = counts;
        }
        // The next change takes a new command id (what it reads must not be the
        // rolled-back rows' command).
        self.pending_cci = true;
        true
    }

    /// Merge every local subtransaction into the transaction (before its commit).
    #[cold]
    fn release_subtransactions(&mut self) {
        if self.subxacts.is_empty() {
            return;
        }
        self.end_table_references();
        while self.subxacts.pop().is_some() {
            xact::release_subtransaction();
        }
    }

    /// Give back the table and index references this transaction's changes took, at the
    /// (sub)transaction level that took them: relation references must not cross a
    /// subtransaction boundary (its end releases them, or warns of a leak). The locks
    /// stay; the next change of each table takes its references again.
    fn end_table_references(&mut self) {
        for id in &self.touched {
            if let Some(m) = self.rels.get_mut(id).and_then(|b| b.map.as_mut()) {
                m.end_transaction();
            }
        }
    }

    /// The local transaction of the remote one `self.begin` now describes: per-transaction
    /// state reset, error context, BEGIN, and the origin its changes are stamped with.
    fn start_transaction(&mut self, what: &'static str) {
        self.changes = 0;
        self.pending_cci = false;
        self.ddl_applied = false;
        self.ack_now = false;
        self.context(what, None);
        xact::begin();
        self.route_origin();
    }

    /// A stream writer: the streamed transaction committed on the peer: apply the
    /// changes that waited for its commit time (`deferred`, in order; decided as in any
    /// transaction), then commit it here under the origin, as a whole transaction's
    /// COMMIT does.
    #[cold]
    pub fn commit_streamed(&mut self, c: &wire::StreamCommit, deferred: Vec<Message>) {
        self.release_subtransactions();
        if let Some(b) = &mut self.begin {
            b.final_lsn = c.commit_lsn;
            b.commit_time = c.commit_time;
        }
        self.resolver.end_streamed(c.commit_time, c.commit_lsn);
        self.waits_for_commit = false;
        for m in deferred {
            self.handle(m);
        }
        self.commit(&wire::Commit {
            commit_lsn: c.commit_lsn,
            end_lsn: c.end_lsn,
            commit_time: c.commit_time,
        });
    }

    /// Roll back the transaction being applied (a streamed transaction rolled back on
    /// the peer, or one to apply again, [`Applier::apply_again`]); nothing of it is
    /// counted.
    #[cold]
    pub fn abandon(&mut self) {
        self.end_table_references();
        self.touched.clear();
        xact::abort();
        self.forget_transaction();
    }

    /// After an error caught in the middle of a change (the receiver's deadlock guard,
    /// `receive/direct.rs`): roll back and start afresh. The tables' executor states may
    /// hold what the abort already released, so they are leaked, never touched again
    /// (the relations are sent again on the next connection, which follows at once).
    #[cold]
    pub fn abandon_after_error(&mut self) {
        xact::abort();
        std::mem::forget(std::mem::take(&mut self.rels));
        self.touched.clear();
        self.forget_transaction();
    }

    fn forget_transaction(&mut self) {
        self.kept.end();
        let _ = self.resolver.take_clash();
        // Rolled back with the transaction (`xact::abort` unwinds every level).
        self.subxacts.clear();
        self.waits_for_commit = false;
        self.begin = None;
        self.skipping = false;
        self.forwarded = None;
        self.ddl_applied = false;
        self.pending_cci = false;
        self.ack_now = false;
        let _ = self.take_counts();
        xact::set_context(None);
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
            xact::command_counter_increment();
        }
    }

    fn change(
        &mut self,
        action: &'static str,
        relation: u32,
        f: impl FnOnce(&mut Resolver, &RelMap),
    ) {
        self.require_transaction(action);
        let name = match self.rels.get(&relation) {
            Some(b) => b.name.clone(),
            None => raise(&ApplyError::UnknownRelation(relation)),
        };
        self.context(action, Some(name));
        self.see_previous_change();
        let kind = match action {
            "INSERT" => "insert",
            "UPDATE" => "update",
            _ => "delete",
        };
        self.open_table(relation, kind);
        if self.touched.last() != Some(&relation) && !self.touched.contains(&relation) {
            self.touched.push(relation);
        }
        let map = self.rels[&relation].map.as_ref().expect("opened above");
        {
            // Everything the change allocates is freed when it is done.
            let _change = self.change_cxt.scope();
            f(&mut self.resolver, map);
            map.end_change();
        }
        if self.resolver.take_deferred() {
            // Nothing written: it is applied at the commit (a streamed transaction).
            self.waits_for_commit = true;
            return;
        }
        self.pending_cci = true;
        self.changes += 1;
        match kind {
            "insert" => self.counts.inserts += 1,
            "update" => self.counts.updates += 1,
            _ => self.counts.deletes += 1,
        }
    }

    /// Make peer relation `relation`'s mapping and table ready for a change of `kind`.
    /// Lock the table before trusting its cached mapping: taking the lock processes any
    /// change of its definition committed meanwhile, which drops the mapping (and with
    /// it the table's executor state). Building a mapping reads the catalog before the
    /// lock is taken, and re-opening a kept table locks its indexes (which processes
    /// invalidations too): if what was seen then concerns it, it is built once more,
    /// under the lock.
    fn open_table(&mut self, relation: u32, kind: &'static str) {
        if let Some(relid) = self.rels[&relation].map.as_ref().map(|m| m.relid) {
            let inv = relcache::lock_and_take(relid);
            self.forget_mappings(&inv, None);
        }
        for attempt in 0..2 {
            let bound = self.rels.get_mut(&relation).expect("checked by the caller");
            if bound.map.is_none() {
                let map = RelMap::build(&bound.remote, &self.cache_cxt);
                bound.map = Some(map.unwrap_or_else(|e| raise(&e)));
            }
            let map = bound.map.as_mut().expect("built above");
            map.check_may(kind).unwrap_or_else(|e| raise(&e));
            map.begin_change(&self.cache_cxt);
            let inv = relcache::take_invalidated();
            if attempt == 0 && map.invalidated_by(&inv) {
                bound.map = None;
                self.forget_mappings(&inv, None);
                continue;
            }
            // Later invalidations of this table describe it as just opened.
            self.forget_mappings(&inv, Some(relation));
            return;
        }
    }

    /// Release every table kept open (and its executor state): DDL and TRUNCATE in the
    /// applying transaction refuse a table this session holds open.
    #[cold]
    fn release_tables(&mut self) {
        for b in self.rels.values_mut() {
            if let Some(m) = &mut b.map {
                m.release_target();
            }
        }
        self.touched.clear();
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
            if b.map.as_ref().is_some_and(|m| m.invalidated_by(inv)) {
                b.map = None;
            }
        }
    }

    /// TRUNCATE the local tables of the named peer relations: each must be a table that
    /// replicates (checked like any change's target) and its owner may truncate it; the
    /// statement runs as that owner. The peer's CASCADE is not repeated (as native apply
    /// does not): the peer already listed every table its cascade emptied, and a local-only
    /// table that refers to one of them makes this an apply error rather than losing rows
    /// nobody replicated.
    #[cold]
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
        self.release_tables();
        let mut targets: Vec<(pg_sys::Oid, pg_sys::Oid)> = Vec::new();
        for id in &t.relations {
            let bound = self.rels.get_mut(id).expect("checked above");
            // Always from the catalog as it is now (no cached mapping trusted).
            let map = RelMap::build(&bound.remote, &self.cache_cxt).unwrap_or_else(|e| raise(&e));
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
                .map(|(relid, _)| relcache::quoted_name(*relid))
                .collect();
            let sql = format!("TRUNCATE ONLY {}{restart}", list.join(", "));
            crate::pg::owner::as_user(g[0].1, || xact::run_sql(&sql));
        }
        self.pending_cci = true;
        self.changes += 1;
        self.counts.truncates += 1;
    }

    fn commit(&mut self, c: &wire::Commit) {
        self.require_transaction("COMMIT");
        self.context("commit", None);
        if std::mem::take(&mut self.skipping) {
            // Nothing of it was applied (see `route_origin`): nothing to commit, and the
            // position is as good as flushed.
            xact::abort();
            self.tracker.applied(c.end_lsn, 0);
            self.last_done = (c.end_lsn, 0);
            self.begin = None;
            xact::set_context(None);
            return;
        }
        if self.changes == 0 {
            // Nothing written: take an xid so the commit record (and with it the origin
            // progress) is written all the same.
            xact::assign_xid();
        }
        // A forwarded transaction records its original node's LSN under that node's
        // origin; the peer's own transactions their end LSN under the peer's.
        let origin_lsn = match (
            &self.forwarded,
            self.begin.as_ref().and_then(|b| b.origin.as_ref()),
        ) {
            (Some(_), Some(o)) => o.lsn,
            _ => c.end_lsn,
        };
        // The tables opened by this transaction's changes are released before it ends.
        self.end_table_references();
        self.touched.clear();
        // The node a replicated schema change came from (allocated only then).
        let ddl_origin = self.ddl_applied.then(|| self.origin_node().to_string());
        let local_end = if self.parallel {
            xact::commit_remote_turn(origin_lsn, c.commit_time)
        } else {
            xact::commit_remote(origin_lsn, c.commit_time)
        };
        self.tracker.applied(c.end_lsn, local_end);
        self.last_done = (c.end_lsn, local_end);
        self.last_commit_time = c.commit_time;
        self.counts.commits += 1;
        self.kept.end();
        self.begin = None;
        self.forwarded = None;
        self.ddl_applied = false;
        if let Some(origin) = ddl_origin {
            crate::ddl::applied_from(&origin, origin_lsn);
        }
        xact::set_context(None);
    }
}
