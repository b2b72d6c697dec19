"""Reusable async helpers that speak the voice relay's wire protocol.

Everything here talks to 127.0.0.1 only.  Importing this module restricts
aiortc's ICE gathering to the loopback address (see ``_loopback_only``).
"""

from __future__ import annotations

import asyncio
import fractions
import json
import time
import urllib.error
import urllib.request
from typing import Any, Awaitable, Callable

import aioice.ice
import av
import numpy as np
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

SAMPLE_RATE = 48000
FRAME_SAMPLES = 960  # 20 ms at 48 kHz


# --------------------------------------------------------------------------
# Network confinement
# --------------------------------------------------------------------------


def _loopback_only(use_ipv4: bool = True, use_ipv6: bool = True) -> list[str]:
    """Replacement for aioice.ice.get_host_addresses: gather 127.0.0.1 only."""
    return ["127.0.0.1"] if use_ipv4 else []


aioice.ice.get_host_addresses = _loopback_only


def rtc_config() -> RTCConfiguration:
    # An explicit empty list: aiortc's default adds a public STUN server.
    return RTCConfiguration(iceServers=[])


# --------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------


def run(coro: Awaitable[Any], timeout: float = 60.0) -> Any:
    """Run one test coroutine in a fresh event loop with a hard time limit."""

    async def main() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(main())


def strip_candidates(sdp: str) -> str:
    """Remove every a=candidate / a=end-of-candidates line (as the HA cards send)."""
    lines = sdp.replace("\r\n", "\n").split("\n")
    kept = [
        ln
        for ln in lines
        if not ln.startswith("a=candidate:") and not ln.startswith("a=end-of-candidates")
    ]
    return "\r\n".join(kept)


def count_candidates(sdp: str) -> int:
    return sum(1 for ln in sdp.splitlines() if ln.startswith("a=candidate:"))


