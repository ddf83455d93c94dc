#!/usr/bin/env bash
# Does the outbox table stay small under a steady load? (make table-sizes)
#
# Migrates a throwaway schema, runs the relay on it with a short retention,
# drives a paced insert load with pgbench and prints, at the start, every
# SIZES_SAMPLE_EVERY seconds and at the end, the size of the table, of the
# pending partial index and of every other index, with row counts.
# Exits non-zero if rows are still pending at the end, if fewer rows than
# SIZES_MIN_ROWS were inserted, or if the relay did not stop cleanly.
#
# Expects the services up (make services) and target/release/outbox-relay built.
# Needs psql, pgbench, curl and python3 (pika is installed with pip if missing:
# the management plugin that rabbitmqadmin needs is not enabled by services.sh,
# and rabbitmqctl cannot declare queues).
#
# Settings (environment):
#   SIZES_ROWS (1200000)       rows to insert (pgbench --transactions, so the count
#                              is reached however slow the machine: the load lasts
#                              ROWS / RATE seconds, longer if the rate is not reached)
#   SIZES_RATE (8000)          rows per second asked of pgbench (--rate)
#   SIZES_ROWS_PER_TX (8)      rows per pgbench transaction: one commit (and one NOTIFY)
#                              per row reaches only ~1,500 rows/s on 2 cores
#   SIZES_CLIENTS (8)          pgbench clients
#   SIZES_KEYS (10000)         distinct partition keys
#   SIZES_PAYLOAD_BYTES (256)  payload size
#   SIZES_RETENTION_SECS (10)  the relay's --retention
#   SIZES_SAMPLE_EVERY (15)    seconds between size lines during the load
#   SIZES_MIN_ROWS (5/6 of SIZES_ROWS)  fewer rows inserted than this is a failure
#   SIZES_DRAIN_TIMEOUT (300)  seconds to wait for the backlog to drain after the load
#   SIZES_QUEUE_MAX_LENGTH (100000)  the queue drops its oldest beyond this, so
#                              the broker does not hoard a million messages
set -euo pipefail
cd "$(dirname "$0")/.."

