"""Headless Chromium speaking the protocol to the relay, like the HA cards.

gather=0 is what the cards do: the SDP goes out at once, with no candidates.
The fake microphone plays the session's WAV (660 Hz) in a loop.
"""

from __future__ import annotations

import asyncio

import pytest

from browser import chromium, open_client, page_state, page_url, static_pages, wait_page, wait_page_tone
from clients import Clients, ToneReceiver, assert_tone, run
from relay_server import RelayServer


@pytest.mark.parametrize("gather", ["0", "1"], ids=["card_no_candidates", "gathered"])
def test_chromium_sender_to_aiortc_receiver(server: RelayServer, tone_wav, gather: str) -> None:  # noqa: ANN001
    wav, freq = tone_wav

    async def body() -> None:
        async with Clients(server.ws, server.http) as c, static_pages() as base, chromium(wav) as browser:
            page = await open_client(browser, page_url(base, mode="send", ws=server.ws, gather=gather, mic="card"))
            sid = await wait_page(page, "e2e.streamId", 15, "a stream id")
            await wait_page(page, "e2e.pcState === 'connected'", 15, "the page's pc to connect")
            s = await c.signal("aiortc_rx")
            rx = c.track(ToneReceiver(s))
            await rx.start(sid, timeout=15)
            await rx.wait_audio(2.5, 15)
            assert_tone(rx, freq)
            st = await page_state(page)
            assert not st["errors"], st

    run(body(), 90)


@pytest.mark.parametrize("gather", ["0", "1"], ids=["card_no_candidates", "gathered"])
def test_aiortc_sender_to_chromium_receiver(server: RelayServer, tone_wav, gather: str) -> None:  # noqa: ANN001
    wav, _ = tone_wav

    async def body() -> None:
        async with Clients(server.ws, server.http) as c, static_pages() as base, chromium(wav) as browser:
            await c.sender(1000)
            page = await open_client(browser, page_url(base, mode="recv", ws=server.ws, gather=gather))
            heard = await wait_page_tone(page, 1000, tol=15, timeout=20)
            # Still heard 6 s later: the relay's sequence numbers for this receiver have
            # wrapped by then (they start within 256 of 65535), and Chromium's SRTP has
            # followed the rollover counter.
            await asyncio.sleep(6)
            later = await wait_page_tone(page, 1000, tol=15, timeout=5)
            st = await page_state(page)
            assert st["offers"] == 1 and not st["errors"], st
            h = await c.health()
            assert h["receivers"] == 1 and h["senders"] == 1, h
            print(f"\nchromium heard {heard}, then {later}")

    run(body(), 90)


def test_chromium_to_chromium(server: RelayServer, tone_wav) -> None:  # noqa: ANN001
    wav, freq = tone_wav

    async def body() -> None:
        async with static_pages() as base, chromium(wav) as browser:
            tx = await open_client(browser, page_url(base, mode="send", ws=server.ws, gather="0", mic="card"))
            sid = await wait_page(tx, "e2e.streamId", 15, "a stream id")
            await wait_page(tx, "e2e.pcState === 'connected'", 15, "the sender page to connect")
            rx = await open_client(browser, page_url(base, mode="recv", ws=server.ws, gather="0", stream=sid))
            await wait_page_tone(rx, freq, tol=15, timeout=20)

    run(body(), 90)
