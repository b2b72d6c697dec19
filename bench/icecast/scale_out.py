#!/usr/bin/env python3
"""Scale-out figures for docs/scale-out.md: voice-relay pushing to a real Icecast master
(--icecast), a second Icecast relaying the master, and what listeners get at each hop.

    unshare -n -- sh -c 'ip link set lo up && exec .venv-test/bin/python bench/icecast/scale_out.py latency'
    unshare -n -- sh -c 'ip link set lo up && exec .venv-test/bin/python bench/icecast/scale_out.py listeners --listeners 2000'

`latency`: a pulsed 440 Hz tone (0.3 s on every 1 s) from an aiortc sender; three ffmpeg
decoders read the relay's own /stream/{id}.mp3, the master's mount and the relay Icecast's
mount as fast as the bytes come, and the arrival time of each decoded pulse onset is matched
to its emission time at the sender. That is the latency of the live edge at each hop; a
player that starts with a burst stays that much further behind (the burst sizes are printed).

`listeners`: N MP3 listeners on the relay Icecast's mount, held for --secs with
bench/mp3-listeners (`--no-health`), which reports real-time ratio, gaps, broken frames, and
the CPU of Icecast (--server-pid) and of itself.

Everything runs on 127.0.0.1 only (inside a loopback-only network namespace); Icecast runs as
an unprivileged user (tests/e2e/icecast_server.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

import numpy as np  # noqa: E402

from clients import Clients, match_latencies  # noqa: E402
from icecast_server import SOURCE_PASSWORD, Icecast  # noqa: E402
from relay_server import RelayServer  # noqa: E402

SAMPLE_RATE = 48000
MP3_BYTES_PER_SEC = 128_000 // 8


def loopback_namespace_only() -> None:
    names = sorted(name for _, name in socket.if_nameindex())
    if names != ["lo"]:
        sys.exit(f"run inside a loopback-only network namespace (found {names})")


class Decoder:
    """ffmpeg decoding a live URL as fast as it arrives; keeps PCM chunks with arrival times."""

    def __init__(self, name: str, url: str):
        self.name, self.url = name, url
        self.chunks: list[np.ndarray] = []
        self.arrivals: list[float] = []
        self.first_byte: float | None = None
        self.started = time.monotonic()

    async def run(self, seconds: float) -> None:
        proc = await asyncio.create_subprocess_exec(
            "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-fflags", "nobuffer",
            "-i", self.url,
            "-f", "s16le", "-ac", "1", "-ar", str(SAMPLE_RATE), "-flush_packets", "1", "-",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL)
        assert proc.stdout is not None
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                try:
                    data = await asyncio.wait_for(proc.stdout.read(1920), end - time.monotonic())
                except asyncio.TimeoutError:
                    break
                if not data:
                    break
                now = time.monotonic()
                self.first_byte = self.first_byte or now
                self.chunks.append(np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2").astype(np.float64))
                self.arrivals.append(now)
        finally:
            proc.kill()
            await proc.wait()

    def onsets(self, threshold: float = 3000.0, quiet: float = 0.2) -> list[float]:
        """Arrival time of each pulse onset: the chunk holding the first loud sample after a
        quiet stretch (a chunk's samples arrive together)."""
        out, below, quiet_n = [], int(quiet * SAMPLE_RATE), int(quiet * SAMPLE_RATE)
        for chunk, arrival in zip(self.chunks, self.arrivals):
            loud = np.abs(chunk) >= threshold
            for i in range(len(chunk)):
                if loud[i]:
                    if below >= quiet_n:
                        out.append(arrival)
                    below = 0
                else:
                    below += 1
        return out


def burst_seconds(url: str, window: float = 2.0) -> tuple[float, float]:
    """(time to the response head, seconds of 128 kbit/s audio received beyond real time
    within `window` s of it): what a new listener gets at once."""
    host_port, path = url.removeprefix("http://").split("/", 1)
    host, port = host_port.split(":")
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(f"GET /{path} HTTP/1.0\r\nHost: {host_port}\r\n\r\n".encode())
        s.settimeout(0.05)
        buf, head_at, body = b"", None, 0
        while head_at is None or time.monotonic() - head_at < window:
            if time.monotonic() - t0 > 10:
                break
            try:
                data = s.recv(65536)
            except socket.timeout:
                continue
            if not data:
                break
            if head_at is None:
                buf += data
                if b"\r\n\r\n" in buf:
                    head_at = time.monotonic()
                    body += len(buf.split(b"\r\n\r\n", 1)[1])
            else:
                body += len(data)
    head = (head_at or time.monotonic()) - t0
    return head, body / MP3_BYTES_PER_SEC - window


def stats(values: list[float]) -> str:
    if not values:
        return "no onsets matched"
    a = np.array(values) * 1000
    return (f"n={len(a)} median {np.median(a):.0f} ms, p10 {np.percentile(a, 10):.0f}, "
            f"p90 {np.percentile(a, 90):.0f}, max {a.max():.0f}")


def start_chain(burst: int, out: Path, server_args: list[str] | None = None) -> tuple[RelayServer, Icecast]:
    master = Icecast(burst_size=burst)
    master.start()
    url = f"icecast://source:{SOURCE_PASSWORD}@127.0.0.1:{master.port}/live.mp3"
    server = RelayServer(out / "voice-relay.log", ["--icecast", url, *(server_args or [])])
    server.start()
    return server, master


async def latency(args: argparse.Namespace, out: Path) -> None:
    server, master = start_chain(args.burst, out)
    edge: Icecast | None = None
    try:
        async with Clients(server.ws, server.http) as c:
            snd = await c.sender(440, pulse=(1.0, 0.3), amplitude=0.5)
            await asyncio.to_thread(master.wait_mount, "/live.mp3")
            edge = Icecast(burst_size=args.burst, relay_of=(master.port, "/live.mp3"))
            await asyncio.to_thread(edge.start)
            await asyncio.to_thread(edge.wait_mount, "/live.mp3")
            await asyncio.sleep(2.0)
            decoders = [
                Decoder("voice-relay /stream/{id}.mp3", f"{server.http}/stream/{snd.stream_id}.mp3"),
                Decoder("Icecast master", f"{master.http}/live.mp3"),
                Decoder("Icecast relay (2nd hop)", f"{edge.http}/live.mp3"),
            ]
            rx = await c.receiver(snd.stream_id, name="webrtc")
            t0 = time.monotonic()
            await asyncio.gather(*(d.run(args.secs) for d in decoders))
            # Skip the first 2 s: the bursts' old pulses arrive then.
            settled = t0 + 2.0
            sent = [t for t in snd.track.onsets if t >= settled]
            print(f"Icecast burst-size {args.burst} bytes (~{args.burst / MP3_BYTES_PER_SEC:.1f} s of 128 kbit/s MP3); "
                  f"voice-relay --mp3-burst-ms default 1000; {args.secs:.0f} s of 1 pulse/s")
            webrtc = match_latencies(sent, [t for t in rx.sink.onsets(3000.0, quiet=0.2) if t >= settled], 10.0)
            print(f"  {'WebRTC receiver (aiortc)':32s} live edge: {stats(webrtc)}")
            for d in decoders:
                lat = match_latencies(sent, [t for t in d.onsets() if t >= settled], 10.0)
                head, burst = await asyncio.to_thread(burst_seconds, d.url)
                print(f"  {d.name:32s} live edge: {stats(lat)}; a new listener: response head after "
                      f"{head * 1000:.0f} ms, then {burst:.1f} s of audio at once (a player plays that "
                      f"first: its latency = live edge + burst)")
    finally:
        if edge is not None:
            edge.cleanup()
        server.terminate()
        master.cleanup()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def listeners(args: argparse.Namespace, out: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(args.listeners * 2 + 1000, soft))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    server, master = start_chain(args.burst, out)
    edge: Icecast | None = None
    try:
        async with Clients(server.ws, server.http) as c:
            await c.sender(440)
            await asyncio.to_thread(master.wait_mount, "/live.mp3")
            edge = Icecast(burst_size=args.burst, relay_of=(master.port, "/live.mp3"))
            await asyncio.to_thread(edge.start)
            await asyncio.to_thread(edge.wait_mount, "/live.mp3")
            assert edge.proc is not None and master.proc is not None and server.proc is not None
            tool = REPO / "target" / "release" / "mp3-listeners-bench"
            pids = {"voice-relay": server.proc.pid, "Icecast master": master.proc.pid}
            before = {k: cpu_seconds(p) for k, p in pids.items()}
            t = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                str(tool), "--url", f"{edge.http}/live.mp3", "--no-health", "--server-pid", str(edge.proc.pid),
                "--steps", str(args.listeners), "--measure-secs", str(args.secs), "--max-run-secs", "240", "--connect-timeout-secs", "150",
                "--unsynced-start", "--max-inflight", str(args.max_inflight),
                stdout=asyncio.subprocess.PIPE)
            stdout, _ = await proc.communicate()
            elapsed = time.monotonic() - t
            print(stdout.decode())
            for k, p in pids.items():
                print(f"{k}: {100 * (cpu_seconds(p) - before[k]) / elapsed:.1f} % of one core over the run "
                      f"({elapsed:.0f} s, connect phase included)")
    finally:
        if edge is not None:
            edge.cleanup()
        server.terminate()
        master.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["latency", "listeners"])
    ap.add_argument("--burst", type=int, default=65536, help="Icecast burst-size in bytes (its default: 65536)")
    ap.add_argument("--secs", type=float, default=20.0, help="measurement window (max 60)")
    ap.add_argument("--listeners", type=int, default=1000, help="MP3 listeners on the relay Icecast (max 4000)")
    ap.add_argument("--max-inflight", type=int, default=5,
                    help="listeners connecting at once (Icecast 2.4 listens with a backlog of 5)")
    args = ap.parse_args()
    args.secs = min(args.secs, 60.0)
    args.listeners = min(args.listeners, 4000)
    loopback_namespace_only()
    out = Path(tempfile.mkdtemp(prefix="scale-out-"))
    asyncio.run(latency(args, out) if args.what == "latency" else listeners(args, out))


if __name__ == "__main__":
    main()
