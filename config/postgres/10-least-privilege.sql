-- Run once by the postgres image on an empty data directory (mounted into
-- /docker-entrypoint-initdb.d), as the superuser, in the database orders.
--
-- Three roles: the superuser (POSTGRES_USER, administration only); orders, which owns
-- the database and its schema and runs the migrations (OWNER_DB_PASSWORD); orders_app,
-- which every process of the system connects as (APP_DB_PASSWORD): it reads and writes
-- rows, and may change no schema. The passwords are read from the environment
-- (psql's \getenv), never written here.
\getenv owner_password OWNER_DB_PASSWORD
\getenv app_password APP_DB_PASSWORD
\if :{?owner_password}
\else
  DO $$ BEGIN RAISE EXCEPTION 'OWNER_DB_PASSWORD is not set'; END $$;
\endif
\if :{?app_password}
\else
  DO $$ BEGIN RAISE EXCEPTION 'APP_DB_PASSWORD is not set'; END $$;
\endif

CREATE ROLE orders LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'owner_password';
CREATE ROLE orders_app LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'app_password';

-- The owner owns the database, hence its schema public (PostgreSQL 15: pg_database_owner).
ALTER DATABASE orders OWNER TO orders;
REVOKE ALL ON DATABASE orders FROM PUBLIC;
GRANT CONNECT ON DATABASE orders TO orders_app;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO orders_app;

-- Every table and sequence the owner creates (the migrations) is the application's
-- to use row by row; migrations/env.py grants the same after each upgrade.
ALTER DEFAULT PRIVILEGES FOR ROLE orders IN SCHEMA public
  GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO orders_app;
ALTER DEFAULT PRIVILEGES FOR ROLE orders IN SCHEMA public
  GRANT USAGE, SELECT ON SEQUENCES TO orders_app;
