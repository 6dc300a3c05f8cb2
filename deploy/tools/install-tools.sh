#!/usr/bin/env bash
# Install the tools the deploy checks (tests/unit/test_deploy.py) need:
#   helm                 -> <repo>/.cache/bin/helm  (built with `go install`, needs Go)
#   kubernetes-validate  -> into $PYTHON (default: <repo>/.venv/bin/python), pip
#   promtool             -> Debian package `prometheus` (apt-get, only when running as root)
#   PostgreSQL server    -> Debian package `postgresql` (initdb/pg_ctl for the store tests and e2e)
#   buildah, mmdebstrap  -> Debian packages (`make image` and tests/integration/test_image.py)
# Idempotent: anything already present is left alone. Prints one line per tool it installs and
# nothing else unless something fails; exits non-zero on failure. Versions are pinned here and nowhere else.
set -euo pipefail

HELM_VERSION="v3.22.0"
# The Kubernetes version helm assumes without --kube-version: its client-go minor + 1, as helm's
# own Makefile stamps it (v3.22.0 builds against client-go v0.37 -> Kubernetes 1.37).
HELM_K8S_MINOR="37"
KUBERNETES_VALIDATE_VERSION="1.37.0"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN="$REPO/.cache/bin"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"

log() { printf 'install-tools: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Run a command silently; on failure show its output and stop.
quiet() {
    local out
    if ! out="$("$@" 2>&1)"; then
        printf '%s\n' "$out" >&2
        die "failed: $*"
    fi
}

# --- helm -------------------------------------------------------------------------------------
# `go install` builds carry none of the release build's stamps (`helm version` would say "v3.22" and
# `helm template` would assume Kubernetes 1.20), so they are set with -ldflags as helm's Makefile
# does. A helm reporting exactly HELM_VERSION is kept.
helm_ok() {
    [[ -x "$BIN/helm" ]] && [[ "$("$BIN/helm" version --template '{{.Version}}' 2>/dev/null)" == "$HELM_VERSION" ]]
}
if ! helm_ok; then
    command -v go >/dev/null 2>&1 || die "helm missing and Go is not installed (needed to build it)"
    mkdir -p "$BIN"
    log "building helm ${HELM_VERSION} into $BIN (go install)"
    ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}"
    for pkg in pkg/lint/rules pkg/chartutil; do
        ldflags+=" -X helm.sh/helm/v3/${pkg}.k8sVersionMajor=1"
        ldflags+=" -X helm.sh/helm/v3/${pkg}.k8sVersionMinor=${HELM_K8S_MINOR}"
    done
    quiet env GOBIN="$BIN" CGO_ENABLED=0 go install -ldflags "$ldflags" \
        "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
    helm_ok || die "helm ${HELM_VERSION} built but does not report that version"
fi

# --- kubernetes-validate ----------------------------------------------------------------------
[[ -x "$PYTHON" ]] || die "no python at $PYTHON (set PYTHON=...)"
have_kv="$("$PYTHON" - <<'EOF' 2>/dev/null || true
from importlib.metadata import version
print(version("kubernetes-validate"))
EOF
)"
if [[ "$have_kv" != "$KUBERNETES_VALIDATE_VERSION" ]]; then
    log "installing kubernetes-validate==${KUBERNETES_VALIDATE_VERSION} into $PYTHON"
    quiet "$PYTHON" -m pip install --quiet --disable-pip-version-check \
        "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}"
fi

# --- promtool (Debian package prometheus) -----------------------------------------------------
if ! command -v promtool >/dev/null 2>&1; then
    if [[ "$(id -u)" -ne 0 ]]; then
        die "promtool missing; as root run: apt-get update && apt-get install -y prometheus"
    fi
    command -v apt-get >/dev/null 2>&1 || die "promtool missing and apt-get is not available"
    log "installing promtool (apt-get install prometheus)"
    export DEBIAN_FRONTEND=noninteractive
    quiet apt-get update -qq
    # --no-install-recommends: skip the recommended extras (exporters, web assets).
    quiet apt-get install -y -qq --no-install-recommends prometheus
    command -v promtool >/dev/null 2>&1 || die "prometheus installed but promtool not on PATH"
fi

# --- PostgreSQL server binaries (Debian package postgresql) -----------------------------------
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    if [[ "$(id -u)" -ne 0 ]]; then
        die "PostgreSQL missing; as root run: apt-get update && apt-get install -y postgresql"
    fi
    log "installing PostgreSQL (apt-get install postgresql)"
    export DEBIAN_FRONTEND=noninteractive
    quiet apt-get update -qq
    quiet apt-get install -y -qq --no-install-recommends postgresql
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || die "postgresql installed but no initdb"
fi

# --- buildah and mmdebstrap (Debian packages): the daemonless image build ----------------------
missing=()
command -v buildah >/dev/null 2>&1 || missing+=(buildah)
command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
if ((${#missing[@]})); then
    if [[ "$(id -u)" -ne 0 ]]; then
        die "${missing[*]} missing; as root run: apt-get update && apt-get install -y ${missing[*]}"
    fi
    log "installing ${missing[*]} (apt-get install)"
    export DEBIAN_FRONTEND=noninteractive
    quiet apt-get update -qq
    quiet apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

exit 0
