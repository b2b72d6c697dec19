"""Packaging checks: the release artefacts run, with real clients, where users run them.

Run by scripts/package-test.sh (not by scripts/test.sh), inside a loopback-only network
namespace, after it has built dist/ and the image. It selects what to test through:
- PACKAGE_QEMU_BIN: a wrapper that runs the aarch64 binary under qemu-aarch64-static;
- PACKAGE_IMAGE: the podman image (linux/amd64) to run with --network host;
- PACKAGE_SUMMARY: a file to which figures (idle RSS, stop time) are appended.
Reuses the e2e harness (tests/e2e: relay_server.py, clients.py, test_mp3.py, test_tls.py).
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from clients import Clients, assert_tone, run  # noqa: E402
from relay_server import RelayServer, free_port  # noqa: E402
from test_mp3 import assert_clean_tone, ffmpeg_capture  # noqa: E402
from test_tls import trust_only, wss_call  # noqa: E402

# Measured here (podman 4.3 as root, without CAP_SYS_RESOURCE): run with runc, which can only
# lower the rlimits podman sets (nofile, nproc). --network host: the test's namespace, which
# has only loopback. The health timer needs systemd; the check is run by hand instead.
PODMAN_RUN = [
    "podman", "run", "--runtime", "runc", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096",
    "--network", "host", "--health-interval", "disable",
]
PANIC = re.compile(r"panicked at|stack backtrace")


def summary(line: str) -> None:
    path = os.environ.get("PACKAGE_SUMMARY")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def call_and_listen(ws_url: str, http_url: str, freq: float) -> None:
    """An aiortc sender, an aiortc receiver of its stream, and ffmpeg on its MP3."""

    async def main() -> None:
        async with Clients(ws_url, http_url) as c:
            snd = await c.sender(freq)
            rx = await c.receiver(snd.stream_id)
            await rx.wait_audio(2.0, timeout=20.0)
            assert_tone(rx, freq, min_purity=0.8)
            cap = await ffmpeg_capture(f"{http_url}/stream/{snd.stream_id}.mp3", 4.0, timeout=30.0)
            assert cap.returncode == 0, cap.stderr[-500:]
            assert_clean_tone(cap, freq, "mp3 listener")

    run(main(), 90)


# ---------------------------------------------------------------------------
# The aarch64 binary under qemu-user
# ---------------------------------------------------------------------------


@pytest.fixture
def qemu_bin() -> str:
    path = os.environ.get("PACKAGE_QEMU_BIN")
    if not path:
        pytest.skip("PACKAGE_QEMU_BIN not set")
    return path


def test_aarch64_help(qemu_bin: str) -> None:
    out = subprocess.run([qemu_bin, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Usage: voice-relay" in out.stdout, out.stdout[:500]
    assert "--listen" in out.stdout, out.stdout[:500]


def test_aarch64_call_and_mp3(qemu_bin: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOICE_RELAY_BIN", qemu_bin)
    srv = RelayServer(tmp_path / "aarch64.log", ["--data-dir", str(tmp_path / "data")])
    srv.start(timeout=60)
    try:
        call_and_listen(srv.ws, srv.http, 440)
    finally:
        code = srv.terminate(grace=15)
    log = srv.log_text()
    assert not PANIC.search(log), srv.log_tail(120)
    assert code == 0, f"aarch64 binary: exit {code} after SIGTERM (None: killed)\n{srv.log_tail()}"


# ---------------------------------------------------------------------------
# The image under podman
# ---------------------------------------------------------------------------


class Container:
    """One detached podman container of the image, host network (the loopback-only netns)."""

    def __init__(self, image: str, data_dir: Path, port: int, tls: bool = False):
        self.image = image
        self.data_dir = data_dir
        self.port = port
        self.name = f"voice-relay-package-test-{os.getpid()}"
        self.http = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        self.ws = f"{'wss' if tls else 'ws'}://127.0.0.1:{port}/ws"
        # Startup polls before the client trusts the self-signed CA (fetched from /ca.crt).
        self.unverified = ssl._create_unverified_context() if tls else None

    def start(self) -> None:
        subprocess.run(["podman", "rm", "-f", "--ignore", self.name], check=True, capture_output=True)
        subprocess.run(
            [*PODMAN_RUN, "-d", "--name", self.name, "-v", f"{self.data_dir}:/data", self.image],
            check=True,
            capture_output=True,
            text=True,
        )

    def inspect(self, fmt: str) -> str:
        return subprocess.run(
            ["podman", "inspect", "--format", fmt, self.name], check=True, capture_output=True, text=True
        ).stdout.strip()

    def logs(self) -> str:
        out = subprocess.run(["podman", "logs", self.name], capture_output=True, text=True)
        return out.stdout + out.stderr

    def wait_health(self, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.inspect("{{.State.Running}}") != "true":
                raise AssertionError(f"container exited during startup\n{self.logs()[-3000:]}")
            try:
                with urllib.request.urlopen(self.http + "/health", timeout=2, context=self.unverified) as r:
                    return json.loads(r.read())
            except Exception as e:  # noqa: BLE001 - still starting
                last = e
            time.sleep(0.2)
        raise AssertionError(f"/health not up within {timeout}s ({last})\n{self.logs()[-3000:]}")

    def idle_rss_kib(self) -> int:
        pid = self.inspect("{{.State.Pid}}")
        status = Path(f"/proc/{pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))

    def healthcheck(self) -> None:
        """The image's HEALTHCHECK (the binary's own probe), run inside the container."""
        probe = subprocess.run(["podman", "healthcheck", "run", self.name], capture_output=True, text=True)
        assert probe.returncode == 0, f"healthcheck: {probe.stdout} {probe.stderr}"

    def stop(self) -> float:
        """`podman stop` (SIGTERM, SIGKILL after 10 s); the process must exit 0 on SIGTERM alone."""
        t0 = time.monotonic()
        stop = subprocess.run(["podman", "stop", "-t", "10", self.name], capture_output=True, text=True)
        seconds = time.monotonic() - t0
        assert stop.returncode == 0, stop.stderr
        code = self.inspect("{{.State.ExitCode}}")
        # 137 would be SIGKILL after the grace period.
        assert code == "0", f"container exit code {code} after podman stop\n{self.logs()[-3000:]}"
        return seconds

    def remove(self) -> None:
        subprocess.run(["podman", "rm", "-f", "--ignore", self.name], capture_output=True)


def image() -> str:
    name = os.environ.get("PACKAGE_IMAGE")
    if not name:
        pytest.skip("PACKAGE_IMAGE not set")
    return name


def two_ports() -> tuple[int, int]:
    port = free_port()
    while (other := free_port()) == port:
        pass
    return port, other


def run_container(image: str, data: Path, options: dict, tls: bool = False) -> Container:
    """A container with ``data`` as /data, holding the options file the Home Assistant
    Supervisor would write (/data/options.json, read by the binary itself)."""
    data.mkdir(exist_ok=True)
    (data / "options.json").write_text(json.dumps(options))
    c = Container(image, data, options["port"], tls)
    c.start()
    return c


def finish(c: Container) -> None:
    log = c.logs()
    c.remove()
    assert not PANIC.search(log), log[-3000:]


def test_image_health_call_mp3_and_sigterm(tmp_path: Path) -> None:
    port = free_port()
    # a plain-HTTP relay announcing 127.0.0.1 (the namespace has no other address)
    options = {"ssl": False, "port": port, "announce_ips": ["127.0.0.1"], "log_level": "info"}
    c = run_container(image(), tmp_path / "data", options)
    try:
        health = c.wait_health()
        assert health.get("status") == "healthy", health
        time.sleep(2.0)
        summary(f"container idle RSS: {c.idle_rss_kib()} KiB")
        c.healthcheck()
        call_and_listen(c.ws, c.http, 660)
        seconds = c.stop()
        summary(f"container stop (SIGTERM) after a call: {seconds:.2f}s, exit code 0")
    finally:
        finish(c)


def test_image_addon_tls_options_and_state_in_data(tmp_path: Path) -> None:
    """The add-on's shape: HTTPS with a self-signed certificate whose CA is kept in /data
    (the same CA after a new container on the same data), MP3 on the plain audio port."""
    port, audio = two_ports()
    options = {"ssl": True, "port": port, "audio_port": audio, "announce_ips": ["127.0.0.1"]}
    data = tmp_path / "data"
    c = run_container(image(), data, options, tls=True)
    try:
        c.wait_health()
        c.healthcheck()  # the probe speaks TLS when the options turn it on
        ca = fetch_ca(c)
        assert sorted(p.name for p in data.iterdir()) != ["options.json"], "no state written to /data"
        tls_call_and_listen(c, trust_only(ca), audio)
        c.stop()
    finally:
        finish(c)

    c = run_container(image(), data, options, tls=True)
    try:
        c.wait_health()
        assert fetch_ca(c) == ca, "a new container on the same /data made a new CA"
        c.stop()
    finally:
        finish(c)


def fetch_ca(c: Container) -> bytes:
    with urllib.request.urlopen(c.http + "/ca.crt", timeout=5, context=c.unverified) as r:
        pem = r.read()
    assert pem.startswith(b"-----BEGIN CERTIFICATE-----"), pem[:80]
    return pem


def tls_call_and_listen(c: Container, ctx: ssl.SSLContext, audio_port: int) -> None:
    """Sender and receiver over WSS verified against the container's CA; ffmpeg on the
    plain-HTTP audio port."""

    async def main() -> None:
        async with Clients(c.ws, c.http) as clients:
            snd, rx = await wss_call(clients, c.ws, ctx, 440)
            await rx.wait_audio(1.5, timeout=20.0)
            assert_tone(rx, 440, min_purity=0.8)
            cap = await ffmpeg_capture(f"http://127.0.0.1:{audio_port}/stream/{snd.stream_id}.mp3", 4.0, timeout=30.0)
            assert cap.returncode == 0, cap.stderr[-500:]
            assert_clean_tone(cap, 440, "mp3 listener on the audio port")

    run(main(), 90)
