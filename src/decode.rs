//! Decode stage, policy half: what the output plugin sends and when.
//!
//! The raw callbacks in [`crate::pg::decoding`] read PostgreSQL's structures and call in
//! here for every decision, so the rules are readable in one place:
//!
//! - **Options**: `min_proto_version`/`max_proto_version` pick the protocol version (the
//!   highest both speak; no overlap is an ERROR naming both ranges); `forward_origins`
//!   (`none`, the default, or `all`) decides whether changes that were themselves
//!   replicated here (they carry a replication origin) are sent on: a spoke asks its hub
//!   for `all` (hub and spoke), and the hub then sends every origin's changes except the
//!   spoke's own ([`loops_back`]).
//! - **Lazy BEGIN**: a transaction's BEGIN frame is held back until its first emitted
//!   change, so a transaction with nothing to replicate (rolled back, or touching only
//!   unlogged, temporary or excluded tables) produces no frames at all.
//! - **What replicates**: permanent tables outside the system schemas that do not belong
//!   to an extension (that excludes bdr's own catalog and, e.g., a PostGIS table a peer may
//!   lack — a known trap of `FOR ALL TABLES` publications).
//! - **Logical messages**: only bdr's own (transactional, exact prefix), up to 1 MB; any
//!   role can emit messages, so nothing else may reach a peer. A heartbeat is sent only
//!   from a write of `bdr.heartbeat` (bdr's own code), never from an emitted message.
//! - **Relation metadata** is sent before a relation's first change in a stream and again
//!   after its definition changed (relcache invalidation drops the cached entry).

use crate::error::DecodeError;
use bdr_core::wire::{self, Begin};

/// Options negotiated at slot start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeOptions {
    pub version: u8,
    pub forward_origins: bool,
    /// Send a transaction that outgrows `logical_decoding_work_mem` before it commits
    /// (protocol version 4, `streaming 'on'`; never together with `forward_origins`:
    /// a transaction's origin is only known at its commit).
    pub streaming: bool,
}

impl DecodeOptions {
    /// Parse the `(name, value)` options of `START_REPLICATION` or
    /// `pg_logical_slot_get_binary_changes`.
    pub fn parse<'a>(
        opts: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
    ) -> Result<Self, DecodeError> {
        let mut min = wire::PROTOCOL_VERSION_MIN;
        let mut max: Option<u8> = None;
        let mut forward_origins = false;
        let mut streaming = None;
        for (name, value) in opts {
            let bad = || DecodeError::BadOption {
                option: name.to_owned(),
                value: value.unwrap_or("").to_owned(),
            };
            match name {
                "min_proto_version" | "max_proto_version" => {
                    let v: u8 = value.and_then(|v| v.trim().parse().ok()).ok_or_else(bad)?;
                    if name == "min_proto_version" {
                        min = v
                    } else {
                        max = Some(v)
                    }
                }
                "forward_origins" => {
                    forward_origins = match value.map(str::to_ascii_lowercase).as_deref() {
                        Some("all") => true,
                        Some("none") | Some("") | None => false,
                        _ => return Err(bad()),
                    }
                }
                "streaming" => {
                    streaming = Some(match value.map(str::to_ascii_lowercase).as_deref() {
                        Some("on") | Some("true") | Some("1") | None => true,
                        Some("off") | Some("false") | Some("0") => false,
                        _ => return Err(bad()),
                    })
                }
                other => return Err(DecodeError::UnknownOption(other.to_owned())),
            }
        }
        // Without an explicit maximum, the client accepts anything from its minimum up.
        let max = max.unwrap_or(min.max(wire::PROTOCOL_VERSION_MAX));
        let version = wire::negotiate_version(min, max).map_err(|_| DecodeError::Protocol {
            theirs_min: min,
            theirs_max: max,
        })?;
        let streaming = streaming.unwrap_or(false);
        if streaming && (version < wire::STREAM_FROM_VERSION || forward_origins) {
            return Err(DecodeError::BadOption {
                option: "streaming".into(),
                value: format!(
                    "on (needs protocol version {} or later and forward_origins none; \
                     negotiated version {version})",
                    wire::STREAM_FROM_VERSION
                ),
            });
        }
        Ok(DecodeOptions {
            version,
            forward_origins,
            streaming,
        })
    }
}

/// Holds a transaction's BEGIN until something of it is emitted.
#[derive(Debug, Default)]
pub struct TxnFraming {
    pending: Option<Begin>,
    sent: bool,
}

impl TxnFraming {
    pub fn begin(&mut self, b: Begin) {
        self.pending = Some(b);
        self.sent = false;
    }

    /// Call before emitting a change: returns the BEGIN to emit first, once.
    pub fn before_change(&mut self) -> Option<Begin> {
        if self.sent {
            return None;
        }
        let b = self.pending.take();
        self.sent = b.is_some();
        b
    }

    /// Call at commit: whether a COMMIT must be emitted (a BEGIN was).
    pub fn commit(&mut self) -> bool {
        self.pending = None;
        std::mem::take(&mut self.sent)
    }
}

pub use bdr_core::replication::{replicates, why_not_replicated, RelFacts};

/// Whether a transaction that was applied here from replication origin `origin` would go
/// back to where it came from on slot `slot`. On a node, the origin of changes applied
/// from node X is `bdr_<dboid>_X` and the slot X streams from is `bdr_<dboid>_X`
/// (`crate::receive::origin_name` / `slot_name`), so they are the same name exactly when
/// the subscriber is the change's origin.
pub fn loops_back(origin: &str, slot: &str) -> bool {
    !slot.is_empty() && origin == slot
}

/// What the plugin does with a logical message (`pg_logical_emit_message`, which any role
/// may call): only bdr's own transactional messages are sent, and only up to
/// [`wire::MAX_MESSAGE_CONTENT`] bytes. A heartbeat is never taken from a message: its
/// horizon lets a hub's spokes collect tombstones, so it travels only as a write of
/// `bdr.heartbeat`, which no role but bdr's own code can make; one emitted by hand is
/// dropped here.
pub fn message_policy(
    prefix: &str,
    transactional: bool,
    content: &[u8],
) -> Result<bool, DecodeError> {
    if !wire::is_our_message(prefix, transactional)
        || wire::heartbeat_horizon(prefix, content).is_some()
    {
        return Ok(false);
    }
    let size = content.len();
    if size > wire::MAX_MESSAGE_CONTENT {
        return Err(DecodeError::MessageTooLarge {
            prefix: prefix.into(),
            size,
            max: wire::MAX_MESSAGE_CONTENT,
        });
    }
    Ok(true)
}
