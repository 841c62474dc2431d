//! Errors of group formation and membership (`group_create`, `group_join`, `part`,
//! `promote`, the apply controls): one enum, each variant with its SQLSTATE and hint, used
//! by `api::group`, `api::join` and `api::lifecycle` alike (so none of them imports
//! another for its errors).

use crate::error::{raise, PgError};
use crate::pg::libpq::LibpqError;
use pgrx::PgSqlErrorCode;

/// Errors of group formation, each with a hint.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("{0} must not be NULL")]
    NullArgument(&'static str),
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
    #[error("a node named \"{0}\" was a member of the group and is listed there as parted")]
    NameOfPartedNode(String),
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
            NullArgument(_) | BadName(_) | BadDsn(_) | BadKind(_) | BadTopology(_) | JoinSelf
            | BadNodeNumber(_) => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            AlreadyMember(_) | DuplicateName(_) | NameOfPartedNode(_) | NodeNumberTaken { .. } => {
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
            NullArgument(a) => format!("Pass a value for {a}; docs/sql.md lists each argument and its default."),
            BadName(_) => "Node names are 1 to 48 characters: lower-case letters, digits and underscores.".into(),
            BadDsn(_) => "Use the key=value form, e.g. 'host=node1 port=5432 dbname=mydb'.".into(),
            AlreadyMember(_) => "Run bdr.part() first to leave the current group.".into(),
            DsnNotLocal(_) => "node_external_dsn must be how the other nodes reach this node and this database; check host, port and dbname.".into(),
            SourceUnreachable(_) => "Check join_using_dsn, that the server is running and that pg_hba.conf allows this node (including replication connections).".into(),
            SourceNotNode(_) => "Run CREATE EXTENSION bdr and bdr.group_create() on the join source first.".into(),
            JoinSelf => "join_using_dsn must point at a node that is already a member of the group.".into(),
            NameOfPartedNode(_) => "Join under another name (e.g. node3b): a parted node's name and node number stay reserved while the group lists it, so that ids it issued never repeat. Nothing was left behind.".into(),
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

pub(crate) fn fail(e: GroupError) -> ! {
    raise(&e)
}

/// An argument of a function that is not `STRICT` (it has an optional argument) that must
/// still be given: its value, or a clear error naming it.
pub(crate) fn required<'a>(value: Option<&'a str>, name: &'static str) -> &'a str {
    value.unwrap_or_else(|| fail(GroupError::NullArgument(name)))
}

pub(crate) fn remote_err(node: &str) -> impl Fn(LibpqError) -> GroupError + '_ {
    move |e| GroupError::Remote {
        node: node.to_string(),
        message: e.to_string(),
    }
}
