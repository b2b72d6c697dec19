"""A browser WHIP/WHEP client in headless Chromium: the npm package
``whip-whep`` (the RFC author's client) publishes the fake microphone over
WHIP and plays the stream back over WHEP, from a page on another origin."""

from __future__ import annotations

from pathlib import Path

from browser import chromium, open_client, static_pages, wait_page, wait_page_tone
from clients import Clients, health_idle, run
from relay_server import RelayServer
from test_whip import ended_once

WHIP_WHEP = Path(__file__).resolve().parent / "node" / "node_modules" / "whip-whep"


def test_chromium_whip_whep_clients(server: RelayServer, tone_wav) -> None:  # noqa: ANN001
    wav, freq = tone_wav
    assert (WHIP_WHEP / "whip.js").is_file(), f"{WHIP_WHEP} missing: run scripts/test.sh --setup-only"

    async def main() -> None:
        extra = {"/whip-whep": WHIP_WHEP}
        async with Clients(server.ws, server.http) as c, static_pages(extra) as base, chromium(wav) as browser:
            watcher = await c.signal("watcher")
            page = await open_client(browser, f"{base}/whip_whep.html?server={server.http}&name=chromium")
            await wait_page(page, "e2e.state === 'viewing' || e2e.state === 'failed'", 20, "publish + view")
            errors = await page.evaluate("e2e.errors")
            assert not errors, f"page errors: {errors}"
            await watcher.expect("stream_available", 5, where=lambda m: m.get("stream_id") == "chromium")
            await wait_page(
                page, "(async () => ((await e2e.stats()) || {}).packetsReceived > 50)()", 15, "inbound packets"
            )
            await wait_page_tone(page, freq)
            h = await c.health()
            assert (h["senders"], h["receivers"], h["active_streams"]) == (1, 1, ["chromium"]), h
            await page.evaluate("e2e.stop()")
            await ended_once(watcher, "chromium")
            await c.wait_health(health_idle, 5, "idle after the page's DELETEs")

    run(main(), 90)
