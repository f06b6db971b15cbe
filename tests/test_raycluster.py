"""What kdray passes to Ray workers, and where a local Ray listens."""

import pytest

from kdray.raycluster import worker_env_vars


def test_worker_env_turns_train_print_patch_off_by_default(monkeypatch):
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PRINT_PATCH", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8333")
    env = worker_env_vars()
    assert env["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"  # else each worker progress line reaches the driver twice
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:8333"


def test_worker_env_keeps_the_callers_choice(monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PRINT_PATCH", "1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    env = worker_env_vars()
    assert env["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "1"
    assert "AWS_ENDPOINT_URL" not in env


def test_worker_env_carries_no_aws_variable_the_caller_lacks(monkeypatch):
    """With an instance profile or IRSA the caller has no AWS keys, and none reach the job's runtime_env (which
    Ray keeps with the job, in the dashboard's job details): workers use their own credential chain."""
    import os

    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "")  # set but empty: not forwarded either
    assert not [k for k in worker_env_vars() if k.startswith("AWS_")]


def _kept(messages: list[str]) -> list[bool]:
    """Which of these warnings the placement-group cleaner's logger would emit, in this process."""
    import logging

    from kdray.raycluster import UNAVAILABLE_STATE_API_LOGGER

    logger = logging.getLogger(UNAVAILABLE_STATE_API_LOGGER)
    return [bool(logger.filter(logging.LogRecord(logger.name, logging.WARNING, __file__, 0, m, None, None)))
            for m in messages]


MESSAGES = ["Failed to query Ray Train Controller actor state. State API may be temporarily unavailable.",
            "Detected that the Ray Train controller actor (abc) is dead. Cleaning up placement group = [pg]."]


def test_drop_state_api_warnings_drops_that_message_only_and_installs_once():
    import logging

    from kdray.raycluster import UNAVAILABLE_STATE_API_LOGGER, drop_state_api_warnings

    logger = logging.getLogger(UNAVAILABLE_STATE_API_LOGGER)
    before = list(logger.filters)
    try:
        drop_state_api_warnings()
        drop_state_api_warnings()
        assert len(logger.filters) == len(before) + 1
        assert _kept(MESSAGES) == [False, True]
    finally:
        logger.filters[:] = before


@pytest.mark.integration
def test_local_ray_workers_run_the_hook(ray_local):
    import sys

    import ray

    this_module = sys.modules[__name__]
    ray.cloudpickle.register_pickle_by_value(this_module)  # so that the worker need not import tests/
    try:
        assert ray.get(ray.remote(num_cpus=0.1)(_kept).remote(MESSAGES)) == [False, True]
    finally:
        ray.cloudpickle.unregister_pickle_by_value(this_module)


LOOPBACK_DRIVER = """
import sys
from ray import serve  # Ray first: it reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER now, before init_ray sets it
import ray
from ray._private import ray_constants
assert ray_constants.ENABLE_RAY_CLUSTER, "Ray saw the loopback setting at import: this run proves nothing"
from kdray.raycluster import free_loopback_port, init_ray

init_ray(num_cpus=1)

@serve.deployment(ray_actor_options={"num_cpus": 0.1})
def echo(request):
    return "ok"

serve.start(http_options={"host": "127.0.0.1", "port": free_loopback_port()}, proxy_location="HeadOnly")  # as serve.app.deploy
serve.run(echo.bind(), name="echo", route_prefix="/")
print("READY", ray.util.get_node_ip_address(), flush=True)
sys.stdin.readline()
ray.shutdown()  # not serve.shutdown(): it waits out the direct-ingress replica's 30 s drain
"""
#: Ray 2.60's own exception: each Serve replica's inter-deployment gRPC server binds every interface,
#: hard-coded in ray/serve/_private/replica.py (``add_port_to_grpc_server(self._server, "[::]:0")``), whatever
#: the node's address; Ray attaches its token-auth interceptor to it. One such socket per replica is allowed.
REPLICA_PROCESS = "ray::ServeReplica"
WILDCARD = ("*:", "0.0.0.0:", "[::]:")


@pytest.mark.e2e
def test_local_ray_and_serve_stay_on_loopback_when_ray_is_imported_first():
    """`from ray import serve` before kdray: Ray has read the loopback setting as unset, and kdray's local Ray,
    Serve's proxy and its replica must still listen on loopback only (ss -ltnp over the driver's process tree)."""
    import contextlib
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    import psutil
    from test_local_cluster import _listening, _tree

    ray_tmp = tempfile.mkdtemp(prefix="kdl", dir="/tmp")  # short (Ray's socket paths), and no other Ray's address
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    env["RAY_TMPDIR"] = ray_tmp
    out = Path(ray_tmp) / "driver.out"
    with open(out, "w") as sink:
        driver = subprocess.Popen([sys.executable, "-c", LOOPBACK_DRIVER], cwd=Path(__file__).resolve().parents[1],
                                  env=env, stdin=subprocess.PIPE, stdout=sink, stderr=subprocess.STDOUT, text=True)
    pids: set[int] = set()
    try:
        deadline = time.monotonic() + 150
        while "READY" not in out.read_text() and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "READY" in out.read_text(), out.read_text()[-3000:]
        pids = _tree(driver.pid)
        sockets = _listening(pids)
        assert sockets, "no listening socket found for the driver's processes"
        loopback = ("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:")  # (the last: IPv4 loopback on an IPv6 socket)
        replica_grpc, leaks = {}, []
        for addr, pid in sockets:
            if addr.startswith(loopback):
                continue
            name = psutil.Process(pid).name()
            if name.startswith(REPLICA_PROCESS) and addr.startswith(WILDCARD) and pid not in replica_grpc:
                replica_grpc[pid] = addr
            else:
                leaks.append((addr, name))
        assert not leaks, f"sockets outside loopback: {leaks}"
        assert out.read_text().split("READY", 1)[1].split()[0] == "127.0.0.1"  # the node's address
    finally:
        pids |= _tree(driver.pid)
        try:
            driver.communicate("\n", timeout=90)
        except subprocess.TimeoutExpired:  # stop what this test started, by PID
            for pid in pids:
                with contextlib.suppress(psutil.NoSuchProcess):
                    psutil.Process(pid).kill()
            driver.wait()
        log = out.read_text()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert driver.returncode == 0, log[-3000:]
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


@pytest.mark.unit
def test_local_ray_collects_no_metrics_unless_asked(monkeypatch) -> None:
    """A job's own local Ray has no dashboard or Prometheus to read Ray's metrics: their collection is off."""
    from kdray.raycluster import local_system_config

    monkeypatch.delenv("RAY_enable_metrics_collection", raising=False)
    assert local_system_config() == {"enable_metrics_collection": False}
    monkeypatch.setenv("RAY_enable_metrics_collection", "1")
    assert local_system_config() == {}


KEYS = {"AWS_ACCESS_KEY_ID": "AKIDCANARY", "AWS_SECRET_ACCESS_KEY": "secret-canary", "AWS_SESSION_TOKEN": "token-canary"}


@pytest.mark.unit
def test_worker_env_never_carries_a_key(monkeypatch):
    """Ray writes a job's runtime_env to runtime_env_agent.log on every node: the keys must not be in it."""
    from kdray.raycluster import SECRET_ENV

    for key, value in KEYS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8333")
    env = worker_env_vars()
    assert not set(SECRET_ENV) & set(env) and not set(KEYS.values()) & set(env.values()), env
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:8333"  # settings still travel


@pytest.mark.unit
def test_driver_keys_file_is_private_and_loaded_only_where_the_node_has_no_keys(monkeypatch):
    import atexit
    import json
    import os
    import stat

    from kdray.raycluster import KEYS_FILE_ENV, load_driver_keys, write_driver_keys

    for key in KEYS:
        monkeypatch.delenv(key, raising=False)
    assert write_driver_keys() is None  # a driver without keys (a role) writes nothing
    for key, value in KEYS.items():
        monkeypatch.setenv(key, value)
    cleanups = []
    monkeypatch.setattr(atexit, "register", lambda fn, *args: cleanups.append((fn, args)))
    path = write_driver_keys()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert json.loads(open(path).read()) == KEYS
        monkeypatch.setenv(KEYS_FILE_ENV, path)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "the-nodes-own")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        load_driver_keys()  # the node's own keys win
        assert (os.environ["AWS_ACCESS_KEY_ID"], os.environ.get("AWS_SECRET_ACCESS_KEY")) == ("the-nodes-own", None)
        for key in KEYS:
            monkeypatch.delenv(key, raising=False)
        load_driver_keys()  # a node without keys on the driver's machine: the driver's
        assert {k: os.environ[k] for k in KEYS} == KEYS
    finally:
        for fn, args in cleanups:  # what the driver does as it exits
            fn(*args)
    assert not os.path.exists(os.path.dirname(path))
    for key in KEYS:
        monkeypatch.delenv(key, raising=False)
    load_driver_keys()  # the file is not on this machine: nothing set, the node's credential chain decides
    assert not [k for k in KEYS if k in os.environ]
