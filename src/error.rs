//! Error domains of the extension, each a `thiserror` enum mapped to a SQLSTATE, a detail
//! and a hint, and the one place that turns them into PostgreSQL `ereport`s.
//!
//! Why this way: a DBA reads the message, the detail and the hint; a monitoring tool reads
//! the SQLSTATE. Keeping the mapping next to the variants makes it impossible to add an
//! error without deciding all four. Messages never contain a DSN's password.

use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

/// What every domain error must say besides its message.
pub trait PgError: std::fmt::Display {
    fn sqlstate(&self) -> PgSqlErrorCode;
    fn detail(&self) -> Option<String> {
        None
    }
    fn hint(&self) -> Option<String> {
        None
    }
}

fn report(e: &dyn PgError) -> ErrorReport {
    let mut r = ErrorReport::new(e.sqlstate(), e.to_string(), "bdr");
    if let Some(d) = e.detail() {
        r = r.set_detail(d);
    }
    if let Some(h) = e.hint() {
        r = r.set_hint(h);
    }
    r
}

/// Raise `e` as an ERROR; does not return. Cold and out of line: the hot path's error
/// branches then cost it no code of its own.
#[cold]
#[inline(never)]
pub fn raise(e: &dyn PgError) -> ! {
    report(e).report(PgLogLevel::ERROR);
    unreachable!("ereport(ERROR) returned")
}

/// Raise an internal error (a bug of bdr's, never bad input): `bdr: internal error: ` and
/// `what`. Cold and out of line, as [`raise`]: the hot path checks its own invariants.
#[cold]
#[inline(never)]
pub fn internal(what: &str) -> ! {
    pgrx::error!("bdr: internal error: {what}")
}

/// [`raise`] in method form, for results: the value, or the error raised.
pub trait OrRaise<T, E> {
    /// The value, or the error (a domain error already) raised as an ERROR.
    fn or_raise(self) -> T
    where
        E: PgError;
    /// The value, or the error turned into a domain error by `f` and raised.
    fn or_raise_as<D: PgError>(self, f: impl FnOnce(E) -> D) -> T;
}

impl<T, E> OrRaise<T, E> for Result<T, E> {
    fn or_raise(self) -> T
    where
        E: PgError,
    {
        self.unwrap_or_else(|e| raise(&e))
    }

    fn or_raise_as<D: PgError>(self, f: impl FnOnce(E) -> D) -> T {
        self.unwrap_or_else(|e| raise(&f(e)))
    }
}

/// The report of an ERROR caught by `PgTryBuilder` (a PostgreSQL ERROR, or a Rust panic
/// turned into one).
pub fn caught_report(
    e: &pgrx::pg_sys::panic::CaughtError,
) -> &pgrx::pg_sys::panic::ErrorReportWithLevel {
    use pgrx::pg_sys::panic::CaughtError;
    match e {
        CaughtError::PostgresError(r)
        | CaughtError::ErrorReport(r)
        | CaughtError::RustPanic { ereport: r, .. } => r,
    }
}

/// Log `e` as a WARNING and carry on.
pub fn warn(e: &dyn PgError) {
    report(e).report(PgLogLevel::WARNING);
}

/// The server is not set up the way replication needs.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("bdr must be loaded via shared_preload_libraries")]
    NotPreloaded,
    #[error("bdr requires wal_level = logical (it is \"{0}\")")]
    WalLevel(&'static str),
    #[error("bdr requires track_commit_timestamp = on")]
    CommitTimestamps,
}

impl PgError for ConfigError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            ConfigError::NotPreloaded => PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            _ => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        }
    }
    fn hint(&self) -> Option<String> {
        Some(match self {
            ConfigError::NotPreloaded => "Add bdr to shared_preload_libraries in postgresql.conf \
                 (e.g. shared_preload_libraries = 'bdr') and restart PostgreSQL."
                .into(),
            ConfigError::WalLevel(_) => {
                "Set wal_level = logical in postgresql.conf and restart PostgreSQL.".into()
            }
            ConfigError::CommitTimestamps => "Set track_commit_timestamp = on in postgresql.conf \
                 and restart PostgreSQL; conflict resolution needs each row's commit time."
                .into(),
        })
    }
}

