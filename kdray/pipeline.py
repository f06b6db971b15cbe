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
from kdray.calibrate import calibrate_checkpoint, calibrate_on_logits
from kdray.checkpoints import RESULT_FILE, read_checkpoint_meta, read_run_summary, resolve_checkpoint
from kdray.config import PipelineConfig, dump_yaml
from kdray.data import Listing, TrainingData, TrainingSplits, list_training_splits, take_images
from kdray.evaluate import decoded_logits, evaluate_logits
from kdray.export import export_student, pinned_reference
from kdray.models import build_model, model_cost
from kdray.predictor import load_predictor, measure_throughput, model_info
from kdray.raycluster import free_loopback_port, init_ray
from kdray.schemas import Evaluation, KDSweepEntry, ModelCard, PipelineSummary, RunSummary, ServeReply, SummaryRow, TrainedRun
from kdray.score import score_archive
from kdray.train import METRIC, fit

#: Deploys an export with Ray Serve and returns its base URL: ``deploy(model_dir, port=...)``.
#: The entry point (jobs.pipeline) hands in ``serve.app.deploy``; the library never imports serve/.
DeployFn = Callable[..., str]

log = logging.getLogger(__name__)
SUMMARY_COLUMNS = ["model", "accuracy", "macro_f1", "covid_sensitivity", "params_M", "gflops", "img_per_s",
                   "runtime", "train_s"]


def run_pipeline(cfg: PipelineConfig, data: str, out: str, deploy: DeployFn | None = None) -> PipelineSummary:
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
        summary = _stages(cfg, TrainingSplits(*list_training_splits(cfg.data), cfg.run.seed), out, deploy)
    finally:
        _stop_serve()
        ray.shutdown()
    summary = summary.model_copy(update={"wall_s": round(time.time() - started, 1)})
    storage.write_json(storage.join(out, "summary.json"), summary.model_dump(mode="json"))
    return summary


def _stages(cfg: PipelineConfig, splits: TrainingSplits, out: str, deploy: DeployFn | None) -> PipelineSummary:
    """The stages in order; every one reads the splits listed once and decoded once per image size."""
    tiny = "tiny-" if cfg.teacher.model.name.startswith("tiny_") else ""
    stage = _StageCounter(8)
    stage("train the ResNet50V2+VGG19 teacher" if not cfg.teacher_run else f"reuse the teacher {cfg.teacher_run}")
    teacher_data = splits.at(cfg.image_size("teacher"))
    teacher = (existing_run(cfg.teacher_run) if cfg.teacher_run
               else fit(cfg.stage("teacher", 0.0, f"{tiny}teacher-resnet50v2-vgg19"), teacher_data))
    _log_run("teacher", teacher)
    stage("cache the teacher's logits (Parquet)")
    settings = cfg.kd_settings()
    cache_uri, reused = logit_cache.build(teacher.best_checkpoint, splits.train_listing, teacher_data.image_size, out,
                                          max(kd.views for kd in settings), cfg.augment,
                                          decoded=(teacher_data.train, teacher_data.skipped_train))
    log.info("logit cache %s: %s", cache_uri, "reused" if reused else "built")
    stage("distil the MobileNetV2 student from the cached logits")
    student_data = splits.at(cfg.image_size("student"))
    sweep, students = _train_kd_students(cfg, settings, cache_uri, f"{tiny}mobilenetv2_from_resnet50v2-vgg19",
                                         student_data)
    stage("train the no-KD student (the baseline)")
    nokd = fit(cfg.stage("student", 0.0, f"{tiny}mobilenetv2-nokd"), student_data)
    _log_run("student_nokd", nokd)
    kd = next(students[entry.model] for entry in sweep if entry.selected)
    runs = {"teacher": teacher, "student_kd": kd, "student_nokd": nokd,
            **{entry.model: students[entry.model] for entry in sweep if not entry.selected}}
    stage(f"calibrate and evaluate {len(runs)} models on {cfg.data.val_split}")
    metrics = {name: _calibrate_and_evaluate(r.best_checkpoint, splits, cfg, storage.join(out, "eval", name), name)
               for name, r in runs.items()}
    served_model = kd.best_checkpoint
    export = None
    if cfg.demo.export:
        stage("export the KD student: ONNX fp32 + int8, parity, served operating point")
        export_dir = storage.join(out, "export", "student")
        export = _export(kd.best_checkpoint, student_data, cfg.calibrate.target_sensitivity, export_dir)
        served_model = pinned_reference(export_dir, export)  # served and scored as written, nothing swapped in
    if cfg.demo.serve:
        stage("serve it with Ray Serve and send one request")
    reply = _serve_once(deploy, served_model, splits.val_listing, cfg.demo.serve_port) if cfg.demo.serve else None
    scored = None
    if cfg.demo.score:
        stage(f"score the {cfg.data.val_split} images offline (Ray Data)")
        scored = score_archive(served_model, storage.join(cfg.data.root, cfg.data.val_split), storage.join(out, "score"))
    settings_of = {entry.model: f"alpha={entry.alpha:g} T={entry.temperature:g} K={entry.views}" for entry in sweep}
    rows = [_summary_row(name, run, metrics[name], served_model if name == "student_kd" else run.best_checkpoint,
                         splits, settings_of.get(name)) for name, run in runs.items()]
    return PipelineSummary(
        data=cfg.data.root, output=out, logit_cache=cache_uri, logit_cache_reused=reused,
        runs={k: TrainedRun(run=v.run_uri, best_checkpoint=v.best_checkpoint, train_s=v.wall_s) for k, v in runs.items()},
        kd_sweep=sweep, table=rows, export=export, serve_reply=reply, score=scored)


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


