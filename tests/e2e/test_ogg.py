"""Live Ogg/Opus over HTTP (/stream/{id}.ogg, /stream/latest.ogg): the sender's own Opus packets
in Ogg pages, read by ffmpeg, by Chromium's <audio>, and parsed byte by byte here."""

from __future__ import annotations

import asyncio
import struct
import time
from pathlib import Path

import pytest

from browser import chromium
from clients import Clients, ToneSender, dominant_frequency, http, sine_wav_bytes
from relay_server import RelayServer
from test_mp3 import _dechunk_prefix, assert_clean_tone, ffmpeg_capture, read_head, relay
from test_mp3_lazy import decode, metric

PAGE_MAX_SAMPLES = 9600  # 200 ms at 48 kHz


def ogg_url(server: RelayServer, sid: str) -> str:
    return f"{server.http}/stream/{sid}.ogg"


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


CRC = _crc_table()


def ogg_crc(page: bytes) -> int:
    crc = 0
    for b in page[:22] + b"\0\0\0\0" + page[26:]:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ CRC[(crc >> 24) ^ b]
    return crc


def parse_pages(data: bytes) -> list[dict]:
    """Every whole page at the start of ``data`` (a partial last page is left out)."""
    pages, i = [], 0
    while i + 27 <= len(data):
        assert data[i:i + 4] == b"OggS", f"no page capture pattern at byte {i}: {data[i:i + 8]!r}"
        flags, granule, serial, seq, crc, nseg = struct.unpack_from("<xBqIIIB", data, i + 4)
        lacing = data[i + 27:i + 27 + nseg]
        end = i + 27 + nseg + sum(lacing)
        if len(lacing) < nseg or end > len(data):
            break
        raw = data[i:end]
        body = raw[27 + nseg:]
        packets, at, size = [], 0, 0
        for v in lacing:
            size += v
            if v < 255:
                packets.append(body[at:at + size])
                at, size = at + size, 0
        pages.append({"flags": flags, "granule": granule, "serial": serial, "seq": seq, "packets": packets,
                      "crc_ok": crc == ogg_crc(raw), "end": end})
        i = end
    return pages


def assert_opus_stream_start(pages: list[dict], who: str) -> None:
    """OpusHead (BOS), then OpusTags, then audio pages: one serial, contiguous sequence numbers,
    valid checksums, granules that never go back and are at most 200 ms apart."""
    assert len(pages) >= 8, f"{who}: only {len(pages)} pages"
    head, tags, audio = pages[0], pages[1], pages[2:]
    assert head["flags"] & 0x02 and head["packets"][0][:8] == b"OpusHead", f"{who}: first page {head}"
    assert head["granule"] == 0 and len(head["packets"]) == 1
    channels, pre_skip, rate = struct.unpack_from("<BHI", head["packets"][0], 9)
    assert channels in (1, 2) and rate == 48000, (channels, rate)
    assert tags["packets"][0][:8] == b"OpusTags" and tags["granule"] == 0 and not tags["flags"] & 0x02
    assert all(p["crc_ok"] for p in pages), f"{who}: bad checksum"
    assert len({p["serial"] for p in pages}) == 1, f"{who}: more than one logical stream"
    seqs = [p["seq"] for p in pages]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{who}: page numbers {seqs[:10]}"
    assert not any(p["flags"] & 0x02 for p in audio), f"{who}: a chained OpusHead"
    assert not any(pk[:8] == b"OpusHead" for p in audio for pk in p["packets"])
    granules = [p["granule"] for p in audio]
    assert granules[0] >= pre_skip, f"{who}: first audio granule {granules[0]} < pre-skip {pre_skip}"
    steps = [b - a for a, b in zip(granules, granules[1:])]
    assert all(0 < s <= PAGE_MAX_SAMPLES for s in steps), f"{who}: granule steps {steps}"


async def read_ogg(server: RelayServer, path: str, nbytes: int) -> tuple[str, dict[str, str], bytes]:
    status, headers, body = await read_head("127.0.0.1", server.port, path, nbytes=nbytes, timeout=10)
    return status, headers, _dechunk_prefix(body, headers)


