//! Bounded waits: the only way tests synchronise with servers and replication.
//!
//! Why: a fixed `sleep` either wastes time or is too short on a loaded machine, and a test
//! that hangs forever says nothing. A poll with a deadline is as fast as the system allows
//! and, when the condition never holds, fails naming what it was waiting for.
//!
//! Invariants:
//! - Every wait has a deadline; on timeout [`wait_until`] panics and [`try_wait_until`]
//!   returns `Err`, both naming `what` and the elapsed time.
//! - The condition is evaluated at least once, even with a zero timeout; a wait never
//!   outlasts its timeout by more than one poll interval plus one evaluation.

use std::time::{Duration, Instant};

/// How often conditions are polled.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Poll `f` every [`POLL_INTERVAL`] until it returns true (`Ok` with the time it took);
/// `Err` naming `what` and the elapsed time once `timeout` has passed.
pub fn try_wait_until(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> bool,
) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        if f() {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return Err(format!(
                "timed out after {:.1?} (limit {:?}) waiting for: {what}",
                start.elapsed(),
                timeout
            ));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Poll `f` until it returns true and return how long that took; panics naming `what` and
/// the elapsed time after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, f: impl FnMut() -> bool) -> Duration {
    try_wait_until(what, timeout, f).unwrap_or_else(|e| panic!("{e}"))
}
