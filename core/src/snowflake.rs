//! Conflict-free keys: the snowflake id layout, the per-sequence generator that never goes
//! back, the floor persisted ahead of use, and the start value of an `offset` sequence.
//!
//! Why: two nodes of a group insert at once, and a key made on one must never equal a key
//! made on another. A snowflake id puts the node number inside the value:
//!
//! ```text
//!  bit 63     62 ........ 22   21 ..... 12   11 ...... 0
//!  [ 0 ][ milliseconds since  ][ node number ][ counter in ]
//!       [ 2024-01-01 (41 bits)][  (10 bits)  ][ the ms (12)]
//! ```
//!
//! 41 bits of milliseconds last until 2093; 10 bits give 1024 node numbers; 12 bits give
//! 4096 ids per millisecond per sequence per node.
//!
//! Invariants (each unit-tested below):
//! - ids of one [`Generator`] are strictly increasing, whatever the clock does: a clock
//!   that stands still counts within the millisecond, one that went back keeps counting
//!   from the last id (the time part then runs ahead of the clock, 1 ms per 4096 ids);
//! - a full millisecond (4096 ids) with a clock that is current waits for the next
//!   millisecond ([`Step::Wait`]) instead of reusing a counter value;
//! - after a restart, a generator started from a persisted floor ([`Generator::after_floor`])
//!   issues only ids greater than that floor, and an id is only issued once a floor at
//!   least as large is persisted ([`plan_persist`]), so no id is issued twice on a node;
//! - ids of different node numbers never collide (the node bits differ).

/// Unix time (ms) of the snowflake epoch, 2024-01-01T00:00:00Z.
pub const EPOCH_UNIX_MS: u64 = 1_704_067_200_000;
/// Bits of the node number.
pub const NODE_BITS: u32 = 10;
/// Bits of the per-millisecond counter.
pub const COUNTER_BITS: u32 = 12;
/// Bits of the time part (the sign bit stays 0).
pub const TIME_BITS: u32 = 63 - NODE_BITS - COUNTER_BITS;
/// Largest node number (1023): a group has at most 1024 node numbers.
pub const MAX_NODE_NUMBER: u16 = (1 << NODE_BITS) - 1;
/// Largest counter value within one millisecond (4095).
pub const MAX_COUNTER: u16 = (1 << COUNTER_BITS) - 1;
/// Largest time part (milliseconds since the epoch).
pub const MAX_MS: u64 = (1 << TIME_BITS) - 1;
/// How far ahead of the ids in use the persisted floor is set (milliseconds of id time).
pub const FLOOR_AHEAD_MS: u64 = 1000;
/// When less than this much id time is left below the floor, it is moved up (by the
/// caller that noticed, after handing out its id: nobody waits for it).
pub const FLOOR_REFRESH_MS: u64 = FLOOR_AHEAD_MS / 2;
/// Increment of an `offset` sequence: one residue per possible node number.
pub const OFFSET_INCREMENT: i64 = 1 << NODE_BITS;

/// The three parts of an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parts {
    /// Milliseconds since [`EPOCH_UNIX_MS`].
    pub ms: u64,
    pub node: u16,
    pub counter: u16,
}

/// The id made of `ms` (since the epoch, masked to 41 bits), `node` and `counter` (each
/// masked to its width).
pub fn compose(ms: u64, node: u16, counter: u16) -> i64 {
    (((ms & MAX_MS) << (NODE_BITS + COUNTER_BITS))
        | (((node & MAX_NODE_NUMBER) as u64) << COUNTER_BITS)
        | (counter & MAX_COUNTER) as u64) as i64
}

/// The parts of `id` (a negative id, never made here, reads as its low 63 bits).
pub fn parts(id: i64) -> Parts {
    let v = (id as u64) & (u64::MAX >> 1);
    Parts {
        ms: v >> (NODE_BITS + COUNTER_BITS),
        node: ((v >> COUNTER_BITS) & MAX_NODE_NUMBER as u64) as u16,
        counter: (v & MAX_COUNTER as u64) as u16,
    }
}

/// Milliseconds since the snowflake epoch of a Unix time in ms (0 before the epoch).
pub fn ms_since_epoch(unix_ms: u64) -> u64 {
    unix_ms.saturating_sub(EPOCH_UNIX_MS).min(MAX_MS)
}

/// The largest id any node can make in millisecond `ms`: a floor that covers the whole
/// millisecond.
pub fn floor_of_ms(ms: u64) -> i64 {
    compose(ms, MAX_NODE_NUMBER, MAX_COUNTER)
}

