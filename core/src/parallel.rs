//! Parallel apply, the pure half: the control messages the receiver sends its writers
//! over their shared-memory queues, the key hashes of a change, and the dependency
//! tracker that decides which earlier transaction a change must wait for.
//!
//! Why this way: the receiver forwards each frame's raw bytes (self-contained,
//! `wire::decode_frame`) and only adds two tiny controls, so a writer runs the very same
//! apply code as the one-process path. Controls travel in batches (one queue message per
//! small transaction, [`Ctl::push_to_batch`] / [`batch`]): one queue message and at most
//! one wake-up per transaction instead of one per frame. The dependency rule is kept here, without a server,
//! so it can be tested over every case.
//!
//! Invariants: a change's keys are hashed from the relation and the text of the key
//! columns (replica identity and every local unique index), old and new tuple; a change
//! whose keys cannot all be known (a NULL-free value is missing, unchanged TOAST) depends
//! on every earlier change of its table, and a change of a table marked serial depends on
//! every earlier transaction. A transaction never waits for a later one.

use crate::wire::{OldRow, Value};
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// What the receiver tells a writer, besides the frames themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ctl<'a> {
    /// The next frame is the BEGIN of transaction `seq` (1, 2, ... in origin commit order).
    Begin { seq: u64 },
    /// Wait until transaction `seq` has committed before the next frame.
    Wait { seq: u64 },
    /// One wire frame, as received from the peer.
    Frame(&'a [u8]),
}

const TAG_BEGIN: u8 = b'B';
const TAG_WAIT: u8 = b'W';
const TAG_FRAME: u8 = b'F';

impl Ctl<'_> {
    /// Encode into `out` (cleared first).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.clear();
        self.append(out);
    }

    /// Append the encoding (tag, then the sequence number or the frame's bytes) to `out`.
    fn append(&self, out: &mut Vec<u8>) {
        match self {
            Ctl::Begin { seq } => {
                out.push(TAG_BEGIN);
                out.extend_from_slice(&seq.to_le_bytes());
            }
            Ctl::Wait { seq } => {
                out.push(TAG_WAIT);
                out.extend_from_slice(&seq.to_le_bytes());
            }
            Ctl::Frame(f) => {
                out.push(TAG_FRAME);
                out.extend_from_slice(f);
            }
        }
    }

    /// Append to `out` as one entry of a batch (a queue message carries a batch: each
    /// entry a little-endian `u32` length, then the encoded control).
    pub fn push_to_batch(&self, out: &mut Vec<u8>) {
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        self.append(out);
        let len = (out.len() - at - 4) as u32;
        out[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// Decode a message from the queue; `None` if malformed.
    pub fn decode(buf: &[u8]) -> Option<Ctl<'_>> {
        let (&tag, rest) = buf.split_first()?;
        let seq = || rest.try_into().ok().map(u64::from_le_bytes);
        match tag {
            TAG_BEGIN => Some(Ctl::Begin { seq: seq()? }),
            TAG_WAIT => Some(Ctl::Wait { seq: seq()? }),
            TAG_FRAME => Some(Ctl::Frame(rest)),
            _ => None,
        }
    }
}

/// The controls of one batch (see [`Ctl::push_to_batch`]), in order; an entry that is
/// cut short or malformed yields `None` (and ends the batch).
pub fn batch(buf: &[u8]) -> Batch<'_> {
    Batch { rest: buf }
}

/// Iterator over a batch's controls ([`batch`]).
pub struct Batch<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Batch<'a> {
    type Item = Option<Ctl<'a>>;

    fn next(&mut self) -> Option<Option<Ctl<'a>>> {
        if self.rest.is_empty() {
            return None;
        }
        let entry = self
            .rest
            .get(..4)
            .map(|l| u32::from_le_bytes(l.try_into().unwrap()) as usize)
            .and_then(|len| self.rest.get(4..4 + len).map(|e| (e, 4 + len)));
        match entry {
            Some((e, used)) => {
                self.rest = &self.rest[used..];
                let c = Ctl::decode(e);
                if c.is_none() {
                    self.rest = &[];
                }
                Some(c)
            }
            None => {
                self.rest = &[];
                Some(None)
            }
        }
    }
}

