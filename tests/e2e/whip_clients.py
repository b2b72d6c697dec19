"""WHIP (RFC 9725) and WHEP clients for the e2e tests: plain HTTP requests
(aiohttp), an aiortc publisher and player, FFmpeg's ``whip`` muxer (the
static build in the ``imageio-ffmpeg`` package), and SDP offers shaped like
other tools' (OBS: audio + video)."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass

import aiohttp
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription

from clients import AudioSink, ToneTrack, rtc_config, wait_pc_state


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str


async def request(
    method: str,
    url: str,
    body: str | bytes | None = None,
    content_type: str | None = "application/sdp",
    token: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Reply:
    """One HTTP request; header names in the reply are lower case."""
    h = dict(headers or {})
    if body is not None and content_type is not None:
        h["Content-Type"] = content_type
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=client_timeout) as session:
        async with session.request(method, url, data=body, headers=h) as resp:
            text = await resp.text(errors="replace")
            return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, text)


def m_lines(sdp: str) -> list[str]:
    return [ln.strip() for ln in sdp.splitlines() if ln.startswith("m=")]


class _OfferingPeer:
    """An aiortc peer that offers over HTTP (WHIP or WHEP): POST the offer,
    take the answer and the session URL, DELETE that URL to end."""

    role = "peer"

    def __init__(self, base: str, path: str, token: str | None):
        self.base = base
        self.url = base + path
        self.token = token
        self.pc = RTCPeerConnection(rtc_config())
        self.location: str | None = None
        self.reply: Reply | None = None

    async def start(self, timeout: float = 10.0, expect: int = 201) -> Reply:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        reply = await request("POST", self.url, self.pc.localDescription.sdp, token=self.token)
        self.reply = reply
        assert reply.status == expect, f"{self.role} POST -> {reply.status} (want {expect}): {reply.text[:300]}"
        if expect != 201:
            return reply
        self.location = reply.headers["location"]
        self.answered(reply)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=reply.text, type="answer"))
        await wait_pc_state(self.pc, "connected", timeout, self.role)
        return reply

    def answered(self, reply: Reply) -> None:
        """Hook: what a subclass keeps from a 201."""

    async def delete(self) -> Reply:
        assert self.location is not None
        return await request("DELETE", self.base + self.location, token=self.token)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.pc.close(), 5)
        except Exception:
            pass


class WhipPublisher(_OfferingPeer):
    """An aiortc sender that publishes a tone over WHIP."""

    role = "WHIP publisher"

    def __init__(self, base: str, path: str = "/whip", freq: float = 440.0, token: str | None = None):
        super().__init__(base, path, token)
        self.pc.addTransceiver(ToneTrack(freq, amplitude=0.3), direction="sendonly")
        self.stream_id: str | None = None

    def answered(self, reply: Reply) -> None:
        self.stream_id = reply.headers.get("x-stream-id")


class WhepPlayer(_OfferingPeer):
    """An aiortc player that offers recvonly audio over WHEP."""

    role = "WHEP player"

    def __init__(self, base: str, path: str, token: str | None = None):
        super().__init__(base, path, token)
        self.pc.addTransceiver("audio", direction="recvonly")
        self.sink = AudioSink("WHEP player")

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self.sink.attach(track)


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


class FfmpegWhip:
    """FFmpeg's WHIP muxer publishing a sine as Opus, in real time."""

    def __init__(self, url: str, freq: float = 440.0, token: str | None = None):
        self.args = [
            ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "info",
            "-re", "-f", "lavfi", "-i", f"sine=frequency={freq}:sample_rate=48000",
            "-c:a", "libopus", "-ac", "2", "-ar", "48000", "-b:a", "64k",
        ]
        if token is not None:
            self.args += ["-authorization", token]
        self.args += ["-f", "whip", url]
        self.proc: asyncio.subprocess.Process | None = None
        self.stderr = b""

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )

    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def stop(self, timeout: float = 10.0) -> int | None:
        """SIGINT (FFmpeg then ends the session with DELETE) and wait."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = await asyncio.wait_for(self.proc.communicate(), timeout)
            self.stderr += err
        except asyncio.TimeoutError:
            self.proc.kill()
            _, err = await self.proc.communicate()
            self.stderr += err
        return self.proc.returncode

    async def vanish(self) -> None:
        """SIGKILL: no DELETE, no DTLS close, as a client that loses power."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            _, err = await self.proc.communicate()
            self.stderr += err

    def log(self, tail: int = 1500) -> str:
        return self.stderr.decode(errors="replace")[-tail:]


_FINGERPRINT = ":".join(f"{(i * 37) % 256:02X}" for i in range(32))


def offer_sdp(audio_codecs: list[str], video: bool) -> str:
    """An offer shaped like OBS's (libdatachannel): BUNDLE and LS groups,
    ICE and DTLS attributes in each m-section, audio then video."""
    mids = "0 1" if video else "0"
    lines = [
        "v=0",
        "o=rtc 3767197920 0 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        f"a=group:BUNDLE {mids}",
        f"a=group:LS {mids}",
        "a=msid-semantic:WMS *",
    ]

    def section(kind: str, mid: str, pts: list[tuple[int, str, str | None]], ssrc: int) -> list[str]:
        out = [
            f"m={kind} 9 UDP/TLS/RTP/SAVPF {' '.join(str(pt) for pt, _, _ in pts)}",
            "c=IN IP4 0.0.0.0",
            f"a=mid:{mid}",
            "a=sendonly",
            "a=ice-ufrag:Xb3n",
            "a=ice-pwd:Nk2cQ7n0dVvE0hYk5m4T1p",
            "a=ice-options:trickle",
            f"a=fingerprint:sha-256 {_FINGERPRINT}",
            "a=setup:actpass",
            f"a=ssrc:{ssrc} cname:obs",
            f"a=msid:obs obs-{kind}",
            "a=rtcp-mux",
        ]
        for pt, rtpmap, fmtp in pts:
            out.append(f"a=rtpmap:{pt} {rtpmap}")
            if fmtp:
                out.append(f"a=fmtp:{pt} {fmtp}")
        return out

    audio = {
        "opus": (111, "opus/48000/2", "minptime=10;useinbandfec=1;stereo=1;sprop-stereo=1"),
        "pcmu": (0, "PCMU/8000", None),
    }
    lines += section("audio", "0", [audio[c] for c in audio_codecs], 1111)
    if video:
        h264 = (96, "H264/90000", "profile-level-id=42e01f;packetization-mode=1;level-asymmetry-allowed=1")
        lines += section("video", "1", [h264], 2222)
    return "\r\n".join(lines) + "\r\n"
