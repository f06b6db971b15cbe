"""kdray.pinning: pinned references (``<export>@sha256:<digest of metadata.json>``), accepted wherever a model is
named (scoring, ``kdray predict``, ``kdray explain``, serving's model_dir), and ``model_id`` without a location.

The refusals of a swapped card or artifact are in tests/test_export.py, beside the export they tamper with."""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

from kdray import KdrayError
from kdray.pinning import IntegrityError, ModelRef, model_id, parse_ref, plain_file_name

pytestmark = pytest.mark.unit
DIGEST = "ab" * 32


def _card_digest(folder: str) -> str:
    return hashlib.sha256(Path(folder, "metadata.json").read_bytes()).hexdigest()


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- the reference and the names


@pytest.mark.parametrize("text, expected", [
    ("runs/export", ModelRef("runs/export")),
    (f"runs/export@sha256:{DIGEST}", ModelRef("runs/export", DIGEST)),
    (f" s3://bucket/a@b/export@sha256:{DIGEST.upper()} ", ModelRef("s3://bucket/a@b/export", DIGEST)),
    ("folder@v2", ModelRef("folder@v2")),  # an @ alone is part of the name
])
def test_a_reference_is_pinned_only_by_a_full_sha256(text, expected):
    ref = parse_ref(text)
    assert ref == expected
    assert parse_ref(str(ref)) == ref


@pytest.mark.parametrize("text", [f"export@sha256:{DIGEST[:-1]}", "export@sha256:", f"@sha256:{DIGEST}",
                                  f"export@sha256:{'g' * 64}"])
def test_a_malformed_pin_is_refused_not_treated_as_a_folder(text):
    with pytest.raises(IntegrityError, match=r"\(bad_model_pin\)") as err:
        parse_ref(text)
    assert err.value.reason == "bad_model_pin"


@pytest.mark.parametrize("name", ["", ".", "..", "../model.onnx", "/etc/passwd", "sub/model.onnx", "a\\b.onnx",
                                  "x\x00.onnx"])
def test_only_plain_file_names_stay_inside_an_export(name):
    with pytest.raises(ValueError, match="not a plain file name"):
        plain_file_name(name)


def test_plain_file_names_pass():
    assert plain_file_name("model.int8.onnx") == "model.int8.onnx"
    assert plain_file_name("..model.onnx") == "..model.onnx"  # a name that starts with dots is still inside


def test_model_id_is_name_version_and_digest():
    assert model_id("kdray-student", "3", "1a2b3c4d5e6f" + "0" * 52, "int8") == "kdray-student:3@sha256:1a2b3c4d5e6f#int8"


def test_an_integrity_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(IntegrityError("model_digest_mismatch", "x: differs")))
    assert err.reason == "model_digest_mismatch" and str(err) == "x: differs (model_digest_mismatch)"


# ----------------------------------------------------------------------------- a pin, wherever a model is named


def test_scoring_predict_and_explain_accept_a_pinned_export(tiny_export, tmp_path, capsys):
    from jobs import explain, predict
    from kdray.score import score_archive

    folder, card = tiny_export
    pinned = f"{folder}@sha256:{_card_digest(folder)}"
    expected_id = f"{card.name}:{card.version}@sha256:{_card_digest(folder)[:12]}#{card.served_artifact}"
    (tmp_path / "in").mkdir()
    for i in range(3):
        (tmp_path / "in" / f"{i}.png").write_bytes(_png(i))

    summary = score_archive(pinned, str(tmp_path / "in"), str(tmp_path / "out"), engine="local")
    assert summary.scored == 3 and summary.model == pinned
    rows = pads.dataset(tmp_path / "out" / "predictions", format="parquet").to_table()
    assert set(rows["model_id"].to_pylist()) == {expected_id}  # the scoring output names the model, not its folder

    images = [str(tmp_path / "in" / f"{i}.png") for i in range(3)]
    assert len(predict.main(images + ["--model", pinned])) == 3
    assert len(explain.main(images + ["--model", pinned, "--output", str(tmp_path / "overlays")])) == 3
    capsys.readouterr()


def test_a_pinned_export_whose_card_changed_loads_nowhere(tiny_export, tmp_path):
    from jobs import predict
    from kdray.explain import Explainer
    from kdray.predictor import load_predictor, model_info
    from kdray.score import score_archive

    folder = str(tmp_path / "export")
    shutil.copytree(tiny_export[0], folder)
    pinned = f"{folder}@sha256:{_card_digest(folder)}"
    card = Path(folder, "metadata.json")
    card.write_text(card.read_text().replace('"research; not for diagnosis"', '"diagnosis"'))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "0.png").write_bytes(_png(0))
    for load in (lambda: load_predictor(pinned), lambda: model_info(pinned), lambda: Explainer.load(pinned),
                 lambda: predict.main([str(tmp_path / "in" / "0.png"), "--model", pinned]),
                 lambda: score_archive(pinned, str(tmp_path / "in"), str(tmp_path / "out"), engine="local")):
        with pytest.raises(KdrayError, match=r"is not the pinned .*\(model_digest_mismatch\)"):
            load()
    assert load_predictor(folder).backend  # unpinned, the edited card vouches for itself (self-attested)


def test_a_pin_on_something_that_is_not_an_export_is_refused(checkpoint_factory):
    from kdray.predictor import load_predictor

    with pytest.raises(KdrayError, match="not an exported model"):
        load_predictor(f"{checkpoint_factory()}@sha256:{DIGEST}")


def test_serving_keeps_the_pin_of_its_model_dir(tiny_export, monkeypatch):
    from serve import app

    folder = tiny_export[0]
    pinned = f"{folder}@sha256:{DIGEST}"
    assert app._resolve_model_dir(pinned) == pinned
    monkeypatch.chdir(Path(folder).parent)
    assert app._resolve_model_dir(f"{Path(folder).name}@sha256:{DIGEST}") == pinned  # made absolute, pin kept
    assert app._resolve_model_dir(f"s3://b/export@sha256:{DIGEST}") == f"s3://b/export@sha256:{DIGEST}"
    with pytest.raises(KdrayError, match="is not a folder"):
        app._resolve_model_dir(f"{folder}-missing@sha256:{DIGEST}")


def test_model_id_of_a_checkpoint_is_its_weights_digest(checkpoint_factory):
    from kdray.predictor import load_predictor

    folder = checkpoint_factory()
    weights = hashlib.sha256(Path(folder, "model.pt").read_bytes()).hexdigest()
    predictor = load_predictor(folder, backend="torch")
    assert predictor.model_id == f"kdray-tiny_student:checkpoint@sha256:{weights[:12]}#torch"
    assert folder not in predictor.model_id
