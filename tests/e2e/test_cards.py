"""The Home Assistant cards (assets/cards/voice-streaming-card.js) in Chromium.

pages/cards_test.html loads the card file from the relay, gives the cards a
stub ``hass`` that records service calls, and mounts a sending card and two
receiving cards (auto_play and manual) with ``server_url: 127.0.0.1:PORT`` —
no path, so they signal on ``/`` like the documented configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from typing import Any, AsyncIterator

from browser import chromium, static_pages
from clients import Clients, ToneReceiver, assert_tone, http, run
from relay_server import REPO_ROOT, RelayServer

CARD_FILE = REPO_ROOT / "assets" / "cards" / "voice-streaming-card.js"
SHOTS = REPO_ROOT / "docs" / "screenshots"


@contextlib.asynccontextmanager
async def card_source(server: RelayServer) -> AsyncIterator[str]:
    """URL of the card file as the relay serves it (also at the old /voice-streaming-card.js)."""
    disk = CARD_FILE.read_bytes()
    for path in ("/cards/voice-streaming-card.js", "/voice-streaming-card.js"):
        r = await http("GET", server.http + path, timeout=5)
        assert r.status == 200, f"relay: GET {path} -> {r.status}"
        assert "javascript" in r.headers.get("content-type", ""), r.headers
        assert r.body == disk, f"relay: GET {path} differs from assets/cards/ (stale binary? rebuild it)"
    yield server.http + "/cards/voice-streaming-card.js"


class Bench:
    def __init__(self, page: Any):
        self.page = page
        self.page_errors: list[str] = []
        self.console: list[str] = []
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        page.on("console", lambda m: self.console.append(f"[{m.type}] {m.text}"))

    async def debug(self) -> dict:
        return await self.page.evaluate(
            "() => ({send: cardsTest.send && cardsTest.send.debugState(),"
            " auto: cardsTest.auto && cardsTest.auto.debugState(),"
            " manual: cardsTest.manual && cardsTest.manual.debugState(),"
            " calls: cardsTest.hassCalls, errors: cardsTest.errors})"
        )

    async def wait(self, js: str, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            v = await self.page.evaluate(js)
            if v:
                return v
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out ({timeout}s) waiting for {what}; cards {await self.debug()}; "
                    f"page errors {self.page_errors}; console {self.console[-10:]}"
                )
            await asyncio.sleep(0.1)

    async def wait_heard(self, card: str, freq: float, tol: float = 15.0, timeout: float = 20.0) -> float:
        deadline = time.monotonic() + timeout
        good = 0
        last: Any = None
        while time.monotonic() < deadline:
            last = await self.page.evaluate(
                f"[cardsTest.{card}.listenFrequency(), cardsTest.{card}.listenLevel()]"
            )
            f, level = last
            if f is not None and level > 0.005 and abs(f - freq) <= tol:
                good += 1
                if good >= 3:
                    return f
            else:
                good = 0
            await asyncio.sleep(0.3)
        raise AssertionError(f"{card} card never heard {freq} Hz: last {last}; cards {await self.debug()}")


async def open_cards(browser: Any, base: str, cards_js: str, server_url: str, stream_url: str) -> Bench:
    """The cards test page in a new context, once the card file has loaded."""
    page = await (await browser.new_context()).new_page()
    bench = Bench(page)
    query = urllib.parse.urlencode({"cards": cards_js, "server": server_url, "stream_url": stream_url})
    await page.goto(f"{base}/cards_test.html?{query}", timeout=15000)
    await bench.wait("cardsTest.loaded", 10, "the cards to load")
    return bench


def test_cards_send_and_receive(server: RelayServer, tone_wav) -> None:  # noqa: ANN001
    wav, freq = tone_wav
    stream_url = f"{server.http}/stream/latest.mp3"

    async def body() -> None:
        async with (
            Clients(server.ws, server.http) as c,
            card_source(server) as cards_js,
            static_pages() as base,
            chromium(wav) as browser,
        ):
            ctx = await browser.new_context(viewport={"width": 1000, "height": 700}, device_scale_factor=1)
            page = await ctx.new_page()
            bench = Bench(page)
            query = urllib.parse.urlencode(
                {"cards": cards_js, "server": f"127.0.0.1:{server.port}", "stream_url": stream_url,
                 "player": "media_player.kitchen"}
            )
            await page.goto(f"{base}/cards_test.html?{query}", timeout=15000)
            await bench.wait("cardsTest.loaded || cardsTest.loadError", 10, "the cards to load")
            assert await page.evaluate("cardsTest.loadError") is None

            # Lovelace contract: registration, sizes, config validation, addresses.
            reg = await page.evaluate("window.customCards.map(c => [c.type, c.name, !!c.description])")
            assert ["voice-sending-card", "Voice Sending Card", True] in reg, reg
            assert ["voice-receiving-card", "Voice Receiving Card", True] in reg, reg
            cfg = await page.evaluate("cardsTest.configErrors")
            assert cfg["fine"] == "ok", cfg
            for k in ("nullConfig", "badPlayer", "numberUrl", "badAutoPlay", "badStreamUrl"):
                assert cfg[k].startswith("throws"), (k, cfg)
            urls = await page.evaluate("cardsTest.urls")
            host = urllib.parse.urlparse(base).netloc
            assert urls == {
                "127.0.0.1:8443": "ws://127.0.0.1:8443/",
                "127.0.0.1:8443/ws": "ws://127.0.0.1:8443/ws",
                "127.0.0.1:8443/custom/path?token=1": "ws://127.0.0.1:8443/custom/path",
                "": f"ws://{host}/ws",
                "homeassistant.local:8443": "ws://homeassistant.local:8443/",
            }, urls
            assert await page.evaluate("cardsTest.defaultStreamUrl") == \
                "http://homeassistant.local:8443/stream/latest.mp3"
            sizes = await page.evaluate("cardsTest.sizes")
            assert all(isinstance(s, int) and s > 0 for s in sizes), sizes

            # Both receiving cards connect on "/" and list nothing yet.
            await bench.wait("cardsTest.auto.debugState().status === 'connected' && "
                             "cardsTest.manual.debugState().status === 'connected'", 10, "receivers connected")
            st = await bench.debug()
            assert st["auto"]["wsUrl"] == f"ws://127.0.0.1:{server.port}/", st["auto"]
            assert st["auto"]["streams"] == [] and st["calls"] == []
            # The first poll and the one 0.5 s later.
            await bench.wait("cardsTest.auto.debugState().log.filter(e => e.out === 'get_available_streams')"
                             ".length >= 2", 5, "two get_available_streams polls")

            # Talk.
            await page.click("#send >> button.talk", timeout=5000)
            await bench.wait("/connected/i.test(cardsTest.send.shadowRoot.querySelector('.pill').textContent)",
                             10, "the sending card to show connected")
            calls = await page.evaluate("cardsTest.hassCalls")
            assert len(calls) == 1, calls
            assert calls[0]["domain"] == "media_player" and calls[0]["service"] == "play_media", calls
            assert calls[0]["data"] == {
                "entity_id": "media_player.kitchen",
                "media_content_id": stream_url,
                "media_content_type": "music",
            }, calls
            await bench.wait("cardsTest.send.debugState().status === 'streaming'", 15, "the sending card live")
            sid = await bench.wait("cardsTest.send.debugState().streamId", 5, "a stream id")
            await bench.wait("cardsTest.send.debugState().micLevel > 0.01", 5, "the sending card's level meter")

            # The auto_play card follows the new stream and hears the tone.
            await bench.wait(f"cardsTest.auto.debugState().current === '{sid}'", 15, "auto card receiving")
            heard = await bench.wait_heard("auto", freq)
            print(f"\nauto_play card heard {heard:.1f} Hz")

            # The manual card lists it; the user picks it.
            await bench.wait(f"cardsTest.manual.debugState().streams.includes('{sid}')", 10, "manual card list")
            assert (await bench.debug())["manual"]["current"] is None
            await page.click(f'#manual >> li[data-stream="{sid}"] button.pick', timeout=5000)
            heard = await bench.wait_heard("manual", freq)
            print(f"manual card heard {heard:.1f} Hz")

            # An aiortc receiver hears the card's stream as well.
            s = await c.signal("aiortc_rx")
            rx = c.track(ToneReceiver(s))
            await rx.start(sid, timeout=15)
            await rx.wait_audio(2.5, 15)
            assert_tone(rx, freq)

            # The configured stream_url plays the card's stream as MP3.
            r = await http("GET", stream_url, timeout=8, max_body=4096)
            assert r.status == 200 and r.headers.get("content-type", "").startswith("audio/mpeg"), \
                (r.status, r.headers)

            SHOTS.mkdir(parents=True, exist_ok=True)
            await page.wait_for_timeout(300)
            await page.screenshot(path=str(SHOTS / "cards-talking-listening.png"), full_page=True, timeout=10000)

            h = (await http("GET", server.http + "/health")).json()
            assert h["senders"] == 1 and h["receivers"] == 3, h

            # Stop talking: the receivers notice; play_media was called exactly once.
            await page.click("#send >> button.talk", timeout=5000)
            await bench.wait("cardsTest.send.debugState().status === 'idle' && "
                             "cardsTest.send.debugState().micLevel === 0", 5, "the sending card idle")
            await bench.wait(f"!cardsTest.auto.debugState().streams.includes('{sid}') && "
                             "cardsTest.auto.debugState().current === null && "
                             "cardsTest.manual.debugState().current === null", 10, "receivers to drop the stream")
            await rx.wait_ended(10)
            assert len(await page.evaluate("cardsTest.hassCalls")) == 1

            st = await bench.debug()
            assert not bench.page_errors and not st["errors"], (bench.page_errors, st["errors"])
            for card in ("send", "auto", "manual"):
                assert not st[card]["errors"], (card, st[card])
            # Only JSON text frames, only protocol message types.
            sent = {e["out"] for card in ("send", "auto", "manual") for e in st[card]["log"] if "out" in e}
            assert sent <= {"start_sending", "webrtc_offer", "stop_stream", "get_available_streams",
                            "start_receiving", "webrtc_answer"}, sent

    run(body(), 150)


def test_receiving_card_shows_errors_and_keeps_working(server: RelayServer, tone_wav) -> None:  # noqa: ANN001
    """A server error (unknown stream) is shown on the card; the card keeps polling and still plays."""
    wav, _ = tone_wav

    async def body() -> None:
        async with (
            Clients(server.ws, server.http) as c,
            card_source(server) as cards_js,
            static_pages() as base,
            chromium(wav) as browser,
        ):
            bench = await open_cards(browser, base, cards_js, f"127.0.0.1:{server.port}/ws",
                                     f"{server.http}/stream/latest.mp3")
            page = bench.page
            await bench.wait("cardsTest.manual.debugState().status === 'connected'", 10, "manual card connected")
            assert (await bench.debug())["manual"]["wsUrl"] == f"ws://127.0.0.1:{server.port}/ws"
            await page.evaluate("cardsTest.manual.listen('stream_doesnotexist')")
            await bench.wait("/Server:/.test(cardsTest.manual.debugState().message)", 10, "the error shown")
            st = (await bench.debug())["manual"]
            assert st["current"] is None and st["awaiting"] is None, st
            # Still usable: a new stream shows up and plays.
            snd = await c.sender(880)
            await bench.wait(f"cardsTest.manual.debugState().streams.includes('{snd.stream_id}')", 10, "listed")
            await page.click(f'#manual >> li[data-stream="{snd.stream_id}"] button.pick', timeout=5000)
            await bench.wait_heard("manual", 880)
            assert not bench.page_errors, bench.page_errors

    run(body(), 90)
