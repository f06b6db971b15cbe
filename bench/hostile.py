"""The hostile-input corpus (tests/hostile.py) through every door kdray opens to files: load_image under both
budgets, ``kdray predict``, a live ``/predict`` and ``jobs.score`` over a folder that mixes the corpus, hostile
archive entries and real chest X-rays. Prints, per case and door: outcome, reason code, peak RSS growth and CPU
seconds, and checks that the scoring run finished with every input exactly once.

    python bench/hostile.py [--real 1000] [--doors load,predict,serve,score] [--output bench/results/hostile.md]

How each door is measured:

- ``load``: tests/hostile.py's harness: a forked child per case under RLIMIT_AS, peak RSS from VmHWM;
- ``predict``: ``python -m jobs.predict FILE --model EXPORT`` per case; peak RSS and CPU of the whole command
  from ``wait4``, minus the same command on a small valid PNG;
- ``serve``: one replica of ``serve.deploy.deploy`` on loopback; per case the replica's peak RSS is reset
  (``/proc/PID/clear_refs``), the file is POSTed to the URL ``deploy`` returned, and the replica's VmHWM
  growth and CPU time (``/proc/PID/stat``) are read;
- ``score``: one ``python -m jobs.score`` over the mixed folder (the whole command); outcomes from its
  predictions and errors, each input exactly once; the scoring actors' peak RSS and CPU sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import hostile  # noqa: E402  (tests/hostile.py: the corpus)
from bench.machine import cpu_flags, machine  # noqa: E402
from bench.score import CXR, export_random_student  # noqa: E402

MiB = 2**20
TICK_S = os.sysconf("SC_CLK_TCK")


@dataclass
class Row:
    door: str
    case: str
    outcome: str
    reason: str
    peak_rss_mib: float | None
    cpu_s: float | None


# ----------------------------------------------------------------------------- load_image


def door_load(limits: str) -> list[Row]:
    return [Row(f"load_image ({limits})", o.case, o.outcome, o.reason, o.peak_rss_bytes / MiB, o.cpu_s)
            for o in hostile.run(limits=limits)]


# ----------------------------------------------------------------------------- kdray predict


def _predict(path: Path, model: str) -> tuple[int, str, float, float]:
    """(exit code, stderr, peak RSS MiB, CPU s) of one whole ``kdray predict`` command."""
    proc = subprocess.Popen([sys.executable, "-m", "jobs.predict", str(path), "--model", model, "--threads", "1"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, stderr, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def door_predict(files: dict[str, Path], model: str, baseline_file: Path) -> list[Row]:
    """Peak RSS of the whole command (loading the model dominates it), and CPU beyond the baseline command's."""
    _, _, base_rss, base_cpu = _predict(baseline_file, model)
    rows = [Row("kdray predict", "(baseline: a 64-px PNG)", "ok", "ok", base_rss, base_cpu)]
    for name, path in files.items():
        code, stderr, rss, cpu = _predict(path, model)
        reason = "ok" if code == 0 else _reason_in(stderr)
        rows.append(Row("kdray predict", name, "ok" if code == 0 else f"exit {code}", reason, rss,
                        max(0.0, cpu - base_cpu)))
    return rows


def _reason_in(text: str) -> str:
    from kdray.images import REASONS

    return next((r for r in REASONS if f"{r}:" in text or f"({r}" in text), text.strip().splitlines()[-1][:60]
                if text.strip() else "")


# ----------------------------------------------------------------------------- a live /predict

