//! Joining: `bdr.group_join`, DESIGN.md §4, so that the joining node J misses no
//! transaction of any member, including ones committed while the join runs, and applies
//! none twice. Each step is a method of [`Join`]; [`undo::Undo`] takes back what a failed
//! join did ([docs/joining.md](../../../docs/joining.md) has the protocol and why it is
//! safe).
//!
//! 1. Check every input and that every member is reachable (else fail, listing them).
//! 2. Register J on every member as `joining`.
//! 3. On every member Mi J streams with, other than the join source S: create J's slot
//!    (point L_i), then commit a small synchronisation message after it and wait until S
//!    has applied it, so S's origin progress for Mi has passed L_i.
//! 4. With S's apply paused, read S's per-origin progress P_i, *then* create J's slot on S
//!    exporting a snapshot: P_i is exactly what the snapshot contains.
//! 5. On J: create the replication origins, and J's own slots for the members it streams
//!    with (before any copied row, so nothing committed on J afterwards is missed).
//! 6. Copy the schema (when J has no tables) with `pg_dump --snapshot`, then every table's
//!    rows and S's tombstones, in S's snapshot, each with the version it has on S
//!    ([`copy`]). The copy commits under J's origins, so J's own slots do not send the
//!    copied rows back out.
//! 7. Set J's origin for S to S's slot point and for each Mi to P_i; record every member
//!    in J's catalog; mark J active on every member; start J's supervisor.

pub mod copy;
mod members;
mod schema;
mod sync;
mod undo;

use crate::api::group::{
    already_member, check_dsn, check_name, check_node_number, check_reaches_here, node_id,
    refuse_unidentifiable_writes,
};
use crate::api::group_error::{fail, remote_err, required, GroupError};
use crate::catalog::nodes::{self, Node, NodeKind, NodeState};
use crate::error::raise;
use crate::pg::libpq::{quote_ident, Conn, LibpqError};
use bdr_core::names::{origin_name, slot_name};
use bdr_core::replication::REPLICATED_TABLES_SQL;
use bdr_core::wire;
use members::{check_local_tables, check_topology, pick_number, reach, read_source, streams_with};
use pgrx::prelude::*;
use std::time::Duration;
use sync::SourceSnapshot;
use undo::{Member, Undo};

/// Join the group that the node at `join_using_dsn` belongs to.
#[pg_extern]
pub fn group_join(
    local_node_name: Option<&str>,
    node_external_dsn: Option<&str>,
    join_using_dsn: Option<&str>,
    node_kind: default!(Option<&str>, "'active'"),
    node_number: default!(Option<i32>, "NULL"),
    topology: default!(Option<&str>, "'mesh'"),
) {
    let local_node_name = required(local_node_name, "local_node_name");
    let node_external_dsn = required(node_external_dsn, "node_external_dsn");
    let join_using_dsn = required(join_using_dsn, "join_using_dsn");
    let node_kind = required(node_kind, "node_kind");
    let topology = required(topology, "topology");
    crate::error::check_server_config().unwrap_or_else(|e| raise(&e));
    let wanted_number = check_node_number(node_number);
    let spoke = match topology {
        "mesh" => false,
        "spoke" if node_kind == "active" => true,
        _ => fail(GroupError::BadTopology(topology.into())),
    };
    check_name(local_node_name);
    check_dsn(node_external_dsn);
    check_dsn(join_using_dsn);
    if NodeKind::parse(node_kind).is_none() {
        fail(GroupError::BadKind(node_kind.into()));
    }
    if already_member(local_node_name) {
        return;
    }
    check_reaches_here(node_external_dsn);
    let j = local_node_name;

    // 1. The join source, the members it knows, each reached; J's number; J's tables.
    let (members, source) = read_source(join_using_dsn, j);
    check_topology(&members, &source, node_kind, spoke);
    let mut reached = reach(&members, j);
    let my_number = pick_number(&mut reached, wanted_number);
    let mut jconn = Conn::connect(node_external_dsn, "bdr_join_local")
        .unwrap_or_else(|e| fail(GroupError::DsnNotLocal(e.to_string())));
    let copy_schema_needed = check_local_tables(&mut jconn, j);
    let hub = spoke.then(|| source.name.clone());
    let me = Node {
        name: j.into(),
        id: node_id(j),
        kind: nodes::kind_from(node_kind),
        state: NodeState::Joining,
        dsn: node_external_dsn.into(),
        is_local: true,
        number: Some(my_number),
        hub,
    };
    let mut join = Join {
        streams_with: streams_with(&me, &members),
        src_dboid: reached
            .iter()
            .find(|m| m.node.name == source.name)
            .map(|m| m.dboid)
            .expect("the source is a member"),
        my_dboid: nodes::my_database_oid(),
        undo: Undo {
            joining: j.into(),
            slots: Vec::new(),
            registered: Vec::new(),
            local_dsn: node_external_dsn.into(),
            local_slots: Vec::new(),
            local_origins: Vec::new(),
            paused: None,
            copy_pid: None,
            copied_tables: Vec::new(),
            done: false,
        },
        me,
        members,
        source,
        reached,
        jconn,
    };

    join.register();
    if join.me.kind == NodeKind::Witness {
        return join.finish_witness();
    }
    join.sync_members();
    let snap = join.snapshot_on_source();
    let origin_points = join.local_origins_and_slots(&snap);
    join.copy(snap, &origin_points, copy_schema_needed);
    join.finish(&origin_points);
}

