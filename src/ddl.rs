//! DDL replication: a schema change made on one node reaches every node, in order with
//! the data, and never stalls apply.
//!
//! Path of a replicated statement (policy in `bdr_core::ddl`, hooks in `pg::utility`):
//! 1. **Capture** (origin, `ProcessUtility` hook): a statement typed by a client on a node
//!    of an active group is described and decided on; refused ones fail with a hint.
//! 2. **Drain** ([`before`]), only for a change to an existing table's shape, one of a
//!    node at a time (each until its transaction ends): fence user
//!    writes to those tables here and on every member (`bdr.ddl_fence`, which also waits
//!    for writers already running there), then wait until every member has applied every
//!    other member's changes up to the fence, then keep the members' fences
//!    (`bdr.ddl_fence_keep`: a fence not kept lapses soon after the drain's time, so one
//!    the failing origin could not lift does not hold a member's table for long).
//!    Members are asked at once, and every wait, their answers included, is bounded by
//!    `bdr.ddl_lock_timeout`; an unreachable, silent or lagging member makes the
//!    statement fail, naming it.
//! 3. **Transport** ([`after`]): the statement, the resolved `search_path` and the role
//!    go into `bdr.ddl_queue` in the same transaction. The output plugin turns that row into
//!    a `bdr.ddl` message inside the transaction's frames, so peers run it at its commit's
//!    position. Only bdr's own code writes that table (as the bootstrap superuser, on
//!    behalf of the role that ran the statement): no role can forge a replicated DDL, as it
//!    could with `pg_logical_emit_message` (granted to PUBLIC).
//! 4. **Apply** ([`apply`], receiver): run in the applying transaction, as the same role,
//!    with the same `search_path`, under the peer's origin: exactly once across crashes,
//!    never sent back out. A failure is an apply error (logged with the statement, retried,
//!    never skipped). The fences the origin set here for it lift when the apply commits.
//!
//! A fence is named by its origin and the origin's WAL position when the drain began
//! (`since`): the arrival of an earlier change from the same origin does not lift a later
//! change's fence; the rollback's unfence and the keep touch their own change's only.

