#!/bin/sh
# Runs mp3_start.py under the shared benchmark lock, inside a fresh
# loopback-only network namespace (through ../mp3-listeners/chromium_ttfa.sh:
# same PY and LOCK environment).
#
#   bench/mp3-start/run.sh [mp3_start.py args...]   e.g. --samples 5
set -eu
HERE="$(cd "$(dirname "$0")" && pwd)"
SCRIPT="$HERE/mp3_start.py" exec sh "$HERE/../mp3-listeners/chromium_ttfa.sh" "$@"
