"""Connecting to Ray: an existing cluster (RAY_ADDRESS / --address) or a local one on loopback only."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION",
                 "KDRAY_LOG_LEVEL", "RAY_TRAIN_ENABLE_PRINT_PATCH")
# Ray Train 2.60 routes a worker's print() to its logger *and*, because Ray wraps the worker's stdout, tees it
# to the original print: every progress line reached the driver twice. kdray's workers print plain progress
# lines, so the patch is off unless the caller's environment sets it.
WORKER_ENV_DEFAULTS = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# A local cluster runs without the dashboard, so Ray's State API is not served. Ray Train 2.60's placement-group
# cleaner polls that API about once a second for as long as a run lasts and logs a warning each time it fails
# (5,501 lines in one 99-minute benchmark). The local cluster's workers drop that one message; nothing else.
UNAVAILABLE_STATE_API_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
UNAVAILABLE_STATE_API_MESSAGE = "Failed to query Ray Train Controller actor state"


def worker_env_vars() -> dict[str, str]:
    """Environment for Ray workers: the defaults above, then what the caller's environment sets."""
    return {**WORKER_ENV_DEFAULTS, **{k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}}


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Start or join Ray once per process. Local clusters bind to 127.0.0.1 and nothing else."""
    import ray

    if ray.is_initialized():
        return ray
    runtime_env = {"env_vars": worker_env_vars()}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        log.info("starting a local Ray on 127.0.0.1")
        runtime_env["worker_process_setup_hook"] = "kdray.raycluster.drop_state_api_warnings"
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus,
                 runtime_env=runtime_env, configure_logging=False)
    _quiet_ray_data()
    return ray


def _unless_state_api_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(UNAVAILABLE_STATE_API_MESSAGE)


def drop_state_api_warnings() -> None:
    """Ray worker setup hook (local clusters only, which run without the State API): see the constant above."""
    logger = logging.getLogger(UNAVAILABLE_STATE_API_LOGGER)
    if _unless_state_api_warning not in logger.filters:
        logger.addFilter(_unless_state_api_warning)


def _quiet_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("KDRAY_PROGRESS", "1") != "0"
    ctx.print_on_execution_start = False


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))
