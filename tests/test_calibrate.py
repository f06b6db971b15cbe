"""Temperature scaling and the COVID operating point (kdray.calibrate), on logits with known properties."""

import numpy as np
import pytest

from kdray import KdrayError
from kdray.calibrate import calibrate_checkpoint
from kdray.metrics import calibration_report, classification_metrics, softmax, validation_summary

CLASSES = ["covid", "normal", "pneumonia"]


def _overconfident(n: int = 600, seed: int = 0, scale: float = 6.0):
    """Logits from a well-calibrated model (T=1), then multiplied by ``scale``: overconfident by design."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    logits = rng.normal(0, 1, size=(n, 3))
    logits[np.arange(n), y] += 1.5
    return y, logits * scale


def test_temperature_recovers_the_overconfidence_and_lowers_ece():
    y, logits = _overconfident()
    report = calibration_report(y, logits, CLASSES)
    assert 4.0 < report.temperature < 9.0  # the logits were scaled by 6
    assert report.ece_before > 0.1 and report.ece_after < 0.05
    assert report.ece_after < report.ece_before / 3
    # cross-fitted (fit on one half, measured on the other) is worse than in-sample, but still calibrated
    assert report.cross_fitted["ece_after"] < 0.08


def test_covid_threshold_reaches_the_target_sensitivity_on_the_fitting_data():
    y, logits = _overconfident(seed=1)
    for target in (0.8, 0.95, 1.0):
        report = calibration_report(y, logits, CLASSES, target_sensitivity=target)
        probs = softmax(logits, report.temperature)
        flagged = probs[:, 0] >= report.covid_threshold
        sensitivity = flagged[y == 0].mean()
        assert sensitivity >= target and report.covid_at_threshold["sensitivity"] == pytest.approx(sensitivity)
        # the largest such threshold: raising it by a hair loses sensitivity below the target
        assert (probs[y == 0, 0] >= report.covid_threshold + 1e-9).mean() < target
        assert 0 <= report.cross_fitted["sensitivity"] <= 1


def test_no_covid_class_means_no_threshold():
    y, logits = _overconfident(seed=2)
    report = calibration_report(y, logits, ["a", "b", "c"])
    assert report.covid_threshold is None and report.temperature > 1


def test_validation_summary_keeps_the_card_fields_only():
    y, logits = _overconfident(n=90, seed=3)
    metrics = classification_metrics(y, softmax(logits), CLASSES, ["s1"] * 45 + ["s2"] * 45, 0.5)
    summary = validation_summary(metrics)
    assert set(summary) == {"n", "accuracy", "macro_f1", "macro_auc", "ece", "covid", "per_source", "per_class"}
    assert summary["covid"]["threshold"] == 0.5 and set(summary["per_source"]) == {"s1", "s2"}


def test_bad_target_sensitivity_is_refused(tmp_path):
    with pytest.raises(KdrayError, match="target_sensitivity must be in"):
        calibrate_checkpoint(str(tmp_path), str(tmp_path), target_sensitivity=1.5)


@pytest.mark.e2e  # the job subprocess starts its own local Ray
def test_calibrate_job_stores_the_torch_operating_point_and_export_fits_its_own(synthetic_dir, checkpoint_factory,
                                                                               tmp_path):
    import json
    import re

    from kdray.checkpoints import read_checkpoint_meta
    from kdray.data import sample_images
    from kdray.export import export_student
    from test_jobs import run_job

    ckpt = checkpoint_factory("student", model_name="tiny_student", image_size=32)
    proc = run_job("jobs.calibrate", "--model", ckpt, "--data", synthetic_dir, "--target_sensitivity", "0.9")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    meta = json.loads((tmp_path / "student" / "meta.json").read_text())
    calibration = meta["calibration"]
    assert meta["temperature"] == calibration["temperature"] > 0
    assert meta["covid_threshold"] == calibration["covid_threshold"] is not None
    assert calibration["split"] == "val" and calibration["n"] == 60 and calibration["target_sensitivity"] == 0.9
    # the largest threshold that reaches the target on the fitting data reaches it there, by construction
    assert calibration["covid_at_threshold"]["sensitivity"] >= 0.9
    assert meta["validation"]["covid"]["threshold"] == meta["covid_threshold"]
    assert re.search(r"covid threshold [\d.e-]+ for sensitivity >= 90%", proc.stdout)

    # export fits the served artifact's own operating point on its ONNX logits over the val images it is given;
    # the checkpoint keeps its own (torch) calibration, which the torch backend uses
    images, labels = sample_images(synthetic_dir, "val", 32, 24)
    card = export_student(ckpt, str(tmp_path / "export"), images, images, labels, int8=False)
    op = card.operating_points[card.served_artifact]
    assert card.served_artifact == "fp32" and op.artifact == "fp32"
    assert op.covid_threshold is not None and op.n == len(images) == 24 and op.split == "val"
    assert op.target_sensitivity == 0.95
    kept = read_checkpoint_meta(ckpt)
    assert (kept.temperature, kept.covid_threshold, kept.calibration) == (meta["temperature"],
                                                                          meta["covid_threshold"], calibration)
    assert card.validation["n"] == 60 and card.validation["covid"]["threshold"] == meta["covid_threshold"]
