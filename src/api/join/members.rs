//! Step 1 of a join: the source's view of the group, a session on every member, J's node
//! number and tables, and whether the topology asked for fits the group.

use super::undo::Member;
use crate::api::group::{identity, local_identity};
use crate::api::group_error::{fail, remote_err, GroupError};
use crate::catalog::nodes::{self, Node, NodeKind, NodeState};
use crate::pg::libpq::{quote_ident, Conn, LibpqError};
use bdr_core::replication::REPLICATED_TABLES_SQL;

/// Step 1: the source's members (parted ones aside), and the source itself.
pub(super) fn read_source(join_using_dsn: &str, j: &str) -> (Vec<Node>, Node) {
    let mut src = Conn::connect(join_using_dsn, "bdr_join")
        .unwrap_or_else(|e| fail(GroupError::SourceUnreachable(e.to_string())));
    if identity(&mut src).unwrap_or_default() == local_identity() {
        fail(GroupError::JoinSelf);
    }
    let rows = src
        .exec(
            "SELECT node_name, node_id::text, node_kind, node_state, node_dsn, is_local::text, \
                    node_number::text, hub_node \
             FROM bdr.nodes ORDER BY node_name",
        )
        .unwrap_or_else(|e| fail(GroupError::SourceNotNode(e.to_string())));
    let (members, parted): (Vec<Node>, Vec<Node>) = rows
        .into_iter()
        .map(|r| Node {
            name: r[0].clone().unwrap_or_default(),
            id: r[1].as_deref().and_then(|v| v.parse().ok()).unwrap_or(0),
            kind: nodes::kind_from(r[2].as_deref().unwrap_or_default()),
            state: nodes::state_from(r[3].as_deref().unwrap_or_default()),
            dsn: r[4].clone().unwrap_or_default(),
            is_local: r[5].as_deref() == Some("true"),
            number: r[6].as_deref().and_then(|v| v.parse().ok()),
            hub: r[7].clone(),
        })
        .partition(|n| n.state != NodeState::Parted);
    let Some(source) = members.iter().find(|n| n.is_local).cloned() else {
        fail(GroupError::SourceNotNode(
            "it has no local node in bdr.nodes".into(),
        ))
    };
    if members.iter().any(|n| n.name == j) {
        fail(GroupError::DuplicateName(j.into()));
    }
    // A parted node's row stays listed (its node number is not given out again while it
    // is, so that ids it issued cannot repeat): its name is not reused either.
    if parted.iter().any(|n| n.name == j) {
        fail(GroupError::NameOfPartedNode(j.into()));
    }
    (members, source)
}

/// Step 1: a session on every member, or fail listing the unreachable ones.
pub(super) fn reach(members: &[Node], j: &str) -> Vec<Member> {
    let mut unreachable = Vec::new();
    let mut reached = Vec::new();
    for n in members {
        // The name is forced (a later key wins in a conninfo): members keep what this join
        // creates only while a session of it is connected.
        let forced = format!("{} application_name={}", n.dsn, join_application_name(j));
        match Conn::connect(&forced, &join_application_name(j)).and_then(|mut c| {
            let d = dboid_of(&mut c)?;
            Ok((c, d))
        }) {
            Ok((conn, dboid)) => reached.push(Member {
                node: n.clone(),
                conn,
                dboid,
            }),
            Err(e) => unreachable.push(format!("{} ({})", n.name, e)),
        }
    }
    if !unreachable.is_empty() {
        fail(GroupError::Unreachable(unreachable));
    }
    reached
}

/// Step 1: the node number: the one asked for, else the smallest one no member lists
/// (parted nodes included). Two joins at once may pick the same one; the UNIQUE
/// constraint on bdr.nodes.node_number then fails the second registration (step 2) on a
/// member both reached.
pub(super) fn pick_number(reached: &mut [Member], wanted: Option<i32>) -> i32 {
    let mut used: Vec<(i32, String)> = Vec::new();
    for m in reached.iter_mut() {
        let rows = m
            .conn
            .exec(
                "SELECT node_number::text, node_name FROM bdr.nodes WHERE node_number IS NOT NULL",
            )
            .unwrap_or_else(|e| fail(remote_err(&m.node.name)(e)));
        used.extend(rows.into_iter().filter_map(|r| {
            Some((
                r[0].as_deref()?.parse().ok()?,
                r[1].clone().unwrap_or_default(),
            ))
        }));
    }
    choose_node_number(wanted, &used)
}

