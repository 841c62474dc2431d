//! Every `bdr.*` setting, in one place.
//!
//! The `bdr.` prefix is reserved (`MarkGUCPrefixReserved`), so a typo such as
//! `bdr.conflict_loging` in postgresql.conf is reported instead of silently ignored.
//! Settings are added here as the features that read them land; each one is documented
//! in `docs/settings.md`.

use pgrx::pg_sys;

/// Register the settings; called once from `_PG_init`.
pub fn init() {
    // SAFETY: called from _PG_init in the postmaster, with a static NUL-terminated name.
    unsafe { pg_sys::MarkGUCPrefixReserved(c"bdr".as_ptr()) };
}
