"""Serving under load: kdray Serve against two plain servers, in one run, same loader and model.

    python bench/serve.py                                   # uvicorn, LitServe, kdray via HAProxy and via Serve's proxy
    python bench/serve.py --nodes 2 --replicas 2 --replica-cpus 1   # kdray on 2 nodes of cluster/local_cluster.sh
    python bench/serve.py --sides kdray --compare metrics   # one setting off, then on

Every side serves a random-weights 224-px student exported by kdray (speed does not depend on the weights)
and gets the same chest X-ray PNG (the real CXR file closest to 30 kB), POSTed as the raw body to
``/predict`` (as multipart field ``file`` to LitServe, which reads no raw bodies), by the closed-loop client in
``bench/load.py`` (every status, latency and connection error is recorded; its own CPU use is printed beside
the numbers). Each side runs:

1. a ladder of client counts (``--levels``); its peak is the best 200-only req/s;
2. an offered rate of half that peak (paced clients): p99 and 503s there;
3. four times the peak's client count: goodput and how the excess is shed (503 + Retry-After);

and for kdray, the replica count every second, through the load and ``--cooldown`` seconds after it, and a
``GET /metrics`` scrape after the load (``--scrape``).

The sides (``--sides``, in order): ``anchor`` = ``bench/serve_anchor.py`` (FastAPI + uvicorn, 2 workers, 1
inference thread each); ``litserve`` = ``bench/serve_litserve.py`` (LitServe, 2 workers; a side install in
``--litserve-dir``); ``kdray`` = one side per ``--ingress``: ``haproxy`` (kdray's default, :mod:`kdray.ingress`)
and ``proxy`` (Serve's Python proxy, ``RAY_SERVE_ENABLE_HA_PROXY=0``). ``--compare`` runs the first kdray side
twice, a setting off then on, and prints the peaks' ratio: ``access`` (authentication + access log), ``metrics``
(``KDRAY_METRICS``), ``queue`` (HAProxy's per-replica limit, ``KDRAY_HAPROXY_REPLICA_MAXCONN``),
``ray-metrics`` (Ray's per-request HAProxy metrics, ``RAY_SERVE_HAPROXY_METRICS_ENABLED``).
Results: ``bench/results/serve.md`` (``--output``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.load import run_level  # noqa: E402
from bench.machine import cpu_flags, cpu_ticks, machine, steal_share  # noqa: E402
from bench.score import CXR, export_random_student  # noqa: E402
from kdray.evaluate import format_table  # noqa: E402
from kdray.raycluster import free_loopback_port  # noqa: E402

HOLDER = """
import json, sys, time
from ray import serve
from serve.app import APP_NAME
from serve.deploy import deploy
replicas = int(sys.argv[3]) or None  # 0: autoscaling (the default deployment)
cpus = float(sys.argv[4]) or None  # 0: what deploy() chooses
print(json.dumps({"url": deploy(sys.argv[1], port=int(sys.argv[2]), num_replicas=replicas, num_cpus=cpus),
                  "proxy": "http://127.0.0.1:" + sys.argv[2]}), flush=True)
while True:
    try:
        app = serve.status().applications[APP_NAME]
        states = app.deployments["StudentClassifier"].replica_states
        waiting = sum(int(n) for state, n in states.items() if state != "RUNNING")
        print(json.dumps({"t": time.time(), "replicas": int(states.get("RUNNING", 0)), "waiting": waiting}),
              flush=True)
    except Exception as exc:
        print(json.dumps({"t": time.time(), "error": type(exc).__name__}), flush=True)
    time.sleep(1.0 if replicas is None else 10.0)  # fixed replicas: watching costs the box CPU, not news
"""


def pick_image() -> Path:
    files = sorted(CXR.glob("*/*/*.png"))
    if not files:
        raise SystemExit(f"no PNGs under {CXR}")
    return min(files[:5000], key=lambda f: abs(f.stat().st_size - 30_000))


def wait_ready(url: str, body: bytes, timeout: float = 180.0, headers: dict | None = None) -> None:
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.post(url, data=body, headers={"content-type": "image/png", **(headers or {})},
                             timeout=10).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1.0)
    raise SystemExit(f"{url} did not answer 200 within {timeout:.0f} s")


class Replicas(threading.Thread):
    """Reads the holder's replica counts; keeps (seconds since start, count) at every change."""

    def __init__(self, stream, started: float):
        super().__init__(daemon=True)
        self.stream, self.started, self.changes = stream, started, []

    def run(self) -> None:
        for line in self.stream:
            try:
                row = json.loads(line)
            except ValueError:  # a line Ray forwarded from a worker, not the holder's
                continue
            if not isinstance(row, dict) or "replicas" not in row:
                continue
            count = row["replicas"] if not row.get("waiting") else f"{row['replicas']} (+{row['waiting']} waiting)"
            if not self.changes or self.changes[-1][1] != count:
                self.changes.append((round(row["t"] - self.started), count))


