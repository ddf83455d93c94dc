#!/usr/bin/env bash
# A private RabbitMQ node with TLS listeners, beside the default broker, for
# tests/tls.rs; and the test PKI (a CA, server and client certificates) that
# the node and the TLS tests' private PostgreSQL use.
#
#   scripts/rabbitmq-tls-node.sh pki                 make the PKI if missing (needs only openssl)
#   scripts/rabbitmq-tls-node.sh start [--user PID]  PKI + node up and ready (idempotent)
#   scripts/rabbitmq-tls-node.sh stop  [--user PID]  node down (see "users" below)
#   scripts/rabbitmq-tls-node.sh status              running or not, ports, users
#
# Node outbox-tls@localhost, as user rabbitmq (the default broker's user, so
# the same Erlang cookie in /var/lib/rabbitmq), its own mnesia, logs, config
# and enabled plugins under $OUTBOX_TLS_NODE_DIR (default /tmp/outbox-rabbitmq-tls).
# Every listener is on 127.0.0.1:
#   5690  plain AMQP (the tests' own consumer and the "plain-text-only server")
#   5691  TLS, verify_peer, fail_if_no_peer_cert=false (a client cert is
#         checked when presented, not required)
#   5692  TLS, verify_peer, fail_if_no_peer_cert=true (client cert required)
#   5693  TLS with a server certificate for wrong-host.invalid (host name case)
#   25690 Erlang distribution
# The 3-node cluster script (scripts/rabbitmq-cluster.sh) uses 5681-5683 and
# 25681-25683; the default broker 5672/25672. Neither is touched here.
# RabbitMQ takes one ssl_options for all its TLS listeners, so 5692 and 5693
# are added after boot with rabbit_networking:start_ssl_listener/4 (eval).
#
# Users: `start --user PID` records PID as a user of the node; `stop --user
# PID` removes it and stops the node only when no live user is left and it
# was never started by hand (`start` without --user). Plain `stop` always
# stops. Tests (one process each under nextest) start and stop this way, so
# the last one out stops the node. Every step holds a lock ($DIR/lock).
#
# OUTBOX_TLS_NODE_WAIT_SECS bounds the wait for the node (default 120).
set -euo pipefail

DIR=${OUTBOX_TLS_NODE_DIR:-/tmp/outbox-rabbitmq-tls}
WAIT_SECS=${OUTBOX_TLS_NODE_WAIT_SECS:-120}
NODE=outbox-tls@localhost
AMQP_PORT=5690
TLS_PORT=5691
TLS_PEER_PORT=5692
TLS_WRONG_HOST_PORT=5693
DIST_PORT=25690
RMQ_BIN=/usr/lib/rabbitmq/bin
RUN_AS=rabbitmq
RUN_HOME=/var/lib/rabbitmq
PKI=$DIR/pki

say() { echo "rabbitmq-tls-node: $*"; }
die() { echo "rabbitmq-tls-node: $*" >&2; exit 1; }

# ---------------------------------------------------------------------------
# PKI
# ---------------------------------------------------------------------------

# sign NAME CA SUBJECT EXT: key NAME.key and certificate NAME.pem signed by CA.
sign() {
    local name=$1 ca=$2 subject=$3 ext=$4
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$name.key" -out "$name.csr" -subj "$subject" 2>/dev/null
    printf '%b\n' "$ext" > "$name.ext"
    openssl x509 -req -in "$name.csr" -CA "$ca.pem" -CAkey "$ca.key" -CAcreateserial \
        -days 3650 -sha256 -extfile "$name.ext" -out "$name.pem" 2>/dev/null
    rm -f "$name.csr" "$name.ext"
}

make_ca() {
    local name=$1 subject=$2
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$name.key" -out "$name.pem" -days 3650 -subj "$subject" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
}

