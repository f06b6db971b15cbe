"""Connecting to Ray: an existing cluster (RAY_ADDRESS / --address) or a local one on loopback only."""

from __future__ import annotations

import logging
import os
import sys
import time

from kdray import KdrayError
from kdray.ray_private import refresh_loopback_constant
from kdray.runner import log_settings

log = logging.getLogger(__name__)
progress_log = logging.getLogger("kdray.progress")
PROGRESS_TAG = "[kdray]"  # training workers prefix their progress lines with it

#: Settings the workers get through the job's runtime_env. Never a key: Ray writes a job's runtime_env, in full,
#: to runtime_env_agent.log on every node (and keeps it with the job), so a forwarded key sat there in plaintext.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION",
                 "KDRAY_LOG_LEVEL", "KDRAY_S3_RETRY_S",
                 "RAY_TRAIN_ENABLE_PRINT_PATCH")
#: The AWS keys: never in a runtime_env. Workers have their own (a local Ray's raylet and workers inherit this
#: process's environment; a node started with keys, or with a role, has its own) or get the driver's through
#: :data:`KEYS_FILE_ENV`.
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
#: Path of the driver's private copy of its keys (mode 0600), for workers on the driver's machine whose node has
#: none (a demo pipeline submitted to a local cluster starts its own S3): only the path travels through Ray.
KEYS_FILE_ENV = "KDRAY_S3_KEYS_FILE"
KEYS_HOOK = "kdray.raycluster.load_driver_keys"
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
    """Environment for Ray workers: the defaults above, then what the caller's environment sets (no key)."""
    return {**WORKER_ENV_DEFAULTS, **{k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}}


def _has_keys() -> bool:
    return bool(os.environ.get("AWS_ACCESS_KEY_ID"))


def write_driver_keys() -> str | None:
    """This driver's keys in a private file for the workers of a cluster it joins, or None when it has none.

    A folder of its own (mode 0700, the file 0600, outside Ray's session folder), removed as this process exits
    (SIGTERM included: ``ray.init`` turns it into an exit; after SIGKILL it stays, readable by its user only).
    Why a file and not Ray's object store, which reaches other machines: a value there is fetched with Ray calls
    that a worker's setup hook cannot rely on, and a node on another machine needs credentials of its own anyway
    (a role, or keys in its environment). The driver that brings keys its nodes lack, the demo pipeline with its
    embedded S3 on 127.0.0.1, runs on the nodes' machine."""
    if not _has_keys():
        return None
    import atexit
    import json
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="kdray-keys-")  # 0700
    path = os.path.join(folder, "s3-keys.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({k: os.environ[k] for k in SECRET_ENV if os.environ.get(k)}, fh)
    atexit.register(shutil.rmtree, folder, True)
    return path


def load_driver_keys() -> None:
    """Ray worker setup hook (joined clusters): the driver's keys from :data:`KEYS_FILE_ENV`, unless this node has
    keys of its own (they win, as the node's role would) or the file is not on this machine (then the node's own
    credential chain, if any; S3's refusal names what the node lacks: :func:`kdray.storage.access_hint`)."""
    path = os.environ.get(KEYS_FILE_ENV)
    if _has_keys() or not path or not os.path.isfile(path):
        return
    import json

    with open(path) as fh:
        os.environ.update({k: v for k, v in json.load(fh).items() if k in SECRET_ENV})


LOOPBACK_HOSTS = ("127.0.0.1", "::1")
#: A local Ray binds to 127.0.0.1 only while this is 0; unset, Ray binds the machine's address.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def keep_ray_on_loopback() -> None:
    """Right before a local Ray starts: the loopback setting in the environment (unless the caller chose one),
    and in Ray's own copy of it.

    Ray 2.60 reads :data:`LOOPBACK_ENV` once, as it is imported, into ``ENABLE_RAY_CLUSTER``; a script that ran
    ``from ray import serve`` first keeps True there, and ``ray.init`` turns ``127.0.0.1`` into the machine's
    address (``services.resolve_ip_for_localhost``). The processes Ray starts import Ray afresh and inherit the
    environment, so only this process's copy can be stale: :func:`kdray.ray_private.refresh_loopback_constant`
    sets it to what Ray would have read. Done here rather than when kdray is imported, so that importing kdray
    changes nothing."""
    os.environ.setdefault(LOOPBACK_ENV, "0")
    refresh_loopback_constant(LOOPBACK_ENV)


#: Environment of a Ray node kdray starts (the same as cluster/local_head.sh and the KubeRay pods set).
#: Direct ingress: Serve replicas answer HTTP on their own port (127.0.0.1:30000 and up here), one Python
#: hop fewer than through Serve's proxy, which keeps running and balancing all replicas. Serve's
#: throughput-optimized mode: the user code runs on the replica's own event loop (no hop to a second thread
#: per request), request logs are buffered, GC frozen after start-up. What each gained: docs/running.md.
#: HAProxy ingress: HAProxy, not Serve's Python proxy, answers on Serve's HTTP port and forwards each request to a
#: replica's own port (:mod:`kdray.ingress`; measured: docs/deployment.md, "What listens where"). Ray's
#: per-request HAProxy metrics off: each request would cost a log datagram that Serve's HAProxyManager parses in
#: Python; the replicas' own /metrics count and time every request (serve/metrics.py).
NODE_ENV = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            "RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0"}


