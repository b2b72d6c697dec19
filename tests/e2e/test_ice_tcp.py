"""ICE-TCP on the HTTP port: browsers on a network that drops UDP still send and listen.

The browsers run as an unprivileged user whose UDP is dropped inside the test's network
namespace (``udp_blocked``), so the only way to the relay is our passive TCP candidate on the
HTTP port.  Chromium is driven by Playwright, Firefox ESR by puppeteer-core over WebDriver
BiDi (``node/firefox_relay_page.mjs``); both use the relay's own page, hear the tone, and show
in ``getStats`` a selected candidate pair that is TCP.  Clients with UDP keep using UDP, and
bad input on the shared port is closed without disturbing a call or HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import re
import socket
import struct
import time
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from browser import CHROMIUM, chromium_args
from clients import Clients, ToneReceiver, ToneSender, assert_tone, http, run, sine_wav_bytes
from relay_server import RelayServer
from conftest import _finish
from test_limits import scrape, wait_metric
from test_mp3 import assert_clean_tone, ffmpeg_capture
from test_tls import TlsRelay, start_tls
from test_web_page import PageWatch, page_site, wait_heard
from udp_blocked import PC_HOOK, as_user, chromium_wrapper, give, udp_blocked_user, user_dir

NODE_DIR = Path(__file__).resolve().parent / "node"
FIREFOX = "/usr/bin/firefox-esr"
TONE = 440.0
CONNECTED_TRANSPORT = "voice_relay_peers_connected_transport_total"


@pytest.fixture
def wav(tmp_path: Path) -> Path:
    path = tmp_path / "tone440.wav"
    path.write_bytes(sine_wav_bytes(TONE, 4.0))
    return path


def assert_tcp_pairs(pairs: list[Any], port: int, who: str) -> None:
    """Every connected peer connection of a page uses a TCP pair to the relay's HTTP port."""
    assert pairs, f"{who}: no connected peer connection"
    for p in pairs:
        assert p is not None, f"{who}: no selected candidate pair in getStats: {pairs}"
        assert (p["local"], p["remote"]) == ("tcp", "tcp"), f"{who}: selected pair not TCP: {pairs}"
        assert p["remotePort"] == port, f"{who}: pair not to the HTTP port {port}: {pairs}"


async def wait_tcp_peers(server: RelayServer, n: int, still_open: bool = True) -> None:
    await wait_metric(server.http, lambda m: m.get(CONNECTED_TRANSPORT, transport="tcp") >= n,
                      f"{n} peers connected over TCP")
    m = await scrape(server.http)
    assert m.get(CONNECTED_TRANSPORT, transport="udp") == 0, "a peer connected over UDP though UDP is dropped"
    if still_open:
        assert m.get("voice_relay_ice_tcp_connections") >= n, m.text


# ---------------------------------------------------------------------------
# Chromium
# ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def chromium_as_user(home: Path, wav: Path, extra_args: tuple[str, ...] = ()) -> AsyncIterator[Any]:
    """Chromium run as the UDP-blocked user (a persistent context in a profile it owns)."""
    from playwright.async_api import async_playwright

    exe = chromium_wrapper(home, CHROMIUM)
    profile = user_dir(home, "chromium-profile")
    async with async_playwright() as p:
        ctx = await asyncio.wait_for(
            p.chromium.launch_persistent_context(
                str(profile), executable_path=str(exe), headless=True, args=[*chromium_args(give(home, wav)), *extra_args],
                viewport={"width": 1000, "height": 760}, timeout=30000,
            ),
            40,
        )
        try:
            yield ctx
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ctx.close(), 10)


async def open_hooked(ctx: Any, url: str, name: str) -> PageWatch:
    page = await ctx.new_page()
    await page.add_init_script(PC_HOOK)
    w = PageWatch(page, name)
    await page.goto(url, timeout=15000)
    await w.wait("!!window.voiceRelay && voiceRelay.serverState === 'connected'", 10, f"{name} connected")
    return w


