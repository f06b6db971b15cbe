"""kdray.explain (Grad-CAM), the export's torch weights, serve/explaining.py and ``kdray explain``.

The synthetic-corner case trains a tiny student for a few seconds on images whose only class signal is a
bright square in the top-left corner; Grad-CAM of that class must put its mass there. The API and
scoring paths are in tests/test_serve.py and tests/test_score.py.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from kdray import KdrayError
from kdray.explain import Explainer, border_mask, border_mass, overlay_png, should_explain
from kdray.models import build_model

pytestmark = pytest.mark.unit

SIZE = 96  # MobileNetV2 (tiny) sees it as a 6x6 map: coarse enough to train in seconds, fine enough to localise
CORNER = (slice(4, 20), slice(4, 20))  # the signal: a bright 16-px square near the top-left corner


def _corner_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Noise everywhere; label 1 images also carry the square. The corner holds the only class signal."""
    images = rng.normal(110, 35, (n, SIZE, SIZE)).clip(0, 255).astype(np.uint8)
    labels = (np.arange(n) % 2).astype(np.int64)
    for image, label in zip(images, labels):
        if label:
            image[CORNER] = 240
    return images, labels


@pytest.fixture(scope="module")
def corner_model() -> torch.nn.Module:
    from kdray.data import to_model_input

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_model("tiny_student", 2, dropout=0.0)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    held_out = _corner_images(64, np.random.default_rng(1))

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            return float((model(to_model_input(held_out[0])).argmax(1).numpy() == held_out[1]).mean())

    learnt_at = None
    for step in range(1, 81):  # until 10 steps after the signal is learnt (about 40 steps), at most 80
        model.train()
        images, labels = _corner_images(32, rng)
        loss = torch.nn.functional.cross_entropy(model(to_model_input(images)), torch.from_numpy(labels))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if learnt_at is None and step % 10 == 0 and accuracy() >= 0.95:
            learnt_at = step
        if learnt_at is not None and step == learnt_at + 10:
            break
    final = accuracy()
    assert final >= 0.95, f"the tiny model did not learn the corner signal (accuracy {final:.2f})"
    return model


def test_synthetic_corner_signal_gets_the_heat_mass(corner_model) -> None:
    explainer = Explainer(corner_model, ["plain", "corner"], SIZE)
    images, labels = _corner_images(16, np.random.default_rng(2))
    with_signal = images[labels == 1]
    explanations = explainer.explain(with_signal, [1] * len(with_signal))
    half = SIZE // 2
    for e in explanations:  # mass per quadrant: top-left, top-right, bottom-left, bottom-right
        quadrants = np.array([e.heatmap[:half, :half].sum(), e.heatmap[:half, half:].sum(),
                              e.heatmap[half:, :half].sum(), e.heatmap[half:, half:].sum()]) / e.heatmap.sum()
        assert quadrants[0] > 0.55 and quadrants.argmax() == 0, f"mass per quadrant {np.round(quadrants, 2)}"
    assert all(e.explained_class == "corner" and e.torch_class == "corner" and e.agrees for e in explanations)
    for e in explanations:
        assert e.heatmap.shape == (SIZE, SIZE) and e.heatmap.dtype == np.float32
        assert 0.0 <= e.heatmap.min() and e.heatmap.max() <= 1.0 + 1e-6
        overlay = Image.open(io.BytesIO(e.overlay_png))
        assert overlay.format == "PNG" and overlay.size == (SIZE, SIZE) and overlay.mode == "RGB"


def test_it_explains_the_class_it_is_given_and_says_when_torch_differs(corner_model) -> None:
    explainer = Explainer(corner_model, ["plain", "corner"], SIZE)
    images, labels = _corner_images(4, np.random.default_rng(3))
    image = images[labels == 1][:1]
    (served_other,) = explainer.explain(image, [0])  # as if the served artifact had said "plain"
    assert served_other.explained_class == "plain" and served_other.torch_class == "corner"
    assert not served_other.agrees and served_other.to_json()["agrees"] is False
    (same,) = explainer.explain(image, [1])
    assert not np.allclose(served_other.heatmap, same.heatmap)


def test_explaining_does_not_change_predictions(corner_model) -> None:
    from kdray.data import to_model_input

    images, _ = _corner_images(8, np.random.default_rng(4))
    with torch.no_grad():
        before = corner_model(to_model_input(images)).numpy()
    explainer = Explainer(corner_model, ["plain", "corner"], SIZE)
    explainer.explain(images, [1] * 8)
    with torch.no_grad():
        after = corner_model(to_model_input(images)).numpy()
    np.testing.assert_array_equal(before, after)


def test_bad_input_is_a_clear_error(corner_model) -> None:
    explainer = Explainer(corner_model, ["plain", "corner"], SIZE)
    with pytest.raises(KdrayError, match=r"uint8 \[N, 96, 96\]"):
        explainer.explain(np.zeros((1, 32, 32), np.uint8), [0])
    with pytest.raises(KdrayError, match="2 classes for 1 images"):
        explainer.explain(np.zeros((1, SIZE, SIZE), np.uint8), [0, 1])
    with pytest.raises(KdrayError, match="features"):
        Explainer(torch.nn.Linear(2, 2), ["a", "b"], SIZE)


def test_border_mass() -> None:
    mask = border_mask(100)
    assert mask.sum() == 100 * 100 - 70 * 70  # 15% of each side
    only_border = mask.astype(np.float32)
    assert border_mass(only_border) == pytest.approx(1.0)
    assert border_mass(1.0 - only_border) == pytest.approx(0.0)
    assert border_mass(np.ones((100, 100), np.float32)) == pytest.approx(0.51)
    assert np.isnan(border_mass(np.zeros((10, 10), np.float32)))


