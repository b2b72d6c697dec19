"""The lazy MP3 pipeline: no decode or encode while nobody listens, a burst made from the
stream's Opus history for the first listener, the stream's first words for a speaker told to
play just before or just after it starts, and the stop after the last listener left."""

from __future__ import annotations

import asyncio
import re

import numpy as np

from clients import Clients, dominant_frequency, http
from relay_server import RelayServer
from test_mp3 import assert_clean_tone, ffmpeg_capture, mp3_url, relay

MARK = 1000.0  # the sender's first second
TONE = 440.0  # the rest
BURST_BYTES = 32 * 1024  # the default --mp3-burst-bytes


async def metric(server: RelayServer, name: str) -> float:
    r = await http("GET", server.http + "/metrics")
    assert r.status == 200, r.status
    m = re.search(rf"^voice_relay_{name} (\S+)$", r.body.decode(), re.MULTILINE)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


async def activity(server: RelayServer) -> tuple[float, float, float]:
    """(pipelines running, Opus packets decoded for MP3, MP3 frames encoded)."""
    return (
        await metric(server, "mp3_pipelines_running"),
        await metric(server, "mp3_opus_packets_decoded_total"),
        await metric(server, "mp3_frames_encoded_total"),
    )


async def read_body_prefix(server: RelayServer, path: str, nbytes: int, timeout: float = 10.0) -> bytes:
    """The first ``nbytes`` of a live MP3 body (HTTP/1.0: not chunked)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        assert b" 200 " in head.split(b"\r\n")[0], head
        return await asyncio.wait_for(reader.readexactly(nbytes), timeout)
    finally:
        writer.close()


async def decode(data: bytes, fmt: str = "mp3") -> np.ndarray:
    """ffmpeg decodes MP3 (or ``fmt``) bytes to 48 kHz mono s16 samples."""
    proc = await asyncio.create_subprocess_exec(
        "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-f", fmt, "-i", "-",
        "-f", "s16le", "-ac", "1", "-ar", "48000", "-",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(data), 20)
    assert proc.returncode == 0, err.decode(errors="replace")[-500:]
    assert not err.strip(), f"ffmpeg reported: {err.decode(errors='replace')[-500:]}"
    return np.frombuffer(out[: len(out) // 2 * 2], dtype="<i2").astype(np.float64)


def windows_of(samples: np.ndarray, freq: float) -> int:
    """20 ms windows whose dominant frequency is ``freq``."""
    n = len(samples) // 960
    return sum(abs(dominant_frequency(samples[k * 960:(k + 1) * 960]) - freq) <= 60 for k in range(n))


def assert_first_second(samples: np.ndarray, who: str) -> None:
    """The decoded audio holds the sender's first second (the marker) before its tone."""
    marked = windows_of(samples, MARK)
    assert marked >= 45, f"{who}: only {marked} of the first second's 50 windows of {MARK:.0f} Hz"
    first_mark = next(k for k in range(len(samples) // 960)
                      if abs(dominant_frequency(samples[k * 960:(k + 1) * 960]) - MARK) <= 60)
    assert first_mark * 0.02 < 0.5, f"{who}: the marker starts {first_mark * 0.02:.2f}s into the body"
    assert abs(dominant_frequency(samples[-24000:]) - TONE) <= 15, f"{who}: no {TONE:.0f} Hz after the marker"


def test_mp3_listener_3s_into_a_stream_gets_a_burst_that_decodes(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        snd = await c.sender(TONE)
        await asyncio.sleep(3.0)
        before = await activity(server)
        assert before == (0, 0, 0), f"nobody listened yet, but /metrics shows {before}"
        burst = await read_body_prefix(server, f"/stream/{snd.stream_id}.mp3", BURST_BYTES)
        samples = await decode(burst)
        assert len(samples) >= 1.9 * 48000, f"the burst decodes to {len(samples) / 48000:.2f}s"
        tail = samples[4800:]
        assert abs(dominant_frequency(tail) - TONE) <= 15, dominant_frequency(tail)
        running, decoded, encoded = await activity(server)
        assert running == 1 and decoded >= 140 and encoded >= 80, (running, decoded, encoded)

    relay(server, body)


def test_mp3_latest_requested_before_the_stream_hears_its_first_second(server: RelayServer) -> None:
    """play_media comes before the stream: the waiting latest.mp3 hears the first word."""

    async def body(c: Clients) -> None:
        listener = asyncio.ensure_future(ffmpeg_capture(server.http + "/stream/latest.mp3", 3.0, timeout=20))
        await asyncio.sleep(0.5)
        await c.sender(TONE, lead=(MARK, 1.0))
        cap = await listener
        assert cap.returncode == 0, cap.stderr[-500:]
        assert not cap.problems(), cap.problems()[:5]
        assert_first_second(cap.samples, "latest.mp3 before the stream")

    relay(server, body)


def test_mp3_listener_just_after_the_start_hears_the_first_second(server: RelayServer) -> None:
    """play_media comes just after the stream started: the pipeline starts from the history."""

    async def body(c: Clients) -> None:
        snd = await c.sender(TONE, lead=(MARK, 1.0))
        await asyncio.sleep(1.5)
        assert (await activity(server))[0] == 0, "a pipeline runs before anyone listens"
        cap = await ffmpeg_capture(mp3_url(server, snd.stream_id), 3.5)
        assert cap.returncode == 0, cap.stderr[-500:]
        assert not cap.problems(), cap.problems()[:5]
        assert_first_second(cap.samples, "listener 1.5 s in")

    relay(server, body)


def test_mp3_pipeline_runs_only_while_someone_listens(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        snd = await c.sender(TONE)
        await asyncio.sleep(1.0)
        idle = await activity(server)
        await asyncio.sleep(3.0)
        assert await activity(server) == idle == (0, 0, 0), "encoder activity with nobody listening"
        h = await c.health()
        assert h["senders"] == 1, h

        listening = asyncio.ensure_future(ffmpeg_capture(mp3_url(server, snd.stream_id), 3.0))
        cap = await listening
        running, decoded, encoded = await activity(server)
        assert running == 1, "the pipeline stopped as soon as the listener left"
        assert decoded > 0 and encoded > 0, (decoded, encoded)
        assert_clean_tone(cap, TONE, "listener")

        # It stops once nobody has listened for the linger time (5 s).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while (await activity(server))[0] != 0:
            assert loop.time() < deadline, "the pipeline never stopped after its last listener left"
            await asyncio.sleep(0.25)
        stopped = await activity(server)
        await asyncio.sleep(2.0)
        assert await activity(server) == stopped, "encoder activity after the pipeline stopped"

        # And a new listener starts it again, with a clean burst.
        again = await ffmpeg_capture(mp3_url(server, snd.stream_id), 2.5)
        assert_clean_tone(again, TONE, "listener after the stop")
        assert (await activity(server))[1] > stopped[1]

    relay(server, body, 90)
