//! The wire format: how one decoded change travels from a node's output plugin to a peer's
//! apply worker.
//!
//! Every logical-decoding write is one **frame** (versions 1 and 2) or, from version 3,
//! one or more whole frames back to back (a *batch*, see [`BATCH_FROM_VERSION`]):
//!
//! ```text
//! +----------------+----------------+---------+------+------------------+
//! | length: u32 BE | crc32:  u32 BE | version | kind | body             |
//! +----------------+----------------+---------+------+------------------+
//!   bytes after     CRC-32 (IEEE) of   u8        u8     v1: JSON of the message's
//!   the crc field   version..body                       struct; v2: see below
//! ```
//!
//! Why this way: the header is fixed-size binary so a receiver can reject a truncated or
//! corrupted frame, an unknown protocol version or an unknown message kind *before* it
//! spends time parsing the body, and each of those failures has its own error. The body is
//! JSON (serde) in version 1 because it is easy to read in a debugger and in
//! `pg_logical_slot_peek_*` output. Version 2 (the default between nodes of this build)
//! keeps JSON for the rare messages (RELATION, TRUNCATE, MESSAGE) and encodes the hot ones
//! (BEGIN, INSERT, UPDATE, DELETE, COMMIT) in a fixed binary layout ([`bin`]): parsing
//! JSON was ~8% of the apply worker's time on small transactions. Version 3 encodes
//! frames exactly as version 2 does, but the walsender may put several frames (never more
//! than one transaction's, and at least every [`BATCH_BYTES`]) into one write: each write
//! is a CopyData message the walsender sends with its own system call, and one per change
//! was ~30% of the sending walsender's CPU on a big transaction ([`decode_frames`] reads
//! a batch). Version 4 adds the frames of a transaction streamed before its commit
//! (`S` start, `X` change tagged with its xids, `E` stop, `A` abort, `c` commit; binary
//! bodies), sent only to a subscriber that asked for them; a frame of one of these kinds
//! in an older version is an unknown kind. Their order is checked by
//! [`crate::streaming::StreamCheck`].
//!
//! Column values travel in text form (the type's output function on the sender, the
//! local type's input function on the receiver), so nodes of different architectures and
//! major versions interoperate. A value is SQL NULL, a text, or "unchanged TOAST" (an
//! on-disk TOASTed value an UPDATE did not touch, which the sender does not have and must
//! not invent).
//!
//! Invariants:
//! - `decode_frame(&encode_frame(m, v)) == Ok(m)` for every message and supported version.
//! - A decoder never returns a message from a frame whose CRC does not match, whose
//!   version is outside the supported range, or whose kind byte it does not know.
//! - Nothing here touches PostgreSQL: this module is unit-tested without a server.

use serde::de::{self, Deserializer, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The lowest protocol version this build can speak.
pub const PROTOCOL_VERSION_MIN: u8 = 1;
/// The highest protocol version this build can speak.
pub const PROTOCOL_VERSION_MAX: u8 = 4;
/// From this version on, a sender asked for it (plugin option `streaming`) may send a
/// large transaction in pieces before it commits (the `S`, `E`, `X`, `A`, `c` frames).
pub const STREAM_FROM_VERSION: u8 = 4;
/// From this version on, one write may carry several frames ([`decode_frames`]).
pub const BATCH_FROM_VERSION: u8 = 3;
/// A batching sender writes what it has gathered once it reaches this many bytes (and at
/// every COMMIT frame), so a receiver applies a big transaction as it streams in. Kept
/// small for the receiver's memory: libpq holds a whole CopyData message in its input
/// buffer (doubled from 16 KiB until it fits, never shrunk) plus a copy it hands over, so
/// 64 KiB writes cost the apply process a 128 KiB buffer and a 64 KiB one for good; 16 KiB
/// ones need 32 KiB and 16 KiB. A big transaction's writes are still ~400 frames each.
pub const BATCH_BYTES: usize = 16 * 1024;
/// Bytes before the body: length (4) + crc (4) + version (1) + kind (1).
pub const HEADER_LEN: usize = 10;
/// Prefix of transactional logical messages that belong to bdr (e.g. DDL replication).
pub const MESSAGE_PREFIX: &str = "bdr";
/// The exact prefixes of the logical messages bdr itself emits (`bdr.sync`: the join's
/// synchronisation point). `pg_logical_emit_message` is granted to PUBLIC, so any role can
/// write a message with any prefix: only transactional messages with one of these are
/// ours ([`is_our_message`]).
pub const MESSAGE_PREFIXES: &[&str] = &[SYNC_PREFIX, SYNC_COMMIT_PREFIX];

/// The marker of an empty transaction that only records progress: a join's
/// synchronisation point, and a node's heartbeat (its peers' tombstone collection waits
/// for a transaction from every peer).
pub const SYNC_PREFIX: &str = "bdr.sync";

/// A heartbeat's message content: `heartbeat <horizon>`, the sender's tombstone horizon
/// (PostgreSQL-epoch µs; 0: not known) — before it, the sender has applied everything
/// from every node it streams from, and so forwards nothing older afterwards.
pub fn heartbeat_content(horizon: i64) -> String {
    format!("heartbeat {horizon}")
}

/// The horizon a `bdr.sync` message carries, if it is a heartbeat (one from a version
/// before horizons says `heartbeat` alone: 0).
pub fn heartbeat_horizon(prefix: &str, content: &[u8]) -> Option<i64> {
    if prefix != SYNC_PREFIX {
        return None;
    }
    let text = std::str::from_utf8(content).ok()?;
    let rest = text.strip_prefix("heartbeat")?;
    if rest.is_empty() {
        return Some(0);
    }
    rest.strip_prefix(' ')?
        .parse::<i64>()
        .ok()
        .map(|h| h.max(0))
}

/// The marker a synchronous commit (`bdr.synchronous_commit_peers`) puts in its
/// transaction: the receiving apply worker flushes that commit and acknowledges it at once
/// instead of at its next periodic status update.
pub const SYNC_COMMIT_PREFIX: &str = "bdr.sync_commit";
/// Largest logical message content the plugin sends (hex in JSON doubles it; a frame must
/// stay far below PostgreSQL's 1 GB allocation limit).
pub const MAX_MESSAGE_CONTENT: usize = 1 << 20;

/// Whether a logical message is one of bdr's own: transactional (it travels inside its
/// transaction, so it is ordered and applied exactly once with it) and with exactly one of
/// [`MESSAGE_PREFIXES`]. The sender forwards nothing else; a receiver skips anything else.
pub fn is_our_message(prefix: &str, transactional: bool) -> bool {
    transactional && MESSAGE_PREFIXES.contains(&prefix)
}

/// Everything that can go wrong turning bytes into a [`Message`]. Each is fatal for the
/// stream: the apply worker stops with this text, it never skips a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("truncated frame: need {needed} bytes, have {have}")]
    Truncated { needed: usize, have: usize },
    #[error("frame checksum mismatch: header says {expected:#010x}, payload has {actual:#010x}")]
    BadCrc { expected: u32, actual: u32 },
    #[error(
        "unsupported protocol version {version} (this node speaks {PROTOCOL_VERSION_MIN} to {PROTOCOL_VERSION_MAX})"
    )]
    UnsupportedVersion { version: u8 },
    #[error("unknown message kind {kind:#04x} ({:?})", char::from(*kind))]
    UnknownKind { kind: u8 },
    #[error("malformed {kind} message body: {reason}")]
    BadBody { kind: &'static str, reason: String },
    #[error("trailing {extra} bytes after the frame")]
    TrailingBytes { extra: usize },
    #[error("protocol version ranges do not overlap: this node speaks {ours_min} to {ours_max}, the peer asked for {theirs_min} to {theirs_max}")]
    NoCommonVersion {
        ours_min: u8,
        ours_max: u8,
        theirs_min: u8,
        theirs_max: u8,
    },
}

