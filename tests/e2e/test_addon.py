"""The Home Assistant add-on repository (ha-addon/) holds what the Supervisor and its linter demand.

Facts checked here (Home Assistant's add-on configuration reference): the
required keys; architectures aarch64/amd64 only (armhf, armv7, i386 are
deprecated); port keys ``^\\d+(/tcp|/udp)?$`` (a range passes the linter but
the Supervisor refuses it); the linter rejects any key set to its default.
Beyond the files, the real binary reads the add-on's options: every option
and every schema key must be one it knows.
"""

from __future__ import annotations

import re
import struct
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import _finish
from test_options import OptionsRelay, make_certificate, start

REPO = Path(__file__).resolve().parents[2]
ADDONS = REPO / "ha-addon"
ADDON = ADDONS / "voice_relay"

REQUIRED = {"name", "version", "slug", "description", "arch"}
ARCHES = {"aarch64", "amd64"}
PORT_KEY = re.compile(r"^\d+(/tcp|/udp)?$")
# Keys whose value Home Assistant assumes when they are left out (its linter refuses them).
HA_DEFAULTS: dict[str, Any] = {
    "startup": "application", "boot": "auto", "host_network": False, "host_ipc": False,
    "host_dbus": False, "host_pid": False, "host_uts": False, "hassio_role": "default",
    "hassio_api": False, "homeassistant_api": False, "docker_api": False, "full_access": False,
    "apparmor": True, "audio": False, "video": False, "gpio": False, "usb": False, "uart": False,
    "udev": False, "devicetree": False, "kernel_modules": False, "stdin": False, "legacy": False,
    "timeout": 10, "tmpfs": False, "auth_api": False, "ingress": False, "ingress_port": 8099,
    "ingress_entry": "/", "ingress_stream": False, "panel_icon": "mdi:puzzle", "panel_admin": True,
    "backup": "hot", "advanced": False, "stage": "stable", "init": True, "realtime": False,
    "journald": False,
}


def load(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return load(ADDON / "config.yaml")


def cargo_version() -> str:
    with (REPO / "Cargo.toml").open("rb") as f:
        return tomllib.load(f)["package"]["version"]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_repository_and_files() -> None:
    repo = load(ADDONS / "repository.yaml")
    assert isinstance(repo, dict) and repo.get("name") and str(repo.get("url", "")).startswith("https://"), repo
    for name in ("config.yaml", "DOCS.md", "CHANGELOG.md", "icon.png", "logo.png", "translations/en.yaml"):
        assert (ADDON / name).is_file(), f"ha-addon/voice_relay/{name} is missing"
    assert png_size(ADDON / "icon.png") == (128, 128)
    w, h = png_size(ADDON / "logo.png")
    assert 200 <= w <= 300 and 80 <= h <= 120, (w, h)
    assert f"## {cargo_version()}" in (ADDON / "CHANGELOG.md").read_text(), "CHANGELOG has no entry for this version"


def test_config_keys(config: dict[str, Any]) -> None:
    missing = REQUIRED - config.keys()
    assert not missing, f"required keys missing: {missing}"
    assert config["slug"] == ADDON.name
    assert config["arch"] and set(config["arch"]) <= ARCHES, config["arch"]
    assert str(config["version"]) == cargo_version(), (config["version"], cargo_version())
    image = config["image"]
    assert re.fullmatch(r"[a-z0-9.-]+(/[a-z0-9._-]+)+", image), f"image {image!r}: a name without tag (the tag is version)"
    # The image name is set in one place for the release workflow (packaging/image-name).
    name_file = REPO / "packaging" / "image-name"
    assert image == name_file.read_text().strip(), (image, name_file.read_text())
    assert config["host_network"] is True
    assert config["privileged"] == ["SYS_NICE"], config["privileged"]
    assert config["map"] == ["ssl:ro"], config["map"]
    at_default = {k: v for k, v in config.items() if k in HA_DEFAULTS and v == HA_DEFAULTS[k]}
    assert not at_default, f"keys at Home Assistant's default (the linter refuses them): {at_default}"


def test_ports(config: dict[str, Any]) -> None:
    ports, described = config["ports"], config["ports_description"]
    assert ports, "no ports"
    for key, host in ports.items():
        assert PORT_KEY.match(str(key)), f"port key {key!r} does not match {PORT_KEY.pattern}"
        assert isinstance(host, int) and 1 <= host <= 65535, (key, host)
    assert set(described) == set(ports), "every port needs a description, and only ports"
    # The defaults of the options are the ports published.
    opts = config["options"]
    assert {f"{opts['port']}/tcp", f"{opts['port']}/udp", f"{opts['audio_port']}/tcp"} == set(ports)


def test_options_schema_translations(config: dict[str, Any]) -> None:
    options, schema = config["options"], config["schema"]
    assert set(options) <= set(schema), f"options without a schema entry: {set(options) - set(schema)}"
    for key, value in options.items():
        kind = schema[key]
        if isinstance(kind, list):
            assert isinstance(value, list), (key, value)
        elif kind == "bool":
            assert isinstance(value, bool), (key, value)
        elif str(kind).startswith(("int", "port")):
            assert isinstance(value, int) and not isinstance(value, bool), (key, value)
            m = re.fullmatch(r"int\((\d*),(\d*)\)\??", str(kind))
            if m:
                lo, hi = (int(x) if x else None for x in m.groups())
                assert (lo is None or value >= lo) and (hi is None or value <= hi), (key, value, kind)
        elif str(kind).startswith("list("):
            assert value in str(kind)[5:-1].split("|"), (key, value, kind)
    for key, kind in schema.items():
        if str(kind).startswith("password"):
            assert str(kind).endswith("?") and key not in options, f"{key}: a secret needs no default"
    tr = load(ADDON / "translations" / "en.yaml")
    names = tr["configuration"]
    untranslated = set(schema) - set(names)
    assert not untranslated, f"options without a translation: {untranslated}"
    assert set(names) <= set(schema), f"translations of unknown options: {set(names) - set(schema)}"
    for key, entry in names.items():
        assert entry.get("name") and entry.get("description"), key
    assert set(tr["network"]) == set(config["ports"])


def sample(key: str, kind: Any) -> Any:
    """A valid value of a schema type (for the keys the defaults leave out)."""
    if isinstance(kind, list):
        return []
    kind = str(kind).rstrip("?")
    if kind == "password":
        return f"{key}-Secret"
    m = re.fullmatch(r"int\((\d+),\d*\)", kind)
    if m:
        return max(int(m.group(1)), 1000)
    raise AssertionError(f"no sample for {key}: {kind}")


def test_binary_knows_every_option(config: dict[str, Any], tmp_path: Path) -> None:
    """The add-on's defaults plus every optional schema key, read by the real binary: no unknown key."""
    ssl_dir = tmp_path / "ssl"
    make_certificate(ssl_dir)
    options = dict(config["options"])
    for key, kind in config["schema"].items():
        if key in options:
            continue
        options[key] = {"certfile": "fullchain.pem", "keyfile": "privkey.pem"}.get(key) or sample(key, kind)
    srv = start(OptionsRelay(tmp_path, options, ssl_dir))
    try:
        assert srv.alive()
    finally:
        _finish(srv)
    log = srv.log_text()
    assert "options file applied" in log, log[-1500:]
    assert "unknown option" not in log, [ln for ln in log.splitlines() if "unknown option" in ln]
