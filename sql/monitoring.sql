-- Monitoring (node_status, health_check) and the BDR 1.x compatibility layer.
-- Loaded after the Rust functions it calls (bdr.apply_workers, bdr.conflict_counters).

-- One row per node as seen from here. Lag is the receiving node's truth (bdr.apply_lag(),
-- rules in core/src/lag.rs): it keeps growing while the worker is paused, erroring,
-- reconnecting or cut off from the peer; NULL (never 0) when unknown.
CREATE FUNCTION bdr.node_status()
RETURNS TABLE (
    node_name             text,
    node_id               bigint,
    node_kind             text,
    node_state            text,
    is_local              boolean,
    reachable             boolean,
    apply_state           text,
    last_error            text,
    last_error_time       timestamptz,
    received_lsn          pg_lsn,
    applied_lsn           pg_lsn,
    replication_lag_bytes numeric,
    replication_lag_time  interval,
    slot_name             text,
    slot_active           boolean,
    retained_wal_bytes    numeric,
    conflicts             jsonb,
    warning               text,
    last_applied_commit_time timestamptz,
    last_contact_time     timestamptz,
    hub_node              text
)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog
AS $$
WITH w AS (SELECT * FROM bdr.apply_workers()),
     l AS (SELECT * FROM bdr.apply_lag()),
     me AS (SELECT oid FROM pg_database WHERE datname = current_database()),
     s AS (SELECT sl.*, pg_wal_lsn_diff(pg_current_wal_lsn(), sl.restart_lsn) AS retained
             FROM pg_replication_slots sl WHERE sl.database = current_database()),
     c AS (SELECT peer, jsonb_object_agg(conflict_type, count) AS by_type
             FROM bdr.conflict_counters() GROUP BY peer),
     pr AS (SELECT * FROM bdr.peers_reached()),
     lo AS (SELECT node_name, hub_node FROM bdr.nodes WHERE is_local),
     r0 AS (
       SELECT n.node_name, n.node_id, n.node_kind, n.node_state, n.is_local,
              w.state AS wstate, w.last_error AS werr, w.last_error_time AS werr_time,
              w.received_lsn::pg_lsn AS wrecv, w.applied_lsn::pg_lsn AS wapplied,
              w.started_at AS wstarted,
              l.lag_bytes, l.lag_us, l.lag_is_bound, l.last_contact_time AS contact,
              l.last_applied_commit_time AS lcommit, l.peer_clock_ahead_us AS ahead_us,
              s.slot_name AS sname, s.active AS sactive, s.retained AS sretained,
              s.wal_status AS swal,
              c.by_type AS cby, pr.last_reached AS preached,
              -- Streams with this node: a data node that is not us (in a hub and spoke,
              -- a spoke streams with its hub only, the hub with its spokes).
              (NOT n.is_local AND n.node_kind = 'active'
               AND CASE WHEN (SELECT hub_node FROM lo) IS NOT NULL
                          THEN n.node_name = (SELECT hub_node FROM lo)
                        WHEN n.hub_node IS NOT NULL
                          THEN n.hub_node = (SELECT node_name FROM lo)
                        ELSE true END) AS linked,
              n.hub_node
         FROM bdr.nodes n
         LEFT JOIN w ON w.peer = n.node_name
         LEFT JOIN l ON l.peer = n.node_name
         LEFT JOIN s ON s.slot_name = 'bdr_' || (SELECT oid FROM me) || '_' || n.node_name
         LEFT JOIN c ON c.peer = n.node_name
         LEFT JOIN pr ON pr.peer = n.node_name),
     r AS (SELECT r0.*, r0.linked AND r0.node_state IN ('active', 'standby') AS feeds_us,
                  NOT r0.is_local AND r0.node_kind = 'active' AND NOT r0.linked AS via_hub
             FROM r0 r0)
