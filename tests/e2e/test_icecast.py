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
from whip_clients import WhipPublisher
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


def test_push_resumes_after_icecast_restarts(server: RelayServer, icecast: Icecast) -> None:
    """Icecast killed (SIGKILL) and restarted mid-stream: the push reconnects by itself and the
    mount decodes again, while the relay's own MP3 listener and WebRTC receiver hear no gap."""

    async def body(c: Clients) -> None:
        snd = await c.sender(440)
        mount = f"/{snd.stream_id}.mp3"
        rx = await c.receiver(snd.stream_id, name="rx")
        await rx.wait_audio(1.0)
        await asyncio.to_thread(icecast.wait_mount, mount)
        t0 = time.monotonic()
        own_listener = asyncio.create_task(ffmpeg_capture(mp3_url(server, snd.stream_id), 9.0, timeout=40))
        await asyncio.sleep(2.0)
        await asyncio.to_thread(icecast.kill)
        killed = time.monotonic()
        await asyncio.sleep(1.0)
        await asyncio.to_thread(icecast.start)
        restarted = time.monotonic()
        await asyncio.to_thread(icecast.wait_mount, mount, 20.0)
        print(f"mount live again {time.monotonic() - killed:.2f} s after the kill "
              f"(Icecast answered again after {restarted - killed:.2f} s)")
        await capture_tone(icecast.http + mount, 440, "icecast listener after the restart")
        cap = await own_listener
        assert_clean_tone(cap, 440, "the relay's MP3 listener across the restart", min_seconds=8.5)
        elapsed = time.monotonic() - t0
        frames = rx.sink.frames_since(t0)
        assert frames >= 0.9 * 50 * elapsed, f"receiver: {frames} frames in {elapsed:.1f} s"
        assert await metric(server, "voice_relay_icecast_push_connects_total") >= 2
        assert await metric(server, 'voice_relay_icecast_push_failures_total{reason="dropped"}') >= 1
        assert await metric(server, "voice_relay_icecast_pushes") == 1
        assert "resumed=true" in server.log_text()

    relay(server, body, timeout=90)


def test_stream_end_disconnects_and_a_restart_pushes_again(server: RelayServer, icecast: Icecast) -> None:
    """A WHIP stream named `lobby` gets the mount /lobby.mp3; DELETE ends the stream and the
    source leaves Icecast (the mount is gone); the same name published again is pushed again."""
    mount = "/lobby.mp3"

    async def mount_gone() -> None:
        deadline = time.monotonic() + 10
        while mount in await asyncio.to_thread(icecast.sources):
            assert time.monotonic() < deadline, f"{mount} still live after the stream ended"
            await asyncio.sleep(0.1)

    async def body(c: Clients) -> None:
        for freq in (523, 660):
            pub = c.track(WhipPublisher(server.http, "/whip/lobby", freq))
            await pub.start()
            assert pub.stream_id == "lobby"
            src = await asyncio.to_thread(icecast.wait_mount, mount)
            assert src.get("server_name") == "lobby", src
            await capture_tone(icecast.http + mount, freq, f"icecast listener ({freq} Hz)")
            assert (await pub.delete()).status == 200
            await pub.close()
            await mount_gone()
        assert await metric(server, "voice_relay_icecast_push_failures_total") == 0
        assert await metric(server, "voice_relay_icecast_pushes") == 0

    relay(server, body, timeout=90)
    assert server.log_text().count("icecast source ended with the stream") == 2


def most_attempts(seconds: float) -> int:
    """The most connection attempts the documented backoff allows in `seconds`: one at once, then
    each after a wait of at least half of min(CAP, BASE * 2**n)."""
    attempts, spent, n = 1, 0.0, 0
    while True:
        spent += min(BACKOFF_CAP, BACKOFF_BASE * 2**n) / 2
        if spent > seconds:
            return attempts
        attempts, n = attempts + 1, n + 1


@with_icecast("icecast://source:not-the-password@127.0.0.1:{port}/{{id}}.mp3")
def test_wrong_password_is_logged_counted_and_backed_off(server: RelayServer, icecast: Icecast) -> None:
    """Icecast answers 401: one warning names it (not one per attempt), the refusals are
    counted by status, and the attempts over a fixed window stay within what the backoff
    allows (a tight retry loop would make hundreds)."""

    async def body(c: Clients) -> None:
        t0 = time.monotonic()
        snd = await c.sender(440)
        mount = f"/{snd.stream_id}.mp3"
        await asyncio.sleep(8.0)
        attempts = await metric(server, "voice_relay_icecast_push_connects_total")
        elapsed = time.monotonic() - t0
        refused = await metric(server, 'voice_relay_icecast_push_refused_total{status="401"}')
        puts = icecast.source_puts(mount)
        bound = most_attempts(elapsed)
        print(f"{attempts:.0f} attempts, {puts} PUTs in Icecast's access log, in {elapsed:.1f} s (bound {bound})")
        assert 3 <= attempts <= bound, (attempts, bound)
        assert refused >= attempts - 1, (refused, attempts)
        assert 3 <= puts <= bound, (puts, bound)
        assert mount not in await asyncio.to_thread(icecast.sources)
        log = server.log_text()
        warnings = [ln for ln in log.splitlines() if "refused the source: 401" in ln and " WARN " in ln]
        assert len(warnings) == 1, warnings
        assert "wrong user or password" in warnings[0]
        assert "not-the-password" not in log

    relay(server, body, timeout=60)


@with_icecast(f"icecast://source:{SOURCE_PASSWORD}@127.0.0.1:{{port}}/live.ogg")
def test_fixed_ogg_mount_carries_the_newest_stream(server: RelayServer, icecast: Icecast) -> None:
    """A fixed `.ogg` mount gets Ogg/Opus that ffmpeg decodes; a newer stream takes the mount
    over, the older one gets it back when the newer ends, and when the last stream ends the
    source disconnects and the mount is gone."""
    mount = "/live.ogg"

    async def wait_source(name: str | None) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            src = (await asyncio.to_thread(icecast.sources)).get(mount)
            if (src or {}).get("server_name") == name if name else src is None:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{mount} never carried {name}: {await asyncio.to_thread(icecast.sources)}\n"
                             f"{icecast.log_tail(60)}")

    async def body(c: Clients) -> None:
        first = await c.sender(440)
        await wait_source(first.stream_id)
        src = (await asyncio.to_thread(icecast.sources))[mount]
        assert src.get("server_type") == "audio/ogg", src
        await capture_tone(icecast.http + mount, 440, "icecast Ogg listener")
        second = await c.sender(660)
        await wait_source(second.stream_id)
        await capture_tone(icecast.http + mount, 660, "icecast Ogg listener, newest stream")
        await second.stop_stream()
        await wait_source(first.stream_id)
        await capture_tone(icecast.http + mount, 440, "icecast Ogg listener, back to the older stream")
        assert await metric(server, "voice_relay_icecast_pushes") == 1, "aborted pushes are not counted"
        await first.stop_stream()
        await wait_source(None)

    relay(server, body, timeout=120)
    assert "icecast source ended with the stream" in server.log_text()
