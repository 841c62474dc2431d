//! Group formation: `bdr.group_create`, `bdr.wait_for_join`, and the checks a join shares
//! with them (names, DSNs, identity, node ids). Joining itself is `crate::api::join`.

use crate::api::group_error::{fail, remote_err, required, GroupError};
use crate::catalog::nodes::{self, Node, NodeKind, NodeState};
use crate::error::raise;
use crate::pg::libpq::{Conn, LibpqError};
use crate::pg::shmem;
use bdr_core::{dsn, wire};
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// An LSN in its text form, 0 when absent or unreadable.
pub(crate) fn lsn_of(v: Option<String>) -> u64 {
    v.as_deref().and_then(wire::parse_lsn).unwrap_or(0)
}

pub(crate) fn check_name(name: &str) {
    let ok = !name.is_empty()
        && name.len() <= 48
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok {
        fail(GroupError::BadName(name.into()));
    }
}

pub(crate) fn check_dsn(d: &str) {
    if let Err(e) = dsn::parse(d) {
        fail(GroupError::BadDsn(e));
    }
}

/// A stable node id from the name and this server's identity.
pub(crate) fn node_id(name: &str) -> i64 {
    let sysid =
        nodes::read_one::<i64>("SELECT system_identifier FROM pg_control_system()").unwrap_or(0);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name
        .bytes()
        .chain(sysid.to_le_bytes())
        .chain(nodes::my_database_oid().to_le_bytes())
    {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h >> 1) as i64
}

/// Identity of the server+database a connection reaches.
pub(crate) fn identity(c: &mut Conn) -> Result<String, LibpqError> {
    Ok(c.query_value(
        "SELECT (SELECT system_identifier FROM pg_control_system())::text || '/' || \
             (SELECT oid FROM pg_database WHERE datname = current_database())::text",
    )?
    .unwrap_or_default())
}

pub(crate) fn local_identity() -> String {
    nodes::read_one::<String>(
        "SELECT (SELECT system_identifier FROM pg_control_system())::text || '/' || \
         (SELECT oid FROM pg_database WHERE datname = current_database())::text",
    )
    .unwrap_or_default()
}

pub(crate) fn check_reaches_here(d: &str) {
    let mut c = Conn::connect(d, "bdr_check_dsn")
        .unwrap_or_else(|e| fail(GroupError::DsnNotLocal(e.to_string())));
    let theirs = identity(&mut c).unwrap_or_else(|e| fail(GroupError::DsnNotLocal(e.to_string())));
    if theirs != local_identity() {
        fail(GroupError::DsnNotLocal(format!(
            "it reaches database {theirs}, this is {}",
            local_identity()
        )));
    }
}

/// Whether this node is a member already (so `group_create` or `group_join` has nothing
/// to do: a NOTICE if it is the same node, an error if it is another). A node that was
/// parted is not: it may create or join a group again, and what its catalog still lists
/// of its old group is forgotten when it writes the new one ([`nodes::forget_parted`]).
pub(crate) fn already_member(name: &str) -> bool {
    match nodes::local() {
        None => false,
        Some(existing) if existing.state == NodeState::Parted => false,
        Some(existing) => already_member_notice(&existing, name),
    }
}

fn already_member_notice(existing: &Node, name: &str) -> bool {
    if existing.name == name {
        pgrx::notice!("node \"{name}\" is already a member of the bdr group; nothing to do");
        return true;
    }
    fail(GroupError::AlreadyMember(existing.name.clone()))
}

/// Name of the publication that makes PostgreSQL refuse UPDATE/DELETE on tables with no
/// replica identity (see [`refuse_unidentifiable_writes`]).
pub const IDENTITY_PUBLICATION: &str = "bdr_require_replica_identity";