SELECT r.node_name, r.node_id, r.node_kind, r.node_state, r.is_local,
       -- Reachable: we heard from it within 10 s, or it streams from us right now.
       r.is_local OR coalesce(r.wstate IN ('streaming', 'paused')
                              AND r.contact > now() - interval '10 seconds', false)
                  OR coalesce(r.sactive, false)
                  OR coalesce(r.preached > now() - interval '10 seconds', false),
       CASE WHEN r.is_local THEN 'local'
            WHEN r.node_kind = 'witness' THEN 'witness'
            WHEN r.via_hub THEN 'via hub'
            ELSE coalesce(r.wstate, 'not running') END,
       r.werr, r.werr_time, r.wrecv, r.wapplied,
       CASE WHEN r.is_local THEN 0 ELSE r.lag_bytes::numeric END,
       CASE WHEN r.is_local THEN interval '0'
            ELSE make_interval(secs => r.lag_us / 1e6) END,
       r.sname, r.sactive, r.sretained,
       coalesce(r.cby, '{}'::jsonb),
       CASE
         WHEN r.is_local THEN NULL
         WHEN r.swal = 'lost'
           THEN format('slot %s for node %s was invalidated (WAL removed): the node must be parted and joined again',
                       r.sname, r.node_name)
         WHEN NOT coalesce(r.sactive, false)
              AND r.sretained > pg_size_bytes(current_setting('bdr.slot_wal_warning_mb'))
           THEN format('slot %s retains %s of WAL for node %s, which is not connected',
                       r.sname, pg_size_pretty(r.sretained), r.node_name)
         WHEN r.wstate = 'erroring' THEN format('apply from %s failing: %s', r.node_name, r.werr)
         WHEN r.feeds_us AND r.wstate IS NULL
           THEN format('no apply worker for node %s', r.node_name)
         WHEN r.feeds_us AND r.lag_us IS NULL
           THEN format('lag from %s unknown: not heard from it since the worker started at %s',
                       r.node_name, r.wstarted)
         WHEN r.feeds_us AND r.lag_is_bound
           THEN format('no confirmation from %s since %s: lag is measured from the last known position',
                       r.node_name, coalesce(r.contact::text, 'the worker started'))
         WHEN r.feeds_us AND r.ahead_us > 0
              AND make_interval(secs => r.ahead_us / 1e6)
                  > current_setting('bdr.max_clock_skew')::interval
           THEN format('the clock of %s runs at least %s s ahead of this node''s (its commit timestamps are in the future here, more than bdr.max_clock_skew = %s): its writes win last-update-wins conflicts they should lose; fix time synchronisation',
                       r.node_name, round(r.ahead_us / 1e6, 1),
                       current_setting('bdr.max_clock_skew'))
         WHEN r.wstate = 'paused' THEN format('apply from %s is paused', r.node_name)
       END,
       r.lcommit, r.contact, r.hub_node
  FROM r
 ORDER BY r.node_name
$$;
COMMENT ON FUNCTION bdr.node_status() IS 'One row per node: state, reachability, apply state, lag, retained WAL, conflicts';

