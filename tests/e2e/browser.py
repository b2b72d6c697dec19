"""Headless Chromium (Debian's /usr/bin/chromium) driven through Playwright."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import urllib.parse
from pathlib import Path
from typing import Any, AsyncIterator

from aiohttp import web

from relay_server import free_port

PAGES = Path(__file__).resolve().parent / "pages"
CHROMIUM = os.environ.get("E2E_CHROMIUM", "/usr/bin/chromium")


def chromium_args(wav: Path) -> list[str]:
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--allow-loopback-in-peer-connection",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        "--autoplay-policy=no-user-gesture-required",
    ]


@contextlib.asynccontextmanager
async def static_pages(extra: dict[str, Path] | None = None) -> AsyncIterator[str]:
    """Serve tests/e2e/pages on http://127.0.0.1:<port> (a secure context for getUserMedia),
    and each ``extra`` directory under its URL prefix."""
    app = web.Application()
    for prefix, directory in (extra or {}).items():
        app.router.add_static(prefix, directory)
    app.router.add_static("/", PAGES)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def chromium(wav: Path) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await asyncio.wait_for(
            p.chromium.launch(executable_path=CHROMIUM, headless=True, args=chromium_args(wav), timeout=30000),
            40,
        )
        try:
            yield browser
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(browser.close(), 10)


def page_url(base: str, **params: str) -> str:
    return f"{base}/client.html?{urllib.parse.urlencode(params)}"


async def open_client(browser: Any, url: str) -> Any:
    ctx = await browser.new_context()
    page = await ctx.new_page()
    page.on("console", lambda m: _console.append(f"[{m.type}] {m.text}"))
    await page.goto(url, timeout=15000)
    return page


_console: list[str] = []


async def page_state(page: Any) -> dict:
    return await page.evaluate(
        "async () => ({state: e2e.state, streamId: e2e.streamId, errors: e2e.errors, log: e2e.log.slice(-20),"
        " pcState: e2e.pcState, iceState: e2e.iceState, offers: e2e.offersReceived, mic: e2e.micLabel,"
        " measure: e2e.measure(), stats: await e2e.stats(), messages: e2e.messages.map(m => m.type)})"
    )


async def wait_page(page: Any, js: str, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = await page.evaluate(js)
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"page: timed out waiting for {what}; state: {await page_state(page)}")
        await asyncio.sleep(0.1)


async def wait_page_tone(page: Any, freq: float, tol: float = 15.0, timeout: float = 15.0) -> dict:
    """Wait until the page's analyser hears ``freq`` (+-tol) loud enough, on 3 consecutive reads."""
    deadline = time.monotonic() + timeout
    good = 0
    last: Any = None
    while time.monotonic() < deadline:
        last = await page.evaluate("e2e.measure()")
        if last and last["rms"] > 0.01 and abs(last["freq"] - freq) <= tol:
            good += 1
            if good >= 3:
                return last
        else:
            good = 0
        await asyncio.sleep(0.3)
    raise AssertionError(f"page never heard {freq} Hz: last {last}; state {await page_state(page)}")
