-- zsmon's read-only PostgreSQL role: the minimal role of docs/deployment.md, created (or brought back to
-- exactly those grants) by the one-shot service zsmon-db-role of docker-compose.monitoring.yml. Idempotent.
--
--   ZSMON_DB_USER=zsmon ZSMON_DB_PASSWORD=... psql "host=... dbname=zerostate user=<platform owner>" \
--     -v ON_ERROR_STOP=1 -f deploy/zsmon-role.sql
--
-- Run it as the role that owns the platform's tables (the migrations' DB_USER), after the migrations.
-- The password comes from the environment (psql \getenv), never from a command line.
\set ON_ERROR_STOP on
\set QUIET on
SET client_min_messages = warning;
\getenv zsmon_user ZSMON_DB_USER
\getenv zsmon_password ZSMON_DB_PASSWORD
\if :{?zsmon_user}
\else
\set zsmon_user zsmon
\endif
\if :{?zsmon_password}
\else
\set zsmon_password ''
\endif
SELECT :'zsmon_password' = '' AS no_password, :'zsmon_user' = '' AS no_user \gset
\if :no_password
DO $$ BEGIN RAISE EXCEPTION 'ZSMON_DB_PASSWORD is not set: it is the password of zsmon''s read-only role'; END $$;
\endif
\if :no_user
DO $$ BEGIN RAISE EXCEPTION 'ZSMON_DB_USER is empty: name zsmon''s read-only role (default zsmon)'; END $$;
\endif

-- The platform's tables zsmon reads must exist: the grants below name them.
DO $$
DECLARE
    missing text;
BEGIN
    SELECT string_agg(t, ', ') INTO missing
      FROM unnest(ARRAY['accounts', 'payment_channels', 'channel_transactions', 'auctions', 'bids',
                        'reputation_scores', 'reputation_events', 'agents', 'tasks', 'audit_logs']) AS t
     WHERE to_regclass(format('public.%I', t)) IS NULL;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'database %: the platform tables % do not exist: run the platform''s migrations, then '
                        'start this service again', current_database(), missing;
    END IF;
END $$;

SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'zsmon_user') AS create_role \gset
\if :create_role
CREATE ROLE :"zsmon_user" LOGIN;
\endif
ALTER ROLE :"zsmon_user" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    PASSWORD :'zsmon_password';

-- Exactly the grants of docs/deployment.md, whatever the role held before.
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM :"zsmon_user";
REVOKE CREATE ON SCHEMA public FROM :"zsmon_user";
GRANT CONNECT ON DATABASE :"DBNAME" TO :"zsmon_user";
GRANT USAGE ON SCHEMA public TO :"zsmon_user";
GRANT SELECT ON accounts, payment_channels, channel_transactions, auctions, bids,
                reputation_scores, reputation_events, agents, tasks, audit_logs TO :"zsmon_user";
GRANT pg_monitor TO :"zsmon_user";          -- pg_stat_* for the postgres exporter (PostgreSQL 10+)
\echo zsmon role :zsmon_user ready in database :DBNAME: SELECT on the platform tables, pg_monitor
