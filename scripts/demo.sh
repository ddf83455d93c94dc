#!/usr/bin/env bash
# The e-commerce demo (make demo): migrate schema demo_shop, start the relay,
# run examples/demo.rs against it, show a few metrics, stop the relay cleanly.
# Expects the services up (make services) and target/release/outbox-relay built.
set -euo pipefail
cd "$(dirname "$0")/.."

export OUTBOX_DATABASE_URL=${OUTBOX_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
export OUTBOX_AMQP_URL=${OUTBOX_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
RELAY=target/release/outbox-relay
METRICS=127.0.0.1:9465
LOG=target/demo-relay.log

[ -x "$RELAY" ] || { echo "demo: $RELAY is missing: run 'make build' (or 'make demo')" >&2; exit 1; }
if curl -s -o /dev/null "http://$METRICS/metrics"; then
    echo "demo: something already listens on $METRICS (an earlier relay?): stop it first" >&2
    exit 1
fi
# Build first, so the relay does not wait on the compiler.
cargo build --release --quiet --example demo

echo "== outbox-relay migrate --schema demo_shop"
"$RELAY" migrate --schema demo_shop

echo "== outbox-relay run --schema demo_shop (log: $LOG)"
"$RELAY" run --schema demo_shop --metrics-addr "$METRICS" >"$LOG" 2>&1 &
relay_pid=$!
trap 'kill "$relay_pid" 2>/dev/null || true' EXIT

# Wait for /readyz so the demo's timings are about the relay, not its start-up.
ready=no
for _ in $(seq 50); do
    curl -sf -o /dev/null "http://$METRICS/readyz" && { ready=yes; break; }
    kill -0 "$relay_pid" 2>/dev/null || { echo "demo: the relay exited; its log:" >&2; cat "$LOG" >&2; exit 1; }
    sleep 0.2
done
[ "$ready" = yes ] || echo "  (not ready after 10s: $(curl -s "http://$METRICS/readyz" || echo 'no answer'); going on)"

# The binary cargo built above: `cargo run` here could rebuild while the relay runs.
echo "== examples/demo.rs (cargo run --release --example demo)"
demo_rc=0
target/release/examples/demo || demo_rc=$?

echo "== a few of the relay's metrics (http://$METRICS/metrics)"
metrics=$(curl -sf "http://$METRICS/metrics" || true)
grep -E '^outbox_relay_(messages_published_total|pending_messages|delivery_lag_seconds_count)' <<<"$metrics" \
    | sed 's/^/  /' || echo "  (none found)"
if command -v promtool >/dev/null; then
    if problems=$(promtool check metrics <<<"$metrics" 2>&1); then
        echo "  promtool check metrics: ok"
    else
        echo "  promtool check metrics found problems:"
        mapfile -t lines <<<"$problems"
        printf '    %s\n' "${lines[@]}"
    fi
fi

echo "== stopping the relay (SIGTERM)"
kill -TERM "$relay_pid"
relay_rc=0
wait "$relay_pid" || relay_rc=$?
trap - EXIT
echo "  relay exited with code $relay_rc (0 = drained and stopped cleanly)"
[ "$relay_rc" = 0 ] || { echo "demo: relay log tail:" >&2; tail -n 20 "$LOG" >&2; }

[ "$demo_rc" = 0 ] && [ "$relay_rc" = 0 ]
