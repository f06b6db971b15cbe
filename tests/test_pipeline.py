"""The README's main command, end to end on tiny settings: local S3 + generated data + local Ray."""

import json
import re

import pytest

from test_jobs import run_job

pytestmark = pytest.mark.integration

TINY = ["--teacher.model.name", "tiny_teacher", "--student.model.name", "tiny_student", "--image_size", "48",
        "--teacher.optim.epochs", "3", "--student.optim.epochs", "3", "--teacher.optim.lr", "3e-3",
        "--student.optim.lr", "1e-2", "--teacher.optim.batch_size", "8", "--student.optim.batch_size", "8",
        "--train_per_class", "40", "--val_per_class", "15", "--source_size", "64"]


def test_pipeline_end_to_end(tmp_path):
    proc = run_job("jobs.pipeline", *TINY, "--kd_sweep", "0.5/4/1,0.9/2/2", "--s3_dir", str(tmp_path / "s3"),
                   timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    table = re.findall(r"^\| (teacher|student_kd|student_nokd|student_kd_a[\d.]+-t[\d.]+-k\d) \|.*$", proc.stdout, re.M)
    assert table[:3] == ["teacher", "student_kd", "student_nokd"] and len(table) == 4, proc.stdout[-3000:]
    # two KD settings trained against one cache with K = 2 views; the better one on val is student_kd
    assert table[3] in ("student_kd_a0.5-t4-k1", "student_kd_a0.9-t2-k2")
    assert re.search(r"KD settings on val macro-F1: .*; selected alpha=(0.5 T=4 K=1|0.9 T=2 K=2)", out)
    assert "2 view(s)" in out
    answer = json.loads(re.search(r"Serve answered: (\{.*\})", proc.stdout).group(1))
    assert set(answer["probabilities"]) == {"covid", "normal", "pneumonia"}
    assert answer["backend"] in ("onnx-int8", "onnx-fp32")  # the exported runtime, never torch
    # calibrated on val after training; the stored threshold drives Serve's covid_suspect flag
    calibrated = re.search(r"exported KD student: temperature ([\d.]+) \(ECE on val ([\d.]+) -> ([\d.]+)\), "
                           r"covid threshold ([\d.e-]+) for sensitivity 95% on val", proc.stdout)
    assert calibrated, proc.stdout[-3000:]
    assert float(calibrated.group(1)) > 0 and 0 <= float(calibrated.group(4)) <= 1
    assert answer["covid_suspect"] == (answer["probabilities"]["covid"] >= float(calibrated.group(4)))
    assert re.search(r"offline scoring: 45 images, 0 unreadable", proc.stdout)
    assert "(built)" in proc.stdout
    # everything it started is shut down: no SeaweedFS left on that data directory
    assert not (tmp_path / "s3" / "weed.pid").exists()
