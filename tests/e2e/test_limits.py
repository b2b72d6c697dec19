"""Resource limits, timeouts, /metrics and abandoned peers.

Every test starts its own server with the options under test (the ``server``
fixture below takes them through indirect parametrization) and checks three
things: the limit is enforced with a clear answer, the clients that stayed
within it are unaffected, and the server's counters say what happened.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import time
from typing import Callable

from aiortc import RTCPeerConnection, RTCSessionDescription
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from clients import (
    Clients,
    Signal,
    ToneReceiver,
    ToneSender,
    ToneTrack,
    assert_tone,
    get_json,
    health_idle,
    http,
    rtc_config,
    wait_until,
)
from conftest import with_args
from relay_server import RelayServer
from test_relay import relay

# How long the media thread may take to publish its counters (it does so every ~0.5 s).
PUBLISH = 2.0


# ---------------------------------------------------------------------------
# /metrics
# ---------------------------------------------------------------------------


class Metrics:
    """One scrape of /metrics, parsed by the reference Prometheus parser."""

    def __init__(self, text: str):
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for fam in self.families.values():
            for s in fam.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def get(self, name: str, **labels: str) -> float:
        """A sample's value; 0 for a labelled counter that has not been touched yet."""
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def labels_of(self, name: str) -> list[dict[str, str]]:
        return [dict(k[1]) for k in self.samples if k[0] == name]


async def scrape(base_url: str) -> Metrics:
    r = await http("GET", base_url + "/metrics")
    assert r.status == 200, f"/metrics -> {r.status}"
    ctype = r.headers.get("content-type", "")
    assert ctype.startswith("text/plain"), ctype
    text = r.body.decode("utf-8")
    try:
        return Metrics(text)
    except Exception as e:  # noqa: BLE001 - the parser's error is the finding
        raise AssertionError(f"/metrics does not parse as Prometheus text: {e}\n{text[:2000]}") from e


async def wait_metric(base_url: str, pred: Callable[[Metrics], bool], what: str,
                      timeout: float = PUBLISH + 3) -> Metrics:
    deadline = time.monotonic() + timeout
    while True:
        m = await scrape(base_url)
        if pred(m):
            return m
        if time.monotonic() >= deadline:
            raise AssertionError(f"/metrics never showed {what} within {timeout:.1f}s")
        await asyncio.sleep(0.2)


def limit_hits(m: Metrics, limit: str) -> float:
    return m.get("voice_relay_limit_hits_total", limit=limit)


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


async def expect_code(s: Signal, code: str, timeout: float = 5.0) -> dict:
    msg = await s.expect_error(timeout)
    assert msg.get("code") == code, f"{s.name}: expected error {code}, got {msg}"
    return msg


async def still_hears(rx: ToneReceiver, freq: float, seconds: float = 1.0) -> None:
    t = time.monotonic()
    await rx.sink.wait_more(seconds, seconds + 5)
    got = rx.sink.frames_since(t)
    assert got >= int(seconds * 40), f"{rx.signal.name}: only {got} frames in ~{seconds:.1f}s"
    assert_tone(rx, freq)
    assert not rx.ended, f"{rx.signal.name}: track ended"


async def answer_then_vanish(s: Signal) -> None:
    """Answer the server's pending offer with an aiortc peer that is closed before it can do ICE."""
    offer = await s.expect("webrtc_offer", 10)
    pc = RTCPeerConnection(rtc_config())
    await pc.setRemoteDescription(RTCSessionDescription(sdp=offer["offer"]["sdp"], type="offer"))
    await pc.setLocalDescription(await pc.createAnswer())
    sdp = pc.localDescription.sdp
    await pc.close()
    await s.send({"type": "webrtc_answer", "answer": {"type": "answer", "sdp": sdp}})


