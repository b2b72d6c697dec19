#!/usr/bin/env python3
"""Soak test for voice-relay: long churn of clients, then check that resources come back.

Normally started by scripts/soak.sh, which makes the loopback-only network namespace,
starts the server and passes --pid/--port. This program only ever talks to 127.0.0.1.

Phases (the CSV's ``phase`` column):

  idle-start   one sample of the fresh, idle server
  warmup       --warmup-secs of the same churn as below (thread pools, allocator
               arenas, codec state get to their working size)
  settle-1     churn stopped, --settle-secs of quiet
  baseline     one idle sample: the reference for "returned to baseline"
  churn        --minutes of churn
  settle-2     churn stopped, --settle-secs of quiet
  final        one idle sample, compared with the baseline

Churn, all at once, all on 127.0.0.1:
  * senders: aiortc tone senders, 2..4 live at a time (the target is redrawn every
    20-40 s), each living 10-60 s and leaving in one of several ways (stop_stream,
    WebSocket close, TCP reset, peer connection closed with the socket left open);
  * WebRTC receivers: target redrawn every 10-20 s in 0..--max-receivers, each living
    5-45 s on the newest or a random stream, over /ws or /; some send the receiving
    card's duplicate start_receiving, some switch stream mid-life, some pick another
    stream after stream_ended on the same socket; they leave in the same several ways;
  * MP3 listeners: plain HTTP/1.1 GETs of /stream/latest.mp3, /stream/<id>.mp3 or an
    unknown id, reading for 2-40 s; about one in five stalls (tiny receive buffer,
    never reads) for 10-60 s; closed with FIN or RST;
  * misbehaving clients, one every 1-4 s: WebSockets sending garbage (non-JSON, wrong
    types, binary frames, unknown ids, sometimes an oversized message), senders whose
    offer is sent and who vanish before or after the answer, receivers that answer and
    close their peer connection before ICE (socket kept open past the handshake timeout,
    or closed), and raw TCP clients that drop mid-request or mid-frame with a reset.

Every --interval s it samples the server: VmRSS and Threads from /proc/PID/status, the
number of entries in /proc/PID/fd, server CPU, and /health counts, and appends a CSV row.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import os
import random
import signal
import socket
import struct
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

import aiortc.rtcrtpreceiver as aiortc_receiver  # noqa: E402
import clients as C  # noqa: E402  (restricts aiortc/aioice to 127.0.0.1)
from aiortc import RTCPeerConnection, RTCSessionDescription  # noqa: E402

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
CSV_FIELDS = [
    "time", "rss_kb", "fds", "threads", "senders", "receivers", "ws_clients", "mp3_listeners",
    "server_cpu_pct", "client_cpu_pct", "phase",
]

stats: Counter = Counter()
errors: Counter = Counter()


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------
# Sampling the server
# --------------------------------------------------------------------------


def read_proc(pid: int) -> dict | None:
    """RSS (kB), threads, open fds and CPU ticks of pid; None when it is gone."""
    try:
        rss = threads = None
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("Threads:"):
                    threads = int(line.split()[1])
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        ticks = int(rest[11]) + int(rest[12])  # utime + stime (fields 14, 15)
        if rss is None:  # a zombie has no VmRSS
            return None
        return {"rss_kb": rss, "threads": threads, "fds": fds, "ticks": ticks}
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def mp3_total(v) -> int | None:
    if isinstance(v, dict):
        return sum(int(x) for x in v.values() if isinstance(x, (int, float)))
    if isinstance(v, (int, float)):
        return int(v)
    return None


async def health(http_url: str) -> dict | None:
    try:
        return await C.get_json(http_url + "/health", timeout=3)
    except Exception:  # noqa: BLE001 - recorded as blanks
        return None


async def metrics(http_url: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (counters and gauges, no buckets)."""
    out: dict[str, float] = {}
    try:
        r = await C.http("GET", http_url + "/metrics", timeout=3)
        for line in r.body.decode("utf-8", "replace").splitlines():
            if not line or line.startswith("#") or "_bucket{" in line:
                continue
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    except Exception:  # noqa: BLE001
        pass
    return out