make_pki() {
    if [ -f "$PKI/complete" ]; then
        return 0
    fi
    command -v openssl >/dev/null || die "openssl is not installed: apt-get install openssl"
    local tmp="$DIR/pki.tmp"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    (
        cd "$tmp"
        local server_ext="basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth"
        local client_ext="basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth"
        make_ca ca "/CN=outbox-relay test CA"
        make_ca other-ca "/CN=outbox-relay other CA"
        sign server ca "/CN=localhost" "$server_ext\nsubjectAltName=DNS:localhost,IP:127.0.0.1"
        sign wrong-host ca "/CN=wrong-host.invalid" "$server_ext\nsubjectAltName=DNS:wrong-host.invalid"
        # CN = the PostgreSQL role that cert authentication logs in as.
        sign client ca "/CN=outbox_relay" "$client_ext"
        sign other-client other-ca "/CN=outbox_relay" "$client_ext"
        chmod 0644 ./*.pem
        chmod 0640 ./*.key
        touch complete
    )
    rm -rf "$PKI"
    mv "$tmp" "$PKI"
    say "made the test PKI in $PKI (ca, other-ca, server, wrong-host, client, other-client)"
}

# ---------------------------------------------------------------------------
# Node
# ---------------------------------------------------------------------------

as_rabbitmq() {
    if [ "$(id -u)" -eq 0 ]; then
        su "$RUN_AS" -s /bin/sh -c "$1"
    elif [ "$(id -un)" = "$RUN_AS" ]; then
        sh -c "$1"
    else
        die "run as root or as $RUN_AS (the node must share the default broker's Erlang cookie)"
    fi
}

ctl() {
    as_rabbitmq "HOME=$RUN_HOME ERL_EPMD_ADDRESS=127.0.0.1 RABBITMQ_CONF_ENV_FILE=$DIR/rabbitmq-env.conf $RMQ_BIN/rabbitmqctl -q -n $NODE $*"
}

port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

is_running() {
    ctl "ping" >/dev/null 2>&1
}

write_config() {
    mkdir -p "$DIR/node/mnesia" "$DIR/node/log" "$DIR/node/tls"
    cp "$PKI/ca.pem" "$PKI/server.pem" "$PKI/server.key" \
        "$PKI/wrong-host.pem" "$PKI/wrong-host.key" "$DIR/node/tls/"
    cat > "$DIR/node/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$AMQP_PORT
listeners.ssl.1 = 127.0.0.1:$TLS_PORT
ssl_options.cacertfile = $DIR/node/tls/ca.pem
ssl_options.certfile = $DIR/node/tls/server.pem
ssl_options.keyfile = $DIR/node/tls/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
loopback_users.guest = true
EOF
    echo '[].' > "$DIR/node/enabled_plugins"
    # Its own env file, so /etc/rabbitmq/rabbitmq-env.conf (NODENAME of the
    # default broker) does not apply.
    cat > "$DIR/rabbitmq-env.conf" <<EOF
NODENAME=$NODE
EOF
    chown -R "$RUN_AS:$RUN_AS" "$DIR/node" "$DIR/rabbitmq-env.conf"
    chmod 0600 "$DIR/node/tls/"*.key
}

# ssl options of an extra listener, as Erlang terms.
extra_listener() {
    local port=$1 cert=$2 fail_if_no_peer_cert=$3
    local tls="$DIR/node/tls"
    ctl "eval 'rabbit_networking:start_ssl_listener({\"127.0.0.1\", $port}, [{cacertfile, \"$tls/ca.pem\"}, {certfile, \"$tls/$cert.pem\"}, {keyfile, \"$tls/$cert.key\"}, {verify, verify_peer}, {fail_if_no_peer_cert, $fail_if_no_peer_cert}], 1, 1).'" >/dev/null
}

add_extra_listeners() {
    if ! port_open "$TLS_PEER_PORT"; then
        extra_listener "$TLS_PEER_PORT" server true
        say "listener 127.0.0.1:$TLS_PEER_PORT: TLS, client certificate required"
    fi
    if ! port_open "$TLS_WRONG_HOST_PORT"; then
        extra_listener "$TLS_WRONG_HOST_PORT" wrong-host false
        say "listener 127.0.0.1:$TLS_WRONG_HOST_PORT: TLS, server certificate for wrong-host.invalid"
    fi
}

start_node() {
    command -v "$RMQ_BIN/rabbitmq-server" >/dev/null || [ -x "$RMQ_BIN/rabbitmq-server" ] \
        || die "rabbitmq-server is not installed ($RMQ_BIN/rabbitmq-server missing): apt-get install rabbitmq-server"
    id "$RUN_AS" >/dev/null 2>&1 || die "user $RUN_AS does not exist (is rabbitmq-server installed?)"
    if is_running; then
        say "node $NODE already running"
        add_extra_listeners
        return 0
    fi
    for port in $AMQP_PORT $TLS_PORT $TLS_PEER_PORT $TLS_WRONG_HOST_PORT $DIST_PORT; do
        if port_open "$port"; then
            die "port $port is taken by another process, and node $NODE is not running: free it (ss -ltnp | grep $port)"
        fi
    done
    # A fresh node each time: no state of an earlier run.
    rm -rf "$DIR/node"
    write_config
    local env="HOME=$RUN_HOME ERL_EPMD_ADDRESS=127.0.0.1"
    env+=" RABBITMQ_CONF_ENV_FILE=$DIR/rabbitmq-env.conf RABBITMQ_NODENAME=$NODE"
    env+=" RABBITMQ_DIST_PORT=$DIST_PORT RABBITMQ_CONFIG_FILE=$DIR/node/rabbitmq.conf"
    env+=" RABBITMQ_ADVANCED_CONFIG_FILE=$DIR/node/advanced.config"
    env+=" RABBITMQ_ENABLED_PLUGINS_FILE=$DIR/node/enabled_plugins"
    env+=" RABBITMQ_MNESIA_BASE=$DIR/node/mnesia RABBITMQ_LOG_BASE=$DIR/node/log"
    env+=" RABBITMQ_PID_FILE=$DIR/node/pid"
    env+=" RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}'"
    # 9>&-: the node must not inherit (and so hold) this script's lock.
    as_rabbitmq "cd $DIR/node && env $env setsid nohup $RMQ_BIN/rabbitmq-server > $DIR/node/log/startup.log 2>&1 < /dev/null &" 9>&-
    say "starting node $NODE (logs in $DIR/node/log)"
    local deadline=$((SECONDS + WAIT_SECS))
    until ctl "await_startup --timeout 10" >/dev/null 2>&1 && port_open "$TLS_PORT"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 30 "$DIR/node/log/startup.log" >&2 || true
            die "node $NODE did not start within ${WAIT_SECS}s: see $DIR/node/log"
        fi
        sleep 1
    done
    add_extra_listeners
    say "node $NODE ready: amqp 127.0.0.1:$AMQP_PORT, amqps 127.0.0.1:$TLS_PORT (client cert optional), :$TLS_PEER_PORT (required), :$TLS_WRONG_HOST_PORT (wrong host name)"
}

stop_node() {
    if ! is_running; then
        say "node $NODE is not running"
        return 0
    fi
    local pid
    pid=$(cat "$DIR/node/pid" 2>/dev/null || true)
    ctl "stop" >/dev/null 2>&1 || true
    local deadline=$((SECONDS + WAIT_SECS))
    while is_running || { [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            die "node $NODE did not stop within ${WAIT_SECS}s (pid ${pid:-unknown})"
        fi
        sleep 1
    done
    rm -rf "$DIR/node/mnesia"
    say "stopped node $NODE"
}

# ---------------------------------------------------------------------------
# Users
# ---------------------------------------------------------------------------

live_users() {
    local f
    for f in "$DIR"/users/*; do
        [ -e "$f" ] || continue
        if kill -0 "$(basename "$f")" 2>/dev/null; then
            basename "$f"
        else
            rm -f "$f"
        fi
    done
}

main() {
    local cmd=${1:-}
    shift || true
    local user=""
    if [ "${1:-}" = "--user" ]; then
        user=${2:?--user needs a process id}
    fi
    mkdir -p "$DIR/users"
    exec 9> "$DIR/lock"
    flock -w "$WAIT_SECS" 9 || die "another run of this script holds $DIR/lock for over ${WAIT_SECS}s"
    case "$cmd" in
        pki)
            make_pki
            say "pki: $PKI"
            ;;
        start)
            make_pki
            if [ -n "$user" ]; then
                touch "$DIR/users/$user"
            else
                touch "$DIR/held-by-hand"
            fi
            start_node
            ;;
        stop)
            if [ -n "$user" ]; then
                rm -f "$DIR/users/$user"
                local others
                others=$(live_users | tr '\n' ' ')
                if [ -n "$others" ]; then
                    say "node $NODE left running: still used by process(es) $others"
                    return 0
                fi
                if [ -e "$DIR/held-by-hand" ]; then
                    say "node $NODE left running: it was started by hand (stop it with '$0 stop')"
                    return 0
                fi
            fi
            rm -f "$DIR/held-by-hand" "$DIR"/users/*
            stop_node
            ;;
        status)
            if is_running; then
                say "node $NODE running: amqp 127.0.0.1:$AMQP_PORT, amqps :$TLS_PORT :$TLS_PEER_PORT :$TLS_WRONG_HOST_PORT, dist :$DIST_PORT"
            else
                say "node $NODE not running"
            fi
            say "users: $(live_users | tr '\n' ' ')$([ -e "$DIR/held-by-hand" ] && echo '(and started by hand)')"
            say "pki: $PKI$([ -f "$PKI/complete" ] || echo ' (not made yet)')"
            ;;
        *)
            die "usage: $0 pki | start [--user PID] | stop [--user PID] | status"
            ;;
    esac
}

main "$@"