use crate::catalog::nodes::{self, NodeKind, NodeState};
use crate::error::{raise, DdlError};
use crate::pg::libpq::{self, Conn};
use crate::pg::{shmem, utility, xact};
use bdr_core::ddl::{self, DdlCommand, Decision, Plan, Shape};
use bdr_core::{dsn, wire};
use pgrx::prelude::*;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How long a kept fence may hold writes back if the schema change never arrives (its
/// origin died before committing): `bdr.ddl_unfence()` lifts it by hand.
const FENCE_LIFETIME_US: i64 = 600_000_000;

/// How long a member's fence outlives the drain's time left when it was set, unless the
/// origin keeps it ([`ddl_fence_keep`], once its drain is done): a fence whose schema
/// change failed, and which the origin could not lift (its link hung, it crashed, the
/// request arrived late), lapses after the drain's time plus this, not after
/// [`FENCE_LIFETIME_US`].
const FENCE_UNKEPT_GRACE_US: i64 = 10_000_000;

/// The local node when it belongs to an active group (read as superuser: any role's DDL
/// asks).
fn active_local_node() -> Option<nodes::Node> {
    utility::as_superuser(|| {
        if !nodes::extension_exists() {
            return None;
        }
        nodes::local().filter(|n| n.state == NodeState::Active && n.kind == NodeKind::Active)
    })
}

/// What to do with a statement of `shape`: `None` runs it here only. Raises the refusal
/// of a statement that cannot be replicated safely. Touches the catalog only for
/// statements that would replicate.
pub fn plan(shape: &Shape, text: impl FnOnce() -> String) -> Option<Plan> {
    let (drain, if_rows) = match ddl::decide(shape) {
        Decision::Local => return None,
        Decision::Refuse(r) => {
            active_local_node()?;
            raise(&DdlError::Refused {
                why: r.why,
                hint: r.hint,
            })
        }
        Decision::Replicate { drain, if_rows } => (drain, if_rows),
    };
    active_local_node()?;
    let search_path = utility::as_superuser(|| {
        Spi::get_one::<String>(
            "SELECT coalesce(string_agg(pg_catalog.quote_ident(s), ', '), '') \
             FROM pg_catalog.unnest(pg_catalog.current_schemas(false)) s",
        )
    })
    .ok()
    .flatten()
    .unwrap_or_default();
    Some(Plan {
        command: DdlCommand {
            role: utility::current_role_name(),
            search_path,
            command: text(),
            settings: ddl::STATEMENT_SETTINGS
                .iter()
                .filter_map(|name| Some((name.to_string(), xact::get_config(name)?)))
                .collect(),
        },
        drain,
        if_rows,
    })
}

/// Before the statement runs: drain its tables (see the module note).
pub fn before(p: &Plan) {
    crate::quorum::refuse_writes_without_quorum();
    if !p.drain.is_empty() {
        drain(&p.drain);
    }
}

/// Once drained: a statement that would fill existing rows with values each node computes
/// for itself is refused if its table has rows. Drained, every member's writes to it are
/// here and new ones are fenced, so no member has rows this node does not see.
pub fn refuse_if_rows(p: &Plan) {
    if let (Some(r), Some(table)) = (&p.if_rows, p.drain.first()) {
        if has_rows(table) {
            raise(&DdlError::Refused {
                why: r.why.clone(),
                hint: r.hint,
            });
        }
    }
}

/// Whether `table` (quoted) has a row, whoever may see it (read as the superuser: row
/// security does not hide rows from this check).
fn has_rows(table: &str) -> bool {
    utility::as_superuser(|| Spi::get_one::<bool>(&format!("SELECT EXISTS (SELECT FROM {table})")))
        .unwrap_or_else(|e| raise(&crate::error::ApplyError::spi(e)))
        .unwrap_or(false)
}

/// After the statement ran: queue it for the peers, in this transaction.
pub fn after(p: &Plan) {
    queue(&p.command);
}

/// A hub applying a spoke's schema change queues it again, so that the output plugin
/// forwards it to the other spokes inside the same transaction (see `crate::decode`).
pub fn requeue(c: &DdlCommand) {
    queue(c);
}

fn queue(c: &DdlCommand) {
    let settings = serde_json::to_string(&c.settings).unwrap_or_default();
    utility::as_superuser(|| {
        // The SQL of a release before 0.2.0 (the library updated, `ALTER EXTENSION bdr
        // UPDATE` not run yet) has no `settings` column: the statement then travels
        // without them, as that release sent it.
        let has_settings = Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_attribute \
              WHERE attrelid = 'bdr.ddl_queue'::pg_catalog.regclass \
                AND attname = 'settings' AND NOT attisdropped)",
        )?
        .unwrap_or(false);
        if has_settings {
            Spi::run_with_args(
                "INSERT INTO bdr.ddl_queue (role_name, search_path, command, settings) \
                 VALUES ($1, $2, $3, $4::jsonb)",
                &[
                    c.role.as_str().into(),
                    c.search_path.as_str().into(),
                    c.command.as_str().into(),
                    settings.as_str().into(),
                ],
            )
        } else {
            Spi::run_with_args(
                "INSERT INTO bdr.ddl_queue (role_name, search_path, command) VALUES ($1, $2, $3)",
                &[
                    c.role.as_str().into(),
                    c.search_path.as_str().into(),
                    c.command.as_str().into(),
                ],
            )
        }
    })
    .unwrap_or_else(|e| raise(&DdlError::Queue(e.to_string())));
}

/// A user write to `relid` is about to start (the executor hook): refuse it while a
/// schema change holds the table, or, for a table that replicates, while this node lacks
/// its quorum (bdr's own catalog, temporary and unlogged tables are never refused for
/// that).
pub fn check_user_write(relid: pgrx::pg_sys::Oid) {
    refuse_if_fenced(relid);
    // The verdict first (a shared-memory read); the catalog only when it refuses.
    if let Some(e) = crate::quorum::refusal() {
        if crate::pg::relcache::why_not_target(relid).is_none() {
            raise(&e);
        }
    }
}

/// Whether [`check_user_write`] could refuse a write now: a fence is set on this server,
/// or a quorum is required. Plain reads (the executor hook calls it unguarded).
pub fn may_refuse_user_writes() -> bool {
    shmem::fences_active() || crate::quorum::required()
}

