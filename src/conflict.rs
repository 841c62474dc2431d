//! Conflict stage: the policy lives in `bdr_core::conflict` (plain Rust, unit-tested
//! without a server); this module is where the apply stage reaches it.

pub use bdr_core::conflict::*;