/// A join in progress: J (`me`), the members as the source listed them, the sessions to
/// each, and what to undo.
struct Join {
    me: Node,
    members: Vec<Node>,
    source: Node,
    reached: Vec<Member>,
    /// A session on J itself (origins, slots, the copy).
    jconn: Conn,
    /// The members J streams with ([`Node::links`], plus the standbys that follow a mesh).
    streams_with: Vec<String>,
    src_dboid: u32,
    my_dboid: u32,
    undo: Undo,
}

impl Join {
    /// Step 2: register J everywhere as joining.
    fn register(&mut self) {
        let me = &self.me;
        for m in self.reached.iter_mut() {
            m.conn
                .exec_params(
                    "INSERT INTO bdr.nodes (node_name, node_id, node_kind, node_state, node_dsn, \
                       is_local, node_number, hub_node) \
                     VALUES ($1, $2, $3, 'joining', $4, false, $5::int, nullif($6, ''))",
                    &[
                        &me.name,
                        &me.id.to_string(),
                        me.kind.as_str(),
                        &me.dsn,
                        &me.number.unwrap_or_default().to_string(),
                        me.hub.as_deref().unwrap_or(""),
                    ],
                )
                .unwrap_or_else(|e| {
                    // Another join took the same number since we looked.
                    if e.to_string().contains("nodes_node_number_key") {
                        fail(GroupError::NodeNumberTaken {
                            number: me.number.unwrap_or_default(),
                            by: "a node joining at the same time".into(),
                        })
                    }
                    fail(remote_err(&m.node.name)(e))
                });
            self.undo.registered.push(m.node.dsn.clone());
        }
    }

    /// A witness holds no data, applies nothing and sends nothing: it only votes
    /// (bdr.minimum_nodes). No slots, no copy, no origins: registered, it is a member.
    fn finish_witness(mut self) {
        self.me.state = NodeState::Active;
        write_local_catalog(&self.members, &self.me);
        mark_joined(&self.me, &mut self.reached);
        self.undo.done = true;
        crate::workers::launcher::ensure_supervisor(self.my_dboid);
    }

