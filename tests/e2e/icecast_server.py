"""A real Icecast 2.4 (Debian's icecast2) on 127.0.0.1 for the tests: a temporary config, started
as an unprivileged user (icecast refuses to run as root), optionally as a relay of another."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from relay_server import free_port

ICECAST_BIN = shutil.which("icecast2") or "/usr/bin/icecast2"
SHARE = Path("/usr/share/icecast2")
NOBODY = 65534
SOURCE_PASSWORD = "src-secret-1"
ADMIN_PASSWORD = "adm-secret-2"


def _as_unprivileged() -> list[str]:
    """How to drop root for icecast2 (nothing to do when not root)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


class Icecast:
    def __init__(self, burst_size: int = 65536, relay_of: tuple[int, str] | None = None,
                 source_password: str = SOURCE_PASSWORD, extra_xml: str = ""):
        self.port = free_port()
        self.burst_size = burst_size
        self.relay_of = relay_of
        self.source_password = source_password
        self.extra_xml = extra_xml
        # Not under pytest's tmp_path: that is private to root, and icecast runs as nobody.
        self.dir = Path(tempfile.mkdtemp(prefix="icecast-"))
        self.dir.chmod(0o777)
        self.config = self.dir / "icecast.xml"
        self.proc: subprocess.Popen | None = None
        self._write_config()

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        relay = ""
        if self.relay_of is not None:
            port, mount = self.relay_of
            relay = (f"<relay><server>127.0.0.1</server><port>{port}</port><mount>{mount}</mount>"
                     f"<local-mount>{mount}</local-mount><on-demand>0</on-demand>"
                     f"<relay-shoutcast-metadata>1</relay-shoutcast-metadata></relay>")
        self.config.write_text(f"""<icecast>
  <location>test</location><admin>test@localhost</admin>
  <limits>
    <clients>5000</clients><sources>16</sources><queue-size>524288</queue-size>
    <client-timeout>30</client-timeout><header-timeout>15</header-timeout>
    <source-timeout>10</source-timeout><burst-on-connect>1</burst-on-connect>
    <burst-size>{self.burst_size}</burst-size>
  </limits>
  <authentication>
    <source-password>{self.source_password}</source-password>
    <relay-password>{SOURCE_PASSWORD}</relay-password>
    <admin-user>admin</admin-user><admin-password>{ADMIN_PASSWORD}</admin-password>
  </authentication>
  <hostname>127.0.0.1</hostname>
  <listen-socket><port>{self.port}</port><bind-address>127.0.0.1</bind-address></listen-socket>
  {relay}
  {self.extra_xml}
  <fileserve>1</fileserve>
  <paths>
    <basedir>{self.dir}</basedir><logdir>{self.dir}</logdir>
    <webroot>{SHARE / 'web'}</webroot><adminroot>{SHARE / 'admin'}</adminroot>
    <pidfile>{self.dir}/icecast.pid</pidfile>
  </paths>
  <logging>
    <accesslog>access.log</accesslog><errorlog>error.log</errorlog>
    <loglevel>3</loglevel><logsize>100000</logsize>
  </logging>
  <security><chroot>0</chroot></security>
</icecast>
""")
        self.config.chmod(0o644)

    def start(self, timeout: float = 10.0) -> None:
        out = open(self.dir / "stdout.log", "ab")
        self.proc = subprocess.Popen([*_as_unprivileged(), ICECAST_BIN, "-c", str(self.config)],
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"icecast2 exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                self.status()
                return
            except (OSError, ValueError):
                time.sleep(0.1)
        raise RuntimeError(f"icecast2 not answering on {self.port}: {self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: gone at once, as in a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def status(self) -> dict:
        with urllib.request.urlopen(f"{self.http}/status-json.xsl", timeout=2) as r:
            return json.loads(r.read().decode("utf-8", errors="replace"))

    def sources(self) -> dict[str, dict]:
        """Live mounts by path."""
        src = self.status().get("icestats", {}).get("source", [])
        if isinstance(src, dict):
            src = [src]
        return {"/" + s["listenurl"].split("/", 3)[3]: s for s in src if "listenurl" in s}

    def wait_mount(self, mount: str, timeout: float = 15.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                found = self.sources().get(mount)
                if found is not None:
                    return found
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"mount {mount} not live on icecast :{self.port} within {timeout}s: "
                             f"{self.log_tail()}")

    def source_puts(self, mount: str) -> int:
        """Source requests (PUT or SOURCE) for `mount` in the access log."""
        try:
            text = (self.dir / "access.log").read_text(errors="replace")
        except OSError:
            return 0
        return sum(1 for ln in text.splitlines() if f'"PUT {mount} ' in ln or f'"SOURCE {mount} ' in ln)

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for name in ("error.log", "stdout.log"):
            try:
                text = (self.dir / name).read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {name}\n" + "\n".join(text))
            except OSError:
                pass
        return "\n".join(parts)
