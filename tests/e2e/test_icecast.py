"""Icecast source push (--icecast): each stream reaches a real Icecast 2.4 (Debian's icecast2)
as a source, through it and its relays to ffmpeg; it survives Icecast restarts; a refused
password is logged, counted and retried with bounded backoff."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Iterator

import pytest

from clients import Clients, http
from conftest import _finish, _start
from icecast_server import SOURCE_PASSWORD, Icecast
from relay_server import RelayServer
from test_mp3 import assert_clean_tone, ffmpeg_capture, mp3_url, relay

# The relay's documented backoff (src/icecast/backoff.rs): the n-th wait in a row is at least
# half of min(CAP, BASE * 2**n).
BACKOFF_BASE = 0.5
BACKOFF_CAP = 15.0


@pytest.fixture
def icecast() -> Iterator[Icecast]:
    ice = Icecast()
    try:
        ice.start()
        yield ice
    finally:
        ice.cleanup()


@pytest.fixture
def server(request: pytest.FixtureRequest, icecast: Icecast, tmp_path: Path) -> Iterator[RelayServer]:
    """A voice-relay pushing to `icecast`: the parameter is the list of --icecast URL templates,
    with {port} for Icecast's port (default: one MP3 mount per stream)."""
    urls = getattr(request, "param", [f"icecast://source:{SOURCE_PASSWORD}@127.0.0.1:{{port}}/{{{{id}}}}.mp3"])
    args = []
    for url in urls:
        args += ["--icecast", url.format(port=icecast.port)]
    srv = _start(tmp_path, "server", args)
    try:
        yield srv
    finally:
        _finish(srv)


def with_icecast(*urls: str):  # noqa: ANN201
    return pytest.mark.parametrize("server", [list(urls)], indirect=True, ids=[" ".join(urls)])


async def capture_tone(url: str, freq: float, who: str, seconds: float = 3.0) -> None:
    cap = await ffmpeg_capture(url, seconds, timeout=seconds + 15)
    assert_clean_tone(cap, freq, who)


async def metric(server: RelayServer, name: str) -> float:
    text = (await http("GET", f"{server.http}/metrics")).body.decode()
    total = 0.0
    for ln in text.splitlines():
        if ln.startswith(name) and not ln.startswith("#"):
            total += float(ln.rsplit(" ", 1)[1])
    return total


def test_stream_reaches_icecast_and_its_relay(server: RelayServer, icecast: Icecast) -> None:
    """A WebSocket sender's tone is decoded by ffmpeg from Icecast, and from a second Icecast
    relaying the first; the mount is named after the stream and carries its name."""
    relay_ice: Icecast | None = None

    async def body(c: Clients) -> None:
        nonlocal relay_ice
        snd = await c.sender(550)
        mount = f"/{snd.stream_id}.mp3"
        src = await asyncio.to_thread(icecast.wait_mount, mount)
        assert src.get("server_name") == snd.stream_id, src
        assert src.get("server_type") == "audio/mpeg", src
        await capture_tone(icecast.http + mount, 550, "icecast listener")
        relay_ice = Icecast(relay_of=(icecast.port, mount))
        await asyncio.to_thread(relay_ice.start)
        await asyncio.to_thread(relay_ice.wait_mount, mount)
        await capture_tone(relay_ice.http + mount, 550, "icecast relay listener")
        # ICY StreamTitle from the stream name, set with Icecast's metadata update.
        assert (await asyncio.to_thread(icecast.sources))[mount].get("title") == snd.stream_id
        assert await metric(server, "voice_relay_icecast_pushes") == 1

    try:
        relay(server, body, timeout=90)
    finally:
        if relay_ice is not None:
            relay_ice.cleanup()
