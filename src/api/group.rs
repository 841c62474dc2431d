//! Group formation: `bdr.group_create`, `bdr.group_join`, `bdr.wait_for_join`.
//!
//! `group_join` follows DESIGN.md §4 so that the joining node J misses no transaction of
//! any member, including ones committed while the join runs:
//!
//! 1. Check every input and that every member is reachable (else fail, listing them).
//! 2. Register J on every member as `joining`.
//! 3. On every member Mi other than the join source S: create J's slot (point L_i), then
//!    commit a small synchronisation message after it and wait until S has applied it, so
//!    S's origin progress for Mi has passed L_i.
//! 4. Read S's per-origin progress P_i, *then* create J's slot on S exporting a snapshot
//!    (reading after could lose a transaction; reading before can only re-deliver one,
//!    which the apply stage handles idempotently).
//! 5. On J: create the replication origins, and J's own slots for every member (before
//!    any copied row, so nothing committed on J afterwards is missed).
//! 6. Copy the schema (when J has no tables) with `pg_dump --snapshot`, then every table's
//!    rows and S's tombstones, in S's snapshot, each with the version it has on S
//!    (`join_copy`). The copy commits under J's origins, so J's own slots do not send the
//!    copied rows back out.
//! 7. Set J's origin for S to S's slot point and for each Mi to P_i; record every member
//!    in J's catalog; mark J active on every member; start J's supervisor.
//!
//! Any failure undoes what was done remotely (slots, catalog rows) and locally, so a failed
//! join leaves no slot, origin or catalog row behind.

use crate::catalog::nodes::{self, Node, NodeKind, NodeState};
use crate::error::{raise, PgError};
use crate::pg::libpq::{quote_ident, Conn, LibpqError};
use crate::pg::shmem;
use bdr_core::names::{origin_name, slot_name};
use bdr_core::replication::REPLICATED_TABLES_SQL;
use bdr_core::{dsn, wire};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use std::time::{Duration, Instant};

/// Errors of group formation, each with a hint.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("invalid node name \"{0}\"")]
    BadName(String),
    #[error("invalid connection string: {0}")]
    BadDsn(String),
    #[error("this node is already node \"{0}\" of a bdr group")]
    AlreadyMember(String),
    #[error("node_external_dsn does not reach this node: {0}")]
    DsnNotLocal(String),
    #[error("could not connect to the join source: {0}")]
    SourceUnreachable(String),
    #[error("the join source is not a bdr node: {0}")]
    SourceNotNode(String),
    #[error("join_using_dsn points at this node itself")]
    JoinSelf,
    #[error("a node named \"{0}\" is already a member of the group")]
    DuplicateName(String),
    #[error("cannot join: {} unreachable: {}", if .0.len() == 1 { "a member is" } else { "members are" }, .0.join(", "))]
    Unreachable(Vec<String>),
    #[error("cannot join: table {0} on this node already holds rows")]
    LocalRows(String),
    #[error("node kind \"{0}\" is not supported")]
    BadKind(String),
    #[error("topology \"{0}\" is not supported for this node")]
    BadTopology(String),
    #[error("cannot join with this topology: {0}")]
    Topology(String),
    #[error("join failed on node \"{node}\": {message}")]
    Remote { node: String, message: String },
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout { what: String, secs: u64 },
    #[error("this node is not a member of a bdr group")]
    NotMember,
    #[error("\"{0}\" is not a peer node of this group")]
    UnknownPeer(String),
    #[error("a node cannot part itself")]
    PartSelf,
    #[error("bdr.promote() must run on the standby \"{0}\" itself")]
    PromoteElsewhere(String),
    #[error("node \"{0}\" is a bdr standby: it does not accept writes")]
    StandbyReadOnly(String),
    #[error("invalid node number {0}")]
    BadNodeNumber(i32),
    #[error("node number {number} is taken by {by}")]
    NodeNumberTaken { number: i32, by: String },
    #[error("no node number is left: the group has used all 1024")]
    NoNodeNumberLeft,
    #[error("this node's clock is {secs} s behind the newest row version it copied")]
    ClockBehind { secs: i64 },
}