async def wait_until(
    pred: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        await asyncio.sleep(interval)


async def wait_pc_state(pc: RTCPeerConnection, state: str, timeout: float, who: str = "pc") -> None:
    async def waiter() -> None:
        while pc.connectionState != state:
            if pc.connectionState in ("failed", "closed") and state not in ("failed", "closed"):
                raise AssertionError(f"{who}: peer connection went {pc.connectionState}")
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(waiter(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(
            f"{who}: peer connection not {state} within {timeout:.1f}s "
            f"(connection={pc.connectionState}, ice={pc.iceConnectionState})"
        ) from None


# --------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------


class HttpResult:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))


def _http_sync(method: str, url: str, timeout: float, max_body: int) -> HttpResult:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read(max_body) if method != "HEAD" else b""
            return HttpResult(resp.status, {k.lower(): v for k, v in resp.headers.items()}, body)
    except urllib.error.HTTPError as e:
        body = e.read(max_body) if method != "HEAD" else b""
        return HttpResult(e.code, {k.lower(): v for k, v in e.headers.items()}, body)


async def http(method: str, url: str, timeout: float = 5.0, max_body: int = 1 << 20) -> HttpResult:
    """A bounded HTTP request (reads at most max_body bytes of the body)."""
    return await asyncio.wait_for(
        asyncio.to_thread(_http_sync, method, url, timeout, max_body), timeout + 2
    )


async def get_json(url: str, timeout: float = 5.0) -> Any:
    r = await http("GET", url, timeout)
    assert r.status == 200, f"GET {url} -> {r.status}: {r.body[:200]!r}"
    return r.json()


# --------------------------------------------------------------------------
# Signalling
# --------------------------------------------------------------------------


class Signal:
    """A WebSocket signalling client that records every message it receives.

    ``expect()`` returns the first not-yet-consumed message of a type; other
    messages (broadcasts, replies nobody asked for) stay in ``messages`` for
    later assertions.
    """

    def __init__(self, ws: Any, name: str):
        self.ws = ws
        self.name = name
        self.messages: list[dict] = []
        self.times: list[float] = []
        self.non_json: list[Any] = []
        self.close_code: int | None = None
        self.closed = asyncio.Event()
        self._consumed: set[int] = set()
        self._cond = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, url: str, name: str = "client", timeout: float = 5.0) -> "Signal":
        ws = await asyncio.wait_for(
            ws_connect(url, max_size=None, open_timeout=timeout, ping_interval=None, close_timeout=2),
            timeout + 1,
        )
        return cls(ws, name)

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                t = time.monotonic()
                msg: Any = None
                if isinstance(raw, str):
                    try:
                        msg = json.loads(raw)
                    except ValueError:
                        msg = None
                if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
                    self.non_json.append(raw)
                    continue
                async with self._cond:
                    self.messages.append(msg)
                    self.times.append(t)
                    self._cond.notify_all()
        except ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            self.closed.set()
            async with self._cond:
                self._cond.notify_all()

    # -- sending --------------------------------------------------------

    async def send(self, obj: dict) -> None:
        await self.ws.send(json.dumps(obj))

    async def send_text(self, text: str) -> None:
        await self.ws.send(text)

    # -- receiving ------------------------------------------------------

    def summary(self, last: int = 12) -> str:
        items = [m.get("type") for m in self.messages[-last:]]
        return f"{self.name} last messages: {items}"

    async def expect(
        self,
        type_: str,
        timeout: float = 5.0,
        where: Callable[[dict], bool] | None = None,
        fail_on_error: bool = True,
    ) -> dict:
        """Wait for (and consume) the next message of ``type_``.

        With fail_on_error, an ``error`` message arriving after the call
        started fails the wait at once (with the server's message).
        """
        start_index = len(self.messages)
        deadline = time.monotonic() + timeout
        async with self._cond:
            while True:
                for i, m in enumerate(self.messages):
                    if i in self._consumed or m.get("type") != type_:
                        continue
                    if where is not None and not where(m):
                        continue
                    self._consumed.add(i)
                    return m
                if fail_on_error and type_ != "error":
                    for i in range(start_index, len(self.messages)):
                        m = self.messages[i]
                        if i not in self._consumed and m.get("type") == "error":
                            raise AssertionError(
                                f"{self.name}: server sent error while waiting for {type_}: {m}"
                            )
                if self.closed.is_set():
                    raise AssertionError(
                        f"{self.name}: socket closed (code {self.close_code}) while waiting "
                        f"for {type_}; {self.summary()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"{self.name}: no {type_} within {timeout:.1f}s; {self.summary()}"
                    )
                try:
                    await asyncio.wait_for(self._cond.wait(), remaining)
                except asyncio.TimeoutError:
                    pass

    async def expect_error(self, timeout: float = 5.0) -> dict:
        msg = await self.expect("error", timeout)
        assert isinstance(msg.get("message"), str) and msg["message"].strip(), (
            f"{self.name}: error without a non-empty message: {msg}"
        )
        return msg

    def of_type(self, type_: str, **fields: Any) -> list[dict]:
        return [
            m
            for m in self.messages
            if m.get("type") == type_ and all(m.get(k) == v for k, v in fields.items())
        ]

    def count(self, type_: str, **fields: Any) -> int:
        return len(self.of_type(type_, **fields))

    async def request_streams(self, timeout: float = 5.0) -> list[str]:
        await self.send({"type": "get_available_streams"})
        msg = await self.expect("available_streams", timeout)
        streams = msg.get("streams")
        assert isinstance(streams, list), f"available_streams.streams is not a list: {msg}"
        return streams

    async def ping(self, timeout: float = 5.0) -> None:
        """Prove the socket is still served: one request/response round trip."""
        await self.request_streams(timeout)

    def assert_json_only(self) -> None:
        assert not self.non_json, f"{self.name}: server sent non-JSON frames: {self.non_json[:3]!r}"

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.ws.close(), 3)
        except Exception:
            pass
        self._reader.cancel()
        try:
            await self._reader
        except BaseException:
            pass


# --------------------------------------------------------------------------
# Audio analysis
# --------------------------------------------------------------------------


