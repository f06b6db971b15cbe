"""The README's main command, end to end on tiny settings: local S3 + generated data + local Ray.

``e2e``: the pipeline subprocess starts its own Ray and SeaweedFS, so it runs in a pytest process of its own.
"""

import json
import re

import pytest

from test_jobs import run_job

pytestmark = pytest.mark.e2e

TINY = ["--teacher.model.name", "tiny_teacher", "--student.model.name", "tiny_student", "--image_size", "48",
        "--teacher.optim.epochs", "3", "--student.optim.epochs", "3", "--teacher.optim.lr", "3e-3",
        "--student.optim.lr", "1e-2", "--teacher.optim.batch_size", "8", "--student.optim.batch_size", "8",
        "--train_per_class", "40", "--val_per_class", "15", "--source_size", "64"]


def test_pipeline_end_to_end(tmp_path):
    logs = tmp_path / "logs"
    proc = run_job("jobs.pipeline", *TINY, "--kd_sweep", "0.5/4/1,0.9/2/2", "--s3_dir", str(tmp_path / "s3"),
                   env={"KDRAY_LOG_DIR": str(logs)}, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    # quiet by default: stage headers, throttled progress (at most one line per 30 s), the table, the outputs
    assert len(out.splitlines()) <= 60, out
    assert re.search(r"^\S+ \[8/8\] score the val images offline", out, re.M), out
    table = re.findall(r"^\| (teacher|student_kd|student_nokd|student_kd_a[\d.]+-t[\d.]+-k\d) \|.*$", proc.stdout, re.M)
    assert table[:3] == ["teacher", "student_kd", "student_nokd"] and len(table) == 4, proc.stdout[-3000:]
    # two KD settings trained against one cache with K = 2 views; the better one on val is student_kd
    assert table[3] in ("student_kd_a0.5-t4-k1", "student_kd_a0.9-t2-k2")
    assert re.search(r"KD settings on val macro-F1: .*; selected alpha=(0.5 T=4 K=1|0.9 T=2 K=2)", out)
    log_text = "\n".join(p.read_text() for p in logs.glob("*.log"))  # quiet console: the details are in the log
    assert re.search(r"building logit cache .* x 2 view\(s\)", log_text), sorted(logs.iterdir())
    answer = json.loads(re.search(r"Serve answered: (\{.*\})", proc.stdout).group(1))
    assert set(answer["probabilities"]) == {"covid", "normal", "pneumonia"}
    # the exported runtime, never torch, with the served artifact's own operating point (fitted on val)
    exported = re.search(r"exported KD student, served as (int8|fp32): temperature ([\d.]+) \(ECE on val "
                         r"([\d.]+) -> ([\d.]+)\), covid threshold ([\d.e-]+) for sensitivity 95%, fitted on its "
                         r"own logits", proc.stdout)
    assert exported, proc.stdout[-3000:]
    assert answer["backend"] == f"onnx-{exported.group(1)}"
    assert float(exported.group(2)) > 0 and 0 <= float(exported.group(5)) <= 1
    assert answer["covid_suspect"] == (answer["probabilities"]["covid"] >= float(exported.group(5)))
    assert re.search(r"offline scoring: 45 images, 0 unreadable", proc.stdout)
    assert "(built)" in proc.stdout
    # everything it started is shut down: no SeaweedFS left on that data directory
    assert not (tmp_path / "s3" / "weed.pid").exists()