impl PgError for GroupError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        use GroupError::*;
        match self {
            BadName(_) | BadDsn(_) | BadKind(_) | BadTopology(_) | JoinSelf | BadNodeNumber(_) => {
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE
            }
            AlreadyMember(_) | DuplicateName(_) | NodeNumberTaken { .. } => {
                PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT
            }
            NoNodeNumberLeft => PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            ClockBehind { .. } => PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            DsnNotLocal(_) | SourceUnreachable(_) | Unreachable(_) => {
                PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE
            }
            UnknownPeer(_) => PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            PartSelf | PromoteElsewhere(_) => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            StandbyReadOnly(_) => PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            SourceNotNode(_) | NotMember | LocalRows(_) | Topology(_) => {
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
            Remote { .. } => PgSqlErrorCode::ERRCODE_EXTERNAL_ROUTINE_EXCEPTION,
            Timeout { .. } => PgSqlErrorCode::ERRCODE_QUERY_CANCELED,
        }
    }
    fn hint(&self) -> Option<String> {
        use GroupError::*;
        Some(match self {
            BadName(_) => "Node names are 1 to 48 characters: lower-case letters, digits and underscores.".into(),
            BadDsn(_) => "Use the key=value form, e.g. 'host=node1 port=5432 dbname=mydb'.".into(),
            AlreadyMember(_) => "Run bdr.part() first to leave the current group.".into(),
            DsnNotLocal(_) => "node_external_dsn must be how the other nodes reach this node and this database; check host, port and dbname.".into(),
            SourceUnreachable(_) => "Check join_using_dsn, that the server is running and that pg_hba.conf allows this node (including replication connections).".into(),
            SourceNotNode(_) => "Run CREATE EXTENSION bdr and bdr.group_create() on the join source first.".into(),
            JoinSelf => "join_using_dsn must point at a node that is already a member of the group.".into(),
            DuplicateName(_) => "Choose another local_node_name, or bdr.part() the old node first.".into(),
            Unreachable(_) => "Every member must be reachable to join without losing a transaction; start them or bdr.part() the ones that are gone.".into(),
            LocalRows(_) => "A joining node receives every row from the join source; empty the local tables, or drop them and let the join copy the schema.".into(),
            BadKind(_) => "node_kind must be 'active', 'standby' or 'witness'.".into(),
            BadTopology(_) => "topology is 'mesh' (the default: every data node streams with every other) or 'spoke' (an active node that streams with the join source, its hub, only).".into(),
            Topology(_) => "See docs/runbook.md, \"Hub and spoke\".".into(),
            Remote { .. } => "Nothing was left behind; fix the cause on that node and run group_join again.".into(),
            Timeout { .. } => "Check that the apply workers are running: SELECT * FROM bdr.apply_workers().".into(),
            NotMember => "Run bdr.group_create() or bdr.group_join() first.".into(),
            UnknownPeer(_) => "See SELECT node_name FROM bdr.nodes WHERE NOT is_local.".into(),
            PartSelf => "Run bdr.part() on another member of the group.".into(),
            PromoteElsewhere(_) => "Connect to the standby and run SELECT bdr.promote('<its name>') there.".into(),
            StandbyReadOnly(_) => "Write on an active node, or promote this node with bdr.promote().".into(),
            BadNodeNumber(_) => "node_number is 0 to 1023, or NULL to take the smallest free one.".into(),
            NodeNumberTaken { .. } => "Nothing was left behind. Run group_join again (node_number := NULL takes the smallest free number); see SELECT node_name, node_number FROM bdr.nodes.".into(),
            ClockBehind { .. } => "Nothing was left behind. A write here to a row stamped in this node's future would be lost on every other node: synchronise this node's clock (NTP) and run group_join again.".into(),
            NoNodeNumberLeft => "Numbers of parted nodes are not reused while they are listed in bdr.nodes (their ids may still be in flight); a group has at most 1024 nodes over its life.".into(),
        })
    }
}

fn fail(e: GroupError) -> ! {
    raise(&e)
}

fn check_name(name: &str) {
    let ok = !name.is_empty()
        && name.len() <= 48
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok {
        fail(GroupError::BadName(name.into()));
    }
}

fn check_dsn(d: &str) {
    if let Err(e) = dsn::parse(d) {
        fail(GroupError::BadDsn(e));
    }
}