HOLDER = """
import json, sys, time
from serve.deploy import deploy
print(json.dumps({"url": deploy(sys.argv[1], port=int(sys.argv[2]), num_replicas=1)}), flush=True)
while True:
    time.sleep(3600)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listener_pid(port: int) -> int:
    import psutil

    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    raise SystemExit(f"nothing listens on port {port}")


def _proc_status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK_S


def door_serve(files: dict[str, Path], model: str, warm_file: Path) -> list[Row]:
    import requests

    port = _free_port()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, model, str(port)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        url = json.loads(holder.stdout.readline())["url"]
        predict = url.rstrip("/") + "/predict"
        raw = {"content-type": "application/octet-stream"}
        for _ in range(3):
            requests.post(predict, data=warm_file.read_bytes(), headers=raw, timeout=60).raise_for_status()
        pid = _listener_pid(int(url.rsplit(":", 1)[1].split("/")[0]))
        rows = []
        for name, path in files.items():
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            rss, cpu = _proc_status(pid, "VmRSS"), _proc_cpu_s(pid)
            try:
                reply = requests.post(predict, data=path.read_bytes(), headers=raw, timeout=120)
                status = str(reply.status_code)
                reason = "ok" if reply.ok else (reply.json().get("reason") or reply.json().get("detail", ""))
            except (requests.RequestException, ValueError) as exc:
                status, reason = "error", type(exc).__name__
            rows.append(Row("/predict", name, status, str(reason)[:40], (_proc_status(pid, "VmHWM") - rss) / MiB,
                            _proc_cpu_s(pid) - cpu))
        return rows
    finally:
        holder.terminate()  # its Ray shuts down with it
        holder.wait(60)


# ----------------------------------------------------------------------------- jobs.score


def archive_cases(root: Path) -> dict[str, str]:
    """Hostile folder and tar entries beside the corpus files: relative name → expected reason."""
    expected = {}
    (root / "loop").mkdir()
    (root / "loop" / "a.png").write_bytes(hostile.png_zeros(64, 64))
    os.symlink("..", root / "loop" / "up")  # a loop back to the root
    os.symlink(".", root / "loop" / "here")  # and a loop to itself
    expected["loop/a.png"] = "ok"
    os.symlink("/etc/hostname", root / "link-out.png")
    expected["link-out.png"] = "outside_roots"
    os.mkfifo(root / "fifo.png")
    expected["fifo.png"] = "not_a_file"
    return expected


def _sample_scorers(stop: threading.Event, peaks: dict) -> None:
    """Peak RSS and CPU of the processes that score: the jobs.score command itself (its local engine scores in
    its own threads) and any Ray ShardScorer actors (the Ray engine)."""
    import psutil

    while not stop.is_set():
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                command = " ".join(proc.info["cmdline"] or [])
                if "ShardScorer" in command or "-m jobs.score" in command:
                    times = proc.cpu_times()
                    peak = peaks.setdefault(proc.info["pid"], [0, 0.0])
                    peak[0] = max(peak[0], proc.memory_info().rss)
                    peak[1] = times.user + times.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        stop.wait(0.2)


def door_score(files: dict[str, Path], model: str, real: int, work: Path) -> tuple[list[Row], dict]:
    import pyarrow.dataset as pads

    inputs = work / "mixed"
    inputs.mkdir()
    for name, path in files.items():
        shutil.copyfile(path, inputs / name)
    extra = archive_cases(inputs)
    reals = sorted(CXR.glob("*/*/*.png"))[:real]
    (inputs / "cxr").mkdir()
    for i, src in enumerate(reals):
        os.link(src, inputs / "cxr" / f"{i:05d}.png") if src.stat().st_dev == inputs.stat().st_dev \
            else shutil.copyfile(src, inputs / "cxr" / f"{i:05d}.png")
    out = work / "out"
    stop, peaks = threading.Event(), {}
    sampler = threading.Thread(target=_sample_scorers, args=(stop, peaks), daemon=True)
    sampler.start()
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "jobs.score", "--model", model, "--input", str(inputs),
                           "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=3600)
    wall = time.time() - started
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"jobs.score failed ({proc.returncode}): {proc.stderr[-2000:]}")
    predictions = pads.dataset(out / "predictions", format="parquet").to_table(columns=["path"])
    errors = pads.dataset(out / "errors", format="parquet").to_table(columns=["path", "reason"])
    seen = predictions["path"].to_pylist() + errors["path"].to_pylist()
    outcome = {p: "ok" for p in predictions["path"].to_pylist()}
    outcome.update(zip(errors["path"].to_pylist(), errors["reason"].to_pylist()))
    rows = []
    for name in [*files, *extra]:
        key = next((p for p in outcome if p == str(inputs / name) or p.endswith("/" + name)), None)
        rows.append(Row("jobs.score", name, "ok" if outcome.get(key) == "ok" else "refused" if key else "absent",
                        outcome.get(key, ""), None, None))
    summary = json.loads((out / "summary.json").read_text())
    facts = {"wall_s": round(wall, 1), "inputs_seen": len(seen), "distinct": len(set(seen)),
             "real_pngs": len(reals), "real_pngs_scored": sum(1 for p in outcome if "/cxr/" in p and outcome[p] == "ok"),
             "summary_images": summary["images"], "errors_by_reason": summary["errors_by_reason"],
             "engine": summary["engine"],
             "scorer_peak_rss_mib": round(max((v[0] for v in peaks.values()), default=0) / MiB),
             "scorers_cpu_s": round(sum(v[1] for v in peaks.values()), 1)}
    return rows + door_score_tar(model, work), facts


def door_score_tar(model: str, work: Path) -> list[Row]:
    """A WebDataset shard with a GNU sparse member declaring 64 MiB, a symlink, a FIFO and a 60 kB member."""
    import pyarrow.dataset as pads

    tar = work / "hostile.tar"
    hostile.hostile_tar(tar, hostile.noise_png(64))
    out = work / "out-tar"
    subprocess.run([sys.executable, "-m", "jobs.score", "--model", model, "--input", str(tar), "--output", str(out)],
                   cwd=REPO, capture_output=True, text=True, timeout=600, check=True)
    rows = [Row("jobs.score", "tar: " + p.split("#", 1)[1], "ok", "ok", None, None)
            for p in pads.dataset(out / "predictions", format="parquet").to_table(columns=["path"])["path"].to_pylist()]
    errors = pads.dataset(out / "errors", format="parquet").to_table(columns=["path", "reason"]).to_pylist()
    return rows + [Row("jobs.score", "tar: " + e["path"].split("#", 1)[1], "refused", e["reason"], None, None)
                   for e in errors]


# ----------------------------------------------------------------------------- report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--doors", default="load,predict,serve,score")
    p.add_argument("--real", type=int, default=1000, help="real CXR PNGs mixed into the scoring folder")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--output", default=str(REPO / "bench" / "results" / "hostile.md"))
    a = p.parse_args()
    doors = a.doors.split(",")
    started = dt.datetime.now(dt.timezone.utc)
    work = Path(tempfile.mkdtemp(prefix="kdray-bench-hostile-"))
    rows: list[Row] = []
    facts: dict = {}
    try:
        model = export_random_student(work, a.size)
        corpus = work / "corpus"
        corpus.mkdir()
        files = {}
        for case in hostile.CASES:
            files[case.name] = corpus / case.name
            files[case.name].write_bytes(case.make())
        warm = corpus.parent / "warm.png"
        warm.write_bytes(next(iter(sorted(CXR.glob("*/*/*.png")))).read_bytes() if CXR.exists() else
                         hostile.png_zeros(256, 256))
        if "load" in doors:
            rows += door_load("serving") + door_load("scoring")
        if "predict" in doors:
            rows += door_predict(files, model, warm)
        if "serve" in doors:
            rows += door_serve(files, model, warm)
        if "score" in doors:
            score_rows, facts = door_score(files, model, a.real, work)
            rows += score_rows
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(rows, facts, started)
    print(text)
    Path(a.output).write_text(text)


def report(rows: list[Row], facts: dict, started) -> str:
    lines = [f"# Hostile inputs through every door ({started:%Y-%m-%d %H:%M} UTC)", "",
             f"Machine: {machine()}; CPU flags: {cpu_flags()}.", "",
             "Command: `python bench/hostile.py` (tests/hostile.py's corpus; a random-weights 224-px student).", "",
             "Peak RSS is the growth during the decode, except for `kdray predict`: the whole command's peak (loading",
             "the model dominates it; compare the baseline row). CPU s is the decode's, or the command's beyond the "
             "baseline's.", "",
             "| door | case | outcome | reason | peak RSS MiB | CPU s |", "|---|---|---|---|---|---|"]
    for r in rows:
        rss = "" if r.peak_rss_mib is None else f"{r.peak_rss_mib:.1f}"
        cpu = "" if r.cpu_s is None else f"{r.cpu_s:.2f}"
        lines.append(f"| {r.door} | {r.case} | {r.outcome} | {r.reason} | {rss} | {cpu} |")
    if facts:
        lines += ["", "jobs.score over the mixed folder (the whole command): "
                  + ", ".join(f"{k} {v}" for k, v in facts.items()),
                  "", "Every input exactly once in predictions ∪ errors: "
                  + ("yes" if facts["inputs_seen"] == facts["distinct"] == facts["summary_images"] else "NO")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