/// One column value in text form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// An on-disk TOASTed value the change did not modify; the receiver keeps its own.
    UnchangedToast,
    /// The type output function's rendering of the value.
    Text(String),
}

impl Value {
    pub fn text(s: impl Into<String>) -> Self {
        Value::Text(s.into())
    }
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }
}

// JSON form: a string is a value, `null` is SQL NULL, `true` is "unchanged TOAST".
impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => s.serialize_unit(),
            Value::UnchangedToast => s.serialize_bool(true),
            Value::Text(t) => s.serialize_str(t),
        }
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Value;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, null, or true (unchanged TOAST)")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
                Ok(Value::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Value, E> {
                Ok(Value::Null)
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<Value, E> {
                if b {
                    Ok(Value::UnchangedToast)
                } else {
                    Err(E::invalid_value(de::Unexpected::Bool(false), &self))
                }
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Value, E> {
                Ok(Value::Text(s.to_owned()))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Value, E> {
                Ok(Value::Text(s))
            }
        }
        d.deserialize_any(V)
    }
}

/// Where a transaction came from when the stream forwards other origins' changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginInfo {
    /// The replication origin's name on the sending node (`bdr_<node>` for our peers).
    pub name: String,
    /// The origin's LSN recorded with that transaction on the sending node.
    pub lsn: u64,
}

/// Start of a transaction. Sent lazily, just before its first emitted change, so a
/// transaction with nothing to replicate produces no frames at all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Begin {
    pub xid: u32,
    /// LSN of the commit record.
    pub final_lsn: u64,
    /// Commit timestamp, microseconds since 2000-01-01 UTC (PostgreSQL's epoch).
    pub commit_time: i64,
    /// Present only for transactions replayed from another origin (forwarding streams).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<OriginInfo>,
}

/// Replica identity of a relation, as `pg_class.relreplident`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaIdentity {
    /// Primary key.
    Default,
    /// A chosen unique index.
    Index,
    /// All columns.
    Full,
    /// None: UPDATE/DELETE cannot be located on the receiver.
    Nothing,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    /// `format_type` rendering, e.g. `integer`, `text[]`, `public.mood`.
    pub type_name: String,
    /// Part of the replica identity key.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub key: bool,
}

/// A relation's definition, sent before its first change in a stream and again after
/// its definition changes. Later messages refer to it by `id` (the sender's OID).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relation {
    pub id: u32,
    pub schema: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    /// Sent columns in attribute order (dropped and generated columns are not sent).
    pub columns: Vec<Column>,
}

impl Relation {
    /// Indexes (into `columns`) of the key columns, in attribute order.
    pub fn key_columns(&self) -> Vec<usize> {
        self.columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.key)
            .map(|(i, _)| i)
            .collect()
    }
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// The old row of an UPDATE or DELETE.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OldRow {
    /// The key columns' values, in the order of [`Relation::key_columns`].
    Key(Vec<Value>),
    /// Every sent column (REPLICA IDENTITY FULL).
    Full(Vec<Value>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Insert {
    pub relation: u32,
    pub new: Vec<Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    pub relation: u32,
    /// Present when the key changed, or always under REPLICA IDENTITY FULL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<OldRow>,
    pub new: Vec<Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delete {
    pub relation: u32,
    pub old: OldRow,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Truncate {
    pub relations: Vec<u32>,
    pub cascade: bool,
    pub restart_identity: bool,
}

/// A logical decoding message (`pg_logical_emit_message`) of bdr's own (see
/// [`is_our_message`]). The content is hex-encoded in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogicalMessage {
    pub transactional: bool,
    pub lsn: u64,
    pub prefix: String,
    #[serde(with = "hex_bytes")]
    pub content: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    /// LSN of the commit record.
    pub commit_lsn: u64,
    /// LSN just past the commit record: what the receiver stores as origin progress.
    pub end_lsn: u64,
    pub commit_time: i64,
}

/// Start of one piece (segment) of a transaction streamed before its commit (version 4).
/// The frames up to the next [`Message::StreamStop`] belong to transaction `xid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStart {
    /// The top-level transaction's id on the sender.
    pub xid: u32,
    /// The first piece of this transaction on this stream (connection).
    pub first_segment: bool,
}

/// A change of a transaction being streamed: the change as it would travel in a
/// committed transaction, tagged with its top-level `xid` and the (sub)transaction
/// `subxid` that made it (`subxid == xid` for the top level).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamChange {
    pub xid: u32,
    pub subxid: u32,
    /// An INSERT, UPDATE, DELETE, TRUNCATE or logical message.
    pub change: Box<Message>,
}

/// A streamed transaction (`subxid == xid`) or one of its subtransactions was rolled
/// back on the sender: what was streamed of it must be discarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAbort {
    pub xid: u32,
    pub subxid: u32,
}

/// A streamed transaction committed on the sender: every piece was sent before this.
/// The fields are those of [`Begin`] and [`Commit`] together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCommit {
    pub xid: u32,
    /// LSN of the commit record.
    pub commit_lsn: u64,
    /// LSN just past the commit record: the receiver's progress for this origin.
    pub end_lsn: u64,
    pub commit_time: i64,
    /// As in [`Begin`]: only for transactions replayed here from another origin.
    pub origin: Option<OriginInfo>,
}

/// Every message kind, with its kind byte on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin(Begin),
    Relation(Relation),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(LogicalMessage),
    Commit(Commit),
    StreamStart(StreamStart),
    StreamStop,
    StreamChange(StreamChange),
    StreamAbort(StreamAbort),
    StreamCommit(StreamCommit),
}

impl Message {
    /// The kind byte (ASCII, like pgoutput's, to be readable in a hex dump).
    pub fn kind_byte(&self) -> u8 {
        match self {
            Message::Begin(_) => b'B',
            Message::Relation(_) => b'R',
            Message::Insert(_) => b'I',
            Message::Update(_) => b'U',
            Message::Delete(_) => b'D',
            Message::Truncate(_) => b'T',
            Message::Message(_) => b'M',
            Message::Commit(_) => b'C',
            Message::StreamStart(_) => b'S',
            Message::StreamStop => b'E',
            Message::StreamChange(_) => b'X',
            Message::StreamAbort(_) => b'A',
            Message::StreamCommit(_) => b'c',
        }
    }

    /// One of the frames of a transaction streamed before its commit (version 4).
    pub fn is_stream(&self) -> bool {
        is_stream_kind(self.kind_byte())
    }

    pub fn kind_name(&self) -> &'static str {
        kind_name(self.kind_byte()).unwrap_or("unknown")
    }
}

