"""kdray.export, reading an export back (kdray.predictor), jobs.export and jobs.predict, on a tiny student at
32 px (ONNX fp32 + static int8).

Whether int8 passes its checks depends on the CPU's int8 kernels, so the default export is only checked for
consistency (int8 is served if and only if it was validated, every validated ONNX artifact has its own
operating point). Each decision is then forced deterministically: the parity bars and
``kdray.export.covid_suspect_agreement`` are monkeypatched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdray import KdrayError, export
from kdray.checkpoints import save_checkpoint
from kdray.config import AugmentConfig
from kdray.data import decode_image, preprocess_config
from kdray.metrics import calibration_report, softmax
from kdray.models import build_model
from kdray.predictor import OrtPredictor, load_predictor, model_info, read_model_card, sha256_file
from kdray.torch_predictor import TorchPredictor
from kdray.schemas import MODEL_CARD_SCHEMA_VERSION, ModelCard, OperatingPoint
from cluster.local.demo_data import CLASSES, make_image

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
# the checkpoint's own (torch) calibration, as kdray.calibrate would have stored it
TORCH_T, TORCH_THRESHOLD = 1.3, 0.4
META = {"model_name": "tiny_student", "classes": list(CLASSES), "image_size": SIZE, "dropout": 0.2, "metrics": {},
        "temperature": TORCH_T, "covid_threshold": TORCH_THRESHOLD}
ONNX_KINDS = ("fp32", "int8")


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    return np.stack([make_image(CLASSES[y], SIZE, rng) for y in labels]), labels


TRAIN = _images(96, 1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny student fitted to 96 synthetic images, so that it is confident on them and its predictions vary.

    (An untrained net predicts one class for everything, which would make top-1 agreement trivial.)
    """
    from kdray.data import to_model_input

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is faster and immune to a busy machine
    try:
        torch.manual_seed(0)
        model = build_model("tiny_student", len(CLASSES), 0.2)
        images, labels = TRAIN
        x, y = to_model_input(images), torch.as_tensor(labels)
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        for step in range(40):
            idx = np.random.default_rng(step).choice(len(x), 32, replace=False)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():  # exact BatchNorm statistics, so eval mode matches what was fitted
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.momentum = None
                    m.reset_running_stats()
            model.train()(x)
    finally:
        torch.set_num_threads(threads)
    folder = str(tmp_path_factory.mktemp("ckpt"))
    save_checkpoint(folder, model.eval().state_dict(), META)
    return folder


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> tuple[str, ModelCard]:
    """The default export (int8 requested), lenient: whether int8 passes depends on the CPU."""
    calibration, _ = _images(64, 2)
    out = str(tmp_path_factory.mktemp("export"))
    card = export.export_student(checkpoint, out, calibration, *TRAIN, extra_metadata={"version": "9.9"},
                                 strict=False)
    return out, card


def _export(checkpoint: str, out, n: int = 24, **kwargs) -> ModelCard:
    """An export on n fresh labelled images (also the int8 calibration images)."""
    images, labels = _images(n, 5)
    return export.export_student(checkpoint, str(out), images, images, labels, **kwargs)


def _force_covid_suspect_agreement(monkeypatch, **by_kind: float) -> None:
    """covid_suspect_agreement returns the given value for these artifact kinds (the real one for the others)."""
    real = export.covid_suspect_agreement

    def forced(ref_logits, logits, classes, op):
        return by_kind[op.artifact] if op.artifact in by_kind else real(ref_logits, logits, classes, op)

    monkeypatch.setattr(export, "covid_suspect_agreement", forced)


def _copy(src: str, tmp_path: Path) -> str:
    dst = str(tmp_path / "copy")
    shutil.copytree(src, dst)
    return dst


def _torch_logits(checkpoint: str, images: np.ndarray) -> np.ndarray:
    return TorchPredictor.from_checkpoint(checkpoint).logits(images)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pin(folder: str) -> str:
    """The pinned reference of an export as it is now: the folder and the sha256 of its metadata.json."""
    return f"{folder}@sha256:{_sha256(Path(folder, 'metadata.json').read_bytes())}"


def _edit_card(folder: str, edit) -> None:
    card = json.loads(Path(folder, "metadata.json").read_text())
    edit(card)
    Path(folder, "metadata.json").write_text(json.dumps(card))