def ladder(url: str, body: bytes, levels: list[int], duration: float, label: str, marks: list,
           explain_clients: int = 0, settle: float = 0.0, headers: dict | None = None,
           content_type: str = "image/png") -> list[dict]:
    """The levels, then half the peak rate and 4x the peak's clients. ``explain_clients`` > 0: that many more
    clients send ``?explain=true`` requests beside every level, and the row gets their numbers too. Every
    request carries ``headers`` (an Authorization when authentication is on)."""
    rows = []

    def level(clients: int, rate: float | None, what: str) -> dict:
        time.sleep(settle)  # the previous level's last requests (and held 503s) drain first
        marks.append((time.time(), f"{what} ({clients} clients)"))
        explaining = ExplainLoad(url, body, explain_clients, duration, headers) if explain_clients else None
        ticks = cpu_ticks()
        row = {"side": label, "load": what,
               **run_level(url, body, content_type, clients, duration, rate, headers=headers).summary()}
        row["steal %"] = round(100 * steal_share(ticks, cpu_ticks()), 1)  # the hypervisor's share, not the box's
        if explaining is not None:
            row.update(explaining.result())
        print(json.dumps(row), flush=True)
        rows.append(row)
        return row

    for clients in levels:
        level(clients, None, "ladder")
    peak = max(rows, key=lambda r: r["ok req/s"])
    level(peak["clients"], peak["ok req/s"] / 2, "half the peak rate")
    level(4 * peak["clients"], None, "4x the peak's clients")
    return rows


class ExplainLoad(threading.Thread):
    """Closed-loop ``?explain=true`` clients beside a level (their own event loop, in this thread)."""

    def __init__(self, url: str, body: bytes, clients: int, duration: float, headers: dict | None = None):
        super().__init__(daemon=True)
        self.args, self.summary = (f"{url}?explain=true", body, "image/png", clients, duration), {}
        self.headers = headers
        self.start()

    def run(self) -> None:
        self.summary = run_level(*self.args, headers=self.headers).summary()

    def result(self) -> dict:
        self.join()
        s = self.summary
        return {"explain clients": s["clients"], "explain ok/s": s["ok req/s"], "explain p99 ms": s["p99 ms"],
                "explain 503s": s["503s"], "explain statuses": json.dumps(s["statuses"])}


MULTIPART_BOUNDARY = "kdraybenchboundary"


