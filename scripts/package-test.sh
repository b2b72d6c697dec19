#!/usr/bin/env bash
# Packaging check (slow; not part of scripts/test.sh): builds dist/ for x86_64 and aarch64
# (scripts/dist.sh) and the image for linux/amd64 and linux/arm64 (podman, FROM scratch,
# nothing pulled), then, inside a loopback-only network namespace, runs
# tests/package/test_package.py:
#   - the aarch64 binary under qemu-aarch64-static: --help, an aiortc sender -> receiver
#     call and an MP3 listener (ffmpeg);
#   - the amd64 image under podman (--network host inside the namespace, data dir
#     bind-mounted with /data/options.json): /health, the image's HEALTHCHECK, a call and
#     an MP3 listener, and `podman stop` (SIGTERM) ending it with exit code 0; then with
#     the add-on's shape (ssl: true, self-signed; MP3 on audio_port): WSS verified against
#     the CA from /ca.crt, and the same CA from a new container on the same /data.
# The arm64 image is built and its platform checked, not run (no binfmt here).
# Prints a summary: binary, archive and image sizes, build times, idle RSS of the container.
#
#   bash scripts/package-test.sh [pytest args...]
# Needs root (podman's storage in /var/lib/containers, unshare -n).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
IMAGE=localhost/voice-relay:package-test
WORK=$(mktemp -d /tmp/voice-relay-package-test.XXXXXX)
SUMMARY=$WORK/summary.txt
trap 'rm -rf "$WORK"' EXIT

step() { echo "== package-test: $*" >&2; }

[ "$(id -u)" = 0 ] || { echo "package-test.sh: run as root (podman, unshare -n)" >&2; exit 1; }

# --- tools --------------------------------------------------------------------
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
if [ ${#missing[@]} -gt 0 ]; then
    step "apt-get install ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# ffmpeg and the Python venv of the e2e harness (.venv-test)
bash scripts/test.sh --setup-only

# --- builds -------------------------------------------------------------------
step "scripts/dist.sh"
t0=$(date +%s)
bash scripts/dist.sh
dist_seconds=$(( $(date +%s) - t0 ))
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)

declare -A image_seconds
for arch in amd64 arm64; do
    step "podman build linux/$arch"
    t0=$(date +%s)
    # buildah sets TARGETARCH from --platform, as buildx does
    podman build --quiet --format docker --platform "linux/$arch" --build-arg "VERSION=$VERSION" \
        -t "$IMAGE-$arch" . >/dev/null
    image_seconds[$arch]=$(( $(date +%s) - t0 ))
    got=$(podman image inspect --format '{{.Os}}/{{.Architecture}}' "$IMAGE-$arch")
    [ "$got" = "linux/$arch" ] || { echo "image $IMAGE-$arch is $got" >&2; exit 1; }
    # Home Assistant's labels: its arch names (arm64 is aarch64), the add-on's version.
    want_hass_arch=$arch; [ "$arch" = arm64 ] && want_hass_arch=aarch64
    labels=$(podman image inspect --format \
        '{{index .Labels "io.hass.arch"}} {{index .Labels "io.hass.type"}} {{index .Labels "io.hass.version"}}' \
        "$IMAGE-$arch")
    [ "$labels" = "$want_hass_arch addon $VERSION" ] \
        || { echo "image $IMAGE-$arch has io.hass labels '$labels'" >&2; exit 1; }
done

# qemu-user runs the aarch64 binary directly (no binfmt registration needed)
cat >"$WORK/voice-relay-aarch64" <<EOF
#!/bin/sh
exec qemu-aarch64-static "$ROOT/dist/image/arm64/voice-relay" "\$@"
EOF
chmod +x "$WORK/voice-relay-aarch64"

# --- tests in a loopback-only network namespace -------------------------------
step "pytest tests/package (loopback-only network namespace)"
set +e
PACKAGE_QEMU_BIN="$WORK/voice-relay-aarch64" PACKAGE_IMAGE="$IMAGE-amd64" PACKAGE_SUMMARY="$SUMMARY" \
    unshare -n -- sh -c 'ip link set lo up && exec "$0" -m pytest tests/package -v -p no:cacheprovider "$@"' \
    "$ROOT/.venv-test/bin/python" "$@"
rc=$?
set -e

# --- summary ------------------------------------------------------------------
{
    echo
    echo "== package-test summary (voice-relay $VERSION)"
    for pair in x86_64:amd64 aarch64:arm64; do
        arch=${pair%%:*} darch=${pair##*:}
        bin=dist/image/$darch/voice-relay
        tgz=dist/voice-relay-$VERSION-$arch.tar.gz
        printf '%-8s binary %9s bytes (%s)\n' "$arch" "$(stat -c %s "$bin")" \
            "$(file -b "$bin" | cut -d, -f2,4-5 | tr -s ' ')"
        printf '%-8s archive %8s bytes  %s\n' "$arch" "$(stat -c %s "$tgz")" "$tgz"
        printf '%-8s image %10s bytes  %s (built in %ss)\n' "$arch" \
            "$(podman image inspect --format '{{.Size}}' "$IMAGE-$darch")" "$IMAGE-$darch" \
            "${image_seconds[$darch]}"
    done
    echo "dist.sh wall time this run: ${dist_seconds}s; cargo build per arch: $(tr '\n' ' ' <dist/build-times.txt)"
    [ -f "$SUMMARY" ] && cat "$SUMMARY"
    if [ $rc -eq 0 ]; then echo "package tests: passed"; else echo "package tests: FAILED (pytest exit $rc)"; fi
} >&2
exit $rc