# ----------------------------------------------------------------------------- the default export


def test_export_writes_artifacts_and_a_consistent_model_card(exported, checkpoint):
    out, card = exported
    assert set(os.listdir(out)) >= {"model.fp32.onnx", "model.int8.onnx", "metadata.json"}
    assert read_model_card(out) == card
    assert json.loads(Path(out, "metadata.json").read_text()) == card.model_dump(mode="json")
    assert card.schema_version == MODEL_CARD_SCHEMA_VERSION and card.name == "kdray-tiny_student"
    assert card.classes == list(CLASSES) and card.image_size == SIZE and card.version == "9.9"
    (image,), (pred,) = card.network_data_format.inputs.values(), card.network_data_format.outputs.values()
    assert (image.name, image.dtype, image.shape) == ("images", "uint8", [-1, SIZE, SIZE])
    assert (pred.name, pred.type, pred.shape) == ("logits", "logits", [-1, len(CLASSES)])
    assert card.preprocessing == preprocess_config(SIZE)
    assert card.intended_use == "research; not for diagnosis" and card.known_biases
    assert card.eval_metrics == {} and card.source_checkpoint == checkpoint
    assert card.source_checkpoint_sha256 == _sha256(Path(checkpoint, "model.pt").read_bytes())
    assert card.versions.onnx_opset == export.OPSET and card.versions.torch == torch.__version__

    for kind in ONNX_KINDS:
        art = card.artifacts[kind]
        assert (art.file, art.format, art.precision) == (f"model.{kind}.onnx", "onnx", kind)
        assert art.sha256 == sha256_file(os.path.join(out, art.file)) and art.size_mb > 0
        assert card.parity[kind].n == 96
    assert card.artifacts["int8"].quantization["calibration_images"] == 64
    assert card.parity_bars == {"fp32": 0.995, "int8": 0.99, "covid_suspect": 0.99}
    # fp32 ONNX and torch are the same graph in float32: they agree to float noise
    assert card.artifacts["fp32"].validated and card.parity["fp32"].max_abs_prob_diff < 1e-4
    torch_accuracy = float(np.mean(_torch_logits(checkpoint, TRAIN[0]).argmax(1) == TRAIN[1]))
    assert card.parity_reference == {"backend": "torch-fp32", "n": 96, "split": "val", "accuracy": torch_accuracy}

    # the decisions recorded are consistent, whichever way int8 went on this CPU
    validated = {k for k in ONNX_KINDS if card.artifacts[k].validated}
    assert card.served_artifact == ("int8" if "int8" in validated else "fp32")
    assert set(card.operating_points) == validated
    for kind in validated:
        parity, op = card.parity[kind], card.operating_points[kind]
        assert parity.top1_agreement >= export.PARITY_BARS[kind]
        assert parity.covid_suspect_agreement >= export.COVID_SUSPECT_BAR
        assert (op.artifact, op.split, op.n, op.target_sensitivity) == (kind, "val", 96, 0.95)
        assert op.temperature > 0 and op.covid_threshold is not None
    if "int8" not in validated:
        int8 = card.parity["int8"]
        assert (int8.top1_agreement < export.PARITY_BARS["int8"]
                or int8.covid_suspect_agreement < export.COVID_SUSPECT_BAR)