def dominant_frequency(samples: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    """Frequency of the strongest spectral peak (Hann window, parabolic interpolation)."""
    x = np.asarray(samples, dtype=np.float64)
    if len(x) < 256:
        return 0.0
    x = x - x.mean()
    w = np.hanning(len(x))
    spec = np.abs(np.fft.rfft(x * w))
    spec[0] = 0.0
    k = int(np.argmax(spec))
    if 0 < k < len(spec) - 1:
        a, b, c = np.log(spec[k - 1] + 1e-12), np.log(spec[k] + 1e-12), np.log(spec[k + 1] + 1e-12)
        denom = a - 2 * b + c
        delta = 0.5 * (a - c) / denom if denom != 0 else 0.0
    else:
        delta = 0.0
    return (k + delta) * rate / len(x)


def tone_purity(samples: np.ndarray, freq: float, rate: int = SAMPLE_RATE, band: float = 25.0) -> float:
    """Share of signal energy within +-band Hz of freq (1.0 = a pure tone)."""
    x = np.asarray(samples, dtype=np.float64)
    x = x - x.mean()
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
    freqs = np.fft.rfftfreq(len(x), 1.0 / rate)
    total = spec[freqs > 20].sum()
    if total <= 0:
        return 0.0
    return float(spec[np.abs(freqs - freq) <= band].sum() / total)


def rms(samples: np.ndarray) -> float:
    x = np.asarray(samples, dtype=np.float64)
    return float(np.sqrt(np.mean(x * x))) if len(x) else 0.0


def sine_wav_bytes(freq: float, seconds: float, rate: int = SAMPLE_RATE, amplitude: float = 0.5) -> bytes:
    """A mono 16-bit PCM WAV file holding a sine wave (whole number of periods)."""
    import io
    import wave

    n = int(rate * seconds)
    # Make the loop seamless: round to a whole number of periods.
    periods = max(1, round(n * freq / rate))
    n = int(round(periods * rate / freq))
    t = np.arange(n)
    pcm = (amplitude * 32767 * np.sin(2 * np.pi * freq * t / rate)).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


# --------------------------------------------------------------------------
# Media tracks
# --------------------------------------------------------------------------


class ToneTrack(MediaStreamTrack):
    """A live audio track: a sine of ``freq`` Hz, 48 kHz s16 mono, 20 ms frames.

    With ``pulse=(period_s, on_s)`` the tone is gated into bursts and the
    emission time of every burst onset is recorded in ``onsets`` (monotonic
    seconds), for latency measurements. With ``lead=(freq, seconds)`` the
    first ``seconds`` of the track are a sine of that other frequency (a
    marker for "the stream's first words").
    """

    kind = "audio"

    def __init__(
        self,
        freq: float,
        amplitude: float = 0.3,
        pulse: tuple[float, float] | None = None,
        lead: tuple[float, float] | None = None,
    ):
        super().__init__()
        self.freq = float(freq)
        self.amplitude = amplitude
        self.pulse = pulse
        self.lead = lead
        self.onsets: list[float] = []
        self.frames_sent = 0
        self._start: float | None = None
        self._pts = 0

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
            self._pts = 0
        else:
            self._pts += FRAME_SAMPLES
            wait = self._start + self._pts / SAMPLE_RATE - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        emitted = time.monotonic()
        n = np.arange(self._pts, self._pts + FRAME_SAMPLES)
        freq = self.freq
        if self.lead is not None and self._pts < self.lead[1] * SAMPLE_RATE:
            freq = self.lead[0]
        x = self.amplitude * np.sin(2 * np.pi * freq * n / SAMPLE_RATE)
        if self.pulse is not None:
            period = int(self.pulse[0] * SAMPLE_RATE)
            on = int(self.pulse[1] * SAMPLE_RATE)
            phase = n % period
            x = x * (phase < on)
            for idx in np.nonzero(phase == 0)[0]:
                self.onsets.append(emitted + idx / SAMPLE_RATE)
        pcm = (x * 32767).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        self.frames_sent += 1
        return frame


def frame_to_mono(frame: av.AudioFrame) -> np.ndarray:
    arr = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if arr.ndim == 2 and arr.shape[0] == 1 and channels > 1:  # packed, interleaved
        arr = arr.reshape(-1, channels)[:, 0]
    else:
        arr = arr[0]
    if frame.format.name.startswith("flt"):
        arr = arr * 32767.0
    return arr.astype(np.float64)


class AudioSink:
    """Consumes a remote audio track, keeping samples and their arrival times."""

    def __init__(self, who: str):
        self.who = who
        self.chunks: list[np.ndarray] = []
        self.arrivals: list[float] = []
        self.sample_rate = SAMPLE_RATE
        self.ended = asyncio.Event()
        self.started = asyncio.Event()
        self.end_time: float | None = None
        self._task: asyncio.Task | None = None

    def attach(self, track: MediaStreamTrack) -> None:
        self._task = asyncio.create_task(self._consume(track))

    async def _consume(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                self._take(await track.recv())
                self.started.set()
        except MediaStreamError:
            pass
        finally:
            self.end_time = time.monotonic()
            self.ended.set()

    def _take(self, frame) -> None:  # noqa: ANN001
        """Keeps one received frame (subclasses may keep less)."""
        self.sample_rate = frame.sample_rate or SAMPLE_RATE
        self.chunks.append(frame_to_mono(frame))
        self.arrivals.append(time.monotonic())

    @property
    def frames(self) -> int:
        return len(self.chunks)

    def seconds(self) -> float:
        return sum(len(c) for c in self.chunks) / self.sample_rate

    def samples(self, last_seconds: float | None = None) -> np.ndarray:
        if not self.chunks:
            return np.zeros(0)
        if last_seconds is None:
            return np.concatenate(self.chunks)
        need = int(last_seconds * self.sample_rate)
        out: list[np.ndarray] = []
        have = 0
        for c in reversed(self.chunks):
            out.append(c)
            have += len(c)
            if have >= need:
                break
        return np.concatenate(out[::-1])[-need:]

    def frames_since(self, t: float) -> int:
        return sum(1 for a in self.arrivals if a >= t)

    def dominant_frequency(self, last_seconds: float = 1.0) -> float:
        return dominant_frequency(self.samples(last_seconds), self.sample_rate)

    def purity(self, freq: float, last_seconds: float = 1.0) -> float:
        return tone_purity(self.samples(last_seconds), freq, self.sample_rate)

    def level(self, last_seconds: float = 1.0) -> float:
        return rms(self.samples(last_seconds))

    async def wait_seconds(self, seconds: float, timeout: float = 10.0) -> None:
        await wait_until(
            lambda: self.seconds() >= seconds,
            timeout,
            what=f"{self.who}: {seconds:.1f}s of audio (have {self.seconds():.2f}s)",
        )

    async def wait_more(self, seconds: float, timeout: float = 10.0) -> None:
        target = self.seconds() + seconds
        await wait_until(
            lambda: self.seconds() >= target or self.ended.is_set(),
            timeout,
            what=f"{self.who}: {seconds:.1f}s more audio",
        )
        assert not self.ended.is_set() or self.seconds() >= target, f"{self.who}: track ended"

    def onsets(self, threshold: float, quiet: float = 0.05) -> list[float]:
        """Arrival times of burst onsets: first sample over threshold after >= quiet s below it."""
        if not self.chunks:
            return []
        times = []
        quiet_n = int(quiet * self.sample_rate)
        below = quiet_n  # treat the start as quiet
        for chunk, arrival in zip(self.chunks, self.arrivals):
            loud = np.abs(chunk) >= threshold
            for i in range(len(chunk)):
                if loud[i]:
                    if below >= quiet_n:
                        times.append(arrival + i / self.sample_rate)
                    below = 0
                else:
                    below += 1
        return times


def match_latencies(sent: list[float], received: list[float], max_latency: float) -> list[float]:
    """For each received onset, latency to the latest sent onset before it."""
    out = []
    for tr in received:
        prior = [ts for ts in sent if ts <= tr]
        if prior and tr - prior[-1] <= max_latency:
            out.append(tr - prior[-1])
    return out


# --------------------------------------------------------------------------
# Sender / receiver flows
# --------------------------------------------------------------------------


class ToneSender:
    """An aiortc sender: start_sending -> sender_ready -> webrtc_offer -> webrtc_answer."""

    def __init__(
        self,
        signal: Signal,
        freq: float = 440.0,
        strip_candidates: bool = False,
        pulse: tuple[float, float] | None = None,
        amplitude: float = 0.3,
        lead: tuple[float, float] | None = None,
    ):
        self.signal = signal
        self.track = ToneTrack(freq, amplitude=amplitude, pulse=pulse, lead=lead)
        self.freq = float(freq)
        self.strip = strip_candidates
        self.pc = RTCPeerConnection(rtc_config())
        self.stream_id: str | None = None
        self.ready_msg: dict | None = None
        self.offer_sdp: str | None = None
        self.answer_sdp: str | None = None

    async def start(self, timeout: float = 10.0, wait_connected: bool = True) -> str:
        await self.signal.send({"type": "start_sending"})
        self.ready_msg = await self.signal.expect("sender_ready", timeout)
        self.stream_id = self.ready_msg.get("stream_id")
        await self.offer(timeout)
        if wait_connected:
            await wait_pc_state(self.pc, "connected", timeout, f"{self.signal.name} sender")
        if self.stream_id is None:
            msg = await self.signal.expect("stream_available", timeout)
            self.stream_id = msg["stream_id"]
        return self.stream_id

    async def offer(self, timeout: float = 10.0) -> None:
        self.pc.addTransceiver(self.track, direction="sendonly")
        offer = await self.pc.createOffer()
        await self.pc.setLocalDescription(offer)
        sdp = self.pc.localDescription.sdp
        if self.strip:
            sdp = strip_candidates(sdp)
        self.offer_sdp = sdp
        await self.signal.send({"type": "webrtc_offer", "offer": {"type": "offer", "sdp": sdp}})
        msg = await self.signal.expect("webrtc_answer", timeout)
        answer = msg.get("answer") or {}
        assert answer.get("type") == "answer" and isinstance(answer.get("sdp"), str), msg
        self.answer_sdp = answer["sdp"]
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))

    async def stop_stream(self) -> None:
        await self.signal.send({"type": "stop_stream"})

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.pc.close(), 5)
        except Exception:
            pass