def multipart(body: bytes) -> tuple[bytes, str]:
    """``body`` as multipart field ``file`` (LitServe decodes forms, not raw bodies) and its content type."""
    head = (f"--{MULTIPART_BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()
    return head + body + f"\r\n--{MULTIPART_BOUNDARY}--\r\n".encode(), \
        f"multipart/form-data; boundary={MULTIPART_BOUNDARY}"


def bench_anchor(model: str, body: bytes, a, litserve: bool = False) -> list[dict]:
    """The plain uvicorn server (``bench/serve_anchor.py``) or LitServe (``bench/serve_litserve.py``, from
    ``--litserve-dir``), 2 workers each."""
    port = free_loopback_port()
    env = {**os.environ, "KDRAY_ANCHOR_MODEL": model, "OMP_NUM_THREADS": "1"}
    if litserve:
        env["PYTHONPATH"] = os.pathsep.join([a.litserve_dir, str(REPO)])
        command = [sys.executable, str(REPO / "bench" / "serve_litserve.py"), str(port)]
        label, (body, content_type) = "LitServe", multipart(body)
    else:
        command = [sys.executable, "-m", "uvicorn", "bench.serve_anchor:app", "--workers", "2", "--host",
                   "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"]
        label, content_type = ANCHOR, "image/png"
    proc = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/predict"
        wait_ready(url, body, headers={"content-type": content_type})
        return ladder(url, body, a.levels, a.duration, label, [], settle=a.settle, content_type=content_type)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


class LocalCluster:
    """``cluster/local_cluster.sh start --nodes N`` in a folder of its own, on free ports; ``stop()`` ends it."""

    def __init__(self, nodes: int, cpus_per_node: int, env: dict, workdir: Path):
        self.env = {**env, "KDRAY_CLUSTER_DIR": tempfile.mkdtemp(prefix="cluster-", dir=workdir),
                    "KDRAY_RAY_PORT": str(free_loopback_port()), "KDRAY_DASHBOARD_PORT": str(free_loopback_port())}
        script = str(REPO / "cluster" / "local_cluster.sh")
        self.stop_command = ["bash", script, "stop"]
        subprocess.run(["bash", script, "start", "--nodes", str(nodes), "--cpus-per-node", str(cpus_per_node)],
                       env=self.env, check=True, stdout=subprocess.DEVNULL, timeout=240)
        state = json.loads((Path(self.env["KDRAY_CLUSTER_DIR"]) / "state.json").read_text())
        self.address = state["gcs_address"]

    def stop(self) -> None:
        subprocess.run(self.stop_command, env=self.env, stdout=subprocess.DEVNULL, timeout=120)


def bench_kdray(model: str, body: bytes, a, variant: dict, workdir: Path) -> tuple[list[dict], list, list]:
    """kdray's side. ``variant``: {"label": the side's name, "env": the Ray nodes' and replicas' settings (the
    ingress, KDRAY_*), "headers": what each request carries}. With ``--nodes`` > 1 the kdray side runs on a
    ``cluster/local_cluster.sh`` cluster of that many nodes, and the holder joins it."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", **dict(kv.split("=", 1) for kv in a.serve_env),
           **variant["env"]}
    headers = variant["headers"]
    cluster = LocalCluster(a.nodes, a.cpus_per_node, env, workdir) if a.nodes > 1 else None
    if cluster:
        env["RAY_ADDRESS"] = cluster.address
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, model, str(free_loopback_port()), str(a.replicas),
                             str(a.replica_cpus)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    started, marks = time.time(), []
    try:
        urls = json.loads(proc.stdout.readline())
        url = urls["url"] + "/predict"
        replicas = Replicas(proc.stdout, started)
        replicas.start()
        wait_ready(url, body, headers=headers)
        direct = urls["url"] != urls["proxy"]
        label = variant["label"] + (" (direct ingress)" if direct else "")
        rows = ladder(url, body, a.levels, a.duration, label, marks, a.explain_clients, a.settle, headers)
        if direct and a.proxy_too:
            rows += ladder(urls["proxy"] + "/predict", body, a.levels, a.duration,
                           variant["label"] + " via its proxy", marks, settle=a.settle, headers=headers)
        if a.scrape:
            scrape_metrics(urls["url"], headers, workdir / f"metrics-{len(marks)}.txt")
        marks.append((time.time(), "load stopped"))
        time.sleep(a.cooldown)
        return rows, replicas.changes, [(round(t - started), what) for t, what in marks]
    finally:
        proc.send_signal(signal.SIGINT)  # the holder's exit shuts its local Ray down (or leaves the cluster)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        if cluster:
            cluster.stop()


def scrape_metrics(base_url: str, headers: dict, path: Path) -> None:
    """GET /metrics after the load and print the latency histogram's count and the refusals by reason."""
    import requests

    text = requests.get(f"{base_url}/metrics", headers=headers, timeout=30).text
    path.write_text(text)
    wanted = ("kdray_request_duration_seconds_count", "kdray_refusals_total", "kdray_model_info")
    for line in text.splitlines():
        if line.startswith(wanted):
            print(f"metrics: {line}", flush=True)


INGRESS = {"haproxy": ("kdray via HAProxy", "1"), "proxy": ("kdray via Serve's proxy", "0")}


def kdray_variants(a, workdir: Path) -> list[dict]:
    """One kdray side per ``--ingress``; ``--compare`` replaces the first by a pair: that setting off, then on."""
    variants = [{"label": INGRESS[name][0], "env": {"RAY_SERVE_ENABLE_HA_PROXY": INGRESS[name][1]}, "headers": {}}
                for name in a.ingress.split(",")]
    if a.compare:
        first = variants[0]
        pairs = access_sides(workdir) if a.compare == "access" else COMPARE[a.compare]
        variants[:1] = [{"label": first["label"] + p["label"], "env": {**first["env"], **p["env"]},
                         "headers": p["headers"]} for p in pairs]
    return variants


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sides", default="anchor,litserve,kdray", help="in this order: anchor (plain uvicorn), "
                   "litserve (needs --litserve-dir), kdray (one side per --ingress)")
    p.add_argument("--ingress", default="haproxy,proxy", help="kdray's ingresses: haproxy (the default), proxy")
    p.add_argument("--litserve-dir", default="/tmp/litserve-side",
                   help="where `pip install --no-deps --target DIR litserve pyzmq` put LitServe")
    p.add_argument("--nodes", type=int, default=1, help="> 1: kdray on a cluster/local_cluster.sh cluster")
    p.add_argument("--cpus-per-node", type=int, default=1)
    p.add_argument("--replica-cpus", type=float, default=0, help="CPUs per replica (0: what deploy() chooses)")
    p.add_argument("--compare", choices=("access", "metrics", "queue", "ray-metrics"), default=None,
                   help="run the first kdray side twice, that setting off then on: authentication + access log, "
                        "Prometheus metrics, HAProxy's per-replica queue (kdray.ingress), Ray's per-request "
                        "HAProxy metrics (RAY_SERVE_HAPROXY_METRICS_ENABLED)")
    p.add_argument("--scrape", type=int, default=1, help="1: GET /metrics after each kdray side's load")
    p.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 32, 64, 128])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per load level")
    p.add_argument("--settle", type=float, default=3.0, help="seconds of no load before each level")
    p.add_argument("--cooldown", type=float, default=75.0, help="seconds to watch replicas after the load")
    p.add_argument("--replicas", type=int, default=0, help="fixed replica count (0: the default autoscaling)")
    p.add_argument("--proxy-too", type=int, default=1, help="with direct ingress, also load Serve's proxy (1/0)")
    p.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the Ray/Serve processes (e.g. RAY_SERVE_ENABLE_DIRECT_INGRESS=1)")
    p.add_argument("--explain-clients", type=int, default=0,
                   help="kdray only: this many more clients send ?explain=true beside every level")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "kdray-bench-score"))
    p.add_argument("--output", default=str(REPO / "bench" / "results" / "serve.md"))
    a = p.parse_args()
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = export_random_student(workdir, 224)
    image = pick_image()
    body = image.read_bytes()
    started = dt.datetime.now(dt.timezone.utc)
    rows, replicas, marks = [], [], []
    for side in a.sides.split(","):
        if side in ("anchor", "litserve"):
            rows += bench_anchor(model, body, a, litserve=side == "litserve")
        elif side == "kdray":
            for variant in kdray_variants(a, workdir):
                kd_rows, replicas, marks = bench_kdray(model, body, a, variant, workdir)
                rows += kd_rows
        else:
            raise SystemExit(f"unknown side {side!r}: anchor, litserve, kdray")
    report(a, rows, replicas, marks, image, started)


