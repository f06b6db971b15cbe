#!/usr/bin/env bash
# Create .venv (Python 3.11) and install kdray with its test extras from requirements.lock, and (as root, with apt)
# Debian's dicom3tools, orthanc, orthanc-dicomweb, chromium and chromium-driver. Safe to re-run
# (about 10 s when everything is installed).
# --require-hashes: every package is the lock's version and one of the files the lock names by sha256, whatever
# index or mirror pip is configured with. kdray itself goes in with --no-deps (the lock holds its dependencies)
# and --no-build-isolation (built by the lock's setuptools, not by one fetched unpinned). To change a
# dependency: edit pyproject.toml, then bash scripts/lock.sh (docs/deployment.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [[ ! -x .venv/bin/python ]]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --require-hashes -r requirements.lock
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
# Debian tools the tests use: dciodvfy (dicom3tools) validates the DICOM objects kdray writes; Orthanc and its
# DICOMweb plugin are the local PACS (cluster/local_pacs.sh); headless Chromium and its driver run the browser
# tests of the viewer and the scoring report (selenium).
if ! { command -v dciodvfy && command -v Orthanc && [[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]] \
        && command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
    packages=(dicom3tools orthanc orthanc-dicomweb chromium chromium-driver)
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        apt-get install -y -q "${packages[@]}" >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q "${packages[@]}" >/dev/null; }
    else
        echo "setup: install Debian's ${packages[*]} (apt-get install) for the DICOM and PACS tests" >&2
    fi
fi
