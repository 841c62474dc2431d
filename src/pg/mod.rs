//! The only modules that touch raw `pg_sys`: every `unsafe` block of the extension lives
//! under `src/pg/`, each with a `SAFETY` note, so the rest of the code is plain Rust
//! that decides things and the code here only reads and writes PostgreSQL's structures.
//! The crate denies `unsafe_code` (Cargo.toml `[lints.rust]`); this module alone allows
//! it, and offers safe functions that check what they can (an open transaction, a row's
//! width) and raise an ERROR otherwise.
#![allow(unsafe_code)]

pub mod bgw;
pub mod decoding;
pub mod exec;
pub mod libpq;
pub mod memcxt;
pub mod mq;
pub mod owner;
pub mod relcache;
pub mod sequence;
pub mod shmem;
pub mod syncrep;
pub mod tables;
pub mod unguarded;
pub mod utility;
pub mod xact;

/// Whether PostgreSQL is loading `shared_preload_libraries` right now (postmaster start).
pub fn preload_in_progress() -> bool {
    // SAFETY: a plain read of a global set by the postmaster before loading libraries.
    unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress }
}

/// This backend's database OID (0 before it connects to one).
pub fn database_oid() -> u32 {
    // SAFETY: a plain read of a global set when the backend connects.
    unsafe { pgrx::pg_sys::MyDatabaseId }.to_u32()
}

/// The server's `wal_level` (a `pg_sys::WalLevel` value) and `track_commit_timestamp`.
pub fn wal_settings() -> (i32, bool) {
    // SAFETY: plain reads of GUC-backed globals, set before any library is loaded.
    unsafe {
        (
            pgrx::pg_sys::wal_level,
            pgrx::pg_sys::track_commit_timestamp,
        )
    }
}

/// Reserve a settings prefix (`bdr.`): unknown settings under it are refused.
pub fn reserve_guc_prefix(prefix: &'static std::ffi::CStr) {
    // SAFETY: a static NUL-terminated name, copied by PostgreSQL.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(prefix.as_ptr()) };
}
