//! The extension's catalog tables, read and written through SPI (they are ordinary tables
//! in schema `bdr`, never replicated: they belong to the extension).

pub mod nodes;
pub mod tombstones;