/// How the receiver treats changes of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TablePlan {
    /// One change at a time: foreign keys (either side), user triggers, expression unique
    /// indexes, no usable key, or a table missing here.
    Serial,
    /// Keyed: each set of column positions (into the peer relation's columns) is a key
    /// (replica identity, then each unique index). `identity_only`: the first set is the
    /// only key, so an UPDATE or DELETE whose old tuple carries just the identity still
    /// knows every key it frees.
    Keyed {
        keys: Vec<Vec<usize>>,
        identity_only: bool,
    },
}

/// One row change, as the dependency rule sees it.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    Insert(&'a [Value]),
    Update(Option<&'a OldRow>, &'a [Value]),
    Delete(&'a OldRow),
}

/// Key hashes of one change of a keyed table (`keys`: column positions of each key, the
/// replica identity first), or `None` when they cannot all be known: an UPDATE or DELETE
/// that frees unique values the old tuple does not carry, or an unchanged TOAST value in
/// a key. Such a change depends on every earlier change of its table.
pub fn change_keys(
    relation: u32,
    keys: &[Vec<usize>],
    identity_only: bool,
    change: Change<'_>,
) -> Option<Vec<u64>> {
    let mut out = Vec::new();
    fn hash_sets<'v>(
        relation: u32,
        out: &mut Vec<u64>,
        values: &dyn Fn(usize) -> Option<&'v Value>,
        sets: &[Vec<usize>],
    ) -> bool {
        for (i, cols) in sets.iter().enumerate() {
            let mut h = DefaultHasher::new();
            relation.hash(&mut h);
            i.hash(&mut h);
            let mut has_null = false;
            for &c in cols {
                match values(c) {
                    Some(Value::Text(t)) => t.hash(&mut h),
                    Some(Value::Null) => has_null = true,
                    // Unchanged TOAST, or not sent: unknown.
                    _ => return false,
                }
            }
            // NULLs never collide in a unique index.
            if !has_null {
                out.push(h.finish());
            }
        }
        true
    }
    let identity = keys.first().map(|k| &k[..]).unwrap_or(&[]);
    let new = match change {
        Change::Insert(n) | Change::Update(_, n) => Some(n),
        Change::Delete(_) => None,
    };
    let old = match change {
        Change::Insert(_) => None,
        Change::Update(o, _) => Some(o),
        Change::Delete(o) => Some(Some(o)),
    };
    if let Some(n) = new {
        if !hash_sets(relation, &mut out, &|c| n.get(c), keys) {
            return None;
        }
    }
    let known = match old {
        None => true,
        Some(Some(OldRow::Full(v))) => hash_sets(relation, &mut out, &|c| v.get(c), keys),
        // Identity unchanged (in the new tuple); other unique values freed are unknown.
        Some(None) => identity_only,
        Some(Some(OldRow::Key(v))) => {
            let at = |c: usize| identity.iter().position(|&k| k == c).and_then(|i| v.get(i));
            identity_only && hash_sets(relation, &mut out, &at, &keys[..1])
        }
    };
    known.then_some(out)
}

/// Which earlier transactions a transaction's changes depend on (the receiver's half of
/// parallel apply). Transactions are numbered 1, 2, ... in origin commit order.
#[derive(Debug, Default)]
pub struct Deps {
    /// Key hash -> last transaction that touched it.
    keys: HashMap<u64, u64>,
    /// Table -> last transaction that changed it / changed it with unknown keys.
    table_any: HashMap<u32, u64>,
    table_excl: HashMap<u32, u64>,
    /// Last transaction that must run alone (DDL, TRUNCATE, a serial table).
    barrier: u64,
    /// Keys recorded for the current transaction (see [`KEYS_PER_TRANSACTION`]).
    current_keys: usize,
}