ACCESS_OFF, ACCESS_ON = " [auth+log off]", " [auth+log on]"
METRICS_OFF, METRICS_ON = " [metrics off]", " [metrics on]"
QUEUE_OFF, QUEUE_ON = " [HAProxy queue off]", " [HAProxy queue on]"
RAY_METRICS_OFF, RAY_METRICS_ON = " [Ray's HAProxy metrics off]", " [Ray's HAProxy metrics on]"
COMPARE = {"metrics": [{"env": {"KDRAY_METRICS": "0"}, "headers": {}, "label": METRICS_OFF},
                       {"env": {"KDRAY_METRICS": "1"}, "headers": {}, "label": METRICS_ON}],
           "queue": [{"env": {"KDRAY_HAPROXY_REPLICA_MAXCONN": "0"}, "headers": {}, "label": QUEUE_OFF},
                     {"env": {}, "headers": {}, "label": QUEUE_ON}],
           "ray-metrics": [{"env": {"RAY_SERVE_HAPROXY_METRICS_ENABLED": "0"}, "headers": {}, "label": RAY_METRICS_OFF},
                           {"env": {"RAY_SERVE_HAPROXY_METRICS_ENABLED": "1"}, "headers": {},
                            "label": RAY_METRICS_ON}]}
ANCHOR = "plain uvicorn"


