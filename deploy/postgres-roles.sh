#!/bin/sh
# One-shot of docker-compose.yml (service `postgres-roles`): creditflow and Temporal each log in as their own role,
# which owns only its own databases and is no superuser, so a leaked Temporal password cannot read the ledger and
# neither service can touch the other's schema. Idempotent: it runs on every `up` (a changed password is applied).
#
# Connects as the superuser through PGHOST / PGUSER / PGPASSWORD. Any failure stops it with psql's own message and
# a non-zero exit, which stops the services that wait for it (compose prints the message).
#
#   DB_PASSWORD_CREDITFLOW, DB_PASSWORD_TEMPORAL   required
#   DB_ROLE_CREDITFLOW (creditflow)                the role and its database
#   DB_ROLE_TEMPORAL (temporal)                    the role and its databases NAME and NAME_visibility
set -eu
: "${DB_PASSWORD_CREDITFLOW:?set DB_PASSWORD_CREDITFLOW}" "${DB_PASSWORD_TEMPORAL:?set DB_PASSWORD_TEMPORAL}"
app="${DB_ROLE_CREDITFLOW:-creditflow}"
temporal="${DB_ROLE_TEMPORAL:-temporal}"

psql --no-psqlrc --quiet -v ON_ERROR_STOP=1 --dbname "${PGDATABASE:-postgres}" \
  -v app="$app" -v app_pw="$DB_PASSWORD_CREDITFLOW" \
  -v temporal="$temporal" -v temporal_pw="$DB_PASSWORD_TEMPORAL" <<'SQL'
-- Roles: login, nothing more (no superuser, no CREATEDB, no CREATEROLE).
SELECT format('CREATE ROLE %I', r) FROM unnest(ARRAY[:'app', :'temporal']) r
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r) \gexec
SELECT format('ALTER ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD %L',
              r, pw)
  FROM (VALUES (:'app', :'app_pw'), (:'temporal', :'temporal_pw')) v(r, pw) \gexec

-- Databases, each owned by its role and closed to every other (PUBLIC may connect by default).
SELECT format('CREATE DATABASE %I OWNER %I', d, o)
  FROM (VALUES (:'app', :'app'), (:'temporal', :'temporal'), (:'temporal' || '_visibility', :'temporal')) v(d, o)
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = d) \gexec
SELECT format('ALTER DATABASE %I OWNER TO %I', d, o), format('REVOKE ALL ON DATABASE %I FROM PUBLIC', d)
  FROM (VALUES (:'app', :'app'), (:'temporal', :'temporal'), (:'temporal' || '_visibility', :'temporal')) v(d, o)
\gexec
SQL
echo "postgres-roles: role $app owns database $app; role $temporal owns ${temporal}, ${temporal}_visibility"
