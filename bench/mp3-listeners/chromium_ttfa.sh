#!/bin/sh
# Runs chromium_ttfa.py under the shared benchmark lock, inside a fresh
# loopback-only network namespace.
#
#   ./chromium_ttfa.sh [chromium_ttfa.py args...]   e.g. ./chromium_ttfa.sh --samples 10
#
# Environment: PY (python with playwright + aiortc, default ../../.venv-test),
# LOCK (default $TMPDIR/voice-relay-bench.lock; waits for other benchmarks holding it),
# SCRIPT (default chromium_ttfa.py here; bench/mp3-start/run.sh runs its own through this).
set -eu
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${PY:-$HERE/../../.venv-test/bin/python}"
LOCK="${LOCK:-${TMPDIR:-/tmp}/voice-relay-bench.lock}"
exec flock "$LOCK" unshare -n sh -c 'ip link set lo up && exec "$@"' sh \
    "$PY" "${SCRIPT:-$HERE/chromium_ttfa.py}" --py "$PY" "$@"
