-- Runs last in CREATE EXTENSION.

-- New tables of a node that belongs to a group get the tombstone trigger (local deletes
-- must be remembered for last-update-wins), and their serial and identity columns the
-- sequence kind bdr.default_sequence_kind asks for (keys that cannot collide). Tables of
-- a joining node get both when the join completes. An ALTER TABLE that creates a sequence
-- (a serial or identity column added, ADD GENERATED ... AS IDENTITY) gives that sequence
-- its kind the same way; the table's other sequences keep theirs.
--
-- It runs for whoever ran the CREATE (usually an application role without rights in
-- schema bdr), so it is SECURITY DEFINER (see below); temporary tables never replicate
-- and are ignored.
CREATE FUNCTION bdr.on_ddl_command_end() RETURNS event_trigger
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
CREATE EVENT TRIGGER bdr_new_tables ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE')
    EXECUTE FUNCTION bdr.on_ddl_command_end();
-- Also in apply workers (session_replication_role = replica), so a table created by a
-- replicated CREATE TABLE gets its triggers on every node.
ALTER EVENT TRIGGER bdr_new_tables ENABLE ALWAYS;

-- Nothing in schema bdr is usable by PUBLIC unless granted.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA bdr FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA bdr FROM PUBLIC;

-- Column defaults call bdr.snowflake_nextval as whoever inserts: like nextval, it checks
-- that role's USAGE (or UPDATE) on the sequence itself. (Running a stored default needs
-- no USAGE on schema bdr.)
GRANT EXECUTE ON FUNCTION bdr.snowflake_nextval(regclass) TO PUBLIC;

-- A session's own outcome of bdr.synchronous_commit_peers (nothing about anyone else).
GRANT EXECUTE ON FUNCTION bdr.last_synchronous_commit() TO PUBLIC;

-- Waiting until the peers have what this node wrote: it reads only slot positions, which
-- pg_replication_slots shows to everyone, and changes nothing (applications and deploy
-- scripts call it after a migration or a batch).
GRANT EXECUTE ON FUNCTION bdr.wait_slot_confirm_lsn(text, pg_lsn) TO PUBLIC;

-- The extension's triggers do their own writes in schema bdr for any role: they run as
-- the extension owner, with a search_path nobody else can put objects in. Each writes
-- only what the triggering statement implies (a tombstone for a key the statement
-- deleted, a trigger on a table it created) and takes no argument from the caller;
-- trigger functions cannot be called directly, and EXECUTE stays revoked from PUBLIC.
ALTER FUNCTION bdr.on_ddl_command_end() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION bdr.tombstone_trigger() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION bdr.standby_guard() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