    /// Step 5: J's origins (with the point each starts from) and J's slots for the
    /// members it streams with. A standby sends nothing: its slots are created when it is
    /// promoted.
    fn local_origins_and_slots(&mut self, snap: &SourceSnapshot) -> Vec<(String, u64)> {
        let (j, my_dboid, src_dboid) = (self.me.name.clone(), self.my_dboid, self.src_dboid);
        let mut origin_points = vec![(
            origin_name(my_dboid, &self.source.name),
            snap.consistent_point,
        )];
        for m in self.reached.iter().filter(|m| {
            m.node.name != self.source.name
                && m.node.kind == NodeKind::Active
                && self.streams_with.contains(&m.node.name)
        }) {
            let p = snap
                .progress
                .iter()
                .find(|(o, _)| *o == origin_name(src_dboid, &m.node.name))
                .map(|(_, l)| *l)
                .unwrap_or(0);
            origin_points.push((origin_name(my_dboid, &m.node.name), p));
        }
        for (o, _) in &origin_points {
            self.jconn
                .exec_params(
                    "SELECT pg_replication_origin_create($1::text) \
                     WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = $1::text)",
                    &[o],
                )
                .unwrap_or_else(|e| fail(remote_err(&j)(e)));
            self.undo.local_origins.push(o.clone());
        }
        let standby = self.me.kind == NodeKind::Standby;
        for m in self
            .reached
            .iter()
            .filter(|m| !standby && self.streams_with.contains(&m.node.name))
        {
            let slot = slot_name(my_dboid, &m.node.name);
            // A slot of this name on J can only be left by an earlier join of J that
            // died before its undo ran (a joining node feeds nobody yet, and parting drops
            // its slots): its position is stale, so it goes, and the slot is made anew.
            let dropped = self
                .jconn
                .exec_params(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                      WHERE slot_name = $1 AND active_pid IS NULL",
                    &[&slot],
                )
                .unwrap_or_else(|e| fail(remote_err(&j)(e)));
            if !dropped.is_empty() {
                pgrx::notice!(
                    "bdr: dropped replication slot \"{slot}\" on node \"{j}\", left by an earlier join of it that did not finish"
                );
            }
            self.jconn
                .exec_params(
                    "SELECT pg_create_logical_replication_slot($1, 'bdr')",
                    &[&slot],
                )
                .unwrap_or_else(|e| fail(remote_err(&j)(e)));
            self.undo.local_slots.push(slot);
        }
        origin_points
    }

    /// Step 6: schema and rows, in S's snapshot, rows with their versions
    /// ([`copy::copy_versioned`]), committed under J's origins so J's slots never send
    /// them back out.
    fn copy(&mut self, snap: SourceSnapshot, origin_points: &[(String, u64)], schema: bool) {
        let (j, source) = (self.me.name.clone(), self.source.clone());
        if schema {
            schema::copy_schema(&source.dsn, &self.me.dsn, &snap.snapshot).unwrap_or_else(|e| {
                fail(GroupError::Remote {
                    node: j.clone(),
                    message: e,
                })
            });
        }
        let mut reader =
            Conn::connect(&source.dsn, "bdr_join_copy").unwrap_or_else(on(&source.name));
        reader
            // Versions travel as text: one unambiguous form.
            .exec("SET DateStyle = ISO; SET TimeZone = 'UTC'")
            .and_then(|_| reader.exec("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
            .and_then(|_| {
                // A utility statement takes no parameters: the name is checked instead.
                reader.exec(&format!(
                    "SET TRANSACTION SNAPSHOT '{}'",
                    snapshot_name(&snap.snapshot)
                ))
            })
            .unwrap_or_else(on(&source.name));
        let tables: Vec<(String, String)> = reader
            .exec(REPLICATED_TABLES_SQL)
            .unwrap_or_else(on(&source.name))
            .into_iter()
            .map(|t| {
                (
                    t[0].clone().unwrap_or_default(),
                    t[1].clone().unwrap_or_default(),
                )
            })
            .collect();
        let copy_pid = self
            .jconn
            .exec("SET session_replication_role = replica")
            .and_then(|_| self.jconn.query_value("SELECT pg_backend_pid()"))
            .unwrap_or_else(on(&j));
        self.undo.copy_pid = copy_pid.and_then(|p| p.parse().ok());
        self.undo.copied_tables = tables
            .iter()
            .map(|(s, n)| format!("{}.{}", quote_ident(s), quote_ident(n)))
            .collect();
        let target = copy::Target {
            source: &source.name,
            joining: &j,
            source_origin: origin_points[0].0.clone(),
            origins: self
                .reached
                .iter()
                .map(|m| m.node.name.clone())
                .filter(|n| *n != j)
                .filter_map(|n| {
                    let o = origin_name(self.my_dboid, &n);
                    origin_points.iter().any(|(p, _)| *p == o).then_some((n, o))
                })
                .collect(),
            // Nor may it be after this node's clock: this node's own later writes must be
            // newer than every version that was collapsed.
            horizon: self
                .jconn
                .query_value_params(
                    "SELECT CASE WHEN $1 = '-infinity' THEN $1 ELSE \
                       to_char(least($1::timestamptz, clock_timestamp() - interval '1 second') \
                               AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00' END",
                    &[&snap.horizon],
                )
                .unwrap_or_else(on(&j))
                .unwrap_or_else(|| "-infinity".into()),
        };
        let copied = copy::copy_versioned(&mut reader, &mut self.jconn, &tables, &target)
            .unwrap_or_else(|e| fail(e));
        pgrx::log!(
            "bdr: join of \"{j}\" copied {} rows and {} tombstones from \"{}\" in {} transactions",
            copied.rows,
            copied.tombstones,
            source.name,
            copied.transactions
        );
        let _ = reader.exec("COMMIT");
        // The snapshot was needed until here.
        drop(snap.repl);
        if let Some(latest) = &copied.latest {
            wait_for_clock(&mut self.jconn, &j, latest);
        }
    }

    /// Step 7: origins to their starting points; catalogs; go.
    fn finish(mut self, origin_points: &[(String, u64)]) {
        let j = self.me.name.clone();
        for (o, lsn) in origin_points {
            self.jconn
                .exec_params(
                    "SELECT pg_replication_origin_advance($1, $2::pg_lsn)",
                    &[o, &wire::format_lsn(*lsn)],
                )
                .unwrap_or_else(|e| fail(remote_err(&j)(e)));
        }
        refuse_unidentifiable_writes();
        crate::catalog::tombstones::attach_tombstone_triggers();
        let standby = self.me.kind == NodeKind::Standby;
        // A standby's state is 'standby' once joined; an active node's is 'active'.
        self.me.state = if standby {
            NodeState::Standby
        } else {
            NodeState::Active
        };
        write_local_catalog(&self.members, &self.me);
        // Existing tables (created here before the join, or copied with the schema): their
        // serial and identity columns get this node's kinds.
        crate::sequence::apply_default_kinds(None);
        if standby {
            crate::api::lifecycle::set_standby_triggers(true);
        }
        mark_joined(&self.me, &mut self.reached);
        self.undo.done = true;
        crate::workers::launcher::ensure_supervisor(self.my_dboid);
    }
}

/// For `unwrap_or_else`: fail with the remote error of `node`.
fn on<T>(node: &str) -> impl Fn(LibpqError) -> T + '_ {
    move |e| fail(remote_err(node)(e))
}

/// An exported snapshot's name as the source gave it (hex digits and dashes, e.g.
/// `00000003-00000002-1`); anything else is replaced by a name no snapshot has, so the
/// `SET TRANSACTION SNAPSHOT` fails instead of running something else.
fn snapshot_name(s: &str) -> &str {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        s
    } else {
        "invalid"
    }
}

