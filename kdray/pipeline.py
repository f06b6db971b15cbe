"""The whole pipeline, end to end: data → teacher → logit cache → students (KD and no-KD) → evaluation
→ export → Serve (one real HTTP request) → offline scoring → summary table.

The data and the output are given: the entry point (jobs.pipeline) chooses them, and for its embedded
default starts the local S3 and generates the data before calling :func:`run_pipeline`. The Ray it starts
is shut down at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable

from kdray import logit_cache, storage
from kdray.calibrate import calibrate_checkpoint
from kdray.checkpoints import RESULT_FILE, read_checkpoint_meta, read_run_summary, resolve_checkpoint
from kdray.config import PipelineConfig, dump_yaml
from kdray.data import list_split, sample_images
from kdray.evaluate import evaluate_model, split_logits
from kdray.export import export_student
from kdray.models import build_model, model_cost
from kdray.predictor import load_predictor, measure_throughput, model_info
from kdray.raycluster import free_loopback_port, init_ray
from kdray.schemas import ModelCard, RunSummary
from kdray.score import score_archive
from kdray.train import METRIC, fit, load_training_data

#: Deploys an export with Ray Serve and returns its base URL: ``deploy(model_dir, port=...)``.
#: The entry point (jobs.pipeline) hands in ``serve.app.deploy``; the library never imports serve/.
DeployFn = Callable[..., str]

log = logging.getLogger(__name__)
SUMMARY_COLUMNS = ["model", "accuracy", "macro_f1", "covid_sensitivity", "params_M", "gflops", "img_per_s",
                   "runtime", "train_s"]


def run_pipeline(cfg: PipelineConfig, data: str, out: str, deploy: DeployFn | None = None) -> dict:
    """Run every stage on the data root ``data``, writing under ``out``; ``deploy`` (Ray Serve) is needed when
    ``demo.serve`` is on. ``cfg`` is left as it was: the stages get a copy that names ``data`` and ``out``."""
    import ray

    if cfg.demo.serve and deploy is None:
        raise ValueError("run_pipeline: demo.serve is on but no deploy function was given")
    started = time.time()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=data),
                              run=dataclasses.replace(cfg.run, output=out))
    storage.makedirs(out)
    storage.write_text(storage.join(out, "args.yaml"), dump_yaml(cfg))
    log.info("pipeline: data %s → outputs %s", data, out)
    init_ray()
    try:
        summary = _stages(cfg, data, out, deploy)
    finally:
        _stop_serve()
        ray.shutdown()
    summary["wall_s"] = round(time.time() - started, 1)
    storage.write_json(storage.join(out, "summary.json"), summary)
    return summary


def _stages(cfg: PipelineConfig, data: str, out: str, deploy: DeployFn | None) -> dict:
    tiny = "tiny-" if cfg.teacher.model.name.startswith("tiny_") else ""
    stage = _StageCounter(8)
    stage("train the ResNet50V2+VGG19 teacher" if not cfg.teacher_run else f"reuse the teacher {cfg.teacher_run}")
    teacher = (existing_run(cfg.teacher_run) if cfg.teacher_run
               else fit(cfg.stage("teacher", 0.0, f"{tiny}teacher-resnet50v2-vgg19")))
    _log_run("teacher", teacher)
    stage("cache the teacher's logits (Parquet)")
    listing = list_split(data, cfg.data.train_split, cfg.data.classes, cfg.data.limit)
    settings = cfg.kd_settings()
    cache_uri, reused = logit_cache.build(teacher.best_checkpoint, listing, cfg.image_size("teacher"), out,
                                          max(kd.views for kd in settings), cfg.augment)
    log.info("logit cache %s: %s", cache_uri, "reused" if reused else "built")
    stage("distil the MobileNetV2 student from the cached logits")
    sweep = _train_kd_students(cfg, settings, cache_uri, f"{tiny}mobilenetv2_from_resnet50v2-vgg19")
    stage("train the no-KD student (the baseline)")
    nokd = fit(cfg.stage("student", 0.0, f"{tiny}mobilenetv2-nokd"))
    _log_run("student_nokd", nokd)
    kd = next(entry["summary"] for entry in sweep if entry["selected"])
    runs = {"teacher": teacher, "student_kd": kd, "student_nokd": nokd,
            **{entry["model"]: entry["summary"] for entry in sweep if not entry["selected"]}}
    stage(f"calibrate and evaluate {len(runs)} models on {cfg.data.val_split}")
    metrics = {name: _calibrate_and_evaluate(r.best_checkpoint, data, cfg, storage.join(out, "eval", name), name)
               for name, r in runs.items()}
    served_model = kd.best_checkpoint
    export = None
    if cfg.demo.export:
        stage("export the KD student: ONNX fp32 + int8, parity, served operating point")
        served_model = storage.join(out, "export", "student")
        export = _export(kd.best_checkpoint, data, cfg, served_model)
    if cfg.demo.serve:
        stage("serve it with Ray Serve and send one request")
    reply = _serve_once(deploy, served_model, data, cfg) if cfg.demo.serve else None
    scored = None
    if cfg.demo.score:
        stage(f"score the {cfg.data.val_split} images offline (Ray Data)")
        scored = score_archive(served_model, storage.join(data, cfg.data.val_split), storage.join(out, "score"))
    rows = _summary_rows(runs, metrics, served_model, data, cfg)
    for entry in sweep:
        row = next(r for r in rows if r["model"] == entry["model"])
        row["kd"] = f"alpha={entry['alpha']:g} T={entry['temperature']:g} K={entry['views']}"
    return {"data": data, "output": out, "logit_cache": cache_uri, "logit_cache_reused": reused,
            "runs": {k: {"run": v.run_uri, "best_checkpoint": v.best_checkpoint, "train_s": v.wall_s}
                     for k, v in runs.items()},
            "kd_sweep": [{k: v for k, v in entry.items() if k != "summary"} for entry in sweep],
            "table": rows, "export": export.model_dump(mode="json") if export else None, "serve_reply": reply,
            "score": scored.model_dump(mode="json") if scored else None}


class _StageCounter:
    """Numbered stage headers on the console: ``[3/8] distil the student``."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def __call__(self, what: str) -> None:
        self.done += 1
        log.info("[%d/%d] %s", self.done, self.total, what)