/// The policy the utility and executor hooks call (`crate::pg::utility`).
pub fn hooks() -> utility::Policy {
    utility::Policy {
        plan: |shape, text| plan(shape, text),
        before,
        refuse_if_rows,
        after: |p| after(p),
        check_user_write,
        check_extension_drop,
        may_refuse_user_writes,
    }
}

/// `DROP EXTENSION bdr` is about to run: refused while this node is a member of a group
/// with other members (not parted). Dropping it then would stop this node applying while
/// its peers still stream from it, and leave every slot for it holding WAL for ever.
fn check_extension_drop() {
    if !nodes::extension_exists() {
        return;
    }
    let all = utility::as_superuser(nodes::all);
    let Some(me) = all
        .iter()
        .find(|n| n.is_local && n.state != NodeState::Parted)
    else {
        return;
    };
    if all
        .iter()
        .any(|n| !n.is_local && n.state != NodeState::Parted)
    {
        raise(&DdlError::DropWhileMember(me.name.clone()));
    }
}

/// Refuse a user write to `relid` while a schema change from another node holds it.
pub fn refuse_if_fenced(relid: pgrx::pg_sys::Oid) {
    let dboid = nodes::my_database_oid();
    if let Some(origin) = shmem::fenced_by(dboid, relid.to_u32(), utility::my_pid(), xact::now()) {
        let table = crate::pg::relcache::quoted_name(relid);
        raise(&DdlError::Fenced { table, origin });
    }
}

/// A member the origin talks to while draining.
struct Member {
    name: String,
    dsn: String,
    /// `None` once it failed to answer (the statement may still run there).
    conn: Option<Conn>,
}

/// The drain's members, kept until the transaction ends: a rollback lifts the fences
/// over the same connections.
type Held = Rc<RefCell<Vec<Member>>>;

fn ms_left(deadline: Instant) -> u64 {
    deadline
        .saturating_duration_since(Instant::now())
        .as_millis()
        .max(1) as u64
}

/// Run `sql` with `params` on every member still answering, at once, until `deadline`:
/// (member, rows or why not). A member that did not answer, or whose connection broke,
/// is not asked again.
fn ask_all(
    held: &mut [Member],
    sql: &str,
    params: &[&str],
    deadline: Instant,
) -> Vec<(String, libpq::Answer)> {
    ask_where(held, |_| true, sql, params, deadline)
}

/// As [`ask_all`], of the members `pick` names only.
fn ask_where(
    held: &mut [Member],
    pick: impl Fn(&str) -> bool,
    sql: &str,
    params: &[&str],
    deadline: Instant,
) -> Vec<(String, libpq::Answer)> {
    let mut asked: Vec<&mut Member> = held
        .iter_mut()
        .filter(|m| m.conn.is_some() && pick(&m.name))
        .collect();
    let mut conns: Vec<&mut Conn> = Vec::new();
    let mut names = Vec::new();
    for m in asked.iter_mut() {
        names.push(m.name.clone());
        conns.push(m.conn.as_mut().expect("filtered"));
    }
    let left = Duration::from_millis(ms_left(deadline));
    let results = libpq::exec_params_many(&mut conns, sql, params, Some(left));
    drop(conns);
    let mut out = Vec::new();
    for ((m, name), r) in asked.into_iter().zip(names).zip(results) {
        if matches!(
            r,
            Err(libpq::LibpqError::Timeout { .. }
                | libpq::LibpqError::Lost { .. }
                | libpq::LibpqError::Stopping { .. })
        ) {
            m.conn = None;
        }
        out.push((name, r));
    }
    for m in held.iter().filter(|m| m.conn.is_none() && pick(&m.name)) {
        if !out.iter().any(|(n, _)| *n == m.name) {
            out.push((
                m.name.clone(),
                Err(libpq::LibpqError::Lost {
                    dsn: dsn::redact(&m.dsn),
                    message: "it stopped answering earlier in this schema change".into(),
                }),
            ));
        }
    }
    out
}

