"""WHIP ingest (RFC 9725): FFmpeg's whip muxer and aiortc publish; WebSocket
receivers and MP3 listeners hear them; DELETE, limits, tokens and bad input."""

from __future__ import annotations

import asyncio

from clients import Clients, Signal, assert_tone, health_idle, run
from conftest import with_args
from relay_server import RelayServer
from test_mp3 import assert_clean_tone, ffmpeg_capture, mp3_url
from whip_clients import FfmpegWhip, WhipPublisher, m_lines, offer_sdp, request


def relay(server: RelayServer, body, timeout: float = 60.0) -> None:  # noqa: ANN001
    async def main() -> None:
        async with Clients(server.ws, server.http) as c:
            await body(c)

    run(main(), timeout)


async def ended_once(sig: Signal, stream_id: str, timeout: float = 10.0) -> None:
    """``stream_ended`` for ``stream_id`` arrives, and only once."""
    await sig.expect("stream_ended", timeout, where=lambda m: m.get("stream_id") == stream_id)
    await asyncio.sleep(1.0)
    n = sum(1 for m in sig.messages if m.get("type") == "stream_ended" and m.get("stream_id") == stream_id)
    assert n == 1, f"stream_ended for {stream_id} arrived {n} times"


# The sender idle timeout is longer than any wait here: a stream that ends
# within the test ended by DELETE.
@with_args("--sender-idle-secs", "60")
def test_ffmpeg_whip_publishes_to_websocket_receivers_and_mp3(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        watcher = await c.signal("watcher")
        ff = FfmpegWhip(server.http + "/whip/ff-studio", 440)
        await ff.start()
        try:
            await watcher.expect("stream_available", 15, where=lambda m: m.get("stream_id") == "ff-studio")
            rx = await c.receiver("ff-studio", name="ws-receiver")
            await rx.wait_audio(2.0, timeout=15)
            assert_tone(rx, 440)
            cap = await ffmpeg_capture(mp3_url(server, "ff-studio"), 3.0)
            assert cap.returncode == 0, cap.stderr[-500:]
            assert_clean_tone(cap, 440, "mp3 of a WHIP stream")
            h = await c.health()
            assert h["senders"] == 1 and h["active_streams"] == ["ff-studio"], h
            assert ff.running(), ff.log()
        finally:
            await ff.stop()
        # FFmpeg's DELETE on our absolute Location ends the stream.
        await ended_once(watcher, "ff-studio")
        await rx.wait_ended(10)
        await c.wait_health(health_idle, 5, "idle after DELETE")
        assert "session deleted by its client" in server.log_text(), ff.log()

    relay(server, body, 90)


# A WHIP client that vanishes (killed: no DELETE, no DTLS close) ends its
# stream through the sender idle timeout, as a WebSocket sender's would.
@with_args("--sender-idle-secs", "3")
def test_vanished_whip_client_ends_by_idle_timeout(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        watcher = await c.signal("watcher")
        ff = FfmpegWhip(server.http + "/whip/gone", 440)
        await ff.start()
        try:
            await watcher.expect("stream_available", 15, where=lambda m: m.get("stream_id") == "gone")
            rx = await c.receiver("gone", name="ws-receiver")
            await rx.wait_audio(1.0, timeout=15)
            await ff.vanish()
        finally:
            await ff.stop()
        await ended_once(watcher, "gone", timeout=15)
        await rx.wait_ended(10)
        await c.wait_health(health_idle, 5, "idle after the idle timeout")
        assert "session deleted by its client" not in server.log_text(), "a killed client sent DELETE?"

    relay(server, body, 90)


@with_args("--sender-idle-secs", "60")
def test_delete_ends_the_stream_once_and_counts_return_to_zero(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        watcher = await c.signal("watcher")
        pub = WhipPublisher(server.http, "/whip", 523)
        c.track(pub)
        reply = await pub.start()
        sid = pub.stream_id
        assert sid and sid.startswith("stream_"), reply.headers
        assert pub.location == f"/whip/session/{pub.location.rsplit('/', 1)[-1]}", pub.location
        assert pub.location.startswith("/"), "Location must be an absolute path"
        assert reply.headers["content-type"] == "application/sdp", reply.headers
        assert "a=candidate:" in reply.text and "127.0.0.1" in reply.text, reply.text
        assert "link" not in reply.headers, "no ICE servers are configured: no Link headers"
        await watcher.expect("stream_available", 5, where=lambda m: m.get("stream_id") == sid)
        rx = await c.receiver(sid, name="ws-receiver")
        await rx.wait_audio(1.5)
        assert_tone(rx, 523)
        h = await c.health()
        assert (h["senders"], h["receivers"]) == (1, 1), h

        deleted = await pub.delete()
        assert deleted.status == 200, deleted
        await ended_once(watcher, sid)
        await rx.wait_ended(10)
        await c.wait_health(health_idle, 5, "idle after DELETE")
        again = await pub.delete()
        assert again.status == 404, again

    relay(server, body)


def test_obs_style_offer_gets_audio_and_a_rejected_video_line(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        reply = await request("POST", server.http + "/whip/obs", offer_sdp(["opus"], video=True))
        assert reply.status == 201, reply
        lines = m_lines(reply.text)
        assert len(lines) == 2, lines
        assert lines[0].startswith("m=audio ") and not lines[0].startswith("m=audio 0 "), lines
        assert lines[1].startswith("m=video 0 "), f"video not rejected: {lines}"
        h = await c.health()
        assert h["active_streams"] == ["obs"] and h["senders"] == 1, h
        deleted = await request("DELETE", server.http + reply.headers["location"])
        assert deleted.status == 200, deleted
        await c.wait_health(health_idle, 5, "idle after DELETE")

    relay(server, body)


def test_offer_without_opus_is_422_with_the_reason(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        reply = await request("POST", server.http + "/whip", offer_sdp(["pcmu"], video=False))
        assert reply.status == 422, reply
        assert "opus" in reply.text.lower(), reply.text
        assert health_idle(await c.health())

    relay(server, body)


def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        url = server.http + "/whip"
        big = "v=0\r\n" + "a=x:" + "y" * (1 << 20) + "\r\n"
        cases = [
            ("1 MB body", await request("POST", url, big), 413),
            ("wrong type", await request("POST", url, offer_sdp(["opus"], False), "text/plain"), 415),
            ("no type", await request("POST", url, offer_sdp(["opus"], False), None), 415),
            ("garbage SDP", await request("POST", url, "hello, not SDP"), 400),
            ("bad name", await request("POST", url + "/a.b", offer_sdp(["opus"], False)), 400),
            ("name latest", await request("POST", url + "/latest", offer_sdp(["opus"], False)), 400),
            ("unknown session", await request("DELETE", url + "/session/0123456789abcdef"), 404),
        ]
        for what, reply, want in cases:
            assert reply.status == want, f"{what}: {reply.status} (want {want}) {reply.text[:200]}"
            if want != 404:
                assert "error" in reply.text, f"{what}: no reason given: {reply.text[:200]}"
        assert health_idle(await c.health())
        # ... and it still takes a good offer.
        pub = c.track(WhipPublisher(server.http, "/whip/after-bad-input", 440))
        await pub.start()
        assert pub.stream_id == "after-bad-input"
        assert (await pub.delete()).status == 200

    relay(server, body)


def test_stream_name_taken_is_409(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        first = await request("POST", server.http + "/whip/dup", offer_sdp(["opus"], False))
        assert first.status == 201, first
        second = await request("POST", server.http + "/whip/dup", offer_sdp(["opus"], False))
        assert second.status == 409, second
        assert (await c.health())["active_streams"] == ["dup"]
        assert (await request("DELETE", server.http + first.headers["location"])).status == 200

    relay(server, body)


@with_args("--max-streams", "1")
def test_stream_limit_is_503_with_retry_after(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        first = await request("POST", server.http + "/whip", offer_sdp(["opus"], False))
        assert first.status == 201, first
        second = await request("POST", server.http + "/whip", offer_sdp(["opus"], False))
        assert second.status == 503, second
        assert second.headers.get("retry-after"), second.headers
        assert (await request("DELETE", server.http + first.headers["location"])).status == 200
        await c.wait_health(health_idle, 5, "idle after DELETE")
        third = await request("POST", server.http + "/whip", offer_sdp(["opus"], False))
        assert third.status == 201, third

    relay(server, body)


SEND = "s3nd-t0ken"
LISTEN = "l1sten-t0ken"


@with_args("--send-token", SEND, "--listen-token", LISTEN)
def test_whip_takes_the_send_token_as_bearer(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        url = server.http + "/whip"
        offer = offer_sdp(["opus"], False)
        for token in (None, "wrong", LISTEN):
            reply = await request("POST", url, offer, token=token)
            assert reply.status == 401, f"token {token}: {reply.status}"
        ok = await request("POST", url, offer, token=SEND)
        assert ok.status == 201, ok
        session = server.http + ok.headers["location"]
        assert (await request("DELETE", session)).status == 401
        assert (await request("DELETE", session, token=LISTEN)).status == 401
        assert (await request("DELETE", session, token=SEND)).status == 200

    relay(server, body)


def test_options_patch_and_cors(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        origin = {"Origin": "https://page.example", "Access-Control-Request-Method": "POST"}
        pre = await request("OPTIONS", server.http + "/whip", headers=origin)
        assert pre.status in (200, 204), pre
        h = pre.headers
        assert h.get("accept-post") == "application/sdp", h
        assert h.get("access-control-allow-origin") == "https://page.example", h
        allowed = h.get("access-control-allow-headers", "").lower()
        for name in ("authorization", "content-type", "if-match"):
            assert name in allowed, h
        exposed = h.get("access-control-expose-headers", "").lower()
        for name in ("location", "etag", "link", "accept-patch"):
            assert name in exposed, h
        made = await request("POST", server.http + "/whip", offer_sdp(["opus"], False), headers={"Origin": "https://page.example"})
        assert made.status == 201, made
        assert "location" in made.headers.get("access-control-expose-headers", "").lower(), made.headers
        session = server.http + made.headers["location"]
        frag = "a=ice-ufrag:Xb3n\r\na=ice-pwd:Nk2cQ7n0dVvE0hYk5m4T1p\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\n"
        patch = await request("PATCH", session, frag, "application/trickle-ice-sdpfrag")
        assert patch.status == 405, patch
        assert "DELETE" in patch.headers.get("allow", ""), patch.headers
        assert (await request("DELETE", session)).status == 200

    relay(server, body)


@with_args("--allowed-origin", "https://ha.example:8123")
def test_whip_honours_allowed_origins(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        url = server.http + "/whip"
        evil = {"Origin": "https://evil.example"}
        pre = await request("OPTIONS", url, headers=evil)
        assert "access-control-allow-origin" not in pre.headers, pre.headers
        refused = await request("POST", url, offer_sdp(["opus"], False), headers=evil)
        assert refused.status == 403, refused
        good = {"Origin": "https://ha.example:8123"}
        made = await request("POST", url, offer_sdp(["opus"], False), headers=good)
        assert made.status == 201, made
        assert made.headers.get("access-control-allow-origin") == "https://ha.example:8123", made.headers
        assert (await request("DELETE", server.http + made.headers["location"], headers=good)).status == 200
        await c.wait_health(health_idle, 5, "idle after DELETE")

    relay(server, body)
