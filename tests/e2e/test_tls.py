"""HTTPS + WSS with the self-signed certificate, and the plain-HTTP audio port.

The deployment under test is the old add-on's: cards on HTTPS (the main
listener, with ``--tls-self-signed``), speakers on a second plain-HTTP port
(``--audio-listen``) that serves only MP3, status and health.  Every TLS
connection below trusts ONLY the CA the server hands out at ``/ca.crt``.
"""

from __future__ import annotations

import asyncio
import http.client
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from clients import (
    Clients,
    HttpResult,
    Signal,
    ToneReceiver,
    ToneSender,
    assert_tone,
    dominant_frequency,
    health_idle,
    rms,
    run,
    tone_purity,
)
from conftest import _finish
from relay_server import RelayServer, free_port
from test_mp3 import ffmpeg_capture


class TlsRelay(RelayServer):
    """The relay on HTTPS/WSS with a self-signed CA in ``data_dir``, plus a plain-HTTP audio port."""

    def __init__(self, log_path: Path, data_dir: Path):
        self.audio_port = free_port()
        super().__init__(log_path, ["--tls-self-signed", "--data-dir", str(data_dir),
                                    "--audio-listen", f"127.0.0.1:{self.audio_port}"])
        self.https = f"https://{self.host}:{self.port}"
        self.wss = f"wss://{self.host}:{self.port}/ws"
        self.audio = f"http://{self.host}:{self.audio_port}"
        # RelayServer.start() waits for plain-HTTP /health: the audio port answers it.
        self.http = self.audio

    def start(self, timeout: float = 15.0) -> None:
        super().start(timeout)
        # ... and the TLS listener is up too (certificate not checked here: that is the test's job).
        deadline = time.monotonic() + 5
        while True:
            try:
                with urllib.request.urlopen(self.https + "/health", timeout=1,
                                            context=ssl._create_unverified_context()) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)


def start_tls(tmp_path: Path, name: str, data_dir: Path) -> TlsRelay:
    srv = TlsRelay(tmp_path / f"{name}.log", data_dir)
    try:
        srv.start()
    except (FileNotFoundError, RuntimeError, OSError) as e:
        srv.kill()
        pytest.fail(f"TLS server did not start: {e}\n{srv.log_tail()}", pytrace=False)
    return srv


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "relay-data"


@pytest.fixture
def server(tmp_path: Path, data_dir: Path):  # noqa: ANN201
    srv = start_tls(tmp_path, "server", data_dir)
    try:
        yield srv
    finally:
        _finish(srv)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _get(url: str, context: ssl.SSLContext | None, timeout: float = 5.0, max_body: int = 1 << 20) -> HttpResult:
    try:
        with urllib.request.urlopen(urllib.request.Request(url), timeout=timeout, context=context) as resp:
            return HttpResult(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read(max_body))
    except urllib.error.HTTPError as e:
        return HttpResult(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read(max_body))


async def get(url: str, context: ssl.SSLContext | None = None, timeout: float = 5.0) -> HttpResult:
    return await asyncio.wait_for(asyncio.to_thread(_get, url, context, timeout), timeout + 2)


async def fetch_ca(srv: TlsRelay) -> bytes:
    """Download /ca.crt the way a phone does the first time: without verifying anything yet."""
    r = await get(srv.https + "/ca.crt", ssl._create_unverified_context())
    assert r.status == 200, r.status
    pem = r.body
    assert pem.startswith(b"-----BEGIN CERTIFICATE-----") and pem.rstrip().endswith(b"-----END CERTIFICATE-----"), pem[:80]
    assert pem.count(b"BEGIN CERTIFICATE") == 1, "ca.crt should hold exactly the CA certificate"
    return pem


