"""Config errors surface when the config is loaded, before anything starts: one line that names the key.

The first half calls ``load_config`` directly; the second runs the real job entry points in a subprocess,
with ``ray.init`` and the local S3 server replaced by tripwires, and checks exit code 2, a one-line
``error: ...`` and that neither Ray nor S3 was started.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kdray import KdrayError
from kdray.config import (
    CacheJobConfig, CalibrateJobConfig, EvalJobConfig, ExplainJobConfig, ExportJobConfig, MakeDataJobConfig,
    PipelineConfig, PredictJobConfig, ScoreJobConfig, TrainJobConfig, load_config,
)


REPO = Path(__file__).resolve().parents[1]

T, P = TrainJobConfig, PipelineConfig

# (config class, flags, YAML file text or None, a key the message must name, a regex the message must match)
CASES = [
    # wrong enum value
    pytest.param(T, ["--run.use_gpu", "maybe"], None, "run.use_gpu",
                 r"^config key run\.use_gpu: must be 'auto' or a valid boolean, got 'maybe'$", id="enum-flag-use_gpu"),
    pytest.param(T, ["--optimizer", "adam"], None, "optim.optimizer",
                 r"must be 'adamw' or 'sgd', got 'adam'$", id="enum-flag-optimizer"),
    pytest.param(P, ["--student.model.name", "resnet"], None, "student.model.name",
                 r"must be 'teacher', 'student', 'tiny_teacher' or 'tiny_student', got 'resnet'$",
                 id="enum-flag-model-name"),
    pytest.param(EvalJobConfig, ["--model", "m", "--backend", "onnx"], None, "config key backend",
                 r"must be 'auto', 'torch', 'onnx-fp32' or 'onnx-int8', got 'onnx'$", id="enum-flag-eval-backend"),
    pytest.param(ScoreJobConfig, ["--model", "m", "--input", "i", "--output", "o", "--backend", "tensorrt"], None,
                 "config key backend", r"got 'tensorrt'$", id="enum-flag-score-backend"),
    pytest.param(ScoreJobConfig, ["--model", "m", "--input", "i", "--output", "o", "--engine", "spark"], None,
                 "config key engine", r"must be 'auto', 'local' or 'ray'", id="enum-flag-score-engine"),
    pytest.param(T, [], "run:\n  use_gpu: maybe\n", "run.use_gpu", r"must be 'auto' or a valid boolean",
                 id="enum-yaml-use_gpu"),
    pytest.param(T, [], "run:\n  use_gpu: 2\n", "run.use_gpu", r"must be 'auto' or a valid boolean, got 2$",
                 id="enum-yaml-use_gpu-int"),
    pytest.param(T, [], "optim:\n  optimizer: [adamw]\n", "optim.optimizer", r"must be 'adamw' or 'sgd', got \['adamw'\]",
                 id="enum-yaml-list"),
    pytest.param(T, [], "optim:\n  optimizer: SGD\n", "optim.optimizer", r"got 'SGD'$", id="enum-yaml-case"),
    # wrong type
    pytest.param(T, ["--data.image_size", "abc"], None, "data.image_size",
                 r"^config key data\.image_size: must be a valid integer, got 'abc'$", id="type-flag-int"),
    pytest.param(P, ["--teacher.optim.epochs", "abc"], None, "teacher.optim.epochs", r"must be a valid integer",
                 id="type-flag-nested-int"),
    pytest.param(T, ["--lr", "fast"], None, "optim.lr", r"must be a valid number, got 'fast'", id="type-flag-float"),
    pytest.param(T, ["--class_balance", "maybe"], None, "optim.class_balance", r"must be a valid boolean, got 'maybe'",
                 id="type-flag-bool"),
    pytest.param(PredictJobConfig, ["a.png", "--model", "m", "--threads", "two"], None, "config key threads",
                 r"must be a valid integer", id="type-flag-optional-int"),
    pytest.param(T, [], "data: 5\n", "config key data",
                 r"^config key data: expected a section \(keys: root, train_split, .*\), got 5$",
                 id="type-yaml-section-as-scalar"),
    pytest.param(T, ["--data.image_size", "32"], "data: 5\n", "config key data",
                 r"^config key data: expected a section \(key: value mapping\), got 5$",
                 id="type-yaml-section-as-scalar-then-flag"),
    pytest.param(P, [], "teacher:\n  optim: fast\n", "teacher.optim",
                 r"^config key teacher\.optim: expected a section \(keys: optimizer, lr, .*\), got 'fast'$",
                 id="type-yaml-nested-section-as-scalar"),
    pytest.param(T, [], "optim: [1, 2]\n", "config key optim", r"expected a section", id="type-yaml-section-as-list"),
    pytest.param(T, [], "optim:\n  lr: [0.1, 0.2]\n", "optim.lr", r"must be a valid number, got \[0\.1, 0\.2\]",
                 id="type-yaml-list-for-scalar"),
    pytest.param(T, [], "optim:\n  epochs: true\n", "optim.epochs", r"a bool is not a number, got True",
                 id="type-yaml-bool-for-int"),
    pytest.param(T, [], "optim:\n  lr: false\n", "optim.lr", r"a bool is not a number, got False",
                 id="type-yaml-bool-for-float"),
    pytest.param(T, [], "optim:\n  epochs: 2.5\n", "optim.epochs", r"must be a valid integer, got 2\.5",
                 id="type-yaml-fraction-for-int"),
    pytest.param(T, [], "data:\n  classes: 5\n", "data.classes", r"must be a valid list, got 5",
                 id="type-yaml-scalar-for-list"),
    pytest.param(T, [], "data:\n  classes: [a, {b: 1}]\n", "data.classes[1]", r"must be a valid string, got \{",
                 id="type-yaml-list-element"),
    pytest.param(T, [], "data:\n  root: {bucket: x}\n", "data.root", r"must be a valid string",
                 id="type-yaml-section-for-str"),
    pytest.param(T, [], "data:\n  root:\n", "data.root", r"must be a valid string, got None", id="type-yaml-null-for-str"),
    pytest.param(T, [], "augment:\n  enabled: 2\n", "augment.enabled", r"must be a valid boolean, got 2",
                 id="type-yaml-int-for-bool"),
    # a flag without a value
    pytest.param(T, ["--epochs", "2", "--lr"], None, "--lr", r"^argument --optim\.lr/--lr: expected one argument$",
                 id="no-value-at-end"),
    pytest.param(T, ["--lr", "--epochs", "2"], None, "--lr", r"^argument --optim\.lr/--lr: expected one argument$",
                 id="no-value-before-flag"),
    pytest.param(P, ["--teacher.optim.lr"], None, "--teacher.optim.lr",
                 r"^argument --teacher\.optim\.lr: expected one argument$", id="no-value-dotted"),
    pytest.param(T, ["--class_balance", "--lr", "0.1"], None, "--class_balance", r"expected one argument",
                 id="no-value-bool"),
    pytest.param(T, ["--config"], None, "--config", r"^argument --config: expected one argument$", id="no-value-config"),
    # unknown keys, options and arguments
    pytest.param(P, ["--no_such_key", "1"], None, "--no_such_key", r"^unknown option --no_such_key; ",
                 id="unknown-flag"),
    pytest.param(T, ["--optim.nope", "1"], None, "--optim.nope", r"^unknown option --optim\.nope; did you mean ",
                 id="unknown-dotted"),
    pytest.param(T, ["--epoch", "1"], None, "--epoch", r"did you mean --epochs", id="unknown-flag-suggestion"),
    pytest.param(T, ["positional"], None, "'positional'", r"^unexpected argument 'positional': options are --key value$",
                 id="unexpected-argument"),
    pytest.param(P, ["--epochs", "3"], None, "--epochs", r"^--epochs is ambiguous: use one of ", id="ambiguous-flag"),
    pytest.param(T, [], "bogus: 1\n", "bogus", r"^unknown config key bogus; known in TrainJobConfig: data, ",
                 id="unknown-yaml-top"),
    pytest.param(P, [], "teacher:\n  optim:\n    lrr: 1\n", "teacher.optim.lrr",
                 r"^unknown config key teacher\.optim\.lrr; known in teacher\.optim: optimizer, lr, ",
                 id="unknown-yaml-nested"),
    pytest.param(T, [], "1: x\n", "1", r"^unknown config key 1;", id="unknown-yaml-int-key"),
    pytest.param(ScoreJobConfig, [], "max_bytes: 5\n", "max_bytes", r"^unknown config key max_bytes; ",
                 id="unknown-yaml-limit-outside-its-section"),
    # out of range
    pytest.param(T, ["--lr", "-1"], None, "optim.lr", r"^config key optim\.lr: must be greater than 0, got '-1'$",
                 id="range-lr"),
    pytest.param(T, ["--lr", "nan"], None, "optim.lr", r"must be greater than 0, got 'nan'", id="range-lr-nan"),
    pytest.param(T, ["--image_size", "4"], None, "data.image_size", r"must be greater than or equal to 8, got '4'",
                 id="range-image_size"),
    pytest.param(P, ["--teacher.image_size", "4"], None, "teacher.image_size", r"must be 0 or >= 8, got '4'",
                 id="range-stage-image_size"),
    pytest.param(T, ["--epochs", "0"], None, "optim.epochs", r"greater than or equal to 1", id="range-epochs"),
    pytest.param(T, ["--batch_size", "0"], None, "optim.batch_size", r"greater than or equal to 1",
                 id="range-batch_size"),
    pytest.param(T, ["--kd.alpha", "1.5"], None, "kd.alpha", r"must be less than or equal to 1, got '1\.5'",
                 id="range-alpha"),
    pytest.param(T, ["--temperature", "0"], None, "kd.temperature", r"must be greater than 0", id="range-temperature"),
    pytest.param(T, ["--kd.views", "-1"], None, "kd.views", r"greater than or equal to 0", id="range-views"),
    pytest.param(T, ["--label_smoothing", "1"], None, "optim.label_smoothing", r"must be less than 1",
                 id="range-open-end"),
    pytest.param(P, ["--target_sensitivity", "0"], None, "calibrate.target_sensitivity", r"must be greater than 0",
                 id="range-target_sensitivity-0"),
    pytest.param(CalibrateJobConfig, ["--model", "m", "--target_sensitivity", "1.01"], None,
                 "calibrate.target_sensitivity", r"less than or equal to 1", id="range-target_sensitivity-high"),
    pytest.param(T, ["--num_workers", "-1"], None, "run.num_workers", r"greater than or equal to 0",
                 id="range-num_workers"),
    pytest.param(T, ["--limit", "-5"], None, "data.limit", r"got '-5'$", id="range-limit"),
    pytest.param(CacheJobConfig, ["--teacher", "t", "--views", "0"], None, "config key views",
                 r"greater than or equal to 1", id="range-cache-views"),
    pytest.param(ScoreJobConfig, ["--model", "m", "--input", "i", "--output", "o", "--max_bytes", "0"], None,
                 "config key limits.max_bytes", r"greater than or equal to 1", id="range-score-limit"),
    pytest.param(MakeDataJobConfig, ["out", "--train-per-class", "0"], None, "train_per_class",
                 r"greater than or equal to 1", id="range-make-data"),
    pytest.param(P, [], "student:\n  optim:\n    lr: 0\n", "student.optim.lr", r"must be greater than 0, got 0$",
                 id="range-yaml-nested"),
    pytest.param(P, ["--kd_sweep", "0.5/4/1,2/4/1"], None, "kd_sweep[1]", r"need 0 < alpha <= 1.*, got '2/4/1'$",
                 id="range-kd_sweep"),
    # missing required keys (checked after defaults, file and flags are merged)
    pytest.param(ScoreJobConfig, [], None, "--model",
                 r"^--model is required \(an exported model folder, a checkpoint or a run folder\)$",
                 id="required-score-model"),
    pytest.param(ScoreJobConfig, ["--model", "m", "--output", "o"], None, "--input", r"^--input is required \(",
                 id="required-score-input"),
    pytest.param(ScoreJobConfig, ["--model", "m", "--input", "i", "--output="], None, "--output",
                 r"^--output is required \(", id="required-score-output-empty"),
    pytest.param(EvalJobConfig, ["--split", "test"], None, "--model",
                 r"^--model is required \(a checkpoint, run folder or exported model\)$", id="required-eval"),
    pytest.param(CacheJobConfig, [], "views: 2\n", "--teacher",
                 r"^--teacher is required \(a teacher checkpoint or run folder\)$", id="required-cache"),
    pytest.param(CalibrateJobConfig, [], "model: ''\n", "--model", r"^--model is required \(a training checkpoint",
                 id="required-calibrate-empty-in-yaml"),
    pytest.param(ExportJobConfig, ["--model", "m", "--output", "o"], None, "--data",
                 r"^--data is required \(the data root", id="required-export"),
    pytest.param(ExplainJobConfig, ["--model", "m", "--output", "o"], None, "images", r"^images is required",
                 id="required-explain-images"),
]


@pytest.mark.unit
@pytest.mark.parametrize("cls, argv, yaml_text, key, pattern", CASES)
def test_config_error_is_one_line_naming_the_key(tmp_path, cls, argv, yaml_text, key, pattern):
    if yaml_text is not None:
        (tmp_path / "c.yaml").write_text(yaml_text)
        argv = ["--config", str(tmp_path / "c.yaml"), *argv]
    with pytest.raises(KdrayError) as exc_info:
        load_config(cls, argv)
    message = str(exc_info.value)
    assert "\n" not in message and message.strip() == message, message
    assert key in message, message
    assert exc_info.match(pattern)


@pytest.mark.unit
@pytest.mark.parametrize("text, pattern", [
    ("optim:\n  lr: [1\n", r"^config file .*c\.yaml is not valid YAML: .*\(line \d+, column \d+\)$"),
    ("- a\n- b\n", r"must hold a mapping at the top level, got \['a', 'b'\]$"),
])
def test_bad_yaml_file_is_one_line(tmp_path, text, pattern):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(KdrayError, match=pattern) as exc_info:
        load_config(TrainJobConfig, ["--config", str(tmp_path / "c.yaml")])
    assert "\n" not in str(exc_info.value)
    with pytest.raises(KdrayError, match=r"^config file .*: ") as exc_info:  # a folder, not a file
        load_config(TrainJobConfig, ["--config", str(tmp_path)])
    assert "\n" not in str(exc_info.value)


# ----------------------------------------------------------------------------- the real entry points

# Replaces ray.init and LocalS3.start by tripwires, then runs the job module as `python -m` would.
SCRIPT = """
import os, sys

