#!/usr/bin/env bash
# Make sure the local PostgreSQL and RabbitMQ that tests and the demo use are
# installed, running and answering on 127.0.0.1, and that Prometheus and promtool
# are there.
# Idempotent: on a machine where all is well it only checks. Safe with no stdin.
#
#   PostgreSQL  127.0.0.1:5432, user postgres without password, database `test`
#   RabbitMQ    127.0.0.1:5672, guest/guest
#   PgBouncer   127.0.0.1:6543 (transaction mode) and 6544 (session mode) in
#               front of that PostgreSQL, for tests/pooler.rs (scripts/pgbouncer.sh)
#
# SERVICES_WAIT_SECS bounds each wait for a service to answer (default 90).
set -euo pipefail

WAIT_SECS=${SERVICES_WAIT_SECS:-90}
export DEBIAN_FRONTEND=noninteractive
APT_UPDATED=0

die() { echo "services.sh: $*" >&2; exit 1; }
warn() { echo "services.sh: warning: $*" >&2; }

# Installing and starting system services needs root; use sudo only if it works
# without a password (CI has no stdin to type one).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        die "need root to run '$*'. Run this script as root (or with passwordless sudo), or do it by hand: apt-get install -y postgresql rabbitmq-server; pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start; rabbitmq-server -detached"
    fi
}

apt_install() {
    command -v apt-get >/dev/null || die "'$*' is missing and there is no apt-get here: install it by hand"
    if [ "$APT_UPDATED" = 0 ]; then
        as_root apt-get update -qq >/dev/null
        APT_UPDATED=1
    fi
    as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Poll a check command once a second until it succeeds or WAIT_SECS pass.
wait_for() {
    local what=$1; shift
    local deadline=$((SECONDS + WAIT_SECS))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || die "$what did not answer within ${WAIT_SECS}s (check its log under /var/log)"
        sleep 1
    done
}

psql_pg() { psql -h 127.0.0.1 -U postgres -w -v ON_ERROR_STOP=1 -Atq "$@"; }

# Directory names under /etc/postgresql are the installed major versions.
# shellcheck disable=SC2012
pg_version() { ls /etc/postgresql 2>/dev/null | sort -V | tail -n1; }

ensure_postgres() {
    if ! command -v pg_ctlcluster >/dev/null || [ -z "$(pg_version)" ]; then
        echo "postgresql: not installed, installing with apt-get" >&2
        apt_install postgresql postgresql-client
    fi
    local ver
    ver=$(pg_version)
    if ! pg_isready -q -h 127.0.0.1 -p 5432; then
        # A package install creates the `main` cluster but (in containers) never starts it.
        [ -d "/etc/postgresql/$ver/main" ] || as_root pg_createcluster "$ver" main >/dev/null
        as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start \
            || pg_isready -q -h 127.0.0.1 -p 5432 \
            || die "could not start PostgreSQL $ver (see /var/log/postgresql/)"
    fi
    wait_for "PostgreSQL on 127.0.0.1:5432" pg_isready -q -h 127.0.0.1 -p 5432

    # Debian's default asks TCP clients for a password; tests and the demo connect
    # as postgres without one, so trust loopback TCP (this is a dev/CI box only).
    if ! psql_pg -d postgres -c 'SELECT 1' >/dev/null 2>&1; then
        local hba="/etc/postgresql/$ver/main/pg_hba.conf"
        [ -f "$hba" ] || die "cannot log in as postgres on 127.0.0.1 and $hba is not there to fix"
        echo "postgresql: enabling trust auth for 127.0.0.1 in $hba" >&2
        as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
        as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main reload
        wait_for "PostgreSQL login as postgres" psql_pg -d postgres -c 'SELECT 1'
    fi

    if [ "$(psql_pg -d postgres -c "SELECT 1 FROM pg_database WHERE datname = 'test'")" != 1 ]; then
        psql_pg -d postgres -c 'CREATE DATABASE test'
    fi
    echo "postgresql: ready on 127.0.0.1:5432 (user postgres, database test)"
}

amqp_port_open() { timeout 2 bash -c '</dev/tcp/127.0.0.1/5672' 2>/dev/null; }

ensure_rabbitmq() {
    if ! command -v rabbitmq-server >/dev/null; then
        echo "rabbitmq: not installed, installing with apt-get" >&2
        apt_install rabbitmq-server
    fi
    if ! amqp_port_open; then
        # -detached returns at once; await_startup then waits for the boot itself.
        as_root rabbitmq-server -detached || true
        as_root timeout "$WAIT_SECS" rabbitmqctl -q await_startup >/dev/null 2>&1 || true
    fi
    wait_for "RabbitMQ on 127.0.0.1:5672" amqp_port_open
    echo "rabbitmq: ready on 127.0.0.1:5672 (guest/guest)"
}

# Debian's prometheus package brings promtool (make deploy-check validates
# deploy/prometheus with it) and the server that tests/prometheus_alerts.rs runs
# privately against live relays. Services never start from a package install
# here (policy-rc.d), so no Prometheus runs afterwards. A failed install only
# warns: those tests then print SKIPPED (a failure under OUTBOX_TEST_REQUIRE_ALL=1).
ensure_prometheus() {
    if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
        echo "prometheus: not installed, installing with apt-get" >&2
        # Subshell: apt_install dies on failure, which must not end this script.
        (apt_install prometheus) 2>/dev/null || true
    fi
    if command -v promtool >/dev/null && command -v prometheus >/dev/null; then
        echo "prometheus: $(command -v prometheus), promtool: $(command -v promtool)"
    else
        warn "prometheus or promtool is missing and 'apt-get install prometheus' failed; make deploy-check and tests/prometheus_alerts.rs need them"
    fi
}

# The TLS tests make their certificates with the openssl CLI.
ensure_openssl() {
    if ! command -v openssl >/dev/null; then
        echo "openssl: not installed, installing with apt-get" >&2
        apt_install openssl
    fi
    echo "openssl: $(command -v openssl)"
}

# tests/pooler.rs runs the relay through PgBouncer from Debian's package.
ensure_pgbouncer() {
    if ! command -v pgbouncer >/dev/null && [ ! -x /usr/sbin/pgbouncer ]; then
        echo "pgbouncer: not installed, installing with apt-get" >&2
        apt_install pgbouncer
    fi
    export PATH="$PATH:/usr/sbin"
    local here
    here=$(dirname "${BASH_SOURCE[0]}")
    bash "$here/pgbouncer.sh" start transaction >/dev/null
    bash "$here/pgbouncer.sh" start session >/dev/null
    echo "pgbouncer: ready on 127.0.0.1:6543 (transaction mode) and 6544 (session mode)"
}

ensure_postgres
ensure_rabbitmq
ensure_pgbouncer
ensure_prometheus
ensure_openssl
