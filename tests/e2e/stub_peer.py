"""A stand-in for the relay, made of aiortc peers, to self-test the browser page.

It speaks just enough of the protocol for one page: ``start_sending`` +
``webrtc_offer`` are answered by an aiortc receiver (audio lands in
``sinks``), ``start_receiving`` is answered with an offer from an aiortc
ToneTrack.  It is NOT a relay; it only proves the page and the Chromium setup.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import AsyncIterator

from aiortc import RTCPeerConnection, RTCSessionDescription
from websockets.asyncio.server import serve

from clients import AudioSink, ToneTrack, rtc_config
from relay_server import free_port


class StubPeer:
    def __init__(self, tone_freq: float = 440.0):
        self.tone_freq = tone_freq
        self.sinks: list[AudioSink] = []
        self.pcs: list[RTCPeerConnection] = []
        self.url = ""

    async def _handler(self, ws) -> None:  # noqa: ANN001
        pc: RTCPeerConnection | None = None
        await ws.send(json.dumps({"type": "available_streams", "streams": []}))
        async for raw in ws:
            msg = json.loads(raw)
            t = msg.get("type")
            if t == "start_sending":
                await ws.send(json.dumps({"type": "sender_ready", "connection_id": "stub", "stream_id": "stream_stub"}))
            elif t == "webrtc_offer":
                pc = RTCPeerConnection(rtc_config())
                self.pcs.append(pc)
                sink = AudioSink("stub sink")
                self.sinks.append(sink)
                pc.on("track", lambda track, s=sink: s.attach(track))
                await pc.setRemoteDescription(RTCSessionDescription(**msg["offer"]))
                await pc.setLocalDescription(await pc.createAnswer())
                await ws.send(json.dumps({"type": "webrtc_answer",
                                          "answer": {"type": "answer", "sdp": pc.localDescription.sdp}}))
            elif t == "start_receiving":
                pc = RTCPeerConnection(rtc_config())
                self.pcs.append(pc)
                pc.addTransceiver(ToneTrack(self.tone_freq), direction="sendonly")
                await pc.setLocalDescription(await pc.createOffer())
                await ws.send(json.dumps({"type": "webrtc_offer",
                                          "offer": {"type": "offer", "sdp": pc.localDescription.sdp}}))
            elif t == "webrtc_answer" and pc is not None:
                await pc.setRemoteDescription(RTCSessionDescription(**msg["answer"]))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator["StubPeer"]:
        port = free_port()
        async with serve(self._handler, "127.0.0.1", port):
            self.url = f"ws://127.0.0.1:{port}/ws"
            try:
                yield self
            finally:
                for pc in self.pcs:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(pc.close(), 5)