class Sampler:
    def __init__(self, pid: int, http_url: str, out: Path, interval: float):
        self.pid = pid
        self.http = http_url
        self.interval = interval
        self.t0 = time.monotonic()
        self.phase = "idle-start"
        self.rows: list[dict] = []
        self.server_gone = asyncio.Event()
        out.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(out, "w", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=CSV_FIELDS)
        self._w.writeheader()
        self._last: tuple[float, int, float] | None = None  # (mono, server ticks, client cpu s)

    async def sample(self, phase: str | None = None) -> dict | None:
        p = read_proc(self.pid)
        if p is None:
            self.server_gone.set()
            return None
        h = await health(self.http)
        now = time.monotonic()
        cpu_self = time.process_time()
        scpu = ccpu = ""
        if self._last is not None and now > self._last[0]:
            dt = now - self._last[0]
            scpu = round(100.0 * (p["ticks"] - self._last[1]) / CLK_TCK / dt, 1)
            ccpu = round(100.0 * (cpu_self - self._last[2]) / dt, 1)
        self._last = (now, p["ticks"], cpu_self)
        row = {
            "time": round(now - self.t0, 1),
            "rss_kb": p["rss_kb"],
            "fds": p["fds"],
            "threads": p["threads"],
            "senders": h.get("senders", "") if h else "",
            "receivers": h.get("receivers", "") if h else "",
            "ws_clients": h.get("websocket_clients", "") if h else "",
            "mp3_listeners": mp3_total(h.get("mp3_listeners")) if h else "",
            "server_cpu_pct": scpu,
            "client_cpu_pct": ccpu,
            "phase": phase or self.phase,
        }
        if h is None:
            stats["health_failed"] += 1
        self.rows.append(row)
        self._w.writerow(row)
        self._f.flush()
        return row

    async def run(self, stop: asyncio.Event, progress_every: int) -> None:
        n = 0
        next_t = time.monotonic()
        while not stop.is_set():
            next_t += self.interval
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, next_t - time.monotonic()))
                return
            except asyncio.TimeoutError:
                pass
            row = await self.sample()
            if row is None:
                log(f"server pid {self.pid} is gone")
                return
            n += 1
            if n % progress_every == 0:
                log(
                    f"t={row['time']:.0f}s {row['phase']}: rss {row['rss_kb'] / 1024:.1f} MiB, fds {row['fds']}, "
                    f"threads {row['threads']}, senders {row['senders']}, receivers {row['receivers']}, "
                    f"ws {row['ws_clients']}, mp3 {row['mp3_listeners']}, server cpu {row['server_cpu_pct']}%, "
                    f"client cpu {row['client_cpu_pct']}%"
                )

    def close(self) -> None:
        self._f.close()


# --------------------------------------------------------------------------
# Client helpers
# --------------------------------------------------------------------------


class FrameCounter(C.AudioSink):
    """Consumes a received track, counting frames without keeping the audio."""

    def __init__(self, who: str):
        super().__init__(who)
        self.count = 0

    @property
    def frames(self) -> int:  # type: ignore[override]
        return self.count

    def _take(self, frame) -> None:  # noqa: ANN001
        self.count += 1


class _NoDecoder:
    """Stands in for aiortc's Opus decoder: packets are received, SRTP-decrypted and
    jitter-buffered as usual, but not decoded (decoding costs the client ~3 % of a core
    per receiver, which the server never sees)."""

    def decode(self, encoded_frame):  # noqa: ANN001, ANN201
        return []


def skip_receiver_decoding() -> None:
    aiortc_receiver.get_decoder = lambda codec: _NoDecoder()


async def rtp_packets_received(pc) -> int:  # noqa: ANN001
    """Audio RTP packets this peer connection received (from aiortc's stats)."""
    if pc is None:
        return 0
    try:
        report = await asyncio.wait_for(pc.getStats(), 2)
    except Exception:  # noqa: BLE001
        return 0
    return sum(getattr(v, "packetsReceived", 0) or 0 for v in report.values() if v.type == "inbound-rtp")


def arm_reset(sock) -> None:  # noqa: ANN001
    """Make the next close of this socket send a TCP RST instead of a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (OSError, AttributeError):
        pass


async def ws_abort(sig: C.Signal) -> None:
    """Drop a WebSocket's TCP connection with a reset, no close frame."""
    tr = getattr(sig.ws, "transport", None)
    if tr is not None:
        arm_reset(tr.get_extra_info("socket"))
        tr.abort()
    await sig.close()


async def raw_connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (HOST, port)), 5)
    except BaseException:
        sock.close()
        raise
    return sock


async def recv_some(sock: socket.socket, n: int, timeout: float) -> bytes:
    return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, n), timeout)


async def close_pc(pc) -> None:  # noqa: ANN001
    if pc is not None:
        try:
            await asyncio.wait_for(pc.close(), 5)
        except Exception:  # noqa: BLE001
            pass