/// Check the server settings replication depends on.
pub fn check_server_config() -> Result<(), ConfigError> {
    let (level, commit_ts) = crate::pg::wal_settings();
    if level != pg_sys::WalLevel::WAL_LEVEL_LOGICAL as i32 {
        let name = if level == pg_sys::WalLevel::WAL_LEVEL_MINIMAL as i32 {
            "minimal"
        } else {
            "replica"
        };
        return Err(ConfigError::WalLevel(name));
    }
    if !commit_ts {
        return Err(ConfigError::CommitTimestamps);
    }
    Ok(())
}

/// Problems of the output plugin (decode side of the data path).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("bdr output plugin cannot speak protocol versions {theirs_min} to {theirs_max}")]
    Protocol { theirs_min: u8, theirs_max: u8 },
    #[error("unrecognized bdr output plugin option \"{0}\"")]
    UnknownOption(String),
    #[error("invalid value \"{value}\" for bdr output plugin option \"{option}\"")]
    BadOption { option: String, value: String },
    #[error("column \"{column}\" of relation \"{relation}\" has a value that is not valid UTF-8")]
    NotUtf8 { relation: String, column: String },
    #[error("bdr: logical message with prefix \"{prefix}\" of {size} bytes was not sent (limit {max} bytes)")]
    MessageTooLarge {
        prefix: String,
        size: usize,
        max: usize,
    },
}

impl PgError for DecodeError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            DecodeError::Protocol { .. } => PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            DecodeError::UnknownOption(_) | DecodeError::BadOption { .. } => {
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE
            }
            DecodeError::NotUtf8 { .. } => PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
            DecodeError::MessageTooLarge { .. } => PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
        }
    }
    fn detail(&self) -> Option<String> {
        match self {
            DecodeError::Protocol { .. } => Some(format!(
                "This node speaks protocol versions {} to {}.",
                bdr_core::wire::PROTOCOL_VERSION_MIN,
                bdr_core::wire::PROTOCOL_VERSION_MAX
            )),
            _ => None,
        }
    }
    fn hint(&self) -> Option<String> {
        Some(match self {
            DecodeError::Protocol { .. } => {
                "Upgrade the bdr extension on the older node so both share a protocol version."
                    .into()
            }
            DecodeError::UnknownOption(_) | DecodeError::BadOption { .. } => {
                "Valid options: min_proto_version, max_proto_version (integers), \
                 forward_origins ('none' or 'all'), streaming ('on' or 'off'; protocol \
                 version 4 or later, without forward_origins)."
                    .into()
            }
            DecodeError::NotUtf8 { .. } => {
                "bdr replicates databases whose encoding is UTF8.".into()
            }
            DecodeError::MessageTooLarge { .. } => {
                "Only bdr itself emits messages with bdr's prefixes; the rest of the \
                 transaction was sent."
                    .into()
            }
        })
    }
}

/// Problems while applying a peer's changes. Each stops the apply worker, which is
/// restarted with backoff; nothing is skipped.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("bdr: internal query failed: {0}")]
    Spi(String),
    #[error("a replicated text value contains a NUL byte")]
    NulInText,
    #[error("table \"{schema}\".\"{name}\" does not exist on this node")]
    MissingTable { schema: String, name: String },
    #[error("table \"{schema}\".\"{name}\" has no column \"{column}\" on this node")]
    MissingColumn {
        schema: String,
        name: String,
        column: String,
    },
    #[error("table \"{table}\" has no replica identity: cannot find the row to {action}")]
    NoIdentity { table: String, action: &'static str },
    #[error("change for relation id {0} arrived before its metadata")]
    UnknownRelation(u32),
    #[error("{0}")]
    Protocol(String),
    #[error("nothing received from node \"{peer}\" for {silent_ms} ms (wal_receiver_timeout is {limit_ms} ms): the connection is given up")]
    PeerSilent {
        peer: String,
        silent_ms: u64,
        limit_ms: u64,
    },
    #[error("another transaction wrote key {key} of \"{table}\" at the same time; the transaction is applied again")]
    ConcurrentKey { table: String, key: String },
    #[error("unchanged TOAST value for column \"{column}\" of \"{table}\" on an insert or a missing row")]
    ToastWithoutRow { table: String, column: String },
    #[error("\"{schema}\".\"{name}\" on this node cannot receive replicated changes: {why}")]
    NotReplicatedTarget {
        schema: String,
        name: String,
        why: &'static str,
    },
    #[error("table \"{table}\" changed while a change to it was being applied ({what})")]
    ShapeChanged { table: String, what: String },
    #[error("role \"{role}\", owner of \"{table}\", may not {action} it")]
    OwnerCannotWrite {
        role: String,
        table: String,
        action: &'static str,
    },
    #[error("role \"{role}\", owner of \"{table}\", is subject to its row-level security")]
    RowLevelSecurity { role: String, table: String },
    #[error("parallel apply from node \"{peer}\" stopped: {why}")]
    ParallelStopped { peer: String, why: String },
    #[error("node \"{peer}\" has no slot {slot} for node \"{local}\", which it lists as {state}")]
    SlotGone {
        peer: String,
        local: String,
        slot: String,
        state: String,
    },
    #[error("node \"{local}\" was parted from the group while it was away: node \"{peer}\" has no slot {slot} for it and lists it as parted; it leaves the group here too")]
    PartedWhileAway {
        peer: String,
        local: String,
        slot: String,
    },
    #[error("node \"{peer}\" has left the group: it has no slot {slot} for node \"{local}\" and lists itself as parted; \"{local}\" marks it parted too")]
    PeerLeft {
        peer: String,
        local: String,
        slot: String,
    },
    #[error(
        "streamed transaction from node \"{peer}\" cannot be applied before its commit: {why}"
    )]
    StreamFallback { peer: String, why: String },
}

