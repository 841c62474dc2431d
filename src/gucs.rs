//! Every `bdr.*` setting, in one place.
//!
//! The `bdr.` prefix is reserved (`MarkGUCPrefixReserved`), so a typo such as
//! `bdr.conflict_loging` in postgresql.conf is reported instead of silently ignored.
//! Settings are added here as the features that read them land; each one is documented
//! in `docs/settings.md`.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};

/// What `bdr.default_sequence_kind` gives serial, bigserial and identity columns of
/// replicated tables (see `src/sequence.rs`).
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum DefaultSequenceKind {
    /// bigint columns: `bdr.snowflake_nextval`; integer and identity columns: `offset`.
    #[name = c"snowflake"]
    Snowflake,
    /// Leave them as plain PostgreSQL sequences.
    #[name = c"local"]
    Local,
}

/// `bdr.default_sequence_kind`.
pub static DEFAULT_SEQUENCE_KIND: GucSetting<DefaultSequenceKind> =
    GucSetting::<DefaultSequenceKind>::new(DefaultSequenceKind::Snowflake);

/// `bdr.log_conflicts_to_table`: write a `bdr.conflict_history` row per conflict.
pub static LOG_CONFLICTS_TO_TABLE: GucSetting<bool> = GucSetting::<bool>::new(true);

/// `bdr.slot_wal_warning_mb`: `node_status()` warns when a slot feeding an unreachable
/// node retains more WAL than this.
pub static SLOT_WAL_WARNING_MB: GucSetting<i32> = GucSetting::<i32>::new(1024);

/// `bdr.ddl_replication`: replicate schema changes typed on this node.
pub static DDL_REPLICATION: GucSetting<bool> = GucSetting::<bool>::new(true);

/// `bdr.ddl_lock_timeout`: how long a schema change that drains other nodes' writes may
/// wait for them (reach every member, fence, catch up) before it fails.
pub static DDL_LOCK_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);

/// `bdr.minimum_nodes`: voting members (this node included) a node must reach to accept
/// user writes; 0 turns the check off.
pub static MINIMUM_NODES: GucSetting<i32> = GucSetting::<i32>::new(0);

/// `bdr.synchronous_commit_peers`: peers that must confirm a transaction (applied and
/// flushed) before its COMMIT returns; 0 turns it off (see `src/sync_commit.rs`).
pub static SYNCHRONOUS_COMMIT_PEERS: GucSetting<i32> = GucSetting::<i32>::new(0);

/// `bdr.synchronous_commit_timeout`: longest wait for those confirmations; 0 waits for
/// ever.
pub static SYNCHRONOUS_COMMIT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);

/// `bdr.apply_retry_max_delay`: the longest pause before an apply worker that stopped
/// (an error, a lost connection) is started again.
pub static APPLY_RETRY_MAX_DELAY_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);

/// `bdr.max_clock_skew`: `node_status()` warns when a peer's commit timestamps run ahead
/// of this node's clock by more than this (milliseconds).
pub static MAX_CLOCK_SKEW_MS: GucSetting<i32> = GucSetting::<i32>::new(5_000);
/// `bdr.tombstone_min_age`: the least time a tombstone is kept after its delete, even
/// once no peer can send an older change (0: collected as soon as that is known).
pub static TOMBSTONE_MIN_AGE_MS: GucSetting<i32> = GucSetting::<i32>::new(0);

/// `bdr.writers_per_peer`: processes applying one peer's transactions (1: the apply
/// worker itself; more: parallel apply, see `src/receive/parallel.rs`). Read when an
/// apply worker starts.
pub static WRITERS_PER_PEER: GucSetting<i32> = GucSetting::<i32>::new(1);

/// `bdr.stream_large_transactions`: ask peers to stream a transaction that outgrows
/// their `logical_decoding_work_mem` before it commits (protocol version 4). Read when an
/// apply worker connects (see `src/receive/stream.rs`). A stream writer applies the
/// pieces before the commit, beside the apply worker or its parallel writers
/// (`src/receive/direct.rs`).
pub static STREAM_LARGE_TRANSACTIONS: GucSetting<bool> = GucSetting::<bool>::new(true);

/// `bdr.stream_writer_wait_memory` (kB): how much of a streamed transaction's changes a
/// stream writer keeps for its commit (from the first one that needs a last-update-wins
/// decision on; see `src/workers/stream_writer.rs`) before the transaction falls back.
pub static STREAM_WRITER_WAIT_MEMORY_KB: GucSetting<i32> = GucSetting::<i32>::new(65_536);

/// `bdr.stream_batch_wait` (ms): while a stream's transactions come faster than this,
/// each end waits this long once caught up before looking again, instead of waking for
/// each transaction: the walsender decoding this node's commits (`src/pg/decoding.rs`,
/// `pace`) and the apply worker reading a peer's (`src/receive/mod.rs`,
/// `Stream::batch_wait`); see `bdr_core::pace`. 0 turns it off.
pub static STREAM_BATCH_WAIT_MS: GucSetting<i32> = GucSetting::<i32>::new(1);

/// [`STREAM_BATCH_WAIT_MS`] as a duration (0: off).
pub fn stream_batch_wait() -> std::time::Duration {
    std::time::Duration::from_millis(STREAM_BATCH_WAIT_MS.get().max(0) as u64)
}

