"""Tests for kdray.uncertainty: bootstrap intervals over images, paired differences, alignment by image id."""

import numpy as np
import pyarrow as pa
import pytest

from kdray import KdrayError
from kdray.evaluate import predictions_table
from kdray.metrics import expected_calibration_error, macro_f1
from kdray.uncertainty import METRICS, _resampled, aligned, metric_intervals, paired_difference


def _probs(pred: np.ndarray, n_classes: int = 3, confidence: float = 0.8) -> np.ndarray:
    p = np.full((len(pred), n_classes), (1 - confidence) / (n_classes - 1))
    p[np.arange(len(pred)), pred] = confidence
    return p


def test_interval_brackets_the_value_and_narrows_with_more_images():
    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 1600):
        y = rng.integers(0, 3, n)
        pred = np.where(rng.random(n) < 0.85, y, (y + 1) % 3)  # about 85% correct
        m = metric_intervals(y, _probs(pred))
        for name in ("accuracy", "macro_f1", "ece"):
            assert m[name].low <= m[name].value <= m[name].high, (name, m[name])
        assert m["accuracy"].value == pytest.approx(np.mean(pred == y))
        widths.append(m["accuracy"].high - m["accuracy"].low)
    # a binomial 95% interval is about 4 standard errors wide: ~0.14 at n=100, ~0.035 at n=1600
    assert 0.08 < widths[0] < 0.2 and 0.02 < widths[1] < 0.05, widths


def test_paired_difference_of_a_model_with_itself_is_exactly_zero():
    y = np.arange(60) % 3
    p = _probs((y + (np.arange(60) % 4 == 0)) % 3)
    d = paired_difference(y, p, p)
    assert d.difference == 0 and d.low == 0 and d.high == 0 and d.share_a_better == 0


def test_paired_difference_sees_a_consistent_gain_that_separate_intervals_would_miss():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 400)
    pred_b = np.where(rng.random(400) < 0.85, y, (y + 1) % 3)
    pred_a = pred_b.copy()
    wrong = np.flatnonzero(pred_b != y)
    pred_a[wrong[:16]] = y[wrong[:16]]  # A fixes 16 of B's errors and breaks nothing: +4 points
    a, b = _probs(pred_a), _probs(pred_b)
    d = paired_difference(y, a, b, "accuracy")
    assert d.difference == pytest.approx(16 / 400)
    assert d.low > 0 and d.share_a_better == 1.0
    separate_a, separate_b = metric_intervals(y, a)["accuracy"], metric_intervals(y, b)["accuracy"]
    assert separate_a.low < separate_b.high  # the unpaired intervals overlap


def test_aligned_matches_images_by_id_and_keeps_only_the_common_ones():
    classes = ["covid", "normal", "pneumonia"]
    pa_ = np.eye(3)[[0, 1, 2]]
    first = predictions_table(["a", "b", "c"], np.array([0, 1, 2]), pa_, classes)
    second = predictions_table(["c", "a", "d"], np.array([2, 0, 1]), np.eye(3)[[1, 0, 1]], classes)
    y, probs = aligned({"one": first, "two": second})
    assert y.tolist() == [0, 2]  # images a and c, sorted by id
    assert probs["one"].argmax(1).tolist() == [0, 2] and probs["two"].argmax(1).tolist() == [0, 1]


def test_aligned_refuses_disagreeing_labels_and_disjoint_images():
    classes = ["covid", "normal", "pneumonia"]
    one = predictions_table(["a", "b"], np.array([0, 1]), np.eye(3)[[0, 1]], classes)
    relabelled = predictions_table(["a", "b"], np.array([0, 2]), np.eye(3)[[0, 1]], classes)
    with pytest.raises(KdrayError, match="labels differ"):
        aligned({"one": one, "two": relabelled})
    with pytest.raises(KdrayError, match="share no image"):
        aligned({"one": one, "two": predictions_table(["z"], np.array([0]), np.eye(3)[[0]], classes)})


def test_bad_inputs_get_clear_errors():
    y = np.array([0, 1, 2])
    with pytest.raises(KdrayError, match="do not match"):
        metric_intervals(y, np.eye(3)[:2])
    with pytest.raises(KdrayError, match="at least 2"):
        metric_intervals(y[:1], np.eye(3)[:1])
    with pytest.raises(KdrayError, match="unknown metric"):
        paired_difference(y, np.eye(3), np.eye(3), "auc")


def test_predictions_table_columns():
    t = predictions_table(["x", "y"], np.array([1, 0]), np.array([[0.2, 0.7, 0.1], [0.5, 0.3, 0.2]]),
                          ["covid", "normal", "pneumonia"], ["s1", "s2"])
    assert isinstance(t, pa.Table)
    assert t.column_names == ["image_id", "label", "prediction", "p_covid", "p_normal", "p_pneumonia", "source"]
    assert t["label"].to_pylist() == ["normal", "covid"] and t["prediction"].to_pylist() == ["normal", "covid"]


def test_resampled_metrics_equal_the_metrics_tables_definitions():
    """The bootstrap computes every resample at once from per-image arrays: the same values as the metrics."""
    rng = np.random.default_rng(7)
    y = rng.integers(0, 3, 200)
    y[:5] = 0  # class 2 may be absent from a resample: macro-F1 then averages over the classes present
    probs = rng.dirichlet([1, 1, 1], 200)
    rows = rng.integers(0, 200, (30, 200))
    for name, metric in METRICS.items():
        expected = np.array([metric(y[r], probs[r]) for r in rows])
        np.testing.assert_allclose(_resampled(name, y, probs)(rows), expected, rtol=0, atol=1e-12)
    assert METRICS["macro_f1"](y, probs) == macro_f1(y, probs.argmax(1))
    assert METRICS["ece"](y, probs) == expected_calibration_error(probs, y)
