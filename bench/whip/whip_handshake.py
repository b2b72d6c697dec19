#!/usr/bin/env python3
"""WHIP handshake time of a voice-relay server, as an aiortc publisher sees it.

N sequential publishes (default 200, at most 2000), each:

1. the aiortc offer is made first (createOffer + setLocalDescription, which
   gathers the 127.0.0.1 candidate): client-side, NOT in the timed interval;
2. t0 -> `POST /whip` (application/sdp) -> `201` with the answer read: the
   **POST** time;
3. setRemoteDescription, then wait until the peer connection is `connected`
   (ICE + DTLS): the **connected** time, also from t0 (it includes aiortc's
   own answer handling, ICE checks and its DTLS handshake, i.e. client time);
4. `DELETE` the session URL (timed too), close the peer.

HTTP goes over one keep-alive aiohttp session. Prints p50/p90/p99/max of each
and one JSON line. Network: only http://127.0.0.1 URLs; ICE offers 127.0.0.1
only (the e2e harness's aioice patch) and no ICE servers. Run it inside a
loopback-only namespace; with --server it also starts voice-relay there:

    unshare -n -- sh -c 'ip link set lo up && exec .venv-test/bin/python \
        bench/whip/whip_handshake.py --server target/release/voice-relay'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from urllib.parse import urlparse

HERE = os.path.dirname(os.path.abspath(__file__))
HARNESS = os.path.join(HERE, "..", "..", "tests", "e2e")
MAX_RUNS = 2000


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, round((len(v) - 1) * q))]


def summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "min": round(min(values), 2),
        "p50": round(pct(values, 0.5), 2),
        "p90": round(pct(values, 0.9), 2),
        "p99": round(pct(values, 0.99), 2),
        "max": round(max(values), 2),
        "mean": round(statistics.fmean(values), 2),
    }


async def one_publish(session, base: str, clients, timeout: float) -> dict:  # noqa: ANN001
    from aiortc import RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection(clients.rtc_config())
    pc.addTransceiver(clients.ToneTrack(440.0, amplitude=0.3), direction="sendonly")
    out: dict = {}
    # Stamped by the state change itself (no polling step in the figure).
    settled = asyncio.Event()
    settled_at = [0.0]

    @pc.on("connectionstatechange")
    def on_state() -> None:
        if pc.connectionState in ("connected", "failed", "closed") and not settled.is_set():
            settled_at[0] = time.perf_counter()
            settled.set()

    try:
        await pc.setLocalDescription(await pc.createOffer())
        offer = pc.localDescription.sdp
        t0 = time.perf_counter()
        async with session.post(
            base + "/whip", data=offer, headers={"Content-Type": "application/sdp"}
        ) as resp:
            answer = await resp.text()
            status, location = resp.status, resp.headers.get("Location")
        t1 = time.perf_counter()
        out["status"] = status
        if status != 201 or not location:
            out["error"] = f"POST /whip -> {status}: {answer[:200]}"
            return out
        out["post_ms"] = (t1 - t0) * 1000
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await asyncio.wait_for(settled.wait(), timeout)
        if pc.connectionState != "connected":
            out["error"] = f"peer connection {pc.connectionState}"
            return out
        out["connected_ms"] = (settled_at[0] - t0) * 1000
        t2 = time.perf_counter()
        async with session.delete(base + location) as resp:
            await resp.read()
            out["delete_status"] = resp.status
        out["delete_ms"] = (time.perf_counter() - t2) * 1000
    except Exception as e:  # a failed run is counted and reported, not hidden
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        try:
            await asyncio.wait_for(pc.close(), 5)
        except Exception:
            pass
    return out


async def health(session, base: str) -> dict:  # noqa: ANN001
    async with session.get(base + "/health") as resp:
        return await resp.json()


async def bench(base: str, runs: int, timeout: float, warmup: int) -> dict:
    import aiohttp

    sys.path.insert(0, HARNESS)
    import clients  # the e2e harness: loopback-only ICE, rtc_config, ToneTrack

    results = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        for i in range(warmup + runs):
            r = await one_publish(session, base, clients, timeout)
            if i >= warmup:
                results.append(r)
            if "error" in r:
                print(f"run {i}: {r['error']}", file=sys.stderr)
            elif i % 50 == 0:
                print(f"run {i}: {r}", file=sys.stderr)
        # The server must be back to no stream (each DELETE ended one).
        h = {}
        for _ in range(50):
            h = await health(session, base)
            if not h.get("active_streams"):
                break
            await asyncio.sleep(0.1)
    ok = [r for r in results if "error" not in r]
    return {
        "tool": "whip_handshake.py",
        "url": base + "/whip",
        "runs": runs,
        "warmup": warmup,
        "ok": len(ok),
        "errors": [r["error"] for r in results if "error" in r][:10],
        "delete_statuses": sorted({r.get("delete_status") for r in ok}),
        "post_ms": summary([r["post_ms"] for r in ok]),
        "connected_ms": summary([r["connected_ms"] for r in ok]),
        "delete_ms": summary([r["delete_ms"] for r in ok]),
        "active_streams_after": h.get("active_streams"),
    }


def start_server(binary: str, port: int) -> subprocess.Popen:
    log = open(os.environ.get("WHIP_BENCH_SERVER_LOG", os.devnull), "w")
    proc = subprocess.Popen([binary, "--listen", f"127.0.0.1:{port}"], stdout=log, stderr=log)
    import urllib.request

    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not answer /health")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=None, help="server base URL (http://127.0.0.1:PORT)")
    ap.add_argument("--server", default=None, help="voice-relay binary to start on 127.0.0.1")
    ap.add_argument("--port", type=int, default=18090)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=5, help="untimed publishes first")
    ap.add_argument("--timeout", type=float, default=10.0, help="per request / connect")
    a = ap.parse_args()
    if not 1 <= a.runs <= MAX_RUNS or not 0 <= a.warmup <= 50:
        raise SystemExit(f"--runs 1..{MAX_RUNS}, --warmup 0..50")
    base = a.url or f"http://127.0.0.1:{a.port}"
    u = urlparse(base)
    if u.scheme != "http" or u.hostname != "127.0.0.1":
        raise SystemExit("only http://127.0.0.1 URLs")
    base = base.rstrip("/")
    proc = start_server(a.server, u.port or 80) if a.server else None
    try:
        res = asyncio.run(asyncio.wait_for(bench(base, a.runs, a.timeout, a.warmup), 1800))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    print(f"\n{res['ok']}/{res['runs']} publishes ok (after {res['warmup']} untimed)")
    print("| interval | p50 ms | p90 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    for key, name in [
        ("post_ms", "POST /whip -> 201 + answer"),
        ("connected_ms", "POST -> ICE + DTLS connected"),
        ("delete_ms", "DELETE -> 200"),
    ]:
        s = res[key]
        if s.get("n"):
            print(f"| {name} | {s['p50']} | {s['p90']} | {s['p99']} | {s['max']} |")
    print("\n" + json.dumps(res))
    return 0 if res["ok"] == res["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
