-- bdr 0.1.0 -> 0.2.0, run by `ALTER EXTENSION bdr UPDATE` (docs/runbook.md, "Rolling
-- upgrades"). pg_test/tests/upgrade.rs checks that 0.1.0 plus this script is exactly
-- what a fresh `CREATE EXTENSION bdr` makes.
\echo Use "ALTER EXTENSION bdr UPDATE TO '0.2.0'" to load this file. \quit

-- This node's heartbeat (sql/catalog.sql): its writes travel as heartbeats, which no
-- role can forge, where 0.1.0 emitted a logical message any role could imitate.
CREATE TABLE bdr.heartbeat (
    only_row  boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    horizon   bigint NOT NULL,
    sent_at   timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE bdr.heartbeat IS 'This node''s last heartbeat to its peers (tombstone horizon)';
REVOKE ALL ON bdr.heartbeat FROM PUBLIC;

-- A replicated statement travels with its origin session's settings that decide what it
-- means (sql/catalog.sql): a peer runs it under them.
ALTER TABLE bdr.ddl_queue ADD COLUMN settings jsonb;

-- health_check() gains the 'Extension Version' check (sql/monitoring.sql): a node whose
-- SQL is not its library's reads WARNING. Same body as a fresh install's, to the byte.
CREATE OR REPLACE FUNCTION bdr.health_check()
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

-- A schema change's fences are named by its origin and the origin's WAL position when
-- its drain began (src/ddl.rs), so that an earlier change from the same node, arriving
-- late, does not lift a later one's: the four-argument ddl_fence and the two-argument
-- ddl_unfence (the rollback's: that change's fences only). The three-argument ddl_fence
-- stays for origins of the previous release.
CREATE FUNCTION bdr.ddl_fence(tables text[], origin text, timeout_ms integer, since text)
RETURNS text
STRICT
LANGUAGE c
AS 'MODULE_PATHNAME', 'ddl_fence_since_wrapper';
REVOKE ALL ON FUNCTION bdr.ddl_fence(text[], text, integer, text) FROM PUBLIC;

CREATE FUNCTION bdr.ddl_unfence(origin text, since text) RETURNS integer
STRICT
LANGUAGE c
AS 'MODULE_PATHNAME', 'ddl_unfence_change_wrapper';
REVOKE ALL ON FUNCTION bdr.ddl_unfence(text, text) FROM PUBLIC;

-- The origin keeps the members' fences once its drain is done: a fence is set for the
-- drain's time plus a grace, and kept until the change arrives only then, so that a
-- fence whose schema change failed lapses soon.
CREATE FUNCTION bdr.ddl_fence_keep(tables text[], origin text, since text) RETURNS boolean
STRICT
LANGUAGE c
AS 'MODULE_PATHNAME', 'ddl_fence_keep_wrapper';
REVOKE ALL ON FUNCTION bdr.ddl_fence_keep(text[], text, text) FROM PUBLIC;

-- An ALTER TABLE that creates a sequence (a serial or identity column added, ADD
-- GENERATED ... AS IDENTITY) gives it the kind bdr.default_sequence_kind asks for, as a
-- new table's get (sql/finalize.sql); in 0.1.0 such a sequence stayed local and its
-- values collided across nodes. Same body as a fresh install's, to the byte.
CREATE OR REPLACE FUNCTION bdr.on_ddl_command_end() RETURNS event_trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands() d
                     JOIN pg_class c ON c.oid = d.objid
                    WHERE d.classid = 'pg_class'::regclass AND c.relpersistence = 'p') THEN
        RETURN;
    END IF;
    IF TG_TAG = 'ALTER TABLE' THEN
        IF EXISTS (SELECT 1 FROM bdr.nodes WHERE is_local) THEN
            -- The sequences this statement created, and those a column default it set
            -- (in this transaction) calls, as a restored pg_dump's ALTER TABLE ... SET
            -- DEFAULT nextval(...) does.
            PERFORM bdr.apply_default_sequence_kinds(s.oid)
               FROM (SELECT c.oid FROM pg_event_trigger_ddl_commands() d
                       JOIN pg_class c ON c.oid = d.objid
                      WHERE d.classid = 'pg_class'::regclass AND c.relkind = 'S'
                        AND d.command_tag = 'CREATE SEQUENCE'
                     UNION
                     SELECT dep.refobjid FROM pg_event_trigger_ddl_commands() d
                       JOIN pg_attrdef ad ON ad.adrelid = d.objid
                       JOIN pg_depend dep ON dep.classid = 'pg_attrdef'::regclass
                                         AND dep.objid = ad.oid
                                         AND dep.refclassid = 'pg_class'::regclass
                       JOIN pg_class c ON c.oid = dep.refobjid AND c.relkind = 'S'
                      WHERE d.classid = 'pg_class'::regclass
                        AND ad.xmin = pg_current_xact_id()::xid) s;
        END IF;
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM bdr.nodes WHERE is_local) THEN
        PERFORM bdr.attach_tombstone_triggers();
        PERFORM bdr.apply_default_sequence_kinds(c.oid)
           FROM pg_event_trigger_ddl_commands() d
           JOIN pg_class c ON c.oid = d.objid
          WHERE d.classid = 'pg_class'::regclass AND c.relkind IN ('r', 'p')
            AND c.relpersistence = 'p';
    END IF;
    IF EXISTS (SELECT 1 FROM bdr.nodes WHERE is_local AND node_kind = 'standby') THEN
        PERFORM bdr.refresh_standby_triggers();
    END IF;
END
$$;
ALTER FUNCTION bdr.on_ddl_command_end() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
DROP EVENT TRIGGER bdr_new_tables;
CREATE EVENT TRIGGER bdr_new_tables ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE')
    EXECUTE FUNCTION bdr.on_ddl_command_end();
ALTER EVENT TRIGGER bdr_new_tables ENABLE ALWAYS;

-- Sequences made `offset` before 0.2.0 (increment 1024) kept START 1, so a replicated
-- TRUNCATE ... RESTART IDENTITY or an ALTER SEQUENCE ... RESTART took every node back to
-- 1, 1025, ... and the nodes' keys collided. Each one's START becomes its own node's first
-- value (the residue its values keep), as 0.2.0 sets it when it makes a sequence `offset`.
-- Run on each node by its own ALTER EXTENSION UPDATE: not replicated.
DO $$
DECLARE
    s record;
    last bigint;
    first bigint;
BEGIN
    FOR s IN SELECT q.seqrelid::regclass AS seq, q.seqmin
               FROM pg_catalog.pg_sequence q
              WHERE q.seqincrement = 1024 AND q.seqstart = 1
    LOOP
        EXECUTE format('SELECT last_value FROM %s', s.seq) INTO last;
        first := (last - 1) % 1024 + 1;
        IF last > 1 AND first > 1 AND first >= s.seqmin THEN
            EXECUTE format('ALTER SEQUENCE %s START WITH %s', s.seq, first);
        END IF;
    END LOOP;
END
$$;
