#!/usr/bin/env python3
"""How fast players start voice-relay's live MP3: Chromium <audio>, ffmpeg and VLC.

Starts a private copy of voice-relay on 127.0.0.1 with the given flags (by
default none besides the port: the defaults are measured), keeps one live
440 Hz aiortc stream on it (bench/mp3-listeners/sender.py) and takes
--samples samples of each player on /stream/latest.mp3, in two states:

    cold   nobody else listens: the stream's MP3 pipeline is idle (waited
           for through /metrics), the sample's request starts it
    warm   another listener (a plain socket reading the body) keeps the
           pipeline running

Each sample is timed from the request (Chromium: just before
`audio.src = url; audio.play()` inside the page; ffmpeg and VLC: from the
process's spawn, so their start-up counts too) to

    chromium  the first `playing` event and the first currentTime > 0
              (bench/mp3-listeners/chromium_ttfa.py's in-page measurement)
    ffmpeg    the first decoded PCM byte on its stdout
    vlc       the first PCM byte after the WAV header VLC's file audio output
              (afile) writes to a pipe (cvlc refuses to run as root: run as
              nobody when started as root)

and, as a baseline for the machine's load, "ffmpeg-spawn": the same ffmpeg
command on a local generated tone (lavfi), no network: what starting the
process alone costs at that moment. And the burst: the bytes a plain socket gets in the 50 ms after the first
body byte, and what that is in audio at the stream's bit rate.

Network: it refuses to run unless the only interface is `lo` (run.sh runs
it under `unshare -n`) and only ever talks to 127.0.0.1. Bounded: at most
20 samples per player and state, 15 s per sample.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO / "bench" / "mp3-listeners"))
sys.path.insert(0, str(REPO / "tests" / "e2e"))

from chromium_ttfa import MEASURE_JS, Server, loopback_only_netns  # noqa: E402


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    m = re.search(rf"^voice_relay_{name} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else float("nan")


async def wait_idle(port: int, limit: float = 30.0) -> None:
    """Until no MP3 pipeline runs (the linger after the last listener has passed)."""
    deadline = time.monotonic() + limit
    while metric(port, "mp3_pipelines_running") != 0:
        if time.monotonic() > deadline:
            raise RuntimeError("an MP3 pipeline kept running")
        await asyncio.sleep(0.2)


def open_body(port: int, path: str, timeout: float = 10.0) -> tuple[socket.socket, bytes]:
    """A plain HTTP/1.0 request; returns the socket and the body bytes read with the head."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed before the response head")
        buf += chunk
    return s, buf.split(b"\r\n\r\n", 1)[1]


def burst_bytes(port: int, path: str) -> int:
    """Body bytes within 50 ms of the first one (the burst is sent at once)."""
    s, body = open_body(port, path)
    with s:
        while not body:
            body = s.recv(65536)
        end = time.monotonic() + 0.05
        while (left := end - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            body += chunk
    return len(body)


class Background:
    """A listener that keeps reading (and dropping) the body, so the pipeline runs."""

    def __init__(self, port: int, path: str):
        self.sock, _ = open_body(port, path)
        self.sock.setblocking(False)
        self.task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not await loop.sock_recv(self.sock, 65536):
                return

    def close(self) -> None:
        self.task.cancel()
        self.sock.close()


async def first_output(argv: list[str], skip: int, timeout: float, user: bool = False) -> float | None:
    """ms from spawn to the first stdout byte after the first `skip` bytes."""
    pre: list[str] = []
    if user and os.geteuid() == 0:
        pre = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *pre, *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, env=dict(os.environ, HOME="/tmp"),
    )
    got = 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await proc.stdout.read(65536)
                if not chunk:
                    return None
                got += len(chunk)
                if got > skip:
                    return (time.perf_counter() - t0) * 1000
    except TimeoutError:
        return None
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def ffmpeg_sample(url: str, timeout: float) -> dict:
    argv = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-i", url,
            "-f", "s16le", "-ac", "1", "-ar", "48000", "pipe:1"]
    return {"first_audio": await first_output(argv, 0, timeout)}


async def ffmpeg_spawn_sample(timeout: float) -> dict:
    argv = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
            "sine=f=440:d=1:r=48000", "-f", "s16le", "-ac", "1", "-ar", "48000", "pipe:1"]
    return {"first_audio": await first_output(argv, 0, timeout)}


async def vlc_sample(url: str, timeout: float) -> dict:
    # afile writes a 44-byte WAV header, then the PCM VLC plays (as fast as it
    # gets it: the file output has no clock of its own).
    argv = ["cvlc", "-q", "--no-video", "--aout", "afile", "--audiofile-wav",
            "--audiofile-file", "-", url, "vlc://quit"]
    return {"first_audio": await first_output(argv, 44, timeout, user=True)}


async def chromium_sample(browser, url: str, timeout: float) -> dict:  # noqa: ANN001
    ctx = await browser.new_context()
    try:
        page = await ctx.new_page()
        await page.set_content("<!doctype html><title>mp3-start</title><body></body>")
        r = await page.evaluate(MEASURE_JS, {"url": url, "timeoutMs": timeout * 1000})
    finally:
        await ctx.close()
    return {"first_audio": r.get("playing"), "ct": r.get("ct"), "end": r.get("end")}


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{min(values):.0f} / {statistics.median(values):.0f} / {max(values):.0f}"