async def send_and_listen(ctx: Any, url: str, port: int, who: str) -> None:
    """Page A sends, page B listens to it and hears the tone; both over TCP to ``port``."""
    a = await open_hooked(ctx, url, "A(sender)")
    await a.page.click("#send-btn", timeout=5000)
    sid = await a.wait("voiceRelay.sendState === 'live' && voiceRelay.streamId", 25, "A live")
    b = await open_hooked(ctx, url, "B(listener)")
    item = f'li.stream[data-stream="{sid}"]'
    await b.page.wait_for_selector(item, timeout=10000)
    await b.page.click(f"{item} button.listen", timeout=5000)
    await b.wait(f"voiceRelay.listenState === 'listening' && voiceRelay.listeningTo === '{sid}'", 20,
                 "B listening")
    heard = await wait_heard(b, TONE)
    print(f"\n{who} (UDP dropped) heard {heard:.1f} Hz")
    assert_tcp_pairs(await a.page.evaluate("window.__selectedPairs()"), port, "A")
    assert_tcp_pairs(await b.page.evaluate("window.__selectedPairs()"), port, "B")
    for w in (a, b):
        assert not w.errors, f"{w.name} page errors: {w.errors}"


def test_chromium_sends_and_listens_over_tcp_when_udp_is_blocked(server: RelayServer, wav: Path) -> None:
    async def body() -> None:
        with udp_blocked_user() as home:
            async with page_site(server) as url, chromium_as_user(home, wav) as ctx:
                await send_and_listen(ctx, url(), server.port, "Chromium")
                await wait_tcp_peers(server, 2)

    run(body(), 120)


@pytest.fixture
def tls_server(tmp_path: Path):  # noqa: ANN201
    srv = start_tls(tmp_path, "server", tmp_path / "relay-data")
    try:
        yield srv
    finally:
        _finish(srv)


def test_chromium_over_tcp_on_the_https_port(tls_server: TlsRelay, wav: Path) -> None:
    """With TLS on, the same port tells a TLS ClientHello from ICE-TCP."""

    async def body() -> None:
        with udp_blocked_user() as home:
            async with chromium_as_user(home, wav, ("--ignore-certificate-errors",)) as ctx:
                await send_and_listen(ctx, tls_server.https + "/", tls_server.port, "Chromium on HTTPS")

    run(body(), 120)


# ---------------------------------------------------------------------------
# Firefox ESR
# ---------------------------------------------------------------------------

# Firefox's fake microphone (media.navigator.streams.fake) is a 1 kHz tone.
FIREFOX_TONE = 1000.0
# How long page B listens (and the stream stays live) in the Firefox script.
FIREFOX_LISTEN_MS = 7000