def access_sides(workdir: Path) -> list[dict]:
    """kdray with authentication and its access log off, then on (a tokens file; each request its token)."""
    import secrets

    token = secrets.token_urlsafe(32)
    tokens = workdir / "bench-tokens"
    tokens.write_text(token + "\n")
    tokens.chmod(0o600)
    return [{"env": {"KDRAY_ACCESS_LOG": "0"}, "headers": {}, "label": ACCESS_OFF},
            {"env": {"KDRAY_ACCESS_LOG": "1", "KDRAY_AUTH_TOKENS_FILE": str(tokens)},
             "headers": {"Authorization": f"Bearer {token}"}, "label": ACCESS_ON}]


def acceptance(rows: list[dict], peaks: dict) -> list[str]:
    """Per kdray side: p99 at half the peak rate, and at 4x the peak's clients the goodput over the peak, the 503s
    with and without Retry-After, other 5xx and connection errors (issue 27's acceptance)."""
    lines = []
    for side, peak in sorted(peaks.items()):
        half = [r for r in rows if r["side"] == side and r["load"] == "half the peak rate"]
        over = [r for r in rows if r["side"] == side and r["load"] == "4x the peak's clients"]
        if half and over:
            h, o = half[0], over[0]
            line = (f"{side}: p99 at half the peak rate {h['p99 ms']:.0f} ms; at {o['clients']} clients goodput "
                    f"{o['ok req/s'] / peak:.2f}x the peak, 503s {o['503s']} ({o['503 with Retry-After']} with "
                    f"Retry-After), other 5xx {o['other 5xx']}, connection errors {o['errors']}")
            lines.append(line)
            print(line, flush=True)
    return lines + [""] if lines else []


def report(a, rows: list[dict], replicas: list, marks: list, image: Path, started) -> None:
    peaks = {side: max(r["ok req/s"] for r in rows if r["side"] == side) for side in {r["side"] for r in rows}}
    lines = [f"# Serving benchmark ({started:%Y-%m-%d %H:%M} UTC)", "", f"Machine: {machine()}",
             f"CPU flags: {cpu_flags()}", "",
             f"Image: `{image.name}` ({image.stat().st_size} bytes, a real CXR PNG), POSTed raw to /predict. "
             f"{a.duration:.0f} s per level, {a.settle:.0f} s without load before each. Explanation clients beside each kdray level: {a.explain_clients}. Serve env: {' '.join(a.serve_env) or '(defaults)'}. Replicas: "
             f"{a.replicas or 'autoscaling (the default)'}; kdray on {a.nodes} node(s) of {a.cpus_per_node if a.nodes > 1 else 'all'} CPU(s).", "",
             "Peaks (200s only): " + ", ".join(f"{side} {v:.0f} req/s" for side, v in sorted(peaks.items())), ""]
    for anchor_side in (ANCHOR, "LitServe"):
        if anchor := peaks.get(anchor_side):
            lines += [f"{side} / {anchor_side} peak: {v / anchor:.2f}" for side, v in sorted(peaks.items())
                      if side not in (ANCHOR, "LitServe")]
            lines.append("")
    lines += acceptance(rows, peaks)
    for on_label, off_label, what in ((ACCESS_ON, ACCESS_OFF, "auth + access log"),
                                      (METRICS_ON, METRICS_OFF, "metrics"), (QUEUE_ON, QUEUE_OFF, "HAProxy queue"),
                                      (RAY_METRICS_ON, RAY_METRICS_OFF, "Ray's HAProxy metrics")):
        for side, v in sorted(peaks.items()):
            off = peaks.get(side.replace(on_label, off_label)) if side.endswith(on_label) else None
            if off:
                lines += [f"{side.removesuffix(on_label)}: {what} on / off peak: {v:.0f} / {off:.0f} req/s "
                          f"= {v / off:.3f}", ""]
                print(lines[-2], flush=True)
    table = [{k: v for k, v in r.items() if k != "statuses"} | {"statuses": json.dumps(r["statuses"])}
             for r in rows]
    lines += [format_table(table, list(table[0])), ""]
    if replicas:
        lines += ["kdray replicas (seconds since start, count at each change): "
                  + ", ".join(f"{t} s: {n}" for t, n in replicas),
                  "Load marks: " + ", ".join(f"{t} s: {what}" for t, what in marks), ""]
    lines.append(f"`python bench/serve.py {' '.join(sys.argv[1:])}`")
    Path(a.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
