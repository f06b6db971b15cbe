"""Scoring straight from a PACS: jobs.score through DICOMweb against a plain dicomweb-client loop, in one run.

    python bench/pacs.py                       # 400 real CXRs as DX instances in 40 studies, 2 rounds
    python bench/pacs.py --instances 100 --rounds 1 --side 1024

Starts the local PACS (cluster/local/pacs.py: Orthanc + DICOMweb in its own network namespace; needs root) and
stores the real chest X-rays of ../shared/datasets/cxr/val as 12-bit DX instances, 10 per study (``--side``:
scaled to that many pixels a side first; hospital DX images are 2-3k). Then, per round, on the same instances and
the same exported model (random weights: speed does not depend on them), each a whole command, start to exit:

- **plain loop**: bench/pacs_plain.py, search + retrieve + pydicom decode + predict in batches of 32;
- **jobs.score**: ``python -m jobs.score --input dicomweb+…?Modality=DX``, as the README gives it;
- **jobs.score + SRs stored**: the same with ``--dicom_store`` (an SR per instance made and sent by STOW-RS);
- with ``--listener``: **jobs.listen**, the C-STORE AI node: Orthanc pushes every instance to it and the time runs
  until Orthanc holds every SR (push to result stored).

The sides alternate within each round, so a drift of the shared box's speed falls on both. Results (with the CPU
and its flags) go to ``bench/results/pacs.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import cpu_flags, machine  # noqa: E402
from bench.score import CXR, export_random_student  # noqa: E402
from cluster.local.demo_data import dicom_bytes  # noqa: E402
from cluster.local.pacs import LocalPacs  # noqa: E402
from kdray import dicomweb  # noqa: E402


def load_pacs(pacs: LocalPacs, n: int, side: int) -> None:
    """The first ``n`` val CXRs (cycled), as 12-bit DX instances, 10 per study."""
    from PIL import Image

    sources = sorted(CXR.glob("val/*/*.png"))
    if not sources:
        raise SystemExit(f"no PNGs under {CXR / 'val'}")
    with requests.Session() as s:
        s.auth = pacs.auth()
        for i in range(n):
            image = Image.open(sources[i % len(sources)]).convert("L")
            if side:
                image = image.resize((side, side), Image.BILINEAR)
            pixels = np.asarray(image).astype(np.uint16) * 16
            data = dicom_bytes(pixels, modality="DX", StudyInstanceUID=f"1.2.826.0.1.3680043.10.7.{i // 10}",
                               PatientID=f"BENCH{i // 10:04d}")
            s.post(f"{pacs.url}/instances", data=data, timeout=60).raise_for_status()


def srs_in(pacs: LocalPacs) -> int:
    resp = requests.get(f"{pacs.dicomweb_url}/instances", params={"Modality": "SR", "limit": 100000},
                        auth=pacs.auth(), timeout=60)
    resp.raise_for_status()
    return len(resp.json()) if resp.content.strip() else 0


def delete_srs(pacs: LocalPacs) -> None:
    """The SRs of an earlier side, so that the next one's count starts at 0."""
    ids = requests.post(f"{pacs.url}/tools/find", json={"Level": "Series", "Query": {"Modality": "SR"}},
                        auth=pacs.auth(), timeout=60).json()
    for series in ids:
        requests.delete(f"{pacs.url}/series/{series}", auth=pacs.auth(), timeout=60).raise_for_status()


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started, done.stdout


def plain(model: str, pacs: LocalPacs, env: dict) -> float:
    seconds, _ = timed([sys.executable, str(REPO / "bench" / "pacs_plain.py"), model, pacs.dicomweb_url,
                          *pacs.auth()], env)
    return seconds


def jobs_score(model: str, pacs: LocalPacs, workdir: Path, env: dict, store: bool) -> float:
    root = f"dicomweb+{pacs.dicomweb_url}"
    cmd = [sys.executable, "-m", "jobs.score", "--model", model, "--input", f"{root}?Modality=DX",
           "--output", str(workdir / "out"), "--overwrite", "true"]
    if store:
        delete_srs(pacs)
        cmd += ["--dicom_store", root]
    seconds, _ = timed(cmd, env)
    return seconds


