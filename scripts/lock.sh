#!/usr/bin/env bash
# Regenerate requirements.lock from pyproject.toml: every runtime dependency and the `dev` extra, pinned with
# the sha256 of every file PyPI holds for the pinned version, for CPython 3.11 on linux x86_64 (what setup.sh,
# CI and the Ray images run); then the KubeRay pods' pip lists from it (scripts/pod_requirements.py).
# uv runs from a throwaway venv, so the project's .venv is not touched. Afterwards: bash scripts/setup.sh,
# the tests, and commit pyproject.toml, requirements.lock and cluster/kuberay/*.yaml together.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.8
tools="$(mktemp -d "${TMPDIR:-/tmp}/kdray-lock.XXXXXX")"
trap 'rm -rf "$tools"' EXIT
python3.11 -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install --quiet "uv==$UV_VERSION" "packaging>=24"
# PyPI only: a local mirror's files install under --require-hashes only if they are PyPI's own (same hashes).
compile=("$tools/venv/bin/uv" pip compile pyproject.toml --python-version 3.11 --python-platform x86_64-manylinux_2_28
         --index-url https://pypi.org/simple --no-cache --quiet)
"${compile[@]}" --extra dev --generate-hashes --custom-compile-command "bash scripts/lock.sh" \
    --output-file requirements.lock "$@"
# The pods need the runtime dependencies only, at the lock's versions.
"${compile[@]}" --constraint requirements.lock --no-annotate --no-header --output-file "$tools/runtime-pins.txt"
"$tools/venv/bin/python" scripts/pod_requirements.py "$tools/runtime-pins.txt" cluster/kuberay/rayjob-pipeline.yaml \
    cluster/kuberay/rayservice-student.yaml
