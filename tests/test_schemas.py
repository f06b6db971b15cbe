"""kdray.schemas: the model card, checkpoint meta and run summary are validated on write and on read, and a
bad one is refused with one line that names the problem."""

from __future__ import annotations

import copy
import json

import pytest

from kdray import KdrayError
from kdray.checkpoints import read_checkpoint_meta, read_run_summary, save_checkpoint
from kdray.predictor import MODEL_CARD_FILE, read_model_card
from kdray.schemas import MODEL_CARD_SCHEMA_VERSION, CheckpointMeta, ModelCard, dump, parse

SHA = "ab" * 32


def valid_card() -> dict:
    """A complete schema-2 model card for a 32 px export with fp32 and int8, int8 served."""
    def op(kind: str) -> dict:
        return {"artifact": kind, "split": "val", "n": 24, "temperature": 1.2, "covid_threshold": 0.3,
                "target_sensitivity": 0.95}

    return {
        "schema_version": MODEL_CARD_SCHEMA_VERSION, "name": "kdray-tiny_student", "version": "0.1.0",
        "description": "test card", "created": "2026-01-01T00:00:00+00:00", "model_name": "tiny_student",
        "classes": ["covid", "normal", "pneumonia"], "image_size": 32,
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "grayscale", "dtype": "uint8", "shape": [-1, 32, 32],
                                 "name": "images"}},
            "outputs": {"pred": {"type": "logits", "format": "classes", "dtype": "float32", "shape": [-1, 3],
                                 "name": "logits"}}},
        "preprocessing": {"image_size": 32},
        "artifacts": {kind: {"file": f"model.{kind}.onnx", "format": "onnx", "precision": kind, "sha256": SHA,
                             "size_mb": 0.1, "validated": True} for kind in ("fp32", "int8")},
        "served_artifact": "int8",
        "parity": {kind: {"n": 24, "top1_agreement": 1.0, "max_abs_prob_diff": 0.01, "covid_suspect_agreement": 1.0}
                   for kind in ("fp32", "int8")},
        "parity_bars": {"fp32": 0.995, "int8": 0.99, "covid_suspect": 0.99},
        "operating_points": {"fp32": op("fp32"), "int8": op("int8")},
        "source_checkpoint": "/runs/student/checkpoint_000002", "intended_use": "research; not for diagnosis",
        "known_biases": "synthetic data",
        "versions": {"kdray": "0.1.0", "torch": "2", "onnx": "1", "onnxruntime": "1", "numpy": "2",
                     "onnx_opset": 17},
    }


V1_CARD = {  # what kdray wrote before the schema: no schema_version, calibration at the top level
    "name": "kdray-tiny_student", "version": "0.1.0", "classes": ["covid", "normal", "pneumonia"], "image_size": 32,
    "framework": "onnx", "input": {"name": "images", "dtype": "uint8", "shape": ["batch", 32, 32]},
    "output": {"name": "logits"}, "temperature": 1.0, "covid_threshold": 0.4, "metrics": {},
    "artifacts": {"fp32": {"file": "model.fp32.onnx", "sha256": SHA, "validated": True}},
}


def _write(folder, card: dict) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_CARD_FILE).write_text(json.dumps(card))
    return str(folder)


def _refused(folder) -> str:
    with pytest.raises(KdrayError) as err:
        read_model_card(str(folder))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{folder}/{MODEL_CARD_FILE}: invalid ModelCard ("), message
    return message


def test_valid_card_round_trips(tmp_path):
    card = ModelCard.model_validate(valid_card())
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / MODEL_CARD_FILE).write_text(json.dumps(dump(card)))
    again = read_model_card(str(folder))
    assert again == card and dump(again) == dump(card)
    assert again.operating_point("int8").covid_threshold == 0.3 and again.operating_point("torchscript") is None


def test_unknown_field_is_refused(tmp_path):
    card = valid_card()
    card["temprature"] = 1.0
    assert "temprature: Extra inputs are not permitted" in _refused(_write(tmp_path / "x", card))
    nested = valid_card()
    nested["artifacts"]["int8"]["calibrated"] = True
    assert "artifacts.int8.calibrated: Extra inputs are not permitted" in _refused(_write(tmp_path / "y", nested))


def test_missing_required_field_is_named(tmp_path):
    card = valid_card()
    del card["served_artifact"]
    assert "served_artifact: Field required" in _refused(_write(tmp_path / "x", card))


def test_card_without_schema_version_is_refused(tmp_path):
    for name, card in (("v1", V1_CARD), ("v2-without-version", {k: v for k, v in valid_card().items()
                                                                if k != "schema_version"})):
        message = _refused(_write(tmp_path / name, card))
        assert "no schema_version" in message and "export the model again" in message


def test_schema_version_1_is_refused(tmp_path):
    card = {**copy.deepcopy(V1_CARD), "schema_version": 1}
    message = _refused(_write(tmp_path / "v1", card))
    assert f"schema_version 1 is not supported (this kdray reads {MODEL_CARD_SCHEMA_VERSION})" in message


def test_inconsistent_cards_are_refused(tmp_path):
    unvalidated = valid_card()
    unvalidated["artifacts"]["int8"]["validated"] = False
    assert "served_artifact 'int8' did not pass its parity check" in _refused(_write(tmp_path / "a", unvalidated))
    absent = valid_card()
    absent["served_artifact"] = "torchscript"
    assert "served_artifact 'torchscript' is not among the artifacts" in _refused(_write(tmp_path / "b", absent))
    stray = valid_card()
    del stray["artifacts"]["int8"]
    stray["served_artifact"] = "fp32"
    assert "operating point for 'int8', which is not among the artifacts" in _refused(_write(tmp_path / "c", stray))


def _meta(**changes) -> dict:
    return {"model_name": "tiny_student", "classes": ["covid", "normal", "pneumonia"], "image_size": 32, **changes}


def test_checkpoint_meta_with_a_bad_model_name_is_refused(tmp_path):
    with pytest.raises(KdrayError, match=r"^ckpt: invalid CheckpointMeta \(model_name: Input should be 'teacher', "):
        parse(CheckpointMeta, _meta(model_name="resnet18"), "ckpt")
    with pytest.raises(KdrayError, match="model_name"):  # validated on write: nothing is saved
        save_checkpoint(str(tmp_path / "w"), {}, _meta(model_name="resnet18"))
    assert not (tmp_path / "w").exists()
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "meta.json").write_text(json.dumps(_meta(model_name="resnet18")))
    with pytest.raises(KdrayError) as err:  # and on read
        read_checkpoint_meta(str(tmp_path / "r"))
    assert "\n" not in str(err.value) and "meta.json: invalid CheckpointMeta (model_name:" in str(err.value)


def test_checkpoint_meta_defaults_and_ranges():
    meta = parse(CheckpointMeta, _meta(), "ckpt")
    assert meta.temperature == 1.0 and meta.covid_threshold is None and meta.metrics == {}
    with pytest.raises(KdrayError, match="temperature: Input should be greater than 0"):
        parse(CheckpointMeta, _meta(temperature=0), "ckpt")
    with pytest.raises(KdrayError, match="image_size: Input should be greater than or equal to 8"):
        parse(CheckpointMeta, _meta(image_size=4), "ckpt")


def test_run_summary_is_validated_on_read(tmp_path):
    (tmp_path / "result.json").write_text(json.dumps({"run_name": "r", "run_uri": str(tmp_path)}))
    with pytest.raises(KdrayError, match=r"result.json: invalid RunSummary \(best_checkpoint: Field required"):
        read_run_summary(str(tmp_path))
