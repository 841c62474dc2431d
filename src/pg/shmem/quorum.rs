//! Shared memory, quorum half: the supervisor's last `bdr.minimum_nodes` verdict per
//! database, and when each voting peer was last reached (in the worker table, under its
//! lock).

use super::{put, text, ERROR_LEN, NAME_LEN, WORKERS};

/// The supervisor's last verdict on `bdr.minimum_nodes` for database `dboid`.
#[derive(Copy, Clone)]
pub struct Quorum {
    pub dboid: u32,
    pub required: u32,
    pub seen: u32,
    pub ok: bool,
    /// Voting members not reached, comma-separated.
    pub missing: [u8; ERROR_LEN],
    pub since: i64,
}

impl Quorum {
    pub(super) const EMPTY: Quorum = Quorum {
        dboid: 0,
        required: 0,
        seen: 0,
        ok: true,
        missing: [0; ERROR_LEN],
        since: 0,
    };
    pub fn missing(&self) -> String {
        text(&self.missing)
    }
}

/// When a voting peer was last reached by this node's supervisor.
#[derive(Copy, Clone)]
pub struct Seen {
    pub dboid: u32,
    pub peer: [u8; NAME_LEN],
    pub at: i64,
}

/// Record that `peer` of `dboid` was reached at `at`.
pub fn set_seen(dboid: u32, peer: &str, at: i64) {
    let mut w = WORKERS.exclusive();
    let i = w
        .seen
        .iter()
        .position(|s| s.dboid == dboid && text(&s.peer) == peer)
        .or_else(|| w.seen.iter().position(|s| s.dboid == 0));
    if let Some(i) = i {
        let mut s = Seen {
            dboid,
            peer: [0; NAME_LEN],
            at,
        };
        put(&mut s.peer, peer);
        w.seen[i] = s;
    }
}

/// When `peer` of `dboid` was last reached (0: never).
pub fn seen_at(dboid: u32, peer: &str) -> i64 {
    WORKERS
        .share()
        .seen
        .iter()
        .find(|s| s.dboid == dboid && text(&s.peer) == peer)
        .map(|s| s.at)
        .unwrap_or(0)
}

/// Store the quorum verdict for `dboid`; `None` forgets it (no requirement).
pub fn set_quorum(dboid: u32, q: Option<(u32, u32, bool, &str, i64)>) {
    let mut w = WORKERS.exclusive();
    let i = w.quorum.iter().position(|x| x.dboid == dboid);
    match q {
        None => {
            if let Some(i) = i {
                w.quorum[i] = Quorum::EMPTY;
            }
        }
        Some((required, seen, ok, missing, now)) => {
            let Some(i) = i.or_else(|| w.quorum.iter().position(|x| x.dboid == 0)) else {
                return;
            };
            let changed = w.quorum[i].dboid != dboid || w.quorum[i].ok != ok;
            let mut x = w.quorum[i];
            x.dboid = dboid;
            x.required = required;
            x.seen = seen;
            x.ok = ok;
            put(&mut x.missing, missing);
            if changed {
                x.since = now;
            }
            w.quorum[i] = x;
        }
    }
}

/// The quorum verdict for `dboid`, if any.
pub fn quorum(dboid: u32) -> Option<Quorum> {
    WORKERS
        .share()
        .quorum
        .iter()
        .find(|x| x.dboid == dboid)
        .copied()
}