-- Health summary: one row per check, status OK, WARNING or CRITICAL.
CREATE FUNCTION bdr.health_check()
RETURNS TABLE (check_name text, status text, details text)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog
AS $$
  WITH ns AS (SELECT * FROM bdr.node_status()),
       -- A spoke does not stream with the other spokes (apply_state 'via hub'): the hub's
       -- own checks cover those links.
       members AS (SELECT * FROM ns WHERE node_state IN ('active', 'standby')
                     AND apply_state IS DISTINCT FROM 'via hub')
  SELECT 'Node Count',
         CASE WHEN count(*) FILTER (WHERE reachable) = count(*) THEN 'OK'
              WHEN count(*) FILTER (WHERE reachable AND NOT is_local) = 0 AND count(*) > 1
                THEN 'CRITICAL'
              ELSE 'WARNING' END,
         (count(*) FILTER (WHERE reachable))::text || ' of ' || count(*)::text
           || ' nodes reachable'
           || coalesce(' (unreachable: ' || string_agg(node_name, ', ') FILTER (WHERE NOT reachable) || ')', '')
    FROM members
  UNION ALL
  SELECT 'Replication Lag',
         CASE WHEN bool_or(replication_lag_time IS NULL AND NOT is_local AND node_kind = 'active')
                THEN 'WARNING'
              WHEN coalesce(max(replication_lag_time), interval '0') >= interval '5 minutes' THEN 'CRITICAL'
              WHEN coalesce(max(replication_lag_time), interval '0') >= interval '1 minute' THEN 'WARNING'
              ELSE 'OK' END,
         coalesce(max(replication_lag_time), interval '0')::text
           || coalesce(' (unknown for: ' || string_agg(node_name, ', ')
                FILTER (WHERE replication_lag_time IS NULL AND NOT is_local AND node_kind = 'active') || ')', '')
    FROM members
  UNION ALL
  SELECT 'Conflicts (1h)',
         CASE WHEN count(*) < 10 THEN 'OK' ELSE 'WARNING' END,
         count(*)::text || ' conflicts'
    FROM bdr.conflict_history WHERE conflict_time > now() - interval '1 hour'
  UNION ALL
  SELECT 'Slots',
         CASE WHEN bool_or(warning LIKE 'slot % was invalidated%') THEN 'CRITICAL'
              WHEN bool_or(slot_name IS NULL AND NOT is_local AND node_state = 'active'
                           AND node_kind <> 'witness') THEN 'CRITICAL'
              WHEN bool_or(warning LIKE 'slot % retains %') THEN 'WARNING'
              ELSE 'OK' END,
         coalesce(string_agg(warning, '; ') FILTER (WHERE warning LIKE 'slot %'), '')
           || coalesce('slot missing for: ' || string_agg(node_name, ', ')
                FILTER (WHERE slot_name IS NULL AND NOT is_local AND node_state = 'active'
                        AND node_kind <> 'witness'), '')
           || CASE WHEN bool_or(warning LIKE 'slot %' OR (slot_name IS NULL AND NOT is_local
                                AND node_state = 'active' AND node_kind <> 'witness'))
                   THEN '' ELSE 'every member has a slot; none retains WAL for a disconnected node' END
    FROM members
  UNION ALL
  SELECT 'Workers In Error',
         CASE WHEN count(*) = 0 THEN 'OK' ELSE 'CRITICAL' END,
         count(*)::text || ' apply workers erroring'
           || coalesce(': ' || string_agg(peer || ' (' || coalesce(last_error, '') || ')', ', '), '')
    FROM bdr.apply_workers() WHERE state = 'erroring'
  UNION ALL
  SELECT 'Peers Unreachable',
         CASE WHEN count(*) = 0 THEN 'OK'
              WHEN bool_or(coalesce(last_contact_time, 'epoch') < now() - interval '5 minutes') THEN 'CRITICAL'
              ELSE 'WARNING' END,
         CASE WHEN count(*) = 0 THEN 'every active peer heard from within 10 s'
              ELSE string_agg(node_name || ' (last heard ' || coalesce(last_contact_time::text, 'never') || ')', ', ') END
    FROM members
   WHERE NOT is_local AND node_kind IN ('active', 'witness') AND NOT reachable
  UNION ALL
  SELECT 'Quorum',
         CASE WHEN minimum_nodes = 0 OR writes_allowed THEN 'OK' ELSE 'CRITICAL' END,
         CASE WHEN minimum_nodes = 0 THEN 'bdr.minimum_nodes is off'
              WHEN writes_allowed THEN voters_reached || ' of ' || minimum_nodes || ' voting members reached'
              ELSE 'writes refused: ' || coalesce(voters_reached, 0) || ' of ' || minimum_nodes
                   || ' voting members reached; not reached: ' || coalesce(missing, '?') END
    FROM bdr.quorum()
  UNION ALL
  -- A rolling upgrade's node whose SQL is not yet its library's (docs/runbook.md).
  SELECT 'Extension Version',
         CASE WHEN x.extversion = v.library THEN 'OK' ELSE 'WARNING' END,
         CASE WHEN x.extversion = v.library THEN 'SQL and library ' || v.library
              ELSE 'SQL ' || x.extversion || ', library ' || v.library
                   || ': run ALTER EXTENSION bdr UPDATE on this node' END
    FROM pg_extension x, (SELECT split_part(bdr.version(), ' ', 2) AS library) v
   WHERE x.extname = 'bdr'
$$;

-- BDR 1.x names, as used by existing runbooks.
CREATE FUNCTION bdr.bdr_group_create(local_node_name text, node_external_dsn text)
RETURNS void LANGUAGE sql AS $$ SELECT bdr.group_create(local_node_name, node_external_dsn) $$;

CREATE FUNCTION bdr.bdr_group_join(local_node_name text, node_external_dsn text,
                                   join_using_dsn text, node_kind text DEFAULT 'active')
RETURNS void LANGUAGE sql
AS $$ SELECT bdr.group_join(local_node_name, node_external_dsn, join_using_dsn, node_kind) $$;

