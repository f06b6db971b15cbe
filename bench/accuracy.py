"""Accuracy benchmark on real chest X-rays: teacher, KD student and no-KD student, side by side.

    python bench/accuracy.py --mode quick   # about 30 minutes on a 2-core box
    python bench/accuracy.py --mode full    # the committed table; under 2 hours on a 2-core box
    python bench/accuracy.py --mode full --data ../shared/datasets/cxr --output runs/acc --results bench/results/accuracy.md

It runs the real pipeline (``kdray.pipeline.run_pipeline``) with the preset ``configs/accuracy-<mode>.yaml``:
train the teacher on train, cache its logits, distil the student, train the no-KD student with the
same recipe, select every model by val macro-F1, fit temperature scaling and the covid threshold on
val, and export the KD student with its model card. Extra ``--key value`` flags override the preset,
exactly as for ``python -m jobs.pipeline``.

The table: accuracy, macro-F1, COVID sensitivity and specificity (at the stored threshold), macro
AUC, ECE before and after temperature scaling, accuracy per source (the manifest's source_repo),
params, GFLOPs and training wall time. Everything is measured on val, which also selected the
checkpoints and fitted T and the threshold; the cross-fitted columns estimate that optimism.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import machine  # noqa: E402
from kdray import storage  # noqa: E402
from kdray.config import PipelineConfig, dump_yaml, load_config  # noqa: E402
from kdray.evaluate import format_table  # noqa: E402
from kdray.uncertainty import RESAMPLES  # noqa: E402

log = logging.getLogger("bench.accuracy")
MODES = ("quick", "full")
BENCH_FILE = "bench.json"  # in the run folder: mode, command, wall time and date, for --from-run
COLUMNS = ["model", "kd", "accuracy", "macro_f1", "covid_sensitivity", "covid_specificity", "macro_auc", "ece_before_ts",
           "ece", "image_size", "params_M", "gflops", "train_min"]
RENAME = {"kd": "KD setting", "covid_sensitivity": "COVID sens", "covid_specificity": "COVID spec", "macro_auc": "AUC",
          "ece_before_ts": "ECE (raw)", "ece": "ECE (T-scaled)", "image_size": "px", "params_M": "params (M)",
          "gflops": "GFLOPs", "train_min": "train min"}


def config_for(mode: str, data: str, output: str, overrides: list[str]) -> PipelineConfig:
    preset = ROOT / "configs" / f"accuracy-{mode}.yaml"
    return load_config(PipelineConfig, ["--config", str(preset), "--data", data, "--output", output, *overrides])


def short_source(name: str) -> str:
    """'Kermany et al. Chest X-Ray Images (Pneumonia) (copy in ...) @19a2d6' -> 'Kermany et al. Chest X-Ray Images'."""
    return name.split(" (")[0].split(" @")[0].strip() or name


def acceptance(rows: dict[str, dict]) -> list[tuple[str, bool, str]]:
    """The issue's acceptance points, checked on this run's numbers (printed, never asserted)."""
    kd, nokd, teacher = rows["student_kd"], rows["student_nokd"], rows["teacher"]
    covid = kd.get("covid_sensitivity")
    return [
        ("KD macro-F1 >= no-KD + 1 pt", kd["macro_f1"] >= nokd["macro_f1"] + 0.01,
         f"{kd['macro_f1']:.4f} vs {nokd['macro_f1']:.4f}"),
        ("KD macro-F1 within 2 pts of the teacher", kd["macro_f1"] >= teacher["macro_f1"] - 0.02,
         f"{kd['macro_f1']:.4f} vs {teacher['macro_f1']:.4f}"),
        ("KD accuracy >= 92%", kd["accuracy"] >= 0.92, f"{kd['accuracy']:.4f}"),
        ("KD COVID sensitivity >= 95% at the stored threshold", covid is not None and covid >= 0.95, f"{covid}"),
        ("KD ECE after temperature scaling <= 0.03", kd["ece"] <= 0.03, f"{kd['ece']:.4f}"),
    ]


def render(summary: dict, cfg: PipelineConfig, run: dict) -> str:
    """The Markdown report. ``run``: the bench's own record (mode, command, wall_s, date; see BENCH_FILE)."""
    mode, wall_s = run["mode"], run["wall_s"]
    rows = summary["table"]
    for r in rows:
        r["train_min"] = None if r.get("train_s") is None else r["train_s"] / 60
    sources = sorted({short_source(s) for r in rows for s in r.get("per_source_accuracy", {})})
    per_source = [{"model": r["model"], **{short_source(k): v for k, v in r.get("per_source_accuracy", {}).items()}}
                  for r in rows]
    by_name = {r["model"]: r for r in rows}
    checks = acceptance(by_name)
    calib = _calibration_rows(summary)
    lines = [
        f"# Accuracy benchmark ({mode} mode)", "",
        f"- date: {run['date']}",
        f"- machine: {machine()}",
        f"- command: `{run['command']}`",
        f"- data: {cfg.data.root} (train for training, val for selection, calibration and these numbers)",
        f"- whole run: {wall_s / 60:.1f} min wall time (teacher, logit cache, every student, calibration, "
        "evaluation, export)",
        f"- resolved config: `{summary['output']}/args.yaml`", "",
        "## Val metrics", "",
        format_table([{RENAME.get(k, k): r.get(k) for k in COLUMNS} for r in rows], [RENAME.get(c, c) for c in COLUMNS]),
        "", "COVID sensitivity/specificity use each model's stored threshold (chosen on val for "
        f"{cfg.calibrate.target_sensitivity:.0%} sensitivity after temperature scaling).", "",
        *_sweep_lines(summary),
        "## Accuracy per source (val)", "", format_table(per_source, ["model", *sources]), "",
        "## Calibration and operating point (fitted on val)", "",
        format_table(calib, ["model", "T", "ECE raw", "ECE T-scaled", "covid threshold", "cross-fitted ECE",
                             "cross-fitted COVID sens", "cross-fitted COVID spec"]), "",
        "Cross-fitted: T and the threshold fitted on one half of val and measured on the other (2 folds, "
        "averaged) - an estimate of how much fitting on val flatters the in-sample columns.", "",
        *_precision_lines(summary),
        "## Acceptance points (issue 4), checked on this run", "",
        *[f"- [{'x' if ok else ' '}] {name}: {detail}" for name, ok, detail in checks], "",
    ]
    return "\n".join(lines)


