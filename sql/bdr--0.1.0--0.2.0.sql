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