def test_ogg_listener_joins_mid_stream(server: RelayServer) -> None:
    """A listener joining 2.3 s in: ffmpeg decodes the tone with zero errors, and its stream starts
    with its own OpusHead and OpusTags pages followed by well-formed audio pages."""

    async def body(c: Clients) -> None:
        snd = await c.sender(440)
        first = asyncio.ensure_future(ffmpeg_capture(ogg_url(server, snd.stream_id), 5.0))
        await asyncio.sleep(2.3)
        raw = asyncio.ensure_future(read_ogg(server, f"/stream/{snd.stream_id}.ogg", 40000))
        late = await ffmpeg_capture(ogg_url(server, snd.stream_id), 2.5)
        early = await first
        assert_clean_tone(early, 440, "first listener")
        assert_clean_tone(late, 440, "late listener")
        status, headers, data = await raw
        assert " 200 " in status + " ", status
        assert headers.get("content-type") == "audio/ogg", headers
        pages = parse_pages(data)
        assert_opus_stream_start(pages, "late raw listener")
        # 2.3 s in, the stream is younger than the first-words window: the late listener gets it
        # from its first page (or, joined later under load, a burst on the stream's timeline).
        first = pages[2]["granule"]
        assert first == 3840 + PAGE_MAX_SAMPLES or first > 48000, f"first audio page's granule {first}"

    relay(server, body)


async def pagers(server: RelayServer) -> tuple[float, float]:
    """(Ogg pagers running, Ogg pagers started)."""
    return await metric(server, "ogg_pagers_running"), await metric(server, "ogg_pager_starts_total")


def test_ogg_pager_is_lazy_and_a_listener_3s_in_gets_a_burst(server: RelayServer) -> None:
    """No Ogg listener: no pager. A listener 3 s in gets, at once, pages from before it joined
    (the burst, made from the stream's kept Opus packets), which ffmpeg decodes; the pager stops
    after the linger once the listener left."""

    async def body(c: Clients) -> None:
        snd = await c.sender(440)
        t0 = time.monotonic()
        await asyncio.sleep(3.0)
        assert await pagers(server) == (0, 0), "an Ogg pager runs with nobody listening"
        age = time.monotonic() - t0
        status, headers, data = await read_ogg(server, f"/stream/{snd.stream_id}.ogg", 24000)
        assert " 200 " in status + " ", status
        pages = parse_pages(data)
        assert_opus_stream_start(pages, "listener 3 s in")
        pre_skip = struct.unpack_from("<H", pages[0]["packets"][0], 10)[0]
        first = (pages[2]["granule"] - pre_skip) / 48000
        # Without a burst its first page would end after the stream time at the request.
        assert first <= age - 0.5, f"first page ends at {first:.2f}s of a stream {age:.2f}s old at the request"
        samples = await decode(data[:pages[-1]["end"]], "ogg")
        assert len(samples) >= 48000, f"decodes to {len(samples) / 48000:.2f}s"
        assert abs(dominant_frequency(samples[9600:]) - 440) <= 15, dominant_frequency(samples[9600:])
        assert await pagers(server) in ((1, 1), (0, 1)), await pagers(server)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while (await pagers(server))[0] != 0:
            assert loop.time() < deadline, "the Ogg pager never stopped after its last listener left"
            await asyncio.sleep(0.25)

    relay(server, body, 90)


