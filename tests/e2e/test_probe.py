"""`voice-relay health`: the container health check (no curl, no shell).

The probe reads the same flags as the server and answers with its exit
status: 0 for a healthy server, non-zero when nothing listens or the
listener does not answer /health.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from conftest import _finish
from relay_server import RelayServer, free_port, server_binary


def probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(server_binary()), *args, "health", "--timeout-secs", "3"],
                          capture_output=True, text=True, timeout=20, env=env)


def test_health_probe_plain(server: RelayServer) -> None:
    ok = probe("--listen", f"127.0.0.1:{server.port}")
    assert ok.returncode == 0, (ok.returncode, ok.stdout, ok.stderr)
    assert f"http://127.0.0.1:{server.port}/health" in ok.stdout, ok.stdout
    # 0.0.0.0 is probed on 127.0.0.1.
    ok = probe("--listen", f"0.0.0.0:{server.port}")
    assert ok.returncode == 0, (ok.returncode, ok.stdout, ok.stderr)
    # Nothing listening: non-zero, and it says why.
    closed = free_port()
    bad = probe("--listen", f"127.0.0.1:{closed}")
    assert bad.returncode != 0 and "unhealthy" in bad.stderr, (bad.returncode, bad.stderr)
    # A listener that is not this server (accepts, closes without an HTTP answer).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        bad = probe("--listen", f"127.0.0.1:{s.getsockname()[1]}")
    assert bad.returncode != 0, (bad.returncode, bad.stderr)


def test_health_probe_tls(tmp_path: Path) -> None:
    srv = RelayServer(tmp_path / "server.log", ["--tls-self-signed", "--data-dir", str(tmp_path / "data"),
                                                "--audio-listen", f"127.0.0.1:{free_port()}"])
    # RelayServer waits for plain-HTTP /health: point it at the audio port.
    srv.http = "http://127.0.0.1:" + srv.extra_args[-1].rsplit(":", 1)[1]
    srv.start()
    try:
        ok = probe("--listen", f"0.0.0.0:{srv.port}", "--tls-self-signed")
        assert ok.returncode == 0, (ok.returncode, ok.stdout, ok.stderr)
        assert f"https://127.0.0.1:{srv.port}/health" in ok.stdout
        # Plain HTTP against the TLS port is not a healthy answer.
        bad = probe("--listen", f"127.0.0.1:{srv.port}")
        assert bad.returncode != 0, (bad.returncode, bad.stdout, bad.stderr)
    finally:
        _finish(srv)