-- node_status is 'active' for a member that is up, 'inactive' for one that is not
-- reachable, else the node's state (joining, parting, parted).
CREATE VIEW bdr.bdr_nodes AS
SELECT node_name, node_id, node_kind,
       CASE WHEN node_state IN ('active', 'standby') AND reachable THEN 'active'
            WHEN node_state IN ('active', 'standby') THEN 'inactive'
            ELSE node_state END AS node_status,
       node_state, is_local
  FROM bdr.node_status();

CREATE FUNCTION bdr.bdr_node_status()
RETURNS TABLE (node_name text, node_status text, node_kind text, reachable boolean,
               apply_state text, replication_lag_bytes numeric,
               replication_lag_time interval, retained_wal_bytes numeric, warning text)
LANGUAGE sql STABLE
AS $$
  SELECT s.node_name,
         CASE WHEN s.node_state IN ('active', 'standby') AND s.reachable THEN 'active'
              WHEN s.node_state IN ('active', 'standby') THEN 'inactive'
              ELSE s.node_state END,
         s.node_kind, s.reachable, s.apply_state, s.replication_lag_bytes,
         s.replication_lag_time, s.retained_wal_bytes, s.warning
    FROM bdr.node_status() s
$$;

CREATE VIEW bdr.bdr_conflict_history AS SELECT * FROM bdr.conflict_history;

-- BDR 1.x: run a schema change here and replicate it.
CREATE FUNCTION bdr.bdr_replicate_ddl_command(cmd text) RETURNS void
LANGUAGE sql AS $$ SELECT bdr.replicate_ddl_command(cmd) $$;

-- Remove replicated-DDL history older than `older_than`; returns how many rows.
CREATE FUNCTION bdr.ddl_queue_purge(older_than interval) RETURNS bigint
LANGUAGE sql AS $$
  WITH d AS (DELETE FROM bdr.ddl_queue WHERE queued_at < now() - older_than RETURNING 1)
  SELECT count(*) FROM d
$$;

-- Refuses user writes on a standby (statement trigger added to every replicated table).
CREATE FUNCTION bdr.standby_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'node "%" is a bdr standby: it does not accept writes',
          (SELECT node_name FROM bdr.nodes WHERE is_local)
    USING ERRCODE = 'read_only_sql_transaction',
          HINT = 'Write on an active node, or promote this node with bdr.promote().';
END
$$;

CREATE FUNCTION bdr.bdr_node_promote(node_name text) RETURNS void
LANGUAGE sql AS $$ SELECT bdr.promote(node_name) $$;

-- Delete conflict history rows older than an interval; returns how many.
CREATE FUNCTION bdr.conflict_history_purge(older_than interval) RETURNS bigint
LANGUAGE sql AS $$
  WITH gone AS (DELETE FROM bdr.conflict_history WHERE conflict_time < now() - older_than
                RETURNING 1)
  SELECT count(*) FROM gone
$$;

-- bdr_monitor: reads every monitoring view and function, but no DSN (passwords) and no
-- row data (conflict tuples and keys). Roles are cluster-wide: created once, reused by
-- every database that creates the extension.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'bdr_monitor') THEN
        CREATE ROLE bdr_monitor NOLOGIN;
    END IF;
END
$$;
GRANT USAGE ON SCHEMA bdr TO bdr_monitor;
GRANT EXECUTE ON FUNCTION bdr.node_status(), bdr.health_check(), bdr.bdr_node_status(),
    bdr.apply_workers(), bdr.apply_lag(), bdr.apply_stats(), bdr.conflict_counters(),
    bdr.quorum(), bdr.peers_reached(),
    bdr.version() TO bdr_monitor;
GRANT SELECT ON bdr.bdr_nodes TO bdr_monitor;
GRANT SELECT (node_name, node_id, node_kind, node_state, is_local, node_number, created_at,
              joined_at)
    ON bdr.nodes TO bdr_monitor;
GRANT SELECT (conflict_id, conflict_time, local_node, remote_node, relation, conflict_type,
              conflict_resolution, local_commit_time, remote_commit_time, remote_lsn, remote_xid)
    ON bdr.conflict_history TO bdr_monitor;
GRANT SELECT (conflict_id, conflict_time, local_node, remote_node, relation, conflict_type,
              conflict_resolution, local_commit_time, remote_commit_time, remote_lsn, remote_xid)
    ON bdr.bdr_conflict_history TO bdr_monitor;
