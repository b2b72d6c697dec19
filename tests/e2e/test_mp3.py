"""Live MP3 over HTTP: /stream/{id}.mp3 and /stream/latest.mp3, decoded by ffmpeg."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from dataclasses import dataclass

import numpy as np

from clients import Clients, ToneSender, dominant_frequency, http, rms, run, tone_purity
from relay_server import RelayServer

DECODE_PROBLEMS = re.compile(
    r"error|invalid|corrupt|header missing|overread|incomplete|could not|failed|skipping|truncat",
    re.IGNORECASE,
)


@dataclass
class Capture:
    samples: np.ndarray
    stderr: str
    returncode: int | None
    wall: float

    @property
    def seconds(self) -> float:
        return len(self.samples) / 48000

    def problems(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if DECODE_PROBLEMS.search(ln)]


async def ffmpeg_capture(url: str, seconds: float | None = 4.0, timeout: float = 20.0) -> Capture:
    """Decode a live MP3 URL to 48 kHz mono s16 (``seconds`` None: until the body ends)."""
    args = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "warning"]
    if seconds is not None:
        args += ["-t", str(seconds)]
    args += ["-i", url, "-f", "s16le", "-ac", "1", "-ar", "48000", "-"]
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        rc: int | None = proc.returncode
    except asyncio.TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        rc = None
    wall = time.monotonic() - t0
    samples = np.frombuffer(out[: len(out) // 2 * 2], dtype="<i2").astype(np.float64)
    return Capture(samples, err.decode(errors="replace"), rc, wall)


def assert_clean_tone(cap: Capture, freq: float, who: str, min_seconds: float = 1.5) -> None:
    assert cap.seconds >= min_seconds, f"{who}: only {cap.seconds:.2f}s decoded; stderr: {cap.stderr[-500:]}"
    assert not cap.problems(), f"{who}: ffmpeg reported: {cap.problems()[:5]}"
    tail = cap.samples[-48000:] if cap.seconds >= 1.0 else cap.samples
    got = dominant_frequency(tail)
    assert rms(tail) > 300, f"{who}: near silence (rms {rms(tail):.0f})"
    assert abs(got - freq) <= 15, f"{who}: dominant {got:.1f} Hz, expected {freq}"
    assert tone_purity(tail, freq) >= 0.7, f"{who}: purity {tone_purity(tail, freq):.2f}"
    # no dropouts after the first half second: every 20 ms window carries signal
    body = cap.samples[24000:]
    n = len(body) // 960
    if n:
        win = np.sqrt((body[: n * 960].reshape(n, 960) ** 2).mean(axis=1))
        ref = float(np.median(win))
        quiet = int((win < 0.1 * ref).sum())
        assert quiet == 0, f"{who}: {quiet} silent 20 ms windows in the MP3 (median rms {ref:.0f})"


def mp3_url(server: RelayServer, sid: str) -> str:
    return f"{server.http}/stream/{sid}.mp3"


def relay(server: RelayServer, body, timeout: float = 60.0) -> None:  # noqa: ANN001
    async def main() -> None:
        async with Clients(server.ws, server.http) as c:
            await body(c)

    run(main(), timeout)


async def read_head(url_host: str, port: int, path: str, method: str = "GET", nbytes: int = 4096,
                    timeout: float = 10.0) -> tuple[str, dict[str, str], bytes]:
    """Raw HTTP/1.1 request: status line, headers and the first nbytes of the body."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(url_host, port), timeout)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: {url_host}:{port}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for ln in lines[1:]:
            if ":" in ln:
                k, v = ln.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        body = b""
        if method != "HEAD":
            while len(body) < nbytes:
                chunk = await asyncio.wait_for(reader.read(nbytes - len(body)), timeout)
                if not chunk:
                    break
                body += chunk
        return lines[0], headers, body
    finally:
        writer.close()


