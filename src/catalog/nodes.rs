//! `bdr.nodes`: one row per node of the group, as this node knows it.
//!
//! Names are the identity users see; `node_id` is a stable number derived at creation and
//! copied to every member, used to order nodes when commit timestamps tie.

use crate::error::{ApplyError, OrRaise};
pub use bdr_core::node::{NodeKind, NodeState};
use pgrx::prelude::*;
use pgrx::spi::SpiResult;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub id: i64,
    pub kind: NodeKind,
    pub state: NodeState,
    pub dsn: String,
    pub is_local: bool,
    /// The node number (0-1023) in snowflake ids and offset sequences.
    pub number: Option<i32>,
    /// A spoke's hub (hub and spoke); `None` in a full mesh.
    pub hub: Option<String>,
}

impl Node {
    /// The nodes this node streams with (applies from, and is applied by), given the
    /// whole catalog: a spoke only with its hub; a hub with its spokes and the other
    /// mesh members; a mesh member with every other mesh member. Only data nodes
    /// (`active`) stream; standbys apply from the mesh members and witnesses stream with
    /// nobody.
    pub fn links<'a>(&self, all: &'a [Node]) -> impl Iterator<Item = &'a Node> + 'a {
        let me = self.clone();
        all.iter().filter(move |n| {
            n.name != me.name
                && n.kind == NodeKind::Active
                && match (&me.hub, &n.hub) {
                    (Some(h), _) => *h == n.name,
                    (None, Some(h)) => *h == me.name,
                    (None, None) => true,
                }
        })
    }
}

const COLUMNS: &str =
    "node_name, node_id, node_kind, node_state, node_dsn, is_local, node_number, hub_node";

fn read(sql: &str, args: &[pgrx::datum::DatumWithOid<'_>]) -> SpiResult<Vec<Node>> {
    Spi::connect(|c| {
        let mut out = Vec::new();
        for row in c.select(sql, None, args)? {
            out.push(Node {
                name: row.get(1)?.unwrap_or_default(),
                id: row.get(2)?.unwrap_or_default(),
                kind: kind_from(&row.get::<String>(3)?.unwrap_or_default()),
                state: state_from(&row.get::<String>(4)?.unwrap_or_default()),
                dsn: row.get(5)?.unwrap_or_default(),
                is_local: row.get(6)?.unwrap_or_default(),
                number: row.get(7)?,
                hub: row.get(8)?,
            });
        }
        Ok(out)
    })
}

/// First column of the first row of a read-only query. (pgrx's `Spi::get_one` marks the
/// transaction as writing, which assigns an xid: a backend holding one makes logical slot
/// creation elsewhere wait for it, and a supervisor polling with it would burn xids.)
pub fn read_one<T: pgrx::datum::FromDatum + pgrx::datum::IntoDatum>(sql: &str) -> Option<T> {
    Spi::connect(|c| match c.select(sql, Some(1), &[])?.next() {
        Some(r) => r.get::<T>(1),
        None => Ok(None),
    })
    .or_raise_as(ApplyError::spi)
}

/// A `node_kind` as the catalog (this node's or a member's) holds it; anything the CHECK
/// constraint does not allow is an ERROR.
pub fn kind_from(text: &str) -> NodeKind {
    NodeKind::parse(text).unwrap_or_else(|| unknown("node_kind", text))
}

/// A `node_state` as the catalog holds it (see [`kind_from`]).
pub fn state_from(text: &str) -> NodeState {
    NodeState::parse(text).unwrap_or_else(|| unknown("node_state", text))
}

fn unknown(column: &str, text: &str) -> ! {
    crate::error::raise(&crate::error::ApplyError::Spi(format!(
        "bdr.nodes.{column} holds an unknown value \"{text}\""
    )))
}

/// Whether `CREATE EXTENSION bdr` has run in this database.
pub fn extension_exists() -> bool {
    read_one::<bool>("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'bdr')")
        .unwrap_or(false)
}

pub fn all() -> Vec<Node> {
    read(
        &format!("SELECT {COLUMNS} FROM bdr.nodes ORDER BY node_name"),
        &[],
    )
    .or_raise_as(ApplyError::spi)
}

pub fn local() -> Option<Node> {
    read(
        &format!("SELECT {COLUMNS} FROM bdr.nodes WHERE is_local"),
        &[],
    )
    .or_raise_as(ApplyError::spi)
    .into_iter()
    .next()
}

pub fn by_name(name: &str) -> Option<Node> {
    read(
        &format!("SELECT {COLUMNS} FROM bdr.nodes WHERE node_name = $1"),
        &[name.into()],
    )
    .or_raise_as(ApplyError::spi)
    .into_iter()
    .next()
}

/// Share-lock node `name`'s row until the end of the transaction; whether it is there and
/// not parted (read after any concurrent change of it committed).
pub fn lock_if_not_parted(name: &str) -> bool {
    Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT FROM bdr.nodes \
          WHERE node_name = $1 AND node_state <> 'parted' FOR SHARE)",
        &[name.into()],
    )
    .or_raise_as(ApplyError::spi)
    .unwrap_or(false)
}

/// Mark every node parted here: what `bdr.part` does on the parted node when it reaches
/// it. The supervisor then stops this database's workers, and its janitor drops the
/// slots and origins they used.
pub fn mark_all_parted() {
    Spi::run("UPDATE bdr.nodes SET node_state = 'parted' WHERE node_state <> 'parted'")
        .or_raise_as(ApplyError::spi);
}

/// Mark node `name` parted here: what `bdr.part` does on every member it reaches. The
/// supervisor then stops the apply worker from it, and its janitor drops the slot and
/// origin kept here for it.
pub fn mark_parted(name: &str) {
    Spi::run_with_args(
        "UPDATE bdr.nodes SET node_state = 'parted' WHERE node_name = $1",
        &[name.into()],
    )
    .or_raise_as(ApplyError::spi);
}

/// Forget the nodes listed as parted here (a parted node creating or joining a group
/// again).
pub fn forget_parted() {
    Spi::run("DELETE FROM bdr.nodes WHERE node_state = 'parted'").or_raise_as(ApplyError::spi);
}

/// Insert or replace a node row.
pub fn upsert(n: &Node) {
    Spi::run_with_args(
        "INSERT INTO bdr.nodes (node_name, node_id, node_kind, node_state, node_dsn, is_local, \
           node_number, hub_node) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (node_name) DO UPDATE SET node_id = EXCLUDED.node_id, \
           node_kind = EXCLUDED.node_kind, node_state = EXCLUDED.node_state, \
           node_dsn = EXCLUDED.node_dsn, is_local = EXCLUDED.is_local, \
           node_number = EXCLUDED.node_number, hub_node = EXCLUDED.hub_node",
        &[
            n.name.as_str().into(),
            n.id.into(),
            n.kind.as_str().into(),
            n.state.as_str().into(),
            n.dsn.as_str().into(),
            n.is_local.into(),
            n.number.into(),
            n.hub.as_deref().into(),
        ],
    )
    .or_raise_as(ApplyError::spi);
}

/// The current database's OID.
pub fn my_database_oid() -> u32 {
    crate::pg::database_oid()
}