export OUTBOX_DATABASE_URL=${OUTBOX_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
export OUTBOX_AMQP_URL=${OUTBOX_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
ROWS=${SIZES_ROWS:-1200000}
RATE=${SIZES_RATE:-8000}
ROWS_PER_TX=${SIZES_ROWS_PER_TX:-8}
CLIENTS=${SIZES_CLIENTS:-8}
KEYS=${SIZES_KEYS:-10000}
PAYLOAD_BYTES=${SIZES_PAYLOAD_BYTES:-256}
RETENTION_SECS=${SIZES_RETENTION_SECS:-10}
SAMPLE_EVERY=${SIZES_SAMPLE_EVERY:-15}
MIN_ROWS=${SIZES_MIN_ROWS:-$((ROWS * 5 / 6))}
DRAIN_TIMEOUT=${SIZES_DRAIN_TIMEOUT:-300}
QUEUE_MAX_LENGTH=${SIZES_QUEUE_MAX_LENGTH:-100000}

RELAY=target/release/outbox-relay
# A schema (and queue) of our own: never touches `outbox` or a concurrent run.
SCHEMA=sizes_$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
QUEUE=$SCHEMA
OUT=target/table-sizes
LOG=$OUT/$SCHEMA-relay.log
PGBENCH_LOG=$OUT/$SCHEMA-pgbench.log
DURATION=$(( (ROWS + RATE - 1) / RATE ))
# pgbench paces and counts transactions, not rows.
TX_RATE=$(( (RATE + ROWS_PER_TX - 1) / ROWS_PER_TX ))
TX_PER_CLIENT=$(( (ROWS + ROWS_PER_TX * CLIENTS - 1) / (ROWS_PER_TX * CLIENTS) ))

die() { echo "table-sizes: $*" >&2; exit 1; }
[ -x "$RELAY" ] || die "$RELAY is missing: run 'make build' (or 'make table-sizes')"
for tool in psql pgbench curl python3; do
    command -v "$tool" >/dev/null || die "$tool is missing"
done
if ! python3 -c 'import pika' 2>/dev/null; then
    echo "== installing pika (to declare and delete the queue)"
    python3 -m pip install --quiet pika || die "could not install pika (python3 -m pip install pika)"
fi
mkdir -p "$OUT"
TMP=$(mktemp -d)

psql_q() { psql -X -q -At -v ON_ERROR_STOP=1 "$OUTBOX_DATABASE_URL" -c "$1"; }

# Declares (or deletes) the queue on the default exchange: routing key = queue
# name, so every published row is routable without an exchange or a binding.
amqp_queue() {
    python3 - "$1" "$QUEUE" "$QUEUE_MAX_LENGTH" <<'PY'
import os, sys, pika
action, queue, max_length = sys.argv[1], sys.argv[2], int(sys.argv[3])
conn = pika.BlockingConnection(pika.URLParameters(os.environ["OUTBOX_AMQP_URL"]))
ch = conn.channel()
if action == "declare":
    # x-expires: the queue goes away by itself if this script dies uncleanly.
    ch.queue_declare(queue, durable=True, arguments={
        "x-max-length": max_length, "x-overflow": "drop-head", "x-expires": 30 * 60 * 1000})
else:
    ch.queue_delete(queue)
conn.close()
PY
}

relay_pid=
pgbench_pid=
queue_declared=no
# Ends (and reports) the relay's backends still running a statement after the
# relay has stopped: a statement the relay gave up on (its 30 s client-side
# timeout) is not cancelled on the server and would keep a core busy.
orphans() {
    local rows
    rows=$(psql_q "SELECT pid, now() - query_start, pg_terminate_backend(pid), left(regexp_replace(query, '\\s+', ' ', 'g'), 60)
                     FROM pg_stat_activity WHERE application_name = '$SCHEMA' AND state <> 'idle'") || return 0
    [ -z "$rows" ] && return 0
    echo "table-sizes: WARNING: the relay has exited but these backends of it were still running (terminated):" >&2
    sed 's/^/   /' <<<"$rows" >&2
}
cleanup() {
    local rc=$?
    set +e
    [ -n "$pgbench_pid" ] && kill "$pgbench_pid" 2>/dev/null && wait "$pgbench_pid" 2>/dev/null
    if [ -n "$relay_pid" ] && kill -0 "$relay_pid" 2>/dev/null; then
        kill -TERM "$relay_pid"; wait "$relay_pid" 2>/dev/null
    fi
    # Backends of a relay that has exited would hold locks the DROP waits for.
    orphans
    psql_q "SET client_min_messages = warning; DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null \
        || echo "table-sizes: could not drop schema $SCHEMA" >&2
    [ "$queue_declared" = yes ] && { amqp_queue delete \
        || echo "table-sizes: could not delete queue $QUEUE" >&2; }
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
METRICS=127.0.0.1:$port

echo "== settings: schema $SCHEMA, $ROWS rows at $RATE rows/s ($TX_RATE tx/s x $ROWS_PER_TX rows, ${DURATION}s at that rate," \
     "$CLIENTS clients, $KEYS keys, ${PAYLOAD_BYTES}-byte payload), retention ${RETENTION_SECS}s," \
     "autovacuum=$(psql_q 'SHOW autovacuum')"
echo "== outbox-relay migrate --schema $SCHEMA"
"$RELAY" migrate --schema "$SCHEMA" >/dev/null
echo "== declaring durable queue $QUEUE (default exchange, routing key = queue name)"
amqp_queue declare
queue_declared=yes

echo "== outbox-relay run (metrics $METRICS, log $LOG)"
# The relay's own application_name lets the samples find its two backends and
# report the CPU they used (the database side of claiming, marking, retention).
case $OUTBOX_DATABASE_URL in *\?*) sep='&' ;; *) sep='?' ;; esac
OUTBOX_DATABASE_URL="$OUTBOX_DATABASE_URL${sep}application_name=$SCHEMA" \
    "$RELAY" run --schema "$SCHEMA" --metrics-addr "$METRICS" --retention "${RETENTION_SECS}s" >"$LOG" 2>&1 &
relay_pid=$!
ready=no
for _ in $(seq 100); do
    curl -sf -o /dev/null "http://$METRICS/readyz" && { ready=yes; break; }
    kill -0 "$relay_pid" 2>/dev/null || { cat "$LOG" >&2; die "the relay exited at start"; }
    sleep 0.2
done
[ "$ready" = yes ] || die "the relay was not ready after 20 s: $(curl -s "http://$METRICS/readyz" || echo 'no answer')"

# One line per sample: inserted (identity's last value), rows in the table,
# pending rows, dead tuples, autovacuum runs, then sizes (MiB, one decimal).
SAMPLE_SQL="
WITH m AS (SELECT '$SCHEMA.messages'::regclass AS rel),
     idx AS (SELECT string_agg(format('%s=%s', c.relname,
                    to_char(pg_relation_size(x.indexrelid) / 1048576.0, 'FM9999990.0')), ' '
                    ORDER BY c.relname) AS others
               FROM m, pg_index x JOIN pg_class c ON c.oid = x.indexrelid
              WHERE x.indrelid = m.rel AND c.relname <> 'messages_pending')
SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence('$SCHEMA.messages', 'id')), 0),
       (SELECT count(*) FROM pg_stat_activity WHERE application_name = '$SCHEMA' AND state = 'active'),
       (SELECT count(*) FROM $SCHEMA.messages),
       (SELECT count(*) FROM $SCHEMA.messages WHERE published_at IS NULL AND dead_lettered_at IS NULL),
       s.n_dead_tup, s.autovacuum_count,
       to_char(pg_relation_size(m.rel) / 1048576.0, 'FM9999990.0'),
       to_char(pg_total_relation_size(m.rel) / 1048576.0, 'FM9999990.0'),
       to_char(pg_relation_size('$SCHEMA.messages_pending') / 1048576.0, 'FM9999990.0'),
       idx.others
  FROM m, idx, pg_stat_user_tables s WHERE s.relid = m.rel"

