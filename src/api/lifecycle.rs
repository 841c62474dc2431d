//! Node lifecycle after joining: `bdr.part` (remove a node, up or down) and standby nodes
//! (`bdr.promote`, and the triggers that keep a standby read-only for users).
//!
//! Invariants: after `part`, no reachable member keeps a slot or an origin for the parted
//! node (so no WAL is held for it); a standby never sends (members do not apply from it)
//! and refuses user writes; `promote` creates the promoted node's slots *before* it accepts
//! writes, so nothing written after the switch is missed.

use crate::api::group_error::GroupError;
use crate::catalog::nodes::{self, Node, NodeKind, NodeState};
use crate::catalog::{DROP_ORIGIN_SQL, DROP_SLOT_SQL};
use crate::error::raise;
use crate::pg::libpq::{quote_ident, Conn};
use bdr_core::names::{origin_name, slot_name};
use bdr_core::replication::REPLICATED_TABLES_SQL;
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// Run `steps` (statements with their parameters) on `c`, in order, until all succeed or
/// `secs` pass (e.g. dropping a slot whose walsender is still exiting, or an origin whose
/// worker is stopping).
fn retry(c: &mut Conn, steps: &[(&str, &[&str])], secs: u64) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match steps
            .iter()
            .try_for_each(|(sql, params)| c.exec_params(sql, params).map(|_| ()))
        {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e.to_string()),
            Err(_) => {
                pgrx::check_for_interrupts!();
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// On the member reached by `c`: mark `parted` as parted, drop the slot feeding it and the
/// origin tracking it.
fn part_on(c: &mut Conn, parted: &str) -> Result<(), String> {
    let dboid: u32 = c
        .query_value("SELECT oid FROM pg_database WHERE datname = current_database()")
        .map_err(|e| e.to_string())?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    c.exec_params(
        "UPDATE bdr.nodes SET node_state = 'parted' WHERE node_name = $1",
        &[parted],
    )
    .map_err(|e| e.to_string())?;
    let slot = slot_name(dboid, parted);
    retry(
        c,
        &[
            (
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                  WHERE slot_name = $1 AND active_pid IS NOT NULL",
                &[&slot],
            ),
            (DROP_SLOT_SQL, &[&slot]),
        ],
        30,
    )?;
    // The supervisor stops the apply worker for the parted node within a second; until
    // then its origin is in use.
    retry(c, &[(DROP_ORIGIN_SQL, &[&origin_name(dboid, parted)])], 30)
}

/// Remove `node_name` from the group, on every reachable member. Works whether the node is
/// up or down; run it on any other member.
#[pg_extern]
fn part(node_name: &str) {
    let Some(local) = nodes::local() else {
        raise(&GroupError::NotMember)
    };
    if local.name == node_name {
        raise(&GroupError::PartSelf);
    }
    let Some(target) = nodes::by_name(node_name) else {
        raise(&GroupError::UnknownPeer(node_name.into()))
    };
    let members: Vec<Node> = nodes::all()
        .into_iter()
        .filter(|n| n.name != node_name && n.state != NodeState::Parted)
        .collect();
    let mut unreachable = Vec::new();
    for m in &members {
        match Conn::connect(&m.dsn, "bdr_part") {
            Ok(mut c) => {
                if let Err(e) = part_on(&mut c, node_name) {
                    raise(&GroupError::Remote {
                        node: m.name.clone(),
                        message: e,
                    });
                }
            }
            Err(e) => unreachable.push(format!("{} ({e})", m.name)),
        }
    }
    // The parted node itself, if it is up: it stops applying and drops what it holds in
    // that database (slots and origins are named bdr_<dboid>_<node>; other databases of
    // the server may belong to other bdr groups).
    if let Ok(mut c) = Conn::connect(&target.dsn, "bdr_part") {
        let _ = c.exec("UPDATE bdr.nodes SET node_state = 'parted'");
        let dboid = c
            .query_value("SELECT oid FROM pg_database WHERE datname = current_database()")
            .ok()
            .flatten()
            .unwrap_or_default();
        let ours = format!("bdr\\_{dboid}\\_%");
        let _ = retry(
            &mut c,
            &[
                (
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                      WHERE slot_name LIKE $1 AND database = current_database() \
                        AND active_pid IS NOT NULL",
                    &[&ours],
                ),
                (
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                      WHERE slot_name LIKE $1 AND database = current_database()",
                    &[&ours],
                ),
            ],
            30,
        );
        let _ = retry(
            &mut c,
            &[(
                "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin \
                  WHERE roname LIKE $1",
                &[&ours],
            )],
            30,
        );
    }
    if !unreachable.is_empty() {
        pgrx::warning!(
            "node \"{node_name}\" was parted, but these members were unreachable and still hold its slot: {}",
            unreachable.join(", ")
        );
    }
}

/// Make the read-only triggers match this node's kind (added on a standby, removed on an
/// active node); run after CREATE TABLE by the event trigger. Returns the tables touched.
#[pg_extern]
fn refresh_standby_triggers() -> i32 {
    let standby = nodes::local().is_some_and(|n| n.kind == NodeKind::Standby);
    set_standby_triggers(standby)
}

/// Add (or remove) the read-only statement triggers on every replicated table: they
/// refuse user writes on a standby (apply workers run with `session_replication_role =
/// replica`, where they do not fire).
pub fn set_standby_triggers(on: bool) -> i32 {
    let tables: Vec<(String, String)> = Spi::connect(|c| {
        let mut v = Vec::new();
        for r in c.select(REPLICATED_TABLES_SQL, None, &[])? {
            v.push((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<String>(2)?.unwrap_or_default(),
            ));
        }
        Ok::<_, pgrx::spi::Error>(v)
    })
    .unwrap_or_else(|e| raise(&crate::error::ApplyError::Spi(e.to_string())));
    let count = tables.len() as i32;
    for (s, n) in tables {
        let t = format!("{}.{}", quote_ident(&s), quote_ident(&n));
        let sql = if on {
            format!(
                "CREATE OR REPLACE TRIGGER bdr_standby_read_only BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE \
                 ON {t} FOR EACH STATEMENT EXECUTE FUNCTION bdr.standby_guard()"
            )
        } else {
            format!("DROP TRIGGER IF EXISTS bdr_standby_read_only ON {t}")
        };
        Spi::run(&sql).unwrap_or_else(|e| raise(&crate::error::ApplyError::Spi(e.to_string())));
    }
    count
}

/// Turn this standby into an active node: it creates its slots for every member, then
/// becomes writable, then every member starts applying its changes.
#[pg_extern]
pub fn promote(node_name: &str) {
    let Some(local) = nodes::local() else {
        raise(&GroupError::NotMember)
    };
    if local.name != node_name {
        raise(&GroupError::PromoteElsewhere(node_name.into()));
    }
    if local.kind != NodeKind::Standby {
        pgrx::notice!("node \"{node_name}\" is already active; nothing to do");
        return;
    }
    let members: Vec<Node> = nodes::all()
        .into_iter()
        .filter(|n| !n.is_local && n.state != NodeState::Parted)
        .collect();
    let my_dboid = nodes::my_database_oid();
    // 1. Slots first (through another session: this transaction must hold no xid while
    //    slot creation waits for running transactions).
    let mut me = Conn::connect(&local.dsn, "bdr_promote").unwrap_or_else(|e| {
        raise(&GroupError::Remote {
            node: local.name.clone(),
            message: e.to_string(),
        })
    });
    for m in &members {
        let slot = slot_name(my_dboid, &m.name);
        me.exec_params(
            "SELECT pg_create_logical_replication_slot($1::name, 'bdr') \
             WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1::name)",
            &[&slot],
        )
        .unwrap_or_else(|e| {
            raise(&GroupError::Remote {
                node: local.name.clone(),
                message: e.to_string(),
            })
        });
    }
    // 2. Writable here, 3. active everywhere.
    set_standby_triggers(false);
    nodes::upsert(&Node {
        kind: NodeKind::Active,
        state: NodeState::Active,
        ..local.clone()
    });
    for m in &members {
        match Conn::connect(&m.dsn, "bdr_promote").and_then(|mut c| {
            c.exec_params(
                "UPDATE bdr.nodes SET node_kind = 'active', node_state = 'active' WHERE node_name = $1",
                &[node_name],
            )
        }) {
            Ok(_) => {}
            Err(e) => pgrx::warning!(
                "node \"{}\" could not be told of the promotion ({e}); run bdr.promote again when it is reachable",
                m.name
            ),
        }
    }
}
