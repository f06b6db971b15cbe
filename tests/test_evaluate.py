"""Tests for kdray.metrics (and kdray.evaluate's plots and table) against hand-computed examples."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from kdray.evaluate import format_table, plot_confusion_matrix, plot_roc
from kdray.schemas import ClassificationMetrics
from kdray.metrics import (
    classification_metrics,
    covid_threshold_for_sensitivity,
    expected_calibration_error,
    fit_temperature,
    softmax,
)

CLASSES = ["covid", "normal", "pneumonia"]

# 6 samples, 3 classes. argmax predictions: [0, 1, 1, 1, 2, 0]
#   sample 1: covid missed (called normal), P(covid) = 0.3
#   sample 5: pneumonia called covid,        P(covid) = 0.5
Y6 = np.array([0, 0, 1, 1, 2, 2])
P6 = np.array(
    [
        [0.8, 0.1, 0.1],
        [0.3, 0.6, 0.1],
        [0.1, 0.7, 0.2],
        [0.2, 0.5, 0.3],
        [0.1, 0.2, 0.7],
        [0.5, 0.1, 0.4],
    ]
)


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _sample_labels(rng, probs):
    u = rng.random(len(probs))
    return np.minimum((np.cumsum(probs, axis=1) < u[:, None]).sum(axis=1), probs.shape[1] - 1)


# --------------------------------------------------------------------------- #
# classification_metrics
# --------------------------------------------------------------------------- #
def _scores(*args, **kwargs) -> dict:
    """classification_metrics as metrics.json holds it (the typed result, dumped)."""
    metrics = classification_metrics(*args, **kwargs)
    assert isinstance(metrics, ClassificationMetrics)
    return metrics.model_dump(mode="json")


def test_hand_computed_six_samples(no_warnings):
    m = _scores(Y6, P6, CLASSES)
    json.dumps(m, allow_nan=False)  # JSON-serialisable, no NaN

    assert m["n"] == 6
    assert m["classes"] == CLASSES
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]

    pc = m["per_class"]
    # covid: tp=1 fp=1 fn=1; normal: tp=2 fp=1 fn=0; pneumonia: tp=1 fp=0 fn=1
    assert pc["covid"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert pc["normal"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert pc["pneumonia"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)

    # one-vs-rest AUC by pair counting: covid 7/8, normal 7/8, pneumonia 8/8
    assert m["roc_auc_ovr"] == pytest.approx({"covid": 0.875, "normal": 0.875, "pneumonia": 1.0})
    assert m["macro_auc"] == pytest.approx((0.875 + 0.875 + 1.0) / 3)

    # ECE: bins {0.8: correct}, {0.6: wrong}, {0.7, 0.7: both correct}, {0.5, 0.5: one correct}
    assert m["ece"] == pytest.approx((0.2 + 0.6 + 2 * 0.3 + 0.0) / 6)

    # covid by argmax: tp=1 fn=1 fp=1 tn=3
    cov = m["covid"]
    assert cov["sensitivity"] == pytest.approx(0.5)
    assert cov["specificity"] == pytest.approx(0.75)
    assert cov["ppv"] == pytest.approx(0.5)
    assert cov["threshold"] is None
    assert m["per_source"] is None


def test_covid_explicit_threshold():
    # P(covid) >= 0.3 flags samples 0, 1, 5: tp=2 fn=0 fp=1 tn=3
    cov = _scores(Y6, P6, CLASSES, covid_threshold=0.3)["covid"]
    assert cov["sensitivity"] == pytest.approx(1.0)
    assert cov["specificity"] == pytest.approx(0.75)
    assert cov["ppv"] == pytest.approx(2 / 3)
    assert cov["threshold"] == pytest.approx(0.3)
    # a very high threshold flags nothing: PPV undefined
    cov = _scores(Y6, P6, CLASSES, covid_threshold=0.99)["covid"]
    assert cov["sensitivity"] == 0.0 and cov["specificity"] == 1.0 and cov["ppv"] is None


def test_covid_not_first_and_case_insensitive():
    order = [2, 0, 1]  # columns -> ["pneumonia", "COVID", "normal"]
    classes = ["pneumonia", "COVID", "normal"]
    remap = {2: 0, 0: 1, 1: 2}
    y = np.array([remap[v] for v in Y6])
    m = _scores(y, P6[:, order], classes)
    assert m["covid"]["sensitivity"] == pytest.approx(0.5)
    assert m["covid"]["specificity"] == pytest.approx(0.75)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_no_covid_class_means_no_covid_metrics():
    m = _scores(Y6, P6, ["cat", "dog", "bird"])
    assert m["covid"] is None
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert set(m["per_class"]) == {"cat", "dog", "bird"}


def test_per_source_breakdown():
    sources = ["a", "a", "a", "b", "b", "b"]
    m = _scores(Y6, P6, CLASSES, sources=sources)
    ps = m["per_source"]
    assert set(ps) == {"a", "b"}
    # a: true [0,0,1], pred [0,1,1] -> F1 covid 2/3 (P=1,R=.5), normal 2/3 (P=.5,R=1)
    assert ps["a"] == pytest.approx({"n": 3, "accuracy": 2 / 3, "macro_f1": 2 / 3})
    # b: true [1,2,2], pred [1,2,0] -> F1 covid 0, normal 1, pneumonia 2/3
    assert ps["b"]["n"] == 3
    assert ps["b"]["accuracy"] == pytest.approx(2 / 3)
    assert ps["b"]["macro_f1"] == pytest.approx((0 + 1 + 2 / 3) / 3)
    json.dumps(m, allow_nan=False)


def test_absent_class_gives_nulls(no_warnings):
    # pneumonia never occurs and is never predicted
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.9, 0.05, 0.05], [0.4, 0.5, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]])
    m = _scores(y, p, CLASSES)
    json.dumps(m, allow_nan=False)
    assert m["per_class"]["pneumonia"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert m["roc_auc_ovr"]["pneumonia"] is None
    assert m["roc_auc_ovr"]["covid"] == pytest.approx(1.0)
    assert m["macro_auc"] == pytest.approx(1.0)
    # macro-F1 over covid (P=1,R=.5 -> 2/3) and normal (P=2/3,R=1 -> .8) only
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]


def test_class_predicted_but_absent():
    y = np.array([0, 1])
    p = np.array([[0.1, 0.2, 0.7], [0.1, 0.8, 0.1]])  # predicts pneumonia for a covid case
    m = _scores(y, p, CLASSES)
    pn = m["per_class"]["pneumonia"]
    assert pn["precision"] == 0.0 and pn["recall"] is None and pn["f1"] == 0.0
    cv = m["per_class"]["covid"]
    assert cv["precision"] is None and cv["recall"] == 0.0 and cv["f1"] == 0.0


def test_single_class_input(no_warnings):
    y = np.zeros(4, dtype=int)
    p = np.tile([0.7, 0.2, 0.1], (4, 1))
    m = _scores(y, p, CLASSES, sources=["x"] * 4)
    json.dumps(m, allow_nan=False)
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0
    assert all(v is None for v in m["roc_auc_ovr"].values())
    assert m["macro_auc"] is None
    assert m["covid"]["sensitivity"] == 1.0
    assert m["covid"]["specificity"] is None
    assert m["ece"] == pytest.approx(0.3)
    assert m["per_source"] == {"x": {"n": 4, "accuracy": 1.0, "macro_f1": 1.0}}


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        classification_metrics(Y6, P6, ["covid", "normal"])  # wrong number of classes
    with pytest.raises(ValueError):
        classification_metrics(Y6[:5], P6, CLASSES)
    with pytest.raises(ValueError):
        classification_metrics(np.array([0, 3]), P6[:2], CLASSES)
    with pytest.raises(ValueError):
        classification_metrics(Y6, P6, CLASSES, sources=["a"])
    with pytest.raises(ValueError):
        classification_metrics(np.array([], dtype=int), np.zeros((0, 3)), CLASSES)


# --------------------------------------------------------------------------- #
# calibration
# --------------------------------------------------------------------------- #
def test_ece_perfect_vs_overconfident():
    # confidence 0.7 and exactly 70% correct -> ECE 0
    n = 1000
    p = np.tile([0.7, 0.3], (n, 1))
    y = np.zeros(n, dtype=int)
    y[700:] = 1
    assert expected_calibration_error(p, y) == pytest.approx(0.0, abs=1e-12)
    # confidence 0.99 but only 50% correct -> ECE 0.49
    p = np.tile([0.99, 0.01], (n, 1))
    y = np.repeat([0, 1], n // 2)
    assert expected_calibration_error(p, y) == pytest.approx(0.49)


def test_ece_sampled_labels():
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 1.5, size=(20000, 3))
    probs = softmax(z)
    y = _sample_labels(rng, probs)
    calibrated = expected_calibration_error(probs, y)
    overconfident = expected_calibration_error(softmax(3 * z), y)
    assert calibrated < 0.02
    assert overconfident > 0.1


def test_softmax_stable_and_temperature():
    s = softmax(np.array([[1000.0, 0.0, -1000.0], [1.0, 1.0, 1.0]]))
    assert np.all(np.isfinite(s))
    np.testing.assert_allclose(s.sum(axis=1), 1.0)
    np.testing.assert_allclose(s[0], [1.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(s[1], [1 / 3] * 3)
    np.testing.assert_allclose(softmax(np.array([0.0, np.log(3.0)])), [0.25, 0.75])
    np.testing.assert_allclose(softmax(np.array([0.0, 2 * np.log(3.0)]), temperature=2.0), [0.25, 0.75])
    with pytest.raises(ValueError):
        softmax(np.zeros(3), temperature=0.0)


def test_fit_temperature_recovers_known_temperature():
    rng = np.random.default_rng(1)
    z = rng.normal(0.0, 1.5, size=(20000, 3))
    y = _sample_labels(rng, softmax(z))
    t = fit_temperature(3.0 * z, y)
    assert t == pytest.approx(3.0, rel=0.1)
    assert fit_temperature(z, y) == pytest.approx(1.0, rel=0.1)
    # scaling fixes calibration
    assert expected_calibration_error(softmax(3.0 * z, temperature=t), y) < 0.02


# --------------------------------------------------------------------------- #
# COVID threshold
# --------------------------------------------------------------------------- #
def test_threshold_hand_computed():
    # covid scores: positives {0.8, 0.3}; the larger must be kept for 50%, both for 95%
    assert covid_threshold_for_sensitivity(Y6, P6, CLASSES, 0.95) == pytest.approx(0.3)
    assert covid_threshold_for_sensitivity(Y6, P6, CLASSES, 0.5) == pytest.approx(0.8)


def test_threshold_reaches_target_and_is_largest():
    rng = np.random.default_rng(2)
    z = rng.normal(0.0, 1.5, size=(3000, 3))
    probs = softmax(z)
    y = _sample_labels(rng, probs)
    score = probs[:, 0]
    pos = y == 0
    for target in (0.8, 0.95, 0.99):
        t = covid_threshold_for_sensitivity(y, probs, CLASSES, target)
        assert np.mean(score[pos] >= t) >= target
        higher = np.unique(score[score > t])
        assert higher.size == 0 or np.mean(score[pos] >= higher[0]) < target
        m = _scores(y, probs, CLASSES, covid_threshold=t)
        assert m["covid"]["sensitivity"] >= target


def test_threshold_errors():
    with pytest.raises(ValueError, match="covid"):
        covid_threshold_for_sensitivity(Y6, P6, ["a", "b", "c"])
    with pytest.raises(ValueError, match="no covid"):
        covid_threshold_for_sensitivity(np.array([1, 2]), P6[:2], CLASSES)


def test_threshold_all_positive(no_warnings):
    y = np.zeros(3, dtype=int)
    assert covid_threshold_for_sensitivity(y, P6[:3], CLASSES, 1.0) == pytest.approx(0.1)


# --------------------------------------------------------------------------- #
# plots & tables
# --------------------------------------------------------------------------- #
def _is_png(path):
    data = Path(path).read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_plots_write_png(tmp_path):
    m = _scores(Y6, P6, CLASSES)
    cm_path = plot_confusion_matrix(m["confusion_matrix"], CLASSES, tmp_path / "sub" / "cm.png", title="CM")
    roc_path = plot_roc(Y6, P6, CLASSES, tmp_path / "roc.png", title="ROC")
    assert _is_png(cm_path) and _is_png(roc_path)
    # degenerate: a class with no samples is simply skipped
    roc2 = plot_roc(np.array([0, 0, 1]), P6[:3], CLASSES, tmp_path / "roc2.png")
    assert _is_png(roc2)
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # no figures leaked


def test_format_table():
    rows = [
        {"model": "teacher", "acc": 0.91234, "auc": None, "n": 120},
        {"model": "student|kd", "acc": 0.5, "auc": float("nan")},
    ]
    out = format_table(rows, ["model", "acc", "auc", "n"])
    assert out == (
        "| model | acc | auc | n |\n"
        "|---|---|---|---|\n"
        "| teacher | 0.9123 | – | 120 |\n"
        "| student\\|kd | 0.5000 | – | – |"
    )
    assert format_table([], ["a"]) == "| a |\n|---|"