def local_node_env() -> dict[str, str]:
    """:data:`NODE_ENV` for a node started on this machine, with HAProxy's admin listeners on loopback and its
    files in a folder of this Ray's own (:func:`kdray.ingress.node_env`). ``RAY_SERVE_ENABLE_HA_PROXY=0`` in
    the environment keeps Serve's Python proxy."""
    from kdray import ingress

    env = dict(NODE_ENV)
    if os.environ.get(ingress.HAPROXY_ENV, "1") == "0":
        env.pop(ingress.HAPROXY_ENV)
    else:
        env.update(ingress.node_env((free_loopback_port(), free_loopback_port())))
    return env


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for Serve's proxy, benchmarks and tests)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_STARTED_HERE = False


def ray_started_here() -> bool:
    """Whether :func:`init_ray` started the Ray this process uses: one node, its resources fixed, no autoscaler."""
    import ray

    return _STARTED_HERE and ray.is_initialized()


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Start or join Ray once per process. Local clusters bind to 127.0.0.1 and nothing else.

    Unless the job runs ``--verbose`` (:func:`kdray.runner.log_settings`), worker output goes to the log and
    only kdray's own progress lines reach the console (:func:`quiet_worker_output`)."""
    import ray

    if ray.is_initialized():
        return ray
    runtime_env = {"env_vars": worker_env_vars()}
    address = address or os.environ.get("RAY_ADDRESS")
    keep_ray_on_loopback()
    if address:
        log.info("joining Ray cluster at %s", address)
        keys_file = write_driver_keys()
        if keys_file:  # the path only: the keys stay out of the runtime_env, hence out of Ray's logs
            runtime_env["env_vars"][KEYS_FILE_ENV] = keys_file
            runtime_env["worker_process_setup_hook"] = KEYS_HOOK
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        log.info("starting a local Ray on 127.0.0.1")  # its raylet, hence every worker, inherits the keys
        for key, value in local_node_env().items():  # read by Ray's processes as they start: set where the node starts
            os.environ.setdefault(key, value)
        runtime_env["worker_process_setup_hook"] = "kdray.raycluster.drop_state_api_warnings"
        # address="local": a new Ray, never the last cluster started on this machine (/tmp/ray/ray_current_cluster),
        # which ray.init() without an address silently joins, wherever it listens
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus,
                 runtime_env=runtime_env, configure_logging=False, _system_config=local_system_config())
        node_ip = ray.util.get_node_ip_address()
        if node_ip not in LOOPBACK_HOSTS:  # a future Ray that reads the setting elsewhere: refuse, do not serve
            ray.shutdown()
            raise KdrayError(f"the local Ray started on {node_ip}, not 127.0.0.1: unset {LOOPBACK_ENV} or set it "
                             f"to 0 in the environment before Python starts")
        global _STARTED_HERE
        _STARTED_HERE = True
    settings = log_settings()
    _quiet_ray_data(settings.verbose)
    if not settings.verbose:
        quiet_worker_output()
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the driver's "Started Serve ..." lines
        progress_log.info("Ray %s; worker output and Ray's progress go to %s (--verbose prints them here)",
                          "joined" if address else "started on 127.0.0.1",
                          settings.log_file or "the 'kdray.workers' logger")
    return ray


