#!/usr/bin/env bash
# Local PACS (Orthanc + DICOMweb) for kdray, in a network namespace of its own (cluster/local/pacs.py).
#
# Usage:  cluster/local_pacs.sh start|stop|status [--dir DIR]     (DIR defaults to <repo>/.kdray/pacs)
#         cluster/local_pacs.sh seed [N] [--dir DIR]              (stores N synthetic DX instances, default 20)
#
# `start` waits until DICOMweb answers, then prints the DICOMweb root and a `source` line for the
# credentials' variables (KDRAY_DICOMWEB_URL, KDRAY_DICOMWEB_USER/_PASSWORD that kdray's jobs read,
# KDRAY_PACS_URL for Orthanc's REST, ...; the file is 0600):
#
#   eval "$(cluster/local_pacs.sh start | grep ^source)"
#
# Needs root (ip netns) and Debian's orthanc and orthanc-dicomweb. `stop` stops Orthanc by PID and removes
# the namespace.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-${REPO_ROOT}/.venv/bin/python}"
[[ -x "${PYTHON}" ]] || PYTHON=python3
cd "${REPO_ROOT}"
exec "${PYTHON}" -m cluster.local.pacs "$@"
