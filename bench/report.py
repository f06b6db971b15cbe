"""How long ``report.html`` takes to build, how large it is, and how fast a browser opens it.

    python bench/report.py [--synthetic 20000] [--output FINISHED_SCORING_RUN] [--loads 5]

With ``--output`` (a finished ``jobs.score`` run, local), :func:`kdray.report.write_report` rebuilds that run's
page in place from its ``summary.json`` and ``plan.json``. Otherwise a synthetic run of ``--synthetic`` rows is
built in a temporary folder: 16 prediction parts, about 2% refusals over four reasons, a Study Instance UID on
half the rows (four images per study), about 5% covid suspects, 500 of them explained with real 224-px Grad-CAM
style overlays (:func:`kdray.explain.overlay_png` over a demo chest X-ray and a smooth heat map). Printed: the
build time (median of 3), the page size, and the page's load time in headless Chromium through file://
(``performance.timing``: loadEventEnd - navigationStart; median of ``--loads``), with the CPU model and flags.
Prints only; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import cpu_flags, cpu_model  # noqa: E402
from cluster.local.demo_data import CLASSES, make_image  # noqa: E402
from kdray import storage  # noqa: E402
from kdray.report import write_report  # noqa: E402
from kdray.schemas import ScoreSummary, parse  # noqa: E402
from kdray.score import PLAN_FILE, SUMMARY_FILE  # noqa: E402
from kdray.shard_scorer import ERRORS_DIR, PREDICTIONS_DIR, explanation_path  # noqa: E402

PARTS, EXPLAINED, THRESHOLD, SIDE = 16, 500, 0.6, 224
REASONS = ("not_an_image", "truncated", "too_small", "wrong_modality")


def overlay(rng: np.random.Generator) -> bytes:
    """A Grad-CAM-like overlay: a smooth blob of heat over a demo chest X-ray."""
    from kdray.explain import overlay_png  # torch loads only here

    yy, xx = np.mgrid[0:SIDE, 0:SIDE] / SIDE
    cy, cx = rng.uniform(0.3, 0.7, 2)
    heat = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02).astype(np.float32)
    return overlay_png(make_image("covid", SIDE, rng), heat)


def synthetic_run(root: Path, n: int, seed: int = 0) -> tuple[str, ScoreSummary, str]:
    """A finished run's files (predictions, errors, overlays) and its summary; returns (output, summary, base)."""
    rng = np.random.default_rng(seed)
    base, out = f"{root}/in", storage.resolve(str(root / "out"))
    refused = rng.random(n) < 0.02
    suspect = rng.random(n) < 0.05
    p_covid = np.where(suspect, rng.uniform(THRESHOLD, 1.0, n), rng.beta(1, 8, n) * THRESHOLD)
    rest = rng.dirichlet((1, 1), n) * (1 - p_covid)[:, None]
    candidates = np.flatnonzero(suspect & ~refused)
    explained = set(rng.choice(candidates, min(EXPLAINED, len(candidates)), replace=False).tolist())
    reasons: dict[str, int] = {}
    for shard, rows in enumerate(np.array_split(np.arange(n), PARTS)):
        part = f"part-{shard:05d}"
        paths = [f"{base}/site{i % 7}/patient{i // 4:06d}/{i:06d}.png" for i in rows]
        good = [k for k, i in enumerate(rows) if not refused[i]]
        scored = rows[good]
        overlays = []
        for k in good:
            relative = explanation_path(part, paths[k]) if rows[k] in explained else None
            if relative:
                storage.write_bytes(out.join(*relative.split("/")), overlay(rng))
            overlays.append(relative)
        probs = np.column_stack([p_covid[scored], rest[scored]])
        table = {"path": [paths[k] for k in good], "label": [CLASSES[j] for j in probs.argmax(1)]}
        table.update({f"p_{c}": pa.array(probs[:, j], pa.float32()) for j, c in enumerate(CLASSES)})
        table.update(covid_suspect=suspect[scored], model_id=["kdray-student:bench:int8"] * len(good),
                     study_uid=pa.array([f"1.2.826.0.1.{i // 4}" if i % 8 < 4 else None for i in scored], pa.string()),
                     explanation=pa.array(overlays, pa.string()))
        storage.write_parquet(out.join(PREDICTIONS_DIR, f"{part}.parquet"), pa.table(table))
        errors = [(paths[k], REASONS[int(i) % len(REASONS)]) for k, i in enumerate(rows) if refused[i]]
        for _, reason in errors:
            reasons[reason] = reasons.get(reason, 0) + 1
        storage.write_parquet(out.join(ERRORS_DIR, f"{part}.parquet"), pa.table({
            "path": [p for p, _ in errors], "reason": [r for _, r in errors], "message": ["synthetic"] * len(errors)}))
    summary = ScoreSummary(
        model=str(root / "model"), input=base, output=out.uri, kind="folder", backend="onnx-int8", engine="local",
        images=n, scored=int(n - refused.sum()), explained=len(explained), explain="covid_suspect",
        errors=int(refused.sum()), errors_by_reason=dict(sorted(reasons.items())), hidden_skipped=0,
        manifest_duplicates=0, roots=[base], shards=PARTS, shards_resumed=0, images_this_run=n, nodes=1,
        wall_s=100.0, img_per_s=n / 100.0, steady_img_per_s=None)
    return out.uri, summary, base


