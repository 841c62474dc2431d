-- Monitoring (node_status, health_check) and the BDR 1.x compatibility layer.
-- Loaded after the Rust functions it calls (bdr.apply_workers, bdr.conflict_counters).

-- One row per node as seen from here.
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
    warning               text
)
LANGUAGE sql STABLE
SET search_path = pg_catalog
AS $$
WITH w AS (SELECT * FROM bdr.apply_workers()),
     me AS (SELECT oid FROM pg_database WHERE datname = current_database()),
     s AS (SELECT sl.*, pg_wal_lsn_diff(pg_current_wal_lsn(), sl.restart_lsn) AS retained
             FROM pg_replication_slots sl WHERE sl.database = current_database()),
     c AS (SELECT peer, jsonb_object_agg(conflict_type, count) AS by_type
             FROM bdr.conflict_counters() GROUP BY peer),
     r AS (
       SELECT n.*, w.state AS wstate, w.last_error AS werr, w.last_error_time AS werr_time,
              w.received_lsn::pg_lsn AS wrecv, w.applied_lsn::pg_lsn AS wapplied,
              w.last_applied_commit_time AS wcommit, w.started_at AS wstarted,
              s.slot_name AS sname, s.active AS sactive, s.retained AS sretained,
              c.by_type AS cby
         FROM bdr.nodes n
         LEFT JOIN w ON w.peer = n.node_name
         LEFT JOIN s ON s.slot_name = 'bdr_' || (SELECT oid FROM me) || '_' || n.node_name
         LEFT JOIN c ON c.peer = n.node_name)
SELECT r.node_name, r.node_id, r.node_kind, r.node_state, r.is_local,
       -- A peer is reachable when we stream from it or it streams from us.
       r.is_local OR coalesce(r.wstate IN ('streaming', 'paused'), false)
                  OR coalesce(r.sactive, false),
       CASE WHEN r.is_local THEN 'local' ELSE coalesce(r.wstate, 'not running') END,
       r.werr, r.werr_time, r.wrecv, r.wapplied,
       CASE WHEN r.is_local THEN 0 ELSE greatest(pg_wal_lsn_diff(r.wrecv, r.wapplied), 0) END,
       CASE WHEN r.is_local OR r.wapplied >= r.wrecv THEN interval '0'
            ELSE now() - coalesce(r.wcommit, r.wstarted) END,
       r.sname, r.sactive, r.sretained,
       coalesce(r.cby, '{}'::jsonb),
       CASE
         WHEN NOT r.is_local AND NOT coalesce(r.sactive, false)
              AND r.sretained > pg_size_bytes(current_setting('bdr.slot_wal_warning_mb'))
           THEN format('slot %s retains %s of WAL for node %s, which is not connected',
                       r.sname, pg_size_pretty(r.sretained), r.node_name)
         WHEN r.wstate = 'erroring' THEN format('apply from %s failing: %s', r.node_name, r.werr)
       END
  FROM r
 ORDER BY r.node_name
$$;
COMMENT ON FUNCTION bdr.node_status() IS 'One row per node: state, reachability, apply state, lag, retained WAL, conflicts';

-- Health summary: one row per check.
CREATE FUNCTION bdr.health_check()
RETURNS TABLE (check_name text, status text, details text)
LANGUAGE sql STABLE
SET search_path = pg_catalog
AS $$
  SELECT 'Node Count',
         CASE WHEN count(*) FILTER (WHERE reachable AND node_state IN ('active', 'standby')) >= 2
              THEN 'OK' ELSE 'WARNING' END,
         (count(*) FILTER (WHERE reachable AND node_state IN ('active', 'standby')))::text
           || ' of ' || count(*)::text || ' nodes reachable'
    FROM bdr.node_status()
  UNION ALL
  SELECT 'Replication Lag',
         CASE WHEN coalesce(max(replication_lag_time), interval '0') < interval '1 minute'
              THEN 'OK' ELSE 'WARNING' END,
         coalesce(max(replication_lag_time), interval '0')::text
    FROM bdr.node_status()
  UNION ALL
  SELECT 'Conflicts (1h)',
         CASE WHEN count(*) < 10 THEN 'OK' ELSE 'WARNING' END,
         count(*)::text || ' conflicts'
    FROM bdr.conflict_history WHERE conflict_time > now() - interval '1 hour'
  UNION ALL
  SELECT 'Slots Retaining WAL',
         CASE WHEN count(*) = 0 THEN 'OK' ELSE 'WARNING' END,
         coalesce(string_agg(warning, '; '), 'no slot retains WAL for a disconnected node')
    FROM bdr.node_status() WHERE warning LIKE 'slot %'
  UNION ALL
  SELECT 'Workers In Error',
         CASE WHEN count(*) = 0 THEN 'OK' ELSE 'WARNING' END,
         count(*)::text || ' apply workers erroring'
           || coalesce(': ' || string_agg(peer || ' (' || coalesce(last_error, '') || ')', ', '), '')
    FROM bdr.apply_workers() WHERE state = 'erroring'
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