/// Most keys recorded for one transaction: past this, its further changes count as
/// touching their whole table (later transactions on that table wait for it), so a
/// million-row transaction does not make the receiver hold a million keys.
pub const KEYS_PER_TRANSACTION: usize = 10_000;

impl Deps {
    /// Transaction `seq` begins: the barrier it must wait for (0: none).
    pub fn begin(&mut self, _seq: u64) -> u64 {
        self.current_keys = 0;
        self.barrier
    }

    /// Transaction `seq` does something that must run alone: it waits for `seq - 1`
    /// (so for every earlier one) and every later transaction waits for it.
    pub fn serial(&mut self, seq: u64) -> u64 {
        self.barrier = seq;
        seq - 1
    }

    /// A change of `table` by transaction `seq` with key hashes `keys` (`None`: unknown):
    /// the latest earlier transaction it depends on (0: none).
    pub fn change(&mut self, seq: u64, table: u32, keys: Option<&[u64]>) -> u64 {
        let before = |v: Option<&u64>| v.copied().filter(|&s| s < seq).unwrap_or(0);
        let mut dep = before(self.table_excl.get(&table));
        let keys = keys.filter(|k| self.current_keys + k.len() <= KEYS_PER_TRANSACTION);
        match keys {
            Some(keys) => {
                self.current_keys += keys.len();
                for k in keys {
                    dep = dep.max(before(self.keys.get(k)));
                    self.keys.insert(*k, seq);
                }
            }
            None => {
                dep = dep.max(before(self.table_any.get(&table)));
                self.table_excl.insert(table, seq);
            }
        }
        self.table_any.insert(table, seq);
        dep
    }

    /// Forget what transactions up to `committed` touched (they can no longer be waited for).
    pub fn prune(&mut self, committed: u64) {
        self.keys.retain(|_, s| *s > committed);
        self.table_any.retain(|_, s| *s > committed);
        self.table_excl.retain(|_, s| *s > committed);
    }

