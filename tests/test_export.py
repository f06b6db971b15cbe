"""kdray.export, jobs.export and jobs.predict on a tiny student at 32 px (ONNX fp32 + int8)."""

from __future__ import annotations

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
from kdray.models import build_model
from kdray.runtime import Predictor, TorchPredictor
from kdray.synthetic import CLASSES, make_image

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
META = {"model_name": "tiny_student", "classes": list(CLASSES), "image_size": SIZE, "dropout": 0.2, "metrics": {},
        "covid_threshold": 0.4}


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
def exported(checkpoint, tmp_path_factory) -> tuple[str, dict]:
    calibration, _ = _images(64, 2)
    out = str(tmp_path_factory.mktemp("export"))
    metadata = export.export_student(checkpoint, out, calibration, *TRAIN, extra_metadata={"version": "9.9"})
    return out, metadata


def _copy(src: str, tmp_path: Path) -> str:
    dst = str(tmp_path / "copy")
    shutil.copytree(src, dst)
    return dst


def test_export_writes_validated_artifacts_and_model_card(exported, checkpoint):
    out, metadata = exported
    assert set(os.listdir(out)) >= {"model.fp32.onnx", "model.int8.onnx", "metadata.json"}
    card = json.loads(Path(out, "metadata.json").read_text())
    assert card == json.loads(json.dumps(metadata))
    assert card["classes"] == list(CLASSES) and card["image_size"] == SIZE and card["version"] == "9.9"
    assert {k: card["input"][k] for k in ("name", "shape", "dtype")} == {"name": "images", "shape": ["batch", SIZE, SIZE],
                                                                         "dtype": "uint8"}
    assert card["output"]["name"] == "logits" and card["preprocessing"] == preprocess_config(SIZE)
    assert card["intended_use"] == "research; not for diagnosis" and card["known_biases"]
    assert card["temperature"] == 1.0 and card["covid_threshold"] == 0.4 and card["metrics"] == {}
    assert card["source_checkpoint"] == checkpoint
    for kind, bar in (("fp32", 0.995), ("int8", 0.99)):
        art, par = card["artifacts"][kind], card["parity"][kind]
        assert art["validated"] is True and art["file"] == f"model.{kind}.onnx"
        assert art["sha256"] == export.sha256_file(os.path.join(out, art["file"])) and art["size_mb"] > 0
        assert par["n"] == 96 and par["top1_agreement"] >= bar and 0 <= par["max_abs_prob_diff"] < 0.2
    assert card["parity"]["fp32"]["max_abs_prob_diff"] < 1e-4