def _dechunk_prefix(body: bytes, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() != "chunked":
        return body
    out, i = b"", 0
    while i < len(body):
        j = body.find(b"\r\n", i)
        if j < 0:
            break
        size = int(body[i:j].split(b";")[0], 16)
        out += body[j + 2: j + 2 + size]
        i = j + 2 + size + 2
        if size == 0:
            break
    return out


# ---------------------------------------------------------------------------


def test_mp3_by_id(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        snd = await c.sender(440)
        status, headers, first = await read_head("127.0.0.1", server.port, f"/stream/{snd.stream_id}.mp3")
        assert " 200 " in status + " ", status
        assert headers.get("content-type", "").startswith("audio/mpeg"), headers
        assert "content-length" not in headers, headers
        data = _dechunk_prefix(first, headers)
        assert data[:3] == b"ID3" or (data[0] == 0xFF and data[1] & 0xE0 == 0xE0), f"not MP3: {data[:8]!r}"
        cap = await ffmpeg_capture(mp3_url(server, snd.stream_id), 4.0)
        assert cap.returncode == 0, cap.stderr[-500:]
        assert 3.8 <= cap.seconds <= 4.2, cap.seconds
        assert 2.5 <= cap.wall <= 7.0, f"4 s of live audio took {cap.wall:.2f}s of wall clock"
        assert_clean_tone(cap, 440, "by-id")

    relay(server, body)


def test_mp3_latest(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        await c.sender(440)
        cap = await ffmpeg_capture(server.http + "/stream/latest.mp3", 4.0)
        assert cap.returncode == 0, cap.stderr[-500:]
        assert 2.5 <= cap.wall <= 7.0, cap.wall
        assert_clean_tone(cap, 440, "latest")
        await c.sender(1000)
        cap = await ffmpeg_capture(server.http + "/stream/latest.mp3", 3.0)
        assert_clean_tone(cap, 1000, "latest after a newer stream")

    relay(server, body)


def test_mp3_two_streams(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        a = await c.sender(440)
        b = await c.sender(1000)
        ca, cb = await asyncio.gather(
            ffmpeg_capture(mp3_url(server, a.stream_id), 4.0), ffmpeg_capture(mp3_url(server, b.stream_id), 4.0)
        )
        assert_clean_tone(ca, 440, "stream A")
        assert_clean_tone(cb, 1000, "stream B")
        assert tone_purity(ca.samples[-48000:], 1000) < 0.05
        assert tone_purity(cb.samples[-48000:], 440) < 0.05

    relay(server, body)


def test_mp3_listener_joins_mid_stream(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        snd = await c.sender(440)
        first = asyncio.ensure_future(ffmpeg_capture(mp3_url(server, snd.stream_id), 5.0))
        await asyncio.sleep(2.3)
        late = await ffmpeg_capture(mp3_url(server, snd.stream_id), 2.5)
        early = await first
        assert_clean_tone(early, 440, "first listener")
        assert_clean_tone(late, 440, "late listener")

    relay(server, body)


def test_mp3_latest_waits_for_a_stream(server: RelayServer) -> None:
    """play_media comes tens of ms before the stream exists: latest.mp3 must wait, not fail."""

    async def body(c: Clients) -> None:
        listener = asyncio.ensure_future(ffmpeg_capture(server.http + "/stream/latest.mp3", 3.0, timeout=20))
        await asyncio.sleep(0.5)
        await c.sender(440)
        cap = await listener
        assert cap.returncode == 0, cap.stderr[-500:]
        assert_clean_tone(cap, 440, "early latest.mp3")

    relay(server, body)


def test_mp3_body_ends_when_stream_stops(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        for how in ("stop_stream", "close_ws"):
            s = await c.signal(f"sender_{how}")
            snd = c.track(ToneSender(s, 440))
            await snd.start()
            listener = asyncio.ensure_future(ffmpeg_capture(mp3_url(server, snd.stream_id), None, timeout=15))
            await asyncio.sleep(2.5)
            t_stop = time.monotonic()
            if how == "stop_stream":
                await snd.stop_stream()
            else:
                await s.close()
            cap = await listener
            ended_after = time.monotonic() - t_stop
            assert cap.returncode == 0, f"{how}: ffmpeg rc {cap.returncode}, stderr {cap.stderr[-500:]}"
            assert ended_after <= 5.0, f"{how}: body ended {ended_after:.1f}s after the stop"
            assert cap.seconds >= 1.5, cap.seconds
            assert abs(dominant_frequency(cap.samples[24000:]) - 440) <= 15
            assert not cap.problems(), f"{how}: {cap.problems()[:5]}"
            r = await http("GET", mp3_url(server, snd.stream_id), timeout=5)
            assert r.status == 404, f"{how}: ended stream's MP3 answers {r.status}"

    relay(server, body, 90)


MPEG1_L3_KBPS = [0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320]
MPEG1_RATES = [44100, 48000, 32000]


def count_whole_frames(data: bytes) -> int:
    """Walks MPEG-1 Layer III frame headers from byte 0; the data must end on a frame boundary."""
    i, frames = 0, 0
    while i < len(data):
        h = data[i: i + 4]
        assert len(h) == 4 and h[0] == 0xFF and h[1] & 0xFE == 0xFA, f"no frame header at byte {i}: {h!r}"
        kbps, rate, pad = MPEG1_L3_KBPS[h[2] >> 4], MPEG1_RATES[(h[2] >> 2) & 3], (h[2] >> 1) & 1
        i += 144000 * kbps // rate + pad
        frames += 1
    assert i == len(data), f"last frame cut: {i - len(data)} bytes missing"
    return frames


def test_mp3_body_framing_http11_and_http10(server: RelayServer) -> None:
    """HTTP/1.1 listeners get a chunked body that ends with the last chunk when the stream
    stops; HTTP/1.0 listeners get the bare MP3, ended by closing. Both hold whole frames."""

    async def body(c: Clients) -> None:
        snd = await c.sender(440)
        conns = []
        for version in ("1.1", "1.0"):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(f"GET /stream/{snd.stream_id}.mp3 HTTP/{version}\r\nHost: 127.0.0.1\r\n\r\n".encode())
            await writer.drain()
            head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode("latin-1").lower()
            conns.append((version, reader, writer, head))
        await asyncio.sleep(2.0)
        await snd.stop_stream()
        for version, reader, writer, head in conns:
            rest = await asyncio.wait_for(reader.read(), 10)  # until the server closes
            writer.close()
            assert head.startswith(f"http/{version} 200"), head
            assert "content-length" not in head, head
            if version == "1.1":
                assert "transfer-encoding: chunked" in head, head
                assert rest.endswith(b"\r\n0\r\n\r\n"), f"no last chunk: {rest[-16:]!r}"
                data = _dechunk_prefix(rest, {"transfer-encoding": "chunked"})
            else:
                assert "transfer-encoding" not in head, head
                data = rest
            frames = count_whole_frames(data)
            assert frames * 0.024 >= 1.5, f"HTTP/{version}: only {frames} frames"

    relay(server, body)


def test_mp3_request_head_in_pieces(server: RelayServer) -> None:
    """A player whose request head arrives in several TCP segments still gets the stream."""

    async def body(c: Clients) -> None:
        snd = await c.sender(440)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        request = f"GET /stream/{snd.stream_id}.mp3 HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow\r\n\r\n".encode()
        for piece in (request[:9], request[9:30], request[30:]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.3)
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode("latin-1").lower()
        data = await asyncio.wait_for(reader.read(4096), 10)
        writer.close()
        assert head.startswith("http/1.1 200"), head
        assert "audio/mpeg" in head, head
        assert b"\xff" in data[:16], f"no frame sync at the start of the body: {data[:16]!r}"

    relay(server, body)


def test_mp3_not_found(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        r = await http("GET", server.http + "/stream/stream_nope.mp3", timeout=5)
        assert r.status == 404, r.status
        t0 = time.monotonic()
        r = await http("GET", server.http + "/stream/latest.mp3?wait=0", timeout=5)
        assert r.status == 404, r.status
        assert time.monotonic() - t0 < 2.0
        r = await http("HEAD", server.http + "/stream/stream_nope.mp3", timeout=5)
        assert r.status == 404, r.status
        snd = await c.sender(440)
        r = await http("GET", server.http + "/stream/stream_nope.mp3", timeout=5)
        assert r.status == 404, "unknown id while another stream is live"
        del snd

    relay(server, body)


def test_mp3_head(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        snd = await c.sender(440)
        for path in (f"/stream/{snd.stream_id}.mp3", "/stream/latest.mp3"):
            t0 = time.monotonic()
            status, headers, _ = await read_head("127.0.0.1", server.port, path, method="HEAD", timeout=5)
            assert " 200 " in status + " ", (path, status)
            assert headers.get("content-type", "").startswith("audio/mpeg"), (path, headers)
            assert time.monotonic() - t0 < 3.0, f"HEAD {path} took {time.monotonic() - t0:.1f}s"
        await snd.signal.ping()

    relay(server, body)


def test_mp3_stalled_listener_is_dropped(server: RelayServer) -> None:
    stall_seconds = 25.0

    async def body(c: Clients) -> None:
        snd = await c.sender(440)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(5)
        sock.connect(("127.0.0.1", server.port))
        try:
            sock.sendall(f"GET /stream/{snd.stream_id}.mp3 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            # never read while the stream plays on
            await asyncio.sleep(stall_seconds - 5)
            cap = await ffmpeg_capture(mp3_url(server, snd.stream_id), 4.0)
            assert_clean_tone(cap, 440, "normal listener beside a stalled one")
            assert cap.wall <= 7.0, f"normal listener slowed down: {cap.wall:.1f}s for 4 s"
            await asyncio.sleep(max(0.0, stall_seconds - 5 - cap.wall))
            # Now drain: a dropped listener's socket reaches EOF (or a reset) after its backlog.
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            deadline = time.monotonic() + 5.0
            total, eof = 0, False
            while time.monotonic() < deadline:
                try:
                    chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), max(0.05, deadline - time.monotonic()))
                except (ConnectionResetError, BrokenPipeError):
                    eof = True
                    break
                except asyncio.TimeoutError:
                    break
                if not chunk:
                    eof = True
                    break
                total += len(chunk)
            assert eof, (
                f"stalled listener still served after {stall_seconds:.0f}s ({total} bytes drained, no EOF). "
                "Note: on loopback the kernel alone buffers ~3 MB for a reader that never reads, so a "
                "server sees no back-pressure for minutes unless it caps SO_SNDBUF on MP3 sockets "
                "(or drops a listener whose queue lags by more than a few seconds)."
            )
        finally:
            sock.close()
        cap = await ffmpeg_capture(mp3_url(server, snd.stream_id), 2.0)
        assert_clean_tone(cap, 440, "listener after the drop")

    relay(server, body, 90)
