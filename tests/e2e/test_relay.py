"""End-to-end tests of the WebRTC relay (signalling, media, lifecycle, abuse).

Every test gets a fresh server (fixture ``server``); the fixture also checks
that the server exits 0 within 5 s of SIGTERM when the test is done.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Awaitable, Callable

import pytest
from aiortc import RTCPeerConnection, RTCRtpSender

from clients import (
    Clients,
    Signal,
    ToneReceiver,
    ToneSender,
    assert_tone,
    count_candidates,
    health_idle,
    http,
    match_latencies,
    rtc_config,
    run,
    tone_purity,
)
from relay_server import RelayServer

Body = Callable[[Clients], Awaitable[None]]


def relay(server: RelayServer, body: Body, timeout: float = 60.0) -> None:
    async def main() -> None:
        async with Clients(server.ws, server.http) as c:
            await body(c)
            for s in c.signals:
                s.assert_json_only()

    run(main(), timeout)


async def settle(seconds: float = 1.0) -> None:
    await asyncio.sleep(seconds)


# ---------------------------------------------------------------------------
# HTTP shapes
# ---------------------------------------------------------------------------


def test_health_and_status_shapes(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        r = await http("GET", server.http + "/health")
        assert r.status == 200
        assert "json" in r.headers.get("content-type", ""), r.headers
        h = r.json()
        assert h.get("status") == "healthy", h
        assert h.get("active_streams") == [] and h.get("senders") == 0 and h.get("receivers") == 0, h
        for k in ("senders", "receivers"):
            assert type(h[k]) is int, h

        r = await http("GET", server.http + "/stream/status")
        assert r.status == 200 and "json" in r.headers.get("content-type", ""), (r.status, r.headers)
        assert r.json().get("active_streams") == [], r.json()

        snd = await c.sender(440)
        assert isinstance(snd.ready_msg, dict)
        assert isinstance(snd.ready_msg.get("connection_id"), str) and snd.ready_msg["connection_id"]
        assert isinstance(snd.stream_id, str) and snd.stream_id.startswith("stream_"), snd.ready_msg
        rx = await c.receiver(snd.stream_id)
        await rx.wait_audio(0.5)
        h = await c.wait_health(lambda h: h.get("receivers") == 1, what="1 receiver")
        assert h["status"] == "healthy" and h["active_streams"] == [snd.stream_id] and h["senders"] == 1, h
        st = (await http("GET", server.http + "/stream/status")).json()
        assert st.get("active_streams") == [snd.stream_id], st

        r = await http("GET", server.http + "/definitely/not/here")
        assert r.status == 404, r.status

    relay(server, body)


# ---------------------------------------------------------------------------
# Media fan-out
# ---------------------------------------------------------------------------


def test_one_sender_two_receivers(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        watcher = await c.signal("watcher")
        snd = await c.sender(440)
        avail = await watcher.expect("stream_available", 5)
        assert avail.get("stream_id") == snd.stream_id, avail
        await snd.signal.expect("stream_available", 5, where=lambda m: m.get("stream_id") == snd.stream_id)
        assert snd.stream_id in await watcher.request_streams()

        r1 = await c.receiver(snd.stream_id, name="rx1")
        r2 = await c.receiver(snd.stream_id, name="rx2")
        await r1.wait_audio(3.0)
        await r2.wait_audio(3.0)
        for r in (r1, r2):
            assert_tone(r, 440, min_purity=0.8)
            # continuity: ~50 frames of 20 ms per second
            t = time.monotonic()
            await r.sink.wait_more(2.0, 6)
            got = r.sink.frames_since(t)
            assert got >= 90, f"{r.signal.name}: only {got} frames in ~2 s"
        h = await c.health()
        assert h["senders"] == 1 and h["receivers"] == 2, h

    relay(server, body)


@pytest.mark.parametrize("profile", ["SRTP_AES128_CM_SHA1_80", "SRTP_AEAD_AES_128_GCM",
                                     "SRTP_AEAD_AES_256_GCM"])
def test_each_srtp_profile_carries_audio(server: RelayServer, profile: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The relay SRTP-protects forwarded copies itself, with keys from each receiver's DTLS
    handshake: a receiver whose DTLS offers only one SRTP profile hears the tone under each.
    A receiver's sequence numbers start within 256 of the 16-bit wrap, so six seconds of
    audio also cross the SRTP rollover counter's first increment."""
    import aiortc.rtcdtlstransport as dtls

    only = [p for p in dtls.SRTP_PROFILES if p.openssl_profile.decode() == profile]
    assert only, f"this aiortc/libsrtp build lacks {profile}"
    monkeypatch.setattr(dtls, "SRTP_PROFILES", only)

    async def body(c: Clients) -> None:
        snd = await c.sender(660)
        rx = await c.receiver(snd.stream_id, name="rx")
        await rx.wait_audio(3.0)
        t = time.monotonic()
        await rx.sink.wait_more(6.0, 12)
        got = rx.sink.frames_since(t)
        assert got >= 280, f"only {got} frames in ~6 s"
        assert_tone(rx, 660, min_purity=0.8)
        dtls_transport = rx.pc.getTransceivers()[0].receiver.transport
        used = dtls_transport._ssl.get_selected_srtp_profile()
        assert used == profile.encode(), f"DTLS selected {used!r}"

    relay(server, body)


