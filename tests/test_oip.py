"""Open Inference Protocol v2 codec (serve/oip.py): requests as tritonclient builds them, responses as it reads them.

The wire format is checked against tritonclient's own request builder and result parser, offline."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest

from serve import oip

pytestmark = pytest.mark.unit
httpclient = pytest.importorskip("tritonclient.http")
IMAGES = [b"\x89PNG fake one", b"DICM-ish two \x00\x01", b""]


def _triton_request(binary: bool, outputs: list[tuple[str, bool]] | None = None,
                    parameters: dict | None = None) -> tuple[bytes, str | None]:
    """The exact body (and Inference-Header-Content-Length) an unmodified tritonclient sends."""
    from tritonclient.http._utils import _get_inference_request

    tensor = httpclient.InferInput(oip.INPUT_NAME, [len(IMAGES)], "BYTES")
    values = IMAGES if binary else [base64.b64encode(i) for i in IMAGES]
    tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
    wanted = None if outputs is None else [httpclient.InferRequestedOutput(n, binary_data=b) for n, b in outputs]
    body, json_size = _get_inference_request(inputs=[tensor], request_id="req-7", outputs=wanted, sequence_id=0,
                                             sequence_start=False, sequence_end=False, priority=0, timeout=None,
                                             custom_parameters=parameters)
    return (body if isinstance(body, bytes) else body.encode()), (None if json_size is None else str(json_size))


@pytest.mark.parametrize("binary", [True, False])
def test_parses_what_tritonclient_sends(binary: bool) -> None:
    body, header_length = _triton_request(binary)
    request = oip.parse_infer_request(body, header_length)
    assert request.images == IMAGES and request.id == "req-7"
    # no outputs named: tritonclient asks for every output in binary
    assert request.binary_outputs == {oip.PROBABILITIES: True, oip.LABEL: True}


@pytest.mark.parametrize("binary", [True, False])
def test_response_reads_back_in_tritonclient(binary: bool) -> None:
    body, header_length = _triton_request(binary, [(oip.PROBABILITIES, binary), (oip.LABEL, binary)])
    request = oip.parse_infer_request(body, header_length)
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3]], np.float32)
    labels = ["covid", "pneumonia", "normal"]
    payload, headers = oip.encode_infer_response("kdray-student", "3", request, probs, labels)
    result = httpclient.InferResult.from_response_body(payload, header_length=(
        int(headers[oip.HEADER_LENGTH]) if oip.HEADER_LENGTH in headers else None))
    assert np.array_equal(result.as_numpy(oip.PROBABILITIES), probs)
    got = result.as_numpy(oip.LABEL)
    assert [v.decode() if isinstance(v, bytes) else v for v in got] == labels
    meta = result.get_response()
    assert meta["model_name"] == "kdray-student" and meta["id"] == "req-7"
    assert (oip.HEADER_LENGTH in headers) is binary


@pytest.mark.parametrize("binary", [True, False])
def test_explain_parameter_adds_the_overlays_in_the_clients_mode(binary: bool) -> None:
    from types import SimpleNamespace

    wanted = [(oip.PROBABILITIES, binary), (oip.LABEL, binary)]
    body, header_length = _triton_request(binary, wanted, parameters={"explain": True})
    request = oip.parse_infer_request(body, header_length)
    assert request.explain and request.binary_outputs[oip.EXPLANATION] is False  # not named: the default mode
    body, header_length = _triton_request(binary, wanted + [(oip.EXPLANATION, binary)])
    request = oip.parse_infer_request(body, header_length)
    assert request.explain and request.binary_outputs[oip.EXPLANATION] is binary  # asking for it is enough
    overlays = [b"\x89PNG one", b"\x89PNG two", b"\x89PNG three"]
    explanations = [SimpleNamespace(overlay_png=o, explained_class=c, torch_class=t)
                    for o, c, t in zip(overlays, ["covid", "normal", "covid"], ["covid", "normal", "normal"])]
    probs = np.full((3, 3), 1 / 3, np.float32)
    payload, headers = oip.encode_infer_response("m", "1", request, probs, ["covid", "normal", "covid"], explanations)
    result = httpclient.InferResult.from_response_body(payload, header_length=(
        int(headers[oip.HEADER_LENGTH]) if oip.HEADER_LENGTH in headers else None))
    got = list(result.as_numpy(oip.EXPLANATION))
    assert (got if binary else [base64.b64decode(v) for v in got]) == overlays
    assert result.get_response()["parameters"] == {"explained_class": "covid,normal,covid",
                                                   "torch_class": "covid,normal,normal"}
    plain = oip.parse_infer_request(*_triton_request(binary, wanted))
    assert not plain.explain and oip.EXPLANATION not in plain.binary_outputs
    with pytest.raises(oip.OipError, match="parameters.explain must be a boolean"):
        oip.parse_infer_request(*_triton_request(binary, wanted, parameters={"explain": 3}))


def test_only_the_requested_outputs_come_back() -> None:
    body, header_length = _triton_request(True, [(oip.LABEL, False)])
    request = oip.parse_infer_request(body, header_length)
    payload, headers = oip.encode_infer_response("m", "1", request, np.ones((3, 3), np.float32), ["a", "b", "c"])
    assert json.loads(payload)["outputs"] == [{"name": "label", "datatype": "BYTES", "shape": [3],
                                               "data": ["a", "b", "c"]}]
    assert headers == {"content-type": "application/json"}


def _json_request(**tensor) -> bytes:
    base = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(b"x").decode()]}
    return json.dumps({"inputs": [{**base, **tensor}]}).encode()


@pytest.mark.parametrize("body, header_length, message", [
    (b"{not json", None, "not valid JSON"),
    (b"[]", None, "JSON object"),
    (json.dumps({"inputs": []}).encode(), None, "exactly one input"),
    (_json_request(name="pixels"), None, "unknown input 'pixels'"),
    (_json_request(datatype="FP32"), None, "datatype BYTES"),
    (_json_request(shape=[0]), None, "shape [N]"),
    (_json_request(shape=[2]), None, "2 base64 strings"),
    (_json_request(data=["@@not base64@@"]), None, "not valid base64"),
    (_json_request(data=[7]), None, "must be a base64 string"),
    (json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["eA=="]}],
                 "outputs": [{"name": "logits"}]}).encode(), None, "unknown output 'logits'"),
    (b'{"inputs": []}', "abc", "must be an integer"),
    (b'{"inputs": []}', "999", "does not fit"),
])
def test_malformed_requests_say_what_is_wrong(body: bytes, header_length, message: str) -> None:
    with pytest.raises(oip.OipError, match=message.replace("[", r"\[").replace("]", r"\]")):
        oip.parse_infer_request(body, header_length)


def _binary_header(count: int, size: int) -> bytes:
    return json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [count],
                                   "parameters": {"binary_data_size": size}}]}).encode()


def test_binary_sizes_are_checked() -> None:
    one_element = struct.pack("<I", 5) + b"hello"
    header = _binary_header(2, 9)
    with pytest.raises(oip.OipError, match="declares binary_data_size 9 but 13 bytes"):
        oip.parse_infer_request(header + one_element + b"1234", str(len(header)))
    header = _binary_header(2, len(one_element))
    with pytest.raises(oip.OipError, match="ends before element 1 of 2"):
        oip.parse_infer_request(header + one_element, str(len(header)))
    lying = struct.pack("<I", 50) + b"hello"
    with pytest.raises(oip.OipError, match="element 0 declares 50 bytes"):
        oip.parse_infer_request(header + lying, str(len(header)))
    header = _binary_header(1, len(one_element) + 2)
    with pytest.raises(oip.OipError, match="2 bytes after its 1 elements"):
        oip.parse_infer_request(header + one_element + b"!!", str(len(header)))


def test_metadata_names_tensors_and_platform() -> None:
    meta = oip.model_metadata("kdray-student", "3", ["covid", "normal", "pneumonia"], oip.platform_of("onnx-int8"))
    assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["3"]
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {"probabilities": [-1, 3], "label": [-1]}
    assert oip.platform_of("torch") == "pytorch_libtorch"
    assert "binary_tensor_data" in oip.server_metadata("3")["extensions"]


# -- bounded requests: counted before anything is built per image, refused with a reason code

def _never(*args, **kwargs):
    raise AssertionError("no image may be split or decoded for a request refused on its count")


@pytest.mark.parametrize("binary", [True, False])
def test_images_are_counted_from_the_shape_before_any_is_built(binary: bool, monkeypatch) -> None:
    monkeypatch.setattr(oip, "_split_bytes_tensor", _never)
    monkeypatch.setattr(oip, "_base64_elements", _never)
    count = 10**6
    if binary:  # 4 bytes per empty element: a 3.8 MiB body of a million images
        header = _binary_header(count, 4 * count)
        body, header_length = header + b"\x00" * (4 * count), str(len(header))
    else:
        body, header_length = _json_request(shape=[count], data=[]), None
    with pytest.raises(oip.OipError, match="1000000 images; at most 64") as refused:
        oip.parse_infer_request(body, header_length)
    assert refused.value.reason == "too_many_images"
    limits = oip.RequestOptions(max_images=2)
    with pytest.raises(oip.OipError, match="3 images; at most 2"):
        oip.parse_infer_request(*_triton_request(binary), limits)


def test_a_json_data_list_longer_than_the_cap_is_refused_before_it_is_parsed(monkeypatch) -> None:
    """A million strings under a shape of [1]: refused from the commas, before json.loads builds a list of them."""
    monkeypatch.setattr(oip.json, "loads", _never)
    body = _json_request(data=[""] * 10**6)
    with pytest.raises(oip.OipError, match="JSON values; at most 64 images") as refused:
        oip.parse_infer_request(body, None)
    assert refused.value.reason == "too_many_images"


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"inputs": ' + b"[" * 40 + b"]" * 40 + b"}",
                                  b'{"a": ' * 100_000 + b"1" + b"}" * 100_000])
def test_deep_json_is_refused_with_a_reason_not_a_crash(body: bytes) -> None:
    with pytest.raises(oip.OipError, match="nests deeper than 32") as refused:
        oip.parse_infer_request(body, None)
    assert refused.value.reason == "json_too_deep"


def test_brackets_inside_strings_and_a_legitimate_request_pass() -> None:
    tricky = json.dumps({"id": "[[[[{{{{" * 20 + '\\"]]', "parameters": {"note": "{" * 100},
                         "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "data": [base64.b64encode(b"x").decode()]}]}).encode()
    assert oip.parse_infer_request(tricky, None).images == [b"x"]
    body, header_length = _triton_request(False, [(oip.PROBABILITIES, False), (oip.LABEL, True)],
                                          parameters={"explain": False})
    assert oip.parse_infer_request(body, header_length, oip.RequestOptions(max_images=3)).images == IMAGES