    /// Entries held (to decide when to prune).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Value {
        Value::text(s)
    }

    #[test]
    fn ctl_round_trips() {
        let mut buf = Vec::new();
        for c in [
            Ctl::Begin { seq: 7 },
            Ctl::Wait { seq: u64::MAX },
            Ctl::Frame(b"abc"),
            Ctl::Frame(b""),
        ] {
            c.encode_into(&mut buf);
            assert_eq!(Ctl::decode(&buf), Some(c.clone()));
        }
        assert_eq!(Ctl::decode(b""), None);
        assert_eq!(Ctl::decode(b"B123"), None);
        assert_eq!(Ctl::decode(b"X"), None);
    }

    #[test]
    fn batches_round_trip_and_stop_at_damage() {
        let ctls = [
            Ctl::Begin { seq: 7 },
            Ctl::Frame(b"abc"),
            Ctl::Wait { seq: 3 },
            Ctl::Frame(b""),
        ];
        let mut buf = Vec::new();
        for c in &ctls {
            c.push_to_batch(&mut buf);
        }
        let got: Vec<_> = batch(&buf).collect();
        assert_eq!(got, ctls.iter().cloned().map(Some).collect::<Vec<_>>());
        assert_eq!(batch(b"").count(), 0);
        // Cut short: the whole entries first, then one `None`, then the end.
        let got: Vec<_> = batch(&buf[..buf.len() - 2]).collect();
        assert_eq!(got.len(), 4);
        assert_eq!(got[3], None);
        // A length past the end, or a bad control.
        assert_eq!(batch(&[9, 0, 0, 0, b'F']).collect::<Vec<_>>(), vec![None]);
        assert_eq!(
            batch(&[1, 0, 0, 0, b'X', 1]).collect::<Vec<_>>(),
            vec![None]
        );
    }

    #[test]
    fn same_key_same_hash_across_kinds() {
        let keys = vec![vec![0]];
        let ins = change_keys(1, &keys, true, Change::Insert(&[t("1"), t("a")])).unwrap();
        let old = OldRow::Key(vec![t("1")]);
        let del = change_keys(1, &keys, true, Change::Delete(&old)).unwrap();
        let upd = change_keys(1, &keys, true, Change::Update(None, &[t("1"), t("b")])).unwrap();
        assert_eq!(ins, del);
        assert_eq!(ins, upd);
        let other = change_keys(1, &keys, true, Change::Insert(&[t("2"), t("a")])).unwrap();
        assert_ne!(ins, other);
        let other_rel = change_keys(2, &keys, true, Change::Insert(&[t("1"), t("a")])).unwrap();
        assert_ne!(ins, other_rel);
    }

    #[test]
    fn key_change_hashes_old_and_new() {
        let keys = vec![vec![0]];
        let old = OldRow::Key(vec![t("1")]);
        let upd = change_keys(
            1,
            &keys,
            true,
            Change::Update(Some(&old), &[t("2"), t("x")]),
        );
        assert_eq!(upd.unwrap().len(), 2);
    }

    #[test]
    fn unknown_keys() {
        // A second unique index: an UPDATE/DELETE without the full old tuple is unknown.
        let keys = vec![vec![0], vec![1]];
        let old = OldRow::Key(vec![t("1")]);
        assert!(change_keys(1, &keys, false, Change::Delete(&old)).is_none());
        assert!(change_keys(1, &keys, false, Change::Update(None, &[t("1"), t("b")])).is_none());
        let full = OldRow::Full(vec![t("1"), t("a")]);
        assert_eq!(
            change_keys(1, &keys, false, Change::Delete(&full))
                .unwrap()
                .len(),
            2
        );
        // An insert knows every value.
        assert_eq!(
            change_keys(1, &keys, false, Change::Insert(&[t("1"), t("a")]))
                .unwrap()
                .len(),
            2
        );
        // Unchanged TOAST in a key column.
        let keys = vec![vec![0]];
        assert!(change_keys(1, &keys, true, Change::Insert(&[Value::UnchangedToast])).is_none());
        // NULL in a unique column: no key for that index.
        let keys = vec![vec![0], vec![1]];
        assert_eq!(
            change_keys(1, &keys, false, Change::Insert(&[t("1"), Value::Null]))
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn deps_follow_keys_tables_and_barriers() {
        let mut d = Deps::default();
        assert_eq!(d.begin(1), 0);
        assert_eq!(d.change(1, 10, Some(&[100])), 0);
        assert_eq!(d.change(1, 10, Some(&[100])), 0, "own earlier change");
        assert_eq!(d.change(2, 10, Some(&[200])), 0, "independent");
        assert_eq!(d.change(3, 10, Some(&[100])), 1, "same key");
        assert_eq!(d.change(4, 10, None), 3, "unknown keys wait for the table");
        assert_eq!(
            d.change(5, 10, Some(&[300])),
            4,
            "after an unknown-key change"
        );
        assert_eq!(d.change(5, 11, Some(&[400])), 0, "other table, other key");
        assert_eq!(d.serial(6), 5);
        assert_eq!(d.begin(7), 6);
        d.prune(6);
        assert!(d.is_empty());
        assert_eq!(d.change(7, 10, Some(&[100])), 0);
    }

    #[test]
    fn a_huge_transaction_holds_bounded_keys_and_takes_its_table() {
        let mut d = Deps::default();
        d.begin(1);
        for k in 0..(KEYS_PER_TRANSACTION as u64 * 3) {
            assert_eq!(d.change(1, 10, Some(&[k])), 0);
        }
        assert_eq!(d.len(), KEYS_PER_TRANSACTION);
        d.begin(2);
        // A key it never recorded still waits: the table is taken.
        assert_eq!(d.change(2, 10, Some(&[u64::MAX])), 1);
        assert_eq!(d.change(2, 11, Some(&[u64::MAX - 1])), 0);
    }
}
