"""Signalling fuzz test against the real server, and a replay of the saved corpus.

A seeded generator builds a few thousand hostile signalling inputs: protocol
messages with fields dropped, renamed or of the wrong type, huge strings,
random unicode, deep nesting, invalid JSON, binary frames, and SDP offers and
answers made by mutating real ones (lines dropped, duplicated or swapped, bytes
flipped, truncation, ...).  They go through several fresh WebSockets while one
live stream plays to two WebRTC receivers.  The server must answer every frame
with JSON, never crash or hang, and keep the live audio flowing.

Each case is a list of steps sent from the idle state (a ``stop_stream`` comes
first); after each step a sentinel message (an unknown type with a serial
number) marks the end of its replies, so every reply is attributed to its step.
Placeholders: ``@@LIVE@@`` is the live stream's id, ``@@MID@@`` the mid of the
last offer the server sent on that socket (so mutated answers can match it).

Interesting cases (one or two per distinct error code, accepted mutations,
boundary sizes, and anything that broke something) are kept in
``fuzz_corpus/``; ``test_fuzz_corpus_replay`` replays them as a regression
test.  ``FUZZ_UPDATE_CORPUS=1`` rewrites the corpus from a fuzz run.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiortc import RTCPeerConnection, RTCSessionDescription
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from clients import Clients, ToneReceiver, assert_tone, rtc_config, run
from conftest import with_args
from relay_server import RelayServer

SEED = 0x7E1A7
N_CASES = 3000
WORKERS = 6
CASES_PER_SOCKET = 75
MAX_MESSAGE = 65536  # the server's default --max-message-bytes
FIT = 64000  # ordinary cases stay under this many bytes
STEP_TIMEOUT = 5.0
CORPUS_DIR = Path(__file__).resolve().parent / "fuzz_corpus"
LIVE, MID = "@@LIVE@@", "@@MID@@"
BROADCASTS = {"stream_available", "stream_ended"}
CLIENT_TYPES = ["get_available_streams", "start_sending", "webrtc_offer", "start_receiving",
                "webrtc_answer", "ice_candidate", "stop_stream"]
SERVER_ARGS = ["--max-messages-per-sec", "1000"]  # a per-socket rate the fuzzer will not hit


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------


@dataclass
class Case:
    kind: str
    steps: list[dict]  # {"text": str} or {"binary": base64 str}
    note: str = ""

    def size(self) -> int:
        return sum(len(s.get("text", s.get("binary", ""))) for s in self.steps)

    def to_json(self) -> dict:
        return {"kind": self.kind, "note": self.note, "steps": self.steps}


def text_step(obj_or_text: Any) -> dict:
    if isinstance(obj_or_text, str):
        return {"text": obj_or_text}
    return {"text": json.dumps(obj_or_text)}


@dataclass
class Seeds:
    offer: str  # a real aiortc Opus sendonly offer
    answer: str  # a real aiortc answer to a server offer, its mid replaced by @@MID@@
    server_offer: str  # a real server offer (to send where it does not belong)


class Fuzzer:
    """Builds cases from a seeded RNG.

    The same seed gives the same sequence of generators and mutations; the seed
    SDPs are captured live, so their ICE credentials and ports differ per run.
    """

    def __init__(self, seed: int, seeds: Seeds):
        self.rng = random.Random(seed)
        self.seeds = seeds

    # -- primitive values ------------------------------------------------

    def unicode_text(self, n: int) -> str:
        r = self.rng
        pools = [
            (0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x4FFF),
            (0x1F300, 0x1F64F), (0x0, 0x1F), (0x200B, 0x200F), (0xFFF0, 0xFFFD), (0x10000, 0x1007F),
        ]
        out = []
        for _ in range(n):
            lo, hi = r.choice(pools)
            out.append(chr(r.randint(lo, hi)))
        return "".join(out)

    def huge_string(self) -> str:
        r = self.rng
        n = r.choice([1000, 8000, 30000, r.randint(40000, 60000)])
        style = r.randrange(4)
        if style == 0:
            return "A" * n
        if style == 1:
            return self.unicode_text(n // 4)
        if style == 2:
            return ("stream_" + "0123456789abcdef" * (n // 16 + 1))[:n]
        return "".join(r.choice('\\"/\b\f\n\r\t{}[]:,') for _ in range(n // 2))

    def scalar(self) -> Any:
        r = self.rng
        return r.choice([
            lambda: None, lambda: True, lambda: False, lambda: 0, lambda: -1,
            lambda: r.randint(-2**63, 2**64), lambda: r.random() * 1e300, lambda: 1.5,
            lambda: "", lambda: " ", lambda: self.unicode_text(r.randint(1, 40)),
            lambda: "stream_" + "%016x" % r.getrandbits(64), lambda: LIVE, lambda: "latest",
            lambda: r.choice(CLIENT_TYPES), lambda: "offer", lambda: "answer",
            lambda: self.huge_string(), lambda: [], lambda: {}, lambda: [1, "2", None],
            lambda: {"type": "offer", "sdp": 5}, lambda: self.seeds.offer,
        ])()

    # -- structure mutations ---------------------------------------------

    def paths(self, value: Any, prefix: tuple = ()) -> list[tuple]:
        out = [prefix]
        if isinstance(value, dict):
            for k, v in value.items():
                out += self.paths(v, prefix + (k,))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                out += self.paths(v, prefix + (i,))
        return out

    def mutate_value(self, msg: dict) -> dict:
        r = self.rng
        msg = json.loads(json.dumps(msg))
        for _ in range(r.randint(1, 3)):
            paths = [p for p in self.paths(msg) if p]
            op = r.randrange(9)
            if not paths:
                msg["type"] = self.scalar()
                continue
            path = r.choice(paths)
            parent: Any = msg
            for k in path[:-1]:
                parent = parent[k]
            key = path[-1]
            if op == 0 and isinstance(parent, dict):  # drop a field
                del parent[key]
            elif op == 1 and isinstance(parent, dict):  # rename a field
                new = r.choice([str(key).upper(), str(key) + "_", "sdpMid", "streamId", "Type", " " + str(key),
                                str(key).replace("_", ""), self.unicode_text(5)])
                parent[new] = parent.pop(key)
            elif op == 2:  # wrong type
                parent[key] = self.scalar()
            elif op == 3:  # wrap
                parent[key] = r.choice([[parent[key]], {"value": parent[key]}, {"type": parent[key]}])
            elif op == 4:  # type confusion
                msg["type"] = r.choice(CLIENT_TYPES + ["START_SENDING", "start_sending ", "webrtc-offer",
                                                       "", "error", "available_streams", "sender_ready"])
            elif op == 5 and isinstance(parent, dict):  # extra fields
                parent[self.unicode_text(r.randint(1, 12))] = self.scalar()
            elif op == 6:  # huge string
                parent[key] = self.huge_string()
            elif op == 7:  # unicode string
                parent[key] = self.unicode_text(r.randint(1, 200))
            else:  # SDP field: a mutated SDP
                parent[key] = self.mutate_sdp(r.choice([self.seeds.offer, self.seeds.answer, self.seeds.server_offer]))
        return msg

    # -- SDP mutations ---------------------------------------------------

    def mutate_sdp(self, sdp: str) -> str:
        r = self.rng
        lines = sdp.replace("\r\n", "\n").rstrip("\n").split("\n")
        ops = []
        for _ in range(r.choice([1, 1, 2, 3, 5])):
            op = r.randrange(14)
            ops.append(op)
            if not lines:
                lines = ["v=0"]
            i = r.randrange(len(lines))
            if op == 0:
                del lines[i]
            elif op == 1:
                lines.insert(i, lines[r.randrange(len(lines))])
            elif op == 2:
                j = r.randrange(len(lines))
                lines[i], lines[j] = lines[j], lines[i]
            elif op == 3 and lines[i]:  # flip one character
                k = r.randrange(len(lines[i]))
                lines[i] = lines[i][:k] + self.unicode_text(1) + lines[i][k + 1:]
            elif op == 4:  # truncate the whole SDP
                cut = r.randrange(len("\n".join(lines)) + 1)
                lines = "\n".join(lines)[:cut].split("\n")
            elif op == 5:
                lines.insert(i, r.choice([
                    "a=" + self.unicode_text(r.randint(1, 60)), "m=video 9 UDP/TLS/RTP/SAVPF 96",
                    "m=audio 9 UDP/TLS/RTP/SAVPF 0", "a=rtpmap:111 opus/48000/2", "a=mid:",
                    "a=fingerprint:sha-256 00", "a=setup:passive", "a=ice-ufrag:", "c=IN IP6 ::1",
                    "a=candidate:1 1 udp 1 127.0.0.1 1 typ host", "a=ssrc:4294967296 cname:x",
                    "a=extmap:15 urn:x", "a=rtpmap:300 opus/48000/2", "a=sendrecv", "a=inactive",
                    "x" * r.randint(1000, 20000), "",
                ]))
            elif op == 6:  # drop a whole class of lines
                prefix = r.choice(["a=candidate", "a=fingerprint", "a=ice-ufrag", "a=ice-pwd", "a=mid", "m=",
                                   "a=rtpmap", "a=setup", "a=group", "v=", "o=", "c=", "a=rtcp-mux"])
                lines = [ln for ln in lines if not ln.startswith(prefix)]
            elif op == 7:  # numbers
                lines[i] = re.sub(r"\d+", lambda _m: str(r.choice([0, -1, 65536, 2**32, 2**64, 10**30])),
                                  lines[i], count=r.randint(1, 3))
            elif op == 8:
                lines = [ln.replace("opus", r.choice(["OPUS", "opu", "PCMU", "opus/8000"])) for ln in lines]
            elif op == 9:
                lines = [ln.replace("sendonly", "recvonly").replace("recvonly", r.choice(["sendrecv", "inactive", "x"]))
                         for ln in lines]
            elif op == 10:
                lines[i] = lines[i] * r.randint(2, 50)
            elif op == 11:  # shuffle everything after the session part
                head, tail = lines[:4], lines[4:]
                r.shuffle(tail)
                lines = head + tail
            elif op == 12:
                lines[i] = lines[i].replace("=", r.choice([":", " = ", "==", ""]), 1)
            else:
                lines = lines[: i + 1] * r.randint(1, 3) + lines[i + 1:]
        sep = r.choice(["\r\n"] * 6 + ["\n", "\r", "\r\n\r\n", " "])
        out = sep.join(lines) + r.choice([sep, "", "\x00"])
        if len(out.encode()) > FIT - 500:
            out = out[: (FIT - 500) // 4]
        return out

    # -- whole cases -----------------------------------------------------

    def template(self, kind: str | None = None) -> dict:
        r = self.rng
        kind = kind or r.choice(CLIENT_TYPES)
        if kind == "webrtc_offer":
            return {"type": kind, "offer": {"type": "offer", "sdp": self.seeds.offer}}
        if kind == "webrtc_answer":
            return {"type": kind, "answer": {"type": "answer", "sdp": self.seeds.answer}}
        if kind == "start_receiving":
            return r.choice([{"type": kind}, {"type": kind, "stream_id": LIVE}, {"type": kind, "stream_id": None}])
        if kind == "ice_candidate":
            cand = next((ln[2:] for ln in self.seeds.offer.splitlines() if ln.startswith("a=candidate:")),
                        "candidate:1 1 udp 2130706431 127.0.0.1 9 typ host")
            return {"type": kind, "candidate": {"candidate": cand, "sdpMid": "0", "sdpMLineIndex": 0}}
        return {"type": kind}

    def prefix_for(self, msg: Any) -> list[dict]:
        """The step that puts the socket in the state where ``msg`` means something (mostly)."""
        t = msg.get("type") if isinstance(msg, dict) else None
        if t == "webrtc_offer" and self.rng.random() < 0.8:
            return [text_step({"type": "start_sending"})]
        if t == "webrtc_answer" and self.rng.random() < 0.8:
            return [text_step({"type": "start_receiving", "stream_id": LIVE})]
        return []

    def dumps(self, obj: Any) -> str:
        text = json.dumps(obj, ensure_ascii=self.rng.random() < 0.5)
        if len(text.encode()) > FIT:
            text = json.dumps(obj, ensure_ascii=False)
        if len(text.encode()) > FIT:  # still too big: shrink every long string
            def shrink(v: Any) -> Any:
                if isinstance(v, str) and len(v) > 2000:
                    return v[:2000]
                if isinstance(v, dict):
                    return {k: shrink(x) for k, x in v.items()}
                if isinstance(v, list):
                    return [shrink(x) for x in v]
                return v
            text = json.dumps(shrink(obj))
        return text

    def invalid_json(self) -> str:
        r = self.rng
        valid = json.dumps(self.template())
        return r.choice([
            lambda: valid[: r.randrange(len(valid))],
            lambda: valid + r.choice([" x", ",", "}", "]", "\x00"]),
            lambda: valid.replace('"', "'"),
            lambda: valid[:-1] + ',}',
            lambda: "\ufeff" + valid,
            lambda: "",
            lambda: " \t\r\n",
            lambda: '{"type": "start_receiving", "stream_id": NaN}',
            lambda: '{"type": "start_receiving", "stream_id": Infinity}',
            lambda: '{"type": "get_available_streams", "n": 1e999}',
            lambda: '{"type": "start_receiving", "stream_id": "\\ud800"}',
            lambda: '{"type": "start_receiving", "stream_id": "\\udc00\\ud800"}',
            lambda: '{"type": "stop_stream" /* comment */}',
            lambda: '{"type": "start_receiving", "stream_id": "a\x01b"}',
            lambda: '{type: "start_sending"}',
            lambda: '{"type": "start_sending", "type": "stop_stream"}',
            lambda: "[" * r.randint(100, 30000),
            lambda: "{\"a\":" * r.randint(100, 10000),
            lambda: "".join(chr(r.randint(0x20, 0x7E)) for _ in range(r.randint(1, 300))),
            lambda: self.unicode_text(r.randint(1, 300)),
            lambda: bytes(r.randrange(256) for _ in range(r.randint(1, 200))).decode("latin-1"),
        ])()

    def deep(self) -> str:
        r = self.rng
        depth = r.choice([10, 100, 127, 128, 129, 200, 1000, 5000, 20000])
        inner = json.dumps(self.template())
        depth = max(1, min(depth, (FIT - len(inner) - 100) // 12))
        style = r.randrange(4)
        if style == 0:  # nested value under a real message
            t = self.template("start_receiving")
            head = json.dumps({k: v for k, v in t.items() if k != "stream_id"})[:-1]
            return head + ', "stream_id": ' + "[" * depth + "1" + "]" * depth + "}"
        if style == 1:
            return '{"x":' * depth + inner + "}" * depth
        if style == 2:
            return "[" * depth + inner + "]" * depth
        return '{"type": "webrtc_offer", "offer": ' + '{"offer":' * depth + "{}" + "}" * depth + "}"

    def case(self) -> Case:
        r = self.rng
        roll = r.random()
        if roll < 0.13:
            return Case("invalid_json", [text_step(self.invalid_json())])
        if roll < 0.18:
            if r.random() < 0.5:
                raw = r.choice([self.dumps(self.template()).encode(), r.randbytes(r.randint(0, 300))])
                return Case("binary", [{"binary": base64.b64encode(raw).decode()}])
            return Case("not_object", [text_step(r.choice(["null", "1", "-0.5", '"start_sending"', "[]", "true",
                                                            '[{"type": "start_sending"}]', '"' + LIVE + '"']))])
        if roll < 0.23:
            return Case("deep", [text_step(self.deep())])
        if roll < 0.48:
            steps = [text_step({"type": "start_sending"})]
            if r.random() < 0.08:
                sdp = self.seeds.offer  # an unmutated offer: a real stream starts
            else:
                sdp = self.mutate_sdp(self.seeds.offer if r.random() < 0.9 else self.seeds.server_offer)
            steps.append(text_step({"type": "webrtc_offer", "offer": {"type": "offer", "sdp": sdp}}))
            return Case("sdp_offer", steps)
        if roll < 0.68:
            steps = [text_step({"type": "start_receiving", "stream_id": LIVE})]
            sdp = self.seeds.answer if r.random() < 0.05 else self.mutate_sdp(self.seeds.answer)
            steps.append(text_step({"type": "webrtc_answer", "answer": {"type": "answer", "sdp": sdp}}))
            return Case("sdp_answer", steps)
        if roll < 0.90:
            msg = self.mutate_value(self.template())
            return Case("mutated_message", self.prefix_for(msg) + [text_step(self.dumps(msg))])
        steps = []
        for _ in range(r.randint(2, 6)):
            msg = self.template()
            if r.random() < 0.4:
                msg = self.mutate_value(msg)
            steps.append(text_step(self.dumps(msg)))
        return Case("sequence", steps)

    def boundary_cases(self) -> list[Case]:
        """Messages right at and just over the size limit (the second closes the socket)."""
        out = []
        for size in (MAX_MESSAGE, MAX_MESSAGE + 1, 100_000, 1_000_000):
            head = '{"type": "get_available_streams", "pad": "'
            text = head + "p" * (size - len(head) - 2) + '"}'
            assert len(text.encode()) == size
            out.append(Case("boundary", [text_step(text)], note=f"{size} bytes"))
        return out

    def cases(self, n: int) -> list[Case]:
        out = self.boundary_cases()
        while len(out) < n:
            out.append(self.case())
        self.rng.shuffle(out)
        return out


# ---------------------------------------------------------------------------
# Running cases
# ---------------------------------------------------------------------------


@dataclass
class StepResult:
    replies: list[str]  # "type" or "error:code", in order, broadcasts left out
    max_reply: int = 0


@dataclass
class CaseResult:
    case: Case
    steps: list[StepResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    closed: bool = False
    codes: set[str] = field(default_factory=set)
    ready_streams: list[str] = field(default_factory=list)

    def expectation(self) -> dict:
        return {"replies": [s.replies for s in self.steps], "closes": self.closed}


class FuzzSocket:
    """One WebSocket that runs cases in order, attributing replies through sentinels."""

    serial = 0

    def __init__(self, url: str, live: str):
        self.url = url
        self.live = live
        self.ws: Any = None
        self.mid = "0"
        self.broadcasts: list[dict] = []
        self.frames = 0  # frames sent (cases + harness)
        self.max_reply = 0

    async def open(self) -> None:
        self.ws = await asyncio.wait_for(
            ws_connect(self.url, max_size=None, open_timeout=5, ping_interval=None, close_timeout=2), 6)
        greeting = json.loads(await asyncio.wait_for(self.ws.recv(), 5))
        assert greeting.get("type") == "available_streams", greeting
        self.mid = "0"

    async def close(self) -> None:
        if self.ws is not None:
            try:
                await asyncio.wait_for(self.ws.close(), 3)
            except Exception:  # noqa: BLE001
                pass
            self.ws = None

    def _fill(self, text: str) -> str:
        return text.replace(LIVE, self.live).replace(MID, self.mid)

    async def _send(self, step: dict) -> None:
        self.frames += 1
        if "binary" in step:
            await self.ws.send(base64.b64decode(step["binary"]))
        else:
            await self.ws.send(self._fill(step["text"]))

    async def _until_sentinel(self, tag: str, res: CaseResult, sr: StepResult) -> bool:
        """Read until the sentinel's reply; False if the socket closed."""
        deadline = time.monotonic() + STEP_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                res.problems.append(f"no reply to the sentinel within {STEP_TIMEOUT}s (server hung?)")
                return False
            try:
                raw = await asyncio.wait_for(self.ws.recv(), remaining)
            except asyncio.TimeoutError:
                continue
            except ConnectionClosed:
                return False
            self.max_reply = max(self.max_reply, len(raw))
            sr.max_reply = max(sr.max_reply, len(raw))
            if not isinstance(raw, str):
                res.problems.append(f"binary frame from the server: {raw[:60]!r}")
                continue
            try:
                msg = json.loads(raw)
            except ValueError:
                res.problems.append(f"non-JSON frame from the server: {raw[:120]!r}")
                continue
            if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
                res.problems.append(f"reply without a string type: {raw[:120]!r}")
                continue
            t = msg["type"]
            if t in BROADCASTS:
                self.broadcasts.append(msg)
                continue
            if t == "error":
                code, message = msg.get("code"), msg.get("message")
                if not isinstance(code, str) or not isinstance(message, str) or not message.strip():
                    res.problems.append(f"error without a string code and message: {raw[:200]!r}")
                if code == "unknown_type" and tag in str(message):
                    return True
                res.codes.add(str(code))
                sr.replies.append(f"error:{code}")
                continue
            if t == "webrtc_offer":
                found = re.search(r"a=mid:(\S+)", str((msg.get("offer") or {}).get("sdp", "")))
                self.mid = found.group(1) if found else "0"
            if t == "sender_ready" and isinstance(msg.get("stream_id"), str):
                res.ready_streams.append(msg["stream_id"])
            sr.replies.append(t)

    async def run_case(self, case: Case) -> CaseResult:
        res = CaseResult(case)
        if self.ws is None:
            await self.open()
        self.frames += 1
        await self.ws.send('{"type": "stop_stream"}')  # every case starts from the idle state
        for step in case.steps:
            FuzzSocket.serial += 1
            tag = f"zz_sentinel_{FuzzSocket.serial}"
            sr = StepResult([])
            res.steps.append(sr)
            oversized = len(self._fill(step.get("text", "")).encode()) > MAX_MESSAGE
            try:
                await self._send(step)
                if not oversized:  # (the server closes after an oversized message: no sentinel)
                    self.frames += 1
                    await self.ws.send(json.dumps({"type": tag}))
            except ConnectionClosed:
                pass
            if not await self._until_sentinel(tag, res, sr):
                res.closed = True
                break
        if res.closed:
            close = getattr(self.ws, "close_code", None)
            if "message_too_large" not in res.codes or close != 1009:
                res.problems.append(f"socket closed by the server (code {close}) without message_too_large")
            await self.close()
        return res


