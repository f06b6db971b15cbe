#!/usr/bin/env bash
# Local single-node Ray head for kdray, bound to loopback only.
#
# Usage:  cluster/local_head.sh start|stop|status|restart
#
# Environment overrides (defaults in brackets):
#   KDRAY_RAY_PORT         GCS port of the head                     [6380]
#   KDRAY_DASHBOARD_PORT   dashboard / job-submission HTTP port     [8265]
#   KDRAY_NUM_CPUS         logical CPUs advertised to Ray           [$(nproc)]
#   KDRAY_NUM_GPUS         GPUs advertised to Ray                   [auto-detect]
#   KDRAY_RAY_START_TIMEOUT  seconds to wait for `ray status`       [90]
#   KDRAY_RAY_EXTRA_ARGS   extra flags appended to `ray start`      []
#   RAY_BIN                ray executable            [<repo>/.venv/bin/ray, else ray on PATH]
#   RAY_AUTH_MODE          token (default) or disabled
#
# Ray 2.60 enables token authentication when a token exists in
# ~/.ray/auth_token; this script makes sure one exists and starts the head with
# RAY_AUTH_MODE=token so the behaviour does not depend on leftover state.
#
# S3 keys: the head's processes, and so its workers, keep the AWS_* variables of the shell that starts it
# (or use the machine's role). kdray sends no key through a job's runtime_env (Ray logs it): start the head
# from a shell with the keys, or submit drivers that bring their own (docs/deployment.md).
# Clients then need RAY_AUTH_MODE=token (they read ~/.ray/auth_token) or
# RAY_AUTH_TOKEN=<token>.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"

HOST=127.0.0.1
PORT="${KDRAY_RAY_PORT:-6380}"
DASHBOARD_PORT="${KDRAY_DASHBOARD_PORT:-8265}"
NUM_CPUS="${KDRAY_NUM_CPUS:-$(nproc)}"
NUM_GPUS="${KDRAY_NUM_GPUS:-}"
START_TIMEOUT="${KDRAY_RAY_START_TIMEOUT:-90}"
EXTRA_ARGS="${KDRAY_RAY_EXTRA_ARGS:-}"

# Keep every Ray component on loopback (see PITFALLS.md: without this Ray binds
# the machine's routable address).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
# Serve replicas also answer HTTP on their own port (30000 and up), one Python hop fewer than through
# Serve's proxy (bench/results/serve.md); read by Serve as the node starts. kdray.raycluster.NODE_ENV
# sets the same for the local Ray it starts.
export RAY_SERVE_ENABLE_DIRECT_INGRESS="${RAY_SERVE_ENABLE_DIRECT_INGRESS:-1}"
# Serve's throughput-optimized mode: user code on the replica's own event loop, buffered request logs
# (bench/results/serve-throughput-optimized.md).
export RAY_SERVE_THROUGHPUT_OPTIMIZED="${RAY_SERVE_THROUGHPUT_OPTIMIZED:-1}"
# HAProxy, not Serve's Python proxy, answers on Serve's port and forwards to the replicas' ports
# (kdray/ingress.py; docs/deployment.md, "What listens where"). Its admin listeners stay on loopback through
# kdray-haproxy (set below, once the ray executable is known).
export RAY_SERVE_ENABLE_HA_PROXY="${RAY_SERVE_ENABLE_HA_PROXY:-1}"
# No per-request HAProxy metrics from Ray (a log line per request parsed in Python); kdray's /metrics has them.
export RAY_SERVE_HAPROXY_METRICS_ENABLED="${RAY_SERVE_HAPROXY_METRICS_ENABLED:-0}"

find_ray() {
    if [[ -n "${RAY_BIN:-}" ]]; then
        echo "${RAY_BIN}"
    elif [[ -x "${REPO_ROOT}/.venv/bin/ray" ]]; then
        echo "${REPO_ROOT}/.venv/bin/ray"
    elif command -v ray >/dev/null 2>&1; then
        command -v ray
    else
        echo "error: no 'ray' executable found (set RAY_BIN, create ${REPO_ROOT}/.venv, or put ray on PATH)" >&2
        return 1
    fi
}

RAY="$(find_ray)"
export RAY_SERVE_HAPROXY_BINARY_PATH="${RAY_SERVE_HAPROXY_BINARY_PATH:-$(dirname "${RAY}")/kdray-haproxy}"
# Job entrypoints run `python` from the head's PATH: put the ray's own environment first, so that
# `ray job submit -- python -m jobs.X` finds kdray's dependencies.
export PATH="$(dirname "${RAY}"):${PATH}"
GCS_ADDRESS="${HOST}:${PORT}"
DASHBOARD_URL="http://${HOST}:${DASHBOARD_PORT}"

ray_status() {
    "${RAY}" status --address "${GCS_ADDRESS}" "$@"
}

print_usage_hint() {
    local env_prefix="RAY_ADDRESS=${DASHBOARD_URL}"
    if [[ "${RAY_AUTH_MODE}" == "token" ]]; then
        env_prefix+=" RAY_AUTH_MODE=token"
    fi
    cat <<EOF

Ray head is up (GCS ${GCS_ADDRESS}, dashboard ${DASHBOARD_URL}, ${NUM_CPUS} CPUs).
Submit jobs from the repository root with:

  ${env_prefix} ${RAY} job submit --working-dir . -- python -m jobs.pipeline --config configs/<x>.yaml

Drivers on this machine can use ray.init(address="${GCS_ADDRESS}") with RAY_AUTH_MODE=token.
Stop it with: $0 stop
EOF
}

cmd_start() {
    if ray_status >/dev/null 2>&1; then
        echo "A Ray head is already running at ${GCS_ADDRESS}."
        print_usage_hint
        return 0
    fi

    if [[ "${RAY_AUTH_MODE}" == "token" ]]; then
        # Creates ~/.ray/auth_token only if it does not exist yet.
        "${RAY}" get-auth-token --generate >/dev/null
    fi

    local args=(
        start --head
        --node-ip-address="${HOST}"
        --port="${PORT}"
        --dashboard-host="${HOST}"
        --dashboard-port="${DASHBOARD_PORT}"
        --num-cpus="${NUM_CPUS}"
        --disable-usage-stats
    )
    if [[ -n "${NUM_GPUS}" ]]; then
        args+=(--num-gpus="${NUM_GPUS}")
    fi
    # shellcheck disable=SC2206  # intentional word splitting of extra flags
    if [[ -n "${EXTRA_ARGS}" ]]; then
        args+=(${EXTRA_ARGS})
    fi

    echo "+ ${RAY} ${args[*]}"
    "${RAY}" "${args[@]}"

    local deadline=$((SECONDS + START_TIMEOUT))
    until ray_status >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            echo "error: 'ray status --address ${GCS_ADDRESS}' did not succeed within ${START_TIMEOUT}s" >&2
            ray_status || true
            return 1
        fi
        sleep 1
    done
    print_usage_hint
}

cmd_stop() {
    # NB: `ray stop` is not scoped to this head: it kills every Ray process of
    # the current user on this machine (including ray.init() clusters).
    "${RAY}" stop --force
}

cmd_status() {
    ray_status
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    restart) cmd_stop; cmd_start ;;
    *)
        echo "usage: $0 {start|stop|status|restart}" >&2
        exit 2
        ;;
esac