def listener(model: str, pacs: LocalPacs, workdir: Path, env: dict, n: int) -> float:
    """Push every DX instance to jobs.listen (Orthanc's modalities/…/store) and wait for every SR in Orthanc."""
    import shutil

    delete_srs(pacs)
    queue = workdir / "listen"
    shutil.rmtree(queue, ignore_errors=True)
    port = 11112
    cmd = [sys.executable, "-m", "jobs.listen", "--model", model, "--host", pacs.host_address, "--port", str(port),
           "--ae_title", "KDRAY", "--accepted_calling_aes", "KDRAYPACS", "--queue_dir", str(queue),
           "--destination", f"KDRAYPACS@{pacs.pacs_address}:4242"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        modality = {"AET": "KDRAY", "Host": pacs.host_address, "Port": port}
        requests.put(f"{pacs.url}/modalities/KDRAY", json=modality, auth=pacs.auth(), timeout=30).raise_for_status()
        ids = requests.post(f"{pacs.url}/tools/find", json={"Level": "Instance", "Query": {"Modality": "DX"}},
                            auth=pacs.auth(), timeout=60).json()
        time.sleep(3)  # (the listener's start: imports and the model; not part of push-to-result)
        started = time.perf_counter()
        requests.post(f"{pacs.url}/modalities/KDRAY/store", json={"Resources": ids, "Synchronous": True},
                      auth=pacs.auth(), timeout=600).raise_for_status()
        deadline = time.time() + 600
        while srs_in(pacs) < n and time.time() < deadline:
            time.sleep(0.2)
        return time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=400)
    p.add_argument("--side", type=int, default=0, help="scale the CXRs to this many pixels a side (0: as they are)")
    p.add_argument("--size", type=int, default=224, help="the model's input size")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--listener", action="store_true", help="also time jobs.listen from push to SR stored")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "kdray-bench-pacs"))
    p.add_argument("--output", default=str(REPO / "bench" / "results" / "pacs.md"))
    a = p.parse_args()
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = export_random_student(workdir, a.size)
    started = dt.datetime.now(dt.timezone.utc)
    runs: dict[str, list[float]] = {}
    with LocalPacs(workdir / "pacs") as pacs:
        for study in requests.get(f"{pacs.url}/studies", auth=pacs.auth(), timeout=60).json():  # an earlier run's
            requests.delete(f"{pacs.url}/studies/{study}", auth=pacs.auth(), timeout=60).raise_for_status()
        print(f"storing {a.instances} CXRs in the PACS ...", flush=True)
        load_pacs(pacs, a.instances, a.side)
        env = {**os.environ, dicomweb.USER_ENV: pacs.auth()[0], dicomweb.PASSWORD_ENV: pacs.auth()[1],
               "KDRAY_LOG_DIR": str(workdir / "logs")}
        sides = {"plain dicomweb-client loop": lambda: plain(model, pacs, env),
                 "jobs.score": lambda: jobs_score(model, pacs, workdir, env, False),
                 "jobs.score --dicom_store (SRs stored)": lambda: jobs_score(model, pacs, workdir, env, True)}
        if a.listener:
            sides["jobs.listen, push to SR stored"] = lambda: listener(model, pacs, workdir, env, a.instances)
        for r in range(a.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in order:
                seconds = sides[name]()
                runs.setdefault(name, []).append(seconds)
                print(f"round {r + 1}: {name}: {seconds:.1f} s, {a.instances / seconds:.1f} img/s", flush=True)
        srs = srs_in(pacs)
    report(a, runs, started, srs)


def report(a, runs: dict[str, list[float]], started, srs: int) -> None:
    plain_rate = a.instances / float(np.median(runs["plain dicomweb-client loop"]))
    lines = [f"# bench/pacs.py, {started:%Y-%m-%d %H:%M} UTC", "",
             f"Machine: {machine()}; CPU flags: {cpu_flags()}.",
             f"{a.instances} real CXRs (val set, {'native 256 px' if not a.side else f'scaled to {a.side} px'}, "
             f"12-bit DX, 10 per study) in the local Orthanc; model: random-weight MobileNetV2 student at "
             f"{a.size} px, ONNX; {a.rounds} round(s), sides alternating; each a whole command, start to exit "
             f"(the listener: from the push to the last SR in Orthanc). SRs in the PACS at the end: {srs}.", "",
             "| side | seconds per round | img/s (median) | × plain |", "|---|---|---|---|"]
    for name, seconds in runs.items():
        rate = a.instances / float(np.median(seconds))
        lines.append(f"| {name} | {', '.join(f'{s:.1f}' for s in seconds)} | {rate:.1f} | {rate / plain_rate:.2f}× |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.output).write_text(text)


if __name__ == "__main__":
    main()
