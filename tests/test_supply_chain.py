"""A locked supply chain: what setup.sh, CI and the cluster's pods install is requirements.lock, by hash.

* requirements.lock (bash scripts/lock.sh) pins every package with sha256 hashes and satisfies pyproject.toml;
* scripts/setup.sh and the AWS launcher install it with ``--require-hashes``, kdray itself with ``--no-deps``;
* the KubeRay pods' runtime_env pip lists are the lock's runtime part, hashed, installed with ``--require-hashes``;
* every container image under cluster/ is referenced by digest (or REPLACE-ME, which scripts/pin_images.sh fills).

Offline: no network, no Ray cluster.
"""

from __future__ import annotations

import os
import sys
import re
import subprocess
import tomllib
from pathlib import Path
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from test_cluster import manifest_values

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCK = REPO_ROOT / "requirements.lock"
CLUSTER_DIR = REPO_ROOT / "cluster"
RAYJOB = CLUSTER_DIR / "kuberay" / "rayjob-pipeline.yaml"
RAYSERVICE = CLUSTER_DIR / "kuberay" / "rayservice-student.yaml"
#: One locked requirement: name==version and one or more sha256 hashes, nothing else (no URL, no editable).
LOCKED = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;]+)(?P<hashes>( --hash=sha256:[0-9a-f]{64})+)")
#: A container image by digest; REPLACE-ME is the one placeholder, which scripts/pin_images.sh replaces.
PINNED_IMAGE = re.compile(r"[a-z0-9./_-]+:[A-Za-z0-9._-]+@sha256:([0-9a-f]{64}|REPLACE-ME)")


def logical_lines(text: str) -> list[str]:
    """A requirements file's lines without comments, continuations joined (pip's own reading)."""
    joined = re.sub(r"\s*\\\n\s*", " ", text)
    return [line for raw in joined.splitlines() if (line := re.sub(r"(^|\s)#.*", "", raw).strip())]


def parse_locked(lines: list[str]) -> tuple[dict[str, tuple[str, set[str]]], list[str]]:
    """name -> (version, hashes) of the lines that are locked requirements, and the lines that are not."""
    locked, bad = {}, []
    for line in lines:
        m = LOCKED.fullmatch(line)
        if m:
            locked[canonicalize_name(m["name"])] = (m["version"], set(re.findall(r"[0-9a-f]{64}", m["hashes"])))
        else:
            bad.append(line)
    return locked, bad


def lock() -> dict[str, tuple[str, set[str]]]:
    locked, bad = parse_locked(logical_lines(LOCK.read_text()))
    assert not bad, f"requirements.lock lines without a pin and hashes: {bad[:5]}"
    return locked


def pyproject_requirements() -> dict[str, list[Requirement]]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return {"runtime": [Requirement(r) for r in project["dependencies"]],
            "dev": [Requirement(r) for r in project["optional-dependencies"]["dev"]]}


def unsatisfied(requirements: list[Requirement], locked: dict[str, tuple[str, set[str]]]) -> list[str]:
    """The requirements the lock lacks or pins at a version outside their specifier."""
    return [f"{r} (lock: {locked.get(canonicalize_name(r.name), ('absent',))[0]})" for r in requirements
            if canonicalize_name(r.name) not in locked
            or not r.specifier.contains(locked[canonicalize_name(r.name)][0], prereleases=True)]


def test_every_lock_requirement_is_pinned_with_hashes():
    locked = lock()
    assert len(locked) > 100, "the lock holds the whole dependency tree, not only the direct dependencies"
    _, bad = parse_locked(["numpy>=1.26 --hash=sha256:" + "a" * 64, "numpy==2.4.6", "-e ."])
    assert len(bad) == 3, "the parser must refuse a range, a missing hash and an editable"


@pytest.mark.parametrize("group", ["runtime", "dev"])
def test_lock_satisfies_pyproject(group):
    locked = lock()
    assert not unsatisfied(pyproject_requirements()[group], locked), unsatisfied(pyproject_requirements()[group], locked)
    assert unsatisfied([Requirement("torch==0.1"), Requirement("not-a-kdray-dependency")], locked)