def _log_run(name: str, run: RunSummary) -> None:
    f1 = run.best_metrics.get(METRIC)
    log.info("%s: best val macro-F1 %s%s", name, f"{f1:.4f}" if isinstance(f1, float) else f1,
             f" in {run.wall_s:.0f} s" if run.wall_s else "")


def _train_kd_students(cfg: PipelineConfig, settings: list, cache_uri: str, name: str) -> list[dict]:
    """Distil one student per KD setting and select the best by its val macro-F1 (T, alpha and K chosen on val)."""
    sweep = []
    for kd in settings:
        tag = f"a{kd.alpha:g}-t{kd.temperature:g}-k{kd.views}"
        stage = cfg.stage("student", kd.alpha, name if len(settings) == 1 else f"{name}-{tag}", cache_uri, kd)
        summary = fit(stage, logit_cache.with_teacher_logits(load_training_data(stage), stage.kd))
        sweep.append({"label": f"student_kd_{tag}", "alpha": kd.alpha, "temperature": kd.temperature,
                      "views": kd.views, "val_macro_f1": summary.best_metrics.get(METRIC), "summary": summary})
    best = max(sweep, key=lambda entry: entry["val_macro_f1"] or -1.0)
    _log_run("student_kd", best["summary"])
    for entry in sweep:
        entry["selected"] = entry is best
        entry["model"] = "student_kd" if entry["selected"] else entry["label"]  # its name in runs and the table
    if len(sweep) > 1:
        log.info("KD settings on val macro-F1: %s; selected alpha=%g T=%g K=%d",
                 ", ".join(f"{e['label']}={e['val_macro_f1']:.4f}" for e in sweep), best["alpha"],
                 best["temperature"], best["views"])
    return sweep