impl ApplyError {
    /// One of bdr's own queries failed (a bug).
    pub fn spi(e: pgrx::spi::Error) -> Self {
        ApplyError::Spi(e.to_string())
    }
}

impl PgError for ApplyError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            ApplyError::MissingTable { .. } => PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
            ApplyError::MissingColumn { .. } => PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            ApplyError::NoIdentity { .. } => {
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
            ApplyError::NulInText => PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
            ApplyError::PartedWhileAway { .. }
            | ApplyError::SlotGone { .. }
            | ApplyError::PeerLeft { .. } => {
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
            ApplyError::ConcurrentKey { .. }
            | ApplyError::ParallelStopped { .. }
            | ApplyError::StreamFallback { .. } => {
                PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE
            }
            ApplyError::Protocol(_) | ApplyError::UnknownRelation(_) => {
                PgSqlErrorCode::ERRCODE_PROTOCOL_VIOLATION
            }
            ApplyError::NotReplicatedTarget { .. } => PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            ApplyError::PeerSilent { .. } => PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
            ApplyError::ShapeChanged { .. } => {
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
            ApplyError::OwnerCannotWrite { .. } | ApplyError::RowLevelSecurity { .. } => {
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE
            }
            _ => PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            ApplyError::MissingTable { .. } | ApplyError::MissingColumn { .. } => Some(
                "Create the table or column on this node with the same definition as on the \
                 sending node; the apply worker retries and resumes where it stopped."
                    .into(),
            ),
            ApplyError::ConcurrentKey { .. } => Some(
                "Nothing to do: changes about the same absent row raced (two peers', or a \
                 peer's and a local session's); the apply worker restarts and decides again \
                 on committed data."
                    .into(),
            ),
            ApplyError::NoIdentity { .. } => Some(
                "Give the table a primary key (or REPLICA IDENTITY FULL) on every node.".into(),
            ),
            ApplyError::NotReplicatedTarget { .. } => Some(
                "Replicated changes go only into ordinary permanent tables outside the system \
                 and bdr schemas that belong to no extension, as on the sending node. Make the \
                 local relation such a table (same name, same columns); the apply worker \
                 retries and resumes where it stopped."
                    .into(),
            ),
            ApplyError::StreamFallback { .. } => Some(
                "Nothing to do: the transaction is applied whole at its commit instead, with \
                 every conflict rule (bdr.apply_stats().stream_fallbacks counts this)."
                    .into(),
            ),
            ApplyError::SlotGone { local, .. } => Some(format!(
                "The slot was dropped by hand (pg_drop_replication_slot) while \"{local}\" is \
                 a member: what that node committed since cannot reach \"{local}\" any more, \
                 and this worker retries in vain. Part \"{local}\" (bdr.part, from another \
                 member) and join it again under a new name once emptied."
            )),
            ApplyError::PartedWhileAway { .. } => Some(
                "Its rows stay here, no longer replicated; its changes made since it was \
                 parted never reach the group. To bring it back, empty it (e.g. DROP \
                 DATABASE and CREATE DATABASE, or drop its tables) and run bdr.group_join \
                 again."
                    .into(),
            ),
            ApplyError::PeerLeft { peer, local, .. } => Some(format!(
                "\"{peer}\" was parted (bdr.part) while \"{local}\" was away, so the part \
                 could not reach \"{local}\". Its apply worker from \"{peer}\" stops, and the \
                 slot and origin kept here for \"{peer}\" are dropped, as bdr.part would have \
                 done; nothing else changes."
            )),
            ApplyError::ParallelStopped { .. } => Some(
                "The first error logged by this peer's apply worker or writers is the cause; \
                 once it is removed, the apply worker restarts and resumes at the first \
                 transaction not committed here."
                    .into(),
            ),
            ApplyError::ShapeChanged { .. } => Some(
                "Nothing to do: the apply worker re-reads the table's definition and retries."
                    .into(),
            ),
            ApplyError::PeerSilent { .. } => Some(
                "The peer or the network between the nodes stopped answering; the apply worker \
                 reconnects with backoff and resumes where it stopped. Check the peer and the \
                 link; raise wal_receiver_timeout if the link is slow but alive."
                    .into(),
            ),
            ApplyError::OwnerCannotWrite { .. } => Some(
                "Changes are applied as the table's owner: grant the owner the privilege on \
                 its table (or change the owner); the apply worker retries."
                    .into(),
            ),
            ApplyError::RowLevelSecurity { .. } => Some(
                "Changes are applied as the table's owner: disable FORCE ROW LEVEL SECURITY on \
                 the table, or make its owner a role that bypasses row-level security."
                    .into(),
            ),
            _ => None,
        }
    }
}

