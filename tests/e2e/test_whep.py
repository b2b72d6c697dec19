"""WHEP playback: an aiortc player offers recvonly audio over HTTP and hears
a WebSocket sender's (or a WHIP publisher's) stream; DELETE, latest, errors."""

from __future__ import annotations

import asyncio

from clients import Clients, assert_tone, health_idle
from relay_server import RelayServer
from test_whip import relay
from whip_clients import WhepPlayer, WhipPublisher, request


def test_whep_player_hears_a_websocket_sender(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        snd = await c.sender(440)
        player = c.track(WhepPlayer(server.http, f"/whep/{snd.stream_id}"))
        reply = await player.start()
        assert reply.headers["content-type"] == "application/sdp", reply.headers
        assert player.location and player.location.startswith("/whep/session/"), player.location
        assert "a=sendonly" in reply.text and "a=candidate:" in reply.text, reply.text
        await player.sink.wait_seconds(1.5, timeout=10)
        assert_tone(player.sink, 440)
        h = await c.health()
        assert (h["senders"], h["receivers"]) == (1, 1), h
        deleted = await player.delete()
        assert deleted.status == 200, deleted
        await c.wait_health(lambda h: h["receivers"] == 0 and h["senders"] == 1, 5, "player gone")
        assert (await player.delete()).status == 404

    relay(server, body)


def test_whep_latest_plays_a_whip_stream_and_closes_when_it_ends(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        pub = c.track(WhipPublisher(server.http, "/whip/mixed", 587))
        await pub.start()
        player = c.track(WhepPlayer(server.http, "/whep/latest"))
        await player.start()
        await player.sink.wait_seconds(1.5, timeout=10)
        assert_tone(player.sink, 587)
        assert (await pub.delete()).status == 200
        try:
            await asyncio.wait_for(player.sink.ended.wait(), 10)
        except asyncio.TimeoutError:
            raise AssertionError(f"WHEP player's track did not end (pc {player.pc.connectionState})") from None
        await c.wait_health(health_idle, 5, "idle after the stream ended")
        # The session went with its peer.
        assert (await player.delete()).status == 404

    relay(server, body)


def test_whep_errors(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        latest = await c.track(WhepPlayer(server.http, "/whep/latest")).start(expect=409)
        assert latest.headers.get("retry-after"), latest.headers
        await c.track(WhepPlayer(server.http, "/whep/stream_nope")).start(expect=404)
        snd = await c.sender(440)
        garbage = await request("POST", f"{server.http}/whep/{snd.stream_id}", "not sdp")
        assert garbage.status == 400, garbage
        wrong = await request("POST", f"{server.http}/whep/{snd.stream_id}", "v=0", "text/plain")
        assert wrong.status == 415, wrong
        assert (await request("DELETE", server.http + "/whep/session/0123")).status == 404
        assert (await c.health())["receivers"] == 0

    relay(server, body)
