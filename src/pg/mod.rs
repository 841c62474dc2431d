//! The only modules that touch raw `pg_sys`: every `unsafe` block of the extension lives
//! under `src/pg/`, each with a `SAFETY` note, so the rest of the code is plain Rust
//! that decides things and the code here only reads and writes PostgreSQL's structures.

pub mod bgw;
pub mod decoding;
pub mod exec;
pub mod libpq;
pub mod relcache;
pub mod sequence;
pub mod shmem;
pub mod syncrep;
pub mod utility;
pub mod xact;

/// Whether PostgreSQL is loading `shared_preload_libraries` right now (postmaster start).
pub fn preload_in_progress() -> bool {
    // SAFETY: a plain read of a global set by the postmaster before loading libraries.
    unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress }
}
