#!/usr/bin/env bash
# Static release archives: dist/voice-relay-<version>-<arch>.tar.gz for x86_64 and aarch64
# Linux (musl, statically linked, no runtime dependency), plus dist/image/<amd64|arm64>/
# holding the binary the Dockerfile copies.
#
# Cross-compiles with cargo-zigbuild (zig as the C compiler and linker for the C parts:
# aws-lc, libopus via cmake, LAME via autotools), from a pinned Python venv. Installs what
# it needs idempotently (apt: build-essential, cmake, make, python3-venv, file; rustup
# targets; the venv), so it works on a fresh Debian machine with rustup.
#
#   bash scripts/dist.sh                 # both architectures
#   DIST_ARCHES=aarch64 bash scripts/dist.sh
#
# Build times go to dist/build-times.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

ARCHES=${DIST_ARCHES:-"x86_64 aarch64"}
ZIGLANG_VERSION=0.17.1
CARGO_ZIGBUILD_VERSION=0.24.1
VENV=${DIST_VENV:-$ROOT/.venv-dist}
TARGET_DIR=$ROOT/target/dist
DIST=$ROOT/dist
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
[ -n "$VERSION" ] || { echo "dist.sh: no version in Cargo.toml" >&2; exit 1; }

log() { echo "== dist: $*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

ensure_apt_packages() {
    local missing=()
    command -v cc >/dev/null || missing+=(build-essential)
    command -v make >/dev/null || missing+=(make)
    command -v cmake >/dev/null || missing+=(cmake)
    command -v file >/dev/null || missing+=(file)
    python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
    if [ ${#missing[@]} -gt 0 ]; then
        log "apt-get install ${missing[*]}"
        as_root apt-get update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    fi
}

ensure_rust_targets() {
    command -v rustup >/dev/null || {
        echo "dist.sh: rustup is needed to add the musl targets (https://rustup.rs)" >&2
        exit 1
    }
    local installed
    installed=$(rustup target list --installed)
    for arch in $ARCHES; do
        grep -qx "$arch-unknown-linux-musl" <<<"$installed" \
            || rustup target add "$arch-unknown-linux-musl"
    done
}

ensure_zigbuild() {
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    local zig zigbuild
    zig=$("$VENV/bin/python" -m pip show ziglang 2>/dev/null || true)
    zigbuild=$("$VENV/bin/cargo-zigbuild" --version 2>/dev/null || true)
    if ! grep -qx "Version: $ZIGLANG_VERSION" <<<"$zig" \
        || [ "$zigbuild" != "cargo-zigbuild $CARGO_ZIGBUILD_VERSION" ]; then
        log "venv $VENV: ziglang $ZIGLANG_VERSION, cargo-zigbuild $CARGO_ZIGBUILD_VERSION"
        "$VENV/bin/python" -m pip install --quiet \
            "ziglang==$ZIGLANG_VERSION" "cargo-zigbuild==$CARGO_ZIGBUILD_VERSION"
    fi
}

# Builds the static binary for one arch; prints its path.
build_binary() {
    local arch=$1 target=$1-unknown-linux-musl
    # LAME's configure must be told it is cross-compiling, or it configures for the build
    # machine (mp3lame-sys passes no --host when HOST != TARGET).
    env PATH="$VENV/bin:$PATH" \
        MP3LAME_SYS_OVERRIDE_HOST="$arch-linux-musl" \
        CARGO_PROFILE_RELEASE_DEBUG=false \
        CARGO_PROFILE_RELEASE_STRIP=symbols \
        cargo zigbuild --release --locked --target "$target" --target-dir "$TARGET_DIR" \
        --bin voice-relay >&2
    echo "$TARGET_DIR/$target/release/voice-relay"
}

check_static() {
    local bin=$1 arch=$2 desc
    desc=$(file -b "$bin")
    log "file: $desc"
    case "$arch:$desc" in
        x86_64:*x86-64*) ;;
        aarch64:*aarch64*|aarch64:*ARM\ aarch64*) ;;
        *) echo "dist.sh: $bin is not an $arch binary" >&2; exit 1 ;;
    esac
    case "$desc" in
        *"statically linked"*|*"static-pie linked"*) ;;
        *) echo "dist.sh: $bin is not statically linked" >&2; exit 1 ;;
    esac
    # ldd fails on a static executable (of either architecture)
    if ldd "$bin" >/dev/null 2>&1; then
        echo "dist.sh: ldd lists libraries for $bin" >&2
        exit 1
    fi
}

# Licence texts of every crate in the binary's dependency graph (Rust crates and the C
# libraries they bundle: aws-lc, libopus, LAME), plus a list of names, versions, licences.
write_third_party() {
    local target=$1 out=$2
    mkdir -p "$out"
    cargo metadata --format-version 1 --locked --filter-platform "$target" \
        | python3 "$ROOT/scripts/third_party.py" "$out"
}

# Version of a crate as locked in Cargo.lock.
locked_version() {
    grep -A1 "^name = \"$1\"\$" Cargo.lock | sed -n 's/^version = "\(.*\)"$/\1/p' | head -n1
}

write_rebuild_notes() {
    local out=$1
    sed -e "s/@VERSION@/$VERSION/g" \
        -e "s/@LAME_SYS@/$(locked_version mp3lame-sys)/g" \
        -e "s/@OPUS_SYS@/$(locked_version opusic-sys)/g" \
        -e "s/@AWS_LC_SYS@/$(locked_version aws-lc-sys)/g" \
        "$ROOT/packaging/REBUILD.md" >"$out"
}

pack() {
    local arch=$1 bin=$2 name=voice-relay-$VERSION-$1
    local stage=$TARGET_DIR/stage/$name
    rm -rf "$stage"
    mkdir -p "$stage/licenses"
    install -m 0755 "$bin" "$stage/voice-relay"
    cp README.md LICENSE "$stage/"
    cp licenses/* "$stage/licenses/"
    write_third_party "$arch-unknown-linux-musl" "$stage/licenses/third-party"
    write_rebuild_notes "$stage/REBUILD.md"
    tar -C "$TARGET_DIR/stage" --owner=0 --group=0 --numeric-owner --sort=name \
        -czf "$DIST/$name.tar.gz" "$name"
    case "$arch" in x86_64) docker_arch=amd64 ;; aarch64) docker_arch=arm64 ;; esac
    mkdir -p "$DIST/image/$docker_arch"
    install -m 0755 "$bin" "$DIST/image/$docker_arch/voice-relay"
    log "$DIST/$name.tar.gz ($(du -k "$DIST/$name.tar.gz" | cut -f1) KiB;" \
        "binary $(stat -c %s "$bin") bytes)"
}

main() {
    ensure_apt_packages
    ensure_rust_targets
    ensure_zigbuild
    mkdir -p "$DIST"
    : >"$DIST/build-times.txt"
    for arch in $ARCHES; do
        log "building $arch (version $VERSION)"
        local start end bin
        start=$(date +%s)
        bin=$(build_binary "$arch")
        end=$(date +%s)
        echo "$arch $((end - start))s" >>"$DIST/build-times.txt"
        check_static "$bin" "$arch"
        pack "$arch" "$bin"
    done
    log "build times: $(tr '\n' ' ' <"$DIST/build-times.txt")"
    ls -l "$DIST"/*.tar.gz >&2
}

main "$@"; exit