GARBAGE_TEXT = [
    "not json at all",
    "{",
    "[]",
    "null",
    "42",
    '"start_sending"',
    '{"type": 5}',
    '{"type": null}',
    '{"no_type": true}',
    '{"type": "definitely_not_a_type"}',
    '{"type": "webrtc_answer", "answer": {"type": "answer", "sdp": "v=0\\r\\ngarbage"}}',
    '{"type": "webrtc_answer"}',
    '{"type": "webrtc_offer", "offer": {"type": "offer", "sdp": "v=0"}}',
    '{"type": "webrtc_offer", "offer": "nope"}',
    '{"type": "start_receiving", "stream_id": "stream_doesnotexist"}',
    '{"type": "start_receiving", "stream_id": 12345}',
    '{"type": "start_receiving", "stream_id": {"a": [1, 2]}}',
    '{"type": "ice_candidate", "candidate": {"candidate": "candidate:garbage", "sdpMid": 7}}',
    '{"type": "ice_candidate", "candidate": null}',
    '{"type": "stop_stream"}',
    '{"type": "get_available_streams", "extra": "' + "x" * 2000 + '"}',
    "[" * 500 + "]" * 500,
    '{"type": "\u00e9\u2603\U0001F600"}',
    '{"type": "\\ud83d\\ude00 \\ud800"}',
    '{"type": "start_sending", "type": "stop_stream"}',
]


# --------------------------------------------------------------------------
# Churn
# --------------------------------------------------------------------------