class ToneReceiver:
    """An aiortc receiver: start_receiving -> server webrtc_offer -> webrtc_answer."""

    def __init__(self, signal: Signal, strip_candidates: bool = False):
        self.signal = signal
        self.strip = strip_candidates
        self.pc: RTCPeerConnection | None = None
        self.sink = AudioSink(f"{signal.name} receiver")
        self.offer_sdp: str | None = None
        self.answer_sdp: str | None = None

    async def start(self, stream_id: str | None = None, timeout: float = 10.0, wait_connected: bool = True) -> None:
        msg: dict = {"type": "start_receiving"}
        if stream_id is not None:
            msg["stream_id"] = stream_id
        await self.signal.send(msg)
        offer = await self.signal.expect("webrtc_offer", timeout)
        await self.accept(offer, timeout, wait_connected)

    async def accept(self, offer_msg: dict, timeout: float = 10.0, wait_connected: bool = True) -> None:
        offer = offer_msg.get("offer") or {}
        assert offer.get("type") == "offer" and isinstance(offer.get("sdp"), str), offer_msg
        self.offer_sdp = offer["sdp"]
        self.pc = RTCPeerConnection(rtc_config())

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self.sink.attach(track)

        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer["sdp"], type="offer"))
        answer = await self.pc.createAnswer()
        await self.pc.setLocalDescription(answer)
        sdp = self.pc.localDescription.sdp
        if self.strip:
            sdp = strip_candidates(sdp)
        self.answer_sdp = sdp
        await self.signal.send({"type": "webrtc_answer", "answer": {"type": "answer", "sdp": sdp}})
        if wait_connected:
            await wait_pc_state(self.pc, "connected", timeout, f"{self.signal.name} receiver")

    # convenience pass-throughs
    @property
    def frames(self) -> int:
        return self.sink.frames

    @property
    def ended(self) -> bool:
        return self.sink.ended.is_set()

    def dominant_frequency(self, last_seconds: float = 1.0) -> float:
        return self.sink.dominant_frequency(last_seconds)

    async def wait_audio(self, seconds: float = 1.5, timeout: float = 10.0) -> None:
        await self.sink.wait_seconds(seconds, timeout)

    async def wait_ended(self, timeout: float = 10.0) -> None:
        try:
            await asyncio.wait_for(self.sink.ended.wait(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(
                f"{self.signal.name}: receiver track did not end within {timeout:.1f}s "
                f"(pc={self.pc.connectionState if self.pc else None})"
            ) from None

    async def close(self) -> None:
        if self.pc is not None:
            try:
                await asyncio.wait_for(self.pc.close(), 5)
            except Exception:
                pass


def assert_tone(rx: ToneReceiver | AudioSink, freq: float, tol: float = 15.0, min_purity: float = 0.5) -> None:
    sink = rx.sink if isinstance(rx, ToneReceiver) else rx
    got = sink.dominant_frequency(1.0)
    level = sink.level(1.0)
    purity = sink.purity(freq, 1.0)
    assert level > 300, f"{sink.who}: near silence (rms {level:.0f}), dominant {got:.1f} Hz"
    assert abs(got - freq) <= tol, f"{sink.who}: dominant {got:.1f} Hz, expected {freq} +-{tol}"
    assert purity >= min_purity, f"{sink.who}: tone purity {purity:.2f} < {min_purity} at {freq} Hz"


# --------------------------------------------------------------------------
# A per-test bag of clients that are all closed at the end
# --------------------------------------------------------------------------


class Clients:
    def __init__(self, ws_url: str, http_url: str):
        self.ws_url = ws_url
        self.http_url = http_url
        self.signals: list[Signal] = []
        self.peers: list[ToneSender | ToneReceiver] = []
        self._n = 0

    async def __aenter__(self) -> "Clients":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        for p in self.peers:
            await p.close()
        for s in self.signals:
            await s.close()

    async def signal(self, name: str | None = None, url: str | None = None, expect_list: bool = True) -> Signal:
        self._n += 1
        s = await Signal.connect(url or self.ws_url, name or f"client{self._n}")
        self.signals.append(s)
        if expect_list:
            await s.expect("available_streams", 5)
        return s

    async def sender(self, freq: float = 440.0, signal: Signal | None = None, **kw: Any) -> ToneSender:
        s = signal or await self.signal(f"sender{int(freq)}")
        snd = ToneSender(s, freq, **kw)
        self.peers.append(snd)
        await snd.start()
        return snd

    async def receiver(
        self, stream_id: str | None = None, signal: Signal | None = None, name: str | None = None, **kw: Any
    ) -> ToneReceiver:
        s = signal or await self.signal(name)
        rx = ToneReceiver(s, **kw)
        self.peers.append(rx)
        await rx.start(stream_id)
        return rx

    def track(self, peer: ToneSender | ToneReceiver) -> Any:
        self.peers.append(peer)
        return peer

    async def health(self) -> dict:
        return await get_json(self.http_url + "/health")

    async def wait_health(self, pred: Callable[[dict], bool], timeout: float = 5.0, what: str = "health") -> dict:
        deadline = time.monotonic() + timeout
        last: dict = {}
        while True:
            last = await self.health()
            if pred(last):
                return last
            if time.monotonic() >= deadline:
                raise AssertionError(f"/health never satisfied {what} within {timeout}s; last: {last}")
            await asyncio.sleep(0.1)


def health_idle(h: dict) -> bool:
    return h.get("senders") == 0 and h.get("receivers") == 0 and h.get("active_streams") == []