/// Name of a kind byte, or `None` if the byte is not a known kind.
pub fn kind_name(kind: u8) -> Option<&'static str> {
    Some(match kind {
        b'B' => "begin",
        b'R' => "relation",
        b'I' => "insert",
        b'U' => "update",
        b'D' => "delete",
        b'T' => "truncate",
        b'M' => "message",
        b'C' => "commit",
        b'S' => "stream start",
        b'E' => "stream stop",
        b'X' => "stream change",
        b'A' => "stream abort",
        b'c' => "stream commit",
        _ => return None,
    })
}

/// The kinds that only exist from [`STREAM_FROM_VERSION`] on.
pub fn is_stream_kind(kind: u8) -> bool {
    matches!(kind, b'S' | b'E' | b'X' | b'A' | b'c')
}

/// The kinds a [`StreamChange`] may carry.
fn is_streamable_kind(kind: u8) -> bool {
    matches!(kind, b'I' | b'U' | b'D' | b'T' | b'M')
}

/// Pick the highest version both sides speak, or say why there is none.
pub fn negotiate_version(theirs_min: u8, theirs_max: u8) -> Result<u8, WireError> {
    let lo = theirs_min.max(PROTOCOL_VERSION_MIN);
    let hi = theirs_max.min(PROTOCOL_VERSION_MAX);
    if theirs_min > theirs_max || lo > hi {
        return Err(WireError::NoCommonVersion {
            ours_min: PROTOCOL_VERSION_MIN,
            ours_max: PROTOCOL_VERSION_MAX,
            theirs_min,
            theirs_max,
        });
    }
    Ok(hi)
}

/// Append one frame for `msg` to `out`.
pub fn encode_frame_into(msg: &Message, version: u8, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; 8]); // length and crc, filled in below
    out.push(version);
    out.push(msg.kind_byte());
    encode_body(msg, version, out);
    finish_frame(out, start);
}

/// Append `msg`'s body in `version`'s encoding.
fn encode_body(msg: &Message, version: u8, out: &mut Vec<u8>) {
    if (version >= 2 || msg.is_stream()) && bin::encode(msg, version, out) {
        return;
    }
    // Serialising our own plain structs into a Vec cannot fail.
    let res = match msg {
        Message::Begin(m) => serde_json::to_writer(&mut *out, m),
        Message::Relation(m) => serde_json::to_writer(&mut *out, m),
        Message::Insert(m) => serde_json::to_writer(&mut *out, m),
        Message::Update(m) => serde_json::to_writer(&mut *out, m),
        Message::Delete(m) => serde_json::to_writer(&mut *out, m),
        Message::Truncate(m) => serde_json::to_writer(&mut *out, m),
        Message::Message(m) => serde_json::to_writer(&mut *out, m),
        Message::Commit(m) => serde_json::to_writer(&mut *out, m),
        // Always binary (`bin::encode` took them above).
        Message::StreamStart(_)
        | Message::StreamStop
        | Message::StreamChange(_)
        | Message::StreamAbort(_)
        | Message::StreamCommit(_) => Ok(()),
    };
    res.expect("serialising a wire message to memory cannot fail");
}

/// Fill in the length and CRC of the frame that starts at `start`.
fn finish_frame(out: &mut [u8], start: usize) {
    let payload = &out[start + 8..];
    let len = payload.len() as u32;
    let crc = crc32fast::hash(payload);
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
}

/// Writes one INSERT, UPDATE or DELETE frame (binary: version 2 or later) straight into a
/// buffer, value by value: the output plugin's hot path, with no [`Message`] and no
/// `String` per value in between. The bytes are exactly those [`encode_frame_into`] writes
/// for the equivalent message (unit- and property-tested below), so a receiver cannot tell
/// the two apart; version 1 (JSON) has no such writer.
///
/// Use: [`ChangeWriter::begin`]; for an UPDATE or DELETE an old-row call
/// ([`ChangeWriter::no_old_row`], [`ChangeWriter::old_key`], [`ChangeWriter::old_full`])
/// followed, unless none, by its values and [`ChangeWriter::end_values`]; for an INSERT or
/// UPDATE [`ChangeWriter::new_row`], the values, [`ChangeWriter::end_values`]; then
/// [`ChangeWriter::finish`]. A value list holds at most `u16::MAX` values (PostgreSQL
/// allows 1,600 columns). Nothing but [`ChangeWriter::finish`] panics (misuse is a debug
/// assertion), so the plugin can call it between PostgreSQL calls that may `longjmp`.
pub struct ChangeWriter<'a> {
    out: &'a mut Vec<u8>,
    start: usize,
    /// The open value list: where its count goes, and the values written so far.
    list: Option<(usize, u16)>,
}

impl<'a> ChangeWriter<'a> {
    /// Start a frame of kind `kind` (`b'I'`, `b'U'` or `b'D'`) for `relation`, appended
    /// to `out`. `stream` is the (top-level xid, subxid) of a change of a transaction
    /// streamed before its commit: the change is then wrapped in a `STREAM CHANGE` frame
    /// (version 4 or later).
    pub fn begin(
        out: &'a mut Vec<u8>,
        version: u8,
        kind: u8,
        relation: u32,
        stream: Option<(u32, u32)>,
    ) -> Self {
        debug_assert!(version >= 2 && matches!(kind, b'I' | b'U' | b'D'));
        debug_assert!(stream.is_none() || version >= STREAM_FROM_VERSION);
        let start = out.len();
        out.extend_from_slice(&[0u8; 8]); // length and crc, filled in by finish()
        out.push(version);
        match stream {
            Some((xid, subxid)) => {
                out.push(b'X');
                out.extend_from_slice(&xid.to_be_bytes());
                out.extend_from_slice(&subxid.to_be_bytes());
                out.push(kind);
            }
            None => out.push(kind),
        }
        out.extend_from_slice(&relation.to_be_bytes());
        ChangeWriter {
            out,
            start,
            list: None,
        }
    }

    fn open_list(&mut self) {
        debug_assert!(self.list.is_none(), "a value list is already open");
        self.list = Some((self.out.len(), 0));
        self.out.extend_from_slice(&[0, 0]);
    }

    // No panics in here (a misuse is a debug assertion): the plugin calls these between
    // PostgreSQL calls that may `longjmp`, where unwinding is not allowed.
    fn value(&mut self) {
        debug_assert!(self.list.is_some(), "no value list is open");
        if let Some((_, n)) = self.list.as_mut() {
            *n = n.wrapping_add(1);
        }
    }

    /// An UPDATE without an old row (the key did not change).
    pub fn no_old_row(&mut self) {
        self.out.push(b'-');
    }

    /// The old row's key columns follow ([`OldRow::Key`]).
    pub fn old_key(&mut self) {
        self.out.push(b'k');
        self.open_list();
    }

    /// Every column of the old row follows ([`OldRow::Full`]).
    pub fn old_full(&mut self) {
        self.out.push(b'f');
        self.open_list();
    }

    /// The new row's values follow.
    pub fn new_row(&mut self) {
        self.open_list();
    }

    /// [`Value::Null`].
    pub fn null(&mut self) {
        self.value();
        self.out.push(b'n');
    }

    /// [`Value::UnchangedToast`].
    pub fn unchanged_toast(&mut self) {
        self.value();
        self.out.push(b'u');
    }

    /// [`Value::Text`].
    pub fn text(&mut self, t: &str) {
        self.value();
        self.out.push(b't');
        self.out.extend_from_slice(&(t.len() as u32).to_be_bytes());
        self.out.extend_from_slice(t.as_bytes());
    }