class Churn:
    def __init__(self, port: int, args: argparse.Namespace, rng: random.Random):
        self.port = port
        self.http = f"http://{HOST}:{port}"
        self.ws_urls = [f"ws://{HOST}:{port}/ws", f"ws://{HOST}:{port}/"]
        self.args = args
        self.rng = rng
        self.stop = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        self.streams: list[str] = []
        self.live_senders = 0
        self.live_receivers = 0
        self.live_mp3 = 0
        self.n = 0

    # -- plumbing ---------------------------------------------------------

    def name(self, kind: str) -> str:
        self.n += 1
        return f"{kind}{self.n}"

    def ws_url(self) -> str:
        return self.ws_urls[0] if self.rng.random() < 0.75 else self.ws_urls[1]

    def spawn(self, coro, kind: str) -> None:  # noqa: ANN001
        t = asyncio.create_task(self._guard(coro, kind))
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def _guard(self, coro, kind: str) -> None:  # noqa: ANN001
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - counted, the soak goes on
            msg = str(e).splitlines()[0][:140] if str(e) else type(e).__name__
            errors[f"{kind}: {type(e).__name__}: {msg}"] += 1
            stats[f"{kind}_errors"] += 1

    async def nap(self, secs: float) -> bool:
        """Sleep; True if the churn was stopped meanwhile."""
        if self.stop.is_set():
            return True
        try:
            await asyncio.wait_for(self.stop.wait(), max(0.0, secs))
            return True
        except asyncio.TimeoutError:
            return False

    async def run(self, seconds: float) -> None:
        self.stop.clear()
        self.live_senders = self.live_receivers = self.live_mp3 = 0
        supervisors = [
            asyncio.create_task(self.watch_streams()),
            asyncio.create_task(self.sender_supervisor()),
            asyncio.create_task(self.receiver_supervisor()),
            asyncio.create_task(self.mp3_supervisor()),
            asyncio.create_task(self.misbehaviour_supervisor()),
        ]
        await self.nap(seconds)
        self.stop.set()
        await asyncio.gather(*supervisors, return_exceptions=True)
        await self.drain()

    async def drain(self, grace: float = 15.0) -> None:
        """Every client ends as it would at the end of its lifetime; stragglers are cancelled."""
        if self.tasks:
            _, pending = await asyncio.wait(set(self.tasks), timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                stats["cancelled_at_stop"] += len(pending)
                await asyncio.wait(pending, timeout=10)

    async def watch_streams(self) -> None:
        while not self.stop.is_set():
            try:
                body = await C.get_json(self.http + "/stream/status", timeout=3)
                s = body.get("active_streams")
                if isinstance(s, list):
                    self.streams = [x for x in s if isinstance(x, str)]
            except Exception:  # noqa: BLE001
                stats["status_poll_failed"] += 1
            await self.nap(2.0)

    # -- senders ----------------------------------------------------------

    async def sender_supervisor(self) -> None:
        target = self.rng.randint(self.args.min_senders, self.args.max_senders)
        retarget = time.monotonic() + self.rng.uniform(20, 40)
        while not self.stop.is_set():
            if time.monotonic() >= retarget:
                target = self.rng.randint(self.args.min_senders, self.args.max_senders)
                retarget = time.monotonic() + self.rng.uniform(20, 40)
            if self.live_senders < target:
                self.live_senders += 1
                self.spawn(self.sender_life(), "sender")
            await self.nap(self.rng.uniform(0.5, 2.0))

    async def sender_life(self) -> None:
        counted = True
        sig = snd = None
        try:
            sig = await C.Signal.connect(self.ws_url(), self.name("tx"))
            snd = C.ToneSender(sig, freq=self.rng.choice([330.0, 440.0, 550.0, 660.0, 880.0]))
            await snd.start(timeout=15)
            stats["senders_connected"] += 1
            await self.nap(self.rng.uniform(10, 60))
            how = self.rng.choices(["stop_stream", "ws_close", "tcp_reset", "pc_close"], [3, 3, 2, 1])[0]
            stats[f"sender_end_{how}"] += 1
            if how == "stop_stream":
                await snd.stop_stream()
                await self.nap(self.rng.uniform(0.0, 2.0))
            elif how == "tcp_reset":
                await ws_abort(sig)
            elif how == "pc_close":
                # Media stops, socket stays: the server ends the stream on its own
                # (DTLS close or the sender-idle timeout). Keep the socket a while.
                await snd.close()
                self.live_senders -= 1
                counted = False
                await self.nap(25)
        finally:
            if counted:
                self.live_senders -= 1
            if snd is not None:
                await snd.close()
            if sig is not None:
                await sig.close()

    # -- WebRTC receivers -------------------------------------------------

    async def receiver_supervisor(self) -> None:
        target = self.rng.randint(0, self.args.max_receivers)
        retarget = time.monotonic() + self.rng.uniform(10, 20)
        while not self.stop.is_set():
            if time.monotonic() >= retarget:
                target = self.rng.randint(0, self.args.max_receivers)
                retarget = time.monotonic() + self.rng.uniform(10, 20)
            if self.live_receivers < target and self.streams:
                self.live_receivers += 1
                self.spawn(self.receiver_life(), "receiver")
            await self.nap(self.rng.uniform(0.4, 1.5))

    async def receiver_life(self) -> None:
        sig = None
        rx: C.ToneReceiver | None = None
        try:
            sig = await C.Signal.connect(self.ws_url(), self.name("rx"))
            await sig.expect("available_streams", 5)
            streams = await sig.request_streams()
            if not streams:
                stats["receiver_no_stream"] += 1
                return
            deadline = time.monotonic() + self.rng.uniform(5, 45)
            sid = streams[-1] if self.rng.random() < 0.5 else self.rng.choice(streams)
            if sid == streams[-1] and self.rng.random() < 0.3:
                # The receiving card: start_receiving without an id, then with the id at once.
                await sig.send({"type": "start_receiving"})
                stats["receiver_duplicate_start"] += 1
            rx = await self._receive(sig, sid)
            got_audio_counted = False
            while time.monotonic() < deadline and not self.stop.is_set():
                if await self.nap(min(1.0, deadline - time.monotonic())):
                    break
                if not got_audio_counted and await rtp_packets_received(rx.pc) > 0:
                    stats["receivers_got_audio"] += 1
                    got_audio_counted = True
                ended = sig.count("stream_ended", stream_id=sid) > 0
                failed = rx.pc is not None and rx.pc.connectionState in ("failed", "closed")
                if ended or failed:
                    stats["receiver_saw_stream_end"] += 1
                    if self.rng.random() < 0.5:
                        break
                    # As the card does: stop_stream, then another stream on the same socket.
                    await sig.send({"type": "stop_stream"})
                    await close_pc(rx.pc)
                    await self.nap(0.2)
                    others = [s for s in self.streams if s != sid]
                    if not others:
                        break
                    sid = self.rng.choice(others)
                    stats["receiver_restart_same_socket"] += 1
                    rx = await self._receive(sig, sid)
                    got_audio_counted = False
                elif self.rng.random() < 0.02:
                    others = [s for s in self.streams if s != sid]
                    if others:
                        # Switch streams on the same socket: the server replaces the leg.
                        sid = self.rng.choice(others)
                        old = rx
                        stats["receiver_switch_stream"] += 1
                        rx = await self._receive(sig, sid)
                        await close_pc(old.pc)
                        got_audio_counted = False
            if sig.closed.is_set():
                return
            how = self.rng.choices(["stop_then_close", "ws_close", "tcp_reset", "pc_close_first"], [3, 3, 2, 2])[0]
            stats[f"receiver_end_{how}"] += 1
            if how == "stop_then_close":
                await sig.send({"type": "stop_stream"})
                if self.rng.random() < 0.3:
                    await sig.send({"type": "stop_stream"})  # the card's double stop
                await self.nap(0.3)
            elif how == "tcp_reset":
                await ws_abort(sig)
            elif how == "pc_close_first":
                await close_pc(rx.pc)
                await self.nap(self.rng.uniform(0.5, 3.0))
        finally:
            self.live_receivers -= 1
            if rx is not None:
                await close_pc(rx.pc)
            if sig is not None:
                await sig.close()

    async def _receive(self, sig: C.Signal, sid: str) -> C.ToneReceiver:
        rx = C.ToneReceiver(sig)
        rx.sink = FrameCounter(f"{sig.name} receiver")
        try:
            await rx.start(sid, timeout=15)
        except BaseException:
            await close_pc(rx.pc)
            raise
        stats["receivers_connected"] += 1
        return rx

    # -- MP3 listeners ----------------------------------------------------

    async def mp3_supervisor(self) -> None:
        target = self.rng.randint(0, self.args.max_mp3)
        retarget = time.monotonic() + self.rng.uniform(15, 30)
        while not self.stop.is_set():
            if time.monotonic() >= retarget:
                target = self.rng.randint(0, self.args.max_mp3)
                retarget = time.monotonic() + self.rng.uniform(15, 30)
            if self.live_mp3 < target:
                self.live_mp3 += 1
                self.spawn(self.mp3_life(stall=self.rng.random() < 0.2), "mp3")
            await self.nap(self.rng.uniform(0.3, 1.2))

    async def mp3_life(self, stall: bool) -> None:
        sock = None
        try:
            r = self.rng.random()
            if r < 0.45 or not self.streams:
                path = "/stream/latest.mp3"
            elif r < 0.92:
                path = f"/stream/{self.rng.choice(self.streams)}.mp3"
            else:
                path = "/stream/stream_nosuchstream.mp3"
            sock = await raw_connect(self.port, rcvbuf=4096 if stall else None)
            loop = asyncio.get_running_loop()
            req = f"GET {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\nUser-Agent: soak\r\n\r\n"
            await asyncio.wait_for(loop.sock_sendall(sock, req.encode()), 5)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 16384:
                chunk = await recv_some(sock, 4096, 15)  # latest.mp3 may wait for a stream
                if not chunk:
                    break
                head += chunk
            try:
                status = int(head.split(b" ", 2)[1])
            except (IndexError, ValueError):
                stats["mp3_bad_response"] += 1
                return
            stats[f"mp3_http_{status}"] += 1
            if status != 200:
                return
            if stall:
                stats["mp3_stalled"] += 1
                await self.nap(self.rng.uniform(10, 60))
                # Did the server give up on us? (EOF or reset after the buffered bytes.)
                dropped = False
                for _ in range(64):  # drain what was buffered; EOF or a reset = dropped
                    try:
                        data = await recv_some(sock, 65536, 0.2)
                    except asyncio.TimeoutError:
                        break
                    except ConnectionError:
                        dropped = True
                        break
                    if not data:
                        dropped = True
                        break
                if dropped:
                    stats["mp3_stalled_dropped_by_server"] += 1
            else:
                deadline = time.monotonic() + self.rng.uniform(2, 40)
                got = len(head) - head.index(b"\r\n\r\n") - 4
                while not self.stop.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        data = await recv_some(sock, 65536, min(left, 1.0))
                    except asyncio.TimeoutError:
                        continue
                    if not data:
                        stats["mp3_ended_by_server"] += 1
                        break
                    got += len(data)
                stats["mp3_bytes"] += got
            if self.rng.random() < 0.3:
                arm_reset(sock)
                stats["mp3_closed_with_reset"] += 1
        finally:
            self.live_mp3 -= 1
            if sock is not None:
                sock.close()

    # -- misbehaving clients ---------------------------------------------

    async def misbehaviour_supervisor(self) -> None:
        kinds = [
            (self.garbage_ws, 3),
            (self.offer_then_vanish, 2),
            (self.answer_then_close, 2),
            (self.raw_drop, 3),
        ]
        while not self.stop.is_set():
            fn = self.rng.choices([k for k, _ in kinds], [w for _, w in kinds])[0]
            self.spawn(fn(), fn.__name__)
            await self.nap(self.rng.uniform(1.0, 4.0))

    async def garbage_ws(self) -> None:
        sig = await C.Signal.connect(self.ws_url(), self.name("junk"))
        try:
            await sig.expect("available_streams", 5)
            for _ in range(self.rng.randint(3, 8)):
                if self.rng.random() < 0.15:
                    await sig.ws.send(os.urandom(self.rng.randint(1, 300)))  # a binary frame
                else:
                    await sig.send_text(self.rng.choice(GARBAGE_TEXT))
                await asyncio.sleep(0.06)  # stay under the per-socket message rate
            oversized = self.rng.random() < 0.1
            if oversized:
                await sig.send_text('{"type": "get_available_streams", "pad": "' + "y" * 70000 + '"}')
                stats["garbage_oversized_sent"] += 1
                try:
                    await asyncio.wait_for(sig.closed.wait(), 5)
                    stats["garbage_oversized_closed_by_server"] += 1
                except asyncio.TimeoutError:
                    pass
            else:
                await sig.ping(5)  # the socket must still be served
                stats["garbage_ws_still_served"] += 1
            stats["garbage_ws"] += 1
            if self.rng.random() < 0.3:
                await ws_abort(sig)
        finally:
            await sig.close()

    async def offer_then_vanish(self) -> None:
        sig = await C.Signal.connect(self.ws_url(), self.name("ghosttx"))
        snd = None
        try:
            await sig.send({"type": "start_sending"})
            mode = self.rng.choice(["before_offer", "right_after_offer", "after_answer"])
            stats[f"vanish_{mode}"] += 1
            if mode == "before_offer":
                await sig.expect("sender_ready", 5)
                await ws_abort(sig) if self.rng.random() < 0.5 else await sig.close()
                return
            snd = C.ToneSender(sig, 1000.0)
            await sig.expect("sender_ready", 5)
            snd.pc.addTransceiver(snd.track, direction="sendonly")
            await snd.pc.setLocalDescription(await snd.pc.createOffer())
            await sig.send({"type": "webrtc_offer", "offer": {"type": "offer", "sdp": snd.pc.localDescription.sdp}})
            if mode == "after_answer":
                await sig.expect("webrtc_answer", 5)
            # Gone before ICE can complete (the pc never gets the answer).
            await snd.close()
            await ws_abort(sig) if self.rng.random() < 0.6 else await sig.close()
        finally:
            if snd is not None:
                await snd.close()
            await sig.close()

    async def answer_then_close(self) -> None:
        streams = list(self.streams)
        if not streams:
            return
        sig = await C.Signal.connect(self.ws_url(), self.name("ghostrx"))
        pc = None
        try:
            await sig.send({"type": "start_receiving", "stream_id": self.rng.choice(streams)})
            msg = await sig.expect("webrtc_offer", 5)
            pc = RTCPeerConnection(C.rtc_config())
            await pc.setRemoteDescription(RTCSessionDescription(sdp=msg["offer"]["sdp"], type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
            await sig.send({"type": "webrtc_answer", "answer": {"type": "answer", "sdp": pc.localDescription.sdp}})
            await close_pc(pc)  # before any connectivity check went out
            pc = None
            mode = self.rng.choice(["keep_socket", "close", "reset"])
            stats[f"answer_then_close_{mode}"] += 1
            if mode == "keep_socket":
                # The server must drop the leg on its handshake timeout, socket still open.
                await self.nap(20)
                if not sig.closed.is_set():
                    await sig.ping(5)
            elif mode == "reset":
                await ws_abort(sig)
        finally:
            await close_pc(pc)
            await sig.close()

    async def raw_drop(self) -> None:
        mode = self.rng.choice(
            ["connect_reset", "partial_request", "partial_upgrade", "mid_frame", "health_no_read", "random_bytes"]
        )
        stats[f"raw_{mode}"] += 1
        sock = await raw_connect(self.port)
        loop = asyncio.get_running_loop()
        try:
            if mode == "partial_request":
                await loop.sock_sendall(sock, b"GET /stream/latest.mp3 HTT")
                await self.nap(self.rng.uniform(0, 3))
            elif mode == "partial_upgrade":
                await loop.sock_sendall(
                    sock, b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                )
                await self.nap(self.rng.uniform(0, 3))
            elif mode == "mid_frame":
                key = base64.b64encode(os.urandom(16)).decode()
                await loop.sock_sendall(
                    sock,
                    (
                        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                    ).encode(),
                )
                await recv_some(sock, 4096, 5)
                # A masked text frame header announcing 256 bytes, then only a few of them.
                await loop.sock_sendall(sock, b"\x81\xfe\x01\x00" + os.urandom(4) + b'{"type": "start_')
                await self.nap(self.rng.uniform(0, 2))
            elif mode == "health_no_read":
                await loop.sock_sendall(sock, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            elif mode == "random_bytes":
                await loop.sock_sendall(sock, os.urandom(self.rng.randint(1, 2000)))
                await self.nap(0.2)
        finally:
            arm_reset(sock)
            sock.close()


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def mb(kb: int) -> str:
    return f"{kb / 1024:.1f} MiB"


def slope_kb_per_min(rows: list[dict]) -> float | None:
    pts = [(r["time"], r["rss_kb"]) for r in rows]
    if len(pts) < 3:
        return None
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    den = sum((p[0] - mx) ** 2 for p in pts)
    if den == 0:
        return None
    return 60.0 * sum((p[0] - mx) * (p[1] - my) for p in pts) / den


def report(s: Sampler, args: argparse.Namespace, churn_t0: float | None, met: dict[str, float]) -> bool:
    rows = s.rows
    by_phase = {r["phase"]: r for r in rows}
    start, base, end = by_phase.get("idle-start"), by_phase.get("baseline"), by_phase.get("final")
    print()
    print("=" * 72)
    print("SOAK SUMMARY")
    if not (start and base and end):
        print("incomplete run: missing the idle-start, baseline or final sample")
        return False
    peak = {k: max(rows, key=lambda r: r[k]) for k in ("rss_kb", "fds", "threads")}
    rss_tol = max(args.rss_tol_mb * 1024, base["rss_kb"] * args.rss_tol_pct / 100.0)
    checks = {
        "rss": end["rss_kb"] <= base["rss_kb"] + rss_tol,
        "fds": end["fds"] <= base["fds"] + args.fd_tol,
        "threads": end["threads"] <= base["threads"] + args.thread_tol,
        "health idle": all(end[k] == 0 for k in ("senders", "receivers", "ws_clients", "mp3_listeners")),
    }
    print(f"{'':10} {'start(idle)':>12} {'baseline':>12} {'peak':>12} {'end(idle)':>12}  end-baseline")
    print(
        f"{'RSS':10} {mb(start['rss_kb']):>12} {mb(base['rss_kb']):>12} {mb(peak['rss_kb']['rss_kb']):>12} "
        f"{mb(end['rss_kb']):>12}  {(end['rss_kb'] - base['rss_kb']) / 1024:+.1f} MiB "
        f"(tolerance +{rss_tol / 1024:.1f} MiB)"
    )
    for k, tol in (("fds", args.fd_tol), ("threads", args.thread_tol)):
        print(
            f"{k:10} {start[k]:>12} {base[k]:>12} {peak[k][k]:>12} {end[k]:>12}  {end[k] - base[k]:+d} "
            f"(tolerance +{tol})"
        )
    print(
        f"peaks at t={peak['rss_kb']['time']:.0f}s (rss), t={peak['fds']['time']:.0f}s (fds), "
        f"t={peak['threads']['time']:.0f}s (threads)"
    )
    churn_rows = [r for r in rows if r["phase"] == "churn"]
    half = churn_rows[len(churn_rows) // 2:]
    sl = slope_kb_per_min(half)
    if sl is not None:
        print(f"RSS trend over the second half of the churn: {sl:+.0f} KB/min (least squares)")
    print(
        f"final /health: senders {end['senders']}, receivers {end['receivers']}, "
        f"ws_clients {end['ws_clients']}, mp3_listeners {end['mp3_listeners']}"
    )
    cpu = [r for r in churn_rows if r["server_cpu_pct"] != ""]
    if cpu:
        sc = sum(r["server_cpu_pct"] for r in cpu) / len(cpu)
        cc = sum(r["client_cpu_pct"] for r in cpu) / len(cpu)
        print(f"mean CPU during churn (% of one core): server {sc:.1f}, soak client {cc:.1f}")
    for k, ok in checks.items():
        print(f"  {k:12} {'back to baseline' if ok else 'NOT back to baseline'}")
    returned = all(checks.values())
    print(f"RETURNED TO BASELINE: {'yes' if returned else 'no'}")

    # One row per churn minute, plus the reference rows.
    if churn_t0 is not None:
        print()
        print("| t (min of churn) | phase | RSS MiB | fds | threads | senders | receivers | ws | mp3 |")
        print("|---|---|---|---|---|---|---|---|---|")
        picks = [("—", base)]
        minute = 0
        for r in churn_rows:
            if r["time"] - churn_t0 >= minute * 60 - s.interval / 2:
                picks.append((str(minute), r))
                minute += 1
        if churn_rows and picks[-1][1] is not churn_rows[-1]:
            picks.append((f"{(churn_rows[-1]['time'] - churn_t0) / 60:.1f}", churn_rows[-1]))
        picks.append(("—", end))
        for label, r in picks:
            print(
                f"| {label} | {r['phase']} | {r['rss_kb'] / 1024:.1f} | {r['fds']} | {r['threads']} | "
                f"{r['senders']} | {r['receivers']} | {r['ws_clients']} | {r['mp3_listeners']} |"
            )
    print()
    print("client activity:")
    for k in sorted(stats):
        print(f"  {k}: {stats[k]}")
    if errors:
        print("client-side errors (expected in part: racing a stream that just ended, etc.):")
        for k, v in errors.most_common(15):
            print(f"  {v} x {k}")
    if met:
        print("server counters (/metrics, non-zero):")
        for k in sorted(met):
            if (k.endswith("_total") or "_total{" in k) and met[k]:
                print(f"  {k} {met[k]:.0f}")
    return returned


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


async def amain(args: argparse.Namespace) -> int:
    http_url = f"http://{HOST}:{args.port}"
    rng = random.Random(args.seed)
    log(f"seed {args.seed}; server pid {args.pid}, port {args.port}; csv {args.out}")

    deadline = time.monotonic() + 15
    while await health(http_url) is None:
        if read_proc(args.pid) is None or time.monotonic() > deadline:
            log("server not answering /health")
            return 1
        await asyncio.sleep(0.1)

    aborted = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, aborted.set)

    sampler = Sampler(args.pid, http_url, Path(args.out), args.interval)
    churn = Churn(args.port, args, rng)
    stop_sampling = asyncio.Event()
    await sampler.sample("idle-start")
    sampler_task = asyncio.create_task(
        sampler.run(stop_sampling, progress_every=max(1, int(round(60 / args.interval))))
    )
    churn_t0 = None
    ok = True

    async def phase(name: str, coro) -> bool:  # noqa: ANN001
        """Run one phase; False if the server died or we were told to stop."""
        sampler.phase = name
        log(f"phase {name}")
        task = asyncio.create_task(coro)
        gone = asyncio.create_task(sampler.server_gone.wait())
        stop = asyncio.create_task(aborted.wait())
        done, _ = await asyncio.wait({task, gone, stop}, return_when=asyncio.FIRST_COMPLETED)
        for t in (gone, stop):
            t.cancel()
        if task not in done:
            churn.stop.set()
            try:
                await asyncio.wait_for(task, 40)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                pass
            return False
        return True

    try:
        steps = [
            ("warmup", lambda: churn.run(args.warmup_secs)),
            ("settle-1", lambda: asyncio.sleep(args.settle_secs)),
            ("baseline", None),
            ("churn", lambda: churn.run(args.minutes * 60)),
            ("settle-2", lambda: asyncio.sleep(args.settle_secs)),
            ("final", None),
        ]
        for name, make in steps:
            if make is None:
                row = await sampler.sample(name)
                if row is None:
                    ok = False
                    break
                continue
            if name == "churn":
                churn_t0 = time.monotonic() - sampler.t0
            if not await phase(name, make()):
                ok = False
                break
    finally:
        stop_sampling.set()
        await asyncio.gather(sampler_task, return_exceptions=True)
        await churn.drain(5)

    met = await metrics(http_url) if read_proc(args.pid) is not None else {}
    returned = report(sampler, args, churn_t0, met)
    sampler.close()
    if sampler.server_gone.is_set() or read_proc(args.pid) is None:
        print("SERVER DIED during the soak")
        return 1
    if not ok:
        print("soak interrupted before the end")
        return 1
    return 0 if returned else 3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pid", type=int, required=True, help="server process id (to read /proc)")
    ap.add_argument("--port", type=int, required=True, help="server port on 127.0.0.1 (TCP and UDP)")
    ap.add_argument("--minutes", type=float, default=30.0, help="length of the churn phase")
    ap.add_argument("--out", required=True, help="CSV file to write")
    ap.add_argument("--warmup-secs", type=float, default=60.0)
    ap.add_argument("--settle-secs", type=float, default=20.0)
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--min-senders", type=int, default=2)
    ap.add_argument("--max-senders", type=int, default=4)
    ap.add_argument("--max-receivers", type=int, default=20)
    ap.add_argument("--max-mp3", type=int, default=12)
    ap.add_argument("--decode-audio", action="store_true",
                    help="decode received Opus in the WebRTC receivers (costs client CPU)")
    ap.add_argument("--rss-tol-mb", type=float, default=8.0, help="RSS tolerance: at least this many MiB ...")
    ap.add_argument("--rss-tol-pct", type=float, default=25.0, help="... or this %% of the baseline")
    ap.add_argument("--fd-tol", type=int, default=2)
    ap.add_argument("--thread-tol", type=int, default=0)
    args = ap.parse_args()
    if not args.decode_audio:
        skip_receiver_decoding()
    try:
        return asyncio.run(amain(args))
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
