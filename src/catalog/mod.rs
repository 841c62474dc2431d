//! The extension's catalog tables, read and written through SPI (they are ordinary tables
//! in schema `bdr`, never replicated: they belong to the extension).

pub mod nodes;
pub mod tombstones;

/// Drop slot `$1` if it exists.
pub const DROP_SLOT_SQL: &str =
    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1";
/// Drop replication origin `$1` if it exists.
pub const DROP_ORIGIN_SQL: &str =
    "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname = $1";
