#!/usr/bin/env bash
# A local three-node RabbitMQ cluster beside the default broker, for the
# fail-over tests (tests/cluster.rs) and for trying the relay by hand.
#
#   scripts/rabbitmq-cluster.sh start          start (or heal, or rebuild) the cluster; idempotent
#   scripts/rabbitmq-cluster.sh stop           stop every node and remove the cluster's state
#   scripts/rabbitmq-cluster.sh status         one line per node: running or not, cluster members
#   scripts/rabbitmq-cluster.sh stop-node N    stop node N's whole VM (its TCP connections drop)
#   scripts/rabbitmq-cluster.sh kill-node N    SIGKILL node N's VM (a crash: no goodbye to clients)
#   scripts/rabbitmq-cluster.sh start-node N   start node N again and wait until it is back in the cluster
#   scripts/rabbitmq-cluster.sh freeze-node N  SIGSTOP node N's VM (a hung node: connections stay open, silent)
#   scripts/rabbitmq-cluster.sh thaw-node N    SIGCONT it (within ~45 s, or its peers see a network partition)
#   scripts/rabbitmq-cluster.sh urls           the AMQP URLs of the nodes, comma-separated
#
# Nodes (N = 1, 2, 3):
#   outbox-cN@localhost, AMQP 127.0.0.1:568N (guest/guest), distribution port 2568N
# The default broker (rabbit@localhost, 5672, 25672) is never touched; nor are
# the ports of the TLS test node (5690, 5691, 25690).
#
# The nodes run as the user the default broker runs as (rabbitmq) with that
# user's HOME, so they share its Erlang cookie and rabbitmqctl reaches them as
# it reaches the default broker. Each has its own mnesia, log, config and
# (empty) enabled-plugins file under $RABBIT_CLUSTER_DIR
# (default /tmp/outbox-rabbit-cluster). Plugins are off and each VM runs one
# scheduler (+S 1:1), so the three nodes fit a two-core machine.
#
# Exit status: 0 when done (the last line says what was done), 1 when it
# failed, 3 when this machine cannot run the cluster (the line says why:
# rabbitmq-server missing, not root, ...). RABBIT_CLUSTER_WAIT_SECS bounds each
# wait for a node (default 180).
set -euo pipefail

STATE_DIR=${RABBIT_CLUSTER_DIR:-/tmp/outbox-rabbit-cluster}
WAIT_SECS=${RABBIT_CLUSTER_WAIT_SECS:-180}
NODES=(1 2 3)
RABBIT_USER=rabbitmq
RABBIT_LIB=/usr/lib/rabbitmq/bin
EXIT_CANNOT=3

say() { echo "rabbitmq-cluster: $*"; }
die() { echo "rabbitmq-cluster: $*" >&2; exit 1; }
cannot() { echo "rabbitmq-cluster: cannot run here: $*" >&2; exit "$EXIT_CANNOT"; }

node_name() { echo "outbox-c$1@localhost"; }
amqp_port() { echo "568$1"; }
dist_port() { echo "2568$1"; }
node_dir() { echo "$STATE_DIR/c$1"; }
pid_file() { echo "$STATE_DIR/c$1/pid"; }

check_node_arg() {
    case "${1:-}" in
        1 | 2 | 3) ;;
        *) die "node must be 1, 2 or 3, not '${1:-}'" ;;
    esac
}

# ---------------------------------------------------------------------------
# Can this machine run it?
# ---------------------------------------------------------------------------

