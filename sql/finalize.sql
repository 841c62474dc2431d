-- Runs last in CREATE EXTENSION.

-- New tables of a node that belongs to a group get the tombstone trigger (local deletes
-- must be remembered for last-update-wins). Tables of a joining node get it when the
-- join completes.
CREATE FUNCTION bdr.on_ddl_command_end() RETURNS event_trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM bdr.nodes WHERE is_local) THEN
        PERFORM bdr.attach_tombstone_triggers();
    END IF;
    IF EXISTS (SELECT 1 FROM bdr.nodes WHERE is_local AND node_kind = 'standby') THEN
        PERFORM bdr.refresh_standby_triggers();
    END IF;
END
$$;
CREATE EVENT TRIGGER bdr_new_tables ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
    EXECUTE FUNCTION bdr.on_ddl_command_end();

-- Nothing in schema bdr is usable by PUBLIC unless granted.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA bdr FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA bdr FROM PUBLIC;