/// The per-sequence state: the last (millisecond, counter) handed out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Generator {
    pub last_ms: u64,
    pub counter: u16,
    /// Whether anything was handed out (or a floor adopted) yet.
    pub started: bool,
}

/// What to do for the next id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Hand out `id`; the generator becomes `next`.
    Issue { id: i64, next: Generator },
    /// 4096 ids were made in the current millisecond: wait for the clock's next one.
    Wait,
}

impl Generator {
    /// A generator that will only make ids greater than `floor` (a value persisted before
    /// a restart, or a sequence's plain value).
    pub fn after_floor(floor: i64) -> Generator {
        if floor <= 0 {
            return Generator::default();
        }
        let p = parts(floor);
        // Treat the floor's whole millisecond as used up: the next id is in a later
        // millisecond, so it is above the floor whatever the node and counter bits.
        Generator {
            last_ms: p.ms,
            counter: MAX_COUNTER,
            started: true,
        }
    }

    /// The later of two states: a generator that must stay above both.
    pub fn later(self, other: Generator) -> Generator {
        match (self.started, other.started) {
            (false, _) => other,
            (_, false) => self,
            _ if (other.last_ms, other.counter) > (self.last_ms, self.counter) => other,
            _ => self,
        }
    }

    /// The next id for node `node` at clock reading `now_ms` (ms since the epoch).
    pub fn next(&self, now_ms: u64, node: u16) -> Step {
        let issue = |ms: u64, counter: u16| Step::Issue {
            id: compose(ms, node, counter),
            next: Generator {
                last_ms: ms,
                counter,
                started: true,
            },
        };
        if !self.started || now_ms > self.last_ms {
            return issue(now_ms, 0);
        }
        if self.counter < MAX_COUNTER {
            return issue(self.last_ms, self.counter + 1);
        }
        if now_ms == self.last_ms {
            // The clock is current and this millisecond is used up: its next one is at
            // most a millisecond away.
            return Step::Wait;
        }
        // The clock is behind the last id (it was stepped back, or ids ran ahead of it):
        // waiting could take as long as the step, so continue in the next millisecond of
        // id time instead. Ids stay increasing; their time part runs ahead of the clock.
        issue(self.last_ms + 1, 0)
    }
}

/// Whether the floor persisted in the sequence must move before or after handing out `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persist {
    /// The floor covers `id` with time to spare.
    Nothing,
    /// `id` is above the floor: persist `floor` first, then hand out `id`.
    Before(i64),
    /// `id` is covered, but the floor is close: persist `floor` after handing out `id`.
    After(i64),
}

/// Decide about the floor for handing out `id` when `persisted` is in the sequence and
/// `busy` says another backend is moving it already.
pub fn plan_persist(id: i64, persisted: i64, busy: bool) -> Persist {
    let ms = parts(id).ms;
    let floor = floor_of_ms((ms + FLOOR_AHEAD_MS).min(MAX_MS));
    if id > persisted {
        return Persist::Before(floor);
    }
    if !busy && parts(persisted).ms < ms + FLOOR_REFRESH_MS {
        return Persist::After(floor);
    }
    Persist::Nothing
}

/// First value of an `offset` sequence on node `node`: the smallest value above
/// `current_max` (the sequence's last value or the largest key already in the table,
/// whichever is larger) that is `node + 1` modulo [`OFFSET_INCREMENT`]. Every node's
/// values then fall in its own residue class, so none collides with another node's.
pub fn offset_start(current_max: i64, node: u16) -> Option<i64> {
    let base = node as i64 + 1;
    if current_max < base {
        return Some(base);
    }
    let steps = (current_max - base) / OFFSET_INCREMENT + 1;
    steps.checked_mul(OFFSET_INCREMENT)?.checked_add(base)
}

