#!/usr/bin/env bash
# Build deploy/docker/Dockerfile without a daemon: buildah with chroot isolation (`make image`).
#
#   IMAGE       tag to build                 (default conveyor:<version in pyproject.toml>)
#   EXTRAS      pip extras of the image      (default ml; "" builds the services without torch)
#   BASE_IMAGE  base of both stages          (default debian:bookworm-slim, see below)
#   HOST_CA     CA bundle pip trusts inside the build (default the host's; "" for pip's own)
#
# The base: debian:bookworm-slim from a registry when one answers. Where none does (this project's
# build machines reach only package registries), the same Debian release is bootstrapped from
# Debian packages with mmdebstrap (--variant=minbase, what the slim image is built from) and kept
# as localhost/conveyor-base:bookworm, so the Dockerfile runs unchanged on top of it.
# Needs root (or a rootless buildah setup), buildah and mmdebstrap (deploy/tools/install-tools.sh).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/pyproject.toml" | head -n1)"
IMAGE="${IMAGE:-conveyor:${VERSION}}"
EXTRAS="${EXTRAS-ml}"
BASE_IMAGE="${BASE_IMAGE:-docker.io/library/debian:bookworm-slim}"
LOCAL_BASE="localhost/conveyor-base:bookworm"
HOST_CA="${HOST_CA-/etc/ssl/certs/ca-certificates.crt}"
# A registry that does not answer fails within this many seconds instead of hanging the build.
PULL_TIMEOUT_S=60

log() { printf 'build-image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v buildah >/dev/null 2>&1 || die "buildah missing; run deploy/tools/install-tools.sh"

have_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }

bootstrap_base() {
    command -v mmdebstrap >/dev/null 2>&1 || die "mmdebstrap missing; run deploy/tools/install-tools.sh"
    local tmp ctr
    tmp="$(mktemp -d)"
    log "bootstrapping $LOCAL_BASE from Debian packages (mmdebstrap bookworm, minbase)"
    mmdebstrap --quiet --variant=minbase --include=passwd bookworm "$tmp/rootfs.tar"
    ctr="$(buildah from scratch)"
    buildah add --quiet "$ctr" "$tmp/rootfs.tar" / >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd /bin/bash "$ctr"
    buildah commit --quiet --rm "$ctr" "$LOCAL_BASE" >/dev/null
    rm -rf "$tmp"
}

resolve_base() {
    if have_image "$BASE_IMAGE"; then
        printf '%s\n' "$BASE_IMAGE"
    elif timeout "$PULL_TIMEOUT_S" buildah pull --quiet "$BASE_IMAGE" >/dev/null 2>&1; then
        printf '%s\n' "$BASE_IMAGE"
    else
        log "cannot pull $BASE_IMAGE; using $LOCAL_BASE"
        have_image "$LOCAL_BASE" || bootstrap_base
        printf '%s\n' "$LOCAL_BASE"
    fi
}

base="$(resolve_base)"
args=(--isolation chroot --layers -f "$REPO/deploy/docker/Dockerfile" -t "$IMAGE"
      --build-arg "BASE_IMAGE=$base" --build-arg "EXTRAS=$EXTRAS")
if [[ -n "$HOST_CA" ]]; then
    [[ -r "$HOST_CA" ]] || die "HOST_CA=$HOST_CA is not readable"
    args+=(--volume "$HOST_CA:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
fi
log "building $IMAGE on $base (extras: ${EXTRAS:-none})"
buildah build --quiet "${args[@]}" "$REPO" >/dev/null
log "built $IMAGE"
