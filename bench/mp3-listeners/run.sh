#!/usr/bin/env bash
# Runs the whole benchmark inside a fresh loopback-only network namespace:
# voice-relay, the aiortc tone sender (sender.py) and mp3-listeners-bench.
#
#   ./run.sh [tool args...]      e.g. ./run.sh --steps 1000,5000 --measure-secs 20
#   ./run.sh --format ogg ...    listeners on /stream/latest.ogg instead of .mp3
#
# Environment: SERVER (voice-relay binary), PY (python with aiortc), HARNESS
# (folder with clients.py), PORT (default 18080), NOFILE (fd limit to set,
# default 20000), OUT (log folder, default ./out), SENDER_SECS (default 900).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="${REPO:-$HERE/../..}"
SERVER="${SERVER:-$REPO/target/release/voice-relay}"
PY="${PY:-$REPO/.venv-test/bin/python}"
HARNESS="${HARNESS:-$REPO/tests/e2e}"
PORT="${PORT:-18080}"
NOFILE="${NOFILE:-20000}"
OUT="${OUT:-$HERE/out}"
SENDER_SECS="${SENDER_SECS:-900}"
SENDER_NICE="${SENDER_NICE:-0}"   # e.g. -10 to keep the source from being starved
TOOL="${TOOL:-$REPO/target/release/mp3-listeners-bench}"

if [ -z "${MP3BENCH_IN_NETNS:-}" ]; then
    # Everything below runs with no network but a private loopback.
    exec unshare -n env MP3BENCH_IN_NETNS=1 bash "$0" "$@"
fi

ip link set lo up
mkdir -p "$OUT"
# The machine is shared: wait (up to QUIET_WAIT s) until it is mostly idle.
QUIET_WAIT="${QUIET_WAIT:-0}"
busy_pct() {  # machine busy % of all cores over 3 s
    local a b
    a=($(head -1 /proc/stat)); sleep 3; b=($(head -1 /proc/stat))
    local t=0 i=0
    for k in 1 2 3 4 5 6 7 8; do t=$((t + b[k] - a[k])); done
    i=$((b[4] - a[4] + b[5] - a[5]))
    echo $(( t > 0 ? 100 * (t - i) / t : 0 ))
}
waited=0
while :; do
    b=$(busy_pct)
    echo "machine busy (other processes): ${b}%" >&2
    [ "$b" -lt 15 ] || [ "$waited" -ge "$QUIET_WAIT" ] && break
    waited=$((waited + 3))
done
# Open files: 1 per listener on each side (+ margin). Raising the hard limit
# needs root (CAP_SYS_RESOURCE); the children inherit it.
if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt "$NOFILE" ]; then
    ulimit -Hn "$NOFILE" || echo "could not raise hard fd limit to $NOFILE" >&2
fi
ulimit -Sn "$(ulimit -Hn)"
echo "netns: $(ip -brief addr | tr '\n' ' '); fd limit soft=$(ulimit -Sn) hard=$(ulimit -Hn)" >&2

SP=""; SN=""
cleanup() {
    [ -n "$SN" ] && kill "$SN" 2>/dev/null || true
    sleep 0.5
    [ -n "$SP" ] && kill "$SP" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap cleanup EXIT

# Run a private copy, so a rebuild of the repo's binary mid-run cannot matter.
cp "$SERVER" "$OUT/voice-relay"
echo "server: $SERVER sha256=$(sha256sum "$OUT/voice-relay" | cut -c1-16)" >&2
"$OUT/voice-relay" --listen "127.0.0.1:$PORT" ${SERVER_ARGS:-} >"$OUT/server.log" 2>&1 &
SP=$!
for _ in $(seq 50); do
    curl -fs --max-time 1 "http://127.0.0.1:$PORT/health" >/dev/null && break
    sleep 0.1
done
nice -n "$SENDER_NICE" "$PY" "$HERE/sender.py" --ws "ws://127.0.0.1:$PORT/ws" --secs "$SENDER_SECS" \
    --harness "$HARNESS" >"$OUT/sender.log" 2>&1 &
SN=$!
for _ in $(seq 300); do
    grep -q '^stream_id=' "$OUT/sender.log" && break
    kill -0 "$SN" 2>/dev/null || { cat "$OUT/sender.log" >&2; exit 1; }
    sleep 0.1
done
grep '^stream_id=' "$OUT/sender.log" >&2
ss -ltn "sport = :$PORT" >&2 || true   # Send-Q of a LISTEN socket = its accept backlog
sleep 2  # let the burst ring fill (1 s)
# The URL follows the tool's --format (mp3 unless given).
EXT=mp3
prev=""
for a in "$@"; do
    case "$a" in --format=*) EXT="${a#--format=}" ;; esac
    [ "$prev" = --format ] && EXT="$a"
    prev="$a"
done
"$TOOL" --url "http://127.0.0.1:$PORT/stream/latest.$EXT" --server-pid "$SP" --sender-pid "$SN" "$@"