async def firefox_pages(server: RelayServer, home: Path) -> dict:
    """Runs the Firefox script as the user; meanwhile decodes the relay's MP3 of the stream
    Firefox sends (Firefox headless runs no Web Audio graph, so its page cannot measure)."""
    cfg = {"url": server.http + "/", "firefox": FIREFOX, "hook": PC_HOOK, "listenMs": FIREFOX_LISTEN_MS}
    argv = as_user(["node", str(NODE_DIR / "firefox_relay_page.mjs"), json.dumps(cfg)], home)
    proc = await asyncio.create_subprocess_exec(*argv, cwd=NODE_DIR, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    capture = None
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and proc.returncode is None:
            live = (await http("GET", server.http + "/health")).json()["active_streams"]
            if live:
                capture = await ffmpeg_capture(f"{server.http}/stream/{live[0]}.mp3", 4.0)
                break
            await asyncio.sleep(0.2)
        out, err = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        if proc.returncode is None:
            proc.kill()
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    assert lines, f"no result from the Firefox script (exit {proc.returncode})\n{out.decode()}\n{err.decode()[-3000:]}"
    result = json.loads(lines[-1])
    assert capture is not None, f"Firefox never went live: {result}"
    result["capture"] = capture
    return result


def test_firefox_sends_and_listens_over_tcp_when_udp_is_blocked(server: RelayServer) -> None:
    assert (NODE_DIR / "node_modules" / "puppeteer-core").is_dir(), "run scripts/test.sh --setup-only (npm ci)"
    with udp_blocked_user() as home:
        result = run(firefox_pages(server, home), 150)
    assert not result["errors"], result
    # What Firefox sent over TCP is the tone (decoded from the relay's MP3).
    assert_clean_tone(result["capture"], FIREFOX_TONE, "MP3 of Firefox's stream")
    # What Firefox received over TCP: packets kept arriving, carrying the sender's audio level.
    before, after = result["reception"]["packets"]
    assert after - before >= FIREFOX_LISTEN_MS / 20 / 2, f"Firefox B received too few packets: {result['reception']}"
    assert max(result["reception"]["levels"], default=0) > 0.01, f"no audio level at B: {result['reception']}"
    print(f"\nFirefox (UDP dropped): B got {after - before} packets in {FIREFOX_LISTEN_MS} ms; "
          f"page mic level {result['micLevel']} (no Web Audio in headless Firefox)")
    assert_tcp_pairs(result["pairsA"], server.port, "Firefox A")
    assert_tcp_pairs(result["pairsB"], server.port, "Firefox B")
    run(wait_tcp_peers(server, 2, still_open=False), 10)  # the script closed Firefox


# ---------------------------------------------------------------------------
# Clients that reach us over UDP keep using it
# ---------------------------------------------------------------------------


def candidate_priorities(sdp: str) -> dict[str, int]:
    """{transport: priority} of the host candidates in an SDP."""
    out = {}
    for m in re.finditer(r"^a=candidate:\S+ \d+ (\w+) (\d+) \S+ \d+ typ host(.*)$", sdp, re.M):
        out[m.group(1).lower()] = int(m.group(2))
        if m.group(1).lower() == "tcp":
            assert "tcptype passive" in m.group(3), m.group(0)
    return out


def test_candidate_free_clients_still_connect_over_udp(server: RelayServer) -> None:
    """The original cards' habit (no candidates in their SDP), with UDP open: the relay's
    SDP offers the TCP candidate too, at a lower priority, and both peers connect over UDP."""

    async def body() -> None:
        async with Clients(server.ws, server.http) as c:
            snd = c.track(ToneSender(await c.signal("card_sender"), 440, strip_candidates=True))
            await snd.start(timeout=15)
            rx = c.track(ToneReceiver(await c.signal("card_receiver"), strip_candidates=True))
            await rx.start(snd.stream_id, timeout=15)
            await rx.wait_audio(2.0)
            assert_tone(rx, 440)
            for sdp in (snd.answer_sdp or "", rx.offer_sdp or ""):
                prio = candidate_priorities(sdp)
                assert set(prio) == {"udp", "tcp"}, sdp
                assert prio["udp"] > prio["tcp"], prio
            await wait_metric(server.http, lambda m: m.get(CONNECTED_TRANSPORT, transport="udp") >= 2,
                              "2 peers connected over UDP")
            m = await scrape(server.http)
            assert m.get(CONNECTED_TRANSPORT, transport="tcp") == 0, m.text
            assert m.get("voice_relay_ice_tcp_connections") == 0, m.text

    run(body(), 60)


# ---------------------------------------------------------------------------
# Bad input on the shared TCP port
# ---------------------------------------------------------------------------


def stun_check(username: str) -> bytes:
    """A STUN binding request as a browser's ICE check (RFC 5389/8445), keyed with a made-up
    password: USERNAME, PRIORITY, MESSAGE-INTEGRITY."""

    def attr(kind: int, value: bytes) -> bytes:
        return struct.pack("!HH", kind, len(value)) + value + b"\0" * (-len(value) % 4)

    body = attr(0x0006, username.encode()) + attr(0x0024, struct.pack("!I", 1853817087))
    tid = os.urandom(12)
    head = struct.pack("!HHI", 0x0001, len(body) + 24, 0x2112A442) + tid
    mac = hmac.new(b"not-the-password", head + body, hashlib.sha1).digest()
    return head + body + attr(0x0008, mac)


def framed(packet: bytes) -> bytes:
    return struct.pack("!H", len(packet)) + packet


def relay_ufrag(sdp: str) -> str:
    found = re.search(r"^a=ice-ufrag:(\S+)", sdp, re.M)
    assert found, sdp
    return found.group(1)


async def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closes ``sock`` within ``timeout`` (anything it sends is skipped)."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), max(0.05, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            return False
        except (ConnectionResetError, BrokenPipeError):
            return True
        if not data:
            return True
    return False


async def tcp_connect(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


IDLE_CONNECTIONS = 500
# The demux gives a connection this long to send its first bytes (src/http/demux.rs).
FIRST_BYTES_TIMEOUT = 10.0
# A connection naming an unknown ufrag waits this long for its peer (src/relay/tcp.rs).
WAIT_FOR_PEER = 3.0


def test_bad_input_on_the_shared_port_is_closed_and_disturbs_nothing(server: RelayServer) -> None:
    async def body() -> None:
        async with Clients(server.ws, server.http) as c:
            snd = await c.sender(440)
            rx = await c.receiver(snd.stream_id)
            await rx.wait_audio(1.0)
            loop = asyncio.get_running_loop()
            idle = [await tcp_connect(server.port) for _ in range(IDLE_CONNECTIONS)]
            try:
                # A first frame whose length is over the limit: not ICE, HTTP answers it.
                over = await tcp_connect(server.port)
                await loop.sock_sendall(over, struct.pack("!H", 0xFFFF) + stun_check("x:y")[:8] + b"\0" * 64)
                # A check naming the live receiver's ufrag, then an oversize frame: the relay closes it.
                oversize = await tcp_connect(server.port)
                check = stun_check(f"{relay_ufrag(rx.offer_sdp or '')}:intruder")
                await loop.sock_sendall(oversize, framed(check))
                await asyncio.sleep(0.3)
                await loop.sock_sendall(oversize, struct.pack("!H", 4000) + b"\0" * 100)
                # A check for a ufrag no peer has.
                unknown = await tcp_connect(server.port)
                await loop.sock_sendall(unknown, framed(stun_check("nosuchufrag:intruder")))

                assert await closed_by_server(over, 5), "an oversize first frame was not closed"
                assert await closed_by_server(oversize, 5), "an oversize frame was not closed"
                assert await closed_by_server(unknown, WAIT_FOR_PEER + 5), "an unknown ufrag was not closed"
                # HTTP on the same port answers while the idle connections are held.
                assert (await http("GET", server.http + "/health")).status == 200
                t = time.monotonic()
                closed = await asyncio.gather(*(closed_by_server(s, FIRST_BYTES_TIMEOUT + 10) for s in idle))
                assert all(closed), f"{closed.count(False)} of {IDLE_CONNECTIONS} idle connections left open"
                print(f"\n{IDLE_CONNECTIONS} idle connections closed after {time.monotonic() - t:.1f} s more")
            finally:
                for s in idle:
                    s.close()
            m = await scrape(server.http)
            assert m.get("voice_relay_ice_tcp_closed_total", reason="frame too long") == 1, m.text
            assert m.get("voice_relay_ice_tcp_closed_total", reason="unknown ufrag") == 1, m.text
            assert m.get("voice_relay_tcp_first_bytes_total", kind="silent") == IDLE_CONNECTIONS, m.text
            assert m.get("voice_relay_ice_tcp_connections") == 0, m.text
            # The call went on: the receiver kept getting the tone, the sender's stream is live.
            t = time.monotonic()
            await rx.sink.wait_more(2.0, 6)
            assert rx.sink.frames_since(t) >= 50
            assert_tone(rx, 440)
            h = await c.health()
            assert (h["senders"], h["receivers"]) == (1, 1), h
            assert m.get("voice_relay_peers_closed_total", reason="ICE-TCP connection lost") == 0, m.text

    run(body(), 90)
