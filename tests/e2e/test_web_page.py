"""The relay's own web page (assets/index.html + app.js + app.css) in Chromium.

Page A sends its fake microphone (a 440 Hz tone); page B, in another browser
context, sees the stream listed, listens, and measures the tone with WebAudio.
Screenshots of both states go to docs/screenshots/.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest

from browser import chromium
from clients import http, run, sine_wav_bytes
from relay_server import REPO_ROOT, RelayServer, free_port

ASSETS = REPO_ROOT / "assets"
SHOTS = REPO_ROOT / "docs" / "screenshots"
TONE = 440.0
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1100, "height": 760}


@pytest.fixture(scope="module")
def wav440(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wav") / "tone440.wav"
    path.write_bytes(sine_wav_bytes(TONE, 4.0))
    return path


@contextlib.asynccontextmanager
async def page_site(server: RelayServer) -> AsyncIterator[Callable[..., str]]:
    """Yields url(**query) for the page as the relay serves it at /."""
    for path, marker in (("/", b'src="app.js"'), ("/app.js", b"window.voiceRelay"), ("/app.css", b"--accent")):
        r = await http("GET", server.http + path, timeout=5)
        assert r.status == 200, f"relay: GET {path} -> {r.status}"
        assert marker in r.body, f"relay: GET {path} is not the file in assets/ (rebuild the binary?)"
        disk = (ASSETS / ("index.html" if path == "/" else path.lstrip("/"))).read_bytes()
        assert r.body == disk, f"relay: GET {path} differs from assets/ (stale binary? rebuild it)"

    def url(**q: str) -> str:
        return server.http + "/" + (("?" + urllib.parse.urlencode(q)) if q else "")

    yield url


class PageWatch:
    """A page plus the JavaScript errors and console lines it produced."""

    def __init__(self, page: Any, name: str):
        self.page = page
        self.name = name
        self.errors: list[str] = []
        self.console: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("console", lambda m: self.console.append(f"[{m.type}] {m.text}"))

    async def state(self) -> dict:
        return await self.page.evaluate(
            "() => { const v = window.voiceRelay; if (!v) return null; return {server: v.serverState,"
            " send: v.sendState, listen: v.listenState, streamId: v.streamId, streams: v.streams,"
            " listeningTo: v.listeningTo, notice: v.notice, errors: v.errors, messages: v.messages.slice(-25)} }"
        )

    async def wait(self, js: str, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            v = await self.page.evaluate(js)
            if v:
                return v
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: timed out ({timeout}s) waiting for {what}; state {await self.state()}; "
                    f"page errors {self.errors}; console {self.console[-10:]}"
                )
            await asyncio.sleep(0.1)


async def open_page(browser: Any, url: str, name: str, viewport: dict, init_script: str | None = None) -> PageWatch:
    ctx = await browser.new_context(viewport=viewport, device_scale_factor=1)
    page = await ctx.new_page()
    if init_script:
        await page.add_init_script(init_script)
    w = PageWatch(page, name)
    await page.goto(url, timeout=15000)
    await w.wait("!!window.voiceRelay", 10, "window.voiceRelay")
    return w


async def wait_heard(w: PageWatch, freq: float, tol: float = 15.0, timeout: float = 20.0) -> float:
    """listenFrequency() within tol of freq, with sound, on 3 consecutive reads."""
    deadline = time.monotonic() + timeout
    good = 0
    last: Any = None
    while time.monotonic() < deadline:
        last = await w.page.evaluate("[window.voiceRelay.listenFrequency(), window.voiceRelay.listenLevel()]")
        f, level = last
        if f is not None and level > 0.005 and abs(f - freq) <= tol:
            good += 1
            if good >= 3:
                return f
        else:
            good = 0
        await asyncio.sleep(0.3)
    raise AssertionError(f"{w.name} never heard {freq} Hz: last [freq, rms] {last}; state {await w.state()}")


async def shot(w: PageWatch, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / name
    await w.page.wait_for_timeout(400)  # let meters and transitions settle
    await w.page.screenshot(path=str(path), full_page=True, timeout=10000)
    return path


def test_send_listen_stop(server: RelayServer, wav440: Path) -> None:
    async def body() -> None:
        async with page_site(server) as url, chromium(wav440) as browser:
            b = await open_page(browser, url(), "B(listener)", DESKTOP)
            await b.wait("voiceRelay.serverState === 'connected'", 10, "B connected")
            assert await b.page.evaluate("voiceRelay.streams") == []
            assert await b.page.is_visible("#stream-empty")

            a = await open_page(browser, url(), "A(sender)", PHONE)
            await a.wait("voiceRelay.serverState === 'connected'", 10, "A connected")
            await a.page.click("#send-btn", timeout=5000)
            sid = await a.wait("voiceRelay.sendState === 'live' && voiceRelay.streamId", 20, "A live")
            assert sid.startswith("stream_"), sid
            mp3 = await a.page.input_value("#mp3-url")
            assert mp3 == f"{server.http}/stream/{sid}.mp3", mp3
            await a.wait("voiceRelay.micLevel() > 0.01", 10, "A's microphone level")
            await a.wait(f"Math.abs(voiceRelay.micFrequency() - {TONE}) < 15", 10, "A's mic tone")

            # B lists the stream without asking (stream_available broadcast).
            await b.wait(f"voiceRelay.streams.includes('{sid}')", 10, "B lists the stream")
            item = f'li.stream[data-stream="{sid}"]'
            await b.page.wait_for_selector(item, timeout=5000)
            assert not await b.page.is_visible("#stream-empty")
            await shot(b, "web-idle-stream-listed.png")

            # B listens and hears the tone.
            await b.page.click(f"{item} button.listen", timeout=5000)
            await b.wait(f"voiceRelay.listenState === 'listening' && voiceRelay.listeningTo === '{sid}'", 15,
                         "B listening")
            heard = await wait_heard(b, TONE)
            print(f"\nB heard {heard:.1f} Hz")
            assert await b.page.inner_text(f"{item} button.listen") == "Stop"
            # A also lists its own stream, marked as its own.
            await a.wait(f"!!document.querySelector('li.stream[data-stream=\"{sid}\"] .stream-tag')", 5,
                         "A lists its own stream")
            await shot(b, "web-listening.png")
            # A listens to itself too: the sending + listening state, on a phone screen.
            await a.page.click(f'li.stream[data-stream="{sid}"] button.listen', timeout=5000)
            await wait_heard(a, TONE)
            await shot(a, "web-sending-listening-phone.png")

            h = (await http("GET", server.http + "/health")).json()
            assert h["senders"] == 1 and h["receivers"] == 2, h

            # A stops: B's list drops the stream and B says so.
            await a.page.click("#stop-btn", timeout=5000)
            await a.wait("voiceRelay.sendState === 'idle' && voiceRelay.streamId === null", 10, "A idle")
            await b.wait(f"!voiceRelay.streams.includes('{sid}')", 10, "B drops the stream")
            await b.wait("voiceRelay.listenState === 'idle' && voiceRelay.listeningTo === null", 10, "B idle")
            text = await b.page.inner_text("#listen-status")
            assert "ended" in text, text
            assert await b.page.is_visible("#stream-empty")
            assert await a.page.is_visible("#send-btn")
            await a.wait("voiceRelay.listenState === 'idle' && voiceRelay.streams.length === 0", 10, "A idle")
            # The microphone is released.
            assert await a.page.evaluate("voiceRelay.micLevel()") == 0

            for w in (a, b):
                assert not w.errors, f"{w.name} page errors: {w.errors}"
                st = await w.state()
                assert not [e for e in st["errors"] if "peer connection failed" in e], st

    run(body(), 120)


def test_unreachable_server_countdown(server: RelayServer, wav440: Path) -> None:
    """With the signalling server down the page says so and counts down to the next try."""
    dead = free_port()

    async def body() -> None:
        async with page_site(server) as url, chromium(wav440) as browser:
            w = await open_page(browser, url(server=f"127.0.0.1:{dead}"), "page", DESKTOP)
            assert await w.page.evaluate("voiceRelay.endpoints.ws") == f"ws://127.0.0.1:{dead}/ws"
            await w.wait("voiceRelay.serverState === 'waiting'", 10, "waiting to reconnect")
            notice = await w.page.inner_text("#notice-text")
            assert "unreachable" in notice and "Retrying in" in notice, notice
            pill = await w.page.inner_text("#server-pill")
            assert "retry in" in pill, pill
            # The backoff grows: after a few failures the countdown exceeds 1 s.
            await w.wait("voiceRelay.messages.length >= 0 && /retry in ([3-9]|\\d\\d) s/.test("
                         "document.getElementById('server-pill').textContent)", 15, "backoff to grow")
            await shot(w, "web-server-unreachable.png")
            assert not w.errors, w.errors

    run(body(), 60)


def test_reconnects_after_server_restart(server: RelayServer, wav440: Path) -> None:
    """The listener socket comes back by itself when the relay restarts on the same port."""

    async def body() -> None:
        async with page_site(server) as url, chromium(wav440) as browser:
            w = await open_page(browser, url(server=f"127.0.0.1:{server.port}"), "page", DESKTOP)
            await w.wait("voiceRelay.serverState === 'connected'", 10, "connected")
            await asyncio.to_thread(server.terminate)
            await w.wait("voiceRelay.serverState === 'waiting'", 10, "the page to notice")
            await asyncio.to_thread(server.start)
            await w.wait("voiceRelay.serverState === 'connected'", 20, "the page to reconnect")
            await w.wait("voiceRelay.notice === null", 5, "the unreachable notice to clear")
            assert not w.errors, w.errors

    run(body(), 90)


def test_microphone_denied_message(server: RelayServer, wav440: Path) -> None:
    deny = (
        "navigator.mediaDevices.getUserMedia = () => Promise.reject("
        "new DOMException('Permission denied', 'NotAllowedError'));"
    )

    async def body() -> None:
        async with page_site(server) as url, chromium(wav440) as browser:
            w = await open_page(browser, url(), "page", PHONE, init_script=deny)
            await w.wait("voiceRelay.serverState === 'connected'", 10, "connected")
            await w.page.click("#send-btn", timeout=5000)
            await w.wait("voiceRelay.notice && /denied/.test(voiceRelay.notice)", 5, "a denied notice")
            assert await w.page.evaluate("voiceRelay.sendState") == "idle"
            assert await w.page.is_visible("#notice")
            await shot(w, "web-mic-denied-phone.png")
            assert (await http("GET", server.http + "/health")).json()["senders"] == 0

    run(body(), 60)


def test_insecure_context_message(server: RelayServer, wav440: Path) -> None:
    insecure = (
        "Object.defineProperty(window, 'isSecureContext', {get: () => false, configurable: true});"
        "Object.defineProperty(Navigator.prototype, 'mediaDevices', {get: () => undefined, configurable: true});"
    )

    async def body() -> None:
        async with page_site(server) as url, chromium(wav440) as browser:
            w = await open_page(browser, url(), "page", PHONE, init_script=insecure)
            await w.wait("voiceRelay.notice && /HTTPS/.test(voiceRelay.notice)", 5, "an HTTPS notice")
            assert "localhost" in await w.page.inner_text("#notice-text")
            # Listening still works: the list is there.
            await w.wait("voiceRelay.serverState === 'connected'", 10, "connected")

    run(body(), 60)


def test_opus_fec_munging(server: RelayServer, wav440: Path) -> None:
    sdp = (
        "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0 111 8\r\na=rtpmap:0 PCMU/8000\r\n"
        "a=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10\r\na=rtpmap:8 PCMA/8000\r\n"
    )

    async def body() -> None:
        async with page_site(server) as url, chromium(wav440) as browser:
            w = await open_page(browser, url(), "page", DESKTOP)
            out = await w.page.evaluate("(s) => voiceRelay.preferOpusFec(s)", sdp)
            assert "a=fmtp:111 minptime=10;useinbandfec=1\r\n" in out, out
            assert "m=audio 9 UDP/TLS/RTP/SAVPF 111 0 8\r\n" in out, out
            bare = sdp.replace("a=fmtp:111 minptime=10\r\n", "")
            out2 = await w.page.evaluate("(s) => voiceRelay.preferOpusFec(s)", bare)
            assert "a=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;useinbandfec=1\r\n" in out2, out2

    run(body(), 60)
