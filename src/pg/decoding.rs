//! Decode stage, raw half: the logical decoding output plugin callbacks.
//!
//! PostgreSQL calls these with its own structures (`ReorderBufferTXN`,
//! `ReorderBufferChange`, `Relation`); this module reads them, asks [`crate::decode`] what
//! to send, encodes [`bdr_core::wire`] frames and writes them with `OutputPluginWrite`
//! (one frame per write up to protocol version 2, batches from version 3).
//!
//! Why this way:
//! - **Per-stream relation cache** (`State::rels`): the replicate/skip decision, the column
//!   list, key columns and each column's output function (`FmgrInfo`) are looked up once
//!   per relation per stream, not per change. A relcache invalidation callback records
//!   which relations changed; entries are dropped (and their metadata re-sent) before the
//!   next change. The callback only appends to a list, because it can fire re-entrantly
//!   in the middle of a catalog lookup made while building an entry.
//! - **Per-change memory context**: the text renderings of a change's values are
//!   allocated in a context reset after every change, so memory does not grow with the
//!   size of a transaction.
//!
//! - **Batched writes** (protocol version 3 and later): frames are gathered in
//!   `State::buf` and written as one write at every COMMIT frame (and the end of a
//!   streamed piece) and whenever [`wire::BATCH_BYTES`] have gathered. The walsender
//!   sends each write with its own system call (`WalSndWriteData` flushes every time);
//!   one per change was ~30% of its CPU on a big transaction. The SQL functions
//!   (`pg_logical_slot_*_changes`) store each write as a row of a tuplestore: one per
//!   change was ~20% of a backend decoding through them, so they get batches too (one
//!   row per transaction or per 16 KiB, `wire::BATCH_BYTES`; versions 1 and 2 keep one frame per row).
//! - **Frames straight from the tuples**: from version 2 an INSERT, UPDATE or DELETE is
//!   written value by value into the pending write ([`wire::ChangeWriter`], byte-identical
//!   to encoding a [`Message`]), and the PostgreSQL calls of a change run under one pgrx
//!   guard per step instead of one per call ([`raw`]).
//!
//! - **Streaming** (protocol version 4, only when the subscriber asks with `streaming
//!   'on'`): `ctx->streaming` is left on, and PostgreSQL's reorder buffer then hands a
//!   transaction that outgrows `logical_decoding_work_mem` to the `stream_*` callbacks in
//!   pieces before its commit. They share the ordinary callbacks' code: `State::tag` says
//!   which (sub)transaction the change being emitted belongs to, and [`emit`] then writes
//!   a `STREAM START` before the piece's first frame (lazily, as BEGIN), relation frames
//!   again in every piece (a streamed transaction may roll back or change a table's
//!   definition, so nothing sent inside it is assumed known afterwards: every relation is
//!   re-sent after a piece, as pgoutput does), and each change wrapped in a
//!   `STREAM CHANGE` with its xids. `STREAM STOP`, `ABORT` and `COMMIT` are only sent
//!   for a transaction of which something was sent (`State::streamed`).
//!
//! Invariants: a frame is only written between the transaction's BEGIN and COMMIT frames
//! (non-transactional messages are never sent); a relation's metadata frame precedes
//! its first change in the stream; a value this node does not have (unchanged on-disk
//! TOAST) is sent as [`Value::UnchangedToast`], never as a guess; a batch never outlives
//! its transaction's commit callback (the COMMIT frame flushes it), so nothing is held
//! back between transactions.

mod raw;
mod relations;

use relations::{entry, not_utf8, put_row, row_values, Deformed, RelEntry, RelMap, Special};

use crate::decode::{self, DecodeOptions, TxnFraming};
use crate::error;
use bdr_core::idmap::IdSet;
use bdr_core::wire::{
    self, Begin, ChangeWriter, Commit, Delete, Insert, LogicalMessage, Message, OldRow, OriginInfo,
    ReplicaIdentity, StreamAbort, StreamChange, StreamCommit, StreamStart, Truncate, Update,
};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgList;
use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_int, CStr};