async def run(args: argparse.Namespace, workdir: Path) -> list[dict]:
    from browser import CHROMIUM, chromium_args  # the e2e suite's Chromium and flags
    from playwright.async_api import async_playwright

    srv = Server(Path(args.server), args.port, args.burst_ms, workdir, args.py, shlex.split(args.server_args))
    rows: list[dict] = []
    path = "/stream/latest.mp3"
    url = f"http://127.0.0.1:{args.port}{path}"
    try:
        srv.start()
        print(f"# server pid {srv.srv.pid}, flags {' '.join(srv.srv.args[1:])}, stream {srv.stream_id}", flush=True)
        await asyncio.sleep(args.warmup)
        flags = [a for a in chromium_args(Path("/dev/null")) if "fake" not in a]
        flags += ["--disable-background-timer-throttling", "--disable-renderer-backgrounding"]
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=flags, timeout=30000)
            print(f"# chromium {browser.version}", flush=True)
            players = {
                "chromium": lambda: chromium_sample(browser, url, args.timeout),
                "ffmpeg": lambda: ffmpeg_sample(url, args.timeout),
                "ffmpeg-spawn": lambda: ffmpeg_spawn_sample(args.timeout),
                "vlc": lambda: vlc_sample(url, args.timeout),
            }
            try:
                for state in args.states:
                    for i in range(-1, args.samples):  # i < 0: one uncounted warm-up round
                        for name in args.players:
                            bg = None
                            if state == "cold":
                                await wait_idle(args.port)
                            else:
                                bg = Background(args.port, path)
                                await asyncio.sleep(0.5)
                            try:
                                r = await players[name]()
                            finally:
                                if bg:
                                    bg.close()
                            r.update(player=name, state=state, i=i)
                            print(("sample " if i >= 0 else "warmup ") + json.dumps(r, sort_keys=True), flush=True)
                            if i >= 0:
                                rows.append(r)
                            await asyncio.sleep(args.gap)
            finally:
                await browser.close()
        await wait_idle(args.port)
        for state in args.states:
            bg = Background(args.port, path) if state == "warm" else None
            if bg:
                await asyncio.sleep(0.5)
            n = await asyncio.to_thread(burst_bytes, args.port, path)
            if bg:
                bg.close()
            rows.append({"player": "burst", "state": state, "bytes": n})
            await wait_idle(args.port)
    finally:
        srv.stop()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=5, help="samples per player and state (max 20)")
    ap.add_argument("--players", default="chromium,ffmpeg,ffmpeg-spawn,vlc")
    ap.add_argument("--states", default="cold,warm")
    ap.add_argument("--server-args", default="", help="extra voice-relay flags, e.g. '--mp3-bitrate 192'")
    ap.add_argument("--burst-ms", type=int, default=1000, help="--mp3-burst-ms (1000 is the default)")
    ap.add_argument("--bitrate", type=int, default=128, help="the server's MP3 bit rate, for the burst's seconds")
    ap.add_argument("--port", type=int, default=18091)
    ap.add_argument("--warmup", type=float, default=4.0, help="seconds of stream before the first sample")
    ap.add_argument("--gap", type=float, default=0.5, help="seconds between samples")
    ap.add_argument("--timeout", type=float, default=15.0, help="per-sample limit, s")
    ap.add_argument("--server", default=str(REPO / "target" / "release" / "voice-relay"))
    ap.add_argument("--py", default=sys.executable, help="python with aiortc, for sender.py")
    args = ap.parse_args()
    args.samples = max(1, min(args.samples, 20))
    args.players = [p for p in args.players.split(",") if p]
    args.states = [s for s in args.states.split(",") if s]
    assert set(args.players) <= {"chromium", "ffmpeg", "ffmpeg-spawn", "vlc"} and set(args.states) <= {"cold", "warm"}

    loopback_only_netns()
    print(f"# {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="mp3-start-") as tmp:
        rows = asyncio.run(run(args, Path(tmp)))

    print()
    print(f"first audio, ms from the request (min / median / max), N={args.samples} per row; "
          f"flags: {args.server_args or '(defaults)'}")
    print("| player | state | ok | first audio ms | Chromium currentTime > 0 ms |")
    print("|---|---|---|---|---|")
    failed = 0
    for name in args.players:
        for state in args.states:
            rs = [r for r in rows if r["player"] == name and r["state"] == state]
            ok = [r for r in rs if r.get("first_audio") is not None and r.get("end", "ok") == "ok"]
            failed += len(rs) - len(ok)
            ct = summary([r["ct"] for r in ok if r.get("ct") is not None]) if name == "chromium" else ""
            print(f"| {name} | {state} | {len(ok)}/{len(rs)} | {summary([r['first_audio'] for r in ok])} | {ct} |")
    for r in rows:
        if r["player"] == "burst":
            secs = r["bytes"] / (args.bitrate * 1000 / 8)
            print(f"burst ({r['state']}): {r['bytes']} bytes = {secs:.2f} s at {args.bitrate} kbit/s "
                  "(how far behind live a player that plays it at once stays)")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
