#!/usr/bin/env bash
# Private PgBouncer instances in front of the local PostgreSQL (127.0.0.1:5432),
# for tests/pooler.rs and for trying the relay behind a pooler by hand.
#
#   scripts/pgbouncer.sh start [transaction|session]  up and answering (idempotent)
#   scripts/pgbouncer.sh stop  [transaction|session]  down (idempotent)
#   scripts/pgbouncer.sh url   [transaction|session]  the database URL through it
#   scripts/pgbouncer.sh status                       which instances run
#
#   transaction  127.0.0.1:6543, pool_mode = transaction, 3 server connections
#                per database and user, no prepared statement support (the
#                setting of most managed poolers)
#   session      127.0.0.1:6544, pool_mode = session, 20 server connections
#
# Both trust user postgres (as the local PostgreSQL does on 127.0.0.1) and map
# every database name to the same database on 127.0.0.1:5432. Config, pid file
# and log live under $OUTBOX_PGBOUNCER_DIR/<mode> (default
# /tmp/outbox-relay-pgbouncer); the instance is left running for the next test
# run. pgbouncer refuses to run as root: as root it runs as user postgres.
# Every step holds a lock, so parallel tests start one instance.
#
# OUTBOX_PGBOUNCER_WAIT_SECS bounds the wait for it to answer (default 30).
# A test's private instance (with its own OUTBOX_PGBOUNCER_DIR) may set
# OUTBOX_PGBOUNCER_PORT, OUTBOX_PGBOUNCER_POOL_SIZE (server connections) and
# OUTBOX_PGBOUNCER_ROUND_ROBIN=1 (server_round_robin: each transaction takes
# the server connection idle longest, so a client's consecutive transactions
# land on different server connections).
set -euo pipefail

BASE=${OUTBOX_PGBOUNCER_DIR:-/tmp/outbox-relay-pgbouncer}
PATH=$PATH:/usr/sbin
WAIT_SECS=${OUTBOX_PGBOUNCER_WAIT_SECS:-30}
CMD=${1:-}
MODE=${2:-transaction}

die() { echo "pgbouncer.sh: $*" >&2; exit 1; }

case "$MODE" in
    transaction) PORT=6543; POOL=3 ;;
    session) PORT=6544; POOL=20 ;;
    # Only for a test's private instance (tests/pooler.rs): the relay cannot work there.
    statement) PORT=6545; POOL=3 ;;
    *) die "unknown pool mode '$MODE': use transaction, session or statement" ;;
esac
PORT=${OUTBOX_PGBOUNCER_PORT:-$PORT}
POOL=${OUTBOX_PGBOUNCER_POOL_SIZE:-$POOL}
ROUND_ROBIN=${OUTBOX_PGBOUNCER_ROUND_ROBIN:-0}
DIR=$BASE/$MODE
URL=postgres://postgres@127.0.0.1:$PORT/test

answers() { pg_isready -q -h 127.0.0.1 -p "$PORT" -d test -U postgres; }

running_pid() {
    local pid
    pid=$(cat "$DIR/pgbouncer.pid" 2>/dev/null) || return 1
    kill -0 "$pid" 2>/dev/null && echo "$pid"
}

write_config() {
    mkdir -p "$DIR"
    # With auth_type trust the user must still be listed in the auth file.
    echo '"postgres" ""' >"$DIR/userlist.txt"
    cat >"$DIR/pgbouncer.ini" <<EOF
[databases]
* = host=127.0.0.1 port=5432

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PORT
unix_socket_dir =
auth_type = trust
auth_file = $DIR/userlist.txt
admin_users = postgres
pool_mode = $MODE
default_pool_size = $POOL
server_round_robin = $ROUND_ROBIN
max_client_conn = 1000
stats_period = 5
logfile = $DIR/pgbouncer.log
pidfile = $DIR/pgbouncer.pid
EOF
}

start() {
    command -v pgbouncer >/dev/null \
        || die "pgbouncer is not installed: run scripts/services.sh (or apt-get install -y pgbouncer)"
    if running_pid >/dev/null && answers; then
        return 0
    fi
    if answers; then
        die "127.0.0.1:$PORT answers but is not the instance of $DIR: stop what listens there"
    fi
    write_config
    if [ "$(id -u)" -eq 0 ]; then
        chown -R postgres "$DIR"
        pgbouncer -d -u postgres "$DIR/pgbouncer.ini" 9>&-
    else
        pgbouncer -d "$DIR/pgbouncer.ini" 9>&-
    fi
    local deadline=$((SECONDS + WAIT_SECS))
    until answers; do
        [ "$SECONDS" -lt "$deadline" ] \
            || die "PgBouncer ($MODE) did not answer on 127.0.0.1:$PORT within ${WAIT_SECS}s; see $DIR/pgbouncer.log"
        sleep 0.2
    done
}

stop() {
    local pid
    if pid=$(running_pid); then
        kill "$pid"
        local deadline=$((SECONDS + WAIT_SECS))
        while kill -0 "$pid" 2>/dev/null; do
            [ "$SECONDS" -lt "$deadline" ] || die "PgBouncer ($MODE, pid $pid) did not stop"
            sleep 0.2
        done
    fi
}

mkdir -p "$BASE"
case "$CMD" in
    start | stop)
        exec 9>"$BASE/lock"
        flock -w "$WAIT_SECS" 9 || die "another pgbouncer.sh holds $BASE/lock"
        "$CMD"
        [ "$CMD" = stop ] || echo "$URL"
        ;;
    url) echo "$URL" ;;
    status)
        for MODE in transaction session; do
            DIR=$BASE/$MODE
            if pid=$(running_pid); then echo "$MODE: running (pid $pid)"; else echo "$MODE: stopped"; fi
        done
        ;;
    *) die "usage: $0 start|stop|url [transaction|session] | status" ;;
esac
