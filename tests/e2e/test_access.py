"""Access control: tokens (all / send / listen) and allowed web origins.

Each test starts the server with the options under test, then checks that a
missing or wrong token (or a foreign Origin) is refused with a clear answer,
that the right one is accepted and works end to end, and that no token ever
appears in the server's log.
"""

from __future__ import annotations

import asyncio

from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from clients import Clients, assert_tone, http
from conftest import _finish, with_args
from test_relay import relay
from relay_server import RelayServer

ALL = "t0k3n-all-Secret"
SEND = "t0k3n-send-Secret"
LISTEN = "t0k3n-listen-Secret"


async def refused_status(url: str, **kw: object) -> int:
    """The HTTP status a refused WebSocket upgrade got (fails if it was accepted)."""
    try:
        ws = await ws_connect(url, open_timeout=5, **kw)
    except InvalidStatus as e:
        return e.response.status_code
    await ws.close()
    raise AssertionError(f"WebSocket upgrade to {url} was accepted")


def assert_no_token_in_log(server: RelayServer, *tokens: str) -> None:
    log = server.log_text()
    for t in tokens:
        assert t not in log, f"token {t!r} appears in the server log"


@with_args("--token", ALL)
def test_token_guards_websocket_and_http(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        ws = server.ws
        assert await refused_status(ws) == 401
        assert await refused_status(ws + "?token=wrong") == 401
        assert await refused_status(ws, additional_headers={"Authorization": "Bearer wrong"}) == 401

        good = await c.signal("sender", url=f"{ws}?token={ALL}")
        snd = await c.sender(440, signal=good)
        bearer = await ws_connect(ws, additional_headers={"Authorization": f"Bearer {ALL}"}, open_timeout=5)
        first = await asyncio.wait_for(bearer.recv(), 5)
        assert '"available_streams"' in first, first
        await bearer.close()
        rx = await c.receiver(snd.stream_id, signal=await c.signal("rx", url=f"{ws}?token={ALL}"))
        await rx.sink.wait_seconds(1.5)
        assert_tone(rx.sink, 440)

        mp3 = f"{server.http}/stream/{snd.stream_id}.mp3"
        r = await http("HEAD", mp3)
        assert r.status == 401, f"MP3 without token: {r.status}"
        r = await http("HEAD", mp3 + f"?token={ALL}")
        assert r.status == 200, f"MP3 with token: {r.status}"
        r = await http("GET", f"{server.http}/stream/status")
        assert r.status == 401
        r = await http("GET", f"{server.http}/stream/status?token={ALL}")
        assert r.status == 200 and snd.stream_id in r.json()["active_streams"]
        r = await http("GET", f"{server.http}/metrics")
        assert r.status == 401
        # Liveness stays open for monitoring.
        r = await http("GET", f"{server.http}/health")
        assert r.status == 200

    relay(server, body)
    assert_no_token_in_log(server, ALL)


@with_args("--send-token", SEND, "--listen-token", LISTEN)
def test_send_and_listen_tokens(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        ws = server.ws
        assert await refused_status(ws) == 401

        listener = await c.signal("listener", url=f"{ws}?token={LISTEN}")
        await listener.send({"type": "start_sending"})
        err = await listener.expect_error()
        assert err.get("code") == "unauthorized" and err.get("message"), err

        snd = await c.sender(440, signal=await c.signal("sender", url=f"{ws}?token={SEND}"))
        rx = await c.receiver(snd.stream_id, signal=listener)
        await rx.sink.wait_seconds(1.5)
        assert_tone(rx.sink, 440)

        r = await http("HEAD", f"{server.http}/stream/{snd.stream_id}.mp3?token={LISTEN}")
        assert r.status == 200
        r = await http("HEAD", f"{server.http}/stream/{snd.stream_id}.mp3?token=nope")
        assert r.status == 401

    relay(server, body)
    assert_no_token_in_log(server, SEND, LISTEN)


@with_args("--allowed-origin", "https://ha.example:8123")
def test_allowed_origin(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        ws = server.ws
        assert await refused_status(ws, origin="https://evil.example") == 403
        ok = await ws_connect(ws, origin="https://ha.example:8123", open_timeout=5)
        first = await asyncio.wait_for(ok.recv(), 5)
        assert '"available_streams"' in first
        await ok.close()
        # Not a browser (no Origin header): allowed.
        s = await c.signal("script")
        await s.ping()

    relay(server, body)


def test_token_file(tmp_path) -> None:  # noqa: ANN001
    token_file = tmp_path / "token"
    token_file.write_text(ALL + "\n")
    srv = RelayServer(tmp_path / "server.log", ["--token-file", str(token_file)])
    srv.start()
    try:

        async def body(c: Clients) -> None:
            assert await refused_status(srv.ws) == 401
            s = await c.signal("with-token", url=f"{srv.ws}?token={ALL}")
            await s.ping()
            r = await http("GET", f"{srv.http}/health")
            assert r.status == 200 and ALL not in r.body.decode(errors="replace")

        relay(srv, body)
    finally:
        _finish(srv)
    assert_no_token_in_log(srv, ALL)


async def ws_accepted(url: str, forwarded_for: str | None, open_: list) -> int | None:
    """Opens a WebSocket (kept in ``open_``); None when accepted, else the refusal's HTTP status."""
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    try:
        ws = await ws_connect(url, additional_headers=headers, open_timeout=5)
    except InvalidStatus as e:
        return e.response.status_code
    first = await asyncio.wait_for(ws.recv(), 5)
    assert '"available_streams"' in first, first
    open_.append(ws)
    return None


@with_args("--trusted-proxy", "127.0.0.1", "--max-connections-per-ip", "1")
def test_trusted_proxy_forwarded_client(server: RelayServer) -> None:
    """Behind a trusted proxy (here 127.0.0.1), the per-address limit counts forwarded clients."""

    async def body(c: Clients) -> None:
        open_: list = []
        try:
            # Two clients behind the proxy: one connection each passes the limit of 1.
            assert await ws_accepted(server.ws, "192.168.1.10", open_) is None
            assert await ws_accepted(server.ws, "192.168.1.11", open_) is None
            # A forged left-most entry does not help: the right-most untrusted hop counts.
            assert await ws_accepted(server.ws, "203.0.113.9, 192.168.1.10", open_) == 429
            assert await ws_accepted(server.ws, "192.168.1.11, 127.0.0.1", open_) == 429
            # The proxy itself (no header) is one more address.
            assert await ws_accepted(server.ws, None, open_) is None
            assert await ws_accepted(server.ws, None, open_) == 429
        finally:
            for ws in open_:
                await ws.close()

    relay(server, body)


@with_args("--max-connections-per-ip", "1")
def test_forwarded_header_ignored_without_trusted_proxy(server: RelayServer) -> None:
    async def body(c: Clients) -> None:
        open_: list = []
        try:
            assert await ws_accepted(server.ws, "192.168.1.10", open_) is None
            assert await ws_accepted(server.ws, "192.168.1.11", open_) == 429
        finally:
            for ws in open_:
                await ws.close()

    relay(server, body)
