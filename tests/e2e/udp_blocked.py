"""An unprivileged user whose UDP is dropped, inside the test's network namespace.

Browsers run as that user (uid 65534) and, with ``iptables -A OUTPUT -p udp -m owner
--uid-owner 65534 -j DROP``, can reach the relay over TCP only: the network of an office or
hotel that blocks UDP.  The rule is removed when the context ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

UID = 65534
RULE = ["OUTPUT", "-p", "udp", "-m", "owner", "--uid-owner", str(UID), "-j", "DROP"]
SETPRIV = ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", "--inh-caps=-all"]

# What `getStats()` says of each RTCPeerConnection the page made: the protocols of the
# selected candidate pair (Chromium names it on the transport; Firefox marks the pair).
PC_HOOK = """(() => {
  const Original = window.RTCPeerConnection;
  const pcs = [];
  window.__pcs = pcs;
  window.RTCPeerConnection = function (...args) { const pc = new Original(...args); pcs.push(pc); return pc; };
  window.RTCPeerConnection.prototype = Original.prototype;
  window.__selectedPairs = async () => {
    const out = [];
    for (const pc of pcs) {
      if (pc.connectionState !== 'connected') continue;
      const stats = await pc.getStats();
      let pair = null;
      stats.forEach((r) => { if (r.type === 'transport' && r.selectedCandidatePairId) pair = stats.get(r.selectedCandidatePairId); });
      if (!pair) stats.forEach((r) => { if (r.type === 'candidate-pair' && r.selected) pair = r; });
      if (!pair) { out.push(null); continue; }
      const local = stats.get(pair.localCandidateId) || {};
      const remote = stats.get(pair.remoteCandidateId) || {};
      out.push({ local: local.protocol, remote: remote.protocol, remotePort: remote.port, remoteType: remote.candidateType });
    }
    return out;
  };
})();"""


def as_user(argv: list[str], home: Path) -> list[str]:
    """``argv`` run as the unprivileged user, with ``home`` as its HOME."""
    return [*SETPRIV, "env", f"HOME={home}", f"TMPDIR={home}", *argv]


def udp_send_refused(home: Path) -> bool:
    """Whether a UDP datagram from the user to 127.0.0.1 is refused (the rule works)."""
    probe = "import socket\ntry:\n socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', 9))\nexcept PermissionError:\n print('refused')\n"
    out = subprocess.run(as_user(["/usr/bin/python3", "-c", probe], home), capture_output=True, text=True, timeout=10)
    return out.stdout.strip() == "refused"


@contextlib.contextmanager
def udp_blocked_user() -> Iterator[Path]:
    """Yields a home directory the user owns, while its UDP is dropped."""
    home = Path(tempfile.mkdtemp(prefix="udp-blocked-"))
    os.chmod(home, 0o755)
    os.chown(home, UID, UID)
    subprocess.run(["iptables", "-A", *RULE], check=True)
    try:
        assert udp_send_refused(home), "the iptables rule does not drop the user's UDP"
        yield home
    finally:
        subprocess.run(["iptables", "-D", *RULE], check=False)
        shutil.rmtree(home, ignore_errors=True)


def give(home: Path, src: Path) -> Path:
    """A copy of ``src`` in ``home``, readable by the user."""
    dst = home / src.name
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o644)
    return dst


def user_dir(home: Path, name: str) -> Path:
    d = home / name
    d.mkdir()
    os.chown(d, UID, UID)
    return d


def chromium_wrapper(home: Path, chromium: str) -> Path:
    """An executable that starts ``chromium`` as the user (given to Playwright)."""
    exe = home / "chromium-as-user"
    cmd = " ".join(as_user([chromium], home))
    exe.write_text(f'#!/bin/sh\nexec {cmd} "$@"\n')
    os.chmod(exe, 0o755)
    return exe