/// A stable node id from the name and this server's identity.
fn node_id(name: &str) -> i64 {
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
fn identity(c: &mut Conn) -> Result<String, LibpqError> {
    Ok(c.query_value(
        "SELECT (SELECT system_identifier FROM pg_control_system())::text || '/' || \
             (SELECT oid FROM pg_database WHERE datname = current_database())::text",
    )?
    .unwrap_or_default())
}

fn local_identity() -> String {
    nodes::read_one::<String>(
        "SELECT (SELECT system_identifier FROM pg_control_system())::text || '/' || \
         (SELECT oid FROM pg_database WHERE datname = current_database())::text",
    )
    .unwrap_or_default()
}

fn check_reaches_here(d: &str) {
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
fn refuse_unidentifiable_writes() {
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
    local_node_name: &str,
    node_external_dsn: &str,
    node_number: default!(Option<i32>, "NULL"),
) {
    crate::error::check_server_config().unwrap_or_else(|e| raise(&e));
    check_name(local_node_name);
    check_dsn(node_external_dsn);
    let number = check_node_number(node_number).unwrap_or(0);
    if let Some(n) = nodes::local() {
        already_member_notice(&n, local_node_name);
        return;
    }
    check_reaches_here(node_external_dsn);
    refuse_unidentifiable_writes();
    crate::catalog::tombstones::attach_tombstone_triggers();
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

fn check_node_number(n: Option<i32>) -> Option<i32> {
    if let Some(v) = n {
        if !(0..=bdr_core::snowflake::MAX_NODE_NUMBER as i32).contains(&v) {
            fail(GroupError::BadNodeNumber(v));
        }
    }
    n
}

/// The node number for a joining node: `wanted` if no member lists it, else the smallest
/// number no member lists (`used`: (number, node name) from every member's catalog,
/// parted nodes included, so their numbers are not reused).
fn choose_node_number(wanted: Option<i32>, used: &[(i32, String)]) -> i32 {
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

/// A member reached during a join.
struct Member {
    node: Node,
    conn: Conn,
    dboid: u32,
}

/// What a join did remotely, undone if it fails.
struct Undo {
    joining: String,
    /// (member dsn, slot name)
    slots: Vec<(String, String)>,
    /// member dsns where J was registered
    registered: Vec<String>,
    /// J's own dsn, for its local slots and origins
    local_dsn: String,
    local_slots: Vec<String>,
    local_origins: Vec<String>,
    /// the join source while its apply is paused
    paused: Option<String>,
    /// J's copying session (backend pid) and the tables it may have written: the copy
    /// commits as it goes, so a failed join ends that session and empties them again
    copy_pid: Option<i32>,
    copied_tables: Vec<String>,
    done: bool,
}

/// Drop slot `$1` if it exists.
pub const DROP_SLOT_SQL: &str =
    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1";
/// Drop replication origin `$1` if it exists.
pub const DROP_ORIGIN_SQL: &str =
    "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname = $1";

impl Drop for Undo {
    fn drop(&mut self) {
        if let Some(d) = &self.paused {
            if let Ok(mut c) = Conn::connect(d, "bdr_join_undo") {
                let _ = c.exec("SELECT bdr.apply_resume()");
            }
        }
        if self.done {
            return;
        }
        for (d, slot) in &self.slots {
            if let Ok(mut c) = Conn::connect(d, "bdr_join_undo") {
                let _ = c.exec_params(DROP_SLOT_SQL, &[slot]);
            }
        }
        for d in &self.registered {
            if let Ok(mut c) = Conn::connect(d, "bdr_join_undo") {
                let _ = c.exec_params(
                    "DELETE FROM bdr.nodes WHERE node_name = $1",
                    &[&self.joining],
                );
            }
        }
        if let Ok(mut c) = Conn::connect(&self.local_dsn, "bdr_join_undo") {
            if let Some(pid) = self.copy_pid {
                // Its open transaction would block the TRUNCATE, and it holds an origin.
                let _ = c.exec(&format!("SELECT pg_terminate_backend({pid}, 10000)"));
                if !self.copied_tables.is_empty() {
                    let _ = c.exec(&format!(
                        "SET session_replication_role = replica; TRUNCATE {}; \
                         DELETE FROM bdr.tombstones",
                        self.copied_tables.join(", ")
                    ));
                }
            }
            for slot in &self.local_slots {
                let _ = c.exec_params(DROP_SLOT_SQL, &[slot]);
            }
            for o in &self.local_origins {
                let _ = c.exec_params(DROP_ORIGIN_SQL, &[o]);
            }
        }
    }
}

fn remote_err(node: &str) -> impl Fn(LibpqError) -> GroupError + '_ {
    move |e| GroupError::Remote {
        node: node.to_string(),
        message: e.to_string(),
    }
}

fn dboid_of(c: &mut Conn) -> Result<u32, LibpqError> {
    Ok(
        c.query_value("SELECT oid FROM pg_database WHERE datname = current_database()")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    )
}

fn lsn_of(v: Option<String>) -> u64 {
    v.as_deref().and_then(wire::parse_lsn).unwrap_or(0)
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

/// Longest time a join holds its source's apply paused: the source's workers resume by
/// themselves after it, even if the joining backend died without undoing anything.
const JOIN_PAUSE_LIMIT_SECS: u64 = 60;

/// `application_name` of a join's sessions on the members: while one is connected, the
/// members' janitor keeps what the join of `joining` created (see `workers::supervisor`).
pub fn join_application_name(joining: &str) -> String {
    format!("bdr_join:{joining}")
}

/// Run on the join source while its apply is paused: the time before which no change
/// that the joining node can still receive was committed (see `join_copy`): the least of
/// each active member's last commit the source applied and the source's clock, minus a
/// second for clock steps; `-infinity` when a member's last applied commit is not known.
const COPY_HORIZON_SQL: &str = "\
    SELECT CASE WHEN coalesce(bool_and(w.last_applied_commit_time IS NOT NULL), true) \
             THEN to_char((least(min(w.last_applied_commit_time), clock_timestamp()) \
                           - interval '1 second') AT TIME ZONE 'UTC', \
                          'YYYY-MM-DD HH24:MI:SS.US') || '+00' \
             ELSE '-infinity' END \
      FROM bdr.nodes n LEFT JOIN bdr.apply_workers() w ON w.peer = n.node_name \
     WHERE NOT n.is_local AND n.node_kind = 'active' AND n.node_state = 'active'";

/// A client program (`pg_dump`, `psql`) connecting with `dsn`, with no secret on its
/// command line (every local user can read it in `/proc`): see [`dsn::for_client`]. The
/// returned guard removes the 0600 service file, if one was needed, when dropped.
fn client_command(
    program: &str,
    dsn_text: &str,
) -> Result<(std::process::Command, Option<TempFile>), String> {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "bdr_client_{}_{}.conf",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    let conn = dsn::for_client(dsn_text, &path.to_string_lossy())?;
    let file = match &conn.service_file {
        Some(text) => Some(TempFile::create(path, text)?),
        None => None,
    };
    let mut cmd = std::process::Command::new(crate::pg::bgw::pg_bindir().join(program));
    cmd.envs(conn.env.iter().map(|(k, v)| (k, v)));
    cmd.arg("-d").arg(conn.argv_dsn);
    Ok((cmd, file))
}

/// A file only this OS user can read, removed when dropped.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn create(path: std::path::PathBuf, text: &str) -> Result<TempFile, String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| format!("creating {}: {e}", path.display()))?;
        let file = TempFile(path);
        f.write_all(text.as_bytes())
            .map_err(|e| format!("writing {}: {e}", file.0.display()))?;
        Ok(file)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Copy the schema of `source_dsn` (as of `snapshot`) into `target_dsn`.
fn copy_schema(source_dsn: &str, target_dsn: &str, snapshot: &str) -> Result<(), String> {
    use std::process::Stdio;
    let (mut dump, _dump_secrets) = client_command("pg_dump", source_dsn)?;
    let (mut restore, _restore_secrets) = client_command("psql", target_dsn)?;
    // The copied schema is already on every member: it must not be replicated again.
    restore.env("PGOPTIONS", "-c bdr.ddl_replication=off");
    let mut dump = dump
        .args([
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            "--no-publications",
            "--no-subscriptions",
            "--exclude-schema=bdr",
        ])
        .arg(format!("--snapshot={snapshot}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("pg_dump: {e}"))?;
    let restore = restore
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
        .stdin(dump.stdout.take().expect("piped"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("psql: {e}"))?;
    let dumped = dump
        .wait_with_output()
        .map_err(|e| format!("pg_dump: {e}"))?;
    if !dumped.status.success() {
        return Err(format!(
            "pg_dump failed: {}",
            String::from_utf8_lossy(&dumped.stderr).trim()
        ));
    }
    if !restore.status.success() {
        return Err(format!(
            "restoring the schema failed: {}",
            String::from_utf8_lossy(&restore.stderr).trim()
        ));
    }
    Ok(())
}

/// Join the group that the node at `join_using_dsn` belongs to.
#[pg_extern]
pub fn group_join(
    local_node_name: &str,
    node_external_dsn: &str,
    join_using_dsn: &str,
    node_kind: default!(&str, "'active'"),
    node_number: default!(Option<i32>, "NULL"),
    topology: default!(&str, "'mesh'"),
) {
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
    let standby = node_kind == "standby";
    // A standby's state is 'standby' once joined; an active node's is 'active'.
    let joined_state = if standby { "standby" } else { "active" };
    if let Some(n) = nodes::local() {
        already_member_notice(&n, local_node_name);
        return;
    }
    check_reaches_here(node_external_dsn);
    let me = local_identity();
    let j = local_node_name;

    // 1. The join source and the members it knows.
    let mut src = Conn::connect(join_using_dsn, "bdr_join")
        .unwrap_or_else(|e| fail(GroupError::SourceUnreachable(e.to_string())));
    if identity(&mut src).unwrap_or_default() == me {
        fail(GroupError::JoinSelf);
    }
    let rows = src
        .exec(
            "SELECT node_name, node_id::text, node_kind, node_state, node_dsn, is_local::text, \
                    node_number::text, hub_node \
             FROM bdr.nodes WHERE node_state NOT IN ('parting', 'parted') ORDER BY node_name",
        )
        .unwrap_or_else(|e| fail(GroupError::SourceNotNode(e.to_string())));
    let members: Vec<Node> = rows
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
        .collect();
    let Some(source) = members.iter().find(|n| n.is_local).cloned() else {
        fail(GroupError::SourceNotNode(
            "it has no local node in bdr.nodes".into(),
        ))
    };
    if members.iter().any(|n| n.name == j) {
        fail(GroupError::DuplicateName(j.into()));
    }
    check_topology(&members, &source, node_kind, spoke);
    let hub = spoke.then(|| source.name.clone());
    drop(src);
    let mut unreachable = Vec::new();
    let mut reached = Vec::new();
    for n in &members {
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
    // The node number: the smallest one no member lists (parted nodes included). Two
    // joins at once may pick the same one; the UNIQUE constraint on bdr.nodes.node_number
    // then fails the second registration (step 2) on a member both reached.
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
    let my_number = choose_node_number(wanted_number, &used);

    // Local checks: tables with rows, and whether the schema must be copied.
    let mut jconn = Conn::connect(node_external_dsn, "bdr_join_local")
        .unwrap_or_else(|e| fail(GroupError::DsnNotLocal(e.to_string())));
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
    let copy_schema_needed = local_tables.is_empty();
    let my_dboid = nodes::my_database_oid();
    let my_id = node_id(j);

    let mut undo = Undo {
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
    };

    // 2. Register J everywhere as joining.
    for m in reached.iter_mut() {
        m.conn
            .exec_params(
                "INSERT INTO bdr.nodes (node_name, node_id, node_kind, node_state, node_dsn, is_local, \
                   node_number, hub_node) VALUES ($1, $2, $3, 'joining', $4, false, $5::int, \
                   nullif($6, ''))",
                &[
                    j,
                    &my_id.to_string(),
                    node_kind,
                    node_external_dsn,
                    &my_number.to_string(),
                    hub.as_deref().unwrap_or(""),
                ],
            )
            .unwrap_or_else(|e| {
                // Another join took the same number since we looked.
                if e.to_string().contains("nodes_node_number_key") {
                    fail(GroupError::NodeNumberTaken {
                        number: my_number,
                        by: "a node joining at the same time".into(),
                    })
                }
                fail(remote_err(&m.node.name)(e))
            });
        undo.registered.push(m.node.dsn.clone());
    }

    // A witness holds no data, applies nothing and sends nothing: it only votes
    // (bdr.minimum_nodes). No slots, no copy, no origins: registered, it is a member.
    if node_kind == "witness" {
        let me = Node {
            name: j.into(),
            id: my_id,
            kind: nodes::kind_from(node_kind),
            state: NodeState::Active,
            dsn: node_external_dsn.into(),
            is_local: true,
            number: Some(my_number),
            hub: None,
        };
        write_catalog_and_go(&members, &me, &mut reached);
        undo.done = true;
        crate::workers::launcher::ensure_supervisor(nodes::my_database_oid());
        return;
    }

    // The members J streams with: they get a slot for J and J one for them (a witness
    // streams nothing; a spoke streams with its hub only; a standby member follows the
    // mesh members).
    let me_for_links = Node {
        name: j.into(),
        id: my_id,
        kind: NodeKind::Active,
        state: NodeState::Joining,
        dsn: String::new(),
        is_local: true,
        number: None,
        hub: hub.clone(),
    };
    let streams_with: Vec<String> = me_for_links
        .links(&members)
        .chain(
            members
                .iter()
                .filter(|n| n.kind == NodeKind::Standby && !spoke),
        )
        .map(|n| n.name.clone())
        .collect();
    // 3. J's slot on every other member, and S past it.
    let src_dboid = reached
        .iter()
        .find(|m| m.node.name == source.name)
        .map(|m| m.dboid)
        .expect("the source is a member");
    let mut sync_targets = Vec::new();
    // A standby member sends nothing: J does not stream from it (no slot there) and S
    // applies nothing from it (nothing to wait for).
    for m in reached
        .iter_mut()
        .filter(|m| m.node.name != source.name && m.node.kind == NodeKind::Active)
        .filter(|m| streams_with.contains(&m.node.name))
    {
        let slot = slot_name(m.dboid, j);
        m.conn
            .exec_params(
                "SELECT lsn FROM pg_create_logical_replication_slot($1, 'bdr')",
                &[&slot],
            )
            .unwrap_or_else(|e| fail(remote_err(&m.node.name)(e)));
        undo.slots.push((m.node.dsn.clone(), slot));
        let sync = m
            .conn
            .query_value_params(
                "SELECT pg_logical_emit_message(true, 'bdr.sync', $1::text)",
                &[&format!("join {j}")],
            )
            .unwrap_or_else(|e| fail(remote_err(&m.node.name)(e)));
        sync_targets.push((m.node.name.clone(), lsn_of(sync)));
    }
    let src_m = reached
        .iter_mut()
        .find(|m| m.node.name == source.name)
        .expect("the source is a member");
    let deadline = Instant::now() + Duration::from_secs(120);
    for (mi, target) in &sync_targets {
        let origin = origin_name(src_dboid, mi);
        loop {
            let p = src_m
                .conn
                .query_value_params(
                    "SELECT remote_lsn FROM pg_replication_origin_status WHERE external_id = $1",
                    &[&origin],
                )
                .unwrap_or_else(|e| fail(remote_err(&source.name)(e)));
            if lsn_of(p) > *target {
                break;
            }
            if Instant::now() > deadline {
                fail(GroupError::Timeout {
                    what: format!(
                        "node \"{}\" to apply the changes of node \"{mi}\"",
                        source.name
                    ),
                    secs: 120,
                });
            }
            pgrx::check_for_interrupts!();
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    // 4. P_i before the snapshot, then J's slot on S with the snapshot. S's apply is
    // paused meanwhile, so P_i is exactly what the snapshot contains: no re-delivery.
    src_m
        .conn
        .exec(&format!(
            "SELECT bdr.apply_pause(NULL, {JOIN_PAUSE_LIMIT_SECS})"
        ))
        .unwrap_or_else(|e| fail(remote_err(&source.name)(e)));
    undo.paused = Some(source.dsn.clone());
    let deadline = Instant::now() + Duration::from_secs(JOIN_PAUSE_LIMIT_SECS - 10);
    loop {
        let busy = src_m
            .conn
            .query_value("SELECT count(*) FROM bdr.apply_workers() WHERE state = 'streaming'")
            .unwrap_or_else(|e| fail(remote_err(&source.name)(e)));
        if busy.as_deref() == Some("0") {
            break;
        }
        if Instant::now() > deadline {
            fail(GroupError::Timeout {
                what: format!("node \"{}\" to pause its apply workers", source.name),
                secs: JOIN_PAUSE_LIMIT_SECS - 10,
            });
        }
        pgrx::check_for_interrupts!();
        std::thread::sleep(Duration::from_millis(20));
    }
    let progress: Vec<(String, u64)> = src_m
        .conn
        .exec("SELECT external_id, remote_lsn::text FROM pg_replication_origin_status")
        .unwrap_or_else(|e| fail(remote_err(&source.name)(e)))
        .into_iter()
        .map(|r| (r[0].clone().unwrap_or_default(), lsn_of(r[1].clone())))
        .collect();
    // The copy's horizon (src/api/join_copy.rs): every change J can still receive is newer.
    let horizon = src_m
        .conn
        .query_value(COPY_HORIZON_SQL)
        .unwrap_or_else(|e| fail(remote_err(&source.name)(e)))
        .unwrap_or_else(|| "-infinity".into());
    let mut repl = Conn::connect(
        &dsn::with_default(&source.dsn, "replication", "database"),
        "bdr_join_snapshot",
    )
    .unwrap_or_else(|e| fail(remote_err(&source.name)(e)));
    let src_slot = slot_name(src_dboid, j);
    let created = repl
        .exec(&format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL bdr EXPORT_SNAPSHOT",
            quote_ident(&src_slot)
        ))
        .unwrap_or_else(|e| fail(remote_err(&source.name)(e)));
    undo.slots.push((source.dsn.clone(), src_slot));
    // The pause must have held until the slot existed (its time limit may have ended it).
    let resumed = src_m
        .conn
        .query_value("SELECT count(*) FROM bdr.apply_workers() WHERE state = 'streaming'")
        .unwrap_or_else(|e| fail(remote_err(&source.name)(e)));
    if resumed.as_deref() != Some("0") {
        fail(GroupError::Timeout {
            what: format!(
                "node \"{}\" to create the joining node's slot while its apply was paused",
                source.name
            ),
            secs: JOIN_PAUSE_LIMIT_SECS,
        });
    }
    src_m
        .conn
        .exec("SELECT bdr.apply_resume()")
        .unwrap_or_else(|e| fail(remote_err(&source.name)(e)));
    undo.paused = None;
    let consistent_point = lsn_of(created[0][1].clone());
    let snapshot = created[0][2].clone().unwrap_or_default();

    // 5. J's origins and J's slots for every member.
    let mut origin_points = vec![(origin_name(my_dboid, &source.name), consistent_point)];
    for m in reached
        .iter()
        .filter(|m| m.node.name != source.name && m.node.kind == NodeKind::Active)
        .filter(|m| streams_with.contains(&m.node.name))
    {
        let p = progress
            .iter()
            .find(|(o, _)| *o == origin_name(src_dboid, &m.node.name))
            .map(|(_, l)| *l)
            .unwrap_or(0);
        origin_points.push((origin_name(my_dboid, &m.node.name), p));
    }
    for (o, _) in &origin_points {
        jconn
            .exec_params(
                "SELECT pg_replication_origin_create($1::text) \
                 WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = $1::text)",
                &[o],
            )
            .unwrap_or_else(|e| fail(remote_err(j)(e)));
        undo.local_origins.push(o.clone());
    }
    // A standby sends nothing: its slots are created when it is promoted.
    for m in reached
        .iter()
        .filter(|m| !standby && streams_with.contains(&m.node.name))
    {
        let slot = slot_name(my_dboid, &m.node.name);
        jconn
            .exec_params(
                "SELECT pg_create_logical_replication_slot($1, 'bdr')",
                &[&slot],
            )
            .unwrap_or_else(|e| fail(remote_err(j)(e)));
        undo.local_slots.push(slot);
    }

    // 6. Schema and rows, in S's snapshot.
    if copy_schema_needed {
        copy_schema(&source.dsn, node_external_dsn, &snapshot).unwrap_or_else(|e| {
            fail(GroupError::Remote {
                node: j.into(),
                message: e,
            })
        });
    }
    let mut reader = Conn::connect(&source.dsn, "bdr_join_copy")
        .unwrap_or_else(|e| fail(remote_err(&source.name)(e)));
    reader
        // Versions travel as text: one unambiguous form.
        .exec("SET DateStyle = ISO; SET TimeZone = 'UTC'")
        .and_then(|_| reader.exec("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
        .and_then(|_| {
            // A utility statement takes no parameters: the name is checked instead.
            reader.exec(&format!(
                "SET TRANSACTION SNAPSHOT '{}'",
                snapshot_name(&snapshot)
            ))
        })
        .unwrap_or_else(|e| fail(remote_err(&source.name)(e)));
    let tables: Vec<(String, String)> = reader
        .exec(REPLICATED_TABLES_SQL)
        .unwrap_or_else(|e| fail(remote_err(&source.name)(e)))
        .into_iter()
        .map(|t| {
            (
                t[0].clone().unwrap_or_default(),
                t[1].clone().unwrap_or_default(),
            )
        })
        .collect();
    // Rows keep their versions (src/api/join_copy.rs), committed under J's origins so
    // J's slots never send them back out.
    let copy_pid = jconn
        .exec("SET session_replication_role = replica")
        .and_then(|_| jconn.query_value("SELECT pg_backend_pid()"))
        .unwrap_or_else(|e| fail(remote_err(j)(e)));
    undo.copy_pid = copy_pid.and_then(|p| p.parse().ok());
    undo.copied_tables = tables
        .iter()
        .map(|(s, n)| format!("{}.{}", quote_ident(s), quote_ident(n)))
        .collect();
    let target = crate::api::join_copy::Target {
        source: &source.name,
        joining: j,
        source_origin: origin_points[0].0.clone(),
        origins: reached
            .iter()
            .map(|m| m.node.name.clone())
            .filter(|n| n != j)
            .filter_map(|n| {
                let o = origin_name(my_dboid, &n);
                origin_points.iter().any(|(p, _)| *p == o).then_some((n, o))
            })
            .collect(),
        // Nor may it be after this node's clock: this node's own later writes must be
        // newer than every version that was collapsed.
        horizon: jconn
            .query_value_params(
                "SELECT CASE WHEN $1 = '-infinity' THEN $1 ELSE \
                   to_char(least($1::timestamptz, clock_timestamp() - interval '1 second') \
                           AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00' END",
                &[&horizon],
            )
            .unwrap_or_else(|e| fail(remote_err(j)(e)))
            .unwrap_or_else(|| "-infinity".into()),
    };
    let copied = crate::api::join_copy::copy_versioned(&mut reader, &mut jconn, &tables, &target)
        .unwrap_or_else(|e| fail(e));
    pgrx::log!(
        "bdr: join of \"{j}\" copied {} rows and {} tombstones from \"{}\" in {} transactions",
        copied.rows,
        copied.tombstones,
        source.name,
        copied.transactions
    );
    let _ = reader.exec("COMMIT");
    drop(repl);
    if let Some(latest) = &copied.latest {
        wait_for_clock(&mut jconn, j, latest);
    }

    // 7. Origins to their starting points; catalogs; go.
    for (o, lsn) in &origin_points {
        jconn
            .exec_params(
                "SELECT pg_replication_origin_advance($1, $2::pg_lsn)",
                &[o, &wire::format_lsn(*lsn)],
            )
            .unwrap_or_else(|e| fail(remote_err(j)(e)));
    }
    refuse_unidentifiable_writes();
    crate::catalog::tombstones::attach_tombstone_triggers();
    let me = Node {
        name: j.into(),
        id: my_id,
        kind: nodes::kind_from(node_kind),
        state: nodes::state_from(joined_state),
        dsn: node_external_dsn.into(),
        is_local: true,
        number: Some(my_number),
        hub,
    };
    write_local_catalog(&members, &me);
    // Existing tables (created here before the join, or copied with the schema): their
    // serial and identity columns get this node's kinds.
    crate::sequence::apply_default_kinds(None);
    if standby {
        crate::api::lifecycle::set_standby_triggers(true);
    }
    mark_joined(&me, &mut reached);
    undo.done = true;
    crate::workers::launcher::ensure_supervisor(my_dboid);
}

/// Hub and spoke: a spoke joins through the hub, the group's one mesh data node, and
/// nothing else mixes with spokes (a second mesh node would not see the spokes' changes,
/// and a standby would have no stream to follow).
fn check_topology(members: &[Node], source: &Node, kind: &str, spoke: bool) {
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

/// A witness's whole join after registration: its catalog, then joined everywhere.
fn write_catalog_and_go(members: &[Node], me: &Node, reached: &mut [Member]) {
    write_local_catalog(members, me);
    mark_joined(me, reached);
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
