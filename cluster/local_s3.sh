#!/usr/bin/env bash
# Local S3 endpoint (SeaweedFS) for kdray, bound to loopback only.
#
# Usage:  cluster/local_s3.sh start|stop [DIR]      (DIR defaults to <repo>/.kdray/s3)
#
# `start` runs the server in the background, waits until it serves S3, creates the
# bucket(s) in KDRAY_S3_BUCKETS and prints `export AWS_...=...` lines; the same lines are
# kept in DIR/s3.env while it runs:
#
#   cluster/local_s3.sh start && source .kdray/s3/s3.env   # from the repo root
#
# Environment overrides (defaults in brackets):
#   KDRAY_S3_PORT      S3 port                      [a free one, reused on restart]
#   KDRAY_S3_BUCKETS   space-separated buckets      [kdray]
#   PYTHON             interpreter with kdray       [<repo>/.venv/bin/python, else python3]
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "${REPO_ROOT}/.venv/bin/python" ]]; then
        PYTHON="${REPO_ROOT}/.venv/bin/python"
    else
        PYTHON=python3
    fi
fi

cmd="${1:-}"
dir="${2:-${REPO_ROOT}/.kdray/s3}"
export PYTHONPATH="${REPO_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"

case "${cmd}" in
    start)
        args=(start --dir "${dir}")
        if [[ -n "${KDRAY_S3_PORT:-}" ]]; then
            args+=(--port "${KDRAY_S3_PORT}")
        fi
        for bucket in ${KDRAY_S3_BUCKETS-kdray}; do
            args+=(--bucket "${bucket}")
        done
        exec "${PYTHON}" -m cluster.local.s3 -v "${args[@]}"
        ;;
    stop)
        exec "${PYTHON}" -m cluster.local.s3 -v stop --dir "${dir}"
        ;;
    *)
        echo "usage: $0 {start|stop} [DIR]" >&2
        exit 2
        ;;
esac
