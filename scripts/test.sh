#!/usr/bin/env bash
# Lint, build and test voice-relay, end to end.
#
#   scripts/test.sh [--setup-only] [pytest args...]
#
# Idempotent. Installs what it needs on a fresh Debian machine (apt packages,
# a pinned Python venv in .venv-test), runs cargo fmt/clippy/test/build, then
# runs the e2e suite (tests/e2e) inside a loopback-only network namespace.
# Extra arguments go to pytest, e.g. scripts/test.sh -k mp3 -x
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

SETUP_ONLY=0
if [[ "${1:-}" == "--setup-only" ]]; then
  SETUP_ONLY=1
  shift
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  SUDO=(sudo)
fi

step() { printf '\n==> %s\n' "$*"; }

# --- 1. system packages ---------------------------------------------------
APT_PACKAGES=(cmake pkg-config ffmpeg chromium firefox-esr iptables coturn iproute2 util-linux icecast2)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
if ! command -v npm >/dev/null 2>&1; then
  missing+=(npm)
fi
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  missing+=(python3-venv)
fi
if ((${#missing[@]})); then
  step "apt-get install ${missing[*]}"
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  step "apt packages present (${APT_PACKAGES[*]})"
fi

# --- 2. Python venv for the e2e harness -------------------------------------
VENV="$ROOT/.venv-test"
REQ="$ROOT/tests/e2e/requirements.txt"
STAMP="$VENV/.requirements.sha256"
want_hash="$( (cat "$REQ"; python3 --version) | sha256sum | cut -d' ' -f1)"
if [[ ! -x "$VENV/bin/python" ]]; then
  step "creating $VENV"
  python3 -m venv "$VENV"
fi
if [[ "$(cat "$STAMP" 2>/dev/null || true)" != "$want_hash" ]]; then
  step "pip install -r tests/e2e/requirements.txt"
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$REQ"
  echo "$want_hash" >"$STAMP"
else
  step "venv up to date ($VENV)"
fi

# --- 2b. Browser-side clients (npm): the WHIP/WHEP client served to Chromium, and
# puppeteer-core, which drives Firefox ESR over WebDriver BiDi ------------------
NODE_DIR="$ROOT/tests/e2e/node"
NODE_STAMP="$NODE_DIR/node_modules/.lock.sha256"
want_node="$(sha256sum "$NODE_DIR/package-lock.json" | cut -d' ' -f1)"
if [[ "$(cat "$NODE_STAMP" 2>/dev/null || true)" != "$want_node" ]]; then
  step "npm ci (tests/e2e/node)"
  npm ci --prefix "$NODE_DIR" --no-audit --no-fund --ignore-scripts
  echo "$want_node" >"$NODE_STAMP"
else
  step "npm packages up to date (tests/e2e/node)"
fi

if ((SETUP_ONLY)); then
  step "setup done"
  exit 0
fi

# --- 3. Rust ---------------------------------------------------------------
step "cargo fmt --check"
cargo fmt --all --check
step "cargo clippy --release --workspace --all-targets -- -D warnings"
cargo clippy --release --workspace --all-targets -- -D warnings
step "cargo test --release --workspace"
cargo test --release --workspace
step "cargo build --release"
cargo build --release

# --- 4. end-to-end, in a network namespace with only loopback ---------------
export VOICE_RELAY_BIN="${VOICE_RELAY_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/voice-relay}"
export PYTHONDONTWRITEBYTECODE=1
UNSHARE=(unshare -n)
if [[ $(id -u) -ne 0 ]]; then
  UNSHARE=(unshare -rn)
fi
step "pytest tests/e2e (loopback-only network namespace)"
# shellcheck disable=SC2016  # $0/$@ are expanded by the inner sh
"${UNSHARE[@]}" -- sh -c 'ip link set lo up && exec "$0" "$@"' \
  "$VENV/bin/python" -m pytest tests/e2e -v "$@"