def pip_configured_constraints() -> list[Path]:
    """Constraint files pip is configured with on this machine (PIP_CONSTRAINT or pip config), if any."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    values = re.findall(r"^(?::env:|global|install)\.constraint='([^']*)'", listed, re.M)
    return [Path(p) for value in values for p in value.split() if Path(p).is_file()]


def test_lock_agrees_with_the_machines_pip_constraints():
    """A CI machine's global pip constraints (a cap on what lies on its disk) must admit the lock's pins, or
    setup.sh fails there."""
    files = pip_configured_constraints()
    if not files:
        pytest.skip("pip has no constraint file configured here")
    constraints = [Requirement(line) for f in files for line in logical_lines(f.read_text())]
    locked = lock()
    assert not unsatisfied([c for c in constraints if canonicalize_name(c.name) in locked], locked)


def pip_install_commands(text: str) -> list[str]:
    return [c.strip() for c in re.split(r"&&|\n", text) if re.search(r"pip install", c)]


def installs_only_locked(command: str) -> bool:
    """A pip install of the lock under --require-hashes, or of kdray alone without its dependencies."""
    args = command.split()
    return ("--require-hashes" in args and "-r" in args and args[args.index("-r") + 1].endswith("requirements.lock")) \
        or "--no-deps" in args


@pytest.mark.parametrize("where", ["scripts/setup.sh", "cluster/aws.yaml"])
def test_installs_use_the_lock_by_hash(where):
    commands = pip_install_commands((REPO_ROOT / where).read_text())
    assert any("--require-hashes" in c for c in commands) and any("--no-deps" in c for c in commands), commands
    assert all(installs_only_locked(c) for c in commands), commands
    assert not installs_only_locked("python -m pip install -e '.[dev]'")


def test_ci_installs_through_setup():
    assert "bash scripts/test.sh" in (REPO_ROOT / ".ci" / "run").read_text()
    assert "bash scripts/setup.sh" in (REPO_ROOT / "scripts" / "test.sh").read_text()


#: Keys that name a container image: KubeRay pods, the AWS launcher's docker section, a runtime_env.
IMAGE_KEYS = frozenset({"image", "head_image", "worker_image", "image_uri"})


def test_every_image_is_pinned_by_digest():
    found = {(p.name, image) for p in sorted(CLUSTER_DIR.rglob("*.yaml"))
             for doc in yaml.safe_load_all(p.read_text()) for image in manifest_values(doc, IMAGE_KEYS)}
    assert {name for name, _ in found} >= {"aws.yaml", RAYJOB.name, RAYSERVICE.name}, found
    assert not [(name, image) for name, image in found if not PINNED_IMAGE.fullmatch(image)]
    assert not PINNED_IMAGE.fullmatch("rayproject/ray:2.60.0-py311") and not PINNED_IMAGE.fullmatch(
        "rayproject/ray:2.60.0-py311@sha256:abc")


def test_pin_images_fills_in_the_registrys_digest(tmp_path):
    """scripts/pin_images.sh asks the registry (crane here: a stub) for each tag's digest and writes it."""
    (tmp_path / "bin").mkdir()
    crane = tmp_path / "bin" / "crane"
    crane.write_text('#!/bin/sh\n[ "$1" = digest ] && case "$2" in *-gpu) echo sha256:' + "1" * 64
                     + ' ;; *) echo sha256:' + "2" * 64 + " ;; esac\n")
    crane.chmod(0o755)
    manifest = tmp_path / "aws.yaml"
    manifest.write_text((CLUSTER_DIR / "aws.yaml").read_text())
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    subprocess.run(["bash", str(REPO_ROOT / "scripts" / "pin_images.sh"), str(manifest)], env=env, check=True,
                   capture_output=True)
    docker = yaml.safe_load(manifest.read_text())["docker"]
    assert docker["image"] == "rayproject/ray:2.60.0-py311-gpu@sha256:" + "1" * 64
    assert docker["head_image"] == "rayproject/ray:2.60.0-py311@sha256:" + "2" * 64


def pod_pip_fields() -> dict[str, dict]:
    job = yaml.safe_load(RAYJOB.read_text())
    fields = {"RayJob": yaml.safe_load(job["spec"]["runtimeEnvYAML"])["pip"]}
    svc = yaml.safe_load(RAYSERVICE.read_text())
    for app in yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]:
        fields[f"RayService/{app['name']}"] = app["runtime_env"]["pip"]
    return fields


def pod_problems(pip: dict, locked: dict[str, tuple[str, set[str]]]) -> list[str]:
    """Why a runtime_env pip field would install something other than the lock's files (empty: it would not)."""
    if not isinstance(pip, dict) or "--require-hashes" not in pip.get("pip_install_options", []):
        return ["pip_install_options lacks --require-hashes"]
    problems = []
    pods, bad = parse_locked(pip["packages"])
    problems += [f"not pinned with hashes: {line}" for line in bad]
    for name, (version, hashes) in pods.items():
        if name == "ray":
            problems.append("ray: the image's ray, never one from pip")
        elif name not in locked or locked[name][0] != version or not hashes <= locked[name][1]:
            problems.append(f"{name}=={version}: not the lock's version and hashes")
    problems += [f"lacks {r}" for r in unsatisfied(
        [r for r in pyproject_requirements()["runtime"] if r.name != "ray"], pods)]
    return problems


@pytest.mark.parametrize("where", ["RayJob", "RayService/student"])
def test_pods_install_only_the_locked_hashed_packages(where):
    locked = lock()
    pip = pod_pip_fields()[where]
    assert not pod_problems(pip, locked), pod_problems(pip, locked)
    unpinned = {**pip, "packages": [*pip["packages"], "requests>=2.31"]}
    assert any("requests>=2.31" in p for p in pod_problems(unpinned, locked))
    assert pod_problems({**pip, "pip_install_options": []}, locked)