/// Problems of the background workers (launcher, supervisors).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("bdr: no shared-memory worker slot free for the apply worker from node \"{peer}\" (all {max} in use)")]
    NoSlot { peer: String, max: usize },
    #[error("bdr: apply from node \"{peer}\" was paused for longer than its time limit; resuming")]
    PauseExpired { peer: String },
    #[error("bdr: the extension's SQL in database \"{database}\" is version {sql}, its library {library}")]
    SqlVersionDiffers {
        database: String,
        sql: String,
        library: &'static str,
    },
}

impl PgError for WorkerError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            WorkerError::NoSlot { .. } => PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            WorkerError::PauseExpired { .. } => PgSqlErrorCode::ERRCODE_QUERY_CANCELED,
            WorkerError::SqlVersionDiffers { .. } => {
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
        }
    }
    fn hint(&self) -> Option<String> {
        Some(match self {
            WorkerError::NoSlot { .. } => "The supervisor retries every half second. Part nodes \
                 that are gone, or use fewer bdr databases per server."
                .into(),
            WorkerError::PauseExpired { .. } => "A join (or bdr.apply_pause with a time limit) \
                 held it; a join still running fails and can be run again."
                .into(),
            WorkerError::SqlVersionDiffers { .. } => "Run ALTER EXTENSION bdr UPDATE in that \
                 database, on every node (it is not replicated). Replication goes on meanwhile; \
                 what needs the newer catalog fails until then. A library older than its SQL is \
                 not supported: install the newer build again."
                .into(),
        })
    }
}

/// Problems of DDL replication (`crate::ddl`).
#[derive(Debug, thiserror::Error)]
pub enum DdlError {
    #[error("bdr: {why}")]
    Refused { why: String, hint: &'static str },
    #[error("bdr: cannot replicate this schema change: members unreachable: {members}")]
    Unreachable { members: String },
    #[error("bdr: not every node could hold writes for this schema change: {members}")]
    FenceFailed { members: String },
    #[error("bdr: the other nodes did not drain their writes within {waited_ms} ms: still waiting for {behind}")]
    DrainTimeout { waited_ms: u64, behind: String },
    #[error(
        "bdr: another schema change on this node ({holder}) did not end within {waited_ms} ms"
    )]
    DrainBusy { waited_ms: u64, holder: String },
    #[error("bdr: table {table} is held for a schema change from node \"{origin}\"")]
    Fenced { table: String, origin: String },
    #[error("bdr: too many schema changes in progress at once on this server")]
    TooManyFences,
    #[error("bdr: could not queue the schema change for replication: {0}")]
    Queue(String),
    #[error("bdr: replicated schema change: {0}")]
    Command(String),
    #[error("bdr: replicated schema change: cannot use its origin's setting {0}: {1}")]
    Setting(String, String),
    #[error("bdr: unreadable replicated schema change: {0}")]
    BadMessage(String),
    #[error("bdr: role \"{0}\", which ran the replicated schema change on its origin, does not exist on this node")]
    RoleMissing(String),
    #[error("bdr: this node is not an active member of a bdr group")]
    NotInGroup,
    #[error("bdr: \"{0}\" is not a WAL position")]
    BadPosition(String),
    #[error("bdr: could not bound the fence's wait for writers by lock_timeout: {0}")]
    FenceSetup(String),
    #[error("bdr: a table to fence is NULL")]
    NullTable,
    #[error("bdr: cannot drop extension bdr: this node is \"{0}\", a member of a bdr group with other members")]
    DropWhileMember(String),
}

