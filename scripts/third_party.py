"""Licence notices of the crates linked into voice-relay, for the release archives.

Reads `cargo metadata --filter-platform <target>` on stdin; writes into the folder given
as the only argument: `CRATES.txt` (name, version, licence, repository of every crate in
the normal dependency graph of the voice-relay binary) and, per crate, the licence files
found at the crate root and in bundled C sources (`<name>-<version>/...`), e.g. aws-lc's,
libopus's and LAME's.
"""

import json
import pathlib
import shutil
import sys

LICENCE_PREFIXES = ("license", "licence", "copying", "notice", "copyright", "authors")
# Bundled C sources whose own licence files sit one folder down.
BUNDLED_DIRS = ("aws-lc", "opus", "lame-3.100")


def runtime_packages(meta):
    """Package ids reachable from voice-relay through normal (not build/dev) edges."""
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    root = next(p["id"] for p in meta["packages"] if p["name"] == "voice-relay")
    seen, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        for dep in nodes[pid]["deps"]:
            if any(k["kind"] is None for k in dep["dep_kinds"]):
                todo.append(dep["pkg"])
    return seen


def licence_files(crate_dir):
    for folder in [crate_dir] + [crate_dir / d for d in BUNDLED_DIRS]:
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.name.lower().startswith(LICENCE_PREFIXES):
                yield f


def main():
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    meta = json.load(sys.stdin)
    ids = runtime_packages(meta)
    packages = sorted(
        (p for p in meta["packages"] if p["id"] in ids and p["name"] != "voice-relay"),
        key=lambda p: (p["name"], p["version"]),
    )
    lines = []
    for p in packages:
        name = f'{p["name"]}-{p["version"]}'
        lines.append(f'{name}\t{p.get("license") or "see files"}\t{p.get("repository") or ""}')
        crate_dir = pathlib.Path(p["manifest_path"]).parent
        for f in licence_files(crate_dir):
            rel = f.relative_to(crate_dir)
            dest = out / name / str(rel).replace("/", "__")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest)
    header = "Crates linked into voice-relay: name-version, licence, repository.\n"
    (out / "CRATES.txt").write_text(header + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