def test_each_artifact_runs_with_its_own_operating_point(exported, checkpoint):
    out, card = exported
    fp32 = load_predictor(out, backend="onnx-fp32", threads=1)
    assert isinstance(fp32, OrtPredictor) and fp32.backend == "onnx-fp32" and fp32.classes == list(CLASSES)
    op = card.operating_points["fp32"]
    assert (fp32.temperature, fp32.covid_threshold) == (op.temperature, op.covid_threshold)
    # the operating point was fitted on this artifact's own logits
    logits = fp32.logits(TRAIN[0])
    refit = calibration_report(TRAIN[1], logits, list(CLASSES), 0.95)
    assert refit.temperature == pytest.approx(op.temperature, rel=1e-6)
    assert refit.covid_threshold == pytest.approx(op.covid_threshold, rel=1e-6)
    # and fp32 ONNX computes what torch computes
    reference = _torch_logits(checkpoint, TRAIN[0])
    assert np.allclose(softmax(logits), softmax(reference), atol=1e-4)

    served = load_predictor(out)
    op = card.operating_points[card.served_artifact]
    assert served.backend == f"onnx-{card.served_artifact}"
    assert (served.temperature, served.covid_threshold) == (op.temperature, op.covid_threshold)
    info = model_info(out)
    assert (info.backend, info.temperature, info.covid_threshold) == (served.backend, op.temperature,
                                                                      op.covid_threshold)
    probs = served.probabilities(TRAIN[0])
    assert probs.shape == (96, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    if not card.artifacts["int8"].validated:
        with pytest.raises(KdrayError, match="failed its parity check"):
            load_predictor(out, backend="onnx-int8")

    # the torch backend runs the source checkpoint with the checkpoint's own calibration
    via_torch = load_predictor(out, backend="torch")
    assert isinstance(via_torch, TorchPredictor)
    assert (via_torch.temperature, via_torch.covid_threshold) == (TORCH_T, TORCH_THRESHOLD)
    info = model_info(out, "torch")
    assert (info.backend, info.temperature, info.covid_threshold) == ("torch", TORCH_T, TORCH_THRESHOLD)


def test_ort_predictor_chunks_large_batches_without_changing_results(exported):
    out, _ = exported
    whole = load_predictor(out, backend="onnx-fp32", threads=1)
    whole.chunk = 1000
    chunked = load_predictor(out, backend="onnx-fp32", threads=1)
    chunked.chunk = 7  # 96 images: 13 full chunks and a remainder of 5
    assert np.allclose(chunked.logits(TRAIN[0]), whole.logits(TRAIN[0]), atol=1e-5)
    with pytest.raises(KdrayError, match="augmented views need the torch backend"):
        chunked.logits(TRAIN[0][:2], AugmentConfig(enabled=True), np.zeros(2, np.int64))


def test_missing_artifact_is_an_error(exported, tmp_path):
    folder = _copy(exported[0], tmp_path)
    os.remove(os.path.join(folder, "model.fp32.onnx"))
    with pytest.raises(KdrayError, match="model.fp32.onnx.*missing"):
        load_predictor(folder)


def test_tampered_classes_are_an_error(exported, tmp_path):
    folder = _copy(exported[0], tmp_path)
    card = json.loads(Path(folder, "metadata.json").read_text())
    card["classes"] = ["covid", "normal", "pneumonia", "lung_opacity"]
    Path(folder, "metadata.json").write_text(json.dumps(card))
    with pytest.raises(KdrayError, match="outputs 3 scores but the model card lists 4 classes"):
        load_predictor(folder, backend="onnx-fp32")


def test_corrupt_onnx_is_an_error(exported, tmp_path):
    folder = _copy(exported[0], tmp_path)
    Path(folder, "model.fp32.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(KdrayError, match="sha256 .* does not match"):
        load_predictor(folder, backend="onnx-fp32")


def test_missing_or_corrupt_metadata_is_an_error(exported, tmp_path):
    folder = _copy(exported[0], tmp_path)
    Path(folder, "metadata.json").write_text("{not json")
    with pytest.raises(KdrayError, match="corrupt model card"):
        load_predictor(folder)
    os.remove(os.path.join(folder, "metadata.json"))
    with pytest.raises(KdrayError, match="metadata.json missing"):
        read_model_card(folder)


# ----------------------------------------------------------------------------- integrity: pins, paths, the source


def test_a_pinned_export_refuses_a_swapped_artifact_whose_card_was_edited_to_match(exported, tmp_path):
    """Unpinned, the card vouches for the artifacts beside it; pinned, the card itself must be the one exported."""
    folder = _copy(exported[0], tmp_path)
    pinned = _pin(folder)
    digest = pinned.rsplit(":", 1)[1]
    before = load_predictor(pinned, backend="onnx-fp32")
    name, version = exported[1].name, exported[1].version
    assert before.model_id == f"{name}:{version}@sha256:{digest[:12]}#fp32" and folder not in before.model_id

    intruder = Path(folder, "model.int8.onnx").read_bytes()  # another valid graph of the same shapes
    Path(folder, "model.fp32.onnx").write_bytes(intruder)
    _edit_card(folder, lambda card: card["artifacts"]["fp32"].update(sha256=_sha256(intruder)))
    swapped = load_predictor(folder, backend="onnx-fp32")  # self-attested: accepted, and it is not the export
    assert not np.allclose(swapped.logits(TRAIN[0]), before.logits(TRAIN[0]), atol=1e-6)
    with pytest.raises(KdrayError, match=r"metadata.json: sha256 .* is not the pinned .*\(model_digest_mismatch\)"):
        load_predictor(pinned, backend="onnx-fp32")


def test_a_swapped_artifact_under_a_pin_is_refused_by_the_trusted_card(exported, tmp_path):
    folder = _copy(exported[0], tmp_path)
    pinned = _pin(folder)
    Path(folder, "model.weights.pt").write_bytes(b"not the weights")
    Path(folder, "model.fp32.onnx").write_bytes(Path(folder, "model.int8.onnx").read_bytes())
    with pytest.raises(KdrayError, match=r"model.fp32.onnx: sha256 .* does not match .*\(artifact_digest_mismatch\)"):
        load_predictor(pinned, backend="onnx-fp32")
    from kdray.explain import Explainer

    with pytest.raises(KdrayError, match=r"model.weights.pt: sha256 .*\(artifact_digest_mismatch\)"):
        Explainer.load(pinned)


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_an_artifact_outside_the_export_is_refused_even_with_its_true_sha256(exported, tmp_path, where):
    folder = _copy(exported[0], tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(Path(folder, "model.fp32.onnx"), outside / "model.onnx")
    file = "../outside/model.onnx" if where == "parent" else str(outside / "model.onnx")
    _edit_card(folder, lambda card: card["artifacts"]["fp32"].update(file=file))
    with pytest.raises(KdrayError, match=r"artifacts.fp32.file: .*not a plain file name"):
        load_predictor(folder, backend="onnx-fp32")
    _edit_card(folder, lambda card: card["artifacts"]["fp32"].update(file="model.fp32.onnx"))
    _edit_card(folder, lambda card: card["torch_weights"].update(file=file))
    with pytest.raises(KdrayError, match=r"torch_weights.file: .*not a plain file name"):
        read_model_card(folder)


def test_a_card_built_around_the_schema_still_cannot_name_a_file_outside(exported):
    """Where the file is joined to the folder, the name is checked again (a card made without validation)."""
    from kdray.pinning import IntegrityError
    from kdray.predictor import Export

    folder, card = exported
    entry = card.artifacts["fp32"]
    bad = card.model_copy(update={"artifacts": {"fp32": entry.model_copy(update={"file": "../model.fp32.onnx"})}})
    with pytest.raises(IntegrityError, match=r"not a plain file name .*\(artifact_outside_export\)"):
        Export(folder, bad, "0" * 64, pinned=True).read_verified("../model.fp32.onnx", entry.sha256)


def test_an_artifact_swapped_after_its_check_is_not_what_gets_loaded(exported, tmp_path, monkeypatch):
    """The file changes on disk the moment its sha256 has been computed: what runs must be the bytes that were
    checked (they are loaded from memory; there is no path or cache to load again)."""
    folder = _copy(exported[0], tmp_path)
    fp32, int8 = Path(folder, "model.fp32.onnx"), Path(folder, "model.int8.onnx").read_bytes()
    checked = _sha256(fp32.read_bytes())
    expected = load_predictor(folder, backend="onnx-fp32").logits(TRAIN[0])
    real_sha256 = hashlib.sha256

    class SwapAfterHashing:
        def __init__(self, data: bytes = b""):
            self.inner = real_sha256(data)

        def update(self, data: bytes) -> None:
            self.inner.update(data)

        def hexdigest(self) -> str:
            digest = self.inner.hexdigest()
            if digest == checked:
                fp32.write_bytes(int8)
            return digest

    monkeypatch.setattr(hashlib, "sha256", SwapAfterHashing)
    predictor = load_predictor(folder, backend="onnx-fp32")
    monkeypatch.setattr(hashlib, "sha256", real_sha256)
    assert _sha256(fp32.read_bytes()) == _sha256(int8)  # the swap did happen, after the check
    assert np.allclose(predictor.logits(TRAIN[0]), expected, atol=1e-6)


def test_the_torch_backend_checks_the_source_checkpoint_against_the_card(checkpoint, tmp_path):
    source = str(tmp_path / "ckpt")
    shutil.copytree(checkpoint, source)
    card = _export(source, tmp_path / "exp", int8=False)
    out = str(tmp_path / "exp")
    assert card.source_checkpoint_sha256 == _sha256(Path(source, "model.pt").read_bytes())
    pinned = _pin(out)
    assert load_predictor(pinned, backend="torch").model_id == f"{card.name}:{card.version}@sha256:" \
        f"{pinned.rsplit(':', 1)[1][:12]}#torch"
    other = build_model("tiny_student", len(CLASSES), 0.2).state_dict()
    torch.save(other, Path(source, "model.pt"))  # another net's weights in the source checkpoint
    for reference in (out, pinned):
        with pytest.raises(KdrayError, match=r"model.pt: sha256 .* does not match .*\(checkpoint_digest_mismatch\)"):
            load_predictor(reference, backend="torch")


def test_a_pinned_export_without_the_source_digest_has_no_torch_backend(exported, tmp_path):
    folder = _copy(exported[0], tmp_path)
    _edit_card(folder, lambda card: card.pop("source_checkpoint_sha256"))
    assert isinstance(load_predictor(folder, backend="torch"), TorchPredictor)  # unpinned: loads as before
    with pytest.raises(KdrayError, match=r"\(checkpoint_unverifiable\)"):
        load_predictor(_pin(folder), backend="torch")


# ----------------------------------------------------------------------------- each decision, forced


def test_int8_that_passes_every_check_is_served_with_its_own_operating_point(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(export.PARITY_BARS, "int8", 0.0)
    _force_covid_suspect_agreement(monkeypatch, fp32=1.0, int8=1.0)
    card = _export(checkpoint, tmp_path / "exp")
    assert card.served_artifact == "int8" and all(a.validated for a in card.artifacts.values())
    assert set(card.operating_points) == {"fp32", "int8"}
    assert card.parity["int8"].covid_suspect_agreement == 1.0
    predictor = load_predictor(str(tmp_path / "exp"))
    op = card.operating_points["int8"]
    assert predictor.backend == "onnx-int8"
    assert (predictor.temperature, predictor.covid_threshold) == (op.temperature, op.covid_threshold)
    images, labels = _images(24, 5)
    refit = calibration_report(labels, predictor.logits(images), list(CLASSES), 0.95)  # int8's own logits
    assert refit.temperature == pytest.approx(op.temperature, rel=1e-6)
    assert refit.covid_threshold == pytest.approx(op.covid_threshold, rel=1e-6)


def _assert_fp32_served(card: ModelCard, out: str) -> None:
    assert card.artifacts["int8"].validated is False and card.artifacts["fp32"].validated is True
    assert card.served_artifact == "fp32" and set(card.operating_points) == {"fp32"}
    assert read_model_card(out) == card
    assert load_predictor(out).backend == "onnx-fp32"
    with pytest.raises(KdrayError, match="failed its parity check"):
        load_predictor(out, backend="onnx-int8")


def test_int8_failing_top1_parity_is_kept_unvalidated_and_fp32_is_served(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(export.PARITY_BARS, "int8", 1.01)
    out = str(tmp_path / "exp")
    with pytest.raises(export.ParityError, match=r"int8 artifact failed parity: top-1 agreement .*< 101\.0%") as err:
        _export(checkpoint, out)
    card = err.value.metadata
    assert isinstance(card, ModelCard)
    _assert_fp32_served(card, out)
    assert card.parity["int8"].covid_suspect_agreement is None  # no operating point was fitted for it

    lenient = _export(checkpoint, tmp_path / "lenient", strict=False)  # the same, without the error
    _assert_fp32_served(lenient, str(tmp_path / "lenient"))


def test_int8_failing_only_covid_suspect_agreement_is_not_validated(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(export.PARITY_BARS, "int8", 0.0)  # int8 passes top-1 whatever the CPU
    _force_covid_suspect_agreement(monkeypatch, fp32=1.0, int8=0.5)
    out = str(tmp_path / "exp")
    with pytest.raises(export.ParityError, match=r"int8 artifact failed parity: covid_suspect agrees with torch "
                                                 r"on 50\.00% < 99%") as err:
        _export(checkpoint, out)
    card = err.value.metadata
    _assert_fp32_served(card, out)
    assert card.parity["int8"].covid_suspect_agreement == 0.5  # recorded, although it failed
    assert card.parity["int8"].top1_agreement >= 0.0


@pytest.mark.parametrize("failure, message", [
    ("top1", "fp32 artifact failed parity: top-1 agreement"),
    ("covid_suspect", "fp32 artifact failed parity: covid_suspect agrees with torch on 50.00%"),
])
def test_fp32_failing_writes_nothing_and_keeps_the_previous_export(checkpoint, tmp_path, monkeypatch, failure,
                                                                  message):
    out = tmp_path / "exp"
    _export(checkpoint, out, int8=False)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    if failure == "top1":
        monkeypatch.setitem(export.PARITY_BARS, "fp32", 1.01)
    else:
        _force_covid_suspect_agreement(monkeypatch, fp32=0.5)
    with pytest.raises(export.ParityError, match=message) as err:
        _export(checkpoint, out, int8=False)
    assert err.value.metadata is None and "nothing written" in str(err.value)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before  # still the previous export


def test_storage_lost_between_artifact_writes_commits_nothing_and_a_rerun_finishes(checkpoint, tmp_path,
                                                                                    monkeypatch):
    """S3 gone for good after the first artifact (storage.S3Unavailable once its retry budget is spent): the
    previous export's card is already removed, no new one is written, and the same export run again commits."""
    out = tmp_path / "exp"
    _export(checkpoint, out, int8=False)
    real_write = export.storage.write_bytes
    written = []

    def write_then_lose_s3(uri, data):
        if written:
            raise export.storage.S3Unavailable(f"{uri}: cannot reach S3 at http://127.0.0.1:1 (...) after retrying "
                                               "for 120 s; once it is back, re-run the same command to resume")
        written.append(uri)
        real_write(uri, data)

    monkeypatch.setattr(export.storage, "write_bytes", write_then_lose_s3)
    with pytest.raises(export.storage.S3Unavailable):
        _export(checkpoint, out, int8=False)
    assert len(written) == 1 and not (out / export.MODEL_CARD_FILE).exists()  # half-written is not an export
    monkeypatch.setattr(export.storage, "write_bytes", real_write)
    card = _export(checkpoint, out, int8=False)
    assert read_model_card(str(out)).artifacts == card.artifacts


def test_labels_must_match_the_validation_images(checkpoint, tmp_path):
    images, _ = _images(6, 5)
    with pytest.raises(KdrayError, match="3 labels for 6 validation images"):
        export.export_student(checkpoint, str(tmp_path / "exp"), images, images, [0, 1, 2])
    assert not (tmp_path / "exp").exists()


def test_covid_suspect_agreement_ignores_float_noise_at_the_threshold():
    logits = np.array([[0.0, 0, 0], [2, 0, 0], [-2, 0, 0], [0.5, 0, 0]])
    threshold = float(softmax(logits)[0, 0])  # as fitted: the threshold is one image's P(covid)
    op = OperatingPoint(artifact="fp32", split="val", n=4, temperature=1.0, covid_threshold=threshold,
                        target_sensitivity=0.95)
    reference = logits.copy()
    reference[0, 0] -= 1e-9  # torch just below the threshold on that image: float noise, not a disagreement
    assert export.covid_suspect_agreement(reference, logits, list(CLASSES), op) == 1.0
    reference[3, 0] = -0.5  # torch clearly below, the artifact clearly above: a real disagreement
    assert export.covid_suspect_agreement(reference, logits, list(CLASSES), op) == 0.75
    assert export.covid_suspect_agreement(reference, logits, ["a", "b", "c"], op) is None


# ----------------------------------------------------------------------------- jobs.export and jobs.predict


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """An ImageFolder tree: 24 fresh train images (calibration) and the 96 fitted images as val (parity)."""
    root = tmp_path_factory.mktemp("data")
    for split, (images, labels) in (("train", _images(24, 2)), ("val", TRAIN)):
        for i, (img, y) in enumerate(zip(images, labels)):
            (root / split / CLASSES[y]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / split / CLASSES[y] / f"{i:03d}.png")
    return root


def _table_row(printed: str, kind: str) -> str:
    (row,) = [line for line in printed.splitlines() if line.startswith(f"| {kind} |")]
    return row


def test_export_job_prints_parity_when_int8_fails(checkpoint, data, tmp_path, capsys, monkeypatch):
    from jobs import export as export_job

    monkeypatch.setitem(export.PARITY_BARS, "int8", 1.01)
    with pytest.raises(export.ParityError, match="int8 artifact failed parity"):
        export_job.main(["--model", checkpoint, "--data", str(data), "--output", str(tmp_path / "exp"),
                         "--calibration", "8", "--parity", "12"])
    printed = capsys.readouterr().out
    assert _table_row(printed, "int8").endswith("| False |") and _table_row(printed, "fp32").endswith("| True |")
    assert "served: fp32" in printed


def test_export_job_writes_args_and_prints_the_served_operating_point(checkpoint, data, tmp_path, capsys,
                                                                      monkeypatch):
    from jobs import export as export_job

    monkeypatch.setitem(export.PARITY_BARS, "int8", 0.0)
    _force_covid_suspect_agreement(monkeypatch, fp32=1.0, int8=1.0)
    out = str(tmp_path / "export")
    card = export_job.main(["--model", checkpoint, "--data", str(data), "--output", out, "--calibration", "16",
                            "--parity", "24", "--torchscript", "true"])
    printed = capsys.readouterr().out
    assert "top-1 agreement" in printed and f"-> {out}" in printed and "served: int8" in printed
    assert f"pinned: {_pin(out)}\n" in printed  # the digest of the metadata.json bytes written
    assert export.pinned_reference(out, card) == _pin(out)
    assert "calibration: 16" in Path(out, "args.yaml").read_text()
    assert card == read_model_card(out)
    assert card.parity["int8"].n == 24 and card.artifacts["torchscript"].validated is True
    assert card.operating_points["int8"].n == 24 and "torchscript" not in card.operating_points


def test_predict_flags_covid_suspects_at_the_served_threshold(exported, capsys):
    from jobs import predict

    out, card = exported
    images, _ = _images(6, 8)
    folder = Path(out).parent / "pngs"
    folder.mkdir(exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i}.png")
        paths.append(str(folder / f"{i}.png"))
    results = predict.main(paths + ["--model", out])
    lines = capsys.readouterr().out.strip().splitlines()
    threshold = card.operating_points[card.served_artifact].covid_threshold
    assert len(lines) == len(results) == 6
    for line, r in zip(lines, results):
        assert line.endswith("covid_suspect") == (r.probs[0] >= threshold) == r.covid_suspect


@pytest.mark.integration  # a subprocess that imports torch and onnxruntime: slow for the unit tier
def test_predict_cli_prints_one_line_per_image_and_one_line_errors(exported, tmp_path):
    out, _ = exported
    images, _ = _images(3, 9)
    good = str(tmp_path / "good.png")
    Image.fromarray(images[0]).save(good)
    bad = str(tmp_path / "broken.png")
    Path(bad).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    run = subprocess.run([sys.executable, "-m", "jobs.cli", "predict", good, bad, "--model", out],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    path, label, *probs = run.stdout.strip().split("\t")
    assert path == good and label in CLASSES and probs[0].startswith("p(covid)=")
    expected = load_predictor(out).probabilities(decode_image(Path(good).read_bytes(), SIZE)[None])[0]
    assert label == CLASSES[int(expected.argmax())]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {bad}: cannot decode image (")
    assert "Traceback" not in run.stderr


@pytest.mark.integration
def test_export_to_and_load_from_s3(checkpoint_factory, s3_bucket):
    uri = f"s3://{s3_bucket}/exports/tiny-student"
    card = _export(checkpoint_factory("student"), uri, strict=False)  # untrained: int8 may fail its checks
    assert read_model_card(uri) == card
    predictor = load_predictor(uri)
    assert predictor.backend == f"onnx-{card.served_artifact}"
    digest = hashlib.sha256(export.storage.read_bytes(f"{uri}/metadata.json")).hexdigest()
    assert predictor.model_id == f"{card.name}:{card.version}@sha256:{digest[:12]}#{card.served_artifact}"
    assert read_model_card(f"{uri}@sha256:{digest}") == card  # a pinned S3 export
    assert predictor.probabilities(_images(5, 6)[0]).shape == (5, 3)
