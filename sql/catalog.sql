-- bdr catalog: hand-written, loaded first by CREATE EXTENSION (schema bdr).
-- Tables here belong to the extension, so the output plugin never replicates them.

-- One row per node of the group, as known by this node.
CREATE TABLE bdr.nodes (
    node_name    text PRIMARY KEY
                 CHECK (node_name ~ '^[a-z0-9_]{1,48}$'),
    node_id      bigint NOT NULL UNIQUE,
    node_kind    text NOT NULL DEFAULT 'active'
                 CHECK (node_kind IN ('active', 'standby', 'witness')),
    node_state   text NOT NULL DEFAULT 'joining'
                 CHECK (node_state IN ('joining', 'active', 'standby', 'parted')),
    node_dsn     text NOT NULL,
    -- Small number unique in the group (0-1023), inside every snowflake id the node makes
    -- and the residue of its offset sequences. Never reused while the node is listed,
    -- parted or not, so none of its ids can be made again by another node.
    node_number  int UNIQUE CHECK (node_number BETWEEN 0 AND 1023),
    -- Hub and spoke: the hub a spoke streams through (to and from it only; the hub
    -- forwards every other node's changes). NULL in a full mesh.
    hub_node     text CHECK (hub_node IS NULL OR hub_node ~ '^[a-z0-9_]{1,48}$'),
    is_local     boolean NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now(),
    joined_at    timestamptz
);
COMMENT ON TABLE bdr.nodes IS 'Nodes of the bdr group as known by this node';
-- At most one local node.
CREATE UNIQUE INDEX nodes_one_local ON bdr.nodes (is_local) WHERE is_local;

-- One row per conflict resolved by an apply worker on this node, written in the
-- transaction that applied the remote change.
CREATE TABLE bdr.conflict_history (
    conflict_id          bigserial PRIMARY KEY,
    conflict_time        timestamptz NOT NULL DEFAULT clock_timestamp(),
    local_node           text NOT NULL,
    remote_node          text NOT NULL,
    relation             text NOT NULL,
    conflict_type        text NOT NULL,
    conflict_resolution  text NOT NULL,
    local_commit_time    timestamptz,
    remote_commit_time   timestamptz,
    remote_lsn           pg_lsn,
    remote_xid           xid,
    key                  jsonb,
    local_tuple          jsonb,
    remote_tuple         jsonb,
    detail               text
);
CREATE INDEX conflict_history_time ON bdr.conflict_history (conflict_time);
COMMENT ON TABLE bdr.conflict_history IS 'Every replication conflict resolved on this node';

-- Deleted keys, so that an older change arriving after a delete cannot bring the row back.
-- The version of a tombstone (commit time and node of the delete) is that of the
-- transaction that wrote the tombstone row: its xmin's commit timestamp and origin.
CREATE TABLE bdr.tombstones (
    relid  oid  NOT NULL,
    key    text NOT NULL,
    PRIMARY KEY (relid, key)
);
COMMENT ON TABLE bdr.tombstones IS 'Recently deleted keys (last-update-wins through deletes)';

-- Replicated schema changes made on this node, in the order they ran (src/ddl.rs): the
-- output plugin sends each row, as it is inserted, as a `bdr.ddl` message inside its
-- transaction. Only bdr itself writes here, so no role can forge a replicated DDL. Kept
-- as a history; bdr.ddl_queue_purge(interval) removes old rows.
CREATE TABLE bdr.ddl_queue (
    ddl_id       bigserial PRIMARY KEY,
    queued_at    timestamptz NOT NULL DEFAULT now(),
    role_name    text NOT NULL,
    search_path  text NOT NULL,
    command      text NOT NULL,
    -- The origin session's settings that decide what the statement means (DateStyle,
    -- TimeZone, check_function_bodies...: bdr_core::ddl::STATEMENT_SETTINGS); peers run
    -- it under them. NULL in rows queued before 0.2.0.
    settings     jsonb
);
COMMENT ON TABLE bdr.ddl_queue IS 'Schema changes made on this node and replicated to the others';

-- This node's heartbeat (src/workers/supervisor.rs): one row, rewritten by the supervisor
-- every collection round in which a peer may be waiting for it. The output plugin sends
-- each write as a `bdr.sync` heartbeat message carrying `horizon` (this node's tombstone
-- horizon, PostgreSQL-epoch microseconds). Only bdr itself writes here, so no role can
-- forge a horizon, as it could with pg_logical_emit_message (granted to PUBLIC).
CREATE TABLE bdr.heartbeat (
    only_row  boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    horizon   bigint NOT NULL,
    sent_at   timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE bdr.heartbeat IS 'This node''s last heartbeat to its peers (tombstone horizon)';