/// Register the settings; called once from `_PG_init`.
pub fn init() {
    GucRegistry::define_bool_guc(
        c"bdr.stream_large_transactions",
        c"Ask peers to send large transactions before they commit (streaming).",
        c"A peer of protocol version 4 then sends a transaction that outgrows its \
          logical_decoding_work_mem in pieces while it is still in progress. Read when an \
          apply worker connects.",
        &STREAM_LARGE_TRANSACTIONS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"bdr.stream_writer_wait_memory",
        c"Most of a streamed transaction's changes a stream writer keeps for its commit.",
        c"A change of a streamed transaction that needs a last-update-wins decision, and \
          every later one, wait in the stream writer's memory for the commit time. Beyond \
          this much (as received) the transaction falls back and is sent whole at its \
          commit.",
        &STREAM_WRITER_WAIT_MEMORY_KB,
        64,
        i32::MAX / 1024,
        GucContext::Sighup,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"bdr.writers_per_peer",
        c"Processes applying one peer's transactions (parallel apply).",
        c"1 (the default): the apply worker applies every transaction itself. More: it hands \
          whole transactions to that many writer processes, which apply independent ones at \
          once and commit in the peer's commit order. Read when an apply worker starts.",
        &WRITERS_PER_PEER,
        1,
        crate::pg::mq::MAX_WRITERS as i32,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"bdr.stream_batch_wait",
        c"How long either end of a busy replication stream waits, once caught up, before looking again.",
        c"While a stream's transactions come faster than this (32 in a row), the \
          walsender sending this node's changes and the apply worker applying a peer's wait \
          this long once caught up, instead of waking for each transaction: fewer wake-ups \
          per transaction, for at most this much more delay at each end. Not after a \
          transaction whose origin waits for its peers (bdr.synchronous_commit_peers), nor \
          under synchronous_standby_names. 1 ms by default; 0 turns it off.",
        &STREAM_BATCH_WAIT_MS,
        0,
        100,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"bdr.apply_retry_max_delay",
        c"Longest pause before an apply worker that stopped is started again.",
        c"After an error or a lost connection the pause doubles from 1 s up to this.",
        &APPLY_RETRY_MAX_DELAY_MS,
        100,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"bdr.synchronous_commit_peers",
        c"Peers that must have applied and flushed a transaction before its COMMIT returns.",
        c"0 (the default) turns it off. Set per session or per transaction (SET LOCAL) for \
          critical data. Past bdr.synchronous_commit_timeout the COMMIT returns with a WARNING: \
          the transaction is committed here and still replicates, but is not confirmed on \
          that many peers.",
        &SYNCHRONOUS_COMMIT_PEERS,
        0,
        1024,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"bdr.synchronous_commit_timeout",
        c"Longest wait of a synchronous COMMIT for its peers' confirmation; 0 waits without limit.",
        c"When it expires the COMMIT returns with a WARNING and \
          bdr.last_synchronous_commit() reports timed_out.",
        &SYNCHRONOUS_COMMIT_TIMEOUT_MS,
        0,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"bdr.minimum_nodes",
        c"Voting members (active and witness nodes, this one included) this node must reach to accept user writes.",
        c"0 turns it off. Below it, user writes fail with an ERROR naming the missing members; \
          reads and apply keep working.",
        &MINIMUM_NODES,
        0,
        1024,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"bdr.ddl_replication",
        c"Replicate schema changes (DDL) made in this session to the other nodes.",
        c"Off: DDL runs on this node only (for statements that must run per node, such as \
          CREATE INDEX CONCURRENTLY).",
        &DDL_REPLICATION,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"bdr.ddl_lock_timeout",
        c"Longest wait of a replicated schema change for the other nodes' writes to drain.",
        c"A change to an existing table's shape fences writes to it on every member and waits \
          until every member applied every other member's changes; past this it fails, \
          naming the members it waited for.",
        &DDL_LOCK_TIMEOUT_MS,
        100,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"bdr.slot_wal_warning_mb",
        c"WAL retained for an unreachable node above which node_status() and health_check() warn.",
        c"In megabytes.",
        &SLOT_WAL_WARNING_MB,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MB,
    );
    GucRegistry::define_int_guc(
        c"bdr.max_clock_skew",
        c"How far a peer's commit timestamps may run ahead of this node's clock before node_status() warns.",
        c"Last-update-wins compares commit timestamps from different clocks: a node whose \
          clock runs ahead wins conflicts it should lose. See docs/conflicts.md.",
        &MAX_CLOCK_SKEW_MS,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"bdr.tombstone_min_age",
        c"The least time a deleted row's tombstone is kept, even once no peer can still send an older change.",
        c"0 collects a tombstone as soon as every peer has sent a later transaction. More \
          keeps recent deletes' tombstones in bdr.tombstones to look at (and in tests: \
          counts that do not move). Never shortens the time a tombstone is needed.",
        &TOMBSTONE_MIN_AGE_MS,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_bool_guc(
        c"bdr.log_conflicts_to_table",
        c"Record every replication conflict in bdr.conflict_history.",
        c"When off, conflicts are still resolved and counted (bdr.conflict_counters()), \
          but no history row is written.",
        &LOG_CONFLICTS_TO_TABLE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"bdr.default_sequence_kind",
        c"Kind of sequence given to serial and identity columns of replicated tables.",
        c"snowflake: bigint columns draw bdr.snowflake_nextval, integer and identity columns \
          an offset sequence; local: plain PostgreSQL sequences. Applied when a table is \
          created on a member, and to existing tables when a node creates or joins a group.",
        &DEFAULT_SEQUENCE_KIND,
        GucContext::Userset,
        GucFlags::default(),
    );
    crate::pg::reserve_guc_prefix(c"bdr");
}