impl PgError for DdlError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            DdlError::Refused { .. } => PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            DdlError::Unreachable { .. } => PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
            DdlError::FenceFailed { .. }
            | DdlError::DrainTimeout { .. }
            | DdlError::DrainBusy { .. } => PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
            DdlError::Fenced { .. } => PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
            DdlError::TooManyFences => PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            DdlError::RoleMissing(_) => PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            DdlError::Setting(..) => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            DdlError::NotInGroup => PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            DdlError::BadMessage(_) => PgSqlErrorCode::ERRCODE_PROTOCOL_VIOLATION,
            DdlError::BadPosition(_) => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            DdlError::NullTable => PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            DdlError::DropWhileMember(_) => {
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
            DdlError::Queue(_) | DdlError::Command(_) | DdlError::FenceSetup(_) => {
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR
            }
        }
    }
    fn hint(&self) -> Option<String> {
        Some(match self {
            DdlError::Refused { hint, .. } => (*hint).into(),
            DdlError::Unreachable { .. } => "A change to an existing table's shape needs every \
                 member: bring them back, or part the ones that are gone (bdr.part). Creating \
                 new objects works meanwhile."
                .into(),
            DdlError::FenceFailed { .. } | DdlError::DrainTimeout { .. } => {
                "Retry when the members have caught up (bdr.node_status()), or raise \
                 bdr.ddl_lock_timeout."
                    .into()
            }
            DdlError::DrainBusy { .. } => "A node drains one schema change to an existing table \
                 at a time, each until its transaction ends: retry once that one has committed \
                 or rolled back, or raise bdr.ddl_lock_timeout."
                .into(),
            DdlError::Fenced { .. } => "Retry the transaction: the table is writable again as \
                 soon as this node has applied the schema change (bdr.ddl_unfence() lifts a \
                 fence whose origin died)."
                .into(),
            DdlError::TooManyFences => "Wait for the running schema changes to finish.".into(),
            DdlError::RoleMissing(_) => {
                "Create the role on this node (roles do not replicate); the apply worker retries."
                    .into()
            }
            DdlError::NotInGroup => "Use it on an active node of a group.".into(),
            DdlError::Setting(name, _) => format!(
                "The statement ran on its origin under that value of {name}, and means \
                 something else under another: make the value valid on this node (a time \
                 zone or access method its origin has), and the apply worker retries."
            ),
            DdlError::DropWhileMember(me) => format!(
                "Part this node first, from another member: SELECT bdr.part('{me}'); then \
                 DROP EXTENSION works here. Dropping it now would stop this node applying \
                 while the others still stream from it, and leave their slots for it \
                 holding WAL for ever."
            ),
            DdlError::NullTable => "Name each table as schema.table (these functions are \
                 called by a schema change's origin)."
                .into(),
            DdlError::BadPosition(_) => {
                "Write it as pg_lsn prints one, e.g. '0/16B3748' (these functions are called \
                 by a schema change's origin)."
                    .into()
            }
            _ => return None,
        })
    }
}

/// How a synchronous commit (`crate::sync_commit`) fell short. Always a WARNING: the
/// transaction is committed on this node when these are reported.
#[derive(Debug, thiserror::Error)]
pub enum SyncCommitError {
    #[error("bdr: synchronous commit not confirmed after {ms} ms: {confirmed} of {wanted} peers have the transaction")]
    TimedOut {
        ms: u64,
        wanted: usize,
        confirmed: usize,
        missing: String,
    },
    #[error("bdr: canceling the wait for synchronous commit {}: {confirmed} of {wanted} peers confirmed", if *.terminate { "and terminating the connection" } else { "due to user request" })]
    Canceled {
        terminate: bool,
        wanted: usize,
        confirmed: usize,
    },
    #[error("bdr: synchronous commit wants {wanted} peers but this node has {have}")]
    TooFewPeers { wanted: usize, have: usize },
    #[error("bdr.wait_slot_confirm_lsn cannot wait inside a transaction that has written")]
    WaitAfterWrite,
    #[error("bdr.wait_slot_confirm_lsn waits only in client sessions")]
    WaitOutsideSession,
    #[error("replication slot \"{0}\" of this database does not exist")]
    NoSuchSlot(String),
}