RABBIT_HOME=
preflight() {
    if ! command -v rabbitmq-server >/dev/null || [ ! -x "$RABBIT_LIB/rabbitmq-server" ]; then
        cannot "rabbitmq-server is not installed (apt-get install rabbitmq-server, or run scripts/services.sh)"
    fi
    [ -x "$RABBIT_LIB/rabbitmqctl" ] || cannot "$RABBIT_LIB/rabbitmqctl is missing"
    local entry
    entry=$(getent passwd "$RABBIT_USER") \
        || cannot "there is no '$RABBIT_USER' user (the rabbitmq-server package creates it)"
    RABBIT_HOME=$(echo "$entry" | cut -d: -f6)
    [ -f "$RABBIT_HOME/.erlang.cookie" ] \
        || cannot "no Erlang cookie at $RABBIT_HOME/.erlang.cookie: start the default broker once (scripts/services.sh) so it creates one"
    if [ "$(id -u)" -ne 0 ] && [ "$(id -un)" != "$RABBIT_USER" ]; then
        cannot "the nodes run as '$RABBIT_USER' (for the default broker's cookie): run this as root, as $RABBIT_USER, or with passwordless sudo"
    fi
    if [ "$(id -u)" -eq 0 ]; then
        command -v runuser >/dev/null || cannot "runuser (util-linux) is missing"
    fi
    command -v flock >/dev/null || cannot "flock (util-linux) is missing"
    command -v setsid >/dev/null || cannot "setsid (util-linux) is missing"
}

# Runs a RabbitMQ tool as the broker's user with its HOME (hence its cookie).
as_rabbit() {
    if [ "$(id -u)" -eq 0 ]; then
        (cd "$RABBIT_HOME" && runuser -u "$RABBIT_USER" -- env HOME="$RABBIT_HOME" "$@")
    else
        (cd "$RABBIT_HOME" && env HOME="$RABBIT_HOME" "$@")
    fi
}

ctl() {
    local n=$1; shift
    as_rabbit "$RABBIT_LIB/rabbitmqctl" -q -n "$(node_name "$n")" "$@"
}

# ---------------------------------------------------------------------------
# One node
# ---------------------------------------------------------------------------

