#!/usr/bin/env bash
# A multi-node Ray cluster on this machine, on loopback only (cluster/local/ray_cluster.py holds it).
#
# Usage:  cluster/local_cluster.sh start [--nodes N] [--cpus-per-node C] | stop | status
#
#   start   a head and N-1 worker nodes (separate raylets, C CPUs and their own object store each), all at
#           127.0.0.1, token auth on; prints the addresses once every node is up
#   stop    shuts the cluster down (SIGTERM to the holder, SIGKILL after 30 s)
#   status  the holder's state.json, or "not running"
#
# Environment: KDRAY_CLUSTER_DIR (state and logs) [<repo>/.kdray/local_cluster], KDRAY_RAY_PORT [6390],
# KDRAY_DASHBOARD_PORT [8275], KDRAY_PYTHON [<repo>/.venv/bin/python].
# S3 keys: every node keeps the AWS_* variables of the shell that starts it; kdray sends none through Ray
# (docs/deployment.md, "No keys in what Ray keeps").
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${KDRAY_CLUSTER_DIR:-${REPO_ROOT}/.kdray/local_cluster}"
PYTHON="${KDRAY_PYTHON:-${REPO_ROOT}/.venv/bin/python}"
PID_FILE="${DIR}/holder.pid"
STATE="${DIR}/state.json"

running() { [[ -f "${PID_FILE}" ]] && kill -0 "$(cat "${PID_FILE}")" 2>/dev/null; }

case "${1:-}" in
  start)
    shift
    if running; then echo "already running (pid $(cat "${PID_FILE}")); stop it first" >&2; exit 1; fi
    mkdir -p "${DIR}"
    rm -f "${STATE}"
    cd "${REPO_ROOT}"
    if [[ "${RAY_AUTH_MODE:-token}" == "token" ]]; then
      "$(dirname "${PYTHON}")/ray" get-auth-token --generate >/dev/null  # creates ~/.ray/auth_token once
    fi
    nohup "${PYTHON}" -m cluster.local.ray_cluster --state-dir "${DIR}" --port "${KDRAY_RAY_PORT:-6390}" \
      --dashboard-port "${KDRAY_DASHBOARD_PORT:-8275}" "$@" > "${DIR}/holder.log" 2>&1 &
    echo $! > "${PID_FILE}"
    for _ in $(seq 1 180); do
      if [[ -f "${STATE}" ]]; then
        cat "${STATE}"
        echo
        echo "Submit jobs with: RAY_ADDRESS=http://127.0.0.1:${KDRAY_DASHBOARD_PORT:-8275} RAY_AUTH_MODE=token \\"
        echo "  ${REPO_ROOT}/.venv/bin/ray job submit --working-dir . -- python -m jobs.pipeline"
        exit 0
      fi
      if ! running; then echo "the cluster failed to start; see ${DIR}/holder.log" >&2; tail -20 "${DIR}/holder.log" >&2; exit 1; fi
      sleep 1
    done
    echo "the cluster did not come up in 180 s; see ${DIR}/holder.log" >&2
    exit 1
    ;;
  stop)
    if ! running; then echo "not running"; rm -f "${PID_FILE}"; exit 0; fi
    pid="$(cat "${PID_FILE}")"
    kill -TERM "${pid}"
    for _ in $(seq 1 30); do kill -0 "${pid}" 2>/dev/null || break; sleep 1; done
    kill -0 "${pid}" 2>/dev/null && kill -KILL "${pid}"
    rm -f "${PID_FILE}" "${STATE}"
    echo "stopped"
    ;;
  status)
    if running && [[ -f "${STATE}" ]]; then cat "${STATE}"; echo; else echo "not running"; exit 1; fi
    ;;
  *)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