/// Tables without a primary key (and without REPLICA IDENTITY FULL or an identity index)
/// cannot have their UPDATEs and DELETEs located on a peer. Rather than let peers diverge,
/// the writing node refuses them, exactly as native logical replication does: a
/// publication FOR ALL TABLES that publishes updates and deletes makes the executor raise
/// "cannot update table ... because it does not have a replica identity" with a hint.
/// The publication is never used to send anything.
pub(crate) fn refuse_unidentifiable_writes() {
    let exists = nodes::read_one::<bool>(&format!(
        "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = '{IDENTITY_PUBLICATION}')"
    ))
    .unwrap_or(false);
    if !exists {
        Spi::run(&format!(
            "CREATE PUBLICATION {IDENTITY_PUBLICATION} FOR ALL TABLES WITH (publish = 'update, delete')"
        ))
        .unwrap_or_else(|e| raise(&crate::error::ApplyError::Spi(e.to_string())));
    }
}

/// Create a new group with this node as its first member.
#[pg_extern]
pub fn group_create(
    local_node_name: Option<&str>,
    node_external_dsn: Option<&str>,
    node_number: default!(Option<i32>, "NULL"),
) {
    let local_node_name = required(local_node_name, "local_node_name");
    let node_external_dsn = required(node_external_dsn, "node_external_dsn");
    crate::error::check_server_config().unwrap_or_else(|e| raise(&e));
    check_name(local_node_name);
    check_dsn(node_external_dsn);
    let number = check_node_number(node_number).unwrap_or(0);
    if already_member(local_node_name) {
        return;
    }
    check_reaches_here(node_external_dsn);
    refuse_unidentifiable_writes();
    crate::catalog::tombstones::attach_tombstone_triggers();
    nodes::forget_parted();
    nodes::upsert(&Node {
        name: local_node_name.into(),
        id: node_id(local_node_name),
        kind: NodeKind::Active,
        state: NodeState::Active,
        dsn: node_external_dsn.into(),
        is_local: true,
        number: Some(number),
        hub: None,
    });
    crate::sequence::forget_node_number_at_commit();
    crate::sequence::apply_default_kinds(None);
    crate::workers::launcher::ensure_supervisor(nodes::my_database_oid());
}

/// Block until this node has applied, from every peer, everything that peer had written
/// when the call started (or `timeout` seconds pass: an ERROR).
#[pg_extern]
fn wait_for_join(timeout: default!(i32, 300)) {
    let Some(local) = nodes::local() else {
        fail(GroupError::NotMember)
    };
    if local.kind == NodeKind::Witness {
        return; // it applies nothing: joined as soon as registered
    }
    let dboid = nodes::my_database_oid();
    // The nodes it streams from (a spoke: its hub, which forwards the others).
    let all = nodes::all();
    let peers: Vec<Node> = local
        .links(&all)
        .filter(|n| n.state == NodeState::Active)
        .cloned()
        .collect();
    let deadline = Instant::now() + Duration::from_secs(timeout.max(1) as u64);
    for p in peers {
        let target = Conn::connect(&p.dsn, "bdr_wait_for_join")
            .and_then(|mut c| c.query_value("SELECT pg_current_wal_flush_lsn()::text"))
            .map(lsn_of)
            .unwrap_or_else(|e| fail(remote_err(&p.name)(e)));
        loop {
            let applied = shmem::find(shmem::Kind::Apply, dboid, &p.name)
                .map(|i| shmem::get(i).applied_lsn)
                .unwrap_or(0);
            if applied >= target {
                break;
            }
            if Instant::now() > deadline {
                fail(GroupError::Timeout {
                    what: format!(
                        "node \"{}\" to catch up with node \"{}\" (applied {}, target {})",
                        local.name,
                        p.name,
                        wire::format_lsn(applied),
                        wire::format_lsn(target)
                    ),
                    secs: timeout as u64,
                });
            }
            pgrx::check_for_interrupts!();
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub(crate) fn check_node_number(n: Option<i32>) -> Option<i32> {
    if let Some(v) = n {
        if !(0..=bdr_core::snowflake::MAX_NODE_NUMBER as i32).contains(&v) {
            fail(GroupError::BadNodeNumber(v));
        }
    }
    n
}