def _calibrate_and_evaluate(checkpoint: str, data: str, cfg: PipelineConfig, output: str, name: str) -> dict:
    """Calibrate (if on) and evaluate one model, running it over val once when both use val."""
    val = split_logits(checkpoint, data, cfg.data.val_split, backend="torch", limit=cfg.data.limit)
    if cfg.calibrate.enabled:
        same_split = cfg.calibrate.split == cfg.data.val_split
        calibrate_checkpoint(checkpoint, data, cfg.calibrate.split, cfg.calibrate.target_sensitivity,
                             cfg.data.limit, logits=val if same_split else None)
        val["info"] = model_info(checkpoint)  # now with the fitted temperature and covid threshold
    return evaluate_model(checkpoint, data, cfg.data.val_split, output, name=name, limit=cfg.data.limit, logits=val)


def existing_run(uri: str) -> RunSummary:
    """The summary of a finished training run (or a bare checkpoint), to start the pipeline from it."""
    if storage.exists(storage.join(uri, RESULT_FILE)):
        return read_run_summary(uri)
    meta = read_checkpoint_meta(uri)
    cost = model_cost(build_model(meta.model_name, len(meta.classes)), meta.image_size)
    return RunSummary(run_name=os.path.basename(uri.rstrip("/")), run_uri=uri, best_checkpoint=resolve_checkpoint(uri),
                      cost=cost, model_name=meta.model_name, classes=meta.classes)


def _export(checkpoint: str, data: str, cfg: PipelineConfig, output: str) -> ModelCard:
    size = cfg.image_size("student")
    calib, _ = sample_images(data, cfg.data.train_split, size, 64)
    val_images, val_labels = sample_images(data, cfg.data.val_split, size, 0)  # all of val
    return export_student(checkpoint, output, calib, val_images, val_labels, strict=False,  # int8 failing → fp32
                          target_sensitivity=cfg.calibrate.target_sensitivity, split=cfg.data.val_split)


def _serve_once(deploy: DeployFn, model: str, data: str, cfg: PipelineConfig) -> dict:
    """Deploy the student with Ray Serve and answer one real HTTP request with a validation image."""
    import requests

    url = deploy(model, port=cfg.demo.serve_port or free_loopback_port())
    listing = list_split(data, cfg.data.val_split, cfg.data.classes, 1)
    image = storage.read_bytes(storage.Location(listing.fs, listing.paths[0], listing.paths[0]))
    reply = requests.post(f"{url}/predict", files={"file": ("xray.png", image, "image/png")}, timeout=60)
    reply.raise_for_status()
    answer = reply.json()
    log.info("Serve answered POST %s/predict for %s (true label %s): %s", url, listing.image_ids[0],
             listing.classes[listing.labels[0]], answer)
    _stop_serve()
    return {"url": url, "image": listing.image_ids[0], "true_label": listing.classes[listing.labels[0]],
            "response": answer}


def _stop_serve() -> None:
    with contextlib.suppress(Exception):
        from ray import serve

        serve.shutdown()


def _summary_rows(runs: dict, metrics: dict, served_model: str, data: str, cfg: PipelineConfig) -> list[dict]:
    rows = []
    for name, run in runs.items():
        m = metrics[name]
        model = served_model if name == "student_kd" else run.best_checkpoint
        predictor = load_predictor(model, threads=os.cpu_count())
        images, _ = sample_images(data, cfg.data.val_split, predictor.image_size, 64)
        covid = m.get("covid") or {}
        rows.append({"model": name, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                     "covid_sensitivity": covid.get("sensitivity"), "covid_specificity": covid.get("specificity"),
                     "covid_threshold": covid.get("threshold"), "macro_auc": m.get("macro_auc"),
                     "ece_before_ts": m.get("ece_uncalibrated"), "ece": m.get("ece"),
                     "per_source_accuracy": {k: v["accuracy"] for k, v in (m.get("per_source") or {}).items()},
                     "image_size": predictor.image_size, "params_M": run.cost["params"] / 1e6,
                     "gflops": run.cost["gflops"], "img_per_s": measure_throughput(predictor, images),
                     "runtime": predictor.backend, "train_s": run.wall_s})
    return rows