def test_ogg_latest_waits_then_body_ends_with_the_stream(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        listener = asyncio.ensure_future(ffmpeg_capture(server.http + "/stream/latest.ogg", None, timeout=20))
        await asyncio.sleep(0.5)
        s = await c.signal("sender")
        snd = c.track(ToneSender(s, 440))
        await snd.start()
        for path in (f"/stream/{snd.stream_id}.ogg", "/stream/latest.ogg"):
            status, headers, _ = await read_head("127.0.0.1", server.port, path, method="HEAD", timeout=5)
            assert " 200 " in status + " ", (path, status)
            assert headers.get("content-type") == "audio/ogg", (path, headers)
        await asyncio.sleep(2.5)
        t_stop = time.monotonic()
        await snd.stop_stream()
        cap = await listener
        ended_after = time.monotonic() - t_stop
        assert cap.returncode == 0, f"ffmpeg rc {cap.returncode}, stderr {cap.stderr[-500:]}"
        assert ended_after <= 5.0, f"body ended {ended_after:.1f}s after the stop"
        assert cap.seconds >= 1.5, cap.seconds
        assert abs(dominant_frequency(cap.samples[24000:]) - 440) <= 15
        assert not cap.problems(), cap.problems()[:5]
        r = await http("GET", ogg_url(server, snd.stream_id), timeout=5)
        assert r.status == 404, f"ended stream's Ogg answers {r.status}"

    relay(server, body, 90)


def test_ogg_not_found_and_counts(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        r = await http("GET", server.http + "/stream/stream_nope.ogg", timeout=5)
        assert r.status == 404, r.status
        r = await http("HEAD", server.http + "/stream/stream_nope.ogg", timeout=5)
        assert r.status == 404, r.status
        t0 = time.monotonic()
        r = await http("GET", server.http + "/stream/latest.ogg?wait=1", timeout=5)
        assert r.status == 404, r.status
        assert 0.9 <= time.monotonic() - t0 < 4.0, "latest.ogg waits ?wait= seconds, then 404"
        snd = await c.sender(440)
        listening = asyncio.ensure_future(ffmpeg_capture(ogg_url(server, snd.stream_id), 3.0))
        deadline = time.monotonic() + 5
        health: dict = {}
        while time.monotonic() < deadline:
            health = (await http("GET", server.http + "/health", timeout=5)).json()
            if health.get("ogg_listeners", {}).get(snd.stream_id) == 1:
                break
            await asyncio.sleep(0.1)
        assert health["ogg_listeners"] == {snd.stream_id: 1}, health
        assert health["mp3_listeners"] == {snd.stream_id: 0}, health
        status = (await http("GET", server.http + "/stream/status", timeout=5)).json()
        assert status["ogg_listeners"] == {snd.stream_id: 1}, status
        metrics = (await http("GET", server.http + "/metrics", timeout=5)).body.decode()
        assert "ogg_listeners 1" in metrics, [ln for ln in metrics.splitlines() if "listeners" in ln]
        assert_clean_tone(await listening, 440, "listener")

    relay(server, body)


@pytest.fixture(scope="module")
def wav440(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wav") / "tone440.wav"
    path.write_bytes(sine_wav_bytes(440.0, 4.0))
    return path


def test_ogg_plays_in_chromium_audio(server: RelayServer, wav440: Path) -> None:
    """Chromium's <audio> plays the live Ogg/Opus: no media error, and currentTime advances."""

    async def body(c: Clients) -> None:
        snd = await c.sender(440)
        await asyncio.sleep(1.5)  # join mid-stream, with a burst
        async with chromium(wav440) as browser:
            page = await (await browser.new_context()).new_page()
            await page.goto(server.http + "/health", timeout=15000)
            await page.evaluate(
                "url => { window.player = new Audio(url); return window.player.play().catch(e => {"
                " window.playError = String(e); }); }",
                ogg_url(server, snd.stream_id),
            )
            js = ("() => ({t: player.currentTime, err: player.error && player.error.code,"
                  " playError: window.playError || null, state: player.readyState, paused: player.paused})")
            deadline = time.monotonic() + 15
            first = None
            last: dict = {}
            while time.monotonic() < deadline:
                last = await page.evaluate(js)
                assert last["err"] is None and last["playError"] is None, last
                if last["t"] > 0 and first is None:
                    first = (time.monotonic(), last["t"])
                if first and last["t"] - first[1] >= 2.0:
                    break
                await asyncio.sleep(0.2)
            assert first, f"currentTime never moved: {last}"
            assert last["t"] - first[1] >= 2.0, f"currentTime advanced only {last['t'] - first[1]:.2f}s: {last}"
            assert not last["paused"], last

    relay(server, body, 90)
