"""serve/handler.py: the replica's model handler, run with no Ray and no server."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from cluster.local.demo_data import dicom_bytes
from kdray.images import ImageRefused
from serve import oip
from serve.explaining import ExplainBusy
from serve.handler import StudentHandler
from serve.options import ExplainOptions

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def handler(tiny_export) -> StudentHandler:
    return StudentHandler(tiny_export[0], explain=ExplainOptions(max_in_flight=1, threads=1, nice=0))


def _png(side: int = 48, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def run(coroutine):
    return asyncio.run(coroutine)


def test_predicts_a_png_and_a_dicom_as_the_transport_would_return_them(handler):
    prediction = run(handler.predict(_png()))
    assert prediction.label in handler.classes and abs(sum(prediction.probabilities.values()) - 1) < 1e-5
    assert prediction.covid_suspect == (prediction.probabilities["covid"] >= 0.3) or prediction.covid_suspect is None
    assert "explanation" not in prediction.model_dump(exclude_unset=True)
    dicom = run(handler.predict(dicom_bytes(np.random.default_rng(1).integers(0, 4095, (64, 64)))))
    assert dicom.model_id == prediction.model_id
    assert handler.health().batched_images >= 2


def test_a_dicom_answered_as_dicom_is_its_sr_with_the_same_probabilities(handler):
    import pydicom

    from kdray.dicom_results import NotADicomSource, SourceHeaderRefused

    data = dicom_bytes(np.random.default_rng(2).integers(0, 4095, (64, 64)), PatientID="P-2")
    sr = pydicom.dcmread(io.BytesIO(run(handler.structured_report(data))))
    source = pydicom.dcmread(io.BytesIO(data))
    assert sr.Modality == "SR" and sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == "P-2"
    numbers = [float(e.value) for e in sr.iterall() if e.keyword == "NumericValue"]
    expected = run(handler.predict(data)).probabilities
    assert numbers == pytest.approx([expected[c] for c in handler.classes], abs=1e-6)
    with pytest.raises(NotADicomSource):
        run(handler.structured_report(_png()))
    with pytest.warns(UserWarning):
        bad = dicom_bytes(np.zeros((64, 64), np.uint16) + 9, StudyDate="sometime")
    with pytest.raises(SourceHeaderRefused):  # the transport's 400 bad_dicom_header
        run(handler.structured_report(bad))


def test_refusals_are_exceptions_with_reason_codes(handler):
    with pytest.raises(ImageRefused) as refused:
        run(handler.predict(_png(side=1)))
    assert refused.value.reason == "too_small"
    with pytest.raises(ImageRefused) as refused:
        run(handler.predict(b"<html>not an image</html>"))
    assert refused.value.reason == "not_an_image"


def test_explanation_comes_with_the_same_prediction_and_is_gated(handler):
    plain = run(handler.predict(_png(seed=3)))
    explained = run(handler.predict(_png(seed=3), explain=True))
    assert explained.label == plain.label and explained.explanation.explained_class == plain.label
    assert base64.b64decode(explained.explanation.overlay_png).startswith(b"\x89PNG")
    seen = Image.open(io.BytesIO(base64.b64decode(explained.explanation.image_png)))  # the viewer shows a DICOM so
    assert seen.mode == "L" and seen.size == (handler.predictor.image_size,) * 2
    handler.explaining.admit()  # the one slot taken: the next explanation is refused at once
    try:
        with pytest.raises(ExplainBusy):
            run(handler.predict(_png(), explain=True))
    finally:
        handler.explaining.release()
    assert handler.health().explain_refused >= 1


def test_open_inference_protocol_round_trip_and_a_refused_image_named(handler):
    body = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                                   "data": [base64.b64encode(_png(seed=i)).decode() for i in range(2)]}]})
    reply, headers = run(handler.infer(oip.parse_infer_request(body.encode(), None)))
    outputs = {o["name"]: o for o in json.loads(reply)["outputs"]}
    assert headers["content-type"] == "application/json"
    assert outputs["probabilities"]["shape"] == [2, len(handler.classes)] and len(outputs["label"]["data"]) == 2
    bad = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                                  "data": [base64.b64encode(_png()).decode(), base64.b64encode(b"x").decode()]}]})
    with pytest.raises(oip.OipError, match=r"image\[1\] refused \(not_an_image\)"):
        run(handler.infer(oip.parse_infer_request(bad.encode(), None)))
    assert handler.knows_model(handler.model_name) and not handler.knows_model("other")


def _oip_body(images: list[bytes], **parameters) -> bytes:
    return json.dumps({"parameters": parameters, "inputs": [{"name": "image", "datatype": "BYTES",
                       "shape": [len(images)], "data": [base64.b64encode(i).decode() for i in images]}]}).encode()


def _counting_decodes(handler, monkeypatch) -> list:
    """Patches the handler's loader to record each image it decodes."""
    from serve import handler as module

    decoded, load = [], module.load_image

    def counting(data, size, limits):
        decoded.append(len(data))
        return load(data, size, limits)

    monkeypatch.setattr(module, "load_image", counting)
    return decoded


