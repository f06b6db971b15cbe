"""Serving under load: kdray Serve against the plain uvicorn anchor, in one run, same loader and model.

    python bench/serve.py                                   # anchor, then kdray Serve with its defaults
    python bench/serve.py --sides kdray --serve-env RAY_SERVE_ENABLE_DIRECT_INGRESS=1   # one lever

Both sides serve a random-weights 224-px student exported by kdray (speed does not depend on the weights)
and get the same chest X-ray PNG (the real CXR file closest to 30 kB), POSTed as the raw body to
``/predict``, by the closed-loop client in ``bench/load.py`` (every status, latency and connection error is
recorded; its own CPU use is printed beside the numbers). Each side runs:

1. a ladder of client counts (``--levels``); its peak is the best 200-only req/s;
2. an offered rate of half that peak (paced clients): p99 and 503s there;
3. four times the peak's client count: goodput and how fast the excess is shed (503 + Retry-After);

and for kdray, the replica count every second, through the load and ``--cooldown`` seconds after it.

``--access-compare 1`` runs kdray twice in the same run: first with authentication and its access log off
(``KDRAY_ACCESS_LOG=0``), then with both on (a tokens file, every request with its bearer token, one JSON
line per request), and prints both peaks and their ratio (the issue-26 acceptance: within 5%).

The anchor is ``bench/serve_anchor.py``: FastAPI + uvicorn, 2 workers, 1 inference thread each.
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
print(json.dumps({"url": deploy(sys.argv[1], port=int(sys.argv[2]), num_replicas=replicas),
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
    time.sleep(1.0)
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
           explain_clients: int = 0, settle: float = 0.0, headers: dict | None = None) -> list[dict]:
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
               **run_level(url, body, "image/png", clients, duration, rate, headers=headers).summary()}
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


def bench_anchor(model: str, body: bytes, a) -> list[dict]:
    port = free_loopback_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "bench.serve_anchor:app", "--workers", "2",
                             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                             "--no-access-log"], cwd=REPO, env={**os.environ, "KDRAY_ANCHOR_MODEL": model,
                                                                "OMP_NUM_THREADS": "1"})
    try:
        url = f"http://127.0.0.1:{port}/predict"
        wait_ready(url, body)
        return ladder(url, body, a.levels, a.duration, "plain uvicorn", [], settle=a.settle)
    finally:
        proc.terminate()
        proc.wait(30)


def bench_kdray(model: str, body: bytes, a, access: dict | None = None) -> tuple[list[dict], list, list]:
    """kdray's side; ``access``: {"env": the replicas' KDRAY_* settings, "headers": what each request carries,
    "label": the side's suffix}, for the authentication and access-log comparison."""
    access = access or {"env": {}, "headers": {}, "label": ""}
    env = {**os.environ, **dict(kv.split("=", 1) for kv in a.serve_env), **access["env"]}
    headers = access["headers"]
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, model, str(free_loopback_port()), str(a.replicas)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, text=True)
    started, marks = time.time(), []
    try:
        urls = json.loads(proc.stdout.readline())
        url = urls["url"] + "/predict"
        replicas = Replicas(proc.stdout, started)
        replicas.start()
        wait_ready(url, body, headers=headers)
        direct = urls["url"] != urls["proxy"]
        label = "kdray Serve" + (" (direct ingress)" if direct else "") + access["label"]
        rows = ladder(url, body, a.levels, a.duration, label, marks, a.explain_clients, a.settle, headers)
        if direct and a.proxy_too:
            rows += ladder(urls["proxy"] + "/predict", body, a.levels, a.duration,
                           "kdray Serve via its proxy" + access["label"], marks, settle=a.settle, headers=headers)
        marks.append((time.time(), "load stopped"))
        time.sleep(a.cooldown)
        return rows, replicas.changes, [(round(t - started), what) for t, what in marks]
    finally:
        proc.send_signal(signal.SIGINT)  # the holder's exit shuts its local Ray down
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sides", default="anchor,kdray")
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
    p.add_argument("--access-compare", type=int, default=0,
                   help="1: run kdray twice, authentication and access log off, then on; print the peaks' ratio")
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
    if "anchor" in a.sides:
        rows += bench_anchor(model, body, a)
    if "kdray" in a.sides:
        for access in access_sides(workdir) if a.access_compare else [None]:
            kd_rows, replicas, marks = bench_kdray(model, body, a, access)
            rows += kd_rows
    report(a, rows, replicas, marks, image, started)


ACCESS_OFF, ACCESS_ON = " [auth+log off]", " [auth+log on]"


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


def report(a, rows: list[dict], replicas: list, marks: list, image: Path, started) -> None:
    peaks = {side: max(r["ok req/s"] for r in rows if r["side"] == side) for side in {r["side"] for r in rows}}
    lines = [f"# Serving benchmark ({started:%Y-%m-%d %H:%M} UTC)", "", f"Machine: {machine()}",
             f"CPU flags: {cpu_flags()}", "",
             f"Image: `{image.name}` ({image.stat().st_size} bytes, a real CXR PNG), POSTed raw to /predict. "
             f"{a.duration:.0f} s per level, {a.settle:.0f} s without load before each. Explanation clients beside each kdray level: {a.explain_clients}. Serve env: {' '.join(a.serve_env) or '(defaults)'}. Replicas: "
             f"{a.replicas or 'autoscaling (the default)'}.", "",
             "Peaks (200s only): " + ", ".join(f"{side} {v:.0f} req/s" for side, v in sorted(peaks.items())), ""]
    anchor = peaks.get("plain uvicorn")
    if anchor:
        lines += [f"{side} / anchor peak: {v / anchor:.2f}" for side, v in sorted(peaks.items())
                  if side != "plain uvicorn"]
        lines.append("")
    for side, v in sorted(peaks.items()):
        off = peaks.get(side.replace(ACCESS_ON, ACCESS_OFF)) if side.endswith(ACCESS_ON) else None
        if off:
            lines += [f"{side.removesuffix(ACCESS_ON)}: auth + access log on / off peak: {v:.0f} / {off:.0f} req/s "
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