def _train_kd_students(cfg: PipelineConfig, settings: list, cache_uri: str, name: str,
                       data: TrainingData) -> tuple[list[KDSweepEntry], dict[str, RunSummary]]:
    """Distil one student per KD setting and select the best by its val macro-F1 (T, alpha and K chosen on val).

    Returns the sweep entries and each student's run, keyed by the entry's ``model`` name."""
    trained = []
    for kd in settings:
        tag = f"a{kd.alpha:g}-t{kd.temperature:g}-k{kd.views}"
        stage = cfg.stage("student", kd.alpha, name if len(settings) == 1 else f"{name}-{tag}", cache_uri, kd)
        trained.append((f"student_kd_{tag}", kd, fit(stage, logit_cache.with_teacher_logits(data, stage.kd))))
    best = max(trained, key=lambda item: item[2].best_metrics.get(METRIC) or -1.0)
    _log_run("student_kd", best[2])
    sweep, students = [], {}
    for item in trained:
        label, kd, summary = item
        model = "student_kd" if item is best else label  # its name in runs and the table
        sweep.append(KDSweepEntry(label=label, model=model, alpha=kd.alpha, temperature=kd.temperature,
                                  views=kd.views, val_macro_f1=summary.best_metrics.get(METRIC),
                                  selected=item is best))
        students[model] = summary
    if len(sweep) > 1:
        chosen = best[1]
        log.info("KD settings on val macro-F1: %s; selected alpha=%g T=%g K=%d",
                 ", ".join(f"{e.label}={e.val_macro_f1:.4f}" for e in sweep), chosen.alpha, chosen.temperature,
                 chosen.views)
    return sweep, students


def _calibrate_and_evaluate(checkpoint: str, splits: TrainingSplits, cfg: PipelineConfig, output: str,
                            name: str) -> Evaluation:
    """Calibrate (if on) and evaluate one model, running it over the decoded val split once for both."""
    info = model_info(checkpoint, "torch")
    data = splits.at(info.image_size)
    val = decoded_logits(checkpoint, data.val_listing, data.val, data.skipped_val, "torch", info=info)
    if cfg.calibrate.enabled:
        if cfg.calibrate.split == cfg.data.val_split:
            calibrate_on_logits(checkpoint, val, cfg.calibrate.target_sensitivity)
        else:
            calibrate_checkpoint(checkpoint, cfg.data.root, cfg.calibrate.split, cfg.calibrate.target_sensitivity,
                                 cfg.data.limit)
        val = dataclasses.replace(val, info=model_info(checkpoint))  # now with the fitted T and covid threshold
    return evaluate_logits(checkpoint, val, output, name)


def existing_run(uri: str) -> RunSummary:
    """The summary of a finished training run (or a bare checkpoint), to start the pipeline from it."""
    if storage.exists(storage.join(uri, RESULT_FILE)):
        return read_run_summary(uri)
    meta = read_checkpoint_meta(uri)
    cost = model_cost(build_model(meta.model_name, len(meta.classes)), meta.image_size)
    return RunSummary(run_name=os.path.basename(uri.rstrip("/")), run_uri=uri, best_checkpoint=resolve_checkpoint(uri),
                      cost=cost, model_name=meta.model_name, classes=meta.classes)


def _export(checkpoint: str, data: TrainingData, target_sensitivity: float, output: str) -> ModelCard:
    calib, _ = take_images(data.train, 64)  # the train split is decoded shuffled: a sample
    val_images, val_labels = take_images(data.val)  # all of val
    return export_student(checkpoint, output, calib, val_images, val_labels, strict=False,  # int8 failing → fp32
                          target_sensitivity=target_sensitivity, split=data.val_listing.split)


def _serve_once(deploy: DeployFn, model: str, val: Listing, port: int) -> ServeReply:
    """Deploy the student with Ray Serve and answer one real HTTP request with a validation image."""
    import requests

    url = deploy(model, port=port or free_loopback_port())
    image = storage.read_bytes(storage.Location(val.fs, val.paths[0], val.paths[0]))
    reply = requests.post(f"{url}/predict", files={"file": ("xray.png", image, "image/png")}, timeout=60)
    reply.raise_for_status()
    answer = ServeReply(url=url, image=val.image_ids[0], true_label=val.classes[val.labels[0]], response=reply.json())
    log.info("Serve answered POST %s/predict for %s (true label %s): %s", url, answer.image, answer.true_label,
             answer.response)
    _stop_serve()
    return answer


def _stop_serve() -> None:
    with contextlib.suppress(Exception):
        from ray import serve

        serve.shutdown()


def _summary_row(name: str, run: RunSummary, m: Evaluation, model: str, splits: TrainingSplits,
                 kd_setting: str | None) -> SummaryRow:
    predictor = load_predictor(model, threads=os.cpu_count())
    images, _ = take_images(splits.at(predictor.image_size).val, 64)
    covid = m.covid  # None without a covid class; then the row's covid numbers are None too
    return SummaryRow(
        model=name, accuracy=m.accuracy, macro_f1=m.macro_f1, covid_sensitivity=covid and covid.sensitivity,
        covid_specificity=covid and covid.specificity, covid_threshold=covid and covid.threshold,
        macro_auc=m.macro_auc, ece_before_ts=m.ece_uncalibrated, ece=m.ece,
        per_source_accuracy={k: v.accuracy for k, v in (m.per_source or {}).items()},
        image_size=predictor.image_size, params_M=run.cost.params / 1e6, gflops=run.cost.gflops,
        img_per_s=measure_throughput(predictor, images), runtime=predictor.backend, train_s=run.wall_s, kd=kd_setting)
