//! Synchronous commit for critical data: `bdr.synchronous_commit_peers = N` makes a
//! COMMIT return only after N peers have applied *and flushed* the transaction.
//!
//! How: at `PRE_COMMIT` a transaction that wrote something gets a marker message
//! ([`bdr_core::wire::SYNC_COMMIT_PREFIX`]) so the peers' apply workers flush their copy
//! of the commit and report it at once; after the commit record is flushed here, the
//! committing backend waits until N of this database's bdr slots report a
//! `confirmed_flush` at or past the end of its commit record (see
//! [`bdr_core::sync_commit`]). That position is only ever reported by a peer's apply
//! worker once its own commit of the transaction is on its disk, so a transaction whose
//! COMMIT returned without a WARNING survives the loss of this node (SIGKILL, power cut)
//! on N peers.
//!
//! Why not PostgreSQL's own synchronous replication alone: `synchronous_standby_names`
//! is server-wide (reload only), while critical data is usually a few transactions of an
//! application; this setting is per session or per transaction (`SET LOCAL`). Both can be
//! used together: PostgreSQL's wait (for the standbys or apply connections named in
//! `synchronous_standby_names`) happens inside the commit, this one right after it
//! (docs/settings.md).
//!
//! `bdr.wait_slot_confirm_lsn` (PGD's and pglogical's name) is the same wait on demand,
//! outside any commit: until every bdr slot of the database (or one named slot) has a
//! `confirmed_flush` at or past an LSN. It may fail like any statement (a cancel or
//! `statement_timeout` is an ERROR), and it refuses to run in a transaction that has
//! written, whose changes no peer can have before its COMMIT.
//!
//! Invariants: the wait happens after the commit, so it can never turn a committed
//! transaction into an error: a timeout or a cancel is a WARNING (and
//! `bdr.last_synchronous_commit()` says which), the same contract as PostgreSQL's
//! `synchronous_commit`. Only client backends wait: bdr's apply workers, walsenders and
//! other background processes never do (an apply worker waiting on its peers could wait
//! on itself).

use crate::error::{self, SyncCommitError};
use crate::gucs::{SYNCHRONOUS_COMMIT_PEERS, SYNCHRONOUS_COMMIT_TIMEOUT_MS};
use crate::pg::syncrep::{self, Interrupt};
use bdr_core::sync_commit::{peer_of_slot, Outcome, Tally};
use pgrx::prelude::*;
use std::cell::Cell;
use std::time::{Duration, Instant};

thread_local! {
    /// Peers the committing transaction waits for (set at PRE_COMMIT).
    static WANTED: Cell<usize> = const { Cell::new(0) };
    /// The last synchronous commit of this session: outcome, wanted, confirmed, waited.
    static LAST: Cell<(Outcome, usize, usize, Duration)> =
        const { Cell::new((Outcome::NotRequested, 0, 0, Duration::ZERO)) };
}

/// Hook the transaction callbacks; called from `_PG_init`.
pub fn install() {
    syncrep::install(syncrep::Hooks {
        pre_commit,
        commit,
        abort: || WANTED.with(|w| w.set(0)),
    });
}

fn pre_commit() {
    WANTED.with(|w| w.set(0));
    // Read-only transactions (the one that asks bdr.last_synchronous_commit(), say)
    // leave the last outcome alone. The setting is read after these checks: the apply
    // processes commit here too, once per applied transaction.
    if !syncrep::is_client_backend() || !syncrep::has_xid() {
        return;
    }
    let wanted = SYNCHRONOUS_COMMIT_PEERS.get().max(0) as usize;
    if wanted == 0 {
        LAST.with(|l| l.set((Outcome::NotRequested, 0, 0, Duration::ZERO)));
        return;
    }
    let prefix = std::ffi::CString::new(bdr_core::wire::SYNC_COMMIT_PREFIX).expect("no NUL");
    syncrep::emit_marker(&prefix);
    WANTED.with(|w| w.set(wanted));
}

fn commit() {
    let wanted = WANTED.with(|w| w.replace(0));
    if wanted == 0 {
        return;
    }
    let (outcome, confirmed, waited) = wait(wanted, syncrep::last_commit_end());
    LAST.with(|l| l.set((outcome, wanted, confirmed, waited)));
}

/// This database's peers and how far each confirmed.
fn peer_slots(dboid: u32, prefix: &str) -> Vec<(String, u64)> {
    syncrep::slots(dboid, prefix)
        .into_iter()
        .filter_map(|(name, flush)| peer_of_slot(&name, prefix).map(|p| (p.to_string(), flush)))
        .collect()
}