async def dead_offer_sdp() -> str:
    """A genuine Opus offer whose peer connection is already closed (nobody will ever do ICE)."""
    pc = RTCPeerConnection(rtc_config())
    pc.addTransceiver("audio", direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def ws_refused(url: str) -> int | None:
    """Try a WebSocket upgrade; the HTTP status if it was refused, None if it was accepted."""
    try:
        ws = await asyncio.wait_for(ws_connect(url, open_timeout=5, ping_interval=None, close_timeout=1), 6)
    except InvalidStatus as e:
        return e.response.status_code
    await ws.close()
    return None


class Mp3Listener:
    """A raw HTTP/1.1 MP3 client that keeps its connection open and counts body bytes."""

    def __init__(self, port: int, path: str):
        self.port = port
        self.path = path
        self.status = 0
        self.headers: dict[str, str] = {}
        self.bytes = 0
        self.body = b""
        self._task: asyncio.Task | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self, timeout: float = 10.0) -> "Mp3Listener":
        reader, self._writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), timeout)
        self._writer.write(f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n\r\n".encode())
        await self._writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        for ln in lines[1:]:
            if ":" in ln:
                k, v = ln.split(":", 1)
                self.headers[k.strip().lower()] = v.strip()
        self._task = asyncio.create_task(self._pump(reader))
        return self

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                return
            self.bytes += len(chunk)
            if len(self.body) < 8192:
                self.body += chunk

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._writer is not None:
            self._writer.close()


# ---------------------------------------------------------------------------
# Stream and receiver limits
# ---------------------------------------------------------------------------


@with_args("--max-streams", "1")
def test_max_streams(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        first = await c.sender(440)
        rx = await c.receiver(first.stream_id, name="rx")
        await rx.wait_audio(0.5)

        s2 = await c.signal("second_sender")
        second = c.track(ToneSender(s2, 1000))
        await s2.send({"type": "start_sending"})
        await s2.expect("sender_ready")
        second.pc.addTransceiver(second.track, direction="sendonly")
        await second.pc.setLocalDescription(await second.pc.createOffer())
        await s2.send({"type": "webrtc_offer",
                       "offer": {"type": "offer", "sdp": second.pc.localDescription.sdp}})
        err = await expect_code(s2, "limit_streams")
        assert "1" in err["message"], f"the message should name the limit: {err}"
        assert s2.count("webrtc_answer") == 0
        await s2.ping()

        await still_hears(rx, 440)
        assert await s2.request_streams() == [first.stream_id]
        h = await c.wait_health(lambda h: h["senders"] == 1, what="one sender")
        assert h["active_streams"] == [first.stream_id], h
        m = await scrape(server.http)
        assert limit_hits(m, "streams") == 1, m.labels_of("voice_relay_limit_hits_total")
        assert m.get("voice_relay_errors_total", code="limit_streams") == 1
        assert m.get("voice_relay_streams") == 1

        # The limit frees up when the first stream ends: the refused client can now send.
        await first.stop_stream()
        await c.wait_health(lambda h: h["active_streams"] == [], what="first stream gone")
        retry = c.track(ToneSender(s2, 1000))
        sid = await retry.start()
        rx2 = await c.receiver(sid, name="rx2")
        await rx2.wait_audio(1.0)
        assert_tone(rx2, 1000)

    relay(server, body)


@with_args("--max-receivers-per-stream", "1", "--max-receivers", "2")
def test_max_receivers(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        a = await c.sender(440)
        b = await c.sender(1000)
        extra = await c.sender(700)
        ra = await c.receiver(a.stream_id, name="rxA")
        await ra.wait_audio(0.5)

        # A second receiver of stream A: the per-stream limit.
        late = await c.signal("lateA")
        await late.send({"type": "start_receiving", "stream_id": a.stream_id})
        err = await expect_code(late, "limit_receivers_per_stream")
        assert late.count("webrtc_offer") == 0

        # Stream B still has room: the limit is per stream.
        rb = await c.receiver(b.stream_id, name="rxB")
        await rb.wait_audio(0.5)

        # Now 2 receivers in all: the global limit refuses a third stream's first receiver.
        third = await c.signal("rxExtra")
        await third.send({"type": "start_receiving", "stream_id": extra.stream_id})
        await expect_code(third, "limit_receivers")
        assert third.count("webrtc_offer") == 0
        assert "1" in err["message"]

        await still_hears(ra, 440)
        await still_hears(rb, 1000)
        h = await c.health()
        assert h["receivers"] == 2 and h["senders"] == 3, h
        m = await scrape(server.http)
        assert limit_hits(m, "receivers_per_stream") == 1
        assert limit_hits(m, "receivers") == 1
        assert m.get("voice_relay_receivers") == 2

        # When rxA leaves, the refused client gets in.
        await ra.signal.send({"type": "stop_stream"})
        await ra.wait_ended(10)
        await c.wait_health(lambda h: h["receivers"] == 1, what="rxA released")
        again = c.track(ToneReceiver(late))
        await again.start(a.stream_id)
        await again.wait_audio(1.0)
        assert_tone(again, 440)

    relay(server, body)


# ---------------------------------------------------------------------------
# Connection and message limits
# ---------------------------------------------------------------------------


@with_args("--max-connections-per-ip", "3")
def test_max_connections_per_ip(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        snd = await c.sender(440)  # connection 1
        rx = await c.receiver(snd.stream_id, name="rx")  # connection 2
        idle = await c.signal("idle")  # connection 3
        await rx.wait_audio(0.5)

        status = await ws_refused(server.ws)
        assert status == 429, f"4th WebSocket from one address: expected HTTP 429, got {status}"
        status = await ws_refused(server.ws_root)
        assert status == 429, f"4th WebSocket on /: expected HTTP 429, got {status}"
        # Plain HTTP is not a WebSocket connection and is still served.
        assert (await c.health())["status"] == "healthy"

        await snd.signal.ping()
        await idle.ping()
        await still_hears(rx, 440)

        # After one closes, a new connection is accepted (once the server has noticed).
        await idle.close()
        c.signals.remove(idle)
        deadline = time.monotonic() + 5
        while (status := await ws_refused(server.ws)) is not None:
            assert status == 429, status
            assert time.monotonic() < deadline, "a closed connection's slot was never freed"
            await asyncio.sleep(0.1)
        fresh = await c.signal("fresh")
        assert await fresh.request_streams() == [snd.stream_id]

        m = await scrape(server.http)
        assert limit_hits(m, "connections_per_ip") >= 2
        assert m.get("voice_relay_websocket_clients") == 3

    relay(server, body)


@with_args("--max-messages-per-sec", "5")
def test_max_messages_per_sec(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        snd = await c.sender(440)
        rx = await c.receiver(snd.stream_id, name="rx")
        await rx.wait_audio(0.5)
        bystander = await c.signal("bystander")
        flood = await c.signal("flooder")
        before = await scrape(server.http)

        burst = 50
        for _ in range(burst):
            await flood.send({"type": "get_available_streams"})
        await bystander.ping()  # another socket is served during the flood
        await asyncio.sleep(1.0)

        answered = flood.count("available_streams") - 1  # minus the greeting
        errors = flood.of_type("error")
        codes = {e.get("code") for e in errors}
        assert 5 <= answered < burst, f"{answered} of {burst} answered (limit 5/s, bursts of 10)"
        assert codes == {"limit_messages_per_sec"}, errors
        assert all(str(e.get("message", "")).strip() for e in errors), errors
        assert len(errors) <= 2, f"the flooder was told {len(errors)} times in ~1 s: {errors}"
        assert not flood.closed.is_set(), "the flooder's socket was closed"

        after = await scrape(server.http)
        refused = burst - answered
        hits = limit_hits(after, "messages_per_sec") - limit_hits(before, "messages_per_sec")
        assert hits == refused, f"limit_hits{{messages_per_sec}} grew by {hits}, {refused} messages were refused"
        err_delta = (after.get("voice_relay_errors_total", code="limit_messages_per_sec")
                     - before.get("voice_relay_errors_total", code="limit_messages_per_sec"))
        assert err_delta == len(errors)

        await asyncio.sleep(0.2)  # > 1 s since the burst: tokens are back
        assert await flood.request_streams() == [snd.stream_id]
        await still_hears(rx, 440)

    relay(server, body)


@with_args("--max-listeners-per-stream", "1")
def test_max_mp3_listeners_per_stream(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        a = await c.sender(440)
        b = await c.sender(1000)
        first = await Mp3Listener(server.port, f"/stream/{a.stream_id}.mp3").open()
        listeners = [first]
        try:
            assert first.status == 200, first.status
            assert first.headers.get("content-type", "").startswith("audio/mpeg"), first.headers
            await wait_until(lambda: first.bytes > 4000, 5, what="first MP3 listener's bytes")

            second = await Mp3Listener(server.port, f"/stream/{a.stream_id}.mp3").open()
            listeners.append(second)
            assert second.status == 503, f"second listener of one stream: {second.status}"
            latest = await Mp3Listener(server.port, "/stream/latest.mp3").open()
            listeners.append(latest)
            # latest.mp3 is stream b (the newest), which still has room.
            assert latest.status == 200, latest.status
            assert (await http("HEAD", f"{server.http}/stream/{a.stream_id}.mp3")).status == 200

            got = first.bytes
            await asyncio.sleep(1.0)
            assert first.bytes > got + 8000, "the first listener stopped receiving (128 kbit/s ~ 16 kB/s)"
            m = await scrape(server.http)
            assert limit_hits(m, "listeners") == 1
            assert m.get("voice_relay_mp3_listeners") == 2
            st = await get_json(server.http + "/stream/status")
            assert st.get("mp3_listeners", {}).get(a.stream_id) == 1, st

            # Once the first listener hangs up, the slot is freed.
            await first.close()
            listeners.remove(first)
            deadline = time.monotonic() + 5
            while True:
                again = await Mp3Listener(server.port, f"/stream/{a.stream_id}.mp3").open()
                listeners.append(again)
                if again.status == 200:
                    break
                assert again.status == 503, again.status
                assert time.monotonic() < deadline, "a closed MP3 listener's slot was never freed"
                await asyncio.sleep(0.2)
        finally:
            for li in listeners:
                await li.close()

    relay(server, body)


def padded(size: int) -> str:
    """A get_available_streams message of exactly ``size`` bytes."""
    head = '{"type": "get_available_streams", "pad": "'
    return head + "p" * (size - len(head) - 2) + '"}'


@with_args("--max-message-bytes", "2048")
def test_max_message_bytes(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        snd = await c.sender(440)
        rx = await c.receiver(snd.stream_id, name="rx")
        await rx.wait_audio(0.5)
        s = await c.signal("big")
        await s.send_text(padded(2048))
        assert (await s.expect("available_streams"))["streams"] == [snd.stream_id], "2048 bytes is allowed"
        await s.send_text(padded(2049))
        err = await expect_code(s, "message_too_large")
        assert "2048" in err["message"], err
        await asyncio.wait_for(s.closed.wait(), 5)
        assert s.close_code == 1009, f"close code {s.close_code}, expected 1009 (message too big)"
        await still_hears(rx, 440)
        await snd.signal.ping()
        await c.wait_health(lambda h: h.get("websocket_clients") == 2, 5, "the big socket released")

    relay(server, body)


@with_args("--max-message-bytes", "2048")
def test_oversized_message_followed_by_another(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        s = await c.signal("big")
        try:
            await s.send_text(padded(200_000))
            for _ in range(10):  # already on the wire when the server gives up
                await s.send({"type": "get_available_streams"})
        except ConnectionClosed:
            pass
        await asyncio.wait_for(s.closed.wait(), 5)
        errors = [m.get("code") for m in s.of_type("error")]
        assert errors == ["message_too_large"] and s.close_code == 1009, (
            f"errors {errors}, close code {s.close_code}; expected message_too_large then close 1009")

    relay(server, body)


# ---------------------------------------------------------------------------
# Timeouts
# ---------------------------------------------------------------------------


HANDSHAKE_REASON = "ICE/DTLS handshake timed out"


@with_args("--handshake-timeout-secs", "2")
def test_handshake_timeout_frees_peers(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        watcher = await c.signal("watcher")
        live = await c.sender(440)
        rx = await c.receiver(live.stream_id, name="rx")
        await rx.wait_audio(0.5)
        before = await scrape(server.http)

        # A receiver that answers but never does ICE.
        ghost_rx = await c.signal("ghost_rx")
        await ghost_rx.send({"type": "start_receiving", "stream_id": live.stream_id})
        await answer_then_vanish(ghost_rx)
        # A sender whose offer is answered but who never does ICE.
        ghost_tx = await c.signal("ghost_tx")
        await ghost_tx.send({"type": "start_sending"})
        ghost_sid = (await ghost_tx.expect("sender_ready"))["stream_id"]
        await ghost_tx.send({"type": "webrtc_offer", "offer": {"type": "offer", "sdp": await dead_offer_sdp()}})
        await ghost_tx.expect("webrtc_answer")
        t0 = time.monotonic()

        h = await c.wait_health(lambda h: h["receivers"] == 2 and h["senders"] == 2, 3, "ghosts counted")
        assert h["active_streams"] == [live.stream_id, ghost_sid], h
        await asyncio.sleep(1.0)
        h = await c.health()
        assert h["receivers"] == 2 and h["senders"] == 2, f"ghosts dropped before the 2 s timeout: {h}"

        await c.wait_health(lambda h: h["receivers"] == 1 and h["senders"] == 1, 5, "ghosts freed")
        took = time.monotonic() - t0
        assert took <= 5.0, took
        for s in (watcher, ghost_tx):
            await s.expect("stream_ended", 3, where=lambda m: m.get("stream_id") == ghost_sid)
        m = await wait_metric(
            server.http,
            lambda m: m.get("voice_relay_peers_closed_total", reason=HANDSHAKE_REASON)
            >= before.get("voice_relay_peers_closed_total", reason=HANDSHAKE_REASON) + 2,
            "2 more handshake timeouts",
        )
        assert m.get("voice_relay_peers_closed_total", reason=HANDSHAKE_REASON) == 2, m.labels_of(
            "voice_relay_peers_closed_total")

        # The connected peers were not touched, and the ghosts' sockets still work.
        await still_hears(rx, 440)
        assert await ghost_rx.request_streams() == [live.stream_id]
        await ghost_tx.ping()
        await asyncio.sleep(0.5)
        assert watcher.count("stream_ended", stream_id=ghost_sid) == 1
        assert watcher.count("stream_ended", stream_id=live.stream_id) == 0

    relay(server, body)


@with_args("--handshake-timeout-secs", "2")
def test_unanswered_offer_frees_its_slot(server: RelayServer) -> None:
    """A receiver that gets the server's offer and never answers, its socket left open, holds its
    receiver slot only until the handshake timeout: then the slot is free, the client is told with
    an ``error``, and its socket stays usable."""

    async def body(c: Clients) -> None:
        live = await c.sender(440)
        rx = await c.receiver(live.stream_id, name="rx")
        await rx.wait_audio(0.5)
        mute = await c.signal("mute")
        await mute.send({"type": "start_receiving", "stream_id": live.stream_id})
        await mute.expect("webrtc_offer", 5)
        await c.wait_health(lambda h: h["receivers"] == 2, 3, "the offered receiver counted")

        await c.wait_health(lambda h: h["receivers"] == 1, 8, "the unanswered receiver freed")
        err = await expect_code(mute, "answer_timeout", 3)
        assert "2" in err["message"], f"the message should name the timeout: {err}"
        await still_hears(rx, 440)
        # The socket still works: a new request gets a new offer (and a new slot).
        await mute.send({"type": "start_receiving", "stream_id": live.stream_id})
        await mute.expect("webrtc_offer", 5)
        await c.wait_health(lambda h: h["receivers"] == 2, 3, "the new offer counted")

    relay(server, body)


class StallingTone(ToneTrack):
    """A tone that plays for ``play`` seconds, then its recv() never returns (a hung microphone)."""

    def __init__(self, freq: float, play: float):
        super().__init__(freq)
        self.play = play
        self.stalled_at: float | None = None
        self._first: float | None = None

    async def recv(self):  # noqa: ANN201
        now = time.monotonic()
        if self._first is None:
            self._first = now
        if now - self._first >= self.play:
            if self.stalled_at is None:
                self.stalled_at = now
            await asyncio.Event().wait()  # forever (cancelled when the pc closes)
        return await super().recv()


@with_args("--sender-idle-secs", "2")
def test_sender_idle_ends_stream_once(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        watcher = await c.signal("watcher")
        s = await c.signal("staller")
        snd = c.track(ToneSender(s, 440))
        snd.track = StallingTone(440, 1.5)
        sid = await snd.start()
        rx = await c.receiver(sid, name="rx")
        await rx.wait_audio(0.3)
        await wait_until(lambda: snd.track.stalled_at is not None, 5, what="the track to stall")
        stalled = snd.track.stalled_at
        assert stalled is not None
        # Within the idle limit nothing happens: the peer is up, only the audio stopped.
        await asyncio.sleep(max(0.0, stalled + 1.0 - time.monotonic()))
        assert snd.pc.connectionState == "connected", snd.pc.connectionState
        assert (await c.health())["active_streams"] == [sid], "the stream ended before the idle limit"

        ended = await watcher.expect("stream_ended", 8, where=lambda m: m.get("stream_id") == sid)
        quiet = watcher.times[watcher.messages.index(ended)] - stalled
        assert 1.5 <= quiet <= 4.5, f"stream ended {quiet:.2f}s after the audio stopped (idle limit 2 s)"
        await s.expect("stream_ended", 3, where=lambda m: m.get("stream_id") == sid)
        await rx.wait_ended(10)
        await c.wait_health(health_idle, 5, "idle after the stall")
        await asyncio.sleep(1.0)
        for w in (watcher, s, rx.signal):
            assert w.count("stream_ended", stream_id=sid) == 1, f"{w.name}: {w.of_type('stream_ended')}"
        m = await wait_metric(
            server.http,
            lambda m: m.get("voice_relay_peers_closed_total", reason="sender sent no audio") >= 1,
            "an idle-sender close",
        )
        assert m.get("voice_relay_peers_closed_total", reason="sender sent no audio") == 1
        assert m.get("voice_relay_streams") == 0
        await s.ping()

    relay(server, body)


# ---------------------------------------------------------------------------
# /metrics against /health
# ---------------------------------------------------------------------------


@with_args("--max-streams", "2")
def test_metrics_parse_and_match_health(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        m0 = await scrape(server.http)
        names = sorted(m0.families)
        for name in ("voice_relay_streams", "voice_relay_receivers", "voice_relay_senders",
                     "voice_relay_mp3_listeners", "voice_relay_rtp_packets_in",
                     "voice_relay_handshake_seconds"):
            assert name in names, f"/metrics lacks {name}: {names}"
        assert m0.families["voice_relay_handshake_seconds"].type == "histogram"
        assert m0.families["voice_relay_streams"].type == "gauge"
        assert m0.families["voice_relay_rtp_packets_in"].type == "counter"
        for fam in m0.families.values():
            assert fam.name.startswith("voice_relay_"), fam.name

        a = await c.sender(440)
        b = await c.sender(1000)
        rxs = [await c.receiver(a.stream_id, name="rxA1"), await c.receiver(a.stream_id, name="rxA2"),
               await c.receiver(b.stream_id, name="rxB")]
        for r in rxs:
            await r.wait_audio(0.3)
        mp3 = await Mp3Listener(server.port, f"/stream/{b.stream_id}.mp3").open()
        try:
            assert mp3.status == 200
            # One limit hit: a third stream.
            s3 = await c.signal("third")
            await s3.send({"type": "start_sending"})
            await s3.expect("sender_ready")
            await s3.send({"type": "webrtc_offer", "offer": {"type": "offer", "sdp": await dead_offer_sdp()}})
            await expect_code(s3, "limit_streams")

            h = await c.health()
            m = await scrape(server.http)
            assert m.get("voice_relay_streams") == len(h["active_streams"]) == 2, h
            assert m.get("voice_relay_senders") == h["senders"] == 2, h
            assert m.get("voice_relay_receivers") == h["receivers"] == 3, h
            assert m.get("voice_relay_websocket_clients") == h.get("websocket_clients") == 6, h
            assert m.get("voice_relay_mp3_listeners") == sum(h.get("mp3_listeners", {}).values()) == 1, h
            assert limit_hits(m, "streams") == 1
            assert m.get("voice_relay_errors_total", code="limit_streams") == 1
            assert m.get("voice_relay_handshake_seconds_count") >= 5, "5 peers connected"
            assert 0 < m.get("voice_relay_handshake_seconds_sum") < 5 * 10
            assert m.get("voice_relay_handshake_seconds_bucket", le="+Inf") == m.get(
                "voice_relay_handshake_seconds_count")

            # RTP counters keep moving: two 50 pkt/s senders, three receivers.
            p0 = m.get("voice_relay_rtp_packets_in_total")
            o0 = m.get("voice_relay_rtp_packets_out_total")
            await asyncio.sleep(2.0)
            m2 = await scrape(server.http)
            din = m2.get("voice_relay_rtp_packets_in_total") - p0
            dout = m2.get("voice_relay_rtp_packets_out_total") - o0
            assert 120 <= din <= 300, f"{din} RTP packets in over ~2 s from two senders"
            assert 200 <= dout <= 450, f"{dout} RTP packets out over ~2 s to three receivers"
            # Once a receiver is connected, the relay protects its copies itself.
            drelay = (m2.get("voice_relay_rtp_protected_total", by="relay")
                      - m.get("voice_relay_rtp_protected_total", by="relay"))
            assert drelay == dout, f"{drelay} of {dout} copies protected by the relay"
        finally:
            await mp3.close()

        # Gauges follow /health down as well.
        await a.stop_stream()
        h = await c.wait_health(lambda h: h["senders"] == 1 and h["receivers"] == 1, what="stream A gone")
        m = await scrape(server.http)
        assert m.get("voice_relay_streams") == len(h["active_streams"]) == 1
        assert m.get("voice_relay_receivers") == h["receivers"] == 1

    relay(server, body)


# ---------------------------------------------------------------------------
# Abandoned and half-open peers
# ---------------------------------------------------------------------------


@with_args("--handshake-timeout-secs", "4")
def test_offer_then_vanish(server: RelayServer) -> None:
    """Clients that send an offer and disappear: politely, abruptly, before or after ICE."""

    async def body(c: Clients) -> None:
        watcher = await c.signal("watcher")
        live = await c.sender(440)
        rx = await c.receiver(live.stream_id, name="rx")
        await rx.wait_audio(0.5)
        offer = await dead_offer_sdp()
        pcs: list[RTCPeerConnection] = []
        try:
            # 1) start_sending + offer back to back, close the socket without reading a reply.
            for i in range(3):
                s = await Signal.connect(server.ws, f"vanish{i}")
                await s.send({"type": "start_sending"})
                await s.send({"type": "webrtc_offer", "offer": {"type": "offer", "sdp": offer}})
                await s.close()
            # 2) a sender that is answered, then its TCP connection dies without a close frame
            #    while its peer connection is live and sending audio.
            for i in range(2):
                s = await c.signal(f"abort{i}")
                snd = ToneSender(s, 1000)
                pcs.append(snd.pc)
                sid = await snd.start()
                await watcher.expect("stream_available", 5, where=lambda m, sid=sid: m.get("stream_id") == sid)
                s.ws.transport.abort()
            # 3) a receiver that gets the server's offer and leaves before answering.
            s = await Signal.connect(server.ws, "rx_vanish")
            await s.send({"type": "start_receiving", "stream_id": live.stream_id})
            await s.expect("webrtc_offer", 5)
            await s.close()

            await c.wait_health(lambda h: h["senders"] == 1 and h["receivers"] == 1
                                and h["active_streams"] == [live.stream_id], 8, "only the live stream left")
            await asyncio.sleep(1.0)
            announced = {m["stream_id"] for m in watcher.of_type("stream_available")} - {live.stream_id}
            assert len(announced) >= 2, f"the two answered senders were never announced: {announced}"
            for sid in announced:
                assert watcher.count("stream_ended", stream_id=sid) == 1, (sid, watcher.of_type("stream_ended"))
            assert await watcher.request_streams() == [live.stream_id]
            await still_hears(rx, 440)
        finally:
            for pc in pcs:
                await pc.close()
        await c.wait_health(lambda h: h.get("websocket_clients") == 3, 5, "vanished sockets released")

    relay(server, body)


def stun_binding_request(rng: random.Random) -> bytes:
    """An RFC 5389 Binding Request with a random (wrong) USERNAME and no integrity."""
    uname = f"{rng.getrandbits(64):016x}:{rng.getrandbits(32):08x}".encode()
    pad = (4 - len(uname) % 4) % 4
    attr = struct.pack("!HH", 0x0006, len(uname)) + uname + b"\x00" * pad
    return struct.pack("!HHI", 0x0001, len(attr), 0x2112A442) + rng.randbytes(12) + attr


def flood_udp(port: int, seed: int, count: int, seconds: float) -> int:
    """Send ``count`` datagrams (mostly STUN with wrong credentials, some garbage) over ``seconds``."""
    rng = random.Random(seed)
    sent = 0
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        batch = 100
        pause = seconds / (count / batch)
        for i in range(count):
            if i % 10 == 9:
                data = rng.randbytes(rng.randint(1, 300))  # junk of any kind
            else:
                data = stun_binding_request(rng)
            socks[i % len(socks)].sendto(data, ("127.0.0.1", port))
            sent += 1
            if i % batch == batch - 1:
                time.sleep(pause)
    finally:
        for s in socks:
            s.close()
    return sent


def test_stun_flood_with_wrong_credentials(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        live = await c.sender(440)
        rx = await c.receiver(live.stream_id, name="rx")
        await rx.wait_audio(1.0)
        await asyncio.sleep(PUBLISH)
        before = await scrape(server.http)
        count, seconds = 4000, 2.0
        t0 = time.monotonic()
        sent = await asyncio.to_thread(flood_udp, server.port, 0x5EED, count, seconds)
        t1 = time.monotonic()
        assert sent == count
        frames = rx.sink.frames_since(t0)
        assert frames >= 0.8 * 50 * (t1 - t0), f"receiver got {frames} frames during a {t1 - t0:.1f}s flood"
        assert_tone(rx, 440, min_purity=0.8)
        await still_hears(rx, 440)
        assert_tone(rx, 440, min_purity=0.8)

        m = await wait_metric(
            server.http,
            lambda m: m.get("voice_relay_udp_dropped_total", reason="unrouted")
            - before.get("voice_relay_udp_dropped_total", reason="unrouted") >= 0.9 * count,
            f"~{count} unrouted datagrams",
        )
        grew = (m.get("voice_relay_udp_dropped_total", reason="unrouted")
                - before.get("voice_relay_udp_dropped_total", reason="unrouted"))
        assert grew <= count + 50, f"unrouted grew by {grew} for {count} datagrams sent"
        h = await c.health()
        assert h["senders"] == 1 and h["receivers"] == 1 and h["active_streams"] == [live.stream_id], h

        await live.stop_stream()
        await rx.wait_ended(10)
        await rx.close()
        await c.wait_health(health_idle, 5, "0 senders, 0 receivers")

    relay(server, body)