def trust_only(pem: bytes) -> ssl.SSLContext:
    """An SSL context that verifies the peer and host name against this CA and nothing else."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verify_mode CERT_REQUIRED, check_hostname on
    ctx.load_verify_locations(cadata=pem.decode("ascii"))
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert len(ctx.get_ca_certs()) == 1
    return ctx


async def wss_signal(url: str, ctx: ssl.SSLContext, name: str) -> Signal:
    """The harness's Signal client, over a WSS connection that verifies with ``ctx``."""
    ws = await asyncio.wait_for(
        ws_connect(url, ssl=ctx, max_size=None, open_timeout=5, ping_interval=None, close_timeout=2), 6)
    s = Signal(ws, name)
    await s.expect("available_streams", 5)
    return s


async def wss_call(c: Clients, url: str, ctx: ssl.SSLContext, freq: float) -> tuple[ToneSender, ToneReceiver]:
    """An aiortc sender and a receiver of its stream, both signalling over WSS verified with
    ``ctx``."""
    s = await wss_signal(url, ctx, "wss_sender")
    c.signals.append(s)
    snd = c.track(ToneSender(s, freq))
    await snd.start()
    rs = await wss_signal(url, ctx, "wss_receiver")
    c.signals.append(rs)
    rx = c.track(ToneReceiver(rs))
    await rx.start(snd.stream_id)
    return snd, rx


async def raw_get_head(port: int, path: str, nbytes: int = 2048, timeout: float = 10.0) -> tuple[str, dict, bytes]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)).decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in head[1:] if ":" in ln)}
        body = b""
        while len(body) < nbytes:
            chunk = await asyncio.wait_for(reader.read(nbytes - len(body)), timeout)
            if not chunk:
                break
            body += chunk
        return head[0], headers, body
    finally:
        writer.close()


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------