/// Fence `tables` everywhere and wait until every member applied every other member's
/// changes up to the fence.
fn drain(tables: &[String]) {
    // A table this transaction created reaches the members with this change, in one
    // transaction: no member can have written it, or write it before the change is
    // there. Nothing to fence or wait for.
    let tables: Vec<String> = tables
        .iter()
        .filter(|t| !table_oid(t).is_some_and(crate::pg::relcache::created_in_this_transaction))
        .cloned()
        .collect();
    if tables.is_empty() {
        return;
    }
    let tables = &tables[..];
    let timeout = Duration::from_millis(crate::gucs::DDL_LOCK_TIMEOUT_MS.get().max(1) as u64);
    let deadline = Instant::now() + timeout;
    let me = active_local_node().expect("checked by plan");
    let dboid = nodes::my_database_oid();
    let members: Vec<nodes::Node> = utility::as_superuser(nodes::all)
        .into_iter()
        .filter(|n| !n.is_local && n.kind == NodeKind::Active && n.state == NodeState::Active)
        .collect();

    // One drained change of this node at a time, each until its transaction ends: so
    // every change this node committed before ends at or below `since`, this one past it,
    // and no other in between, which names this change's fences everywhere.
    one_drain_at_a_time(deadline, timeout);
    let since = utility::insert_lsn();
    // Here: refuse new user writes to the tables (this backend is exempt).
    for t in tables {
        fence(
            dboid,
            t,
            (&me.name, since),
            utility::my_pid(),
            FENCE_LIFETIME_US,
        );
    }
    let my_pid = utility::my_pid();
    utility::at_transaction_end(Box::new(move |_| {
        shmem::fence_clear(|f| f.exempt_pid == my_pid);
    }));

    let held: Held = Rc::new(RefCell::new(connect_all(&members, timeout)));
    let since_text = wire::format_lsn(since);
    unfence_if_rolled_back(held.clone(), &me.name, &since_text);
    let mut held = held.borrow_mut();

    let tables_arr = text_array(tables);
    let fence_lsn = fence_all(
        &mut held,
        tables,
        &tables_arr,
        (&me.name, &since_text),
        deadline,
    );

    // Every node (members and here) applies every other member's changes up to its fence.
    loop {
        let behind = behind(&me.name, dboid, &mut held, &fence_lsn, deadline);
        if behind.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let change = (me.name.as_str(), since_text.as_str());
            keep_all(&mut held, &tables_arr, change, left.max(UNFENCE_WAIT));
            return;
        }
        if Instant::now() >= deadline {
            raise(&DdlError::DrainTimeout {
                waited_ms: timeout.as_millis() as u64,
                behind: behind.join(", "),
            });
        }
        pgrx::check_for_interrupts!();
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Take this node's drain lock for this transaction (`utility::try_drain_lock`, a lock no
/// SQL advisory lock can take, so no role can hold drained schema changes off), waiting
/// until `deadline` for another session's drained schema change to end; fail naming it
/// otherwise.
fn one_drain_at_a_time(deadline: Instant, timeout: Duration) {
    loop {
        if utility::try_drain_lock() {
            return;
        }
        if Instant::now() >= deadline {
            let holder: Option<i32> = Spi::get_one_with_args(
                "SELECT pid FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND granted \
                    AND database = (SELECT oid FROM pg_catalog.pg_database \
                                     WHERE datname = pg_catalog.current_database()) \
                    AND objsubid = $1 LIMIT 1",
                &[i32::from(utility::DRAIN_LOCK_FIELD4).into()],
            )
            .ok()
            .flatten();
            raise(&DdlError::DrainBusy {
                waited_ms: timeout.as_millis() as u64,
                holder: holder.map_or("another session".into(), |p| format!("backend {p}")),
            });
        }
        pgrx::check_for_interrupts!();
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `tables` as a text array literal.
fn text_array(tables: &[String]) -> String {
    format!(
        "{{{}}}",
        tables
            .iter()
            .map(|t| format!("\"{}\"", t.replace('\\', "\\\\").replace('"', "\\\"")))
            .collect::<Vec<_>>()
            .join(",")
    )
}

/// A connection to every member within the timeout; else fail naming the unreachable.
fn connect_all(members: &[nodes::Node], timeout: Duration) -> Vec<Member> {
    let connect_timeout = timeout.as_secs().clamp(1, 30).to_string();
    let dsns: Vec<String> = members
        .iter()
        .map(|m| dsn::with_default(&m.dsn, "connect_timeout", &connect_timeout))
        .collect();
    let mut reached = Vec::new();
    let mut unreachable = Vec::new();
    // All at once: unreachable members cost one connect_timeout together.
    for (m, c) in members
        .iter()
        .zip(libpq::connect_many(&dsns, "bdr_ddl_drain"))
    {
        match c {
            Ok(conn) => reached.push(Member {
                name: m.name.clone(),
                dsn: m.dsn.clone(),
                conn: Some(conn),
            }),
            Err(e) => unreachable.push(format!("{} ({e})", m.name)),
        }
    }
    if !unreachable.is_empty() {
        raise(&DdlError::Unreachable {
            members: unreachable.join(", "),
        });
    }
    reached
}

/// How long the unfence at a rollback may take for each step (connecting again, and the
/// answer): it runs in abort processing, where neither a cancel nor `statement_timeout`
/// can end a wait.
const UNFENCE_WAIT: Duration = Duration::from_secs(2);

/// If this transaction does not commit, lift the fences it set on the members (best
/// effort, within [`UNFENCE_WAIT`] for each step: over the drain's connections, a member
/// whose connection failed dialled again; fences also expire, and bdr.ddl_unfence()
/// lifts them by hand). At a commit the connections close.
fn unfence_if_rolled_back(held: Held, origin: &str, since: &str) {
    let (origin, since) = (origin.to_string(), since.to_string());
    utility::at_transaction_end(Box::new(move |committed| {
        // Not borrowed any more unless an error ended the drain without unwinding.
        let Ok(mut members) = held.try_borrow_mut().map(|mut v| std::mem::take(&mut *v)) else {
            return;
        };
        if committed {
            return;
        }
        let again: Vec<String> = members
            .iter()
            .filter(|m| m.conn.is_none())
            .map(|m| dsn::with_default(&m.dsn, "connect_timeout", "2"))
            .collect();
        let mut conns: Vec<Conn> = libpq::connect_many(&again, "bdr_ddl_unfence")
            .into_iter()
            .flatten()
            .collect();
        conns.extend(members.iter_mut().filter_map(|m| m.conn.take()));
        let mut all: Vec<&mut Conn> = conns.iter_mut().collect();
        let answers = libpq::exec_params_many(
            &mut all,
            "SELECT bdr.ddl_unfence($1, $2)",
            &[&origin, &since],
            Some(UNFENCE_WAIT),
        );
        // A member on the previous release's SQL lifts every fence of this origin.
        let mut old: Vec<&mut Conn> = all
            .into_iter()
            .zip(answers)
            .filter(|(_, a)| lacks_function(a))
            .map(|(c, _)| c)
            .collect();
        if !old.is_empty() {
            let _ = libpq::exec_params_many(
                &mut old,
                "SELECT bdr.ddl_unfence($1)",
                &[&origin],
                Some(UNFENCE_WAIT),
            );
        }
    }));
}

/// Ask the members whose answer `again` picks once more, with `sql`: their new answers
/// replace those in `answers`.
fn ask_again(
    held: &mut [Member],
    answers: &mut Vec<(String, libpq::Answer)>,
    again: fn(&libpq::Answer) -> bool,
    sql: &str,
    params: &[&str],
    deadline: Instant,
) {
    let names: Vec<String> = answers
        .iter()
        .filter(|(_, a)| again(a))
        .map(|(n, _)| n.clone())
        .collect();
    if names.is_empty() {
        return;
    }
    answers.retain(|(n, _)| !names.contains(n));
    answers.extend(ask_where(
        held,
        |n| names.iter().any(|w| w == n),
        sql,
        params,
        deadline,
    ));
}

/// Whether the member answered `ddl_fence` with NULL: it has not got a table to fence yet.
fn lacks_table(answer: &libpq::Answer) -> bool {
    matches!(answer, Ok(rows) if rows.first().is_some_and(|r| r.first().is_some_and(Option::is_none)))
}

/// Whether `answer` is "undefined function": the member's SQL is the previous release's
/// (its library may be new), which lacks a function or form this one added.
fn lacks_function(answer: &libpq::Answer) -> bool {
    matches!(answer, Err(e) if e.has_sqlstate("42883"))
}

/// Fence `tables` on every member at once for the schema change (origin, since); each
/// answers once its running writers are done, with its WAL position then: (member, fence
/// LSN). A member on the previous release's SQL is asked for a fence of the origin's
/// (lifted by any change from it). Fails naming every member that could not, or did not
/// answer by `deadline`.
fn fence_all(
    held: &mut [Member],
    tables: &[String],
    tables_arr: &str,
    (origin, since): (&str, &str),
    deadline: Instant,
) -> Vec<(String, u64)> {
    let mut fence_lsn: Vec<(String, u64)> = Vec::new();
    let mut failed = Vec::new();
    let fence = "SELECT bdr.ddl_fence($1::text[], $2, $3::int, $4)::text";
    let left = || ms_left(deadline).to_string();
    let mut answers = ask_all(held, fence, &[tables_arr, origin, &left(), since], deadline);
    // A member that has not got a table yet (this node's CREATE TABLE on its way) is
    // asked again until it has, or the drain's time is up.
    let mut pause = Duration::from_millis(10);
    while answers.iter().any(|(_, a)| lacks_table(a)) && Instant::now() + pause < deadline {
        pgrx::check_for_interrupts!();
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
        let params = [tables_arr, origin, &left(), since];
        ask_again(held, &mut answers, lacks_table, fence, &params, deadline);
    }
    let old_fence = "SELECT bdr.ddl_fence($1::text[], $2, $3::int)::text";
    let params = [tables_arr, origin, &left()];
    ask_again(
        held,
        &mut answers,
        lacks_function,
        old_fence,
        &params,
        deadline,
    );
    for (name, r) in answers {
        match r {
            ref a if lacks_table(a) => failed.push(format!(
                "{name} (it has no table {} to hold: it does not exist there)",
                tables.join(", ")
            )),
            Ok(rows) => {
                let lsn = rows
                    .first()
                    .and_then(|r| r.first().cloned().flatten())
                    .and_then(|v| wire::parse_lsn(&v))
                    .unwrap_or(0);
                fence_lsn.push((name, lsn));
            }
            Err(e) => failed.push(format!("{name} ({e})")),
        }
    }
    if !failed.is_empty() {
        raise(&DdlError::FenceFailed {
            members: failed.join(", "),
        });
    }
    fence_lsn
}

/// Once drained: keep the members' fences of the schema change (origin, since) until it
/// arrives there (they would lapse soon after the drain's time otherwise). A member on
/// the previous release's SQL has no `bdr.ddl_fence_keep`: its fences stay the short
/// ones (a library of the previous release set 10-minute fences). Fails naming every
/// member whose fence is gone or that did not answer within `limit`.
fn keep_all(held: &mut [Member], tables_arr: &str, (origin, since): (&str, &str), limit: Duration) {
    let answers = ask_all(
        held,
        "SELECT bdr.ddl_fence_keep($1::text[], $2, $3)::text",
        &[tables_arr, origin, since],
        Instant::now() + limit,
    );
    let failed: Vec<String> = answers
        .into_iter()
        .filter_map(|(name, r)| match r {
            Ok(rows)
                if rows
                    .first()
                    .and_then(|r| r.first().cloned().flatten())
                    .as_deref()
                    == Some("true") =>
            {
                None
            }
            Ok(_) => Some(format!("{name} (its fence lapsed or was lifted)")),
            ref r @ Err(_) if lacks_function(r) => None,
            Err(e) => Some(format!("{name} ({e})")),
        })
        .collect();
    if !failed.is_empty() {
        raise(&DdlError::FenceFailed {
            members: failed.join(", "),
        });
    }
}

/// Who still has to apply whose changes up to the fences ("X applying Y up to LSN"), or
/// did not answer by `deadline`: this node (`me`) and every member.
fn behind(
    me: &str,
    dboid: u32,
    held: &mut [Member],
    fence_lsn: &[(String, u64)],
    deadline: Instant,
) -> Vec<String> {
    let mut behind = Vec::new();
    let here = applied_here(dboid);
    for (j, lsn) in fence_lsn {
        if here
            .iter()
            .find(|(p, _)| p == j)
            .is_none_or(|(_, a)| a < lsn)
        {
            behind.push(format!(
                "{} applying {j} up to {}",
                me,
                wire::format_lsn(*lsn)
            ));
        }
    }
    let answers = ask_all(
        held,
        "SELECT peer, applied_lsn FROM bdr.apply_workers()",
        &[],
        deadline,
    );
    for (name, r) in answers {
        let rows = match r {
            Ok(rows) => rows,
            Err(e) => {
                behind.push(format!("{name} ({e})"));
                continue;
            }
        };
        for (j, lsn) in fence_lsn.iter().filter(|(j, _)| *j != name) {
            let applied = rows
                .iter()
                .find(|r| r.first().cloned().flatten().as_deref() == Some(j.as_str()))
                .and_then(|r| r.get(1).cloned().flatten())
                .and_then(|v| wire::parse_lsn(&v))
                .unwrap_or(0);
            if applied < *lsn {
                behind.push(format!(
                    "{name} applying {j} up to {}",
                    wire::format_lsn(*lsn)
                ));
            }
        }
    }
    behind
}

/// (peer, applied LSN) of this database's apply workers.
fn applied_here(dboid: u32) -> Vec<(String, u64)> {
    shmem::apply_slots(dboid)
        .into_iter()
        .map(|s| (s.peer(), s.applied_lsn))
        .collect()
}

/// The OID of the table named `table`, if it exists here.
fn table_oid(table: &str) -> Option<pgrx::pg_sys::Oid> {
    Spi::get_one_with_args("SELECT pg_catalog.to_regclass($1)::oid", &[table.into()])
        .ok()
        .flatten()
}

/// Fence the table named `table` (if it exists here) of `dboid` for the schema change
/// (origin, since), `exempt_pid` excepted, for `lifetime_us`; returns its OID.
fn fence(
    dboid: u32,
    table: &str,
    (origin, since): (&str, u64),
    exempt_pid: i32,
    lifetime_us: i64,
) -> Option<pgrx::pg_sys::Oid> {
    let relid = table_oid(table)?;
    if !shmem::fence_add(
        dboid,
        relid.to_u32(),
        origin,
        since,
        exempt_pid,
        xact::now() + lifetime_us,
    ) {
        raise(&DdlError::TooManyFences);
    }
    Some(relid)
}

/// The fence functions' table names: an array element that is NULL is refused.
fn names(tables: Vec<Option<String>>) -> Vec<String> {
    tables
        .into_iter()
        .map(|t| t.unwrap_or_else(|| raise(&DdlError::NullTable)))
        .collect()
}

/// The origin's position `since` names a schema change in the fence functions.
fn since_lsn(since: &str) -> u64 {
    wire::parse_lsn(since).unwrap_or_else(|| raise(&DdlError::BadPosition(since.to_string())))
}

/// Fence `tables` here for the schema change from `origin` whose drain began at its WAL
/// position `since`, wait (at most `timeout_ms`) for transactions already writing to
/// them, and return the WAL position after them. The fences lapse after `timeout_ms` and
/// a grace unless the origin keeps them ([`ddl_fence_keep`]); that change's arrival
/// lifts them, an earlier change's does not. Called by the origin of a schema change
/// over its connection; superuser only.
#[pg_extern(name = "ddl_fence")]
fn ddl_fence_since(
    tables: Vec<Option<String>>,
    origin: &str,
    timeout_ms: i32,
    since: &str,
) -> Option<String> {
    fence_here(&names(tables), (origin, since_lsn(since)), timeout_ms)
}

/// As the four-argument form, for an origin of the previous release: the fences are
/// lifted by the arrival of any schema change from `origin`.
#[pg_extern]
fn ddl_fence(tables: Vec<Option<String>>, origin: &str, timeout_ms: i32) -> Option<String> {
    fence_here(&names(tables), (origin, 0), timeout_ms)
}

fn fence_here(tables: &[String], change: (&str, u64), timeout_ms: i32) -> Option<String> {
    // A table not here (yet) cannot be fenced: NULL, before fencing any. The origin asks
    // again: the table is usually its own CREATE TABLE still on its way, and once that
    // arrives this node's users could write it in the old shape unfenced.
    if tables.iter().any(|t| table_oid(t).is_none()) {
        return None;
    }
    let dboid = nodes::my_database_oid();
    let timeout_ms = timeout_ms.max(1);
    Spi::run(&format!("SET LOCAL lock_timeout = {timeout_ms}"))
        .unwrap_or_else(|e| raise(&DdlError::FenceSetup(e.to_string())));
    let lifetime_us = i64::from(timeout_ms) * 1000 + FENCE_UNKEPT_GRACE_US;
    for t in tables {
        if let Some(relid) = fence(dboid, t, change, 0, lifetime_us) {
            utility::wait_for_writers(relid);
        }
    }
    Some(wire::format_lsn(utility::insert_lsn()))
}

/// Keep the fences `ddl_fence` set here on `tables` for the schema change (`origin`,
/// `since`) until it arrives (or for 10 minutes): called by the origin once its drain is
/// done, just before its statement runs. False when one of them is no longer set (it
/// lapsed, or was lifted by hand): the origin then fails. Superuser only.
#[pg_extern]
fn ddl_fence_keep(tables: Vec<Option<String>>, origin: &str, since: &str) -> bool {
    let tables = names(tables);
    let dboid = nodes::my_database_oid();
    let since = since_lsn(since);
    let now = xact::now();
    tables.iter().filter_map(|t| table_oid(t)).all(|relid| {
        shmem::fence_keep(
            dboid,
            relid.to_u32(),
            origin,
            since,
            now,
            now + FENCE_LIFETIME_US,
        )
    })
}

/// Lift every fence set here by schema changes from `origin` (every fence when NULL):
/// for a schema change whose origin died before committing. Returns how many.
#[pg_extern]
fn ddl_unfence(origin: default!(Option<&str>, "NULL")) -> i32 {
    let dboid = nodes::my_database_oid();
    shmem::fence_clear(|f| f.dboid == dboid && origin.is_none_or(|o| shmem::fence_origin(f) == o))
        as i32
}

/// Lift the fences set here for the schema change (`origin`, `since`) only: its origin
/// rolled it back. Returns how many.
#[pg_extern(name = "ddl_unfence")]
fn ddl_unfence_change(origin: &str, since: &str) -> i32 {
    let dboid = nodes::my_database_oid();
    let since = since_lsn(since);
    shmem::fence_clear(|f| f.dboid == dboid && f.since == since && shmem::fence_origin(f) == origin)
        as i32
}

/// Run `command` here and replicate it to every node, as typed DDL is (also when
/// `bdr.ddl_replication` is off for the session). BDR 1.x: `bdr.bdr_replicate_ddl_command`.
#[pg_extern]
pub fn replicate_ddl_command(command: &str) -> bool {
    if active_local_node().is_none() {
        raise(&DdlError::NotInGroup);
    }
    utility::forced(|| Spi::run(command))
        .unwrap_or_else(|e| raise(&DdlError::Command(e.to_string())));
    true
}

/// Receiver: run a replicated statement in the applying transaction, with the origin's
/// `search_path` and session settings (`bdr_core::ddl::STATEMENT_SETTINGS`), this
/// transaction's own restored after it. Errors are raised (an apply error: logged with
/// the statement, retried).
pub fn apply(c: &DdlCommand) {
    let Some(role) = utility::role_oid(&c.role) else {
        raise(&DdlError::RoleMissing(c.role.clone()))
    };
    let theirs = std::iter::once(("search_path", c.search_path.as_str()))
        .chain(c.settings.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let ours: Vec<(String, String)> = theirs
        .clone()
        .map(|(name, _)| (name.to_string(), xact::get_config(name).unwrap_or_default()))
        .collect();
    let set = |name: &str, value: &str| {
        Spi::run_with_args(
            "SELECT pg_catalog.set_config($1, $2, true)",
            &[name.into(), value.into()],
        )
        .unwrap_or_else(|e| raise(&DdlError::Setting(name.to_string(), e.to_string())));
    };
    for (name, value) in theirs {
        set(name, value);
    }
    utility::as_role(role, || Spi::run(&c.command))
        .unwrap_or_else(|e| raise(&DdlError::Command(e.to_string())));
    for (name, value) in &ours {
        set(name, value);
    }
}

/// Receiver, after committing a transaction that applied DDL from `origin`, which ended
/// at `origin_lsn` there: lift the fences of that origin's schema changes whose drain
/// began before it (its own and any that failed earlier), not those of later ones,
/// which wait for their own change (it follows in the stream).
pub fn applied_from(origin: &str, origin_lsn: u64) {
    let dboid = nodes::my_database_oid();
    shmem::fence_clear(|f| {
        f.dboid == dboid && f.since < origin_lsn && shmem::fence_origin(f) == origin
    });
}
