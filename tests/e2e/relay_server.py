"""Starting and stopping the voice-relay binary under test."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BIN = REPO_ROOT / "target" / "release" / "voice-relay"
SHUTDOWN_GRACE = 5.0


def server_binary() -> Path:
    return Path(os.environ.get("VOICE_RELAY_BIN", str(DEFAULT_BIN)))


def free_port() -> int:
    """A port free on 127.0.0.1 for both TCP and UDP (the server uses both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free TCP+UDP port on 127.0.0.1")


class RelayServer:
    def __init__(self, log_path: Path, extra_args: list[str] | None = None):
        self.bin = server_binary()
        self.port = free_port()
        self.host = "127.0.0.1"
        self.http = f"http://{self.host}:{self.port}"
        self.ws = f"ws://{self.host}:{self.port}/ws"
        self.ws_root = f"ws://{self.host}:{self.port}/"
        self.log_path = log_path
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen | None = None
        self.exit_code: int | None = None
        self.shutdown_seconds: float | None = None
        self._log = None

    def start(self, timeout: float = 15.0) -> None:
        if not self.bin.is_file():
            raise FileNotFoundError(f"server binary not found: {self.bin} (build it or set VOICE_RELAY_BIN)")
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        env.setdefault("RUST_BACKTRACE", "1")
        env.setdefault("NO_COLOR", "1")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + timeout
        last_err: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode} during startup\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.http + "/health", timeout=1) as r:
                    body = json.loads(r.read())
                    if r.status == 200 and isinstance(body, dict):
                        return
            except Exception as e:  # noqa: BLE001 - still starting
                last_err = e
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"server /health not up within {timeout}s ({last_err})\n{self.log_tail()}")

    def argv(self) -> list[str]:
        """The command line the server is started with."""
        return [str(self.bin), "--listen", f"{self.host}:{self.port}", *self.extra_args]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, grace: float = SHUTDOWN_GRACE) -> int | None:
        """SIGTERM, then wait up to ``grace`` s. Returns the exit code, None if it hung (then killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            t0 = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
                self.shutdown_seconds = time.monotonic() - t0
            except subprocess.TimeoutExpired:
                self.kill()
                self.exit_code = None
                self._close_log()
                return None
        self.exit_code = self.proc.returncode
        self._close_log()
        return self.exit_code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.flush()
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        if self._log is not None:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_text().splitlines()
        return f"--- server log tail ({self.log_path}) ---\n" + "\n".join(text[-lines:])
