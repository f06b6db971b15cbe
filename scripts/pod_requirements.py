"""Write the KubeRay pods' runtime_env pip list from requirements.lock (run by scripts/lock.sh).

A pod installs kdray's runtime dependencies at start, under ``--require-hashes``: each at the lock's version,
with the hashes of only those of its PyPI files that CPython 3.11 on linux x86_64 can install (the lock holds
every file's hash; all of them would make the manifests too large for ``kubectl apply``). Ray itself is left
out: the image has it, and Ray refuses a runtime_env that replaces it.

    python scripts/pod_requirements.py RUNTIME_PINS MANIFEST...

RUNTIME_PINS holds ``name==version`` lines (the runtime subset of the lock, without the dev extra). The list
is written between the ``BEGIN``/``END`` marker comments of each manifest.
"""

from __future__ import annotations

import json
import re
import sys
import urllib.request
from pathlib import Path

from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
from packaging.version import Version

LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"
BEGIN = "# BEGIN pod requirements: written by scripts/lock.sh from requirements.lock"
END = "# END pod requirements"
IMAGE_HAS = {"ray"}
#: What a rayproject/ray:*-py311 image (Ubuntu 22.04, glibc 2.35, x86_64) installs.
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(35, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
TAGS = {*cpython_tags((3, 11), platforms=PLATFORMS), *compatible_tags((3, 11), "cp311", PLATFORMS)}


def lock_hashes(lock_text: str) -> dict[str, tuple[str, set[str]]]:
    """name -> (version, sha256 hashes) of every requirement in the lock."""
    found = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", lock_text):
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", block)
        if m:
            found[canonicalize_name(m[1])] = (m[2], set(re.findall(r"--hash=sha256:([0-9a-f]{64})", block)))
    return found


def installable_hashes(name: str, version: str) -> list[str]:
    """sha256 of the PyPI files of name==version that a linux x86_64 CPython 3.11 pod can install: its
    compatible wheels, else its sdist."""
    request = urllib.request.Request(f"https://pypi.org/simple/{name}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    wheels, sdists = [], []
    for f in files:
        try:
            if f["filename"].endswith(".whl"):
                _, v, _, tags = parse_wheel_filename(f["filename"])
                if v == Version(version) and tags & TAGS:
                    wheels.append(f["hashes"]["sha256"])
            elif f["filename"].endswith((".tar.gz", ".zip")):
                if parse_sdist_filename(f["filename"])[1] == Version(version):
                    sdists.append(f["hashes"]["sha256"])
        except ValueError:  # an old release's file named outside the spec
            continue
    return sorted(wheels or sdists)


def pod_lines(runtime_pins: list[str], lock: dict[str, tuple[str, set[str]]]) -> list[str]:
    lines = []
    for pin in runtime_pins:
        name, version = pin.split("==")
        name = canonicalize_name(name)
        if name in IMAGE_HAS:
            continue
        assert lock[name][0] == version, (pin, lock[name][0])
        hashes = installable_hashes(name, version)
        assert hashes and set(hashes) <= lock[name][1], f"{pin}: PyPI's files are not the lock's"
        lines.append(f"{name}=={version} " + " ".join(f"--hash=sha256:{h}" for h in hashes))
    return lines


def write_between_markers(manifest: Path, lines: list[str]) -> None:
    text = manifest.read_text()
    m = re.search(rf"^( *){re.escape(BEGIN)}\n.*?^ *{re.escape(END)}$", text, re.M | re.S)
    assert m, f"{manifest}: no {BEGIN!r} ... {END!r} block"
    indent = m[1]
    block = "\n".join([indent + BEGIN, *(f"{indent}- {line}" for line in lines), indent + END])
    manifest.write_text(text[: m.start()] + block + text[m.end():])


def main(argv: list[str]) -> None:
    pins_file, *manifests = argv
    pins = [line.strip() for line in Path(pins_file).read_text().splitlines() if "==" in line]
    lines = pod_lines(pins, lock_hashes(LOCK.read_text()))
    for manifest in manifests:
        write_between_markers(Path(manifest), lines)


if __name__ == "__main__":
    main(sys.argv[1:])
