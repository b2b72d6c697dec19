"""pytest fixtures for the voice-relay end-to-end tests.

Run through scripts/test.sh, which puts pytest in a loopback-only network
namespace.  Outside one, the run refuses to start unless
E2E_ALLOW_HOST_NETNS=1 (only 127.0.0.1 is contacted either way).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from relay_server import RelayServer

E2E_DIR = Path(__file__).resolve().parent


def _interfaces() -> list[str]:
    # if_nameindex asks the kernel about the current network namespace
    # (/sys/class/net may still show the host's).
    import socket

    try:
        return sorted(name for _, name in socket.if_nameindex())
    except OSError:
        return []


def pytest_configure(config: pytest.Config) -> None:
    ifaces = _interfaces()
    if ifaces and ifaces != ["lo"] and os.environ.get("E2E_ALLOW_HOST_NETNS") != "1":
        raise pytest.UsageError(
            f"e2e tests must run in a loopback-only network namespace (found interfaces {ifaces}); "
            "use scripts/test.sh, or `unshare -n sh -c 'ip link set lo up && ...'`"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # noqa: ANN201
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for name in ("server", "server2"):
            srv = getattr(item, "funcargs", {}).get(name)
            if isinstance(srv, RelayServer):
                rep.sections.append((f"{name} log ({rep.when})", srv.log_tail(80)))


def _start(tmp_path: Path, name: str, args: list[str] | None = None) -> RelayServer:
    srv = RelayServer(tmp_path / f"{name}.log", args)
    problem = None
    try:
        srv.start()
    except FileNotFoundError as e:
        problem = str(e)
    except RuntimeError as e:
        problem = f"server did not start: {e}"
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    return srv


def _finish(srv: RelayServer) -> None:
    """Stop the server and hold it to a clean shutdown (a failure is reported at teardown)."""
    if srv.alive():
        code = srv.terminate()
        if code is None:
            pytest.fail(
                f"shutdown: server did not exit within 5 s of SIGTERM (killed)\n{srv.log_tail()}",
                pytrace=False,
            )
    else:
        srv.terminate()  # collect the exit status
    log = srv.log_text()
    if re.search(r"panicked at|RUST_BACKTRACE|stack backtrace", log):
        pytest.fail(f"server log shows a panic\n{srv.log_tail(120)}", pytrace=False)
    if srv.exit_code != 0:
        pytest.fail(f"shutdown: server exited with {srv.exit_code} (want 0)\n{srv.log_tail()}", pytrace=False)


@pytest.fixture
def server(request: pytest.FixtureRequest, tmp_path: Path):  # noqa: ANN201
    """A fresh voice-relay on a free 127.0.0.1 port (TCP for HTTP/WS, UDP for media),
    started with the command-line options given as the fixture parameter (see ``with_args``)."""
    srv = _start(tmp_path, "server", list(getattr(request, "param", [])))
    try:
        yield srv
    finally:
        _finish(srv)


def with_args(*args: str) -> Any:
    """Parametrize the ``server`` fixture with these options."""
    return pytest.mark.parametrize("server", [list(args)], indirect=True, ids=[" ".join(args)])


@pytest.fixture(scope="session")
def tone_wav(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """A 48 kHz mono 16-bit WAV for Chromium's fake microphone."""
    from clients import sine_wav_bytes

    freq = 660.0
    path = tmp_path_factory.mktemp("wav") / "tone660.wav"
    path.write_bytes(sine_wav_bytes(freq, 4.0))
    return path, freq