def test_should_explain() -> None:
    suspect = np.array([True, False, True])
    assert should_explain("all", suspect, 3).tolist() == [True, True, True]
    assert should_explain("covid_suspect", suspect, 3).tolist() == [True, False, True]
    assert should_explain("covid_suspect", None, 2).tolist() == [False, False]  # no threshold: nothing suspect
    assert should_explain("none", suspect, 3).tolist() == [False, False, False]
    with pytest.raises(KdrayError, match="explain must be one of"):
        should_explain("some", suspect, 3)


def test_overlay_is_the_image_under_the_map() -> None:
    image = np.full((16, 16), 200, np.uint8)
    cold = np.asarray(Image.open(io.BytesIO(overlay_png(image, np.zeros((16, 16), np.float32)))))
    hot = np.asarray(Image.open(io.BytesIO(overlay_png(image, np.ones((16, 16), np.float32)))))
    assert cold[..., 2].mean() > cold[..., 0].mean()  # JET: blue where the map is 0
    assert hot[..., 0].mean() > hot[..., 2].mean()  # red where it is 1


# -- the export ships the torch weights

@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> str:
    from conftest import make_checkpoint
    from kdray.export import export_student
    from cluster.local.demo_data import make_image

    root = tmp_path_factory.mktemp("explain-export")
    checkpoint = make_checkpoint(root / "checkpoint", "tiny_student", image_size=32)
    rng = np.random.default_rng(0)
    labels = np.arange(24) % 3
    images = np.stack([make_image(["covid", "normal", "pneumonia"][y], 32, rng) for y in labels])
    export_student(checkpoint, str(root / "export"), images, images, labels, int8=False, strict=False)
    return str(root / "export")


def test_export_ships_torch_weights_that_reproduce_the_checkpoint(export_dir) -> None:
    from kdray.checkpoints import load_model
    from kdray.data import to_model_input
    from kdray.predictor import read_model_card, sha256_file

    card = read_model_card(export_dir)
    assert card.torch_weights is not None and card.torch_weights.model_name == "tiny_student"
    path = f"{export_dir}/{card.torch_weights.file}"
    assert sha256_file(path) == card.torch_weights.sha256
    explainer = Explainer.load(export_dir)
    reference, _ = load_model(card.source_checkpoint)
    images = np.random.default_rng(5).integers(0, 256, (4, 32, 32), dtype=np.uint8)
    with torch.no_grad():
        np.testing.assert_allclose(explainer.model(to_model_input(images)).numpy(),
                                   reference(to_model_input(images)).numpy(), rtol=1e-5, atol=1e-6)


def test_tampered_or_missing_torch_weights_are_refused(export_dir, tmp_path) -> None:
    import json

    folder = tmp_path / "export"
    shutil.copytree(export_dir, folder)
    with open(folder / "model.weights.pt", "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(KdrayError, match="sha256"):
        Explainer.load(str(folder))
    card = json.loads((folder / "metadata.json").read_text())
    del card["torch_weights"]  # an export from before explanations
    (folder / "metadata.json").write_text(json.dumps(card))
    with pytest.raises(KdrayError, match="no torch weights"):
        Explainer.load(str(folder))


def test_cli_writes_one_overlay_per_image_for_the_served_label(export_dir, tmp_path, capsys) -> None:
    from jobs import explain as explain_job
    from jobs import predict as predict_job
    from cluster.local.demo_data import make_image

    rng = np.random.default_rng(6)
    paths = []
    for folder, name, label in (("a", "x0.png", "covid"), ("a", "x1.png", "normal"), ("b", "x1.png", "pneumonia")):
        (tmp_path / folder).mkdir(exist_ok=True)
        Image.fromarray(make_image(label, 64, rng)).save(tmp_path / folder / name)
        paths.append(str(tmp_path / folder / name))
    out = tmp_path / "overlays"
    results = explain_job.main([*paths, "--model", export_dir, "--output", str(out)])
    predicted = predict_job.main([*paths, "--model", export_dir])
    assert [r.label for r in results] == [p.label for p in predicted]
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == ["x0.png", "x1-2.png", "x1.png"]  # b/x1.png does not overwrite a/x1.png
    assert (out / "explanations.csv").read_text().count("\n") == len(paths) + 1
    assert len(capsys.readouterr().out.strip().splitlines()) == 2 * len(paths)


# -- serve/explaining.py: the replica's gate

def test_gate_refuses_past_its_limit_and_reports_an_unexplainable_model(tmp_path) -> None:
    from serve.explaining import ExplainBusy, ExplainGate, ExplainUnavailable, explain_flag

    gate = ExplainGate(str(tmp_path), max_in_flight=2, threads=1, nice=5)
    native_id = gate.pool.submit(threading.get_native_id).result()
    assert os.getpriority(os.PRIO_PROCESS, native_id) == os.getpriority(os.PRIO_PROCESS, 0) + 5
    assert os.getpriority(os.PRIO_PROCESS, 0) == os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    gate.admit()
    gate.admit()
    with pytest.raises(ExplainBusy):
        gate.admit()
    assert gate.refused == 1
    gate.release()
    gate.admit()  # room again
    with pytest.raises(ExplainUnavailable, match="not available"):  # not a model folder
        asyncio.run(gate.explain(np.zeros((1, 8, 8), np.uint8), [0]))
    assert [explain_flag(v) for v in ("true", "1", "yes", "false", "0", "", None, True)] == \
        [True, True, True, False, False, False, False, True]
    with pytest.raises(ValueError, match="true or false"):
        explain_flag("maybe")
