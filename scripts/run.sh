#!/usr/bin/env bash
# Runs the server with sensible defaults (HTTP + WebSocket on 0.0.0.0:8080,
# WebRTC media on UDP 8080). Installs the one build dependency (cmake, for
# libopus) when it is missing. Extra arguments go to voice-relay, e.g.
#   bash scripts/run.sh --tls-self-signed --audio-listen 0.0.0.0:8081
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cmake >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq cmake
fi
exec cargo run --release --bin voice-relay -- "$@"
