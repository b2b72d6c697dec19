#!/usr/bin/env python3
"""Time-to-first-audio of a headless Chromium <audio> element on voice-relay's live MP3.

For each --mp3-burst-ms value (default: 1000, the server default, and 1500)
this starts a private copy of voice-relay on 127.0.0.1, keeps one live 440 Hz
aiortc stream on it (sender.py), launches headless Chromium through Playwright
(the e2e suite's flags, tests/e2e/browser.py, plus
--autoplay-policy=no-user-gesture-required) and takes N samples each of

    http://127.0.0.1:PORT/stream/latest.mp3   and   /stream/{id}.mp3

One sample = a fresh browser context with an about:blank page
(page.set_content) in which a new <audio> element is created; inside the
page, performance.now() is taken just before `audio.src = url; audio.play()`
and the script reports the delay to

    playing   the element's first `playing` event
    ct>0      the first time audio.currentTime > 0 (polled every ~4 ms and on
              every timeupdate, so it is exact to a few ms)

and, for context, the first loadedmetadata / canplay events. A reference
"raw HTTP first body byte" (plain Python socket, same path) is taken once per
sample too, so server latency can be told apart from Chromium's own
buffering. After --warmup-samples uncounted samples per path (browser
warm-up), samples of the two paths are interleaved, with --gap seconds
between them; the element is unloaded and its context closed after each.

Network: it refuses to run unless the only network interface is `lo` (run it
under `unshare -n`, see chromium_ttfa.sh) and only ever talks to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
E2E = REPO / "tests" / "e2e"

# Runs inside the page. Resolves with the delays (ms) from just before
# `audio.src = url` to each milestone.
MEASURE_JS = r"""
async ({url, timeoutMs}) => {
  const a = document.createElement('audio');
  document.body.appendChild(a);
  const r = {};
  let t0 = 0;
  const mark = (k) => { if (!(k in r)) r[k] = +(performance.now() - t0).toFixed(2); };
  for (const ev of ['loadstart', 'loadedmetadata', 'loadeddata', 'canplay', 'canplaythrough',
                    'playing', 'waiting', 'stalled', 'error']) {
    a.addEventListener(ev, () => mark(ev));
  }
  const result = await new Promise((resolve) => {
    let poll = 0, timer = 0;
    const finish = (why) => { clearInterval(poll); clearTimeout(timer); r.end = why; resolve(r); };
    const check = () => {
      if (a.currentTime > 0) {
        mark('ct');
        r.ctValue = a.currentTime;
        if ('playing' in r) finish('ok');
      }
    };
    a.addEventListener('timeupdate', check);
    a.addEventListener('playing', check);
    poll = setInterval(check, 1);
    timer = setTimeout(() => finish('timeout'), timeoutMs);
    t0 = performance.now();
    a.src = url;
    a.play().then(() => mark('playResolved'), (e) => { r.playError = String(e); });
  });
  if (a.error) result.mediaError = a.error.code + ' ' + a.error.message;
  const b = a.buffered;  // at the end of the sample
  result.buffered = Array.from({length: b.length}, (_, k) => [+b.start(k).toFixed(3), +b.end(k).toFixed(3)]);
  a.pause();
  a.removeAttribute('src');
  a.load();  // drops the HTTP connection
  a.remove();
  return result;
}
"""


def loopback_only_netns() -> None:
    ifaces = sorted(name for _, name in socket.if_nameindex())  # this netns (sysfs may show the host's)
    if ifaces != ["lo"]:
        sys.exit(f"refusing to run: network interfaces {ifaces}; run inside `unshare -n` (chromium_ttfa.sh)")


def wait_for_binary(path: Path, max_wait: float) -> None:
    deadline = time.monotonic() + max_wait
    while not path.is_file():
        if time.monotonic() > deadline:
            sys.exit(f"server binary {path} still missing after {max_wait:.0f}s")
        print(f"waiting for {path} (being rebuilt?)", file=sys.stderr, flush=True)
        time.sleep(10)


def http_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=2) as r:
        return json.loads(r.read())


def raw_first_byte_ms(port: int, path: str, timeout: float = 10.0) -> float | None:
    """ms from connect() to the first response-body byte (plain socket, HTTP/1.1)."""
    t0 = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            buf = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return None
                buf += chunk
                head_end = buf.find(b"\r\n\r\n")
                if head_end >= 0 and len(buf) > head_end + 4:
                    return (time.perf_counter() - t0) * 1000
    except OSError:
        return None


class Server:
    """Private copy of voice-relay + sender.py keeping one live stream."""

    def __init__(self, binary: Path, port: int, burst_ms: int, workdir: Path, py: str, extra: list[str]):
        self.port, self.burst_ms, self.workdir, self.py, self.extra = port, burst_ms, workdir, py, extra
        self.bin = workdir / "voice-relay"
        shutil.copy2(binary, self.bin)  # a rebuild of the repo's binary mid-run cannot matter
        self.srv: subprocess.Popen | None = None
        self.snd: subprocess.Popen | None = None
        self.stream_id = ""

    def start(self) -> None:
        base = f"http://127.0.0.1:{self.port}"
        log = open(self.workdir / f"server-{self.burst_ms}.log", "wb")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"), NO_COLOR="1")
        self.srv = subprocess.Popen(
            [str(self.bin), "--listen", f"127.0.0.1:{self.port}", "--mp3-burst-ms", str(self.burst_ms), *self.extra],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        for _ in range(100):
            try:
                http_json(base + "/health")
                break
            except OSError:
                if self.srv.poll() is not None:
                    sys.exit(f"server exited ({self.srv.returncode}); see {log.name}")
                time.sleep(0.1)
        else:
            sys.exit("server /health never came up")
        slog = self.workdir / f"sender-{self.burst_ms}.log"
        self.snd = subprocess.Popen(
            [self.py, str(HERE / "sender.py"), "--ws", f"ws://127.0.0.1:{self.port}/ws",
             "--secs", "1800", "--harness", str(E2E)],
            stdin=subprocess.DEVNULL, stdout=open(slog, "wb"), stderr=subprocess.STDOUT,
        )
        for _ in range(300):
            text = slog.read_text(errors="replace")
            for line in text.splitlines():
                if line.startswith("stream_id="):
                    self.stream_id = line.split("=", 1)[1].strip()
            if self.stream_id:
                break
            if self.snd.poll() is not None:
                sys.exit(f"sender exited:\n{text}")
            time.sleep(0.1)
        else:
            sys.exit("sender never reported a stream id")

    def stop(self) -> None:
        for p in (self.snd, self.srv):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)


def summary(values: list[float]) -> str:
    if not values:
        return "      -       -       -"
    return f"{min(values):7.1f} {statistics.median(values):7.1f} {max(values):7.1f}"


async def run_burst(args: argparse.Namespace, burst_ms: int, workdir: Path) -> list[dict]:
    sys.path.insert(0, str(E2E))
    from browser import CHROMIUM, chromium_args  # the e2e suite's Chromium and flags
    from playwright.async_api import async_playwright

    srv = Server(Path(args.server), args.port, burst_ms, workdir, args.py, shlex.split(args.server_args))
    rows: list[dict] = []
    try:
        srv.start()
        print(f"# burst {burst_ms} ms: server pid {srv.srv.pid} args {args.server_args!r}, stream {srv.stream_id}",
              flush=True)
        await asyncio.sleep(args.warmup)  # let the burst ring fill (>= burst_ms of audio)
        paths = {"latest": "/stream/latest.mp3", "id": f"/stream/{srv.stream_id}.mp3"}
        flags = [a for a in chromium_args(Path("/dev/null")) if "fake" not in a]
        flags += ["--disable-background-timer-throttling", "--disable-renderer-backgrounding"]
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=flags, timeout=30000)
            if burst_ms == args.bursts[0]:
                print(f"# chromium {browser.version} flags: {' '.join(flags)}", flush=True)
            try:
                for i in range(-args.warmup_samples, args.samples):  # i < 0: warm-up, not counted
                    for kind in args.paths:
                        url = f"http://127.0.0.1:{args.port}{paths[kind]}"
                        ctx = await browser.new_context()
                        page = await ctx.new_page()
                        await page.set_content("<!doctype html><title>ttfa</title><body></body>")
                        r = await page.evaluate(MEASURE_JS, {"url": url, "timeoutMs": args.timeout * 1000})
                        await ctx.close()
                        await asyncio.sleep(0.2)
                        r["raw_fb"] = await asyncio.to_thread(raw_first_byte_ms, args.port, paths[kind])
                        r.update(burst=burst_ms, path=kind, i=i)
                        if i >= 0:
                            rows.append(r)
                        print(("sample " if i >= 0 else "warmup ")+ json.dumps(r, sort_keys=True), flush=True)
                        await asyncio.sleep(args.gap)
            finally:
                await browser.close()
        h = http_json(f"http://127.0.0.1:{args.port}/health")
        print(f"# burst {burst_ms} ms: health after: senders={h.get('senders')} "
              f"mp3_listeners={h.get('mp3_listeners')}", flush=True)
    finally:
        srv.stop()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bursts", default="1000,1500", help="--mp3-burst-ms values to compare")
    ap.add_argument("--samples", type=int, default=10, help="samples per burst and path")
    ap.add_argument("--paths", default="latest,id", help="latest and/or id")
    ap.add_argument("--port", type=int, default=18090)
    ap.add_argument("--gap", type=float, default=1.0, help="seconds between samples")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds after the stream is live")
    ap.add_argument("--warmup-samples", type=int, default=1, help="uncounted samples per path first")
    ap.add_argument("--timeout", type=float, default=15.0, help="per-sample limit, s")
    ap.add_argument("--server", default=str(REPO / "target" / "release" / "voice-relay"))
    ap.add_argument("--server-args", default="", help="extra voice-relay flags, e.g. '--mp3-bitrate 64'")
    ap.add_argument("--py", default=sys.executable, help="python with aiortc, for sender.py")
    args = ap.parse_args()
    args.bursts = [int(b) for b in args.bursts.split(",")]
    args.paths = [p for p in args.paths.split(",") if p]
    assert set(args.paths) <= {"latest", "id"}, args.paths
    args.samples = max(1, min(args.samples, 100))

    loopback_only_netns()
    wait_for_binary(Path(args.server), 1200)
    print(f"# server {args.server} "
          f"(mtime {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(Path(args.server).stat().st_mtime))}), "
          f"{os.cpu_count()} cores, load avg {os.getloadavg()[0]:.2f}", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="chromium-ttfa-") as tmp:
        for b in args.bursts:
            rows += asyncio.run(run_burst(args, b, Path(tmp)))

    print()
    print(f"time to first audio, ms (min / median / max), N={args.samples} per row")
    print(f"{'burst':>6} {'path':>7} {'ok':>5} | {'playing event':^23} | {'currentTime > 0':^23} |"
          f" {'canplay':^23} | {'raw HTTP 1st body byte':^23}")
    for b in args.bursts:
        for kind in args.paths:
            rs = [r for r in rows if r["burst"] == b and r["path"] == kind]
            ok = [r for r in rs if r.get("end") == "ok"]
            col = lambda k: [r[k] for r in ok if r.get(k) is not None]  # noqa: E731
            print(f"{b:>6} {kind:>7} {len(ok):>2}/{len(rs):<2} | {summary(col('playing'))} |"
                  f" {summary(col('ct'))} | {summary(col('canplay'))} | {summary(col('raw_fb'))}")
    bad = [r for r in rows if r.get("end") != "ok"]
    if bad:
        print(f"{len(bad)} sample(s) did not reach playing + currentTime>0: "
              + "; ".join(json.dumps(r, sort_keys=True) for r in bad))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