def test_tls_self_signed_end_to_end(server: TlsRelay, data_dir: Path) -> None:
    async def main() -> None:
        pem = await fetch_ca(server)
        assert (data_dir / "ca.crt").read_bytes() == pem, "/ca.crt differs from the CA kept in --data-dir"
        ctx = trust_only(pem)

        # HTTPS verifies against that CA alone (host name 127.0.0.1 included) ...
        r = await get(server.https + "/health", ctx)
        assert r.status == 200 and r.json().get("status") == "healthy", (r.status, r.body[:200])
        # ... and is not trusted by a context without it (the check above is real).
        with pytest.raises(OSError) as refused:
            await get(server.https + "/health", ssl.create_default_context())
        assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value) or "certificate" in str(refused.value).lower()
        # The main port speaks TLS only.
        try:
            plain = await get(f"http://127.0.0.1:{server.port}/health", timeout=3)
        except (OSError, http.client.HTTPException):
            pass  # a TLS alert, or the connection dropped
        else:
            assert plain.status != 200, "plain HTTP /health answered on the TLS port"

        # WSS on /ws and on / (the cards' server_url without a path).
        async with Clients(server.wss, server.https) as c:
            for url in (server.wss, f"wss://127.0.0.1:{server.port}/"):
                s = await wss_signal(url, ctx, "probe")
                c.signals.append(s)
                assert await s.request_streams() == []

            # A full sender over WSS; media over the one UDP port.
            snd, rx = await wss_call(c, server.wss, ctx, 440)
            sid = snd.stream_id
            await rx.wait_audio(1.5)
            assert_tone(rx, 440)

            # Speakers: plain HTTP on the audio port.
            status, headers, body = await raw_get_head(server.audio_port, f"/stream/{sid}.mp3")
            assert status.split()[1] == "200", status
            assert headers.get("content-type", "").startswith("audio/mpeg"), headers
            assert b"\xff" in body[:64], f"no MP3 frame sync near the start: {body[:16]!r}"
            cap = await ffmpeg_capture(f"{server.audio}/stream/latest.mp3", 2.5)
            samples, err = cap.samples, cap.stderr
            assert len(samples) >= 1.5 * 48000, f"only {len(samples) / 48000:.2f}s decoded; ffmpeg: {err[-400:]}"
            tail = samples[-48000:]
            assert rms(tail) > 300 and abs(dominant_frequency(tail) - 440) <= 15, dominant_frequency(tail)
            assert tone_purity(tail, 440) >= 0.7
            # MP3 behind TLS on the main port (served by the router, not handed over).
            cap = await ffmpeg_capture(f"{server.https}/stream/{sid}.mp3", 2.5)
            samples, err = cap.samples, cap.stderr
            assert len(samples) >= 1.5 * 48000, f"https: only {len(samples) / 48000:.2f}s decoded; ffmpeg: {err[-400:]}"
            tail = samples[-48000:]
            assert abs(dominant_frequency(tail) - 440) <= 15 and tone_purity(tail, 440) >= 0.7
            # Ogg/Opus behind TLS (the router's async listener, headers in its burst).
            cap = await ffmpeg_capture(f"{server.https}/stream/{sid}.ogg", 2.5)
            assert cap.seconds >= 1.5 and not cap.problems(), f"https ogg: {cap.seconds:.2f}s; {cap.stderr[-400:]}"
            tail = cap.samples[-48000:]
            assert abs(dominant_frequency(tail) - 440) <= 15 and tone_purity(tail, 440) >= 0.7
            st = await get(server.audio + "/stream/status")
            assert st.status == 200 and st.json().get("active_streams") == [sid], st.body[:200]
            h = await get(server.audio + "/health")
            assert h.status == 200 and h.json().get("senders") == 1 and h.json().get("receivers") == 1, h.body

            # The audio port serves nothing else: no page, no WebSocket, no CA.
            for path in ("/", "/ws", "/ca.crt", "/cards/voice-streaming-card.js"):
                r = await get(server.audio + path)
                assert r.status == 404, f"audio port {path} -> {r.status}"
            for path in ("/ws", "/"):
                try:
                    ws = await ws_connect(f"ws://127.0.0.1:{server.audio_port}{path}", open_timeout=5)
                except InvalidStatus as e:
                    assert e.response.status_code == 404, e.response.status_code
                else:
                    await ws.close()
                    raise AssertionError(f"WebSocket upgrade accepted on the audio port at {path}")
            # Whereas the HTTPS port serves the page and the same MP3.
            r = await get(server.https + "/", ctx)
            assert r.status == 200 and b"<" in r.body[:200], r.status

            await snd.stop_stream()
            await rx.wait_ended(10)
            h = await get(server.audio + "/health")
            deadline = time.monotonic() + 5
            while not health_idle(h.json()):
                assert time.monotonic() < deadline, h.json()
                await asyncio.sleep(0.1)
                h = await get(server.audio + "/health")

    run(main(), 60)


def test_tls_ca_reused_across_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "relay-data"

    async def ca_and_health(srv: TlsRelay) -> tuple[bytes, bytes]:
        pem = await fetch_ca(srv)
        r = await get(srv.https + "/health", trust_only(pem))
        assert r.status == 200, r.status
        return pem, (data_dir / "server.crt").read_bytes()

    first = start_tls(tmp_path, "first", data_dir)
    try:
        pem1, cert1 = run(ca_and_health(first), 20)
        files1 = {p.name: p.read_bytes() for p in data_dir.iterdir()}
    finally:
        _finish(first)
    assert "created a self-signed certificate authority" in first.log_text()

    second = start_tls(tmp_path, "second", data_dir)
    try:
        pem2, cert2 = run(ca_and_health(second), 20)
        # The old CA still verifies the restarted server: a phone needs to install it only once.
        r = run(get(second.https + "/health", trust_only(pem1)), 10)
        assert r.status == 200
    finally:
        _finish(second)
    assert pem2 == pem1, "the CA changed across a restart with the same --data-dir"
    assert cert2 == cert1, "the server certificate was re-issued although nothing changed"
    assert {p.name: p.read_bytes() for p in data_dir.iterdir()} == files1, "files in --data-dir changed"
    assert "created a self-signed certificate authority" not in second.log_text(), second.log_tail(20)