/// Step 1: J's replicated tables must be empty; true when J has none (the schema is
/// copied then).
pub(super) fn check_local_tables(jconn: &mut Conn, j: &str) -> bool {
    let local_tables = jconn
        .exec(REPLICATED_TABLES_SQL)
        .unwrap_or_else(|e| fail(remote_err(j)(e)));
    for t in &local_tables {
        let (s, n) = (
            t[0].clone().unwrap_or_default(),
            t[1].clone().unwrap_or_default(),
        );
        let has_rows = jconn
            .query_value(&format!(
                "SELECT EXISTS (SELECT 1 FROM {}.{})",
                quote_ident(&s),
                quote_ident(&n)
            ))
            .unwrap_or_else(|e| fail(remote_err(j)(e)));
        if has_rows.as_deref() == Some("t") {
            fail(GroupError::LocalRows(format!("{s}.{n}")));
        }
    }
    local_tables.is_empty()
}

/// The members J streams with: they get a slot for J and J one for them (a witness
/// streams nothing; a spoke streams with its hub only; a standby member follows the
/// mesh members).
pub(super) fn streams_with(me: &Node, members: &[Node]) -> Vec<String> {
    let linkable = Node {
        kind: NodeKind::Active,
        ..me.clone()
    };
    linkable
        .links(members)
        .chain(
            members
                .iter()
                .filter(|n| n.kind == NodeKind::Standby && me.hub.is_none()),
        )
        .map(|n| n.name.clone())
        .collect()
}

/// The node number for a joining node: `wanted` if no member lists it, else the smallest
/// number no member lists (`used`: (number, node name) from every member's catalog,
/// parted nodes included, so their numbers are not reused).
pub(super) fn choose_node_number(wanted: Option<i32>, used: &[(i32, String)]) -> i32 {
    if let Some(w) = wanted {
        if let Some((_, by)) = used.iter().find(|(n, _)| *n == w) {
            fail(GroupError::NodeNumberTaken {
                number: w,
                by: format!("node \"{by}\""),
            });
        }
        return w;
    }
    (0..=bdr_core::snowflake::MAX_NODE_NUMBER as i32)
        .find(|n| !used.iter().any(|(u, _)| u == n))
        .unwrap_or_else(|| fail(GroupError::NoNodeNumberLeft))
}

pub(super) fn dboid_of(c: &mut Conn) -> Result<u32, LibpqError> {
    Ok(
        c.query_value("SELECT oid FROM pg_database WHERE datname = current_database()")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    )
}

/// `application_name` of a join's sessions on the members: while one is connected, the
/// members' janitor keeps what the join of `joining` created (see `workers::supervisor`).
fn join_application_name(joining: &str) -> String {
    format!("bdr_join:{joining}")
}

/// Hub and spoke: a spoke joins through the hub, the group's one mesh data node, and
/// nothing else mixes with spokes (a second mesh node would not see the spokes' changes,
/// and a standby would have no stream to follow).
pub(super) fn check_topology(members: &[Node], source: &Node, kind: &str, spoke: bool) {
    let has_spokes = members.iter().any(|n| n.hub.is_some());
    let mesh_data: Vec<&Node> = members
        .iter()
        .filter(|n| n.kind == NodeKind::Active && n.hub.is_none())
        .collect();
    let why = if spoke && (source.kind != NodeKind::Active || source.hub.is_some()) {
        Some(format!(
            "the join source \"{}\" is not a mesh data node, so it cannot be a hub",
            source.name
        ))
    } else if spoke && mesh_data.len() > 1 {
        Some(format!(
            "the group already has {} mesh data nodes ({}); a hub-and-spoke group has one hub",
            mesh_data.len(),
            mesh_data
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    } else if spoke && members.iter().any(|n| n.kind == NodeKind::Standby) {
        Some("the group has a standby node, which cannot follow spokes".into())
    } else if !spoke && has_spokes && kind != "witness" {
        Some(format!(
            "the group is a hub and spokes; join with topology := 'spoke' through the hub \"{}\"",
            mesh_data.first().map(|n| n.name.as_str()).unwrap_or("?")
        ))
    } else {
        None
    };
    if let Some(why) = why {
        fail(GroupError::Topology(why));
    }
}
