#!/usr/bin/env bash
# Runs once, when the postgres container initialises its empty data directory
# (/docker-entrypoint-initdb.d), as the image's bootstrap superuser. Nothing
# in the example uses that superuser afterwards; these roles do:
#   outbox_owner     owns the outbox schema: `outbox-relay migrate`, and runs
#                    the GRANTs that `outbox-relay grants` prints
#   outbox_relay     the relay (`outbox-relay run`)
#   outbox_app       the application: writes rows, calls enqueue() and backlog()
#   outbox_operator  `outbox-relay status`, `dead-letters`, `replay`
# What the last three may do is granted by the compose `migrate` service, once
# the schema exists; here they only get a login.
set -euo pipefail

psql -v ON_ERROR_STOP=1 -q --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v db="$POSTGRES_DB" \
    -v owner_pw="$OUTBOX_OWNER_PASSWORD" -v relay_pw="$OUTBOX_RELAY_PASSWORD" \
    -v app_pw="$OUTBOX_APP_PASSWORD" -v operator_pw="$OUTBOX_OPERATOR_PASSWORD" <<'SQL'
CREATE ROLE outbox_owner LOGIN PASSWORD :'owner_pw';
CREATE ROLE outbox_relay LOGIN PASSWORD :'relay_pw';
CREATE ROLE outbox_app LOGIN PASSWORD :'app_pw';
CREATE ROLE outbox_operator LOGIN PASSWORD :'operator_pw';
-- CREATE: the owner creates the outbox schema. The others connect only.
GRANT CREATE ON DATABASE :"db" TO outbox_owner;
SQL

# Over the network, TLS and a password or nothing: no plain-text `host` line.
# Read when the server starts for real, right after the init scripts.
cat >"$PGDATA/pg_hba.conf" <<'HBA'
# Written by deploy/compose/postgres-init.sh
# TYPE   DATABASE  USER  ADDRESS  METHOD
local    all       all            peer
hostssl  all       all   all      scram-sha-256
HBA
