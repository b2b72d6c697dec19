#!/usr/bin/env python3
"""Keeps one live stream on a voice-relay server for the MP3 fan-out benchmark.

Connects to ws://127.0.0.1:PORT/ws, starts a 440 Hz ToneSender (from the
project's aiortc e2e harness, tests/e2e/clients.py) and keeps it sending for
--secs seconds, printing the stream id as soon as it is live.

Network confinement: like clients.py, aioice's host-address gathering is
replaced so ICE only ever offers 127.0.0.1, and the RTCConfiguration has no
ICE servers (aiortc's default would add a public STUN server). Only 127.0.0.1
URLs are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from urllib.parse import urlparse

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_HARNESS = os.environ.get(
    "VOICE_RELAY_E2E", os.path.join(HERE, "..", "..", "tests", "e2e")
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ws", default="ws://127.0.0.1:8080/ws", help="signalling URL (127.0.0.1 only)")
    ap.add_argument("--secs", type=float, default=300.0, help="how long to keep sending (max 3600)")
    ap.add_argument("--freq", type=float, default=440.0)
    ap.add_argument("--harness", default=DEFAULT_HARNESS, help="folder holding clients.py")
    args = ap.parse_args()

    u = urlparse(args.ws)
    if u.scheme != "ws" or u.hostname != "127.0.0.1":
        print(f"refusing {args.ws!r}: only ws://127.0.0.1:PORT/... is allowed", file=sys.stderr)
        return 2
    secs = min(max(args.secs, 1.0), 3600.0)

    sys.path.insert(0, os.path.abspath(args.harness))
    import aioice.ice  # noqa: E402

    import clients  # noqa: E402  (its import already patches aioice)

    def loopback_only(use_ipv4: bool = True, use_ipv6: bool = True) -> list[str]:
        return ["127.0.0.1"] if use_ipv4 else []

    # Same patch as clients.py, applied here too so this script never depends
    # on the harness doing it.
    aioice.ice.get_host_addresses = loopback_only
    assert clients.rtc_config().iceServers == [], "harness must not add ICE servers"

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        sig_client = await clients.Signal.connect(args.ws, "bench-sender")
        await sig_client.expect("available_streams", 5)
        sender = clients.ToneSender(sig_client, args.freq)
        try:
            sid = await sender.start(timeout=15)
            print(f"stream_id={sid}", flush=True)
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(stop.wait(), secs)
            except asyncio.TimeoutError:
                pass
            sent = sender.track.frames_sent
            wall = time.monotonic() - t0
            print(f"done: {sent} frames of 20 ms in {wall:.1f}s", flush=True)
        finally:
            await sender.close()
            await sig_client.close()
        return 0

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