    /// Close the open value list (write its count).
    pub fn end_values(&mut self) {
        debug_assert!(self.list.is_some(), "no value list is open");
        if let Some((at, n)) = self.list.take() {
            if let Some(count) = self.out.get_mut(at..at + 2) {
                count.copy_from_slice(&n.to_be_bytes());
            }
        }
    }

    /// Fill in the frame's length and CRC.
    pub fn finish(self) {
        debug_assert!(self.list.is_none(), "a value list is still open");
        finish_frame(self.out, self.start);
    }

    /// Drop what was written of this frame (the change is not sent after all).
    pub fn abandon(self) {
        self.out.truncate(self.start);
    }
}

/// One frame for `msg`.
pub fn encode_frame(msg: &Message, version: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    encode_frame_into(msg, version, &mut out);
    out
}

/// Decode the frame at the start of `buf`; returns the message, its version and the bytes
/// consumed. Use [`decode_frame`] when `buf` must be exactly one frame.
pub fn decode_frame_prefix(buf: &[u8]) -> Result<(Message, u8, usize), WireError> {
    if buf.len() < HEADER_LEN {
        return Err(WireError::Truncated {
            needed: HEADER_LEN,
            have: buf.len(),
        });
    }
    let len = u32::from_be_bytes(buf[0..4].try_into().unwrap()) as usize;
    let expected = u32::from_be_bytes(buf[4..8].try_into().unwrap());
    let total = 8 + len;
    if len < 2 || buf.len() < total {
        return Err(WireError::Truncated {
            needed: total.max(HEADER_LEN),
            have: buf.len(),
        });
    }
    let payload = &buf[8..total];
    let actual = crc32fast::hash(payload);
    if actual != expected {
        return Err(WireError::BadCrc { expected, actual });
    }
    let version = payload[0];
    if !(PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION_MAX).contains(&version) {
        return Err(WireError::UnsupportedVersion { version });
    }
    let kind = payload[1];
    let name = kind_name(kind).ok_or(WireError::UnknownKind { kind })?;
    if is_stream_kind(kind) && version < STREAM_FROM_VERSION {
        return Err(WireError::UnknownKind { kind });
    }
    let msg = decode_body(kind, name, &payload[2..], version)?;
    Ok((msg, version, total))
}

/// Parse the body of a frame of kind `kind` (named `name`) in `version`'s encoding.
fn decode_body(
    kind: u8,
    name: &'static str,
    body: &[u8],
    version: u8,
) -> Result<Message, WireError> {
    fn parse<'a, T: Deserialize<'a>>(name: &'static str, body: &'a [u8]) -> Result<T, WireError> {
        serde_json::from_slice(body).map_err(|e| WireError::BadBody {
            kind: name,
            reason: e.to_string(),
        })
    }
    if version >= 2 {
        if let Some(m) = bin::decode(kind, body, version)
            .map_err(|reason| WireError::BadBody { kind: name, reason })?
        {
            return Ok(m);
        }
    }
    Ok(match kind {
        b'B' => Message::Begin(parse(name, body)?),
        b'R' => Message::Relation(parse(name, body)?),
        b'I' => Message::Insert(parse(name, body)?),
        b'U' => Message::Update(parse(name, body)?),
        b'D' => Message::Delete(parse(name, body)?),
        b'T' => Message::Truncate(parse(name, body)?),
        b'M' => Message::Message(parse(name, body)?),
        b'C' => Message::Commit(parse(name, body)?),
        _ => {
            return Err(WireError::BadBody {
                kind: name,
                reason: format!("no encoding in protocol version {version}"),
            })
        }
    })
}

/// Decode `buf`, which must hold exactly one frame.
pub fn decode_frame(buf: &[u8]) -> Result<Message, WireError> {
    let (msg, _, used) = decode_frame_prefix(buf)?;
    if used != buf.len() {
        return Err(WireError::TrailingBytes {
            extra: buf.len() - used,
        });
    }
    Ok(msg)
}

/// Decode every frame of `buf`, which must hold one or more whole frames (a version 3
/// write; a version 1 or 2 write holds exactly one).
pub fn decode_frames(buf: &[u8]) -> Result<Vec<Message>, WireError> {
    let mut out = Vec::new();
    let mut rest = buf;
    loop {
        let (msg, _, used) = decode_frame_prefix(rest)?;
        out.push(msg);
        rest = &rest[used..];
        if rest.is_empty() {
            return Ok(out);
        }
    }
}

/// Render an LSN the way PostgreSQL does (`16/B374D848`).
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parse PostgreSQL's `X/Y` LSN form.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    let hi = u32::from_str_radix(hi, 16).ok()? as u64;
    let lo = u32::from_str_radix(lo, 16).ok()? as u64;
    Some((hi << 32) | lo)
}

/// Version 2's binary bodies for the hot messages. Integers are big-endian; a string is
/// `u32 length + UTF-8 bytes`; a value is a tag byte (`n` NULL, `u` unchanged TOAST, `t`
/// text followed by a string); a value list is `u16 count + values`; an old row is a tag
/// byte (`-` none, `k` key, `f` full) followed by a value list unless none.
///
/// | kind | body |
/// |---|---|
/// | B | xid u32, final_lsn u64, commit_time i64, origin flag u8 (0/1) [, name string, lsn u64] |
/// | I | relation u32, new values |
/// | U | relation u32, old row, new values |
/// | D | relation u32, old row (never none) |
/// | C | commit_lsn u64, end_lsn u64, commit_time i64 |
pub mod bin {
    use super::*;

    /// Append `msg`'s binary body; false for kinds that stay JSON.
    pub fn encode(msg: &Message, version: u8, out: &mut Vec<u8>) -> bool {
        match msg {
            Message::StreamStart(m) => {
                out.extend_from_slice(&m.xid.to_be_bytes());
                out.push(m.first_segment as u8);
            }
            Message::StreamStop => {}
            Message::StreamChange(m) => {
                out.extend_from_slice(&m.xid.to_be_bytes());
                out.extend_from_slice(&m.subxid.to_be_bytes());
                out.push(m.change.kind_byte());
                super::encode_body(&m.change, version, out);
            }
            Message::StreamAbort(m) => {
                out.extend_from_slice(&m.xid.to_be_bytes());
                out.extend_from_slice(&m.subxid.to_be_bytes());
            }
            Message::StreamCommit(m) => {
                out.extend_from_slice(&m.xid.to_be_bytes());
                out.extend_from_slice(&m.commit_lsn.to_be_bytes());
                out.extend_from_slice(&m.end_lsn.to_be_bytes());
                out.extend_from_slice(&m.commit_time.to_be_bytes());
                origin(m.origin.as_ref(), out);
            }
            Message::Begin(b) => {
                out.extend_from_slice(&b.xid.to_be_bytes());
                out.extend_from_slice(&b.final_lsn.to_be_bytes());
                out.extend_from_slice(&b.commit_time.to_be_bytes());
                origin(b.origin.as_ref(), out);
            }
            Message::Insert(m) => {
                out.extend_from_slice(&m.relation.to_be_bytes());
                values(&m.new, out);
            }
            Message::Update(m) => {
                out.extend_from_slice(&m.relation.to_be_bytes());
                old_row(m.old.as_ref(), out);
                values(&m.new, out);
            }
            Message::Delete(m) => {
                out.extend_from_slice(&m.relation.to_be_bytes());
                old_row(Some(&m.old), out);
            }
            Message::Commit(c) => {
                out.extend_from_slice(&c.commit_lsn.to_be_bytes());
                out.extend_from_slice(&c.end_lsn.to_be_bytes());
                out.extend_from_slice(&c.commit_time.to_be_bytes());
            }
            Message::Relation(_) | Message::Truncate(_) | Message::Message(_) => return false,
        }
        true
    }

