//! Shared memory, snowflake sequences (src/sequence.rs): one slot per sequence in use,
//! under its own LWLock so id generation never waits for the worker table.
//!
//! Invariant: a slot's `persisted` is at most the value last written to its sequence by
//! `setval` (it is raised only after `setval` returned), and every id handed out from the
//! slot is at most `persisted`. So any slot that no backend is persisting for can be
//! dropped at any time (LRU eviction when the table is full): it is rebuilt from the
//! sequence's value, above every id it handed out.

use super::lock::ShmemLock;

/// How many sequences can be in use at once before the least recently used is evicted.
pub const MAX_SEQUENCES: usize = 512;
/// How many databases' node numbers are cached.
const MAX_DATABASES: usize = 64;

#[derive(Copy, Clone, Default)]
pub struct SeqSlot {
    /// 0: free.
    pub dboid: u32,
    pub relid: u32,
    pub generator: bdr_core::snowflake::Generator,
    /// The floor known to be in the sequence.
    pub persisted: i64,
    /// Pid of the backend writing a new floor (0: none).
    pub persisting: i32,
    pub last_used: u64,
}

#[derive(Copy, Clone)]
pub struct Sequences {
    pub slots: [SeqSlot; MAX_SEQUENCES],
    pub tick: u64,
    /// (database, node number + 1): 0 means unknown.
    pub node_numbers: [(u32, i32); MAX_DATABASES],
}

impl Default for Sequences {
    fn default() -> Self {
        Sequences {
            slots: [SeqSlot::default(); MAX_SEQUENCES],
            tick: 0,
            node_numbers: [(0, 0); MAX_DATABASES],
        }
    }
}

impl Sequences {
    /// Index of the slot of (`dboid`, `relid`), trying `hint` first.
    pub fn find(&self, dboid: u32, relid: u32, hint: Option<usize>) -> Option<usize> {
        if let Some(i) = hint.filter(|&i| i < MAX_SEQUENCES) {
            let s = &self.slots[i];
            if s.dboid == dboid && s.relid == relid {
                return Some(i);
            }
        }
        self.slots
            .iter()
            .position(|s| s.dboid == dboid && s.relid == relid)
    }

    /// A slot for (`dboid`, `relid`) starting above `floor`: an existing one if another
    /// backend made it meanwhile, else a free one, else the least recently used one that
    /// nobody is persisting for. `None` only if every slot is being persisted right now.
    pub fn insert(&mut self, dboid: u32, relid: u32, floor: i64) -> Option<usize> {
        if let Some(i) = self.find(dboid, relid, None) {
            return Some(i);
        }
        let i = self.slots.iter().position(|s| s.dboid == 0).or_else(|| {
            self.slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.persisting == 0)
                .min_by_key(|(_, s)| s.last_used)
                .map(|(i, _)| i)
        })?;
        self.tick += 1;
        self.slots[i] = SeqSlot {
            dboid,
            relid,
            generator: bdr_core::snowflake::Generator::after_floor(floor),
            persisted: floor.max(0),
            persisting: 0,
            last_used: self.tick,
        };
        Some(i)
    }

    /// The sequence's value changed under a slot (its kind was changed, so it may have been
    /// restarted or moved on by plain `nextval`): the generator stays above both what it
    /// handed out and `floor`, and only `floor` counts as persisted.
    pub fn refresh(&mut self, dboid: u32, relid: u32, floor: i64) {
        if let Some(i) = self.find(dboid, relid, None) {
            let s = &mut self.slots[i];
            s.generator = s
                .generator
                .later(bdr_core::snowflake::Generator::after_floor(floor));
            s.persisted = floor.max(0);
        }
    }

    pub fn node_number(&self, dboid: u32) -> Option<u16> {
        self.node_numbers
            .iter()
            .find(|(d, n)| *d == dboid && *n > 0)
            .map(|(_, n)| (*n - 1) as u16)
    }

    pub fn set_node_number(&mut self, dboid: u32, number: Option<u16>) {
        let v = number.map_or(0, |n| n as i32 + 1);
        if let Some(e) = self.node_numbers.iter_mut().find(|(d, _)| *d == dboid) {
            e.1 = v;
        } else if let Some(e) = self.node_numbers.iter_mut().find(|(d, _)| *d == 0) {
            *e = (dboid, v);
        }
    }
}

// SAFETY: the name is unique to this extension; plain old data with no pointers, valid
// zeroed; every access goes through the LWLock.
pub static SEQUENCES: ShmemLock<Sequences> = unsafe { ShmemLock::new(c"bdr_sequences") };

impl Sequences {
    /// Make a zeroed table equal to `Sequences::default()`, in place (see `lock.rs`).
    ///
    /// # Safety
    /// `s` points to a zeroed `Sequences` no one else uses yet.
    pub(super) unsafe fn init(s: *mut Sequences) {
        // SAFETY: element writes inside the struct `s` points to.
        unsafe {
            let slots = (&raw mut (*s).slots).cast::<SeqSlot>();
            for i in 0..MAX_SEQUENCES {
                slots.add(i).write(SeqSlot::default());
            }
        }
    }
}

/// Run `f` on the sequence table under the exclusive lock (keep it short: no I/O).
pub fn with_sequences<R>(f: impl FnOnce(&mut Sequences) -> R) -> R {
    f(&mut SEQUENCES.exclusive())
}