def local_system_config() -> dict:
    """Ray settings of the local Ray a job starts for itself. It runs without a dashboard or Prometheus, so
    nothing reads Ray's metrics: their collection is off (``RAY_enable_metrics_collection=1`` keeps it).
    On the 2-core box the metrics agent and exporters took about 1% of the CPU the scorers need."""
    if os.environ.get("RAY_enable_metrics_collection"):
        return {}
    return {"enable_metrics_collection": False}


class _ProgressThrottle:
    """Forwards kdray's ``[kdray]`` worker lines to the console: in place on a terminal; otherwise at most
    one line every ``every_s`` seconds, plus the lines that end a run (last epoch, early stop, resume)."""

    KEEP = ("resuming", "early stop")

    def __init__(self, every_s: float = 30.0):
        self.every_s, self.last = every_s, 0.0
        self.tty = sys.stderr.isatty()

    def __call__(self, line: str) -> None:
        text = line[line.index(PROGRESS_TAG):]
        if self.tty:
            sys.stderr.write("\r\033[K" + text[:200])
            sys.stderr.flush()
            return
        now = time.monotonic()
        final = any(k in text for k in self.KEEP) or _is_last_epoch(text)
        if final or now - self.last >= self.every_s:
            self.last = now
            progress_log.info("%s", text)


def _is_last_epoch(text: str) -> bool:
    parts = text.split("epoch ", 1)[-1].split(":", 1)[0].split("/")
    return len(parts) == 2 and parts[0].strip() == parts[1].strip() and "step" not in text


def quiet_worker_output() -> None:
    """Route Ray's worker output to the ``ray.workers`` logger (the log file) instead of the console;
    kdray's own progress lines still reach the console, throttled.

    Ray 2.60 prints worker output through a dispatcher in ``ray._private``: replacing its handler is the
    one hook there is. If that private API moves, worker output simply stays on the console."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # pragma: no cover - a future Ray
        log.debug("cannot reroute Ray worker output on this Ray version")
        return
    workers_log = logging.getLogger("kdray.workers")
    workers_log.setLevel(logging.INFO)
    progress = _ProgressThrottle()

    def handle(data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or ""
        for line in data.get("lines", []):
            workers_log.info("(%s pid=%s) %s", who, data.get("pid"), line)
            if PROGRESS_TAG in line:
                progress(line)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("kdray_worker_output", handle)


def _unless_state_api_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(UNAVAILABLE_STATE_API_MESSAGE)


def drop_state_api_warnings() -> None:
    """Ray worker setup hook (local clusters only, which run without the State API): see the constant above."""
    logger = logging.getLogger(UNAVAILABLE_STATE_API_LOGGER)
    if _unless_state_api_warning not in logger.filters:
        logger.addFilter(_unless_state_api_warning)


def _quiet_ray_data(verbose: bool) -> None:
    """Ray Data's progress bars and per-operator log lines only with ``--verbose``; they go to the log otherwise."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = False
    if not verbose:
        from ray.util.debug import log_once

        log_once("ray_data_progress_manager_disabled")  # marks Ray Data's "Progress bars disabled" as said
        for handler in logging.getLogger("ray.data").handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.WARNING)


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))
