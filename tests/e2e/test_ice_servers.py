"""STUN/TURN servers handed to clients (--ice-server).

A real coturn (Debian's ``turnserver``) on 127.0.0.1, started per test, with a
static user or a TURN REST shared secret. Chromium opens the relay's own page
with ``?relay=1`` (iceTransportPolicy "relay"), so it can only reach the relay
through coturn over TURN/TCP: it sends, listens, hears the tone, and getStats
shows the selected local candidate is a ``relay`` one allocated over TCP. A
wrong REST secret leaves Chromium without a relay candidate.

Without a browser: WHIP/WHEP ``Link`` headers (RFC 8288, RFC 9725) and the
``ice_servers`` field of ``sender_ready`` / ``webrtc_offer`` carry the configured
servers, with a fresh REST username each time; none when nothing is configured;
bad specs stop the server with exit status 2; aiortc clients that ignore the
field (like the original cards) still connect.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import aiohttp
import pytest

from browser import chromium, static_pages
from clients import Clients, assert_tone, run, sine_wav_bytes
from conftest import _finish, _start
from relay_server import RelayServer, free_port, server_binary
from test_cards import card_source, open_cards
from test_web_page import open_page, page_site, wait_heard, DESKTOP
from whip_clients import offer_sdp, request

TONE = 440.0
REALM = "voice-relay.test"
STATIC_USER, STATIC_PASSWORD = "alice", "p4ss;w0rd"
REST_SECRET = "north-wind-4517"


# --- coturn ------------------------------------------------------------------


class Coturn:
    """turnserver on 127.0.0.1 (TCP and UDP on one free port), relaying to
    loopback peers, logging to a file in the test's directory."""

    def __init__(self, tmp: Path, auth: list[str]):
        self.port = free_port()
        self.log = tmp / "turnserver.log"
        relay_lo = 20000 + (self.port % 200) * 50
        self.argv = [
            "turnserver",
            "-n",  # no configuration file
            "--listening-ip=127.0.0.1",
            "--relay-ip=127.0.0.1",
            f"--listening-port={self.port}",
            f"--min-port={relay_lo}",
            f"--max-port={relay_lo + 49}",
            "--allow-loopback-peers",
            "--no-cli",
            "--no-tls",
            "--no-dtls",
            "--fingerprint",
            f"--realm={REALM}",
            f"--userdb={tmp / 'turndb'}",
            f"--pidfile={tmp / 'turnserver.pid'}",
            f"--log-file={self.log}",
            "--simple-log",
            "--no-stdout-log",
            "--verbose",
            *auth,
        ]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"turnserver exited with {self.proc.returncode}: {self.log_text()}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
                return
            time.sleep(0.1)
        raise AssertionError(f"turnserver not listening on {self.port}: {self.log_text()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_text(self) -> str:
        # --simple-log still appends a date to the name on some builds.
        texts = [p.read_text(errors="replace") for p in sorted(self.log.parent.glob("turnserver*.log"))]
        return "\n".join(texts)[-6000:]


@contextlib.contextmanager
def coturn(tmp: Path, auth: list[str]) -> Iterator[Coturn]:
    turn = Coturn(tmp, auth)
    turn.start()
    try:
        yield turn
    finally:
        turn.stop()


@contextlib.contextmanager
def relay_server(tmp: Path, args: list[str], name: str = "server") -> Iterator[RelayServer]:
    srv = _start(tmp, name, args)
    try:
        yield srv
    finally:
        _finish(srv)


@pytest.fixture(scope="module")
def wav440(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wav") / "tone440.wav"
    path.write_bytes(sine_wav_bytes(TONE, 4.0))
    return path


# --- Chromium through TURN/TCP -----------------------------------------------


async def send_and_listen_through_relay(server: RelayServer, wav: Path, turn: Coturn) -> None:
    """Page A sends, page B listens, both with ?relay=1; B hears the tone, and
    both selected pairs use a relay candidate allocated over TCP."""
    async with page_site(server) as url, chromium(wav) as browser:
        a = await open_page(browser, url(relay="1"), "A(sender, relay)", DESKTOP)
        b = await open_page(browser, url(relay="1"), "B(listener, relay)", DESKTOP)
        await a.wait("voiceRelay.serverState === 'connected'", 10, "A connected")
        await a.page.evaluate("voiceRelay.startSending()")
        sid = await a.wait("voiceRelay.sendState === 'live' && voiceRelay.streamId", 25, "A live through TURN")
        await b.wait(f"voiceRelay.streams.includes('{sid}')", 10, "B lists the stream")
        await b.page.evaluate(f"voiceRelay.listen('{sid}')")
        await b.wait("voiceRelay.listenState === 'listening'", 25, "B listening through TURN")
        await wait_heard(b, TONE)

        for w, name in ((a, "send"), (b, "listen")):
            config = await w.page.evaluate(f"voiceRelay.configuration('{name}')")
            assert config["iceTransportPolicy"] == "relay", config
            urls = [s["urls"] if isinstance(s["urls"], str) else s["urls"][0] for s in config["iceServers"]]
            assert urls == [f"turn:127.0.0.1:{turn.port}?transport=tcp"], config
            pair = await w.page.evaluate(f"voiceRelay.selectedPair('{name}')")
            assert pair and pair["local"]["type"] == "relay", f"{w.name}: {pair}"
            assert pair["local"]["relayProtocol"] == "tcp", f"{w.name}: {pair}"
            gathered = await w.page.evaluate(f"voiceRelay.gathering('{name}')")
            assert gathered["types"] and set(gathered["types"]) == {"relay"}, f"{w.name}: {gathered}"
            assert not w.errors, w.errors


def test_chromium_through_turn_tcp_with_a_static_user(tmp_path: Path, wav440: Path) -> None:
    """coturn with a long-term user; the relay hands it out with the password
    read from a file (it holds a ';', which would need %3B inline)."""
    password_file = tmp_path / "turn-password"
    password_file.write_text(STATIC_PASSWORD + "\n")
    with coturn(tmp_path, ["--lt-cred-mech", f"--user={STATIC_USER}:{STATIC_PASSWORD}"]) as turn:
        spec = (f"turn:127.0.0.1:{turn.port}?transport=tcp;username={STATIC_USER};"
                f"credential-file={password_file}")
        with relay_server(tmp_path, ["--ice-server", spec]) as server:
            run(send_and_listen_through_relay(server, wav440, turn), 90)
            assert STATIC_PASSWORD not in server.log_text(), "the password was logged"
        log = turn.log_text()
        assert re.search(r"user <alice>: incoming packet ALLOCATE processed, success", log), log


def test_chromium_through_turn_tcp_with_a_rest_secret(
    tmp_path: Path, wav440: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """coturn with use-auth-secret; the relay reads the secret from the
    environment and gives every peer its own expiring username."""
    monkeypatch.setenv("E2E_TURN_SECRET", REST_SECRET)
    with coturn(tmp_path, ["--use-auth-secret", f"--static-auth-secret={REST_SECRET}"]) as turn:
        spec = f"turn:127.0.0.1:{turn.port}?transport=tcp;secret-env=E2E_TURN_SECRET"
        with relay_server(tmp_path, ["--ice-server", spec, "--ice-credential-ttl", "600"]) as server:
            run(send_and_listen_through_relay(server, wav440, turn), 90)
            assert REST_SECRET not in server.log_text(), "the secret was logged"
        log = turn.log_text()
        assert re.search(r"user <\d+:vr[0-9a-f]{12}>: incoming packet ALLOCATE processed, success", log), log


def test_chromium_cannot_relay_with_a_wrong_rest_secret(tmp_path: Path, wav440: Path) -> None:
    """The relay's secret differs from coturn's: coturn refuses the allocation
    (401), Chromium gets no relay candidate and, with ?relay=1, cannot connect."""

    async def body(server: RelayServer) -> None:
        async with page_site(server) as url, chromium(wav440) as browser:
            a = await open_page(browser, url(relay="1"), "A(sender, wrong secret)", DESKTOP)
            await a.wait("voiceRelay.serverState === 'connected'", 10, "A connected")
            await a.page.evaluate("voiceRelay.startSending()")
            err = await a.wait("voiceRelay.errors.find(e => e.includes('ICE server') && e.includes('401'))", 15,
                               "a 401 from the TURN server")
            assert f"127.0.0.1:{turn.port}" in err, err
            # Gathering ends with no candidate at all: with iceTransportPolicy
            # "relay" there is no path to the relay.
            gathered = await a.wait("(g => g && g.state === 'complete' && g)(voiceRelay.gathering('send'))", 15,
                                    "ICE gathering complete")
            assert gathered["types"] == [], gathered
            assert await a.page.evaluate("voiceRelay.sendState") != "live"
            assert await a.page.evaluate("voiceRelay.selectedPair('send')") is None

    with coturn(tmp_path, ["--use-auth-secret", f"--static-auth-secret={REST_SECRET}"]) as turn:
        spec = f"turn:127.0.0.1:{turn.port}?transport=tcp;secret=not-the-secret"
        with relay_server(tmp_path, ["--ice-server", spec]) as server:
            run(body(server), 60)


def test_our_cards_configure_their_peers_with_the_servers(tmp_path: Path, tone_wav) -> None:  # noqa: ANN001
    """The cards we serve put ice_servers into their peer connections: each
    one allocates a relay on coturn (the browser gathers TURN candidates even
    where host candidates win) and the auto_play card still hears the tone."""
    wav, freq = tone_wav

    async def body(server: RelayServer, turn: Coturn) -> None:
        async with card_source(server) as cards_js, static_pages() as base, chromium(wav) as browser:
            bench = await open_cards(browser, base, cards_js, f"127.0.0.1:{server.port}",
                                     f"{server.http}/stream/latest.mp3")
            await bench.wait("cardsTest.auto.debugState().status === 'connected'", 10, "auto card connected")
            await bench.page.click("#send >> button.talk", timeout=5000)
            await bench.wait("cardsTest.send.debugState().status === 'streaming'", 15, "the sending card live")
            sid = await bench.wait("cardsTest.send.debugState().streamId", 5, "a stream id")
            await bench.wait(f"cardsTest.auto.debugState().current === '{sid}'", 15, "auto card receiving")
            await bench.wait_heard("auto", freq)
            st = await bench.debug()
            url = f"turn:127.0.0.1:{turn.port}?transport=tcp"
            assert st["send"]["iceServers"] == [url] and st["auto"]["iceServers"] == [url], st
            assert not bench.page_errors, bench.page_errors

    with coturn(tmp_path, ["--use-auth-secret", f"--static-auth-secret={REST_SECRET}"]) as turn:
        spec = f"turn:127.0.0.1:{turn.port}?transport=tcp;secret={REST_SECRET}"
        with relay_server(tmp_path, ["--ice-server", spec]) as server:
            run(body(server, turn), 90)
        log = turn.log_text()
        allocated = set(re.findall(r"user <(\d+:vr[0-9a-f]{12})>: incoming packet ALLOCATE processed, success", log))
        assert len(allocated) >= 2, f"want relays for the sending and the receiving card: {allocated}\n{log}"


# --- what clients are handed (no browser) -------------------------------------


def parse_links(values: list[str]) -> list[tuple[str, dict[str, str]]]:
    """RFC 8288 Link field values: [(target, {param: value})], quoted strings unescaped."""
    links: list[tuple[str, dict[str, str]]] = []
    for value in values:
        i, n = 0, len(value)
        while i < n:
            while i < n and value[i] in " ,":
                i += 1
            if i >= n:
                break
            assert value[i] == "<", f"bad Link value {value!r} at {i}"
            end = value.index(">", i)
            target, params = value[i + 1:end], {}
            i = end + 1
            while True:
                while i < n and value[i] == " ":
                    i += 1
                if i >= n or value[i] != ";":
                    break
                i += 1
                while i < n and value[i] == " ":
                    i += 1
                eq = value.index("=", i)
                key = value[i:eq].strip().lower()
                i = eq + 1
                if value[i] == '"':
                    i += 1
                    out = []
                    while value[i] != '"':
                        if value[i] == "\\":
                            i += 1
                        out.append(value[i])
                        i += 1
                    i += 1
                    params[key] = "".join(out)
                else:
                    j = i
                    while j < n and value[j] not in ";,":
                        j += 1
                    params[key] = value[i:j].strip()
                    i = j
            links.append((target, params))
    return links


async def links_of(method: str, url: str, body: str | None = None, headers: dict[str, str] | None = None,
                   token: str | None = None) -> tuple[int, list[tuple[str, dict[str, str]]], str]:
    """Status, parsed Link headers (every one of them) and the Location of a request."""
    h = dict(headers or {})
    if body is not None:
        h["Content-Type"] = "application/sdp"
    if token:
        h["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.request(method, url, data=body, headers=h) as resp:
            await resp.read()
            return resp.status, parse_links(resp.headers.getall("Link", [])), resp.headers.get("Location", "")


def check_rest_username(username: str, credential: str, ttl: int) -> None:
    expiry, _, client = username.partition(":")
    assert expiry.isdigit() and client, username
    assert abs(int(expiry) - (time.time() + ttl)) < 30, f"{username}: expiry not now+{ttl}s"
    want = base64.b64encode(hmac.new(REST_SECRET.encode(), username.encode(), hashlib.sha1).digest()).decode()
    assert credential == want, f"{username}: credential is not base64(HMAC-SHA1(secret, username))"


SEND, LISTEN = "send-tok", "listen-tok"
HANDED = [
    "--ice-server", "stun:127.0.0.1:3478",
    "--ice-server", f"turn:127.0.0.1:3478?transport=tcp;secret={REST_SECRET}",
    "--ice-server", "turns:turn.example.net:5349?transport=tcp;username=bob;credential=a%22b%5Cc",
    "--ice-credential-ttl", "600",
    "--send-token", SEND, "--listen-token", LISTEN,
]


def check_handed(servers: list[dict[str, str]]) -> str:
    """The three configured servers as a client gets them; returns the REST username."""
    assert [s["urls"] for s in servers] == [
        "stun:127.0.0.1:3478", "turn:127.0.0.1:3478?transport=tcp", "turns:turn.example.net:5349?transport=tcp",
    ], servers
    assert "username" not in servers[0] and "credential" not in servers[0], servers[0]
    check_rest_username(servers[1]["username"], servers[1]["credential"], 600)
    assert (servers[2]["username"], servers[2]["credential"]) == ("bob", 'a"b\\c'), servers[2]
    return servers[1]["username"]


def as_servers(links: list[tuple[str, dict[str, str]]]) -> list[dict[str, str]]:
    out = []
    for target, params in links:
        assert params.get("rel") == "ice-server", (target, params)
        s = {"urls": target}
        if "username" in params:
            assert params.get("credential-type") == "password", params
            s.update(username=params["username"], credential=params["credential"])
        out.append(s)
    return out


def test_whip_whep_links_and_websocket_fields_carry_the_servers(tmp_path: Path) -> None:
    async def body(server: RelayServer) -> None:
        base = server.http
        users = []
        # WHIP: two publishes, two fresh REST usernames.
        made = []
        for _ in range(2):
            status, links, location = await links_of("POST", base + "/whip", offer_sdp(["opus"], False), token=SEND)
            assert status == 201, status
            users.append(check_handed(as_servers(links)))
            made.append(location)
        # The original cards' way: aiortc peers that put no candidates in
        # their SDP and ignore the new field.
        async with Clients(server.ws + f"?token={SEND}", base) as c:
            snd = await c.sender(TONE, strip_candidates=True)
            player_offer = offer_sdp(["opus"], False).replace("a=sendonly", "a=recvonly")
            status, links, location = await links_of("POST", f"{base}/whep/{snd.stream_id}", player_offer,
                                                     token=LISTEN)
            assert status == 201, status
            users.append(check_handed(as_servers(links)))
            made.append(location)
            # OPTIONS: a client that asks with its token gets them (RFC 9725 4.6),
            # a CORS preflight and a client without the token do not.
            status, links, _ = await links_of("OPTIONS", base + "/whip", token=SEND)
            assert status == 204 and len(links) == 3, (status, links)
            users.append(check_handed(as_servers(links)))
            status, links, _ = await links_of("OPTIONS", base + "/whep/latest", token=LISTEN)
            assert status == 204 and len(links) == 3, (status, links)
            for url, token, headers in (
                (base + "/whip", LISTEN, None),
                (base + "/whip", None, None),
                (base + "/whip", SEND, {"Origin": "https://page.example", "Access-Control-Request-Method": "POST"}),
            ):
                status, links, _ = await links_of("OPTIONS", url, headers=headers, token=token)
                assert status == 204 and links == [], (url, token, headers, links)

            # WebSocket: sender_ready and webrtc_offer carry ice_servers (an
            # addition old clients ignore); the aiortc sender above ignored it
            # and connected, and this receiver does the same and hears it.
            users.append(check_handed(snd.ready_msg["ice_servers"]))
            rx = await c.receiver(snd.stream_id, name="receiver", strip_candidates=True)
            await rx.wait_audio(1.5, timeout=15)
            assert_tone(rx, TONE)
            offer = next(m for m in rx.signal.messages if m["type"] == "webrtc_offer")
            users.append(check_handed(offer["ice_servers"]))
            for location in made:
                token = SEND if location.startswith("/whip/") else LISTEN
                assert (await request("DELETE", base + location, token=token)).status == 200, location
        assert len(set(users)) == len(users), f"REST usernames repeat: {users}"

    with relay_server(tmp_path, HANDED) as server:
        run(body(server), 60)
        log = server.log_text()
        assert REST_SECRET not in log and 'a"b' not in log, "a secret was logged"
        assert "STUN/TURN servers handed to clients" in log, log[-2000:]


def test_nothing_is_handed_when_no_server_is_configured(server: RelayServer) -> None:
    async def body() -> None:
        status, links, location = await links_of("POST", server.http + "/whip", offer_sdp(["opus"], False))
        assert status == 201 and links == [], links
        status, links, _ = await links_of("OPTIONS", server.http + "/whip")
        assert status == 204 and links == [], links
        async with Clients(server.ws, server.http) as c:
            snd = await c.sender(TONE)
            assert "ice_servers" not in snd.ready_msg, snd.ready_msg
            rx = await c.receiver(snd.stream_id, name="receiver")
            offer = next(m for m in rx.signal.messages if m["type"] == "webrtc_offer")
            assert "ice_servers" not in offer, offer
        assert (await request("DELETE", server.http + location)).status == 200

    run(body(), 30)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("http://turn.example.net;username=u;credential=hunter2", 'unknown scheme "http:"'),
        ("turn:;username=u;credential=hunter2", "the URI has no host"),
        ("turn:turn.example.net:99999;username=u;credential=hunter2", 'bad port "99999"'),
        ("turn:turn.example.net;username=u", "username needs a credential"),
        ("stun://stun.example.net", 'without "//"'),
    ],
)
def test_a_bad_ice_server_stops_the_server_with_status_2(spec: str, message: str) -> None:
    argv = [str(server_binary()), "--listen", f"127.0.0.1:{free_port()}", "--ice-server", spec]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "--ice-server" in done.stderr and message in done.stderr, done.stderr
    assert "hunter2" not in done.stderr, "the credential was echoed"