def test_two_streams_are_isolated(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        a = await c.sender(440)
        b = await c.sender(1000)
        assert a.stream_id != b.stream_id
        lister = await c.signal("lister")
        assert await lister.request_streams() == [a.stream_id, b.stream_id], "oldest first"
        ra = [await c.receiver(a.stream_id, name=f"rxA{i}") for i in range(2)]
        rb = [await c.receiver(b.stream_id, name=f"rxB{i}") for i in range(2)]
        for r in ra + rb:
            await r.wait_audio(2.5)
        for r in ra:
            assert_tone(r, 440, min_purity=0.8)
            assert tone_purity(r.sink.samples(1.0), 1000) < 0.05, "1000 Hz leaks into stream A"
        for r in rb:
            assert_tone(r, 1000, min_purity=0.8)
            assert tone_purity(r.sink.samples(1.0), 440) < 0.05, "440 Hz leaks into stream B"
        h = await c.health()
        assert h["senders"] == 2 and h["receivers"] == 4 and h["active_streams"] == [a.stream_id, b.stream_id], h

    relay(server, body)


def test_start_receiving_without_id_gets_newest(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        await c.sender(440)
        await c.sender(1000)
        r = await c.receiver(None, name="rx_newest")
        await r.wait_audio(2.0)
        assert_tone(r, 1000)
        await c.sender(700)
        r2 = await c.receiver(None, name="rx_newest2")
        await r2.wait_audio(2.0)
        assert_tone(r2, 700)
        # explicit null means the same as absent
        s = await c.signal("rx_null")
        rn = c.track(ToneReceiver(s))
        await s.send({"type": "start_receiving", "stream_id": None})
        await rn.accept(await s.expect("webrtc_offer", 10))
        await rn.wait_audio(2.0)
        assert_tone(rn, 700)

    relay(server, body)


def test_relay_latency(server: RelayServer) -> None:
    """One-way latency sender -> relay -> receiver, compared by hand with the direct baseline."""

    async def body(c: Clients) -> None:
        s = await c.signal("pulser")
        snd = c.track(ToneSender(s, 1000, pulse=(0.5, 0.1), amplitude=0.5))
        await snd.start()
        r = await c.receiver(snd.stream_id)
        await r.wait_audio(6.0, 15)
        got = r.sink.onsets(0.15 * 32767)
        lat = match_latencies(snd.track.onsets, got, 0.45)
        assert len(lat) >= 8, f"only {len(lat)} bursts matched ({len(got)} onsets)"
        med = statistics.median(lat)
        print(f"\nRELAY aiortc->server->aiortc one-way latency: median {med * 1000:.1f} ms "
              f"(min {min(lat) * 1000:.1f}, max {max(lat) * 1000:.1f}, n={len(lat)})")
        assert med < 0.3, f"median one-way latency {med * 1000:.0f} ms"

    relay(server, body)


# ---------------------------------------------------------------------------
# Ending a stream
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["stop_stream", "close_ws", "close_pc"])
def test_stream_end_cleans_up(server: RelayServer, how: str) -> None:
    async def body(c: Clients) -> None:
        bystander = await c.signal("bystander")
        snd = await c.sender(440)
        sid = snd.stream_id
        r1 = await c.receiver(sid, name="rx1")
        r2 = await c.receiver(sid, name="rx2")
        await r1.wait_audio(1.0)
        await r2.wait_audio(1.0)
        await c.wait_health(lambda h: h["senders"] == 1 and h["receivers"] == 2, what="1 sender 2 receivers")

        if how == "stop_stream":
            await snd.stop_stream()
        elif how == "close_ws":
            await snd.signal.close()
        else:
            await snd.close()  # RTCP BYE + DTLS close_notify, WebSocket stays open

        end_timeout = 15.0 if how == "close_pc" else 5.0
        watchers = [bystander, r1.signal, r2.signal]
        if how != "close_ws":
            watchers.append(snd.signal)
        for w in watchers:
            await w.expect("stream_ended", end_timeout, where=lambda m: m.get("stream_id") == sid)
        await r1.wait_ended(10)
        await r2.wait_ended(10)
        await c.wait_health(health_idle, 5, "0 senders, 0 receivers, no streams")
        await settle(1.0)
        for w in watchers:
            assert w.count("stream_ended", stream_id=sid) == 1, f"{w.name}: {w.of_type('stream_ended')}"
        assert await bystander.request_streams() == []
        if how != "close_ws":
            await snd.signal.ping()
        # the receivers' sockets stay usable too
        await r1.signal.ping()
        st = (await http("GET", server.http + "/stream/status")).json()
        assert st["active_streams"] == [], st

    relay(server, body)


def test_receiver_stop_stream_releases_only_that_receiver(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        snd = await c.sender(440)
        r1 = await c.receiver(snd.stream_id, name="rx1")
        r2 = await c.receiver(snd.stream_id, name="rx2")
        await r1.wait_audio(1.0)
        await r2.wait_audio(1.0)
        await r1.signal.send({"type": "stop_stream"})
        await r1.signal.send({"type": "stop_stream"})  # the card's "Stop" may send it twice
        await r1.wait_ended(10)
        await c.wait_health(lambda h: h["receivers"] == 1 and h["senders"] == 1, 5, "1 receiver left")
        await r2.sink.wait_more(1.0, 5)
        assert_tone(r2, 440)
        await settle(0.5)
        assert snd.signal.count("stream_ended") == 0 and r1.signal.count("stream_ended") == 0
        await r1.signal.ping()
        # and it can listen again on the same socket
        again = c.track(ToneReceiver(r1.signal))
        await again.start(snd.stream_id)
        await again.wait_audio(1.5)
        assert_tone(again, 440)

    relay(server, body)


def test_sender_stop_stream_twice_and_idle_stop(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        idle = await c.signal("idle")
        await idle.send({"type": "stop_stream"})
        await idle.send({"type": "stop_stream"})
        await idle.ping()
        assert (await c.health())["status"] == "healthy"

        snd = await c.sender(440)
        sid = snd.stream_id
        await snd.stop_stream()
        await snd.stop_stream()
        await snd.signal.expect("stream_ended", 5, where=lambda m: m.get("stream_id") == sid)
        await settle(1.0)
        assert snd.signal.count("stream_ended", stream_id=sid) == 1
        assert idle.count("stream_ended", stream_id=sid) == 1
        await snd.signal.ping()
        await idle.ping()
        await c.wait_health(health_idle, 5, "idle")
        # the same socket can send again
        again = c.track(ToneSender(snd.signal, 1000))
        sid2 = await again.start()
        assert sid2 != sid
        r = await c.receiver(sid2)
        await r.wait_audio(1.5)
        assert_tone(r, 1000)

    relay(server, body)


def test_sigterm_with_live_clients_exits_cleanly(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        snd = await c.sender(440)
        r = await c.receiver(snd.stream_id)
        await r.wait_audio(1.0)
        code = await asyncio.to_thread(server.terminate)
        assert code is not None, "server did not exit within 5 s of SIGTERM"
        assert code == 0, f"exit code {code}"
        await asyncio.wait_for(snd.signal.closed.wait(), 3)

    relay(server, body)


# ---------------------------------------------------------------------------
# The Home Assistant cards' habits
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("strip", ["offer", "answer", "both"])
def test_candidate_free_sdp_connects(server: RelayServer, strip: str) -> None:
    async def body(c: Clients) -> None:
        s = await c.signal("card_sender")
        snd = c.track(ToneSender(s, 440, strip_candidates=strip in ("offer", "both")))
        await snd.start(timeout=15)
        if snd.strip:
            assert count_candidates(snd.offer_sdp or "") == 0
        assert count_candidates(snd.answer_sdp or "") >= 1, "server answer carries no candidate"
        rs = await c.signal("card_receiver")
        rx = c.track(ToneReceiver(rs, strip_candidates=strip in ("answer", "both")))
        await rx.start(snd.stream_id, timeout=15)
        assert count_candidates(rx.offer_sdp or "") >= 1, "server offer carries no candidate"
        await rx.wait_audio(2.0)
        assert_tone(rx, 440)

    relay(server, body)


def test_trickled_candidates_are_accepted(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        s = await c.signal("trickler")
        snd = c.track(ToneSender(s, 440, strip_candidates=True))
        await s.send({"type": "start_sending"})
        snd.ready_msg = await s.expect("sender_ready")
        snd.stream_id = snd.ready_msg.get("stream_id")
        await snd.offer()
        for ln in snd.pc.localDescription.sdp.splitlines():
            if ln.startswith("a=candidate:"):
                await s.send({"type": "ice_candidate",
                              "candidate": {"candidate": ln[2:], "sdpMid": "0", "sdpMLineIndex": 0}})
        await s.send({"type": "ice_candidate", "candidate": {"candidate": "", "sdpMid": "0", "sdpMLineIndex": 0}})
        r = await c.receiver(snd.stream_id)
        await r.wait_audio(2.0)
        assert_tone(r, 440)
        await s.ping()
        assert s.count("error") == 0, s.of_type("error")

    relay(server, body)


def test_double_start_receiving_yields_one_offer(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        snd = await c.sender(440)
        s = await c.signal("card_rx")
        await s.send({"type": "start_receiving"})
        await s.send({"type": "start_receiving", "stream_id": snd.stream_id})
        offer = await s.expect("webrtc_offer", 10)
        rx = c.track(ToneReceiver(s))
        try:
            await rx.accept(offer)
            await rx.wait_audio(3.0)
        except AssertionError as e:
            raise AssertionError(f"{e} (webrtc_offer messages on this socket: {s.count('webrtc_offer')})") from e
        await settle(1.0)
        assert s.count("webrtc_offer") == 1, f"{s.count('webrtc_offer')} offers on one socket"
        assert s.count("error") == 0, s.of_type("error")
        assert_tone(rx, 440, min_purity=0.8)
        t = time.monotonic()
        await rx.sink.wait_more(2.0, 6)
        assert rx.sink.frames_since(t) >= 90
        h = await c.health()
        assert h["receivers"] == 1, h

    relay(server, body)


def test_card_switches_to_new_stream(server: RelayServer) -> None:
    """On stream_available while playing the card sends stop_stream, then start_receiving {id} 200 ms later."""

    async def body(c: Clients) -> None:
        a = await c.sender(440)
        s = await c.signal("card_rx")
        ra = c.track(ToneReceiver(s))
        await ra.start(None)
        await ra.wait_audio(1.0)
        assert_tone(ra, a.freq)
        b = await c.sender(1000)
        await s.expect("stream_available", 5, where=lambda m: m.get("stream_id") == b.stream_id)
        await s.send({"type": "stop_stream"})
        await asyncio.sleep(0.2)
        await s.send({"type": "start_receiving", "stream_id": b.stream_id})
        rb = c.track(ToneReceiver(s))
        await rb.accept(await s.expect("webrtc_offer", 10))
        await rb.wait_audio(2.0)
        assert_tone(rb, 1000)
        await ra.wait_ended(10)
        await c.wait_health(lambda h: h["receivers"] == 1 and h["senders"] == 2, 5, "1 receiver")

    relay(server, body)


def test_start_receiving_other_stream_replaces_leg(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        a = await c.sender(440)
        b = await c.sender(1000)
        s = await c.signal("switcher")
        ra = c.track(ToneReceiver(s))
        await ra.start(a.stream_id)
        await ra.wait_audio(1.0)
        await s.send({"type": "start_receiving", "stream_id": b.stream_id})
        rb = c.track(ToneReceiver(s))
        await rb.accept(await s.expect("webrtc_offer", 10))
        await rb.wait_audio(2.0)
        assert_tone(rb, 1000)
        await ra.wait_ended(10)
        await c.wait_health(lambda h: h["receivers"] == 1, 5, "1 receiver")

    relay(server, body)


def test_websocket_on_root_path(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        s = await c.signal("root_sender", url=server.ws_root)
        snd = c.track(ToneSender(s, 440))
        await snd.start()
        rs = await c.signal("root_rx", url=server.ws_root)
        rx = c.track(ToneReceiver(rs))
        await rx.start(None)
        await rx.wait_audio(1.5)
        assert_tone(rx, 440)

    relay(server, body)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


async def _video_only_offer() -> str:
    pc = RTCPeerConnection(rtc_config())
    pc.addTransceiver("video", direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def _pcmu_only_offer() -> str:
    pc = RTCPeerConnection(rtc_config())
    t = pc.addTransceiver("audio", direction="sendonly")
    t.setCodecPreferences([cd for cd in RTCRtpSender.getCapabilities("audio").codecs if cd.mimeType == "audio/PCMU"])
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    assert "opus" not in sdp.lower()
    return sdp


async def _some_answer_sdp() -> str:
    a = RTCPeerConnection(rtc_config())
    b = RTCPeerConnection(rtc_config())
    a.addTransceiver("audio", direction="recvonly")
    await a.setLocalDescription(await a.createOffer())
    await b.setRemoteDescription(a.localDescription)
    await b.setLocalDescription(await b.createAnswer())
    sdp = b.localDescription.sdp
    await a.close()
    await b.close()
    return sdp


async def _audio_offer() -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection(rtc_config())
    pc.addTransceiver("audio", direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


ABUSES = [
    "malformed_json",
    "not_an_object",
    "no_type",
    "unknown_type",
    "offer_without_offer_field",
    "garbage_sdp",
    "video_only_offer",
    "offer_without_opus",
    "start_receiving_unknown_id",
    "start_receiving_bad_id_type",
    "unsolicited_answer",
    "offer_before_start_sending",
    "huge_frame",
]


@pytest.mark.parametrize("abuse", ABUSES)
def test_bad_input(server: RelayServer, abuse: str) -> None:
    async def body(c: Clients) -> None:
        snd = await c.sender(440)
        witness = await c.receiver(snd.stream_id, name="witness")
        await witness.wait_audio(1.0)
        bad = await c.signal("abuser")
        may_close = False
        leftover_pc: RTCPeerConnection | None = None
        abuser_stream: str | None = None

        if abuse == "malformed_json":
            await bad.send_text('{"type": "get_available_streams", oops')
        elif abuse == "not_an_object":
            await bad.send_text('["start_sending"]')
        elif abuse == "no_type":
            await bad.send({"stream_id": snd.stream_id})
        elif abuse == "unknown_type":
            await bad.send({"type": "launch_rockets"})
        elif abuse == "offer_without_offer_field":
            await bad.send({"type": "start_sending"})
            abuser_stream = (await bad.expect("sender_ready")).get("stream_id")
            await bad.send({"type": "webrtc_offer"})
        elif abuse == "garbage_sdp":
            await bad.send({"type": "start_sending"})
            abuser_stream = (await bad.expect("sender_ready")).get("stream_id")
            await bad.send({"type": "webrtc_offer", "offer": {"type": "offer", "sdp": "v=0\r\nthis is not sdp\r\n"}})
        elif abuse == "video_only_offer":
            await bad.send({"type": "start_sending"})
            abuser_stream = (await bad.expect("sender_ready")).get("stream_id")
            await bad.send({"type": "webrtc_offer", "offer": {"type": "offer", "sdp": await _video_only_offer()}})
        elif abuse == "offer_without_opus":
            await bad.send({"type": "start_sending"})
            abuser_stream = (await bad.expect("sender_ready")).get("stream_id")
            await bad.send({"type": "webrtc_offer", "offer": {"type": "offer", "sdp": await _pcmu_only_offer()}})
        elif abuse == "start_receiving_unknown_id":
            await bad.send({"type": "start_receiving", "stream_id": "stream_doesnotexist"})
        elif abuse == "start_receiving_bad_id_type":
            await bad.send({"type": "start_receiving", "stream_id": 12345})
        elif abuse == "unsolicited_answer":
            await bad.send({"type": "webrtc_answer", "answer": {"type": "answer", "sdp": await _some_answer_sdp()}})
        elif abuse == "offer_before_start_sending":
            leftover_pc, sdp = await _audio_offer()
            await bad.send({"type": "webrtc_offer", "offer": {"type": "offer", "sdp": sdp}})
        elif abuse == "huge_frame":
            may_close = True
            pad = "x" * (10 * 1024 * 1024)
            try:
                await bad.send_text('{"type": "get_available_streams", "pad": "' + pad + '"}')
            except Exception:
                pass
        else:
            raise AssertionError(abuse)

        try:
            if may_close:
                # Either an error reply or the socket is closed; never a crash.
                done = asyncio.ensure_future(bad.closed.wait())
                err = asyncio.ensure_future(bad.expect("error", 10))
                await asyncio.wait({done, err}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
                assert done.done() or err.done(), "neither an error nor a close after a 10 MB frame"
                if err.done() and not err.exception():
                    assert str(err.result().get("message", "")).strip()
                done.cancel()
                err.cancel()
            else:
                await bad.expect_error(5)
                await bad.ping()
                if abuser_stream is not None:
                    await settle(0.5)
                    if watcher_saw(witness.signal, abuser_stream, "stream_available"):
                        await witness.signal.expect("stream_ended", 5,
                                                    where=lambda m: m.get("stream_id") == abuser_stream)
                    streams = await bad.request_streams()
                    assert streams == [snd.stream_id], streams

            # everyone else is unaffected
            other = await c.signal("after_abuse")
            assert await other.request_streams() == [snd.stream_id]
            await witness.sink.wait_more(1.0, 5)
            assert_tone(witness, 440)
            assert not witness.ended
            await c.wait_health(lambda h: h["senders"] == 1 and h["receivers"] == 1 and
                                h["active_streams"] == [snd.stream_id], 5, "only the live stream")
        finally:
            if leftover_pc is not None:
                await leftover_pc.close()

    relay(server, body, 60)


def watcher_saw(s: Signal, stream_id: str, type_: str) -> bool:
    return s.count(type_, stream_id=stream_id) > 0


@pytest.mark.parametrize("when", ["after_start_sending", "after_offer"])
def test_disconnect_mid_handshake_leaves_nothing(server: RelayServer, when: str) -> None:
    async def body(c: Clients) -> None:
        watcher = await c.signal("watcher")
        s = await c.signal("quitter")
        await s.send({"type": "start_sending"})
        ready = await s.expect("sender_ready")
        sid = ready.get("stream_id")
        pc = None
        try:
            if when == "after_offer":
                pc, sdp = await _audio_offer()
                await s.send({"type": "webrtc_offer", "offer": {"type": "offer", "sdp": sdp}})
            await s.close()
            await c.wait_health(health_idle, 5, "nothing left")
            await settle(1.0)
            announced = [m.get("stream_id") for m in watcher.of_type("stream_available")]
            for a in announced:
                assert a == sid or sid is None, (announced, sid)
                assert watcher.count("stream_ended", stream_id=a) == 1, watcher.of_type("stream_ended")
            assert await watcher.request_streams() == []
        finally:
            if pc is not None:
                await pc.close()

    relay(server, body)


def test_many_clients_churn(server: RelayServer) -> None:
    """A bounded burst of connect/disconnect cycles leaves the server clean and serving."""

    async def body(c: Clients) -> None:
        snd = await c.sender(440)
        for i in range(5):
            rs = [await c.receiver(snd.stream_id, name=f"churn{i}_{j}") for j in range(3)]
            await asyncio.gather(*(r.wait_audio(0.3) for r in rs))
            for r in rs:
                await r.close()
                await r.signal.close()
        await c.wait_health(lambda h: h["receivers"] == 0 and h["senders"] == 1, 10, "churned receivers gone")
        r = await c.receiver(snd.stream_id, name="final")
        await r.wait_audio(1.5)
        assert_tone(r, 440)

    relay(server, body, 90)