def _sweep_lines(summary: dict) -> list[str]:
    """The KD settings trained, with the val macro-F1 that selected one of them as student_kd."""
    sweep = summary.get("kd_sweep") or []
    if len(sweep) < 2:
        return []
    rows = [{"model": e["model"], "alpha": f"{e['alpha']:g}", "T": f"{e['temperature']:g}",
             "K views": e["views"], "val macro-F1 (selection)": e["val_macro_f1"],
             "selected": "yes" if e["selected"] else ""} for e in sweep]
    return ["## KD settings tried, selected on val", "",
            format_table(rows, ["model", "alpha", "T", "K views", "val macro-F1 (selection)", "selected"]), "",
            "K = 1: the clean image's teacher logits against fresh random augmentations of the student's input. "
            "K > 1: consistent teaching, the teacher's logits for the very augmented view the student sees. "
            "Selection uses each training run's best-epoch val macro-F1; the val metrics above re-evaluate those "
            "checkpoints. Picking the best of several settings on val flatters student_kd slightly.", ""]


def _precision_lines(summary: dict) -> list[str]:
    """95% bootstrap intervals over the val images, per model and for KD minus no-KD / teacher (paired)."""
    from kdray.evaluate import PREDICTIONS_FILE
    from kdray.uncertainty import aligned, metric_intervals, paired_difference

    files = {name: storage.join(summary["output"], "eval", name, PREDICTIONS_FILE) for name in summary["runs"]}
    missing = [uri for uri in files.values() if not storage.exists(uri)]
    if missing:
        log.warning("no bootstrap intervals: missing %s", ", ".join(missing))
        return []
    log.info("bootstrap intervals over the val images (%d resamples)", RESAMPLES)
    y, probs = aligned({name: storage.read_parquet(uri) for name, uri in files.items()})

    def cell(m) -> str:
        return f"{m.value:.3f} [{m.low:.3f}, {m.high:.3f}]"

    rows = [{"model": name, **{k: cell(v) for k, v in metric_intervals(y, p).items()}} for name, p in probs.items()]
    pairs = [("student_kd", "student_nokd"), ("student_kd", "teacher")]
    diffs = []
    for a, b in pairs:
        for metric in ("macro_f1", "accuracy"):
            d = paired_difference(y, probs[a], probs[b], metric)
            diffs.append({"comparison": f"{a} - {b}", "metric": metric, "difference": f"{d.difference:+.3f}",
                          "95% interval": f"[{d.low:+.3f}, {d.high:+.3f}]",
                          "resamples where A is better": f"{d.share_a_better:.0%}"})
    return ["## How precise these numbers are (bootstrap over the val images)", "",
            f"Percentile bootstrap, {RESAMPLES} resamples of the {len(y)} val images: value [95% interval]. "
            "It measures sampling noise only: val also selected the checkpoints, the KD setting, T and the "
            "threshold, which flatters the values themselves.", "",
            format_table(rows, ["model", "accuracy", "macro_f1", "ece"]), "",
            "Paired: both models scored on the same resampled images.", "",
            format_table(diffs, ["comparison", "metric", "difference", "95% interval", "resamples where A is better"]),
            ""]