metric() {  # metric NAME: a relay gauge/counter from /metrics (first series), or '?'
    # awk reads to the end: exiting early would fail curl (SIGPIPE) under pipefail.
    curl -sf "http://$METRICS/metrics" | awk -v n="outbox_relay_$1" \
        '!found && ($1 == n || index($1, n "{") == 1) { printf "%.1f", $2; found = 1 }
         END { if (!found) print "?" }' || echo '?'
}

cpu_secs() {  # cpu_secs PID...: user+system CPU seconds used so far by these processes
    local pid total=0
    for pid in "$@"; do
        # Fields 14 and 15 of /proc/PID/stat, counted after the ")" that ends the name.
        total=$(( total + $(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{ print $12 + $13 }' || echo 0) ))
    done
    awk -v t="$total" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.1f", t / hz }'
}

last_inserted=0
last_at=$(date +%s.%N)
load_started=$last_at
pending=0
inserted=0
sample() {  # sample LABEL
    local now row busy rows dead av table total pend others rate
    now=$(date +%s.%N)
    row=$(psql_q "$SAMPLE_SQL")
    IFS='|' read -r inserted busy rows pending dead av table total pend others <<<"$row"
    rate=$(awk -v a="$inserted" -v b="$last_inserted" -v t="$now" -v u="$last_at" \
        'BEGIN { printf "%.0f", (t > u ? (a - b) / (t - u) : 0) }')
    # shellcheck disable=SC2046 # one pid per word
    printf '%-6s t=%4.0fs inserted=%s (%s/s) rows=%s pending=%s lag=%ss dead_tup=%s autovac=%s relay_busy_backends=%s cpu_s=%s+%s |' \
        "$1" "$(awk -v t="$now" -v s="$load_started" 'BEGIN { print t - s }')" \
        "$inserted" "$rate" "$rows" "$pending" "$(metric oldest_pending_age_seconds)" "$dead" "$av" "$busy" \
        "$(cpu_secs "$relay_pid")" \
        "$(cpu_secs $(psql_q "SELECT pid FROM pg_stat_activity WHERE application_name = '$SCHEMA'"))"
    printf ' MiB: table=%s total=%s pending_idx=%s | %s\n' "$table" "$total" "$pend" "$others"
    last_inserted=$inserted
    last_at=$now
}

# Each row: one enqueue call, a payload of PAYLOAD_BYTES, one of KEYS keys at random.
cat >"$TMP/load.sql" <<SQL
SELECT $SCHEMA.enqueue('', '$QUEUE', repeat('x', $PAYLOAD_BYTES),
       partition_key => 'key-' || (1 + floor(random() * $KEYS))::int)
  FROM generate_series(1, $ROWS_PER_TX);
SQL

echo "== sizes (MiB); lag = the relay's oldest_pending_age_seconds; relay_busy_backends = its backends running a statement (2 = hot + control); cpu_s = CPU seconds so far, relay + its PostgreSQL backends"
sample start
echo "== pgbench -c $CLIENTS -R $TX_RATE -t $TX_PER_CLIENT (log $PGBENCH_LOG)"
load_started=$(date +%s.%N)
last_at=$load_started
pgbench -n -f "$TMP/load.sql" -c "$CLIENTS" -j 2 -R "$TX_RATE" -t "$TX_PER_CLIENT" -P "$SAMPLE_EVERY" \
    "$OUTBOX_DATABASE_URL" >"$PGBENCH_LOG" 2>&1 &
pgbench_pid=$!
while kill -0 "$pgbench_pid" 2>/dev/null; do
    # Sleep in short steps so the last sample comes soon after the load ends.
    for _ in $(seq "$SAMPLE_EVERY"); do
        kill -0 "$pgbench_pid" 2>/dev/null || break
        sleep 1
    done
    kill -0 "$pgbench_pid" 2>/dev/null && sample load
done
pgbench_rc=0
wait "$pgbench_pid" || pgbench_rc=$?
pgbench_pid=
load_secs=$(awk -v t="$(date +%s.%N)" -v s="$load_started" 'BEGIN { printf "%.1f", t - s }')
sample loaded
echo "== pgbench (exit $pgbench_rc): $(grep -E '^(number of transactions actually processed|tps|latency average|rate limit schedule lag)' "$PGBENCH_LOG" | tr '\n' ';')"
[ "$pgbench_rc" = 0 ] || { tail -n 20 "$PGBENCH_LOG" >&2; die "pgbench failed"; }
echo "   achieved: $inserted rows in ${load_secs}s = $(awk -v n="$inserted" -v s="$load_secs" 'BEGIN { printf "%.0f", n / s }') rows/s (asked $RATE)"

# Drain, then let retention run once more: it runs every 10 s while rows are
# being published and deletes rows published more than RETENTION_SECS ago.
drain_started=$(date +%s)
until [ "$(psql_q "SELECT count(*) FROM $SCHEMA.messages WHERE published_at IS NULL AND dead_lettered_at IS NULL")" = 0 ]; do
    [ $(( $(date +%s) - drain_started )) -lt "$DRAIN_TIMEOUT" ] || break
    sleep 1
done
echo "== drained $(( $(date +%s) - drain_started ))s after the load; waiting $((RETENTION_SECS + 12))s for a retention pass"
sleep $((RETENTION_SECS + 12))
sample end
failures=$(curl -sf "http://$METRICS/metrics" | grep -E '^outbox_relay_(publish_failures_total|messages_dead_lettered_total|messages_deleted_total|messages_published_total)' | grep -v ' 0$' | tr '\n' ' ' || true)
echo "   metrics: ${failures:-none}"

echo "== stopping the relay (SIGTERM)"
kill -TERM "$relay_pid"
relay_rc=0
wait "$relay_pid" || relay_rc=$?
relay_pid=
echo "   relay exited with code $relay_rc; warnings/errors in its log: $(grep -cE ' (WARN|ERROR) ' "$LOG" || true)"
grep -E ' (WARN|ERROR) ' "$LOG" | head -n 5 | sed 's/^/   /' || true
orphans

rc=0
[ "$pending" = 0 ] || { echo "table-sizes: FAIL: $pending rows still pending at the end" >&2; rc=1; }
[ "$inserted" -ge "$MIN_ROWS" ] || { echo "table-sizes: FAIL: only $inserted rows inserted (want >= $MIN_ROWS)" >&2; rc=1; }
[ "$relay_rc" = 0 ] || { echo "table-sizes: FAIL: the relay exited with $relay_rc" >&2; rc=1; }
[ "$rc" = 0 ] && echo "== ok: logs kept in $LOG and $PGBENCH_LOG"
exit "$rc"