def tripwire(what):
    def started(*args, **kwargs):
        sys.stderr.write(what + " STARTED\\n")
        sys.stderr.flush()
        os._exit(99)
    return started

import ray
ray.init = tripwire("RAY")
import cluster.local.s3
cluster.local.s3.LocalS3.start = tripwire("S3")

import runpy
module, argv = sys.argv[1], sys.argv[2:]
sys.argv = [module, *argv]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run_entry_point(module: str, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, module, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.integration  # a subprocess per case (torch import): too slow for the unit tier
@pytest.mark.parametrize("module, argv, key", [
    ("jobs.pipeline", ["--run.use_gpu", "maybe"], "run.use_gpu"),
    ("jobs.pipeline", ["--teacher.optim.epochs", "abc"], "teacher.optim.epochs"),
    ("jobs.pipeline", ["--kd.alpha", "0.5", "--teacher.optim.lr"], "--teacher.optim.lr"),
    ("jobs.pipeline", ["--no_such_key", "1"], "--no_such_key"),
    ("jobs.pipeline", ["--config", "{yaml}"], "bogus_key"),
    ("jobs.score", ["--input", "in", "--output", "out"], "--model"),
])
def test_job_rejects_bad_config_before_starting_ray_or_s3(tmp_path, module, argv, key):
    (tmp_path / "bad.yaml").write_text("kd:\n  alpha: 0.5\nbogus_key: 1\n")
    proc = run_entry_point(module, [a.format(yaml=tmp_path / "bad.yaml") for a in argv])
    output = proc.stdout + proc.stderr
    assert "STARTED" not in output, output[-2000:]
    assert proc.returncode == 2, output[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert key in lines[0], lines[0]
