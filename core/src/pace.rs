//! Batched wake-ups for a busy stream (`bdr.stream_batch_wait`).
//!
//! Why (issue 17): a process that keeps up with a stream of small transactions sleeps
//! after each one and is woken for the next: a context switch, and its code run again
//! from cold caches, per transaction. Native logical replication avoids it by running
//! behind. Both ends of a bdr stream instead notice that transactions arrive faster than
//! the setting and then, each time they have caught up, wait that long before looking
//! again, so that one wake-up handles what arrived meanwhile: the walsender decoding the
//! origin's commits, and the apply worker reading them.
//!
//! Invariants:
//! - **Only under sustained load**: batching starts after [`FAST_IN_A_ROW`] arrivals in a
//!   row each within the setting of the one before; one slower arrival (or a
//!   [`Pacer::reset`]) ends it. A light load, or a short burst, is never delayed.
//! - **Bounded delay**: a transaction waits at most the setting longer than it would have.
//! - Off when the setting is 0.

use std::time::Duration;

/// Arrivals in a row, each within the setting of the previous one, before batching.
pub const FAST_IN_A_ROW: u32 = 32;

/// Whether a stream's transactions currently arrive fast enough to batch wake-ups.
#[derive(Debug, Default, Clone)]
pub struct Pacer {
    fast: u32,
}

impl Pacer {
    /// Something arrived `gap` after the previous arrival; `wait` is the setting.
    pub fn arrived(&mut self, gap: Duration, wait: Duration) {
        if !wait.is_zero() && gap < wait {
            self.fast = self.fast.saturating_add(1);
        } else {
            self.fast = 0;
        }
    }

    /// Stop batching until arrivals are fast again (something waits on this process).
    pub fn reset(&mut self) {
        self.fast = 0;
    }

    /// Whether to wait before looking again, once caught up.
    pub fn busy(&self) -> bool {
        self.fast >= FAST_IN_A_ROW
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn batches_only_after_enough_fast_arrivals_in_a_row() {
        let mut p = Pacer::default();
        for _ in 0..FAST_IN_A_ROW - 1 {
            p.arrived(MS / 2, MS);
            assert!(!p.busy());
        }
        p.arrived(MS / 2, MS);
        assert!(p.busy());
        p.arrived(MS / 4, MS);
        assert!(p.busy());
    }

    #[test]
    fn one_slow_arrival_or_a_reset_ends_it() {
        let mut p = Pacer::default();
        for _ in 0..FAST_IN_A_ROW {
            p.arrived(Duration::ZERO, MS);
        }
        assert!(p.busy());
        p.arrived(MS, MS);
        assert!(!p.busy(), "an arrival as slow as the setting ends it");
        for _ in 0..FAST_IN_A_ROW {
            p.arrived(Duration::ZERO, MS);
        }
        p.reset();
        assert!(!p.busy());
        for _ in 0..FAST_IN_A_ROW - 1 {
            p.arrived(Duration::ZERO, MS);
        }
        assert!(!p.busy(), "counting starts afresh after a reset");
    }

    #[test]
    fn off_when_the_setting_is_zero() {
        let mut p = Pacer::default();
        for _ in 0..100 {
            p.arrived(Duration::ZERO, Duration::ZERO);
        }
        assert!(!p.busy());
    }
}
