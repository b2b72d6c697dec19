#!/usr/bin/env python3
"""What live streams without listeners cost voice-relay: server CPU by thread group.

Starts a private copy of the given voice-relay binary on 127.0.0.1, --streams
aiortc senders of a 440 Hz tone (one Python process, the e2e harness's
ToneSender; ICE on 127.0.0.1 only), nobody listening, and after --settle
seconds samples the server's CPU (utime + stime from /proc, per thread) over
--window seconds (at most 60). Threads are grouped by name: `media-relay`
(the relay loop), `mp3-*` (MP3 pipelines), `ogg-*` (Ogg pagers), `mp3w-*`
(listener writers) and the rest (tokio, signalling). Prints % of one core,
in total and per stream, and the MP3 and Ogg activity /metrics reports.

Run it once with the binary before a change and once after (run it under
`unshare -n`: it refuses to run unless the only interface is `lo`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO / "bench" / "mp3-listeners"))
sys.path.insert(0, str(REPO / "tests" / "e2e"))

from chromium_ttfa import http_json, loopback_only_netns  # noqa: E402

GROUPS = [("relay", "media-relay"), ("mp3", "mp3-"), ("ogg", "ogg-"), ("writer", "mp3w-")]
TICK = os.sysconf("SC_CLK_TCK")


def thread_ticks(pid: int) -> dict[str, int]:
    """CPU ticks per thread group of process ``pid``."""
    out = {name: 0 for name, _ in GROUPS} | {"other": 0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1: stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        ticks = int(fields[11]) + int(fields[12])
        group = next((name for name, prefix in GROUPS if comm.startswith(prefix)), "other")
        out[group] += ticks
    return out


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        return r.read().decode()


def metric(text: str, name: str) -> str:
    m = re.search(rf"^voice_relay_{name} (\S+)$", text, re.MULTILINE)
    return m.group(1) if m else "absent"


async def senders(ws: str, n: int, stop: asyncio.Event) -> None:
    import aioice.ice

    import clients

    aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=True: ["127.0.0.1"] if use_ipv4 else []
    assert clients.rtc_config().iceServers == []
    started = []
    try:
        for i in range(n):
            sig = await clients.Signal.connect(ws, f"idle-{i}")
            await sig.expect("available_streams", 5)
            snd = clients.ToneSender(sig, 440 + 10 * i)
            await snd.start(timeout=20)
            started.append((sig, snd))
        print(f"# {len(started)} senders live", flush=True)
        await stop.wait()
    finally:
        for sig, snd in started:
            await snd.close()
            await sig.close()


async def run(args: argparse.Namespace, workdir: Path) -> int:
    binary = workdir / "voice-relay"
    shutil.copy2(args.server, binary)
    log = open(workdir / "server.log", "wb")
    srv = subprocess.Popen([str(binary), "--listen", f"127.0.0.1:{args.port}", *args.server_args.split()],
                           stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                           env=dict(os.environ, RUST_LOG="warn", NO_COLOR="1"))
    try:
        for _ in range(100):
            try:
                http_json(f"http://127.0.0.1:{args.port}/health")
                break
            except OSError:
                time.sleep(0.1)
        stop = asyncio.Event()
        task = asyncio.ensure_future(senders(f"ws://127.0.0.1:{args.port}/ws", args.streams, stop))
        while http_json(f"http://127.0.0.1:{args.port}/health").get("senders", 0) < args.streams:
            if task.done():
                task.result()
            await asyncio.sleep(0.5)
        await asyncio.sleep(args.settle)
        before, t0 = thread_ticks(srv.pid), time.monotonic()
        m0 = metrics_text(args.port)
        await asyncio.sleep(args.window)
        after, wall = thread_ticks(srv.pid), time.monotonic() - t0
        m1 = metrics_text(args.port)
        stop.set()
        await task
        pct = {k: 100 * (after[k] - before[k]) / TICK / wall for k in after}
        total = sum(pct.values())
        print(f"server {args.server} ({args.streams} streams, no listener, {wall:.1f} s window, "
              f"load avg {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores)")
        print("| threads | % of a core | per stream |")
        print("|---|---|---|")
        for k, v in list(pct.items()) + [("total", total)]:
            print(f"| {k} | {v:.2f} | {v / args.streams:.3f} |")
        for name in ("mp3_pipelines_running", "mp3_opus_packets_decoded_total", "mp3_frames_encoded_total",
                     "ogg_pagers_running", "ogg_pager_starts_total"):
            print(f"/metrics {name}: {metric(m0, name)} -> {metric(m1, name)}")
        return 0
    finally:
        srv.terminate()
        try:
            srv.wait(10)
        except subprocess.TimeoutExpired:
            srv.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", default=str(REPO / "target" / "release" / "voice-relay"))
    ap.add_argument("--server-args", default="")
    ap.add_argument("--streams", type=int, default=20)
    ap.add_argument("--settle", type=float, default=5.0)
    ap.add_argument("--window", type=float, default=30.0)
    ap.add_argument("--port", type=int, default=18092)
    args = ap.parse_args()
    args.streams = max(1, min(args.streams, 100))
    args.window = max(1.0, min(args.window, 60.0))
    loopback_only_netns()
    with tempfile.TemporaryDirectory(prefix="idle-cpu-") as tmp:
        return asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
