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
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from browser import CHROMIUM, chromium_args
from clients import run, sine_wav_bytes
from relay_server import RelayServer
from test_limits import scrape, wait_metric
from test_web_page import PageWatch, page_site, wait_heard
from udp_blocked import PC_HOOK, chromium_wrapper, give, udp_blocked_user, user_dir

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


async def wait_tcp_peers(server: RelayServer, n: int) -> None:
    await wait_metric(server.http, lambda m: m.get(CONNECTED_TRANSPORT, transport="tcp") >= n,
                      f"{n} peers connected over TCP")
    m = await scrape(server.http)
    assert m.get(CONNECTED_TRANSPORT, transport="udp") == 0, "a peer connected over UDP though UDP is dropped"
    assert m.get("voice_relay_ice_tcp_connections") >= n, m.text


# ---------------------------------------------------------------------------
# Chromium
# ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def chromium_as_user(home: Path, wav: Path) -> AsyncIterator[Any]:
    """Chromium run as the UDP-blocked user (a persistent context in a profile it owns)."""
    from playwright.async_api import async_playwright

    exe = chromium_wrapper(home, CHROMIUM)
    profile = user_dir(home, "chromium-profile")
    async with async_playwright() as p:
        ctx = await asyncio.wait_for(
            p.chromium.launch_persistent_context(
                str(profile), executable_path=str(exe), headless=True, args=chromium_args(give(home, wav)),
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


def test_chromium_sends_and_listens_over_tcp_when_udp_is_blocked(server: RelayServer, wav: Path) -> None:
    async def body() -> None:
        with udp_blocked_user() as home:
            async with page_site(server) as url, chromium_as_user(home, wav) as ctx:
                a = await open_hooked(ctx, url(), "A(sender)")
                await a.page.click("#send-btn", timeout=5000)
                sid = await a.wait("voiceRelay.sendState === 'live' && voiceRelay.streamId", 25, "A live")
                b = await open_hooked(ctx, url(), "B(listener)")
                item = f'li.stream[data-stream="{sid}"]'
                await b.page.wait_for_selector(item, timeout=10000)
                await b.page.click(f"{item} button.listen", timeout=5000)
                await b.wait(f"voiceRelay.listenState === 'listening' && voiceRelay.listeningTo === '{sid}'", 20,
                             "B listening")
                heard = await wait_heard(b, TONE)
                print(f"\nChromium (UDP dropped) heard {heard:.1f} Hz")
                assert_tcp_pairs(await a.page.evaluate("window.__selectedPairs()"), server.port, "A")
                assert_tcp_pairs(await b.page.evaluate("window.__selectedPairs()"), server.port, "B")
                await wait_tcp_peers(server, 2)
                for w in (a, b):
                    assert not w.errors, f"{w.name} page errors: {w.errors}"

    run(body(), 120)

