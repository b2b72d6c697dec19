"""The options file (a Home Assistant add-on's /data/options.json) drives the real binary.

The server is started with ``--options-file`` and no ``--listen``: its ports,
TLS, tokens and MP3 bit rate all come from the file, the way the add-on runs
it. ``--ssl-dir`` stands in for the add-on's /ssl.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from clients import Clients, ToneSender, dominant_frequency, http, rms, run, tone_purity
from conftest import _finish
from relay_server import RelayServer, free_port, server_binary
from test_access import refused_status
from test_mp3 import ffmpeg_capture
from test_tls import get, raw_get_head, wss_signal

TOKEN = "0pt10ns-t0ken-Secret"

# MPEG-1 Layer III bit rates by the header's 4-bit index.
MPEG1_L3_KBPS = [0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320]


class OptionsRelay(RelayServer):
    """The relay configured by an options file only (plus ``--ssl-dir``)."""

    def __init__(self, tmp_path: Path, options: dict[str, Any], ssl_dir: Path | None = None):
        super().__init__(tmp_path / "server.log")
        self.audio_port = free_port()
        self.options = {**options, "port": self.port, "audio_port": self.audio_port}
        self.options_file = tmp_path / "options.json"
        self.options_file.write_text(json.dumps(self.options))
        self.ssl_dir = ssl_dir
        self.https = f"https://{self.host}:{self.port}"
        self.wss = f"wss://{self.host}:{self.port}/ws"
        # start() waits for plain-HTTP /health: the audio port answers it.
        self.http = f"http://{self.host}:{self.audio_port}"

    def argv(self) -> list[str]:
        argv = [str(self.bin), "--options-file", str(self.options_file)]
        if self.ssl_dir is not None:
            argv += ["--ssl-dir", str(self.ssl_dir)]
        return [*argv, *self.extra_args]


def start(srv: OptionsRelay) -> OptionsRelay:
    try:
        srv.start()
    except (FileNotFoundError, RuntimeError) as e:
        srv.kill()
        pytest.fail(f"server did not start: {e}", pytrace=False)
    return srv


def make_certificate(ssl_dir: Path) -> bytes:
    """A self-signed certificate for 127.0.0.1 as fullchain.pem + privkey.pem (what /ssl holds)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "voice-relay options test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    ssl_dir.mkdir(parents=True, exist_ok=True)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (ssl_dir / "fullchain.pem").write_bytes(pem)
    (ssl_dir / "privkey.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return pem


def served_certificate(port: int) -> bytes:
    return ssl.get_server_certificate(("127.0.0.1", port), timeout=5).encode()


def mp3_bitrate_kbps(data: bytes) -> int:
    """The bit rate of the first MPEG-1 Layer III frame header in ``data``."""
    for i in range(len(data) - 3):
        if data[i] == 0xFF and data[i + 1] & 0xFE == 0xFA:  # sync, MPEG-1, Layer III
            index = data[i + 2] >> 4
            if 0 < index < 15:
                return MPEG1_L3_KBPS[index]
    raise AssertionError(f"no MPEG-1 Layer III frame header in {data[:32]!r}")


def probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(server_binary()), *args, "health", "--timeout-secs", "3"],
                          capture_output=True, text=True, timeout=20)