impl PgError for SyncCommitError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            SyncCommitError::TimedOut { .. } => PgSqlErrorCode::ERRCODE_WARNING,
            SyncCommitError::Canceled {
                terminate: true, ..
            } => PgSqlErrorCode::ERRCODE_ADMIN_SHUTDOWN,
            SyncCommitError::Canceled { .. } => PgSqlErrorCode::ERRCODE_QUERY_CANCELED,
            SyncCommitError::TooFewPeers { .. } => PgSqlErrorCode::ERRCODE_WARNING,
            SyncCommitError::WaitAfterWrite => PgSqlErrorCode::ERRCODE_ACTIVE_SQL_TRANSACTION,
            SyncCommitError::WaitOutsideSession => PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            SyncCommitError::NoSuchSlot(_) => PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
        }
    }
    fn detail(&self) -> Option<String> {
        let committed = "The transaction has committed on this node and will replicate when the peers receive it";
        Some(match self {
            SyncCommitError::TimedOut { missing, .. } => {
                format!("{committed}, but it is not known to be durable on enough peers. Not confirmed by: {missing}.")
            }
            SyncCommitError::Canceled { .. } => {
                format!("{committed}, but it might not be durable on enough peers.")
            }
            SyncCommitError::TooFewPeers { .. } => format!(
                "{committed}; it was not waited for (a node counts one peer per bdr replication slot it feeds)."
            ),
            SyncCommitError::WaitAfterWrite => "The peers receive this transaction's changes only after it commits, so the wait would never cover them.".into(),
            SyncCommitError::NoSuchSlot(_) => "Nothing was waited for.".into(),
            SyncCommitError::WaitOutsideSession => "An apply worker or other background process waiting for its own peers could hold up replication.".into(),
        })
    }
    fn hint(&self) -> Option<String> {
        Some(match self {
            SyncCommitError::TimedOut { .. } => "Check bdr.node_status() for the peers that did not confirm; raise bdr.synchronous_commit_timeout or lower bdr.synchronous_commit_peers.".into(),
            SyncCommitError::Canceled { .. } => "bdr.last_synchronous_commit() reports how the last commit ended.".into(),
            SyncCommitError::TooFewPeers { .. } => "Set bdr.synchronous_commit_peers to at most the number of other data nodes in the group.".into(),
            SyncCommitError::WaitAfterWrite => "COMMIT first, then call it in a new transaction (or set bdr.synchronous_commit_peers for the transaction).".into(),
            SyncCommitError::WaitOutsideSession => "Call it from an ordinary session (not in a replicated statement or a trigger that fires in apply).".into(),
            SyncCommitError::NoSuchSlot(_) => "Pass NULL to wait for every bdr slot of this database; pg_replication_slots lists the slots.".into(),
        })
    }
}

/// Writes refused for split-brain prevention (`crate::quorum`).
#[derive(Debug, thiserror::Error)]
pub enum QuorumError {
    #[error("bdr: this node reaches {seen} of the {required} voting members bdr.minimum_nodes requires: writes are refused")]
    NotEnough {
        seen: u32,
        required: u32,
        missing: String,
    },
}

impl PgError for QuorumError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION
    }
    fn detail(&self) -> Option<String> {
        match self {
            QuorumError::NotEnough { missing, .. } if missing.is_empty() => Some(
                "Every voting member is reached: the group has fewer voting members than \
                 bdr.minimum_nodes (or has just grown; the count is refreshed every 2 s)."
                    .into(),
            ),
            QuorumError::NotEnough { missing, .. } => Some(format!("Not reached: {missing}.")),
        }
    }
    fn hint(&self) -> Option<String> {
        Some(
            "Writes resume by themselves as soon as enough members are reachable again \
             (reads keep working); write on a node of the majority meanwhile. See \
             bdr.health_check()."
                .into(),
        )
    }
}