/// Per-decoding-context state, owned by `ctx->output_plugin_private`.
struct State {
    opts: DecodeOptions,
    /// The slot's name (`bdr_<dboid>_<subscriber>`), to recognise the subscriber's own
    /// changes when forwarding ([`decode::loops_back`]).
    slot_name: String,
    /// The current transaction is not sent (a forwarded change of the subscriber itself).
    skip: bool,
    framing: TxnFraming,
    rels: RelMap,
    /// `heap_deform_tuple`'s arrays, reused by every change.
    scratch: Deformed,
    /// Frames not yet written (one frame, or a batch: see the module note).
    buf: Vec<u8>,
    /// Gather frames into batches (version 3 or later).
    batch: bool,
    change_cxt: pg_sys::MemoryContext,
    /// Inside a `stream_*` change callback: the (top xid, subxid) the change belongs to.
    tag: Option<(u32, u32)>,
    /// The piece being streamed (between stream_start and stream_stop): its top xid and
    /// whether its STREAM START was written.
    piece: Option<(u32, bool)>,
    /// Top-level transactions of which a piece was sent and that did not end yet.
    streamed: IdSet<u32>,
    /// When the last transaction was sent, and whether commits come fast enough to batch
    /// this walsender's wake-ups ([`pace`]).
    last_commit_at: Option<std::time::Instant>,
    pacer: bdr_core::pace::Pacer,
    /// The flush position when the last pacing sleep ended: everything below it is
    /// decoded and sent before the next sleep.
    paced_to: u64,
    /// The current transaction asks its peers to confirm its commit
    /// (`bdr.synchronous_commit_peers`): its origin session waits for this walsender.
    sync_commit: bool,
}

#[derive(Default)]
struct Invalidations {
    all: bool,
    rels: Vec<pg_sys::Oid>,
}

thread_local! {
    static INVALIDATED: RefCell<Invalidations> = RefCell::new(Invalidations::default());
    /// Whether `INVALIDATED` holds anything: read at every change, so a plain flag.
    static INVALIDATED_ANY: Cell<bool> = const { Cell::new(false) };
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
    static CACHE_CXT: Cell<pg_sys::MemoryContext> = const { Cell::new(std::ptr::null_mut()) };
}

/// Entry point PostgreSQL looks up when a slot uses the `bdr` plugin.
///
/// # Safety
/// Called by PostgreSQL with a valid, writable callbacks struct.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn _PG_output_plugin_init(cb: *mut pg_sys::OutputPluginCallbacks) {
    // SAFETY: PostgreSQL hands us a valid pointer to fill in.
    let cb = unsafe { &mut *cb };
    cb.startup_cb = Some(startup_cb);
    cb.begin_cb = Some(begin_cb);
    cb.change_cb = Some(change_cb);
    cb.truncate_cb = Some(truncate_cb);
    cb.commit_cb = Some(commit_cb);
    cb.message_cb = Some(message_cb);
    cb.filter_by_origin_cb = Some(filter_by_origin_cb);
    cb.shutdown_cb = Some(shutdown_cb);
    // Streaming (used only when the subscriber asks: `startup_cb` turns it off
    // otherwise). stream_prepare_cb is left NULL: bdr does not decode two-phase commits.
    cb.stream_start_cb = Some(stream_start_cb);
    cb.stream_stop_cb = Some(stream_stop_cb);
    cb.stream_abort_cb = Some(stream_abort_cb);
    cb.stream_commit_cb = Some(stream_commit_cb);
    cb.stream_change_cb = Some(stream_change_cb);
    cb.stream_truncate_cb = Some(stream_truncate_cb);
    cb.stream_message_cb = Some(stream_message_cb);
}

/// # Safety
/// `ctx` must be a decoding context whose private pointer was set by `startup_cb`.
unsafe fn state<'a>(ctx: *mut pg_sys::LogicalDecodingContext) -> &'a mut State {
    // SAFETY: startup_cb stored a Box<State> there; it lives until shutdown_cb.
    unsafe { &mut *((*ctx).output_plugin_private as *mut State) }
}