def _calibration_rows(summary: dict) -> list[dict]:
    from kdray.checkpoints import read_checkpoint_meta

    out = []
    for name, run in summary["runs"].items():
        c = read_checkpoint_meta(run["best_checkpoint"]).calibration or {}
        crossed = c.get("cross_fitted") or {}
        out.append({"model": name, "T": c.get("temperature"), "ECE raw": c.get("ece_before"),
                    "ECE T-scaled": c.get("ece_after"), "covid threshold": c.get("covid_threshold"),
                    "cross-fitted ECE": crossed.get("ece_after"), "cross-fitted COVID sens": crossed.get("sensitivity"),
                    "cross-fitted COVID spec": crossed.get("specificity")})
    return out


def main(argv: list[str] | None = None) -> dict:
    from kdray.pipeline import run_pipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=MODES, default="quick")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cxr"))
    p.add_argument("--output", default="", help="run folder (default runs/accuracy-<mode>-<time>)")
    p.add_argument("--results", default="", help="also write the Markdown report here")
    p.add_argument("--from-run", default="", metavar="RUN",
                   help="train nothing: render the report of a finished benchmark run folder again")
    args, overrides = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    if args.from_run:
        return _write(rerender(args.from_run), args.from_run, args.results)
    if not os.path.isdir(args.data) and not args.data.startswith("s3://"):
        raise SystemExit(f"error: {args.data}: no such data folder (pass --data ROOT)")
    output = args.output or str(ROOT / "runs" / f"accuracy-{args.mode}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg = config_for(args.mode, args.data, output, overrides)
    log.info("accuracy benchmark, %s mode:\n%s", args.mode, dump_yaml(cfg))
    started = time.time()
    summary = run_pipeline(cfg, args.data, output).model_dump(mode="json")  # as summary.json holds it
    wall = time.time() - started
    run = {"mode": args.mode, "wall_s": round(wall, 1), "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
           "command": "python bench/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    storage.write_json(storage.join(output, BENCH_FILE), run)
    _write(render(summary, cfg, run), output, args.results)
    print(json.dumps({"wall_s": run["wall_s"], "output": output}))
    return summary


def rerender(run_folder: str) -> str:
    """The report of a finished run, from its summary.json, args.yaml and bench.json."""
    summary = storage.read_json(storage.join(run_folder, "summary.json"))
    cfg = load_config(PipelineConfig, ["--config", storage.join(run_folder, "args.yaml")])
    bench = storage.join(run_folder, BENCH_FILE)
    if not storage.exists(bench):
        raise SystemExit(f"error: {run_folder}: no {BENCH_FILE}; is it a bench/accuracy.py run folder?")
    return render(summary, cfg, storage.read_json(bench))


def _write(report: str, output: str, results: str) -> None:
    print(report)
    if not output.startswith("s3://"):
        Path(output, "accuracy.md").write_text(report)
    if results:
        Path(results).parent.mkdir(parents=True, exist_ok=True)
        Path(results).write_text(report)
        print(f"wrote {results}")


if __name__ == "__main__":
    main()
