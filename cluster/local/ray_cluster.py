"""A real multi-node Ray cluster on one machine, on loopback only: ``python -m cluster.local.ray_cluster``.

One holder process starts a head and ``nodes - 1`` worker nodes with ``ray.cluster_utils.Cluster``: separate
raylets, each with its own CPUs and object store, every one at 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
keeps Ray on loopback; with ``ray start --address`` that setting refuses a second node, the holder does not
need it). Every node inherits this environment, AWS_* keys included (kdray sends none through Ray). Token
authentication stays on, and jobs submitted to the head's dashboard run with the project's
``python`` first on PATH. The holder writes ``state.json`` (addresses, nodes, its pid) into ``--state-dir``
once every node is up, then waits; SIGTERM or SIGINT shuts the whole cluster down.

``cluster/local_cluster.sh start --nodes N`` / ``stop`` / ``status`` wraps it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

from kdray.ray_private import refresh_loopback_constant
from kdray.raycluster import LOOPBACK_ENV, free_loopback_port, local_node_env

STATE_FILE = "state.json"


def _prepare_environment() -> None:
    """What every node inherits: loopback, token auth, direct ingress, HAProxy, and this environment's python first.
    Set before Ray starts; Ray's cached copy of the loopback setting is refreshed in case it was imported first."""
    os.environ[LOOPBACK_ENV] = "0"
    refresh_loopback_constant(LOOPBACK_ENV)
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    for key, value in local_node_env().items():  # HAProxy on the head only: deploy() asks for HeadOnly
        os.environ.setdefault(key, value)
    bin_dir = os.path.dirname(sys.executable)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def start(nodes: int, cpus_per_node: int, port: int, dashboard_port: int, object_store_mb: int):
    """The running ``Cluster`` (head + ``nodes - 1`` workers), every node registered."""
    from ray.cluster_utils import Cluster

    common = {"num_cpus": cpus_per_node, "node_ip_address": "127.0.0.1",
              "object_store_memory": object_store_mb * 2**20}
    # The head's dashboard agent takes a free port, not Ray's fixed 52365: any other Ray on this machine may hold
    # that one, and then the head's agent serves no HTTP and every job submission fails ("No available agent").
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        **common, "gcs_server_port": port, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": dashboard_port, "dashboard_agent_listen_port": free_loopback_port()})
    for number in range(1, nodes):
        # Each node unpacks runtime environments (a job's --working-dir) into a folder of its own: in the shared
        # one, a worker node's unpacking and clean-up deleted the files under a running job's driver on the head
        # (its current folder vanished mid-job; measured with `ray job submit` of the pipeline).
        cluster.add_node(**common, runtime_env_dir_name=f"runtime_resources_node{number}")
    cluster.wait_for_nodes()
    return cluster


def _raylet_pid(node) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--cpus-per-node", type=int, default=1)
    p.add_argument("--port", type=int, default=6390, help="the head's GCS port (outside 10002-19999)")
    p.add_argument("--dashboard-port", type=int, default=8275)
    p.add_argument("--object-store-mb", type=int, default=256)
    p.add_argument("--state-dir", default=os.path.join(".kdray", "local_cluster"))
    a = p.parse_args(argv)
    if a.nodes < 1:
        raise SystemExit("error: --nodes must be at least 1")
    if 10002 <= a.port <= 19999:
        raise SystemExit(f"error: --port {a.port} is inside Ray's worker port range 10002-19999; choose another")
    _prepare_environment()
    os.makedirs(a.state_dir, exist_ok=True)
    state_path = os.path.join(a.state_dir, STATE_FILE)
    if os.path.exists(state_path):
        os.remove(state_path)
    cluster = start(a.nodes, a.cpus_per_node, a.port, a.dashboard_port, a.object_store_mb)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    nodes = cluster.list_all_nodes()  # the head first
    state = {"pid": os.getpid(), "gcs_address": cluster.address,
             "dashboard_url": f"http://127.0.0.1:{a.dashboard_port}", "nodes": a.nodes,
             "cpus_per_node": a.cpus_per_node, "python": sys.executable,
             "node_ids": [n.node_id for n in nodes],
             "raylet_pids": [_raylet_pid(n) for n in nodes]}  # head first (fault tests kill one)
    tmp = state_path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(state, fh, indent=2)
    os.replace(tmp, state_path)  # written last: the cluster is up
    print(json.dumps(state), flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        if os.path.exists(state_path):
            os.remove(state_path)
        cluster.shutdown()
        time.sleep(0.5)


if __name__ == "__main__":
    main()
