"""cluster/local_cluster.sh (cluster/local/ray_cluster.py): two real raylets on one machine, loopback only, token auth.

e2e: the script starts its own Ray cluster (a holder around ``ray.cluster_utils.Cluster``); a driver in a
subprocess runs one task pinned to each node; ``ss -ltnp`` lists every listening socket of the cluster's
processes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cluster" / "local_cluster.sh"

DRIVER = """
import json, os, sys
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback: before Ray is imported
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address=sys.argv[1], logging_level="ERROR")
nodes = [n for n in ray.nodes() if n["Alive"]]

@ray.remote(num_cpus=1)
def where():
    import pyarrow  # the project's environment
    return ray.get_runtime_context().get_node_id(), os.getpid(), sys.executable

placed = ray.get([where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
                  for n in nodes])
print(json.dumps({"nodes": [{"id": n["NodeID"], "ip": n["NodeManagerAddress"], "cpus": n["Resources"].get("CPU")}
                            for n in nodes], "ran_on": [p[0] for p in placed], "python": placed[0][2]}))
"""


def _listening(pids: set[int]) -> list[tuple[str, int]]:
    """(local address, pid) of every listening TCP socket that one of ``pids`` holds (``ss -ltnp``)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        for pid in map(int, re.findall(r"pid=(\d+)", line)):
            if pid in pids:
                found.append((fields[3], pid))
    return found


def _tree(pid: int) -> set[int]:
    try:
        root = psutil.Process(pid)
        return {pid, *(c.pid for c in root.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def test_two_nodes_on_loopback_with_token_auth(tmp_path):
    from kdray.raycluster import free_loopback_port

    env = {**os.environ, "KDRAY_CLUSTER_DIR": str(tmp_path), "KDRAY_RAY_PORT": str(free_loopback_port()),
           "KDRAY_DASHBOARD_PORT": str(free_loopback_port()), "RAY_AUTH_MODE": "token"}
    started = subprocess.run(["bash", str(SCRIPT), "start", "--nodes", "2", "--cpus-per-node", "1"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    state = json.loads((tmp_path / "state.json").read_text())
    holder = int((tmp_path / "holder.pid").read_text())
    try:
        assert state["gcs_address"].startswith("127.0.0.1:") and state["nodes"] == 2
        driver = subprocess.run([sys.executable, "-c", DRIVER, state["gcs_address"]], env=env, cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert driver.returncode == 0, driver.stderr[-3000:]
        seen = json.loads(driver.stdout.strip().splitlines()[-1])
        assert len(seen["nodes"]) == 2 and {n["ip"] for n in seen["nodes"]} == {"127.0.0.1"}
        assert [n["cpus"] for n in seen["nodes"]] == [1.0, 1.0]
        assert sorted(seen["ran_on"]) == sorted(n["id"] for n in seen["nodes"])  # a task ran on each raylet
        assert Path(seen["python"]).parent == Path(sys.executable).parent  # the project's environment
        sockets = _listening(_tree(holder))
        assert sockets, "no listening socket found for the cluster's processes"
        loopback = ("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:")  # (the last: IPv4 loopback on an IPv6 socket)
        outside = [(addr, pid) for addr, pid in sockets if not addr.startswith(loopback)]
        assert not outside, f"Ray sockets outside loopback: {outside}"
        # without the token, the cluster refuses the driver
        refused = subprocess.run([sys.executable, "-c", DRIVER, state["gcs_address"]], cwd=REPO, timeout=120,
                                 env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"},
                                 capture_output=True, text=True)
        assert refused.returncode != 0 and re.search(r"auth|token", refused.stderr, re.I), refused.stderr[-2000:]
    finally:
        pids = _tree(holder)
        stopped = subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stderr
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