def test_load_picks_int8_and_agrees_with_torch(exported, checkpoint):
    out, _ = exported
    predictor = Predictor.load(out)
    assert isinstance(predictor, export.OrtPredictor) and predictor.backend == "onnx-int8"
    assert predictor.classes == list(CLASSES) and predictor.covid_threshold == 0.4
    images = TRAIN[0]
    reference = TorchPredictor.from_checkpoint(checkpoint).probabilities(images)
    probs = predictor.probabilities(images)
    assert probs.shape == (96, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert set(reference.argmax(1)) == {0, 1, 2}  # one predicted class for everything would make agreement trivial
    assert np.mean(probs.argmax(1) == reference.argmax(1)) >= 0.99
    fp32 = Predictor.load(out, backend="onnx-fp32", threads=1)
    assert fp32.backend == "onnx-fp32" and np.allclose(fp32.probabilities(images), reference, atol=1e-4)
    assert isinstance(Predictor.load(out, backend="torch"), TorchPredictor)


def test_ort_predictor_chunks_large_batches_without_changing_results(exported):
    out, _ = exported
    whole = Predictor.load(out, backend="onnx-fp32", threads=1)
    whole.chunk = 1000
    chunked = Predictor.load(out, backend="onnx-fp32", threads=1)
    chunked.chunk = 7  # 96 images: 13 full chunks and a remainder of 5
    assert np.allclose(chunked.logits(TRAIN[0]), whole.logits(TRAIN[0]), atol=1e-5)
    with pytest.raises(KdrayError, match="augmented views need the torch backend"):
        chunked.logits(TRAIN[0][:2], AugmentConfig(enabled=True), np.zeros(2, np.int64))


def test_missing_artifact_is_an_error(exported, tmp_path):
    folder = _copy(exported[0], tmp_path)
    os.remove(os.path.join(folder, "model.int8.onnx"))
    with pytest.raises(KdrayError, match="model.int8.onnx.*missing"):
        Predictor.load(folder)


def test_tampered_classes_are_an_error(exported, tmp_path):
    folder = _copy(exported[0], tmp_path)
    card = json.loads(Path(folder, "metadata.json").read_text())
    card["classes"] = ["covid", "normal", "pneumonia", "lung_opacity"]
    Path(folder, "metadata.json").write_text(json.dumps(card))
    with pytest.raises(KdrayError, match="outputs 3 scores but the model card lists 4 classes"):
        Predictor.load(folder)


def test_corrupt_onnx_is_an_error(exported, tmp_path):
    folder = _copy(exported[0], tmp_path)
    Path(folder, "model.int8.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(KdrayError, match="sha256 .* does not match"):
        Predictor.load(folder)


def test_missing_or_corrupt_metadata_is_an_error(exported, tmp_path):
    folder = _copy(exported[0], tmp_path)
    Path(folder, "metadata.json").write_text("{not json")
    with pytest.raises(KdrayError, match="corrupt model card"):
        Predictor.load(folder)
    os.remove(os.path.join(folder, "metadata.json"))
    with pytest.raises(KdrayError, match="metadata.json missing"):
        export.load_exported(folder)


def test_int8_parity_failure_raises_and_falls_back_to_fp32(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(export.PARITY_BARS, "int8", 1.01)
    images, labels = _images(20, 5)
    out = str(tmp_path / "exp")
    with pytest.raises(KdrayError, match=r"int8 artifact failed parity: top-1 agreement .*< 101\.0%"):
        export.export_student(checkpoint, out, images, images, labels)
    card = json.loads(Path(out, "metadata.json").read_text())
    assert card["artifacts"]["int8"]["validated"] is False and card["artifacts"]["fp32"]["validated"] is True
    assert Predictor.load(out).backend == "onnx-fp32"
    with pytest.raises(KdrayError, match="failed its parity check"):
        Predictor.load(out, backend="onnx-int8")
    lenient = export.export_student(checkpoint, str(tmp_path / "lenient"), images, images, int8=True, strict=False)
    assert lenient["artifacts"]["int8"]["validated"] is False


def test_fp32_parity_failure_writes_no_model_card(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(export.PARITY_BARS, "fp32", 1.01)
    images, _ = _images(20, 6)
    out = str(tmp_path / "exp")
    with pytest.raises(KdrayError, match="fp32 artifact failed parity"):
        export.export_student(checkpoint, out, images, images, int8=False)
    assert not os.path.exists(os.path.join(out, "metadata.json"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """An ImageFolder tree: 24 fresh train images (calibration) and the 96 fitted images as val (parity)."""
    root = tmp_path_factory.mktemp("data")
    for split, (images, labels) in (("train", _images(24, 2)), ("val", TRAIN)):
        for i, (img, y) in enumerate(zip(images, labels)):
            (root / split / CLASSES[y]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / split / CLASSES[y] / f"{i:03d}.png")
    return root


def test_export_job_prints_parity_when_int8_fails(checkpoint, data, tmp_path, capsys, monkeypatch):
    from jobs import export as export_job

    monkeypatch.setitem(export.PARITY_BARS, "int8", 1.01)
    with pytest.raises(export.ParityError, match="int8 artifact failed parity"):
        export_job.main(["--model", checkpoint, "--data", str(data), "--output", str(tmp_path / "exp"),
                         "--calibration", "8", "--parity", "12"])
    table = capsys.readouterr().out
    assert "| int8 | model.int8.onnx |" in table and "| False |" in table and "| True |" in table


def test_export_job_and_predict_cli(checkpoint, data, tmp_path, capsys):
    from jobs import export as export_job

    out = str(tmp_path / "export")
    metadata = export_job.main(["--model", checkpoint, "--data", str(data), "--output", out, "--calibration", "16",
                                "--parity", "24", "--torchscript", "true"])
    printed = capsys.readouterr().out
    assert "top-1 agreement" in printed and f"-> {out}" in printed
    assert "calibration: 16" in Path(out, "args.yaml").read_text()
    assert metadata["parity"]["int8"]["n"] == 24 and metadata["artifacts"]["torchscript"]["validated"] is True

    good = str(next((data / "val" / "covid").glob("*.png")))
    bad = str(tmp_path / "broken.png")
    Path(bad).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    run = subprocess.run([sys.executable, "-m", "kdray.cli", "predict", good, bad, "--model", out],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    path, label, *probs = run.stdout.strip().split("\t")
    assert path == good and label in CLASSES and probs[0].startswith("p(covid)=")
    expected = Predictor.load(out).probabilities(decode_image(Path(good).read_bytes(), SIZE)[None])[0]
    assert label == CLASSES[int(expected.argmax())]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {bad}: cannot decode image (")
    assert "Traceback" not in run.stderr


def test_predict_flags_covid_suspects(exported, capsys):
    from jobs import predict

    out, _ = exported
    images, _ = _images(6, 8)
    folder = Path(out).parent / "pngs"
    folder.mkdir(exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i}.png")
        paths.append(str(folder / f"{i}.png"))
    results = predict.main(paths + ["--model", out])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(results) == 6
    for line, r in zip(lines, results):
        assert line.endswith("covid_suspect") == (r["probs"][0] >= 0.4) == r["covid_suspect"]


@pytest.mark.integration
def test_export_to_and_load_from_s3(checkpoint, s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/exports/tiny-student"
    export.export_student(checkpoint, uri, _images(32, 2)[0], *TRAIN)
    predictor = Predictor.load(uri)
    assert predictor.backend == "onnx-int8"
    reference = TorchPredictor.from_checkpoint(checkpoint).probabilities(TRAIN[0])
    assert np.mean(predictor.probabilities(TRAIN[0]).argmax(1) == reference.argmax(1)) >= 0.99