def test_options_file_drives_the_server(tmp_path: Path) -> None:
    ssl_dir = tmp_path / "ssl"
    pem = make_certificate(ssl_dir)
    srv = start(OptionsRelay(tmp_path, {
        "ssl": True, "certfile": "fullchain.pem", "keyfile": "privkey.pem",
        "token": TOKEN, "mp3_bitrate": 64, "log_level": "info",
        "option_from_a_newer_version": {"x": 1},
    }, ssl_dir))
    unverified = ssl._create_unverified_context()

    async def main() -> None:
        # HTTPS on the options' port, with the certificate from the ssl dir.
        assert served_certificate(srv.port).strip() == pem.strip()
        r = await get(srv.https + "/health", unverified)
        assert r.status == 200 and r.json()["status"] == "healthy", r.status
        # Tokens are enforced (WebSocket and MP3 on the plain audio port); /health stays open.
        assert await refused_status(srv.wss, ssl=unverified) == 401
        r = await http("GET", srv.http + "/stream/status")
        assert r.status == 401, r.status
        async with Clients(srv.wss, srv.http) as c:
            s = await wss_signal(f"{srv.wss}?token={TOKEN}", unverified, "sender")
            c.signals.append(s)
            snd = c.track(ToneSender(s, 440))
            sid = await snd.start()
            assert (await http("GET", f"{srv.http}/stream/{sid}.mp3")).status == 401
            # The audio port serves MP3 at the options' bit rate ...
            status, headers, body = await raw_get_head(srv.audio_port, f"/stream/{sid}.mp3?token={TOKEN}")
            assert status.split()[1] == "200", status
            assert headers.get("content-type", "").startswith("audio/mpeg"), headers
            assert mp3_bitrate_kbps(body) == 64
            # ... that decodes to the sender's tone.
            cap = await ffmpeg_capture(f"{srv.http}/stream/{sid}.mp3?token={TOKEN}", 2.5)
            assert cap.seconds >= 1.5, f"only {cap.seconds:.2f}s decoded; ffmpeg: {cap.stderr[-400:]}"
            tail = cap.samples[-48000:]
            assert rms(tail) > 300 and abs(dominant_frequency(tail) - 440) <= 15, dominant_frequency(tail)
            assert tone_purity(tail, 440) >= 0.7
            await snd.stop_stream()

    try:
        run(main(), 60)
        # The probe reads the same options file: HTTPS on the options' port.
        ok = probe("--options-file", str(srv.options_file), "--ssl-dir", str(ssl_dir))
        assert ok.returncode == 0 and f"https://127.0.0.1:{srv.port}/health" in ok.stdout, (ok.stdout, ok.stderr)
    finally:
        _finish(srv)
    log = srv.log_text()
    warned = [ln for ln in log.splitlines() if "option_from_a_newer_version" in ln]
    assert warned and all("WARN" in ln for ln in warned), log[-2000:]
    assert TOKEN not in log, "the token appears in the server log"


def test_options_ssl_self_signed_kept_next_to_the_options(tmp_path: Path) -> None:
    """``ssl: true`` without certificate files: a self-signed CA, kept in the options file's directory."""
    srv = start(OptionsRelay(tmp_path, {"ssl": True}))
    try:
        r = run(get(srv.https + "/ca.crt", ssl._create_unverified_context()), 20)
        assert r.status == 200
        assert (tmp_path / "ca.crt").read_bytes() == r.body, "the CA is not kept next to the options file"
    finally:
        _finish(srv)


@pytest.mark.parametrize(("options", "key"), [
    ({"mp3_bitrate": 100}, "mp3_bitrate"),
    ({"port": "eighty"}, "port"),
    ({"max_connections_per_ip": 0}, "max_connections_per_ip"),
    ({"ssl": "yes"}, "ssl"),
    ({"ssl": True, "certfile": "missing.pem", "keyfile": "missing.key"}, "certfile"),
    ({"trusted_proxies": ["10.0.0.0/40"]}, "trusted_proxies"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_option_exits_and_names_the_key(tmp_path: Path, options: dict[str, Any], key: str) -> None:
    path = tmp_path / "options.json"
    path.write_text(json.dumps({"port": free_port(), **options}))
    p = subprocess.run([str(server_binary()), "--options-file", str(path), "--ssl-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=20)
    assert p.returncode != 0, f"exit status 0 for {options}\n{p.stderr}"
    assert f'"{key}"' in p.stderr and str(path) in p.stderr, p.stderr
    assert "panicked" not in p.stderr, p.stderr


def test_flags_win_over_the_options_file(tmp_path: Path) -> None:
    """A flag beats the file: the file's token is replaced by the flag's."""
    srv = OptionsRelay(tmp_path, {"token": "from-the-file"})
    srv.extra_args = ["--token", TOKEN]
    start(srv)
    try:
        async def main() -> None:
            ok = await http("GET", f"{srv.http}/stream/status?token={TOKEN}")
            assert ok.status == 200, ok.status
            r = await http("GET", f"{srv.http}/stream/status?token=from-the-file")
            assert r.status == 401, r.status

        run(main(), 20)
    finally:
        _finish(srv)