# ---------------------------------------------------------------------------
# Seeds and shared set-up
# ---------------------------------------------------------------------------


async def make_seeds(c: Clients, live: str) -> Seeds:
    pc = RTCPeerConnection(rtc_config())
    pc.addTransceiver("audio", direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    offer = pc.localDescription.sdp
    await pc.close()

    s = await c.signal("seed")
    await s.send({"type": "start_receiving", "stream_id": live})
    server_offer = (await s.expect("webrtc_offer"))["offer"]["sdp"]
    mid = re.search(r"a=mid:(\S+)", server_offer).group(1)
    pc = RTCPeerConnection(rtc_config())
    await pc.setRemoteDescription(RTCSessionDescription(sdp=server_offer, type="offer"))
    await pc.setLocalDescription(await pc.createAnswer())
    answer = pc.localDescription.sdp
    await pc.close()
    await s.close()
    c.signals.remove(s)
    lines = []
    for ln in answer.splitlines():
        if ln == f"a=mid:{mid}":
            ln = f"a=mid:{MID}"
        elif ln.startswith("a=group:BUNDLE"):
            ln = f"a=group:BUNDLE {MID}"
        lines.append(ln)
    return Seeds(offer=offer, answer="\r\n".join(lines) + "\r\n", server_offer=server_offer)


class AudioWatch:
    """Samples the receivers once a second while the fuzzer runs."""

    def __init__(self, rxs: list[ToneReceiver], freq: float):
        self.rxs = rxs
        self.freq = freq
        self.windows: list[tuple[str, int, float]] = []

    async def run(self, stop: asyncio.Event) -> None:
        last = {r.signal.name: r.frames for r in self.rxs}
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
            for r in self.rxs:
                n = r.frames
                self.windows.append((r.signal.name, n - last[r.signal.name], r.dominant_frequency(0.5)))
                last[r.signal.name] = n

    def problems(self) -> list[str]:
        out = []
        for name, frames, freq in self.windows[:-2]:  # the last, partial windows are checked after
            if frames < 25:
                out.append(f"{name}: only {frames} frames in a 1 s window")
            if abs(freq - self.freq) > 20:
                out.append(f"{name}: dominant {freq:.0f} Hz in a 1 s window")
        return out


async def live_setup(c: Clients) -> tuple[str, list[ToneReceiver]]:
    snd = await c.sender(440)
    rxs = [await c.receiver(snd.stream_id, name=f"rx{i}") for i in (1, 2)]
    for r in rxs:
        await r.wait_audio(1.0)
    return snd.stream_id, rxs


async def after_checks(server: RelayServer, c: Clients, live: str, rxs: list[ToneReceiver]) -> None:
    """The server is alive and serving, the live audio continues, nothing is left behind."""
    assert server.alive(), f"the server died\n{server.log_tail()}"
    fresh = await c.signal("after")
    streams = await fresh.request_streams()
    assert live in streams, streams
    h = await c.wait_health(lambda h: h["active_streams"] == [live] and h["senders"] == 1 and h["receivers"] == 2,
                            10, "only the live stream and its two receivers")
    assert h["status"] == "healthy"
    for r in rxs:
        t = time.monotonic()
        await r.sink.wait_more(1.0, 6)
        assert r.sink.frames_since(t) >= 40, f"{r.signal.name}: frames stopped growing"
        assert_tone(r, 440, min_purity=0.8)
        assert not r.ended


# ---------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------


@with_args(*SERVER_ARGS)
def test_fuzz_signalling(server: RelayServer, tmp_path: Path) -> None:
    async def main() -> None:
        async with Clients(server.ws, server.http) as c:
            watcher = await c.signal("watcher")
            live, rxs = await live_setup(c)
            seeds = await make_seeds(c, live)
            cases = Fuzzer(SEED, seeds).cases(N_CASES)
            results: list[CaseResult] = []
            sockets: list[FuzzSocket] = []

            async def worker(k: int) -> None:
                mine = cases[k::WORKERS]
                for start in range(0, len(mine), CASES_PER_SOCKET):
                    sock = FuzzSocket(server.ws, live)
                    sockets.append(sock)
                    try:
                        for case in mine[start:start + CASES_PER_SOCKET]:
                            res = await sock.run_case(case)
                            results.append(res)
                            if res.problems and not server.alive():
                                return
                    finally:
                        await sock.close()

            stop = asyncio.Event()
            watch = AudioWatch(rxs, 440)
            watch_task = asyncio.create_task(watch.run(stop))
            t0 = time.monotonic()
            try:
                await asyncio.gather(*(worker(k) for k in range(WORKERS)))
            finally:
                stop.set()
                await watch_task
            wall = time.monotonic() - t0

            frames = sum(s.frames for s in sockets)
            codes: dict[str, int] = {}
            for res in results:
                for code in res.codes:
                    codes[code] = codes.get(code, 0) + 1
            broke = [r for r in results if r.problems]
            print(f"\nFUZZ: {len(results)} cases ({frames} frames incl. resets and sentinels) over "
                  f"{len(sockets)} sockets in {wall:.1f}s; error codes (cases): {dict(sorted(codes.items()))}; "
                  f"largest reply {max(s.max_reply for s in sockets)} bytes")
            save_corpus(results, tmp_path / "fuzz_corpus")

            assert len(results) == len(cases), f"only {len(results)} of {len(cases)} cases ran"
            assert not broke, "cases that broke something (saved in the corpus):\n" + "\n".join(
                f"  {r.case.kind}: {r.problems[:3]} (input {r.case.size()} chars)" for r in broke[:10])
            # The fuzzer reached every kind of refusal the server has for bad input.
            for code in ("bad_json", "bad_message", "unknown_type", "bad_state", "bad_sdp", "message_too_large"):
                assert code in codes, f"no case produced {code}: the fuzzer lost coverage ({codes})"
            accepted_offers = [r for r in results if r.case.kind == "sdp_offer" and r.steps[-1].replies == ["webrtc_answer"]]
            assert accepted_offers, "no fuzzed offer was accepted: the live-state paths were not exercised"

            await after_checks(server, c, live, rxs)
            audio = watch.problems()
            assert not audio, f"live audio suffered during the fuzzing: {audio[:6]}"
            assert len(watch.windows) >= 2 * 3, "the fuzz run was too short to watch the audio"

            # Streams: only the ones fuzz sockets were told about, each ended once its socket closed.
            ready = {sid for r in results for sid in r.ready_streams}
            await asyncio.sleep(0.5)
            announced = {m["stream_id"] for m in watcher.of_type("stream_available")} - {live}
            stray = announced - ready
            assert not stray, f"streams nobody asked for appeared: {sorted(stray)[:5]}"
            for sid in announced:
                assert watcher.count("stream_ended", stream_id=sid) == 1, (sid, watcher.of_type("stream_ended")[:5])
            assert await watcher.request_streams() == [live]
            watcher.assert_json_only()

    run(main(), 150)


def load_corpus() -> list[tuple[str, dict]]:
    return [(p.name, json.loads(p.read_text())) for p in sorted(CORPUS_DIR.glob("*.json"))]


@with_args(*SERVER_ARGS)
def test_fuzz_corpus_replay(server: RelayServer) -> None:
    corpus = load_corpus()
    assert len(corpus) >= 8, f"the fuzz corpus in {CORPUS_DIR} is missing or nearly empty"

    async def main() -> None:
        async with Clients(server.ws, server.http) as c:
            watcher = await c.signal("watcher")
            live, rxs = await live_setup(c)
            sock = FuzzSocket(server.ws, live)
            mismatches = []
            try:
                for name, entry in corpus:
                    case = Case(entry["kind"], entry["steps"], entry.get("note", ""))
                    res = await sock.run_case(case)
                    assert not res.problems, f"{name}: {res.problems}"
                    want = entry["expect"]
                    got = res.expectation()
                    if got != want:
                        mismatches.append(f"{name}: expected {want}, got {got}")
            finally:
                await sock.close()
            assert not mismatches, "corpus replies changed:\n" + "\n".join(mismatches)
            await after_checks(server, c, live, rxs)
            announced = {m["stream_id"] for m in watcher.of_type("stream_available")} - {live}
            for sid in announced:
                assert watcher.count("stream_ended", stream_id=sid) == 1, sid

    run(main(), 90)


# ---------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------


def save_corpus(results: list[CaseResult], out_dir: Path) -> None:
    """Keep the smallest cases per distinct error code, accepted mutations, boundaries, and breakages."""
    picked: dict[str, list[CaseResult]] = {}

    def offer(key: str, r: CaseResult, keep: int = 2) -> None:
        lst = picked.setdefault(key, [])
        lst.append(r)
        lst.sort(key=lambda x: x.case.size())
        del lst[keep:]

    largest = max((r for r in results if not r.problems and r.case.size() < 70000),
                  key=lambda r: max((s.max_reply for s in r.steps), default=0), default=None)
    if largest is not None:
        picked["largest_reply"] = [largest]
    for r in results:
        if r.problems:
            picked.setdefault("broke", []).append(r)
            continue
        last = r.steps[-1].replies if r.steps else []
        if r.case.kind == "boundary":
            offer(f"boundary_{r.case.note.split()[0]}", r, 1)
            continue
        for code in sorted(r.codes):
            offer(f"error_{code}_{r.case.kind}", r, 1)
        if r.case.kind == "sdp_offer" and last == ["webrtc_answer"]:
            offer("accepted_offer", r)
        elif r.case.kind == "sdp_answer" and last == [] and not r.codes:
            offer("accepted_answer", r)
        elif r.case.kind == "deep" and not r.codes:
            offer("deep_accepted", r, 1)
    # Cap the number of files per code (different case kinds give variety).
    per_code: dict[str, int] = {}
    entries = []
    for key in sorted(picked):
        for i, r in enumerate(picked[key]):
            m = re.match(r"error_(.+?)_(invalid_json|binary|not_object|deep|sdp_offer|sdp_answer|"
                         r"mutated_message|sequence|boundary)$", key)
            if m:
                per_code[m.group(1)] = per_code.get(m.group(1), 0) + 1
                if per_code[m.group(1)] > 3:
                    continue
            if r.case.size() > 70000 and key != "boundary_65537" and key != "broke":
                continue
            entries.append((f"{key}_{i}", r))
    out_dirs = [out_dir]
    if os.environ.get("FUZZ_UPDATE_CORPUS") == "1":
        out_dirs.append(CORPUS_DIR)
        for old in CORPUS_DIR.glob("*.json"):
            old.unlink()
    for d in out_dirs:
        d.mkdir(parents=True, exist_ok=True)
        for name, r in entries:
            doc = r.case.to_json()
            doc["found_by"] = f"test_fuzz_signalling seed {SEED:#x}"
            doc["expect"] = r.expectation()
            if r.problems:
                doc["problems"] = r.problems
            (d / f"{name}.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
