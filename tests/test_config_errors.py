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
    CacheJobConfig, CalibrateJobConfig, EvalJobConfig, PipelineConfig, ScoreJobConfig, TrainJobConfig, load_config,
)


REPO = Path(__file__).resolve().parents[1]

T, P = TrainJobConfig, PipelineConfig

# (config class, flags, YAML file text or None, a key the message must name, a regex the message must match)
CASES = [
    # wrong enum value
    pytest.param(T, ["--run.use_gpu", "maybe"], None, "run.use_gpu",
                 r"^config key run\.use_gpu: 'maybe' is not one of auto, true, false$", id="enum-flag-use_gpu"),
    pytest.param(T, ["--optimizer", "adam"], None, "optim.optimizer",
                 r"'adam' is not one of adamw, sgd$", id="enum-flag-optimizer"),
    pytest.param(P, ["--student.model.name", "resnet"], None, "student.model.name",
                 r"'resnet' is not one of teacher, student, tiny_teacher, tiny_student$", id="enum-flag-model-name"),
    pytest.param(EvalJobConfig, ["--model", "m", "--backend", "onnx"], None, "config key backend",
                 r"'onnx' is not one of auto, torch, onnx-fp32, onnx-int8$", id="enum-flag-eval-backend"),
    pytest.param(ScoreJobConfig, ["--model", "m", "--input", "i", "--output", "o", "--backend", "tensorrt"], None,
                 "config key backend", r"'tensorrt' is not one of", id="enum-flag-score-backend"),
    pytest.param(T, [], "run:\n  use_gpu: maybe\n", "run.use_gpu", r"'maybe' is not one of auto, true, false",
                 id="enum-yaml-use_gpu"),
    pytest.param(T, [], "run:\n  use_gpu: 1\n", "run.use_gpu", r": 1 is not one of auto, true, false",
                 id="enum-yaml-use_gpu-int"),
    pytest.param(T, [], "optim:\n  optimizer: [adamw]\n", "optim.optimizer", r"\['adamw'\] is not one of",
                 id="enum-yaml-list"),
    # wrong type
    pytest.param(T, ["--data.image_size", "abc"], None, "data.image_size",
                 r"^config key data\.image_size: cannot read 'abc' as int$", id="type-flag-int"),
    pytest.param(P, ["--teacher.optim.epochs", "abc"], None, "teacher.optim.epochs", r"cannot read 'abc' as int",
                 id="type-flag-nested-int"),
    pytest.param(T, ["--lr", "fast"], None, "optim.lr", r"cannot read 'fast' as float", id="type-flag-float"),
    pytest.param(T, ["--class_balance", "maybe"], None, "optim.class_balance", r"cannot read 'maybe' as bool",
                 id="type-flag-bool"),
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
    pytest.param(T, [], "optim:\n  lr: [0.1, 0.2]\n", "optim.lr", r"cannot read \[0\.1, 0\.2\] as float",
                 id="type-yaml-list-for-scalar"),
    pytest.param(T, [], "optim:\n  epochs: true\n", "optim.epochs", r"cannot read a bool \(true\) as int",
                 id="type-yaml-bool-for-int"),
    pytest.param(T, [], "optim:\n  lr: false\n", "optim.lr", r"cannot read a bool \(false\) as float",
                 id="type-yaml-bool-for-float"),
    pytest.param(T, [], "optim:\n  epochs: 2.5\n", "optim.epochs", r"cannot read 2\.5 as int",
                 id="type-yaml-fraction-for-int"),
    pytest.param(T, [], "data:\n  classes: 5\n", "data.classes", r"expected a list .*got 5",
                 id="type-yaml-scalar-for-list"),
    pytest.param(T, [], "data:\n  classes: [a, {b: 1}]\n", "data.classes[1]", r"cannot read a section .* as str",
                 id="type-yaml-list-element"),
    pytest.param(T, [], "data:\n  root: {bucket: x}\n", "data.root", r"cannot read a section .* as str",
                 id="type-yaml-section-for-str"),
    pytest.param(T, [], "augment:\n  enabled: 2\n", "augment.enabled", r"cannot read 2 as bool",
                 id="type-yaml-int-for-bool"),
    # a flag without a value
    pytest.param(T, ["--epochs", "2", "--lr"], None, "--lr", r"^option --lr needs a value$", id="no-value-at-end"),
    pytest.param(T, ["--lr", "--epochs", "2"], None, "--lr", r"^option --lr needs a value$",
                 id="no-value-before-flag"),
    pytest.param(P, ["--teacher.optim.lr"], None, "--teacher.optim.lr", r"^option --teacher\.optim\.lr needs a value$",
                 id="no-value-dotted"),
    pytest.param(T, ["--class_balance", "--lr", "0.1"], None, "--class_balance", r"needs a value",
                 id="no-value-bool"),
    pytest.param(T, ["--config"], None, "--config", r"^option --config needs a value$", id="no-value-config"),
    # unknown keys
    pytest.param(P, ["--no_such_key", "1"], None, "--no_such_key", r"^unknown option --no_such_key; known: ",
                 id="unknown-flag"),
    pytest.param(T, ["--optim.nope", "1"], None, "--optim.nope", r"^unknown option --optim\.nope", id="unknown-dotted"),
    pytest.param(T, [], "bogus: 1\n", "bogus", r"^unknown config key bogus; known in TrainJobConfig: data, ",
                 id="unknown-yaml-top"),
    pytest.param(P, [], "teacher:\n  optim:\n    lrr: 1\n", "teacher.optim.lrr",
                 r"^unknown config key teacher\.optim\.lrr; known in teacher\.optim: ", id="unknown-yaml-nested"),
    pytest.param(T, [], "1: x\noptim:\n  a: 1\n", "1", r"^unknown config key 1;", id="unknown-yaml-int-key"),
    # out of range
    pytest.param(T, ["--lr", "-1"], None, "optim.lr", r"^config key optim\.lr: must be > 0, got -1\.0$",
                 id="range-lr"),
    pytest.param(T, ["--lr", "nan"], None, "optim.lr", r"must be > 0, got nan", id="range-lr-nan"),
    pytest.param(T, ["--image_size", "4"], None, "data.image_size", r"must be >= 8, got 4", id="range-image_size"),
    pytest.param(P, ["--teacher.image_size", "4"], None, "teacher.image_size", r"must be 0 or >= 8, got 4",
                 id="range-stage-image_size"),
    pytest.param(T, ["--epochs", "0"], None, "optim.epochs", r"must be >= 1, got 0", id="range-epochs"),
    pytest.param(T, ["--batch_size", "0"], None, "optim.batch_size", r"must be >= 1, got 0", id="range-batch_size"),
    pytest.param(T, ["--kd.alpha", "1.5"], None, "kd.alpha", r"must be in \[0, 1\], got 1\.5", id="range-alpha"),
    pytest.param(T, ["--temperature", "0"], None, "kd.temperature", r"must be > 0, got 0\.0",
                 id="range-temperature"),
    pytest.param(T, ["--kd.views", "-1"], None, "kd.views", r"must be >= 0, got -1", id="range-views"),
    pytest.param(P, ["--target_sensitivity", "0"], None, "calibrate.target_sensitivity",
                 r"must be in \(0, 1\], got 0\.0", id="range-target_sensitivity-0"),
    pytest.param(CalibrateJobConfig, ["--model", "m", "--target_sensitivity", "1.01"], None,
                 "calibrate.target_sensitivity", r"must be in \(0, 1\]", id="range-target_sensitivity-high"),
    pytest.param(T, ["--num_workers", "-1"], None, "run.num_workers", r"must be >= 0", id="range-num_workers"),
    pytest.param(T, ["--limit", "-5"], None, "data.limit", r"must be >= 0, got -5", id="range-limit"),
    pytest.param(CacheJobConfig, ["--teacher", "t", "--views", "0"], None, "config key views", r"must be >= 1",
                 id="range-cache-views"),
    pytest.param(P, [], "student:\n  optim:\n    lr: 0\n", "student.optim.lr", r"must be > 0, got 0\.0",
                 id="range-yaml-nested"),
    pytest.param(P, ["--kd_sweep", "0.5/4/1,2/4/1"], None, "kd_sweep", r"entry '2/4/1': need 0 < alpha <= 1",
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
