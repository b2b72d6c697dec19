"""Self-tests of the harness itself: no server involved.

aiortc -> aiortc directly (SDP exchanged in-process) validates the tone
generator, the decoder path and the FFT analysis, and measures the baseline
one-way latency that the relay's figure can be compared with.
"""

from __future__ import annotations

import asyncio
import statistics

import numpy as np
import pytest
from aiortc import RTCPeerConnection

from clients import (
    SAMPLE_RATE,
    AudioSink,
    ToneTrack,
    assert_tone,
    dominant_frequency,
    match_latencies,
    rtc_config,
    run,
    sine_wav_bytes,
    strip_candidates,
    wait_pc_state,
    wait_until,
)

PULSE = (0.5, 0.1)  # a 100 ms burst every 500 ms


async def direct_link(track: ToneTrack, strip: bool = False) -> tuple[RTCPeerConnection, RTCPeerConnection, AudioSink]:
    tx = RTCPeerConnection(rtc_config())
    rx = RTCPeerConnection(rtc_config())
    sink = AudioSink("direct")

    @rx.on("track")
    def on_track(t):  # noqa: ANN001
        sink.attach(t)

    tx.addTransceiver(track, direction="sendonly")
    await tx.setLocalDescription(await tx.createOffer())
    offer = tx.localDescription
    await rx.setRemoteDescription(offer)
    await rx.setLocalDescription(await rx.createAnswer())
    answer = rx.localDescription
    if strip:
        answer.sdp = strip_candidates(answer.sdp)
    await tx.setRemoteDescription(answer)
    await wait_pc_state(tx, "connected", 10, "direct tx")
    await wait_pc_state(rx, "connected", 10, "direct rx")
    return tx, rx, sink


def test_fft_helpers() -> None:
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    for f in (440.0, 1000.0, 663.3):
        x = 1000 * np.sin(2 * np.pi * f * t)
        assert abs(dominant_frequency(x) - f) < 1.0
    wav = sine_wav_bytes(440, 3.0)
    assert wav[:4] == b"RIFF" and len(wav) > SAMPLE_RATE * 2 * 2.9


def test_direct_aiortc_tone() -> None:
    async def body() -> None:
        tx, rx, sink = await direct_link(ToneTrack(440))
        try:
            await sink.wait_seconds(2.0, 10)
            assert_tone(sink, 440)
        finally:
            await tx.close()
            await rx.close()
        await asyncio.wait_for(sink.ended.wait(), 5)

    run(body(), 40)


def test_direct_aiortc_latency_baseline() -> None:
    async def body() -> None:
        track = ToneTrack(1000, amplitude=0.5, pulse=PULSE)
        tx, rx, sink = await direct_link(track)
        try:
            await sink.wait_seconds(6.0, 15)
        finally:
            await tx.close()
            await rx.close()
        got = sink.onsets(threshold=0.15 * 32767)
        lat = match_latencies(track.onsets, got, max_latency=PULSE[0] * 0.9)
        assert len(lat) >= 8, f"only {len(lat)} bursts matched ({len(got)} onsets seen)"
        med = statistics.median(lat)
        print(
            f"\nDIRECT aiortc->aiortc one-way latency: median {med * 1000:.1f} ms, "
            f"min {min(lat) * 1000:.1f}, max {max(lat) * 1000:.1f} over {len(lat)} bursts"
        )
        assert 0 < med < 0.4

    run(body(), 40)


# ---------------------------------------------------------------------------
# The browser page against an aiortc stand-in (proves Chromium + the page)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mic", ["card", "plain"])
def test_page_sends_fake_mic_to_aiortc(tone_wav, mic: str) -> None:  # noqa: ANN001
    from browser import chromium, open_client, page_state, page_url, static_pages, wait_page_tone
    from stub_peer import StubPeer

    wav, freq = tone_wav

    async def body() -> None:
        stub = StubPeer()
        async with stub.running(), static_pages() as base, chromium(wav) as browser:
            page = await open_client(browser, page_url(base, mode="send", ws=stub.url, gather="1", mic=mic))
            local = await wait_page_tone(page, freq, timeout=10)  # the fake mic itself
            await wait_until(lambda: stub.sinks and stub.sinks[0].seconds() >= 2.0, 15, what="stub audio")
            sink = stub.sinks[0]
            st = await page_state(page)
            print(f"\npage ({mic} mic) local analyser: {local}; stub heard {sink.dominant_frequency():.1f} Hz, "
                  f"purity {sink.purity(freq):.2f}, rms {sink.level():.0f}; mic label {st['mic']!r}")
            assert_tone(sink, freq)

    run(body(), 60)


def test_page_receives_from_aiortc() -> None:
    from browser import chromium, open_client, page_state, page_url, static_pages, wait_page_tone
    from stub_peer import StubPeer

    async def body(wav) -> None:  # noqa: ANN001
        stub = StubPeer(tone_freq=1000)
        async with stub.running(), static_pages() as base, chromium(wav) as browser:
            page = await open_client(browser, page_url(base, mode="recv", ws=stub.url, gather="1"))
            heard = await wait_page_tone(page, 1000, timeout=15)
            print(f"\npage heard {heard}; state {await page_state(page)}")

    async def main() -> None:
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as d:
            wav = Path(d) / "t.wav"
            wav.write_bytes(sine_wav_bytes(660, 2.0))
            await body(wav)

    run(main(), 60)