def test_the_explanation_budget_counts_images_and_refuses_a_large_request_up_front(handler, monkeypatch):
    decoded = _counting_decodes(handler, monkeypatch)
    png = _png(seed=5)
    # over the OIP image cap too; built directly, as a transport with a higher cap would
    request = oip.InferRequest([png] * 200, binary_outputs={oip.LABEL: False, oip.EXPLANATION: False}, explain=True)
    explained = handler.explaining.explained
    with pytest.raises(Exception, match="200 images to explain; at most 8") as refused:
        run(handler.infer(request))
    assert type(refused.value).__name__ == "ExplainTooLarge"  # the transport's 400, not a 503 to retry
    assert decoded == [] and handler.explaining.explained == explained  # refused before any work
    assert handler.explaining.in_flight == handler.explaining.images_in_flight == 0
    # Room for 8 images: 6 being explained leave no room for 3 more, which are busy, not too large.
    handler.explaining.max_in_flight = 2
    handler.explaining.admit(6)
    try:
        with pytest.raises(ExplainBusy):
            run(handler.infer(run(handler.parse_infer(_oip_body([png] * 3, explain=True), None))))
        reply, _ = run(handler.infer(run(handler.parse_infer(_oip_body([png] * 2, explain=True), None))))
        assert len({o["name"]: o for o in json.loads(reply)["outputs"]}["explanation"]["data"]) == 2
    finally:
        handler.explaining.release(6)
        handler.explaining.max_in_flight = 1


def test_a_requests_images_share_one_decode_budget(tiny_export, monkeypatch):
    from kdray.images import load_image

    from serve.options import RequestOptions

    png = _png(side=64, seed=6)
    cost = load_image(png, 32).decode_bytes
    budgeted = StudentHandler(tiny_export[0], requests=RequestOptions(max_decode_bytes=3 * cost), worker_threads=1)
    decoded = _counting_decodes(budgeted, monkeypatch)
    reply, _ = run(budgeted.infer(run(budgeted.parse_infer(_oip_body([png] * 3), None))))
    assert len(json.loads(reply)["outputs"][0]["data"]) == 3 * len(budgeted.classes)  # exactly the budget: served
    decoded.clear()
    with pytest.raises(oip.OipError, match=r"image\[3\] refused \(request_decode_budget\)") as refused:
        run(budgeted.infer(run(budgeted.parse_infer(_oip_body([png] * 20), None))))
    assert refused.value.reason == "request_decode_budget"
    assert len(decoded) == 4  # the fourth crossed the budget; the other 16 were never decoded
    with pytest.raises(oip.OipError, match=r"refused \(request_decode_budget\)"):  # the explain path too
        run(budgeted.infer(run(budgeted.parse_infer(_oip_body([png] * 5, explain=True), None))))


def test_the_card_tells_what_answers_and_what_its_threshold_means(handler, tiny_export):
    card = tiny_export[1]
    point = card.operating_points[card.served_artifact]
    shown = handler.card
    assert (shown.name, shown.version, shown.model_id) == (card.name, card.version, handler.predictor.model_id)
    assert shown.covid_threshold == point.covid_threshold == handler.predictor.covid_threshold
    assert shown.target_sensitivity == point.target_sensitivity
    assert shown.threshold_fitted_on == f"{point.split} split, {point.n} images"
    assert (shown.intended_use, shown.known_biases) == (card.intended_use, card.known_biases)