/// Longest the join waits for this node's clock to pass the versions it copied.
const JOIN_CLOCK_WAIT_SECS: f64 = 60.0;

/// Copied rows may carry versions from this node's future (its clock is behind the node
/// that wrote them). A local write to such a row would be older than the row in
/// last-update-wins, kept here and lost everywhere else: wait until this node's clock
/// passes `latest` (as the apply stage does for each remote transaction), or fail if that
/// is more than [`JOIN_CLOCK_WAIT_SECS`] away.
fn wait_for_clock(jconn: &mut Conn, j: &str, latest: &str) {
    loop {
        let ahead: f64 = jconn
            .query_value_params(
                "SELECT extract(epoch FROM $1::timestamptz - clock_timestamp())::float8",
                &[latest],
            )
            .unwrap_or_else(|e| fail(remote_err(j)(e)))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        if ahead <= 0.0 {
            return;
        }
        if ahead > JOIN_CLOCK_WAIT_SECS {
            fail(GroupError::ClockBehind {
                secs: ahead.ceil() as i64,
            });
        }
        pgrx::check_for_interrupts!();
        std::thread::sleep(Duration::from_secs_f64(ahead.min(1.0)));
    }
}

/// The joining node's own catalog: every member as seen by the source, and itself.
fn write_local_catalog(members: &[Node], me: &Node) {
    // A node parted from a group before (joining again under a new name) forgets it here,
    // at the end: this transaction must not hold a transaction id while the join's own
    // sessions create slots (a slot waits for every transaction that has one).
    nodes::forget_parted();
    for n in members {
        nodes::upsert(&Node {
            is_local: false,
            ..n.clone()
        });
    }
    nodes::upsert(me);
    crate::sequence::forget_node_number_at_commit();
}

/// Mark the joining node `me` as joined (its final state) on every member.
fn mark_joined(me: &Node, reached: &mut [Member]) {
    for m in reached.iter_mut() {
        m.conn
            .exec_params(
                "UPDATE bdr.nodes SET node_state = $1, joined_at = now() WHERE node_name = $2",
                &[me.state.as_str(), &me.name],
            )
            .unwrap_or_else(|e| fail(remote_err(&m.node.name)(e)));
    }
}