def finished_run(output: str) -> tuple[str, ScoreSummary, str]:
    summary = parse(ScoreSummary, storage.read_json(storage.join(output, SUMMARY_FILE)), SUMMARY_FILE)
    return output, summary, storage.read_json(storage.join(output, PLAN_FILE)).get("base", "")


def load_times_ms(page: Path, loads: int) -> list[float]:
    """Each load's loadEventEnd - navigationStart in headless Chromium, through file://."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        times = []
        for _ in range(loads):
            driver.get("about:blank")
            driver.get(page.resolve().as_uri())  # (returns once the load event has fired)
            times.append(float(driver.execute_script(
                "const t = performance.timing; return t.loadEventEnd - t.navigationStart;")))
        return times
    finally:
        driver.quit()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="", help="a finished scoring run (local) instead of a synthetic one")
    p.add_argument("--synthetic", type=int, default=20000, help="rows of the synthetic run")
    p.add_argument("--loads", type=int, default=5)
    args = p.parse_args(argv)
    print(f"CPU: {cpu_model()}; flags: {cpu_flags()}")
    with tempfile.TemporaryDirectory(prefix="kdray-report-") as tmp:
        started = time.perf_counter()
        output, summary, base = finished_run(args.output) if args.output else synthetic_run(Path(tmp), args.synthetic)
        if not args.output:
            print(f"synthetic run of {args.synthetic} rows built in {time.perf_counter() - started:.1f} s")
        threshold = THRESHOLD if not args.output else None  # (a finished run's comes from its model)
        builds = []
        for _ in range(3):
            started = time.perf_counter()
            uri = write_report(output, summary, base, threshold)
            builds.append(time.perf_counter() - started)
        page = Path(uri)
        size_kb = page.stat().st_size / 1024
        loads = load_times_ms(page, args.loads)
    result = {"rows": summary.images, "build_s": statistics.median(builds), "size_kb": size_kb,
              "load_ms": statistics.median(loads)}
    print(f"write_report: median {result['build_s']:.3f} s of 3 ({', '.join(f'{b:.3f}' for b in builds)}) for "
          f"{summary.images} rows; report.html {size_kb:.1f} kB\n"
          f"Chromium load (file://): median {result['load_ms']:.0f} ms of {len(loads)} "
          f"({', '.join(f'{t:.0f}' for t in loads)})")
    return result


if __name__ == "__main__":
    main()