port_open() { timeout 2 bash -c "</dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# The pid of node N's VM if it runs: found by the node name in the
# environment of the broker user's beam.smp processes (no pid file: the VM
# writes one only some way into its boot).
vm_pid() {
    local pid
    local environ
    for pid in $(pgrep -u "$RABBIT_USER" -x beam.smp); do
        # No pipe into grep -q: with pipefail, tr's SIGPIPE would read as no match.
        environ=$(tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ") || continue
        if grep -qx "RABBITMQ_NODENAME=$(node_name "$1")" <<<"$environ"; then
            echo "$pid"
            return 0
        fi
    done
    return 1
}

# The app is running on node N (answers within a few seconds).
node_up() {
    timeout 20 "$0" __ctl "$1" await_startup --timeout 5 >/dev/null 2>&1
}

write_files() {
    mkdir -p "$STATE_DIR"
    local n dir
    for n in "${NODES[@]}"; do
        dir=$(node_dir "$n")
        mkdir -p "$dir/mnesia" "$dir/log"
        cat >"$dir/rabbitmq.conf" <<EOF
# Node $(node_name "$n") of the outbox-relay test cluster (scripts/rabbitmq-cluster.sh).
listeners.tcp.1 = 127.0.0.1:$(amqp_port "$n")
loopback_users.guest = true
vm_memory_high_watermark.absolute = 1GB
disk_free_limit.absolute = 50MB
cluster_partition_handling = ignore
# A node restarting after its peers waits for them at most 3 x 10 s.
mnesia_table_loading_retry_timeout = 10000
mnesia_table_loading_retry_limit = 3
log.console = false
log.file.level = info
EOF
        echo "[]." >"$dir/enabled_plugins"
        cat >"$dir/rabbitmq-env.conf" <<EOF
# Instead of /etc/rabbitmq/rabbitmq-env.conf (the default broker's): bind
# epmd and distribution to loopback like it does, nothing else.
ERL_EPMD_ADDRESS=127.0.0.1
EOF
    done
    if [ "$(id -u)" -eq 0 ]; then
        chown -R "$RABBIT_USER:" "$STATE_DIR"
    fi
}

# The launcher of node N's VM (runuser, which waits for the VM) still runs.
launcher_alive() {
    local pid
    pid=$(cat "$(node_dir "$1")/launcher.pid" 2>/dev/null) || return 1
    kill -0 "$pid" 2>/dev/null && grep -q "RABBITMQ_NODENAME=$(node_name "$1")" "/proc/$pid/cmdline" 2>/dev/null
}

# Starts node N's VM in the background, detached from the caller (its own
# session, output to its log dir), and returns at once.
launch_node() {
    local n=$1 dir
    dir=$(node_dir "$n")
    if vm_pid "$n" >/dev/null || launcher_alive "$n"; then
        return 0
    fi
    if port_open "$(amqp_port "$n")"; then
        die "port $(amqp_port "$n") is taken by another process (not node $(node_name "$n")): free it or stop that process"
    fi
    rm -f "$(pid_file "$n")"
    as_rabbit env \
        RABBITMQ_NODENAME="$(node_name "$n")" \
        RABBITMQ_USE_LONGNAME=false \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$(amqp_port "$n")" \
        RABBITMQ_DIST_PORT="$(dist_port "$n")" \
        RABBITMQ_MNESIA_BASE="$dir/mnesia" \
        RABBITMQ_LOG_BASE="$dir/log" \
        RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
        RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
        RABBITMQ_PID_FILE="$(pid_file "$n")" \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="+S 1:1 +SDcpu 1:1 -kernel inet_dist_use_interface {127,0,0,1}" \
        setsid "$RABBIT_LIB/rabbitmq-server" </dev/null >"$dir/log/stdout.log" 2>&1 9>&- &
    # Alive (runuser waits for the VM) until the VM exits; the VM itself
    # starts (as beam.smp) a moment later.
    echo $! >"$dir/launcher.pid"
    # The VM is its own session now; the shell need not wait for it.
    disown || true
}

# Waits until node N's app runs, or fails with the log's tail.
wait_node() {
    local n=$1 deadline=$((SECONDS + WAIT_SECS)) why=
    until node_up "$n"; do
        if ! vm_pid "$n" >/dev/null && ! launcher_alive "$n"; then
            why="exited while starting"
        elif [ "$SECONDS" -ge "$deadline" ]; then
            why="did not start within ${WAIT_SECS}s"
        fi
        if [ -n "$why" ]; then
            echo "--- tail of $(node_dir "$n")/log ---" >&2
            tail -n 20 "$(node_dir "$n")"/log/*.log >&2 2>/dev/null || true
            die "node $(node_name "$n") $why"
        fi
        sleep 1
    done
}

# Node names that node N sees as running members of its cluster.
running_members() {
    timeout 30 "$0" __ctl "$1" eval \
        'io:format("~s~n", [string:join([atom_to_list(X) || X <- rabbit_nodes:all_running()], " ")]).' \
        2>/dev/null | head -n1
}

all_members() {
    timeout 30 "$0" __ctl "$1" eval \
        'io:format("~s~n", [string:join([atom_to_list(X) || X <- rabbit_nodes:all()], " ")]).' \
        2>/dev/null | head -n1
}

expected_members() {
    local n out=()
    for n in "${NODES[@]}"; do out+=("$(node_name "$n")"); done
    printf '%s\n' "${out[@]}" | sort | tr '\n' ' ' | sed 's/ $//'
}

sorted() { tr ' ' '\n' | grep -v '^$' | sort | tr '\n' ' ' | sed 's/ $//'; }

# Node N is a member of node 1's cluster (joins it if not).
join_node() {
    local n=$1
    [ "$n" = 1 ] && return 0
    local members
    members=$(all_members "$n" | tr ' ' '\n')
    if grep -qx "$(node_name 1)" <<<"$members"; then
        return 0
    fi
    say "joining $(node_name "$n") to $(node_name 1)"
    local step out
    for step in stop_app "join_cluster $(node_name 1)" start_app; do
        # shellcheck disable=SC2086 # step is a command and its argument
        out=$(ctl "$n" $step 2>&1) || die "rabbitmqctl -n $(node_name "$n") $step failed: $out"
    done
    wait_node "$n"
}

healthy() {
    local n want
    want=$(expected_members)
    for n in "${NODES[@]}"; do
        vm_pid "$n" >/dev/null || return 1
        node_up "$n" || return 1
        [ "$(running_members "$n" | sorted)" = "$want" ] || return 1
    done
}

stop_vm() {
    local n=$1 pid
    pid=$(vm_pid "$n") || return 0
    # `stop` with the pid file waits for the VM to exit; kill it if that fails.
    if ! timeout 90 "$0" __ctl "$n" stop "$(pid_file "$n")" >/dev/null 2>&1; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    local deadline=$((SECONDS + 30))
    while kill -0 "$pid" 2>/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] || die "node $(node_name "$n") (pid $pid) did not exit"
        sleep 0.2
    done
}

kill_vm() {
    local n=$1 pid
    pid=$(vm_pid "$n") || return 0
    kill -KILL "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    # The VM's helper processes (erl_child_setup, inet_gethost) go with it.
}

# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------

fresh_cluster() {
    local n
    for n in "${NODES[@]}"; do stop_vm "$n"; done
    rm -rf "$STATE_DIR"/c1 "$STATE_DIR"/c2 "$STATE_DIR"/c3
    write_files
    for n in "${NODES[@]}"; do launch_node "$n"; done
    for n in "${NODES[@]}"; do wait_node "$n"; done
    for n in 2 3; do join_node "$n"; done
}

cmd_start() {
    local began=$SECONDS n stopped=()
    thaw_all
    if healthy; then
        say "already running: $(expected_members) (AMQP $(cmd_urls)); nothing done"
        return 0
    fi
    if [ -d "$(node_dir 1)/mnesia/$(node_name 1)" ] && [ -d "$(node_dir 2)/mnesia/$(node_name 2)" ] \
        && [ -d "$(node_dir 3)/mnesia/$(node_name 3)" ]; then
        # Nodes stopped (a test's stop-node, a reboot): start them together, so
        # none waits for a peer that is not coming.
        write_files
        for n in "${NODES[@]}"; do
            if ! vm_pid "$n" >/dev/null; then
                stopped+=("$n")
                launch_node "$n"
            fi
        done
        # A node whose peers never come gives up after 3 x 10 s (its config).
        local ok=1
        for n in "${NODES[@]}"; do
            (WAIT_SECS=60 wait_node "$n") >/dev/null 2>&1 || ok=0
        done
        if [ "$ok" = 1 ]; then
            for n in 2 3; do join_node "$n" || ok=0; done
        fi
        if [ "$ok" = 1 ] && healthy; then
            say "started stopped nodes (${stopped[*]:-none}) of the existing cluster in $((SECONDS - began))s; running: $(expected_members) (AMQP $(cmd_urls))"
            return 0
        fi
        say "the existing cluster is broken (nodes not running or not clustered): resetting it"
    elif [ -d "$(node_dir 1)" ] || [ -d "$(node_dir 2)" ] || [ -d "$(node_dir 3)" ]; then
        say "a node's state is missing in $STATE_DIR: resetting the cluster"
    fi
    fresh_cluster
    healthy || die "cluster formed but not healthy: $(cmd_status 2>&1 | tr '\n' ';')"
    say "started a fresh cluster in $((SECONDS - began))s: $(expected_members) (AMQP $(cmd_urls)); state in $STATE_DIR"
}

cmd_stop() {
    local n
    for n in "${NODES[@]}"; do stop_vm "$n"; done
    rm -rf "$STATE_DIR"/c1 "$STATE_DIR"/c2 "$STATE_DIR"/c3
    say "stopped every node and removed the cluster's state in $STATE_DIR/c{1,2,3}"
}

cmd_status() {
    local n pid
    for n in "${NODES[@]}"; do
        if pid=$(vm_pid "$n"); then
            if node_up "$n"; then
                echo "$(node_name "$n") amqp=127.0.0.1:$(amqp_port "$n") pid=$pid running; members running: $(running_members "$n" | sorted)"
            else
                echo "$(node_name "$n") amqp=127.0.0.1:$(amqp_port "$n") pid=$pid VM up, app not running"
            fi
        else
            echo "$(node_name "$n") amqp=127.0.0.1:$(amqp_port "$n") stopped"
        fi
    done
    if healthy; then
        echo "cluster healthy: all three nodes running and clustered"
    else
        echo "cluster NOT healthy ('$0 start' heals or rebuilds it)"
        return 1
    fi
}

cmd_stop_node() {
    local n=$1 began=$SECONDS
    vm_pid "$n" >/dev/null || { say "$(node_name "$n") is not running; nothing done"; return 0; }
    stop_vm "$n"
    say "stopped $(node_name "$n") (whole VM, AMQP port $(amqp_port "$n") closed) in $((SECONDS - began))s"
}

cmd_kill_node() {
    local n=$1
    vm_pid "$n" >/dev/null || { say "$(node_name "$n") is not running; nothing done"; return 0; }
    kill_vm "$n"
    say "killed $(node_name "$n") (SIGKILL of its VM)"
}

cmd_freeze_node() {
    local n=$1 pid
    pid=$(vm_pid "$n") || die "$(node_name "$n") is not running"
    kill -STOP "$pid"
    say "froze $(node_name "$n") (SIGSTOP of pid $pid; thaw-node $n within ~45 s, before its peers declare a partition)"
}

cmd_thaw_node() {
    local n=$1 pid
    pid=$(vm_pid "$n") || { say "$(node_name "$n") is not running; nothing done"; return 0; }
    kill -CONT "$pid"
    say "thawed $(node_name "$n") (SIGCONT of pid $pid)"
}

# SIGCONT for every frozen VM (a test that froze one and died).
thaw_all() {
    local n pid
    for n in "${NODES[@]}"; do
        if pid=$(vm_pid "$n") && [ "$(ps -o stat= -p "$pid" | cut -c1)" = T ]; then
            kill -CONT "$pid"
            say "thawed $(node_name "$n"), which was frozen"
        fi
    done
}

cmd_start_node() {
    local n=$1 began=$SECONDS
    [ -d "$(node_dir "$n")/mnesia" ] || die "node $n has no state: run '$0 start' first"
    if vm_pid "$n" >/dev/null && [ "$(ps -o stat= -p "$(vm_pid "$n")" | cut -c1)" = T ]; then
        cmd_thaw_node "$n"
    fi
    if vm_pid "$n" >/dev/null && node_up "$n"; then
        say "$(node_name "$n") is already running; nothing done"
        return 0
    fi
    write_files
    launch_node "$n"
    wait_node "$n"
    join_node "$n"
    say "started $(node_name "$n") in $((SECONDS - began))s; members running: $(running_members "$n" | sorted)"
}

cmd_urls() {
    local n out=()
    for n in "${NODES[@]}"; do out+=("amqp://guest:guest@127.0.0.1:$(amqp_port "$n")/%2f"); done
    local IFS=,
    echo "${out[*]}"
}

with_lock() {
    mkdir -p "$STATE_DIR"
    exec 9>"$STATE_DIR/.lock"
    flock -w 600 9 || die "another rabbitmq-cluster.sh held $STATE_DIR/.lock for 600s"
    "$@"
}

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

main() {
    local cmd=${1:-}
    # The nodes run as the broker's user: from another user, through
    # passwordless sudo when there is one (CI has no stdin to type a password).
    if [ "$(id -u)" -ne 0 ] && [ "$(id -un)" != "$RABBIT_USER" ] && [ "$cmd" != urls ] \
        && command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        exec sudo -n RABBIT_CLUSTER_DIR="$STATE_DIR" RABBIT_CLUSTER_WAIT_SECS="$WAIT_SECS" bash "$0" "$@"
    fi
    case "$cmd" in
        __ctl)
            # Internal: rabbitmqctl against node $2 as the broker's user.
            shift
            preflight
            local n=$1; shift
            ctl "$n" "$@"
            return
            ;;
        urls) cmd_urls; return ;;
        start | stop | status) preflight; with_lock "cmd_$cmd" ;;
        stop-node | kill-node | start-node | freeze-node | thaw-node)
            check_node_arg "${2:-}"
            preflight
            with_lock "cmd_${cmd//-/_}" "$2"
            ;;
        *) usage ;;
    esac
}

main "$@"
