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

/// Raise `e` as an ERROR; does not return.
pub fn raise(e: &dyn PgError) -> ! {
    report(e).report(PgLogLevel::ERROR);
    unreachable!("ereport(ERROR) returned")
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
    // SAFETY: plain reads of GUC-backed globals, set before any library is loaded.
    let (level, commit_ts) = unsafe { (pg_sys::wal_level, pg_sys::track_commit_timestamp) };
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
                 forward_origins ('none' or 'all')."
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
    #[error("another apply worker wrote key {key} of \"{table}\" at the same time; the transaction is applied again")]
    ConcurrentKey { table: String, key: String },
    #[error("unchanged TOAST value for column \"{column}\" of \"{table}\" on an insert or a missing row")]
    ToastWithoutRow { table: String, column: String },
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
            ApplyError::ConcurrentKey { .. } => PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
            ApplyError::Protocol(_) | ApplyError::UnknownRelation(_) => {
                PgSqlErrorCode::ERRCODE_PROTOCOL_VIOLATION
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
                "Nothing to do: changes from two peers about the same absent row raced; the \
                 apply worker restarts and decides again on committed data."
                    .into(),
            ),
            ApplyError::NoIdentity { .. } => Some(
                "Give the table a primary key (or REPLICA IDENTITY FULL) on every node.".into(),
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
}

impl PgError for WorkerError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            WorkerError::NoSlot { .. } => PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            WorkerError::PauseExpired { .. } => PgSqlErrorCode::ERRCODE_QUERY_CANCELED,
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
        })
    }
}