/// # Safety
/// `p` must be NULL or a NUL-terminated string.
unsafe fn cstring(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: caller guarantees a NUL-terminated string.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

#[pg_guard]
unsafe extern "C-unwind" fn startup_cb(
    ctx: *mut pg_sys::LogicalDecodingContext,
    opt: *mut pg_sys::OutputPluginOptions,
    _is_init: bool,
) {
    // SAFETY: the options list holds DefElem nodes whose names and values PostgreSQL
    // parsed from START_REPLICATION / the SQL function's variadic arguments.
    let parsed: Vec<(String, Option<String>)> = unsafe {
        PgList::<pg_sys::DefElem>::from_pg((*ctx).output_plugin_options)
            .iter_ptr()
            .map(|elem| {
                let name = cstring((*elem).defname);
                let value = if (*elem).arg.is_null() {
                    None
                } else {
                    Some(cstring(pg_sys::defGetString(elem)))
                };
                (name, value)
            })
            .collect()
    };
    let opts = DecodeOptions::parse(parsed.iter().map(|(n, v)| (n.as_str(), v.as_deref())))
        .unwrap_or_else(|e| error::raise(&e));

    // Values leave as text in one form whatever this server's configuration says (a
    // receiver of any release then reads them right). Only in a walsender: the SQL
    // decoding functions run in a user's session, whose settings are the user's.
    // SAFETY: a plain read of a flag set at connection start.
    if unsafe { pg_sys::am_walsender } {
        for (name, value) in bdr_core::dsn::PEER_TEXT_SETTINGS {
            crate::pg::xact::set_session_config(name, value);
        }
    }

    // SAFETY: ctx and opt are valid for the duration of the call; the memory context is
    // a child of the decoding context and goes away with it.
    unsafe {
        (*opt).output_type = pg_sys::OutputPluginOutputType::OUTPUT_PLUGIN_BINARY_OUTPUT;
        (*opt).receive_rewrites = false;
        let change_cxt = pg_sys::AllocSetContextCreateInternal(
            (*ctx).context,
            c"bdr change".as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        );
        if !CALLBACK_REGISTERED.get() {
            pg_sys::CacheRegisterRelcacheCallback(Some(relcache_cb), pg_sys::Datum::from(0));
            CALLBACK_REGISTERED.set(true);
        }
        INVALIDATED.with(|i| *i.borrow_mut() = Invalidations::default());
        INVALIDATED_ANY.set(false);
        let slot_name = if (*ctx).slot.is_null() {
            String::new()
        } else {
            cstring((*(*ctx).slot).data.name.data.as_ptr())
        };
        let batch = opts.version >= wire::BATCH_FROM_VERSION;
        // PostgreSQL turns streaming on because the stream callbacks are set; only a
        // subscriber that asked for it gets it.
        (*ctx).streaming = opts.streaming;
        let st = Box::new(State {
            opts,
            slot_name,
            skip: false,
            framing: TxnFraming::default(),
            rels: RelMap::default(),
            scratch: Deformed::default(),
            buf: Vec::with_capacity(8192),
            batch,
            change_cxt,
            tag: None,
            piece: None,
            streamed: IdSet::default(),
            last_commit_at: None,
            pacer: bdr_core::pace::Pacer::default(),
            paced_to: 0,
            sync_commit: false,
        });
        (*ctx).output_plugin_private = Box::into_raw(st) as *mut std::ffi::c_void;
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shutdown_cb(ctx: *mut pg_sys::LogicalDecodingContext) {
    // SAFETY: we own the Box stored by startup_cb; clearing the pointer prevents reuse.
    unsafe {
        let p = (*ctx).output_plugin_private as *mut State;
        if !p.is_null() {
            drop(Box::from_raw(p));
            (*ctx).output_plugin_private = std::ptr::null_mut();
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn relcache_cb(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    INVALIDATED.with(|i| {
        let mut i = i.borrow_mut();
        if relid == pg_sys::InvalidOid {
            i.all = true;
        } else {
            i.rels.push(relid);
        }
    });
    INVALIDATED_ANY.set(true);
}

#[pg_guard]
unsafe extern "C-unwind" fn filter_by_origin_cb(
    ctx: *mut pg_sys::LogicalDecodingContext,
    origin_id: pg_sys::RepOriginId,
) -> bool {
    // SAFETY: called between startup and shutdown.
    let st = unsafe { state(ctx) };
    origin_id != pg_sys::InvalidRepOriginId as pg_sys::RepOriginId && !st.opts.forward_origins
}

#[pg_guard]
unsafe extern "C-unwind" fn begin_cb(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
) {
    // SAFETY: txn is the transaction being replayed; its commit data is known because
    // decoding only replays committed transactions.
    unsafe {
        let st = state(ctx);
        let txn = &*txn;
        let origin = if txn.origin_id != pg_sys::InvalidRepOriginId as pg_sys::RepOriginId {
            let mut name: *mut c_char = std::ptr::null_mut();
            pg_sys::replorigin_by_oid(txn.origin_id, true, &mut name);
            Some(OriginInfo {
                name: if name.is_null() {
                    format!("origin {}", txn.origin_id)
                } else {
                    cstring(name)
                },
                lsn: txn.origin_lsn,
            })
        } else {
            None
        };
        // Forwarding (hub and spoke): a spoke's own change, applied here, never goes back
        // to it.
        st.skip = origin
            .as_ref()
            .is_some_and(|o| decode::loops_back(&o.name, &st.slot_name));
        st.framing.begin(Begin {
            xid: txn.xid.into(),
            final_lsn: txn.final_lsn,
            commit_time: txn.xact_time.commit_time,
            origin,
        });
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn commit_cb(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    commit_lsn: pg_sys::XLogRecPtr,
) {
    // SAFETY: as in begin_cb.
    unsafe {
        let st = state(ctx);
        if st.framing.commit() {
            let m = Message::Commit(Commit {
                commit_lsn,
                end_lsn: (*txn).end_lsn,
                commit_time: (*txn).xact_time.commit_time,
            });
            write_frame(ctx, st, &m, true);
            pace(st, (*txn).end_lsn);
        } else {
            // Nothing was sent: let the walsender advance past it all the same.
            pg_sys::OutputPluginUpdateProgress(ctx, true);
        }
    }
}

/// A transaction was sent (its commit record ends at `end_lsn`). While the origin's
/// commits come faster than `bdr.stream_batch_wait` ([`bdr_core::pace`]) and this
/// walsender has decoded everything flushed, it sleeps that long before decoding on,
/// instead of sleeping on its latch until the next commit wakes it: one wake-up then
/// sends the transactions committed meanwhile, and the committing sessions do not signal
/// it (a sleeping walsender's latch costs each commit a signal). Not after a transaction
/// whose session waits for its peers' confirmation (`bdr.synchronous_commit_peers`),
/// nor under PostgreSQL's synchronous replication (`synchronous_standby_names`), nor
/// outside a walsender (SQL decoding functions).
fn pace(st: &mut State, end_lsn: u64) {
    let wait = crate::gucs::stream_batch_wait();
    let now = std::time::Instant::now();
    if let Some(last) = st.last_commit_at.replace(now) {
        st.pacer.arrived(now.saturating_duration_since(last), wait);
    }
    // SAFETY: plain reads of process globals (a GUC string: NULL or NUL-terminated).
    let (walsender, sync_rep) = unsafe {
        let names = pg_sys::SyncRepStandbyNames;
        (pg_sys::am_walsender, !names.is_null() && *names != 0)
    };
    if std::mem::take(&mut st.sync_commit) || sync_rep || !walsender {
        st.pacer.reset();
        return;
    }
    // What was flushed while it slept is sent before it sleeps again (one sleep per
    // commit would deliver the last page's transactions one per sleep).
    if !st.pacer.busy() || end_lsn < st.paced_to {
        return;
    }
    let flushed = crate::pg::xact::flush_lsn();
    // Caught up: nothing beyond this commit but a partial page of WAL.
    if flushed.saturating_sub(end_lsn) < u64::from(pg_sys::XLOG_BLCKSZ) {
        // SAFETY: a plain sleep (no latch: the committing sessions then need not signal
        // this process; a signal only ends it early).
        unsafe { pg_sys::pg_usleep(wait.as_micros() as std::ffi::c_long) };
        // The next commit's gap counts from now: one committed during the sleep is
        // already there to decode, which is what arriving fast means.
        st.last_commit_at = Some(std::time::Instant::now());
        st.paced_to = crate::pg::xact::flush_lsn();
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn change_cb(
    ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
    rel: pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    // SAFETY: rel and change are valid for the call; the tuples are decoded with the
    // relation's descriptor from the historic snapshot the reorder buffer set up.
    unsafe {
        let st = state(ctx);
        let relid = (*rel).rd_id;
        let change_cxt = st.change_cxt;
        let entry = entry(st, rel);
        if !entry.replicate {
            use pg_sys::ReorderBufferChangeType::{
                REORDER_BUFFER_CHANGE_INSERT as INSERT, REORDER_BUFFER_CHANGE_UPDATE as UPDATE,
            };
            let action = (*change).action;
            let sent = match entry.special {
                Special::DdlQueue => action == INSERT,
                Special::Heartbeat => action == INSERT || action == UPDATE,
                Special::None => false,
            };
            if sent && !(*change).data.tp.newtuple.is_null() {
                let lsn = (*change).lsn;
                let old_cxt = pg_sys::MemoryContextSwitchTo(change_cxt);
                let values = row_values(
                    entry,
                    (*rel).rd_att,
                    &raw mut (*(*change).data.tp.newtuple).tuple,
                    None,
                );
                let col = |name: &str| -> String {
                    entry
                        .meta
                        .columns
                        .iter()
                        .position(|c| c.name == name)
                        .and_then(|i| match values.get(i) {
                            Some(wire::Value::Text(t)) => Some(t.clone()),
                            _ => None,
                        })
                        .unwrap_or_default()
                };
                let (prefix, content) = if entry.special == Special::Heartbeat {
                    let horizon = col("horizon").parse::<i64>().unwrap_or(0);
                    (
                        bdr_core::wire::SYNC_PREFIX,
                        bdr_core::wire::heartbeat_content(horizon).into_bytes(),
                    )
                } else {
                    let cmd = bdr_core::ddl::DdlCommand {
                        role: col("role_name"),
                        search_path: col("search_path"),
                        command: col("command"),
                        // Absent from a queue of a release before 0.2.0.
                        settings: serde_json::from_str(&col("settings")).unwrap_or_default(),
                    };
                    (
                        bdr_core::ddl::DDL_PREFIX,
                        serde_json::to_vec(&cmd).unwrap_or_default(),
                    )
                };
                let m = Message::Message(LogicalMessage {
                    transactional: true,
                    lsn,
                    prefix: prefix.into(),
                    content,
                });
                emit(ctx, state(ctx), &[], m);
                pg_sys::MemoryContextSwitchTo(old_cxt);
                pg_sys::MemoryContextReset(change_cxt);
            }
            return;
        }
        if st.skip {
            return;
        }
        let tp = (*change).data.tp;
        let desc = (*rel).rd_att;
        let tuple = |buf: *mut pg_sys::ReorderBufferTupleBuf| -> *mut pg_sys::HeapTupleData {
            if buf.is_null() {
                std::ptr::null_mut()
            } else {
                &raw mut (*buf).tuple
            }
        };
        let (newtup, oldtup) = (tuple(tp.newtuple), tuple(tp.oldtuple));
        use pg_sys::ReorderBufferChangeType::*;
        let kind = match (*change).action {
            REORDER_BUFFER_CHANGE_INSERT if !newtup.is_null() => b'I',
            REORDER_BUFFER_CHANGE_UPDATE if !newtup.is_null() => b'U',
            REORDER_BUFFER_CHANGE_DELETE => b'D',
            _ => return,
        };
        if st.opts.version >= 2 {
            write_change(ctx, st, rel, kind, newtup, oldtup);
        } else {
            let old_cxt = pg_sys::MemoryContextSwitchTo(change_cxt);
            let old_row = |e: &RelEntry| -> Option<OldRow> {
                if oldtup.is_null() {
                    return None;
                }
                Some(if e.meta.replica_identity == ReplicaIdentity::Full {
                    OldRow::Full(row_values(e, desc, oldtup, None))
                } else {
                    OldRow::Key(row_values(e, desc, oldtup, Some(&e.key)))
                })
            };
            let entry = &st.rels[&relid];
            let msg = match kind {
                b'I' => Message::Insert(Insert {
                    relation: relid.to_u32(),
                    new: row_values(entry, desc, newtup, None),
                }),
                b'U' => Message::Update(Update {
                    relation: relid.to_u32(),
                    old: old_row(entry),
                    new: row_values(entry, desc, newtup, None),
                }),
                _ => Message::Delete(Delete {
                    relation: relid.to_u32(),
                    // No old tuple means the table has no replica identity: send an empty
                    // key, which the receiver reports as an apply error rather than guessing.
                    old: old_row(entry).unwrap_or(OldRow::Key(Vec::new())),
                }),
            };
            emit(ctx, st, &[relid], msg);
            pg_sys::MemoryContextSwitchTo(old_cxt);
            pg_sys::MemoryContextReset(change_cxt);
        }
    }
}

/// The hot path of [`change_cb`] (protocol version 2 and later): write what precedes the
/// change, then its frame straight from the tuples into the pending write
/// ([`ChangeWriter`]: the same bytes as encoding a [`Message`], without building one).
/// The rendering runs under one guard ([`raw::guarded`]) in the per-change memory
/// context, reset at its end.
///
/// # Safety
/// Inside a change callback; `rel` is open and its cache entry exists and replicates;
/// `newtup` is non-null unless `kind` is `b'D'`; `oldtup` may be null.
unsafe fn write_change(
    ctx: *mut pg_sys::LogicalDecodingContext,
    st: &mut State,
    rel: pg_sys::Relation,
    kind: u8,
    newtup: *mut pg_sys::HeapTupleData,
    oldtup: *mut pg_sys::HeapTupleData,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        let relid = (*rel).rd_id;
        let desc = (*rel).rd_att;
        before_change(ctx, st, &[relid]);
        let State {
            rels,
            buf,
            scratch,
            opts,
            tag,
            change_cxt,
            ..
        } = &mut *st;
        let cxt = *change_cxt;
        let e = &rels[&relid];
        let mut w = ChangeWriter::begin(buf, opts.version, kind, relid.to_u32(), *tag);
        let mut rows = || -> Result<(), usize> {
            if kind != b'I' {
                if oldtup.is_null() {
                    // UPDATE: the key did not change. DELETE without an old tuple: the
                    // table has no replica identity; an empty key, which the receiver
                    // reports as an apply error rather than guessing.
                    if kind == b'U' {
                        w.no_old_row();
                    } else {
                        w.old_key();
                        w.end_values();
                    }
                } else if e.meta.replica_identity == ReplicaIdentity::Full {
                    w.old_full();
                    put_row(&mut w, e, desc, oldtup, None, scratch)?;
                } else {
                    w.old_key();
                    put_row(&mut w, e, desc, oldtup, Some(&e.key), scratch)?;
                }
            }
            if kind != b'D' {
                w.new_row();
                put_row(&mut w, e, desc, newtup, None, scratch)?;
            }
            Ok(())
        };
        // SAFETY: the closure calls only `raw` functions and `put_row` (see raw's
        // invariant); the output functions' strings are copied into the frame before the
        // reset.
        let res = raw::guarded(|| {
            let old = pg_sys::MemoryContextSwitchTo(cxt);
            let res = rows();
            pg_sys::MemoryContextSwitchTo(old);
            raw::MemoryContextReset(cxt);
            res
        });
        match res {
            Ok(()) => w.finish(),
            Err(ci) => {
                let err = not_utf8(e, ci);
                w.abandon();
                error::raise(&err)
            }
        }
        flush(ctx, st, true, false);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn truncate_cb(
    ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
    nrelations: c_int,
    relations: *mut pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    // SAFETY: `relations` holds `nrelations` open relations for the call.
    unsafe {
        let st = state(ctx);
        let mut ids = Vec::new();
        for i in 0..nrelations.max(0) as usize {
            let rel = *relations.add(i);
            if entry(st, rel).replicate {
                ids.push((*rel).rd_id);
            }
        }
        if ids.is_empty() {
            return;
        }
        let t = (*change).data.truncate;
        let msg = Message::Truncate(Truncate {
            relations: ids.iter().map(|o| o.to_u32()).collect(),
            cascade: t.cascade,
            restart_identity: t.restart_seqs,
        });
        emit(ctx, st, &ids, msg);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn message_cb(
    ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
    message_lsn: pg_sys::XLogRecPtr,
    transactional: bool,
    prefix: *const c_char,
    message_size: pg_sys::Size,
    message: *const c_char,
) {
    // SAFETY: prefix is NUL-terminated; message points at message_size bytes.
    unsafe {
        let prefix = cstring(prefix);
        if transactional && prefix == bdr_core::wire::SYNC_COMMIT_PREFIX {
            state(ctx).sync_commit = true;
        }
        let content: &[u8] = if message_size == 0 {
            &[]
        } else {
            std::slice::from_raw_parts(message as *const u8, message_size)
        };
        match decode::message_policy(&prefix, transactional, content) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                crate::error::warn(&e);
                return;
            }
        }
        let content = content.to_vec();
        let m = Message::Message(LogicalMessage {
            transactional,
            lsn: message_lsn,
            prefix,
            content,
        });
        // Only transactional messages get here: inside their transaction's frames.
        emit(ctx, state(ctx), &[], m);
    }
}

/// Write a transaction's pending BEGIN and any relation metadata not yet sent, then `msg`.
///
/// # Safety
/// Called from a change-type callback with the context's state.
unsafe fn emit(
    ctx: *mut pg_sys::LogicalDecodingContext,
    st: &mut State,
    rels: &[pg_sys::Oid],
    msg: Message,
) {
    if st.skip {
        return;
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        before_change(ctx, st, rels);
        let msg = match st.tag {
            // A piece of a transaction streamed before its commit.
            Some((xid, subxid)) => Message::StreamChange(StreamChange {
                xid,
                subxid,
                change: Box::new(msg),
            }),
            None => msg,
        };
        write_frame(ctx, st, &msg, true);
    }
}

/// What precedes a change: the transaction's pending BEGIN (or, in a streamed piece, its
/// STREAM START) and the metadata of `rels` not sent yet in this stream.
///
/// # Safety
/// Called from a change-type callback with the context's state.
unsafe fn before_change(
    ctx: *mut pg_sys::LogicalDecodingContext,
    st: &mut State,
    rels: &[pg_sys::Oid],
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        if st.tag.is_some() {
            if let Some((piece, started @ false)) = &mut st.piece {
                *started = true;
                let first_segment = st.streamed.insert(*piece);
                let start = Message::StreamStart(StreamStart {
                    xid: *piece,
                    first_segment,
                });
                write_frame(ctx, st, &start, false);
            }
        } else if let Some(b) = st.framing.before_change() {
            write_frame(ctx, st, &Message::Begin(b), false);
        }
        for relid in rels {
            let meta = match st.rels.get_mut(relid) {
                Some(e) if !e.sent => {
                    e.sent = true;
                    e.meta.clone()
                }
                _ => continue,
            };
            write_frame(ctx, st, &Message::Relation(meta), false);
        }
    }
}

/// Add `msg`'s frame to the pending write and [`flush`] it.
///
/// # Safety
/// `ctx` is a live decoding context inside a callback.
unsafe fn write_frame(
    ctx: *mut pg_sys::LogicalDecodingContext,
    st: &mut State,
    msg: &Message,
    last_write: bool,
) {
    wire::encode_frame_into(msg, st.opts.version, &mut st.buf);
    let ends_write = matches!(
        msg,
        Message::Commit(_)
            | Message::StreamStop
            | Message::StreamCommit(_)
            | Message::StreamAbort(_)
    );
    // SAFETY: forwarded from the caller.
    unsafe { flush(ctx, st, last_write, ends_write) }
}

/// Write the pending frames, unless batching (see the module note) lets them wait for
/// more: a batch is written when its last frame `ends_write` (a transaction's or a
/// streamed piece's end) or it reached [`wire::BATCH_BYTES`].
///
/// # Safety
/// `ctx` is a live decoding context inside a callback.
unsafe fn flush(
    ctx: *mut pg_sys::LogicalDecodingContext,
    st: &mut State,
    last_write: bool,
    ends_write: bool,
) {
    if st.batch && !ends_write && st.buf.len() < wire::BATCH_BYTES {
        return;
    }
    let buf = &st.buf;
    // SAFETY: ctx->out is the StringInfo the walsender / SQL function collects; one
    // guard for the three calls (raw's invariant: nothing but them and a copy).
    unsafe {
        raw::guarded(|| {
            raw::OutputPluginPrepareWrite(ctx, last_write);
            raw::append((*ctx).out, buf);
            raw::OutputPluginWrite(ctx, last_write);
        });
    }
    st.buf.clear();
}

/// The (top-level xid, xid) a streamed change belongs to.
///
/// # Safety
/// `txn` is a live reorder-buffer transaction.
unsafe fn xids(txn: *mut pg_sys::ReorderBufferTXN) -> (u32, u32) {
    // SAFETY: forwarded; a subtransaction's toptxn points at its live top level.
    unsafe {
        let top = if (*txn).toptxn.is_null() {
            txn
        } else {
            (*txn).toptxn
        };
        ((*top).xid.into(), (*txn).xid.into())
    }
}

/// Every relation's metadata is sent again before its next change (see the module note).
fn forget_sent_relations(st: &mut State) {
    for e in st.rels.values_mut() {
        e.sent = false;
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn stream_start_cb(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
) {
    // SAFETY: called between startup and shutdown with the transaction being streamed.
    unsafe {
        let st = state(ctx);
        st.piece = Some((xids(txn).0, false));
        forget_sent_relations(st);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn stream_stop_cb(
    ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
) {
    // SAFETY: as in stream_start_cb.
    unsafe {
        let st = state(ctx);
        if let Some((_, true)) = st.piece.take() {
            write_frame(ctx, st, &Message::StreamStop, true);
        }
        forget_sent_relations(st);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn stream_abort_cb(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    _abort_lsn: pg_sys::XLogRecPtr,
) {
    // SAFETY: txn is the (sub)transaction rolled back, with its top level.
    unsafe {
        let st = state(ctx);
        let (xid, subxid) = xids(txn);
        if !st.streamed.contains(&xid) {
            return;
        }
        if subxid == xid {
            st.streamed.remove(&xid);
        }
        let m = Message::StreamAbort(StreamAbort { xid, subxid });
        write_frame(ctx, st, &m, true);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn stream_commit_cb(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    commit_lsn: pg_sys::XLogRecPtr,
) {
    // SAFETY: txn is the committed top-level transaction; its commit data is known.
    unsafe {
        let st = state(ctx);
        let xid: u32 = (*txn).xid.into();
        if !st.streamed.remove(&xid) {
            // Nothing of it was sent: let the walsender advance past it all the same.
            pg_sys::OutputPluginUpdateProgress(ctx, true);
            return;
        }
        let m = Message::StreamCommit(StreamCommit {
            xid,
            commit_lsn,
            end_lsn: (*txn).end_lsn,
            commit_time: (*txn).xact_time.commit_time,
            // Streaming is never combined with forwarding: the changes are this node's.
            origin: None,
        });
        write_frame(ctx, st, &m, true);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn stream_change_cb(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    rel: pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    // SAFETY: as change_cb; the change knows the (sub)transaction that made it.
    unsafe {
        let sub = if (*change).txn.is_null() {
            txn
        } else {
            (*change).txn
        };
        state(ctx).tag = Some((xids(txn).0, xids(sub).1));
        change_cb(ctx, txn, rel, change);
        state(ctx).tag = None;
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn stream_truncate_cb(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    nrelations: c_int,
    relations: *mut pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    // SAFETY: as truncate_cb.
    unsafe {
        let sub = if (*change).txn.is_null() {
            txn
        } else {
            (*change).txn
        };
        state(ctx).tag = Some((xids(txn).0, xids(sub).1));
        truncate_cb(ctx, txn, nrelations, relations, change);
        state(ctx).tag = None;
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn stream_message_cb(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    message_lsn: pg_sys::XLogRecPtr,
    transactional: bool,
    prefix: *const c_char,
    message_size: pg_sys::Size,
    message: *const c_char,
) {
    // SAFETY: as message_cb. A non-transactional message may come without a txn: it is
    // never sent (message_policy), so it needs no tag.
    unsafe {
        if !txn.is_null() {
            state(ctx).tag = Some(xids(txn));
        }
        message_cb(
            ctx,
            txn,
            message_lsn,
            transactional,
            prefix,
            message_size,
            message,
        );
        state(ctx).tag = None;
    }
}