fn wait(wanted: usize, commit_end: u64) -> (Outcome, usize, Duration) {
    let start = Instant::now();
    // The slots this node feeds in this database: `bdr_<dboid>_<peer>` (bdr_core::names).
    let dboid = crate::catalog::nodes::my_database_oid();
    let prefix = bdr_core::names::slot_name(dboid, "");
    let timeout_ms = SYNCHRONOUS_COMMIT_TIMEOUT_MS.get();
    let timeout = (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms as u64));
    loop {
        let slots = peer_slots(dboid, &prefix);
        let tally = Tally::of(&slots, commit_end);
        if tally.enough(wanted) {
            return (Outcome::Confirmed, tally.confirmed.len(), start.elapsed());
        }
        if slots.len() < wanted {
            error::warn(&SyncCommitError::TooFewPeers {
                wanted,
                have: slots.len(),
            });
            return (Outcome::TooFewPeers, tally.confirmed.len(), start.elapsed());
        }
        let waited = start.elapsed();
        if timeout.is_some_and(|t| waited >= t) {
            error::warn(&SyncCommitError::TimedOut {
                ms: waited.as_millis() as u64,
                wanted,
                confirmed: tally.confirmed.len(),
                missing: tally.missing.join(", "),
            });
            return (Outcome::TimedOut, tally.confirmed.len(), waited);
        }
        // A peer on the same machine answers within a millisecond or two; back off to
        // 10 ms naps once the wait is clearly longer than a round trip.
        let nap = if waited < Duration::from_millis(50) {
            1
        } else {
            10
        };
        if let Some(why) = syncrep::nap(nap) {
            error::warn(&SyncCommitError::Canceled {
                terminate: why == Interrupt::Terminate,
                wanted,
                confirmed: tally.confirmed.len(),
            });
            return (Outcome::Canceled, tally.confirmed.len(), start.elapsed());
        }
    }
}

/// `bdr.wait_slot_confirm_lsn(slot_name, target_lsn)`: wait until the bdr slot
/// `slot_name` of this database (every one when NULL) has confirmed `target_lsn` (this
/// node's current WAL insert position when NULL): the peer it feeds has applied *and*
/// flushed everything this node wrote up to there. The name and arguments are PGD's and
/// pglogical's. It waits as long as it takes (`statement_timeout` and a cancel end it
/// with an ERROR), with a NOTICE naming the peers still missing every 10 s; a slot
/// dropped meanwhile (its peer parted) is no longer waited for. Refused in a
/// transaction that has written: its own changes reach the peers only after its COMMIT.
#[pg_extern(sql = "
CREATE FUNCTION bdr.wait_slot_confirm_lsn(slot_name text DEFAULT NULL, target_lsn pg_lsn DEFAULT NULL)
    RETURNS void LANGUAGE c VOLATILE PARALLEL UNSAFE
    AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
COMMENT ON FUNCTION bdr.wait_slot_confirm_lsn(text, pg_lsn) IS
    'Wait until the peers fed by this node''s bdr slots (or one slot) have applied and flushed everything up to target_lsn (default: now)';
")]
fn wait_slot_confirm_lsn(slot_name: Option<&str>, target_lsn: Option<i64>) {
    if !syncrep::is_client_backend() {
        error::raise(&SyncCommitError::WaitOutsideSession);
    }
    if syncrep::has_xid() {
        error::raise(&SyncCommitError::WaitAfterWrite);
    }
    // pg_lsn is passed by value as 8 bytes, read here as a bigint.
    let target = target_lsn.map_or_else(crate::pg::xact::insert_lsn, |l| l as u64);
    let dboid = crate::catalog::nodes::my_database_oid();
    let prefix = bdr_core::names::slot_name(dboid, "");
    // (peer or slot name, confirmed_flush) of the slots waited for. A named slot may be
    // any logical slot of this database, bdr's or not.
    let slots = || -> Vec<(String, u64)> {
        match slot_name {
            None => peer_slots(dboid, &prefix),
            Some(want) => syncrep::slots(dboid, want)
                .into_iter()
                .filter(|(name, _)| name == want)
                .collect(),
        }
    };
    if let Some(want) = slot_name {
        if slots().is_empty() {
            error::raise(&SyncCommitError::NoSuchSlot(want.to_string()));
        }
    }
    let start = Instant::now();
    let mut next_notice = Duration::from_secs(10);
    loop {
        let tally = Tally::of(&slots(), target);
        if tally.missing.is_empty() {
            return;
        }
        let waited = start.elapsed();
        if waited >= next_notice {
            next_notice += Duration::from_secs(10);
            pgrx::notice!(
                "bdr: still waiting after {} s for {} to confirm {}",
                waited.as_secs(),
                tally.missing.join(", "),
                bdr_core::wire::format_lsn(target)
            );
        }
        syncrep::nap_or_cancel(if waited < Duration::from_millis(50) {
            1
        } else {
            10
        });
    }
}

/// How this session's last COMMIT of a transaction that wrote ended with respect to
/// `bdr.synchronous_commit_peers`: `confirmed`, `timed_out`, `canceled`,
/// `too_few_peers`, or `not_requested` (the setting was 0). Read-only transactions do
/// not change it.
#[pg_extern]
#[allow(clippy::type_complexity)]
pub fn last_synchronous_commit() -> TableIterator<
    'static,
    (
        name!(status, String),
        name!(peers_wanted, i32),
        name!(peers_confirmed, i32),
        name!(wait_ms, f64),
    ),
> {
    let (o, wanted, confirmed, waited) = LAST.with(|l| l.get());
    TableIterator::once((
        o.as_str().to_string(),
        wanted as i32,
        confirmed as i32,
        waited.as_secs_f64() * 1000.0,
    ))
}