/// Whether `v` was made by an `offset` sequence of node `node`.
pub fn offset_belongs_to(v: i64, node: u16) -> bool {
    v > 0 && (v - 1).rem_euclid(OFFSET_INCREMENT) == node as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_layout() {
        assert_eq!(TIME_BITS, 41);
        assert_eq!(compose(0, 0, 0), 0);
        assert_eq!(compose(0, 0, 1), 1);
        assert_eq!(compose(0, 1, 0), 1 << 12);
        assert_eq!(compose(1, 0, 0), 1 << 22);
        assert_eq!(compose(0, 1023, 4095), (1 << 22) - 1);
        let id = compose(123_456_789, 517, 4000);
        assert_eq!(
            parts(id),
            Parts {
                ms: 123_456_789,
                node: 517,
                counter: 4000
            }
        );
        // Widths are enforced: nothing spills into a neighbour's bits.
        assert_eq!(
            parts(compose(5, 1024 + 3, 4096 + 7)),
            parts(compose(5, 3, 7))
        );
        // The largest time stays positive.
        assert!(compose(MAX_MS, MAX_NODE_NUMBER, MAX_COUNTER) > 0);
        assert_eq!(compose(MAX_MS, MAX_NODE_NUMBER, MAX_COUNTER), i64::MAX);
        // 41 bits of ms from 2024 last past 2093.
        let years = MAX_MS as f64 / 1000.0 / 86400.0 / 365.25;
        assert!(years > 69.0, "{years}");
    }

    #[test]
    fn epoch() {
        assert_eq!(ms_since_epoch(EPOCH_UNIX_MS), 0);
        assert_eq!(ms_since_epoch(EPOCH_UNIX_MS - 5), 0);
        assert_eq!(ms_since_epoch(EPOCH_UNIX_MS + 42), 42);
    }

    #[test]
    fn ids_of_different_nodes_never_collide() {
        for ms in [0u64, 1, 999_999] {
            for c in [0u16, 1, 4095] {
                assert_ne!(compose(ms, 1, c), compose(ms, 2, c));
            }
        }
    }

    #[test]
    fn first_id_uses_the_clock() {
        let g = Generator::default();
        match g.next(1000, 7) {
            Step::Issue { id, next } => {
                assert_eq!(id, compose(1000, 7, 0));
                assert_eq!((next.last_ms, next.counter), (1000, 0));
            }
            Step::Wait => panic!("waited"),
        }
    }

    fn issue(g: &mut Generator, now: u64, node: u16) -> Option<i64> {
        match g.next(now, node) {
            Step::Issue { id, next } => {
                *g = next;
                Some(id)
            }
            Step::Wait => None,
        }
    }

    #[test]
    fn counter_counts_within_a_millisecond_then_waits_for_the_next() {
        let mut g = Generator::default();
        let mut ids = Vec::new();
        for _ in 0..4096 {
            ids.push(issue(&mut g, 50, 3).expect("room in the millisecond"));
        }
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(parts(*ids.last().unwrap()).counter, 4095);
        // The 4097th id in the same millisecond: wait, however often asked.
        assert_eq!(g.next(50, 3), Step::Wait);
        assert_eq!(g.next(50, 3), Step::Wait);
        // The next millisecond starts a new counter.
        let id = issue(&mut g, 51, 3).unwrap();
        assert_eq!(id, compose(51, 3, 0));
        assert!(id > *ids.last().unwrap());
    }

    #[test]
    fn clock_going_backwards_never_reissues() {
        let mut g = Generator::default();
        let mut seen = std::collections::BTreeSet::new();
        let mut last = 0;
        // Forward, then one hour back, then forward again past the old time, with enough
        // ids per millisecond to overflow counters while the clock is behind.
        let clock: Vec<u64> = (0..20)
            .map(|i| 10_000_000 + i)
            .chain((0..20).map(|i| 10_000_000 - 3_600_000 + i / 5))
            .chain((0..20).map(|i| 10_000_010 + i))
            .collect();
        for now in clock {
            for _ in 0..5000 {
                if let Some(id) = issue(&mut g, now, 9) {
                    assert!(id > last, "{id} after {last} at clock {now}");
                    assert!(seen.insert(id));
                    last = id;
                } else {
                    assert!(now >= g.last_ms, "waited while the clock was behind");
                    break;
                }
            }
        }
    }

    #[test]
    fn clock_behind_after_a_full_millisecond_moves_on_without_waiting() {
        let g = Generator {
            last_ms: 100,
            counter: MAX_COUNTER,
            started: true,
        };
        assert_eq!(
            g.next(40, 1),
            Step::Issue {
                id: compose(101, 1, 0),
                next: Generator {
                    last_ms: 101,
                    counter: 0,
                    started: true
                }
            }
        );
    }

    #[test]
    fn restart_from_a_floor_issues_only_above_it() {
        for floor in [
            floor_of_ms(5000),
            compose(5000, 0, 0),
            compose(5000, 1023, 17),
            42,
        ] {
            let mut g = Generator::after_floor(floor);
            // Clock well behind, at the floor, and ahead.
            for now in [0u64, 4000, 5000, 5001, 9000] {
                let mut h = g;
                // A clock reading the floor's own (full) millisecond waits for the next.
                let id = issue(&mut h, now, 3)
                    .or_else(|| issue(&mut h, now + 1, 3))
                    .unwrap();
                assert!(id > floor, "{id} <= floor {floor} at clock {now}");
            }
            if let Some(id) = issue(&mut g, 0, 1023) {
                assert!(id > floor);
            }
        }
        assert_eq!(Generator::after_floor(0), Generator::default());
        assert_eq!(Generator::after_floor(-5), Generator::default());
    }

    #[test]
    fn later_keeps_the_larger_state() {
        let a = Generator {
            last_ms: 10,
            counter: 5,
            started: true,
        };
        let b = Generator::after_floor(compose(9, 1023, 4095));
        assert_eq!(a.later(b), a);
        assert_eq!(b.later(a), a);
        let c = Generator::after_floor(floor_of_ms(10));
        assert_eq!(a.later(c), c);
        assert_eq!(Generator::default().later(a), a);
        assert_eq!(a.later(Generator::default()), a);
    }

    #[test]
    fn floor_is_persisted_before_an_id_above_it_and_refreshed_ahead() {
        let id = compose(10_000, 4, 0);
        // Nothing persisted yet: persist first, a second ahead.
        assert_eq!(
            plan_persist(id, 0, false),
            Persist::Before(floor_of_ms(11_000))
        );
        assert_eq!(
            plan_persist(id, 0, true),
            Persist::Before(floor_of_ms(11_000))
        );
        // Plenty of room: nothing.
        assert_eq!(
            plan_persist(id, floor_of_ms(10_900), false),
            Persist::Nothing
        );
        // Less than half the window left: refresh after.
        assert_eq!(
            plan_persist(id, floor_of_ms(10_400), false),
            Persist::After(floor_of_ms(11_000))
        );
        // ... unless someone is already at it.
        assert_eq!(
            plan_persist(id, floor_of_ms(10_400), true),
            Persist::Nothing
        );
        // The last id of the floor's own millisecond is covered.
        assert_eq!(
            plan_persist(floor_of_ms(10_000), floor_of_ms(10_000), true),
            Persist::Nothing
        );
    }

    #[test]
    fn a_restart_never_reissues_with_persisted_floors() {
        // Simulate: issue ids persisting floors as planned; "crash" at many points; the
        // generator restarted from the last persisted floor (with the clock an hour back)
        // issues only ids above everything issued before.
        let mut g = Generator::default();
        let mut persisted = 0i64;
        let mut issued = Vec::new();
        let mut now = 10_000_000u64;
        for step in 0..30_000u64 {
            if step % 7 == 0 {
                now += 1;
            }
            let Step::Issue { id, next } = g.next(now, 5) else {
                now += 1;
                continue;
            };
            match plan_persist(id, persisted, false) {
                Persist::Before(f) => persisted = f,
                Persist::After(f) => {
                    g = next;
                    issued.push(id);
                    persisted = f;
                    continue;
                }
                Persist::Nothing => {}
            }
            assert!(id <= persisted);
            g = next;
            issued.push(id);
        }
        let max = *issued.iter().max().unwrap();
        let r = Generator::after_floor(persisted);
        let Step::Issue { id, .. } = r.next(now - 3_600_000, 5) else {
            panic!("a clock behind the floor must not wait")
        };
        assert!(id > max);
    }

    #[test]
    fn offset_values_are_disjoint_between_nodes() {
        assert_eq!(offset_start(0, 0), Some(1));
        assert_eq!(offset_start(0, 2), Some(3));
        assert_eq!(offset_start(1, 0), Some(1025));
        assert_eq!(offset_start(3, 2), Some(1027));
        assert_eq!(offset_start(2, 2), Some(3));
        assert_eq!(offset_start(1026, 1), Some(2050));
        assert_eq!(offset_start(i64::MAX - 10, 5), None);
        for node in [0u16, 1, 2, 1023] {
            for cur in [0i64, 1, 5, 1024, 1025, 99_999] {
                let s = offset_start(cur, node).unwrap();
                assert!(s > cur || (cur < node as i64 + 1 && s == node as i64 + 1));
                assert!(s - OFFSET_INCREMENT <= cur.max(0) || s == node as i64 + 1);
                assert!(offset_belongs_to(s, node));
                assert!(offset_belongs_to(s + 7 * OFFSET_INCREMENT, node));
                assert!(!offset_belongs_to(s, (node + 1) % 1024));
            }
        }
    }
}
