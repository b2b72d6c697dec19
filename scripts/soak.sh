#!/usr/bin/env bash
# Soak test: N minutes of client churn against one voice-relay, then check that its
# memory, file descriptors and threads come back to the idle baseline and that it
# exits 0 on SIGTERM.
#
#   bash scripts/soak.sh [--minutes N] [--out FILE.csv] [-- extra soak.py args]
#
#   --minutes N   length of the churn phase (default 30). The whole run takes about
#                 N + 2 minutes: 1 min warm-up, 2 x 20 s settling, start and stop.
#   --out FILE    CSV of the 5-second samples (default target/soak/soak-<time>.csv)
#   after --       passed to scripts/soak.py (e.g. --seed 1 --max-receivers 10)
#
# Needs root: it runs in its own loopback-only network namespace (unshare -n), so
# nothing but 127.0.0.1 is reachable. Environment: SERVER (binary, default
# target/release/voice-relay), PY (python with aiortc, default .venv-test/bin/python),
# SERVER_ARGS (extra server arguments).
#
# Exit status: 0 all fine; 1 the server died, hung on SIGTERM, exited non-zero, or the
# soak could not run; 3 the server survived and exited 0 but RSS/fds/threads/health
# did not return to within tolerance of the baseline (see soak.py --help).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"

MINUTES=30
OUT=""
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --minutes) MINUTES="$2"; shift 2 ;;
        --minutes=*) MINUTES="${1#*=}"; shift ;;
        --out) OUT="$2"; shift 2 ;;
        --out=*) OUT="${1#*=}"; shift ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "soak.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$MINUTES" in
    ''|*[!0-9.]*) echo "soak.sh: --minutes wants a number, got '$MINUTES'" >&2; exit 2 ;;
esac
if [ -z "$OUT" ]; then
    OUT="$REPO/target/soak/soak-$(date +%Y-%m-%d-%H%M%S).csv"
fi
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac

if [ -z "${SOAK_IN_NETNS:-}" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "soak.sh: needs root for 'unshare -n' (a loopback-only network namespace)" >&2
        exit 2
    fi
    # Re-run this script inside a fresh network namespace that has only lo, up.
    exec unshare -n sh -c 'ip link set lo up && exec env SOAK_IN_NETNS=1 bash "$0" "$@"' \
        "$0" --minutes "$MINUTES" --out "$OUT" -- ${EXTRA[@]+"${EXTRA[@]}"}
fi

# ---- inside the namespace -------------------------------------------------
ifaces="$(ip -o link show | awk -F': ' '{print $2}' | tr '\n' ' ')"
if [ "$ifaces" != "lo " ]; then
    echo "soak.sh: expected a loopback-only namespace, found: $ifaces" >&2
    exit 1
fi

SERVER="${SERVER:-$REPO/target/release/voice-relay}"
PY="${PY:-$REPO/.venv-test/bin/python}"
[ -x "$SERVER" ] || { echo "soak.sh: no server binary at $SERVER (cargo build --release)" >&2; exit 1; }
[ -x "$PY" ] || { echo "soak.sh: no python at $PY (the e2e venv)" >&2; exit 1; }

mkdir -p "$(dirname "$OUT")"
WORK="$(mktemp -d /tmp/voice-relay-soak.XXXXXX)"
LOG="$WORK/server.log"

PORT="$("$PY" - <<'EOF'
import socket
for _ in range(100):
    with socket.socket() as t:
        t.bind(("127.0.0.1", 0))
        port = t.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
        print(port)
        break
EOF
)"

SP=""
cleanup() {
    if [ -n "$SP" ] && kill -0 "$SP" 2>/dev/null; then
        kill -KILL "$SP" 2>/dev/null || true
    fi
}
trap cleanup EXIT

echo "soak: $(date -u +%Y-%m-%dT%H:%M:%SZ) churn ${MINUTES} min; netns interfaces: $ifaces; $(nproc) cores"
echo "soak: server $SERVER (sha256 $(sha256sum "$SERVER" | cut -c1-16)) on 127.0.0.1:$PORT ${SERVER_ARGS:-}"
echo "soak: server log $LOG; csv $OUT"
RUST_LOG="${RUST_LOG:-info}" NO_COLOR=1 \
    "$SERVER" --listen "127.0.0.1:$PORT" ${SERVER_ARGS:-} >"$LOG" 2>&1 </dev/null &
SP=$!

# Hard upper bound for the client: churn + warm-up + settling + generous slack.
LIMIT="$("$PY" -c "import math; print(int(math.ceil(float('$MINUTES') * 60)) + 60 + 40 + 240)")"
set +e
timeout --signal=TERM --kill-after=30 "$LIMIT" \
    "$PY" "$HERE/soak.py" --pid "$SP" --port "$PORT" --minutes "$MINUTES" --out "$OUT" \
    ${EXTRA[@]+"${EXTRA[@]}"}
PY_RC=$?
set -e
[ "$PY_RC" -eq 124 ] && echo "soak: soak.py hit the ${LIMIT}s time limit" >&2

# ---- shutdown: SIGTERM, expect exit 0 within 10 s ---------------------------
SERVER_RC=""
if kill -0 "$SP" 2>/dev/null; then
    t0=$(date +%s.%N)
    kill -TERM "$SP"
    for _ in $(seq 100); do
        kill -0 "$SP" 2>/dev/null || break
        # a zombie still answers kill -0; wait reaps it below
        [ "$(awk '{print $3}' "/proc/$SP/stat" 2>/dev/null)" = Z ] && break
        sleep 0.1
    done
    if [ "$(awk '{print $3}' "/proc/$SP/stat" 2>/dev/null || echo gone)" != Z ] && kill -0 "$SP" 2>/dev/null; then
        echo "soak: server did not exit within 10 s of SIGTERM; killing it"
        kill -KILL "$SP" 2>/dev/null || true
        wait "$SP" 2>/dev/null || true
        SERVER_RC="hung"
    else
        set +e; wait "$SP"; SERVER_RC=$?; set -e
        t1=$(date +%s.%N)
        echo "soak: server exit code after SIGTERM: $SERVER_RC ($(awk "BEGIN{printf \"%.2f\", $t1 - $t0}") s)"
    fi
else
    set +e; wait "$SP"; SERVER_RC=$?; set -e
    echo "soak: server had already exited (code $SERVER_RC) before SIGTERM"
    SERVER_RC="died:$SERVER_RC"
fi
SP=""

panics=$(grep -c -i 'panicked' "$LOG" || true)
warns=$(grep -c ' WARN ' "$LOG" || true)
errs=$(grep -c ' ERROR ' "$LOG" || true)
echo "soak: server log: $(wc -l <"$LOG") lines, $warns WARN, $errs ERROR, $panics panics ($LOG)"
if [ "$panics" != 0 ]; then
    grep -i -m 5 -A 3 'panicked' "$LOG" || true
fi

if [ "$SERVER_RC" = "0" ] && [ "$panics" = 0 ]; then
    echo "soak: server shutdown clean (exit 0)"
    [ "$PY_RC" -eq 0 ] && { echo "soak: PASS"; exit 0; }
    [ "$PY_RC" -eq 3 ] && { echo "soak: server fine, but resources did not return to baseline"; exit 3; }
    echo "soak: soak.py failed (exit $PY_RC)"; exit 1
fi
echo "soak: FAIL (server exit: $SERVER_RC, panics: $panics, soak.py exit: $PY_RC)"
exit 1