    fn origin(o: Option<&OriginInfo>, out: &mut Vec<u8>) {
        match o {
            None => out.push(0),
            Some(o) => {
                out.push(1);
                string(&o.name, out);
                out.extend_from_slice(&o.lsn.to_be_bytes());
            }
        }
    }

    fn string(s: &str, out: &mut Vec<u8>) {
        out.extend_from_slice(&(s.len() as u32).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn values(vs: &[Value], out: &mut Vec<u8>) {
        out.extend_from_slice(&(vs.len() as u16).to_be_bytes());
        for v in vs {
            match v {
                Value::Null => out.push(b'n'),
                Value::UnchangedToast => out.push(b'u'),
                Value::Text(t) => {
                    out.push(b't');
                    string(t, out);
                }
            }
        }
    }

    fn old_row(old: Option<&OldRow>, out: &mut Vec<u8>) {
        match old {
            None => out.push(b'-'),
            Some(OldRow::Key(v)) => {
                out.push(b'k');
                values(v, out);
            }
            Some(OldRow::Full(v)) => {
                out.push(b'f');
                values(v, out);
            }
        }
    }

    struct Reader<'a> {
        buf: &'a [u8],
    }

    // The error texts are built out of line: the reader's methods are inlined into
    // `decode` for every field of every kind, and a bad body is rare.
    #[cold]
    #[inline(never)]
    fn short(wanted: usize, left: usize) -> String {
        format!("body ends early: {wanted} more bytes wanted, {left} left")
    }

    #[cold]
    #[inline(never)]
    fn bad(what: &str) -> String {
        what.to_string()
    }

    #[cold]
    #[inline(never)]
    fn bad_tag(what: &str, tag: u8) -> String {
        format!("unknown {what} {tag:#04x}")
    }

    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
            if self.buf.len() < n {
                return Err(short(n, self.buf.len()));
            }
            let (head, rest) = self.buf.split_at(n);
            self.buf = rest;
            Ok(head)
        }
        fn u8(&mut self) -> Result<u8, String> {
            Ok(self.take(1)?[0])
        }
        fn u16(&mut self) -> Result<u16, String> {
            Ok(u16::from_be_bytes(self.take(2)?.try_into().unwrap()))
        }
        fn u32(&mut self) -> Result<u32, String> {
            Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
        }
        fn u64(&mut self) -> Result<u64, String> {
            Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
        }
        fn i64(&mut self) -> Result<i64, String> {
            Ok(i64::from_be_bytes(self.take(8)?.try_into().unwrap()))
        }
        fn string(&mut self) -> Result<String, String> {
            let n = self.u32()? as usize;
            let b = self.take(n)?;
            match std::str::from_utf8(b) {
                Ok(t) => Ok(t.to_owned()),
                Err(_) => Err(bad("a string is not UTF-8")),
            }
        }
        fn values(&mut self) -> Result<Vec<Value>, String> {
            let n = self.u16()? as usize;
            // Each value takes at least one byte: do not trust n for the allocation.
            let mut v = Vec::with_capacity(n.min(self.buf.len()));
            for _ in 0..n {
                v.push(match self.u8()? {
                    b'n' => Value::Null,
                    b'u' => Value::UnchangedToast,
                    b't' => Value::Text(self.string()?),
                    t => return Err(bad_tag("value tag", t)),
                });
            }
            Ok(v)
        }
        fn origin(&mut self) -> Result<Option<OriginInfo>, String> {
            Ok(match self.u8()? {
                0 => None,
                1 => Some(OriginInfo {
                    name: self.string()?,
                    lsn: self.u64()?,
                }),
                f => return Err(bad_tag("origin flag", f)),
            })
        }
        fn old_row(&mut self) -> Result<Option<OldRow>, String> {
            Ok(match self.u8()? {
                b'-' => None,
                b'k' => Some(OldRow::Key(self.values()?)),
                b'f' => Some(OldRow::Full(self.values()?)),
                t => return Err(bad_tag("old-row tag", t)),
            })
        }
    }

    /// Decode a binary body; `Ok(None)` for kinds that stay JSON.
    pub fn decode(kind: u8, body: &[u8], version: u8) -> Result<Option<Message>, String> {
        let mut r = Reader { buf: body };
        let m = match kind {
            b'B' => Message::Begin(Begin {
                xid: r.u32()?,
                final_lsn: r.u64()?,
                commit_time: r.i64()?,
                origin: r.origin()?,
            }),
            b'S' => Message::StreamStart(StreamStart {
                xid: r.u32()?,
                first_segment: match r.u8()? {
                    0 => false,
                    1 => true,
                    f => return Err(bad_tag("first-segment flag", f)),
                },
            }),
            b'E' => Message::StreamStop,
            b'X' => {
                let (xid, subxid, inner) = (r.u32()?, r.u32()?, r.u8()?);
                if !super::is_streamable_kind(inner) {
                    return Err(format!("kind {inner:#04x} cannot be a streamed change"));
                }
                let name = super::kind_name(inner).unwrap_or("unknown");
                let change = super::decode_body(inner, name, r.buf, version)
                    .map_err(|e| format!("its {name}: {e}"))?;
                return Ok(Some(Message::StreamChange(StreamChange {
                    xid,
                    subxid,
                    change: Box::new(change),
                })));
            }
            b'A' => Message::StreamAbort(StreamAbort {
                xid: r.u32()?,
                subxid: r.u32()?,
            }),
            b'c' => Message::StreamCommit(StreamCommit {
                xid: r.u32()?,
                commit_lsn: r.u64()?,
                end_lsn: r.u64()?,
                commit_time: r.i64()?,
                origin: r.origin()?,
            }),
            b'I' => Message::Insert(Insert {
                relation: r.u32()?,
                new: r.values()?,
            }),
            b'U' => Message::Update(Update {
                relation: r.u32()?,
                old: r.old_row()?,
                new: r.values()?,
            }),
            b'D' => Message::Delete(Delete {
                relation: r.u32()?,
                old: match r.old_row()? {
                    Some(o) => o,
                    None => return Err(bad("a DELETE without its old row")),
                },
            }),
            b'C' => Message::Commit(Commit {
                commit_lsn: r.u64()?,
                end_lsn: r.u64()?,
                commit_time: r.i64()?,
            }),
            _ => return Ok(None),
        };
        if !r.buf.is_empty() {
            return Err(format!("{} bytes after the body", r.buf.len()));
        }
        Ok(Some(m))
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 0xf) as usize] as char);
        }
        s.serialize_str(&out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if s.len() % 2 != 0 {
            return Err(serde::de::Error::custom("odd-length hex string"));
        }
        (0..s.len())
            .step_by(2)
            .map(|i| {
                u8::from_str_radix(&s[i..i + 2], 16)
                    .map_err(|_| serde::de::Error::custom("invalid hex digit"))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::Begin(Begin {
                xid: 742,
                final_lsn: 0x1_6B37_4D48,
                commit_time: 817_000_000_123_456,
                origin: None,
            }),
            Message::Begin(Begin {
                xid: 1,
                final_lsn: 2,
                commit_time: -5,
                origin: Some(OriginInfo {
                    name: "bdr_node2".into(),
                    lsn: 99,
                }),
            }),
            Message::Relation(Relation {
                id: 16384,
                schema: "public".into(),
                name: "t \"quoted\"".into(),
                replica_identity: ReplicaIdentity::Default,
                columns: vec![
                    Column {
                        name: "id".into(),
                        type_name: "integer".into(),
                        key: true,
                    },
                    Column {
                        name: "tags".into(),
                        type_name: "text[]".into(),
                        key: false,
                    },
                ],
            }),
            Message::Insert(Insert {
                relation: 16384,
                new: vec![
                    Value::text("1"),
                    Value::Null,
                    Value::text(""),
                    Value::text("ünïcødé \u{0} \"q\""),
                ],
            }),
            Message::Update(Update {
                relation: 16384,
                old: Some(OldRow::Key(vec![Value::text("1")])),
                new: vec![Value::text("2"), Value::UnchangedToast],
            }),
            Message::Update(Update {
                relation: 16384,
                old: None,
                new: vec![Value::text("2")],
            }),
            Message::Delete(Delete {
                relation: 16384,
                old: OldRow::Full(vec![Value::text("2"), Value::Null]),
            }),
            Message::Truncate(Truncate {
                relations: vec![1, 2, 3],
                cascade: true,
                restart_identity: false,
            }),
            Message::Message(LogicalMessage {
                transactional: true,
                lsn: 77,
                prefix: "bdr.ddl".into(),
                content: vec![0, 1, 254, 255],
            }),
            Message::Commit(Commit {
                commit_lsn: 10,
                end_lsn: 20,
                commit_time: 30,
            }),
        ]
    }

    #[test]
    fn round_trip_every_kind() {
        for m in samples() {
            let f = encode_frame(&m, 1);
            assert_eq!(decode_frame(&f).unwrap(), m, "kind {}", m.kind_name());
        }
    }

    #[test]
    fn null_and_empty_string_are_distinct() {
        let m = Message::Insert(Insert {
            relation: 1,
            new: vec![Value::Null, Value::text("")],
        });
        let f = encode_frame(&m, 1);
        let body = std::str::from_utf8(&f[HEADER_LEN..]).unwrap();
        assert_eq!(body, r#"{"relation":1,"new":[null,""]}"#);
        assert_eq!(decode_frame(&f).unwrap(), m);
    }

    #[test]
    fn every_corrupted_byte_is_caught() {
        for m in samples() {
            let f = encode_frame(&m, 1);
            for i in 4..f.len() {
                let mut g = f.clone();
                g[i] ^= 0x40;
                let err = decode_frame(&g).unwrap_err();
                assert!(
                    matches!(err, WireError::BadCrc { .. }),
                    "byte {i} of {} gave {err:?}",
                    m.kind_name()
                );
            }
        }
    }

    #[test]
    fn corrupted_length_is_caught() {
        let f = encode_frame(&samples()[0], 1);
        let mut g = f.clone();
        g[3] = g[3].wrapping_add(1); // claims one byte more than there is
        assert!(matches!(
            decode_frame(&g).unwrap_err(),
            WireError::Truncated { .. }
        ));
        let mut g = f.clone();
        g[3] = g[3].wrapping_sub(1); // claims one byte less: crc over a shorter payload
        assert!(decode_frame(&g).is_err());
    }

    #[test]
    fn truncated_frames_are_caught() {
        let f = encode_frame(&samples()[2], 1);
        for cut in 0..f.len() {
            let err = decode_frame(&f[..cut]).unwrap_err();
            assert!(
                matches!(err, WireError::Truncated { .. }),
                "cut at {cut}: {err:?}"
            );
        }
    }

    #[test]
    fn trailing_bytes_are_caught() {
        let mut f = encode_frame(&samples()[0], 1);
        f.push(0);
        assert_eq!(
            decode_frame(&f).unwrap_err(),
            WireError::TrailingBytes { extra: 1 }
        );
    }

    /// Re-seal a frame's payload with a valid CRC, to test errors past the checksum.
    fn reseal(mut f: Vec<u8>) -> Vec<u8> {
        let crc = crc32fast::hash(&f[8..]);
        f[4..8].copy_from_slice(&crc.to_be_bytes());
        f
    }

    #[test]
    fn unknown_version_is_caught() {
        let mut f = encode_frame(&samples()[0], 1);
        f[8] = PROTOCOL_VERSION_MAX + 1;
        let f = reseal(f);
        assert_eq!(
            decode_frame(&f).unwrap_err(),
            WireError::UnsupportedVersion {
                version: PROTOCOL_VERSION_MAX + 1
            }
        );
        let mut g = encode_frame(&samples()[0], 1);
        g[8] = 0;
        assert!(matches!(
            decode_frame(&reseal(g)).unwrap_err(),
            WireError::UnsupportedVersion { version: 0 }
        ));
    }

    #[test]
    fn unknown_kind_is_caught() {
        let mut f = encode_frame(&samples()[0], 1);
        f[9] = b'Z';
        assert_eq!(
            decode_frame(&reseal(f)).unwrap_err(),
            WireError::UnknownKind { kind: b'Z' }
        );
    }

    #[test]
    fn malformed_body_is_caught() {
        let mut f = encode_frame(&samples()[0], 1);
        f[9] = b'C'; // a begin body under a commit kind byte
        let err = decode_frame(&reseal(f)).unwrap_err();
        assert!(
            matches!(err, WireError::BadBody { kind: "commit", .. }),
            "{err:?}"
        );
        // `false` is not a column value
        let mut g = encode_frame(
            &Message::Insert(Insert {
                relation: 1,
                new: vec![],
            }),
            1,
        );
        g.truncate(HEADER_LEN);
        g.extend_from_slice(br#"{"relation":1,"new":[false]}"#);
        let len = (g.len() - 8) as u32;
        g[0..4].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(
            decode_frame(&reseal(g)).unwrap_err(),
            WireError::BadBody { kind: "insert", .. }
        ));
    }

    #[test]
    fn frames_concatenate() {
        let mut buf = Vec::new();
        for m in samples() {
            encode_frame_into(&m, 1, &mut buf);
        }
        let mut at = 0;
        let mut got = Vec::new();
        while at < buf.len() {
            let (m, v, used) = decode_frame_prefix(&buf[at..]).unwrap();
            assert_eq!(v, 1);
            got.push(m);
            at += used;
        }
        assert_eq!(got, samples());
    }

    #[test]
    fn v2_encodes_hot_messages_in_binary_and_keeps_json_for_the_rest() {
        for m in samples() {
            let (v1, v2) = (encode_frame(&m, 1), encode_frame(&m, 2));
            let body2 = &v2[HEADER_LEN..];
            match m {
                Message::Relation(_) | Message::Truncate(_) | Message::Message(_) => {
                    assert_eq!(&v1[HEADER_LEN..], body2, "{}", m.kind_name())
                }
                _ => {
                    assert_ne!(body2.first(), Some(&b'{'), "{}", m.kind_name());
                    assert!(v2.len() < v1.len(), "{} not smaller", m.kind_name());
                }
            }
            assert_eq!(decode_frame_prefix(&v2).unwrap().1, 2);
        }
    }

    #[test]
    fn a_batch_decodes_to_its_frames_in_order() {
        let msgs = vec![
            Message::Commit(Commit {
                commit_lsn: 1,
                end_lsn: 2,
                commit_time: 3,
            }),
            Message::Commit(Commit {
                commit_lsn: 4,
                end_lsn: 5,
                commit_time: 6,
            }),
        ];
        let mut buf = Vec::new();
        for m in &msgs {
            encode_frame_into(m, BATCH_FROM_VERSION, &mut buf);
        }
        assert_eq!(decode_frames(&buf).unwrap(), msgs);
        // One frame alone is a batch of one; a truncated last frame is an error.
        assert_eq!(
            decode_frames(&encode_frame(&msgs[0], 2)).unwrap(),
            msgs[..1]
        );
        assert!(matches!(
            decode_frames(&buf[..buf.len() - 1]),
            Err(WireError::Truncated { .. })
        ));
        assert!(decode_frames(&[]).is_err());
    }

    fn stream_samples() -> Vec<Message> {
        let mut v = vec![
            Message::StreamStart(StreamStart {
                xid: 700,
                first_segment: true,
            }),
            Message::StreamStart(StreamStart {
                xid: 700,
                first_segment: false,
            }),
            Message::StreamStop,
            Message::StreamAbort(StreamAbort {
                xid: 700,
                subxid: 701,
            }),
            Message::StreamCommit(StreamCommit {
                xid: 700,
                commit_lsn: 10,
                end_lsn: 20,
                commit_time: -30,
                origin: Some(OriginInfo {
                    name: "bdr_1_node2".into(),
                    lsn: 5,
                }),
            }),
            Message::StreamCommit(StreamCommit {
                xid: 700,
                commit_lsn: 10,
                end_lsn: 20,
                commit_time: 30,
                origin: None,
            }),
        ];
        for m in samples() {
            if matches!(m.kind_byte(), b'I' | b'U' | b'D' | b'T' | b'M') {
                v.push(Message::StreamChange(StreamChange {
                    xid: 700,
                    subxid: 702,
                    change: Box::new(m),
                }));
            }
        }
        v
    }

    #[test]
    fn stream_frames_round_trip_from_version_4_only() {
        for m in stream_samples() {
            assert!(m.is_stream());
            let f = encode_frame(&m, STREAM_FROM_VERSION);
            assert_eq!(decode_frame(&f).unwrap(), m, "kind {}", m.kind_name());
            for v in PROTOCOL_VERSION_MIN..STREAM_FROM_VERSION {
                let g = encode_frame(&m, v);
                assert_eq!(
                    decode_frame(&g).unwrap_err(),
                    WireError::UnknownKind {
                        kind: m.kind_byte()
                    },
                    "a {} frame in version {v}",
                    m.kind_name()
                );
            }
            // Every corrupted byte is still caught.
            for i in 4..f.len() {
                let mut g = f.clone();
                g[i] ^= 0x40;
                assert!(decode_frame(&g).is_err());
            }
        }
        // Ordinary frames are unchanged in version 4.
        for m in samples() {
            let (f3, f4) = (encode_frame(&m, 3), encode_frame(&m, 4));
            assert_eq!(f3[HEADER_LEN..], f4[HEADER_LEN..]);
            assert_eq!(decode_frame(&f4).unwrap(), m);
        }
    }

    #[test]
    fn a_stream_change_carries_only_changes() {
        let commit = samples().pop().unwrap();
        let mut f = encode_frame(
            &Message::StreamChange(StreamChange {
                xid: 1,
                subxid: 1,
                change: Box::new(commit),
            }),
            4,
        );
        f = reseal(f);
        let err = decode_frame(&f).unwrap_err();
        assert!(
            matches!(&err, WireError::BadBody { kind: "stream change", reason } if reason.contains("cannot be a streamed change")),
            "{err:?}"
        );
        // A cut-short inner body is a bad body of the stream change.
        let m = stream_samples().pop().unwrap();
        let f = encode_frame(&m, 4);
        let payload = f[8..f.len() - 1].to_vec();
        let mut g = (payload.len() as u32).to_be_bytes().to_vec();
        g.extend_from_slice(&crc32fast::hash(&payload).to_be_bytes());
        g.extend_from_slice(&payload);
        assert!(matches!(
            decode_frame(&g).unwrap_err(),
            WireError::BadBody {
                kind: "stream change",
                ..
            }
        ));
    }

    #[test]
    fn version_negotiation() {
        assert_eq!(negotiate_version(1, 1), Ok(1));
        assert_eq!(negotiate_version(1, 9), Ok(PROTOCOL_VERSION_MAX));
        assert_eq!(negotiate_version(0, 1), Ok(1));
        assert_eq!(negotiate_version(1, 2), Ok(2));
        assert_eq!(negotiate_version(1, 3), Ok(3));
        assert_eq!(negotiate_version(1, 4), Ok(4));
        let err = negotiate_version(5, 6).unwrap_err();
        assert_eq!(
            err.to_string(),
            "protocol version ranges do not overlap: this node speaks 1 to 4, the peer asked for 5 to 6"
        );
        assert!(negotiate_version(1, 0).is_err());
    }

    #[test]
    fn heartbeats_carry_their_horizon() {
        assert_eq!(
            heartbeat_horizon(SYNC_PREFIX, heartbeat_content(42).as_bytes()),
            Some(42)
        );
        assert_eq!(heartbeat_horizon(SYNC_PREFIX, b"heartbeat"), Some(0));
        assert_eq!(heartbeat_horizon(SYNC_PREFIX, b"heartbeat -5"), Some(0));
        assert_eq!(heartbeat_horizon(SYNC_PREFIX, b"join node2"), None);
        assert_eq!(heartbeat_horizon(SYNC_PREFIX, b"heartbeatx"), None);
        assert_eq!(heartbeat_horizon(SYNC_PREFIX, b"heartbeat x"), None);
        assert_eq!(heartbeat_horizon(SYNC_COMMIT_PREFIX, b"heartbeat 1"), None);
    }

    #[test]
    fn only_our_transactional_messages_are_ours() {
        assert!(is_our_message("bdr.sync", true));
        for (prefix, transactional) in [
            ("bdr.sync", false),
            ("bdr", true),
            ("bdr.", true),
            ("bdr.x", true),
            ("bdr.sync.x", true),
            ("BDR.SYNC", true),
            ("other", true),
            ("", true),
        ] {
            assert!(
                !is_our_message(prefix, transactional),
                "{prefix:?} transactional={transactional}"
            );
        }
    }

    #[test]
    fn lsn_text_form() {
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("nonsense"), None);
    }

    fn arb_value() -> impl Strategy<Value = Value> + Clone {
        prop_oneof![
            Just(Value::Null),
            Just(Value::UnchangedToast),
            any::<String>().prop_map(Value::Text),
        ]
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let vals = prop::collection::vec(arb_value(), 0..8);
        prop_oneof![
            (
                any::<u32>(),
                any::<u64>(),
                any::<i64>(),
                any::<Option<(String, u64)>>()
            )
                .prop_map(|(xid, final_lsn, commit_time, o)| Message::Begin(Begin {
                    xid,
                    final_lsn,
                    commit_time,
                    origin: o.map(|(name, lsn)| OriginInfo { name, lsn }),
                })),
            (
                any::<u32>(),
                any::<String>(),
                any::<String>(),
                prop::collection::vec((any::<String>(), any::<String>(), any::<bool>()), 0..6)
            )
                .prop_map(|(id, schema, name, cols)| Message::Relation(Relation {
                    id,
                    schema,
                    name,
                    replica_identity: ReplicaIdentity::Full,
                    columns: cols
                        .into_iter()
                        .map(|(name, type_name, key)| Column {
                            name,
                            type_name,
                            key
                        })
                        .collect(),
                })),
            (any::<u32>(), vals.clone())
                .prop_map(|(relation, new)| Message::Insert(Insert { relation, new })),
            (any::<u32>(), vals.clone(), vals.clone(), any::<bool>()).prop_map(
                |(relation, old, new, has_old)| Message::Update(Update {
                    relation,
                    old: has_old.then_some(OldRow::Key(old)),
                    new,
                })
            ),
            (any::<u32>(), vals).prop_map(|(relation, v)| Message::Delete(Delete {
                relation,
                old: OldRow::Full(v),
            })),
            (
                prop::collection::vec(any::<u32>(), 0..5),
                any::<bool>(),
                any::<bool>()
            )
                .prop_map(|(relations, cascade, restart_identity)| Message::Truncate(
                    Truncate {
                        relations,
                        cascade,
                        restart_identity
                    }
                )),
            (
                any::<bool>(),
                any::<u64>(),
                any::<String>(),
                prop::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(transactional, lsn, prefix, content)| Message::Message(
                    LogicalMessage {
                        transactional,
                        lsn,
                        prefix,
                        content
                    }
                )),
            (any::<u64>(), any::<u64>(), any::<i64>()).prop_map(
                |(commit_lsn, end_lsn, commit_time)| Message::Commit(Commit {
                    commit_lsn,
                    end_lsn,
                    commit_time
                })
            ),
        ]
    }

    /// Write `m` (an INSERT, UPDATE or DELETE, possibly inside a STREAM CHANGE) with
    /// [`ChangeWriter`], as the output plugin does.
    fn write_change(m: &Message, version: u8, out: &mut Vec<u8>) {
        let (stream, m) = match m {
            Message::StreamChange(s) => (Some((s.xid, s.subxid)), &*s.change),
            m => (None, m),
        };
        let put = |w: &mut ChangeWriter, vs: &[Value]| {
            for v in vs {
                match v {
                    Value::Null => w.null(),
                    Value::UnchangedToast => w.unchanged_toast(),
                    Value::Text(t) => w.text(t),
                }
            }
            w.end_values();
        };
        let old = |w: &mut ChangeWriter, o: Option<&OldRow>| match o {
            None => w.no_old_row(),
            Some(OldRow::Key(v)) => {
                w.old_key();
                put(w, v)
            }
            Some(OldRow::Full(v)) => {
                w.old_full();
                put(w, v)
            }
        };
        match m {
            Message::Insert(i) => {
                let mut w = ChangeWriter::begin(out, version, b'I', i.relation, stream);
                w.new_row();
                put(&mut w, &i.new);
                w.finish();
            }
            Message::Update(u) => {
                let mut w = ChangeWriter::begin(out, version, b'U', u.relation, stream);
                old(&mut w, u.old.as_ref());
                w.new_row();
                put(&mut w, &u.new);
                w.finish();
            }
            Message::Delete(d) => {
                let mut w = ChangeWriter::begin(out, version, b'D', d.relation, stream);
                old(&mut w, Some(&d.old));
                w.finish();
            }
            other => panic!("not a row change: {other:?}"),
        }
    }

    #[test]
    fn change_writer_matches_the_message_encoder() {
        let rows: Vec<Message> = samples()
            .into_iter()
            .filter(|m| {
                matches!(
                    m,
                    Message::Insert(_) | Message::Update(_) | Message::Delete(_)
                )
            })
            .collect();
        assert_eq!(rows.len(), 4);
        for m in rows {
            let streamed = Message::StreamChange(StreamChange {
                xid: 7,
                subxid: 9,
                change: Box::new(m.clone()),
            });
            for v in 2..=PROTOCOL_VERSION_MAX {
                let mut ours = b"earlier frames".to_vec();
                write_change(&m, v, &mut ours);
                let mut theirs = b"earlier frames".to_vec();
                encode_frame_into(&m, v, &mut theirs);
                assert_eq!(ours, theirs, "{m:?} in version {v}");
                if v >= STREAM_FROM_VERSION {
                    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
                    write_change(&streamed, v, &mut ours);
                    encode_frame_into(&streamed, v, &mut theirs);
                    assert_eq!(ours, theirs, "{streamed:?} in version {v}");
                    assert_eq!(decode_frame(&ours).unwrap(), streamed);
                }
            }
        }
    }

    #[test]
    fn an_abandoned_change_leaves_the_buffer_as_it_was() {
        let mut out = b"kept".to_vec();
        let mut w = ChangeWriter::begin(&mut out, 4, b'I', 1, None);
        w.new_row();
        w.text("x");
        w.abandon();
        assert_eq!(out, b"kept");
    }

    proptest! {
        #[test]
        fn prop_change_writer_is_byte_identical(
            m in arb_message(), stream in any::<Option<(u32, u32)>>(), v in 2u8..=PROTOCOL_VERSION_MAX
        ) {
            prop_assume!(matches!(m, Message::Insert(_) | Message::Update(_) | Message::Delete(_)));
            let m = match stream {
                Some((xid, subxid)) if v >= STREAM_FROM_VERSION => {
                    Message::StreamChange(StreamChange { xid, subxid, change: Box::new(m) })
                }
                _ => m,
            };
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            write_change(&m, v, &mut ours);
            encode_frame_into(&m, v, &mut theirs);
            prop_assert_eq!(&ours, &theirs);
            prop_assert_eq!(decode_frame(&ours).unwrap(), m);
        }

        #[test]
        fn prop_round_trip(m in arb_message()) {
            for v in PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION_MAX {
                let f = encode_frame(&m, v);
                prop_assert_eq!(decode_frame(&f).unwrap(), m.clone());
            }
        }

        #[test]
        fn prop_v2_body_cut_short_is_a_bad_body(m in arb_message(), cut in any::<prop::sample::Index>()) {
            // A body shortened (with a valid CRC, as a sender bug would produce) is an
            // error, never a different message.
            let f = encode_frame(&m, 2);
            let body_len = f.len() - HEADER_LEN;
            prop_assume!(body_len > 0);
            let keep = cut.index(body_len);
            let payload = f[8..HEADER_LEN + keep].to_vec();
            let mut g = ((payload.len()) as u32).to_be_bytes().to_vec();
            g.extend_from_slice(&crc32fast::hash(&payload).to_be_bytes());
            g.extend_from_slice(&payload);
            prop_assert!(decode_frame(&g).is_err());
        }

        #[test]
        fn prop_bit_flip_never_yields_a_message(m in arb_message(), pos in any::<prop::sample::Index>(), bit in 0u8..8, v in 1u8..=2) {
            let mut f = encode_frame(&m, v);
            let i = pos.index(f.len());
            f[i] ^= 1 << bit;
            prop_assert!(decode_frame(&f).is_err());
        }

        #[test]
        fn prop_garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_frame(&bytes);
        }
    }
}
